"""Sharded gradients (FSDP2 DTensors): which shard to guide, which group to reduce over.

Guidance works on each rank's local shard; the per-block statistics are then partial
sums, made whole by one ``all_reduce`` in :meth:`GuidedOptimizer._reduce_stats`.
"""

from __future__ import annotations

from typing import Any, Sequence

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


def shard_group(params: Sequence[Tensor], reference_mode: str) -> Any:
    """The process group over which the gradients are sharded (FSDP2), or None.

    Only one sharded mesh dimension is supported (FSDP2, or HSDP's shard dimension); a
    mix of sharded and plain gradients, or frozen references on sharded parameters,
    would give wrong statistics, so they raise instead.
    """
    sharded = [_is_dtensor(p.grad) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        raise NotImplementedError("some guided gradients are DTensors (FSDP2) and some are not: shard every "
                                  "guided parameter (fully_shard the root module) or guide them separately")
    if reference_mode != "ema":
        raise NotImplementedError("frozen references (captured or loaded) on FSDP2-sharded parameters are not "
                                  "supported yet: use reference='ema', or DDP (see docs/distributed.md)")
    grad = params[0].grad
    dims = [i for i, placement in enumerate(grad.placements) if placement.is_shard()]
    if len(dims) != 1 or any(not pl.is_replicate() for i, pl in enumerate(grad.placements) if i not in dims):
        raise NotImplementedError(f"gradient placements {grad.placements}: guidance supports one sharded mesh "
                                  "dimension (FSDP2 or HSDP)")
    return grad.device_mesh.get_group(dims[0])
