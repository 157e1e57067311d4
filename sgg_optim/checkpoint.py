"""The guidance entry of ``GuidedOptimizer.state_dict()``: packing, checking, unpacking.

Everything in it is a tensor or a primitive, so ``torch.load(weights_only=True)``
reads it. A checkpoint is only loaded into an optimizer whose guidance state has the
same shape: same scope and reference storage, same kind and number of references,
same parameter layout. Checks run before anything changes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

from .config import STRUCTURAL_FIELDS, GuidanceConfig
from .sharding import local_shard
from .storage import Store, store_from_state

CHECKPOINT_FORMAT = 1


def pack_references(ema: dict[Tensor, Store], sources: dict[Tensor, list[Optional[Store]]],
                    index: dict[Tensor, int]) -> dict[int, dict[str, dict[str, Tensor]]]:
    """``{param index: {"ema" | "source<j>": store tensors}}`` (the tensors, not copies)."""
    refs: dict[int, dict[str, dict[str, Tensor]]] = {}
    for p, store in ema.items():
        refs.setdefault(index[p], {})["ema"] = store.state()
    for p, stores in sources.items():
        for j, s in enumerate(stores):
            if s is not None:
                refs.setdefault(index[p], {})[f"source{j}"] = s.state()
    return refs


def check_compatible(saved: dict[str, Any], config: GuidanceConfig, reference_mode: str, num_sources: int,
                     layout: list[list[int]], describe: Callable[[int], str]) -> None:
    """Raise ``ValueError`` naming the first way ``saved`` cannot be resumed here."""
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"state_dict['guidance'] has format {saved.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    mine = config.as_dict()
    for field in STRUCTURAL_FIELDS:
        if saved["config"].get(field) != mine[field]:
            raise ValueError(f"state_dict was saved with {field}={saved['config'].get(field)!r}, "
                             f"this optimizer has {field}={mine[field]!r}")
    if (saved["reference"], saved["num_sources"]) != (reference_mode, num_sources):
        raise ValueError(f"state_dict guides toward reference={saved['reference']!r} with "
                         f"{saved['num_sources']} source(s); this optimizer uses {reference_mode!r} "
                         f"with {num_sources}: build it with the same kind of reference")
    if saved["layout"] != layout:
        if len(saved["layout"]) != len(layout):
            raise ValueError(f"state_dict covers {len(saved['layout'])} parameters, "
                             f"this optimizer has {len(layout)}")
        i = next(i for i, (x, y) in enumerate(zip(saved["layout"], layout)) if x != y)
        raise ValueError(f"state_dict parameter #{i} has shape {tuple(saved['layout'][i])}, "
                         f"this optimizer's is {describe(i)}")


def unpack_references(saved_refs: dict[Any, dict[str, dict[str, Tensor]]], params: list[Tensor],
                      num_sources: int, storage: str, describe: Callable[[int], str],
                      ) -> tuple[dict[Tensor, Store], dict[Tensor, list[Optional[Store]]]]:
    """Rebuild the EMA and source stores of :func:`pack_references` on each parameter's device."""
    ema: dict[Tensor, Store] = {}
    sources: dict[Tensor, list[Optional[Store]]] = {}
    for i, entry in saved_refs.items():
        p = params[int(i)]
        for key, tensors in entry.items():
            tensors = {n: t.to(p.device) for n, t in tensors.items()}
            try:
                store = store_from_state(tensors, local_shard(p).shape, storage)
            except ValueError as e:
                raise ValueError(f"state_dict reference '{key}' of parameter {describe(int(i))}: {e}") from e
            if key == "ema":
                ema[p] = store
            else:
                sources.setdefault(p, [None] * num_sources)[int(key[len("source"):])] = store
    return ema, sources
