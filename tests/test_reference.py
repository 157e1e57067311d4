"""capture_reference and Reference files: nothing changed, nothing lost, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import backward, batch, tiny_mlp

from sgg_optim import GuidedOptimizer, Reference, capture_reference


def ce_loss(model, step):
    x, y = batch(step)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_capture_is_the_mean_gradient_and_restores_params_and_grads():
    model = tiny_mlp()
    backward(model, 42)  # pre-existing gradients must survive
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    grad_objects = {n: p.grad for n, p in model.named_parameters()}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ref = capture_reference(model, [0, 1, 2], loss_fn=ce_loss)

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    probe = tiny_mlp()
    for s in range(3):
        probe.zero_grad()
        backward(probe, s)
        for n, p in probe.named_parameters():
            expected[n] += p.grad / 3
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n])
        assert p.grad is grad_objects[n] and torch.equal(p.grad, grads_before[n])
        torch.testing.assert_close(ref[n], expected[n], rtol=1e-6, atol=1e-7)


def test_capture_respects_num_batches_and_rejects_empty_input():
    model = tiny_mlp()
    two = capture_reference(model, iter(range(10)), loss_fn=ce_loss, num_batches=2)
    direct = capture_reference(model, [0, 1], loss_fn=ce_loss)
    assert all(torch.equal(two[n], direct[n]) for n in two.names)
    with pytest.raises(ValueError, match="no batch"):
        capture_reference(model, [], loss_fn=ce_loss)


def test_capture_uses_the_models_own_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]
    ref = capture_reference(model, batches)
    by_hand = capture_reference(model, batches, loss_fn=lambda m, b: m(**b).loss)
    assert set(ref.names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(ref[n], by_hand[n]) for n in ref.names)
    assert ref["classifier.weight"].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_save_load_roundtrip_and_guides_identically(tmp_path, storage):
    model = tiny_mlp()
    ref = capture_reference(model, [0, 1], loss_fn=ce_loss, reference_dtype=storage)
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    loaded = Reference.load(path, model)
    assert loaded.storage == storage and loaded.names == ref.names
    for n in ref.names:
        assert torch.equal(loaded[n], ref[n])
    assert [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]  # no temporary left behind

    results = []
    for r in (ref, loaded):
        m = tiny_mlp()
        opt = GuidedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), reference=r.bind(m), reference_dtype=storage)
        backward(m, 5)
        opt.step()
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(*results)


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_captured_reference_is_stored_as_reference_dtype(tmp_path, storage):
    """capture_reference(reference_dtype=...) keeps the mean gradient in that storage:
    its bytes per parameter, its values (bf16: the fp32 capture rounded to bf16; int8:
    quantised, not exact), and the dtype written to the file.

    Guards: capture_reference storing fp32 whatever reference_dtype says.
    """
    model = torch.nn.Sequential(torch.nn.Linear(6, 700), torch.nn.Tanh(), torch.nn.Linear(700, 3))
    loss_fn = lambda m, s: ce_loss(m, s)  # noqa: E731
    exact = capture_reference(model, [0, 1], loss_fn=loss_fn)
    ref = capture_reference(model, [0, 1], loss_fn=loss_fn, reference_dtype=storage)
    numels = [p.numel() for p in model.parameters()]  # 4200 (five int8 blocks of 1024), 700, 2100, 3
    per_tensor = {"fp32": lambda n: 4 * n, "bf16": lambda n: 2 * n, "int8": lambda n: n + 4 * -(-n // 1024)}
    assert ref.storage == storage
    assert ref.nbytes() == sum(per_tensor[storage](n) for n in numels)
    for name in ref.names:
        if storage == "fp32":
            assert torch.equal(ref[name], exact[name])
        elif storage == "bf16":
            assert torch.equal(ref[name], exact[name].bfloat16().float())
        else:  # the linear grid: each value within half a step (absmax / 127) of its block
            err = (ref[name] - exact[name]).abs().max().item()
            assert 0 < err <= 0.5 / 127 * exact[name].abs().max().item() * (1 + 1e-5), (name, err)
    path = tmp_path / "ref.safetensors"
    ref.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("/scale")}
    assert dtypes == {{"fp32": "F32", "bf16": "BF16", "int8": "I8"}[storage]}


def test_int8_reference_costs_about_one_byte_per_parameter():
    model = torch.nn.Linear(512, 512)
    ref = Reference({n: torch.randn_like(p) for n, p in model.named_parameters()}, storage="int8")
    assert ref.nbytes() / sum(p.numel() for p in model.parameters()) <= 1.05


def test_int8_file_metadata_names_the_code_it_holds(tmp_path):
    from safetensors import safe_open

    from sgg_optim.storage import INT8

    model = torch.nn.Linear(64, 64)
    path = tmp_path / "ref.safetensors"
    Reference({n: torch.randn_like(p) for n, p in model.named_parameters()}, storage="int8").save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("codes")}
    assert meta["storage"] == "int8" and meta["blocksize"] == str(INT8.blocksize)
    assert dtypes == {getattr(torch, meta["dtype"])}


def _write(tmp_path, model, tensors=None):
    path = tmp_path / "ref.safetensors"
    Reference(tensors or {n: torch.ones_like(p) for n, p in model.named_parameters()}).save(path)
    return path


def test_load_names_the_first_mismatch(tmp_path):
    model = tiny_mlp()
    full = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no tensor for trainable parameter '2.bias'"):
        Reference.load(_write(tmp_path, model, {n: t for n, t in full.items() if n != "2.bias"}), model)
    with pytest.raises(ValueError, match="'extra.weight' that the model lacks"):
        Reference.load(_write(tmp_path, model, {**full, "extra.weight": torch.ones(2)}), model)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(3, 3\)"):
        Reference.load(_write(tmp_path, model, {**full, "0.weight": torch.ones(3, 3)}), model)


def test_load_rejects_corrupt_truncated_and_foreign_files(tmp_path):
    model = tiny_mlp()
    path = _write(tmp_path, model)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    for bad in (truncated, garbage):
        before = bad.read_bytes()
        with pytest.raises(ValueError, match=bad.name):
            Reference.load(bad, model)
        assert bad.read_bytes() == before
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"0.weight": torch.ones(12, 6)}, str(foreign))
    with pytest.raises(ValueError, match="not an sgg-optim reference"):
        Reference.load(foreign, model)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Reference.load(tmp_path / "missing.safetensors", model)


def test_failed_save_leaves_the_existing_file_untouched(tmp_path, monkeypatch):
    """A writer that fails before writing a byte: the error reaches the caller, and
    nothing is left behind. (Crash mid-write: the test below.)"""
    model = tiny_mlp()
    path = _write(tmp_path, model)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sgg_optim.reference.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        Reference({n: torch.zeros_like(p) for n, p in model.named_parameters()}).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]


def test_save_that_crashes_mid_write_leaves_the_old_file_byte_for_byte(tmp_path, monkeypatch):
    """A save killed half-way through writing must not damage the file already at the
    target path: the writer really writes (to whatever path save() hands it), then
    the file it wrote is cut short and overwritten with garbage, then it raises.

    Guards: Reference.save calling save_file(tensors, path) directly (no temporary file and rename).
    """
    from safetensors.torch import save_file as real_save_file

    model = tiny_mlp()
    path = _write(tmp_path, model)
    before = path.read_bytes()
    written = []

    def crash_mid_write(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        written.append(Path(filename))
        with open(filename, "r+b") as f:  # a partial write: half the bytes, the tail torn
            f.truncate(len(before) // 2)
            f.seek(len(before) // 4)
            f.write(b"\xff" * 64)
        raise OSError("killed mid-write")

    monkeypatch.setattr("sgg_optim.reference.save_file", crash_mid_write)
    with pytest.raises(OSError, match="killed mid-write"):
        Reference({n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}).save(path)
    assert len(written) == 1  # the writer did run and write a (torn) file somewhere
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]  # the torn temporary is gone
    loaded = Reference.load(path, model)
    assert all(torch.equal(loaded[n], torch.ones_like(p)) for n, p in model.named_parameters())
