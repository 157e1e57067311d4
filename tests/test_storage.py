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
