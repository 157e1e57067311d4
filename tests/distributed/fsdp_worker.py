"""Guided training with FSDP2 (``fully_shard``, DTensor gradients) on CPU with gloo.

Accelerate's FSDP path needs an accelerator device (with ``cpu=True`` it falls back to
plain multi-CPU), so this worker shards with torch's ``fully_shard`` directly and
wraps the optimizer with :class:`GuidancePlugin`, as a training script would. Same
model, data split and ``SGG_*`` settings as train_worker.py. Rank ``r`` writes
``rank{r}.pt``: full parameters, stats, the all_reduce calls made inside each
``step()`` (count and bytes), whether each step's guidance changed this rank's
gradient shards, the parameters of a run resumed after step 3 from the
per-rank ``state_dict()`` snapshots, and the parameters of a run guided toward a
source reference captured on the sharded model, saved (gathered) and loaded again
(re-sharded), as train_worker.py's ``--reference source``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from train_worker import GradientWatch, leave, micro_batch, tiny_mlp

from sgg_optim import Reference, capture_reference
from sgg_optim.accelerate import GuidancePlugin


def build(mesh, plugin, reference=None):
    model = tiny_mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if isinstance(reference, str):  # a saved reference file, re-sharded for this model
        reference = Reference.load(reference, model)
    return model, plugin.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), reference=reference)


def full_params(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train(model, opt, steps, rank, world, stats=None):
    for step in steps:
        x, y = micro_batch(step, rank, world)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads_are_dtensors = all(type(p.grad).__name__ == "DTensor" for p in model.parameters())
        opt.step()
        opt.zero_grad()
        if stats is not None:
            stats.append({**opt.stats, "dtensor_grads": grads_are_dtensors})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    plugin = GuidancePlugin()
    model, opt = build(mesh, plugin)

    calls: list[list[int]] = []
    in_step = [False]
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):
        if in_step[0]:
            calls[-1].append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counting_all_reduce
    def enter(o, a, k):
        calls.append([])
        in_step[0] = True

    def leave(o, a, k):
        in_step[0] = False

    opt.register_step_pre_hook(enter)
    opt.register_step_post_hook(leave)
    watch = GradientWatch(opt)  # compares this rank's gradient shards before and after guidance
    stats: list[dict] = []
    train(model, opt, range(3), rank, world, stats)
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))  # per-rank shards
    train(model, opt, range(3, args.steps), rank, world, stats)
    params = full_params(model)
    guidance = opt.state_dict()["guidance"]
    dist.all_reduce = all_reduce

    # Resume from the per-rank snapshot in a fresh sharded model and optimizer.
    model2, opt2 = build(mesh, plugin)
    model2.load_state_dict(snapshot[0])
    opt2.load_state_dict(snapshot[1])
    train(model2, opt2, range(3, args.steps), rank, world)
    resumed = full_params(model2)

    # A source reference captured on the sharded model (each rank keeps its shard),
    # saved as one file (gathered), loaded into a fresh sharded model (re-sharded).
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    capture_model, _ = build(mesh, plugin)
    source = [micro_batch(500 + i, rank, world) for i in range(4)]
    captured = capture_reference(capture_model, source,
                                 loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    captured_is_sharded = bool(captured.specs) and all(
        captured[n].numel() < p.numel() for n, p in capture_model.named_parameters())
    captured.save(out / "reference.safetensors")
    model3, opt3 = build(mesh, plugin, reference=str(out / "reference.safetensors"))
    train(model3, opt3, range(args.steps), rank, world)
    torch.save({"world": world, "params": params, "stats": stats, "all_reduce_bytes": calls,
                "changed": watch.changed, "acted": watch.acted,
                "config": plugin.guidance_kwargs(), "guidance": guidance, "resumed": resumed,
                "source_params": full_params(model3), "source_mode": opt3.reference_mode,
                "captured_is_sharded": captured_is_sharded,
                "local_numel": sum(p.to_local().numel() for p in model.parameters())},
               out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
