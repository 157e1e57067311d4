"""A guided AdamW update in one sweep: apply pass, EMA update and AdamW step fused.

After the statistics pass has produced the per-block coefficients, the eager path reads
every gradient and reference again to write ``g <- a g + sum_i b_i r_i`` (the apply
pass), once more for the EMA update ``r <- r + w (g - r)``, and then the AdamW kernel
reads ``g`` a last time. :func:`guided_adamw_` does all of it per tensor in one
expression, so that ``torch.compile`` (Inductor: C++ loops on CPU, Triton on GPU) emits
one loop per tensor that reads ``p, g, m, v, r`` once and writes ``p, m, v`` (and ``r``
for an EMA reference, ``g`` when ``write_grads``).

Run uncompiled, the same function is the eager reference that the tests hold the
compiled one to. Only fp32 parameters, gradients, moments and references; plain AdamW
(decoupled weight decay, no amsgrad, maximize or capturable). See docs/design.md
("A fused guided AdamW update") for the measurement behind whether the optimizer uses it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def adamw_scalars(steps: Sequence[Tensor], hyper: Tensor, group_ids: Tensor) -> Tensor:
    """Advance every step count by one and return the per-tensor AdamW scalars, ``[T, 7]``
    fp32: ``1 - lr wd``, ``1 - beta1``, ``beta2``, ``1 - beta2``, ``lr / (1 - beta1^n)``,
    ``sqrt(1 - beta2^n)``, ``eps`` (computed in float64 from ``hyper[group_ids]``, rows
    ``(lr, beta1, beta2, eps, weight_decay)``, as torch's AdamW computes them in Python).

    Kept out of the fused loop on purpose: Inductor inlines scalar math into every
    vector iteration (two ``std::pow`` per 16 elements, measured 2x slower).
    """
    torch._foreach_add_(list(steps), 1)
    n = torch.stack(list(steps)).to(torch.float64)
    lr, beta1, beta2, eps, wd = hyper.to(n.device)[group_ids.to(n.device)].unbind(1)
    return torch.stack([1 - lr * wd, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** n),
                        (1 - beta2 ** n).sqrt(), eps], dim=1).float()


def guided_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    refs: Sequence[Sequence[Optional[Tensor]]],
    coef: Tensor,
    block_ids: Sequence[int],
    scalars: Tensor,
    ema_weight: Optional[float] = None,
    write_grads: bool = True,
) -> None:
    """One guided AdamW update over lists of tensors, in place (the fused sweep).

    Per tensor ``t`` in block ``j = block_ids[t]``:
    ``g' = coef[j, 0] g + sum_i coef[j, 1 + i] r_i`` (``refs[t][i]``, None: no term);
    with ``ema_weight`` the first reference is an EMA, ``r_0 <- r_0 + w (g' - r_0)``;
    then torch's AdamW update with ``g'`` and ``scalars[t]`` from :func:`adamw_scalars`
    (which has advanced the step counts). ``write_grads`` stores ``g'`` in
    ``grads[t]``, as the eager path leaves it. ``coef`` and ``scalars`` are tensors, so
    new values (a learning-rate schedule, per-step coefficients) never recompile a
    compiled version.

    Example:
        >>> p, g = torch.ones(2), torch.tensor([1.0, -1.0])
        >>> m, v, s, r = torch.zeros(2), torch.zeros(2), torch.zeros(()), torch.tensor([1.0, 1.0])
        >>> coef = torch.tensor([[0.5, 0.5]])  # g' = 0.5 g + 0.5 r = [1, 0]
        >>> hyper = torch.tensor([[0.1, 0.9, 0.999, 1e-8, 0.0]], dtype=torch.float64)
        >>> guided_adamw_([p], [g], [m], [v], [[r]], coef, [0], adamw_scalars([s], hyper, torch.tensor([0])))
        >>> [round(x, 4) for x in p.tolist()], g.tolist(), s.item()
        ([0.9, 1.0], [1.0, 0.0], 1.0)
    """
    for t, p in enumerate(params):
        g, m, v = grads[t], exp_avgs[t], exp_avg_sqs[t]
        c = coef[block_ids[t]]
        decay, w1, beta2, w2, step_size, bias2_sqrt, eps = scalars[t].unbind()
        guided = g * c[0]
        for i, r in enumerate(refs[t]):
            if r is not None:
                guided = guided + c[1 + i] * r.view_as(g)
        if ema_weight is not None:
            r0 = refs[t][0]
            assert r0 is not None
            r0.copy_(torch.lerp(r0, guided.view_as(r0), ema_weight))
        if write_grads:
            g.copy_(guided)
        p.mul_(decay)
        m.lerp_(guided, w1)
        v.mul_(beta2).add_(w2 * guided * guided)
        p.sub_(step_size * m / (v.sqrt() / bias2_sqrt + eps))


_COMPILED: dict[tuple[bool, bool], Callable[..., None]] = {}


def compiled_guided_adamw(ema: bool, write_grads: bool = True) -> Callable[..., None]:
    """:func:`guided_adamw_` under ``torch.compile(fullgraph=True, dynamic=False)``,
    made once per process (Dynamo then keeps one graph per tensor layout)."""
    key = (ema, write_grads)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(guided_adamw_, fullgraph=True, dynamic=False)
    return _COMPILED[key]


# ------------------------------------------------------------------------------------
# GuidedOptimizer's use of the fused update (GuidedAdamW(..., fused=True))
# ------------------------------------------------------------------------------------
_FAILED: list[str] = []  # the compile error, once compilation failed in this process

#: Opt-in (``sgg_optim.fused.enabled = True``): measured on CPU the fused update saves
#: 5-15% of a guided step, near the noise, while its first step compiles for 80-95 s
#: with a cold cache, more than a few-shot run takes; a long run (or a GPU, not
#: measured) may gain. Off, every GuidedOptimizer stays on the eager path (docs/design.md).
enabled: bool = False


def base_refusal(base: torch.optim.Optimizer, grads: Sequence[Tensor],
                 kinds: tuple[type, ...] = (torch.optim.AdamW,)) -> Optional[str]:
    """Why ``base``'s fused kernel cannot take over a step on exactly the guided ``grads``,
    or None: it must be one of ``kinds`` with ``fused=True`` in every group, without a
    ``grad_scale``/``found_inf`` of its own, outside ``torch.compile``, on CPU or CUDA,
    stepping no parameter that guidance does not. Shared by the folded ``grad_scale``
    (``GuidedOptimizer._folded_scale``) and :func:`refusal`.
    """
    if type(base) not in kinds:
        return f"the base optimizer is not torch.optim.{' or '.join(k.__name__ for k in kinds)}"
    if not all(pg.get("fused") for pg in base.param_groups):
        return "not fused=True in every param group"
    if getattr(base, "grad_scale", None) is not None or getattr(base, "found_inf", None) is not None:
        return "grad_scale or found_inf set"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if any(g.device.type not in ("cpu", "cuda") for g in grads):
        return f"device {grads[0].device.type}"
    if sum(p.grad is not None for pg in base.param_groups for p in pg["params"]) != len(grads):
        return "the base optimizer steps parameters that guidance does not"
    return None


def refusal(base: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor],
            refs: Sequence[Sequence[Optional[object]]]) -> Optional[str]:
    """Why the fused guided update cannot replace ``base.step()`` here, or None if it can.

    It takes a plain ``torch.optim.AdamW`` with ``fused=True`` in every group and nothing
    else changed (no amsgrad, maximize, capturable, differentiable, tensor ``lr`` or
    betas, ``grad_scale``/``found_inf``, step hooks), whose state exists (the first step
    goes through torch, which creates it), stepping exactly the guided parameters, all
    fp32 on one CPU or CUDA device, with fp32 dense references (``DenseStore``); bf16
    and int8 reference stores, sharded gradients and a step under ``torch.compile`` keep
    the eager path.
    """
    from .storage import DenseStore
    if not enabled:
        return "not switched on (sgg_optim.fused.enabled is False)"
    why = base_refusal(base, grads)
    if why is not None:
        return why
    for pg in base.param_groups:
        if pg.get("amsgrad") or pg.get("maximize") or pg.get("capturable") or pg.get("differentiable"):
            return "amsgrad, maximize, capturable or differentiable"
        if any(isinstance(pg[k], Tensor) for k in ("lr", "weight_decay", "eps")) or \
                any(isinstance(b, Tensor) for b in pg["betas"]):
            return "a tensor hyperparameter"
    from torch.optim import optimizer as optim_mod
    if (base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
            or optim_mod._global_optimizer_pre_hooks or optim_mod._global_optimizer_post_hooks):
        return "the base optimizer has step hooks"
    device = grads[0].device
    for p, g in zip(params, grads):
        st = base.state.get(p)
        if not st or "exp_avg" not in st:
            return "AdamW state not created yet (first step)"
        if any(x.dtype != torch.float32 or x.device != device or type(x) not in (Tensor, torch.nn.Parameter)
               for x in (p, g, st["exp_avg"], st["exp_avg_sq"])) or st["step"].device != device:
            return "not all fp32 plain tensors on one device"
    for rs in refs:
        for r in rs:
            if r is not None and not (type(r) is DenseStore and r.tensor.dtype == torch.float32
                                      and r.tensor.device == device):
                return "a reference store that is not fp32 DenseStore"
    return None


def fused_step_(base: torch.optim.AdamW, params: Sequence[Tensor], grads: Sequence[Tensor],
                refs: Sequence[Sequence[Optional[Tensor]]], coef: Tensor, block_ids: Sequence[int],
                ema_weight: Optional[float]) -> None:
    """``base.step()`` for the guided gradients, with ``g' = a g + sum_i b_i r_i`` (and the
    EMA update of ``refs[t][0]`` when ``ema_weight`` is given) in the same sweep, by the
    compiled :func:`guided_adamw_` (after :func:`refusal` returned None). Should
    compilation fail (no C++ compiler on CPU, say), it warns once and runs the function
    uncompiled: the same results, slower."""
    where = {id(p): gi for gi, pg in enumerate(base.param_groups) for p in pg["params"]}
    group_ids = torch.tensor([where[id(p)] for p in params])
    hyper = torch.tensor([[pg["lr"], *pg["betas"], pg["eps"], pg["weight_decay"]] for pg in base.param_groups],
                         dtype=torch.float64)
    states = [base.state[p] for p in params]
    steps = [s["step"] for s in states]
    args = (list(params), list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [list(rs) for rs in refs], coef, list(block_ids))
    scalars = adamw_scalars(steps, hyper, group_ids)
    if not _FAILED:
        try:
            compiled_guided_adamw(ema_weight is not None)(*args, scalars, ema_weight)
            return
        except Exception as exc:  # noqa: BLE001 - Inductor raises many kinds; the eager function is exact
            _FAILED.append(f"{type(exc).__name__}: {exc}")
            import warnings
            warnings.warn(f"the fused guided AdamW update did not compile ({_FAILED[0][:300]}); running it "
                          "uncompiled from now on (same results, slower)", RuntimeWarning, stacklevel=3)
    guided_adamw_(*args, scalars, ema_weight)
