"""Structured Gradient Guidance's exact objective, by double backward.

The paper (arXiv 2506.00726) trains with

    L_total = L + lambda_dir * (1 - cos(grad L, r)) + lambda_mag * relu(|grad L| - tau)^2

over chosen parameters theta, with r a task-reference direction treated as a constant.
:class:`~sgg_optim.GuidedOptimizer` is the cheap first-order version (it edits the gradient);
here ``grad L`` is taken with ``create_graph=True``, so ``L_total.backward()`` yields the exact
gradient of the objective, Hessian-vector products included, at about 3x the CPU cost of a
plain AdamW step on MiniLM, 1.24x with the double backward restricted to the top layer and
head (``benchmarks/results/sgg_exact_cost.md``).

Layers, from pure to stateful:

- :func:`sgg_penalty`: the two penalty terms from a list of gradients (pure math).
- :func:`sgg_exact_loss`: ``L`` and parameters -> ``L_total`` (takes the gradients itself).
- :class:`SGGObjective`: ``loss_fn(model, batch)`` holding the reference (a frozen
  :class:`~sgg_optim.Reference` or an EMA of past task gradients) and an adaptive ``tau``.
- :func:`sgg_exact_objective`: the ``objective`` hook of the few-shot benchmark's strategies.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..reference import Reference

__all__ = ["SGGObjective", "double_backward_attention", "reference_sqnorm", "select_parameters", "sgg_exact_loss",
           "sgg_exact_objective", "sgg_penalty"]

LossFn = Callable[[nn.Module, Any], Tensor]
ObjectiveFactory = Callable[[nn.Module, Optional[Reference]], LossFn]
ParamFilter = Union[Callable[[str, Tensor], bool], Sequence[str], None]

# Defaults of the benchmark's sgg-exact row (MiniLM, lr ~5e-5, 30 steps). Measured on MiniLM
# with a fresh head, rt-polarity 16 shots, the first 12 AdamW steps: |grad (1 - cos(g, EMA))|
# is 2.3-8.6x |grad L| (it grows as |H|/|g|), |grad relu(|g| - |g|/1.5)^2| is 1.8-3.3x. These
# weights put each term's gradient at roughly 10-45% and 20-35% of the task gradient: a
# modifier of the task's step, never a replacement for it.
DEFAULT_LAMBDA_DIR = 0.05
DEFAULT_LAMBDA_MAG = 0.1
DEFAULT_TAU_FACTOR = 1.5


def double_backward_attention() -> Any:
    """A context for the forward pass of a double backward: ``scaled_dot_product_attention``
    restricted to its math kernel, since the fused CPU / flash kernels have no derivative
    of their backward (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented``). :class:`SGGObjective` uses it on its own; wrap your forward in it
    when calling :func:`sgg_exact_loss` on an attention model.

    Example:
        >>> with double_backward_attention():
        ...     pass
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _check_number(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _check_fraction(name: str, value: Any) -> None:
    _check_number(name, value)
    if value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32: bf16/fp16 sums of squares lose too much (fp64 is kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reference_sqnorm(reference: Optional[Sequence[Optional[Tensor]]]) -> Optional[Tensor]:
    """``|r|^2`` (at least fp32) over the given tensors, or None when the direction term must be off
    (no reference, all entries None, zero or non-finite norm).

    Example:
        >>> import torch
        >>> reference_sqnorm([torch.tensor([3.0]), None, torch.tensor([4.0])])
        tensor(25.)
        >>> reference_sqnorm([torch.zeros(2)]) is None, reference_sqnorm([torch.tensor([float("nan")])]) is None
        (True, True)
    """
    parts = [_wide(r.detach()).pow(2).sum() for r in (reference or ()) if r is not None]
    if not parts:
        return None
    rr = torch.stack([p.to(parts[0].device) for p in parts]).sum()
    # One host read: the objective already syncs on its loss, and a Python branch lets an
    # unusable reference drop the term (and its graph) entirely instead of masking NaNs.
    return rr if bool(torch.isfinite(rr) & (rr > 0)) else None


def sgg_penalty(grads: Sequence[Optional[Tensor]], reference: Optional[Sequence[Optional[Tensor]]] = None, *,
                lambda_dir: float, lambda_mag: float, tau: float, eps: float = 1e-12,
                rr: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``lambda_dir * (1 - cos(g, r)) + lambda_mag * relu(|g| - tau)^2`` over all of ``grads``
    as one vector (global scope), and the figures (detached 0-dim tensors).

    ``grads`` may carry a graph (``create_graph=True``): the penalty is then differentiable
    w.r.t. the parameters. ``None`` entries count as zero gradient. ``reference`` is aligned
    with ``grads`` and treated as a constant; a missing, zero or non-finite reference turns the
    direction term off. ``rr`` is ``reference_sqnorm(reference)`` when the caller has it.

    Example:
        >>> import torch
        >>> g, r = [torch.tensor([3.0, 4.0])], [torch.tensor([1.0, 0.0])]
        >>> pen, fig = sgg_penalty(g, r, lambda_dir=1.0, lambda_mag=1.0, tau=4.0)
        >>> round(float(fig["cos"]), 3), float(fig["grad_norm"]), round(float(pen), 3)
        (0.6, 5.0, 1.4)
    """
    check_weights(lambda_dir, lambda_mag, tau, eps)
    if reference is not None and len(reference) != len(grads):
        raise ValueError(f"reference has {len(reference)} entries, grads has {len(grads)}")
    present = [(g, (reference[i] if reference is not None else None)) for i, g in enumerate(grads) if g is not None]
    if not present:
        raise ValueError("grads holds no gradient (all entries are None)")
    device = present[0][0].device
    gg = torch.stack([_wide(g).pow(2).sum().to(device) for g, _ in present]).sum()
    # clamp: sqrt'(0) is inf, and a zero gradient must give a finite (zero) penalty gradient
    norm = gg.clamp_min(eps * eps).sqrt()
    zero = gg.new_zeros(())
    # |r| over every entry: a None gradient is a zero block of g, but its r still counts
    rr = reference_sqnorm(reference) if rr is None else rr
    dir_pen, mag_pen, cos = zero, zero, gg.new_full((), math.nan)
    if rr is not None:
        dots = [(_wide(g) * r.detach().to(g.device, _wide(g).dtype)).sum().to(device)
                for g, r in present if r is not None]
        d = torch.stack(dots).sum() if dots else zero
        cos = d / (norm * rr.to(device).sqrt())
        dir_pen = 1 - cos
    if lambda_mag > 0:
        mag_pen = torch.relu(norm - tau).pow(2)
    total = lambda_dir * dir_pen + lambda_mag * mag_pen
    figures = {"cos": cos.detach(), "grad_norm": norm.detach(), "dir_penalty": dir_pen.detach(),
               "mag_penalty": mag_pen.detach(), "direction": torch.tensor(rr is not None)}
    return total, figures


def check_weights(lambda_dir: float, lambda_mag: float, tau: float, eps: float = 1e-12) -> None:
    """Raise ``ValueError`` (``TypeError`` for non-numbers) naming the first bad argument."""
    _check_number("lambda_dir", lambda_dir)
    _check_number("lambda_mag", lambda_mag)
    _check_number("tau", tau)
    _check_number("eps", eps, positive=True)


def sgg_exact_loss(loss: Tensor, params: Sequence[Tensor], reference: Optional[Sequence[Optional[Tensor]]] = None,
                   *, lambda_dir: float, lambda_mag: float, tau: float,
                   eps: float = 1e-12) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_total = loss + penalty(grad loss)``, differentiable (double backward), and the figures.

    Take ``loss`` under :func:`double_backward_attention` for models with fused attention.
    ``reference`` is aligned with ``params`` (``None`` entries: no reference for that tensor).
    When both lambdas are zero the result is ``loss`` itself (no gradient taken, the figures
    ``cos``/``grad_norm`` are NaN), so its gradient is exactly plain ``L``'s. When only the
    direction term is asked for and the reference is unusable, the gradients are taken
    without a graph and ``L_total`` is again ``loss``.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> total, fig = sgg_exact_loss((w ** 2).sum(), [w], [torch.tensor([1.0, 0.0])],
        ...                             lambda_dir=0.5, lambda_mag=0.0, tau=0.0)
        >>> total.backward()
        >>> round(float(fig["cos"]), 4), [round(v, 4) for v in w.grad.tolist()]  # w1 pulled up
        (0.4472, [1.8211, 4.0894])
    """
    check_weights(lambda_dir, lambda_mag, tau, eps)
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    if reference is not None and len(reference) != len(params):
        raise ValueError(f"reference has {len(reference)} entries, params has {len(params)}")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad (no parameter in its graph?)")
    nan = loss.detach().new_full((), math.nan)
    if lambda_dir == 0 and lambda_mag == 0:
        zero = torch.zeros_like(nan)
        return loss, {"cos": nan, "grad_norm": nan, "dir_penalty": zero, "mag_penalty": zero,
                      "direction": torch.tensor(False)}
    rr = reference_sqnorm(reference) if lambda_dir > 0 else None
    graph = lambda_mag > 0 or rr is not None
    # retain_graph: the caller's backward of L_total still needs L's graph
    grads = torch.autograd.grad(loss, params, create_graph=graph, retain_graph=True, allow_unused=True)
    penalty, figures = sgg_penalty(grads, reference if rr is not None else None, lambda_dir=lambda_dir,
                                   lambda_mag=lambda_mag, tau=tau, eps=eps, rr=rr)
    return (loss + penalty if graph else loss), figures


def select_parameters(model: nn.Module, params: ParamFilter = None) -> list[tuple[str, Tensor]]:
    """``model``'s trainable ``(name, parameter)`` pairs that ``params`` keeps: all when None,
    those whose name contains one of the strings of a sequence, or where ``params(name, p)``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> [n for n, _ in select_parameters(m, ["1."])]
        ['1.weight', '1.bias']
    """
    if isinstance(params, str):
        raise ValueError(f"params must be a callable or a list of name substrings, got the string {params!r}")
    if params is None:
        keep: Callable[[str, Tensor], bool] = lambda n, p: True  # noqa: E731
    elif callable(params):
        keep = params
    else:
        subs = list(params)
        keep = lambda n, p: any(s in n for s in subs)  # noqa: E731
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and keep(n, p)]
    if not chosen:
        raise ValueError(f"params selects no trainable parameter of the model (params={params!r})")
    return chosen


def _check_options(lambda_dir: float, lambda_mag: float, tau: Optional[float], tau_factor: float, ema_beta: float,
                   norm_beta: float, warmup_steps: int, eps: float) -> None:
    check_weights(lambda_dir, lambda_mag, 0.0 if tau is None else tau, eps)
    _check_number("tau_factor", tau_factor, positive=True)
    _check_fraction("ema_beta", ema_beta)
    _check_fraction("norm_beta", norm_beta)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


class SGGObjective:
    """``loss_fn(model, batch)``: ``model(**batch).loss`` plus SGG's exact penalties.

    The reference is ``reference`` (a :class:`~sgg_optim.Reference`, frozen, looked up by
    parameter name) or, when None, an EMA (``ema_beta``) of past *task* gradients, fp32 and
    detached; the direction term is off until ``warmup_steps`` finite steps have fed it.
    ``tau`` is absolute, or when None ``tau_factor`` times a running mean (``norm_beta``) of
    past task-gradient norms, with the magnitude term off until ``warmup_steps`` finite steps
    (at least one) have fed that mean. A step whose gradient is not finite feeds neither.

    ``params`` restricts the double backward (and the figures) to some parameters: a list of
    name substrings (``["layer.5.", "classifier"]``) or ``params(name, p) -> bool``; default
    every trainable parameter. ``stats`` holds the last step's figures as floats (``loss`` is
    the task loss; the returned tensor adds the penalties).

    ``warmup_steps=10`` is :class:`~sgg_optim.GuidedOptimizer`'s default, so this and the
    first-order EMA strategies start guiding at the same step. The default weights are sized
    from measurements on MiniLM (see ``DEFAULT_LAMBDA_DIR``); the paper gives no universal ones.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> class Model(torch.nn.Module):  # any model whose output has .loss
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 2)
        ...     def forward(self, x, labels):
        ...         return SimpleNamespace(loss=torch.nn.functional.cross_entropy(self.lin(x), labels))
        >>> model = Model()
        >>> objective = SGGObjective(model, warmup_steps=1)
        >>> batch = {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}
        >>> for _ in range(2):
        ...     objective(model, batch).backward()
        >>> objective.stats["direction"], round(objective.stats["cos"], 4)
        (1.0, 1.0)
    """

    def __init__(self, model: nn.Module, reference: Optional[Reference] = None, *,
                 lambda_dir: float = DEFAULT_LAMBDA_DIR, lambda_mag: float = DEFAULT_LAMBDA_MAG,
                 tau: Optional[float] = None, tau_factor: float = DEFAULT_TAU_FACTOR, params: ParamFilter = None,
                 ema_beta: float = 0.9, norm_beta: float = 0.9, warmup_steps: int = 10, eps: float = 1e-12) -> None:
        _check_options(lambda_dir, lambda_mag, tau, tau_factor, ema_beta, norm_beta, warmup_steps, eps)
        if reference is not None and not isinstance(reference, Reference):
            raise TypeError(f"reference must be a sgg_optim.Reference or None, got {type(reference).__name__}")
        self.lambda_dir, self.lambda_mag, self.tau, self.tau_factor = lambda_dir, lambda_mag, tau, tau_factor
        self.ema_beta, self.norm_beta, self.warmup_steps, self.eps = ema_beta, norm_beta, warmup_steps, eps
        self.named = select_parameters(model, params)
        self.params = [p for _, p in self.named]
        self.reference = reference
        self._frozen: Optional[list[Tensor]] = None
        self._frozen_rr: Optional[Tensor] = None
        if reference is not None:
            for n, p in self.named:
                reference.check_covers(p, n, f"'{n}'")
            # dequantised once: an int8/bf16 reference would otherwise be expanded every step
            self._frozen = [reference.store_for(p, n, "fp32").dense().to(p.device) for n, p in self.named]
            self._frozen_rr = reference_sqnorm(self._frozen)
        self.ema: Optional[list[Tensor]] = None
        self.norm_mean: Optional[float] = None
        self.steps = 0      # calls
        self.accepted = 0   # finite steps that fed the EMAs
        self.skipped = 0    # non-finite steps
        self.stats: dict[str, float] = {}

    def _warm(self) -> bool:
        return self.accepted >= max(self.warmup_steps, 1)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """The total loss of ``batch`` (call ``.backward()`` on it); updates the EMAs."""
        self.steps += 1
        track_ref = self._frozen is None and self.lambda_dir > 0
        track_norm = self.tau is None and self.lambda_mag > 0
        ref, rr = self._frozen, self._frozen_rr
        if track_ref:
            ref = self.ema if self._warm() else None
            rr = reference_sqnorm(ref) if ref is not None else None
        tau = self.tau if self.tau is not None else (
            self.tau_factor * self.norm_mean if self.norm_mean is not None and self._warm() else None)
        lambda_dir = self.lambda_dir if rr is not None else 0.0
        lambda_mag = self.lambda_mag if tau is not None else 0.0
        graph = lambda_dir > 0 or lambda_mag > 0
        with double_backward_attention() if graph else nullcontext():
            loss = model(**batch).loss
        if loss is None:
            raise ValueError("the model's output has no .loss (pass labels in the batch)")
        self.stats = {"step": float(self.steps), "loss": float(loss.detach()), "tau": math.nan if tau is None else tau,
                      "cos": math.nan, "grad_norm": math.nan, "dir_penalty": 0.0, "mag_penalty": 0.0,
                      "direction": 0.0, "skipped": float(self.skipped)}
        if not (graph or track_ref or track_norm):
            return loss  # nothing to compute: exactly plain L
        grads = torch.autograd.grad(loss, self.params, create_graph=graph, retain_graph=True, allow_unused=True)
        penalty, figures = sgg_penalty(grads, ref if rr is not None else None, lambda_dir=lambda_dir,
                                       lambda_mag=lambda_mag, tau=tau or 0.0, eps=self.eps, rr=rr)
        self.stats.update({k: float(v) for k, v in figures.items()})
        if math.isfinite(self.stats["grad_norm"]) and math.isfinite(self.stats["loss"]):
            self._feed(grads, self.stats["grad_norm"], track_ref, track_norm)
        else:
            self.skipped += 1
            self.stats["skipped"] = float(self.skipped)
        return loss + penalty if graph else loss

    @torch.no_grad()
    def _feed(self, grads: Sequence[Optional[Tensor]], norm: float, track_ref: bool, track_norm: bool) -> None:
        self.accepted += 1
        if track_ref:
            new = [_wide(g.detach()) if g is not None else _wide(torch.zeros_like(p))
                   for g, p in zip(grads, self.params)]
            if self.ema is None:
                self.ema = [t.clone() for t in new]
            else:  # out of place: this step's penalty graph still holds the old EMA
                self.ema = list(torch._foreach_lerp(self.ema, new, 1 - self.ema_beta))
        if track_norm:
            self.norm_mean = norm if self.norm_mean is None else self.norm_beta * self.norm_mean + (
                1 - self.norm_beta) * norm


def sgg_exact_objective(*, lambda_dir: float = DEFAULT_LAMBDA_DIR, lambda_mag: float = DEFAULT_LAMBDA_MAG,
                        tau: Optional[float] = None, tau_factor: float = DEFAULT_TAU_FACTOR,
                        params: ParamFilter = None, ema_beta: float = 0.9, norm_beta: float = 0.9,
                        warmup_steps: int = 10, eps: float = 1e-12) -> ObjectiveFactory:
    """The few-shot benchmark's ``objective`` hook: ``(model, reference) -> loss_fn``, one fresh
    :class:`SGGObjective` per run (a source ``Reference`` when the strategy has one, else EMA).
    Arguments are checked here, before any run starts.

    Example:
        >>> hook = sgg_exact_objective(lambda_dir=0.2, params=["classifier"])
        >>> sgg_exact_objective(lambda_mag=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: lambda_mag must be a finite number >= 0, got -1.0
    """
    options = dict(lambda_dir=lambda_dir, lambda_mag=lambda_mag, tau=tau, tau_factor=tau_factor, ema_beta=ema_beta,
                   norm_beta=norm_beta, warmup_steps=warmup_steps, eps=eps)
    _check_options(**options)  # type: ignore[arg-type]
    if isinstance(params, str):
        raise ValueError(f"params must be a callable or a list of name substrings, got the string {params!r}")

    def build(model: nn.Module, reference: Optional[Reference] = None) -> LossFn:
        return SGGObjective(model, reference, params=params, **options)  # type: ignore[arg-type]

    return build
