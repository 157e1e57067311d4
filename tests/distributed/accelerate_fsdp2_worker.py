"""Accelerate's FSDP2 path on CPU with gloo, step by step as ``Accelerator.prepare`` does it.

``Accelerator(cpu=True)`` falls back to plain multi-CPU, so this worker calls what
Accelerate calls: the optimizer is built over the full model (with a source reference
captured on it), each ``param_groups`` entry is replaced by a placeholder that remembers
its ``data_ptr``, the model is sharded with ``fully_shard``, and Accelerate's own
``fsdp2_switch_optimizer_parameters`` puts the sharded DTensors in. Checkpoints go
through torch's distributed checkpoint (``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, what ``save_state`` uses under FSDP2) with the guidance
state beside them in a :class:`GuidanceCheckpoint` (what ``GuidancePlugin`` registers).

Rank ``r`` writes ``rank{r}.pt``: the full parameters after training, those of the same
training on one process without sharding, and those of a run resumed from the checkpoint
taken after step 3.
"""

from __future__ import annotations

import argparse
import copy
import io
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from train_worker import leave, micro_batch, tiny_mlp

from sgg_optim import GuidedAdamW, capture_reference
from sgg_optim.accelerate import GuidanceCheckpoint

STEPS, RESUME_AT = 6, 3
GUIDANCE = {"max_angle": 20.0, "warmup_steps": 2, "spike_factor": 1.5}


def source_batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def guided(model, reference):
    if reference == "source":
        reference = capture_reference(model, source_batches(),
                                      loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    return GuidedAdamW(model.named_parameters(), lr=1e-2, reference=reference, **GUIDANCE)


def prepared(mesh, reference):
    """The model and optimizer as Accelerate's FSDP2 prepare() leaves them."""
    model = tiny_mlp()
    opt = guided(model, reference)
    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for group in opt.param_groups:  # Accelerate drops the full parameters first
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1)
            placeholder.data_ptr = p.data_ptr()
            group["params"][i] = placeholder
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp2_switch_optimizer_parameters(opt, {old[n]: p for n, p in model.named_parameters()})
    return model, opt


def train(model, opt, steps, rank, world):
    clipped = []
    for step in steps:
        x, y = micro_batch(step, rank, world)
        spike = 20.0 if step == STEPS - 2 else 1.0  # after the resume point: the adaptive clip must act
        (torch.nn.functional.cross_entropy(model(x), y) * spike).backward()
        opt.step()
        opt.zero_grad()
        if opt.stats.get("scale", 1.0) < 1.0:
            clipped.append(step)
    return clipped


def full(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", default="source", choices=["ema", "source"])
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    model, opt = prepared(mesh, args.reference)
    train(model, opt, range(RESUME_AT), rank, world)
    checkpoint = {"model": copy.deepcopy(get_model_state_dict(model)),
                  "optim": copy.deepcopy(get_optimizer_state_dict(model, opt)),
                  "guidance": round_trip(GuidanceCheckpoint(opt).state_dict())}  # plain tensors, whole
    clipped = train(model, opt, range(RESUME_AT, STEPS), rank, world)

    resumed, opt2 = prepared(mesh, args.reference)
    set_model_state_dict(resumed, checkpoint["model"])
    set_optimizer_state_dict(resumed, opt2, checkpoint["optim"])
    GuidanceCheckpoint(opt2).load_state_dict(checkpoint["guidance"])  # after the optimizer, as Accelerate does
    train(resumed, opt2, range(RESUME_AT, STEPS), rank, world)

    single = tiny_mlp()  # the same training on one process, unsharded, whole batches
    opt1 = guided(single, args.reference)
    single_clipped = [s for s in train(single, opt1, range(STEPS), 0, 1) if s >= RESUME_AT]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"world": world, "params": full(model), "resumed": full(resumed), "single": full(single),
                "reference_mode": opt.reference_mode, "stats": opt.stats, "single_stats": opt1.stats,
                "clipped": clipped, "single_clipped": single_clipped,
                "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())},
               out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
