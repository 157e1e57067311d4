"""bitsandbytes integration: 8-bit and paged AdamW under guidance, int8 references
(the linear grid that int8 references use, and bitsandbytes' dynamic code of earlier
versions, whose saved states still load).

bitsandbytes >= 0.50 runs its 8-bit optimizers and blockwise quantisation on CPU, so
everything here runs in CI without a GPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from conftest import GradientWatch

from sgg_optim import GuidedAdamW8bit, GuidedOptimizer, GuidedPagedAdamW8bit, Reference, storage
from sgg_optim.functional import block_stats
from sgg_optim.storage import (
    _CHUNK,
    INT8_BLOCKSIZE,
    INT8_CODES,
    LINEAR_BLOCKSIZE,
    Int8Store,
    LinearInt8Store,
    make_store,
    store_from_state,
    zeros_store,
)

# |cos(g, r_int8) - cos(g, r_fp32)| bound, documented in docs/quantized.md. Measured
# maximum over 400 random and 160 real-gradient cases: 4.8e-4 with the dynamic code
# (benchmarks/memory.py --section cosine; 6.7e-4 in a sweep of heavy-tailed cases only);
# 4.79e-4 for the linear grid and 4.80e-4 for the dynamic code on the 140 cases of
# benchmarks/int8_store.py: about 3x margin for both.
INT8_COS_BOUND = 2e-3
BF16_COS_BOUND = 1e-3

# Two 8192-element weights (8-bit state: >= min_8bit_size) and two small biases (32-bit).
IN, HIDDEN = 64, 128


@pytest.fixture(autouse=True)
def one_thread():
    """bnb's CPU kernels use OpenMP; on a loaded 2-core machine its threads spin and a
    4k-element quantisation takes 20 ms instead of 0.1 ms. One thread keeps tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quiet_paged():
    with warnings.catch_warnings():
        # "Paged optimizers are not supported on CPU. Falling back to non-paged..."
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported")
        yield


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, IN))


def regression_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7000 + step)
    x = torch.randn(32, IN, generator=g)
    teacher = torch.Generator().manual_seed(1)
    w = torch.randn(IN, IN, generator=teacher) / math.sqrt(IN)
    return x, torch.tanh(x @ w)


def loss_at(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = regression_batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = loss_at(model, s)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_tensors(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, p in enumerate(model.parameters()):
        for key, value in sorted(opt.state[p].items()):
            if torch.is_tensor(value):
                out.append((f"{i}.{key}", value))
    return out


def assert_bit_identical(m1, o1, m2, o2) -> None:
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), f"parameter {n1} differs"
    s1, s2 = state_tensors(o1, m1), state_tensors(o2, m2)
    assert [k for k, _ in s1] == [k for k, _ in s2]
    for (k, a), (_, b) in zip(s1, s2):
        assert a.dtype == b.dtype and torch.equal(a, b), f"optimizer state {k} differs"


# -- pass-through: bit for bit ------------------------------------------------------------
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_guided_adamw8bit_pass_through_is_bnb_bit_for_bit(nonfinite):
    plain, guided = mlp(), mlp()
    base = bnb.optim.AdamW8bit(plain.parameters(), lr=1e-2, weight_decay=0.05)
    opt = GuidedAdamW8bit(guided.parameters(), lr=1e-2, weight_decay=0.05,
                          direction="off", magnitude="off", nonfinite=nonfinite)
    assert type(opt.base_optimizer) is bnb.optim.AdamW8bit
    run(plain, base, 30)
    run(guided, opt, 30)
    # The test is about 8-bit state: the weights must really have it.
    weight = plain[0].weight
    assert weight.numel() >= base.args.min_8bit_size
    assert base.state[weight]["state1"].dtype == torch.uint8
    assert base.state[plain[0].bias]["state1"].dtype == torch.float32  # below min_8bit_size
    assert_bit_identical(plain, base, guided, opt)


def test_wrapping_paged_adamw8bit_pass_through_is_bit_for_bit(quiet_paged):
    plain, guided = mlp(), mlp()
    base = bnb.optim.PagedAdamW8bit(plain.parameters(), lr=1e-2)
    opt = GuidedOptimizer(bnb.optim.PagedAdamW8bit(guided.parameters(), lr=1e-2), direction="off", magnitude="off")
    assert opt.base_optimizer.is_paged
    run(plain, base, 30)
    run(guided, opt, 30)
    assert base.state[plain[2].weight]["state2"].dtype == torch.uint8
    assert_bit_identical(plain, base, guided, opt)


def test_guided_paged_constructor_builds_paged_base(quiet_paged):
    opt = GuidedPagedAdamW8bit(mlp().parameters(), 1e-3, (0.8, 0.99), 1e-6, 0.1)
    base = opt.base_optimizer
    assert type(base) is bnb.optim.PagedAdamW8bit and base.is_paged
    assert base.defaults["betas"] == (0.8, 0.99) and base.defaults["weight_decay"] == 0.1
    assert base.args.optim_bits == 8


def test_base_kwargs_reach_bnb():
    opt = GuidedAdamW8bit(mlp().parameters(), lr=1e-3, min_8bit_size=100_000, max_angle=30)
    assert opt.base_optimizer.args.min_8bit_size == 100_000
    assert opt.config.max_angle == 30


# -- param groups and GlobalOptimManager ----------------------------------------------------
def test_param_groups_keep_their_identity(quiet_paged):
    model = mlp()
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    base = bnb.optim.PagedAdamW8bit(groups, lr=1e-2)
    group_list, group_dicts = base.param_groups, list(base.param_groups)
    param_lists = [g["params"] for g in base.param_groups]
    ids = [[id(p) for p in g["params"]] for g in base.param_groups]
    opt = GuidedOptimizer(base, direction="cone", warmup_steps=2)
    run(model, opt, 5)
    assert opt.param_groups is group_list and base.param_groups is group_list
    assert all(a is b for a, b in zip(group_dicts, base.param_groups)) and len(base.param_groups) == 2
    assert all(a is b["params"] for a, b in zip(param_lists, base.param_groups))
    assert [[id(p) for p in g["params"]] for g in base.param_groups] == ids
    # load_state_dict lets the base rebuild its groups as it does; the wrapper keeps no copy.
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups


def test_global_optim_manager_overrides_survive_guidance():
    """GlobalOptimManager keys on (group index, param index) and id(param): guidance
    must leave both as they are, so a per-parameter override still applies, while
    guidance really rewrites the gradients bnb steps with.

    Guards: apply_guidance_ not writing the gradients (EMA update kept).
    """
    mng = bnb.optim.GlobalOptimManager.get_instance()
    saved = (dict(mng.pid2config), dict(mng.index2config), mng.uses_config_override)
    model = mlp()
    try:
        mng.register_parameters(model.parameters())
        opt = GuidedAdamW8bit(model.parameters(), lr=1e-2, warmup_steps=1)
        mng.override_config(model[0].weight, "optim_bits", 32)
        watch = GradientWatch(opt)
        run(model, opt, 3)
        assert opt.state[model[0].weight]["state1"].dtype == torch.float32  # overridden
        assert opt.state[model[2].weight]["state1"].dtype == torch.uint8  # not overridden
        assert opt.stats["step"] == 3 and math.isfinite(opt.stats["cos"])
        watch.assert_rewrote_where_reported(min_steps=2)  # guidance ran: steps 2 and 3
    finally:
        mng.pid2config, mng.index2config, mng.uses_config_override = saved


# -- guided 8-bit optimizers train -----------------------------------------------------------
# (guided optimizer, the same bnb optimizer unguided)
TRAINED = {
    "adamw8bit": (lambda p: GuidedAdamW8bit(p, lr=3e-3, direction="cone", magnitude="adaptive", max_angle=45,
                                            warmup_steps=5),
                  lambda p: bnb.optim.AdamW8bit(p, lr=3e-3)),
    "paged_adamw8bit": (lambda p: GuidedPagedAdamW8bit(p, lr=3e-3, direction="cone", magnitude="adaptive",
                                                       max_angle=45, warmup_steps=5),
                        lambda p: bnb.optim.PagedAdamW8bit(p, lr=3e-3)),
    # per-tensor blocks: the EMA reference conflicts with some biases' gradients
    "wrapped_paged": (lambda p: GuidedOptimizer(bnb.optim.PagedAdamW8bit(p, lr=3e-3), direction="project",
                                                scope="tensor", warmup_steps=5),
                      lambda p: bnb.optim.PagedAdamW8bit(p, lr=3e-3)),
}


@pytest.mark.parametrize("name", list(TRAINED))
def test_guided_bnb_optimizers_train(name, quiet_paged):
    """Guided 8-bit optimizers train, and guidance is really active: bnb steps with the
    rewritten gradients on every step whose stats report a rule acting (and only
    there), and the parameters end up elsewhere than the unguided run's.

    Guards: apply_guidance_ not writing the gradients (EMA update kept).
    """
    make, make_plain = TRAINED[name]
    model, plain = mlp(), mlp()
    opt = make(model.parameters())
    watch = GradientWatch(opt)
    with torch.no_grad():
        start = sum(loss_at(model, 1000 + i).item() for i in range(4)) / 4
    losses = run(model, opt, 60)
    with torch.no_grad():
        end = sum(loss_at(model, 1000 + i).item() for i in range(4)) / 4
    assert all(math.isfinite(v) for v in losses)
    assert end < 0.5 * start, (start, end)
    stats = opt.stats
    assert stats["step"] == 60 and stats["skipped"] == 0
    assert math.isfinite(stats["cos"])
    assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    watch.assert_rewrote_where_reported(min_steps=5)
    run(plain, make_plain(plain.parameters()), 60)  # pass-through is bit-identical to this run
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


# How each int8 code is held in a checkpoint: its tensors and their dtypes.
INT8_PARTS = {"linear": {"codes": torch.int8, "scale": torch.float32},
              "dynamic": {"codes": torch.uint8, "absmax": torch.float32}}


def ema_references(opt: torch.optim.Optimizer, model: torch.nn.Module, storage: str) -> list:
    """The EMA reference of each parameter, rebuilt from the checkpoint format."""
    refs = opt.state_dict()["guidance"]["refs"]
    return [store_from_state(refs[i]["ema"], p.shape, storage) for i, p in enumerate(model.parameters())]


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_low_precision_ema_reference_trains_and_stays_finite(storage):
    """The bf16/int8 EMA reference is held in that storage, trains, and tracks the fp32 one.

    Guards: apply_guidance_ not writing the gradients; the EMA reference kept in fp32 whatever reference_dtype says.
    """
    model, twin = mlp(), mlp()
    opt = GuidedAdamW8bit(model.parameters(), lr=3e-3, max_angle=45, warmup_steps=5, reference_dtype=storage)
    ref32 = GuidedAdamW8bit(twin.parameters(), lr=3e-3, max_angle=45, warmup_steps=5)
    watch = GradientWatch(opt)
    with torch.no_grad():
        start = loss_at(model, 999).item()
    run(model, opt, 60)
    run(twin, ref32, 60)
    with torch.no_grad():
        end, end32 = loss_at(model, 999).item(), loss_at(twin, 999).item()
    stored = {i: {n: t.dtype for n, t in entry["ema"].items()}
              for i, entry in opt.state_dict()["guidance"]["refs"].items()}
    want = INT8_PARTS["linear"] if storage == "int8" else {"values": torch.bfloat16}
    assert stored == {i: want for i in range(4)}
    emas = ema_references(opt, model, storage)
    for ema, p in zip(emas, model.parameters()):
        assert torch.isfinite(ema.dense()).all() and ema.dense().abs().sum() > 0
        assert torch.isfinite(p).all()
    assert end < 0.5 * start
    assert end < 1.5 * end32  # low-precision storage costs little against fp32
    watch.assert_rewrote_where_reported(min_steps=5)
    # The low-precision EMA tracks the fp32 one of the twin run closely.
    a = torch.cat([s.dense().flatten() for s in emas])
    b = torch.cat([s.dense().flatten() for s in ema_references(ref32, twin, "fp32")])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


@pytest.mark.parametrize("kind", sorted(INT8_CODES))
def test_int8_ema_state_dict_round_trip(kind, monkeypatch):
    """A state saved with either int8 code resumes bit for bit in an optimizer built with
    the default (linear) code: the checkpoint names its kind by its tensors (codes +
    absmax: bitsandbytes' dynamic code of earlier versions; codes + scale: the linear
    grid), and each reference loads, and stays, as that kind.

    Guards: a dynamic-code checkpoint rejected, or read as linear codes, after the switch.
    """
    model = mlp()
    with monkeypatch.context() as patch:
        patch.setattr(storage, "INT8", INT8_CODES[kind])
        opt = GuidedAdamW8bit(model.parameters(), lr=3e-3, warmup_steps=2, reference_dtype="int8")
        run(model, opt, 4)
        saved = copy.deepcopy(opt.state_dict())
    assert storage.INT8 is LinearInt8Store
    assert all({n: t.dtype for n, t in e["ema"].items()} == INT8_PARTS[kind] for e in saved["guidance"]["refs"].values())
    clone = copy.deepcopy(model)
    opt2 = GuidedAdamW8bit(clone.parameters(), lr=3e-3, warmup_steps=2, reference_dtype="int8")
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (clone, opt2)):
        for s in range(4, 8):
            o.zero_grad()
            loss_at(m, s).backward()
            o.step()
    assert_bit_identical(model, opt, clone, opt2)
    refs, refs2 = opt.state_dict()["guidance"]["refs"], opt2.state_dict()["guidance"]["refs"]
    assert sorted(refs) == sorted(refs2) == [0, 1, 2, 3]
    for i in refs:
        assert {n: t.dtype for n, t in refs2[i]["ema"].items()} == INT8_PARTS[kind]
        assert torch.equal(refs[i]["ema"]["codes"], refs2[i]["ema"]["codes"])


def test_dynamic_int8_reference_file_still_loads(tmp_path, monkeypatch):
    """A reference file written with bitsandbytes' dynamic code loads as that code, with
    the values it was saved with, and guides like the reference it was saved from."""
    model = mlp()
    tensors = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for n, p in model.named_parameters()}
    with monkeypatch.context() as patch:
        patch.setattr(storage, "INT8", Int8Store)
        ref = Reference(tensors, storage="int8").bind(model)
        ref.save(tmp_path / "ref.safetensors")
    loaded = Reference.load(tmp_path / "ref.safetensors", model)
    assert all(type(s) is Int8Store for s in loaded.stores.values())
    for n in ref.names:
        assert torch.equal(loaded[n], ref[n])
        assert 0 < (loaded[n] - tensors[n]).abs().max() <= 0.02 * tensors[n].abs().max()  # dynamic codes, decoded
    results = []
    for r in (ref, loaded):
        m = mlp()
        opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=r.bind(m), reference_dtype="int8",
                              max_angle=5)
        loss_at(m, 0).backward()
        opt.step()
        assert opt.stats["projected"] > 0
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(*results)


# -- int8 reference storage ---------------------------------------------------------------
def test_dynamic_int8_store_is_bnb_blockwise_and_chunk_boundaries_are_exact():
    """Chunked quantisation with the dynamic code gives exactly bnb's one-shot codes,
    across chunk ends (what states saved with that code hold)."""
    x = torch.randn(2 * _CHUNK + 3 * INT8_BLOCKSIZE + 17, generator=torch.Generator().manual_seed(0))
    x[5] = 40.0  # an outlier: its block's absmax differs from the others
    store = Int8Store.quantize(x)
    codes, state = bnb_functional.quantize_blockwise(x, blocksize=INT8_BLOCKSIZE)
    assert torch.equal(store.codes, codes)
    assert torch.equal(store.absmax, state.absmax)
    dense = bnb_functional.dequantize_blockwise(codes, state)
    assert torch.equal(store.dense(), dense)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(store.dot(g), torch.dot(g, dense), rtol=1e-5)
    assert 0 < (dense - x).abs().max() < 0.02 * x.abs().max()  # really quantised


@pytest.mark.parametrize("kind", sorted(INT8_CODES))
def test_int8_zero_reference_matches_quantised_zeros(kind):
    """The EMA reference starts as zeros: built directly, bit-identical to quantising them."""
    cls = INT8_CODES[kind]
    for shape in [(0,), (5,), (3, 5000), (_CHUNK + 7,)]:
        direct = cls.zeros(torch.Size(shape), torch.device("cpu"))
        quantised = cls.quantize(torch.zeros(shape))
        assert direct.state().keys() == quantised.state().keys() == INT8_PARTS[kind].keys()
        assert all(torch.equal(direct.state()[n], quantised.state()[n]) for n in INT8_PARTS[kind])
        assert direct.shape == torch.Size(shape) and not direct.dense().any()
    assert type(zeros_store(torch.empty(5), "int8")) is LinearInt8Store


@pytest.mark.parametrize("kind", sorted(INT8_CODES))
def test_int8_store_costs_about_one_byte_per_parameter(kind):
    cls, blocksize = INT8_CODES[kind], {"linear": LINEAR_BLOCKSIZE, "dynamic": INT8_BLOCKSIZE}[kind]
    for numel in (64, 4096, 10_000, 1 << 20):
        store = cls.quantize(torch.randn(numel))
        held = sum(t.numel() * t.element_size() for t in store.state().values())
        assert {n: t.dtype for n, t in store.state().items()} == INT8_PARTS[kind]
        assert store.codes.numel() == numel
        assert store.nbytes() == held == numel + 4 * math.ceil(numel / blocksize)
        if numel >= 4096:
            bound = {"linear": 1.005, "dynamic": 1.002}[kind]  # 4 B of scale per block of 1024 / 4096
            assert held / numel <= bound, (numel, held / numel)
    assert make_store(torch.randn(10_000), "int8").nbytes() == 10_000 + 4 * math.ceil(10_000 / LINEAR_BLOCKSIZE)


def _cosines(grads, refs, storage):
    """cos(g, r) through the statistics pass, r stored as ``storage`` (or "int8-dynamic")."""
    stores = [[Int8Store.quantize(r) if storage == "int8-dynamic" else make_store(r, storage)] for r in refs]
    st = block_stats(grads, stores, torch.zeros(len(grads), dtype=torch.long), 1)[0]
    return (st[1] / (st[0] * st[2]).sqrt()).item()


def _random_case(seed: int):
    """Gradients at a random cosine with a reference of random scale; some heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    rho = torch.rand((), generator=g).item() * 2 - 1
    grads, refs = [], []
    for shape in [(64, 128), (128,), (300, 70), (5000,)]:
        r = torch.randn(shape, generator=g)
        if seed % 2:
            r = r * torch.randn(shape, generator=g).exp()  # log-normal spread of magnitudes
        noise = torch.randn(shape, generator=g)
        grads.append(rho * r + math.sqrt(1 - rho ** 2) * noise * r.std())
        refs.append(r * 10 ** (torch.rand((), generator=g).item() * 6 - 3))
    return grads, refs


def test_int8_reference_cosine_within_bound_on_random_gradients():
    """Both int8 codes (the linear grid that int8 references use, the dynamic code of
    saved states) and bf16 keep the cosine within the documented bounds."""
    errors, dyn_errors, bf16_errors, cosines = [], [], [], []
    for seed in range(24):
        grads, refs = _random_case(seed)
        c32 = _cosines(grads, refs, "fp32")
        errors.append(abs(_cosines(grads, refs, "int8") - c32))
        dyn_errors.append(abs(_cosines(grads, refs, "int8-dynamic") - c32))
        bf16_errors.append(abs(_cosines(grads, refs, "bf16") - c32))
        cosines.append(c32)
    assert max(errors) < INT8_COS_BOUND, max(errors)
    assert max(dyn_errors) < INT8_COS_BOUND, max(dyn_errors)
    assert max(bf16_errors) < BF16_COS_BOUND, max(bf16_errors)
    assert min(cosines) < -0.3 and max(cosines) > 0.3  # both signs covered
    assert min(max(errors), max(dyn_errors)) > 0  # int8 really differs from fp32
    assert errors != dyn_errors  # two codes, not one twice


def tiny_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def test_int8_reference_cosine_within_bound_on_real_gradients():
    """Gradients of a tiny Llama: the reference is one batch's gradient (or the mean of
    two), g another's, so the cosine spans near-orthogonal to strongly aligned."""
    errors, cosines = [], []
    for seed in range(4):
        model = tiny_llama(seed)
        batches = []
        for _ in range(2):
            model.zero_grad()
            ids = torch.randint(0, 256, (4, 32))
            model(input_ids=ids, labels=ids).loss.backward()
            batches.append([p.grad.clone() for p in model.parameters()])
        g1, g2 = batches
        mean = [(a + b) / 2 for a, b in zip(g1, g2)]
        for grads, refs in ((g1, g2), (g1, mean), (g2, mean)):
            c32 = _cosines(grads, refs, "fp32")
            errors += [abs(_cosines(grads, refs, code) - c32) for code in ("int8", "int8-dynamic")]
            cosines.append(c32)
    assert max(errors) < INT8_COS_BOUND, max(errors)
    assert max(cosines) > 0.5 and min(cosines) < 0.3
