#!/usr/bin/env python
"""Where the time of one few-shot cell goes: wall, process CPU and page faults per phase.

One MiniLM cell of ``sgg-optim bench`` (default: vader-amazon, adamw, K=16, seed 0,
lr 5e-5, 30 steps of 16 x 64 tokens, 500 eval texts), run in-process after a warm-up
cell, with these phases timed by wrapping the functions that do them: model build
(``from_pretrained`` + fresh head), reference capture, forward+loss, backward, optimizer
step, the consecutive-update cosine, validation + eval prediction. ``--torch-profile``
adds ``torch.profiler``'s table of the operators (self CPU time).

The machine is usually shared: process CPU time (user + sys) is the steadier figure,
and the load average is printed with every run. ``--default-malloc`` leaves glibc's
allocator as it is (see ``sgg_optim.fewshot.cli.keep_freed_memory``) to show what that
costs: system time and page faults.

Usage::

    python benchmarks/cell_profile.py [--threads 1] [--task vader-amazon] [--strategy adamw] [--lr 5e-5]
                                      [--default-malloc] [--torch-profile]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from contextlib import contextmanager
from typing import Any, Callable


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt


class Phases:
    """Accumulated wall, CPU and minor page faults per named phase (nested phases overlap)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    @contextmanager
    def phase(self, name: str):
        w0, c0, f0 = _usage()
        try:
            yield
        finally:
            w1, c1, f1 = _usage()
            t = self.totals.setdefault(name, [0.0, 0.0, 0, 0])
            t[0] += w1 - w0
            t[1] += c1 - c0
            t[2] += f1 - f0
            t[3] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", default="vader-amazon")
    ap.add_argument("--strategy", default="adamw")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    ap.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's operator table")
    args = ap.parse_args()

    import torch

    from sgg_optim.fewshot import cli, grid, protocol, training
    from sgg_optim.fewshot.strategies import get_strategy
    from sgg_optim.fewshot.tasks import load_task

    torch.set_num_threads(args.threads)
    cli._quiet_libraries()
    tuned = False if args.default_malloc else cli.keep_freed_memory()
    factory = grid.model_factory("minilm")
    task, strategy = load_task(args.task), get_strategy(args.strategy)
    source = load_task(protocol.SOURCE_TASK) if strategy.reference in ("source", "icl") else None
    cfg = training.RunConfig(steps=30)
    # warm-up: imports, first model load, the eval split's tokenisation (cached per task)
    protocol.run_cell(task, strategy, 16, args.seed, factory, training.RunConfig(steps=2), lr=args.lr,
                      source=source)

    ph = Phases()
    real_build = strategy.build_optimizer

    def build_optimizer(model: Any, lr: float, reference: Any = None) -> Any:
        opt = real_build(model, lr, reference)
        opt.step = ph.wrap("optimizer step", opt.step)  # type: ignore[method-assign]
        return opt

    strategy = type(strategy)(**{**strategy.__dict__})
    object.__setattr__(strategy, "build_optimizer", build_optimizer)
    patches = [(protocol, "_fresh_model", "model build"), (protocol, "source_reference", "reference capture"),
               (protocol, "predict", "predict (val + eval)"), (training.UpdateCosine, "step", "update cosine")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, label in patches:
        setattr(obj, name, ph.wrap(label, getattr(obj, name)))
    real_backward = torch.Tensor.backward
    torch.Tensor.backward = ph.wrap("backward", real_backward)  # type: ignore[method-assign]
    try:
        load0 = os.getloadavg()
        w0, c0, f0 = _usage()
        prof = None
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        row = protocol.run_cell(task, strategy, 16, args.seed, factory, cfg, lr=args.lr, source=source)
        if prof is not None:
            prof.__exit__(None, None, None)
        w1, c1, f1 = _usage()
    finally:
        torch.Tensor.backward = real_backward  # type: ignore[method-assign]
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    print(f"{args.task} {args.strategy} lr {args.lr:g} seed {args.seed}, K=16, 30 steps, {args.threads} thread(s), "
          f"allocator {'tuned' if tuned else 'default'}; load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"cell: wall {w1 - w0:.1f} s, CPU {c1 - c0:.1f} s, minor page faults {f1 - f0}; "
          f"eval accuracy {100 * row['accuracy']:.1f}")
    print(f"{'phase':<22}{'calls':>6}{'wall s':>9}{'CPU s':>8}{'faults':>10}")
    for name, (w, c, f, n) in ph.totals.items():
        print(f"{name:<22}{n:>6}{w:>9.2f}{c:>8.2f}{f:>10}")
    timed = sum(ph.totals.get(k, [0, 0])[1] for k in ("model build", "predict (val + eval)", "backward",
                                                        "optimizer step", "update cosine"))
    print(f"rest (forward passes and loss, gradient norm, batches; the reference capture's forward passes): "
          f"about {c1 - c0 - timed:.1f} CPU s. The capture's backward passes are counted in its line and in "
          "backward's.")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
