"""Transformers integration: a ``TrainerCallback`` that logs the guidance ``stats``.

Use the optimizer through ``Trainer(..., optimizer_cls_and_kwargs=(GuidedAdamW, {...}))``
and add ``callbacks=[GuidanceCallback()]``: every Trainer log during training then
carries ``guidance/cos``, ``guidance/scale``, ... beside ``loss``.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from .accelerate import find_guided, flat_stats


class GuidanceCallback(TrainerCallback):
    """Add the last guidance step's ``stats`` to the Trainer's training logs.

    The values join the ``logs`` dict that later callbacks (progress bar, printer)
    receive and the entry already appended to ``state.log_history``. Reporting
    integrations that run *before* this callback (``report_to`` ones are added
    first) do not see them; to send the stats to a tracker too, put this callback
    first: ``trainer.callback_handler.callbacks.insert(0, GuidanceCallback())``.

    Example:
        >>> GuidanceCallback(prefix="sgg/").prefix
        'sgg/'
    """

    def __init__(self, prefix: str = "guidance/") -> None:
        self.prefix = prefix

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
               optimizer: Any = None, **kwargs: Any) -> None:
        if logs is None or not _is_training_log(logs):
            return
        guided = find_guided(optimizer)
        if guided is None:
            return
        values = flat_stats(guided.stats, self.prefix)
        logs.update(values)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(
                last.get(k) == v for k, v in logs.items() if k not in values):
            last.update(values)


def _is_training_log(logs: dict[str, Any]) -> bool:
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)
