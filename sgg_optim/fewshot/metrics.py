"""The figures the paper reports: accuracy, macro-F1, gradient stability, alignment.

All functions take plain Python sequences and return floats, so they are easy to check
by hand:

    >>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
    0.75
    >>> round(macro_f1([0, 1, 1, 0], [0, 1, 0, 0], num_labels=2), 4)
    0.7333
    >>> spike_ratio([1.0, 2.0, 8.0])
    4.0
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    if len(labels) != len(preds) or not labels:
        raise ValueError("labels and preds must be non-empty and of equal length")
    return sum(int(a == b) for a, b in zip(labels, preds)) / len(labels)


def macro_f1(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over classes of F1; a class never predicted nor present scores 0."""
    if len(labels) != len(preds) or not labels:
        raise ValueError("labels and preds must be non-empty and of equal length")
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for a, b in zip(labels, preds) if a == c and b == c)
        fp = sum(1 for a, b in zip(labels, preds) if a != c and b == c)
        fn = sum(1 for a, b in zip(labels, preds) if a == c and b != c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / num_labels


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population std / mean of the finite values (NaN when fewer than 2 or mean 0).

    >>> coefficient_of_variation([2.0, 4.0])
    0.3333333333333333
    """
    v = _finite(values)
    if len(v) < 2 or statistics.fmean(v) == 0:
        return math.nan
    return statistics.pstdev(v) / statistics.fmean(v)


def spike_ratio(norms: Sequence[float]) -> float:
    """Largest norm over the median norm: how far the worst step stands out."""
    v = _finite(norms)
    if not v or statistics.median(v) == 0:
        return math.nan
    return max(v) / statistics.median(v)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    v = _finite(values)
    return statistics.fmean(v) if v else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over the finite values (std 0 for one value)."""
    v = _finite(values)
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine between two vectors given as sequences (NaN if either is zero).

    >>> cosine([1.0, 0.0], [1.0, 1.0]) == 1 / math.sqrt(2)
    True
    """
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else math.nan


def trace_summary(trace: dict[str, Sequence[float]]) -> dict[str, float]:
    """Stability and alignment figures of one training run's per-step trace.

    ``trace`` holds ``grad_norm`` (raw gradient norm), ``applied_norm`` (after clipping or
    guidance), ``update_cos`` (cos between consecutive parameter updates) and ``ref_cos``
    (cos of the gradient with the guidance reference, NaN when there is none).
    """
    return {
        "grad_cv": coefficient_of_variation(trace["grad_norm"]),
        "grad_spike": spike_ratio(trace["grad_norm"]),
        "applied_cv": coefficient_of_variation(trace["applied_norm"]),
        "applied_spike": spike_ratio(trace["applied_norm"]),
        "update_cos": nanmean(trace["update_cos"]),
        "ref_cos": nanmean(trace["ref_cos"]),
    }
