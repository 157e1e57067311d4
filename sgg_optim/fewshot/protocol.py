"""The k-shot protocol (v2): sample K examples per class by seed, train at one lr, evaluate.

The eval split is fixed by the task (:mod:`.tasks`); shots and the validation split
are drawn from the task's train pool only, so they never touch eval. The validation
split has as many examples per class as the training shots (the few-shot setting has
no large dev set) and is the only thing the learning rate is chosen on. Every run
(task, strategy, K, seed, lr) is one results row holding both its validation and its
eval figures; the lr is chosen afterwards, per (task, strategy, seed), on validation
(:func:`sgg_optim.fewshot.results.choose_lr`).

    >>> labels = [0, 1] * 50
    >>> a = sample_kshot(labels, k=4, seed=3)
    >>> a == sample_kshot(labels, k=4, seed=3), a != sample_kshot(labels, k=4, seed=4)
    (True, True)
    >>> len(a.train), len(a.val), set(a.train) & set(a.val)
    (8, 8, set())
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

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
                factory: ModelFactory, source: Optional[Task], sources: Sequence[Task],
                shots: tuple[Sequence[str], Sequence[int]] = ((), ())) -> Any:
    """The reference(s) ``strategy`` guides toward, captured at ``model``'s initial point.

    ``shots`` are the K-shot training texts and labels (the ``kshot`` reference).
    """
    if strategy.reference == "kshot":
        texts, labels = shots
        if not texts:
            raise ValueError(f"{strategy.name} needs the K-shot training set")
        return source_reference(model, tok, texts, labels, cfg)
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


def source_compatible(strategy: Strategy, task: Task, source: Optional[Task]) -> Optional[str]:
    """Why ``strategy`` cannot run on ``task`` with ``source`` (None if it can); callers
    say what follows (the grid skips the row, ``compare`` stops).

    A ``*-source`` row guides the target's own model toward the source task's gradient,
    head included, so the two tasks must have the same number of labels.
    """
    if strategy.reference == "source" and source is not None and source.num_labels != task.num_labels:
        return f"source {source.name} has {source.num_labels} labels, {task.name} {task.num_labels}"
    return None


def _rebind(reference: Any, model: nn.Module) -> Any:
    if isinstance(reference, Reference):
        return reference.bind(model)
    if isinstance(reference, (list, tuple)):
        return [_rebind(r, model) for r in reference]
    return reference


def _retention_heads(model: nn.Module, tok: Any, tasks: Sequence[Task], cfg: RunConfig) -> Optional[list]:
    """For an encoder, the frozen heads that measure retention on ``tasks``, fitted on the
    untuned model (:mod:`sgg_optim.methods.frozen_head`); None for a causal LM, whose
    retention is its in-context accuracy (:mod:`sgg_optim.methods.retention`)."""
    from ..methods.incontext import VerbalizerLM

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(model, VerbalizerLM) or out is not None:
        return None
    from ..methods.frozen_head import pretrained_heads

    return pretrained_heads(model, tok, tasks, max_length=cfg.max_length)


def majority_rate(labels: Sequence[int]) -> float:
    """The accuracy of always predicting the most frequent class.

    >>> majority_rate([0, 1, 1, 1])
    0.75
    """
    return max(labels.count(c) for c in set(labels)) / len(labels) if labels else math.nan


def run_cell(task: Task, strategy: Strategy, k: int, seed: int, factory: ModelFactory, cfg: RunConfig,
             *, lr: Optional[float] = None, source: Optional[Task] = None, sources: Sequence[Task] = (),
             retention: Sequence[Task] = (), retention_n: int = 100, retention_k: int = 4,
             on_step: Optional[Callable[[int], None]] = None,
             initial: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train ``strategy`` on K shots of ``task`` at learning rate ``lr``; its validation and
    eval figures and per-step trace (a JSON-able dict): one results row. A strategy that
    does not train (``pretrained``) needs no lr; its row has lr 0.

    The lr is chosen later, from these rows, on ``val_acc`` (:func:`.results.choose_lr`);
    ``accuracy`` and ``macro_f1`` are on the task's eval split, which no choice looks at.
    ``source`` is the task of ``*-source`` and ``*-icl`` references, ``sources`` those of
    ``*-sources`` rows. With ``retention`` tasks the row also holds what the tuned model
    keeps of each, on ``retention_n`` eval texts: a causal LM's in-context accuracy with
    ``retention_k`` demonstrations (:mod:`sgg_optim.methods.retention`); an encoder's
    accuracy through a head fitted on the untuned encoder and frozen
    (:mod:`sgg_optim.methods.frozen_head`).

    ``initial``: a dict shared by the calls of one (task, strategy, K, seed) at several
    lrs (:func:`run_lrs`). The reference is captured at the model's initial point, which
    does not depend on the lr, so the first call stores it there (with the random-number
    state after the capture) and the others reuse it: the same figures, one capture.
    """
    t0 = time.perf_counter()
    shots = sample_kshot(task.train_labels, k, seed)
    tr_texts, tr_labels = _subset(task, shots.train)
    va_texts, va_labels = _subset(task, shots.val)
    if strategy.train and lr is None:
        raise ValueError(f"{strategy.name} trains: run_cell needs its lr")
    lr = float(lr) if strategy.train else 0.0  # type: ignore[arg-type]
    model, tok = _fresh_model(factory, task, strategy, seed)
    heads = _retention_heads(model, tok, retention, cfg) if retention else None
    if strategy.prepare is not None:
        if strategy.own_loop and strategy.guidance is not None and strategy.reference != "ema":
            raise ValueError(f"{strategy.name}: a row that trains itself guides toward its own EMA reference only")
        ctx = PrepareContext(tok, task, tuple(tr_texts), tuple(tr_labels), cfg, seed, lr, strategy.guidance)
        model, tok = strategy.prepare(model, ctx)
    trace: dict[str, list] = {name: [] for name in ("loss", "grad_norm", "applied_norm", "update_cos", "ref_cos")}
    if strategy.train and not strategy.own_loop:
        # the initial point depends on the lr only through a prepare hook
        memo = initial if initial is not None and strategy.prepare is None else None
        if memo is not None and "reference" in memo:
            ref = _rebind(memo["reference"], model)
            torch.set_rng_state(memo["rng"])
        else:
            ref = _references(strategy, model, tok, task, seed, cfg, factory, source, sources,
                              (tr_texts, tr_labels))
            if memo is not None:
                memo["reference"], memo["rng"] = ref, torch.get_rng_state()
        trace = train(model, strategy, lr, batches(tok, tr_texts, tr_labels, cfg, seed), cfg, ref, on_step)
    va_pred = predict(model, tok, va_texts, cfg)
    pred = predict(model, tok, task.eval_texts, cfg)
    row = {
        "task": task.name, "strategy": strategy.name, "k": k, "seed": seed, "steps": cfg.steps, "lr": lr,
        "protocol": 2,
        "val_acc": metrics.accuracy(va_labels, va_pred),
        "val_f1": metrics.macro_f1(va_labels, va_pred, task.num_labels),
        "accuracy": metrics.accuracy(task.eval_labels, pred),
        "macro_f1": metrics.macro_f1(task.eval_labels, pred, task.num_labels),
        "eval_majority": majority_rate(list(task.eval_labels)), "num_labels": task.num_labels,
        **metrics.trace_summary(trace),
        "trace": trace,
    }
    if "weights" in trace:
        w = torch.tensor(trace["weights"], dtype=torch.float64)
        row["source_weights"] = dict(zip((s.name for s in sources), w.mean(0).tolist()))
    if heads is not None:
        from ..methods.frozen_head import head_accuracy

        row["retention"] = {t.name: head_accuracy(model, tok, t, h, max_length=cfg.max_length, n_eval=retention_n)
                            for t, h in zip(retention, heads)}
    elif retention:
        from ..methods.retention import retention_lm, retention_report

        row["retention"] = retention_report(retention_lm(model), getattr(tok, "tokenizer", tok), retention,
                                            max_length=cfg.max_length, n_eval=retention_n,
                                            k=retention_k)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_lrs(task: Task, strategy: Strategy, k: int, seed: int, factory: ModelFactory, cfg: RunConfig,
            lrs: Sequence[float], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """:func:`run_cell` at each of ``lrs`` (one row each, yielded as it finishes), sharing
    the reference captured at the initial point."""
    initial: dict[str, Any] = {}
    for lr in lrs:
        yield run_cell(task, strategy, k, seed, factory, cfg, lr=lr, initial=initial, **kwargs)
