"""QLoRA with guidance: a 4-bit tiny Llama (bitsandbytes' CPU path), PEFT LoRA adapters,
guided paged 8-bit AdamW over the adapters only."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import GradientWatch

from sgg_optim import GuidedPagedAdamW8bit
from sgg_optim.integrations.bitsandbytes import keep_4bit_layout_for_training
from sgg_optim.integrations.peft import (
    adapter_named_parameters,
    base_weight_bytes,
    check_only_adapters_train,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora_fewshot.py"


@pytest.fixture(autouse=True)
def one_thread():
    """bnb's OpenMP CPU kernels spin on a loaded 2-core machine; one thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def qlora_model(folder: Path, *, keep_layout: bool = True, lora_init: bool = True):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    if keep_layout:
        assert keep_4bit_layout_for_training(model) == 14
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                           init_lora_weights=lora_init)
    return peft.get_peft_model(model, lora)


def four_bit_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_guided_qlora_step_changes_only_adapters(tiny_folder):
    """Guided steps change every adapter and nothing else; guidance really rewrote the
    adapter gradients the 8-bit optimizer stepped with.

    Guards: apply_guidance_ not writing the gradients (EMA update kept).
    """
    model = qlora_model(tiny_folder)
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state is not None for m in layers)
    assert model.is_gradient_checkpointing
    named = adapter_named_parameters(model)
    check_only_adapters_train(model)
    assert len(named) == 2 * len(layers) and all("lora_" in n for n, _ in named)

    frozen = base_weight_bytes(model)
    packed = [m.weight.detach().clone() for m in layers]
    absmax = [m.weight.quant_state.absmax.detach().clone() for m in layers]
    adapters = {n: p.detach().clone() for n, p in named}

    opt = GuidedPagedAdamW8bit(named, lr=1e-2, weight_decay=0.0, warmup_steps=1, reference_dtype="int8")
    watch = GradientWatch(opt)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()  # an evaluation pass, as a few-shot loop does, must not touch the 4-bit bytes
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    for _ in range(3):  # lora_B starts at zero, so lora_A first gets a gradient on step 2
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in adapters)
        opt.step()

    assert opt.stats["step"] == 3 and math.isfinite(opt.stats["cos"])
    watch.assert_rewrote_where_reported(min_steps=1)  # guidance ran: it rotated step 3's gradients
    refs = opt.state_dict()["guidance"]["refs"]  # the EMA reference of every adapter, in int8 (linear grid)
    assert sorted(refs) == list(range(len(named)))
    assert all({n: t.dtype for n, t in entry["ema"].items()} == {"codes": torch.int8, "scale": torch.float32}
               for entry in refs.values())
    changed = [n for n, p in named if not torch.equal(p, adapters[n])]
    assert changed == [n for n, _ in named], "every adapter tensor should have moved"
    for m, w, a in zip(layers, packed, absmax):
        assert torch.equal(m.weight, w), "4-bit packed weight changed"
        assert torch.equal(m.weight.quant_state.absmax, a), "4-bit absmax changed"
    now = base_weight_bytes(model)
    assert now.keys() == frozen.keys()
    for name, before in frozen.items():
        assert before.dtype == now[name].dtype and torch.equal(before, now[name]), f"{name} changed"


def test_check_only_adapters_train_names_the_culprit(tiny_folder):
    model = qlora_model(tiny_folder)
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        check_only_adapters_train(model)


def _load_example():
    spec = importlib.util.spec_from_file_location("qlora_fewshot", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_example_runs_end_to_end_on_tiny_llama():
    example = _load_example()
    out = example.main(["--tiny", "--steps", "4", "--batch", "8", "--eval", "16", "--max-tokens", "48"])
    assert out["quantized"] is True  # bitsandbytes' CPU 4-bit path
    assert len(out["losses"]) == 4 and all(math.isfinite(v) for v in out["losses"])
    assert 0.0 <= out["accuracy_after"] <= 1.0
    opt = out["optimizer"]
    assert type(opt.base_optimizer) is bnb.optim.PagedAdamW8bit
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in out["model"].parameters() if p.requires_grad}
    assert held == trainable and all("lora_" in n for g in opt.param_groups for n in g["param_names"])


def _adapter_grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eval_forward_keeps_4bit_gradients_exact(tiny_folder):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward (on
    AVX512-BF16 CPUs), after which training silently loses the gradient path through
    the frozen layers. keep_4bit_layout_for_training prevents it: the adapter gradients
    after an eval pass are exactly those before it."""
    model = qlora_model(tiny_folder, lora_init=False)  # random B: every adapter has a gradient
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _adapter_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = _adapter_grads(model, ids)
    assert all(g.abs().sum() > 0 for g in before.values())
    for name, g in before.items():
        assert torch.equal(g, after[name]), name
