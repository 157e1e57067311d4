"""The guidance state: one typed object, created, grown, reset, saved and checked here.

:class:`BlockState` holds the per-block running statistics that the pure step
(:func:`sgg_optim.functional.guidance_coefficients`) reads and returns updated, in
optax's ``update(grads, state) -> (updates, new_state)`` shape. :class:`GuidanceState`
adds what is per parameter (the EMA reference, the source references) and the step
counters. Parameters are named by their position in ``param_groups`` (as in
``Optimizer.state_dict()``), not by object identity, so the state follows a parameter
that a wrapper replaces in place (Accelerate's FSDP2 ``prepare`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .storage import Store


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for block statistics where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


class BlockState(NamedTuple):
    """Per-block running statistics (shapes with ``B`` blocks and ``k`` sources).

    ``norm_ema`` ``[B]``: EMA of accepted post-guidance norms (not bias-corrected);
    ``norm_count`` ``[B]``: how many steps fed it; ``align_ema`` ``[B, max(k, 1)]``:
    EMA of each source's cosine with the gradient; ``align_count`` ``[B]``: how many
    steps fed that one (it restarts with the references, the norm's does not).

    Example:
        >>> s = BlockState.zeros(2, 3, torch.device("cpu"))
        >>> [tuple(t.shape) for t in s], s.norm_ema.dtype
        ([(2,), (2,), (2, 3), (2,)], torch.float64)
        >>> s.resized(3, 3, torch.device("cpu")).norm_ema.shape
        torch.Size([3])
    """

    norm_ema: Tensor
    norm_count: Tensor
    align_ema: Tensor
    align_count: Tensor

    @staticmethod
    def zeros(num_blocks: int, num_sources: int, device: torch.device) -> "BlockState":
        dtype = stats_dtype(device)
        return BlockState(torch.zeros(num_blocks, device=device, dtype=dtype),
                          torch.zeros(num_blocks, device=device, dtype=dtype),
                          torch.zeros(num_blocks, max(num_sources, 1), device=device, dtype=dtype),
                          torch.zeros(num_blocks, device=device, dtype=dtype))

    def fits(self, num_blocks: int, num_sources: int, device: torch.device) -> bool:
        """True if this state has ``num_blocks`` blocks and room for ``num_sources`` on ``device``."""
        return (self.norm_ema.shape[0] == num_blocks and self.align_ema.shape[1] == max(num_sources, 1)
                and self.norm_ema.device == device)

    def resized(self, num_blocks: int, num_sources: int, device: torch.device) -> "BlockState":
        """On ``device`` with ``num_blocks`` blocks: old blocks keep their statistics (new
        blocks, from ``add_param_group``, start fresh); the alignment restarts when the
        number of sources changed."""
        new = BlockState.zeros(num_blocks, num_sources, device)
        n = min(num_blocks, self.norm_ema.shape[0])
        new.norm_ema[:n] = self.norm_ema[:n].to(device, new.norm_ema.dtype)
        new.norm_count[:n] = self.norm_count[:n].to(device, new.norm_count.dtype)
        if self.align_ema.shape[1] == new.align_ema.shape[1]:
            new.align_ema[:n] = self.align_ema[:n].to(device, new.align_ema.dtype)
            new.align_count[:n] = self.align_count[:n].to(device, new.align_count.dtype)
        return new

    def restart_alignment(self, num_sources: int) -> "BlockState":
        """The alignment statistics started afresh for ``num_sources`` new references."""
        zeros = torch.zeros_like(self.norm_ema)
        return self._replace(align_ema=zeros.unsqueeze(1).repeat(1, max(num_sources, 1)), align_count=zeros)

    @staticmethod
    def from_saved(saved: Mapping[str, Any], num_blocks: int, num_sources: int) -> Optional["BlockState"]:
        """The block state of a saved guidance entry, every field checked first.

        All fields absent-as-None means no step had run (None is returned); a tensor of
        the wrong kind, shape or dtype raises ``ValueError`` naming it. A checkpoint from
        before ``align_count`` existed counted the alignment with ``norm_count``.
        """
        names = BlockState._fields
        values = [saved.get(n) for n in names]
        if "align_count" not in saved and isinstance(values[1], Tensor):
            values[3] = values[1].clone()
        if all(v is None for v in values):
            return None
        unset = [n for n, v in zip(names, values) if v is None]
        if unset:
            raise ValueError(f"state_dict['guidance'] has {', '.join(unset)} unset but "
                             f"{', '.join(n for n in names if n not in unset)} set: all or none")
        shapes = {"norm_ema": (num_blocks,), "norm_count": (num_blocks,),
                  "align_ema": (num_blocks, max(num_sources, 1)), "align_count": (num_blocks,)}
        for name, value in zip(names, values):
            where = f"state_dict['guidance'][{name!r}]"
            if not isinstance(value, Tensor):
                raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise ValueError(f"{where} must be a floating-point tensor, got {value.dtype}")
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {shapes[name]} "
                                 f"({num_blocks} block(s), {num_sources} source(s))")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where} holds non-finite values")
            if name != "align_ema" and bool((value < 0).any()):
                raise ValueError(f"{where} holds negative values")
        return BlockState(*values)


@dataclass
class GuidanceState:
    """Everything the wrapper carries between steps, besides the base optimizer's state.

    ``ema``: the EMA reference of each parameter index (created on its first guided step);
    ``sources``: the ``k`` source references of each parameter index (None where a
    source has no finite tensor); ``source_sqnorms``: their cached ``|r_i|^2``;
    ``gram``: per block ``<r_i, r_j>``; ``blocks``: the :class:`BlockState`, created on
    the first step on the gradients' device.
    """

    num_sources: int = 0
    ema: dict[int, Store] = field(default_factory=dict)
    sources: dict[int, list[Optional[Store]]] = field(default_factory=dict)
    source_sqnorms: dict[int, Tensor] = field(default_factory=dict)
    gram: Optional[Tensor] = None
    blocks: Optional[BlockState] = None
    accepted: int = 0
    skipped: int = 0
    ema_since: int = 0  # ``accepted`` when the EMA reference (re)started: its warm-up counts from here

    def with_sources(self, sources: dict[int, list[Optional[Store]]], num_sources: int) -> "GuidanceState":
        """The state after ``set_reference``: new references, alignment restarted; the
        magnitude statistics and counters carry on (they do not depend on the reference)."""
        blocks = self.blocks.restart_alignment(num_sources) if self.blocks is not None else None
        # back to an EMA after captured references: a new EMA, which warms up like a fresh one
        ema_since = self.accepted if self.num_sources and not num_sources else self.ema_since
        return GuidanceState(num_sources=num_sources, ema=self.ema if not num_sources else {}, sources=sources,
                             blocks=blocks, accepted=self.accepted, skipped=self.skipped, ema_since=ema_since)

    def grow(self, num_blocks: int) -> None:
        """Make room for blocks added by ``add_param_group``: they start with fresh
        statistics and no source reference (their parameters are in none)."""
        if self.blocks is not None and self.blocks.norm_ema.shape[0] < num_blocks:
            self.blocks = self.blocks.resized(num_blocks, self.num_sources, self.blocks.norm_ema.device)
        if self.gram is not None and self.gram.shape[0] < num_blocks:
            k = self.gram.shape[1]
            pad = self.gram.new_zeros(num_blocks - self.gram.shape[0], k, k)
            self.gram = torch.cat([self.gram, pad])

    def block_state(self, num_blocks: int, device: torch.device) -> BlockState:
        """The block state a step starts from: the current one, or one created or grown
        (``add_param_group``) for it. Not stored here: a skipped step must leave the
        state as it was, so only an accepted step stores what it returns."""
        if self.blocks is None:
            return BlockState.zeros(num_blocks, self.num_sources, device)
        if not self.blocks.fits(num_blocks, self.num_sources, device):
            return self.blocks.resized(num_blocks, self.num_sources, device)
        return self.blocks
