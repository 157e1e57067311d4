"""Drop-in guided AdamW: a few lines of constructor over GuidedOptimizer.

``from sgg_optim import GuidedAdamW as AdamW`` keeps an existing script's call as it is;
guidance keywords may be added beside the AdamW ones.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import GuidanceConfig
from .optimizer import GuidedOptimizer, ReferenceSpec


def split_guidance_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(guidance keywords, base-optimizer keywords)."""
    names = GuidanceConfig.keywords()
    return ({k: v for k, v in kwargs.items() if k in names},
            {k: v for k, v in kwargs.items() if k not in names})


class GuidedAdamW(GuidedOptimizer):
    """``torch.optim.AdamW`` with guidance; same positional signature.

    Example:
        >>> import torch
        >>> from sgg_optim import GuidedAdamW as AdamW
        >>> opt = AdamW(torch.nn.Linear(2, 2).parameters(), 1e-3, direction="project")
        >>> type(opt.base_optimizer).__name__, opt.config.direction
        ('AdamW', 'project')
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 reference: ReferenceSpec = "ema", **kwargs: Any) -> None:
        guidance, base_kwargs = split_guidance_kwargs(kwargs)
        base = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad, **base_kwargs)
        super().__init__(base, reference=reference, **guidance)
