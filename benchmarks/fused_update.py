#!/usr/bin/env python
"""The fused guided AdamW update (``sgg_optim.fused``) against the eager guided step.

``benchmarks/step_overhead.py``'s tensor mix (19.56M fp32 parameters in 194 tensors),
its method (one process, shared parameters, fixed gradients reset outside the timed
region, warm-up, then shuffled round-robin rounds; process CPU time is the primary
clock with one thread) and its candidates' set-up, restricted to the rows this
decision needs: torch's fused AdamW; the guided step over it, eager (the fused update
switched off) and with the compiled fused update; active and inside regimes; frozen
and EMA fp32 references; host coefficients (``nonfinite="skip"``, the default) and
device coefficients (``"propagate"``). Also the first call (compilation) and the
first step after it.

Usage::

    python benchmarks/fused_update.py --threads 1 [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead as so  # noqa: E402

import torch  # noqa: E402

from sgg_optim import GuidedOptimizer, Reference  # noqa: E402


def main() -> None:
    from sgg_optim import fused

    fused.enabled = True  # the opt-in fused update: its rows measure it; every other guided row stays eager
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = so.machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch threads {info['threads']}, torch {info['torch']}, "
          f"load {info['load']}, {info['sgg_optim']}", flush=True)
    torch.manual_seed(0)
    model = so.Params(so.layer_shapes(*((128, 10) if args.quick else (368, 12))))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    g0 = [torch.randn_like(p) * 1e-3 for p in params]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    grads = [p.grad for p in params]
    refs = {"active": [torch.randn_like(p) * 1e-3 for p in params],
            "inside": [g + 0.01 * torch.randn_like(g) * 1e-3 for g in g0]}

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)

    cands = [so.Candidate("AdamW fused", adamw(), kind="fused"),
             so.Candidate("AdamW foreach", torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True),
                          kind="foreach")]
    for kind in ("frozen", "ema"):
        for regime in ("active", "inside"):
            for nonfinite in ("skip", "propagate"):
                for path in ("eager", "fused"):
                    reference = Reference(dict(zip(names, refs[regime]))).bind(model) if kind == "frozen" else "ema"
                    opt = GuidedOptimizer(adamw(), reference=reference, direction="cone", magnitude="adaptive",
                                          nonfinite=nonfinite)
                    if path == "eager":
                        opt._fused_update = lambda *a, **k: None  # type: ignore[method-assign]
                    c = so.Candidate(f"guided {kind} {regime} {nonfinite} {path}", opt, storage="fp32",
                                     scope="global", regime=regime, kind=kind,
                                     ema_init=refs[regime] if kind == "ema" else None)
                    c.path = path  # type: ignore[attr-defined]
                    cands.append(c)
    # first calls: compilation (one graph per reference kind), then the next step
    first = {}
    for c in cands:
        if getattr(c, "path", "") == "fused":
            times = []
            for _ in range(2 + 10):  # step 1 creates the AdamW state (eager), then warm-up past warmup_steps
                c.prepare(grads, g0)
                t0 = time.perf_counter()
                c.opt.step()
                times.append(time.perf_counter() - t0)
            first[c.name] = (max(times), sorted(times)[len(times) // 2])
            print(f"{c.name}: slowest of the first 12 steps {max(times):.1f} s (compilation), median "
                  f"{1e3 * first[c.name][1]:.1f} ms", flush=True)
    so.run_rounds(cands, grads, g0, args.warmup, args.rounds)
    primary = "cpu" if torch.get_num_threads() == 1 else "wall"
    fused = cands[0]

    def med(c, which):
        return statistics.median(c.cpu if which == "cpu" else c.times)

    print(f"\nload after: {Path('/proc/loadavg').read_text().split()[:3]}; primary clock: {primary}")
    print("| candidate | CPU ms median (p25-p75) | wall ms median | **x fused AdamW** (cpu) | x fused (wall) "
          "| x eager twin (cpu) | paired x eager twin (cpu) | cos | projected | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_name = {c.name: c for c in cands}
    for c in cands:
        twin = by_name.get(c.name.replace(" fused", " eager")) if c.name.endswith(" fused") else None
        st = c.opt.stats if isinstance(c.opt, GuidedOptimizer) else {}
        cpu = c.cpu
        paired = statistics.median([a / b for a, b in zip(cpu, twin.cpu)]) if twin else None
        print(f"| {c.name} | {1e3 * med(c, 'cpu'):.1f} ({1e3 * so.quantile(cpu, .25):.1f}-"
              f"{1e3 * so.quantile(cpu, .75):.1f}) | {1e3 * med(c, 'wall'):.1f} | "
              f"**{med(c, 'cpu') / med(fused, 'cpu'):.2f}** | {med(c, 'wall') / med(fused, 'wall'):.2f} | "
              f"{'' if twin is None else format(med(c, 'cpu') / med(twin, 'cpu'), '.2f')} | "
              f"{'' if paired is None else format(paired, '.2f')} | "
              f"{'' if 'cos' not in st else format(st['cos'], '.3f')} | "
              f"{'' if 'projected' not in st else format(st['projected'], '.2f')} | "
              f"{format(first[c.name][0], '.1f') if c.name in first else ''} |")


if __name__ == "__main__":
    main()
