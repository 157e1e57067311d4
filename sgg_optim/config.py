"""Validated guidance hyper-parameters.

One frozen dataclass holds every keyword that :class:`~sgg_optim.GuidedOptimizer`
accepts (the names are part of the public contract). Validation happens here, once,
so the optimizer never starts half-configured.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .rules import DIRECTION_RULES, MAGNITUDE_RULES

try:  # numpy's bool is not a Python bool, but is no more a number of steps than True is
    from numpy import bool_ as numpy_bool
except ImportError:  # pragma: no cover - numpy comes with torch
    numpy_bool = bool

DIRECTIONS = tuple(DIRECTION_RULES)
MAGNITUDES = tuple(MAGNITUDE_RULES)
SCOPES = ("global", "group", "tensor")
REFERENCE_DTYPES = ("fp32", "bf16", "int8")
NONFINITE_POLICIES = ("skip", "raise", "propagate")

# Fields whose value decides the *shape* of the guidance state; a checkpoint saved
# under different values cannot be resumed (see GuidedOptimizer.load_state_dict).
STRUCTURAL_FIELDS = ("scope", "reference_dtype")


@dataclass(frozen=True)
class GuidanceConfig:
    """Every guidance hyper-parameter, validated on construction.

    Example:
        >>> GuidanceConfig(direction="project").direction
        'project'
        >>> GuidanceConfig(max_angle=120)
        Traceback (most recent call last):
        ...
        ValueError: max_angle must be in (0, 90] degrees, got 120
    """

    direction: str = "cone"
    max_angle: float = 60.0
    strength: float = 0.5
    magnitude: str = "adaptive"
    max_norm: float = 1.0
    spike_factor: float = 3.0
    norm_beta: float = 0.9
    warmup_steps: int = 10
    scope: str = "global"
    ema_beta: float = 0.9
    reference_dtype: str = "fp32"
    nonfinite: str = "skip"
    align_temperature: float = 0.1
    log_every: int = 10

    def __post_init__(self) -> None:
        _choice("direction", self.direction, DIRECTIONS)
        _choice("magnitude", self.magnitude, MAGNITUDES)
        _choice("scope", self.scope, SCOPES)
        _choice("reference_dtype", self.reference_dtype, REFERENCE_DTYPES)
        _choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        # Numbers are stored as Python float / int (numpy scalars included), so that the
        # config in a state_dict stays primitives that torch.load(weights_only=True) reads.
        for name, text, ok in (
            ("max_angle", "in (0, 90] degrees", lambda v: 0 < v <= 90),
            ("strength", "in [0, 1]", lambda v: 0 <= v <= 1),
            ("max_norm", "> 0", lambda v: v > 0),
            # the running mean is fed the clipped norms: a bound at or below it would shrink
            # every step's update toward zero
            ("spike_factor", "> 1", lambda v: v > 1),
            ("norm_beta", "in [0, 1)", lambda v: 0 <= v < 1),
            ("ema_beta", "in [0, 1)", lambda v: 0 <= v < 1),
            ("align_temperature", "> 0", lambda v: v > 0),
        ):
            object.__setattr__(self, name, _in_range(name, getattr(self, name), text, ok))
        object.__setattr__(self, "warmup_steps", _integer("warmup_steps", self.warmup_steps, minimum=0))
        object.__setattr__(self, "log_every", _integer("log_every", self.log_every, minimum=1))

    @property
    def cos_max_angle(self) -> float:
        """``cos(max_angle)``, the cone's boundary cosine."""
        return math.cos(math.radians(self.max_angle))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of primitives, as stored in ``state_dict()``."""
        return dataclasses.asdict(self)

    @classmethod
    def keywords(cls) -> frozenset[str]:
        """The keyword names accepted by the guided optimizers."""
        return frozenset(f.name for f in dataclasses.fields(cls))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _in_range(name: str, value: Any, text: str, ok: Any) -> float:
    """``value`` as a float if it is a real number (not a bool) for which ``ok`` holds."""
    if isinstance(value, (bool, numpy_bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"{name} must be {text}, got {value}")
    return number


def _integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, (bool, numpy_bool)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
