"""A resumable results file, and the protocol-v2 report computed from its rows.

One JSON line per finished run, skipped on rerun. A run is identified by task,
strategy, K, seed, learning rate, steps and model. Lines are appended and flushed as
each run finishes, so an interrupted grid loses at most the run it was on; a truncated
last line (a crash mid-write) is ignored. Rows of protocol 1 (one row per cell, the lr
already chosen on validation) carry that chosen ``lr``, so they key the same way.

    >>> import tempfile, pathlib
    >>> store = ResultsFile(pathlib.Path(tempfile.mkdtemp()) / "r.jsonl")
    >>> key = cell_key("rt-polarity", "adamw", 16, 0, 5e-5, 30, "minilm")
    >>> store.done(key)
    False
    >>> store.append({**dict(zip(KEY_FIELDS, key)), "accuracy": 0.8})
    >>> store.done(key), ResultsFile(store.path).done(key)
    (True, True)

The report (all pure functions of rows, so they are tested on synthetic rows):

- **Pairs.** A comparison is over (task, K, seed) pairs that both rows have; every
  "helps" is the mean paired difference against the baseline (AdamW) with a seeded
  percentile-bootstrap 95% interval (:func:`bootstrap_ci`): it helps when the interval
  is above 0, hurts when below, and nothing is shown otherwise (``n.s.``). With fewer
  than ``MIN_PAIRS`` (5) pairs the interval is printed but no verdict is given.
- **The lr chosen on validation** (:func:`choose_lr`): per (task, K, seed, row), the lr
  with the highest validation accuracy (on that seed's validation split: K per class
  from the train pool, disjoint from the shots); ties go to the smaller lr. The eval
  split is never looked at. Only (task, K, seed, row) groups that ran every lr of the
  row's sweep take part, so a partial grid does not choose from fewer lrs.
- **Failed run** (:func:`failed`): eval accuracy at most 2 points above the eval
  split's majority-class rate, i.e. no better than always predicting one class (on a
  markedly imbalanced eval split, macro-F1 against the constant predictor's).
- **Worst seed**: per task, the lowest accuracy over seeds; averaged over tasks (a
  plain minimum would only name the hardest task).
- **lrs within 2 points**: the row's mean accuracy at each lr (over pairs); how many lrs
  land within 2 points of the row's best lr.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

from . import metrics

KEY_FIELDS = ("task", "strategy", "k", "seed", "lr", "steps", "model")


def cell_key(task: str, strategy: str, k: int, seed: int, lr: float, steps: int, model: str) -> tuple:
    return (task, strategy, int(k), int(seed), float(lr), int(steps), model)


def _clean(value: Any) -> Any:
    # JSON has no NaN; store None and read it back as NaN
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsFile:
    """Append-only JSONL of finished runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: that run reruns
        self._keys = {self.key_of(r) for r in self.rows}

    @staticmethod
    def key_of(row: Mapping[str, Any]) -> tuple:
        return cell_key(*(row.get(f, 0.0) if f == "lr" else row[f] for f in KEY_FIELDS))

    def done(self, key: tuple) -> bool:
        return key in self._keys

    def append(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows.append(row)
        self._keys.add(self.key_of(row))


METRIC_COLUMNS = ("accuracy", "macro_f1", "grad_cv", "grad_spike", "applied_cv", "applied_spike",
                  "update_cos", "ref_cos")


def aggregate(rows: Iterable[dict[str, Any]], by: tuple[str, ...] = ("task", "k", "strategy", "lr")
              ) -> dict[tuple, dict[str, tuple[float, float, int]]]:
    """Mean, std and count of every metric over seeds, grouped by ``by``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(b) for b in by)].append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {}
        for m in METRIC_COLUMNS:
            vals = [_num(r.get(m)) for r in rs]
            mu, sd = metrics.mean_std(vals)
            out[g][m] = (mu, sd, sum(1 for v in vals if math.isfinite(v)))
    return out


# ---------------------------------------------------------------- protocol v2 report

FAIL_MARGIN = 0.02  # a run within 2 points of always predicting one class has failed
IMBALANCED = 0.25  # majority rate this far above chance: failure is judged on macro-F1 (see failed)
NEAR_BEST = 0.02  # an lr "lands within 2 points" of the row's best
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_PAIRS = 5  # fewer pairs: the interval is shown, no verdict (a bootstrap of 2-4 values is degenerate)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def pair_of(row: Mapping[str, Any]) -> tuple:
    """The unit a comparison is paired over: (task, K, seed)."""
    return (row["task"], int(row["k"]), int(row["seed"]))


def val_accuracy(row: Mapping[str, Any]) -> float:
    """The row's validation accuracy. A protocol-1 row holds ``{lr: accuracy}`` for every lr
    it tried; its own is the one at its (chosen) ``lr``."""
    v = row.get("val_acc")
    if isinstance(v, Mapping):
        lr = float(row.get("lr", 0.0))
        for key, acc in v.items():
            if float(key) == lr:
                return _num(acc)
        return math.nan
    return _num(v)


def constant_macro_f1(majority: float, num_labels: int) -> float:
    """Macro-F1 of always predicting the majority class: its F1 ``2p / (1 + p)``, the
    other classes 0, averaged over ``num_labels`` classes.

    >>> round(constant_macro_f1(0.5, 2), 3), round(constant_macro_f1(0.9, 2), 3)
    (0.333, 0.474)
    """
    return 2 * majority / (1 + majority) / num_labels


def failed(row: Mapping[str, Any], margin: float = FAIL_MARGIN) -> Optional[bool]:
    """Whether the run did no better than always predicting one class; None when the row
    does not know the eval split's majority-class rate (``eval_majority``).

    The test is eval accuracy within ``margin`` of (or below) the majority rate. Where the
    eval split is markedly imbalanced (majority rate ``IMBALANCED`` above chance, e.g.
    rt-subjectivity's 92%), a model trained on class-balanced shots rightly trades accuracy
    for the minority class and scores below that rate without having collapsed; there
    macro-F1 decides, against the constant predictor's (:func:`constant_macro_f1`; needs
    the row's ``num_labels``).

    >>> failed({"accuracy": 0.51, "eval_majority": 0.5}), failed({"accuracy": 0.6, "eval_majority": 0.5})
    (True, False)
    >>> imbalanced = {"eval_majority": 0.92, "num_labels": 2}
    >>> failed({**imbalanced, "accuracy": 0.85, "macro_f1": 0.7}), failed({**imbalanced, "accuracy": 0.92,
    ...                                                                       "macro_f1": 0.48})
    (False, True)
    """
    majority = row.get("eval_majority")
    if majority is None:
        return None
    if float(row["accuracy"]) > float(majority) + margin:
        return False
    c = row.get("num_labels")
    if c and float(majority) >= 1 / int(c) + IMBALANCED and row.get("macro_f1") is not None:
        return float(row["macro_f1"]) <= constant_macro_f1(float(majority), int(c)) + margin
    return True


def choose_lr(rows: Iterable[Mapping[str, Any]], lrs: Optional[Mapping[str, Sequence[float]]] = None,
              ) -> dict[tuple, Mapping[str, Any]]:
    """Per (task, K, seed, strategy): the row at the lr chosen on validation.

    The highest validation accuracy wins; ties go to the smaller lr. Only groups with
    every lr of the strategy's sweep take part: ``lrs[strategy]`` if given, else every lr
    the strategy has in ``rows``.

    >>> rows = [{"task": "t", "k": 2, "seed": 0, "strategy": "s", "lr": lr, "val_acc": v}
    ...         for lr, v in ((1e-4, 0.75), (2e-5, 0.75), (5e-5, 0.5))]
    >>> choose_lr(rows)[("t", 2, 0, "s")]["lr"]
    2e-05
    """
    rows = list(rows)
    sweep: dict[str, set[float]] = defaultdict(set)
    groups: dict[tuple, dict[float, Mapping[str, Any]]] = defaultdict(dict)
    for r in rows:
        lr = float(r.get("lr", 0.0))
        sweep[r["strategy"]].add(lr)
        groups[pair_of(r) + (r["strategy"],)][lr] = r
    out = {}
    for key, by_lr in groups.items():
        need = set(map(float, lrs[key[-1]])) if lrs is not None and key[-1] in lrs else sweep[key[-1]]
        if not need <= set(by_lr):
            continue
        best = min(need, key=lambda lr: (-_finite_or(val_accuracy(by_lr[lr]), -1.0), lr))
        out[key] = by_lr[best]
    return out


def chosen_by_strategy(rows: Iterable[Mapping[str, Any]], lrs: Optional[Mapping[str, Sequence[float]]] = None,
                       ) -> dict[str, dict[tuple, Mapping[str, Any]]]:
    """:func:`choose_lr` regrouped: ``{strategy: {(task, K, seed): row at its chosen lr}}``."""
    out: dict[str, dict[tuple, Mapping[str, Any]]] = defaultdict(dict)
    for key, r in choose_lr(rows, lrs).items():
        out[key[-1]][key[:-1]] = r
    return out


class ChoiceSplit(NamedTuple):
    """One pair's chosen-lr difference (row - baseline) and the row's effect at each of the
    two chosen lrs (:func:`choice_split`)."""

    difference: float
    at_row_lr: float
    at_baseline_lr: float
    same_lr: bool


def choice_split(rows: Iterable[Mapping[str, Any]], strategy: str, baseline: str,
                 lrs: Optional[Mapping[str, Sequence[float]]] = None) -> dict[tuple, ChoiceSplit]:
    """Per (task, K, seed): the chosen-lr accuracy difference, and the row's effect at a fixed lr.

    Each row is compared at the lr *it* chose on validation. With ``r`` the row, ``b`` the
    baseline and ``lr_r``, ``lr_b`` their choices, the difference splits exactly, in either
    order, into the row's effect at one fixed lr and what the other lr does to one of them:

    ``r(lr_r) - b(lr_b) = [r(lr_r) - b(lr_r)] + [b(lr_r) - b(lr_b)] = [r(lr_b) - b(lr_b)] + [r(lr_r) - r(lr_b)]``

    ``at_row_lr`` and ``at_baseline_lr`` are the first brackets; the rest of
    ``difference`` is the lr choice's part (0 where both chose the same lr). Returns
    ``{pair: ChoiceSplit}`` over the pairs where both rows were chosen and each ran at the
    other's lr.

    >>> def run(s, lr, val, acc):
    ...     return {"task": "t", "k": 2, "seed": 0, "strategy": s, "lr": lr, "val_acc": val, "accuracy": acc}
    >>> rows = [run("base", 1e-4, 0.7, 0.60), run("base", 2e-4, 0.6, 0.80),
    ...         run("row", 1e-4, 0.6, 0.70), run("row", 2e-4, 0.7, 0.85)]
    >>> split = choice_split(rows, "row", "base")[("t", 2, 0)]
    >>> [round(x, 2) for x in split[:3]], split.same_lr
    ([0.25, 0.05, 0.1], False)
    """
    rows = list(rows)
    chosen = chosen_by_strategy(rows, lrs)
    row, base = chosen.get(strategy, {}), chosen.get(baseline, {})
    acc = {(r["strategy"], pair_of(r), float(r.get("lr", 0.0))): _num(r.get("accuracy")) for r in rows
           if r["strategy"] in (strategy, baseline)}
    out = {}
    for pair in sorted(set(row) & set(base)):
        lr_r, lr_b = float(row[pair].get("lr", 0.0)), float(base[pair].get("lr", 0.0))
        b_at_r, r_at_b = acc.get((baseline, pair, lr_r)), acc.get((strategy, pair, lr_b))
        if b_at_r is None or r_at_b is None:
            continue
        r, b = acc[(strategy, pair, lr_r)], acc[(baseline, pair, lr_b)]
        out[pair] = ChoiceSplit(r - b, r - b_at_r, r_at_b - b, lr_r == lr_b)
    return out


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (NaN with fewer than 2).

    Seeded, so a report is reproducible: ``resamples`` means of ``len(values)`` values drawn
    with replacement, and their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> lo, hi = bootstrap_ci([-1.0, 0.0, 1.0, 2.0]); lo < 0.5 < hi
    True
    """
    v = [float(x) for x in values]
    if len(v) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(v)
    means = sorted(sum(rng.choices(v, k=n)) / n for _ in range(resamples))
    return _quantile(means, (1 - level) / 2), _quantile(means, (1 + level) / 2)


@dataclass(frozen=True)
class Paired:
    """Mean paired difference (row - baseline) over ``n`` pairs and its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def verdict(self) -> str:
        """``helps`` / ``hurts`` when the interval excludes 0, else ``n.s.`` (not shown);
        ``—`` with fewer than ``MIN_PAIRS`` pairs."""
        if self.n < MIN_PAIRS or not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return "—"
        return "helps" if self.lo > 0 else "hurts" if self.hi < 0 else "n.s."


def paired(rows: Mapping[tuple, Mapping[str, Any]], baseline: Mapping[tuple, Mapping[str, Any]],
           metric: str = "accuracy", **bootstrap: Any) -> Paired:
    """Paired difference of ``metric`` between two {pair: row} maps over their common pairs."""
    common = sorted(set(rows) & set(baseline))
    diffs = [_num(rows[p].get(metric)) - _num(baseline[p].get(metric)) for p in common]
    diffs = [d for d in diffs if math.isfinite(d)]
    if not diffs:
        return Paired(math.nan, math.nan, math.nan, 0)
    lo, hi = bootstrap_ci(diffs, **bootstrap)
    return Paired(sum(diffs) / len(diffs), lo, hi, len(diffs))


def _worst_seed(by_pair: Mapping[tuple, Mapping[str, Any]], metric: str = "accuracy") -> float:
    """Per (task, K): the lowest ``metric`` over seeds; the mean over (task, K)."""
    worst: dict[tuple, float] = {}
    for (task, k, _), r in by_pair.items():
        a = _num(r.get(metric))
        worst[(task, k)] = min(worst.get((task, k), a), a)
    return metrics.nanmean(list(worst.values()))


def _failed_rate(rs: Iterable[Mapping[str, Any]]) -> float:
    flags = [f for f in (failed(r) for r in rs) if f is not None]
    return sum(flags) / len(flags) if flags else math.nan


def _summary(by_pair: Mapping[tuple, Mapping[str, Any]]) -> dict[str, Any]:
    rs = list(by_pair.values())
    return {
        "n": len(rs),
        "accuracy": metrics.nanmean([_num(r.get("accuracy")) for r in rs]),
        "worst_seed": _worst_seed(by_pair),
        "failed": _failed_rate(rs),
        "applied_cv": metrics.nanmean([_num(r.get("applied_cv")) for r in rs]),
        "applied_spike": metrics.nanmean([_num(r.get("applied_spike")) for r in rs]),
        "update_cos": metrics.nanmean([_num(r.get("update_cos")) for r in rs]),
    }


def _strategies(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in rows))


def per_lr(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw", **bootstrap: Any) -> list[dict[str, Any]]:
    """One record per (strategy, lr): the mean over (task, K, seed) and the paired difference
    against ``baseline`` at the same lr."""
    rows = list(rows)
    cells: dict[tuple[str, float], dict[tuple, Mapping[str, Any]]] = defaultdict(dict)
    for r in rows:
        cells[(r["strategy"], float(r.get("lr", 0.0)))][pair_of(r)] = r
    out = []
    for s in _strategies(rows):
        for lr in sorted(lr for (name, lr) in cells if name == s):
            rec = {"strategy": s, "lr": lr, **_summary(cells[(s, lr)])}
            base = cells.get((baseline, lr))
            rec["vs_baseline"] = paired(cells[(s, lr)], base, **bootstrap) if base and s != baseline else None
            out.append(rec)
    return out


def at_chosen_lr(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw",
                 lrs: Optional[Mapping[str, Sequence[float]]] = None, **bootstrap: Any) -> list[dict[str, Any]]:
    """One record per strategy at its validation-chosen lr (:func:`choose_lr`): the mean
    over (task, K, seed), how often each lr was chosen, and the paired difference against
    ``baseline`` at *its* chosen lr."""
    rows = list(rows)
    by_strategy = chosen_by_strategy(rows, lrs)
    base = by_strategy.get(baseline)
    out = []
    for s in _strategies(rows):
        if s not in by_strategy:
            continue
        picks: dict[float, int] = defaultdict(int)
        for r in by_strategy[s].values():
            picks[float(r.get("lr", 0.0))] += 1
        rec = {"strategy": s, **_summary(by_strategy[s]), "chosen": dict(sorted(picks.items()))}
        rec["vs_baseline"] = paired(by_strategy[s], base, **bootstrap) if base and s != baseline else None
        out.append(rec)
    return out


def over_sweep(rows: Iterable[Mapping[str, Any]], near: float = NEAR_BEST) -> list[dict[str, Any]]:
    """One record per strategy over every lr it ran: mean, worst run (per task and K the
    lowest accuracy over seeds and lrs, averaged), failed-run rate, and how many lrs land
    within ``near`` of the strategy's best lr (by mean accuracy over pairs)."""
    rows = list(rows)
    out = []
    for s in _strategies(rows):
        rs = [r for r in rows if r["strategy"] == s]
        by_run = {pair_of(r) + (float(r.get("lr", 0.0)),): r for r in rs}
        worst: dict[tuple, float] = {}
        for (task, k, _, _), r in by_run.items():
            a = _num(r.get("accuracy"))
            worst[(task, k)] = min(worst.get((task, k), a), a)
        lr_means: dict[float, list[float]] = defaultdict(list)
        for r in rs:
            lr_means[float(r.get("lr", 0.0))].append(_num(r.get("accuracy")))
        means = {lr: metrics.nanmean(v) for lr, v in lr_means.items()}
        best = max(means.values())
        out.append({
            "strategy": s, "n": len(rs), "lrs": len(means),
            "accuracy": metrics.nanmean([_num(r.get("accuracy")) for r in rs]),
            "worst_run": metrics.nanmean(list(worst.values())),
            "failed": _failed_rate(rs),
            "near_best": sum(1 for m in means.values() if m >= best - near - 1e-12),
            "best_lr": min(lr for lr, m in means.items() if m == best),
            "applied_cv": metrics.nanmean([_num(r.get("applied_cv")) for r in rs]),
            "applied_spike": metrics.nanmean([_num(r.get("applied_spike")) for r in rs]),
            "update_cos": metrics.nanmean([_num(r.get("update_cos")) for r in rs]),
        })
    return out


# ------------------------------------------------ choices made on validation

# The rule of benchmarks/results/protocol_v2.md ("Rule for the defaults"), written before
# the data it decides on: the defaults are what GuidedAdamW does with no reference (the
# EMA reference), so these rows are the candidates; ``adamw`` is pass-through.
DEFAULT_CANDIDATES = ("cone-ema", "adaptive", "project-ema", "cone-ema-w3")
CURRENT_DEFAULTS = "cone-ema"
WORST_SEED_MARGIN = 0.01  # a qualifier's validation worst seed may be at most 1 point below the baseline's


def on_validation(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw",
                  lrs: Optional[Mapping[str, Sequence[float]]] = None, **bootstrap: Any) -> list[dict[str, Any]]:
    """One record per row, from validation accuracy only: each row at its own
    validation-chosen lr, the paired difference of *validation* accuracy against
    ``baseline`` at its chosen lr, and the worst seed of both over the same pairs.
    The baseline compares with itself as pass-through (a zero difference).
    """
    by_strategy = chosen_by_strategy(list(rows), lrs)
    base = by_strategy.get(baseline, {})
    out = []
    for s, by_pair in by_strategy.items():
        common = {p: by_pair[p] for p in by_pair if p in base}
        if not common:
            continue
        out.append({
            "strategy": s, "n": len(common),
            "val_acc": metrics.nanmean([val_accuracy(r) for r in common.values()]),
            "vs_baseline": paired(common, base, metric="val_acc", **bootstrap),
            "worst_seed": _worst_seed(common, "val_acc"),
            "baseline_worst_seed": _worst_seed({p: base[p] for p in common}, "val_acc"),
        })
    return out


def choose_defaults(rows: Iterable[Mapping[str, Any]], candidates: Sequence[str] = DEFAULT_CANDIDATES,
                    current: str = CURRENT_DEFAULTS, baseline: str = "adamw",
                    margin: float = WORST_SEED_MARGIN, **bootstrap: Any) -> dict[str, Any]:
    """The defaults by the rule written before the data (validation accuracy only).

    1. A candidate *qualifies* if its paired validation interval against ``baseline``
       excludes 0 in its favour (at least ``MIN_PAIRS`` pairs) and its validation worst
       seed is at most ``margin`` below the baseline's; the qualifier with the largest
       mean difference wins.
    2. Else, if ``current`` hurts (its interval excludes 0 against it), the candidate,
       pass-through (``baseline``) included, whose interval has the highest lower bound.
    3. Else ``current`` stays.

    Returns ``{"choice", "step", "reason", "records"}``.

    >>> rows = [{"task": f"t{i}", "k": 16, "seed": 0, "strategy": s, "lr": 1e-4, "val_acc": v}
    ...         for i in range(6) for s, v in (("adamw", 0.70), ("cone-ema", 0.70), ("project-ema", 0.74 + i / 100))]
    >>> choose_defaults(rows)["choice"]
    'project-ema'
    """
    recs = {r["strategy"]: r for r in on_validation(rows, baseline, **bootstrap)}
    cands = [recs[c] for c in candidates if c in recs and c != baseline]
    qualified = [r for r in cands if r["vs_baseline"].verdict == "helps"
                 and r["worst_seed"] >= r["baseline_worst_seed"] - margin - 1e-12]
    if qualified:
        best = max(qualified, key=lambda r: r["vs_baseline"].mean)
        return {"choice": best["strategy"], "step": 1, "records": cands,
                "reason": f"{best['strategy']} helps on validation ({_ci(best['vs_baseline'])}) "
                          f"and its worst seed is within {100 * margin:.0f} point of {baseline}'s"}
    cur = recs.get(current)
    if cur is not None and cur["vs_baseline"].verdict == "hurts":
        pool = cands + ([recs[baseline]] if baseline in recs else [])
        best = max(pool, key=lambda r: r["vs_baseline"].lo if r["strategy"] != baseline else 0.0)
        return {"choice": best["strategy"], "step": 2, "records": cands,
                "reason": f"no candidate helps on validation and {current} hurts ({_ci(cur['vs_baseline'])}); "
                          f"{best['strategy']} has the highest lower bound"}
    return {"choice": current, "step": 3, "records": cands,
            "reason": f"no candidate helps on validation and {current} does not hurt"
                      + (f" ({_ci(cur['vs_baseline'])})" if cur is not None else " (not run)")}


# the goals for a stabiliser against AdamW (issue 10, "Must show")
GOAL_GAIN = 0.02  # accuracy at the chosen lr: at least +2 points
GOAL_FAILED = 0.5  # failed-run rate over the sweep: at most half of AdamW's
GOAL_CV = 0.7  # applied-update CV at the chosen lr: at most 0.7x AdamW's


def claims(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw",
           lrs: Optional[Mapping[str, Sequence[float]]] = None, **bootstrap: Any) -> list[dict[str, Any]]:
    """Per row, each claim against ``baseline`` with its interval and whether the goal is met:

    - ``gain``: paired accuracy difference at the validation-chosen lrs (goal ``GOAL_GAIN``:
      the interval's lower end at or above it);
    - ``failed``: failed-run rates over the whole sweep, the row's and the baseline's on the
      same (task, K, seed, lr) runs (goal: at most ``GOAL_FAILED`` times the baseline's,
      and the paired difference of failure indicators below 0 with its whole interval); a
      row on its own lr grid (L-Tuning's), which shares no run with the baseline, is
      paired at each side's validation-chosen lr instead;
    - ``worst``: worst-seed accuracy difference (per task over seeds, averaged), at the chosen lr;
    - ``cv``: per-pair ratio of applied-update CV at the chosen lrs, its mean and interval
      (goal ``GOAL_CV``: the interval's upper end at or below it).
    """
    rows = list(rows)
    at = chosen_by_strategy(rows, lrs)
    runs: dict[str, dict[tuple, Mapping[str, Any]]] = defaultdict(dict)
    for r in rows:
        runs[r["strategy"]][pair_of(r) + (float(r.get("lr", 0.0)),)] = r
    base, base_runs = at.get(baseline, {}), runs.get(baseline, {})
    out = []
    for s in _strategies(rows):
        if s == baseline or s not in at:
            continue
        common = {p: at[s][p] for p in at[s] if p in base}
        same = [k for k in runs[s] if k in base_runs]
        flags = {k: (failed(runs[s][k]), failed(base_runs[k])) for k in same} if same else \
            {p: (failed(common[p]), failed(base[p])) for p in common}
        flags = {k: (a, b) for k, (a, b) in flags.items() if a is not None and b is not None}
        ratios = [_num(common[p].get("applied_cv")) / _num(base[p].get("applied_cv")) for p in common
                  if _num(base[p].get("applied_cv")) > 0]
        ratios = [x for x in ratios if math.isfinite(x)]
        lo, hi = bootstrap_ci(ratios, **bootstrap)
        f_row = sum(a for a, _ in flags.values()) / len(flags) if flags else math.nan
        f_base = sum(b for _, b in flags.values()) / len(flags) if flags else math.nan
        # a few failures in a few dozen runs prove nothing: the paired difference must exclude 0 too
        f_hi = bootstrap_ci([float(a) - float(b) for a, b in flags.values()], **bootstrap)[1]
        gain = paired(common, base, **bootstrap)
        cv = Paired(metrics.nanmean(ratios), lo, hi, len(ratios))
        out.append({
            "strategy": s, "gain": gain, "gain_met": gain.verdict != "—" and gain.lo >= GOAL_GAIN,
            "failed": (f_row, f_base, len(flags)),
            "failed_met": bool(flags) and f_row <= GOAL_FAILED * f_base and f_hi < 0,
            "worst": _worst_seed(common) - _worst_seed({p: base[p] for p in common}) if common else math.nan,
            "cv": cv, "cv_met": cv.verdict != "—" and cv.hi <= GOAL_CV,
        })
    return out


def claims_table(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw", **bootstrap: Any) -> str:
    """:func:`claims` in Markdown: each claim, its interval, and met / not met."""
    recs = claims(rows, baseline, **bootstrap)

    def yes(ok: bool) -> str:
        return "**met**" if ok else "not met"

    def ratio(p: Paired) -> str:
        ci = f" [{p.lo:.2f}, {p.hi:.2f}]" if math.isfinite(p.lo) else ""
        return f"{p.mean:.2f}x{ci} (n={p.n})" if p.n else "—"

    return markdown_table(
        ["row", f"accuracy Δ vs {baseline} [95% CI] (goal ≥ +{100 * GOAL_GAIN:.0f})", "",
         f"failed runs, row / {baseline} (goal ≤ {GOAL_FAILED:g}x)", "", "worst seed Δ",
         f"applied CV / {baseline}'s [95% CI] (goal ≤ {GOAL_CV:g}x)", ""],
        [[r["strategy"], _diff(r["gain"])[0], yes(r["gain_met"]),
          f"{_pct(r['failed'][0], 0)}% / {_pct(r['failed'][1], 0)}% of {r['failed'][2]}", yes(r["failed_met"]),
          f"{100 * r['worst']:+.1f}" if math.isfinite(r["worst"]) else "—", ratio(r["cv"]), yes(r["cv_met"])]
         for r in recs])


def forgetting(rows: Iterable[Mapping[str, Any]], baseline: str = "pretrained", compare_to: str = "adamw",
               lrs: Optional[Mapping[str, Sequence[float]]] = None, at_lr: Optional[float] = None,
               **bootstrap: Any) -> list[dict[str, Any]]:
    """What tuning cost elsewhere: per row (at its validation-chosen lr, or at ``at_lr``)
    and retention task, the figure after tuning, the drop against ``baseline`` (the
    untuned model: ``before - after``, paired over (task, K, seed)) with its bootstrap
    interval, and the difference of drops against ``compare_to`` (negative: this row
    forgets less).

    >>> rows = [{"task": "t", "k": 4, "seed": s, "strategy": n, "lr": 1e-4 if n != "pretrained" else 0.0,
    ...          "val_acc": 0.5, "retention": {"src": a + s / 100}}
    ...         for s in range(5) for n, a in (("pretrained", 0.9), ("adamw", 0.7), ("kind", 0.8))]
    >>> [(r["strategy"], round(r["drop"].mean, 2), r["vs"] and round(r["vs"].mean, 2)) for r in forgetting(rows)]
    [('adamw', 0.2, None), ('kind', 0.1, -0.1)]
    """
    rows = [r for r in rows if r.get("retention")]
    if at_lr is None:
        by_strategy = chosen_by_strategy(rows, lrs)
    else:  # every row at this lr; the untuned baseline has none
        by_strategy = defaultdict(dict)
        for r in rows:
            if r["strategy"] == baseline or float(r.get("lr", 0.0)) == at_lr:
                by_strategy[r["strategy"]][pair_of(r)] = r
    before = by_strategy.get(baseline, {})
    tasks = sorted({t for r in rows for t in r["retention"]})

    def drops(by_pair: Mapping[tuple, Mapping[str, Any]], t: str) -> dict[tuple, dict[str, float]]:
        return {p: {"d": _num(before[p]["retention"].get(t)) - _num(r["retention"].get(t))}
                for p, r in by_pair.items() if p in before and t in r["retention"]}

    out = []
    for s, by_pair in by_strategy.items():
        if s == baseline:
            continue
        for t in tasks:
            mine = drops(by_pair, t)
            if not mine:
                continue
            ref = drops(by_strategy.get(compare_to, {}), t)
            zero = {p: {"d": 0.0} for p in mine}
            out.append({
                "strategy": s, "task": t, "n": len(mine),
                "before": metrics.nanmean([_num(before[p]["retention"].get(t)) for p in mine]),
                "after": metrics.nanmean([_num(by_pair[p]["retention"].get(t)) for p in mine]),
                "drop": paired(mine, zero, metric="d", **bootstrap),
                "vs": paired(mine, ref, metric="d", **bootstrap) if ref and s != compare_to else None,
            })
    return out


def forgetting_table(rows: Iterable[Mapping[str, Any]], baseline: str = "pretrained", compare_to: str = "adamw",
                     **bootstrap: Any) -> str:
    """:func:`forgetting` as Markdown (accuracy in %, drops in points): at each row's
    validation-chosen lr, then at each lr of the sweep; empty without retention rows."""
    rows = [r for r in rows if r.get("retention")]
    recs = forgetting(rows, baseline, compare_to, **bootstrap)
    if not recs:
        return ""
    head = ["row", "retention task", "pairs", f"{baseline}", "after tuning", "drop [95% CI]",
            f"drop - {compare_to}'s drop [95% CI]", "verdict"]

    def line(r: Mapping[str, Any]) -> list[str]:
        vs = _diff(r["vs"]) if r["vs"] is not None else ["—", "—"]
        # a difference of drops above 0 means more forgetting: say which way, not helps/hurts
        vs[1] = {"helps": "forgets more", "hurts": "forgets less"}.get(vs[1], vs[1])
        return [r["strategy"], r["task"], str(r["n"]), _pct(r["before"]), _pct(r["after"])] + _diff(r["drop"])[:1] + vs

    per_lr = [[f"{lr:g}"] + line(r) for lr in sorted({float(r["lr"]) for r in rows if r["strategy"] != baseline})
              for r in forgetting(rows, baseline, compare_to, at_lr=lr, **bootstrap)]
    return (markdown_table(head, [line(r) for r in recs]) + "\n\nAt each lr:\n\n"
            + markdown_table(["lr"] + head, per_lr))


def _ci(p: Paired) -> str:
    return f"{100 * p.mean:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}] points, n={p.n}"


# ---------------------------------------------------------------- Markdown

def md_escape(text: str) -> str:
    """``|`` escaped so a header like ``|g| CV`` does not split a Markdown table cell.

    >>> md_escape("|g| CV")
    '\\\\|g\\\\| CV'
    """
    return str(text).replace("|", "\\|")


def markdown_table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table; every cell escaped (:func:`md_escape`)."""
    out = ["| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(md_escape(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if math.isfinite(x) else "—"


def _f(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "—"


def _diff(p: Optional[Paired]) -> list[str]:
    if p is None or p.n == 0:
        return ["—", "—"]
    ci = f"[{100 * p.lo:+.1f}, {100 * p.hi:+.1f}]" if math.isfinite(p.lo) else "—"
    return [f"{100 * p.mean:+.1f} {ci} (n={p.n})", p.verdict]


def protocol_report(rows: Iterable[Mapping[str, Any]], baseline: str = "adamw",
                    lrs: Optional[Mapping[str, Sequence[float]]] = None, **bootstrap: Any) -> str:
    """The three protocol-v2 tables in Markdown (accuracy in %, differences in points)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    parts = []
    b = baseline
    recs = at_chosen_lr(rows, baseline, lrs, **bootstrap)
    parts.append("At each row's validation-chosen lr (per task, K and seed: best validation accuracy, "
                 "ties to the smaller lr; eval never looked at):\n")
    parts.append(markdown_table(
        ["row", "pairs", "accuracy", "worst seed", "failed", "applied CV", "applied spike", "cos(Δt,Δt-1)",
         "lr chosen (count)", f"Δ vs {b} [95% CI]", "verdict"],
        [[r["strategy"], str(r["n"]), _pct(r["accuracy"]), _pct(r["worst_seed"]), _pct(r["failed"], 0) + "%",
          _f(r["applied_cv"]), _f(r["applied_spike"]), _f(r["update_cos"]),
          ", ".join(f"{lr:g}: {c}" for lr, c in r["chosen"].items())] + _diff(r["vs_baseline"])
         for r in recs]))
    parts.append("\nAt each lr:\n")
    parts.append(markdown_table(
        ["row", "lr", "pairs", "accuracy", "worst seed", "failed", "applied CV", "applied spike", "cos(Δt,Δt-1)",
         f"Δ vs {b} [95% CI]", "verdict"],
        [[r["strategy"], f"{r['lr']:g}", str(r["n"]), _pct(r["accuracy"]), _pct(r["worst_seed"]),
          _pct(r["failed"], 0) + "%", _f(r["applied_cv"]), _f(r["applied_spike"]), _f(r["update_cos"])]
         + _diff(r["vs_baseline"]) for r in per_lr(rows, baseline, **bootstrap)]))
    parts.append("\nOver the whole lr sweep:\n")
    parts.append(markdown_table(
        ["row", "runs", "lrs", "accuracy", "worst run", "failed", "lrs within 2 pts of best", "best lr",
         "applied CV", "applied spike", "cos(Δt,Δt-1)"],
        [[r["strategy"], str(r["n"]), str(r["lrs"]), _pct(r["accuracy"]), _pct(r["worst_run"]),
          _pct(r["failed"], 0) + "%", f"{r['near_best']} of {r['lrs']}", f"{r['best_lr']:g}",
          _f(r["applied_cv"]), _f(r["applied_spike"]), _f(r["update_cos"])] for r in over_sweep(rows)]))
    parts.append("\nThe claims, each against its goal:\n")
    parts.append(claims_table(rows, b, **bootstrap))
    parts.append("\nOn validation only (what the choices below are made on; each row at its chosen lr, "
                 "validation accuracy):\n")
    parts.append(markdown_table(
        ["row", "pairs", "val accuracy", f"Δ val vs {b} [95% CI]", "verdict", "val worst seed",
         f"{b} val worst seed"],
        [[r["strategy"], str(r["n"]), _pct(r["val_acc"])] + _diff(r["vs_baseline"] if r["strategy"] != b else None)
         + [_pct(r["worst_seed"]), _pct(r["baseline_worst_seed"])] for r in on_validation(rows, b, lrs, **bootstrap)]))
    if b == "adamw" and any(r["strategy"] in DEFAULT_CANDIDATES for r in rows):
        d = choose_defaults(rows, baseline=b, **bootstrap)
        parts.append(f"\n**Defaults by the written rule (step {d['step']}): `{d['choice']}`**: {d['reason']}.")
    parts.append(f"\npairs: (task, K, seed) runs; Δ: mean paired difference against {b} over the pairs both "
                 f"have, in points, with a percentile-bootstrap 95% interval ({BOOTSTRAP_RESAMPLES} resamples, "
                 f"seeded); verdict: helps / hurts when the interval excludes 0, n.s. otherwise, — under {MIN_PAIRS} pairs. "
                 "worst seed: per "
                 "task, the lowest accuracy over seeds, averaged over tasks (worst run: over seeds and lrs). "
                 f"failed: eval accuracy within {100 * FAIL_MARGIN:.0f} points of always predicting the "
                 "majority class (on a markedly imbalanced eval split, macro-F1 within as much of that "
                 "constant predictor's). applied CV / spike: coefficient of variation and max/median of the norm of "
                 "the gradient the optimizer used; cos(Δt,Δt-1): consecutive-update cosine.")
    return "\n".join(parts)


def pick_setting(rows: Iterable[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The (strategy, lr) a user would pick: the highest mean validation accuracy over the
    seeds it ran (ties: the first strategy in ``rows``, then the smaller lr). The eval /
    test split is not looked at; its figure is returned beside, for reading only.

    >>> rows = [{"strategy": s, "lr": lr, "seed": 0, "val_acc": v, "accuracy": a}
    ...         for s, lr, v, a in (("a", 1e-4, 0.5, 0.9), ("b", 1e-4, 0.75, 0.6), ("b", 2e-4, 0.75, 0.7))]
    >>> p = pick_setting(rows); (p["strategy"], p["lr"], p["val_acc"], p["accuracy"])
    ('b', 0.0001, 0.75, 0.6)
    """
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["strategy"], float(r.get("lr", 0.0)))].append(r)
    if not groups:
        return None
    order = {s: i for i, s in enumerate(dict.fromkeys(s for s, _ in groups))}

    def score(key: tuple[str, float]) -> tuple:
        v = metrics.nanmean([val_accuracy(r) for r in groups[key]])
        return (-_finite_or(v, -1.0), order[key[0]], key[1])

    best = min(groups, key=score)
    rs = groups[best]
    return {"strategy": best[0], "lr": best[1], "seeds": len(rs),
            "val_acc": metrics.nanmean([val_accuracy(r) for r in rs]),
            "accuracy": metrics.nanmean([_num(r.get("accuracy")) for r in rs]),
            "macro_f1": metrics.nanmean([_num(r.get("macro_f1")) for r in rs]),
            "failed": _failed_rate(rs)}


COLUMN_TITLES = {
    "accuracy": "accuracy", "macro_f1": "macro-F1", "grad_cv": "|g| CV", "grad_spike": "|g| spike",
    "applied_cv": "applied CV", "applied_spike": "applied spike", "update_cos": "cos(Δt,Δt-1)",
    "ref_cos": "cos(g,ref)",
}


def _fmt(mu: float, sd: float, pct: bool) -> str:
    if not math.isfinite(mu):
        return "—"
    return f"{100 * mu:.1f} ± {100 * sd:.1f}" if pct else f"{mu:.2f} ± {sd:.2f}"


def results_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """A Markdown table of mean ± std over seeds, one line per task, K, strategy and lr."""
    agg = aggregate(rows)
    head = ["task", "K", "strategy", "lr", "seeds"] + [COLUMN_TITLES[c] for c in columns]
    lines = []
    for (task, k, strategy, lr), figs in agg.items():
        n = max(figs[c][2] for c in columns)
        cells = [_fmt(figs[c][0], figs[c][1], c in ("accuracy", "macro_f1")) for c in columns]
        lines.append([task, str(k), strategy, f"{lr:g}" if lr is not None else "—", str(n)] + cells)
    return markdown_table(head, lines)


def retention_table(rows: Sequence[dict[str, Any]], baseline: str = "pretrained") -> str:
    """A Markdown table of in-context accuracy (%) per retention task and strategy, and the
    drop against the ``baseline`` row (``pretrained - tuned``, in points; mean over seeds)."""
    rows = [r for r in rows if r.get("retention")]
    if not rows:
        return ""
    tasks = sorted({t for r in rows for t in r["retention"]})
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_strategy.setdefault(r["strategy"], []).append(r)
    mean = {s: {t: metrics.mean_std([r["retention"][t] for r in rs if t in r["retention"]])[0] for t in tasks}
            for s, rs in by_strategy.items()}
    base = mean.get(baseline)
    head = ["strategy", "seeds"] + tasks + ["mean", "drop vs " + baseline if base else ""]
    lines = ["| " + " | ".join(h for h in head if h) + " |", "|" + "---|" * len([h for h in head if h])]
    for s, rs in by_strategy.items():
        avg = sum(mean[s].values()) / len(tasks)
        cells = [f"{100 * mean[s][t]:.1f}" for t in tasks] + [f"{100 * avg:.1f}"]
        if base:
            cells.append(f"{100 * (sum(base.values()) / len(tasks) - avg):+.1f}")
        lines.append("| " + " | ".join([s, str(len(rs))] + cells) + " |")
    return "\n".join(lines)
