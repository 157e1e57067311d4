"""Label-word scoring, VerbalizerLM, ICL formatting and in-context retention on a tiny Llama."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from sgg_optim.methods.incontext import (  # noqa: E402
    PromptTokenizer, VerbalizerLM, apply_lora_lm, demonstration_indices, label_loglik, prepare_icl_format,
    with_demonstrations,
)
from sgg_optim.methods.retention import icl_reference, in_context_accuracy, query_indices, retention_lm  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[EOS]", "Text", "Label", ":", "neg", "pos", "very", "good", "bad"]
WORDS += [f"w{i}" for i in range(30)]


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]", **extra)


def make_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def hand_loglik(lm, tok, prompt: str, choice: str) -> float:
    """Sum of log_softmax(logits) over the choice's tokens, one unpadded sequence."""
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = lm(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
    return sum(logp[len(p) - 1 + t, c[t]].item() for t in range(len(c)))


def texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=g).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 30, (m,), generator=g)) for m in lengths]


@pytest.fixture
def lm():
    return make_lm()


@pytest.fixture
def tok():
    return make_tokenizer()


# ---------------------------------------------------------------- the scorer

def test_label_loglik_matches_hand_computation_with_padding(lm, tok):
    prompts = ["Text: w1\nLabel:", "Text: w2 w3 w4 w5 w6 w7\nLabel:", "Text: w8 w9 w10\nLabel:"]
    choices = [" pos", " very good"]  # a 1-token and a 2-token continuation
    got = label_loglik(lm, tok, prompts, choices, batch_size=3)
    want = torch.tensor([[hand_loglik(lm, tok, p, c) for c in choices] for p in prompts])
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # single-token fast path (one gather at the last prompt position), per-prompt choice lists
    per_prompt = [[" neg", " pos"], [" bad", " good"], [" pos", " neg"]]
    got1 = label_loglik(lm, tok, prompts, per_prompt, batch_size=2)
    want1 = torch.tensor([[hand_loglik(lm, tok, p, c) for c in row] for p, row in zip(prompts, per_prompt)])
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=0)


def test_scoring_without_logits_to_keep_gives_the_same_numbers(lm, tok):
    class NoKeep(torch.nn.Module):  # an LM whose forward has no logits_to_keep: full logits, sliced after
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    prompts = ["Text: w1\nLabel:", "Text: w2 w3 w4 w5\nLabel:"]
    for choices in ([" neg", " pos"], [" bad", " very good"]):
        torch.testing.assert_close(label_loglik(NoKeep(lm), tok, prompts, choices),
                                   label_loglik(lm, tok, prompts, choices), atol=1e-5, rtol=0)


def test_label_loglik_left_truncates_so_the_label_fits(lm, tok):
    prompt = "Text: " + " ".join(f"w{i}" for i in range(12)) + "\nLabel:"
    got = label_loglik(lm, tok, [prompt], [" very good"], max_length=6)
    kept = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(tok(prompt)["input_ids"][-4:]))
    assert got.item() == pytest.approx(hand_loglik(lm, tok, kept, " very good"), abs=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        label_loglik(lm, tok, [prompt], [" very good"], max_length=2)


# ---------------------------------------------------------------- VerbalizerLM

@pytest.mark.parametrize("labels", [("neg", "pos"), ("bad", "very good")])
def test_verbalizer_logits_equal_scorer_for_either_padding_side(lm, tok, labels):
    pt = PromptTokenizer(tok, labels)
    xs = texts(5)
    enc = pt(xs, truncation=True, max_length=8, padding=True, return_tensors="pt")
    model = VerbalizerLM(lm, pt.label_token_ids)
    logits = model(**enc).logits
    want = label_loglik(lm, tok, pt.prompts(xs, 8), pt.label_words)
    torch.testing.assert_close(logits.detach(), want, atol=1e-5, rtol=0)
    # left padding: roll each row so its pads come first
    lengths = enc["attention_mask"].sum(1)
    width = enc["input_ids"].shape[1]
    left = {k: torch.stack([v[i].roll(int(width - lengths[i])) for i in range(len(xs))]) for k, v in enc.items()}
    assert (left["attention_mask"][:, 0] == 0).any()
    torch.testing.assert_close(model(**left).logits.detach(), want, atol=1e-5, rtol=0)


def test_verbalizer_loss_decreases_and_grads_reach_only_trainable_params(lm, tok):
    pt = PromptTokenizer(tok, ("neg", "very good"))
    model = VerbalizerLM(lm, pt.label_token_ids)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1." in name)
    batch = dict(pt(texts(6, seed=1), max_length=8))
    batch["labels"] = torch.tensor([0, 1, 0, 1, 1, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_verbalizer_with_lora_starts_at_base_and_trains_only_adapters(lm, tok):
    pt = PromptTokenizer(tok, ("neg", "pos"))
    base = copy.deepcopy(lm)
    model = apply_lora_lm(VerbalizerLM(lm, pt.label_token_ids), r=4)
    batch = dict(pt(texts(4, seed=2), max_length=8))
    # LoRA's B starts at zero: same logits as the untouched model
    torch.testing.assert_close(model(**batch).logits, VerbalizerLM(base, pt.label_token_ids)(**batch).logits)
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    first = None
    for _ in range(6):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        first = loss.item() if first is None else first
        opt.step()
    assert model(**batch).loss.item() < first
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_verbalizer_with_prompt_tuning_is_padding_invariant(lm, tok):
    from peft import PromptTuningConfig, get_peft_model

    pt = PromptTokenizer(tok, ("bad", "very good"))
    base = VerbalizerLM(copy.deepcopy(lm), pt.label_token_ids)
    model = VerbalizerLM(get_peft_model(lm, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
                         pt.label_token_ids)
    xs = texts(4, seed=3)
    batch = pt(xs, max_length=8)
    logits = model(**batch).logits
    assert logits.shape == (4, 2)
    assert not torch.allclose(logits, base(**batch).logits, atol=1e-4)  # the soft prompt is in play
    alone = torch.cat([model(**pt([x], max_length=8)).logits for x in xs])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prompt_tokenizer_sets_pad_and_validates():
    hf = make_tokenizer(pad=False)
    pt = PromptTokenizer(hf, ("neg", "pos"))
    assert hf.pad_token == hf.eos_token
    enc = pt(["w1", "w2 w3 w4 w5"], max_length=2)
    assert enc["attention_mask"].sum(1).tolist() == [5, 6]  # "Text : w1 Label :"; the second text cut to 2 tokens
    assert enc["input_ids"][0, -1].item() == hf.pad_token_id
    with pytest.raises(ValueError, match="template"):
        PromptTokenizer(hf, ("neg",), template="no slot")
    with pytest.raises(ValueError, match="label_token_ids"):
        VerbalizerLM(make_lm(), [[6], []])


# ---------------------------------------------------------------- ICL formatting

def test_demonstrations_never_include_the_example_and_are_deterministic():
    pool = texts(30, seed=4)
    pool = pool + pool[:5] + pool[:3]  # duplicates in the pool
    labels = [i % 3 for i in range(len(pool))]
    for i, text in enumerate(pool):
        picked = demonstration_indices(text, pool, labels, k=4, seed=7, exclude_index=i)
        assert len(picked) == 4 and len(set(picked)) == 4
        assert i not in picked and all(pool[j] != text for j in picked)
        assert picked == demonstration_indices(text, pool, labels, k=4, seed=7, exclude_index=i)
        assert sorted({labels[j] for j in picked}) == [0, 1, 2]  # balanced: every class appears
    draws = {tuple(demonstration_indices(pool[0], pool, labels, k=4, seed=s)) for s in range(5)}
    assert len(draws) > 1
    # a pool of 4 with the example twice in it leaves 2 demonstrations
    assert len(demonstration_indices("a", ["a", "b", "a", "c"], [0, 1, 0, 1], k=4, seed=0)) == 2


def test_with_demonstrations_and_prompt_tokenizer_agree():
    pool, labels = texts(12, seed=5), [i % 2 for i in range(12)]
    out = with_demonstrations(pool, pool, labels, ("neg", "pos"), k=3, seed=1, exclude_indices=range(12))
    pt = PromptTokenizer(make_tokenizer(), ("neg", "pos")).with_demos(pool, labels, k=3, seed=1)
    assert out == pt.prompts(pool)
    for text, prompt in zip(pool, out):
        blocks = prompt.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Text: {text}\nLabel:"
        assert all(b.rsplit("\nLabel: ", 1)[0] != f"Text: {text}" for b in blocks[:-1])


def test_prepare_icl_format_hook(lm, tok):
    shots, ys = texts(8, seed=6), [0, 1] * 4
    ctx = SimpleNamespace(tokenizer=PromptTokenizer(tok, ("neg", "pos")),
                          task=SimpleNamespace(label_names=("neg", "pos")),
                          train_texts=tuple(shots), train_labels=tuple(ys), seed=3, lr=1e-3,
                          cfg=SimpleNamespace(steps=2, batch_size=4, max_length=4))
    model, new_tok = prepare_icl_format(k=2)(lm, ctx)
    assert model is lm and new_tok.k == 2 and new_tok.seed == 3 and new_tok.demo_texts == tuple(shots)
    enc = new_tok(["w1 w2 w3 w4 w5 w6"], max_length=4)
    assert (enc["input_ids"] == tok.convert_tokens_to_ids("Label")).sum() == 3
    # demonstrations are capped at max_length tokens: 3 blocks of at most 4 + 4 template tokens, plus 2 label tokens
    assert enc["attention_mask"].sum() <= 3 * 8 + 2
    with pytest.raises(ValueError, match="k"):
        prepare_icl_format(k=0)


# ---------------------------------------------------------------- in-context retention

def test_in_context_accuracy_equals_brute_force(lm, tok):
    names = ("neg", "pos")
    task = SimpleNamespace(name="toy", label_names=names, train_texts=tuple(texts(10, seed=7)),
                           train_labels=tuple(i % 2 for i in range(10)), eval_texts=tuple(texts(15, seed=8)),
                           eval_labels=tuple((i // 2) % 2 for i in range(15)))
    acc = in_context_accuracy(lm, tok, task, k=2, n_eval=9, seed=4, max_length=16, batch_size=4)
    hits = []
    for i in query_indices(task.eval_labels, 9):
        q = task.eval_texts[i]
        demos = [f"Text: {task.train_texts[j]}\nLabel: {names[task.train_labels[j]]}"
                 for j in demonstration_indices(q, task.train_texts, task.train_labels, 2, 4)]
        prompt = "\n\n".join(demos + [f"Text: {q}\nLabel:"])
        scores = [hand_loglik(lm, tok, prompt, f" {n}") for n in names]
        hits.append(int(max(range(2), key=scores.__getitem__) == task.eval_labels[i]))
    assert len(hits) == 9 and acc == pytest.approx(sum(hits) / 9)


def test_retention_lm_unwraps_prompt_tuning_and_keeps_lora(lm, tok):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    base = copy.deepcopy(lm)
    pt_model = get_peft_model(lm, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = torch.tensor([tok("Text: w1 w2\nLabel:")["input_ids"]])
    with torch.no_grad():
        prompted = pt_model(input_ids=ids).logits[:, -ids.shape[1]:]
        unwrapped = retention_lm(VerbalizerLM(pt_model, [[6], [7]]))(input_ids=ids).logits
        want = base(input_ids=ids).logits
    assert not torch.allclose(prompted, want, atol=1e-4)
    torch.testing.assert_close(unwrapped, want)
    lora = get_peft_model(make_lm(1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert retention_lm(VerbalizerLM(lora, [[6], [7]])) is lora


def test_smollm2_factory_builds_fresh_verbalizers_from_a_folder(tmp_path, tok):
    from sgg_optim.fewshot.models import smollm2_factory

    make_lm(2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    task = SimpleNamespace(name="toy", label_names=("neg", "very good"))
    build = smollm2_factory(tmp_path)
    (a, pt), (b, _) = build(task), build(task)
    assert isinstance(a, VerbalizerLM) and pt.label_names == ("neg", "very good")
    assert a.label_token_ids == [[6], [8, 9]]
    assert a(**pt(texts(3), max_length=8)).logits.shape == (3, 2)
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))  # fresh weights per build
    with pytest.raises(ValueError, match="label_names"):
        build(2)


def test_icl_reference_is_the_source_label_word_gradient_on_icl_prompts(lm, tok):
    target = PromptTokenizer(tok, ("neg", "pos"))
    model = VerbalizerLM(lm, target.label_token_ids)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0." in name)
    # two shots per class and batch_size 4: every balanced batch is the whole pool
    source = SimpleNamespace(name="src", label_names=("bad", "very good"), train_texts=tuple(texts(4, seed=9)),
                             train_labels=(0, 1, 1, 0))
    ref = icl_reference(model, target, source, cfg=SimpleNamespace(batch_size=4, max_length=6), seed=2, k=2,
                        num_batches=2)
    prompter = PromptTokenizer(tok, source.label_names).with_demos(source.train_texts, source.train_labels, 2, seed=2)
    by_hand = VerbalizerLM(lm, prompter.label_token_ids)
    enc = prompter(list(source.train_texts), max_length=6)
    by_hand(**enc, labels=torch.tensor(source.train_labels)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(ref.names) == set(trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(ref[name], p.grad, atol=1e-6, rtol=1e-4)
    assert any(ref[n].abs().sum() > 0 for n in trainable)


def test_query_indices_balanced_fixed_and_complete():
    labels = [0] * 90 + [1] * 6 + [2] * 20
    idx = query_indices(labels, 30)
    counts = [sum(labels[i] == c for i in idx) for c in range(3)]
    assert len(set(idx)) == 30 and counts == [12, 6, 12]  # the rare class gives all it has
    assert idx == query_indices(labels, 30) and idx == sorted(idx)
    assert query_indices(labels, None) == list(range(len(labels)))


def test_shared_prompt_cache_gives_the_pairwise_scores(lm, tok):
    from peft import LoraConfig, get_peft_model

    from sgg_optim.methods.incontext import cached_choice_logliks, choice_logliks, continuation_ids

    prompts = [tok(p)["input_ids"] for p in ("Text: w1\nLabel:", "Text: w2 w3 w4 w5 w6\nLabel:")]
    choices = [continuation_ids(tok, [" pos", " very good", " very very bad"])] * 2  # 1, 2 and 3 tokens
    lora = get_peft_model(make_lm(1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for model in (lm, lora):
        with torch.no_grad():
            torch.testing.assert_close(cached_choice_logliks(model, prompts, choices),
                                       choice_logliks(model, prompts, choices), atol=1e-5, rtol=0)


def test_retention_needs_a_language_model_head(lm):
    assert retention_lm(VerbalizerLM(lm, [[6], [7]])) is lm
    with pytest.raises(ValueError, match="no language-model head"):
        retention_lm(lm.model)  # the bare decoder, as L-Tuning keeps it
