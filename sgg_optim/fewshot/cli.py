"""``sgg-optim demo|compare|capture|bench|fetch``: few-shot fine-tuning of a real model on real data.

``demo`` is the short tour: one task, MiniLM, AdamW against guided AdamW (cone), three
seeds, K=16, a table and a plot. ``bench`` runs a grid of tasks x shots x seeds x
strategies x learning rates (protocol v2: one row per run), appends every finished run
to a JSONL file so a rerun skips what is done, and reports each row per lr, at the lr
chosen on validation, and over the sweep, each against AdamW with paired bootstrap
intervals (:func:`.results.protocol_report`). ``compare`` runs the same machinery on the
user's own data and model (:mod:`.data`, :mod:`.compare`); ``capture`` writes a reference
file from them. Heavy modules (transformers, datasets, matplotlib) are imported inside the
subcommands.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from . import assets
from .grid import (MODEL_NAME, MODELS, ROW_EXTRAS, _progress, _say, check_requirements,  # noqa: F401 (re-exported)
                   grid_order, model_factory, run_grid, with_majority)
from .results import (ResultsFile, cell_key, forgetting_table, protocol_report, results_table,  # noqa: F401 (re-exported)
                      retention_table)

SOURCES = "vader-movie,rt-subjectivity,bbc-topic"
RETENTION = "bbc-topic,bb-intent,rt-subjectivity,bb-vitaminc"
DEMO_TASK = "vader-amazon"
DEMO_STRATEGIES = ("adamw", "cone-source")
DEMO_LR = 5e-5


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A MiniLM step allocates and frees tensors of 47-90 MB (the word-embedding gradient,
    AdamW's temporaries); by default each is a fresh ``mmap`` whose pages are faulted in
    and zeroed by the kernel, about 2.8 million page faults and a fifth of the CPU time of
    a cell (``benchmarks/cell_profile.py``). With mmap off and trimming only past 1 GB free, freed
    blocks stay in the heap and are reused. Numbers are unchanged; only where memory comes
    from. False (and nothing done) where the C library has no ``mallopt`` (not glibc), or
    when ``SGG_OPTIM_MALLOC=default``.
    """
    if os.environ.get("SGG_OPTIM_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 1 << 30) and mallopt(m_top_pad, 1 << 28))


EXTRA_OF = {"matplotlib": "demo", "tqdm": "demo", "peft": "demo", "datasets": "demo"}


def require(modules: Sequence[str], command: str) -> None:
    """Exit with one message naming the extra to install if any of ``modules`` is missing,
    before anything downloads or trains (a missing plotting library must not cost the run)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRA_OF.get(m, "demo") for m in missing})
        raise SystemExit(f"sgg-optim {command}: missing {', '.join(missing)}; install the extra first: "
                         + " ".join(f"pip install 'sgg-optim[{e}]'" for e in extras))


def _start(args: argparse.Namespace, command: str, needs: Sequence[str] = ()) -> None:
    """What every training subcommand does first: stop at once if an optional package it
    needs is missing (naming the extra), quiet the libraries, set torch's threads
    (``--threads``) and keep freed memory for reuse (:func:`keep_freed_memory`)."""
    if needs:
        require(needs, command)
    _quiet_libraries()
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    keep_freed_memory()


def demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _start(args, "demo", ("matplotlib", "tqdm", "peft"))
    from .plots import comparison_plot
    from .protocol import SOURCE_TASK
    from .tasks import load_task

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"sgg-optim demo: --out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    _say("sgg-optim demo: few-shot fine-tuning of a real pretrained model on real labelled data.\n"
         "Model: all-MiniLM-L6-v2 (22.7M parameters), fully fine-tuned with a fresh classification head.\n"
         f"Task: {args.task}, K={args.shots} examples per class sampled by seed, evaluated on a fixed "
         f"held-out split.\nEvery run gets the same shots, head initialisation, batches and {args.steps} steps; "
         "only the optimizer differs:\n"
         f"  adamw        torch.optim.AdamW(lr={args.lr:g})\n"
         f"  cone-source  sgg_optim.GuidedAdamW(lr={args.lr:g}, reference=ref): ref is the mean gradient of "
         f"the source task\n"
         f"               ({SOURCE_TASK}, 8 class-balanced batches, sgg_optim.capture_reference); every "
         "gradient more than "
         "60 deg away from it\n"
         "               is rotated onto that cone (same length), and norms above 3x their running mean are "
         "scaled down.\n"
         f"Files are cached in {assets.cache_root()} (set {assets.CACHE_ENV} to move it); "
         "the first run downloads about 90 MB.")
    task = load_task(args.task)
    _say(f"\n{task.description}: {len(task.train_texts)} train-pool texts, {len(task.eval_texts)} eval texts, "
         f"labels {', '.join(task.label_names)}.")
    store = ResultsFile(out / "results.jsonl")
    if args.fresh and store.path.exists():
        store.path.unlink()
        store = ResultsFile(store.path)
    rows = run_grid([args.task], list(DEMO_STRATEGIES), [args.shots], list(range(args.seeds)), args.steps,
                    store, lrs=[args.lr], explain=True)
    _say("\nResults, mean ± std over seeds (accuracy and macro-F1 in %, on the held-out eval split):\n")
    cols = ("accuracy", "macro_f1", "grad_cv", "grad_spike", "applied_cv", "update_cos", "ref_cos")
    table = results_table(rows, cols)
    _say(table)
    (out / "results.md").write_text(f"sgg-optim demo: {args.task}, K={args.shots}, lr {args.lr:g}, "
                                    f"{args.seeds} seeds, {args.steps} steps\n\n{table}\n")
    _say("\n|g| CV / spike: coefficient of variation and max/median of the gradient norm over steps "
         "(before clipping or guidance);\napplied CV: the same for the norm of the gradient the optimizer "
         "actually used; cos(Δt,Δt-1): mean cosine between consecutive parameter updates;\n"
         "cos(g,ref): mean cosine of the raw gradient with the guidance reference (guided rows only).")
    png = comparison_plot(rows, out / "demo.png",
                          title=f"{args.task}, K={args.shots}, MiniLM, {args.seeds} seeds, {args.steps} steps")
    _say(f"\nPlot: {png}\nTable: {out / 'results.md'}\nRaw results: {store.path}\nDone in {time.perf_counter() - t0:.0f} s. "
         f"Your own data and model: sgg-optim compare --help; the full grid: sgg-optim bench --help")
    return 0


def bench(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _start(args, "bench")
    store = ResultsFile(Path(args.results))
    rows = run_grid(args.tasks.split(","), args.strategies.split(","), [int(k) for k in args.shots.split(",")],
                    list(range(args.first_seed, args.first_seed + args.seeds)), args.steps, store,
                    lrs=_lrs(args.lrs) if args.lrs else None, explain=True,
                    model=args.model, sources=[s for s in args.sources.split(",") if s],
                    retention=[r for r in args.retention.split(",") if r], retention_n=args.retention_n,
                    retention_k=args.retention_k, run=not args.report)
    _say("\n" + results_table(rows))
    for k in sorted({int(r["k"]) for r in rows}):
        _say(f"\nProtocol v2, K={k}, {args.steps} steps, {args.model} (tasks: "
             f"{', '.join(dict.fromkeys(r['task'] for r in rows if r['k'] == k))}):\n")
        _say(protocol_report(with_majority([r for r in rows if int(r["k"]) == k]), baseline=args.baseline))
    if any(r.get("retention") for r in rows):
        what = (f"in-context accuracy, {args.retention_k} demonstrations" if args.model == "smollm2"
                else "accuracy through a head fitted on the untuned encoder and frozen")
        _say(f"\nRetention ({what}), at each row's validation-chosen lr, and its drop against the untuned "
             "model (`pretrained` rows):\n")
        _say(forgetting_table(rows, compare_to=args.baseline) or retention_table(rows))
    if args.plot:
        from .plots import comparison_plot

        comparison_plot(rows, Path(args.plot))
        _say(f"plot: {args.plot}")
    _say(f"done in {time.perf_counter() - t0:.0f} s; results in {store.path}")
    return 0


def fetch(args: argparse.Namespace) -> int:
    unknown = [a for a in args.assets if a not in assets.ASSETS]
    if unknown:
        raise SystemExit(f"sgg-optim fetch: unknown asset {unknown[0]!r}; known: {', '.join(assets.ASSETS)}")
    for name in args.assets or list(assets.ASSETS):
        _say(f"{name}: {assets.materialize(name, quiet=False)}")
    return 0


def _lrs(text: str) -> list[float]:
    """``--lrs``: comma-separated learning rates, each finite and > 0, at least one."""
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"sgg-optim: --lrs takes comma-separated numbers, got {text!r}") from None
    bad = [x for x in lrs if not (math.isfinite(x) and x > 0)]
    if bad or not lrs:
        raise SystemExit(f"sgg-optim: --lrs takes learning rates > 0, got {text!r}")
    return lrs


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``minimum`` (argparse names the option)."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid ... value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _learning_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a learning rate > 0, got {text}")
    return value


POSITIVE, COUNT = _at_least(1), _at_least(0)


def _data_args(p: argparse.ArgumentParser, label_required: bool = True) -> None:
    from .data import FILE_TYPES

    p.add_argument("--data", required=True, help="a built-in task name, a file "
                   f"({', '.join(FILE_TYPES)}) or a folder written by datasets' save_to_disk; local files only")
    p.add_argument("--text-column", default="text", help="the column holding the text (default: text)")
    p.add_argument("--text-pair-column", default=None,
                   help="optional second text column: each example is a pair (premise, hypothesis), "
                        "encoded as a tokenizer pair")
    p.add_argument("--label-column", default="label", required=False,
                   help="the label column, strings or integers; classes are the sorted label names "
                        "(default: label)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=MODEL_NAME, help="minilm or smollm2 (bundled, fetched once), or the path of "
                   "a local Hugging Face model folder: an encoder (fresh classification head) or a causal LM "
                   "(scored by label words)")
    p.add_argument("--model-kind", default="auto", choices=("auto", "encoder", "causal"),
                   help="how to load a model folder (auto: from its config's architecture)")
    p.add_argument("--label-words", default="", help="causal LMs: comma-separated words scored for each class, "
                   "in the classes' sorted order (default: the label names)")
    p.add_argument("--threads", type=COUNT, default=0, help="CPU threads for torch (0: torch's default)")


def compare_cmd(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _start(args, "compare", ("matplotlib", "tqdm", "datasets"))
    import shlex

    from .compare import InputError, compare
    from .data import load_data

    cols = dict(text_column=args.text_column, label_column=args.label_column,
                text_pair_column=args.text_pair_column)
    try:
        task = load_data(args.data, test_data=args.test_data, test_size=args.test_size, shots=args.shots, **cols)
        source = load_data(args.source, **cols) if args.source else None
        strategies = None if args.strategies is None else [s for s in args.strategies.split(",") if s]
        lrs = _lrs(args.lrs)
        words = [w.strip() for w in args.label_words.split(",") if w.strip()] or None
        factory = model_factory(args.model, label_words=words, kind=args.model_kind)
    except ValueError as e:
        raise SystemExit(f"sgg-optim compare: {e}") from None
    command = "sgg-optim " + " ".join(shlex.quote(a) for a in (args.argv or sys.argv[1:]))
    try:  # compare checks the rest of its inputs before anything trains
        compare(task, factory, strategies, shots=args.shots, seeds=args.seeds, steps=args.steps, lrs=lrs,
                out=args.out, model_name=args.model, source=source, command=command, baseline=args.baseline,
                label_words=words)
    except InputError as e:
        raise SystemExit(f"sgg-optim compare: {e}") from None
    _say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def capture_cmd(args: argparse.Namespace) -> int:
    _start(args, "capture", ("tqdm", "datasets"))
    import torch
    from tqdm.auto import tqdm

    from ..methods.sampling import eval_mode
    from ..reference import capture_reference
    from .data import labelled_examples
    from .models import check_label_words
    from .tasks import Task
    from .training import RunConfig, balanced_batches

    try:
        # every labelled example is source data here: no test split to carve
        names, texts, labels = labelled_examples(args.data, text_column=args.text_column,
                                                 label_column=args.label_column,
                                                 text_pair_column=args.text_pair_column)
        task = Task(Path(args.data).stem, tuple(names), tuple(texts), tuple(labels), (), ())
        words = [w.strip() for w in args.label_words.split(",") if w.strip()] or None
        if words:
            check_label_words(words, task.label_names)
        factory = model_factory(args.model, label_words=words, kind=args.model_kind)
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the reference file's path (e.g. ref.safetensors)")
    except ValueError as e:
        raise SystemExit(f"sgg-optim capture: {e}") from None
    torch.manual_seed(args.seed)
    model, tok = factory(task)
    limit = getattr(getattr(tok, "tokenizer", tok), "model_max_length", None)  # (a causal LM's prompt wrapper)
    if isinstance(limit, int) and args.max_length > limit:
        raise SystemExit(f"sgg-optim capture: --max-length {args.max_length} is more tokens than {args.model} "
                         f"takes ({limit} positions); give at most {limit}")
    cfg = RunConfig(batch_size=args.batch_size, max_length=args.max_length)
    bar = tqdm(total=args.batches, desc="capturing", unit="batch", file=sys.stdout, dynamic_ncols=True)

    def counted():  # the bar moves once a batch's gradient is in (after the yield returns)
        for batch in balanced_batches(tok, texts, labels, cfg, args.batches, seed=args.seed):
            yield batch
            bar.update()

    with eval_mode(model):  # dropout off while capturing
        ref = capture_reference(model, counted())
    bar.close()
    from ..methods.incontext import VerbalizerLM

    if isinstance(model, VerbalizerLM):
        # named as the plain causal LM (AutoModelForCausalLM) the user trains, not as the wrapper
        from ..reference import Reference

        ref = Reference({name.removeprefix("lm."): ref[name] for name in ref.names})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref.save(out)
    n = sum(ref[name].numel() for name in ref.names)
    _say(f"reference: {out} ({len(task.label_names)} classes: {', '.join(task.label_names)}; {args.batches} "
         f"class-balanced batches of {max(1, cfg.batch_size // task.num_labels)} per class"
         + (f"; {n:,} values" if n else "") + ")\n"
         f"use it: SGG_REFERENCE={out} accelerate launch train.py  (with sgg_optim.accelerate.GuidancePlugin), "
         f"or GuidedAdamW(..., reference=Reference.load('{out}', model))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compare import DEFAULT_STRATEGIES
    from .strategies import STRATEGIES
    from .tasks import TASKS

    p = argparse.ArgumentParser(prog="sgg-optim", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="AdamW vs guided AdamW on one few-shot task, 3 seeds (a few minutes)")
    d.add_argument("--task", default=DEMO_TASK, choices=list(TASKS), help="the built-in task to fine-tune on")
    d.add_argument("--shots", type=POSITIVE, default=16, help="K examples per class")
    d.add_argument("--seeds", type=POSITIVE, default=3, help="how many seeds (each draws its own K shots)")
    d.add_argument("--steps", type=POSITIVE, default=30, help="optimizer steps per run (batch 16)")
    d.add_argument("--lr", type=_learning_rate, default=DEMO_LR, help="one learning rate for both (no search in the demo)")
    d.add_argument("--out", default="sgg_demo", help="output folder: results.jsonl, results.md, demo.png "
                   "(default: sgg_demo/)")
    d.add_argument("--fresh", action="store_true", help="ignore results of an earlier demo run")
    d.add_argument("--threads", type=COUNT, default=0, help="CPU threads for torch (0: torch's default)")
    d.set_defaults(func=demo)
    c = sub.add_parser("compare", help="AdamW, clipping and guided rows on your own data and model: "
                       "table, plot, results and a report with the setting chosen on validation")
    _data_args(c)
    c.add_argument("--test-data", default=None, help="your own test split (same columns); default: a stratified "
                   "held-out part of --data carved with a fixed seed (see --test-size)")
    c.add_argument("--test-size", type=float, default=0.2, help="without --test-data: the held-out test part, "
                   "a fraction (< 1) or a count (default 0.2)")
    _model_args(c)
    c.add_argument("--shots", type=POSITIVE, default=8, help="K training examples per class (each class also "
                   "needs K more for validation)")
    c.add_argument("--seeds", type=POSITIVE, default=3, help="how many seeds (each draws its own shots and head)")
    c.add_argument("--steps", type=POSITIVE, default=30, help="optimizer steps per run (batch 16)")
    c.add_argument("--lrs", default="5e-5,2e-4", help="comma-separated learning rates; every strategy runs at "
                   "each, the report picks on validation (default 5e-5,2e-4)")
    c.add_argument("--strategies", default=None,
                   help=f"comma-separated rows, '+' composes; from {', '.join(STRATEGIES)}. *-kshot rows need "
                        f"no source; *-source rows need --source (default: {','.join(DEFAULT_STRATEGIES)}, "
                        "and cone-source with --source)")
    c.add_argument("--source", default="", help="source task of *-source rows: a built-in task or a file with "
                   "the same columns and label count")
    c.add_argument("--baseline", default="adamw", help="the row every paired difference is taken against")
    c.add_argument("--out", default="sgg_compare", help="output folder: results.jsonl (resumable), report.md, "
                   "compare.png (default: sgg_compare/)")
    c.set_defaults(func=compare_cmd)
    cap = sub.add_parser("capture", help="capture a reference gradient from your data and model into a file "
                         "(for GuidedAdamW, the Trainer callback or SGG_REFERENCE with Accelerate)")
    _data_args(cap)
    _model_args(cap)
    cap.add_argument("--out", required=True, help="the reference file to write (.safetensors)")
    cap.add_argument("--batches", type=POSITIVE, default=8, help="class-balanced batches averaged (default 8)")
    cap.add_argument("--batch-size", type=POSITIVE, default=16, help="examples per batch, split evenly over classes")
    cap.add_argument("--max-length", type=POSITIVE, default=64, help="tokens per text (longer texts are cut)")
    cap.add_argument("--seed", type=COUNT, default=0, help="seed of the fresh head and the batch draw")
    cap.set_defaults(func=capture_cmd)
    b = sub.add_parser("bench", help="the few-shot grid on the built-in tasks, resumable")
    b.add_argument("--tasks", default="vader-tweets,vader-amazon,vader-nyt,rt-polarity,rt-subjectivity,bbc-topic",
                   help=f"comma-separated, from {', '.join(TASKS)}")
    b.add_argument("--strategies", default="adamw,adamw-clip,project-ema,cone-ema,cone-source,blend-ema",
                   help=f"comma-separated, '+' composes; from {', '.join(STRATEGIES)}")
    b.add_argument("--shots", default="8,16,32", help="comma-separated K (training examples per class)")
    b.add_argument("--seeds", type=POSITIVE, default=5, help="how many seeds")
    b.add_argument("--first-seed", type=COUNT, default=0, help="seeds run from here (split a grid across processes)")
    b.add_argument("--steps", type=POSITIVE, default=30, help="optimizer steps per run (batch 16)")
    b.add_argument("--lrs", default="", help="override every strategy's lr grid (comma-separated); each lr is "
                   "its own run (protocol v2), the lr is chosen on validation in the report")
    b.add_argument("--model", default=MODEL_NAME, choices=MODELS,
                   help="minilm: encoder + fresh head; smollm2: causal LM scored by label words")
    b.add_argument("--sources", default=SOURCES, help="source tasks of the *-sources rows (the target is left out)")
    b.add_argument("--retention", default="", help=f"tasks to measure forgetting on, with a `pretrained` row "
                   f"for the before figure: smollm2, in-context accuracy after tuning (e.g. {RETENTION}); "
                   "an encoder, accuracy through a head fitted on the untuned encoder and frozen")
    b.add_argument("--retention-n", type=POSITIVE, default=100, help="eval texts per retention task")
    b.add_argument("--retention-k", type=COUNT, default=4, help="demonstrations per retention prompt")
    b.add_argument("--results", default="benchmarks/results/fewshot_bench.jsonl",
                   help="the JSONL file every finished run is appended to; a rerun skips the runs in it")
    b.add_argument("--plot", default="", help="also write a PNG of the grid's rows")
    b.add_argument("--report", action="store_true", help="run nothing: the tables of the runs already done")
    b.add_argument("--baseline", default="adamw", help="the row every paired difference is taken against")
    b.add_argument("--threads", type=COUNT, default=0, help="CPU threads for torch (0: torch's default)")
    b.set_defaults(func=bench)
    f = sub.add_parser("fetch", help="download and cache the models and data (then work offline)")
    f.add_argument("assets", nargs="*", metavar="ASSET", help=f"any of {', '.join(assets.ASSETS)} (default: all)")
    f.set_defaults(func=fetch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # peft imports bitsandbytes, whose CPU backend logs a warning about an optional
    # kernel package at import; it says nothing about this command's work.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    try:
        return args.func(args)
    except assets.AssetError as e:
        print(f"sgg-optim: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
