"""The library's guidance step against a naive float64 implementation of SPEC section 1.

The naive version concatenates each block's gradients and references into float64
vectors and applies the formulas literally; the library (float32 gradients, fp32
reference storage) must agree to a relative error below 1e-6 of |g| for every
direction x magnitude x scope, on both coefficient paths (``nonfinite="skip"``: host
floats; ``"propagate"``: device tensors). Low-precision reference storage (bf16,
int8) must report nearly the fp32 cosine.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgg_optim import GuidedOptimizer, Reference, capture_reference

SHAPES = [(7, 5), (5,), (4, 6), (3, 3, 2), (11,)]
NAMES = [f"p{i}" for i in range(len(SHAPES))]
GROUP = [0, 0, 1, 1, 1]  # two param groups
GRAD_NORMS = [0.5, 2.0, 1.5, 0.3, 0.8]  # some blocks above max_norm = 1, some below
# Per tensor, the reference is alpha * g + noise: the cases exercise every branch.
ALPHAS = {
    "aligned": [3.0, 3.0, 3.0, 3.0, 3.0],  # inside the cone, no conflict
    "opposed": [-1.5, -1.5, -1.5, -1.5, -1.5],  # conflicting, outside the cone
    "mixed": [2.0, -1.5, 0.3, -0.2, 3.0],
    "orthogonal": [0.0, 0.0, 0.0, 0.0, 0.0],
}
# Boundary cases: the reference at an exact angle (degrees) to g, close to the cone's
# half-angle (50) or to 90 degrees, and gradient norms within a few percent of max_norm.
ANGLES = {
    "near_cone": [49.0, 51.0, 49.8, 50.3, 47.0],
    "near_right": [89.0, 91.0, 89.7, 90.4, 93.0],
}
NEAR_NORMS = [1.01, 0.99, 1.003, 0.997, 1.02]
CASES = sorted(ALPHAS) + sorted(ANGLES)
CFG = dict(max_angle=50.0, strength=0.3, max_norm=1.0)


# -- the naive float64 reference implementation --------------------------------------------

def naive_direction(g: torch.Tensor, r: torch.Tensor, direction: str, max_angle: float, strength: float):
    """SPEC section 1, literally, on float64 vectors. Returns (g', rule changed g)."""
    gg, rr, d = g @ g, r @ r, g @ r
    valid = bool(torch.isfinite(gg) and torch.isfinite(rr) and gg > 0 and rr > 0)
    if direction == "off" or not valid:
        return g.clone(), False
    cos = d / torch.sqrt(gg * rr)
    g_norm, r_norm = g.norm(), r.norm()
    if direction == "project":
        if cos < 0:
            return g - (d / rr) * r, True
        return g.clone(), False
    if direction == "cone":
        c = math.cos(math.radians(max_angle))
        if cos < c:
            g_perp = g - (d / rr) * r
            return g_norm * (c * r / r_norm + math.sqrt(1 - c * c) * g_perp / g_perp.norm()), True
        return g.clone(), False
    if direction == "blend":
        return (1 - strength) * g + strength * g_norm * r / r_norm, strength > 0
    raise AssertionError(direction)


def naive_magnitude(g: torch.Tensor, magnitude: str, max_norm: float) -> torch.Tensor:
    if magnitude == "clip":
        n = g.norm()
        return g * (max_norm / n) if n > max_norm else g
    assert magnitude == "off"
    return g


def naive_guidance(grads, refs, blocks, direction, magnitude, max_angle, strength, max_norm):
    """The whole guidance step: per block, concatenate, transform, split back."""
    out = [None] * len(grads)
    changed = []
    for idx in blocks:
        g = torch.cat([grads[i].reshape(-1).double() for i in idx])
        r = torch.cat([refs[i].reshape(-1).double() for i in idx])
        g2, active = naive_direction(g, r, direction, max_angle, strength)
        g2 = naive_magnitude(g2, magnitude, max_norm)
        changed.append(active)
        start = 0
        for i in idx:
            n = grads[i].numel()
            out[i] = g2[start:start + n].reshape(grads[i].shape)
            start += n
    return out, changed


# -- fixtures ----------------------------------------------------------------------------------

def blocks_for(scope: str) -> list[list[int]]:
    n = len(SHAPES)
    if scope == "global":
        return [list(range(n))]
    if scope == "group":
        return [[i for i in range(n) if GROUP[i] == k] for k in sorted(set(GROUP))]
    return [[i] for i in range(n)]


def make_case(case: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    grads, refs = [], []
    if case in ANGLES:
        for shape, norm, theta in zip(SHAPES, NEAR_NORMS, ANGLES[case]):
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            u = torch.randn(shape, generator=gen, dtype=torch.float64)
            u = u - (u * g).sum() / (g * g).sum() * g
            th = math.radians(theta)
            refs.append((math.cos(th) * g / g.norm() + math.sin(th) * u / u.norm()).float())
            grads.append((g * (norm / g.norm())).float())
        return grads, refs
    for shape, norm, alpha in zip(SHAPES, GRAD_NORMS, ALPHAS[case]):
        g = torch.randn(shape, generator=gen)
        g = g * (norm / g.norm())
        noise = torch.randn(shape, generator=gen) * (norm / math.sqrt(g.numel()))
        refs.append((alpha * g + noise).float())
        grads.append(g.float())
    return grads, refs


def guided_library(grads, refs, **cfg):
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]
    named = list(zip(NAMES, params))
    groups = [{"params": [nt for nt, k in zip(named, GROUP) if k == j]} for j in sorted(set(GROUP))]
    opt = GuidedOptimizer(torch.optim.SGD(groups, lr=0.0), reference=Reference(dict(zip(NAMES, refs))),
                          reference_dtype="fp32", **cfg)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.grad.detach().clone() for p in params], opt.stats


# -- the comparison -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("magnitude", ["off", "clip"])
@pytest.mark.parametrize("direction", ["off", "project", "cone", "blend"])
def test_library_matches_naive_float64_guidance(direction, magnitude, scope, nonfinite, case, seed):
    grads, refs = make_case(case, seed)
    blocks = blocks_for(scope)
    want, changed = naive_guidance(grads, refs, blocks, direction, magnitude, **CFG)
    got, stats = guided_library(grads, refs, direction=direction, magnitude=magnitude, scope=scope,
                                nonfinite=nonfinite, **CFG)
    for j, idx in enumerate(blocks):
        g_norm = torch.cat([grads[i].reshape(-1).double() for i in idx]).norm().item()
        err = torch.cat([(got[i].double() - want[i]).reshape(-1) for i in idx]).norm().item()
        assert err < 1e-6 * g_norm, f"block {j} ({idx}): relative error {err / g_norm:.3e}"
        if not changed[j] and magnitude == "off":
            for i in idx:  # identity blocks are left bit-for-bit alone
                assert torch.equal(got[i], grads[i])

    # The reported figures describe the same step.
    g_all = torch.cat([g.reshape(-1).double() for g in grads])
    r_all = torch.cat([r.reshape(-1).double() for r in refs])
    out_all = torch.cat([w.reshape(-1) for w in want])
    assert stats["skipped"] == 0
    if direction == magnitude == "off" and nonfinite == "propagate":
        return  # the documented bit-for-bit pass-through: no figures are computed
    assert stats["grad_norm"] == pytest.approx(g_all.norm().item(), rel=1e-6)
    assert stats["guided_norm"] == pytest.approx(out_all.norm().item(), rel=1e-6)
    assert stats["projected"] == pytest.approx(sum(changed) / len(blocks), abs=1e-12)
    if direction != "off":
        want_cos = ((g_all @ r_all) / (g_all.norm() * r_all.norm())).item()
        assert stats["cos"] == pytest.approx(want_cos, abs=1e-6)


def test_the_cases_exercise_every_branch():
    """Guard on the fixtures: across the cases, every rule both fires and stays idle
    in some block, and clipping both triggers and does not."""
    seen = {d: set() for d in ("project", "cone")}
    clipped = set()
    for case in CASES:
        grads, refs = make_case(case, 0)
        for scope in ("global", "group", "tensor"):
            for d in seen:
                _, changed = naive_guidance(grads, refs, blocks_for(scope), d, "off", **CFG)
                seen[d].update(changed)
            for idx in blocks_for(scope):
                clipped.add(torch.cat([grads[i].reshape(-1) for i in idx]).norm().item() > CFG["max_norm"])
    assert seen == {"project": {True, False}, "cone": {True, False}}
    assert clipped == {True, False}


# -- low-precision reference storage -------------------------------------------------------------

def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 64))  # 49,472 parameters


TEACHER = torch.randn(128, 64, generator=torch.Generator().manual_seed(7)) / math.sqrt(128)


def batches(seed: int, n: int):
    """Regression batches of one shared task (a fixed linear teacher plus noise), so the
    source and target gradients are correlated (cos ~ 0.3) rather than orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(32, 128, generator=gen)
        out.append((x, x @ TEACHER + 0.1 * torch.randn(32, 64, generator=gen)))
    return out


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def reported_cos(model, ref, reference_dtype: str, grads) -> float:
    opt = GuidedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), reference=ref,
                          reference_dtype=reference_dtype, direction="cone", magnitude="off")
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    return opt.stats["cos"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("captured_as", ["same", "fp32"])
@pytest.mark.parametrize("storage,tol", [("bf16", 0.02), ("int8", 0.05)])
def test_low_precision_reference_reports_nearly_the_fp32_cosine(storage, tol, captured_as, sign, seed):
    if storage == "int8":
        pytest.importorskip("bitsandbytes")
    model = mlp(seed)
    assert sum(p.numel() for p in model.parameters()) == 49472
    loss_fn = lambda m, b: sign * mse(m, b)  # noqa: E731
    src = batches(100 + seed, 4)
    ref32 = capture_reference(model, src, loss_fn=loss_fn, reference_dtype="fp32")
    ref_lo = capture_reference(model, src, loss_fn=loss_fn,
                               reference_dtype=storage if captured_as == "same" else "fp32")
    (x, y), = batches(200 + seed, 1)
    model.zero_grad()
    mse(model, (x, y)).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]

    exact = torch.cat([g.reshape(-1).double() for g in grads]) @ torch.cat(
        [ref32[n].reshape(-1).double() for n, _ in model.named_parameters()])
    exact = exact / (torch.cat([g.reshape(-1).double() for g in grads]).norm()
                     * torch.cat([ref32[n].reshape(-1).double() for n, _ in model.named_parameters()]).norm())
    cos32 = reported_cos(model, ref32, "fp32", grads)
    cos_lo = reported_cos(model, ref_lo, storage, grads)
    assert abs(exact.item()) > 0.1  # the comparison is not trivially about cos ~ 0
    assert cos32 == pytest.approx(exact.item(), abs=1e-5)
    assert abs(cos_lo - cos32) <= tol, f"{storage}: cos {cos_lo:.4f} vs fp32 {cos32:.4f}"
