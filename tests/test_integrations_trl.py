"""TRL's trainers (SFT, DPO) with the guided optimizer, as TRL users set them up.

Tiny Llama models and a character-level tokenizer, built offline.
"""

from __future__ import annotations

import string

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from sgg_optim import GuidedAdamW, GuidedOptimizer, capture_reference  # noqa: E402
from sgg_optim.integrations.transformers import GuidanceCallback  # noqa: E402

WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird"]


@pytest.fixture(scope="module")
def tok():
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *string.ascii_letters, " ", "-", ">"])}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=64)


def _lm(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                        max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


def _texts(n=16):
    return Dataset.from_list([{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 4))}
                              for i in range(n)])


def _sft(tok, tmp_path, model, optimizer, **kw):
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=1e-3, max_grad_norm=0, max_length=32, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return trl.SFTTrainer(model=model, args=args, train_dataset=_texts(), processing_class=tok,
                          optimizer_cls_and_kwargs=optimizer, callbacks=[GuidanceCallback()], **kw)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sft_trainer_with_guidance_off_is_adamw_bit_for_bit(tok, tmp_path):
    runs = {}
    for name, optimizer in [("adamw", (torch.optim.AdamW, {"lr": 1e-3})),
                            ("off", (GuidedAdamW, {"lr": 1e-3, "direction": "off", "magnitude": "off"}))]:
        model = _lm(tok)
        _sft(tok, tmp_path / name, model, optimizer).train()
        runs[name] = _params(model)
    assert runs["adamw"].keys() == runs["off"].keys()
    assert all(torch.equal(runs["adamw"][n], runs["off"][n]) for n in runs["adamw"])
    assert not torch.equal(runs["adamw"]["lm_head.weight"], _lm(tok).lm_head.weight)  # it trained


def test_sft_trainer_with_peft_config_guides_the_adapters_toward_a_reference_captured_on_trainer_model(tok, tmp_path):
    # the recipe of docs/distributed.md: build the trainer, capture on trainer.model (the
    # LoRA parameters exist only now), put the reference into the keywords, then train
    kwargs = {"lr": 1e-3, "max_angle": 30}
    trainer = _sft(tok, tmp_path, _lm(tok), (GuidedAdamW, kwargs),
                   peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch = tok(["cat dog sun", "red blue tree"], padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    kwargs["reference"] = capture_reference(trainer.model, [dict(batch)])
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    guided = trainer.optimizer.optimizer
    assert isinstance(guided, GuidedOptimizer) and guided.reference_mode != "ema"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["guidance/step"] for h in logs] == [1, 2, 3]  # once per optimizer step (accumulation 2)


def test_a_reference_captured_before_peft_config_added_the_adapters_says_where_to_capture(tok, tmp_path):
    model = _lm(tok)
    batch = tok(["cat dog sun"], return_tensors="pt")
    ref = capture_reference(model, [{**batch, "labels": batch["input_ids"]}])
    trainer = _sft(tok, tmp_path, model, (GuidedAdamW, {"lr": 1e-3, "reference": ref}),
                   peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"peft_config.*trainer\.model"):
        trainer.train()


def test_dpo_trainer_takes_a_guided_optimizer_instance(tok, tmp_path):
    # TRL's DPOTrainer has no optimizer_cls_and_kwargs: the optimizer goes in as an instance
    data = Dataset.from_list([{"prompt": f"{w} ->", "chosen": f" {w.upper()}", "rejected": f" {w[::-1]}"}
                              for w in WORDS])
    runs = {}
    for name in ("adamw", "off", "guided"):
        model = _lm(tok)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "adamw" else
               GuidedAdamW(model.parameters(), lr=1e-3, direction="off", magnitude="off") if name == "off" else
               GuidedAdamW(model.parameters(), lr=1e-3, warmup_steps=1, max_angle=10))
        args = trl.DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, max_grad_norm=0, max_length=32, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
        trainer = trl.DPOTrainer(model=model, ref_model=_lm(tok), args=args, train_dataset=data,
                                 processing_class=tok, optimizers=(opt, None), callbacks=[GuidanceCallback()])
        trainer.train()
        runs[name] = (_params(model), trainer)
    assert all(torch.equal(runs["adamw"][0][n], runs["off"][0][n]) for n in runs["adamw"][0])
    guided_logs = [h for h in runs["guided"][1].state.log_history if "loss" in h]
    assert [h["guidance/step"] for h in guided_logs] == [1, 2, 3]
    assert sum(h["guidance/projected"] for h in guided_logs) > 0  # the cone acted
    assert all(torch.isfinite(p).all() for p in runs["guided"][0].values())
