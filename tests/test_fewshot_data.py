"""The user's data as a Task (sgg_optim.fewshot.data): files written here by the test, read by `datasets`."""

from __future__ import annotations

import json
import warnings

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


def unseen(rows: list[dict]) -> list[dict]:
    """``rows`` with texts no other ``records()`` call has: a test split apart from the training pool."""
    return [{**r, "review": "unseen: " + r["review"]} for r in rows]


def test_user_test_split_and_dataset_dict_test_split(tmp_path):
    train = write(tmp_path / "train.jsonl", records(30), "jsonl")
    test = write(tmp_path / "test.csv", unseen(records(8)), "csv")
    task = load_data(train, test_data=test, text_column="review", label_column="stars")
    assert len(task.train_texts) == 30 and len(task.eval_texts) == 8
    assert "test.csv" in task.description
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(records(30)),
                               "test": datasets.Dataset.from_list(unseen(records(6)))})
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
    with pytest.raises(ValueError, match=r"header.csv: the file is empty \(a header and no data rows\)"):
        load_data(tmp_path / "header.csv")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match=r"none.json: the file is empty \(no records\)"):
        load_data(tmp_path / "none.json")
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


def test_na_like_values_are_classes_and_texts_as_written(tmp_path):
    # LUIS's "None" intent and friends: pandas' default NA strings would make them missing
    words = ["None", "NA", "N/A", "null"]
    lines = ["text,label"] + [f"utterance {i},{words[i // 2 % 4] if i % 2 else 'Book'}" for i in range(40)] \
        + ["NA,Book"]
    (tmp_path / "intents.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "intents.tsv").write_text("\n".join(line.replace(",", "\t") for line in lines) + "\n")
    for name in ("intents.csv", "intents.tsv"):
        task = load_data(tmp_path / name, test_size=10)
        assert task.label_names == ("Book", "N/A", "NA", "None", "null"), name
        assert "NA" in task.train_texts + task.eval_texts


@pytest.mark.parametrize("name,content,message", [
    # a quoted cell spanning two lines and a blank line: the line is the file's, the row counts from 1
    ("e.csv", 'text,label\n"two\nlines",a\n\nb1,b\n,a\nb2,b\n', "text column 'text' is empty in data row 3 \\(line 6\\)"),
    ("w.csv", "text,label\nx,a\n   ,b\n", "text column 'text' is empty in data row 2 \\(line 3\\)"),  # whitespace only
    ("l.csv", "text,label\nx,a\ny,\n", "label column 'label' is empty in data row 2 \\(line 3\\)"),
    # "" in JSON Lines is refused as an empty CSV cell is
    ("e.jsonl", '{"text": "x", "label": "a"}\n\n{"text": "", "label": "b"}\n',
     "text column 'text' is empty in data row 2 \\(line 3\\)"),
    ("e.parquet", None, "text column 'text' is empty in data row 2$"),  # no lines in a parquet file
])
def test_empty_cells_name_the_data_row_and_the_line(tmp_path, name, content, message):
    if content is None:
        datasets.Dataset.from_list([{"text": "x", "label": "a"}, {"text": " ", "label": "b"}]).to_parquet(
            str(tmp_path / name))
    else:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"{name}: " + message):
        load_data(tmp_path / name)


def test_test_size_that_carves_no_test_example_is_refused_before_training(tmp_path):
    path = write(tmp_path / "r.csv", records(20), "csv")  # 1 of 20: each class's share 0.5 rounds to 0
    with pytest.raises(ValueError, match=r"r.csv: test_size 1 carves 0 test and 20 training-pool examples of 20 "
                                         r"\(rounded per class: 'negative' 0, 'positive' 0\); use a larger"):
        load_data(path, text_column="review", label_column="stars", test_size=1)
    assert len(load_data(path, text_column="review", label_column="stars", test_size=2).eval_texts) == 2


def test_test_data_folder_gives_its_test_split_never_its_train_split(tmp_path):
    train = write(tmp_path / "train.jsonl", records(30), "jsonl")
    pool = datasets.Dataset.from_list(records(30))
    test_rows, val_rows = unseen(records(6)), [{**r, "review": "val " + r["review"]} for r in records(4)]
    test_ds, val_ds = datasets.Dataset.from_list(test_rows), datasets.Dataset.from_list(val_rows)
    for splits, want in [({"train": pool, "test": test_ds, "validation": val_ds}, ("test", test_rows)),
                         ({"train": pool, "validation": val_ds}, ("validation", val_rows))]:
        folder = tmp_path / want[0]
        datasets.DatasetDict(splits).save_to_disk(str(folder))
        task = load_data(train, test_data=folder, text_column="review", label_column="stars")
        assert task.eval_texts == tuple(r["review"] for r in want[1])
        assert f"{folder / want[0]}, {len(want[1])} examples" in task.description
    datasets.DatasetDict({"train": pool, "extra": pool}).save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(ValueError, match=r"only_train: test data from a DatasetDict needs a labelled 'test' or "
                                         r"'validation' split \(label column 'stars'\); it has train, extra"):
        load_data(train, test_data=tmp_path / "only_train", text_column="review", label_column="stars")


def test_unparseable_files_name_the_root_cause(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 noir,a\nth\xe9,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: could not read it as csv: UnicodeDecodeError: .*"
                                         r"\(is it UTF-8\?"):
        load_data(tmp_path / "latin1.csv")
    (tmp_path / "ragged.csv").write_text("text,label\na,x\nb,y,z\n")
    with pytest.raises(ValueError, match=r"ragged.csv: could not read it as csv: ParserError: .*Expected 2 fields "
                                         r"in line 3, saw 3"):
        load_data(tmp_path / "ragged.csv")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label"\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: could not read it as json: \w+: .*first bad line: 2, "
                                         r"column \d+: Expecting ':' delimiter"):
        load_data(tmp_path / "broken.jsonl")


def test_nested_json_cells_are_refused_with_the_expected_layout(tmp_path):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["p", "n"] * 5})
    frame.to_json(tmp_path / "columns.json")  # pandas' default: {"text": {"0": ...}, "label": {...}}
    with pytest.raises(ValueError, match=r"columns.json: text column 'text' holds a dict in data row 1 \(line 1\): "
                                         r".*one record per line \(JSON Lines\) or a list of records.*column-oriented"):
        load_data(tmp_path / "columns.json")
    (tmp_path / "lists.json").write_text(json.dumps({"text": ["a", "b"], "label": ["p", "n"]}))
    with pytest.raises(ValueError, match=r"lists.json: text column 'text' holds a list in data row 1"):
        load_data(tmp_path / "lists.json")
    (tmp_path / "label_list.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": [["pos", "neg"][i % 2]]})
                                                       + "\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"label_list.jsonl: label column 'label' holds a list in data row 1 "
                                         r"\(line 1\): \['pos'\]; expected one value per row"):
        load_data(tmp_path / "label_list.jsonl")
    frame.to_json(tmp_path / "records.jsonl", orient="records", lines=True)  # the layout the message asks for
    assert load_data(tmp_path / "records.jsonl", test_size=2).label_names == ("n", "p")


def test_a_built_in_task_name_as_test_data_has_its_own_message(tmp_path, monkeypatch):
    train = write(tmp_path / "train.jsonl", records(30), "jsonl")
    monkeypatch.setitem(fdata.TASKS, "toy", lambda: None)
    with pytest.raises(ValueError, match=r"^toy is a built-in task, not test data; test data is a local file") as e:
        load_data(train, test_data="toy", text_column="review", label_column="stars")
    assert "nor a built-in task" not in str(e.value)
    with pytest.raises(ValueError, match=r"nope.csv: no such file or folder; test data is a local file") as e:
        load_data(train, test_data=tmp_path / "nope.csv", text_column="review", label_column="stars")
    assert "nor a built-in task" not in str(e.value)


def test_a_one_class_test_split_is_warned_about(tmp_path):
    train = write(tmp_path / "train.jsonl", records(30), "jsonl")
    only = write(tmp_path / "only_pos.jsonl", [r for r in unseen(records(10)) if r["stars"] == "positive"], "jsonl")
    with pytest.warns(UserWarning, match=r"only_pos.jsonl: the test split has one class \('positive', 5 examples\)"):
        task = load_data(train, test_data=only, text_column="review", label_column="stars")
    assert set(task.eval_labels) == {task.label_names.index("positive")}  # accepted: a user may mean it


def test_texts_in_both_the_training_pool_and_the_test_split_are_warned_about(tmp_path):
    long = "a review long enough that the warning must cut it short, and then some more words"
    rows = [{**r, "review": long} if i == 0 else r for i, r in enumerate(records(30))]
    train = write(tmp_path / "train.jsonl", rows, "jsonl")
    test = write(tmp_path / "test.jsonl", rows[:2] + unseen(records(6)), "jsonl")
    with pytest.warns(UserWarning, match=rf"test.jsonl: 2 of 8 test examples have a text that is also in the training "
                                         rf"pool, e.g. '{long[:57]}\.\.\.'"):
        load_data(train, test_data=test, text_column="review", label_column="stars")
    dup = write(tmp_path / "dup.jsonl", records(30) + records(30), "jsonl")  # every row twice: both sides
    with pytest.warns(UserWarning, match=r"dup.jsonl: \d+ of 12 test examples have a text that is also in the "):
        load_data(dup, text_column="review", label_column="stars")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean split: no warning
        load_data(train, test_data=write(tmp_path / "clean.jsonl", unseen(records(6)), "jsonl"),
                  text_column="review", label_column="stars")
        load_data(train, text_column="review", label_column="stars")


def test_a_glue_style_folder_evaluates_on_its_labelled_validation_split(tmp_path):
    # GLUE keeps its test split unlabelled (ClassLabel -1): that is not a test split
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    split = {n: datasets.Dataset.from_list([{"text": f"{n} {i}", "label": lab(i)} for i in range(size)], features=feats)
             for n, size, lab in (("train", 40, lambda i: i % 2), ("validation", 10, lambda i: i % 2),
                                  ("test", 6, lambda i: -1))}
    datasets.DatasetDict(split).save_to_disk(str(tmp_path / "glue"))
    task = load_data(tmp_path / "glue")
    assert task.eval_texts == tuple(f"validation {i}" for i in range(10))
    train = write(tmp_path / "t.jsonl", [{"text": f"t {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)],
                  "jsonl")
    assert load_data(train, test_data=tmp_path / "glue").eval_texts == task.eval_texts
