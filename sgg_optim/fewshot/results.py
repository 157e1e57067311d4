"""A resumable results file: one JSON line per finished cell, skipped on rerun.

A cell is identified by task, strategy, K, seed, steps and model. Lines are appended
and flushed as each cell finishes, so an interrupted grid loses at most the cell it was
running; a truncated last line (a crash mid-write) is ignored.

    >>> import tempfile, pathlib
    >>> store = ResultsFile(pathlib.Path(tempfile.mkdtemp()) / "r.jsonl")
    >>> key = cell_key("rt-polarity", "adamw", 16, 0, 30, "minilm")
    >>> store.done(key)
    False
    >>> store.append({**dict(zip(KEY_FIELDS, key)), "accuracy": 0.8})
    >>> store.done(key), ResultsFile(store.path).done(key)
    (True, True)
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from . import metrics

KEY_FIELDS = ("task", "strategy", "k", "seed", "steps", "model")


def cell_key(task: str, strategy: str, k: int, seed: int, steps: int, model: str) -> tuple:
    return (task, strategy, int(k), int(seed), int(steps), model)


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
    """Append-only JSONL of finished cells."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: that cell reruns
        self._keys = {self.key_of(r) for r in self.rows}

    @staticmethod
    def key_of(row: dict[str, Any]) -> tuple:
        return cell_key(*(row[f] for f in KEY_FIELDS))

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


def aggregate(rows: Iterable[dict[str, Any]], by: tuple[str, ...] = ("task", "k", "strategy")
              ) -> dict[tuple, dict[str, tuple[float, float, int]]]:
    """Mean, std and count of every metric over seeds, grouped by ``by``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[b] for b in by)].append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {}
        for m in METRIC_COLUMNS:
            vals = [math.nan if r.get(m) is None else r[m] for r in rs]
            mu, sd = metrics.mean_std(vals)
            out[g][m] = (mu, sd, sum(1 for v in vals if math.isfinite(v)))
    return out
