"""The user's own labelled data as a :class:`~.tasks.Task`, read with Hugging Face ``datasets``.

``--data`` is a built-in task name (:data:`.tasks.TASKS`), a local file (``.csv``,
``.tsv``, ``.json``, ``.jsonl``, ``.parquet``) or a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its ``train`` split; its
``test`` split is the test split when there is one and no ``test_data``). Nothing is
fetched from a hub: ``datasets`` reads the local files only.

Columns: ``text_column`` holds the text; ``text_pair_column`` (optional) a second text,
making every example an ``(a, b)`` pair that the tokenizer encodes as a pair (NLI-style
premise / hypothesis; :func:`.training.encode`); ``label_column`` the label, strings or
integers (a ``ClassLabel`` feature reads as its names). **Label names are sorted**
(strings alphabetically, integers numerically, shown as their decimal text) and class
``i`` is the ``i``-th name, so the same data always gives the same class indices.

The test split is ``test_data`` when given (same columns; a label it has that the
training data has not is an error), else a stratified held-out split of ``test_size``
(a fraction, default 0.2, or a count) carved with the fixed seed
:data:`.tasks.SPLIT_SEED` (:meth:`.tasks.Task.from_examples`) and named in the task's
``description``. K shots and the validation split (K per class) are drawn from the
rest by the run's seed (:func:`.protocol.sample_kshot`); choices look at validation only.

Bad input raises ``ValueError`` naming the file and column before anything trains: a
missing column (the available ones listed), an empty file, a label column with one
class, a class with fewer than K + K examples (:func:`check_shots`), an unreadable type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .tasks import SPLIT_SEED, TASKS, Task, load_task

FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEST_SIZE = 0.2


def _read(path: Path) -> tuple[Any, Any]:
    """(rows, test rows or None) of a file or a ``save_to_disk`` folder, as ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (nor a built-in task: {', '.join(TASKS)})")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure is "not a save_to_disk folder"
            raise ValueError(f"{path}: a folder must be written by Dataset.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: a DatasetDict needs a 'train' split; it has {', '.join(ds)}")
            return ds["train"], ds.get("test")
        return ds, None
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unreadable file type {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(FILE_TYPES)} or a Dataset.save_to_disk folder")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise ValueError(f"{path}: the file is empty")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad file
        raise ValueError(f"{path}: could not read it as {kind}: {type(e).__name__}: {e}") from None
    return ds, None


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
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{path}: label column {column!r} is empty in row {i}")
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
        for i, v in enumerate(values):
            if v is None:
                raise ValueError(f"{path}: {what} column {name!r} is empty in row {i}")
        out.append([str(v) for v in values])
    return out[0] if len(out) == 1 else list(zip(out[0], out[1]))


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
        ds, test_ds = _read(path)
        if len(ds) == 0:
            raise ValueError(f"{path}: the file has no rows")
        texts = _texts(ds, text_column, text_pair_column, path)
        raw = _labels(ds, label_column, path)
        names, labels = label_names_of(raw)
        if len(names) < 2:
            raise ValueError(f"{path}: label column {label_column!r} has one class ({names[0]!r}); "
                             "a classifier needs at least two")
        task_name = name or path.stem
        cols = f"text {text_column!r}" + (f" + {text_pair_column!r}" if text_pair_column else "") \
            + f", label {label_column!r}"
        if test_data is not None or test_ds is not None:
            if test_data is not None:
                tpath = Path(test_data)
                test_ds, _ = _read(tpath)
            else:
                tpath = path / "test"
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
        else:
            n_eval = int(test_size) if test_size >= 1 else round(test_size * len(texts))
            if not 0 < n_eval < len(texts):
                raise ValueError(f"{path}: test_size {test_size} leaves no test or no training examples "
                                 f"of {len(texts)}")
            task = Task.from_examples(task_name, names, texts, labels, n_eval=n_eval)
            task = Task(task.name, task.label_names, task.train_texts, task.train_labels, task.eval_texts,
                        task.eval_labels,
                        description=f"{path} ({cols}): test split of {len(task.eval_texts)} examples held out "
                                    f"(stratified, fixed seed {SPLIT_SEED}), {len(task.train_texts)} in the "
                                    "training pool")
    if shots is not None:
        check_shots(task, shots, source=str(data), label_column=label_column)
    return task


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
