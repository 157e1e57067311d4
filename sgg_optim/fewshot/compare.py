"""``compare``: does guidance help on *your* task, with *your* model, and at which setting?

The Python API behind ``sgg-optim compare`` (the CLI only parses arguments into it)::

    from sgg_optim.fewshot.compare import compare
    from sgg_optim.fewshot.data import load_data

    task = load_data("reviews.csv", text_column="review", label_column="stars", shots=8)
    res = compare(task, "minilm", ["adamw", "cone-kshot"], shots=8, seeds=3, steps=30,
                  lrs=[5e-5, 2e-4], out="my_compare")
    print(res.report)          # also in my_compare/report.md
    res.pick                   # the setting chosen on the validation split

Every (strategy, seed, lr) is one run on the same K shots per seed (the protocol of
:mod:`.protocol`); the runs go to ``out/results.jsonl`` (the :class:`.results.ResultsFile`
format, so a rerun skips what is done: the folder remembers which data and model its
runs are of, in ``out/task.json``, and refuses another), the report with the tables and the pick to
``out/report.md`` and a plot to ``out/compare.png``. The pick is the (strategy, lr) with
the highest mean validation accuracy (K per class from the training pool, disjoint from
the shots); the test split is reported, never used to choose.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .results import ResultsFile, choose_lr, markdown_table, pick_setting, protocol_report
from .tasks import Task

# AdamW, plain clipping, the one-import swap (GuidedAdamW's defaults) and the reference
# that needs no source task; magnitude control alone (`adaptive`) is left out: it equalled
# AdamW in every run of the protocol v2 grid (docs/results.md)
DEFAULT_STRATEGIES = ("adamw", "adamw-clip", "cone-ema", "cone-kshot")
DEFAULT_LRS = (5e-5, 2e-4)


def default_strategies(source: Optional[Task] = None) -> tuple[str, ...]:
    """The rows :func:`compare` runs unless told: :data:`DEFAULT_STRATEGIES`, and
    ``cone-source`` when there is a source task.

        >>> default_strategies()
        ('adamw', 'adamw-clip', 'cone-ema', 'cone-kshot')
    """
    return DEFAULT_STRATEGIES + (("cone-source",) if source is not None else ())


class InputError(ValueError):
    """A bad input to :func:`compare`, found before anything trains (the CLI shows its
    message alone; a ``ValueError`` raised while training keeps its traceback)."""


@dataclass
class Results:
    """What :func:`compare` ran and wrote: its rows, the Markdown report, the pick and the files."""

    rows: list[dict[str, Any]]
    report: str
    pick: Optional[dict[str, Any]]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """Mean test and validation accuracy per (strategy, lr) over seeds, in Markdown."""
        return summary_table(self.rows)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    from .metrics import mean_std

    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], float(r.get("lr", 0.0))), []).append(r)
    lines = []
    for (s, lr), rs in groups.items():
        figs = []
        for m in ("val_acc", "accuracy", "macro_f1"):
            mu, sd = mean_std([float("nan") if r.get(m) is None else float(r[m]) for r in rs])
            figs.append(f"{100 * mu:.1f} ± {100 * sd:.1f}" if math.isfinite(mu) else "—")
        cv = mean_std([float("nan") if r.get("grad_cv") is None else float(r["grad_cv"]) for r in rs])[0]
        lines.append([s, f"{lr:g}", str(len(rs))] + figs + [f"{cv:.2f}" if math.isfinite(cv) else "—"])
    return markdown_table(["strategy", "lr", "seeds", "validation acc", "test acc", "test macro-F1", "|g| CV"],
                          lines)


def check_strategies(strategies: Sequence[str], source: Optional[Task], task: Optional[Task] = None) -> list[Any]:
    """The strategies, or ``ValueError`` for an unknown one, one that needs a package that is
    not installed (naming the extra), one that needs a source task when none is given, or
    one whose source cannot serve ``task`` (before anything trains)."""
    from .grid import missing_requirement
    from .protocol import source_compatible
    from .strategies import get_strategy

    out = []
    for name in strategies:
        try:
            st = get_strategy(name)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        needs = missing_requirement(st)
        if needs:
            raise ValueError(needs)
        if st.reference in ("source", "icl") and source is None:
            raise ValueError(f"strategy {name} guides toward a source task's gradient: give --source "
                             "(a built-in task or a file with the same columns), or use a *-kshot / *-ema row")
        if st.reference == "sources":
            raise ValueError(f"strategy {name} (several source tasks) is for the built-in grid (sgg-optim bench)")
        why = source_compatible(st, task, source) if task is not None else None
        if why:
            raise ValueError(f"{name} cannot run on {task.name}: {why}")  # type: ignore[union-attr]
        out.append(st)
    return out


def compare(task: Task, model: str | Callable[[Any], Any], strategies: Optional[Sequence[str]] = None, *,
            shots: int = 8, seeds: int = 3, steps: int = 30, lrs: Sequence[float] = DEFAULT_LRS,
            out: str | Path = "sgg_compare", model_name: Optional[str] = None, source: Optional[Task] = None,
            baseline: str = "adamw", command: str = "", label_words: Optional[Sequence[str]] = None,
            verbose: bool = True) -> Results:
    """Compare ``strategies`` on K=``shots`` per class of ``task`` with ``model``, at every lr
    of ``lrs`` and ``seeds`` seeds, ``steps`` steps each; rows, report and plot in ``out``.
    ``strategies=None`` runs :func:`default_strategies` (``cone-source`` too with a
    ``source``).

    ``model`` is ``"minilm"``, ``"smollm2"``, a local model folder
    (:func:`.grid.model_factory`) or a factory ``task -> (model, tokenizer)`` (then
    ``model_name`` names it in the results, and ``label_words`` only identify the
    comparison). Inputs are checked before anything trains, raising :class:`InputError`:
    the strategies against the source, the shots per class (:func:`.data.check_shots`),
    the lrs, the label words, the out folder (:func:`claim_folder`). ``command`` is
    written into the report (the CLI passes the command line).
    """
    from . import grid
    from .data import check_shots
    from .models import check_label_words

    if strategies is None:
        strategies = default_strategies(source)
    try:
        if not strategies:
            raise ValueError("strategies: give at least one (e.g. adamw,cone-kshot)")
        strats = check_strategies(strategies, source, task)
        check_shots(task, shots)
        if not lrs or not all(math.isfinite(float(x)) and float(x) > 0 for x in lrs):
            raise ValueError(f"lrs: give learning rates > 0, got {list(lrs)}")
        if label_words:
            check_label_words(label_words, task.label_names)
        if callable(model):
            factory, name = model, model_name or getattr(model, "__name__", "custom")
        else:
            factory, name = grid.model_factory(str(model), label_words=label_words), model_name or str(model)
        if any(st.lora for st in strats):  # the LoRA rows' targets, found before any row trains
            from ..integrations.peft import attention_targets

            built, _ = factory(task)
            attention_targets(getattr(built, "lm", built))
            del built  # not held through the runs
        out = claim_folder(Path(out), task, name, label_words, source)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from e
    store = ResultsFile(out / "results.jsonl")
    say = grid._say if verbose else (lambda _msg: None)
    if verbose:
        say(f"{task.name}: {task.description or ''}\nlabels: {', '.join(task.label_names)}; "
            f"{len(task.train_texts)} training-pool examples, {len(task.eval_texts)} test examples")
    rows = grid.run_grid([task], [s.name for s in strats], [shots], list(range(seeds)), steps, store,
                        lrs=[float(x) for x in lrs], explain=verbose, factory=factory, model=name,
                        source=source)
    pick = pick_setting(rows)
    report = write_report(rows, task, out, pick, command=command, model=name, shots=shots, steps=steps,
                          baseline=baseline)
    files = {"results": store.path, "report": out / "report.md"}
    try:
        files["plot"] = plot(rows, task, out / "compare.png", shots=shots, steps=steps, model=name)
    except ImportError as e:  # matplotlib is checked by the CLI first; a notebook may lack it
        say(f"no plot: {e}")
    if verbose:
        say("\n" + summary_table(rows) + "\n\n" + pick_line(pick))
        say(f"\nreport: {files['report']}\nresults: {store.path}" + (f"\nplot: {files['plot']}" if "plot" in files else ""))
    return Results(rows, report, pick, out, files)


def _fingerprint(task: Task, model: str, label_words: Optional[Sequence[str]], source: Optional[Task]) -> str:
    """A digest of what a run's figures depend on beyond its key: the examples and labels
    of every split, the model, the label words and the source task."""
    def of(t: Optional[Task]) -> Any:
        return None if t is None else [t.label_names, t.train_texts, t.train_labels, t.eval_texts, t.eval_labels]

    blob = json.dumps([of(task), model, list(label_words or ()), of(source)], default=list, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def claim_folder(out: Path, task: Task, model: str, label_words: Optional[Sequence[str]] = None,
                 source: Optional[Task] = None) -> Path:
    """Make ``out`` the folder of this comparison, or raise ``ValueError`` naming it.

    Runs are keyed by task name, strategy, K, seed, lr, steps and model (a rerun skips
    those done), and a task's name is its file's stem: so ``out/task.json`` records a
    digest of the data, model, label words and source, and a folder that holds another
    comparison's runs (other data under the same file name, another model folder, other
    label words or source) is refused rather than mixed with it.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; give a folder for the results, report and plot")
    record = out / "task.json"
    mine = {"fingerprint": _fingerprint(task, model, label_words, source), "task": task.name,
            "labels": list(task.label_names), "model": model,
            "examples": len(task.train_texts) + len(task.eval_texts)}
    if not record.is_file() and (out / "results.jsonl").is_file() and (out / "results.jsonl").stat().st_size:
        raise ValueError(f"out {out} holds runs written before compare recorded which data they are of "
                         "(no task.json): give another --out, or delete that folder")
    if record.is_file():
        try:
            theirs = json.loads(record.read_text())
        except ValueError:
            theirs = None
        if not isinstance(theirs, dict):
            raise ValueError(f"{record} is not a record compare wrote: give another --out, or delete that folder")
        if theirs.get("fingerprint") != mine["fingerprint"]:
            raise ValueError(f"out {out} holds the runs of another comparison ({theirs.get('task')}: labels "
                             f"{', '.join(theirs.get('labels', []))}, {theirs.get('examples')} examples, model "
                             f"{theirs.get('model')}; now {task.name}: labels {', '.join(task.label_names)}, "
                             f"{mine['examples']} examples, model {model}, or other label words, source or "
                             "file contents): give another --out, or delete that folder")
        return out
    out.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(record.name + ".partial")  # written whole, then renamed: never half a record
    partial.write_text(json.dumps(mine, indent=1) + "\n")
    partial.replace(record)
    return out


def pick_line(pick: Optional[dict[str, Any]]) -> str:
    if pick is None:
        return "Nothing ran: no setting to pick."
    return (f"Pick: **{pick['strategy']} at lr {pick['lr']:g}**, the highest mean validation accuracy "
            f"({100 * pick['val_acc']:.1f}% over {pick['seeds']} seeds; validation = K per class from the "
            f"training pool, disjoint from the shots). The test split was not used to choose; its figure "
            f"for this setting: accuracy {100 * pick['accuracy']:.1f}%, macro-F1 {100 * pick['macro_f1']:.1f}%."
            + (" **Every run of this setting failed** (test accuracy within 2 points of always predicting the "
               "majority class): no setting learned the task here, and the pick means little; try more shots, "
               "more steps or another model." if pick.get("failed") == 1.0 else ""))


def write_report(rows: Sequence[dict[str, Any]], task: Task, out: Path, pick: Optional[dict[str, Any]], *,
                 command: str, model: str, shots: int, steps: int, baseline: str = "adamw") -> str:
    """``out/report.md``: the command, the data, the pick, the summary and protocol tables."""
    from .grid import with_majority

    parts = [f"# sgg-optim compare: {task.name}", ""]
    if command:
        parts += ["Produced by:", "", "```", command, "```", ""]
    parts += [f"Data: {task.description or task.name}. Labels (class order): {', '.join(task.label_names)}.",
              f"Model: {model}. K={shots} per class, {steps} steps; seeds and lrs as in the tables.", "",
              pick_line(pick), "", "## Mean over seeds, per strategy and lr", "", summary_table(rows), "",
              "## Protocol tables", "",
              protocol_report(with_majority(list(rows)), baseline=baseline) if any(
                  r["strategy"] == baseline for r in rows) else "(no baseline row: protocol tables skipped)", ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def plot(rows: Sequence[dict[str, Any]], task: Task, path: Path, *, shots: int, steps: int, model: str) -> Path:
    """The comparison plot of each strategy at its validation-chosen lr per seed."""
    from .plots import comparison_plot

    chosen = list(choose_lr(rows).values())
    return comparison_plot(chosen, path, chance=max(task.eval_labels.count(c) for c in set(task.eval_labels))
                           / len(task.eval_labels),
                           title=f"{task.name}, K={shots}, {Path(model).name}, {steps} steps "
                                 "(each seed at the lr chosen on validation)")
