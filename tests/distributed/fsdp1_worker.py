"""FSDP1 (``FullyShardedDataParallel``) on CPU with gloo: refused, never guided per rank.

FSDP1 hands the optimizer flat local shards as plain tensors, so each rank would guide
with its own partial statistics. Rank ``r`` writes ``rank{r}.pt``: the error of an
optimizer built on the wrapped model (``use_orig_params`` False and True), and of one
built before wrapping (``use_orig_params=True`` keeps the Parameter objects, so only the
first step can tell), with whether that failed step changed any parameter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from train_worker import leave, micro_batch, tiny_mlp

from sgg_optim import GuidedAdamW


def error(fn) -> str:
    try:
        fn()
    except NotImplementedError as e:
        return str(e)
    return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"world": world}
    for orig in (False, True):
        model = FSDP(tiny_mlp(), device_id=torch.device("cpu"), use_orig_params=orig)
        out[f"after_wrap_{orig}"] = error(lambda: GuidedAdamW(model.parameters(), lr=1e-2))
    model = tiny_mlp()
    opt = GuidedAdamW(model.parameters(), lr=1e-2)
    model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    x, y = micro_batch(0, rank, world)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    out["at_step"] = error(opt.step)
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.save(out, Path(args.out) / f"rank{rank}.pt")
    dist.barrier()
    leave()


if __name__ == "__main__":
    main()
