"""Sharded gradients (FSDP2 DTensors): which shard to guide, which group to reduce over.

Guidance works on each rank's local shard; the per-block statistics are then partial
sums, made whole by one ``all_reduce`` in :meth:`GuidedOptimizer._reduce_stats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: in-place writes reach the DTensor), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


_DTENSOR: Any = None  # the DTensor class, imported on first use (or () without torch.distributed)


def _is_dtensor(t: Any) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor as cls
        except ImportError:  # pragma: no cover - torch built without distributed
            cls = ()
        _DTENSOR = cls
    return isinstance(t, _DTENSOR)


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter or gradient)."""
    return _is_dtensor(t)


def shard_group(tensors: Sequence[Tensor]) -> Any:
    """The process group over which ``tensors`` (gradients or parameters) are sharded
    (FSDP2), or None when none is a DTensor.

    Only one sharded mesh dimension is supported (FSDP2, or HSDP's shard dimension); a
    mix of sharded and plain tensors would give wrong statistics, so it raises instead.
    """
    sharded = [_is_dtensor(t) for t in tensors]
    if not any(sharded):
        return None
    if not all(sharded):
        raise NotImplementedError("some guided gradients are DTensors (FSDP2) and some are not: shard every "
                                  "guided parameter (fully_shard the root module) or guide them separately")
    first = tensors[0]
    dims = [i for i, placement in enumerate(first.placements) if placement.is_shard()]
    if len(dims) != 1 or any(not pl.is_replicate() for i, pl in enumerate(first.placements) if i not in dims):
        raise NotImplementedError(f"placements {first.placements}: guidance supports one sharded mesh "
                                  "dimension (FSDP2 or HSDP)")
    return first.device_mesh.get_group(dims[0])


class ShardSpec(NamedTuple):
    """Where a sharded tensor lives: enough to gather its shards or cut a full copy."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: Any) -> "ShardSpec":
        return cls(t.device_mesh, tuple(t.placements), t.shape, t.stride())


def gather(local: Tensor, spec: ShardSpec) -> Tensor:
    """The full tensor from every rank's ``local`` shard (a collective: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, spec.mesh, spec.placements, shape=spec.shape, stride=spec.stride,
                              run_check=False).full_tensor()


def local_slice(full: Tensor, spec: ShardSpec) -> Tensor:
    """This rank's shard of ``full``, cut locally (every rank holds ``full``: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, spec.mesh, spec.placements, src_data_rank=None).to_local()
