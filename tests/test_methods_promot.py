"""ProMoT on tiny models built from configs: what each stage may and may not change."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast)
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from sgg_optim.fewshot.training import RunConfig  # noqa: E402
from sgg_optim import GuidedAdamW  # noqa: E402
from sgg_optim.methods.promot import (attach_prompt, prepare_promot, promot, prompt_model, train_model,  # noqa: E402
                                      train_prompt, without_prompt)

WORDS = "[PAD] [UNK] the a film movie was is good bad great awful plot acting very not fun dull".split()
TEXTS = ("the film was good", "a very bad movie", "great acting", "the plot is dull", "not fun", "very great fun",
         "awful acting", "the movie was not bad")
LABELS = (1, 0, 1, 0, 0, 1, 0, 1)


def tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   padding_side=padding_side)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


class TinyVerbalizer(nn.Module):
    """Stand-in for VerbalizerLM: last position's logits of fixed label words, prompt positions dropped."""

    def __init__(self, lm: nn.Module, label_ids: tuple[int, ...] = (8, 9)) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(label_ids), persistent=False)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1]:]
        scores = logits[:, -1, self.label_ids]  # left padding: the last position is every row's last token
        loss = F.cross_entropy(scores, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=scores)


def batches(tok, n: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(start, start + n):
        idx = [(s * 3 + j) % len(TEXTS) for j in range(4)]
        enc = dict(tok([TEXTS[i] for i in idx], truncation=True, max_length=16, padding=True, return_tensors="pt"))
        enc["labels"] = torch.tensor([LABELS[i] for i in idx])
        out.append(enc)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def is_prompt(name: str) -> bool:
    return "prompt_encoder" in name


@pytest.fixture(params=["bert", "llama"])
def case(request):
    if request.param == "bert":
        return tiny_bert(), tokenizer()
    return TinyVerbalizer(tiny_llama()), tokenizer("left")


def test_stage1_changes_only_prompt_and_fresh_head(case):
    base, tok = case
    pretrained = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach_prompt(base, num_virtual_tokens=3, seed=0)
    before = snapshot(model)
    losses = train_prompt(model, batches(tok, 2), lr=1e-2)
    moved = changed(before, model)
    head = {n for n in before if ".modules_to_save." in n}
    assert len(losses) == 2
    assert {n for n in moved if is_prompt(n)} == {n for n in before if is_prompt(n)}
    assert moved - head == {n for n in before if is_prompt(n)}  # nothing pretrained moved
    assert head == moved - {n for n in before if is_prompt(n)}  # the fresh SEQ_CLS head trained (none for LM)
    inner = without_prompt(model)
    for k, v in inner.state_dict().items():  # also against weights taken before any wrapping
        if ".modules_to_save." not in k:
            assert torch.equal(v, pretrained[k.replace(".original_module", "")]), k


def test_stage1_keeps_existing_lora_frozen():
    tok = tokenizer()
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"], task_type="SEQ_CLS"))
    model = attach_prompt(lora, num_virtual_tokens=3, seed=0)
    before = snapshot(model)
    train_prompt(model, batches(tok, 2), lr=1e-2)
    moved = changed(before, model)
    assert moved and all(is_prompt(n) or ".modules_to_save." in n for n in moved)
    assert any("lora_A" in n for n in before)  # the LoRA layers survived the unwrap


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_keeps_prompt_and_trains_model_or_lora_only(case, lora):
    base, tok = case
    model = promot(base, batches(tok, 2), [], num_virtual_tokens=3, prompt_lr=1e-2, lora=lora, seed=0)
    before = snapshot(model)
    train_model(model, batches(tok, 2, start=5), lr=1e-3)
    moved = changed(before, model)
    prompt = {n for n in before if is_prompt(n)}
    assert not moved & prompt
    if lora:
        assert {n for n in moved if "lora_A" in n} and {n for n in moved if "lora_B" in n}
        assert all("lora_" in n or ".modules_to_save." in n for n in moved)
    else:
        assert not any("lora_" in n for n in before)
        body = {n for n in before if ".layers.1." in n or ".layer.1." in n}
        assert body and body <= moved  # every weight of the last block moved
        assert not any(".original_module." in n for n in moved)  # the bypassed head copy stays put


def bert_expected(model: nn.Module) -> nn.Module:
    """An independent BERT holding the tuned weights (trained head copy as the head)."""
    state = {k.replace(".modules_to_save.default", ""): v for k, v in without_prompt(model).state_dict().items()
             if ".original_module." not in k}
    ref = tiny_bert(seed=1)
    ref.load_state_dict(state)
    return ref.eval()


def test_without_prompt_matches_bare_bert():
    tok = tokenizer()
    model = promot(tiny_bert(), batches(tok, 2), batches(tok, 2, start=2), num_virtual_tokens=3,
                   prompt_lr=1e-2, model_lr=1e-3, seed=0)
    enc = dict(tok(list(TEXTS), padding=True, return_tensors="pt"))
    model.eval()
    with torch.no_grad():
        got = without_prompt(model)(**enc).logits
        want = bert_expected(model)(**enc).logits
        prompted = model(**enc).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(prompted, want, atol=1e-4)  # the prompt does change the output


def test_without_prompt_matches_bare_lm_and_leaves_model_prompted():
    tok = tokenizer("left")
    model = promot(TinyVerbalizer(tiny_llama()), batches(tok, 2), batches(tok, 2, start=2), num_virtual_tokens=3,
                   prompt_lr=1e-2, model_lr=1e-3, seed=0)
    bare = tiny_llama(seed=1)
    bare.load_state_dict(without_prompt(model).lm.state_dict())
    enc = dict(tok(list(TEXTS), padding=True, return_tensors="pt"))
    model.eval()
    with torch.no_grad():
        got = without_prompt(model)(**enc).logits
        want = TinyVerbalizer(bare.eval())(**enc).logits
        prompted = model(**enc).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(prompted, want, atol=1e-4)
    assert prompt_model(model) is model.lm  # the view did not strip the original


def test_stage2_optimizer_factory_is_used():
    tok = tokenizer()
    made: list[GuidedAdamW] = []

    def factory(named):
        made.append(GuidedAdamW(named, lr=1e-3, direction="cone", max_angle=60.0))
        return made[0]

    model = promot(tiny_bert(), batches(tok, 1), batches(tok, 3), num_virtual_tokens=2, optimizer_factory=factory)
    (opt,) = made
    assert opt.stats["step"] == 3 and opt.stats["grad_norm"] > 0
    guided = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(prompt_model(model).prompt_encoder.default.embedding.weight) not in guided
    assert id(model.base_model.bert.encoder.layer[0].output.dense.weight) in guided


def ctx_for(model_tok, seed: int = 3, steps: int = 3):
    task = SimpleNamespace(name="toy", label_names=("neg", "pos"), num_labels=2, train_texts=TEXTS,
                           train_labels=LABELS, eval_texts=TEXTS, eval_labels=LABELS)
    return SimpleNamespace(tokenizer=model_tok, task=task, train_texts=TEXTS[:6], train_labels=LABELS[:6],
                           cfg=RunConfig(steps=steps, batch_size=4, max_length=16), seed=seed, lr=1e-3)


def test_prepare_promot_runs_stage1_and_readies_stage2():
    tok = tokenizer()
    ctx = ctx_for(tok)
    init = prompt_model(attach_prompt(tiny_bert(), num_virtual_tokens=4, seed=ctx.seed))
    rng = torch.random.get_rng_state()
    model, out_tok = prepare_promot(prompt_lr=1e-2, num_virtual_tokens=4)(tiny_bert(), ctx)
    assert torch.equal(rng, torch.random.get_rng_state())  # stage 1 drew from its own generator
    again, _ = prepare_promot(prompt_lr=1e-2, num_virtual_tokens=4)(tiny_bert(), ctx)
    untrained, _ = prepare_promot(stage1_steps=0, num_virtual_tokens=4)(tiny_bert(), ctx)
    weight = lambda m: prompt_model(m).prompt_encoder.default.embedding.weight  # noqa: E731
    assert out_tok is tok
    assert torch.equal(weight(untrained), weight(init))  # seeded init, zero steps
    assert not torch.equal(weight(model), weight(init))
    assert torch.equal(weight(model), weight(again))  # same seed, same stage 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"prompt_encoder.default.embedding.weight", "base_model.classifier.original_module.weight",
                      "base_model.classifier.original_module.bias"}
    assert "base_model.bert.encoder.layer.0.attention.self.query.weight" in trainable


def test_prepare_promot_on_lora_model_trains_lora_and_head_only():
    tok = tokenizer()
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"], task_type="SEQ_CLS"))
    model, _ = prepare_promot(prompt_lr=1e-2, num_virtual_tokens=2)(lora, ctx_for(tok))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable)
    out = model(**batches(tok, 1)[0])
    assert out.logits.shape == (4, 2) and out.loss.requires_grad


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        attach_prompt(tiny_bert(), num_virtual_tokens=0)
    with pytest.raises(ValueError, match="stage1_steps"):
        prepare_promot(stage1_steps=-1)
    with pytest.raises(ValueError, match="prompt_lr"):
        prepare_promot(prompt_lr=0.0)
    with pytest.raises(ValueError, match="soft prompt"):
        without_prompt(tiny_bert())
    with pytest.raises(ValueError, match="lora"):
        promot(tiny_bert(), [], [], lora="yes")
    model = attach_prompt(tiny_bert(), num_virtual_tokens=2)
    with pytest.raises(ValueError, match="already has a soft prompt"):
        attach_prompt(copy.deepcopy(model))


def test_stage1_head_learning_rate_is_separate_from_the_prompts():
    base, tok = tiny_bert(), tokenizer()
    model = attach_prompt(base, num_virtual_tokens=3, seed=0)
    before = snapshot(model)
    train_prompt(model, batches(tok, 2), lr=1e-2, head_lr=1e-9)
    after = dict(model.named_parameters())
    head = [n for n in before if ".modules_to_save." in n and after[n].requires_grad]
    prompt = [n for n in before if is_prompt(n)]
    assert head and prompt
    assert all((after[n] - before[n]).abs().max() < 1e-6 for n in head)  # AdamW steps ~ lr: tiny
    assert all((after[n] - before[n]).abs().max() > 1e-4 for n in prompt)
    with pytest.raises(ValueError, match="head_lr"):
        train_prompt(model, batches(tok, 1), head_lr=0.0)
