"""Fine-tuning strategies compared side by side, as a registry of composable rows.

A :class:`Strategy` says how to train, not what to train on: the optimizer (plain AdamW
or :class:`~sgg_optim.GuidedAdamW` with guidance keywords), gradient clipping, LoRA or
full fine-tuning, which reference guidance uses (EMA, a source task, several source tasks,
or the pretrained model's in-context behaviour), the learning-rate grid chosen from on the
validation split, and two hooks for the methods of :mod:`sgg_optim.methods`: ``prepare``
changes the model before training (L-Tuning, ProMoT's first stage, in-context-format
inputs) and ``objective`` replaces the loss (SGG's exact objective). Names joined with
``+`` compose: ``get_strategy("lora+cone-source")`` is LoRA with source-guided cone,
``get_strategy("promot+cone")`` is ProMoT whose second stage is guided.

    >>> get_strategy("lora+cone-ema").guidance["direction"], get_strategy("lora+cone-ema").lora
    ('cone', True)
    >>> register(Strategy("sgd-like", lr_grid=(1e-3,)))
    >>> "sgd-like" in STRATEGIES
    True
    >>> del STRATEGIES["sgd-like"]
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where an optimizer is built: `sgg-optim --help` stays fast
    import torch
    from torch import Tensor, nn

    from ..reference import Reference
    from .tasks import Task
    from .training import RunConfig

FULL_LRS = (2e-5, 5e-5, 1e-4, 2e-4)  # protocol v2: the sweep of issue 10
LORA_LRS = (5e-4, 1e-3, 3e-3)
LABEL_LRS = (1e-3, 3e-3, 1e-2)  # L-Tuning trains only label embeddings and a prompt / prefix
REFERENCES = ("ema", "source", "sources", "icl", "kshot")


@dataclass(frozen=True)
class PrepareContext:
    """What a ``prepare`` hook may use: the run's tokenizer, task, K-shot training set and
    budget, and the row's guidance keywords (for a hook that trains itself, as SetFit's)."""

    tokenizer: Any  # a Hugging Face tokenizer, or a method's wrapper around one
    task: Task
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    cfg: RunConfig
    seed: int
    lr: float
    guidance: Optional[dict[str, Any]] = None


Prepare = Callable[["nn.Module", PrepareContext], "tuple[nn.Module, Any]"]
LossFn = Callable[["nn.Module", dict], "Tensor"]
Objective = Callable[["nn.Module", "Optional[Reference]"], LossFn]


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison. ``guidance=None`` means plain ``torch.optim.AdamW``.

    ``reference``: ``"ema"`` (the optimizer's own), ``"source"`` (captured on the source
    task before training), ``"sources"`` (one per source task: multi-source alignment),
    ``"icl"`` (the label-word loss of the pretrained causal LM on in-context prompts of the
    source task) or ``"kshot"`` (the class-balanced mean gradient of the K-shot training
    set at the model's initial point, frozen: needs no source task). ``train=False``
    evaluates the prepared model without training. ``guide_head=False`` leaves the fresh
    classification head out of direction guidance: it becomes a param group of its own
    whose reference entries are zero (a block with no reference keeps its direction), and
    the guidance keywords must say ``scope="group"`` (or ``"tensor"``) so that its
    gradient does not enter the body's cosine either. The magnitude rule still applies,
    per block.
    """

    name: str
    lr_grid: tuple[float, ...] = FULL_LRS
    guidance: Optional[dict[str, Any]] = None
    clip_norm: Optional[float] = None
    lora: bool = False
    reference: str = "ema"
    prepare: Optional[Prepare] = field(default=None, compare=False)
    objective: Optional[Objective] = field(default=None, compare=False)
    train: bool = True
    probe_fraction: float = 0.0
    own_loop: bool = False
    requires: tuple[str, ...] = ()
    guide_head: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"strategy {self.name}: reference must be one of {REFERENCES}, got {self.reference!r}")
        if not self.guide_head and (self.guidance is None or self.guidance.get("scope") not in ("group", "tensor")
                                    or self.reference == "ema"):
            raise ValueError(f"strategy {self.name}: guide_head=False needs guidance with scope='group' "
                             "(or 'tensor') and a captured reference (an EMA reference would guide the head "
                             "by its own past)")

    def build_optimizer(self, model: nn.Module, lr: float,
                        reference: Optional[Reference | Sequence[Reference]] = None) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (named, so references bind)."""
        import torch

        from ..adamw import GuidedAdamW

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # foreach: the same arithmetic as the per-tensor loop (bit for bit), one call per op
        # for all tensors; PyTorch's default on GPU, not on CPU
        if self.guidance is None:
            return torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.01, foreach=True)
        kwargs = dict(self.guidance, foreach=True)
        if self.reference != "ema":
            if reference is None:
                raise ValueError(f"strategy {self.name} needs a {self.reference} reference")
            kwargs["reference"] = reference
        groups: Any = params
        if not self.guide_head:
            from .training import head_names, without_head

            names = head_names(model)
            head = [(n, p) for n, p in params if n in names]
            if not head:
                raise ValueError(f"strategy {self.name} leaves the classification head unguided; "
                                 "this model has no head parameter")
            groups = [{"params": [(n, p) for n, p in params if n not in names]}, {"params": head}]
            kwargs["reference"] = without_head(reference, model)
        return GuidedAdamW(groups, lr=lr, weight_decay=0.01, **kwargs)


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

    hooks = [h for h in (a.prepare, b.prepare) if h is not None]

    def prepare(model: nn.Module, ctx: PrepareContext) -> tuple[nn.Module, Any]:
        for h in hooks:
            model, tok = h(model, ctx)
            ctx = replace(ctx, tokenizer=tok)
        return model, ctx.tokenizer

    if a.objective is not None and b.objective is not None:
        raise ValueError(f"cannot compose {a.name} and {b.name}: both set objective")
    lora = a.lora or b.lora
    # a LoRA component brings its learning rates unless the other part names its own
    lr_grid = LORA_LRS if lora and FULL_LRS in (a.lr_grid, b.lr_grid) else pick("lr_grid", FULL_LRS)
    return Strategy(
        name=f"{a.name}+{b.name}", lr_grid=lr_grid, guidance=pick("guidance", None),
        clip_norm=pick("clip_norm", None), lora=lora, reference=pick("reference", "ema"),
        probe_fraction=pick("probe_fraction", 0.0), own_loop=a.own_loop or b.own_loop,
        requires=tuple(dict.fromkeys(a.requires + b.requires)), guide_head=a.guide_head and b.guide_head,
        prepare=prepare if len(hooks) > 1 else (hooks[0] if hooks else None),
        objective=a.objective or b.objective, train=a.train and b.train,
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
_ADAPTIVE = {"direction": "off", "magnitude": "adaptive", "warmup_steps": 3}

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
    Strategy("cone-sources", guidance=_CONE, reference="sources",
             description="cone 60 deg + adaptive norm around the alignment-weighted mix of several sources"),
    Strategy("blend-sources", guidance=_BLEND, reference="sources",
             description="blend 0.3 toward the alignment-weighted mix of several sources + adaptive norm"),
    Strategy("cone-icl", guidance=_CONE, reference="icl",
             description="cone 60 deg around the pretrained LM's in-context gradient on the source task"),
    Strategy("lora", lr_grid=LORA_LRS, lora=True, description="LoRA r=8 on attention, AdamW"),
    Strategy("lp-ft", probe_fraction=1 / 3, description="LP-FT: the first third of the steps train only the "
             "fresh head (encoder frozen), the rest the whole model; AdamW"),
    Strategy("cone-kshot", guidance=_CONE, reference="kshot",
             description="cone 60 deg + adaptive norm around the K shots' own mean gradient at the start "
                         "(class-balanced, frozen; no source task)"),
    Strategy("cone-source-body", guidance={**_CONE, "scope": "group"}, reference="source", guide_head=False,
             description="cone-source with the fresh head left out of the cone: the body is one block guided "
                         "toward the source's body gradient, the head another with no reference (adaptive "
                         "norm per block)"),
    Strategy("project-kshot", guidance=_PROJECT, reference="kshot",
             description="A-GEM-style projection on the K shots' mean gradient at the start (frozen)"),
    Strategy("adaptive", guidance=_ADAPTIVE,
             description="magnitude control alone: norms above 3x their running mean scaled down, "
                         "warm-up 3, no direction rule"),
    Strategy("cone-ema-w3", guidance={**_CONE, "warmup_steps": 3},
             description="GuidedAdamW defaults (cone 60 deg + adaptive norm, EMA ref) with warm-up 3 instead of 10"),
):
    register(_s)
# short names for composition ("promot+cone"): the EMA-reference rows
for _short in ("project", "cone", "blend"):
    register(replace(STRATEGIES[f"{_short}-ema"], name=_short))
# the optimizer-free names for composition: "lora+cone-ema", "promot+cone-source", ...
register(Strategy("full", description="full fine-tuning (the default)"))
register(Strategy("pretrained", train=False, lr_grid=(0.0,),
                  description="the pretrained model as it is (zero-shot label words; no training)"))


def _method_hook(module: str, factory: str, **kwargs: Any) -> Prepare:
    """A ``prepare`` hook from :mod:`sgg_optim.methods`, imported on first use (peft is heavy)."""
    def hook(model: nn.Module, ctx: PrepareContext) -> tuple[nn.Module, Any]:
        return getattr(importlib.import_module(f"sgg_optim.methods.{module}"), factory)(**kwargs)(model, ctx)
    return hook


def _sgg_exact(model: nn.Module, reference: Optional[Reference]) -> LossFn:
    from ..methods.sgg_exact import sgg_exact_objective

    return sgg_exact_objective()(model, reference)


for _s in (
    Strategy("ltuning-prompt", lr_grid=LABEL_LRS, prepare=_method_hook("ltuning", "prepare_ltuning", regime="prompt"),
             description="L-Tuning: label-derived soft prompt + label-embedding classifier, model frozen"),
    Strategy("ltuning-prefix", lr_grid=LABEL_LRS, prepare=_method_hook("ltuning", "prepare_ltuning", regime="prefix"),
             description="L-Tuning: label-derived prefix + label-embedding classifier, model frozen"),
    Strategy("promot", prepare=_method_hook("promot", "prepare_promot"),
             description="ProMoT: soft prompt trained first (model frozen), then the model with the prompt frozen"),
    Strategy("icl-format", prepare=_method_hook("incontext", "prepare_icl_format", k=2, demo_max_length=32),
             description="in-context-format fine-tuning: 2 demonstrations (32 tokens each) from the shots per input"),
    Strategy("setfit", prepare=_method_hook("setfit", "prepare_setfit"), own_loop=True, requires=("setfit",),
             description="SetFit (the setfit package, its defaults): contrastive body tuning on pairs of the "
                         "shots, then a logistic-regression head; the row's lr is SetFit's body lr"),
    Strategy("sgg-exact", objective=_sgg_exact,
             description="SGG's exact objective: L + direction and magnitude penalties by double backward"),
):
    register(_s)
