"""The benchmark grid: runs of tasks x strategies x K x seeds x learning rates, resumable.

The machinery behind ``sgg-optim bench``, ``demo`` and ``compare`` (and their Python API,
:func:`.compare.compare`): the one model registry (:func:`model_factory`), the order runs
go in (:func:`grid_order`), and :func:`run_grid`, which runs what the results file does
not hold yet, one row per run (:mod:`.protocol`). Heavy modules are imported inside.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import assets
from .results import ResultsFile, cell_key

MODEL_NAME = "minilm"
MODELS = ("minilm", "smollm2")


def _say(msg: str) -> None:
    print(msg, flush=True)


def with_majority(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows``, each with ``eval_majority`` (the eval split's majority-class rate) and
    ``num_labels``, which the failed-run rate needs; rows written without them get them
    from their (built-in) task."""
    from .protocol import majority_rate
    from .tasks import load_task

    out = []
    for r in rows:
        if r.get("eval_majority") is None or r.get("num_labels") is None:
            try:
                task = load_task(r["task"])
                known = {"eval_majority": majority_rate(list(task.eval_labels)), "num_labels": task.num_labels}
                r = {**r, **{k: v for k, v in known.items() if r.get(k) is None}}
            except (KeyError, assets.AssetError):
                pass
        out.append(r)
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, file=sys.stdout)


ROW_EXTRAS = {"setfit": "anchors"}  # module a row needs -> the extra that installs it


def missing_requirement(strategy: Any) -> Optional[str]:
    """What to install when ``strategy`` needs a package that is not installed (naming the
    extra that brings it), else ``None``."""
    import importlib.util

    for module in strategy.requires:
        if importlib.util.find_spec(module) is None:
            return (f"strategy {strategy.name} needs the {module} package; install it with "
                    f"pip install 'sgg-optim[{ROW_EXTRAS.get(module, module)}]'")
    return None


def check_requirements(strategies: Any) -> None:
    """Stop before any work when a row needs a package that is not installed, naming the extra."""
    for st in strategies:
        why = missing_requirement(st)
        if why:
            raise SystemExit(f"sgg-optim: {why}")


def model_factory(name: str, label_words: Optional[Sequence[str]] = None, kind: str = "auto") -> Any:
    """The one model registry: ``task -> (fresh model, tokenizer)`` for ``name``.

    ``minilm`` and ``smollm2`` are the bundled assets (fetched if needed); anything else
    is a local Hugging Face model folder: an encoder (``AutoModelForSequenceClassification``,
    fresh head of the task's size) or a causal LM scored by label words (``label_words``
    in class order, default the task's label names), told apart by its config's
    architecture unless ``kind`` is ``encoder`` or ``causal``. Nothing is fetched from a hub.
    """
    from .models import causal_lm_factory, encoder_factory, model_kind

    if name == "minilm":
        if label_words:
            raise ValueError("--label-words is for causal LMs scored by label words, not the minilm encoder")
        from .training import minilm_factory

        return minilm_factory(assets.fetch(assets.MINILM, quiet=False))
    if name == "smollm2":
        return causal_lm_factory(assets.materialize("smollm2", quiet=False), label_words)
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"unknown model {name!r}: neither one of {', '.join(MODELS)} nor a local model folder")
    kind = model_kind(folder) if kind == "auto" else kind
    if kind == "causal":
        return causal_lm_factory(folder, label_words)
    if label_words:
        raise ValueError(f"--label-words is for causal LMs; {folder} is an encoder (use --model-kind causal "
                         "if it is a causal LM)")
    return encoder_factory(folder)


def grid_order(tasks: Sequence[str], strategies: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
               lrs: Sequence[float]) -> list[tuple[str, str, int, int, float]]:
    """The runs (task, strategy, K, seed, lr) in the order a grid runs them.

    Whole (task, K, seed) blocks, every strategy and lr of one block before the next, so
    a grid stopped part-way has complete blocks to pair; blocks go seed by seed over the
    tasks (seed 0 of every task first), so an early stop still covers every task.

    >>> [r[:4] for r in grid_order(["a", "b"], ["x"], [16], [0, 1], [1e-3])]
    [('a', 'x', 16, 0), ('b', 'x', 16, 0), ('a', 'x', 16, 1), ('b', 'x', 16, 1)]
    """
    return [(t, s, k, seed, lr) for k in shots for seed in seeds for t in tasks for s in strategies for lr in lrs]


def run_grid(tasks: Sequence[str], strategies: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
             steps: int, store: ResultsFile, lrs: Sequence[float] | None = None,
             explain: bool = False, factory: Any = None, model: str = MODEL_NAME,
             sources: Sequence[str] = (), retention: Sequence[str] = (),
             retention_n: int = 100, retention_k: int = 4, run: bool = True,
             source: Any = None) -> list[dict[str, Any]]:
    """Run every missing run of the grid into ``store`` (one row per task, strategy, K, seed
    and lr: protocol v2); the rows of this grid.

    ``lrs`` overrides every strategy's ``lr_grid`` (a strategy that does not train runs
    once, at lr 0). A ``*-source`` strategy is skipped, with one printed line, on a task
    whose label count differs from the source's. ``sources`` are the tasks of
    ``*-sources`` rows; ``retention`` the tasks on which forgetting is measured (a causal
    LM's in-context accuracy, an encoder's accuracy through a frozen head fitted on the
    untuned encoder; empty: not measured). ``run=False`` runs nothing and returns the
    rows already in ``store``. Runs go in :func:`grid_order`.

    ``tasks`` are built-in task names or :class:`~.tasks.Task` objects (a user's data,
    :mod:`.data`), keyed in ``store`` by their ``name``; ``source`` is the task of the
    ``*-source`` / ``*-icl`` rows (a Task or a name; default ``SOURCE_TASK``).
    """
    import torch

    from .protocol import SOURCE_TASK, run_lrs, source_compatible
    from .strategies import get_strategy
    from .tasks import Task, load_task
    from .training import RunConfig

    by_name: dict[str, Task] = {}

    def get(t: Any) -> Task:
        if isinstance(t, Task):
            return t
        return by_name[t] if t in by_name else load_task(t)

    for t in tasks:
        if isinstance(t, Task):
            by_name[t.name] = t
    tasks = [t.name if isinstance(t, Task) else t for t in tasks]
    src_task = (lambda: get(source)) if source is not None else (lambda: load_task(SOURCE_TASK))

    cfg = RunConfig(steps=steps)
    strats = {s: get_strategy(s) for s in strategies}
    grids = {s: ((0.0,) if not st.train else tuple(float(x) for x in (lrs or st.lr_grid)))
             for s, st in strats.items()}
    all_lrs = tuple(dict.fromkeys(lr for g in grids.values() for lr in g))
    skipped: set[tuple[str, str]] = set()
    for t in tasks:
        for s, st in strats.items():
            if st.reference == "source":
                why = source_compatible(st, get(t), src_task())
                if why:
                    _say(f"{s} skipped on {t}: {why}")
                    skipped.add((t, s))
    todo = [(t, s, k, seed, lr) for t, s, k, seed, lr in grid_order(tasks, strategies, shots, seeds, all_lrs)
            if lr in grids[s] and (t, s) not in skipped]
    missing = [c for c in todo if not store.done(cell_key(c[0], c[1], c[2], c[3], c[4], steps, model))]
    if len(missing) < len(todo):
        _say(f"{len(todo) - len(missing)} of {len(todo)} runs already in {store.path}: skipped")
    if not run:
        if missing:
            _say(f"{len(missing)} runs not run (--report)")
        missing = []
    if missing:
        check_requirements(strats.values())
    if missing and factory is None:
        factory = model_factory(model)
    # the missing lrs of one (task, strategy, K, seed) run together: one reference capture
    cells: dict[tuple[str, str, int, int], list[float]] = {}
    for t, s, k, seed, lr in missing:
        cells.setdefault((t, s, k, seed), []).append(lr)
    done = 0
    for i, ((tname, sname, k, seed), cell_lrs) in enumerate(cells.items()):
        task, strategy = get(tname), strats[sname]
        src = src_task() if strategy.reference in ("source", "icl") else None
        multi = [load_task(s) for s in sources if s != tname] if strategy.reference == "sources" else []
        if explain:
            span = f"{done + 1}" if len(cell_lrs) == 1 else f"{done + 1}-{done + len(cell_lrs)}"
            _say(f"\n[{span}/{len(missing)}] {sname} on {tname}, K={k}, seed {seed}: "
                 f"{strategy.description}; lr {', '.join(f'{x:g}' for x in cell_lrs)}")
        bar = _progress(steps * len(cell_lrs), f"{sname} seed {seed}")
        torch.manual_seed(seed)
        for row in run_lrs(task, strategy, k, seed, factory, cfg, cell_lrs, source=src, sources=multi,
                           retention=[load_task(r) for r in retention], retention_n=retention_n,
                           retention_k=retention_k, on_step=lambda _: bar.update()):
            row["model"] = model
            store.append(row)
            done += 1
            extra = "".join(f", {n} weight {w:.2f}" for n, w in row.get("source_weights", {}).items())
            extra += "".join(f", kept {n} {100 * a:.1f}" for n, a in row.get("retention", {}).items())
            bar.clear()
            _say(f"  {sname:>14} seed {seed} lr {row['lr']:g}: accuracy {100 * row['accuracy']:.1f}, "
                 f"validation {100 * row['val_acc']:.1f}, macro-F1 {100 * row['macro_f1']:.1f}, "
                 f"|g| CV {row['grad_cv']:.2f}{extra} ({row['seconds']:.0f} s)")
        bar.close()
    by_key = {ResultsFile.key_of(r): r for r in store.rows}
    keys = [cell_key(t, s, k, seed, lr, steps, model) for t, k, s, lr, seed in
            ((t, k, s, lr, seed) for t in tasks for k in shots for s in strategies for lr in grids[s]
             for seed in seeds)]
    return [by_key[key] for key in keys if key in by_key]  # grouped as asked: task, K, strategy, lr
