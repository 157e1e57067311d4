"""The user's data as a Task (sgg_optim.fewshot.data): files written here by the test, read by `datasets`."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from sgg_optim.fewshot import data as fdata  # noqa: E402
from sgg_optim.fewshot import tasks  # noqa: E402
from sgg_optim.fewshot.data import check_shots, label_names_of, load_data  # noqa: E402
from sgg_optim.fewshot.protocol import sample_kshot  # noqa: E402
from sgg_optim.fewshot.tasks import SPLIT_SEED, Task  # noqa: E402
from sgg_optim.fewshot.training import encode  # noqa: E402

POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]


def records(n: int = 40, labels=("positive", "negative")) -> list[dict]:
    out = []
    for i in range(n):
        y = labels[i % len(labels)]
        word = (POS if i % len(labels) == 0 else NEG)[i % 4]
        out.append({"id": i, "review": f"the film was {word} {i}", "hyp": f"it is {word}", "stars": y,
                    "score": [5, 1, 3][i % 3] if len(labels) == 3 else (5 if i % 2 == 0 else 1)})
    return out


def write(path, rows, kind):
    if kind == "csv":
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path), index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind,name", [("csv", "r.csv"), ("jsonl", "r.jsonl"), ("parquet", "r.parquet"),
                                       ("disk", "saved")])
def test_every_format_gives_the_same_task(tmp_path, kind, name):
    rows = records()
    path = write(tmp_path / name, rows, kind)
    task = load_data(path, text_column="review", label_column="stars", test_size=10)
    assert task.label_names == ("negative", "positive")  # sorted names
    assert len(task.eval_texts) == 10 and len(task.train_texts) == 30
    every = dict(zip(task.train_texts + task.eval_texts, task.train_labels + task.eval_labels))
    for r in rows:  # column selection and the label mapping, text by text
        assert every[r["review"]] == task.label_names.index(r["stars"])
    assert f"fixed seed {SPLIT_SEED}" in task.description and "10 examples held out" in task.description


def test_held_out_split_is_fixed_stratified_and_disjoint(tmp_path):
    path = write(tmp_path / "r.jsonl", records(60), "jsonl")
    a = load_data(path, text_column="review", label_column="stars")
    b = load_data(path, text_column="review", label_column="stars")
    assert a == b and len(a.eval_texts) == 12  # 20% by default
    assert a.eval_labels.count(0) == a.eval_labels.count(1) == 6
    assert not set(a.eval_texts) & set(a.train_texts)
    shots = sample_kshot(a.train_labels, k=4, seed=0)  # the K-shot split comes from the training pool only
    assert sorted(a.train_labels[i] for i in shots.train) == [0] * 4 + [1] * 4
    assert not set(shots.train) & set(shots.val)


def test_integer_labels_sort_numerically(tmp_path):
    rows = records(30, labels=("a", "b", "c"))
    path = write(tmp_path / "r.csv", rows, "csv")
    task = load_data(path, text_column="review", label_column="score", test_size=6)
    assert task.label_names == ("1", "3", "5")
    every = dict(zip(task.train_texts + task.eval_texts, task.train_labels + task.eval_labels))
    assert [every[r["review"]] for r in rows[:3]] == [2, 0, 1]
    assert label_names_of([10, 2, 2.0]) == (["2", "10"], [1, 0, 0])


def test_class_label_feature_reads_as_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["zebra", "ant"])})
    ds = datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                                    features=feats)
    ds.save_to_disk(str(tmp_path / "d"))
    task = load_data(tmp_path / "d", test_size=4)
    assert task.label_names == ("ant", "zebra")
    every = dict(zip(task.train_texts + task.eval_texts, task.train_labels + task.eval_labels))
    assert every["t 0"] == 1 and every["t 1"] == 0  # zebra (id 0 in the file) is class 1 once sorted


def test_user_test_split_and_dataset_dict_test_split(tmp_path):
    train = write(tmp_path / "train.jsonl", records(30), "jsonl")
    test = write(tmp_path / "test.csv", records(8), "csv")
    task = load_data(train, test_data=test, text_column="review", label_column="stars")
    assert len(task.train_texts) == 30 and len(task.eval_texts) == 8
    assert "test.csv" in task.description
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(records(30)),
                               "test": datasets.Dataset.from_list(records(6))})
    dd.save_to_disk(str(tmp_path / "dd"))
    t2 = load_data(tmp_path / "dd", text_column="review", label_column="stars")
    assert len(t2.train_texts) == 30 and len(t2.eval_texts) == 6
    bad = write(tmp_path / "bad.jsonl", [{"review": "x", "stars": "neutral"}], "jsonl")
    with pytest.raises(ValueError, match="bad.jsonl.*labels the training data has not: neutral"):
        load_data(train, test_data=bad, text_column="review", label_column="stars")


def test_pairs_are_tuples_encoded_as_tokenizer_pairs(tmp_path):
    path = write(tmp_path / "nli.parquet", records(20), "parquet")
    task = load_data(path, text_column="review", text_pair_column="hyp", label_column="stars", test_size=4)
    assert all(isinstance(t, tuple) and len(t) == 2 for t in task.train_texts)
    assert task.train_texts[0][1].startswith("it is ")
    seen = {}

    def tok(a, b=None, **kw):
        seen["a"], seen["b"] = a, b
        return {"input_ids": [[1]]}

    encode(tok, task.train_texts[:2], 16)
    assert seen["a"] == [t[0] for t in task.train_texts[:2]] and seen["b"] == [t[1] for t in task.train_texts[:2]]


def test_built_in_names_are_accepted(monkeypatch):
    toy = Task.from_examples("toy", ("n", "p"), [f"t{i}" for i in range(20)], [i % 2 for i in range(20)], n_eval=4)
    monkeypatch.setitem(tasks.TASKS, "toy", lambda: toy)
    monkeypatch.setitem(fdata.TASKS, "toy", lambda: toy)
    monkeypatch.delitem(tasks._loaded, "toy", raising=False)
    assert load_data("toy") == toy
    with pytest.raises(ValueError, match="built-in task"):
        load_data("toy", test_data="x.csv")


def test_missing_column_lists_the_available_ones(tmp_path):
    path = write(tmp_path / "r.csv", records(), "csv")
    with pytest.raises(ValueError, match=r"r\.csv: no text column 'body'; available columns: id, review, hyp, "
                                         r"stars, score"):
        load_data(path, text_column="body", label_column="stars")
    with pytest.raises(ValueError, match="no label column 'y'"):
        load_data(path, text_column="review", label_column="y")
    with pytest.raises(ValueError, match="no text-pair column 'h2'"):
        load_data(path, text_column="review", text_pair_column="h2", label_column="stars")


def test_empty_file_one_class_and_unreadable_type(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: the file is empty"):
        load_data(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="header.csv"):
        load_data(tmp_path / "header.csv")
    one = write(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "same"} for i in range(10)], "jsonl")
    with pytest.raises(ValueError, match="one.jsonl: label column 'label' has one class \\('same'\\)"):
        load_data(one)
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="data.xlsx: unreadable file type '.xlsx'"):
        load_data(tmp_path / "data.xlsx")
    with pytest.raises(ValueError, match="no such file"):
        load_data(tmp_path / "nope.csv")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_data(tmp_path / "junk")


def test_too_few_examples_per_class_for_k_plus_validation(tmp_path):
    rows = records(40) + [{"review": f"meh {i}", "hyp": "", "stars": "neutral", "id": 0, "score": 3}
                          for i in range(5)]
    path = write(tmp_path / "r.jsonl", rows, "jsonl")
    task = load_data(path, text_column="review", label_column="stars", test_size=9)
    n_neutral = task.train_labels.count(task.label_names.index("neutral"))
    with pytest.raises(ValueError, match=rf"r.jsonl: label column 'stars': 'neutral' has {n_neutral} "
                                         r"training-pool examples, fewer than K=4 shots \+ 4 validation"):
        load_data(path, text_column="review", label_column="stars", test_size=9, shots=4)
    check_shots(task, 1)  # 1 + 1 per class fits
