"""GuidedOptimizer: a thin stateful shell around the functional guidance step.

The wrapper owns only what is its own (references, the magnitude and alignment EMAs,
step counters); ``param_groups``, ``state`` and ``defaults`` are the base optimizer's,
forwarded, never copied, so LR schedulers and ``accelerate.prepare()`` keep working.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .checkpoint import CHECKPOINT_FORMAT, check_compatible, pack_references, unpack_references
from .config import GuidanceConfig
from .functional import FIGURES, apply_guidance_, block_stats, guidance_coefficients, stats_dtype
from .reference import Reference, param_names
from .sharding import local_shard, shard_group
from .storage import Store, zeros_store

ReferenceSpec = Union[str, Reference, Sequence[Reference]]


class GuidedOptimizer(Optimizer):
    """Wrap any ``torch.optim.Optimizer``; guide its gradients before each step.

    Before the base optimizer steps, the gradients of the guided parameters (those
    with ``requires_grad`` and a gradient) are rewritten block by block as
    ``g <- s (a g + b r)`` toward a reference direction ``r`` (see ``docs/method.md``).

    Args:
        base_optimizer: the optimizer that does the update (AdamW, SGD, bnb 8-bit...).
        reference: ``"ema"`` (an EMA of past guided gradients, the default), a captured
            :class:`~sgg_optim.Reference`, or a list of them (multi-source alignment).
        **guidance: the keywords of :class:`~sgg_optim.config.GuidanceConfig`.

    Example:
        >>> import torch
        >>> from sgg_optim import GuidedOptimizer
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = GuidedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_angle=45)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> opt.step(); opt.stats["step"]
        1
    """

    def __init__(self, base_optimizer: Optimizer, *, reference: ReferenceSpec = "ema", **guidance: Any) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, GuidedOptimizer):
            raise TypeError("base_optimizer is already a GuidedOptimizer")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            # ZeRO hands the optimizer flat per-rank partitions instead of param.grad:
            # the statistics would be one rank's, so refuse rather than guide wrongly.
            raise NotImplementedError("GuidedOptimizer does not support DeepSpeed (this process was launched with "
                                      "ACCELERATE_USE_DEEPSPEED=true); use DDP or FSDP2, see docs/distributed.md")
        unknown = sorted(set(guidance) - GuidanceConfig.keywords())
        if unknown:
            raise TypeError(f"unknown guidance keyword(s) {unknown}; valid: {sorted(GuidanceConfig.keywords())}")
        self.config = GuidanceConfig(**guidance)
        self.base_optimizer = base_optimizer
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._ref_names: dict[Tensor, str] = {}  # names learnt from bound references, for messages
        self._check_params()
        self._accepted = self._skipped = 0
        self._ema: dict[Tensor, Store] = {}
        self._sources: dict[Tensor, list[Optional[Store]]] = {}
        self._source_sqnorms: dict[Tensor, Tensor] = {}
        self._num_sources = 0
        self._gram: Optional[Tensor] = None
        self._norm_ema: Optional[Tensor] = None
        self._norm_count: Optional[Tensor] = None
        self._align_ema: Optional[Tensor] = None
        self._figures: Union[Tensor, list[float], None] = None
        self._ids_cache: Optional[tuple[Any, Tensor]] = None
        self.set_reference(reference)

    # -- forwarding: the base optimizer's structures, never copies ------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's ``param_groups`` (the same list object)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's ``state`` (the same object)."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's ``defaults`` (the same dict)."""
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the base optimizer's ``zero_grad``."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Forward to the base optimizer; the new parameters are guided too."""
        self.base_optimizer.add_param_group(param_group)
        self._check_params()

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_optimizer!r}, {self.config})"

    # -- parameters and blocks --------------------------------------------------------
    def _flat_params(self) -> list[tuple[int, Tensor]]:
        """(group index, parameter) for every parameter, in state_dict order."""
        return [(gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]]

    def _num_blocks(self) -> int:
        scope = self.config.scope
        return 1 if scope == "global" else len(self.param_groups) if scope == "group" else len(self._flat_params())

    def _block_of(self, index: int, group: int) -> int:
        """The block of flat parameter ``index`` in param group ``group``, by ``scope``."""
        scope = self.config.scope
        return 0 if scope == "global" else group if scope == "group" else index

    def _describe(self, index: int) -> str:
        names = {**self._ref_names, **param_names(self)}
        gi, p = self._flat_params()[index]
        where = f"'{names[p]}'" if p in names else f"param_groups[{gi}] parameter #{index}"
        return f"{where} (shape {tuple(p.shape)})"

    def _check_params(self) -> None:
        for i, (_, p) in enumerate(self._flat_params()):
            if p.is_complex():
                raise ValueError(f"parameter {self._describe(i)} is complex; guidance supports real parameters only")

    def _guided(self) -> list[tuple[int, int, Tensor]]:
        """(flat index, block, param) of parameters that have a gradient this step."""
        out = []
        for i, (gi, p) in enumerate(self._flat_params()):
            if not p.requires_grad or p.grad is None:
                continue
            if p.grad.is_sparse or p.grad.layout != torch.strided:
                raise ValueError(f"parameter {self._describe(i)} has a sparse gradient; "
                                 "guidance needs dense gradients")
            out.append((i, self._block_of(i, gi), p))
        return out

    def _block_state(self, device: torch.device, num_blocks: int) -> None:
        """Create or grow (after add_param_group) the per-block EMAs on ``device``."""
        dtype, k = stats_dtype(device), max(self._num_sources, 1)
        fresh = {"_norm_ema": (num_blocks,), "_norm_count": (num_blocks,), "_align_ema": (num_blocks, k)}
        for name, shape in fresh.items():
            old = getattr(self, name)
            new = torch.zeros(shape, device=device, dtype=dtype)
            if old is not None:
                new[: old.shape[0]] = old.to(device, dtype)
            setattr(self, name, new)

    # -- references ---------------------------------------------------------------------
    @property
    def reference_mode(self) -> str:
        """``"ema"`` or ``"sources"``."""
        return "sources" if self._num_sources else "ema"

    def set_reference(self, reference: ReferenceSpec) -> None:
        """Guide toward ``reference``: ``"ema"``, a :class:`Reference`, or a list of them.

        Every parameter that requires grad must be in each reference with its shape
        (a ``ValueError`` names the first that is not, and nothing changes). References
        are stored as ``reference_dtype``; a reference whose values are not finite
        switches direction guidance off for the blocks it covers. Resets the
        alignment statistics.
        """
        if isinstance(reference, str):
            if reference != "ema":
                raise ValueError(f"reference must be 'ema', a Reference or a list of them, got {reference!r}")
            self._sources, self._source_sqnorms, self._num_sources, self._gram = {}, {}, 0, None
            self._align_ema = None
            return
        refs = [reference] if isinstance(reference, Reference) else list(reference)
        if not refs or not all(isinstance(r, Reference) for r in refs):
            raise TypeError("reference must be 'ema', a Reference or a non-empty list of References")
        for ref in refs:
            self._ref_names.update(ref.bound_names)
        names = param_names(self)
        flat = self._flat_params()
        for i, (_, p) in enumerate(flat):
            if p.requires_grad:
                for j, ref in enumerate(refs):
                    ref.check_covers(p, names.get(p), self._describe(i), source=j)
        storage = self.config.reference_dtype
        stores: dict[Tensor, list[Optional[Store]]] = {}
        for _, p in flat:
            if p.requires_grad:
                stores[p] = [ref.store_for(p, names.get(p), storage) for ref in refs]
        self._sources, self._num_sources, self._align_ema = stores, len(refs), None
        self._prepare_sources()

    def _prepare_sources(self) -> None:
        """Cache |r_i|^2 per tensor and the per-block Gram matrix; drop non-finite sources.

        Runs once per reference change (it reads a few scalars on the host and, under
        FSDP2, sums the Gram matrix over the shards: fine here, never in ``step()``).
        """
        k = self._num_sources
        index = {p: (i, gi) for i, (gi, p) in enumerate(self._flat_params())}
        gram = torch.zeros(self._num_blocks(), k, k, dtype=torch.float64)
        block_of, local_gram = {}, {}
        for p, stores in self._sources.items():
            block_of[p] = self._block_of(*index[p])
            dense = [s.dense() if s is not None else None for s in stores]
            g = torch.zeros(k, k, dtype=torch.float64)
            for a, b in ((a, b) for a in range(k) for b in range(a, k)):
                if dense[a] is not None and dense[b] is not None:
                    g[a, b] = g[b, a] = stores[a].dot(dense[b]).double().cpu()  # type: ignore[union-attr]
            local_gram[p] = g
            gram[block_of[p]] += g
        group = shard_group(list(self._sources))
        if group is not None:  # each rank summed its shards only
            device = local_shard(next(iter(self._sources))).device
            summed = gram.to(device)
            torch.distributed.all_reduce(summed, group=group)
            gram = summed.cpu()
        bad = ~torch.isfinite(gram.diagonal(dim1=1, dim2=2))  # [B, k]: a non-finite source
        for p, stores in self._sources.items():
            for j in range(k):
                if bad[block_of[p], j]:
                    stores[j] = None
        self._gram = torch.where(torch.isfinite(gram), gram, torch.zeros_like(gram))
        self._source_sqnorms = {p: torch.where(bad[block_of[p]], 0.0, local_gram[p].diagonal())
                                for p in self._sources}

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Guide the gradients, then step the base optimizer.

        With ``nonfinite="skip"`` (default) a step whose gradients are not all finite
        leaves parameters, base state and guidance state untouched and is counted in
        ``stats["skipped"]``; that check is the one host read of the step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cfg = self.config
        if cfg.direction == "off" and cfg.magnitude == "off" and cfg.nonfinite == "propagate":
            self.base_optimizer.step()
            self._accepted += 1
            return loss
        guided = self._guided()
        if not guided:
            self.base_optimizer.step()
            self._accepted += 1
            return loss
        if self._guide(guided):
            self.base_optimizer.step()
        return loss

    def _guide(self, guided: list[tuple[int, int, Tensor]]) -> bool:
        """Rewrite the gradients in place; False if the step must be skipped."""
        cfg = self.config
        params = [p for _, _, p in guided]
        group = shard_group([p.grad for p in params])  # FSDP2: statistics are summed over it
        grads = [local_shard(p.grad) for p in params]  # FSDP2: this rank's shard; stats are partial sums
        device = grads[0].device
        num_blocks = self._num_blocks()
        if self._norm_ema is None or self._norm_ema.shape[0] != num_blocks or self._norm_ema.device != device:
            self._block_state(device, num_blocks)
        block_ids = self._device_block_ids(tuple(b for _, b, _ in guided), device)

        sources = self.reference_mode == "sources"
        use_ema = not sources and cfg.direction != "off"
        if use_ema:
            for p in params:
                if p not in self._ema:
                    self._ema[p] = zeros_store(local_shard(p), cfg.reference_dtype)
        direction_on = cfg.direction != "off" and (sources or self._accepted >= cfg.warmup_steps)
        if not direction_on:
            refs: list[list[Optional[Store]]] = [[] for _ in params]
            sqnorms = None
        elif sources:
            refs = [self._sources.get(p, [None] * self._num_sources) for p in params]
            sqnorms = [self._source_sqnorms.get(p) for p in params]
        else:
            refs, sqnorms = [[self._ema[p]] for p in params], None

        stats = self._reduce_stats(block_stats(grads, refs, block_ids, num_blocks, sqnorms), group)
        gram = self._device_gram(device, stats.dtype) if (sources and self._num_sources > 1) else None
        coef = guidance_coefficients(stats, cfg, direction_on=direction_on, norm_ema=self._norm_ema,
                                     norm_count=self._norm_count, align_ema=self._align_ema, gram=gram)
        k = coef.b.shape[1]
        if cfg.nonfinite == "propagate":
            a_blocks: Any = coef.a.float()
            b_blocks: Any = coef.b.float()
            a = list(a_blocks[block_ids].unbind())
            b = [list(row.unbind()) for row in b_blocks[block_ids]]
            finite = torch.isfinite(stats[:, 0].sum())
            self._figures = coef.figures
        else:
            # The step's one host read: finiteness, coefficients and figures together.
            host = torch.cat([stats[:, 0].sum().reshape(1), coef.a, coef.b.flatten(), coef.figures]).tolist()
            if not math.isfinite(host[0]):
                self._figures = None
                if cfg.nonfinite == "raise":
                    bad = next(i for i, _, p in guided if not bool(torch.isfinite(p.grad).all()))
                    raise FloatingPointError(f"non-finite gradient in parameter {self._describe(bad)} "
                                             f"at step {self._accepted + self._skipped + 1} (nonfinite='raise')")
                self._skipped += 1
                return False
            a_host, b_host = host[1:1 + num_blocks], host[1 + num_blocks:1 + num_blocks * (1 + k)]
            self._figures = host[1 + num_blocks * (1 + k):]
            a = [a_host[blk] for _, blk, _ in guided]
            b = [b_host[blk * k:(blk + 1) * k] for _, blk, _ in guided]
            finite = None

        ema_refs = [self._ema[p] for p in params] if use_ema else None
        if direction_on or cfg.magnitude != "off" or use_ema:
            apply_guidance_(grads, refs, a, b, ema_refs, 1.0 - cfg.ema_beta)
        self._commit(stats[:, 0], coef, finite)
        self._accepted += 1
        return True

    def _device_block_ids(self, ids: tuple[int, ...], device: torch.device) -> Tensor:
        """Block index of each guided tensor, kept on the device: no host-to-device copy
        per step while the set of parameters with gradients stays the same."""
        cached = self._ids_cache
        if cached is None or cached[0] != (ids, device):
            cached = self._ids_cache = ((ids, device), torch.tensor(ids, device=device))
        return cached[1]

    def _device_gram(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        assert self._gram is not None
        if self._gram.device != device or self._gram.dtype != dtype:
            self._gram = self._gram.to(device, dtype)
        return self._gram

    def _commit(self, gg: Tensor, coef: Any, finite: Optional[Tensor]) -> None:
        """Feed the EMAs of blocks that had a gradient (guarded with ``where`` when no
        host check ran)."""
        beta = self.config.norm_beta
        seen = gg > 0 if finite is None else (gg > 0) & finite
        self._norm_ema = torch.where(seen, beta * self._norm_ema + (1 - beta) * coef.norm, self._norm_ema)
        self._norm_count = self._norm_count + seen.to(self._norm_count.dtype)
        if self._num_sources > 1:
            self._align_ema = torch.where(seen.unsqueeze(1), coef.alignment, self._align_ema)

    def _reduce_stats(self, stats: Tensor, group: Any) -> Tensor:
        """Sum partial statistics over shards; the identity for unsharded gradients.

        Under FSDP2 each rank holds a shard of every gradient, so ``block_stats`` gives
        partial sums: one ``all_reduce`` of this ``[num_blocks, 1 + 2k]`` tensor (8 bytes
        an entry) makes them whole, and every rank then computes the same coefficients.
        DDP gradients are already averaged, so nothing is reduced there.
        """
        if group is not None:
            torch.distributed.all_reduce(stats, group=group)
        return stats

    # -- reporting --------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """The last step's figures: ``step``, ``skipped`` (count), ``grad_norm``,
        ``guided_norm``, ``cos`` (gradient vs reference; NaN when undefined), ``scale``
        (smallest magnitude scale), ``projected`` (fraction of the blocks with a
        gradient that the direction rule changed), and per source ``alignment`` and
        ``weights``.

        Cheap: read in the step's own host sync, or once on first access.
        """
        out: dict[str, Any] = {"step": self._accepted + self._skipped, "skipped": self._skipped}
        figures = self._figures
        if figures is None:
            return out
        if isinstance(figures, Tensor):
            figures = self._figures = figures.tolist()
        n = len(FIGURES)
        out.update(zip(FIGURES, figures[:n]))
        k = (len(figures) - n) // 2
        out["alignment"], out["weights"] = figures[n:n + k], figures[n + k:]
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus a ``"guidance"`` entry (tensors and
        primitives only, so ``torch.load(weights_only=True)`` reads it)."""
        state = self.base_optimizer.state_dict()
        index = {p: i for i, (_, p) in enumerate(self._flat_params())}
        state["guidance"] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.as_dict(),
            "reference": self.reference_mode,
            "num_sources": self._num_sources,
            "layout": [list(p.shape) for _, p in self._flat_params()],
            "accepted": self._accepted,
            "skipped": self._skipped,
            "norm_ema": self._norm_ema,
            "norm_count": self._norm_count,
            "align_ema": self._align_ema,
            "refs": pack_references(self._ema, self._sources, index),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`. The guidance entry is fully checked (format, scope,
        reference storage and kind, parameter layout) before anything changes; a
        mismatch raises ``ValueError`` naming it. A plain base-optimizer state dict
        loads with a warning and leaves the guidance state as it is."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("guidance", None)
        if saved is None:
            warnings.warn("state_dict has no 'guidance' entry (a plain optimizer checkpoint?): "
                          "loading the base optimizer state; the guidance state is kept as it is", stacklevel=2)
            self.base_optimizer.load_state_dict(state_dict)
            return
        loaded = self._parse_guidance(saved)
        self.base_optimizer.load_state_dict(state_dict)
        for key, value in loaded.items():
            setattr(self, key, value)
        if self._num_sources:
            self._prepare_sources()

    def _parse_guidance(self, saved: dict[str, Any]) -> dict[str, Any]:
        """Validate a saved guidance entry and build the attributes it restores."""
        flat = self._flat_params()
        check_compatible(saved, self.config, self.reference_mode, self._num_sources,
                         [list(p.shape) for _, p in flat], self._describe)
        ema, sources = unpack_references(saved["refs"], [p for _, p in flat], saved["num_sources"],
                                         self.config.reference_dtype, self._describe)
        return {
            "_accepted": int(saved["accepted"]), "_skipped": int(saved["skipped"]),
            "_norm_ema": saved["norm_ema"], "_norm_count": saved["norm_count"], "_align_ema": saved["align_ema"],
            "_ema": ema, "_sources": sources, "_num_sources": saved["num_sources"],
        }
