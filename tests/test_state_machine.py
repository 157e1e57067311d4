"""A stateful property test: random sequences of what a training script does to an optimizer.

Two optimizers over identical parameters receive the same operations; at random points
the second is replaced by a fresh optimizer resumed from the first one's state dict
(through ``torch.save`` / ``torch.load(weights_only=True)``). Invariants after every
operation: parameters stay finite; a skipped (non-finite) step leaves parameters, base
state and guidance state bit-identical; the resumed optimizer matches the
uninterrupted one bit for bit; every error is a ``ValueError``/``TypeError``/
``FloatingPointError`` naming the parameter or field.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sgg_optim import GuidedOptimizer, Reference

SHAPES = {  # name -> (shape, dtype, memory format)
    "scalar": ((), torch.float32, None),
    "empty": ((0, 3), torch.float32, None),
    "conv": ((4, 3, 2, 2), torch.float32, torch.channels_last),
    "matrix": ((5, 7), torch.float32, None),
    "half": ((6,), torch.bfloat16, None),
}
CONFIGS = st.fixed_dictionaries({
    "direction": st.sampled_from(["off", "project", "cone", "blend"]),
    "magnitude": st.sampled_from(["off", "clip", "adaptive"]),
    "scope": st.sampled_from(["global", "group", "tensor"]),
    "reference_dtype": st.sampled_from(["fp32", "bf16", "int8"]),
    "nonfinite": st.sampled_from(["skip", "raise"]),
    "warmup_steps": st.integers(0, 3),
    "max_angle": st.sampled_from([20.0, 60.0]),
    "max_norm": st.sampled_from([0.5, 5.0]),
    "spike_factor": st.sampled_from([1.5, 3.0]),
})


def _param(shape, dtype, fmt, gen):
    t = torch.randn(shape, generator=gen).to(dtype)
    if fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return torch.nn.Parameter(t)


def _canon(obj):
    """A comparable copy of a state dict: tensors by dtype, shape and exact bytes."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        return ("tensor", str(obj.dtype), tuple(obj.shape), bytes(flat.view(torch.uint8).tolist()))
    if isinstance(obj, dict):
        return {k: _canon(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    return obj


def _snapshot(params, opt, counters=True):
    """Parameters and the optimizer's state dict, after a round trip through torch.save."""
    buf = io.BytesIO()
    sd = opt.state_dict()
    if not counters:  # a skipped step counts itself, and changes nothing else
        sd["guidance"] = {**sd["guidance"], "skipped": None}
    torch.save(sd, buf)
    return _canon([p.detach() for p in params]), _canon(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


def _same(a, b):
    return a == b


class Training(RuleBasedStateMachine):
    """``live`` runs uninterrupted; ``twin`` is resumed from ``live`` at random points."""

    @initialize(cfg=CONFIGS, names=st.lists(st.sampled_from(list(SHAPES)), min_size=1, max_size=4, unique=True),
                split=st.booleans(), seed=st.integers(0, 2 ** 16))
    def build(self, cfg, names, split, seed):
        self.cfg, self.seed, self.extra = cfg, seed, 0
        gen = torch.Generator().manual_seed(seed)
        named = [(n, _param(*SHAPES[n], gen)) for n in names]
        half = max(1, len(named) // 2) if split else len(named)
        self.groups = [named[:half], named[half:]] if named[half:] else [named]
        self.num_sources = 0
        self.live = self._optimizer([[(n, p) for n, p in g] for g in self.groups])
        self.twin = self._optimizer([[(n, torch.nn.Parameter(p.detach().clone())) for n, p in g]
                                     for g in self.groups])
        self.steps = 0

    # -- helpers ---------------------------------------------------------------------
    def _optimizer(self, groups, reference="ema"):
        base = torch.optim.AdamW([{"params": g, "lr": 1e-2 * (i + 1)} for i, g in enumerate(groups)],
                                 weight_decay=0.01)
        opt = GuidedOptimizer(base, reference=reference, **self.cfg)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    def _params(self, which):
        return [p for g in which[0].param_groups for p in g["params"]]

    def _names(self):
        return [n for g in self.live[0].param_groups for n in g["param_names"]]

    def _grads(self, seed, spike, bad):
        gen = torch.Generator().manual_seed(seed)
        grads = []
        for i, p in enumerate(self._params(self.live)):
            g = (torch.randn(p.shape, generator=gen) * (spike if i == 0 else 1.0)).to(p.dtype)
            if p.dim() == 4:
                g = g.contiguous(memory_format=torch.channels_last)
            if bad is not None and i == bad % len(self._params(self.live)) and g.numel():
                g[(0,) * g.dim()] = float("nan")
            grads.append(g)
        return grads

    def _references(self, k, seed):
        gen = torch.Generator().manual_seed(seed)
        params = dict(zip(self._names(), self._params(self.live)))
        return [Reference({n: torch.randn(p.shape, generator=gen) for n, p in params.items()}) for _ in range(k)]

    # -- rules -----------------------------------------------------------------------------
    @rule(seed=st.integers(0, 2 ** 16), spike=st.sampled_from([1.0, 1.0, 50.0]))
    def step(self, seed, spike):
        grads = self._grads(seed, spike, None)
        for opt, _ in (self.live, self.twin):
            for p, g in zip(self._params((opt,)), grads):
                p.grad = g.clone()
            opt.step()
        self.steps += 1
        assert self.live[0].stats["skipped"] == self.twin[0].stats["skipped"]

    @rule(seed=st.integers(0, 2 ** 16), bad=st.integers(0, 7))
    def non_finite_step(self, seed, bad):
        grads = self._grads(seed, 1.0, bad)
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return  # the chosen parameter is empty
        for opt, _ in (self.live, self.twin):
            params = self._params((opt,))
            before = _snapshot(params, opt, counters=False)
            skipped = opt.stats["skipped"]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if self.cfg["nonfinite"] == "raise":
                with pytest.raises(FloatingPointError, match="parameter"):
                    opt.step()
            else:
                opt.step()
                assert opt.stats["skipped"] == skipped + 1
            assert _same(before, _snapshot(params, opt, counters=False))

    @rule()
    def zero_grad(self):
        for opt, _ in (self.live, self.twin):
            opt.zero_grad()
            opt.step()  # a step with no gradient: the base optimizer steps over nothing

    @rule()
    def scheduler_step(self):
        for _, sched in (self.live, self.twin):
            sched.step()

    @precondition(lambda self: self.extra < 2)
    @rule(name=st.sampled_from(list(SHAPES)))
    def add_param_group(self, name):
        gen = torch.Generator().manual_seed(self.seed + 17 + self.extra)
        p = _param(*SHAPES[name], gen)
        label = f"extra{self.extra}.{name}"
        if self.num_sources:  # captured references hold nothing for it: refused, nothing changes
            before = [len(opt.param_groups) for opt, _ in (self.live, self.twin)]
            for opt, _ in (self.live, self.twin):
                with pytest.raises(ValueError, match="cannot add"):
                    opt.add_param_group({"params": [(label, p)], "lr": 3e-3, "initial_lr": 3e-3})
            assert [len(opt.param_groups) for opt, _ in (self.live, self.twin)] == before
            return
        for i, (opt, _) in enumerate((self.live, self.twin)):
            q = p if i == 0 else torch.nn.Parameter(p.detach().clone())
            opt.add_param_group({"params": [(label, q)], "lr": 3e-3, "initial_lr": 3e-3})
        self.extra += 1

    @rule(k=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2 ** 16))
    def set_reference(self, k, seed):
        refs = self._references(k, seed) if k else "ema"
        for opt, _ in (self.live, self.twin):
            opt.set_reference(refs if not isinstance(refs, list) or k > 1 else refs[0])
        self.num_sources = k

    @rule()
    def resume(self):
        buf = io.BytesIO()
        torch.save({"opt": self.live[0].state_dict(), "sched": self.live[1].state_dict()}, buf)
        saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        groups = [[(n, torch.nn.Parameter(p.detach().clone())) for n, p in zip(g["param_names"], g["params"])]
                  for g in self.live[0].param_groups]
        reference = "ema"
        if self.num_sources:  # the same kind of reference; its values come from the checkpoint
            names = [n for g in groups for n, _ in g]
            params = [p for g in groups for _, p in g]
            refs = [Reference({n: torch.zeros(p.shape) for n, p in zip(names, params)})
                    for _ in range(self.num_sources)]
            reference = refs if self.num_sources > 1 else refs[0]
        base = torch.optim.AdamW([{"params": g} for g in groups], lr=1.0)
        opt = GuidedOptimizer(base, reference=reference, **self.cfg)
        opt.load_state_dict(saved["opt"])
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        sched.load_state_dict(saved["sched"])
        self.twin = (opt, sched)

    @rule(field=st.sampled_from(["norm_ema", "norm_count", "align_ema", "align_count", "layout", "accepted",
                                 "ema_since", "refs"]))
    def load_a_corrupted_checkpoint(self, field):
        opt = self.twin[0]
        sd = self.live[0].state_dict()
        sd["guidance"] = dict(sd["guidance"])
        sd["guidance"][field] = {"refs": {10 ** 6: {}}}.get(field, torch.zeros(7, 2, 2))
        before = _snapshot(self._params(self.twin), opt)
        with pytest.raises(ValueError, match=field if field != "layout" else "layout|parameters"):
            opt.load_state_dict(sd)
        assert _same(before, _snapshot(self._params(self.twin), opt))

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def finite_parameters(self):
        for p in self._params(self.live):
            assert torch.isfinite(p).all()

    @invariant()
    def resumed_equals_uninterrupted(self):
        assert _same(_snapshot(self._params(self.live), self.live[0]),
                     _snapshot(self._params(self.twin), self.twin[0]))
        live, twin = self.live[0].stats, self.twin[0].stats
        assert (live["step"], live["skipped"]) == (twin["step"], twin["skipped"])


Training.TestCase.settings = settings(max_examples=60, stateful_step_count=12, deadline=None, derandomize=True,
                                      suppress_health_check=list(HealthCheck))
TestTraining = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")(Training.TestCase)
