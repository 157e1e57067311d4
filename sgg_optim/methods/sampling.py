"""Class-balanced sampling and the eval-mode context: the two helpers every method and the
benchmark share (a reference, a retention probe and a batch of shots all draw the same way).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn


def class_pools(labels: Sequence[int]) -> list[list[int]]:
    """Indices of each class, classes in sorted order.

        >>> class_pools([1, 0, 1, 2])
        [[1], [0, 2], [3]]
    """
    return [[i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))]


def balanced_draw(pools: Sequence[Sequence[int]], per_class: int, rng: random.Random) -> list[int]:
    """``per_class`` indices drawn without replacement from every non-empty pool (fewer
    where a pool is smaller), pool by pool.

        >>> balanced_draw([[0, 1, 2], [3]], 2, random.Random(0))
        [1, 2, 3]
    """
    return [i for pool in pools if pool for i in rng.sample(list(pool), min(per_class, len(pool)))]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Dropout off inside the block; the module's previous mode restored after, also on error.

        >>> layer = nn.Dropout().train()
        >>> with eval_mode(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
