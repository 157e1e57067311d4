"""L-Tuning on tiny BERT and Llama models built from a config, with a hand-made word-level tokenizer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from sgg_optim.fewshot.training import RunConfig  # noqa: E402
from sgg_optim.methods.ltuning import (  # noqa: E402
    LabelTuningClassifier, backbone_and_tokenizer, kv_to_prefix, last_token_pool, prepare_ltuning,
)

WORDS = ["negative", "positive", "good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "plot"]
LABELS = ("negative", "positive")
POS, NEG = ["good", "great", "fine"], ["bad", "awful", "poor"]
# peft's prompt-learning setup calls a transformers method deprecated in v5; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def one_thread():
    # 32-wide models: threading overhead dominates, and the shared machine has 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def word_tokenizer(bert: bool) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<unk>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if bert else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    # Llama-like: no pad token, left padding (like the benchmark's PromptTokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", padding_side="left")


class FakeVerbalizerLM(nn.Module):
    """Stands in for incontext.VerbalizerLM: only its ``.lm`` attribute matters to L-Tuning."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm


def factory(arch: str, seed: int = 0) -> tuple[nn.Module, object]:
    """What the benchmark's model factory hands a ``prepare`` hook, in miniature."""
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, num_labels=2)
        return BertForSequenceClassification(cfg), word_tokenizer(bert=True)
    cfg = LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    prompt_tok = SimpleNamespace(tokenizer=word_tokenizer(bert=False), label_names=LABELS)
    return FakeVerbalizerLM(LlamaForCausalLM(cfg)), prompt_tok


def toy_task(n: int = 8, seed: int = 0) -> tuple[list[str], list[int]]:
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        words = POS if i % 2 else NEG
        picks = torch.randint(0, 3, (2,), generator=g).tolist()
        texts.append(f"the movie was {words[picks[0]]} {words[picks[1]]}")
        labels.append(i % 2)
    return texts, labels


def ctx_for(tokenizer: object) -> SimpleNamespace:
    texts, labels = toy_task()
    task = SimpleNamespace(name="toy", label_names=LABELS, num_labels=2, train_texts=tuple(texts),
                           train_labels=tuple(labels), eval_texts=tuple(texts), eval_labels=tuple(labels))
    return SimpleNamespace(tokenizer=tokenizer, task=task, train_texts=tuple(texts), train_labels=tuple(labels),
                           cfg=RunConfig(steps=10, batch_size=8, max_length=16), seed=0, lr=1e-2)


def batch_of(tokenizer, texts, labels) -> dict:
    b = dict(tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt"))
    b["labels"] = torch.tensor(labels)
    return b


def train(model: nn.Module, tokenizer, steps: int, lr: float = 1e-2) -> list[float]:
    texts, labels = toy_task()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch_of(tokenizer, texts, labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def prepared(arch: str, regime: str, **kw):
    model, tok = factory(arch)
    backbone = copy.deepcopy(backbone_and_tokenizer(model, tok)[0])  # the pretrained weights, untouched
    clf, hf_tok = prepare_ltuning(regime, **kw)(model, ctx_for(tok))
    return clf, hf_tok, backbone


CASES = [("bert", "prompt"), ("bert", "prefix"), ("llama", "prompt"), ("llama", "prefix")]


@pytest.mark.parametrize("arch,regime", CASES)
def test_label_embeddings_are_frozen_models_pooled_label_encodings(arch, regime):
    clf, tok, backbone = prepared(arch, regime)
    backbone.eval()
    reps = []
    with torch.no_grad():
        for name in LABELS:
            enc = tok(name, return_tensors="pt")
            hidden = backbone(**enc).last_hidden_state[0]
            reps.append(hidden.mean(0) if arch == "bert" else hidden[-1])  # one unpadded text: no mask needed
    assert clf.pooling == ("mean" if arch == "bert" else "last")
    torch.testing.assert_close(clf.label_embeddings.detach(), torch.stack(reps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,regime", CASES)
def test_only_label_parameters_train_and_pretrained_weights_stay_bit_identical(arch, regime):
    clf, tok, backbone = prepared(arch, regime, learnable_scale=True)
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {"label_embeddings", "log_scale", "peft_model.prompt_encoder.default.embedding.weight"}
    train(clf, tok, steps=3)
    changed = {n for n, p in clf.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    pretrained = dict(clf.peft_model.get_base_model().named_parameters())
    assert set(pretrained) == {n for n, _ in backbone.named_parameters()}
    for name, p in backbone.named_parameters():
        assert torch.equal(pretrained[name], p), name


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prompt_starts_from_label_token_input_embeddings(arch):
    clf, tok, backbone = prepared(arch, "prompt", num_virtual_tokens=5)
    ids = tok(" ".join(LABELS), add_special_tokens=False)["input_ids"]
    tiled = (ids * 3)[:5]  # tiled to the asked length, like PEFT's TEXT init
    assert clf.init_token_ids == tiled
    weight = clf.peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight, backbone.get_input_embeddings().weight[tiled])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prefix_starts_from_label_text_keys_and_values(arch):
    clf, tok, backbone = prepared(arch, "prefix")
    ids = tok(" ".join(LABELS), add_special_tokens=False)["input_ids"]
    backbone.eval()
    cache = DynamicCache()
    with torch.no_grad():
        backbone(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    weight = clf.peft_model.prompt_encoder["default"].embedding.weight
    layers = weight.view(len(ids), len(cache.layers), 2, *cache.layers[0].keys.shape[1:2], -1)  # [T, L, 2, heads, hd]
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layers[:, i, 0], layer.keys[0].transpose(0, 1))
        assert torch.equal(layers[:, i, 1], layer.values[0].transpose(0, 1))


def test_llama_prefix_at_init_equals_the_label_text_prepended():
    # causal attention: the label text's own K/V as prefix is exactly that text in front of the input
    clf, tok, backbone = prepared("llama", "prefix")
    ids = tok(" ".join(LABELS), add_special_tokens=False)["input_ids"]
    enc = tok(["the movie was good", "bad"], padding=True, return_tensors="pt")
    clf.eval()
    backbone.eval()
    with torch.no_grad():
        reps = clf.encode(enc["input_ids"], enc["attention_mask"])
        for row in range(2):
            n = int(enc["attention_mask"][row].sum())
            full = torch.tensor([ids + enc["input_ids"][row, :n].tolist()])
            torch.testing.assert_close(reps[row], backbone(input_ids=full).last_hidden_state[0, -1],
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,regime", CASES)
def test_learns_a_separable_toy_task(arch, regime):
    clf, tok, _ = prepared(arch, regime)
    losses = train(clf, tok, steps=30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    texts, labels = toy_task()
    clf.eval()  # dropout off: it fits the training set
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        pred = clf(**enc).logits.argmax(-1)
    assert pred.tolist() == labels


@pytest.mark.parametrize("arch,regime", CASES)
def test_benchmark_interface(arch, regime):
    clf, tok, _ = prepared(arch, regime)
    texts, labels = toy_task(3)
    out = clf(**batch_of(tok, texts, labels))  # BERT's batch carries token_type_ids too
    assert out.logits.shape == (3, 2) and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor(labels)))
    assert out.logits.abs().max() <= clf.scale + 1e-4  # scaled cosine
    if arch == "llama":
        assert tok.pad_token == "</s>" and tok.padding_side == "right"


def test_decoder_tokenizer_is_copied_not_mutated():
    model, tok = factory("llama")
    _, hf_tok = prepare_ltuning("prompt")(model, ctx_for(tok))
    assert hf_tok is not tok.tokenizer and tok.tokenizer.pad_token is None and tok.tokenizer.padding_side == "left"


def test_last_token_pool_left_and_right_padding_agree():
    clf, tok, _ = prepared("llama", "prompt")
    texts = ["the movie was good", "bad"]
    clf.eval()
    with torch.no_grad():
        right = clf.encode(**{k: v for k, v in tok(texts, padding=True, return_tensors="pt").items()})
        singles = torch.cat([clf.encode(**tok([t], return_tensors="pt")) for t in texts])
    torch.testing.assert_close(right, singles, rtol=1e-4, atol=1e-5)
    h = torch.arange(6.0).view(1, 6, 1).expand(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    assert last_token_pool(h, mask).flatten().tolist() == [2.0, 5.0]


def test_kv_to_prefix_layout_matches_peft_view():
    keys = [torch.randn(2, 3, 4) for _ in range(2)]  # [heads, T, hd] per layer
    values = [torch.randn(2, 3, 4) for _ in range(2)]
    w = kv_to_prefix(keys, values)
    # PEFT: view [B, T, L*2, heads, hd], permute to [L*2, B, heads, T, hd], split in twos per layer
    pkv = w.unsqueeze(0).view(1, 3, 4, 2, 4).permute(2, 0, 3, 1, 4).split(2)
    for layer, kv in enumerate(pkv):
        assert torch.equal(kv[0, 0], keys[layer]) and torch.equal(kv[1, 0], values[layer])


def test_clear_errors():
    with pytest.raises(ValueError, match="regime"):
        prepare_ltuning("suffix")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prepare_ltuning("prompt", num_virtual_tokens=0)
    model, tok = factory("bert")
    backbone, hf_tok = backbone_and_tokenizer(model, tok)
    with pytest.raises(ValueError, match="label_names"):
        LabelTuningClassifier(backbone, hf_tok, ["positive"])
    with pytest.raises(ValueError, match="pooling"):
        LabelTuningClassifier(backbone, hf_tok, LABELS, pooling="max")
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(target_modules=["query", "value"], r=2))
    with pytest.raises(ValueError, match="PEFT-wrapped"):
        prepare_ltuning("prompt")(lora, ctx_for(tok))
