"""The setfit row: the real package on the run's shots, predictions from its fitted head,
and a clear error naming the extra, before any work, when setfit is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_fewshot_protocol import synthetic_task

from sgg_optim.fewshot import cli
from sgg_optim.fewshot.protocol import run_cell
from sgg_optim.fewshot.results import ResultsFile
from sgg_optim.fewshot.strategies import get_strategy
from sgg_optim.fewshot.training import RunConfig, minilm_factory

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fine", "lovely", "bad", "awful", "poor",
         "dull", "the", "film", "was", "a", "plot", "very", "and", "it"] + [str(i) for i in range(120)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny BERT and its tokenizer saved as a local model folder, as MiniLM's is."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    # vocab=, not vocab_file= (which transformers 5 ignores: a tokenizer of [UNK]s)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    return folder


def test_setfit_row_predicts_with_its_fitted_head(tiny_folder):
    pytest.importorskip("setfit")
    task = synthetic_task()
    strategy = get_strategy("setfit")
    assert strategy.own_loop and strategy.requires == ("setfit",)
    seen = {}

    def capture(model, ctx):  # keep the prepared model to look inside it
        model, tok = prepare(model, ctx)
        seen["model"], seen["ctx"] = model, ctx
        return model, tok

    prepare = strategy.prepare
    from dataclasses import replace

    row = run_cell(task, replace(strategy, prepare=capture), 4, 0, minilm_factory(tiny_folder),
                   RunConfig(steps=2, max_length=16), lr=2e-5)
    model, ctx = seen["model"], seen["ctx"]
    head = model.setfit_model.model_head
    assert hasattr(head, "coef_")  # a fitted logistic regression
    assert ctx.train_texts and len(ctx.train_texts) == 8 and ctx.lr == 2e-5
    texts = list(task.eval_texts[:10])
    enc = ctx.tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    ours = model(**enc).logits.argmax(-1).tolist()
    theirs = [int(x) for x in model.setfit_model.predict(texts)]
    assert ours == theirs
    assert row["trace"]["loss"] == [] and 0.0 <= row["accuracy"] <= 1.0 and row["lr"] == 2e-5


def test_missing_setfit_stops_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "setfit" else real(name, *a))

    def no_factory(*a, **k):
        raise AssertionError("built a model without setfit")

    with pytest.raises(SystemExit, match=r"setfit.*pip install 'sgg-optim\[anchors\]'"):
        cli.run_grid([synthetic_task()], ["adamw", "setfit"], [4], [0], 2, ResultsFile(tmp_path / "r.jsonl"),
                     lrs=[2e-5], factory=no_factory)
    from sgg_optim.methods.setfit import require_setfit

    with pytest.raises(ImportError, match=r"sgg-optim\[anchors\]"):
        require_setfit()


def test_setfit_plus_guidance_tunes_the_body_with_guided_adamw(tiny_folder, monkeypatch):
    pytest.importorskip("setfit")
    from sgg_optim import GuidedAdamW

    built = []
    real_init = GuidedAdamW.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(GuidedAdamW, "__init__", spy)
    strategy = get_strategy("setfit+adaptive")
    assert strategy.own_loop and strategy.guidance["magnitude"] == "adaptive"
    run_cell(synthetic_task(), strategy, 4, 0, minilm_factory(tiny_folder), RunConfig(steps=2, max_length=16),
             lr=2e-5)
    assert len(built) == 1 and built[0].config.direction == "off" and built[0].config.magnitude == "adaptive"
    assert built[0].defaults["lr"] == 2e-5  # SetFit's body lr, not GuidedAdamW's default 1e-3
    assert built[0].stats["step"] > 0  # the body's training stepped the guided optimizer
    with pytest.raises(ValueError, match="own EMA reference"):
        run_cell(synthetic_task(), get_strategy("setfit+cone-kshot"), 4, 0, minilm_factory(tiny_folder),
                 RunConfig(steps=2, max_length=16), lr=2e-5)


def test_a_sentence_transformers_folder_keeps_its_own_pooling(tiny_folder, tmp_path):
    # a BGE-style folder pools with CLS; SetFitModel.from_pretrained(folder) would keep it too
    pytest.importorskip("setfit")
    from sentence_transformers import SentenceTransformer, models

    enc = models.Transformer(str(tiny_folder), max_seq_length=16)
    SentenceTransformer(modules=[enc, models.Pooling(enc.get_word_embedding_dimension(), "cls")]).save(str(tmp_path))
    seen = {}
    strategy = get_strategy("setfit")

    def capture(model, ctx):
        model, tok = prepare(model, ctx)
        seen["body"] = model.setfit_model.model_body
        return model, tok

    prepare = strategy.prepare
    from dataclasses import replace

    run_cell(synthetic_task(), replace(strategy, prepare=capture), 4, 0, minilm_factory(tmp_path),
             RunConfig(steps=2, max_length=16), lr=2e-5)
    pooling = [m for m in seen["body"] if isinstance(m, models.Pooling)]
    assert [p.get_config_dict()["pooling_mode"] for p in pooling] == ["cls"]
    assert not any(isinstance(m, models.Normalize) for m in seen["body"])  # the folder has none


def test_compare_runs_the_setfit_rows_on_a_users_data(tiny_folder, data_file, tmp_path):
    pytest.importorskip("setfit")
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data_file), "--text-column", "text", "--label-column", "label",
            "--model", str(tiny_folder), "--shots", "2", "--seeds", "1", "--steps", "2", "--lrs", "1e-3",
            "--strategies", "adamw,setfit,setfit+cone-ema", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    rows = {r["strategy"]: r for r in ResultsFile(out / "results.jsonl").rows}
    assert set(rows) == {"adamw", "setfit", "setfit+cone-ema"}
    for name in ("setfit", "setfit+cone-ema"):  # SetFit's own loop: no trace of ours, a real score
        assert rows[name]["trace"]["loss"] == [] and 0.0 <= rows[name]["accuracy"] <= 1.0
    assert "setfit+cone-ema" in (out / "report.md").read_text()


def test_compare_without_setfit_stops_before_creating_anything(tiny_folder, data_file, tmp_path, monkeypatch):
    from sgg_optim.fewshot import compare as compare_mod
    from sgg_optim.fewshot.data import load_data

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "setfit" else real(name, *a))
    task = load_data(data_file, text_column="text", label_column="label")
    out = tmp_path / "cmp"
    with pytest.raises(compare_mod.InputError, match=r"setfit\+cone-ema needs the setfit.*sgg-optim\[anchors\]"):
        compare_mod.compare(task, str(tiny_folder), ["adamw", "setfit+cone-ema"], shots=2, seeds=1, steps=2,
                            out=out, verbose=False)
    assert not out.exists()
