"""Labelled NLU tasks built from cached assets, each with a fixed held-out eval split.

A :class:`Task` is texts, integer labels and label names, split once into a ``train``
pool and an ``eval`` set by a fixed permutation (seed ``SPLIT_SEED``), stratified per
class so every task's eval set has the task's class balance. The split depends on the
data only, never on the run's seed: every strategy and every seed sees the same eval.

Example (a task from in-memory data; real ones come from :func:`load_task`):

    >>> t = Task.from_examples("toy", ["neg", "pos"], [f"text {i}" for i in range(20)],
    ...                        [i % 2 for i in range(20)], n_eval=6)
    >>> len(t.eval_texts), len(t.train_texts), sorted(set(t.eval_labels))
    (6, 14, [0, 1])
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import assets

SPLIT_SEED = 20260521
N_EVAL = 500


@dataclass(frozen=True)
class Task:
    """A classification task with a fixed train pool and eval set."""

    name: str
    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    eval_texts: tuple[str, ...]
    eval_labels: tuple[int, ...]
    description: str = field(default="", compare=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @classmethod
    def from_examples(cls, name: str, label_names: Sequence[str], texts: Sequence[str],
                      labels: Sequence[int], *, n_eval: int = N_EVAL, description: str = "") -> "Task":
        """Split ``texts``/``labels`` into a stratified eval set of about ``n_eval`` and a train pool."""
        if len(texts) != len(labels):
            raise ValueError(f"{name}: {len(texts)} texts but {len(labels)} labels")
        rng = random.Random(SPLIT_SEED)
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        eval_idx: list[int] = []
        for y in sorted(by_class):
            idx = by_class[y]
            rng.shuffle(idx)
            eval_idx += idx[: round(n_eval * len(idx) / len(texts))]
        eval_set = set(eval_idx)
        train_idx = [i for i in range(len(texts)) if i not in eval_set]
        eval_idx.sort()
        return cls(name, tuple(label_names),
                   tuple(texts[i] for i in train_idx), tuple(int(labels[i]) for i in train_idx),
                   tuple(texts[i] for i in eval_idx), tuple(int(labels[i]) for i in eval_idx),
                   description)


def _vader(domain: str, title: str) -> Callable[[], Task]:
    def load() -> Task:
        folder = assets.fetch(assets.VADER, quiet=False)
        texts, labels = [], []
        for line in (folder / f"{domain}.txt").read_text(encoding="latin-1").splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            score = float(parts[1])
            if abs(score) < 0.5:  # near-neutral: mean human rating does not pick a side
                continue
            texts.append("\t".join(parts[2:]).strip())
            labels.append(int(score > 0))
        return Task.from_examples(f"vader-{domain_short[domain]}", ("negative", "positive"), texts, labels,
                                  description=f"{title} sentiment (VADER ground truth, |score| >= 0.5)")
    return load


domain_short = {"movieReviewSnippets": "movie", "tweets": "tweets",
                "amazonReviewSnippets": "amazon", "nytEditorialSnippets": "nyt"}


def _rotten_rows() -> list[tuple[str, str]]:
    folder = assets.fetch(assets.ROTTEN_TOMATOES, quiet=False)
    raw = bz2.decompress((folder / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()).decode("utf-8")
    return [(r["category"], r["text"]) for r in csv.DictReader(io.StringIO(raw))]


def _rt_polarity() -> Task:
    rows = [(c, t) for c, t in _rotten_rows() if c in ("fresh", "rotten")]
    return Task.from_examples("rt-polarity", ("rotten", "fresh"), [t for _, t in rows],
                              [int(c == "fresh") for c, _ in rows],
                              description="Rotten Tomatoes critics' snippets, fresh vs rotten")


def _rt_subjectivity() -> Task:
    rows = _rotten_rows()
    return Task.from_examples("rt-subjectivity", ("objective", "subjective"), [t for _, t in rows],
                              [int(c != "plot") for c, _ in rows],
                              description="Rotten Tomatoes plot summaries (objective) vs reviews")


def _bbc() -> Task:
    folder = assets.fetch(assets.BBC_NEWS, quiet=False)
    rows = [json.loads(line) for line in (folder / "bbcnews.jsonl").read_text(encoding="utf-8").splitlines()]
    topic = [r["path"].split("/")[-2] for r in rows]
    names = tuple(sorted(set(topic)))
    # the first line is the headline; the body follows after a blank line
    texts = [" ".join(r["text"].split()) for r in rows]
    return Task.from_examples("bbc-topic", names, texts, [names.index(t) for t in topic],
                              description="BBC News articles, 5 topics")


TASKS: dict[str, Callable[[], Task]] = {
    "vader-movie": _vader("movieReviewSnippets", "Movie review snippets"),
    "vader-tweets": _vader("tweets", "Tweet"),
    "vader-amazon": _vader("amazonReviewSnippets", "Amazon review snippets"),
    "vader-nyt": _vader("nytEditorialSnippets", "NYT editorial snippets"),
    "rt-polarity": _rt_polarity,
    "rt-subjectivity": _rt_subjectivity,
    "bbc-topic": _bbc,
}

_loaded: dict[str, Task] = {}


def load_task(name: str) -> Task:
    """The task called ``name`` (see ``TASKS``), fetching its data on first use."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if name not in _loaded:
        _loaded[name] = TASKS[name]()
    return _loaded[name]
