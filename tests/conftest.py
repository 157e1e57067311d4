"""Shared fixtures: tiny deterministic models and a fixed data stream."""

from __future__ import annotations

import copy

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
