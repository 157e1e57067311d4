"""The k-shot protocol: sample K examples per class by seed, pick lr on validation, evaluate.

The eval split is fixed by the task (:mod:`.tasks`); shots and the validation split
are drawn from the task's train pool only, so they never touch eval. The validation
split has as many examples per class as the training shots (the few-shot setting has
no large dev set) and is the only thing the learning rate is chosen on.

    >>> labels = [0, 1] * 50
    >>> a = sample_kshot(labels, k=4, seed=3)
    >>> a == sample_kshot(labels, k=4, seed=3), a != sample_kshot(labels, k=4, seed=4)
    (True, True)
    >>> len(a.train), len(a.val), set(a.train) & set(a.val)
    (8, 8, set())
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from . import metrics
from .strategies import Strategy
from .tasks import Task
from .training import ModelFactory, RunConfig, apply_lora, batches, predict, source_reference, train

SOURCE_TASK = "vader-movie"


@dataclass(frozen=True)
class Shots:
    """Indices into a task's train pool: the K-shot training set and the validation set."""

    train: tuple[int, ...]
    val: tuple[int, ...]


def sample_kshot(labels: Sequence[int], k: int, seed: int, val_per_class: Optional[int] = None) -> Shots:
    """K examples per class for training and ``val_per_class`` (default K) more for validation."""
    val_per_class = k if val_per_class is None else val_per_class
    rng = random.Random(f"kshot-{seed}")
    train: list[int] = []
    val: list[int] = []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        if len(idx) < k + val_per_class:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than {k} shots + {val_per_class} val")
        picked = rng.sample(idx, k + val_per_class)
        train += picked[:k]
        val += picked[k:]
    return Shots(tuple(sorted(train)), tuple(sorted(val)))


def _subset(task: Task, idx: Sequence[int]) -> tuple[list[str], list[int]]:
    return [task.train_texts[i] for i in idx], [task.train_labels[i] for i in idx]


def _fresh_model(factory: ModelFactory, task: Task, strategy: Strategy, seed: int):
    torch.manual_seed(seed)  # same head initialisation for every strategy at this seed
    model, tok = factory(task.num_labels)
    if strategy.lora:
        model = apply_lora(model)
    if strategy.prepare_model is not None:
        model = strategy.prepare_model(model)
    return model, tok


def run_cell(task: Task, strategy: Strategy, k: int, seed: int, factory: ModelFactory, cfg: RunConfig,
             *, lr_grid: Optional[Sequence[float]] = None, source: Optional[Task] = None,
             on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train ``strategy`` on K shots of ``task`` for each lr, keep the best on validation,
    and report its eval figures and per-step trace (a JSON-able dict)."""
    t0 = time.perf_counter()
    shots = sample_kshot(task.train_labels, k, seed)
    tr_texts, tr_labels = _subset(task, shots.train)
    va_texts, va_labels = _subset(task, shots.val)
    grid = tuple(lr_grid or strategy.lr_grid)
    best: Optional[tuple[float, float, Any, Any, dict]] = None
    val_scores = {}
    for lr in grid:
        model, tok = _fresh_model(factory, task, strategy, seed)
        ref = None
        if strategy.reference == "source":
            if source is None:
                raise ValueError(f"{strategy.name} needs a source task")
            if source.num_labels != task.num_labels:
                raise ValueError(f"source {source.name} has {source.num_labels} labels, "
                                 f"target {task.name} {task.num_labels}: the head cannot share a reference")
            ref = source_reference(model, tok, source.train_texts, source.train_labels, cfg)
        trace = train(model, strategy, lr, batches(tok, tr_texts, tr_labels, cfg, seed), cfg, ref, on_step)
        va_pred = predict(model, tok, va_texts, cfg)
        score = (metrics.accuracy(va_labels, va_pred), metrics.macro_f1(va_labels, va_pred, task.num_labels))
        val_scores[lr] = score[0]
        if best is None or score > best[0]:
            best = (score, lr, model, tok, trace)
        else:
            del model
    assert best is not None
    _, lr, model, tok, trace = best
    pred = predict(model, tok, task.eval_texts, cfg)
    return {
        "task": task.name, "strategy": strategy.name, "k": k, "seed": seed, "steps": cfg.steps,
        "lr": lr, "val_acc": val_scores,
        "accuracy": metrics.accuracy(task.eval_labels, pred),
        "macro_f1": metrics.macro_f1(task.eval_labels, pred, task.num_labels),
        **metrics.trace_summary(trace),
        "trace": trace, "seconds": round(time.perf_counter() - t0, 1),
    }
