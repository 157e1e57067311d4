"""int8 reference storage: bitsandbytes' dynamic code book against a linear absmax grid.

Side by side in one run, for each code (``sgg_optim.storage.INT8_CODES``):

* cosine error: ``|cos(g, r_int8) - cos(g, r_fp32)|`` through the library's statistics
  pass, on the cases of ``benchmarks/memory.py --section cosine`` (``memory.cosine_cases``);
* bytes per parameter of the store;
* time per step of a guided AdamW step with an int8 EMA reference and with a frozen
  int8 reference, as a ratio to the fused AdamW step on the same parameters, medians of
  interleaved rounds (``--section steps``);
* time of each store pass over all tensors, beside an fp32 reference
  (``--section passes``): ``dot``; ``dot`` + ``sqnorm`` (an EMA reference's statistics);
  ``add_to_``; ``add_to_`` + ``lerp_`` (an EMA reference's apply pass).

Tensor mixes (``--mix``): ``step_overhead`` (default), the 19.56M parameters in 194
tensors of ``benchmarks/step_overhead.py`` (every tensor under one 2^20 chunk);
``encoder``, 44.1M parameters in 194 tensors, one of them a 5.9M embedding (several
chunks). The run of 2026-12-02 05:08 UTC used ``encoder`` and called it 19.6M.

``--baseline REV`` adds ``linear@REV``: ``LinearInt8Store`` as ``sgg_optim/storage.py``
was at git revision REV, timed interleaved with the current one in the same process.

Usage::

    python benchmarks/int8_store.py [--rounds 15] [--threads 1] [--section cos,steps,passes]
        [--mix step_overhead] [--codes dynamic,linear] [--baseline HEAD] [--out benchmarks/results/int8_store.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sgg_optim import GuidedAdamW, Reference  # noqa: E402
from sgg_optim import storage  # noqa: E402
from sgg_optim.functional import block_stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import cosine_cases  # noqa: E402  (the cases of memory.py --section cosine)
from step_overhead import layer_shapes  # noqa: E402


def cos_with(grads, refs, make) -> float:
    stores = [[make(r)] for r in refs]
    st = block_stats(grads, stores, torch.zeros(len(grads), dtype=torch.long), 1)[0]
    return (st[1] / (st[0] * st[2]).sqrt()).item()


def shapes_encoder() -> list[tuple[int, ...]]:
    """194 tensors, 44.1M parameters: a 768-wide encoder's shapes (embedding 7630 x 768)."""
    out: list[tuple[int, ...]] = [(30522 // 4, 768), (512, 768)]
    for _ in range(16):
        out += [(768, 768), (768,), (768, 768), (768,), (768, 768), (768,), (768, 768), (768,),
                (768,), (768,), (768,), (768,)]
    return out[:194]


def mix_shapes(mix: str) -> list[tuple[int, ...]]:
    return shapes_encoder() if mix == "encoder" else [s for _, s in layer_shapes(368, 12)]


def codes(args: argparse.Namespace) -> dict[str, storage.Int8Kind]:
    """The int8 codes to compare: ``--codes`` of ``storage.INT8_CODES``, and the
    baseline revision's linear store (loaded from git, not installed)."""
    out = {c: storage.INT8_CODES[c] for c in args.codes.split(",")}
    if args.baseline:
        root = Path(__file__).resolve().parent.parent
        src = subprocess.run(["git", "show", f"{args.baseline}:sgg_optim/storage.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        old = types.ModuleType(f"storage_{args.baseline}")
        exec(compile(src, f"{args.baseline}:sgg_optim/storage.py", "exec"), old.__dict__)
        out[f"linear@{args.baseline}"] = old.LinearInt8Store
    return out


def timed_steps(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    shapes = mix_shapes(args.mix)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    grads0 = [torch.randn(s, generator=g) for s in shapes]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    frozen = Reference({n: torch.randn(p.shape, generator=g) for n, p in named})
    inside = Reference({n: g0 + 0.01 * torch.randn(p.shape, generator=g) for (n, p), g0 in zip(named, grads0)})
    rows: dict[str, torch.optim.Optimizer] = {"fused AdamW": torch.optim.AdamW(params, lr=1e-6, fused=True)}
    default = storage.INT8
    for code, cls in [("fp32", None), *codes(args).items()]:  # fp32 rows for scale
        dtype = "fp32" if cls is None else "int8"
        storage.INT8 = cls or default
        # fused=True, as the fused AdamW row (the run of 2026-12-02 05:08 left GuidedAdamW's default:
        # torch's per-tensor for-loop AdamW on CPU, which alone costs several fused steps)
        kw = {"lr": 1e-6, "reference_dtype": dtype, "fused": True}
        rows[f"{code}: EMA reference"] = GuidedAdamW(named, warmup_steps=0, max_angle=1e-3 + 1, **kw)
        rows[f"{code}: frozen reference"] = GuidedAdamW(named, max_angle=1e-3 + 1, reference=frozen, **kw)
        # reference = gradient + 1% noise, inside the cone: the statistics pass alone
        rows[f"{code}: frozen reference, inside"] = GuidedAdamW(named, max_angle=30, reference=inside, **kw)
        # An EMA reference is made at its first step, of the kind storage.INT8 is then: step
        # now (the run of 2026-12-02 05:08 did not, so every EMA row there used the last code).
        for p, g0 in zip(params, grads0):
            p.grad = g0.clone()
        rows[f"{code}: EMA reference"].step()
        assert cls is None or all(type(s) is cls for s in rows[f"{code}: EMA reference"]._guidance.ema.values())
    storage.INT8 = default
    times: dict[str, list[float]] = {k: [] for k in rows}
    order = list(rows)
    rng = torch.Generator().manual_seed(1)
    for r in range(args.warmup + args.rounds):
        for i in torch.randperm(len(order), generator=rng).tolist():
            name = order[i]
            for p, g0 in zip(params, grads0):
                p.grad = g0.clone()
            t = clock(args)
            rows[name].step()
            dt = clock(args) - t
            if r >= args.warmup:
                times[name].append(dt)
    base = statistics.median(times["fused AdamW"])
    return {k: {"ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / base,
                "projected": getattr(rows[k], "stats", {}).get("projected", float("nan"))} for k, v in times.items()}


def clock(args: argparse.Namespace) -> float:
    """Process CPU time with one thread (it leaves out the time other processes held the
    core, as ``step_overhead.py`` does), wall time otherwise."""
    return time.process_time() if args.threads == 1 else time.perf_counter()


def timed_passes(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each store pass over the whole mix, per code and for fp32, interleaved: median ms."""
    shapes = mix_shapes(args.mix)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in shapes]
    refs = [torch.randn(s, generator=g) for s in shapes]
    kinds = {"fp32": lambda x: storage.make_store(x, "fp32"), **{c: k.quantize for c, k in codes(args).items()}}
    stores = {k: [make(r) for r in refs] for k, make in kinds.items()}

    def run(kind: str, op: str) -> None:
        for st, gr in zip(stores[kind], grads):
            if op.startswith("dot"):
                st.dot(gr)
                if "sqnorm" in op:
                    st.sqnorm()
            else:
                st.add_to_(gr, 1e-3)
                if "lerp_" in op:
                    st.lerp_(gr, 0.1)

    ops = ["dot", "dot + sqnorm", "add_to_", "add_to_ + lerp_"]
    cells = [(k, op) for k in kinds for op in ops]
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cells}
    rng = torch.Generator().manual_seed(1)
    for r in range(args.warmup + args.rounds):
        for i in torch.randperm(len(cells), generator=rng).tolist():
            t = clock(args)
            run(*cells[i])
            if r >= args.warmup:
                times[cells[i]].append(clock(args) - t)
    return {f"{k} | {op}": {"ms": 1e3 * statistics.median(times[(k, op)]),
                            "ratio": statistics.median(times[(k, op)]) / statistics.median(times[("fp32", op)])}
            for k, op in cells}


def _table(title: str, head: str, rows: list[str]) -> list[str]:
    """A results section: title, header, rows (each also printed as it is ready)."""
    for row in rows:
        print(row, flush=True)
    return ["", f"## {title}\n", head, "|" + "---|" * (head.count("|") - 1), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cos-seeds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--section", default="cos,steps,passes")
    parser.add_argument("--mix", choices=["step_overhead", "encoder"], default="step_overhead")
    parser.add_argument("--codes", default=",".join(storage.INT8_CODES))
    parser.add_argument("--baseline", default="", help="git revision whose LinearInt8Store to time beside")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sections = args.section.split(",")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines = ["# int8 reference storage: dynamic code book vs linear grid\n",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
             f"`python {' '.join(sys.argv)}`; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n"]
    numel = sum(math.prod(s) for s in mix_shapes(args.mix))
    if "cos" in sections:
        cos_section(args, lines, numel)
    clk = "CPU" if args.threads == 1 else "wall"
    where = f"{args.threads} thread(s), median of {args.rounds} interleaved rounds, {clk} time"
    if "steps" in sections:
        lines += _table(f"Optimizer step, {numel / 1e6:.2f}M fp32 parameters in 194 tensors ({args.mix}), {where}",
                        "| step | ms | x fused AdamW | blocks rotated (last step) |",
                        [f"| {n} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['projected']:.2f} |"
                         for n, r in timed_steps(args).items()])
    if "passes" in sections:
        lines += _table(f"Store passes over {numel / 1e6:.2f}M parameters in 194 tensors ({args.mix}), {where}",
                        "| store | pass | ms | x fp32 |",
                        [f"| {n} | {r['ms']:.1f} | {r['ratio']:.2f} |" for n, r in timed_passes(args).items()])
    load = os.getloadavg()
    lines.append(f"\nLoad average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


def cos_section(args: argparse.Namespace, lines: list[str], numel: int) -> None:
    cases = [case for items in cosine_cases(args.cos_seeds).values() for case in items]
    lines += ["## Cosine error against fp32, and bytes per parameter\n",
              f"| code | cases | max \\|Δcos\\| | p99 | median | bytes/param ({args.mix}, {numel / 1e6:.1f}M) |",
              "|---|---|---|---|---|---|"]
    for code, cls in codes(args).items():
        errs = sorted(abs(cos_with(g, r, cls.quantize) - cos_with(g, r, lambda x: storage.make_store(x, "fp32")))
                      for g, r in cases)
        nbytes = sum(cls.zeros(torch.Size(s), torch.device("cpu")).nbytes() for s in mix_shapes(args.mix))
        lines.append(f"| {code} | {len(errs)} | {errs[-1]:.2e} | {errs[int(0.99 * (len(errs) - 1))]:.2e} | "
                     f"{statistics.median(errs):.2e} | {nbytes / numel:.4f} |")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
