"""The guidance entry of ``GuidedOptimizer.state_dict()``: packing, checking, unpacking.

Everything in it is a tensor or a primitive, so ``torch.load(weights_only=True)``
reads it. A checkpoint is only loaded into an optimizer whose guidance state has the
same shape: same scope and reference storage, same kind and number of references,
same parameter layout. Every field is checked (presence, type, shape, dtype) before
anything changes, and a mismatch raises ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

from .config import STRUCTURAL_FIELDS, GuidanceConfig
from .sharding import local_shard
from .state import BlockState, GuidanceState
from .storage import ShapeMismatch, Store, store_from_state

CHECKPOINT_FORMAT = 1
FIELDS = ("format", "config", "reference", "num_sources", "layout", "accepted", "skipped",
          "norm_ema", "norm_count", "align_ema", "refs")


def pack_guidance(state: GuidanceState, config: GuidanceConfig, reference_mode: str,
                  layout: list[list[int]],
                  tensors: Optional[Callable[[int, Store], dict[str, Tensor]]] = None) -> dict[str, Any]:
    """The ``"guidance"`` entry of a state dict (the state's tensors, not copies).

    ``tensors(i, store)``, when given, says what to save of parameter ``i``'s store (the
    optimizer gathers sharded ones whole); it is called in the same order on every rank.
    """
    blocks = state.blocks
    save = tensors or (lambda i, store: store.state())
    refs: dict[int, dict[str, dict[str, Tensor]]] = {}
    for i in sorted(state.ema):
        refs.setdefault(i, {})["ema"] = save(i, state.ema[i])
    for i in sorted(state.sources):
        entry = refs.setdefault(i, {})  # kept when empty: the parameter is covered (its sources were not finite)
        for j, s in enumerate(state.sources[i]):
            if s is not None:
                entry[f"source{j}"] = save(i, s)
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.as_dict(),
        "reference": reference_mode,
        "num_sources": state.num_sources,
        "layout": layout,
        "accepted": state.accepted,
        "skipped": state.skipped,
        "ema_since": state.ema_since,
        "norm_ema": None if blocks is None else blocks.norm_ema,
        "norm_count": None if blocks is None else blocks.norm_count,
        "align_ema": None if blocks is None else blocks.align_ema,
        "align_count": None if blocks is None else blocks.align_count,
        "refs": refs,
    }


def _field(name: str) -> str:
    return f"state_dict['guidance'][{name!r}]"


def _count(saved: dict[str, Any], name: str) -> int:
    value = saved[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{_field(name)} must be a non-negative int, got {value!r}")
    return value


def check_compatible(saved: Any, config: GuidanceConfig, reference_mode: str, num_sources: int,
                     layout: list[list[int]], describe: Callable[[int], str]) -> None:
    """Raise ``ValueError`` naming the first way ``saved`` cannot be resumed here."""
    if not isinstance(saved, dict):
        raise ValueError(f"state_dict['guidance'] must be a dict, got {type(saved).__name__}")
    missing = [f for f in FIELDS if f not in saved]
    if missing:
        raise ValueError(f"state_dict['guidance'] has no {missing[0]!r} field (fields: {sorted(saved)})")
    if saved["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{_field('format')} is {saved['format']!r}, expected {CHECKPOINT_FORMAT}")
    if not isinstance(saved["config"], dict):
        raise ValueError(f"{_field('config')} must be a dict, got {type(saved['config']).__name__}")
    mine = config.as_dict()
    for field in STRUCTURAL_FIELDS:
        if saved["config"].get(field) != mine[field]:
            raise ValueError(f"state_dict was saved with {field}={saved['config'].get(field)!r}, "
                             f"this optimizer has {field}={mine[field]!r}")
    if (saved["reference"], saved["num_sources"]) != (reference_mode, num_sources):
        raise ValueError(f"state_dict guides toward reference={saved['reference']!r} with "
                         f"{saved['num_sources']!r} source(s); this optimizer uses {reference_mode!r} "
                         f"with {num_sources}: build it with the same kind of reference")
    saved_layout = saved["layout"]
    if not isinstance(saved_layout, list) or not all(isinstance(s, list) for s in saved_layout):
        raise ValueError(f"{_field('layout')} must be a list of shapes, got {type(saved_layout).__name__}")
    if saved_layout != layout:
        if len(saved_layout) != len(layout):
            raise ValueError(f"state_dict covers {len(saved_layout)} parameters, this optimizer has {len(layout)}")
        i = next(i for i, (x, y) in enumerate(zip(saved_layout, layout)) if x != y)
        raise ValueError(f"state_dict parameter #{i} has shape {tuple(saved_layout[i])}, "
                         f"this optimizer's is {describe(i)}")
    _count(saved, "accepted")
    _count(saved, "skipped")


def unpack_guidance(saved: Any, config: GuidanceConfig, reference_mode: str, num_sources: int,
                    params: list[Tensor], num_blocks: int, describe: Callable[[int], str],
                    cut: Optional[Callable[[int, Store], Store]] = None) -> GuidanceState:
    """The :class:`GuidanceState` of a saved entry, every field checked; ``params`` are the
    optimizer's parameters in ``param_groups`` order (under FSDP2 each reference fits this
    rank's local shard; with ``cut``, the saved tensors are whole and ``cut(i, store)``
    gives this rank's part). Nothing is changed here: the caller swaps the state in."""
    check_compatible(saved, config, reference_mode, num_sources, [list(p.shape) for p in params], describe)
    blocks = BlockState.from_saved(saved, num_blocks, num_sources)
    ema, sources = _unpack_references(saved["refs"], params, num_sources, reference_mode,
                                      config.reference_dtype, describe, cut)
    # (absent from checkpoints written before it existed: the EMA then started at step 0)
    ema_since = _count(saved, "ema_since") if "ema_since" in saved else 0
    if ema_since > saved["accepted"]:
        raise ValueError(f"{_field('ema_since')} is {ema_since}, above {_field('accepted')} ({saved['accepted']})")
    return GuidanceState(num_sources=num_sources, ema=ema, sources=sources, blocks=blocks,
                         accepted=saved["accepted"], skipped=saved["skipped"], ema_since=ema_since)


# A per-rank state_dict() of FSDP2-sharded parameters holds this rank's shards of the
# references; loaded at another world size (or from one process into shards) they misfit.
_SHARD_HINT = ("; if the checkpoint comes from sharded (FSDP2) parameters at another world size, or from one "
               "process into sharded ones: a state_dict() holds each rank's own shards, so resume at the same "
               "world size, or carry the guidance state with guidance_state_dict() / load_guidance_state_dict() "
               "(whole references, cut to each rank's shard)")


def _unpack_references(saved_refs: Any, params: list[Tensor], num_sources: int, reference_mode: str,
                       storage: str, describe: Callable[[int], str],
                       cut: Optional[Callable[[int, Store], Store]] = None,
                       ) -> tuple[dict[int, Store], dict[int, list[Optional[Store]]]]:
    """Rebuild the EMA and source stores of :func:`pack_guidance` on each parameter's device."""
    if not isinstance(saved_refs, dict):
        raise ValueError(f"{_field('refs')} must be a dict, got {type(saved_refs).__name__}")
    keys = {"ema"} if reference_mode == "ema" else {f"source{j}" for j in range(num_sources)}
    ema: dict[int, Store] = {}
    sources: dict[int, list[Optional[Store]]] = {}
    for i, entry in saved_refs.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
            raise ValueError(f"{_field('refs')} has parameter index {i!r}; this optimizer has "
                             f"parameters 0..{len(params) - 1}")
        if not isinstance(entry, dict) or not set(entry) <= keys:
            raise ValueError(f"{_field('refs')}[{i}] has entries {sorted(entry) if isinstance(entry, dict) else entry!r}"
                             f", expected some of {sorted(keys)}")
        p = local_shard(params[i])
        shape = params[i].shape if cut is not None else p.shape
        if reference_mode != "ema":
            sources.setdefault(i, [None] * num_sources)
        for key, tensors in entry.items():
            try:
                if not isinstance(tensors, dict):
                    raise ValueError("expected a dict of tensors")
                store = store_from_state({n: t.to(p.device) if isinstance(t, Tensor) else t
                                          for n, t in tensors.items()}, shape, storage)
                if cut is not None:
                    store = cut(i, store)
            except ValueError as e:
                hint = _SHARD_HINT if isinstance(e, ShapeMismatch) and cut is None else ""
                raise ValueError(f"{_field('refs')}[{i}][{key!r}] (parameter {describe(i)}): {e}{hint}") from e
            if key == "ema":
                ema[i] = store
            else:
                sources[i][int(key[len("source"):])] = store
    return ema, sources
