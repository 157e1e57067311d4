"""The library's guidance step against a naive float64 implementation of SPEC section 1.

The naive version concatenates each block's gradients and references into float64
vectors and applies the formulas literally; the library (float32 gradients, fp32
reference storage) must agree to a relative error below 1e-6 of |g| for every
direction x magnitude x scope, on both coefficient paths (``nonfinite="skip"``: host
floats; ``"propagate"``: device tensors): one step for off/clip, eight steps for the
stateful parts (``magnitude="adaptive"``, the EMA reference, several sources with
their alignment weights; ``NaiveGuidance``). Low-precision reference storage (bf16,
int8) must be the storage used and report the fp32 cosine within the documented bound.
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


# -- several steps: adaptive magnitude, EMA reference, several sources ---------------------------
#
# The naive version of docs/method.md's stateful parts, kept per block in float64:
# the magnitude EMA M (fed the final norm s n) and its count N, ready once
# N >= max(warmup_steps, 1); the EMA reference r <- beta r + (1 - beta) g_final (direction
# guidance from step warmup_steps on); with k > 1 sources, the alignment EMA
# A_i <- beta A_i + (1 - beta) cos(g, r_i), bias-corrected with this step counted,
# weights softmax(A_hat / T) over the sources with A_hat > 0, r = sum_i w_i r_i / |r_i|.

STEP_CFG = dict(max_angle=50.0, strength=0.3, max_norm=1.0, warmup_steps=2, spike_factor=1.5,
                norm_beta=0.8, ema_beta=0.7, align_temperature=0.1)
# Per step, the gradient is a r_1 + b r_2 + noise, scaled by m: a spike on the last
# warm-up step (1, must pass untouched) and on steps 2 and 6 (clipped); the sources'
# alignments change sign from step to step (step 3 reverses a consistent history, so
# even the combined reference conflicts).
STEP_MIX = [(1.0, 0.2, 1.0), (0.8, 0.5, 3.0), (1.0, 1.0, 6.0), (-1.0, -0.6, 1.1),
            (-0.3, 1.0, 0.9), (0.2, 0.8, 1.0), (0.6, -0.9, 5.0), (-0.4, -0.6, 0.8)]
REFERENCES = ["ema", "one_source", "three_sources"]


def naive_weights(a_hat: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sources with smoothed alignment <= 0 get 0; the others a softmax of a_hat / T."""
    w = torch.zeros_like(a_hat)
    agree = a_hat > 0
    if agree.any():
        w[agree] = torch.softmax(a_hat[agree] / temperature, dim=0)
    return w


class NaiveGuidance:
    """docs/method.md over several steps, on float64 vectors, block by block."""

    def __init__(self, blocks, direction, magnitude, reference, sources, cfg):
        self.blocks, self.direction, self.magnitude, self.reference, self.cfg = blocks, direction, magnitude, \
            reference, cfg
        self.sources = sources  # per source, per tensor (float64); None for "ema"
        self.M = [0.0] * len(blocks)
        self.N = [0] * len(blocks)
        self.A = [torch.zeros(len(sources or [None]), dtype=torch.float64) for _ in blocks]
        self.ema = None  # per tensor, float64, once the EMA reference exists
        self.accepted = 0

    def step(self, grads):
        cfg = self.cfg
        out, report = [None] * len(grads), {"changed": [], "scale": [], "alignment": [], "weights": []}
        use_ema = self.reference == "ema" and self.direction != "off"
        if use_ema and self.ema is None:
            self.ema = [torch.zeros(g.numel(), dtype=torch.float64) for g in grads]
        for j, idx in enumerate(self.blocks):
            cat = lambda ts: torch.cat([ts[i].reshape(-1).double() for i in idx])  # noqa: E731
            g = cat(grads)
            if self.reference == "ema":
                on = self.direction != "off" and self.accepted >= cfg["warmup_steps"]
                r = cat(self.ema) if on else torch.zeros_like(g)
            elif len(self.sources) == 1:
                r = cat(self.sources[0])
            else:
                rs = [cat(src) for src in self.sources]
                cos = torch.stack([(g @ ri) / (g.norm() * ri.norm()) for ri in rs])
                beta = cfg["ema_beta"]
                self.A[j] = beta * self.A[j] + (1 - beta) * cos
                a_hat = self.A[j] / (1 - beta ** (self.N[j] + 1))
                w = naive_weights(a_hat, cfg["align_temperature"])
                r = sum(wi * ri / ri.norm() for wi, ri in zip(w, rs))
                report["alignment"].append(a_hat)
                report["weights"].append(w)
            g2, active = naive_direction(g, r, self.direction, cfg["max_angle"], cfg["strength"])
            n = g2.norm().item()
            s = 1.0
            if self.magnitude == "clip" and n > cfg["max_norm"]:
                s = cfg["max_norm"] / n
            elif self.magnitude == "adaptive" and self.N[j] >= max(cfg["warmup_steps"], 1):
                bound = cfg["spike_factor"] * self.M[j] / (1 - cfg["norm_beta"] ** self.N[j])
                if 0 < bound < n:
                    s = bound / n
            g2 = s * g2
            self.M[j] = cfg["norm_beta"] * self.M[j] + (1 - cfg["norm_beta"]) * s * n
            self.N[j] += 1
            report["changed"].append(active)
            report["scale"].append(s)
            start = 0
            for i in idx:
                k = grads[i].numel()
                out[i] = g2[start:start + k].reshape(grads[i].shape)
                if use_ema:
                    self.ema[i] = self.cfg["ema_beta"] * self.ema[i] + (1 - self.cfg["ema_beta"]) * out[i].reshape(-1)
                start += k
        self.accepted += 1
        return out, report


def step_sources(seed: int, k: int):
    """k fixed source references (float32, per tensor): r_1, r_2 random, r_3 ~ -r_1."""
    gen = torch.Generator().manual_seed(seed)
    r1 = [torch.randn(s, generator=gen) for s in SHAPES]
    r2 = [torch.randn(s, generator=gen) * 0.5 for s in SHAPES]
    r3 = [-a + 0.3 * torch.randn(s, generator=gen) for a, s in zip(r1, SHAPES)]
    return [r1, r2, r3][:k]


def step_grads(seed: int, bases):
    """The gradient of each step: a r_1 + b r_2 + noise, times m (STEP_MIX)."""
    gen = torch.Generator().manual_seed(seed + 100)
    out = []
    for a, b, m in STEP_MIX:
        out.append([(m * (a * r1 + b * r2 + 0.5 * torch.randn(r1.shape, generator=gen)) * (n / r1.norm())).float()
                    for r1, r2, n in zip(bases[0], bases[1], GRAD_NORMS)])
    return out


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("magnitude", ["off", "clip", "adaptive"])
@pytest.mark.parametrize("direction", ["off", "project", "cone", "blend"])
def test_library_matches_naive_float64_over_steps(direction, magnitude, scope, nonfinite, reference, seed):
    """Eight steps through one optimizer against :class:`NaiveGuidance`: the adaptive
    magnitude (its norm EMA, count and warm-up), the EMA reference, and multi-source
    alignment weights, step by step, to 2e-6 of |g| per block (the fp32-stored EMA
    reference adds its rounding every step: 7e-7 measured at step 8, against 1e-6 for
    one step); the reported scale, projected fraction and per-source alignment and
    weights agree too.

    Guards: norm EMA fed the pre-clip norm; alignment EMA not bias-corrected; warm-up a step early/late.
    """
    k = {"ema": 0, "one_source": 1, "three_sources": 3}[reference]
    blocks = blocks_for(scope)
    bases = step_sources(seed, 3)
    sources = bases[:k] if k else None
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]
    named = list(zip(NAMES, params))
    groups = [{"params": [nt for nt, g in zip(named, GROUP) if g == j]} for j in sorted(set(GROUP))]
    spec = "ema" if not k else [Reference(dict(zip(NAMES, src))) for src in sources]
    opt = GuidedOptimizer(torch.optim.SGD(groups, lr=0.0), reference=spec, direction=direction,
                          magnitude=magnitude, scope=scope, nonfinite=nonfinite, **STEP_CFG)
    naive = NaiveGuidance(blocks, direction, magnitude, reference, sources, STEP_CFG)
    tol = 2e-6
    acted = set()
    for t, grads in enumerate(step_grads(seed, bases)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        got = [p.grad.detach().clone() for p in params]
        want, report = naive.step(grads)
        for j, idx in enumerate(blocks):
            g_norm = torch.cat([grads[i].reshape(-1).double() for i in idx]).norm().item()
            err = torch.cat([(got[i].double() - want[i]).reshape(-1) for i in idx]).norm().item()
            assert err < tol * g_norm, f"step {t} block {j}: relative error {err / g_norm:.3e}"
        acted.update(("scale" if s < 1 else None) for s in report["scale"])
        acted.update(("direction" if c else None) for c in report["changed"])
        if direction == magnitude == "off" and nonfinite == "propagate":
            continue  # the documented pass-through: no figures
        stats = opt.stats
        assert stats["scale"] == pytest.approx(min(report["scale"]), rel=1e-6)
        assert stats["projected"] == pytest.approx(sum(report["changed"]) / len(blocks), abs=1e-12)
        if k > 1 and direction != "off":
            assert stats["alignment"] == pytest.approx(torch.stack(report["alignment"]).mean(0).tolist(), abs=1e-6)
            assert stats["weights"] == pytest.approx(torch.stack(report["weights"]).mean(0).tolist(), abs=1e-5)
    # The steps exercise what they claim to: the magnitude rule clips and the direction rule acts.
    if magnitude != "off":
        assert "scale" in acted
    if direction != "off":
        assert "direction" in acted


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


# How each storage holds a reference of n elements: the checkpoint's tensors
# (state_dict()["guidance"]["refs"][param index][...]) and their bytes (docs/quantized.md).
STORED_AS = {"fp32": {"values": torch.float32}, "bf16": {"values": torch.bfloat16},
             "int8": {"codes": torch.int8, "scale": torch.float32}}  # int8: linear grid, a scale per 1024
STORED_BYTES = {"fp32": lambda n: 4 * n, "bf16": lambda n: 2 * n, "int8": lambda n: n + 4 * math.ceil(n / 1024)}
# |cos(g, r_stored) - cos(g, r_fp32)|, the bounds docs/quantized.md promises.
DOCUMENTED_COS_BOUND = {"bf16": 1e-3, "int8": 2e-3}


def assert_optimizer_stores(opt, model, storage: str, key: str = "source0") -> None:
    """The references the optimizer guides with are held as ``storage``: the checkpoint's
    tensors have its dtypes and its bytes per parameter."""
    refs = opt.state_dict()["guidance"]["refs"]
    params = list(model.parameters())
    assert sorted(refs) == list(range(len(params)))
    for i, p in enumerate(params):
        parts = refs[i][key]
        assert {n: t.dtype for n, t in parts.items()} == STORED_AS[storage], (i, storage)
        assert sum(t.numel() * t.element_size() for t in parts.values()) == STORED_BYTES[storage](p.numel())


def reported_cos(model, ref, reference_dtype: str, grads) -> float:
    opt = GuidedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), reference=ref,
                          reference_dtype=reference_dtype, direction="cone", magnitude="off")
    assert_optimizer_stores(opt, model, reference_dtype)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    return opt.stats["cos"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("captured_as", ["same", "fp32"])
@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_low_precision_reference_reports_nearly_the_fp32_cosine(storage, captured_as, sign, seed):
    """The reference is captured as ``storage`` (or as fp32 and converted by the optimizer)
    and really held that way, at its bytes per parameter; the cosine it reports is within
    the bound docs/quantized.md documents (1e-3 bf16, 2e-3 int8) of the fp32 one, and not
    equal to it (so the low-precision values are the ones used).

    Guards: capture_reference or GuidedOptimizer storing references as fp32 whatever reference_dtype says.
    """
    model = mlp(seed)
    numel = sum(p.numel() for p in model.parameters())
    assert numel == 49472
    loss_fn = lambda m, b: sign * mse(m, b)  # noqa: E731
    src = batches(100 + seed, 4)
    ref32 = capture_reference(model, src, loss_fn=loss_fn, reference_dtype="fp32")
    captured = storage if captured_as == "same" else "fp32"
    ref_lo = capture_reference(model, src, loss_fn=loss_fn, reference_dtype=captured)
    assert ref32.storage == "fp32" and ref32.nbytes() == 4 * numel
    assert ref_lo.storage == captured
    assert ref_lo.nbytes() == sum(STORED_BYTES[captured](p.numel()) for p in model.parameters())
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
    bound = DOCUMENTED_COS_BOUND[storage]
    assert 0 < abs(cos_lo - cos32) < bound, f"{storage}: cos {cos_lo:.6f} vs fp32 {cos32:.6f}"
