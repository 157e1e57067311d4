#!/usr/bin/env python
"""The statistics pass against the fused AdamW step, at one and two threads.

docs/design.md left one question open: does a second thread shorten the statistics
pass (``<g, r>`` and ``|g|^2`` per tensor) as much as it shortens the fused AdamW step?
If it did more, the guided step's ratio to AdamW would fall on multi-core CPUs. This
script times, on ``benchmarks/step_overhead.py``'s tensor mix (19.56M fp32 parameters in
194 tensors), in one process per thread count:

* ``torch._fused_adamw_`` over the tensors (the denominator);
* :func:`sgg_optim.functional.tensor_stats` with a frozen fp32 reference whose ``|r|^2``
  is known (what a guided step runs: ``dot(g, r)`` then ``dot(g, g)`` per tensor);
* ``torch._foreach_norm`` of the gradients alone (one read of ``g``);
* the same two sums per tensor as one ``torch.compile``'d sweep (compile time printed;
  with ``--compile``).

Medians of ``--rounds`` calls after one warm-up, candidates interleaved per round.

Usage::

    python benchmarks/stats_pass.py --threads 1,2 [--rounds 25] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(threads: int, rounds: int, compile_: bool) -> None:
    import torch

    from benchmarks.step_overhead import layer_shapes
    from sgg_optim.functional import tensor_stats
    from sgg_optim.storage import make_store

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [s for _, s in layer_shapes(368, 12)]
    gs = [torch.randn(s) for s in shapes]
    refs = [[make_store(torch.randn(s), "fp32")] for s in shapes]
    sq = torch.stack([r[0].sqnorm() for r in refs]).view(-1, 1)
    ps = [torch.randn(s) for s in shapes]
    ms, vs = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    steps = [torch.tensor(1.0) for _ in shapes]

    def adamw():
        torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=1e-5, beta1=0.9, beta2=0.999, weight_decay=0.01,
                            eps=1e-8, amsgrad=False, maximize=False)

    cands = {
        "fused AdamW step": adamw,
        "tensor_stats (dot(g, r), dot(g, g))": lambda: tensor_stats(gs, refs, sq),
        "torch._foreach_norm(g) alone": lambda: torch._foreach_norm(gs),
    }
    if compile_:
        rts = [r[0].tensor.view_as(g) for g, r in zip(gs, refs)]

        def sweep(gs_, rs_):
            return torch.stack([torch.stack([(g * g).sum(), (g * r).sum()]) for g, r in zip(gs_, rs_)])

        compiled = torch.compile(sweep, dynamic=False)
        t0 = time.perf_counter()
        got = compiled(gs, rts)
        print(f"  threads {threads}: compile of the one-sweep statistics {time.perf_counter() - t0:.0f} s")
        want = tensor_stats(gs, refs, sq)
        scale = (want[:, 0] * want[:, 2]).sqrt()  # |g| |r|: <g, r> of random tensors is near 0
        err = ((got.double() - want[:, :2]).abs() / torch.stack([want[:, 0], scale], 1)).max()
        assert err < 1e-4, f"compiled sweep disagrees with tensor_stats (relative error {err:.1e})"
        cands["compiled one sweep: sum(g*g), sum(g*r)"] = lambda: compiled(gs, rts)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():
        f()
    for _ in range(rounds):
        for name, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fused AdamW step"])
    n = sum(g.numel() for g in gs)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {threads} | {name} | {med * 1e3:.2f} | {med / base:.2f} |")
    print(f"  ({n:,} parameters in {len(gs)} tensors)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="add the torch.compile'd one-sweep row")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.rounds, args.compile)
        return
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| threads | candidate | ms (median) | x fused AdamW |\n|---|---|---|---|")
    for t in (int(x) for x in args.threads.split(",")):
        cmd = [sys.executable, __file__, "--child", str(t), "--rounds", str(args.rounds)]
        subprocess.run(cmd + (["--compile"] if args.compile else []), check=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
