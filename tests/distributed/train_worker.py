"""One guided training run under Accelerate, for the multi-process tests.

Launched by tests/test_distributed.py as a plain process (1 process), with
``torchrun --nproc_per_node 2`` or with ``accelerate launch`` (two "nodes"). Every run
sees the same *global* micro-batches (16 rows each); rank ``r`` of ``W`` takes rows
``[16 r / W, 16 (r + 1) / W)``, so 1- and 2-process runs are comparable. Guidance
settings come from ``SGG_*`` variables set by the test (through GuidancePlugin).

Each rank writes ``rank{r}.pt`` under ``--out``: final parameters, the guidance
state, per-step stats, and what its step hooks saw (sync flag, whether the
gradients were equal on every rank, and whether guidance changed them: tests/conftest.py's
GradientWatch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

from sgg_optim import capture_reference
from sgg_optim.accelerate import GuidancePlugin, find_guided

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's GradientWatch
from conftest import GradientWatch  # noqa: E402

ROWS = 16


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def micro_batch(index: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    x, y = torch.randn(ROWS, 6, generator=g), torch.randint(0, 3, (ROWS,), generator=g)
    lo, hi = ROWS * rank // world, ROWS * (rank + 1) // world
    return x[lo:hi], y[lo:hi]


def flat_grads(opt: torch.optim.Optimizer) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).float() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps (sync steps)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--wrap", default="after", choices=["before", "after", "none"])
    ap.add_argument("--expect-world", type=int, default=None)
    ap.add_argument("--save-at", type=int, default=None, help="save_state after this many steps")
    ap.add_argument("--load-state", default=None, help="resume from this save_state folder")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--reference", default="ema", choices=["ema", "source", "source-unwrapped"],
                    help="source: guide toward a reference captured (under DDP) from other batches; "
                         "source-unwrapped: the same, captured through accelerator.unwrap_model(model)")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.grad_accum,
                              mixed_precision=args.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.expect_world is not None and world != args.expect_world:
        raise SystemExit(f"expected {args.expect_world} processes, Accelerate sees {world}")
    plugin = GuidancePlugin()
    model = tiny_mlp()
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if args.wrap == "before":
        optimizer = plugin.wrap(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = None
    if args.reference.startswith("source"):
        source = [micro_batch(500 + i, rank, world) for i in range(4)]
        through = accelerator.unwrap_model(model) if args.reference == "source-unwrapped" else model
        reference = capture_reference(through, source, accelerator=accelerator,
                                      loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    if args.wrap == "after":
        optimizer = plugin.wrap(optimizer, accelerator=accelerator, reference=reference)
    guided = find_guided(optimizer)

    seen: list[dict] = []
    if guided is not None:
        def check(opt, a, k):  # runs right before guidance rewrites the gradients
            grads = flat_grads(opt)
            equal = True
            if world > 1:
                parts = [torch.empty_like(grads) for _ in range(world)]
                dist.all_gather(parts, grads)
                equal = all(torch.equal(parts[0], p) for p in parts)
            seen.append({"sync": accelerator.sync_gradients, "grads_equal": equal})
        guided.register_step_pre_hook(check)
    watch = GradientWatch(guided) if guided is not None else None

    start = 0
    if args.load_state:
        accelerator.load_state(args.load_state)
        start = guided.stats["step"] if guided is not None else 0
    stats = []
    for step in range(start, args.steps):
        for micro in range(args.grad_accum):
            x, y = micro_batch(step * args.grad_accum + micro, rank, world)
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        if guided is not None:
            stats.append(guided.stats)
        if args.save_at is not None and step + 1 == args.save_at:
            accelerator.save_state(args.state_dir)

    params = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    result = {
        "world": world,
        "params": params,
        "stats": stats,
        "seen": seen,
        # per step: guidance changed the gradients / the stats say a rule acted
        "changed": watch.changed if watch is not None else None,
        "acted": watch.acted if watch is not None else None,
        "config": plugin.guidance_kwargs(),
        "reference_mode": guided.reference_mode if guided is not None else None,
        "guidance": guided.state_dict()["guidance"] if guided is not None else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_initialized():  # a clean gloo shutdown: no peer sees a reset connection at exit
        dist.destroy_process_group()


def leave() -> None:
    """Exit once the results are on disk, without interpreter finalisation: the DDP/FSDP
    modules still hold the gloo process group, whose worker threads can abort the process
    (SIGABRT, "terminate called without an active exception") when finalisation frees
    the tensors they hold (seen once in a loaded CI-like run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    leave()
