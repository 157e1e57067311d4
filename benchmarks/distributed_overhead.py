#!/usr/bin/env python
"""What guidance costs under data parallelism: step time and bytes on the wire.

For 1 process, 2 processes with DDP and 2 processes with FSDP2 (``fully_shard``), on
CPU with gloo (or one GPU with ``--device cuda``, 1 process), and two MLP sizes, it
times the optimizer step of plain AdamW and of ``GuidedOptimizer(AdamW)`` (cone +
adaptive magnitude around the EMA reference, past its warm-up), and the whole
training step. It counts the ``all_reduce`` calls and bytes made *inside*
``opt.step()``: under DDP guidance adds none (gradients are already averaged), under
FSDP2 one ``all_reduce`` of the ``[blocks, 1 + 2k]`` float64 statistics per step,
24 bytes per block with the EMA reference, whatever the model size.

Usage::

    python benchmarks/distributed_overhead.py [--sizes 1,8] [--steps 20] [--device cpu|cuda]
        [--out benchmarks/results/distributed_overhead.md]

Times are medians over ``--steps`` timed steps after 3 warm-up steps, on a shared
machine: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sgg_optim import GuidedOptimizer  # noqa: E402

MODES = ("1 process", "DDP x2", "FSDP2 x2")


def mlp(million: float, seed: int = 0) -> torch.nn.Sequential:
    """4 square layers holding about ``million`` x 1e6 parameters."""
    torch.manual_seed(seed)
    width = int((million * 1e6 / 4) ** 0.5)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(mode: str, million: float, variant: str, steps: int, device: torch.device) -> dict:
    model = mlp(million).to(device)
    params = sum(p.numel() for p in model.parameters())
    if mode == "DDP x2":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "FSDP2 x2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scope = variant.split(":")[1] if ":" in variant else "global"
    opt = base if variant == "base" else GuidedOptimizer(base, warmup_steps=0, scope=scope)

    calls: list[int] = []
    inside = [False]
    all_reduce = dist.all_reduce

    def counting(tensor, *a, **k):
        if inside[0]:
            calls.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counting
    width = model.module[0].in_features if mode == "DDP x2" else next(model.parameters()).shape[-1]
    g = torch.Generator().manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
    x = torch.randn(32, width, generator=g).to(device)
    t_opt, t_all = [], []
    try:
        for step in range(3 + steps):
            _sync(device)
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            _sync(device)
            t1 = time.perf_counter()
            inside[0] = step >= 3
            opt.step()
            inside[0] = False
            _sync(device)
            t2 = time.perf_counter()
            opt.zero_grad()
            if step >= 3:
                t_opt.append(t2 - t1)
                t_all.append(t2 - t0)
    finally:
        dist.all_reduce = all_reduce
    blocks = 1 if variant in ("base", "guided") else sum(1 for _ in model.parameters())
    return {"mode": mode, "params": params, "variant": variant, "blocks": blocks,
            "opt_ms": 1e3 * statistics.median(t_opt), "step_ms": 1e3 * statistics.median(t_all),
            "all_reduce_calls_per_step": len(calls) / steps,
            "all_reduce_bytes_per_step": sum(calls) / steps}


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    for million in args.sizes:
        for variant in ("base", "guided", "guided:tensor"):
            rows.append(measure(args.mode, million, variant, args.steps, device))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace, result: Path) -> list[dict]:
    cmd = [__file__, "--worker", "--mode", mode, "--result", str(result), "--steps", str(args.steps),
           "--device", args.device, "--sizes", ",".join(map(str, args.sizes))]
    if mode == "1 process":
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


def report(rows: list[dict], args: argparse.Namespace) -> str:
    base = {(r["mode"], r["params"]): r for r in rows if r["variant"] == "base"}
    lines = [
        "# Distributed overhead of guidance",
        "",
        f"`python benchmarks/distributed_overhead.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {args.device}, OMP threads {args.threads} per process, "
        f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}; median of {args.steps} steps after 3 warm-up.",
        "",
        "Guided = `GuidedOptimizer(AdamW, warmup_steps=0)` (cone + adaptive, EMA reference); "
        "`opt.step()` time and the whole step (forward, backward, step). The all_reduce columns count "
        "only calls made inside `opt.step()` (DDP's gradient all-reduce and FSDP's "
        "reduce-scatter happen in backward and are the same for both).",
        "",
        "| mode | params | optimizer | blocks | opt.step ms | vs AdamW | full step ms | vs AdamW "
        "| all_reduce calls/step | bytes/step | bytes/block |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        b = base[(r["mode"], r["params"])]
        name = {"base": "AdamW", "guided": "guided", "guided:tensor": "guided, scope=tensor"}[r["variant"]]
        per_block = r["all_reduce_bytes_per_step"] / r["blocks"]
        lines.append(
            f"| {r['mode']} | {r['params'] / 1e6:.2f}M | {name} | {r['blocks']} | {r['opt_ms']:.2f} | "
            f"{r['opt_ms'] / b['opt_ms']:.2f}x | {r['step_ms']:.1f} | {r['step_ms'] / b['step_ms']:.2f}x | "
            f"{r['all_reduce_calls_per_step']:.0f} | {r['all_reduce_bytes_per_step']:.0f} | {per_block:.0f} |")
    lines += ["", "Target: at most 64 bytes x blocks per step, independent of model size "
              "(here 24 = 3 float64 statistics per block: |g|^2, <g, r>, |r|^2).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,8", help="model sizes in millions of parameters")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_overhead.md"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [float(s) for s in str(args.sizes).split(",")]
    if args.worker:
        return worker(args)
    modes = [m for m in args.modes.split(",") if m]
    if args.device == "cuda":
        modes = ["1 process"]  # one GPU here: NCCL needs one device per rank
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(modes):
            rows += run_mode(mode, args, Path(tmp) / f"{i}.json")
    text = report(rows, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
