"""k-shot sampling, fixed eval split, and one training cell on a tiny BERT built from a config."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sgg_optim.fewshot import protocol
from sgg_optim.fewshot.protocol import run_cell, run_lrs, sample_kshot
from sgg_optim.fewshot.strategies import Strategy, get_strategy
from sgg_optim.fewshot.tasks import Task
from sgg_optim.fewshot import training
from sgg_optim.fewshot.training import RunConfig

POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILL = ["the", "film", "was", "a", "plot", "very", "and", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + POS + NEG + FILL


class WordTokenizer:
    """Whitespace tokenizer with the call signature the protocol uses."""

    def __call__(self, texts, truncation=True, max_length=16, padding=True, return_tensors="pt"):
        ids = [[2] + [VOCAB.index(w) if w in VOCAB else 1 for w in t.split()][: max_length - 2] + [3]
               for t in texts]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])}


def tiny_factory(task):
    num_labels = task.num_labels
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg), WordTokenizer()


def synthetic_task(name="toy", n=120, seed=0) -> Task:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = rng.sample(FILL, 4) + [rng.choice(POS if y else NEG)]
        rng.shuffle(words)
        texts.append(" ".join(words) + f" {i}")  # the index makes every text unique
        labels.append(y)
    return Task.from_examples(name, ("neg", "pos"), texts, labels, n_eval=40)


def test_eval_split_is_fixed_and_stratified():
    a, b = synthetic_task(), synthetic_task()
    assert a.eval_texts == b.eval_texts and a.train_texts == b.train_texts
    assert len(a.eval_texts) == 40 and a.eval_labels.count(0) == a.eval_labels.count(1) == 20
    assert not set(a.eval_texts) & set(a.train_texts)
    assert len(a.eval_texts) + len(a.train_texts) == 120


def test_kshot_same_seed_same_shots_and_disjoint():
    task = synthetic_task()
    s1 = sample_kshot(task.train_labels, k=4, seed=7)
    assert s1 == sample_kshot(task.train_labels, k=4, seed=7)
    assert s1 != sample_kshot(task.train_labels, k=4, seed=8)
    for split in (s1.train, s1.val):
        assert sorted(task.train_labels[i] for i in split) == [0] * 4 + [1] * 4
    assert not set(s1.train) & set(s1.val)
    shot_texts = {task.train_texts[i] for i in s1.train + s1.val}
    assert not shot_texts & set(task.eval_texts)


def test_kshot_too_few_examples():
    with pytest.raises(ValueError, match="class 1 has 3 examples"):
        sample_kshot([0] * 10 + [1] * 3, k=2, seed=0)


def test_run_cell_is_one_lr_with_validation_and_eval_figures(monkeypatch):
    task = synthetic_task()
    cfg = RunConfig(steps=5, batch_size=4, max_length=12, eval_batch_size=32)
    seen = []
    real_predict = protocol.predict

    def spy_predict(model, tok, texts, cfg):
        seen.append(tuple(texts))
        return real_predict(model, tok, texts, cfg)

    monkeypatch.setattr(protocol, "predict", spy_predict)
    cone = Strategy("cone-short-warmup", guidance={"direction": "cone", "warmup_steps": 2})
    row = run_cell(task, cone, 4, 0, tiny_factory, cfg, lr=1e-2)
    # validation (from the train pool) then eval, once each
    assert len(seen) == 2 and seen[1] == task.eval_texts
    assert len(seen[0]) == 8 and not set(seen[0]) & set(task.eval_texts)
    assert row["lr"] == 1e-2 and row["protocol"] == 2
    assert 0 <= row["val_acc"] <= 1 and 0 <= row["val_f1"] <= 1 and row["val_acc"] in {i / 8 for i in range(9)}
    assert row["eval_majority"] == 0.5
    assert len(row["trace"]["grad_norm"]) == 5
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    assert math.isnan(row["trace"]["update_cos"][0]) and math.isfinite(row["trace"]["update_cos"][1])
    # cos(g, ref) is NaN during the EMA warm-up, reported after it
    assert all(math.isnan(c) for c in row["trace"]["ref_cos"][:2])
    assert all(math.isfinite(c) for c in row["trace"]["ref_cos"][2:])


def test_same_seed_same_run_across_calls():
    task = synthetic_task()
    cfg = RunConfig(steps=3, batch_size=4, max_length=12)
    a = run_cell(task, get_strategy("adamw"), 2, 1, tiny_factory, cfg, lr=1e-3)
    b = run_cell(task, get_strategy("adamw"), 2, 1, tiny_factory, cfg, lr=1e-3)
    assert a["trace"]["grad_norm"] == b["trace"]["grad_norm"]
    assert all(math.isnan(c) for c in a["trace"]["ref_cos"])  # plain AdamW has no reference


def test_clip_caps_the_applied_norm_and_source_reference_is_used():
    task, source = synthetic_task(), synthetic_task("src", seed=1)
    cfg = RunConfig(steps=4, batch_size=4, max_length=12)
    clip = run_cell(task, get_strategy("adamw-clip"), 2, 0, tiny_factory, cfg, lr=1e-3)
    assert max(clip["trace"]["applied_norm"]) <= 1.0 + 1e-6
    assert clip["trace"]["applied_norm"] == [min(g, 1.0) for g in clip["trace"]["grad_norm"]]
    src = run_cell(task, get_strategy("cone-source"), 2, 0, tiny_factory, cfg, lr=1e-3, source=source)
    assert all(math.isfinite(c) for c in src["trace"]["ref_cos"])  # a frozen reference from step 0
    with pytest.raises(ValueError, match="needs a source task"):
        run_cell(task, get_strategy("cone-source"), 2, 0, tiny_factory, cfg, lr=1e-3)


def three_way_task(name="src3", n=90) -> Task:
    rng = random.Random(5)
    texts = [" ".join(rng.sample(FILL, 3) + [POS[i % 4] if i % 3 == 1 else NEG[i % 4] if i % 3 == 2 else "plot"])
             + f" {i}" for i in range(n)]
    return Task.from_examples(name, ("none", "pos", "neg"), texts, [i % 3 for i in range(n)], n_eval=15)


def test_shared_reference_zeroes_the_fresh_head_only():
    task, src = synthetic_task(), three_way_task()
    cfg = RunConfig(steps=2, batch_size=4, max_length=12)
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    torch.manual_seed(1)
    pretrained = tiny_factory(task)[0].state_dict()
    model.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("classifier")}, strict=False)
    torch.manual_seed(2)
    src_model, _ = tiny_factory(src)
    src_model.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("classifier")},
                              strict=False)
    ref = protocol.shared_reference(model, src_model, tok, src, cfg)
    assert set(ref.names) == {n for n, _ in model.named_parameters()}
    assert not ref["classifier.weight"].any() and not ref["classifier.bias"].any()
    assert ref["bert.encoder.layer.0.output.dense.weight"].abs().sum() > 0


def test_multi_source_row_reports_alignment_weights():
    task = synthetic_task()
    sources = (synthetic_task("src-a", seed=1), three_way_task())
    cfg = RunConfig(steps=3, batch_size=4, max_length=12)
    factory = _pretrained_encoder_factory(task)
    row = run_cell(task, get_strategy("cone-sources"), 2, 0, factory, cfg, lr=1e-3, sources=sources)
    assert set(row["source_weights"]) == {"src-a", "src3"}
    assert len(row["trace"]["weights"]) == 3 and all(len(w) == 2 for w in row["trace"]["weights"])
    assert all(0.0 <= w <= 1.0 for w in row["source_weights"].values())
    with pytest.raises(ValueError, match="needs source tasks"):
        run_cell(task, get_strategy("cone-sources"), 2, 0, factory, cfg, lr=1e-3)


def test_pretrained_row_trains_nothing():
    task = synthetic_task()
    cfg = RunConfig(steps=3, batch_size=4, max_length=12)
    row = run_cell(task, get_strategy("pretrained"), 2, 0, tiny_factory, cfg)
    assert row["trace"]["grad_norm"] == [] and row["lr"] == 0.0 and 0 <= row["val_acc"] <= 1
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    expected = protocol.predict(model, tok, task.eval_texts, cfg)
    assert row["accuracy"] == sum(p == y for p, y in zip(expected, task.eval_labels)) / len(expected)


def test_source_reference_batches_are_class_balanced():
    from sgg_optim.fewshot.training import balanced_batches

    labels = [0] * 50 + [1] * 10 + [2] * 30  # a skewed pool
    texts = [f"good {i}" for i in range(90)]
    cfg = RunConfig(batch_size=15, max_length=8)
    got = list(balanced_batches(WordTokenizer(), texts, labels, cfg, num_batches=4, seed=3))
    assert len(got) == 4
    for b in got:
        assert torch.bincount(b["labels"], minlength=3).tolist() == [5, 5, 5]
    again = list(balanced_batches(WordTokenizer(), texts, labels, cfg, num_batches=4, seed=3))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, again))


def _pretrained_encoder_factory(task_for_weights):
    torch.manual_seed(0)
    pretrained = tiny_factory(task_for_weights)[0].state_dict()

    def factory(t):  # the same "pretrained" encoder for every task, a fresh head per build
        model, tok = tiny_factory(t)
        model.load_state_dict({k: v for k, v in pretrained.items() if not k.startswith("classifier")},
                              strict=False)
        return model, tok

    return factory


@pytest.mark.parametrize("name", ["cone-source", "cone-sources", "cone-kshot"])
def test_run_lrs_captures_once_and_matches_separate_runs(monkeypatch, name):
    """The reference is captured at the initial point, which no lr changes: run_lrs captures it
    once and reuses it (and the random state after the capture: cone-sources reseeds to build its
    source models), giving exactly the rows of separate run_cell calls."""
    task = synthetic_task()
    source, sources = synthetic_task("src", seed=1), (synthetic_task("src-a", seed=1), three_way_task())
    factory = _pretrained_encoder_factory(task)
    cfg = RunConfig(steps=4, batch_size=4, max_length=12)
    captures = []
    real = protocol.source_reference

    def counting(*a, **k):
        captures.append(len(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(protocol, "source_reference", counting)
    kw = dict(source=source, sources=sources)
    separate = [run_cell(task, get_strategy(name), 2, 0, factory, cfg, lr=lr, **kw) for lr in (1e-3, 1e-2)]
    n_separate = len(captures)
    together = list(run_lrs(task, get_strategy(name), 2, 0, factory, cfg, (1e-3, 1e-2), **kw))
    assert len(captures) - n_separate == n_separate // 2 > 0
    for a, b in zip(separate, together):
        assert a["lr"] == b["lr"] and a["accuracy"] == b["accuracy"] and a["val_acc"] == b["val_acc"]
        assert a["trace"] == b["trace"] or all(
            x == y or (math.isnan(x) and math.isnan(y)) for k in a["trace"] for x, y in zip(a["trace"][k],
                                                                                            b["trace"][k]))
    assert separate[0]["trace"]["loss"][1:] != separate[1]["trace"]["loss"][1:]  # the lrs did differ


def test_kshot_reference_is_captured_on_the_shots(monkeypatch):
    task = synthetic_task()
    cfg = RunConfig(steps=3, batch_size=4, max_length=12)
    seen = []
    real = protocol.source_reference

    def spy(model, tok, texts, labels, cfg):
        seen.append((tuple(texts), tuple(labels)))
        return real(model, tok, texts, labels, cfg)

    monkeypatch.setattr(protocol, "source_reference", spy)
    row = run_cell(task, get_strategy("cone-kshot"), 4, 3, tiny_factory, cfg, lr=1e-3)
    shots = sample_kshot(task.train_labels, 4, 3)
    assert seen == [(tuple(task.train_texts[i] for i in shots.train), tuple(task.train_labels[i] for i in shots.train))]
    assert all(math.isfinite(c) for c in row["trace"]["ref_cos"])  # frozen, from step 0: no warm-up
    with pytest.raises(ValueError, match="needs the K-shot training set"):
        protocol._references(get_strategy("cone-kshot"), None, None, task, 0, cfg, tiny_factory, None, ())


def test_predict_by_length_matches_one_text_at_a_time():
    task = synthetic_task()
    texts = [t + " good" * (i % 7) for i, t in enumerate(task.eval_texts)]  # lengths vary
    cfg = RunConfig(max_length=16, eval_batch_size=8)
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    model.eval()
    with torch.no_grad():
        one = [int(model(**training.encode(tok, [t], 16)).logits.argmax(-1)) for t in texts]
    assert training.predict(model, tok, texts, cfg) == one
    assert training.predict(model, tok, [], cfg) == []


class LeftPadTokenizer(WordTokenizer):
    def __call__(self, texts, **kw):
        enc = super().__call__(texts, **kw)
        lengths = enc["attention_mask"].sum(1)
        width = enc["input_ids"].shape[1]
        for key in enc:  # [x1 .. xn 0 .. 0] -> [0 .. 0 x1 .. xn]
            enc[key] = torch.stack([torch.roll(row, width - n) for row, n in zip(enc[key], lengths.tolist())])
        return enc


@pytest.mark.parametrize("tok", [WordTokenizer(), LeftPadTokenizer()], ids=["right", "left"])
def test_encoded_batches_equal_encoding_the_subset(tok):
    task = synthetic_task()
    texts = [t + " fine" * (i % 5) for i, t in enumerate(task.train_texts[:30])]
    enc = training.Encoded(tok, texts, 12)
    # right padding: batches are slices of one encoding; left padding: encoded per batch instead
    assert (enc.tensors is None) == isinstance(tok, LeftPadTokenizer)
    rng = random.Random(0)
    for _ in range(20):
        idx = rng.sample(range(30), rng.randint(1, 8))
        direct = training.encode(tok, [texts[i] for i in idx], 12)
        got = enc.batch(idx)
        assert set(got) == set(direct) and all(torch.equal(got[k], direct[k]) for k in direct)


def test_batches_are_the_same_tensors_as_tokenising_each_batch():
    task = synthetic_task()
    cfg = RunConfig(steps=7, batch_size=3, max_length=10)
    texts, labels = list(task.train_texts[:8]), list(task.train_labels[:8])
    rng = random.Random(4)
    order = []
    for batch in training.batches(WordTokenizer(), texts, labels, cfg, seed=4):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(texts)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:3], order[3:]
        want = training.encode(WordTokenizer(), [texts[i] for i in idx], 10)
        assert torch.equal(batch["input_ids"], want["input_ids"])
        assert torch.equal(batch["attention_mask"], want["attention_mask"])
        assert batch["labels"].tolist() == [labels[i] for i in idx]


def test_update_cosine_is_the_flattened_cosine(monkeypatch):
    task = synthetic_task()
    cfg = RunConfig(steps=6, batch_size=4, max_length=12)
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    params = [p for p in model.parameters() if p.requires_grad]
    snaps = [torch.cat([p.detach().reshape(-1).clone() for p in params])]
    trace = training.train(model, get_strategy("adamw"), 1e-2,
                           training.batches(tok, task.train_texts[:8], task.train_labels[:8], cfg, 0), cfg,
                           on_step=lambda _: snaps.append(torch.cat([p.detach().reshape(-1).clone()
                                                                     for p in params])))
    deltas = [b - a for a, b in zip(snaps, snaps[1:])]
    want = [math.nan] + [float(d @ e / (d.norm() * e.norm())) for e, d in zip(deltas, deltas[1:])]
    assert math.isnan(trace["update_cos"][0])
    assert trace["update_cos"][1:] == pytest.approx(want[1:], abs=1e-6)
    assert len(set(round(c, 4) for c in trace["update_cos"][1:])) > 1  # not a constant
