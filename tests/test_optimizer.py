"""The optimizer wrapper's contract: pass-through, forwarding, resume, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import backward, tiny_mlp, train

from sgg_optim import GuidedAdamW, GuidedOptimizer, Reference, capture_reference

BASES = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


def params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def same_snapshot(a, b):
    params_a, sd_a = a
    params_b, sd_b = b
    flat = lambda sd: torch.cat([t.flatten().double() for t in _tensors(sd)])  # noqa: E731
    return all(torch.equal(x, y) for x, y in zip(params_a, params_b)) and torch.equal(flat(sd_a), flat(sd_b))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("name", list(BASES))
def test_pass_through_is_bit_identical(name, twin_models):
    plain, guided = twin_models
    base = BASES[name](plain.parameters())
    opt = GuidedOptimizer(BASES[name](guided.parameters()), direction="off", magnitude="off")
    for step in range(50):
        for m, o in ((plain, base), (guided, opt)):
            o.zero_grad()
            backward(m, step)
            o.step()
    assert params_equal(plain, guided)
    for p_plain, p_guided in zip(plain.parameters(), guided.parameters()):
        for key, value in base.state[p_plain].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt.state[p_guided][key])), key


def test_guidance_changes_the_trajectory(twin_models):
    plain, guided = twin_models
    train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), 20)
    opt = GuidedOptimizer(torch.optim.SGD(guided.parameters(), lr=0.1), max_angle=10, warmup_steps=2)
    train(guided, opt, 20)
    assert not params_equal(plain, guided)
    assert opt.stats["projected"] > 0


def test_is_an_optimizer_forwarding_structures():
    model = tiny_mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = GuidedOptimizer(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    assert not getattr(opt, "_step_supports_amp_scaling", False)


def _lr_after_roundtrip(make_scheduler):
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1.0)
    opt.load_state_dict(opt.state_dict())  # what accelerate.prepare() does
    sched = make_scheduler(opt)
    lrs = []
    for step in range(4):
        opt.zero_grad()
        backward(model, step)
        opt.step()
        sched.step()
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
    return lrs


def test_lambda_lr_drives_the_base_after_state_roundtrip():
    lrs = _lr_after_roundtrip(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s))
    assert lrs == [0.5, 0.25, 0.125, 0.0625]


def test_transformers_linear_warmup_drives_the_base_after_state_roundtrip():
    from transformers import get_linear_schedule_with_warmup

    lrs = _lr_after_roundtrip(lambda o: get_linear_schedule_with_warmup(o, 2, 6))
    assert lrs == pytest.approx([0.5, 1.0, 0.75, 0.5])  # warmup 2, then linear decay to 6


def _guided(model, **kw):
    return GuidedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), warmup_steps=3, max_angle=30, **kw)


# Loss-scale spikes (x20) on resumed steps: the first one comes before a re-started
# warm-up would end, the others once a fresh norm EMA would be far below the real one.
SPIKES = {30: 20.0, 33: 20.0, 41: 20.0, 52: 20.0}


def train_with_spikes(model, opt, steps, start=0):
    """``train`` with the SPIKES steps' losses scaled up; returns {step: stats["scale"]}."""
    scales = {}
    for s in range(start, start + steps):
        opt.zero_grad()
        backward(model, s, scale=SPIKES.get(s, 1.0))
        opt.step()
        scales[s] = opt.stats["scale"]
    return scales


@pytest.mark.parametrize("reference_dtype", ["fp32", "int8"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_resume_through_weights_only_load_is_bit_identical(reference_dtype, scope):
    """Resume after 30 steps; the adaptive clip acts on the resumed steps (gradient spikes),
    so the resumed run only matches if the norm EMA and its count came back too.

    Guards: load_state_dict not restoring norm_ema / norm_count (warm-up starts over).
    """
    straight = tiny_mlp()
    opt = _guided(straight, reference_dtype=reference_dtype, scope=scope)
    straight_scales = train_with_spikes(straight, opt, 60)

    first = tiny_mlp()
    opt1 = _guided(first, reference_dtype=reference_dtype, scope=scope)
    train_with_spikes(first, opt1, 30)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert int(ckpt["opt"]["guidance"]["norm_count"].min()) == 30
    resumed = tiny_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _guided(resumed, reference_dtype=reference_dtype, scope=scope)
    opt2.load_state_dict(ckpt["opt"])
    resumed_scales = train_with_spikes(resumed, opt2, 30, start=30)
    # The clip really acted on every resumed spike, and only there, in both runs.
    for scales in (straight_scales, resumed_scales):
        clipped = sorted(s for s, v in scales.items() if s >= 30 and v < 1.0)
        assert clipped == sorted(SPIKES), clipped
    assert opt.stats["projected"] is not None and opt.stats["step"] == 60 == opt2.stats["step"]
    assert params_equal(straight, resumed)
    for key in ("norm_ema", "norm_count"):
        assert torch.equal(opt.state_dict()["guidance"][key], opt2.state_dict()["guidance"][key]), key


def test_resume_with_captured_sources_is_bit_identical():
    def run(model, steps, start=0, opt=None):
        ref = capture_reference(model, range(2), loss_fn=lambda m, s: backward(m, 500 + s).requires_grad_() * 0
                                + torch.nn.functional.mse_loss(m(torch.ones(4, 6)), torch.zeros(4, 3)))
        opt = opt or _guided(model, reference=[ref, Reference({n: -t for n, t in
                                                               ((n, ref[n]) for n in ref.names)}).bind(model)])
        train(model, opt, steps, start)
        return opt

    straight = tiny_mlp()
    run(straight, 40)
    first = tiny_mlp()
    opt1 = run(first, 20)
    sd = torch.load(_saved(opt1.state_dict()), weights_only=True)
    second = copy.deepcopy(first)
    opt2 = _guided(second, reference="ema")
    opt2.set_reference([Reference({n: torch.zeros_like(p) for n, p in second.named_parameters()}).bind(second)] * 2)
    opt2.load_state_dict(sd)
    train(second, opt2, 20, start=20)
    assert params_equal(straight, second)


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_nan_gradient_skips_the_step_and_changes_nothing():
    model = tiny_mlp()
    opt = _guided(model)
    train(model, opt, 5)
    before = snapshot(opt, model)
    calls = []
    opt.base_optimizer.register_step_pre_hook(lambda *a: calls.append(1))
    opt.zero_grad()
    backward(model, 99)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert calls == [] and opt.stats["skipped"] == 1
    assert same_snapshot(before, snapshot(opt, model))
    # and the next finite step proceeds
    train(model, opt, 1, start=100)
    assert calls == [1]


def test_inf_gradient_raises_naming_the_parameter_when_asked():
    model = tiny_mlp()
    opt = GuidedOptimizer(torch.optim.AdamW(model.named_parameters(), lr=1e-2), nonfinite="raise")
    train(model, opt, 2)
    before = snapshot(opt, model)
    opt.zero_grad()
    backward(model, 7)
    model[2].bias.grad[1] = float("inf")
    with pytest.raises(FloatingPointError, match="'2.bias'"):
        opt.step()
    assert same_snapshot(before, snapshot(opt, model))


def test_sparse_gradient_is_rejected_without_side_effects():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GuidedOptimizer(torch.optim.SGD(emb.named_parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="'weight'.*sparse"):
        opt.step()
    assert torch.equal(before, emb.weight)


def test_complex_parameter_is_rejected():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        GuidedOptimizer(torch.optim.SGD([p], lr=0.1))


@pytest.mark.parametrize("kw, match", [
    ({"max_angle": 0}, "max_angle"), ({"max_angle": 91}, "max_angle"), ({"max_norm": -1.0}, "max_norm"),
    ({"direction": "sideways"}, "direction"), ({"scope": "layer"}, "scope"), ({"strength": 2}, "strength"),
    ({"nonfinite": "ignore"}, "nonfinite"), ({"warmup_steps": -1}, "warmup_steps"),
    # at or below 1 the clipped norms feed the mean and the bound shrinks every step
    ({"spike_factor": 0.5}, r"spike_factor must be > 1"), ({"spike_factor": 1.0}, r"spike_factor must be > 1"),
])
def test_bad_hyperparameters_name_the_parameter(kw, match):
    with pytest.raises(ValueError, match=match):
        GuidedOptimizer(torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), **kw)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="max_angel"):
        GuidedOptimizer(torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), max_angel=30)


def test_frozen_and_gradless_parameters_are_skipped():
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    extra = torch.nn.Parameter(torch.ones(5))  # never receives a gradient
    opt = GuidedOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=0.1), warmup_steps=0)
    train(model, opt, 3)
    assert torch.equal(extra, torch.ones(5)) and extra.grad is None
    assert opt.stats["step"] == 3 and opt.stats["skipped"] == 0


def test_state_dict_from_another_config_or_layout_is_rejected():
    model = tiny_mlp()
    opt = _guided(model, scope="tensor")
    train(model, opt, 4)
    sd = opt.state_dict()
    other = _guided(model, scope="global")
    train(model, other, 2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="scope"):
        other.load_state_dict(sd)
    bigger = torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    with pytest.raises(ValueError, match="parameter #0 has shape"):
        _guided(bigger, scope="tensor").load_state_dict(sd)
    assert same_snapshot(([], before), ([], other.state_dict()))


def test_plain_checkpoint_loads_with_a_warning():
    model = tiny_mlp()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, plain, 2)
    opt = _guided(model)
    with pytest.warns(UserWarning, match="guidance"):
        opt.load_state_dict(plain.state_dict())
    assert opt.state_dict()["state"][0]["step"] == 2


def test_set_reference_rejects_a_missing_or_misshaped_tensor_and_keeps_the_old_one():
    model = tiny_mlp()
    good = Reference({n: torch.ones_like(p) for n, p in model.named_parameters()}).bind(model)
    opt = GuidedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference=good)
    missing = Reference({n: torch.ones_like(p) for n, p in model.named_parameters() if n != "2.bias"}).bind(model)
    with pytest.raises(ValueError, match="no tensor for parameter '2.bias'"):
        opt.set_reference(missing)
    shapes = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    shapes["0.weight"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        opt.set_reference(Reference(shapes).bind(model))
    assert opt.reference_mode == "sources" and opt._guidance.sources[3][0] is good.stores["2.bias"]  # #3: 2.bias


def test_state_dict_with_another_reference_kind_is_rejected():
    model = tiny_mlp()
    ema = _guided(model)
    train(model, ema, 2)
    ref = Reference({n: torch.ones_like(p) for n, p in model.named_parameters()}).bind(model)
    two_sources = _guided(model, reference=[ref, ref])
    for target, saved, match in ((_guided(model, reference=ref), ema.state_dict(), "reference='ema'"),
                                 (_guided(model, reference=ref), two_sources.state_dict(), "2 source")):
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(saved)
        assert same_snapshot(([], before), ([], target.state_dict()))


def test_deepspeed_launch_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(NotImplementedError, match="ACCELERATE_USE_DEEPSPEED"):
        GuidedOptimizer(torch.optim.SGD(tiny_mlp().parameters(), lr=0.1))
