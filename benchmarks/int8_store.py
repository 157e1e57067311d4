"""int8 reference storage: bitsandbytes' dynamic code book against a linear absmax grid.

Side by side in one run, for each code (``sgg_optim.storage.INT8_CODES``):

* cosine error: ``|cos(g, r_int8) - cos(g, r_fp32)|`` through the library's statistics
  pass, on the cases of ``benchmarks/memory.py --section cosine`` (``memory.cosine_cases``);
* bytes per parameter of the store;
* time per step of a guided AdamW step with an int8 EMA reference and with a frozen
  int8 reference, as a ratio to the fused AdamW step on the same parameters (20M fp32
  parameters in 194 tensors, as ``benchmarks/step_overhead.py``), medians of
  interleaved rounds.

Usage::

    python benchmarks/int8_store.py [--rounds 15] [--threads 1] [--out benchmarks/results/int8_store.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sgg_optim import GuidedAdamW, Reference  # noqa: E402
from sgg_optim import storage  # noqa: E402
from sgg_optim.functional import block_stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import cosine_cases  # noqa: E402  (the cases of memory.py --section cosine)


def cos_with(grads, refs, make) -> float:
    stores = [[make(r)] for r in refs]
    st = block_stats(grads, stores, torch.zeros(len(grads), dtype=torch.long), 1)[0]
    return (st[1] / (st[0] * st[2]).sqrt()).item()


def shapes_20m() -> list[tuple[int, ...]]:
    """194 tensors, about 19.6M parameters (a 12-layer 768-wide encoder's shapes, fewer layers)."""
    out: list[tuple[int, ...]] = [(30522 // 4, 768), (512, 768)]
    for _ in range(16):
        out += [(768, 768), (768,), (768, 768), (768,), (768, 768), (768,), (768, 768), (768,),
                (768,), (768,), (768,), (768,)]
    return out[:194]


def timed_steps(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    shapes = shapes_20m()
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    grads0 = [torch.randn(s, generator=g) for s in shapes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    frozen = Reference({n: torch.randn(p.shape, generator=g) for n, p in named})
    rows: dict[str, torch.optim.Optimizer] = {"fused AdamW": torch.optim.AdamW(params, lr=1e-6, fused=True)}
    for code, cls in storage.INT8_CODES.items():
        storage.INT8 = cls
        rows[f"{code}: EMA reference"] = GuidedAdamW(named, lr=1e-6, warmup_steps=0, max_angle=1e-3 + 1,
                                                     reference_dtype="int8")
        rows[f"{code}: frozen reference"] = GuidedAdamW(named, lr=1e-6, max_angle=1e-3 + 1, reference=frozen,
                                                        reference_dtype="int8")
    times: dict[str, list[float]] = {k: [] for k in rows}
    order = list(rows)
    rng = torch.Generator().manual_seed(1)
    for r in range(args.warmup + args.rounds):
        for i in torch.randperm(len(order), generator=rng).tolist():
            name = order[i]
            for p, g0 in zip(params, grads0):
                p.grad = g0.clone()
            t = time.perf_counter()
            rows[name].step()
            dt = time.perf_counter() - t
            if r >= args.warmup:
                times[name].append(dt)
    base = statistics.median(times["fused AdamW"])
    return {k: {"ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / base} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cos-seeds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines = ["# int8 reference storage: dynamic code book vs linear grid\n",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             f"`python benchmarks/int8_store.py --rounds {args.rounds} --threads {args.threads}`; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n"]
    cases = [case for items in cosine_cases(args.cos_seeds).values() for case in items]
    lines += ["## Cosine error against fp32, and bytes per parameter\n",
              "| code | cases | max \\|Δcos\\| | p99 | median | bytes/param (20M params) |", "|---|---|---|---|---|---|"]
    numel = sum(math.prod(s) for s in shapes_20m())
    for code, cls in storage.INT8_CODES.items():
        errs = sorted(abs(cos_with(g, r, cls.quantize) - cos_with(g, r, lambda x: storage.make_store(x, "fp32")))
                      for g, r in cases)
        nbytes = sum(cls.zeros(torch.Size(s), torch.device("cpu")).nbytes() for s in shapes_20m())
        lines.append(f"| {code} | {len(errs)} | {errs[-1]:.2e} | {errs[int(0.99 * (len(errs) - 1))]:.2e} | "
                     f"{statistics.median(errs):.2e} | {nbytes / numel:.4f} |")
        print(lines[-1], flush=True)
    res = timed_steps(args)
    lines += ["", f"## Optimizer step, 19.6M fp32 parameters in 194 tensors, {args.threads} thread(s), "
              f"median of {args.rounds} interleaved rounds\n",
              "| step | ms | x fused AdamW |", "|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['ratio']:.2f} |")
        print(lines[-1], flush=True)
    load = os.getloadavg()
    lines.append(f"\nLoad average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
