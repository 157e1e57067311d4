"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from sgg_optim.fewshot import metrics


def test_accuracy_and_macro_f1_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    assert metrics.accuracy(labels, preds) == pytest.approx(4 / 6)
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert metrics.macro_f1(labels, preds, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class that never occurs and is never predicted counts as 0, pulling the mean down
    assert metrics.macro_f1([0, 1], [0, 1], 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.accuracy([0, 1], [0])


def test_gradient_stability_by_hand():
    norms = [1.0, 2.0, 3.0, 10.0]
    mean = 4.0
    pstd = math.sqrt(((1 - 4) ** 2 + (2 - 4) ** 2 + (3 - 4) ** 2 + (10 - 4) ** 2) / 4)
    assert metrics.coefficient_of_variation(norms) == pytest.approx(pstd / mean)
    assert metrics.spike_ratio(norms) == pytest.approx(10.0 / 2.5)  # median of 4 values: 2.5
    assert metrics.spike_ratio([2.0, 2.0, 2.0]) == 1.0
    assert metrics.coefficient_of_variation([3.0, 3.0, math.nan]) == 0.0  # NaN steps ignored
    assert math.isnan(metrics.coefficient_of_variation([1.0]))


def test_alignment_and_summary_by_hand():
    assert metrics.cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert metrics.cosine([1.0, 1.0], [-2.0, -2.0]) == pytest.approx(-1.0)
    assert math.isnan(metrics.cosine([0.0, 0.0], [1.0, 0.0]))
    trace = {"grad_norm": [1.0, 3.0], "applied_norm": [1.0, 1.0],
             "update_cos": [math.nan, 0.5, 0.7], "ref_cos": [math.nan, math.nan]}
    s = metrics.trace_summary(trace)
    assert s["grad_cv"] == pytest.approx(0.5) and s["grad_spike"] == pytest.approx(1.5)
    assert s["applied_cv"] == 0.0 and s["update_cos"] == pytest.approx(0.6)
    assert math.isnan(s["ref_cos"])


def test_mean_std_is_sample_std():
    mu, sd = metrics.mean_std([0.5, 0.7, 0.9])
    assert mu == pytest.approx(0.7) and sd == pytest.approx(0.2)
    assert metrics.mean_std([0.4]) == (0.4, 0.0)
