"""Shared fixtures: tiny deterministic models, a fixed data stream and a user's labelled file."""

from __future__ import annotations

import copy
import json

import pytest
import torch


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, torch.randint(0, 3, (16,), generator=g)


def backward(model: torch.nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    x, y = batch(step)
    loss = torch.nn.functional.cross_entropy(model(x), y) * scale
    loss.backward()
    return loss.detach()


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        opt.zero_grad()
        backward(model, s)
        opt.step()


@pytest.fixture
def twin_models():
    m = tiny_mlp()
    return m, copy.deepcopy(m)


class GradientWatch:
    """What guidance did to the gradients, seen from outside, step by step.

    A step pre-hook on the guided optimizer copies the gradients as ``step()`` begins; a
    post-hook compares them with the gradients the base optimizer stepped with (guidance
    rewrites ``p.grad`` in place; the base optimizer does not touch it). Under FSDP2 each
    rank compares its own shards. Public hooks only, so it works on any wrapper.

    ``changed[i]``: step ``i`` rewrote at least one gradient; ``stats[i]``: ``opt.stats``
    after it; ``acted[i]``: the stats say a rule changed something (a direction rule
    acted on a block, ``projected > 0``, or a magnitude rule scaled one, ``scale < 1``).
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.changed: list[bool] = []
        self.stats: list[dict] = []
        self._before: list[torch.Tensor] = []
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    def _grads(self) -> list[torch.Tensor]:
        grads = [p.grad for group in self.opt.param_groups for p in group["params"] if p.grad is not None]
        return [g.to_local() if hasattr(g, "to_local") else g for g in grads]

    def _pre(self, opt, args, kwargs) -> None:
        self._before = [g.detach().clone() for g in self._grads()]

    def _post(self, opt, args, kwargs) -> None:
        after = self._grads()
        self.changed.append(len(after) != len(self._before)
                            or any(not torch.equal(a, b) for a, b in zip(after, self._before)))
        self.stats.append(dict(self.opt.stats))

    @property
    def acted(self) -> list[bool]:
        return [s.get("projected", 0) > 0 or s.get("scale", 1.0) < 1.0 for s in self.stats]

    def assert_rewrote_where_reported(self, min_steps: int = 1) -> None:
        """Gradients changed on exactly the steps whose stats report guidance acting, and
        on at least ``min_steps`` of them."""
        assert len(self.changed) == len(self.stats) > 0
        assert self.changed == self.acted, list(zip(self.changed, self.acted))
        assert sum(self.changed) >= min_steps, self.changed


POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILL = ["the", "film", "was", "it", "is", "very"]


def rows(n=40):
    """Labelled rows as a user's file holds them: text, a hypothesis column and a string label."""
    return [{"text": f"the film was {(POS if i % 2 else NEG)[i % 4]}", "hyp": f"it is {(POS if i % 2 else NEG)[0]}",
             "label": "pos" if i % 2 else "neg"} for i in range(n)]


@pytest.fixture
def data_file(tmp_path):
    """``rows()`` written as a JSONL file (``sgg-optim compare --data``)."""
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path
