"""`sgg-optim compare` / `capture` and the model registry on tiny models saved to folders by the test."""

from __future__ import annotations

import json

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from conftest import FILL, NEG, POS, rows  # noqa: E402

from sgg_optim import GuidedOptimizer, Reference  # noqa: E402
from sgg_optim.fewshot import cli, protocol  # noqa: E402
from sgg_optim.fewshot.compare import compare  # noqa: E402
from sgg_optim.fewshot.data import load_data  # noqa: E402
from sgg_optim.fewshot.results import KEY_FIELDS, ResultsFile  # noqa: E402

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # vocab=, not vocab_file=: transformers 5 ignores the file and builds a tokenizer of the
    # special tokens alone, which reads every word as [UNK] (load_tokenizer now refuses it)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(str(d))  # a 3-way head: replaced by a fresh 2-way one
    tok.save_pretrained(str(d))
    return d


WORDS = ["[PAD]", "[UNK]", "[EOS]", "Text", "Label", ":", "neg", "pos", "yes", "no"] + POS + NEG + FILL


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]",
                            pad_token="[PAD]").save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


def test_registry_loads_an_encoder_folder_with_a_fresh_head(bert_dir):
    task = load_data_task()
    factory = cli.model_factory(str(bert_dir))
    torch.manual_seed(1)
    model, tok = factory(task)
    assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 2
    saved = BertForSequenceClassification.from_pretrained(str(bert_dir))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved.bert.embeddings.word_embeddings.weight)
    assert model.classifier.weight.shape == (2, 16)
    torch.manual_seed(2)
    other, _ = factory(task)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)  # drawn fresh per build
    enc = tok(["the film was good"], ["it is good"], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 2)
    with pytest.raises(ValueError, match="neither one of minilm, smollm2 nor a local model folder"):
        cli.model_factory("/no/such/model")
    with pytest.raises(ValueError, match="--label-words is for causal LMs"):
        cli.model_factory(str(bert_dir), label_words=["a", "b"])


def load_data_task():
    from sgg_optim.fewshot.tasks import Task

    r = rows()
    return Task.from_examples("mine", ("neg", "pos"), [x["text"] for x in r], [int(x["label"] == "pos") for x in r],
                              n_eval=8)


def test_causal_lm_folder_scores_label_words_on_pairs(llama_dir, tmp_path):
    from sgg_optim.methods.incontext import VerbalizerLM

    path = tmp_path / "nli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    task = load_data(path, text_pair_column="hyp", test_size=8)
    factory = cli.model_factory(str(llama_dir), label_words=["no", "yes"])
    model, tok = factory(task)
    assert isinstance(model, VerbalizerLM)
    ids = tok.tokenizer(["no", "yes"], add_special_tokens=False)["input_ids"]
    assert model.label_token_ids == ids
    enc = tok(list(task.train_texts[:2]), max_length=32)
    prompt = tok.tokenizer.decode(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert task.train_texts[0][0].split()[-1] in prompt and task.train_texts[0][1].split()[-1] in prompt
    assert model(**enc).logits.shape == (2, 2)
    with pytest.raises(ValueError, match="1 label words"):
        cli.model_factory(str(llama_dir), label_words=["yes"])(task)
    # label words default to the label names
    model2, _ = cli.model_factory(str(llama_dir))(task)
    assert model2.label_token_ids == tok.tokenizer(["neg", "pos"], add_special_tokens=False)["input_ids"]


def test_compare_end_to_end_writes_results_report_and_plot(bert_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data_file), "--text-column", "text", "--label-column", "label",
            "--model", str(bert_dir), "--shots", "2", "--seeds", "2", "--steps", "2", "--lrs", "1e-3,1e-2",
            "--strategies", "adamw,cone-kshot", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    store = ResultsFile(out / "results.jsonl")
    assert len(store.rows) == 2 * 2 * 2  # strategies x seeds x lrs
    assert {tuple(r[f] for f in KEY_FIELDS)[:2] for r in store.rows} == {("mine", "adamw"), ("mine", "cone-kshot")}
    assert all(r["model"] == str(bert_dir) and r["k"] == 2 and r["steps"] == 2 for r in store.rows)
    report = (out / "report.md").read_text()
    assert "sgg-optim compare --data " + str(data_file) in report
    assert "Pick: **" in report and "validation" in report and "not used to choose" in report
    best = max(((r["strategy"], r["lr"]) for r in store.rows),
               key=lambda key: sum(r["val_acc"] for r in store.rows if (r["strategy"], r["lr"]) == key))
    assert f"at lr {best[1]:g}" in report.split("Pick:")[1].split("\n")[0]
    assert "\\|g\\| CV" in report and "| |g| CV" not in report  # escaped: the table renders
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun skips every finished run
    assert cli.main(argv) == 0 and len(ResultsFile(out / "results.jsonl").rows) == 8


def test_compare_python_api_with_a_causal_lm(llama_dir, data_file, tmp_path):
    task = load_data(data_file, test_size=8, shots=2)
    res = compare(task, str(llama_dir), ["adamw"], shots=2, seeds=1, steps=2, lrs=[1e-3], out=tmp_path / "o",
                  label_words=["neg", "pos"], verbose=False)
    assert len(res.rows) == 1 and res.pick["strategy"] == "adamw"
    assert res.files["report"].exists() and res.files["plot"].exists()
    assert res.rows[0]["trace"]["loss"] and len(res.rows[0]["trace"]["loss"]) == 2


@pytest.mark.parametrize("extra,message", [
    (["--text-column", "body"], "no text column 'body'; available columns: text, hyp, label"),
    (["--shots", "20"], "fewer than K=20 shots \\+ 20 validation"),
    (["--strategies", "adamw,cone-source"], "needs? .*source|--source"),
    (["--strategies", "nope"], "unknown strategy 'nope'"),
    (["--lrs", "fast"], "--lrs takes comma-separated numbers"),
    (["--lrs", "inf"], "--lrs takes learning rates > 0"),  # once wrote a row no later run could read
    (["--lrs=-1e-3"], "--lrs takes learning rates > 0"),
    (["--lrs="], "--lrs takes learning rates > 0"),
    (["--out", "{tmp}/a_file"], "is a file"),
    (["--strategies="], "strategies: give at least one"),  # once ran nothing and said "Nothing ran"
])
def test_bad_inputs_stop_before_training(monkeypatch, bert_dir, data_file, tmp_path, extra, message):
    def no_training(*a, **k):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(protocol, "run_cell", no_training)
    (tmp_path / "a_file").write_text("")
    argv = ["compare", "--data", str(data_file), "--model", str(bert_dir), "--shots", "2", "--seeds", "1",
            "--steps", "1", "--out", str(tmp_path / "o")] + [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.parametrize("option", ["--shots", "--seeds", "--steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused_by_the_parser(monkeypatch, capsys, data_file, option, value):
    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit):
        cli.main(["compare", "--data", str(data_file), option, value])
    assert f"argument {option}: must be >= 1, got {value}" in capsys.readouterr().err


def test_a_source_with_another_label_count_stops_before_training(monkeypatch, bert_dir, data_file, tmp_path):
    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    src = tmp_path / "three.jsonl"
    src.write_text("".join(json.dumps({"text": f"the film was {w}", "label": "abc"[i % 3]}) + "\n"
                           for i, w in enumerate(POS * 6)))
    with pytest.raises(SystemExit, match="cone-source cannot run on mine: source three has 3 labels, mine 2"):
        cli.main(["compare", "--data", str(data_file), "--source", str(src), "--model", str(bert_dir),
                  "--shots", "2", "--strategies", "adamw,cone-source", "--out", str(tmp_path / "o")])


def test_a_rerun_on_other_data_under_the_same_name_is_refused(bert_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(data_file), "--model", str(bert_dir), "--shots", "2", "--seeds", "1",
            "--steps", "1", "--lrs", "1e-3", "--strategies", "adamw", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    other = tmp_path / "other" / "mine.jsonl"  # the same file name (task name), other labels
    other.parent.mkdir()
    other.write_text("".join(json.dumps({**r, "label": {"pos": "x", "neg": "y"}[r["label"]]}) + "\n"
                             for r in rows()))
    with pytest.raises(SystemExit, match=f"out {out} holds the runs of another comparison"):
        cli.main(argv[:2] + [str(other)] + argv[3:])
    assert len(ResultsFile(out / "results.jsonl").rows) == 1
    assert cli.main(argv) == 0  # the same comparison again: its runs are reused


def test_a_model_folder_without_tokenizer_files_is_refused(bert_dir, data_file, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((bert_dir / f).read_bytes())
    with pytest.raises(SystemExit, match="no usable tokenizer|no vocabulary beyond its"):
        cli.main(["compare", "--data", str(data_file), "--model", str(bare), "--shots", "2",
                  "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("words,message", [("pos", "1 label words"), ("pos,pos", "label words must differ")])
def test_label_words_are_checked_before_training(monkeypatch, llama_dir, data_file, tmp_path, words, message):
    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["compare", "--data", str(data_file), "--model", str(llama_dir), "--label-words", words,
                  "--shots", "2", "--out", str(tmp_path / "o")])


def test_one_class_and_empty_file_stop_before_training(monkeypatch, bert_dir, tmp_path):
    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "one.csv").write_text("text,label\n" + "".join(f"t {i},x\n" for i in range(20)))
    (tmp_path / "empty.jsonl").write_text("")
    for name, msg in (("one.csv", "one class"), ("empty.jsonl", "empty")):
        with pytest.raises(SystemExit, match=msg):
            cli.main(["compare", "--data", str(tmp_path / name), "--model", str(bert_dir), "--shots", "2",
                      "--out", str(tmp_path / "o")])


def test_capture_file_is_used_by_the_accelerate_plugin_via_sgg_reference(bert_dir, data_file, tmp_path,
                                                                         monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from sgg_optim.accelerate import GuidancePlugin

    ref_path = tmp_path / "ref.safetensors"
    assert cli.main(["capture", "--model", str(bert_dir), "--data", str(data_file), "--text-column", "text",
                     "--label-column", "label", "--out", str(ref_path), "--batches", "2", "--threads", "1"]) == 0
    assert ref_path.exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=2,
                                                               ignore_mismatched_sizes=True)
    saved = Reference.load(ref_path, model)
    assert set(saved.names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(float(saved[n].abs().sum()) > 0 for n in saved.names)

    monkeypatch.setenv("SGG_REFERENCE", str(ref_path))
    plugin = GuidancePlugin()
    assert plugin.reference == str(ref_path)
    opt = plugin.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)
    assert isinstance(opt, GuidedOptimizer)
    tok = BertTokenizerFast.from_pretrained(str(bert_dir))
    batch = tok(["the film was good", "the film was bad"], return_tensors="pt", padding=True)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    flat_g = torch.cat([grad[n].flatten() for n in saved.names])
    flat_r = torch.cat([saved[n].flatten().float() for n in saved.names])
    expected = float(flat_g @ flat_r / (flat_g.norm() * flat_r.norm()))
    opt.step()
    assert opt.stats["cos"] == pytest.approx(expected, abs=1e-4)  # guided toward the captured file


def test_demo_checks_extras_before_training_and_writes_a_folder(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(cli, "run_grid", lambda *a, **k: pytest.fail("trained without matplotlib"))
    with pytest.raises(SystemExit, match=r"missing matplotlib; install the extra first: pip install 'sgg-optim\[demo\]'"):
        cli.main(["demo", "--out", str(tmp_path / "d")])
    assert cli.build_parser().parse_args(["demo"]).out == "sgg_demo"


def test_plot_accuracy_axis_starts_at_zero_and_explains_cosine(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgg_optim.fewshot.plots import comparison_plot

    seen = {}
    real_close = plt.close

    def spy(fig):
        seen["ylim"] = fig.axes[0].get_ylim()
        seen["text"] = " ".join([t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes])
        real_close(fig)

    monkeypatch.setattr(plt, "close", spy)
    tr = {"grad_norm": [1.0, 2.0], "update_cos": [float("nan"), 0.5]}
    rs = [{"strategy": s, "accuracy": a, "eval_majority": 0.5, "trace": tr} for s, a in (("a", 0.76), ("b", 0.77))]
    comparison_plot(rs, tmp_path / "p.png")
    assert seen["ylim"][0] == 0.0
    assert "higher: consecutive updates agree" in seen["text"] and "majority class 50%" in seen["text"]


def test_capture_from_a_causal_lm_loads_into_the_plain_lm(llama_dir, data_file, tmp_path):
    ref_path = tmp_path / "lm_ref.safetensors"
    assert cli.main(["capture", "--model", str(llama_dir), "--data", str(data_file), "--out", str(ref_path),
                     "--batches", "1", "--batch-size", "4", "--threads", "1"]) == 0
    lm = LlamaForCausalLM.from_pretrained(str(llama_dir))
    ref = Reference.load(ref_path, lm)  # names of the plain causal LM, as a user's Trainer has them
    assert set(ref.names) == {n for n, _ in lm.named_parameters()}
    assert float(ref["model.embed_tokens.weight"].abs().sum()) > 0


def test_every_option_has_help_text():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    missing = [(name, act.option_strings or act.dest) for name, sp in sub.choices.items()
               for act in sp._actions if not act.help]
    assert missing == [] and {"compare", "capture", "bench", "demo"} <= set(sub.choices)


def test_compare_on_text_pairs_trains_on_pair_encodings(bert_dir, data_file, tmp_path, monkeypatch):
    from sgg_optim.fewshot import training

    task = load_data(data_file, text_pair_column="hyp", test_size=8, shots=2)
    seen = []
    real = training.encode

    def spy(tok, texts, max_length):
        enc = real(tok, texts, max_length)
        seen.append(enc["token_type_ids"].max().item())  # segment B present: encoded as a pair
        return enc

    monkeypatch.setattr(training, "encode", spy)
    res = compare(task, str(bert_dir), ["adamw"], shots=2, seeds=1, steps=1, lrs=[1e-3], out=tmp_path / "p",
                  verbose=False)
    assert len(res.rows) == 1 and seen and all(v == 1 for v in seen)


def test_help_does_not_import_torch():
    """``sgg-optim --help`` answers at once: neither the package root nor the parser imports
    torch (measured: 0.18 s against 2 s with torch)."""
    import subprocess
    import sys

    code = ("import sys; from sgg_optim.fewshot.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_capture_takes_every_row_of_a_tiny_file(bert_dir, tmp_path):
    # K=1 shots are what usage.md suggests capturing a cone-kshot reference on; capture once
    # carved a 20% test split it never used, and refused two rows
    shots = tmp_path / "shots.csv"
    shots.write_text("text,label\nthe film was good,pos\nthe film was bad,neg\n")
    out = tmp_path / "ref.safetensors"
    assert cli.main(["capture", "--model", str(bert_dir), "--data", str(shots), "--out", str(out),
                     "--batches", "2", "--threads", "1"]) == 0
    from safetensors.torch import load_file

    assert any(t.abs().sum() > 0 for t in load_file(str(out)).values())


def test_capture_refuses_a_folder_as_out(bert_dir, data_file, tmp_path):
    with pytest.raises(SystemExit, match="is a folder"):
        cli.main(["capture", "--model", str(bert_dir), "--data", str(data_file), "--out", str(tmp_path)])


def test_a_value_error_while_training_keeps_its_traceback(monkeypatch, bert_dir, data_file, tmp_path):
    # input errors become one-line messages; an error inside a run is a bug to show whole
    def broken_run(*a, **k):
        raise ValueError("Expected input batch_size (16) to match target batch_size (8)")

    monkeypatch.setattr(protocol, "run_cell", broken_run)
    with pytest.raises(ValueError, match="Expected input batch_size"):
        cli.main(["compare", "--data", str(data_file), "--model", str(bert_dir), "--shots", "2", "--seeds", "1",
                  "--lrs", "1e-3", "--strategies", "adamw", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("setup,message", [
    (lambda out: (out / "results.jsonl").write_text('{"task": "mine"}\n'), "written before compare recorded"),
    (lambda out: (out / "task.json").write_text("[1, 2"), "is not a record compare wrote"),
])
def test_a_folder_that_cannot_be_told_apart_is_refused(monkeypatch, bert_dir, data_file, tmp_path, setup, message):
    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "old"
    out.mkdir()
    setup(out)
    with pytest.raises(SystemExit, match=message):
        cli.main(["compare", "--data", str(data_file), "--model", str(bert_dir), "--shots", "2",
                  "--out", str(out)])


def test_the_python_api_checks_label_words_before_training(monkeypatch, llama_dir, data_file, tmp_path):
    from sgg_optim.fewshot.compare import InputError

    monkeypatch.setattr(protocol, "run_cell", lambda *a, **k: pytest.fail("trained"))
    task = load_data(data_file, test_size=8, shots=2)
    with pytest.raises(InputError, match="label words must differ"):
        compare(task, str(llama_dir), ["adamw"], shots=2, seeds=1, steps=1, lrs=[1e-3], out=tmp_path / "o",
                label_words=["pos", "pos"], verbose=False)


@pytest.mark.parametrize("with_source", [False, True])
def test_compare_runs_the_swap_and_with_a_source_its_row_by_default(monkeypatch, bert_dir, data_file, tmp_path,
                                                                     with_source):
    from sgg_optim.fewshot import compare as compare_module

    seen = []

    def record(strategies, source, task=None):
        seen.extend(strategies)
        raise ValueError("stop here")

    monkeypatch.setattr(compare_module, "check_strategies", record)
    argv = ["compare", "--data", str(data_file), "--model", str(bert_dir), "--shots", "2", "--out",
            str(tmp_path / "o")] + (["--source", str(data_file)] if with_source else [])
    with pytest.raises(SystemExit, match="stop here"):
        cli.main(argv)
    # the one-import swap is what a user weighs; a given source is meant for its row
    assert seen == ["adamw", "adamw-clip", "cone-ema", "cone-kshot"] + (["cone-source"] if with_source else [])
