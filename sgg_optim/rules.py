"""Guidance rules: small pure functions from block statistics to coefficients.

Every direction rule rewrites a block's gradient as ``g <- a g + b r`` and every
magnitude rule scales it by ``s``; the coefficients are computed from the block
statistics alone (``<g, r>``, ``|g|^2``, ``|r|^2``), so the gradients are read once
for the statistics and written once for the update. Branches are ``torch.where``
over tensors of shape ``[num_blocks]``: nothing here reads a device value on the host.

Rules take the scalars they need, as torch's functional optimizers do
(``cone_coefficients(stats, cos_max)``). A new rule is one function plus one entry in
:data:`DIRECTION_RULES` or :data:`MAGNITUDE_RULES`, which names the configuration
values it takes; configuration validation picks it up from the registry.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

# |g_perp|^2 = |g|^2 - <g,r>^2/|r|^2 is a difference of fp32-accumulated sums, exact
# only to ~1e-6 |g|^2. Below this fraction of |g|^2 (g within ~0.2 degrees of -r) its
# direction is noise, so g is treated as exactly opposite to r.
_PERP_EPS = 1e-5


class BlockStats(NamedTuple):
    """Per-block statistics of the gradient ``g`` against one reference ``r``.

    All fields have shape ``[num_blocks]``; ``valid`` is False where ``|g|`` or ``|r|``
    is zero or non-finite, which switches direction guidance off for that block.
    """

    gg: Tensor
    d: Tensor
    rr: Tensor
    valid: Tensor


class Direction(NamedTuple):
    """Coefficients of ``g <- a g + b r`` and the blocks the rule changed."""

    a: Tensor
    b: Tensor
    active: Tensor


# Below the smallest normal fp32 number, a squared norm read from fp32 reductions has lost
# its precision (denormals: |g| or |r| under ~1.1e-19 per block), so a direction built on
# it would be wrong, not just small: such a block counts as zero.
_TINY = torch.finfo(torch.float32).tiny


def block_validity(gg: Tensor, rr: Tensor) -> Tensor:
    """True where both squared norms are finite and at least fp32's smallest normal number
    (direction guidance is defined).

    Example:
        >>> block_validity(torch.tensor([4.0, 1e-40, 4.0]), torch.tensor([1.0, 1.0, float("inf")])).tolist()
        [True, False, False]
    """
    return torch.isfinite(gg) & torch.isfinite(rr) & (gg >= _TINY) & (rr >= _TINY)


def _safe(x: Tensor, valid: Tensor) -> Tensor:
    """``x`` where valid, else 1: keeps divisions finite in the blocks we discard."""
    return torch.where(valid, x, torch.ones_like(x))


def _identity(stats: BlockStats) -> Direction:
    ones = torch.ones_like(stats.gg)
    return Direction(ones, torch.zeros_like(ones), torch.zeros_like(stats.valid))


def off_coefficients(stats: BlockStats) -> Direction:
    """``direction="off"``: the gradient is left as it is.

    Example:
        >>> s = BlockStats(*torch.tensor([[4.0], [-2.0], [1.0]]), torch.tensor([True]))
        >>> off_coefficients(s).b.tolist()
        [0.0]
    """
    return _identity(stats)


def project_coefficients(stats: BlockStats) -> Direction:
    """``direction="project"``: drop the component of g that conflicts with r (A-GEM).

    Where ``<g, r> < 0``: ``g <- g - (<g, r>/|r|^2) r``, which leaves ``<g', r> = 0``.

    Example:
        >>> s = BlockStats(*torch.tensor([[4.0], [-2.0], [1.0]]), torch.tensor([True]))
        >>> project_coefficients(s).b.tolist()
        [2.0]
    """
    active = stats.valid & (stats.d < 0)
    b = torch.where(active, -stats.d / _safe(stats.rr, stats.valid), torch.zeros_like(stats.d))
    return Direction(torch.ones_like(b), b, active)


def cone_coefficients(stats: BlockStats, cos_max: float) -> Direction:
    """``direction="cone"``: rotate g onto the cone of half-angle ``max_angle`` around r.

    Only gradients outside the cone move; ``|g|`` is kept. With
    ``g_perp = g - (<g, r>/|r|^2) r`` and ``c = cos_max = cos(max_angle)``::

        g <- |g| (c r/|r| + sqrt(1 - c^2) g_perp/|g_perp|)

    A gradient (numerically) opposite to r has no ``g_perp`` to rotate along and is
    sent to ``|g| r/|r|``.

    Example:
        >>> # g = (0, 1) is 90 degrees from r = (1, 0); a 45 degree cone rotates it.
        >>> s = BlockStats(*torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64),
        ...                torch.tensor([True]))
        >>> a, b, _ = cone_coefficients(s, cos_max=math.cos(math.pi / 4))
        >>> [round(v, 4) for v in (a.item(), b.item())]
        [0.7071, 0.7071]
    """
    c = cos_max
    sin = math.sqrt(max(0.0, 1.0 - c * c))
    valid = stats.valid
    rr = _safe(stats.rr, valid)
    g_norm, r_norm = stats.gg.sqrt(), rr.sqrt()
    cos = stats.d / _safe(g_norm * r_norm, valid)
    perp = (stats.gg - stats.d * stats.d / rr).clamp_min(0).sqrt()
    active = valid & (cos < c)
    rotate = active & (perp.square() > _PERP_EPS * stats.gg)
    flip = active & ~rotate
    a_rot = g_norm * sin / _safe(perp, rotate)
    b_rot = g_norm * c / r_norm - a_rot * stats.d / rr
    one, zero = torch.ones_like(rr), torch.zeros_like(rr)
    a = torch.where(rotate, a_rot, torch.where(flip, zero, one))
    b = torch.where(rotate, b_rot, torch.where(flip, g_norm / r_norm, zero))
    return Direction(a, b, active)


def blend_coefficients(stats: BlockStats, strength: float) -> Direction:
    """``direction="blend"``: ``g <- (1 - s) g + s |g| r/|r|`` with ``s = strength``.

    Example:
        >>> s = BlockStats(*torch.tensor([[4.0], [0.0], [1.0]]), torch.tensor([True]))
        >>> d = blend_coefficients(s, strength=0.25)
        >>> d.a.item(), d.b.item()
        (0.75, 0.5)
    """
    valid = stats.valid
    ratio = stats.gg.sqrt() / _safe(stats.rr, valid).sqrt()
    a = torch.where(valid, torch.full_like(ratio, 1.0 - strength), torch.ones_like(ratio))
    b = torch.where(valid, strength * ratio, torch.zeros_like(ratio))
    return Direction(a, b, valid & (strength > 0))


def no_scale(norm: Tensor, norm_ema: Tensor, ready: Tensor) -> Tensor:
    """``magnitude="off"``: scale 1."""
    return torch.ones_like(norm)


def clip_scale(norm: Tensor, norm_ema: Tensor, ready: Tensor, max_norm: float) -> Tensor:
    """``magnitude="clip"``: scale so each block's guided norm is at most ``max_norm``.

    Example:
        >>> clip_scale(torch.tensor([4.0, 0.5]), None, None, max_norm=2.0)
        tensor([0.5000, 1.0000])
    """
    over = norm > max_norm
    return torch.where(over, max_norm / _safe(norm, over), torch.ones_like(norm))


def adaptive_scale(norm: Tensor, norm_ema: Tensor, ready: Tensor, spike_factor: float) -> Tensor:
    """``magnitude="adaptive"``: cap the norm at ``spike_factor`` x its running mean.

    ``norm_ema`` is the bias-corrected EMA of past accepted (post-clip) norms;
    ``ready`` marks the blocks that have seen ``warmup_steps`` accepted steps.

    Example:
        >>> ema, ready = torch.tensor([1.0, 1.0]), torch.tensor([True, True])
        >>> adaptive_scale(torch.tensor([8.0, 1.0]), ema, ready, spike_factor=2.0)
        tensor([0.2500, 1.0000])
    """
    bound = spike_factor * norm_ema
    over = ready & (norm > bound) & (bound > 0)
    return torch.where(over, bound / _safe(norm, over), torch.ones_like(norm))


def alignment_weights(alignment: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Source weights from alignment scores (see docs/method.md).

    ``alignment`` has shape ``[num_blocks, k]`` (smoothed cosines of the target
    gradient with each source). Sources with alignment ``<= 0`` get weight 0, the
    others a softmax over ``alignment / temperature``. Returns the weights and a
    ``[num_blocks]`` mask of blocks where at least one source agrees (elsewhere
    all weights are 0 and direction guidance is off: no negative transfer).

    Example:
        >>> w, ok = alignment_weights(torch.tensor([[0.5, 0.5, -0.2], [-1.0, -0.1, 0.0]]), 0.1)
        >>> w.tolist(), ok.tolist()
        ([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], [True, False])
    """
    agree = alignment > 0
    any_agree = agree.any(dim=-1)
    # Shift by the row's best score before dividing: logits <= 0, so no temperature,
    # however small, overflows (alignment / 1e-310 would be inf, and inf - inf NaN).
    top = torch.where(agree, alignment, torch.zeros_like(alignment)).amax(dim=-1, keepdim=True)
    logits = torch.where(agree, (alignment - top) / temperature, torch.full_like(alignment, -math.inf))
    # Rows with no agreeing source would softmax to NaN: give them finite logits, then zero.
    logits = torch.where(any_agree.unsqueeze(-1), logits, torch.zeros_like(logits))
    weights = torch.softmax(logits, dim=-1)
    weights = torch.where(agree & any_agree.unsqueeze(-1), weights, torch.zeros_like(weights))
    return weights, any_agree


class Rule(NamedTuple):
    """A registered rule: the function, and the names of the configuration values
    (attributes of :class:`~sgg_optim.GuidanceConfig`) passed after its tensors."""

    fn: Callable[..., Tensor | Direction]
    args: tuple[str, ...] = ()


DIRECTION_RULES: dict[str, Rule] = {
    "off": Rule(off_coefficients),
    "project": Rule(project_coefficients),
    "cone": Rule(cone_coefficients, ("cos_max_angle",)),
    "blend": Rule(blend_coefficients, ("strength",)),
}
MAGNITUDE_RULES: dict[str, Rule] = {
    "off": Rule(no_scale),
    "clip": Rule(clip_scale, ("max_norm",)),
    "adaptive": Rule(adaptive_scale, ("spike_factor",)),
}
