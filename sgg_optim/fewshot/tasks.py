"""Labelled NLU tasks built from cached assets, each with a fixed held-out eval split.

A :class:`Task` is texts, integer labels and label names, split once into a ``train``
pool and an ``eval`` set by a fixed permutation (seed ``SPLIT_SEED``), stratified per
class so every task's eval set has the task's class balance. The split depends on the
data only, never on the run's seed: every strategy and every seed sees the same eval.

BIG-bench tasks (``bb-*``) read the task's ``task.json``: label = argmax of
``target_scores``, label names are the choices as plain words (they double as the
label words a language model scores), text = the example's ``input`` without the
task-level instruction. VitaminC is subsampled to ``BIGBENCH_LIMIT`` examples with the
claim moved first; intent recognition drops the ``Utterance:`` prefix and keeps a
smaller eval set (``INTENT_N_EVAL``) so that 32 examples per class remain for training.

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
from typing import Any, Callable, Mapping, Sequence

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


def bigbench_examples(data: Mapping[str, Any], label_words: Mapping[str, str] | None = None,
                      text: Callable[[str], str] = str.strip) -> tuple[tuple[str, ...], list[str], list[int]]:
    """(label names, texts, labels) of a BIG-bench multiple-choice ``task.json``.

    The label is the argmax of each example's ``target_scores``. ``label_words`` maps
    each BIG-bench choice to the label name we use, in class-index order; by default
    the first example's choices in order, lower-cased with ``_`` as spaces, so they read
    as words a language model can score. ``text`` turns an example's ``input`` into the
    text we classify; the task-level instruction (``task_prefix``) is never included.

    >>> data = {"examples": [{"input": " a ", "target_scores": {"True": 1, "No_idea": 0}},
    ...                      {"input": "b", "target_scores": {"True": 0, "No_idea": 1}}]}
    >>> bigbench_examples(data)
    (('true', 'no idea'), ['a', 'b'], [0, 1])
    """
    examples = data.get("examples") if isinstance(data, Mapping) else None
    if not examples:
        raise ValueError("data: a BIG-bench task.json with a non-empty 'examples' list is needed")
    if label_words is None:
        first = examples[0].get("target_scores") or {}
        label_words = {k: k.lower().replace("_", " ") for k in first}
    choices = list(label_words)
    if len(choices) < 2:
        raise ValueError(f"label_words: need at least two choices, got {choices}")
    texts, labels = [], []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores")
        if not isinstance(scores, Mapping) or set(scores) != set(choices):
            raise ValueError(f"data: example {i} has target_scores {scores!r}; expected the choices {choices}")
        best = max(scores.values())
        winners = [c for c in choices if scores[c] == best]
        if len(winners) != 1:
            raise ValueError(f"data: example {i} has no single best choice in {dict(scores)}")
        texts.append(text(ex["input"]))
        labels.append(choices.index(winners[0]))
    return tuple(label_words[c] for c in choices), texts, labels


def _claim_first(text: str) -> str:
    # VitaminC inputs are "<page>: <evidence>\nClaim: <claim>"; 39% exceed 64 MiniLM
    # tokens, and right truncation would then drop the claim, the thing being judged.
    evidence, sep, claim = text.strip().rpartition("\nClaim: ")
    return f"Claim: {claim}\n{evidence}" if sep else text.strip()


def _subsample(n: int, limit: int | None) -> list[int]:
    """Indices of at most ``limit`` of ``n`` examples: fixed by SPLIT_SEED, in data order."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(random.Random(SPLIT_SEED).sample(range(n), limit))


BIGBENCH_LIMIT = 6000  # VitaminC has 54,668 examples: plenty for K-shot pools and a 500 eval


def _bigbench(task: str, name: str, label_words: Mapping[str, str], text: Callable[[str], str],
              title: str, limit: int | None = BIGBENCH_LIMIT, n_eval: int = N_EVAL) -> Callable[[], Task]:
    def load() -> Task:
        folder = assets.fetch(assets.BIGBENCH, quiet=False)
        data = json.loads((folder / f"{task}.json").read_text(encoding="utf-8"))
        names, texts, labels = bigbench_examples(data, label_words, text)
        keep = _subsample(len(texts), limit)
        return Task.from_examples(name, names, [texts[i] for i in keep], [labels[i] for i in keep], n_eval=n_eval,
                                  description=f"{title} (BIG-bench {task}, {len(keep)} of {len(texts)} examples)")
    return load


# 693 examples: a 500 eval would leave the rarest intent (rate_book, 80) 22 training
# examples, too few for K=32 per class; 350 leaves it 40.
INTENT_N_EVAL = 350
_INTENTS = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "rate_book",
            "search_creative_work", "search_screening_event")

TASKS: dict[str, Callable[[], Task]] = {
    "vader-movie": _vader("movieReviewSnippets", "Movie review snippets"),
    "vader-tweets": _vader("tweets", "Tweet"),
    "vader-amazon": _vader("amazonReviewSnippets", "Amazon review snippets"),
    "vader-nyt": _vader("nytEditorialSnippets", "NYT editorial snippets"),
    "rt-polarity": _rt_polarity,
    "rt-subjectivity": _rt_subjectivity,
    "bbc-topic": _bbc,
    "bb-vitaminc": _bigbench("vitaminc_fact_verification", "bb-vitaminc",
                             {"True": "true", "False": "false", "Neither": "neither"}, _claim_first,
                             "Claim vs Wikipedia evidence: true, false or not enough information"),
    "bb-epistemic": _bigbench("epistemic_reasoning", "bb-epistemic",
                              {"entailment": "entailment", "non-entailment": "non-entailment"}, str.strip,
                              "Premise/hypothesis about beliefs and knowledge: entailment or not"),
    "bb-intent": _bigbench("intent_recognition", "bb-intent", {k: k.replace("_", " ") for k in _INTENTS},
                           lambda s: s.strip().removeprefix("Utterance:").strip(),
                           "Intent of a voice-assistant utterance (SNIPS), 7 intents", n_eval=INTENT_N_EVAL),
}

_loaded: dict[str, Task] = {}


def load_task(name: str) -> Task:
    """The task called ``name`` (see ``TASKS``), fetching its data on first use."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if name not in _loaded:
        _loaded[name] = TASKS[name]()
    return _loaded[name]
