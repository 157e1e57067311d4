"""Reference stores (sgg_optim.storage): the linear int8 grid against plain fp32 math."""

from __future__ import annotations

import pytest
import torch

from sgg_optim.storage import _CHUNK, LINEAR_BLOCKSIZE, INT8_CODES, LinearInt8Store, make_store, store_from_state

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


def test_make_store_int8_uses_the_selected_code():
    from sgg_optim import storage

    assert isinstance(make_store(_x(10), "int8"), storage.INT8)
