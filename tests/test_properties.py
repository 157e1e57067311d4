"""Property tests of the guidance step (SPEC sections 1 and 3), driven through the
public ``GuidedOptimizer`` over ``torch.optim.SGD(lr=0)``.

Each example builds a few float32 parameters of random shapes, gives them chosen
gradients, captures a reference, runs ``opt.step()`` and reads the rewritten
``p.grad`` back. Expected values are computed here in float64 from the float32
tensors the library actually saw.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from sgg_optim import GuidedOptimizer, Reference, capture_reference

SETTINGS = settings(max_examples=40, deadline=None)

# -- strategies --------------------------------------------------------------------------

# Shapes whose numel is at least 2, so every block has a direction orthogonal to r.
SHAPE = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple).filter(lambda s: math.prod(s) >= 2)
SHAPES = st.lists(SHAPE, min_size=1, max_size=4)
SEED = st.integers(0, 2**31 - 1)
SCOPE = st.sampled_from(["global", "group", "tensor"])
LOG_SCALE = st.floats(-3.0, 3.0)


# -- helpers -----------------------------------------------------------------------------

class Params(nn.Module):
    """A model that is just a list of named parameters ``p0, p1, ...``."""

    def __init__(self, shapes):
        super().__init__()
        for i, s in enumerate(shapes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.zeros(s)))

    def plist(self):
        return [getattr(self, f"p{i}") for i in range(len(list(self.parameters())))]


def group_of(n: int, groups: int) -> list[int]:
    """Contiguous split of n parameters into ``min(groups, n)`` param groups."""
    groups = min(groups, n)
    return [i * groups // n for i in range(n)]


def blocks_of(n: int, scope: str, groups: int) -> list[list[int]]:
    """Indices of the parameters forming each block, in block order."""
    if scope == "global":
        return [list(range(n))]
    if scope == "tensor":
        return [[i] for i in range(n)]
    gof = group_of(n, groups)
    return [[i for i in range(n) if gof[i] == g] for g in sorted(set(gof))]


def make_opt(model: Params, refs=None, groups: int = 1, **cfg) -> GuidedOptimizer:
    """GuidedOptimizer over SGD(lr=0) built from named parameters (contiguous groups).

    ``refs``: None (EMA reference), one list of tensors (one Reference) or a list of
    such lists (several sources).
    """
    named = list(model.named_parameters())
    gof = group_of(len(named), groups)
    param_groups = [{"params": [nt for nt, g in zip(named, gof) if g == k]} for k in sorted(set(gof))]
    base = torch.optim.SGD(param_groups, lr=0.0)
    if refs is None:
        return GuidedOptimizer(base, **cfg)
    names = [n for n, _ in named]
    many = isinstance(refs[0], (list, tuple))
    build = lambda rs: Reference(dict(zip(names, rs)))  # noqa: E731
    reference = [build(rs) for rs in refs] if many else build(refs)
    return GuidedOptimizer(base, reference=reference, **cfg)


def step_with(opt, params, grads) -> list[torch.Tensor]:
    """Install ``grads``, step, return the rewritten gradients."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.grad.detach().clone() for p in params]


def flat64(tensors, idx) -> torch.Tensor:
    return torch.cat([tensors[i].reshape(-1).double() for i in idx])


def split(vec: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, s = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(vec[s:s + n].reshape(shape))
        s += n
    return out


def angled_pair(n: int, theta_deg: float, gen: torch.Generator, g_norm: float, r_norm: float):
    """float64 vectors (g, r) of length n >= 2 at angle ``theta_deg``, with given norms."""
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    u = u - (u @ r) / (r @ r) * r
    r_hat, u_hat = r / r.norm(), u / u.norm()
    th = math.radians(theta_deg)
    return g_norm * (math.cos(th) * r_hat + math.sin(th) * u_hat), r_norm * r_hat


def at_angle(v: torch.Tensor, theta_deg: float, norm: float, gen: torch.Generator) -> torch.Tensor:
    """A float64 vector at angle ``theta_deg`` from ``v`` (float64, numel >= 2) with the given norm."""
    u = torch.randn(v.numel(), generator=gen, dtype=torch.float64)
    u = u - (u @ v) / (v @ v) * v
    th = math.radians(theta_deg)
    return norm * (math.cos(th) * v / v.norm() + math.sin(th) * u / u.norm())


def blockwise_pairs(shapes, blocks, thetas, gen, g_scales, r_scales):
    """Per-parameter float32 (grads, refs) such that block j has angle ``thetas[j]``."""
    grads, refs = [None] * len(shapes), [None] * len(shapes)
    for j, idx in enumerate(blocks):
        sub = [shapes[i] for i in idx]
        n = sum(math.prod(s) for s in sub)
        g, r = angled_pair(n, thetas[j], gen, g_scales[j], r_scales[j])
        for i, gt, rt in zip(idx, split(g.float(), sub), split(r.float(), sub)):
            grads[i], refs[i] = gt.contiguous(), rt.contiguous()
    return grads, refs


def cos64(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x @ y) / (x.norm() * y.norm()))


def draw_setup(data, shapes, scope, groups, theta=st.floats(0.0, 170.0)):
    n = len(shapes)
    blocks = blocks_of(n, scope, groups)
    thetas = [data.draw(theta) for _ in blocks]
    g_scales = [10 ** data.draw(LOG_SCALE) for _ in blocks]
    r_scales = [10 ** data.draw(LOG_SCALE) for _ in blocks]
    return blocks, thetas, g_scales, r_scales


# -- 1. cone -------------------------------------------------------------------------------

def boundary_tol(cos_in: float) -> float:
    """How far from cos(max_angle) a rotated gradient may land: the statistics' precision
    over sin^2 of its angle to r (see the near-antiparallel test below)."""
    return 1e-5 + 2e-6 / max(1.0 - cos_in * cos_in, 1e-12)


@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2), max_angle=st.floats(5.0, 90.0),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_cone_keeps_norm_and_lands_in_the_cone_or_leaves_g_alone(shapes, seed, scope, groups, max_angle,
                                                                 nonfinite, data):
    """Guards: the cone sending outside gradients anywhere but onto its boundary (e.g. straight onto r)."""
    gen = torch.Generator().manual_seed(seed)
    blocks, thetas, gs, rs = draw_setup(data, shapes, scope, groups)
    grads, refs = blockwise_pairs(shapes, blocks, thetas, gen, gs, rs)
    model = Params(shapes)
    opt = make_opt(model, refs, groups, direction="cone", magnitude="off", max_angle=max_angle,
                   scope=scope, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    c = math.cos(math.radians(max_angle))
    for idx in blocks:
        g, r, g2 = flat64(grads, idx), flat64(refs, idx), flat64(out, idx)
        cos_in = cos64(g, r)
        assert torch.isfinite(g2).all()
        assert g2.norm().item() == pytest.approx(g.norm().item(), rel=1e-5)
        if cos_in < c - 1e-6:  # started outside: ends exactly on the cone's boundary
            assert cos64(g2, r) == pytest.approx(c, abs=boundary_tol(cos_in))
        elif cos_in > c + 1e-6:  # started inside: not touched at all
            for i in idx:
                assert torch.equal(out[i], grads[i])


@SETTINGS
@given(shapes=SHAPES, seed=SEED, theta=st.floats(175.0, 179.0), max_angle=st.floats(5.0, 89.0),
       nonfinite=st.sampled_from(["skip", "propagate"]))
@example(shapes=[(5,)], seed=0, theta=179.0, max_angle=12.0, nonfinite="skip")
@example(shapes=[(64, 8), (8,)], seed=3, theta=178.0, max_angle=60.0, nonfinite="propagate")
def test_cone_near_antiparallel_keeps_norm_and_reaches_the_cone(shapes, seed, theta, max_angle, nonfinite):
    """Same property as above, for g within 1 to 5 degrees of -r (global scope).

    Here |g_perp|^2 = gg - d^2/rr cancels, so its relative error is the statistics'
    precision (~1e-6: per-tensor fp32 BLAS sums, then float64 across tensors) divided
    by sin^2(theta). Per-tensor float64 accumulation would remove that, at 10-30x the
    cost of the statistics pass (docs/design.md), so the documented bound is
    1e-5 + 2e-6 / sin^2(theta): 1.4e-4 at 175 degrees, 6.6e-3 at 179.
    """
    gen = torch.Generator().manual_seed(seed)
    idx = list(range(len(shapes)))
    grads, refs = blockwise_pairs(shapes, [idx], [theta], gen, [1.0], [1.0])
    model = Params(shapes)
    opt = make_opt(model, refs, direction="cone", magnitude="off", max_angle=max_angle, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    g, r, g2 = flat64(grads, idx), flat64(refs, idx), flat64(out, idx)
    tol = 1e-5 + 2e-6 / math.sin(math.radians(theta)) ** 2
    assert g2.norm().item() == pytest.approx(g.norm().item(), rel=tol)
    assert cos64(g2, r) == pytest.approx(math.cos(math.radians(max_angle)), abs=tol)  # on the boundary


# (angle of g to r, max_angle) in degrees: g outside the cone, from just outside to nearly opposite
CONE_CASES = [(46.0, 45.0), (90.0, 45.0), (120.0, 30.0), (150.0, 60.0), (170.0, 10.0), (95.0, 89.0), (30.0, 5.0)]


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("theta, max_angle", CONE_CASES)
def test_cone_puts_an_outside_gradient_exactly_on_the_boundary(theta, max_angle, nonfinite, scope):
    """Deterministic: a gradient outside the cone is rotated in the plane of g and r onto
    the boundary, g' = |g| (c r/|r| + sqrt(1 - c^2) g_perp/|g_perp|), so cos(g', r) is
    exactly cos(max_angle) and |g'| = |g|; a gradient inside is left bit for bit.

    Guards: the cone sending every outside gradient straight onto r (g' = |g| r/|r|).
    """
    shapes = [(4, 3), (5,)]
    gen = torch.Generator().manual_seed(int(theta * 10 + max_angle))
    blocks = blocks_of(len(shapes), scope, 1)
    # block 0 outside the cone at theta; under scope="tensor", block 1 inside it
    thetas = [theta, max_angle / 2][:len(blocks)]
    grads, refs = blockwise_pairs(shapes, blocks, thetas, gen, [2.5] * len(blocks), [0.4] * len(blocks))
    model = Params(shapes)
    opt = make_opt(model, refs, direction="cone", magnitude="off", max_angle=max_angle, scope=scope,
                   nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    c = math.cos(math.radians(max_angle))
    g, r, g2 = flat64(grads, blocks[0]), flat64(refs, blocks[0]), flat64(out, blocks[0])
    g_perp = g - (g @ r) / (r @ r) * r
    want = g.norm() * (c * r / r.norm() + math.sqrt(1 - c * c) * g_perp / g_perp.norm())
    assert (g2 - want).norm().item() <= 1e-6 * g.norm().item()
    assert cos64(g2, r) == pytest.approx(c, abs=1e-6)
    assert g2.norm().item() == pytest.approx(g.norm().item(), rel=1e-6)
    assert opt.stats["projected"] == pytest.approx(1 / len(blocks))
    for idx in blocks[1:]:
        for i in idx:
            assert torch.equal(out[i], grads[i])


@SETTINGS
@given(shapes=SHAPES, seed=SEED, max_angle=st.floats(5.0, 89.0), log2_ratio=st.integers(-4, 4),
       nonfinite=st.sampled_from(["skip", "propagate"]))
def test_cone_exactly_antiparallel_gradient_keeps_its_norm(shapes, seed, max_angle, log2_ratio, nonfinite):
    """g = -2^k r (exactly representable): g_perp is 0, so the rule must send g to
    |g| r/|r| (documented flip); in any case |g| is kept and g' lands in the cone."""
    gen = torch.Generator().manual_seed(seed)
    refs = [torch.randn(s, generator=gen) for s in shapes]
    grads = [-(2.0 ** log2_ratio) * r for r in refs]
    model = Params(shapes)
    opt = make_opt(model, refs, direction="cone", magnitude="off", max_angle=max_angle, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    idx = list(range(len(shapes)))
    g, r, g2 = flat64(grads, idx), flat64(refs, idx), flat64(out, idx)
    assert g2.norm().item() == pytest.approx(g.norm().item(), rel=1e-5)
    assert cos64(g2, r) >= math.cos(math.radians(max_angle)) - 1e-5


# -- 2. project ----------------------------------------------------------------------------

@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_project_removes_the_conflict_and_leaves_agreeing_gradients_alone(shapes, seed, scope, groups,
                                                                         nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    blocks, thetas, gs, rs = draw_setup(data, shapes, scope, groups, theta=st.floats(0.0, 180.0))
    grads, refs = blockwise_pairs(shapes, blocks, thetas, gen, gs, rs)
    model = Params(shapes)
    opt = make_opt(model, refs, groups, direction="project", magnitude="off", scope=scope, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    for idx in blocks:
        g, r, g2 = flat64(grads, idx), flat64(refs, idx), flat64(out, idx)
        assert torch.isfinite(g2).all()
        assert (g2 @ r).item() >= -1e-6 * (g.norm() * r.norm()).item()
        if cos64(g, r) > 1e-6:
            for i in idx:
                assert torch.equal(out[i], grads[i])


# -- 3. clip -------------------------------------------------------------------------------

@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2), log_max_norm=st.floats(-3, 3),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_clip_bounds_every_block_norm(shapes, seed, scope, groups, log_max_norm, nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    max_norm = 10 ** log_max_norm
    grads = [None] * len(shapes)
    for idx in blocks_of(len(shapes), scope, groups):  # block norms far from or close to max_norm
        ratio = 10 ** data.draw(st.one_of(st.floats(-4, 4), st.floats(-0.01, 0.01)))
        raw = [torch.randn(shapes[i], generator=gen) for i in idx]
        norm = torch.cat([x.reshape(-1) for x in raw]).double().norm().item()
        for i, x in zip(idx, raw):
            grads[i] = x * (ratio * max_norm / norm)
    model = Params(shapes)
    opt = make_opt(model, None, groups, direction="off", magnitude="clip", max_norm=max_norm,
                   scope=scope, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    for idx in blocks_of(len(shapes), scope, groups):
        g, g2 = flat64(grads, idx), flat64(out, idx)
        assert g2.norm().item() <= max_norm * (1 + 1e-6)
        if g.norm().item() < max_norm * (1 - 1e-6):
            for i in idx:
                assert torch.equal(out[i], grads[i])
        else:  # clipped: same direction, norm exactly max_norm
            assert cos64(g2, g) == pytest.approx(1.0, abs=1e-6)
            assert g2.norm().item() == pytest.approx(max_norm, rel=1e-5)


# -- 4. adaptive ---------------------------------------------------------------------------

# derandomize: the same examples on every run (a warm-up bug once slipped through
# 2 of 10 random seeds); the warm-up boundary itself is pinned by the plain test below.
@settings(max_examples=40, deadline=None, derandomize=True)
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2), warmup=st.integers(0, 4),
       spike_factor=st.floats(1.1, 5.0), norm_beta=st.floats(0.0, 0.99),
       extra=st.integers(3, 6), spike_at=st.integers(0, 2), data=st.data())
def test_adaptive_caps_each_block_at_spike_factor_times_the_norm_ema(shapes, seed, scope, groups, warmup,
                                                                     spike_factor, norm_beta, extra,
                                                                     spike_at, data):
    gen = torch.Generator().manual_seed(seed)
    n = len(shapes)
    blocks = blocks_of(n, scope, groups)
    model = Params(shapes)
    opt = make_opt(model, None, groups, direction="off", magnitude="adaptive", scope=scope,
                   warmup_steps=warmup, spike_factor=spike_factor, norm_beta=norm_beta)
    ema = [0.0] * len(blocks)
    count = 0
    ready_from = max(warmup, 1)
    spike_step = ready_from + spike_at
    checked_spike = False
    for t in range(ready_from + extra):
        grads = [None] * n
        for idx in blocks:  # a random direction with a chosen norm per block
            target = 10 ** data.draw(st.floats(-0.5, 0.5)) * (100.0 if t == spike_step else 1.0)
            raw = [torch.randn(shapes[i], generator=gen) for i in idx]
            norm = torch.cat([x.reshape(-1).double() for x in raw]).norm().item()
            for i, x in zip(idx, raw):
                grads[i] = x * (target / norm)
        out = step_with(opt, model.plist(), grads)
        for j, idx in enumerate(blocks):
            pre, post = flat64(grads, idx).norm().item(), flat64(out, idx).norm().item()
            if count >= ready_from:
                bound = spike_factor * ema[j] / (1 - norm_beta ** count)
                assert post <= bound * (1 + 1e-6)
                assert post >= min(pre, bound) * (1 - 1e-5)  # scaled no further than needed
                if t == spike_step:
                    assert post < pre  # the 100x spike was clipped
                    checked_spike = True
            else:  # warm-up: untouched
                assert post == pytest.approx(pre, rel=1e-6)
            ema[j] = norm_beta * ema[j] + (1 - norm_beta) * post
        count += 1
    assert checked_spike


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("spike_offset", [-1, 0, 1])
@pytest.mark.parametrize("warmup", [0, 1, 2, 3, 5])
def test_adaptive_warmup_ends_exactly_after_warmup_steps(warmup, spike_offset, scope):
    """Deterministic: block norms 1, 1.5, 1, 1.5, ..., one 100x spike at the last
    warm-up step (offset -1), the first ready step (0) or the one after (1), and an 8x
    one two steps later (capped only if the EMA took the first spike clipped). A block is
    ready once ``max(warmup_steps, 1)`` steps fed its norm EMA: before that nothing is
    touched (bit for bit), from then on every norm is capped at spike_factor x the
    bias-corrected EMA of the previous post-clip norms, exactly.

    Guards: warm-up a step early or late (norm_count >= warmup - 1, > warmup), or the EMA fed pre-clip norms.
    """
    shapes = [(3, 4), (6,)]
    spike_factor, norm_beta = 2.0, 0.8
    ready_from = max(warmup, 1)
    spike_step = ready_from + spike_offset
    model = Params(shapes)
    opt = make_opt(model, None, direction="off", magnitude="adaptive", scope=scope, warmup_steps=warmup,
                   spike_factor=spike_factor, norm_beta=norm_beta)
    blocks = blocks_of(len(shapes), scope, 1)
    gen = torch.Generator().manual_seed(warmup * 10 + spike_offset + 1)
    ema = [0.0] * len(blocks)
    for t in range(ready_from + 4):
        target = {spike_step: 100.0, spike_step + 2: 8.0}.get(t, 1.0) * (1.5 if t % 2 else 1.0)
        grads = [None] * len(shapes)
        for idx in blocks:
            raw = [torch.randn(shapes[i], generator=gen, dtype=torch.float64) for i in idx]
            norm = torch.cat([x.reshape(-1) for x in raw]).norm().item()
            for i, x in zip(idx, raw):
                grads[i] = (x * (target / norm)).float()
        out = step_with(opt, model.plist(), grads)
        for j, idx in enumerate(blocks):
            pre = flat64(grads, idx).norm().item()
            if t < ready_from:  # warming up: untouched, bit for bit
                for i in idx:
                    assert torch.equal(out[i], grads[i]), (t, j)
                post = pre
            else:
                bound = spike_factor * ema[j] / (1 - norm_beta ** t)
                post = min(pre, bound)
                assert flat64(out, idx).norm().item() == pytest.approx(post, rel=1e-6), (t, j)
                if t == spike_step:
                    assert post < pre / 10  # the spike was clipped
            ema[j] = norm_beta * ema[j] + (1 - norm_beta) * post
    assert opt.stats["step"] == ready_from + 4


# -- 5. zero / non-finite reference ----------------------------------------------------------

@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2),
       direction=st.sampled_from(["cone", "project", "blend"]), kind=st.sampled_from(["zero", "nan", "one_nan", "inf"]),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_zero_or_nonfinite_reference_disables_direction_guidance(shapes, seed, scope, groups, direction, kind,
                                                                 nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    n = len(shapes)
    bad = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    grads = [torch.randn(s, generator=gen) for s in shapes]
    refs = []
    for s, b, g in zip(shapes, bad, grads):
        if not b:
            refs.append(-g + 0.1 * torch.randn(s, generator=gen))  # would be guided
        elif kind == "zero":
            refs.append(torch.zeros(s))
        elif kind == "nan":
            refs.append(torch.full(s, float("nan")))
        elif kind == "inf":
            r = torch.randn(s, generator=gen)
            r.view(-1)[0] = float("inf")
            refs.append(r)
        else:
            r = torch.randn(s, generator=gen)
            r.view(-1)[-1] = float("nan")
            refs.append(r)
    model = Params(shapes)
    opt = make_opt(model, [torch.randn(s, generator=gen) for s in shapes], groups, direction=direction,
                   magnitude="off", scope=scope, nonfinite=nonfinite, strength=0.5)
    opt.set_reference(Reference({f"p{i}": r for i, r in enumerate(refs)}))
    out = step_with(opt, model.plist(), grads)
    for t in out:
        assert torch.isfinite(t).all()
    for idx in blocks_of(n, scope, groups):
        disabled = all(bad[i] for i in idx) if kind == "zero" else any(bad[i] for i in idx)
        if disabled:
            for i in idx:
                assert torch.equal(out[i], grads[i])
    assert opt.stats["skipped"] == 0


# -- 6. scope="tensor" == scope="global" on each tensor alone ----------------------------------

@SETTINGS
@given(shapes=SHAPES.filter(lambda s: len(s) >= 2), seed=SEED,
       direction=st.sampled_from(["cone", "project", "blend"]),
       magnitude=st.sampled_from(["off", "clip", "adaptive"]), steps=st.integers(1, 3),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_tensor_scope_equals_global_scope_per_tensor(shapes, seed, direction, magnitude, steps, nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    n = len(shapes)
    model = Params(shapes)
    params = model.plist()
    ref_src = [torch.randn(s, generator=gen) for s in shapes]
    # A captured fp32 reference: the loss sum_i <p_i, x_i> has gradient x_i.
    loss_fn = lambda m, xs: sum((p * x).sum() for p, x in zip(m.plist(), xs))  # noqa: E731
    ref = capture_reference(model, [ref_src], loss_fn=loss_fn, reference_dtype="fp32")
    for i, p in enumerate(params):
        assert torch.equal(ref[f"p{i}"], ref_src[i])
    cfg = dict(direction=direction, magnitude=magnitude, max_angle=data.draw(st.floats(10.0, 90.0)),
               strength=data.draw(st.floats(0.0, 1.0)), max_norm=data.draw(st.floats(0.1, 3.0)),
               warmup_steps=1, spike_factor=1.5, nonfinite=nonfinite, reference=ref)
    steps_grads = []
    for _ in range(steps):  # each tensor's gradient at a random angle to its reference
        steps_grads.append([
            at_angle(ref_src[i].reshape(-1).double(), data.draw(st.floats(0.0, 175.0)),
                     10 ** data.draw(st.floats(-1, 1)), gen).float().reshape(shapes[i])
            for i in range(n)])
    joint = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.0), scope="tensor", **cfg)
    joint_out = [step_with(joint, params, gr) for gr in steps_grads]
    for i, p in enumerate(params):
        alone = GuidedOptimizer(torch.optim.SGD([(f"p{i}", p)], lr=0.0), scope="global", **cfg)
        for s, gr in enumerate(steps_grads):
            (got,) = step_with(alone, [p], [gr[i]])
            want = joint_out[s][i]
            torch.testing.assert_close(want, got, rtol=1e-6, atol=1e-7 * gr[i].abs().max().item())


# -- 7. blend ------------------------------------------------------------------------------

@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2), strength=st.floats(0.0, 1.0),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_blend_is_the_convex_mix_with_the_scaled_reference(shapes, seed, scope, groups, strength, nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    blocks, thetas, gs, rs = draw_setup(data, shapes, scope, groups, theta=st.floats(0.0, 180.0))
    grads, refs = blockwise_pairs(shapes, blocks, thetas, gen, gs, rs)
    model = Params(shapes)
    opt = make_opt(model, refs, groups, direction="blend", magnitude="off", strength=strength,
                   scope=scope, nonfinite=nonfinite)
    out = step_with(opt, model.plist(), grads)
    for idx in blocks:
        g, r, g2 = flat64(grads, idx), flat64(refs, idx), flat64(out, idx)
        want = (1 - strength) * g + strength * g.norm() * r / r.norm()
        assert (g2 - want).norm().item() <= 1e-6 * g.norm().item()


# -- multi-source alignment (SPEC section 3) -------------------------------------------------

@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2),
       direction=st.sampled_from(["cone", "project", "blend"]), max_angle=st.floats(10.0, 60.0), data=st.data())
def test_anti_aligned_source_gets_zero_weight(shapes, seed, scope, groups, direction, max_angle, data):
    gen = torch.Generator().manual_seed(seed)
    blocks, thetas, gs, rs = draw_setup(data, shapes, scope, groups, theta=st.floats(5.0, 85.0))
    grads, r1 = blockwise_pairs(shapes, blocks, thetas, gen, gs, rs)
    r2 = [-r for r in r1]
    order = data.draw(st.booleans())  # which position the anti-aligned source takes
    sources = [r2, r1] if order else [r1, r2]
    cfg = dict(direction=direction, magnitude="off", max_angle=max_angle, strength=0.5, scope=scope)
    model = Params(shapes)
    opt = make_opt(model, sources, groups, **cfg)
    out = step_with(opt, model.plist(), grads)
    w = opt.stats["weights"]
    assert len(w) == 2
    anti, agree = (0, 1) if order else (1, 0)
    assert w[anti] == 0.0
    assert w[agree] == pytest.approx(1.0, abs=1e-12)
    cos1 = sum(cos64(flat64(grads, idx), flat64(r1, idx)) for idx in blocks) / len(blocks)
    assert opt.stats["alignment"][agree] == pytest.approx(cos1, abs=1e-5)
    assert opt.stats["alignment"][anti] == pytest.approx(-cos1, abs=1e-5)
    # The guidance is the single-source guidance with the agreeing source.
    single_model = Params(shapes)
    single = make_opt(single_model, r1, groups, **cfg)
    want = step_with(single, single_model.plist(), grads)
    for idx in blocks:
        diff = (flat64(out, idx) - flat64(want, idx)).norm().item()
        assert diff <= 1e-5 * flat64(grads, idx).norm().item()


@SETTINGS
@given(shapes=SHAPES, seed=SEED, scope=SCOPE, groups=st.integers(1, 2), num_sources=st.integers(2, 4),
       direction=st.sampled_from(["cone", "project", "blend"]),
       nonfinite=st.sampled_from(["skip", "propagate"]), data=st.data())
def test_all_sources_anti_aligned_switches_direction_guidance_off(shapes, seed, scope, groups, num_sources, direction,
                                                                  nonfinite, data):
    gen = torch.Generator().manual_seed(seed)
    blocks = blocks_of(len(shapes), scope, groups)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    sources = []
    for _ in range(num_sources):  # each at an obtuse angle to g in every block
        thetas = [data.draw(st.floats(95.0, 175.0)) for _ in blocks]
        r = [None] * len(shapes)
        for j, idx in enumerate(blocks):
            rv = at_angle(flat64(grads, idx), thetas[j], 10 ** data.draw(LOG_SCALE), gen)
            for i, t in zip(idx, split(rv.float(), [shapes[i] for i in idx])):
                r[i] = t.contiguous()
        sources.append(r)
    model = Params(shapes)
    opt = make_opt(model, sources, groups, direction=direction, magnitude="off", scope=scope,
                   nonfinite=nonfinite, strength=0.7)
    out = step_with(opt, model.plist(), grads)
    for a, b in zip(out, grads):
        assert torch.equal(a, b)
    assert opt.stats["weights"] == [0.0] * num_sources
    assert all(a < 0 for a in opt.stats["alignment"])
