"""Reference stores (sgg_optim.storage): the linear int8 grid against plain fp32 math."""

from __future__ import annotations

import sys

import pytest
import torch

from sgg_optim.storage import (
    _CHUNK,
    INT8_CODES,
    LINEAR_BLOCKSIZE,
    LinearInt8Store,
    make_store,
    store_from_state,
    zeros_store,
)

SIZES = [0, 5, LINEAR_BLOCKSIZE, 3 * LINEAR_BLOCKSIZE + 17, _CHUNK + LINEAR_BLOCKSIZE + 3]


def _x(n, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return x * torch.randn(n, generator=g).exp() if heavy else x


@pytest.mark.parametrize("n", SIZES)
def test_linear_int8_round_trip_error_is_within_half_a_step_per_block(n):
    x = _x(n, heavy=True)
    s = LinearInt8Store.quantize(x)
    assert s.codes.dtype == torch.int8 and s.nbytes() == n + 4 * -(-n // LINEAR_BLOCKSIZE)
    err = (s.dense() - x).abs()
    step = s.scale.repeat_interleave(LINEAR_BLOCKSIZE)[:n]  # absmax / 127 of each element's block
    assert bool((err <= 0.5 * step + 1e-7).all())


@pytest.mark.parametrize("n", SIZES)
def test_linear_int8_operations_match_fp32_on_the_dequantised_values(n):
    r, g = LinearInt8Store.quantize(_x(n)), _x(n, seed=1)
    dense = r.dense()
    torch.testing.assert_close(r.dot(g), torch.dot(g, dense), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r.sqnorm(), torch.dot(dense, dense), rtol=1e-5, atol=1e-4)
    out = g.clone()
    r.add_to_(out, 0.5)
    torch.testing.assert_close(out, g + 0.5 * dense)
    r.lerp_(g, 0.25)
    expected = dense.lerp(g, 0.25)
    step = r.scale.repeat_interleave(LINEAR_BLOCKSIZE)[:n]
    assert bool(((r.dense() - expected).abs() <= 0.5 * step + 1e-6).all())


def test_linear_int8_add_to_a_channels_last_gradient():
    x = torch.randn(4, 3, 5, 5)
    r = LinearInt8Store.quantize(x)
    g = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    expected = g + 2.0 * r.dense()
    r.add_to_(g, 2.0)
    torch.testing.assert_close(g, expected)


def test_state_round_trip_and_validation_for_both_codes():
    x = _x(3000)
    for cls in INT8_CODES.values():
        s = cls.quantize(x)
        back = store_from_state(dict(s.state()), torch.Size([3000]), "int8")
        assert type(back) is cls and torch.equal(back.dense(), s.dense())
    state = LinearInt8Store.quantize(x).state()
    with pytest.raises(ValueError, match="scale"):
        store_from_state({"codes": state["codes"], "scale": state["scale"][:1]}, torch.Size([3000]), "int8")
    with pytest.raises(ValueError, match="codes"):
        store_from_state({"codes": state["codes"].to(torch.uint8), "scale": state["scale"]}, torch.Size([3000]),
                         "int8")


def test_int8_references_use_the_linear_grid():
    """reference_dtype="int8" means the linear grid (benchmarks/results/int8_store.md):
    new references, EMA starts and their saved state are all the linear kind."""
    from sgg_optim import storage

    assert storage.INT8 is LinearInt8Store
    x = _x(3000)
    made, zero = make_store(x, "int8"), zeros_store(x, "int8")
    assert type(made) is LinearInt8Store and type(zero) is LinearInt8Store
    assert {n: t.dtype for n, t in made.state().items()} == {"codes": torch.int8, "scale": torch.float32}
    assert torch.equal(made.codes, LinearInt8Store.quantize(x).codes)
    assert not zero.dense().any() and zero.shape == x.shape


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """Importing bitsandbytes fails, as for a user without the optional extra."""
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)


def test_int8_reference_needs_no_bitsandbytes(without_bitsandbytes, tmp_path):
    """An int8 EMA reference and an int8 captured reference train, save and load without
    bitsandbytes; only a state saved with the dynamic code asks for it, by name."""
    from sgg_optim import GuidedOptimizer, Reference

    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401  (the fixture really hides it)
    model = torch.nn.Linear(40, 30)
    ref = Reference({n: torch.randn_like(p) for n, p in model.named_parameters()}, storage="int8").bind(model)
    ref.save(tmp_path / "ref.safetensors")
    loaded = Reference.load(tmp_path / "ref.safetensors", model)
    assert all(torch.equal(loaded[n], ref[n]) for n in ref.names)
    for reference in ("ema", loaded):
        opt = GuidedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), reference=reference,
                              reference_dtype="int8", warmup_steps=1, max_angle=5)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 40)).square().mean().backward()
            opt.step()
        assert opt.stats["projected"] > 0 and torch.isfinite(model.weight).all()
        opt.load_state_dict(opt.state_dict())
    dynamic = {"codes": torch.zeros(3000, dtype=torch.uint8), "absmax": torch.ones(1)}
    with pytest.raises(ImportError, match="dynamic code book"):
        store_from_state(dynamic, torch.Size([3000]), "int8")


# The passes work in a per-thread fp32 scratch reused by every LinearInt8Store (and keep
# the last dequantised chunk there): what follows checks that sharing it changes nothing.


def _plain(s):
    """The reference a store holds, computed without the store: codes * scale per block."""
    n = s.codes.numel()
    return (s.codes.float() * s.scale.repeat_interleave(LINEAR_BLOCKSIZE)[:n]).view(s.shape)


def test_linear_int8_scratch_shared_by_stores_of_other_sizes_changes_no_result():
    big, small, tiny = (LinearInt8Store.quantize(_x(n, seed=n) * 100) for n in (_CHUNK + 5000, 3000, 7))
    fresh = {}
    for s in (big, small, tiny):  # each alone first
        g = _x(s.codes.numel(), seed=9)
        fresh[id(s)] = (s.dot(g), s.sqnorm(), g + 0.5 * _plain(s))
    for _ in range(2):  # then interleaved, every pass after another store's
        for s in (tiny, big, small, big, tiny, small):
            g = _x(s.codes.numel(), seed=9)
            dot, sq, added = fresh[id(s)]
            assert torch.equal(s.dot(g), dot) and torch.equal(s.sqnorm(), sq)
            out = g.clone()
            s.add_to_(out, 0.5)
            torch.testing.assert_close(out, added, rtol=0, atol=0)
            assert torch.equal(s.dense(), _plain(s))


def test_linear_int8_short_last_block_ignores_what_the_scratch_held():
    """The last block of a chunk is padded in the scratch: the padding must not enter its
    absmax, whatever a larger store left there."""
    filler = LinearInt8Store.quantize(torch.full((_CHUNK,), 1e6))
    filler.sqnorm()  # leaves the scratch full of 1e6
    for n in (1, 5, LINEAR_BLOCKSIZE - 1, 2 * LINEAR_BLOCKSIZE + 17):
        x = _x(n, seed=n)
        s = LinearInt8Store.quantize(x)
        tail = x[(n - 1) // LINEAR_BLOCKSIZE * LINEAR_BLOCKSIZE:]
        assert s.scale[-1].item() == (tail.abs().max() / 127).item()
        before = _plain(s)[-tail.numel():]
        filler.sqnorm()
        s.lerp_(torch.zeros(n), 0.5)  # halves every value (exactly, at weight 0.5)
        assert s.scale[-1].item() == ((0.5 * before).abs().max() / 127).item()


def test_linear_int8_cached_chunk_follows_changes_to_the_codes():
    s = LinearInt8Store.quantize(_x(3000))
    g = _x(3000, seed=1)
    s.dot(g)  # leaves the dequantised chunk in the scratch
    s.codes.mul_(-1)  # in place, as a load or a user would: the cached chunk is stale
    torch.testing.assert_close(s.sqnorm(), torch.dot(_plain(s).view(-1), _plain(s).view(-1)))
    torch.testing.assert_close(s.dot(g), torch.dot(g, _plain(s).view(-1)))
    s.lerp_(g, 0.5)
    torch.testing.assert_close(s.sqnorm(), _plain(s).square().sum())
    other = LinearInt8Store.quantize(_x(3000, seed=2))  # same size, other store
    torch.testing.assert_close(other.sqnorm(), _plain(other).square().sum())


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "bf16"])
def test_linear_int8_passes_on_gradients_not_contiguous_fp32_match_a_contiguous_one(layout):
    x, g = torch.randn(4, 3, 5, 7), torch.randn(4, 3, 5, 7)
    if layout == "channels_last":
        odd = g.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        odd = g.transpose(0, 3).contiguous().transpose(0, 3)
    else:
        g = g.bfloat16().float()
        odd = g.bfloat16()
    assert not (odd.is_contiguous() and odd.dtype == torch.float32)
    a, b = LinearInt8Store.quantize(x), LinearInt8Store.quantize(x)
    assert torch.equal(a.dot(odd), b.dot(g))
    out_a, out_b = odd.clone(), g.clone()
    a.add_to_(out_a, 2.0)
    b.add_to_(out_b, 2.0)
    torch.testing.assert_close(out_a.float(), out_b.to(out_a.dtype).float())
    a.lerp_(odd, 0.3)
    b.lerp_(g, 0.3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_stores_in_two_threads_match_one_thread(storage):
    """Each thread has its own scratch (int8's chunks, bf16's fp32 copies): concurrent
    passes give the serial results."""
    import threading

    xs = [_x(_CHUNK // 2 + 3001 * k, seed=k) for k in range(4)]
    gs = [_x(x.numel(), seed=10 + k) for k, x in enumerate(xs)]

    def run(k, out):
        s = make_store(xs[k], storage)
        res = []
        for _ in range(5):
            res += [s.dot(gs[k]), s.sqnorm()]
            s.lerp_(gs[k], 0.2)
        out[k] = res + [s.dense().clone()]

    serial, threaded = {}, {}
    for k in range(4):
        run(k, serial)
    threads = [threading.Thread(target=run, args=(k, threaded)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert all(torch.equal(a, b) for a, b in zip(serial[k], threaded[k]))


def test_linear_int8_passes_reuse_one_scratch_and_state_reads_as_codes_times_scale():
    """No fp32 chunk is allocated per call (the dequantised chunk lies in the scratch), and
    the saved state keeps its meaning: ``codes * scale`` per block of 1024."""
    s = LinearInt8Store.quantize(_x(5000))
    scratch = s._scratch(0).buf
    for _ in range(2):
        r = s._dequant(0)
        assert r.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr()
    codes = torch.arange(-100, 100, dtype=torch.int8).repeat(11)[:2000]
    scale = torch.tensor([0.5, 0.25])
    back = store_from_state({"codes": codes, "scale": scale}, torch.Size([40, 50]), "int8")
    expected = torch.cat([codes[:1024].float() * 0.5, codes[1024:].float() * 0.25]).view(40, 50)
    assert torch.equal(back.dense(), expected)
    assert back.sqnorm().item() == pytest.approx(expected.square().sum().item(), rel=1e-6)


def test_linear_int8_passes_stay_fp32_under_another_default_dtype():
    x, g = _x(3000), _x(3000, seed=1)
    expected = LinearInt8Store.quantize(x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        s = LinearInt8Store.quantize(x)
        assert s.dense().dtype == torch.float32 and torch.equal(s.codes, expected.codes)
        assert torch.equal(s.dot(g), expected.dot(g))
    finally:
        torch.set_default_dtype(old)


def test_linear_int8_store_pickles_without_the_scratch():
    import copy
    import pickle

    s = LinearInt8Store.quantize(_x(3000))
    g = _x(3000, seed=1)
    dot = s.dot(g)  # the store now holds views of this thread's 8 MiB scratch
    data = pickle.dumps(s)
    assert len(data) < 3000 + 4 * 3 + 10_000
    for back in (pickle.loads(data), copy.deepcopy(s)):
        assert torch.equal(back.codes, s.codes) and torch.equal(back.dot(g), dot)
        back.lerp_(g, 0.5)  # writes through to its own codes, and only to them
        assert not torch.equal(back.codes, s.codes) and torch.equal(s.dot(g), dot)
        assert torch.equal(back.dense(), _plain(back))
