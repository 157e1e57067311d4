"""Accelerate integration: :class:`GuidancePlugin` configures, wraps and logs guidance.

The plugin is a dataclass in the style of Accelerate's own plugins. Every field can
come from a keyword argument or from an ``SGG_*`` environment variable (keyword wins),
so a run started with ``accelerate launch`` changes guidance with no code change::

    SGG_DIRECTION=project SGG_WARMUP_STEPS=20 accelerate launch train.py

Where guidance sits in Accelerate's step (see ``docs/distributed.md``): the
:class:`~sgg_optim.GuidedOptimizer` is the *inner* optimizer of Accelerate's
``AcceleratedOptimizer``, so Accelerate's own logic stays outside it. Under gradient
accumulation the inner ``step()`` runs only on sync steps; with fp16 the GradScaler
unscales first and skips inf steps before guidance is reached. Under DDP the
gradients it sees are already averaged across ranks; under FSDP2 the statistics of the
local shards are summed with one ``all_reduce`` (in :class:`GuidedOptimizer`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from ..config import GuidanceConfig
from ..optimizer import _FSDP1, GuidedOptimizer
from ..reference import Reference

ENV_PREFIX = "SGG_"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GuidanceConfig)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _help(name: str) -> dict[str, str]:
    return {"help": f"guidance keyword `{name}`; env {ENV_PREFIX}{name.upper()}, "
                    f"default {_DEFAULTS[name]!r}"}


@dataclass
class GuidancePlugin:
    """Guidance settings for an Accelerate run, from keywords or ``SGG_*`` variables.

    A field left as ``None`` is read from ``SGG_<FIELD>`` (e.g. ``SGG_MAX_ANGLE=30``),
    else takes :class:`~sgg_optim.GuidanceConfig`'s default. Values are converted to
    the field's type and validated at construction; a bad value raises ``ValueError``
    naming the variable it came from.

    ``reference`` is ``"ema"`` or the path of a file written by
    :meth:`~sgg_optim.Reference.save` (then :meth:`wrap` needs ``model=``).

    Example:
        >>> import os, torch
        >>> os.environ["SGG_MAX_ANGLE"] = "30"
        >>> plugin = GuidancePlugin(direction="project")
        >>> del os.environ["SGG_MAX_ANGLE"]
        >>> plugin.direction, plugin.max_angle, plugin.warmup_steps
        ('project', 30.0, 10)
        >>> opt = plugin.wrap(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
        >>> type(opt).__name__, opt.config.max_angle
        ('GuidedOptimizer', 30.0)
    """

    direction: Optional[str] = field(default=None, metadata=_help("direction"))
    max_angle: Optional[float] = field(default=None, metadata=_help("max_angle"))
    strength: Optional[float] = field(default=None, metadata=_help("strength"))
    magnitude: Optional[str] = field(default=None, metadata=_help("magnitude"))
    max_norm: Optional[float] = field(default=None, metadata=_help("max_norm"))
    spike_factor: Optional[float] = field(default=None, metadata=_help("spike_factor"))
    norm_beta: Optional[float] = field(default=None, metadata=_help("norm_beta"))
    warmup_steps: Optional[int] = field(default=None, metadata=_help("warmup_steps"))
    scope: Optional[str] = field(default=None, metadata=_help("scope"))
    ema_beta: Optional[float] = field(default=None, metadata=_help("ema_beta"))
    reference_dtype: Optional[str] = field(default=None, metadata=_help("reference_dtype"))
    nonfinite: Optional[str] = field(default=None, metadata=_help("nonfinite"))
    align_temperature: Optional[float] = field(default=None, metadata=_help("align_temperature"))
    log_every: Optional[int] = field(default=None, metadata=_help("log_every"))
    reference: Optional[str] = field(default=None, metadata={
        "help": "'ema' or the path of a saved Reference; env SGG_REFERENCE, default 'ema'"})
    log_prefix: str = field(default="guidance/", metadata={"help": "prefix of the logged stats keys"})

    def __post_init__(self) -> None:
        sources: dict[str, str] = {}
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is None:
                var = ENV_PREFIX + name.upper()
                raw = os.environ.get(var)
                if raw is None:
                    setattr(self, name, default)
                else:
                    setattr(self, name, _convert(var, raw.strip(), type(default)))
                    sources[name] = var
            elif isinstance(_DEFAULTS[name], float) and isinstance(getattr(self, name), int) \
                    and not isinstance(getattr(self, name), bool):
                setattr(self, name, float(getattr(self, name)))
        if self.reference is None:
            self.reference = os.environ.get(ENV_PREFIX + "REFERENCE", "").strip() or "ema"
        _warn_unknown_variables()
        try:
            GuidanceConfig(**self.guidance_kwargs())
        except (TypeError, ValueError) as e:
            name = next((n for n in sources if str(e).startswith(n + " ")), None)
            if name is None:
                raise
            raise ValueError(f"{sources[name]}={os.environ[sources[name]]!r}: {e}") from e

    def guidance_kwargs(self) -> dict[str, Any]:
        """The guidance keywords, as :class:`~sgg_optim.GuidedOptimizer` takes them."""
        return {name: getattr(self, name) for name in _DEFAULTS}

    @property
    def config(self) -> GuidanceConfig:
        """The validated :class:`~sgg_optim.GuidanceConfig`."""
        return GuidanceConfig(**self.guidance_kwargs())

    # -- wrapping ---------------------------------------------------------------------
    def wrap(self, optimizer: Optimizer, *, accelerator: Any = None, model: Optional[torch.nn.Module] = None,
             reference: Any = None) -> Optimizer:
        """Guide ``optimizer``; returns the optimizer to use from now on.

        Before ``accelerator.prepare``: returns a new :class:`GuidedOptimizer` over
        ``optimizer`` (prepare it as usual). After: ``optimizer`` is the
        ``AcceleratedOptimizer``; its inner optimizer is replaced in place by the
        guided one and ``optimizer`` itself is returned, so gradient accumulation,
        step skipping and ``save_state`` keep working unchanged.

        ``reference`` (a :class:`Reference` or list) overrides the plugin's; a
        reference path needs ``model``. With ``accelerator``, ``stats`` are logged
        through ``accelerator.log`` every ``log_every`` optimizer steps.
        """
        _refuse_deepspeed(optimizer, accelerator)
        _refuse_fsdp1(accelerator)
        holder = optimizer if _is_accelerated(optimizer) else None
        inner = holder.optimizer if holder is not None else optimizer
        if isinstance(inner, GuidedOptimizer):
            raise TypeError("optimizer is already guided; use GuidancePlugin.track(optimizer, accelerator) "
                            "to log its stats")
        guided = GuidedOptimizer(inner, reference=self._reference(reference, model), **self.guidance_kwargs())
        if holder is not None:
            _replace_inner(holder, guided)
        if accelerator is not None:
            self.track(guided, accelerator)
            if getattr(getattr(accelerator, "distributed_type", None), "value", None) == "FSDP":
                # save_state goes through torch's distributed checkpoint, which keeps only
                # `state` and `param_groups` of the optimizer: carry the guidance state beside it.
                accelerator.register_for_checkpointing(GuidanceCheckpoint(guided))
        return holder if holder is not None else guided

    def _reference(self, reference: Any, model: Optional[torch.nn.Module]) -> Any:
        if reference is not None:
            return reference
        if self.reference == "ema":
            return "ema"
        if model is None:
            raise ValueError(f"reference={self.reference!r} is a file: pass model= to wrap() to load it")
        return Reference.load(self.reference, model)

    # -- logging ------------------------------------------------------------------------
    def track(self, optimizer: Optimizer, accelerator: Any) -> Callable[[], None]:
        """Log ``stats`` through ``accelerator.log`` every ``log_every`` optimizer steps.

        ``optimizer`` is a :class:`GuidedOptimizer` or anything wrapping one. Returns a
        function that stops the logging.
        """
        guided = find_guided(optimizer)
        if guided is None:
            raise TypeError(f"{type(optimizer).__name__} does not wrap a GuidedOptimizer")

        def log_after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            step = guided.stats["step"]
            if step and step % self.log_every == 0:
                self.log(accelerator, guided)

        return guided.register_step_post_hook(log_after_step).remove

    def log(self, accelerator: Any, optimizer: Optimizer, step: Optional[int] = None) -> dict[str, float]:
        """Log the last step's ``stats`` now (at ``step``, default the optimizer's step count)."""
        guided = find_guided(optimizer)
        if guided is None:
            raise TypeError(f"{type(optimizer).__name__} does not wrap a GuidedOptimizer")
        values = flat_stats(guided.stats, self.log_prefix)
        accelerator.log(values, step=guided.stats["step"] if step is None else step)
        return values


class GuidanceCheckpoint:
    """The guidance state of an optimizer as an object Accelerate checkpoints
    (``accelerator.register_for_checkpointing``); :meth:`GuidancePlugin.wrap` registers
    one under FSDP, where ``save_state`` saves the optimizer through
    ``torch.distributed.checkpoint`` and the ``"guidance"`` entry of its state dict would
    be dropped. Accelerate calls ``state_dict`` on every rank (a collective here: sharded
    references are gathered) and writes rank 0's; ``load_state`` restores it after the
    optimizer, each rank keeping its shard.

    Example:
        >>> import torch
        >>> from sgg_optim import GuidedAdamW
        >>> ckpt = GuidanceCheckpoint(GuidedAdamW(torch.nn.Linear(2, 1).parameters()))
        >>> sorted(ckpt.state_dict())[:3]
        ['accepted', 'align_count', 'align_ema']
    """

    def __init__(self, optimizer: Optimizer) -> None:
        guided = find_guided(optimizer)
        if guided is None:
            raise TypeError(f"{type(optimizer).__name__} does not wrap a GuidedOptimizer")
        self.optimizer = guided

    def state_dict(self) -> dict[str, Any]:
        """:meth:`GuidedOptimizer.guidance_state_dict`."""
        return self.optimizer.guidance_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`GuidedOptimizer.load_guidance_state_dict`."""
        self.optimizer.load_guidance_state_dict(state_dict)


def flat_stats(stats: dict[str, Any], prefix: str = "guidance/") -> dict[str, float]:
    """``opt.stats`` as a flat ``{name: float}`` dict; per-source lists get an index.

    Example:
        >>> flat_stats({"step": 3, "cos": 0.5, "weights": [0.25, 0.75]})
        {'guidance/step': 3.0, 'guidance/cos': 0.5, 'guidance/weights/0': 0.25, 'guidance/weights/1': 0.75}
    """
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{prefix}{key}/{i}": float(v) for i, v in enumerate(value)})
        else:
            out[prefix + key] = float(value)
    return out


def find_guided(optimizer: Any) -> Optional[GuidedOptimizer]:
    """The :class:`GuidedOptimizer` inside Accelerate/Trainer wrappers, or None.

    Example:
        >>> import torch
        >>> from sgg_optim import GuidedAdamW
        >>> opt = GuidedAdamW(torch.nn.Linear(2, 1).parameters())
        >>> find_guided(opt) is opt, find_guided(opt.base_optimizer)
        (True, None)
    """
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GuidedOptimizer):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def _is_accelerated(optimizer: Any) -> bool:
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    return isinstance(optimizer, AcceleratedOptimizer)


def _replace_inner(holder: Any, guided: GuidedOptimizer) -> None:
    """Swap an AcceleratedOptimizer's inner optimizer, re-pointing its GradScaler patch."""
    holder.optimizer = guided
    if getattr(holder, "scaler", None) is not None:
        from accelerate.optimizer import patch_optimizer_step

        holder._optimizer_original_step_method = guided.step
        holder._optimizer_patched_step_method = patch_optimizer_step(holder, guided.step)


def _refuse_fsdp1(accelerator: Any) -> None:
    """Accelerate's FSDP plugin runs FSDP1 unless ``fsdp_version: 2``: refuse it before
    training rather than at the first step (the step refuses it too, for other launchers)."""
    if getattr(getattr(accelerator, "distributed_type", None), "value", None) != "FSDP":
        return
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if getattr(plugin, "fsdp_version", 2) == 1:
        raise NotImplementedError(_FSDP1)


def _refuse_deepspeed(optimizer: Any, accelerator: Any) -> None:
    """ZeRO keeps gradients in flat partitions that ``p.grad`` does not show: guiding
    them would silently do nothing, or use one rank's partial statistics."""
    names = {type(o).__name__ for o in (optimizer, getattr(optimizer, "optimizer", None)) if o is not None}
    kind = getattr(getattr(accelerator, "distributed_type", None), "value", None)
    if "DeepSpeedOptimizerWrapper" in names or kind == "DEEPSPEED":
        raise NotImplementedError(
            "GuidedOptimizer does not support DeepSpeed (ZeRO partitions gradients outside "
            "param.grad, so the guidance statistics would be wrong): use DDP or FSDP2 "
            "(see docs/distributed.md)")


# SGG_* variables that are not guidance settings: the few-shot tooling's cache folder.
_OTHER_VARIABLES = ("SGG_OPTIM_CACHE", "SGG_OPTIM_OFFLINE")


def _warn_unknown_variables() -> None:
    """Warn once per plugin about ``SGG_*`` variables that set nothing (a typo such as
    ``SGG_MAXANGLE`` would otherwise be silently ignored), naming the closest valid one."""
    known = [ENV_PREFIX + n.upper() for n in (*_DEFAULTS, "reference")]
    for var in sorted(os.environ):
        if var.startswith(ENV_PREFIX) and var not in known and var not in _OTHER_VARIABLES:
            close = difflib.get_close_matches(var, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (valid: {', '.join(known)})"
            warnings.warn(f"environment variable {var} is not a guidance setting and is ignored{hint}",
                          UserWarning, stacklevel=3)


def _convert(var: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError
            return raw.lower() in _TRUE
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
