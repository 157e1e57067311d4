"""The user's own labelled data as a :class:`~.tasks.Task`, read with Hugging Face ``datasets``.

``--data`` is a built-in task name (:data:`.tasks.TASKS`), a local file (``.csv``,
``.tsv``, ``.json``, ``.jsonl``, ``.parquet``) or a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its ``train`` split; its
labelled ``test`` split, else its labelled ``validation`` split, is the test split when
there is one and no ``test_data``: GLUE-style folders keep ``test`` unlabelled). Nothing is
fetched from a hub: ``datasets`` reads the local files only. A CSV/TSV cell is read as
written: ``None``, ``NA``, ``null`` are values (LUIS's ``None`` intent is a class); only
an empty cell is missing. JSON is one record per line (JSON Lines) or a list of records;
a cell holding a list or a dict (column-oriented JSON, ``DataFrame.to_json()``'s
default) is an error.

Columns: ``text_column`` holds the text; ``text_pair_column`` (optional) a second text,
making every example an ``(a, b)`` pair that the tokenizer encodes as a pair (NLI-style
premise / hypothesis; :func:`.training.encode`); ``label_column`` the label, strings or
integers (a ``ClassLabel`` feature reads as its names). **Label names are sorted**
(strings alphabetically, integers numerically, shown as their decimal text) and class
``i`` is the ``i``-th name, so the same data always gives the same class indices.

The test split is ``test_data`` when given (a file, or a ``save_to_disk`` folder: a
``DatasetDict``'s labelled ``test`` split, else its ``validation`` split, never its ``train``
split; same columns; a label it has that the training data has not is an error; a
built-in task name is not test data), else a stratified held-out split of ``test_size``
(a fraction, default 0.2, or a count) carved with the fixed seed
:data:`.tasks.SPLIT_SEED` (:meth:`.tasks.Task.from_examples`) and named in the task's
``description``; a ``test_size`` that carves no test (or no training) example, once
rounded per class, is an error. K shots and the validation split (K per class) are
drawn from the rest by the run's seed (:func:`.protocol.sample_kshot`); choices look at
validation only.

Bad input raises ``ValueError`` naming the file and column before anything trains: a
missing column (the available ones listed), an empty file (or a header only), an empty
or whitespace-only text or label, a label column with one class, a class with fewer
than K + K examples (:func:`check_shots`), an unreadable type, a file ``datasets``
cannot parse (the root cause: a bad encoding, a ragged row, a broken JSON line).
Rows in messages are data rows counted from 1 (a CSV header is no row), with the
file's line where it has one: ``data row 10 (line 11)``. A test split of one class,
and texts both in the training pool and in the test split, are warned about
(``UserWarning``), not refused.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .tasks import SPLIT_SEED, TASKS, Task, load_task

FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEST_SIZE = 0.2


def _read(path: Path, label_column: str) -> tuple[Any, Optional[tuple[Any, Path]]]:
    """(rows, (test rows, where) or None) of ``--data``: a file or a ``save_to_disk`` folder,
    as ``datasets.Dataset``; a DatasetDict's test split is :func:`_labelled_test`'s."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (nor a built-in task: {', '.join(TASKS)})")
    if not path.is_dir():
        return _read_file(path), None
    ds = _read_folder(path)
    if hasattr(ds, "keys"):  # a DatasetDict
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict needs a 'train' split; it has {', '.join(ds)}")
        return ds["train"], _labelled_test(ds, path, label_column)
    return ds, None


def _labelled_test(ds: Any, path: Path, label_column: str) -> Optional[tuple[Any, Path]]:
    """A DatasetDict's ``test`` split, else its ``validation`` split, whichever first has
    labels: GLUE-style folders keep an unlabelled ``test`` split (ClassLabel -1)."""
    for split in ("test", "validation"):
        if split in ds and label_column in ds[split].column_names \
                and any(v is not None and v != -1 for v in ds[split][label_column]):
            return ds[split], path / split
    return None


def _read_test(path: Path, label_column: str) -> tuple[Any, Path]:
    """(rows, where) of ``test_data``: a file, a ``Dataset`` folder or a ``DatasetDict``'s test split.

    A DatasetDict gives its labelled ``test`` split, else its labelled ``validation``
    split (:func:`_labelled_test`); its ``train`` split is training data, so a folder with
    neither is refused rather than evaluated on.
    """
    if not path.exists():
        hint = " is a built-in task, not test data" if str(path) in TASKS else ": no such file or folder"
        raise ValueError(f"{path}{hint}; test data is a local file ({', '.join(FILE_TYPES)}) or a "
                         "save_to_disk folder (a built-in task has its own fixed test split)")
    if not path.is_dir():
        return _read_file(path), path
    ds = _read_folder(path)
    if not hasattr(ds, "keys"):
        return ds, path
    found = _labelled_test(ds, path, label_column)
    if found is None:
        raise ValueError(f"{path}: test data from a DatasetDict needs a labelled 'test' or 'validation' split "
                         f"(label column {label_column!r}); it has {', '.join(ds)}")
    return found


def _read_folder(path: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure is "not a save_to_disk folder"
        raise ValueError(f"{path}: a folder must be written by Dataset.save_to_disk ({e})") from None


def _read_file(path: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unreadable file type {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(FILE_TYPES)} or a Dataset.save_to_disk folder")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise ValueError(f"{path}: the file is empty")
    kwargs: dict[str, Any] = {}
    if kind == "csv":  # pandas reads "None", "NA", "null" ... as missing; only an empty cell is
        kwargs = {"keep_default_na": False, "na_values": [""]}
        if path.suffix.lower() == ".tsv":
            kwargs["delimiter"] = "\t"
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad file
        if "corresponds to no data" in str(e):  # datasets' words for a file without rows
            rows = "a header and no data rows" if kind == "csv" else "no records"
            raise ValueError(f"{path}: the file is empty ({rows})") from None
        raise ValueError(f"{path}: could not read it as {kind}: {_cause(e, path, kind)}") from None


def _cause(e: BaseException, path: Path, kind: str) -> str:
    """The root cause of a failed read: ``datasets`` wraps it in a DatasetGenerationError that says
    only "An error occurred while generating the dataset"."""
    seen = set()
    while type(e).__name__ == "DatasetGenerationError" and (e.__cause__ or e.__context__) and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = f"{type(e).__name__}: {str(e).strip()}"
    if isinstance(e, UnicodeDecodeError):
        return text + " (is it UTF-8? save it as UTF-8)"
    if kind == "json":
        bad = _bad_json_line(path)
        return text + (f" ({bad})" if bad else "")
    return text


def _bad_json_line(path: Path) -> Optional[str]:
    """'first bad line: N, column C: why' of a JSON Lines file (pyarrow counts rows from 0 and its
    fallback parser reports a character offset: neither is the line an editor shows)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or not lines[0].lstrip().startswith("{"):  # a list of records: not one per line
        return None
    for k, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as je:
                return f"first bad line: {k}, column {je.colno}: {je.msg.removesuffix(' at')}"
    return None


def _row(path: Path, i: int, n: int) -> str:
    """'data row i+1 (line L)' of row ``i`` of ``n``: rows count from 1, a CSV header is no row;
    the line is the file's where it has one (a CSV/TSV or JSON Lines file)."""
    line = None
    kind = FILE_TYPES.get(path.suffix.lower()) if path.is_file() else None
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            if kind == "csv":
                line = _csv_line(f, i, "\t" if path.suffix.lower() == ".tsv" else ",")
            elif kind == "json":
                starts = [k for k, text in enumerate(f, 1) if text.strip()]
                line = starts[i] if len(starts) == n else None  # one record a line, blank lines skipped
    except (OSError, csv.Error):
        pass
    return f"data row {i + 1}" + (f" (line {line})" if line else "")


def _csv_line(f: Any, i: int, delimiter: str) -> Optional[int]:
    """First line of data row ``i`` (quoted cells may span lines; blank lines are skipped, as pandas does)."""
    reader = csv.reader(f, delimiter=delimiter)
    row, start = -1, 1  # row -1: the header
    for record in reader:
        if record:
            if row == i:
                return start
            row += 1
        start = reader.line_num + 1
    return None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _check_cells(values: list[Any], name: str, what: str, path: Path) -> None:
    """Refuse an empty cell or a list / dict in one: a class or a text is one value per row."""
    for i, v in enumerate(values):
        if _missing(v):
            raise ValueError(f"{path}: {what} column {name!r} is empty in {_row(path, i, len(values))}")
        if isinstance(v, (list, dict, tuple)):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            hint = (" (this looks like column-oriented JSON, pandas' to_json() default: write "
                    "to_json(orient='records', lines=True))") if len(values) == 1 else ""
            raise ValueError(f"{path}: {what} column {name!r} holds a {type(v).__name__} in "
                             f"{_row(path, i, len(values))}: {shown}; expected one value per row: one record "
                             f"per line (JSON Lines) or a list of records{hint}")


def _column(ds: Any, name: str, what: str, path: Path) -> list[Any]:
    if name not in ds.column_names:
        raise ValueError(f"{path}: no {what} column {name!r}; available columns: {', '.join(ds.column_names)}")
    return list(ds[name])


def _labels(ds: Any, column: str, path: Path) -> list[Any]:
    values = _column(ds, column, "label", path)
    feature = ds.features.get(column)
    names = getattr(feature, "names", None)  # a ClassLabel: its names
    if names is not None:
        values = [names[v] if v is not None and v >= 0 else None for v in values]
    _check_cells(values, column, "label", path)
    return values


def label_names_of(values: Sequence[Any]) -> tuple[list[str], list[int]]:
    """(sorted label names, class index of each value).

    Integers (and integral floats, as pandas reads a CSV) sort numerically, everything
    else as text.

    >>> label_names_of(["pos", "neg", "pos"])
    (['neg', 'pos'], [1, 0, 1])
    >>> label_names_of([10, 2, 2])
    (['2', '10'], [1, 0, 0])
    """
    def norm(v: Any) -> Any:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v if isinstance(v, int) else str(v).strip()

    vals = [norm(v) for v in values]
    numeric = all(isinstance(v, int) for v in vals)
    uniq = sorted(set(vals)) if numeric else sorted({str(v) for v in vals})
    names = [str(u) for u in uniq]
    index = {str(u): i for i, u in enumerate(uniq)}
    return names, [index[str(v)] for v in vals]


def _texts(ds: Any, text_column: str, pair_column: Optional[str], path: Path) -> list[Any]:
    cols = [(text_column, "text")] + ([(pair_column, "text-pair")] if pair_column else [])
    out = []
    for name, what in cols:
        values = _column(ds, name, what, path)
        _check_cells(values, name, what, path)
        out.append([str(v) for v in values])
    return out[0] if len(out) == 1 else list(zip(out[0], out[1]))


def _examples(path: Path, text_column: str, label_column: str,
              text_pair_column: Optional[str]) -> tuple[list[str], list[Any], list[int], Any]:
    """(label names, texts, class indices, (test rows, where) or None) of a file or folder, checked."""
    ds, test = _read(path, label_column)
    if len(ds) == 0:
        raise ValueError(f"{path}: the file has no rows")
    texts = _texts(ds, text_column, text_pair_column, path)
    names, labels = label_names_of(_labels(ds, label_column, path))
    if len(names) < 2:
        raise ValueError(f"{path}: label column {label_column!r} has one class ({names[0]!r}); "
                         "a classifier needs at least two")
    return names, texts, labels, test


def labelled_examples(data: str | Path, *, text_column: str = "text", label_column: str = "label",
                      text_pair_column: Optional[str] = None) -> tuple[list[str], list[Any], list[int]]:
    """(label names, texts, class indices) of every labelled example of ``data``, with no
    split carved: what a reference is captured on (``sgg-optim capture``). A built-in
    task gives its training pool and eval split; a ``DatasetDict`` folder its train split.
    """
    if str(data) in TASKS:
        task = load_task(str(data))
        return list(task.label_names), list(task.train_texts + task.eval_texts), \
            list(task.train_labels + task.eval_labels)
    names, texts, labels, _ = _examples(Path(data), text_column, label_column, text_pair_column)
    return names, texts, labels


def load_data(data: str | Path, *, text_column: str = "text", label_column: str = "label",
              text_pair_column: Optional[str] = None, test_data: Optional[str | Path] = None,
              test_size: float = TEST_SIZE, name: Optional[str] = None, shots: Optional[int] = None) -> Task:
    """The :class:`Task` of ``data`` (a built-in task name, a file or a ``save_to_disk`` folder).

    See the module text for columns, label names and the test split. With ``shots`` the
    task is checked for K shots + K validation examples per class (:func:`check_shots`).
    """
    if str(data) in TASKS:
        if test_data is not None:
            raise ValueError(f"{data} is a built-in task with its own fixed eval split; --test-data is for files")
        task = load_task(str(data))
    else:
        path = Path(data)
        names, texts, labels, test = _examples(path, text_column, label_column, text_pair_column)
        task_name = name or path.stem
        cols = f"text {text_column!r}" + (f" + {text_pair_column!r}" if text_pair_column else "") \
            + f", label {label_column!r}"
        if test_data is not None or test is not None:
            test_ds, tpath = _read_test(Path(test_data), label_column) if test_data is not None else test
            if len(test_ds) == 0:
                raise ValueError(f"{tpath}: the file has no rows")
            t_texts = _texts(test_ds, text_column, text_pair_column, tpath)
            t_raw = _labels(test_ds, label_column, tpath)
            index = {n: i for i, n in enumerate(names)}
            t_names, t_idx = label_names_of(t_raw)
            unknown = sorted(set(t_names) - set(index))
            if unknown:
                raise ValueError(f"{tpath}: label column {label_column!r} has labels the training data has not: "
                                 f"{', '.join(unknown)} (training labels: {', '.join(names)})")
            t_labels = [index[t_names[i]] for i in t_idx]
            task = Task(task_name, tuple(names), tuple(texts), tuple(labels), tuple(t_texts), tuple(t_labels),
                        description=f"{path} ({cols}): {len(texts)} training-pool examples; test split: "
                                    f"{tpath}, {len(t_texts)} examples")
            _warn_test_split(task, tpath)
        else:
            n_eval = int(test_size) if test_size >= 1 else round(test_size * len(texts))
            if not 0 < n_eval < len(texts):
                raise ValueError(f"{path}: test_size {test_size} leaves no test or no training examples "
                                 f"of {len(texts)}")
            task = Task.from_examples(task_name, names, texts, labels, n_eval=n_eval)
            _check_carved(task, path, test_size)
            task = Task(task.name, task.label_names, task.train_texts, task.train_labels, task.eval_texts,
                        task.eval_labels,
                        description=f"{path} ({cols}): test split of {len(task.eval_texts)} examples held out "
                                    f"(stratified, fixed seed {SPLIT_SEED}), {len(task.train_texts)} in the "
                                    "training pool")
            _warn_test_split(task, path)
    if shots is not None:
        check_shots(task, shots, source=str(data), label_column=label_column)
    return task


def _check_carved(task: Task, path: Path, test_size: float) -> None:
    """Refuse a held-out split that is empty (or leaves no training pool) once rounded per class:
    ``--test-size 1`` of 20 rows rounds each class's share (0.5) to 0, and the run would fail
    only after training."""
    n_test, n_pool = len(task.eval_texts), len(task.train_texts)
    if n_test and n_pool:
        return
    per_class = ", ".join(f"{n!r} {task.eval_labels.count(c)}" for c, n in enumerate(task.label_names))
    raise ValueError(f"{path}: test_size {test_size} carves {n_test} test and {n_pool} training-pool examples "
                     f"of {n_test + n_pool} (rounded per class: {per_class}); use a "
                     f"{'larger' if not n_test else 'smaller'} test_size")


def _warn_test_split(task: Task, tpath: Path) -> None:
    """Warn (not refuse: it may be meant) about a one-class test split and texts on both sides."""
    classes = sorted(set(task.eval_labels))
    if len(classes) == 1:
        warnings.warn(f"{tpath}: the test split has one class ({task.label_names[classes[0]]!r}, "
                      f"{len(task.eval_labels)} examples): accuracy and macro-F1 on it say little and the "
                      "failed-run verdict (vs. always predicting one class) means nothing", UserWarning, stacklevel=3)
    pool = set(task.train_texts)
    both = [t for t in task.eval_texts if t in pool]
    if both:
        example = " | ".join(both[0]) if isinstance(both[0], tuple) else str(both[0])
        example = example if len(example) <= 60 else example[:57] + "..."
        warnings.warn(f"{tpath}: {len(both)} of {len(task.eval_texts)} test examples have a text that is also in "
                      f"the training pool, e.g. {example!r}: test scores overstate what the model learnt",
                      UserWarning, stacklevel=3)


def check_shots(task: Task, k: int, val_per_class: Optional[int] = None, *, source: str = "",
                label_column: str = "label") -> None:
    """Raise ``ValueError`` unless every class of ``task``'s training pool has ``k`` shots +
    ``val_per_class`` (default ``k``) validation examples."""
    need = k + (k if val_per_class is None else val_per_class)
    counts = [task.train_labels.count(c) for c in range(task.num_labels)]
    short = [(task.label_names[c], n) for c, n in enumerate(counts) if n < need]
    if short:
        where = f"{source or task.name}: label column {label_column!r}: " if source else f"{task.name}: "
        listed = ", ".join(f"{name!r} has {n}" for name, n in short)
        raise ValueError(f"{where}{listed} training-pool examples, fewer than K={k} shots + "
                         f"{need - k} validation per class (the test split is held out first)")
