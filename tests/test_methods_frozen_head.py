"""Forgetting in an encoder: a frozen head fitted on the untuned encoder, read after tuning."""

from __future__ import annotations

import pytest
import torch

from sgg_optim.fewshot.protocol import run_cell
from sgg_optim.fewshot.strategies import get_strategy
from sgg_optim.fewshot.training import RunConfig
from sgg_optim.methods import frozen_head
from sgg_optim.methods.frozen_head import fit_head, fit_logistic, head_accuracy, sentence_features
from test_fewshot_protocol import synthetic_task, tiny_factory


@pytest.fixture
def task():
    return synthetic_task("other", n=160, seed=1)


def test_features_do_not_depend_on_batch_mates(task):
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    texts = task.eval_texts[:9]
    one = torch.cat([sentence_features(model, tok, [t], max_length=16) for t in texts])
    many = sentence_features(model, tok, texts, max_length=16, batch_size=4)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)
    model.train()  # the mode the caller had is restored
    sentence_features(model, tok, texts, max_length=16)
    assert model.training


def test_logistic_fit_separates_and_checks_shapes():
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long().tolist()
    w, b = fit_logistic(x, y, 2)
    assert ((x @ w.T + b).argmax(-1) == torch.tensor(y)).float().mean() > 0.9
    with pytest.raises(ValueError, match="labels"):
        fit_logistic(x, y[:-1], 2)


def test_head_reads_the_untuned_encoder_and_stays_frozen(task):
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    head = fit_head(model, tok, task, max_length=16, n_fit=100)
    before = head_accuracy(model, tok, task, head, max_length=16, n_eval=40)
    assert before > 0.8  # the sentiment word is linearly readable from mean-pooled features
    # destroy the word embeddings: the frozen head (not refitted) falls toward chance
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.normal_(generator=torch.Generator().manual_seed(3))
    after = head_accuracy(model, tok, task, head, max_length=16, n_eval=40)
    assert after < before - 0.2
    with pytest.raises(ValueError, match="fitted on 'other'"):
        head_accuracy(model, tok, synthetic_task("toy"), head, max_length=16)


def test_run_cell_reports_frozen_head_retention_for_encoders(task, monkeypatch):
    fits = []
    real = frozen_head.fit_head
    monkeypatch.setattr(frozen_head, "fit_head", lambda *a, **k: fits.append(1) or real(*a, **k))
    target = synthetic_task("toy")
    cfg = RunConfig(steps=6, batch_size=4, max_length=16)
    pre = run_cell(target, get_strategy("pretrained"), 4, 0, tiny_factory, cfg, retention=[task], retention_n=40)
    torch.manual_seed(0)
    model, tok = tiny_factory(target)
    # the pretrained row's figure is the head's accuracy on the untuned encoder
    head = fit_head(model, tok, task, max_length=16)
    assert pre["retention"]["other"] == pytest.approx(head_accuracy(model, tok, task, head, max_length=16,
                                                                    n_eval=40))
    tuned = run_cell(target, get_strategy("adamw"), 4, 0, tiny_factory, cfg, lr=3e-2, retention=[task],
                     retention_n=40)
    assert set(tuned["retention"]) == {"other"}
    assert tuned["retention"]["other"] != pre["retention"]["other"]  # read through the tuned encoder
    assert len(fits) == 2  # a config-built model has no folder to cache by: one fit per run


def test_heads_are_fitted_once_per_model_folder(task, monkeypatch):
    calls = []
    real = frozen_head.fit_head
    monkeypatch.setattr(frozen_head, "fit_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(frozen_head, "_HEADS", {})
    torch.manual_seed(0)
    model, tok = tiny_factory(task)
    model.config._name_or_path = "/models/tiny"
    a = frozen_head.pretrained_heads(model, tok, [task], max_length=16, n_fit=50)
    b = frozen_head.pretrained_heads(model, tok, [task], max_length=16, n_fit=50)
    frozen_head.pretrained_heads(model, tok, [task], max_length=16, n_fit=60)  # another key: fitted again
    assert a[0] is b[0] and len(calls) == 2
