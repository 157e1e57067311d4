"""``torch.compile(opt.step)``: the guided step compiles, adds no graph break of its own,
does not recompile once warm-up is over, and agrees with the eager step.

Compiling on CPU costs tens of seconds a case, so CI runs a few cases that between them
cover every direction and magnitude rule, both reference kinds, fp32 and bf16 storage,
and three base optimizers. ``benchmarks/step_overhead.py`` times the compiled step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from sgg_optim import GuidedOptimizer, Reference

WARMUP = 2
BASES = {
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}
CASES = [  # base, direction, magnitude, reference, storage
    ("adamw_foreach", "cone", "adaptive", "ema", "fp32"),
    ("sgd", "project", "clip", "source", "bf16"),
    ("adam", "blend", "off", "sources", "fp32"),
]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _reference(model, kind, seed=1):
    if kind == "ema":
        return "ema"
    g = torch.Generator().manual_seed(seed)
    refs = [Reference({n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}).bind(model)
            for _ in range(1 if kind == "source" else 2)]
    return refs[0] if kind == "source" else refs


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), y) * (20.0 if step % 7 == 6 else 1.0)  # spikes
    loss.backward()


def _run(model, opt, steps, compiled):
    step = torch.compile(opt.step) if compiled else opt.step
    for s in range(steps):
        opt.zero_grad()
        _grads(model, s)
        if compiled and s == WARMUP + 1:
            counters.clear()  # warm-up (and its one recompile) is over: from here nothing may recompile
            torch._dynamo.config.error_on_recompile = True
        step()
    torch._dynamo.config.error_on_recompile = False


def _close(a, b, tol=1e-5):
    """Relative to the tensor's norm: compiled kernels reorder reductions, so single
    elements near zero differ by more than tol of themselves (as for plain AdamW)."""
    return float((a.detach() - b.detach()).norm()) <= tol * float(b.detach().norm())


def _plain_breaks():
    """Graph-break reasons of a compiled plain AdamW step (torch's own, around its step)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    counters.clear()
    _run(model, opt, 3, compiled=True)
    return set(counters["graph_break"])


@pytest.mark.parametrize("base, direction, magnitude, kind, storage", CASES)
def test_compiled_step_matches_eager_without_new_graph_breaks(base, direction, magnitude, kind, storage):
    torch._dynamo.reset()
    allowed = _plain_breaks()
    models = [_model(), _model()]
    opts = [GuidedOptimizer(BASES[base](m.parameters()), reference=_reference(m, kind), direction=direction,
                            magnitude=magnitude, max_angle=30, max_norm=0.5, warmup_steps=WARMUP,
                            reference_dtype=storage, nonfinite="propagate") for m in models]
    counters.clear()
    _run(models[0], opts[0], 22, compiled=True)
    breaks = set(counters["graph_break"])
    _run(models[1], opts[1], 22, compiled=False)
    assert breaks <= allowed, breaks - allowed
    assert all(_close(p, q) for p, q in zip(*(m.parameters() for m in models)))
    assert opts[0].stats["step"] == 22
    assert opts[0].stats["cos"] == pytest.approx(opts[1].stats["cos"], rel=1e-4, nan_ok=True)


def test_compiled_step_with_the_host_check_skips_non_finite_steps():
    """``nonfinite="skip"`` reads one scalar on the host: the compiled step may break there,
    and must still skip a NaN step exactly as the eager one does."""
    torch._dynamo.reset()
    model = _model()
    opt = GuidedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True), warmup_steps=WARMUP)
    twin = copy.deepcopy(model)
    eager = GuidedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=True), warmup_steps=WARMUP)
    step = torch.compile(opt.step)
    for s in range(8):
        for m, o, fn in ((model, opt, step), (twin, eager, eager.step)):
            o.zero_grad()
            _grads(m, s)
            if s == 5:
                next(m.parameters()).grad[0, 0] = float("nan")
            fn()
    assert opt.stats["skipped"] == eager.stats["skipped"] == 1
    assert all(_close(p, q) for p, q in zip(model.parameters(), twin.parameters()))
