"""Fine-tuning strategies compared side by side, as a registry of composable rows.

A :class:`Strategy` says how to train, not what to train on: the optimizer (plain AdamW
or :class:`~sgg_optim.GuidedAdamW` with guidance keywords), gradient clipping, LoRA or
full fine-tuning, which reference guidance uses (EMA or a source task), the learning-rate
grid chosen from on the validation split, and an optional ``prepare_model`` hook for
methods that change the model (a later issue's L-Tuning or ProMoT). Names joined with
``+`` compose: ``get_strategy("lora+cone-source")`` is LoRA with source-guided cone.

    >>> get_strategy("lora+cone-ema").guidance["direction"], get_strategy("lora+cone-ema").lora
    ('cone', True)
    >>> register(Strategy("sgd-like", lr_grid=(1e-3,)))
    >>> "sgd-like" in STRATEGIES
    True
    >>> del STRATEGIES["sgd-like"]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..adamw import GuidedAdamW

FULL_LRS = (2e-5, 5e-5, 1e-4)
LORA_LRS = (5e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison. ``guidance=None`` means plain ``torch.optim.AdamW``."""

    name: str
    lr_grid: tuple[float, ...] = FULL_LRS
    guidance: Optional[dict[str, Any]] = None
    clip_norm: Optional[float] = None
    lora: bool = False
    reference: str = "ema"  # "ema" or "source" (captured on SOURCE_TASK before training)
    prepare_model: Optional[Callable[[nn.Module], nn.Module]] = field(default=None, compare=False)
    description: str = ""

    def build_optimizer(self, model: nn.Module, lr: float, reference: Any = None) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (named, so references bind)."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.guidance is None:
            return torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.01)
        kwargs = dict(self.guidance)
        if self.reference == "source":
            if reference is None:
                raise ValueError(f"strategy {self.name} needs a source reference")
            kwargs["reference"] = reference
        return GuidedAdamW(params, lr=lr, weight_decay=0.01, **kwargs)


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    """Add a row (a later issue registers its methods here)."""
    STRATEGIES[strategy.name] = strategy


def compose(a: Strategy, b: Strategy) -> Strategy:
    """``a`` then ``b``: b's optimizer settings win where a has the default; conflicts raise."""
    def pick(name: str, default: Any) -> Any:
        va, vb = getattr(a, name), getattr(b, name)
        if va != default and vb != default and va != vb:
            raise ValueError(f"cannot compose {a.name} and {b.name}: both set {name}")
        return vb if vb != default else va

    hooks = [h for h in (a.prepare_model, b.prepare_model) if h is not None]

    def prepare(model: nn.Module) -> nn.Module:
        for h in hooks:
            model = h(model)
        return model

    lora = a.lora or b.lora
    # a LoRA component brings its learning rates unless the other part names its own
    lr_grid = LORA_LRS if lora and FULL_LRS in (a.lr_grid, b.lr_grid) else pick("lr_grid", FULL_LRS)
    return Strategy(
        name=f"{a.name}+{b.name}", lr_grid=lr_grid, guidance=pick("guidance", None),
        clip_norm=pick("clip_norm", None), lora=lora, reference=pick("reference", "ema"),
        prepare_model=prepare if hooks else None,
        description=f"{a.description}; {b.description}".strip("; "),
    )


def get_strategy(name: str) -> Strategy:
    """A registered strategy, or a ``+``-composition of registered ones."""
    parts = name.split("+")
    for p in parts:
        if p not in STRATEGIES:
            raise KeyError(f"unknown strategy {p!r}; known: {', '.join(STRATEGIES)}")
    out = STRATEGIES[parts[0]]
    for p in parts[1:]:
        out = compose(out, STRATEGIES[p])
    return replace(out, name=name)


_CONE = {"direction": "cone", "max_angle": 60.0, "magnitude": "adaptive"}
_BLEND = {"direction": "blend", "strength": 0.3, "magnitude": "adaptive"}
_PROJECT = {"direction": "project", "magnitude": "off"}

for _s in (
    Strategy("adamw", description="torch.optim.AdamW, no clipping"),
    Strategy("adamw-clip", clip_norm=1.0, description="AdamW + clip_grad_norm_(1.0)"),
    Strategy("project-ema", guidance=_PROJECT, description="A-GEM-style projection on the EMA reference"),
    Strategy("project-source", guidance=_PROJECT, reference="source",
             description="A-GEM-style projection on the source reference"),
    Strategy("cone-ema", guidance=_CONE, description="GuidedAdamW defaults: cone 60 deg + adaptive norm, EMA ref"),
    Strategy("cone-source", guidance=_CONE, reference="source",
             description="cone 60 deg + adaptive norm around the source reference"),
    Strategy("blend-ema", guidance=_BLEND, description="blend 0.3 toward the EMA reference + adaptive norm"),
    Strategy("blend-source", guidance=_BLEND, reference="source",
             description="blend 0.3 toward the source reference + adaptive norm"),
    Strategy("lora", lr_grid=LORA_LRS, lora=True, description="LoRA r=8 on attention, AdamW"),
):
    register(_s)
# the optimizer-free names for composition: "lora+cone-ema", "promot+cone-source", ...
register(Strategy("full", description="full fine-tuning (the default)"))
