"""Transformers integration: a ``TrainerCallback`` that logs the guidance ``stats``.

Use the optimizer through ``Trainer(..., optimizer_cls_and_kwargs=(GuidedAdamW, {...}))``
and add ``callbacks=[GuidanceCallback()]``: every Trainer log during training then
carries ``guidance/cos``, ``guidance/scale``, ... beside ``loss``. TRL's trainers are
Trainers (its ``DPOTrainer`` takes the optimizer as an instance: ``optimizers=(opt, None)``).
"""

from __future__ import annotations

import math
import warnings
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

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Warn once about two Trainer settings that silently change a guided run.

        The Trainer clips to ``max_grad_norm`` (default 1.0) *before* ``optimizer.step()``:
        the magnitude rule then sees gradients that are already clipped (the adaptive
        rule rarely acts), and ``guidance/grad_norm`` is the clipped norm, not the
        Trainer's logged ``grad_norm``. Pass ``max_grad_norm=0`` to leave magnitude to guidance.

        The Trainer does not pass ``learning_rate`` to a class given in
        ``optimizer_cls_and_kwargs``: left out of its keywords, the lr is the class's own
        default (``GuidedAdamW``: 1e-3, 50x TRL's ``SFTConfig`` default), and the logs show it.
        """
        guided = find_guided(optimizer)
        if guided is not None:
            _warn_unless_lr_is(guided, getattr(args, "learning_rate", None))
        clip = getattr(args, "max_grad_norm", 0) or 0
        if guided is not None and clip > 0 and guided.config.magnitude != "off":
            warnings.warn(f"TrainingArguments.max_grad_norm={clip} clips gradients before the guided optimizer, "
                          f"so magnitude={guided.config.magnitude!r} sees clipped gradients; pass "
                          "max_grad_norm=0 to let guidance control magnitude (docs/usage.md)", UserWarning,
                          stacklevel=2)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
               optimizer: Any = None, **kwargs: Any) -> None:
        """Add ``guidance/*`` figures to a training log (not to evaluation logs)."""
        if logs is None or not _is_training_log(logs):
            return
        guided = find_guided(optimizer)
        if guided is None:
            return
        values = flat_stats(guided.stats, self.prefix)
        logs.update(values)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(
                _same(last.get(k), v) for k, v in logs.items() if k not in values):
            last.update(values)


def _warn_unless_lr_is(optimizer: Any, lr: Optional[float]) -> None:
    """Warn when no parameter group starts at ``lr`` (a scheduler keeps the start as ``initial_lr``)."""
    starts = sorted({g.get("initial_lr", g["lr"]) for g in optimizer.param_groups})
    if lr is None or any(math.isclose(float(s), lr, rel_tol=1e-6) for s in starts):
        return
    shown = ", ".join(f"{float(s):g}" for s in starts)
    warnings.warn(f"the guided optimizer's learning rate is {shown}, not TrainingArguments.learning_rate={lr:g}: "
                  "the Trainer passes no learning rate to a class given in optimizer_cls_and_kwargs; put "
                  "\"lr\": args.learning_rate in its keywords", UserWarning, stacklevel=3)


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN counting as equal to NaN (a skipped step logs ``grad_norm: nan``)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _is_training_log(logs: dict[str, Any]) -> bool:
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)
