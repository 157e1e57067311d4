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
from torch import nn

from ..reference import Reference
from . import metrics
from .strategies import PrepareContext, Strategy
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
    model, tok = factory(task)
    if strategy.lora:
        model = apply_lora(model)
    return model, tok


def shared_reference(model: nn.Module, source_model: nn.Module, tokenizer: Any, source: Task,
                     cfg: RunConfig) -> Reference:
    """A source reference over the parameters ``model`` shares with ``source_model``.

    Shared means same name, shape and value: the pretrained weights. A freshly
    initialised head is not shared (its gradient says nothing about another task's head,
    and a 5-way source head does not even fit a 2-way target), so its entries are zero and
    it takes no part in the direction. ``source_model`` must be built with a different
    seed than ``model`` so that equal-shaped fresh heads differ.
    """
    src = source_reference(source_model, tokenizer, source.train_texts, source.train_labels, cfg)
    theirs = dict(source_model.named_parameters())
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        q = theirs.get(name)
        shared = q is not None and q.shape == p.shape and torch.equal(q, p) and name in src
        tensors[name] = src[name].to(p.dtype) if shared else torch.zeros_like(p)
    return Reference(tensors).bind(model)


def _references(strategy: Strategy, model: nn.Module, tok: Any, task: Task, seed: int, cfg: RunConfig,
                factory: ModelFactory, source: Optional[Task], sources: Sequence[Task]) -> Any:
    """The reference(s) ``strategy`` guides toward, captured at ``model``'s initial point."""
    if strategy.reference == "source":
        if source is None:
            raise ValueError(f"{strategy.name} needs a source task")
        if source.num_labels != task.num_labels:
            raise ValueError(f"source {source.name} has {source.num_labels} labels, target {task.name} "
                             f"{task.num_labels}: the head cannot share a reference (use a *-sources row)")
        return source_reference(model, tok, source.train_texts, source.train_labels, cfg)
    if strategy.reference == "sources":
        if not sources:
            raise ValueError(f"{strategy.name} needs source tasks")
        if strategy.lora or strategy.prepare is not None:
            raise ValueError(f"{strategy.name}: multi-source references are built for full fine-tuning only")
        refs = []
        for i, src in enumerate(sources):
            torch.manual_seed(seed + 1000 + i)  # a fresh head unlike the target's: not shared
            src_model, src_tok = factory(src)
            refs.append(shared_reference(model, src_model, src_tok, src, cfg))
            del src_model
        return refs
    if strategy.reference == "icl":
        if source is None:
            raise ValueError(f"{strategy.name} needs a source task")
        from ..methods.retention import icl_reference

        return icl_reference(model, tok, source, cfg=cfg, seed=seed)
    return None


def run_cell(task: Task, strategy: Strategy, k: int, seed: int, factory: ModelFactory, cfg: RunConfig,
             *, lr_grid: Optional[Sequence[float]] = None, source: Optional[Task] = None,
             sources: Sequence[Task] = (), retention: Sequence[Task] = (), retention_n: int = 100,
             retention_k: int = 4,
             on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train ``strategy`` on K shots of ``task`` for each lr, keep the best on validation,
    and report its eval figures and per-step trace (a JSON-able dict).

    ``source`` is the task of ``*-source`` and ``*-icl`` references, ``sources`` those of
    ``*-sources`` rows. With ``retention`` tasks (causal LMs only) the row also holds the
    tuned model's in-context accuracy on ``retention_n`` eval texts of each, with
    ``retention_k`` demonstrations (:mod:`sgg_optim.methods.retention`).
    """
    t0 = time.perf_counter()
    shots = sample_kshot(task.train_labels, k, seed)
    tr_texts, tr_labels = _subset(task, shots.train)
    va_texts, va_labels = _subset(task, shots.val)
    grid = tuple(lr_grid or strategy.lr_grid) if strategy.train else (0.0,)
    best: Optional[tuple[tuple[float, float], float, Any, Any, dict]] = None
    val_scores = {}
    for lr in grid:
        model, tok = _fresh_model(factory, task, strategy, seed)
        if strategy.prepare is not None:
            ctx = PrepareContext(tok, task, tuple(tr_texts), tuple(tr_labels), cfg, seed, lr)
            model, tok = strategy.prepare(model, ctx)
        trace: dict[str, list] = {name: [] for name in ("loss", "grad_norm", "applied_norm", "update_cos", "ref_cos")}
        if strategy.train:
            ref = _references(strategy, model, tok, task, seed, cfg, factory, source, sources)
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
    row = {
        "task": task.name, "strategy": strategy.name, "k": k, "seed": seed, "steps": cfg.steps,
        "lr": lr, "val_acc": val_scores,
        "accuracy": metrics.accuracy(task.eval_labels, pred),
        "macro_f1": metrics.macro_f1(task.eval_labels, pred, task.num_labels),
        **metrics.trace_summary(trace),
        "trace": trace,
    }
    if "weights" in trace:
        w = torch.tensor(trace["weights"], dtype=torch.float64)
        row["source_weights"] = dict(zip((s.name for s in sources), w.mean(0).tolist()))
    if retention:
        from ..methods.retention import retention_lm, retention_report

        row["retention"] = retention_report(retention_lm(model), getattr(tok, "tokenizer", tok), retention,
                                            max_length=cfg.max_length, n_eval=retention_n,
                                            k=retention_k)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row
