"""Resumable grid: finished cells are kept in the JSONL file and skipped on rerun."""

from __future__ import annotations

import json
import math

import pytest

from test_fewshot_protocol import tiny_factory

from sgg_optim.fewshot import cli, protocol, tasks
from sgg_optim.fewshot.results import ResultsFile, aggregate, cell_key

@pytest.fixture
def toy_task(monkeypatch):
    texts = [f"{'yes' if i % 2 else 'no'} maybe {i}" for i in range(60)]
    task = tasks.Task.from_examples("toy", ("no", "yes"), texts, [i % 2 for i in range(60)], n_eval=20)
    monkeypatch.setitem(tasks.TASKS, "toy", lambda: task)
    monkeypatch.delitem(tasks._loaded, "toy", raising=False)
    return task


def test_finished_cells_are_skipped_on_rerun(tmp_path, toy_task, monkeypatch):
    calls = []
    real = protocol.run_cell

    def counting(*a, **k):
        calls.append((a[1].name, a[3]))
        return real(*a, **k)

    monkeypatch.setattr(protocol, "run_cell", counting)
    path = tmp_path / "grid.jsonl"
    kw = dict(steps=2, lrs=[1e-3], factory=tiny_factory)
    rows = cli.run_grid(["toy"], ["adamw"], [2], [0, 1], store=ResultsFile(path), **kw)
    assert len(calls) == 2 and len(rows) == 2
    assert len(path.read_text().splitlines()) == 2

    calls.clear()
    rows = cli.run_grid(["toy"], ["adamw", "adamw-clip"], [2], [0, 1], store=ResultsFile(path), **kw)
    assert calls == [("adamw-clip", 0), ("adamw-clip", 1)]  # only the new cells ran
    assert len(rows) == 4 and len(path.read_text().splitlines()) == 4

    calls.clear()
    cli.run_grid(["toy"], ["adamw", "adamw-clip"], [2], [0, 1], store=ResultsFile(path), **kw)
    assert calls == []

    # --report: a missing cell is listed as not run, nothing trains, the done rows come back
    rows = cli.run_grid(["toy"], ["adamw", "blend-ema"], [2], [0, 1], store=ResultsFile(path), run=False, **kw)
    assert calls == [] and [r["strategy"] for r in rows] == ["adamw", "adamw"]


def test_truncated_last_line_reruns_that_cell(tmp_path):
    path = tmp_path / "r.jsonl"
    good = {"task": "t", "strategy": "s", "k": 16, "seed": 0, "steps": 30, "model": "m", "accuracy": 0.5,
            "grad_cv": float("nan")}
    ResultsFile(path).append(good)
    with open(path, "a") as f:
        f.write('{"task": "t", "strategy": "s", "k": 16, "se')  # a crash mid-write
    store = ResultsFile(path)
    assert store.done(cell_key("t", "s", 16, 0, 30, "m"))
    assert not store.done(cell_key("t", "s", 16, 1, 30, "m"))
    assert json.loads(path.read_text().splitlines()[0])["grad_cv"] is None  # NaN stored as null


def test_aggregate_and_table_mean_std():
    rows = [{"task": "t", "k": 16, "strategy": "adamw", "accuracy": a, "macro_f1": a} for a in (0.6, 0.8)]
    agg = aggregate(rows)
    mu, sd, n = agg[("t", 16, "adamw")]["accuracy"]
    assert mu == pytest.approx(0.7) and sd == pytest.approx(math.sqrt(0.02)) and n == 2
    table = cli.results_table(rows, ("accuracy", "macro_f1"))
    assert "| t | 16 | adamw | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 |" in table


def test_retention_table_reports_drop_against_pretrained():
    from sgg_optim.fewshot.cli import retention_table

    rows = [{"strategy": "pretrained", "retention": {"a": 0.60, "b": 0.40}},
            {"strategy": "lora", "retention": {"a": 0.50, "b": 0.40}},
            {"strategy": "lora", "retention": {"a": 0.40, "b": 0.20}},
            {"strategy": "lora", "accuracy": 0.9}]  # a row without retention is left out
    lines = retention_table(rows).splitlines()
    assert lines[0] == "| strategy | seeds | a | b | mean | drop vs pretrained |"
    assert lines[2] == "| pretrained | 1 | 60.0 | 40.0 | 50.0 | +0.0 |"
    assert lines[3] == "| lora | 2 | 45.0 | 30.0 | 37.5 | +12.5 |"
    assert retention_table([{"strategy": "x"}]) == ""
