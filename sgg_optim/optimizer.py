"""GuidedOptimizer: a thin stateful shell around the functional guidance step.

The wrapper owns only what is its own (references, the magnitude and alignment EMAs,
step counters); ``param_groups``, ``state`` and ``defaults`` are the base optimizer's,
forwarded, never copied, so LR schedulers and ``accelerate.prepare()`` keep working.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import fused as fused_mod
from .checkpoint import pack_guidance, unpack_guidance
from .config import GuidanceConfig
from .functional import (FIGURES, Coefficients, apply_guidance_, block_stats, block_stats_rescaled,
                         guidance_coefficients)
from .reference import Reference, param_names
from .sharding import ShardSpec, gather, is_sharded, local_shard, local_slice, shard_group
from .state import BlockState, GuidanceState
from .storage import Store, make_store, zeros_store

ReferenceSpec = Union[str, Reference, Sequence[Reference]]


# the hook dicts torch's Optimizer keeps per instance (``_optimizer_step_pre_hooks``, ...)
_HOOKS = re.compile(r"_optimizer_(step|state_dict|load_state_dict)_(pre|post)_hooks")


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
        accelerated = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", ())
        if isinstance(base_optimizer, accelerated):  # (no import: one exists only once accelerate is loaded)
            # Its step runs on every micro-batch (it skips the inner step off sync steps):
            # guidance outside it would rewrite half-accumulated, possibly scaled gradients.
            raise TypeError("base_optimizer is an AcceleratedOptimizer (already through accelerator.prepare): "
                            "wrap the optimizer before prepare, or use "
                            "sgg_optim.accelerate.GuidancePlugin().wrap(prepared_optimizer), which guides inside "
                            "it, on sync steps only")
        if _needs_closure(base_optimizer):
            # LBFGS re-evaluates the loss inside its step: the gradients it steps on are
            # ones guidance never saw, so wrapping it would guide nothing.
            raise TypeError(f"{type(base_optimizer).__name__}.step requires a closure that re-evaluates the "
                            "loss; guidance rewrites the gradients once before the step, so optimizers that "
                            "recompute them inside step() (LBFGS) cannot be guided")
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            # ZeRO hands the optimizer flat per-rank partitions instead of param.grad:
            # the statistics would be one rank's, so refuse rather than guide wrongly.
            raise NotImplementedError("GuidedOptimizer does not support DeepSpeed (this process was launched with "
                                      "ACCELERATE_USE_DEEPSPEED=true); use DDP or FSDP2, see docs/distributed.md")
        check_keywords(guidance, "GuidedOptimizer")
        self.config = GuidanceConfig(**guidance)
        self.base_optimizer = base_optimizer
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._ref_names: dict[Tensor, str] = {}  # names learnt from bound references, for messages
        self._check_params([(self._describe(i), p) for i, (_, p) in enumerate(self._flat_params())])
        self._guidance = GuidanceState()
        self._step = _StepCache()
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
        """Check the new parameters, then forward to the base optimizer; they are guided
        too (a rejected group is never forwarded, so the optimizer stays as it was).

        With captured references, trainable parameters cannot be added: the references
        hold no tensor for them (``set_reference``'s rule), and guidance would turn their
        gradients toward zero. Switch to ``set_reference("ema")``, add the group, then set
        references that cover every parameter.
        """
        params = param_group["params"]
        if isinstance(params, set):  # as torch refuses: the state is keyed by position
            raise TypeError("param_group['params'] is a set, whose order changes between runs; pass a list")
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        group = len(self.param_groups)
        described = [(f"'{p[0]}' (shape {tuple(p[1].shape)})" if isinstance(p, tuple)
                      else f"param_groups[{group}] parameter #{j} (shape {tuple(p.shape)})",
                      p[1] if isinstance(p, tuple) else p) for j, p in enumerate(params)]
        self._check_params(described, where="the new param group")
        trainable = [d for d, p in described if isinstance(p, Tensor) and p.requires_grad]
        if self._guidance.num_sources and trainable:
            raise ValueError(f"cannot add {trainable[0]} while guiding toward captured references: they hold no "
                             "tensor for it, and its gradient would be turned toward zero. Call "
                             "set_reference('ema'), add the group, then set_reference(...) with references that "
                             "cover every parameter")
        self.base_optimizer.add_param_group(param_group)
        self._guidance.grow(self._num_blocks())

    def __getstate__(self) -> dict[str, Any]:
        # As torch's optimizers: without the instance's own ``step`` (a learning-rate
        # scheduler's wrapper) and without hooks (often closures); unpickling makes empty
        # hook dicts and patches the class's step again (below).
        return {k: v for k, v in self.__dict__.items() if k != "step" and not _HOOKS.fullmatch(k)}

    def __getattr__(self, name: str) -> Any:
        """The base optimizer's own attributes, for code written against it (Adafactor's
        ``_get_lr``, the ``train()``/``eval()`` of schedule-free optimizers).

        Not ``_step_supports_amp_scaling``: a fused base unscales inside its step, but
        ``GradScaler`` must unscale (and skip inf steps) before guidance sees the gradients.
        """
        if hasattr(type(self), name):  # one of ours (a property) raised: let its own error through
            return object.__getattribute__(self, name)
        base = self.__dict__.get("base_optimizer")  # absent while unpickling
        if base is not None and not name.startswith("__") and name != "_step_supports_amp_scaling":
            try:
                return getattr(base, name)
            except AttributeError:
                pass
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's: also re-patches step for hooks after unpickling

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
        j = index - sum(len(g["params"]) for g in self.param_groups[:gi])  # its position in its group
        where = f"'{names[p]}'" if p in names else f"param_groups[{gi}] parameter #{j}"
        return f"{where} (shape {tuple(p.shape)})"

    @staticmethod
    def _check_params(params: Sequence[tuple[str, Tensor]], where: str = "the optimizer's param_groups") -> None:
        """Raise ``ValueError`` for a parameter guidance cannot handle, by its description:
        complex, or listed twice (torch only warns; its gradient would count twice in the
        block's norms and be rewritten twice); ``NotImplementedError`` for an FSDP1 shard."""
        seen: set[Tensor] = set()
        for description, p in params:
            if not isinstance(p, Tensor):
                continue  # the base optimizer names what it is not
            if p in seen:
                raise ValueError(f"parameter {description} appears twice in {where}: guidance would count and "
                                 "rewrite its gradient twice; list each parameter once")
            seen.add(p)
            _refuse_unguidable(p, lambda: description)

    def _guided(self) -> list[tuple[int, int, Tensor]]:
        """(flat index, block, param) of parameters that have a gradient this step; a
        broadcast (expanded) ``.grad`` is replaced by a dense copy of it on the way."""
        out = []
        flat = self._flat_params()
        if tuple(map(id, (p for _, p in flat))) != self._step.param_ids:
            self._follow_parameters()
        # (with direction "off" the references are never read)
        sources = self._guidance.sources if self._guidance.num_sources and self.config.direction != "off" else None
        for i, (gi, p) in enumerate(flat):
            if not p.requires_grad or p.grad is None:
                continue
            if sources is not None and i not in sources:
                # frozen when the references were set, unfrozen since (gradual unfreezing):
                # as add_param_group's rule, rather than turn its gradient toward zero
                raise ValueError(f"parameter {self._describe(i)} has a gradient but no tensor in the captured "
                                 "references (it was frozen when they were set, and unfrozen since): call "
                                 "set_reference(...) again with references that cover it, or "
                                 "set_reference('ema')")
            if p.grad.is_sparse or p.grad.layout != torch.strided:
                raise ValueError(f"parameter {self._describe(i)} has a sparse gradient; guidance needs dense "
                                 "gradients (only the pass-through, direction='off', magnitude='off', "
                                 "nonfinite='propagate', steps sparse ones: it never reads a gradient)")
            # made complex after construction (model.to(torch.complex64) keeps the Parameter objects)
            _refuse_unguidable(p, lambda: self._describe(i))  # described only when refused
            if p.grad.device.type == "meta":
                raise ValueError(f"parameter {self._describe(i)} is on the meta device (no data): materialise "
                                 "the model (e.g. model.to_empty(device=...) and initialise it) before stepping")
            g = p.grad
            if not g.is_contiguous() and any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape)):
                # A broadcast (expanded) gradient: its elements share memory, and guidance
                # writes gradients in place; give it memory of its own (the same values).
                p.grad = g.contiguous()
            out.append((i, self._block_of(i, gi), p))
        return out

    # -- references ---------------------------------------------------------------------
    @property
    def reference_mode(self) -> str:
        """``"ema"`` or ``"sources"``."""
        return "sources" if self._guidance.num_sources else "ema"

    def set_reference(self, reference: ReferenceSpec) -> None:
        """Guide toward ``reference``: ``"ema"``, a :class:`Reference`, or a list of them.

        Every parameter that requires grad must be in each reference with its shape
        (a ``ValueError`` names the first that is not, and nothing changes). References
        are stored as ``reference_dtype``; a reference whose values are not finite
        switches direction guidance off for the blocks it covers. Restarts the
        alignment statistics; the magnitude statistics and step count carry on.
        """
        if isinstance(reference, str):
            if reference != "ema":
                raise ValueError(f"reference must be 'ema', a Reference or a list of them, got {reference!r}")
            self._guidance = self._guidance.with_sources({}, 0)
            return
        iterable = isinstance(reference, Iterable) and not isinstance(reference, (str, bytes, Tensor))
        refs = [reference] if isinstance(reference, Reference) else list(reference) if iterable else None
        if not refs or not all(isinstance(r, Reference) for r in refs):
            raise TypeError("reference must be 'ema', a Reference or a non-empty list of References, "
                            f"got {type(reference).__name__}")
        for ref in refs:
            self._ref_names.update(ref.bound_names)
        names = param_names(self)
        flat = self._flat_params()
        for i, (_, p) in enumerate(flat):
            if p.requires_grad:
                for j, ref in enumerate(refs):
                    ref.check_covers(p, names.get(p), self._describe(i), source=j)
        storage = self.config.reference_dtype
        stores = {i: [ref.store_for(p, names.get(p), storage) for ref in refs]
                  for i, (_, p) in enumerate(flat) if p.requires_grad}
        self._guidance = self._guidance.with_sources(stores, len(refs))
        self._prepare_sources()
        self._step.param_ids = tuple(id(p) for _, p in flat)

    def _follow_parameters(self) -> None:
        """Re-fit the references after ``param_groups`` got new parameter objects.

        Accelerate's FSDP2 ``prepare`` swaps each parameter for its sharded DTensor in
        place (``fsdp2_switch_optimizer_parameters``); the state is keyed by position, so
        it follows, but a reference taken on the full parameter must be cut to this
        rank's shard. Runs on every rank at the same step (it may ``all_reduce``).
        """
        st, flat = self._guidance, self._flat_params()
        storage = self.config.reference_dtype
        for i, stores in [*((i, [s]) for i, s in st.ema.items()), *st.sources.items()]:
            p = flat[i][1] if i < len(flat) else None
            for j, store in enumerate(stores):
                if p is None or store is None or store.shape == local_shard(p).shape:
                    continue
                if not (is_sharded(p) and store.shape == p.shape):
                    raise ValueError(f"parameter {self._describe(i)} was replaced by one of another shape "
                                     f"({tuple(store.shape)} before): set_reference again, or rebuild the optimizer")
                stores[j] = make_store(local_slice(store.dense().to(local_shard(p).device), ShardSpec.of(p)),
                                       storage)
                if i in st.ema and j == 0 and st.ema[i] is store:
                    st.ema[i] = stores[j]
        if st.num_sources:
            self._prepare_sources()
        self._step.param_ids = tuple(id(p) for _, p in flat)

    def _prepare_sources(self) -> None:
        """Cache |r_i|^2 per tensor and the per-block Gram matrix; drop non-finite sources.

        Runs once per reference change (it reads a few scalars on the host and, under
        FSDP2, sums the Gram matrix over the shards: fine here, never in ``step()``).
        """
        st = self._guidance
        k = st.num_sources
        flat = self._flat_params()
        gram = torch.zeros(self._num_blocks(), k, k, dtype=torch.float64)
        block_of, local_gram = {}, {}
        underflow = torch.zeros(self._num_blocks(), k, dtype=torch.bool)  # non-zero values whose squares are 0
        for i, stores in st.sources.items():
            block_of[i] = self._block_of(i, flat[i][0])
            dense = [s.dense() if s is not None else None for s in stores]
            g = torch.zeros(k, k, dtype=torch.float64)
            for a, b in ((a, b) for a in range(k) for b in range(a, k)):
                if dense[a] is not None and dense[b] is not None:
                    g[a, b] = g[b, a] = stores[a].dot(dense[b]).double().cpu()  # type: ignore[union-attr]
            for a, d in enumerate(dense):
                if d is not None and g[a, a] == 0 and bool(d.any()):
                    underflow[block_of[i], a] = True
            local_gram[i] = g
            gram[block_of[i]] += g
        group = shard_group([flat[i][1] for i in st.sources])
        if group is not None:  # each rank summed its shards only
            device = local_shard(flat[next(iter(st.sources))][1]).device
            summed = gram.to(device)
            torch.distributed.all_reduce(summed, group=group)
            gram = summed.cpu()
        sq = gram.diagonal(dim1=1, dim2=2)  # [B, k]: each source's |r_i|^2 per block
        bad = ~torch.isfinite(sq)  # a non-finite source, or |r_i|^2 beyond fp32's range
        out = bad | (sq < torch.finfo(torch.float32).tiny) & ((sq > 0) | underflow)
        if bool(out.any()):
            which = ", #".join(str(j) for j in sorted({int(j) for j in out.nonzero()[:, 1]}))
            warnings.warn(
                f"reference #{which} has {int(out.sum())} block(s) where |r|^2 is not finite (a non-finite "
                "value, or |r| above ~1.8e19) or below fp32's normal range (|r| under ~1.1e-19): guidance is off "
                "there. Rescale it if its values are finite: the rules do not depend on the reference's scale",
                stacklevel=_caller_outside_package())
        for i, stores in st.sources.items():
            for j in range(k):
                if bad[block_of[i], j]:
                    stores[j] = None
        st.gram = torch.where(torch.isfinite(gram), gram, torch.zeros_like(gram))
        st.source_sqnorms = {i: torch.where(bad[block_of[i]], 0.0, local_gram[i].diagonal()) for i in st.sources}

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
            self._guidance.accepted += 1
            return loss
        guided = self._guided()
        if not guided:
            self.base_optimizer.step()
            self._guidance.accepted += 1
            self._step.figures = None  # no gradient, no figures: not the previous step's
            return loss
        after = self._guide(guided)
        if after is not None:
            self._base_step(after)
            self._commit(after)
        return loss

    def _guide(self, guided: list[tuple[int, int, Tensor]]) -> Optional["_AfterGuide"]:
        """Rewrite the gradients in place; None if the step must be skipped, else what is
        left for the base step (:meth:`_base_step`) and the guidance state to commit after it."""
        cfg, st = self.config, self._guidance
        index = [i for i, _, _ in guided]
        params = [p for _, _, p in guided]
        group = shard_group([p.grad for p in params])  # FSDP2: statistics are summed over it
        grads = [local_shard(p.grad) for p in params]  # FSDP2: this rank's shard; stats are partial sums
        device = grads[0].device
        num_blocks = self._num_blocks()
        blocks = st.block_state(num_blocks, device)
        block_ids = self._device_block_ids(tuple(b for _, b, _ in guided), device)

        sources = st.num_sources > 0
        use_ema = not sources and cfg.direction != "off"
        # EMA references start at zero on a parameter's first guided step; kept only if it is accepted.
        new_ema = {i: zeros_store(local_shard(p), cfg.reference_dtype)
                   for i, p in zip(index, params) if use_ema and i not in st.ema}
        ema = {**st.ema, **new_ema}
        direction_on = cfg.direction != "off" and (sources or st.accepted - st.ema_since >= cfg.warmup_steps)
        if not direction_on:
            refs: list[list[Optional[Store]]] = [[] for _ in params]
            sqnorms = None
        elif sources:
            refs = [st.sources.get(i, [None] * st.num_sources) for i in index]
            sqnorms = [st.source_sqnorms.get(i) for i in index]
        else:
            refs, sqnorms = [[ema[i]] for i in index], None
        gram = self._device_gram(device) if (sources and st.num_sources > 1) else None

        def coefficients(stats_fn: Callable[..., Tensor]) -> tuple[Tensor, Coefficients, BlockState]:
            stats = self._reduce_stats(stats_fn(grads, refs, block_ids, num_blocks, sqnorms), group)
            return (stats, *guidance_coefficients(stats, blocks, cfg, direction_on=direction_on,
                                                  gram=None if gram is None else gram.to(stats.dtype)))

        stats, coef, new_blocks = coefficients(block_stats)
        k = coef.b.shape[1]
        if cfg.nonfinite == "propagate":
            a_blocks: Any = coef.a.float()
            b_blocks: Any = coef.b.float()
            a = list(a_blocks[block_ids].unbind())
            b = [list(row.unbind()) for row in b_blocks[block_ids]]
            figures: Any = coef.figures
        else:
            # The step's one host read: finiteness, coefficients and figures together (and, for
            # gradients of a narrower range than fp32's, the block norms that bound the rewrite).
            narrow = any(_dtype_max(dt) is not None for dt in {g.dtype for g in grads})
            host = self._host_read(stats, coef, narrow)
            if not math.isfinite(host[0]):
                bad = self._first_nonfinite(guided, group)  # rare path: host reads are fine here
                if bad is None:
                    # Finite gradients whose fp32 squares overflow (|g| >~ 1e19): recompute exactly.
                    stats, coef, new_blocks = coefficients(block_stats_rescaled)
                    host = self._host_read(stats, coef, narrow)
                else:
                    self._step.figures = None
                    if cfg.nonfinite == "raise":
                        where = "another rank's shard" if bad < 0 else f"parameter {self._describe(bad)}"
                        raise FloatingPointError(f"non-finite gradient in {where} at step "
                                                 f"{st.accepted + st.skipped + 1} (nonfinite='raise')")
                    st.skipped += 1
                    return None
            a_host, b_host = host[1:1 + num_blocks], host[1 + num_blocks:1 + num_blocks * (1 + k)]
            if not all(map(math.isfinite, a_host + b_host)):
                self._step.figures = None
                raise FloatingPointError(f"guidance coefficients are not finite although the gradients are, at step "
                                         f"{st.accepted + st.skipped + 1}: nothing was changed; check the guidance "
                                         f"settings ({self.config})")
            end = 1 + num_blocks * (1 + k) + len(coef.figures)
            figures = host[1 + num_blocks * (1 + k):end]
            a = [a_host[blk] for _, blk, _ in guided]
            b = [b_host[blk * k:(blk + 1) * k] for _, blk, _ in guided]
            if narrow:
                over = self._first_overflow(guided, grads, refs, a, b, host[end:], group)
                if over is not None:
                    self._step.figures = None
                    if cfg.nonfinite == "raise":
                        where = "another rank's shard" if over < 0 else f"parameter {self._describe(over)}"
                        raise FloatingPointError(
                            f"the guided gradient would overflow its dtype in {where} at step "
                            f"{st.accepted + st.skipped + 1} (nonfinite='raise'): nothing was changed; "
                            "keep float32 gradients (fp32 master weights, or bfloat16)")
                    st.skipped += 1
                    return None

        ema_refs = [ema[i] for i in index] if use_ema else None
        weight = 1.0 - cfg.ema_beta
        after = _AfterGuide(fused=self._fused_update(
            params, grads, refs, ema_refs, weight, group, guided,
            (a_blocks, b_blocks) if cfg.nonfinite == "propagate" else (a_host, b_host)))
        if after.fused is None:
            scale = None if cfg.nonfinite == "propagate" else self._folded_scale(grads, a, b, group)
            if scale is None and (direction_on or cfg.magnitude != "off" or use_ema):
                apply_guidance_(grads, refs, a, b, ema_refs, weight)
            after = _AfterGuide(scale, (grads, ema_refs, weight) if scale is not None and ema_refs is not None
                                else None)
        return after._replace(new_ema=new_ema, blocks=new_blocks, figures=figures)

    def _commit(self, after: "_AfterGuide") -> None:
        """The guidance state of a step, once the base step has returned: a base step that
        raises (out of memory at its first step, a misconfigured base) leaves the counters,
        the norm statistics, the figures and any new EMA reference as they were. (The
        gradients stay guided in place, as ``GradScaler.unscale_`` leaves them unscaled, and
        a reference that existed has moved toward them: compute new gradients to go on.)"""
        st = self._guidance
        st.ema.update(after.new_ema or {})
        st.blocks = after.blocks
        st.accepted += 1
        self._step.figures = after.figures

    def _base_step(self, after: "_AfterGuide") -> None:
        """The base optimizer's step: the fused guided AdamW update in its place when
        :meth:`_fused_update` chose it; with a folded scale, then the EMA update toward the
        gradients the fused kernel wrote back."""
        base = self.base_optimizer
        if after.fused is not None:
            after.fused()
        elif after.grad_scale is None:
            base.step()
        else:
            base.grad_scale = after.grad_scale  # read by torch's fused Adam/AdamW, as GradScaler sets it
            try:
                base.step()
            finally:
                del base.grad_scale
        if after.ema is not None:
            grads, stores, weight = after.ema
            for g, r in zip(grads, stores):
                r.lerp_(g, weight)

    def _fused_update(self, params: list[Tensor], grads: list[Tensor], refs: list[list[Optional[Store]]],
                      ema_refs: Optional[list[Store]], weight: float, group: Any,
                      guided: list[tuple[int, int, Tensor]], coef: tuple[Any, Any]) -> Optional[Callable[[], None]]:
        """The base step with the apply pass and the EMA update folded into it (one sweep
        per tensor, :mod:`sgg_optim.fused`), or None where it does not apply: see
        :func:`sgg_optim.fused.refusal`. With host coefficients (``nonfinite="skip"``
        or ``"raise"``) and no EMA reference, a step whose ``b`` are all 0 keeps the
        cheaper paths (identity blocks untouched, a folded ``grad_scale``)."""
        if not fused_mod.enabled or group is not None:  # opt-in; the default pays nothing below
            return None
        a_c, b_c = coef
        k = len(refs[0]) if refs else 0
        if ema_refs is not None:
            refs = [[r] for r in ema_refs]  # the same tensors; also during warm-up (then b = 0)
        width = len(refs[0]) if refs else 0
        host = isinstance(a_c, list)
        if host and ema_refs is None and all(x == 0.0 for x in b_c):
            return None
        if fused_mod.refusal(self.base_optimizer, params, grads, refs) is not None:
            return None
        device = grads[0].device
        if host:
            nb = len(a_c)
            table = torch.tensor([[a_c[j], *b_c[j * k:(j + 1) * k]] + [0.0] * (width - k) for j in range(nb)],
                                 dtype=torch.float32).to(device)
        else:
            table = torch.cat([a_c.unsqueeze(1), b_c] + ([b_c.new_zeros(len(a_c), width - k)] if width > k else []),
                              dim=1)
        tensors = [[None if r is None else r.tensor for r in rs] for rs in refs]  # type: ignore[union-attr]
        block_ids = [blk for _, blk, _ in guided]
        base = self.base_optimizer
        return lambda: fused_mod.fused_step_(base, params, grads, tensors, table, block_ids,  # type: ignore[arg-type]
                                             weight if ema_refs is not None else None)

    def _folded_scale(self, grads: list[Tensor], a: list[Any], b: list[list[Any]], group: Any) -> Optional[Tensor]:
        """``1/a`` as ``grad_scale`` for the base optimizer's fused kernel, or None.

        torch's fused Adam/AdamW divide every gradient by ``grad_scale`` inside the update
        and write the result back (GradScaler's unscaling). A step that only scales (every
        ``b`` is 0: the direction rule left the gradient alone, the magnitude rule clipped
        it) by one ``a`` for every tensor then needs no ``g.mul_(a)`` pass, a read and a
        write of every gradient (measured: 0.2x a fused AdamW step). Only where that holds
        exactly: ``a`` not 1 with ``1/a`` finite in fp32, fp32 gradients on CPU or CUDA
        (whose kernels write back), unsharded, not compiled, and a plain
        ``torch.optim.Adam``/``AdamW``, fused in every group, with no ``grad_scale`` of its
        own, that steps exactly the guided gradients.
        """
        a0 = a[0]
        if (a0 == 1.0 or not 1e-30 < abs(a0) < 1e30 or any(x != a0 for x in a)
                or any(bi != 0.0 for row in b for bi in row) or group is not None
                or any(g.dtype != torch.float32 for g in grads)
                or fused_mod.base_refusal(self.base_optimizer, grads, (torch.optim.Adam, torch.optim.AdamW))):
            return None
        return torch.full((), 1.0 / a0, device=grads[0].device)

    @staticmethod
    def _host_read(stats: Tensor, coef: Coefficients, norms: bool = False) -> list[float]:
        """[sum |g|^2, a, b, figures] and, with ``norms``, each block's ``|g|^2`` and
        ``|r_i|^2`` (``stats`` without the dot products), in one device-to-host read."""
        parts = [stats[:, 0].sum().reshape(1), coef.a, coef.b.flatten(), coef.figures]
        if norms:
            k = (stats.shape[1] - 1) // 2
            parts += [stats[:, 0], stats[:, 1 + k:].flatten()]
        return torch.cat(parts).tolist()

    def _first_overflow(self, guided: list[tuple[int, int, Tensor]], grads: list[Tensor],
                        refs: list[list[Optional[Store]]], a: list[float], b: list[list[float]],
                        norms: list[float], group: Any) -> Optional[int]:
        """Flat index of the first parameter whose guided gradient ``a g + sum_i b_i r_i``
        would overflow its own dtype (float16: the cone can move a block's mass onto fewer
        elements), -1 if only another rank's shard would, else None.

        Every element of the rewrite, and every partial sum on the way, is at most the
        block bound ``|a| |g| + sum_i |b_i| |r_i|`` (``norms``: each block's ``|g|^2``, then
        its ``|r_i|^2``); only a tensor whose bound exceeds its dtype's range is rewritten
        in fp32, partial sum by partial sum, to check: a rare path.
        """
        k = len(b[0]) if b else 0
        num_blocks = len(norms) // (1 + k)
        gg, rr = norms[:num_blocks], norms[num_blocks:]
        # The bounds come from the global statistics, so every rank (FSDP2) finds the same
        # suspects, and only a step with one pays the check and its collective.
        suspects = []
        for (i, blk, _), g, rs, at, bt in zip(guided, grads, refs, a, b):
            fmax = _dtype_max(g.dtype)
            if fmax is not None and abs(at) * math.sqrt(gg[blk]) + sum(
                    abs(bi) * math.sqrt(rr[blk * k + j]) for j, bi in enumerate(bt) if bi != 0.0) >= fmax:
                suspects.append((i, g, rs, at, bt, fmax))
        if not suspects:
            return None
        bad = None
        for i, g, rs, at, bt, fmax in suspects:
            # in fp32, each partial sum as apply_guidance_ writes it (two references may
            # cancel in the final value after the first has overflowed)
            out = g.float() * at
            fits = out.numel() == 0 or bool(out.abs().max() <= fmax)
            for r, bi in zip(rs, bt):
                if fits and r is not None and bi != 0.0:
                    r.add_to_(out, bi)
                    fits = bool(out.abs().max() <= fmax)
            if not fits:
                bad = i
                break
        if group is None:
            return bad
        flag = torch.tensor([0.0 if bad is None else 1.0], device=grads[0].device)
        torch.distributed.all_reduce(flag, group=group)
        return bad if bad is not None else (-1 if flag.item() > 0 else None)

    def _first_nonfinite(self, guided: list[tuple[int, int, Tensor]], group: Any) -> Optional[int]:
        """Flat index of the first parameter with a non-finite gradient, -1 if only another
        rank's shard has one (FSDP2: every rank must take the same branch), else None."""
        bad = next((i for i, _, p in guided if not bool(torch.isfinite(local_shard(p.grad)).all())), None)
        if group is None:
            return bad
        flag = torch.tensor([0.0 if bad is None else 1.0], device=local_shard(guided[0][2].grad).device)
        torch.distributed.all_reduce(flag, group=group)
        return bad if bad is not None else (-1 if flag.item() > 0 else None)

    def _device_block_ids(self, ids: tuple[int, ...], device: torch.device) -> Tensor:
        """Block index of each guided tensor, kept on the device: no host-to-device copy
        per step while the set of parameters with gradients stays the same."""
        cached = self._step.block_ids
        if cached is None or cached[0] != (ids, device):
            cached = self._step.block_ids = ((ids, device), torch.tensor(ids, device=device))
        return cached[1]

    def _device_gram(self, device: torch.device) -> Tensor:
        st = self._guidance
        assert st.gram is not None
        if st.gram.device != device:
            st.gram = st.gram.to(device)
        return st.gram

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
        st = self._guidance
        out: dict[str, Any] = {"step": st.accepted + st.skipped, "skipped": st.skipped}
        figures = self._step.figures
        if figures is None:
            return out
        if isinstance(figures, Tensor):
            figures = self._step.figures = figures.tolist()
        n = len(FIGURES)
        out.update(zip(FIGURES, figures[:n]))
        k = (len(figures) - n) // 2
        out["alignment"], out["weights"] = figures[n:n + k], figures[n + k:]
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus a ``"guidance"`` entry (tensors and
        primitives only, so ``torch.load(weights_only=True)`` reads it). State-dict hooks
        registered on this optimizer run as torch's run them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        state["guidance"] = pack_guidance(self._guidance, self.config, self.reference_mode,
                                          [list(p.shape) for _, p in self._flat_params()])
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            state = state if result is None else result
        return state

    def guidance_state_dict(self) -> dict[str, Any]:
        """The guidance entry of :meth:`state_dict`, with every sharded (FSDP2) reference
        gathered whole, so the entry does not depend on how the model was sharded.

        For checkpointers that rebuild the optimizer state from ``state`` and
        ``param_groups`` alone, as ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` (behind Accelerate's ``save_state`` under FSDP2)
        does: save this beside it and restore it with :meth:`load_guidance_state_dict`
        *after* the optimizer state (``GuidancePlugin`` registers both with Accelerate).
        Under FSDP2 this is a collective: call it on every rank.

        Example:
            >>> import torch
            >>> opt = GuidedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
            >>> entry = opt.guidance_state_dict()
            >>> entry["accepted"], entry["reference"]
            (0, 'ema')
            >>> opt.load_guidance_state_dict(entry)
        """
        flat = self._flat_params()
        storage = self.config.reference_dtype

        def whole(i: int, store: Store) -> dict[str, Tensor]:
            p = flat[i][1]
            if not is_sharded(p):
                return store.state()
            return make_store(gather(store.dense(), ShardSpec.of(p)), storage).state()

        return pack_guidance(self._guidance, self.config, self.reference_mode,
                             [list(p.shape) for _, p in flat], whole)

    def load_guidance_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore an entry of :meth:`guidance_state_dict`, each rank keeping its shard of
        every reference. Checked field by field before anything changes, as
        :meth:`load_state_dict`; the base optimizer's state is left as it is."""
        flat = self._flat_params()
        storage = self.config.reference_dtype

        def cut(i: int, store: Store) -> Store:
            p = flat[i][1]
            return make_store(local_slice(store.dense().to(local_shard(p).device), ShardSpec.of(p)), storage) \
                if is_sharded(p) else store

        loaded = unpack_guidance(saved, self.config, self.reference_mode, self._guidance.num_sources,
                                 [p for _, p in flat], self._num_blocks(), self._describe, cut)
        self._install(loaded)

    def _install(self, loaded: GuidanceState) -> None:
        """Make a checked, loaded guidance state current; the figures of the last step
        taken before it no longer describe it."""
        self._guidance = loaded
        self._step.figures = None
        if loaded.num_sources:
            self._prepare_sources()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`. Every field of the guidance entry is checked (format,
        scope, reference storage and kind, parameter layout, each tensor's presence, shape
        and dtype) before anything changes; a mismatch raises ``ValueError`` naming it. A
        plain base-optimizer state dict loads with a warning and leaves the guidance
        state as it is. Load-state-dict hooks registered on this optimizer run as torch's
        run them."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else dict(result)
        saved = state_dict.pop("guidance", None)
        if saved is None:
            warnings.warn("state_dict has no 'guidance' entry (a plain optimizer checkpoint?): "
                          "loading the base optimizer state; the guidance state is kept as it is", stacklevel=2)
            self.base_optimizer.load_state_dict(state_dict)
            self._step.figures = None
        else:
            flat = self._flat_params()
            loaded = unpack_guidance(saved, self.config, self.reference_mode, self._guidance.num_sources,
                                     [p for _, p in flat], self._num_blocks(), self._describe)
            self.base_optimizer.load_state_dict(state_dict)
            self._install(loaded)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class _AfterGuide(NamedTuple):
    """What a guided step leaves for :meth:`GuidedOptimizer._base_step`: the folded
    ``grad_scale`` (or None), and the EMA update (gradients, references, weight) that
    then waits for the gradients the fused kernel writes back."""

    grad_scale: Optional[Tensor] = None
    ema: Optional[tuple[list[Tensor], list[Store], float]] = None
    fused: Optional[Callable[[], None]] = None  # the fused guided AdamW step, in place of base.step()
    # committed by GuidedOptimizer._commit once the base step has returned
    new_ema: Optional[dict[int, Store]] = None
    blocks: Optional[BlockState] = None
    figures: Any = None


@dataclass
class _StepCache:
    """What the step keeps between calls besides the state: the last figures (for
    ``stats``), the device copy of the block ids, the parameter identities last seen.

    A plain object, not attributes of the optimizer: under ``torch.compile`` Dynamo
    drops attribute writes to a ``torch.optim.Optimizer`` made inside the compiled
    step (torch 2.13), but keeps those to an ordinary object it holds."""

    figures: Union[Tensor, list[float], None] = None
    block_ids: Optional[tuple[Any, Tensor]] = None
    param_ids: tuple[int, ...] = ()


def _dtype_max(dtype: torch.dtype) -> Optional[float]:
    """The largest value of a floating dtype of a much narrower range than fp32's (float16,
    float8), else None (bfloat16's range is fp32's, to within 0.4%)."""
    if not dtype.is_floating_point:
        return None
    fmax = torch.finfo(dtype).max
    return fmax if fmax < torch.finfo(torch.float32).max / 2 else None


# FSDP1 (FullyShardedDataParallel) hands the optimizer flat local shards as plain tensors
# (marked `_fsdp_flattened`); unlike FSDP2's DTensors nothing tells them apart from whole
# gradients, so each rank would guide with its own partial statistics and drift.
_FSDP1 = ("GuidedOptimizer does not support FSDP1 (FullyShardedDataParallel): its gradients are flat "
          "per-rank shards guidance cannot tell from whole ones, so each rank would guide with its own "
          "statistics; use FSDP2 (torch.distributed.fsdp.fully_shard, or Accelerate's fsdp_version: 2) or DDP, "
          "see docs/distributed.md")


def _ranks() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _caller_outside_package() -> int:
    """``stacklevel`` for a warning raised from deep inside this package: the first frame
    outside it (the user's line), however the call got there."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _refuse_unguidable(p: Tensor, describe: Callable[[], str]) -> None:
    """Complex parameters (or gradients), and FSDP1's flat shards in a run of several processes."""
    if getattr(p, "_fsdp_flattened", False) and _ranks() > 1:
        raise NotImplementedError(_FSDP1)
    if p.is_complex() or (p.grad is not None and p.grad.is_complex()):
        raise ValueError(f"parameter {describe()} is complex; guidance supports real parameters only "
                         "(view it as real with torch.view_as_real, or leave it out)")


def _needs_closure(optimizer: Optimizer) -> bool:
    """True when ``optimizer.step`` has a ``closure`` parameter without a default (LBFGS)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def check_keywords(guidance: dict[str, Any], owner: str) -> None:
    """Raise ``TypeError`` for keywords that are not guidance keywords, naming the closest."""
    valid = sorted(GuidanceConfig.keywords())
    unknown = sorted(set(guidance) - set(valid))
    if unknown:
        hints = "".join(f"; did you mean {close[0]!r} for {name!r}?"
                        for name in unknown if (close := difflib.get_close_matches(name, valid, n=1)))
        raise TypeError(f"{owner} got unknown keyword(s) {unknown}{hints} (guidance keywords: {valid})")
