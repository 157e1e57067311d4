"""Validated guidance hyper-parameters.

One frozen dataclass holds every keyword that :class:`~sgg_optim.GuidedOptimizer`
accepts (the names are part of the public contract). Validation happens here, once,
so the optimizer never starts half-configured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .rules import DIRECTION_RULES, MAGNITUDE_RULES

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
        _in_range("max_angle", self.max_angle, "in (0, 90] degrees", lambda v: 0 < v <= 90)
        _in_range("strength", self.strength, "in [0, 1]", lambda v: 0 <= v <= 1)
        _in_range("max_norm", self.max_norm, "> 0", lambda v: v > 0)
        _in_range("spike_factor", self.spike_factor, "> 0", lambda v: v > 0)
        _in_range("norm_beta", self.norm_beta, "in [0, 1)", lambda v: 0 <= v < 1)
        _in_range("ema_beta", self.ema_beta, "in [0, 1)", lambda v: 0 <= v < 1)
        _in_range("align_temperature", self.align_temperature, "> 0", lambda v: v > 0)
        _integer("warmup_steps", self.warmup_steps, minimum=0)
        _integer("log_every", self.log_every, minimum=1)

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


def _in_range(name: str, value: Any, text: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {text}, got {value}")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
