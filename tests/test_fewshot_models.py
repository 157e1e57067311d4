"""Your own model folder (`sgg_optim.fewshot.models`): what a folder brings beyond BERT's
layout is read from it, or refused before anything trains (an eighth outside probe)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    BertConfig, BertForSequenceClassification, BertTokenizerFast, DistilBertConfig,
    DistilBertForSequenceClassification,
)

from sgg_optim.fewshot import training
from sgg_optim.fewshot.models import encoder_factory, load_tokenizer, model_kind
from sgg_optim.fewshot.strategies import get_strategy
from sgg_optim.fewshot.tasks import Task

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "the", "was"]


def _tokenizer(pad=True):
    special = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, pad_token="[PAD]" if pad else None,
                             **special)


def _save(tmp_path, model, tok=None):
    model.save_pretrained(str(tmp_path))
    (tok or _tokenizer()).save_pretrained(str(tmp_path))
    return tmp_path


def _bert(**kw):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, **kw))


def _distilbert():
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(WORDS), dim=16, hidden_dim=32,
                                                                n_layers=1, n_heads=2, num_labels=2))


def _task(n=3):
    names = tuple(f"c{i}" for i in range(n))
    texts = tuple(f"the film was {'good' if i % 2 else 'bad'}" for i in range(12))
    labels = tuple(i % n for i in range(12))
    return Task("mine", names, texts, labels, texts[:n], labels[:n])


@pytest.mark.parametrize("problem_type, num_labels", [("multi_label_classification", 3), ("regression", 1)])
def test_a_folders_problem_type_is_replaced_by_single_label_cross_entropy(tmp_path, problem_type, num_labels):
    folder = _save(tmp_path, _bert(problem_type=problem_type, num_labels=num_labels))
    model, tok = encoder_factory(folder)(_task(3))
    batch = dict(tok(["the film was good", "bad", "the film"], padding=True, return_tensors="pt"))
    labels = torch.tensor([0, 1, 2])
    out = model(**batch, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_a_tokenizer_with_nothing_to_pad_with_is_refused_naming_the_folder(tmp_path):
    folder = _save(tmp_path, _bert(), _tokenizer(pad=False))
    with pytest.raises(ValueError, match=rf"{tmp_path}: the tokenizer has neither a pad token nor an eos token"):
        load_tokenizer(folder)


def test_texts_are_cut_at_the_models_positions(tmp_path):
    folder = _save(tmp_path, _bert(max_position_embeddings=16))
    model, tok = encoder_factory(folder)(_task(2))
    batch = training.encode(tok, ["the film was good " * 20], max_length=64)
    assert batch["input_ids"].shape[1] == 16
    model(**batch)  # past 16 positions this raised mid-run


def test_the_fresh_head_is_everything_outside_the_body(tmp_path):
    # DistilBERT's head is pre_classifier + classifier: both fresh, both the probe's, both LoRA's to train
    folder = _save(tmp_path, _distilbert())
    model, tok = encoder_factory(folder)(_task(2))
    assert {n.split(".")[0] for n in training.head_names(model)} == {"pre_classifier", "classifier"}
    lora = training.apply_lora(model)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("q_lin.lora_A" in n for n in trainable) and any("v_lin.lora_A" in n for n in trainable)
    assert any("pre_classifier" in n for n in trainable) and any(".classifier." in n for n in trainable)
    # and under the PEFT wrapper, the head is still both modules (LP-FT's probe, an unguided head)
    wrapped = {n.split(".")[2] for n in training.head_names(lora)}
    assert wrapped == {"pre_classifier", "classifier"}


def test_rotary_and_relative_positions_set_no_limit(tmp_path):
    from transformers import LlamaConfig

    from sgg_optim.fewshot.models import _position_limit

    LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=24).save_pretrained(str(tmp_path / "llama"))
    _bert(max_position_embeddings=24).config.save_pretrained(str(tmp_path / "bert"))
    assert _position_limit(tmp_path / "llama") is None
    assert _position_limit(tmp_path / "bert") == 24


def test_lp_fts_probe_trains_the_whole_fresh_head(tmp_path):
    folder = _save(tmp_path, _distilbert())
    model, tok = encoder_factory(folder)(_task(2))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    cfg = training.RunConfig(steps=3, batch_size=4, max_length=8)
    task = _task(2)
    training.train(model, get_strategy("lp-ft"), 1e-2, training.batches(tok, task.train_texts, task.train_labels,
                                                                         cfg, 0), cfg,  # probe: 1 of 3 steps
                   on_step=lambda step: seen.append({n: p.detach().clone() for n, p in model.named_parameters()}))
    moved = [{n.split(".")[0] for n, p in after.items() if not torch.equal(p, start[n])} for after in seen]
    assert moved[0] == {"pre_classifier", "classifier"}  # the probe: the whole fresh head, nothing else
    assert "distilbert" in moved[-1]


def test_an_older_sentence_transformers_layout_points_to_the_model_inside(tmp_path):
    _save(tmp_path / "0_Transformer", _bert())
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "0_Transformer"}]))
    with pytest.raises(ValueError, match="no config.json.*may be in .*0_Transformer"):
        model_kind(tmp_path)


def test_a_lora_row_without_known_attention_names_stops_compare_before_anything_trains(tmp_path):
    from transformers import XLNetConfig, XLNetForSequenceClassification

    from sgg_optim.fewshot.compare import InputError, compare

    def factory(task):  # XLNet's attention keeps q/k/v as parameters of one module: nothing for LoRA to wrap
        return XLNetForSequenceClassification(XLNetConfig(vocab_size=len(WORDS), d_model=16, n_layer=1, n_head=2,
                                                          d_inner=32, num_labels=task.num_labels)), _tokenizer()

    task = Task("mine", ("a", "b"), tuple(f"t{i}" for i in range(40)), tuple(i % 2 for i in range(40)),
                ("t0", "t1"), (0, 1))
    with pytest.raises(InputError, match="XLNetForSequenceClassification has no attention projection"):
        compare(task, factory, ["adamw", "lora"], shots=2, seeds=1, steps=1, out=tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_the_head_under_a_prompt_learning_wrapper_is_found_at_its_path():
    # ProMoT and L-Tuning wrap the model with prompt learning: the base sits at base_model, not base_model.model
    from peft import PromptTuningConfig, get_peft_model

    wrapped = get_peft_model(_bert(num_labels=2), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    tops = {n.split(".")[1] for n in training.head_names(wrapped)}
    assert tops == {"classifier"}
