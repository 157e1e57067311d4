"""Resumable grid: finished cells are kept in the JSONL file and skipped on rerun."""

from __future__ import annotations

import json
import math

import pytest

from test_fewshot_protocol import tiny_factory

from sgg_optim.fewshot import cli, protocol, tasks
from sgg_optim.fewshot import results
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
    assert store.done(cell_key("t", "s", 16, 0, 0.0, 30, "m"))  # a row without lr keys at 0
    assert not store.done(cell_key("t", "s", 16, 1, 0.0, 30, "m"))
    assert json.loads(path.read_text().splitlines()[0])["grad_cv"] is None  # NaN stored as null


def test_aggregate_and_table_mean_std():
    rows = [{"task": "t", "k": 16, "strategy": "adamw", "lr": 5e-5, "accuracy": a, "macro_f1": a} for a in (0.6, 0.8)]
    rows.append({"task": "t", "k": 16, "strategy": "adamw", "lr": 2e-4, "accuracy": 0.5, "macro_f1": 0.4})
    agg = aggregate(rows)
    mu, sd, n = agg[("t", 16, "adamw", 5e-5)]["accuracy"]
    assert mu == pytest.approx(0.7) and sd == pytest.approx(math.sqrt(0.02)) and n == 2
    table = cli.results_table(rows, ("accuracy", "macro_f1", "grad_cv"))
    assert "| t | 16 | adamw | 5e-05 | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 | — |" in table
    assert "| t | 16 | adamw | 0.0002 | 1 | 50.0 ± 0.0 | 40.0 ± 0.0 | — |" in table
    assert table.splitlines()[0].endswith("| macro-F1 | \\|g\\| CV |")  # escaped: one header cell


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


def test_each_lr_is_a_row_and_an_added_lr_runs_alone(tmp_path, toy_task, monkeypatch):
    calls = []
    real = protocol.run_cell

    def counting(*a, **k):
        calls.append((a[1].name, a[3], k["lr"]))
        return real(*a, **k)

    monkeypatch.setattr(protocol, "run_cell", counting)
    path = tmp_path / "grid.jsonl"
    kw = dict(steps=2, factory=tiny_factory)
    rows = cli.run_grid(["toy"], ["adamw", "pretrained"], [2], [0], store=ResultsFile(path), lrs=[1e-3, 1e-2], **kw)
    assert [(r["strategy"], r["lr"]) for r in rows] == [("adamw", 1e-3), ("adamw", 1e-2), ("pretrained", 0.0)]
    assert len({ResultsFile.key_of(r) for r in rows}) == 3
    calls.clear()
    rows = cli.run_grid(["toy"], ["adamw"], [2], [0], store=ResultsFile(path), lrs=[1e-3, 1e-2, 3e-3], **kw)
    assert calls == [("adamw", 0, 3e-3)] and len(rows) == 3


def test_grid_runs_whole_task_seed_blocks(tmp_path, toy_task, monkeypatch):
    other = tasks.Task.from_examples("toy2", ("no", "yes"), list(toy_task.train_texts + toy_task.eval_texts),
                                     list(toy_task.train_labels + toy_task.eval_labels), n_eval=20)
    monkeypatch.setitem(tasks.TASKS, "toy2", lambda: other)
    monkeypatch.delitem(tasks._loaded, "toy2", raising=False)
    order = []
    real = protocol.run_cell

    def spy(*a, **k):
        order.append((a[0].name, a[3], a[1].name, k["lr"]))
        return real(*a, **k)

    monkeypatch.setattr(protocol, "run_cell", spy)
    cli.run_grid(["toy", "toy2"], ["adamw", "adamw-clip"], [2], [0, 1], steps=1, store=ResultsFile(tmp_path / "g.jsonl"),
                 lrs=[1e-3, 1e-2], factory=tiny_factory)
    blocks = [o[:2] for o in order]
    assert blocks == [b for b in dict.fromkeys(blocks) for _ in range(4)]  # each block contiguous, 2 rows x 2 lrs
    assert list(dict.fromkeys(blocks)) == [("toy", 0), ("toy2", 0), ("toy", 1), ("toy2", 1)]


def test_source_row_skipped_where_labels_differ(tmp_path, toy_task, monkeypatch, capsys):
    texts = [f"{['no', 'yes', 'maybe'][i % 3]} {i}" for i in range(90)]
    three = tasks.Task.from_examples("toy3", ("no", "yes", "maybe"), texts, [i % 3 for i in range(90)], n_eval=30)
    monkeypatch.setitem(tasks.TASKS, "toy3", lambda: three)
    monkeypatch.delitem(tasks._loaded, "toy3", raising=False)
    monkeypatch.setattr(protocol, "SOURCE_TASK", "toy")  # a binary source
    rows = cli.run_grid(["toy3", "toy"], ["adamw", "cone-source"], [2], [0], steps=1, lrs=[1e-3],
                        store=ResultsFile(tmp_path / "g.jsonl"), factory=tiny_factory)
    out = capsys.readouterr().out
    assert out.count("skipped on toy3") == 1 and "cone-source skipped on toy3: source toy has 2 labels" in out
    assert sorted((r["task"], r["strategy"]) for r in rows) == [("toy", "adamw"), ("toy", "cone-source"),
                                                               ("toy3", "adamw")]


def test_protocol1_rows_key_by_their_chosen_lr():
    old = {"task": "t", "strategy": "adamw", "k": 16, "seed": 0, "steps": 30, "model": "m", "lr": 5e-5,
           "val_acc": {"2e-05": 0.5, "5e-05": 0.75, "0.0001": 0.625}, "accuracy": 0.8}
    assert ResultsFile.key_of(old) == cell_key("t", "adamw", 16, 0, 5e-5, 30, "m")
    assert results.val_accuracy(old) == 0.75
    assert results.val_accuracy({**old, "val_acc": 0.5}) == 0.5


def _row(task, seed, strategy, lr, val, acc, **extra):
    return {"task": task, "k": 16, "seed": seed, "strategy": strategy, "lr": lr, "val_acc": val,
            "accuracy": acc, "eval_majority": 0.5, **extra}


def test_choose_lr_on_validation_ties_to_smaller_and_needs_the_whole_sweep():
    rows = [_row("t", 0, "s", 1e-4, 0.75, 0.60), _row("t", 0, "s", 2e-5, 0.75, 0.70),
            _row("t", 0, "s", 5e-5, 0.50, 0.99),  # best on eval, worst on validation: never chosen
            _row("t", 1, "s", 1e-4, 0.90, 0.50), _row("t", 1, "s", 2e-5, 0.80, 0.90),
            _row("t", 2, "s", 2e-5, 1.00, 0.90)]  # seed 2 lacks two lrs of the sweep
    chosen = results.choose_lr(rows)
    assert {key: r["lr"] for key, r in chosen.items()} == {("t", 16, 0, "s"): 2e-5}  # seed 1 lacks 5e-5
    # an explicit sweep of two lrs: seed 1 is complete, and its validation prefers 1e-4 (eval: 2e-5)
    two = results.choose_lr(rows, {"s": [2e-5, 1e-4]})
    assert {key: r["lr"] for key, r in two.items()} == {("t", 16, 0, "s"): 2e-5, ("t", 16, 1, "s"): 1e-4}
    assert set(results.choose_lr(rows, {"s": [2e-5]})) == {("t", 16, 0, "s"), ("t", 16, 1, "s"), ("t", 16, 2, "s")}


def test_failed_runs_worst_seed_and_lrs_near_best():
    rows = [_row("a", 0, "s", 1e-4, 0.5, 0.51), _row("a", 1, "s", 1e-4, 0.5, 0.90),  # seed 0 collapsed
            _row("b", 0, "s", 1e-4, 0.5, 0.80), _row("b", 1, "s", 1e-4, 0.5, 0.70),
            _row("a", 0, "s", 2e-5, 0.5, 0.81), _row("a", 1, "s", 2e-5, 0.5, 0.80),
            _row("b", 0, "s", 2e-5, 0.5, 0.78), _row("b", 1, "s", 2e-5, 0.5, 0.75)]
    [hi, lo] = results.per_lr(rows)  # 2e-5 then 1e-4
    assert (lo["lr"], lo["failed"], lo["n"]) == (1e-4, 0.25, 4) and hi["failed"] == 0.0
    assert lo["worst_seed"] == pytest.approx((0.51 + 0.70) / 2)  # per task the worst seed, averaged
    [sweep] = results.over_sweep(rows)
    # mean accuracy: 1e-4 72.75, 2e-5 78.5: only 2e-5 within 2 points of the best
    assert sweep["near_best"] == 1 and sweep["best_lr"] == 2e-5 and sweep["failed"] == 1 / 8
    assert sweep["worst_run"] == pytest.approx((0.51 + 0.70) / 2)
    assert results.over_sweep([{**r, "accuracy": 0.8} for r in rows])[0]["near_best"] == 2
    assert results.failed({"accuracy": 0.3, "eval_majority": 0.5}) is True  # below always-one-class too
    assert results.failed({"accuracy": 0.3}) is None


def test_bootstrap_interval_is_seeded_and_decides_helps():
    gains = [0.03, 0.05, 0.02, 0.04, 0.06, 0.01]
    noise = [0.03, -0.04, 0.01, -0.02, 0.02, -0.01]
    assert results.bootstrap_ci(gains) == results.bootstrap_ci(gains)
    assert results.bootstrap_ci(gains, resamples=20, seed=1) != results.bootstrap_ci(gains, resamples=20)
    lo, hi = results.bootstrap_ci(gains)
    assert 0 < lo < sum(gains) / 6 < hi <= max(gains)
    lo, hi = results.bootstrap_ci(noise)
    assert lo < 0 < hi
    assert all(math.isnan(x) for x in results.bootstrap_ci([0.1]))
    base = {("t", 16, s): {"accuracy": 0.5} for s in range(6)}
    up = {("t", 16, s): {"accuracy": 0.5 + g} for s, g in enumerate(gains)}
    down = {("t", 16, s): {"accuracy": 0.5 - g} for s, g in enumerate(gains)}
    flat = {("t", 16, s): {"accuracy": 0.5 + g} for s, g in enumerate(noise)}
    assert results.paired(up, base).verdict == "helps" and results.paired(down, base).verdict == "hurts"
    assert results.paired(flat, base).verdict == "n.s."
    only_some = results.paired({("t", 16, 0): {"accuracy": 0.9}, ("u", 16, 0): {"accuracy": 0.9}}, base)
    assert only_some.n == 1 and only_some.mean == pytest.approx(0.4) and only_some.verdict == "—"
    four = results.paired({p: r for p, r in up.items() if p[2] < 4}, base)
    assert four.n == 4 and four.lo > 0 and four.verdict == "—"  # too few pairs for a verdict


def _grid_rows():
    rows = []
    for task in ("a", "b", "c"):
        for seed in range(4):
            for lr, base in ((2e-5, 0.70), (2e-4, 0.60)):
                noise = 0.01 * ((seed * 7 + len(task)) % 3 - 1)
                rows.append(_row(task, seed, "adamw", lr, base, base + noise, applied_cv=0.4))
                rows.append(_row(task, seed, "good", lr, base + 0.1, base + noise + 0.05, applied_cv=0.2))
    return rows


def test_protocol_report_tables_render_and_pair_against_adamw():
    rows = _grid_rows()
    [adamw, good] = results.at_chosen_lr(rows)
    assert adamw["vs_baseline"] is None and adamw["chosen"] == {2e-5: 12}
    assert good["vs_baseline"].n == 12 and good["vs_baseline"].mean == pytest.approx(0.05)
    assert good["vs_baseline"].verdict == "helps"
    per = {(r["strategy"], r["lr"]): r for r in results.per_lr(rows)}
    assert per[("good", 2e-4)]["vs_baseline"].mean == pytest.approx(0.05)
    report = results.protocol_report(rows, resamples=500)
    tables = [block for block in report.split("\n\n") if block.startswith("|")]
    assert len(tables) == 5
    for table in tables:
        widths = {len(line.replace("\\|", "")) - len(line.replace("\\|", "").replace("|", ""))
                  for line in table.splitlines()}
        assert len(widths) == 1  # every line has as many cell borders as the header
    assert "| good | 12 | 75.0 |" in report and "helps" in report
    assert "+5.0 [" in report


def test_claims_against_their_goals():
    rows = _grid_rows()
    [good] = results.claims(rows, resamples=500)
    assert good["gain"].mean == pytest.approx(0.05) and good["gain_met"]  # +5 points, interval above +2
    assert good["cv"].mean == pytest.approx(0.5) and good["cv_met"]  # applied CV 0.2 against 0.4
    assert good["failed"] == (0.0, 0.0, 24) and not good["failed_met"]  # no AdamW failure to halve
    # a row that fails where AdamW does not, and whose CV is AdamW's, meets neither goal
    bad = [{**r, "strategy": "bad", "accuracy": 0.5, "applied_cv": 0.4} for r in rows if r["strategy"] == "good"]
    [b] = results.claims([r for r in rows if r["strategy"] == "adamw"] + bad, resamples=500)
    assert b["failed"][0] == 1.0 and not b["failed_met"] and not b["gain_met"] and not b["cv_met"]
    assert "**met**" in results.claims_table(rows, resamples=500)
    # halving AdamW's failures counts only when the paired difference excludes 0
    lone = ("adamw", "a", 0, 2e-5)
    fails = [{**r, "accuracy": 0.5} if (r["strategy"], r["task"], r["seed"], r["lr"]) == lone else r for r in rows]
    [one] = results.claims(fails, resamples=500)
    assert one["failed"] == (0.0, 1 / 24, 24) and not one["failed_met"]  # one failure in 24 runs: no evidence
    fails = [{**r, "accuracy": 0.5} if r["strategy"] == "adamw" else r for r in rows]
    [many] = results.claims(fails, resamples=500)
    assert many["failed"] == (0.0, 1.0, 24) and many["failed_met"]
    # a row on its own lr grid shares no run with AdamW: its failures pair at the chosen lrs
    own = [r for r in rows if r["strategy"] == "adamw"] + [
        {**r, "strategy": "own", "lr": r["lr"] * 100} for r in rows if r["strategy"] == "good"]
    [o] = results.claims(own, resamples=500)
    assert o["failed"] == (0.0, 0.0, 12)  # 3 tasks x 4 seeds, one run each


def _candidate_rows(diffs, *, eval_flip=False, by_seed=None):
    """Six tasks x 2 seeds of adamw and the given {row: validation difference} at one lr;
    eval accuracy moves against validation when ``eval_flip`` (it must not change a choice)."""
    rows = []
    for i in range(6):
        for seed in range(2):
            base = 0.70 + 0.01 * ((i + seed) % 3)
            rows.append(_row(f"t{i}", seed, "adamw", 1e-4, base, base))
            for name, d in diffs.items():
                dv = d + 0.002 * ((i * 3 + seed) % 4 - 1.5)  # a spread, so intervals are not points
                if by_seed is not None and name in by_seed:
                    dv = by_seed[name][seed]
                acc = base - dv if eval_flip else base + dv
                rows.append(_row(f"t{i}", seed, name, 1e-4, base + dv, acc))
    return rows


def test_choose_defaults_follows_the_written_rule_on_validation_only():
    # step 1: the qualifier with the largest validation gain wins, whatever eval says
    rows = _candidate_rows({"cone-ema": 0.0, "project-ema": 0.03, "adaptive": 0.01}, eval_flip=True)
    d = results.choose_defaults(rows, resamples=500)
    assert (d["choice"], d["step"]) == ("project-ema", 1)
    # a row that helps on the mean but whose worst seed is 2 points below AdamW's is out
    rows = _candidate_rows({"cone-ema": 0.0, "project-ema": 0.0, "adaptive": 0.01},
                           by_seed={"project-ema": (0.14, -0.02)})
    recs = {r["strategy"]: r for r in results.on_validation(rows, resamples=500)}
    assert recs["project-ema"]["vs_baseline"].verdict == "helps"
    assert recs["project-ema"]["vs_baseline"].mean > recs["adaptive"]["vs_baseline"].mean
    assert results.choose_defaults(rows, resamples=500)["choice"] == "adaptive"
    # step 2: nothing helps and today's defaults hurt: the highest lower bound, pass-through included
    rows = _candidate_rows({"cone-ema": -0.03, "project-ema": -0.01})
    d = results.choose_defaults(rows, resamples=500)
    assert (d["choice"], d["step"]) == ("adamw", 2)
    rows = _candidate_rows({"cone-ema": -0.03, "project-ema": 0.0})
    d = results.choose_defaults(rows, resamples=500)
    assert d["step"] == 2 and d["choice"] in ("project-ema", "adamw")
    # step 3: nothing helps, nothing hurts: the defaults stay
    rows = _candidate_rows({"cone-ema": 0.0, "project-ema": 0.0})
    d = results.choose_defaults(rows, resamples=500)
    assert (d["choice"], d["step"]) == ("cone-ema", 3)
    assert "Defaults by the written rule (step 3): `cone-ema`" in results.protocol_report(rows, resamples=500)


def test_bench_report_prints_the_protocol_tables(tmp_path, toy_task, capsys):
    path = tmp_path / "r.jsonl"
    store = ResultsFile(path)
    for r in _grid_rows():  # three tasks x four seeds, as one toy task with twelve seeds
        store.append({**r, "task": "toy", "k": 2, "steps": 30, "model": "minilm", "eval_majority": None,
                      "seed": r["seed"] + 4 * "abc".index(r["task"]),
                      "strategy": {"good": "adamw-clip"}.get(r["strategy"], r["strategy"])})
    assert cli.main(["bench", "--tasks", "toy", "--strategies", "adamw,adamw-clip", "--shots", "2", "--seeds", "12",
                     "--lrs", "2e-5,2e-4", "--results", str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "48 of 48 runs already in" in out and "Protocol v2, K=2" in out
    line = next(x for x in out.splitlines() if x.startswith("| adamw-clip | 12 |"))
    assert "+5.0 [" in line and line.endswith("| helps |")
    assert "| 0% |" in line  # failed-run rate: eval_majority filled in from the task (0.5)


def test_forgetting_at_each_lr():
    # the drop grows with the lr here; the chosen-lr table alone would hide it
    rows = [{"task": "t", "k": 4, "seed": s, "strategy": "pretrained", "lr": 0.0, "val_acc": 0.5,
             "retention": {"src": 0.9}} for s in range(5)]
    rows += [{"task": "t", "k": 4, "seed": s, "strategy": "adamw", "lr": lr, "val_acc": 0.5 + (lr < 1e-4) * 0.1,
              "retention": {"src": 0.9 - drop - s / 1000}} for s in range(5) for lr, drop in ((5e-5, 0.02), (2e-4, 0.15))]
    [chosen] = results.forgetting(rows, resamples=200)
    [high] = results.forgetting(rows, at_lr=2e-4, resamples=200)
    assert chosen["drop"].mean == pytest.approx(0.022) and high["drop"].mean == pytest.approx(0.152)
    table = results.forgetting_table(rows, resamples=200)
    assert "At each lr:" in table and "| 0.0002 | adamw | src | 5 |" in table


def test_the_forgetting_verdict_says_which_way():
    # a drop smaller than AdamW's is less forgetting: once labelled "hurts" (the sign of a gain)
    rows = [{"task": "t", "k": 4, "seed": s, "strategy": n, "lr": 0.0 if n == "pretrained" else 1e-4,
             "val_acc": 0.5, "retention": {"src": a - s / 1000}}
            for s in range(6) for n, a in (("pretrained", 0.9), ("adamw", 0.7), ("kind", 0.85), ("rough", 0.6))]
    table = results.forgetting_table(rows, resamples=200)
    kind = next(x for x in table.splitlines() if x.startswith("| kind |"))
    rough = next(x for x in table.splitlines() if x.startswith("| rough |"))
    assert kind.endswith("| forgets less |") and rough.endswith("| forgets more |")


def test_bench_report_compares_drops_against_the_baseline_it_is_given(tmp_path, toy_task, capsys):
    # SmolLM2's tuned baseline is `lora`: the drops were compared with an `adamw` it never ran
    path = tmp_path / "r.jsonl"
    store = ResultsFile(path)
    for s in range(5):
        for name, lr, after in (("pretrained", 0.0, 0.9), ("lora", 1e-3, 0.8), ("promot+lora", 1e-3, 0.85)):
            store.append({"task": "toy", "k": 2, "steps": 30, "model": "minilm", "seed": s, "strategy": name,
                          "lr": lr, "accuracy": 0.7, "val_acc": 0.7, "eval_majority": None,
                          "retention": {"other": after - s / 1000}})
    assert cli.main(["bench", "--tasks", "toy", "--strategies", "pretrained,lora,promot+lora", "--shots", "2",
                     "--seeds", "5", "--lrs", "1e-3", "--results", str(path), "--baseline", "lora", "--report"]) == 0
    out = capsys.readouterr().out
    assert "drop - lora's drop" in out
    line = next(x for x in out.splitlines() if x.startswith("| promot+lora | other |"))
    assert "-5.0 [" in line and line.endswith("| forgets less |")


def test_choice_split_effects_at_each_chosen_lr():
    import random
    rng = random.Random(0)
    lrs = (2e-5, 5e-5, 1e-4)
    rows = [_row(t, seed, s, lr, round(rng.random(), 1), rng.random())
            for t in ("a", "b") for seed in range(4) for s in ("row", "base") for lr in lrs]
    rows.append(_row("a", 9, "row", 2e-5, 0.5, 0.5))  # no baseline pair: left out
    split = results.choice_split(rows, "row", "base")
    chosen = results.chosen_by_strategy(rows)
    assert sorted(split) == sorted(set(chosen["row"]) & set(chosen["base"])) and len(split) == 8
    for pair, s in split.items():
        row, base = chosen["row"][pair], chosen["base"][pair]
        assert s.difference == pytest.approx(row["accuracy"] - base["accuracy"])
        def acc(strategy, lr):
            return next(r["accuracy"] for r in rows if r["strategy"] == strategy
                        and (r["task"], r["seed"], r["lr"]) == (pair[0], pair[2], lr))
        assert s.at_row_lr == pytest.approx(row["accuracy"] - acc("base", row["lr"]))
        assert s.at_baseline_lr == pytest.approx(acc("row", base["lr"]) - base["accuracy"])
        assert s.same_lr == (row["lr"] == base["lr"])
        if s.same_lr:
            assert s.at_row_lr == s.at_baseline_lr == pytest.approx(s.difference)
    assert any(s.same_lr for s in split.values()) and not all(s.same_lr for s in split.values())
