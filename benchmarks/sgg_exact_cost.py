#!/usr/bin/env python
"""Cost of one training step with SGG's exact objective (double backward), against a plain
AdamW step and a first-order ``GuidedAdamW`` step.

Candidates, each on its own copy of the model (same weights, same fixed batch):

* ``adamw``: ``model(**batch).loss.backward(); AdamW.step()``.
* ``guided cone-ema``: the same with ``GuidedAdamW(direction="cone", magnitude="adaptive")``
  and its EMA reference (the library's first-order path).
* ``sgg-exact all``: :class:`~sgg_optim.methods.sgg_exact.SGGObjective` over every
  parameter (EMA reference, adaptive tau), its total loss backward, then ``AdamW.step()``.
* ``sgg-exact top``: the same, the double backward restricted to the top encoder layer,
  the pooler and the classifier.

Models: a tiny-but-not-trivial BERT built from a config, and the real all-MiniLM-L6-v2 from
``~/.cache/sgg-optim/all-minilm-l6-v2`` with a fresh 2-way head; a batch of 16 x 64 random
token ids. Warm-up steps bring every EMA / warmup past its start (``warmup_steps=1``), then
``--rounds`` rounds run every candidate once, order shuffled per round (seeded). Each step is
timed with process CPU time (the machine is shared); the result is the ratio of medians to
``adamw`` and the median of per-round ratios.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/sgg_exact_cost.py [--threads 1] [--rounds 5] \\
        [--out benchmarks/results/sgg_exact_cost.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sgg_optim import GuidedAdamW  # noqa: E402
from sgg_optim.methods.sgg_exact import (DEFAULT_LAMBDA_DIR, DEFAULT_LAMBDA_MAG, DEFAULT_TAU_FACTOR,  # noqa: E402
                                         SGGObjective)

warnings.filterwarnings("ignore")
MINILM = Path(os.path.expanduser("~/.cache/sgg-optim/all-minilm-l6-v2"))
LR = 5e-5


class Candidate:
    """One way of taking a training step, with its own model copy and optimizer."""

    def __init__(self, name: str, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
                 objective: Optional[Callable[[nn.Module], Any]] = None, compiled: bool = False) -> None:
        self.name, self.model = name, model
        self.opt = make_opt(model)
        self.loss_fn = objective(model) if objective is not None else None
        # PyTorch's "compiling the optimizer" recipe: the step compiled, forward and backward eager
        self.opt_step = torch.compile(self.opt.step) if compiled else self.opt.step
        self.cpu: list[float] = []
        self.first_s: Optional[float] = None  # the first call (compilation included), wall seconds

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        t0, w0 = time.process_time(), time.perf_counter()
        loss = self.loss_fn(self.model, batch) if self.loss_fn is not None else self.model(**batch).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_step()
        if self.first_s is None:
            self.first_s = time.perf_counter() - w0
        return time.process_time() - t0

    def figures(self) -> str:
        stats = getattr(self.loss_fn, "stats", None) or getattr(self.opt, "stats", None) or {}
        keys = ("cos", "grad_norm", "dir_penalty", "mag_penalty", "tau")
        return ", ".join(f"{k} {float(stats[k]):.3g}" for k in keys if k in stats)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, num_labels=2)
    return BertForSequenceClassification(cfg)


def minilm() -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the fresh head's "newly initialized" report
    return AutoModelForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)


def candidates(base: nn.Module, top_layer: int, compiled: bool = False) -> list[Candidate]:
    top = [f"encoder.layer.{top_layer}.", "pooler", "classifier"]

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01)

    def guided(m: nn.Module) -> torch.optim.Optimizer:
        return GuidedAdamW(list(m.named_parameters()), lr=LR, weight_decay=0.01, direction="cone",
                           magnitude="adaptive", warmup_steps=1)

    def sgg(params: Any) -> Callable[[nn.Module], Any]:
        return lambda m: SGGObjective(m, params=params, warmup_steps=1)

    def adamw_fused(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01, fused=True)

    def guided_fused(m: nn.Module) -> torch.optim.Optimizer:
        return GuidedAdamW(list(m.named_parameters()), lr=LR, weight_decay=0.01, direction="cone",
                           magnitude="adaptive", warmup_steps=1, fused=True)

    def guided_compilable(m: nn.Module) -> torch.optim.Optimizer:  # no host read: nothing to break the graph
        return GuidedAdamW(list(m.named_parameters()), lr=LR, weight_decay=0.01, direction="cone",
                           magnitude="adaptive", warmup_steps=1, foreach=True, nonfinite="propagate")

    out = [Candidate("adamw", copy.deepcopy(base), adamw),
           Candidate("guided cone-ema", copy.deepcopy(base), guided),
           Candidate("sgg-exact all", copy.deepcopy(base), adamw, sgg(None)),
           Candidate("sgg-exact top", copy.deepcopy(base), adamw, sgg(top))]
    if compiled:
        out += [Candidate("adamw fused", copy.deepcopy(base), adamw_fused),
                Candidate("guided cone-ema fused", copy.deepcopy(base), guided_fused),
                Candidate("adamw compiled", copy.deepcopy(base), adamw, compiled=True),
                Candidate("guided cone-ema compiled", copy.deepcopy(base), guided_compilable, compiled=True)]
    for c in out:
        c.model.train()
    return out


def measure(name: str, base: nn.Module, top_layer: int, vocab: int, rounds: int, warmup: int,
            seed: int, compiled: bool = False) -> tuple[list[Candidate], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(1000 if vocab > 5000 else 1, vocab, (16, 64), generator=g),
             "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,), generator=g)}
    cands = candidates(base, top_layer, compiled)
    for c in cands:
        for _ in range(warmup):
            c.step(batch)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for _ in range(rounds):
        order = cands[:]
        rng.shuffle(order)
        for c in order:
            c.cpu.append(c.step(batch))
    info = {"model": name, "params": sum(p.numel() for p in base.parameters()),
            "top_params": sum(p.numel() for p in cands[3].loss_fn.params), "wall_s": time.perf_counter() - t0}
    return cands, info


def table(cands: list[Candidate], info: dict[str, Any]) -> list[str]:
    base = cands[0]
    med0 = statistics.median(base.cpu)
    lines = [f"### {info['model']} ({info['params']:,} parameters; `sgg-exact top` differentiates "
             f"{info['top_params']:,} of them twice)", "",
             "| candidate | CPU ms median (p25-p75) | **x adamw** | paired x adamw (median of rounds) "
             "| first step s (compile) | figures, last step |",
             "|---|---|---|---|---|---|"]
    for c in cands:
        q = statistics.quantiles(c.cpu, n=4) if len(c.cpu) > 1 else [c.cpu[0]] * 3
        med = statistics.median(c.cpu)
        paired = statistics.median(a / b for a, b in zip(c.cpu, base.cpu))
        lines.append(f"| {c.name} | {1e3 * med:.0f} ({1e3 * q[0]:.0f}-{1e3 * q[2]:.0f}) | **{med / med0:.2f}** | "
                     f"{paired:.2f} | {c.first_s:.1f} | {c.figures()} |")
    return lines


def reading(cands: list[Candidate], info: dict[str, Any]) -> str:
    med = {c.name: statistics.median(c.cpu) for c in cands}
    r = {k: v / med["adamw"] for k, v in med.items()}
    return (f"- {info['model'].split(' (')[0]}: an sgg-exact step costs {r['sgg-exact all']:.2f}x a plain AdamW "
            f"step over all parameters, {r['sgg-exact top']:.2f}x restricted to the top layer + head; "
            f"the first-order GuidedAdamW (cone, EMA) {r['guided cone-ema']:.2f}x.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="add fused and torch.compile(opt.step) rows (AdamW, guided; compiling takes minutes on CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()
    torch.manual_seed(args.seed)
    runs = [measure("tiny BERT from config (hidden 128, 2 layers, 4 heads, vocab 2000)", tiny_bert(), 1, 2000,
                    args.rounds, args.warmup, args.seed, args.compiled)]
    if not args.skip_minilm:
        runs.append(measure("all-MiniLM-L6-v2 + fresh 2-way head", minilm(), 5, 30522, args.rounds, args.warmup,
                            args.seed, args.compiled))
    cmd = "HF_HUB_OFFLINE=1 python benchmarks/sgg_exact_cost.py " + " ".join(sys.argv[1:])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    lines = [
        "# Cost of SGG's exact objective (double backward) per training step", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{cmd.strip()}`",
        f"- machine: {cpu}, {os.cpu_count()} vCPUs, shared with other jobs; torch threads "
        f"{torch.get_num_threads()}; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after",
        f"- software: torch {torch.__version__}, Python {platform.python_version()}",
        f"- workload: one fixed batch of 16 x 64 random token ids, 2 labels, train mode (dropout on); "
        f"AdamW lr {LR}, weight_decay 0.01; {args.warmup} untimed warm-up steps per candidate, then "
        f"{args.rounds} rounds, every candidate once per round in a shuffled order; "
        f"step = forward + backward (+ double backward) + optimizer step, timed with `time.process_time` "
        f"(process CPU time: leaves out time the OS gave the cores to other jobs)",
        "- candidates: `adamw` plain step; `guided cone-ema` GuidedAdamW(direction=\"cone\", "
        "magnitude=\"adaptive\", EMA reference, warmup_steps=1); `sgg-exact all` SGGObjective over every "
        f"parameter (defaults: lambda_dir {DEFAULT_LAMBDA_DIR}, lambda_mag {DEFAULT_LAMBDA_MAG}, tau = "
        f"{DEFAULT_TAU_FACTOR} x running grad norm, EMA reference, "
        "warmup_steps=1) then AdamW; `sgg-exact top` the same restricted to the top encoder layer, pooler "
        "and classifier"
        + ("; with `--compiled`: `adamw fused` / `guided cone-ema fused` (`fused=True`), `adamw compiled` / "
           "`guided cone-ema compiled` (`torch.compile(opt.step)`, the guided one with `foreach=True, "
           "nonfinite=\"propagate\"`: no host read); the first step's wall time includes compilation"
           if args.compiled else ""),
        "",
    ]
    for cands, info in runs:
        lines += table(cands, info) + ["", f"({info['wall_s']:.0f} s wall for the timed rounds)", ""]
    lines += ["## Reading", ""] + [reading(cands, info) for cands, info in runs] + [
        "", "The exact objective pays for a second backward through the part of the graph that the chosen "
        "parameters' gradients depend on; restricting it to the top layer and head leaves that second pass "
        "short (most of MiniLM's parameters are the embeddings and lower layers, differentiated once). "
        "The first-order `GuidedAdamW` edits gradients after one backward and stays near a plain step.", ""]
    lines += [f"Total run time {time.perf_counter() - start:.0f} s. Absolute times are context only (shared "
              "machine); the ratios are the result."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
