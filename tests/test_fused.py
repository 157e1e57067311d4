"""GuidedAdamW(fused=True): torch's fused AdamW underneath, bit for bit in pass-through
mode, the guided foreach path's results when guiding, and a step that only scales the
gradients (magnitude clip, no rotation) passing its scale to the fused kernel as
``grad_scale`` instead of a separate ``g.mul_(a)`` pass."""

from __future__ import annotations

import pytest
import torch
from conftest import GradientWatch, backward, batch, tiny_mlp

from sgg_optim import GuidedAdamW, GuidedOptimizer, capture_reference

LR = 1e-2
MAX_NORM = 0.05  # below every gradient norm of these batches: the clip binds on every step


class FoldWatch:
    """Records, per step, whether the base optimizer stepped with a ``grad_scale``, and
    the gradients the step left behind (for a fused kernel: the ones it wrote back)."""

    def __init__(self, opt: GuidedOptimizer) -> None:
        self.folded: list[bool] = []
        self.grads: list[list[torch.Tensor]] = []
        self.stats: list[dict] = []
        opt.base_optimizer.register_step_pre_hook(
            lambda base, args, kwargs: self.folded.append(getattr(base, "grad_scale", None) is not None))
        opt.register_step_post_hook(self._post)

    def _post(self, opt, args, kwargs) -> None:
        self.grads.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])
        self.stats.append(dict(opt.stats))



@pytest.fixture(autouse=True)
def _fused_update_on(monkeypatch):
    """The fused update is opt-in (``sgg_optim.fused.enabled``); these tests switch it on."""
    from sgg_optim import fused

    monkeypatch.setattr(fused, "enabled", True)

def run(model, opt, steps: int = 20, same_batch: bool = False) -> None:
    """``steps`` steps, each on a new batch or (``same_batch``) all on batch 0: the
    gradient then turns slowly and an EMA reference follows it, inside the cone."""
    for s in range(steps):
        opt.zero_grad()
        backward(model, 0 if same_batch else s)
        opt.step()


def ema_values(opt) -> list[torch.Tensor]:
    refs = opt.state_dict()["guidance"]["refs"]
    return [refs[i]["ema"]["values"] for i in sorted(refs)]


def adam_state(opt, model) -> list[torch.Tensor]:
    return [opt.state[p][k] for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]


def assert_close_rel(actual: list[torch.Tensor], expected: list[torch.Tensor], rel: float = 1e-6) -> None:
    """Each tensor within ``rel`` of its largest entry."""
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rel, atol=rel * float(e.detach().abs().max()))


def test_fused_keyword_builds_torch_fused_adamw():
    opt = GuidedAdamW(tiny_mlp().parameters(), LR, fused=True)
    assert type(opt.base_optimizer) is torch.optim.AdamW
    assert [g["fused"] for g in opt.base_optimizer.param_groups] == [True]
    assert opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "propagate"])
def test_pass_through_is_fused_adamw_bit_for_bit(nonfinite):
    """direction="off", magnitude="off": parameters and AdamW state equal torch's fused
    AdamW's bit for bit over 20 steps, and no grad_scale is ever passed."""
    plain, guided = tiny_mlp(), tiny_mlp()
    base = torch.optim.AdamW(plain.parameters(), LR, fused=True)
    opt = GuidedAdamW(guided.parameters(), LR, fused=True, direction="off", magnitude="off", nonfinite=nonfinite)
    watch = FoldWatch(opt)
    for s in range(20):
        for m, o in ((plain, base), (guided, opt)):
            o.zero_grad()
            backward(m, s)
            o.step()
        assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), guided.parameters())), s
    assert all(torch.equal(a, b) for a, b in zip(adam_state(base, plain), adam_state(opt, guided)))
    assert watch.folded == [False] * 20


def _source(model, batches=range(4)):
    """A captured reference: the mean gradient over ``batches`` (conftest's batch stream)."""
    def loss_fn(m, s):
        x, y = batch(s)
        return torch.nn.functional.cross_entropy(m(x), y)

    return capture_reference(model, batches, loss_fn=loss_fn)


GUIDED = {
    "cone, EMA reference, adaptive": dict(warmup_steps=3, max_angle=30),
    "cone, captured reference, clip": dict(reference="source", max_angle=20, magnitude="clip", max_norm=MAX_NORM),
    "project, tensor scope, clip": dict(direction="project", scope="tensor", magnitude="clip", max_norm=MAX_NORM),
    "blend, group scope, propagate": dict(direction="blend", scope="group", nonfinite="propagate", warmup_steps=2),
}


@pytest.mark.parametrize("case", list(GUIDED))
def test_guided_fused_matches_guided_foreach(case):
    """The fused GuidedAdamW gives the foreach one's parameters, AdamW moments and
    gradients within 1e-6 relative over 20 steps, with guidance acting."""
    runs = []
    for flag in ("fused", "foreach"):
        model = tiny_mlp()
        kw = dict(GUIDED[case])
        if kw.get("reference") == "source":
            kw["reference"] = _source(model)
        opt = GuidedAdamW(model.parameters(), LR, **{flag: True}, **kw)
        watch = FoldWatch(opt)
        run(model, opt)
        runs.append((model, opt, watch))
    (fm, fo, fw), (um, uo, uw) = runs
    assert fo.base_optimizer.param_groups[0]["fused"] and not uo.base_optimizer.param_groups[0]["fused"]
    assert_close_rel(list(fm.parameters()), list(um.parameters()))
    assert_close_rel(adam_state(fo, fm), adam_state(uo, um))
    for step, (f, u) in enumerate(zip(fw.grads, uw.grads)):
        assert_close_rel(f, u), step
    acted = [s["projected"] > 0 or s["scale"] < 1 for s in uw.stats]
    assert sum(acted) >= 5, acted  # guidance really acted


@pytest.mark.parametrize("direction", ["off", "cone"])
@pytest.mark.parametrize("reference", ["ema", "source"])
def test_clip_scale_rides_in_the_fused_kernel(direction, reference):
    """magnitude="clip" at a max_norm that binds: on each step that only scales (no
    rotation), the fused path hands the scale to the kernel as grad_scale and skips its
    own g.mul_(a); it matches the unfused guided path (foreach) within 1e-6 over 20
    steps: parameters, AdamW moments, the guided gradients (the kernel writes them back)
    and the EMA reference, updated toward the scaled gradient.

    Guards: the EMA updated toward the unscaled gradient; the kernel not writing back;
    the scale applied twice or not at all.
    """
    runs = []
    for flag in ("fused", "foreach"):
        model = tiny_mlp()
        ref = _source(model, [0]) if reference == "source" else "ema"  # batch 0's own gradient, at the start
        opt = GuidedAdamW(model.parameters(), LR, **{flag: True}, reference=ref, direction=direction,
                          magnitude="clip", max_norm=MAX_NORM, warmup_steps=2, max_angle=45)
        watch = FoldWatch(opt)
        gw = GradientWatch(opt)
        run(model, opt, same_batch=True)
        gw.assert_rewrote_where_reported(min_steps=20)  # the clip binds on every step
        runs.append((model, opt, watch))
    (fm, fo, fw), (um, uo, uw) = runs
    only_scaled = [s["projected"] == 0 and s["scale"] < 1 for s in fw.stats]
    assert fw.folded == only_scaled and sum(only_scaled) >= 10, fw.folded
    assert uw.folded == [False] * 20
    assert_close_rel(list(fm.parameters()), list(um.parameters()))
    assert_close_rel(adam_state(fo, fm), adam_state(uo, um))
    for step, (f, u) in enumerate(zip(fw.grads, uw.grads)):
        assert_close_rel(f, u), step
    if reference == "ema" and direction != "off":  # direction "off" keeps no EMA reference
        assert_close_rel(ema_values(fo), ema_values(uo))
    assert not hasattr(fo.base_optimizer, "grad_scale")  # set for the kernel only


def test_wrapping_a_fused_adamw_folds_too():
    """GuidedOptimizer(torch.optim.AdamW(..., fused=True)) takes the same path as
    GuidedAdamW(..., fused=True): bit for bit."""
    a, b = tiny_mlp(), tiny_mlp()
    kw = dict(direction="off", magnitude="clip", max_norm=MAX_NORM)
    opts = [GuidedAdamW(a.parameters(), LR, fused=True, **kw),
            GuidedOptimizer(torch.optim.AdamW(b.parameters(), LR, fused=True), **kw)]
    watches = [FoldWatch(o) for o in opts]
    run(a, opts[0])
    run(b, opts[1])
    assert watches[0].folded == watches[1].folded == [True] * 20
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _bf16(model):
    return model.to(torch.bfloat16)


def _frozen_with_grad(model):
    """A parameter the base optimizer steps (it has a gradient) but guidance skips
    (requires_grad=False): one grad_scale for all would scale it too."""
    last = model[2].bias
    last.requires_grad_(False)
    orig = backward

    def hooked(m, step):
        out = orig(m, step)
        m[2].bias.grad = torch.full_like(m[2].bias, 0.1)
        return out

    return model, hooked


@pytest.mark.parametrize("case", ["bf16", "a frozen parameter with a gradient", "tensor scope", "grad_scale set"])
def test_no_fold_where_one_scale_would_not_be_exact(case):
    """The scale is not folded where the fused kernel would apply it wrongly or not at
    all: bf16 (the kernel rounds grad_scale to bf16), a stepped parameter outside
    guidance, per-tensor scales, a grad_scale someone else set."""
    model, step_fn = tiny_mlp(), backward
    kw = dict(direction="off", magnitude="clip", max_norm=MAX_NORM)
    if case == "bf16":
        model = _bf16(model)
    elif case == "a frozen parameter with a gradient":
        model, step_fn = _frozen_with_grad(model)
    elif case == "tensor scope":
        kw["scope"] = "tensor"
    opt = GuidedAdamW(model.parameters(), LR, fused=True, **kw)
    watch = FoldWatch(opt)
    if case == "grad_scale set":
        opt.base_optimizer.grad_scale = torch.ones(())
    for s in range(5):
        opt.zero_grad()
        if case == "bf16":
            x, y = torch.randn(16, 6).bfloat16(), torch.arange(16) % 3
            torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            step_fn(model, s)
        opt.step()
        assert opt.stats["scale"] < 1
        if case == "a frozen parameter with a gradient":
            assert torch.equal(model[2].bias.grad, torch.full_like(model[2].bias, 0.1))
    if case == "grad_scale set":
        assert watch.folded == [True] * 5 and torch.equal(opt.base_optimizer.grad_scale, torch.ones(()))
    else:
        assert watch.folded == [False] * 5


# ------------------------------------------------------------------------------------
# the fused guided AdamW update (sgg_optim.fused): apply pass and EMA update folded into
# the AdamW sweep, compiled with torch.compile. Compiling costs tens of seconds a case on
# CPU, so a few cases cover the direction and magnitude rules and both reference kinds.
# ------------------------------------------------------------------------------------
FUSED_CASES = {
    "cone, EMA reference, adaptive, propagate": dict(warmup_steps=3, max_angle=30, nonfinite="propagate"),
    "project, frozen reference, clip, tensor scope": dict(reference="source", direction="project",
                                                          scope="tensor", magnitude="clip", max_norm=MAX_NORM),
    "blend, EMA reference, clip": dict(direction="blend", strength=0.3, warmup_steps=2, magnitude="clip",
                                       max_norm=MAX_NORM),
    "cone, frozen reference, adaptive, propagate": dict(reference="source", max_angle=20, warmup_steps=3,
                                                        nonfinite="propagate"),
}


class FusedSpy:
    """Counts the steps that took the fused guided update (no hook on the base optimizer:
    step hooks there send the step down the eager path)."""

    def __init__(self, monkeypatch) -> None:
        from sgg_optim import fused
        self.calls = 0
        real = fused.fused_step_

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fused, "fused_step_", spy)


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_guided_update_matches_eager_guided_path(case, monkeypatch):
    """GuidedAdamW(fused=True) takes the compiled fused update from its second step (the
    first creates torch's AdamW state; with host coefficients and a frozen reference,
    only on steps that rotate some block) and matches the eager guided path (foreach) within
    1e-6 relative over 20 steps: parameters, both moments, the guided gradients left in
    .grad and the EMA reference; guidance really acted."""
    spy = FusedSpy(monkeypatch)
    runs = []
    for flag in ("fused", "foreach"):
        model = tiny_mlp()
        kw = dict(FUSED_CASES[case])
        if kw.get("reference") == "source":
            kw["reference"] = _source(model)
        opt = GuidedAdamW(model.parameters(), LR, **{flag: True}, **kw)
        stats, grads = [], []
        for s in range(20):
            opt.zero_grad()
            backward(model, s)
            opt.step()
            stats.append(dict(opt.stats))
            grads.append([p.grad.clone() for p in model.parameters()])
        runs.append((model, opt, stats, grads))
        if flag == "fused":
            if "EMA" in case or "propagate" in case:
                assert spy.calls == 19, spy.calls
            else:  # host coefficients, frozen reference: a step with every b = 0 keeps the cheaper paths
                assert spy.calls == sum(st["projected"] > 0 for st in stats[1:]) >= 5, spy.calls
    (fm, fo, _, fg), (um, uo, us, ug) = runs
    assert_close_rel(list(fm.parameters()), list(um.parameters()))
    assert_close_rel(adam_state(fo, fm), adam_state(uo, um))
    assert [fo.state[p]["step"].item() for p in fm.parameters()] == [20.0] * 4
    for f, u in zip(fg, ug):
        assert_close_rel(f, u)
    if "EMA" in case:
        assert_close_rel(ema_values(fo), ema_values(uo))
    acted = [s["projected"] > 0 or s["scale"] < 1 for s in us]
    assert sum(acted) >= 5, acted


def test_fused_guided_function_eager_equals_compiled():
    """The function itself: uncompiled (the reference) and compiled agree within 1e-6,
    two param groups (their own lr and weight decay), two blocks, two references one of
    which is missing for one tensor."""
    from sgg_optim.fused import adamw_scalars, compiled_guided_adamw, guided_adamw_
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (4, 4)]

    def state():
        t = [torch.randn(s, generator=gen) for s in shapes for _ in range(6)]
        return [t[i::6] for i in range(6)]  # params, grads, m, v(abs), r1, r2

    a, b = state(), None
    a[3] = [v.abs() for v in a[3]]
    b = [[x.clone() for x in lst] for lst in a]
    coef = torch.tensor([[0.8, 0.1, -0.2], [1.1, 0.0, 0.3]])
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.01], [3e-3, 0.8, 0.99, 1e-6, 0.0]], dtype=torch.float64)
    gids, bids = torch.tensor([0, 1, 1]), [0, 1, 0]
    for fn, (p, g, m, v, r1, r2) in ((guided_adamw_, a), (compiled_guided_adamw(False), b)):
        steps = [torch.tensor(3.0) for _ in shapes]
        refs = [[r1[0], r2[0]], [r1[1], None], [r1[2], r2[2]]]
        for _ in range(3):
            fn(p, g, m, v, refs, coef, bids, adamw_scalars(steps, hyper, gids))
        assert [s.item() for s in steps] == [6.0] * 3
    for x, y in zip(a, b):
        assert_close_rel(y, x)


@pytest.mark.parametrize("case", ["bf16 reference", "amsgrad", "base step hook", "foreach base", "switched off"])
def test_fused_guided_update_falls_back_where_it_does_not_apply(case, monkeypatch):
    """bf16 (or int8) reference stores, amsgrad, a base optimizer with step hooks, an
    unfused AdamW and ``sgg_optim.fused.enabled = False`` keep the eager path (no
    compilation)."""
    spy = FusedSpy(monkeypatch)
    model = tiny_mlp()
    kw = dict(direction="cone", warmup_steps=2, max_angle=30)
    flag = dict(foreach=True) if case == "foreach base" else dict(fused=True)
    if case == "bf16 reference":
        kw["reference_dtype"] = "bf16"
    if case == "amsgrad":
        kw["amsgrad"] = True
    opt = GuidedAdamW(model.parameters(), LR, **flag, **kw)
    if case == "base step hook":
        opt.base_optimizer.register_step_pre_hook(lambda *args: None)
    if case == "switched off":
        from sgg_optim import fused
        monkeypatch.setattr(fused, "enabled", False)
    run(model, opt, steps=5)
    assert spy.calls == 0
    assert opt.stats["step"] == 5
