"""The guidance step as pure functions over lists of tensors.

Three stages, as in ``torch.optim``'s functional optimizers:

1. :func:`tensor_stats` reads every gradient once (with its references);
   :func:`block_stats` sums it into one small ``[num_blocks, 1 + 2k]`` tensor:
   ``|g|^2``, ``<g, r_i>`` and ``|r_i|^2``. Under sharded gradients this is the only
   tensor that needs an ``all_reduce``.
2. :func:`guidance_coefficients` turns the statistics into per-block scalars
   (source weights, direction rule, magnitude rule): ``g <- a g + sum_i b_i r_i``.
3. :func:`apply_guidance_` writes the gradients once, fused with the EMA-reference
   update when there is one.

Coefficients may be device tensors (no host sync) or Python floats read in the one
sync that the non-finite check already costs; with floats, identity blocks
(``a = 1, b = 0``: gradient already inside the cone, nothing to clip) are not
written at all.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .config import GuidanceConfig
from .rules import DIRECTION_RULES, MAGNITUDE_RULES, BlockStats, Rule, alignment_weights, block_validity
from .state import BlockState, stats_dtype
from .storage import Store

Scalar = Union[float, Tensor]

# Index of each reported figure in the packed vector (see Coefficients.figures).
FIGURES = ("grad_norm", "guided_norm", "cos", "scale", "projected")


def tensor_stats(
    grads: Sequence[Tensor],
    refs: Sequence[Sequence[Optional[Store]]],
    ref_sqnorms: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
) -> Tensor:
    """The statistics pass: per tensor ``[|g|^2, <g, r_1>.. <g, r_k>, |r_1|^2 .. |r_k|^2]``.

    Returns shape ``[T, 1 + 2k]`` in float64 (float32 on MPS). ``refs[t][i]`` is source
    ``i``'s reference for gradient ``t`` (None: not used for that tensor).
    ``ref_sqnorms`` (a ``[T, k]`` tensor, or one ``[k]`` tensor or None per gradient),
    when given, holds known ``|r_i|^2`` so only ``<g, r_i>`` is read. Each tensor's sums
    are fp32 BLAS reductions (relative error ~1e-6).

    Example:
        >>> from sgg_optim.storage import make_store
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
        >>> r = [[make_store(torch.tensor([1.0, 0.0]), "fp32")], [None]]
        >>> tensor_stats(g, r).tolist()
        [[25.0, 3.0, 1.0], [1.0, 0.0, 0.0]]
    """
    if not grads:
        raise ValueError("tensor_stats needs at least one gradient")
    k = max([len(rs) for rs in refs] + [0])
    device = grads[0].device
    dtype = stats_dtype(device)
    one_device = all(g.device == device for g in grads)
    # |g|^2 right after <g, r>, tensor by tensor, finds g still in cache (measured: about
    # half the cost of a separate norm pass); without references, or for low-precision
    # gradients (whose dot would accumulate in their own dtype), one foreach norm pass.
    interleave = k > 0 and one_device and all(g.dtype == torch.float32 for g in grads)
    if not interleave:
        norms = _grad_norms(grads, device, one_device)
    zero = torch.zeros((), device=device)
    sq_grads: list[Tensor] = []
    dots: list[Tensor] = []
    sqs: list[Tensor] = []
    for g, rs in zip(grads, refs):
        for i in range(k):
            r = rs[i] if i < len(rs) else None
            dots.append(zero if r is None else r.dot(g) if one_device else r.dot(g).to(device))
            if ref_sqnorms is None:
                sqs.append(zero if r is None else r.sqnorm() if one_device else r.sqnorm().to(device))
        if interleave:
            flat = g.reshape(-1)
            sq_grads.append(torch.dot(flat, flat))
    # Stack once and convert once: per-tensor conversions cost more than the math here.
    columns = [(torch.stack(sq_grads).to(dtype) if interleave else torch.stack(norms).to(dtype).square()).unsqueeze(1)]
    if k:
        columns.append(torch.stack(dots).view(len(grads), k).to(dtype))
        if ref_sqnorms is None:
            columns.append(torch.stack(sqs).view(len(grads), k).to(dtype))
        elif isinstance(ref_sqnorms, Tensor):
            columns.append(ref_sqnorms.to(device, dtype).view(len(grads), k))
        else:
            columns.append(torch.stack([_known(sq, k, device) for sq in ref_sqnorms]).to(dtype))
    return torch.cat(columns, dim=1)


def _grad_norms(grads: Sequence[Tensor], device: torch.device, one_device: bool) -> list[Tensor]:
    """``|g|`` per gradient, accumulated in fp32, or in float64 for float64 gradients
    (torch refuses a narrowing ``dtype`` for a norm)."""
    if one_device and not any(g.dtype == torch.float64 for g in grads):
        return list(torch._foreach_norm(list(grads), 2, dtype=torch.float32))
    return [torch.linalg.vector_norm(g, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
            .to(device, stats_dtype(device)) for g in grads]


def sum_blocks(partial: Tensor, block_ids: Tensor, num_blocks: int) -> Tensor:
    """Add per-tensor statistics into their blocks: ``[T, m] -> [num_blocks, m]``.

    A one-hot matrix product rather than ``index_add_``: the same result, and it
    compiles (Inductor's CPU code generation fails on a float64 scatter-add).

    Example:
        >>> sum_blocks(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([0, 1, 0]), 2).tolist()
        [[5.0], [2.0]]
    """
    if num_blocks == 1:
        return partial.sum(0, keepdim=True)
    onehot = torch.nn.functional.one_hot(block_ids.to(partial.device), num_blocks).to(partial.dtype)
    return onehot.T @ partial


def block_stats(
    grads: Sequence[Tensor],
    refs: Sequence[Sequence[Optional[Store]]],
    block_ids: Tensor,
    num_blocks: int,
    ref_sqnorms: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
) -> Tensor:
    """Per-block statistics, shape ``[num_blocks, 1 + 2k]``: :func:`tensor_stats` summed
    into blocks (in float64). Under sharded gradients this is the only tensor that needs
    an ``all_reduce``.

    Example:
        >>> from sgg_optim.storage import make_store
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
        >>> r = [[make_store(torch.tensor([1.0, 0.0]), "fp32")], [None]]
        >>> block_stats(g, r, torch.tensor([0, 0]), 1).tolist()
        [[26.0, 3.0, 1.0]]
    """
    return sum_blocks(tensor_stats(grads, refs, ref_sqnorms), block_ids, num_blocks)


def block_stats_rescaled(
    grads: Sequence[Tensor],
    refs: Sequence[Sequence[Optional[Store]]],
    block_ids: Tensor,
    num_blocks: int,
    ref_sqnorms: Union[Tensor, Sequence[Optional[Tensor]], None] = None,
) -> Tensor:
    """:func:`block_stats` for finite gradients whose fp32 squares overflow (``|g|`` from
    about 1e19): computed on copies scaled by a power of two (exact), then scaled back
    in float64. The rare path behind a non-finite ``|g|^2``; it reads one scalar on the host.

    Example:
        >>> g = [torch.full((4,), 2.0 ** 70)]  # about 1.2e21
        >>> block_stats(g, [[]], torch.tensor([0]), 1).item()
        inf
        >>> block_stats_rescaled(g, [[]], torch.tensor([0]), 1).item() == 4 * 2.0 ** 140
        True
    """
    amax = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    exponent = math.frexp(amax)[1] if amax > 0 and math.isfinite(amax) else 0
    scaled = [torch.ldexp(g.float(), torch.tensor(-exponent, device=g.device)) for g in grads]
    stats = block_stats(scaled, refs, block_ids, num_blocks, ref_sqnorms)
    k = (stats.shape[1] - 1) // 2
    stats[:, 0] *= 2.0 ** (2 * exponent)
    stats[:, 1:1 + k] *= 2.0 ** exponent
    return stats


def _known(sqnorms: Optional[Tensor], k: int, device: torch.device) -> Tensor:
    """A tensor's cached ``|r_i|^2`` (zeros where it has no reference)."""
    return torch.zeros(k, device=device) if sqnorms is None else sqnorms.to(device)


class Coefficients(NamedTuple):
    """Per-block scalars of one guidance step.

    ``g <- a g + sum_i b[:, i] r_i``; ``weights`` are the source weights. ``figures``
    packs :data:`FIGURES` then the mean (bias-corrected) alignment and weight of each
    source. ``finite`` is a 0-dim device flag: the statistics were finite (the new
    state returned beside these coefficients already ignores a non-finite step).
    """

    a: Tensor
    b: Tensor
    weights: Tensor
    figures: Tensor
    finite: Tensor


def _rule(registry: dict[str, Rule], name: str, cfg: GuidanceConfig) -> tuple[Any, tuple[Any, ...]]:
    rule = registry[name]
    return rule.fn, tuple(getattr(cfg, arg) for arg in rule.args)


def guidance_coefficients(
    stats: Tensor,
    state: BlockState,
    cfg: GuidanceConfig,
    *,
    direction_on: bool,
    gram: Optional[Tensor] = None,
) -> tuple[Coefficients, BlockState]:
    """Coefficients of the guided update and the new block state (pure, no host sync).

    ``stats`` comes from :func:`block_stats` with ``k`` references. With one reference it
    is used as is; with several (docs/method.md), the reference is
    ``r = sum_i w_i r_i/|r_i|`` with weights from the alignment EMA (smoothed with
    ``ema_beta``), and ``gram`` (``[B, k, k]``, ``<r_i, r_j>`` per block) gives
    ``|r|^2``. ``state`` holds the magnitude EMA (``norm_beta``), its per-block count
    and the alignment EMA; the returned state has been fed this step, only in blocks
    with a gradient and only if the statistics are finite. ``direction_on`` is False
    during the EMA reference's warm-up.

    Example:
        >>> from sgg_optim.config import GuidanceConfig
        >>> state = BlockState.zeros(1, 1, torch.device("cpu"))
        >>> stats = torch.tensor([[4.0, -2.0, 1.0]], dtype=torch.float64)  # |g|^2, <g,r>, |r|^2
        >>> coef, new = guidance_coefficients(stats, state, GuidanceConfig(direction="project"),
        ...                                   direction_on=True)
        >>> coef.a.tolist(), coef.b.tolist(), new.norm_count.tolist()
        ([1.0], [[2.0]], [1.0])
    """
    gg = stats[:, 0]
    k = (stats.shape[1] - 1) // 2
    d, rr = stats[:, 1:1 + k], stats[:, 1 + k:]
    finite = torch.isfinite(gg.sum())
    seen = (gg > 0) & finite
    norm_ema, norm_count, align_ema, align_count = state
    count = norm_count + seen.to(norm_count.dtype)
    align_seen = align_count + seen.to(align_count.dtype)

    if k == 0 or not direction_on:
        coef = torch.zeros_like(d)
        d_r = rr_r = torch.zeros_like(gg)
        alignment, smoothed, weights = align_ema, torch.zeros_like(d), torch.zeros_like(d)
    elif k == 1:
        coef = torch.ones_like(d)
        d_r, rr_r = d[:, 0], rr[:, 0]
        alignment, weights = align_ema, torch.ones_like(d)
        smoothed = None  # reported as the plain cosine below
    else:
        src_ok = block_validity(gg.unsqueeze(1), rr)
        r_norm = torch.where(src_ok, rr, torch.ones_like(rr)).sqrt()
        cos = torch.where(src_ok, d / (gg.sqrt().unsqueeze(1) * r_norm), torch.zeros_like(d))
        beta = cfg.ema_beta
        alignment = torch.where(seen.unsqueeze(1), beta * align_ema + (1 - beta) * cos, align_ema)
        smoothed = alignment / (1 - beta ** align_seen).clamp_min(1e-12).unsqueeze(1)
        weights, _ = alignment_weights(torch.where(src_ok, smoothed, -torch.ones_like(smoothed)),
                                       cfg.align_temperature)
        coef = weights / r_norm  # r = sum_i coef_i r_i
        d_r = (coef * d).sum(1)
        rr_r = torch.einsum("bi,bij,bj->b", coef, gram, coef)

    valid = block_validity(gg, rr_r)
    rule, args = _rule(DIRECTION_RULES, cfg.direction, cfg)
    direction = rule(BlockStats(gg, d_r, rr_r, valid), *args)
    a, b = direction.a, direction.b
    # |a g + b r|; the reference terms only where b acts (an invalid block's |r|^2 may be inf,
    # and 0 * inf would make the norm, and the norm EMA after it, NaN); summed in this order
    acts, zero = b != 0, torch.zeros_like(gg)
    norm = (a * a * gg + torch.where(acts, 2 * a * b * d_r, zero) + torch.where(acts, b * b * rr_r, zero)
            ).clamp_min(0).sqrt()

    ready = seen & (norm_count >= max(cfg.warmup_steps, 1))
    ema_hat = norm_ema / (1 - cfg.norm_beta ** norm_count).clamp_min(1e-12)
    rule, args = _rule(MAGNITUDE_RULES, cfg.magnitude, cfg)
    scale = rule(norm, ema_hat, ready, *args)
    final_norm = scale * norm

    total_gg = gg.sum()
    figures = torch.cat([
        torch.stack([
            total_gg.sqrt(),
            final_norm.square().sum().sqrt(),
            _global_cos(d_r, gg, rr_r, valid),
            scale.min(),
            (direction.active & seen).sum().to(gg.dtype) / seen.sum().clamp_min(1).to(gg.dtype),
        ]),
        smoothed.mean(0) if smoothed is not None else _global_cos(d_r, gg, rr_r, valid).reshape(1),
        weights.mean(0),
    ])
    beta = cfg.norm_beta
    new_state = BlockState(
        norm_ema=torch.where(seen, beta * norm_ema + (1 - beta) * final_norm, norm_ema),
        norm_count=count,
        align_ema=torch.where(seen.unsqueeze(1), alignment, align_ema) if k > 1 else align_ema,
        align_count=align_seen if k > 1 else align_count,
    )
    coefficients = Coefficients(scale * a, (scale * b).unsqueeze(1) * coef, weights, figures, finite)
    return coefficients, new_state


def _global_cos(d: Tensor, gg: Tensor, rr: Tensor, valid: Tensor) -> Tensor:
    """Cosine of the whole gradient with the whole reference, over valid blocks (NaN if none)."""
    zero = torch.zeros_like(d)
    num = torch.where(valid, d, zero).sum()
    den = (torch.where(valid, gg, zero).sum() * torch.where(valid, rr, zero).sum()).sqrt()
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.full_like(den, float("nan")))


def apply_guidance_(
    grads: Sequence[Tensor],
    refs: Sequence[Sequence[Optional[Store]]],
    a: Sequence[Scalar],
    b: Sequence[Sequence[Scalar]],
    ema_refs: Optional[Sequence[Store]] = None,
    ema_weight: float = 0.0,
) -> None:
    """``g <- a g + sum_i b_i r_i`` in place, then (optionally) ``r_ema += w (g - r_ema)``.

    ``a[t]`` and ``b[t][i]`` are gradient ``t``'s coefficients, all Python floats or all
    0-dim tensors. With floats, ``a == 1`` skips the scaling and ``b == 0`` skips the
    reference, so an identity block is never written. The EMA update runs right after
    each tensor's own update, while it is still in cache.

    Example:
        >>> from sgg_optim.storage import make_store
        >>> g = [torch.tensor([0.0, 2.0])]
        >>> apply_guidance_(g, [[make_store(torch.tensor([1.0, 0.0]), "fp32")]], [0.5], [[3.0]])
        >>> g[0].tolist()
        [3.0, 1.0]
    """
    for t, g in enumerate(grads):
        at = a[t]
        if not (isinstance(at, float) and at == 1.0):
            g.mul_(at)
        for r, bi in zip(refs[t], b[t]):
            if r is not None and not (isinstance(bi, float) and bi == 0.0):
                r.add_to_(g, bi)
        if ema_refs is not None:
            ema_refs[t].lerp_(g, ema_weight)
