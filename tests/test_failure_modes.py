"""Failure modes found from outside (issue 11): each input a real user produces.

Every test here failed on the main of 2026-12-01 (crash, silent corruption or a bare
exception without a name) and states the behaviour the library now keeps; the table
in docs/design.md ("Failure modes") lists them.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch
from conftest import backward, tiny_mlp, train
from safetensors.torch import save_file

from sgg_optim import GuidedAdamW, GuidedOptimizer, Reference, capture_reference


def _ref(model, value=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Reference({n: torch.randn(p.shape, generator=g) * value for n, p in model.named_parameters()}).bind(model)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- 1. several sources after a step ---------------------------------------------------
def test_switching_to_several_sources_after_a_step():
    model = tiny_mlp()
    opt = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), warmup_steps=0)
    train(model, opt, 2)
    opt.set_reference([_ref(model, seed=1), _ref(model, seed=2)])
    train(model, opt, 2, start=2)
    assert len(opt.stats["weights"]) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and back to one source, then to the EMA
    opt.set_reference(_ref(model, seed=3))
    train(model, opt, 1, start=4)
    opt.set_reference("ema")
    train(model, opt, 1, start=5)
    assert opt.stats["step"] == 6


# -- 2. channels_last / non-contiguous parameters --------------------------------------
def _conv():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)


def _conv_backward(m):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
    m(x).square().sum().backward()


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_channels_last_parameters_are_guided_like_contiguous_ones(storage):
    a = _conv()
    b = torch.nn.Conv2d(3, 4, 3)
    b.load_state_dict(a.state_dict())
    assert not a.weight.is_contiguous() and b.weight.is_contiguous()
    opts = [GuidedAdamW(m.parameters(), lr=1e-2, warmup_steps=0, max_angle=5, reference_dtype=storage)
            for m in (a, b)]
    for step in range(4):
        for m, o in zip((a, b), opts):
            o.zero_grad()
            _conv_backward(m)
            o.step()
    assert opts[0].stats["projected"] > 0
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_captured_reference_on_channels_last_parameters():
    m = _conv()
    ref = capture_reference(m, [0, 1], loss_fn=lambda model, _: model(
        torch.ones(1, 3, 5, 5).to(memory_format=torch.channels_last)).sum())
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=ref, direction="off")
    _conv_backward(m)
    opt.step()
    opt2 = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=ref, max_angle=5)
    _conv_backward(m)
    opt2.step()
    assert math.isfinite(opt2.stats["cos"])


# -- 3. zero-size parameters with low-precision storage or gradients -------------------
@pytest.mark.parametrize("storage", ["bf16", "int8", "fp32"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_zero_size_parameter(storage, grad_dtype):
    w = torch.nn.Parameter(torch.ones(3, dtype=grad_dtype))
    empty = torch.nn.Parameter(torch.ones(0, 4, dtype=grad_dtype))
    opt = GuidedOptimizer(torch.optim.SGD([w, empty], lr=0.1), warmup_steps=0, reference_dtype=storage)
    for _ in range(3):
        opt.zero_grad()
        ((w * torch.arange(3.0, dtype=grad_dtype)).sum() + empty.sum()).backward()
        opt.step()
    assert opt.stats["skipped"] == 0 and torch.isfinite(w).all()


# -- 4. huge but finite gradients --------------------------------------------------------
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_huge_finite_gradients_are_not_reported_as_non_finite(policy):
    w = torch.nn.Parameter(torch.zeros(4))
    opt = GuidedOptimizer(torch.optim.SGD([w], lr=1e-20), nonfinite=policy, warmup_steps=0)
    w.grad = torch.full((4,), 1e20)  # |g|^2 = 4e40 overflows fp32
    opt.step()
    assert opt.stats["skipped"] == 0
    assert opt.stats["grad_norm"] == pytest.approx(2e20, rel=1e-6)
    torch.testing.assert_close(w.detach(), torch.full((4,), -1.0))


def test_raise_names_the_parameter_with_the_non_finite_gradient():
    model = tiny_mlp()
    opt = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), nonfinite="raise")
    backward(model, 0)
    model[2].bias.grad[1] = float("inf")
    with pytest.raises(FloatingPointError, match="'2.bias'"):
        opt.step()


# -- 5. load_state_dict checks every field before anything changes ----------------------
def _trained():
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2, warmup_steps=2)
    train(model, opt, 4)
    return model, opt


def _corrupt(field, value):
    def edit(g):
        g[field] = value
    return edit


@pytest.mark.parametrize("edit, name", [
    (_corrupt("norm_ema", torch.zeros(5)), "norm_ema"),
    (_corrupt("norm_count", None), "norm_count"),
    (_corrupt("norm_count", torch.zeros(1, dtype=torch.int64)), "norm_count"),
    (_corrupt("align_ema", torch.zeros(1, 3)), "align_ema"),
    (_corrupt("align_count", torch.zeros(3)), "align_count"),
    (_corrupt("ema_since", -1), "ema_since"),
    (_corrupt("ema_since", 10 ** 6), "ema_since"),  # after more steps than were accepted
    (_corrupt("accepted", -1), "accepted"),
    (_corrupt("skipped", "3"), "skipped"),
    (lambda g: g.pop("norm_ema"), "norm_ema"),
    (lambda g: g.pop("refs"), "refs"),
    (lambda g: g.pop("layout"), "layout"),
    (lambda g: g.pop("config"), "config"),
    (lambda g: g["refs"].update({99: g["refs"][0]}), "refs"),
    (lambda g: g["refs"][0].update({"source7": g["refs"][0]["ema"]}), "refs"),
    (lambda g: g["refs"][0]["ema"].update({"values": torch.zeros(2)}), "refs"),
    (lambda g: g["refs"][0]["ema"].update({"values": torch.zeros(12, 6, dtype=torch.float64)}), "refs"),
])
def test_bad_guidance_entry_raises_naming_the_field_and_changes_nothing(edit, name):
    _, source = _trained()
    sd = source.state_dict()
    edit(sd["guidance"])
    model, opt = _trained()
    train(model, opt, 1, start=10)
    before = (_params(model), io.BytesIO())
    torch.save(opt.state_dict(), before[1])
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(sd)
    after = io.BytesIO()
    torch.save(opt.state_dict(), after)
    assert before[1].getvalue() == after.getvalue()
    train(model, opt, 1, start=11)  # still steps
    assert opt.stats["skipped"] == 0


# -- 6. a rejected add_param_group leaves nothing behind ---------------------------------
def test_rejected_param_group_is_not_forwarded():
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1
    train(model, opt, 2)
    assert opt.stats["step"] == 2


# -- 7. Reference.load with bad metadata -------------------------------------------------
def _meta(model):
    return {"format": "sgg-optim-reference", "library_version": "0.1.0", "storage": "fp32", "dtype": "float32",
            "blocksize": "4096", "names": json.dumps([n for n, _ in model.named_parameters()]),
            "shapes": json.dumps({n: list(p.shape) for n, p in model.named_parameters()})}


@pytest.mark.parametrize("key, value", [
    ("storage", "fp8"),
    ("names", json.dumps("0.weight")),
    ("names", json.dumps([1, 2])),
    ("shapes", json.dumps({"0.weight": [12, 6]})),
    ("shapes", json.dumps([1, 2])),
    ("shapes", "not json"),
])
def test_reference_file_with_bad_metadata(tmp_path, key, value):
    model = tiny_mlp()
    path = tmp_path / "ref.safetensors"
    tensors = {f"{n}/values": torch.zeros(p.shape) for n, p in model.named_parameters()}
    save_file(tensors, str(path), metadata={**_meta(model), key: value})
    with pytest.raises(ValueError, match="ref.safetensors"):
        Reference.load(path, model)


def test_reference_file_with_missing_tensor(tmp_path):
    model = tiny_mlp()
    path = tmp_path / "ref.safetensors"
    tensors = {f"{n}/values": torch.zeros(p.shape) for n, p in list(model.named_parameters())[1:]}
    save_file(tensors, str(path), metadata=_meta(model))
    with pytest.raises(ValueError, match="ref.safetensors.*0.weight"):
        Reference.load(path, model)


# -- also tried -------------------------------------------------------------------------
def test_tiny_align_temperature_never_writes_nan():
    model = tiny_mlp()
    opt = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), align_temperature=1e-310,
                          reference=[_ref(model, seed=1), _ref(model, seed=2)])
    train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(opt.stats["weights"]) <= 1.0 + 1e-9


def test_closure_optimizers_are_refused_at_construction():
    model = tiny_mlp()
    with pytest.raises(TypeError, match="LBFGS.*closure"):
        GuidedOptimizer(torch.optim.LBFGS(model.parameters()))


def test_meta_parameters_get_a_clear_error_at_step():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = GuidedOptimizer(torch.optim.SGD([p], lr=0.1), warmup_steps=0)
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        opt.step()


def test_capture_reads_exactly_num_batches_from_an_iterator():
    model = tiny_mlp()
    it = iter(range(10))
    capture_reference(model, it, num_batches=3, loss_fn=lambda m, i: backward_loss(m, i))
    assert next(it) == 3


def backward_loss(model, i):
    x = torch.full((2, 6), float(i))
    return model(x).sum()


def test_capture_on_a_compiled_model_stores_plain_names():
    model = tiny_mlp()
    compiled = torch.compile(model, backend="eager")
    ref = capture_reference(compiled, [0], loss_fn=lambda m, i: backward_loss(m, i))
    assert ref.names == [n for n, _ in model.named_parameters()]
    opt = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), reference=ref)
    assert opt.reference_mode == "sources"


def test_misspelled_guidance_keyword_of_guided_adamw_lists_the_valid_ones():
    with pytest.raises(TypeError, match="max_angel.*max_angle"):
        GuidedAdamW(tiny_mlp().parameters(), max_angel=45)


def test_misspelled_environment_variable_warns_with_the_closest_name(monkeypatch):
    from sgg_optim.accelerate import GuidancePlugin

    monkeypatch.setenv("SGG_MAXANGLE", "30")
    with pytest.warns(UserWarning, match="SGG_MAXANGLE.*SGG_MAX_ANGLE"):
        plugin = GuidancePlugin()
    assert plugin.max_angle == 60.0
    monkeypatch.delenv("SGG_MAXANGLE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuidancePlugin()


# -- a wrapper swaps the parameter objects (Accelerate's FSDP2 prepare) ------------------
def test_references_and_state_follow_a_parameter_swap():
    """Accelerate replaces each entry of param_groups[*]["params"] in place; the guidance
    state is keyed by position, so references, EMA and statistics carry over."""
    model, twin = tiny_mlp(), tiny_mlp()
    refs = [_ref(model, seed=1), _ref(model, seed=2)]
    opts = [GuidedOptimizer(torch.optim.SGD(m.named_parameters(), lr=0.1), reference=list(refs), max_angle=20)
            for m in (model, twin)]
    train(model, opts[0], 2)
    train(twin, opts[1], 2)
    swapped = {}
    for group in opts[1].param_groups:  # new Parameter objects, same values, as after prepare()
        group["params"] = [swapped.setdefault(id(p), torch.nn.Parameter(p.detach().clone())) for p in group["params"]]
    for s in range(2, 5):
        opts[0].zero_grad()
        backward(model, s)
        new = [p for g in opts[1].param_groups for p in g["params"]]
        for p, q in zip(new, model.parameters()):
            p.grad = q.grad.clone()  # before the step: guidance rewrites q.grad in place
        opts[0].step()
        opts[1].step()
        assert opts[1].stats["weights"] == opts[0].stats["weights"]
    for p, q in zip([p for g in opts[1].param_groups for p in g["params"]], model.parameters()):
        assert torch.equal(p, q)


def test_a_swap_to_another_shape_is_named():
    model = tiny_mlp()
    opt = GuidedOptimizer(torch.optim.SGD(model.named_parameters(), lr=0.1), reference=_ref(model))
    opt.param_groups[0]["params"][0] = torch.nn.Parameter(torch.ones(3, 3))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match="replaced by one of another shape"):
        opt.step()


# -- inputs found by an outside probe (2026-12-02) --------------------------------------------

@pytest.mark.parametrize("guidance", [{"direction": "off", "magnitude": "off"}, {},
                                      {"magnitude": "clip", "max_norm": 0.1}])
def test_float64_parameters_step_like_the_base_optimizer(guidance):
    # torch refuses a narrowing dtype for a norm: the fp32 accumulation of |g| crashed every
    # float64 step (pass-through included)
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2).double()
    twin = torch.nn.Linear(3, 2).double()
    twin.load_state_dict(m.state_dict())
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), **guidance)
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(8):  # within the defaults' warm-up (10): they pass the gradient through
        x = torch.randn(4, 3, dtype=torch.float64)
        for model, o in ((m, opt), (twin, base)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert m.weight.dtype == torch.float64
    assert opt.stats["grad_norm"] > 0
    same = torch.equal(m.weight, twin.weight)
    assert same if guidance.get("magnitude") != "clip" else not same  # the clip binds at 0.1


def test_mixed_float64_and_float32_groups_with_an_ema_reference():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).double()
    opt = GuidedAdamW([{"params": a.parameters()}, {"params": b.parameters()}], lr=1e-2, warmup_steps=2)
    for _ in range(6):
        opt.zero_grad()
        x = torch.randn(4, 3)
        (a(x).sum() + b(x.double()).sum()).backward()
        grads = torch.cat([p.grad.double().flatten() for p in (*a.parameters(), *b.parameters())])
        opt.step()
        assert opt.stats["grad_norm"] == pytest.approx(grads.norm().item(), rel=1e-6)
    assert math.isfinite(opt.stats["cos"]) and opt.stats["step"] == 6
    assert all(torch.isfinite(p).all() for p in (*a.parameters(), *b.parameters()))


def test_state_dict_hooks_registered_on_the_wrapper_run_as_torchs_do():
    calls = {}
    for cls in (torch.optim.AdamW, GuidedAdamW):
        opt = cls(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
        seen = calls[cls.__name__] = []
        opt.register_state_dict_pre_hook(lambda o: seen.append("save_pre"))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": 1})
        opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", sd.get("note"))))

        def halve_lr(o, sd):  # a pre-hook's returned dict is the one loaded
            return {**sd, "param_groups": [{**g, "lr": g["lr"] / 2} for g in sd["param_groups"]]}

        opt.register_load_state_dict_pre_hook(halve_lr)
        opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o.param_groups[0]["lr"])))
        sd = opt.state_dict()
        seen.append(("saved note", sd.get("note")))
        opt.load_state_dict(sd)
    assert calls["GuidedAdamW"] == calls["AdamW"] == [
        "save_pre", ("saved note", 1), ("load_pre", 1), ("load_post", 5e-4)]


_UNPICKLE_AND_STEP = """
import pickle, sys, torch
opt = pickle.loads(sys.stdin.buffer.read())
seen = []
opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
for p in opt.param_groups[0]["params"]:
    p.grad = torch.ones_like(p)
opt.step()
print(seen)
"""


def test_an_unpickled_wrapper_runs_its_step_hooks_in_a_fresh_process():
    import pickle
    import subprocess
    import sys

    opt = GuidedAdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3)
    out = subprocess.run([sys.executable, "-c", _UNPICKLE_AND_STEP], input=pickle.dumps(opt),
                         capture_output=True, check=True).stdout.decode()
    assert out.strip() == "['pre']"


def test_a_reference_may_be_any_iterable_of_references():
    m = torch.nn.Linear(3, 1)
    refs = [Reference({"weight": torch.ones(1, 3), "bias": torch.ones(1)}, model=m) for _ in range(2)]
    opt = GuidedAdamW(m.parameters(), reference=(r for r in refs))  # a generator, as list(...) took before
    assert opt.reference_mode == "sources" and opt._guidance.num_sources == 2


@pytest.mark.parametrize("reference", [None, 5, "EMA", torch.ones(3)])
def test_a_bad_reference_names_the_keyword(reference):
    with pytest.raises((TypeError, ValueError), match="reference must be"):
        GuidedAdamW(torch.nn.Linear(3, 1).parameters(), lr=1e-3, reference=reference)


def test_a_set_of_parameters_in_add_param_group_is_refused_as_torch_does():
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(2, 2)
    opt = GuidedAdamW(a.parameters())
    with pytest.raises(TypeError, match="set"):
        opt.add_param_group({"params": set(b.parameters())})
    assert len(opt.param_groups) == 1


def test_an_expanded_gradient_is_guided_like_its_dense_copy():
    def run(expanded: bool):
        w, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 3))
        opt = GuidedOptimizer(torch.optim.SGD([w, b], lr=0.1), magnitude="clip", max_norm=0.1, direction="off")
        w.grad = torch.ones(3)
        b.grad = torch.ones(1, 3).expand(4, 3) if expanded else torch.ones(4, 3)
        opt.step()
        return w.detach().clone(), b.detach().clone()

    (w1, b1), (w2, b2) = run(True), run(False)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and b1.abs().sum() > 0


def test_the_error_names_a_parameter_by_its_position_in_its_group():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = GuidedAdamW([{"params": list(a.parameters())}, {"params": list(b.parameters())}], nonfinite="raise")
    x = torch.randn(2, 3)
    (a(x).sum() + b(x).sum()).backward()
    b.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\] parameter #1 "):
        opt.step()


def test_stats_drop_the_figures_of_a_step_they_no_longer_describe():
    m = torch.nn.Linear(3, 1)
    opt = GuidedAdamW(m.parameters(), lr=1e-3)
    fresh = opt.state_dict()
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert "grad_norm" in opt.stats
    opt.load_state_dict(fresh)
    assert opt.stats == {"step": 0, "skipped": 0}
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.step()  # no parameter has a gradient
    assert "grad_norm" not in opt.stats and opt.stats["step"] == 2


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    np = pytest.importorskip("numpy")
    opt = GuidedAdamW(torch.nn.Linear(3, 1).parameters(), max_angle=np.float32(45), warmup_steps=np.int64(5))
    assert opt.config.max_angle == 45.0 and type(opt.config.max_angle) is float
    assert opt.config.warmup_steps == 5 and type(opt.config.warmup_steps) is int
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # the config in the checkpoint is primitives
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        GuidedAdamW(torch.nn.Linear(3, 1).parameters(), warmup_steps=np.bool_(True))


def test_capture_puts_batchnorm_running_statistics_back():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3) + 5 for _ in range(3)]
    capture_reference(model, batches, loss_fn=lambda m, x: m(x).sum())
    assert model.training  # captured in the model's own (training) mode, which moves running statistics
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "capture changed the model's state"


def test_an_optimizer_already_prepared_by_accelerate_is_refused():
    # guided outside Accelerate's optimizer, every micro-batch's half-accumulated gradient was rewritten
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    m, opt = acc.prepare(torch.nn.Linear(4, 1), torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="AcceleratedOptimizer.*GuidancePlugin"):
        GuidedOptimizer(opt)


def test_parameters_a_captured_reference_does_not_cover_cannot_be_added():
    body, extra = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    ref = capture_reference(body, [x], loss_fn=lambda m, b: m(b).pow(2).sum())
    opt = GuidedAdamW(body.parameters(), lr=1e-2, reference=ref)
    with pytest.raises(ValueError, match=r"cannot add param_groups\[1\] parameter #0 .*set_reference\('ema'\)"):
        opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == 1
    opt.set_reference("ema")  # the documented way round: EMA, add, then references that cover everything
    opt.add_param_group({"params": list(extra.parameters())})
    both = torch.nn.ModuleList([body, extra])
    opt.set_reference(capture_reference(both, [x], loss_fn=lambda m, b: m[0](b).sum() + m[1](b).sum()))
    assert opt.reference_mode == "sources"
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]})  # nothing to guide
    assert len(opt.param_groups) == 3


# -- probe of 2026-12-02 (schedulers, unfreezing, names, duplicates) ----------------------
def test_a_wrapper_with_a_scheduler_attached_pickles_and_steps_like_the_original():
    import pickle

    m = tiny_mlp()
    opt = GuidedAdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # replaces opt.step on the instance
    backward(m, 0)
    opt.step()
    sched.step()
    twin = pickle.loads(pickle.dumps((m, opt)))
    for model, o in ((m, opt), twin):
        o.zero_grad()
        backward(model, 1)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), twin[0].parameters()))
    assert twin[1].param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-3


class _ScheduleFree(torch.optim.SGD):
    """A base with modes and a private helper, as schedule-free optimizers and Adafactor have."""

    mode = "train"

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"

    def _get_lr(self, group):
        return group["lr"] * 2


def test_the_base_optimizers_own_attributes_are_reachable_through_the_wrapper():
    base = _ScheduleFree(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    opt = GuidedOptimizer(base)
    assert hasattr(opt, "train")  # the Trainer calls optimizer.train() only behind this check
    opt.eval()
    assert base.mode == "eval" and opt.mode == "eval"
    assert opt._get_lr(opt.param_groups[0]) == 0.2
    with pytest.raises(AttributeError, match="'GuidedOptimizer' object has no attribute 'nope'"):
        opt.nope
    # never the AMP flag: GradScaler must unscale before guidance, not inside a fused step
    fused = GuidedOptimizer(torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), fused=True))
    assert fused.base_optimizer._step_supports_amp_scaling
    assert getattr(fused, "_step_supports_amp_scaling", False) is False


def test_a_parameter_unfrozen_after_the_references_were_set_is_named_and_nothing_moves():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    m[0].requires_grad_(False)  # stage 1 of gradual unfreezing: the reference covers the head only
    ref = capture_reference(m, [torch.randn(8, 6)], loss_fn=lambda mm, x: mm(x).pow(2).mean())
    opt = GuidedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), reference=ref, max_angle=10)
    m[0].requires_grad_(True)  # stage 2: before, its gradient was turned toward zero silently
    m(torch.randn(8, 6)).pow(2).mean().backward()
    before, grad = _params(m), m[0].weight.grad.clone()
    with pytest.raises(ValueError, match=r"parameter '0\.weight' \(shape \(4, 6\)\) has a gradient but no tensor "
                                         r"in the captured references.*set_reference"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) and len(opt.state) == 0
    assert torch.equal(m[0].weight.grad, grad)
    opt.set_reference(capture_reference(m, [torch.randn(8, 6)], loss_fn=lambda mm, x: mm(x).pow(2).mean()))
    opt.step()  # the way round the message names
    assert not torch.equal(before[0], m[0].weight)


def test_a_reference_bound_to_another_instance_says_so():
    a, b = tiny_mlp(), tiny_mlp()
    ref = _ref(a)
    with pytest.raises(ValueError, match=r"bound to, a model without this parameter.*ref\.bind\(that_model\)"):
        GuidedAdamW(b.parameters(), lr=1e-2, reference=ref)
    GuidedAdamW(b.parameters(), lr=1e-2, reference=ref.bind(b))


def test_names_of_a_compiled_or_ddp_model_match_a_hand_built_reference():
    m = tiny_mlp()
    ref = Reference({n: torch.ones_like(p) for n, p in m.named_parameters()})  # unbound: matched by name
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        named = [(prefix + n, p) for n, p in m.named_parameters()]
        assert GuidedAdamW(named, lr=1e-2, reference=ref).reference_mode == "sources"
    with pytest.raises(ValueError, match="has no tensor for parameter 'other.0.weight'"):
        GuidedAdamW([("other." + n, p) for n, p in m.named_parameters()], lr=1e-2, reference=ref)


def test_a_parameter_listed_twice_in_a_group_is_refused():
    m = tiny_mlp()
    p = next(m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns ("will become an error")
        base = torch.optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] parameter #1 .* appears twice"):
        GuidedOptimizer(base)
    opt = GuidedOptimizer(torch.optim.SGD([p], lr=0.1))
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"appears twice in the new param group"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1


def test_a_wrapped_models_prefix_is_never_stripped_from_a_bound_name():
    class Wrapper(torch.nn.Module):  # a real submodule called "module", as torch.ao's QuantWrapper has
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 3, bias=False)
            self.weight = torch.nn.Parameter(torch.ones(3, 3))

    m = Wrapper()
    m.module.requires_grad_(False)
    ref = capture_reference(m, [torch.randn(4, 3)], loss_fn=lambda mm, x: (x @ mm.weight).sum())
    assert ref.names == ["weight"]
    m.module.requires_grad_(True)  # 'module.weight' must not be matched to the top-level 'weight'
    with pytest.raises(ValueError, match=r"no tensor for parameter 'module\.weight'"):
        GuidedAdamW(m.parameters(), lr=1e-2, reference=ref)


@pytest.mark.parametrize("direction", ["cone", "project"])
def test_a_non_finite_source_survives_a_state_dict_round_trip(direction):
    # accelerate.prepare round-trips the state dict: a covered parameter whose source is not
    # finite (direction off for its block) must stay covered, not look newly unfrozen
    m = tiny_mlp()
    ref = Reference({n: torch.full_like(p, math.nan) if n == "2.bias" else torch.randn_like(p)
                     for n, p in m.named_parameters()}).bind(m)
    opt = GuidedAdamW(m.parameters(), lr=1e-2, reference=ref, direction=direction, scope="tensor")
    other = tiny_mlp(1)
    twin = GuidedAdamW(other.parameters(), lr=1e-2, reference=_ref(other), direction=direction, scope="tensor")
    twin.load_state_dict(opt.state_dict())
    opt.load_state_dict(opt.state_dict())
    for o in (opt, twin):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()  # the NaN source's block passes through; no "frozen when they were set" error
        assert o.stats["skipped"] == 0


def test_the_unfrozen_check_does_not_fire_when_references_are_never_read():
    m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    m[0].requires_grad_(False)
    ref = capture_reference(m, [torch.randn(8, 6)], loss_fn=lambda mm, x: mm(x).pow(2).mean())
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=ref, direction="off",
                          magnitude="clip", max_norm=1.0)
    m[0].requires_grad_(True)
    m(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()  # direction "off": magnitude control needs no reference
    assert opt.stats["step"] == 1


def test_a_wrapper_with_a_local_hook_pickles_as_torchs_optimizers_do():
    import pickle

    m = tiny_mlp()
    opt, plain = GuidedAdamW(m.parameters(), lr=1e-2), torch.optim.AdamW(m.parameters(), lr=1e-2)
    for o in (opt, plain):
        o.register_step_pre_hook(lambda *a: None)  # a closure: not picklable, and not pickled
    back = pickle.loads(pickle.dumps(opt))
    pickle.loads(pickle.dumps(plain))
    assert len(back._optimizer_step_pre_hooks) == len(plain.__getstate__().get("_optimizer_step_pre_hooks", {})) == 0


def test_huge_gradients_with_an_ema_reference_keep_the_state_finite():
    # |r|^2 of such an EMA overflows fp32: its block is invalid (b = 0), and 0 * inf once made
    # the guided norm, then the norm EMA, NaN for good (and the state_dict would not reload)
    w = torch.nn.Parameter(torch.zeros(4))
    opt = GuidedOptimizer(torch.optim.SGD([w], lr=0.0), warmup_steps=1)
    for t in range(4):
        w.grad = torch.full((4,), 2.0 ** 66) * (1 if t % 2 == 0 else -1)
        opt.step()
        assert math.isfinite(opt.stats["guided_norm"]) and torch.isfinite(w.grad).all()
    assert torch.isfinite(opt._guidance.blocks.norm_ema).all()
    GuidedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.0),
                    warmup_steps=1).load_state_dict(opt.state_dict())


def test_capture_takes_a_split_tensor_as_its_batches():
    m, x = tiny_mlp(), torch.randn(8, 6)
    loss = lambda mm, b: mm(b).sum()  # noqa: E731
    want = capture_reference(m, [x[:4], x[4:]], loss_fn=loss)
    got = capture_reference(m, x.split(4), loss_fn=loss)  # torch returns a tuple of tensors
    assert all(torch.equal(got[k], want[k]) for k in want.names)


@pytest.mark.parametrize("call, error, message", [
    # (inputs, targets) tuples without loss_fn: the model cannot take the targets
    (lambda m, x: capture_reference(m, [(x, x)]), TypeError, r"model\(\*batch\).*pass loss_fn"),
    # one batch where a list of them was meant (a tensor would be read row by row)
    (lambda m, x: capture_reference(m, x, loss_fn=lambda mm, b: mm(b).sum()), TypeError,
     r"got a single Tensor: wrap one batch in a list"),
    (lambda m, x: capture_reference(m, {"x": x}), TypeError, r"got a single dict"),
    # one (inputs, targets) batch with loss_fn: it was read as two batches, inputs then targets
    (lambda m, x: capture_reference(m, (x, x[:, 0].long()), loss_fn=lambda mm, b: mm(b[0]).sum()), TypeError,
     r"got a single tuple: wrap one batch in a list"),
    (lambda m, x: capture_reference(m, [x], loss_fn=lambda mm, b: mm(b).sum(), num_batches=2.0), TypeError,
     r"num_batches must be an int, got float"),
    (lambda m, x: capture_reference(m, [x], loss_fn=lambda mm, b: mm(b).pow(2)), ValueError,
     r"loss of batch #0 is a tensor of shape \(4, 3\), not a one-element tensor.*reduced to a scalar"),
])
def test_capture_names_what_is_wrong_with_its_input_and_changes_nothing(call, error, message):
    m = tiny_mlp()
    before = _params(m)
    with pytest.raises(error, match=message):
        call(m, torch.randn(4, 6))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.grad is None for p in m.parameters())


def test_an_ema_reference_set_again_after_captured_ones_warms_up_like_a_fresh_one():
    def make():
        w = torch.nn.Parameter(torch.zeros(2))
        return GuidedOptimizer(torch.optim.SGD([("w", w)], lr=0.0), max_angle=30, warmup_steps=2, magnitude="off")

    def steps(opt, grads):
        w, out = opt.param_groups[0]["params"][0], []
        for g in grads:
            w.grad = torch.tensor(g)
            opt.step()
            out.append(w.grad.tolist())
        return out

    opt = make()
    steps(opt, [[1.0, 0.0]] * 3)
    opt.set_reference(Reference({"w": torch.tensor([0.0, 1.0])}))
    opt.set_reference("ema")  # was guided from its next step on, counted from the old EMA's start
    resumed = make()
    resumed.load_state_dict(opt.state_dict())  # the restart travels with the checkpoint
    grads = [[1.0, 0.0], [0.0, 1.0]]  # 90 degrees apart: the cone would rotate the second
    assert steps(opt, grads) == steps(resumed, grads) == steps(make(), grads) == grads


def test_alignment_after_a_mid_run_switch_to_several_sources_is_that_of_a_fresh_optimizer():
    # the restarted alignment EMA was bias-corrected with the norm's step count: after 30
    # steps it read about (1 - ema_beta) x the cosines, and the weights flattened
    m = tiny_mlp()
    refs = [_ref(m, seed=1), _ref(m, seed=2)]
    late = GuidedAdamW(m.parameters(), lr=0.0)
    for step in range(30):
        late.zero_grad()
        backward(m, step)
        late.step()
    late.set_reference(refs)
    fresh = GuidedAdamW(m.parameters(), lr=0.0, reference=refs)
    figures = []
    for opt in (late, fresh):
        opt.zero_grad()
        backward(m, 99)
        opt.step()
        figures.append((opt.stats["alignment"], opt.stats["weights"]))
    (late_alignment, late_weights), (fresh_alignment, fresh_weights) = figures
    assert late_alignment == pytest.approx(fresh_alignment, rel=1e-6)
    assert late_weights == pytest.approx(fresh_weights, rel=1e-6)
    sd = late.state_dict()
    del sd["guidance"]["align_count"]  # a checkpoint from before the field: read as before
    other = tiny_mlp()
    GuidedAdamW(other.parameters(), lr=0.0, reference=[_ref(other, seed=1), _ref(other, seed=2)]).load_state_dict(sd)


def test_capture_takes_map_style_batches_and_integer_like_counts():
    import numpy as np

    class Batches:  # iterable through __getitem__ only, as a map-style dataset
        def __init__(self, xs):
            self.xs = xs

        def __getitem__(self, i):
            return self.xs[i]

        def __len__(self):
            return len(self.xs)

    m = tiny_mlp()
    xs = [torch.randn(4, 6) for _ in range(3)]
    loss = lambda mm, x: mm(x).sum()  # noqa: E731
    want = capture_reference(m, xs[:2], loss_fn=loss)
    for n in (np.int64(2), torch.tensor(2)):
        got = capture_reference(m, Batches(xs), loss_fn=loss, num_batches=n)
        assert all(torch.equal(got[k], want[k]) for k in want.names)
    with pytest.raises(TypeError, match="num_batches must be an int, got bool"):
        capture_reference(m, xs, loss_fn=loss, num_batches=True)


# -- a sixth outside probe: numerics, layouts, base optimizers -------------------------
class _FailsOnce(torch.optim.SGD):
    """A base optimizer whose step raises once, at the given step (as an out-of-memory error
    at AdamW's first step, when it allocates its state), before it touches anything."""

    def __init__(self, params, fail_at: int) -> None:
        super().__init__(params, lr=0.1, momentum=0.9)
        self.calls, self.fail_at = 0, fail_at

    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.fail_at + 1:
            raise RuntimeError("out of memory (simulated)")
        return super().step(closure)


@pytest.mark.parametrize("captured, fail_at", [(False, 0), (True, 0), (True, 2)])
def test_a_base_step_that_raises_leaves_the_guidance_state_as_it_was(captured, fail_at):
    runs = []
    for fails in (False, True):
        model = tiny_mlp()
        ref = {"reference": _ref(model)} if captured else {}
        opt = GuidedOptimizer(_FailsOnce(model.parameters(), fail_at if fails else -1), warmup_steps=0,
                              max_angle=30.0, **ref)
        for s in range(4):
            opt.zero_grad()
            backward(model, s)
            if fails and s == fail_at:
                with pytest.raises(RuntimeError, match="simulated"):
                    opt.step()
                assert opt.stats["step"] == fail_at  # the failed step is not counted
                opt.zero_grad()  # the gradients were guided in place: compute them again
                backward(model, s)
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.guidance_state_dict(), buf)
        runs.append((_params(model), buf.getvalue(), opt.stats))
    (p_ok, state_ok, stats_ok), (p_retry, state_retry, stats_retry) = runs
    assert all(torch.equal(a, b) for a, b in zip(p_ok, p_retry))
    assert state_ok == state_retry
    assert stats_ok == stats_retry


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_a_parameter_made_complex_after_construction_is_named_at_step():
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    model.to(torch.complex64)  # keeps the Parameter objects: the optimizer still holds them
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before, state = _params(model), io.BytesIO()
    torch.save(opt.state_dict(), state)
    with pytest.raises(ValueError, match=r"parameter param_groups\[0\] parameter #0 .* is complex"):
        opt.step()
    after = io.BytesIO()
    torch.save(opt.state_dict(), after)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert state.getvalue() == after.getvalue()


def _fp16_guided(n, nonfinite, grad_value, r, dtype=torch.float16):
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-6), reference=Reference({"w": r}, model=m),
                          max_angle=30.0, magnitude="off", nonfinite=nonfinite)
    m.w.grad = torch.full((n,), grad_value, dtype=dtype)
    return m, opt


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_guidance_that_would_overflow_a_float16_gradient_changes_nothing(nonfinite):
    # every element finite (1e4 < 65504); rotated to 30 degrees from a one-hot reference,
    # the gradient's norm (1e5) lands mostly on one element: beyond float16's range
    m, opt = _fp16_guided(100, nonfinite, 1e4, torch.eye(1, 100)[0])
    grad, state = m.w.grad.clone(), opt.state_dict()
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="overflow its dtype in parameter 'w'"):
            opt.step()
    else:
        opt.step()
        assert opt.stats["skipped"] == 1
    after = opt.state_dict()
    after["guidance"]["skipped"] = state["guidance"]["skipped"]  # the one field a skipped step moves
    assert torch.equal(m.w.grad, grad) and not m.w.detach().any()
    buf, buf_after = io.BytesIO(), io.BytesIO()
    torch.save(state, buf)
    torch.save(after, buf_after)
    assert buf.getvalue() == buf_after.getvalue()


def test_a_float16_gradient_with_a_large_norm_but_small_elements_is_guided():
    # the block bound (|g| = 1.9e5) exceeds float16's range; rotated toward a dense
    # reference, the elements do not (about 1e4 at most)
    r = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    m, opt = _fp16_guided(4096, "skip", 3e3, r)
    m32, want = _fp16_guided(4096, "skip", 3e3, r, dtype=torch.float32)
    want.step()
    opt.step()
    assert opt.stats["skipped"] == 0 and torch.isfinite(m.w.grad).all()
    torch.testing.assert_close(m.w.grad.float(), m32.w.grad, rtol=2e-3, atol=8.0)  # fp16 spacing at 1e4: 8


@pytest.mark.parametrize("scale", [1e-23, 1e-25, 1e19])
def test_a_reference_beyond_fp32s_squared_range_warns_and_leaves_the_gradient_alone(scale):
    # |r|^2 an fp32 denormal (1e-46), 0 although the values are not (1e-50), or an overflow
    # (1e38 x 50): the direction would be wrong (a denormal keeps a few bits) or is undefined;
    # the block is left unguided, with a warning at the user's line
    u = torch.randn(50, generator=torch.Generator().manual_seed(0))
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(50))
    with pytest.warns(UserWarning, match=r"reference #0 has 1 block\(s\) where \|r\|\^2 is not finite .* Rescale") as w:
        opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=Reference({"w": u * scale}, model=m),
                              max_angle=30.0, magnitude="off")
    assert w[0].filename == __file__
    g = torch.randn(50, generator=torch.Generator().manual_seed(1))
    m.w.grad = g.clone()
    opt.step()
    assert torch.equal(m.w.grad, g) and opt.stats["projected"] == 0.0


def test_a_gradient_block_under_fp32s_normal_squares_is_left_unguided():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(50))
    u = torch.randn(50, generator=torch.Generator().manual_seed(0))
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=Reference({"w": u}, model=m),
                          max_angle=30.0, magnitude="off")
    g = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 1e-22  # |g|^2 ~ 5e-43, denormal
    m.w.grad = g.clone()
    opt.step()
    assert torch.equal(m.w.grad, g) and opt.stats["projected"] == 0.0


# -- a seventh outside probe: distributed runs, checkpoints, loops ---------------------
def test_a_reference_shard_of_another_world_size_says_how_to_move_the_state():
    model, opt = _trained()
    sd = opt.state_dict()
    ema = sd["guidance"]["refs"][0]["ema"]
    ema["values"] = ema["values"][:6].clone()  # rank 0's half of a (12, 6) weight under FSDP2
    with pytest.raises(ValueError, match=r"expected \(12, 6\); .*same world size.*load_guidance_state_dict"):
        opt.load_state_dict(sd)


def test_a_step_describes_no_parameter_unless_it_refuses_one(monkeypatch):
    # a description rebuilds the names of all parameters: built per parameter and step, it
    # made each step quadratic in the number of tensors
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2, warmup_steps=0)

    def no_description(self, index):
        raise AssertionError(f"parameter {index} described although nothing was refused")

    monkeypatch.setattr(GuidedOptimizer, "_describe", no_description)
    train(model, opt, 2)
    assert opt.stats["step"] == 2


def test_float16_partial_sums_that_overflow_skip_the_step_although_the_sum_fits():
    # two references cancel on element 1 in the final a g + b1 r1 + b2 r2, but the rewrite
    # adds them one at a time in float16, and a g + b1 r1 already overflows there
    n, c = 100, 1000.0
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float16))
    r1, r2 = torch.zeros(n), torch.zeros(n)
    r1[0], r1[1], r2[0], r2[1] = 1.0, c, 1.0, -c
    opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-6),
                          reference=[Reference({"w": r1}, model=m), Reference({"w": r2}, model=m)],
                          direction="blend", strength=0.5, magnitude="off")
    g = torch.full((n,), 100.0, dtype=torch.float16)
    g[1] = 0
    m.w.grad = g.clone()
    opt.step()
    assert opt.stats["skipped"] == 1 and torch.equal(m.w.grad, g) and not m.w.detach().any()


def test_the_shard_hint_is_given_for_a_size_mismatch_only():
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2, warmup_steps=2, reference_dtype="int8")
    train(model, opt, 4)
    sd = opt.state_dict()
    ema = sd["guidance"]["refs"][0]["ema"]
    ema["codes"] = ema["codes"].float()  # the right size, another dtype
    with pytest.raises(ValueError, match="int8 reference has codes torch.float32") as e:
        opt.load_state_dict(sd)
    assert "world size" not in str(e.value)

