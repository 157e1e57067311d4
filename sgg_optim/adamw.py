"""Drop-in guided AdamW variants: each is a few lines of constructor over GuidedOptimizer.

``from sgg_optim import GuidedAdamW as AdamW`` keeps an existing script's call as it is;
guidance keywords may be added beside the AdamW ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .config import GuidanceConfig
from .optimizer import GuidedOptimizer, ReferenceSpec


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(guidance keywords, base-optimizer keywords)."""
    names = GuidanceConfig.keywords()
    return ({k: v for k, v in kwargs.items() if k in names},
            {k: v for k, v in kwargs.items() if k not in names})


def _bnb_optimizer(name: str) -> Callable[..., Optimizer]:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as e:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(f"{name} needs bitsandbytes: pip install 'sgg-optim[bnb]'") from e
    return getattr(bnb_optim, name)


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
        guidance, base_kwargs = _split(kwargs)
        base = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad, **base_kwargs)
        super().__init__(base, reference=reference, **guidance)


class GuidedAdamW8bit(GuidedOptimizer):
    """bitsandbytes' ``AdamW8bit`` (8-bit blockwise optimizer states) with guidance.

    Guidance edits ``.grad`` in place and then calls bnb's own step: its quantised
    state and its param groups (keyed by ``GlobalOptimManager``) are never touched.
    """

    _base_name = "AdamW8bit"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 reference: ReferenceSpec = "ema", **kwargs: Any) -> None:
        guidance, base_kwargs = _split(kwargs)
        base = _bnb_optimizer(self._base_name)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                               amsgrad=amsgrad, **base_kwargs)
        super().__init__(base, reference=reference, **guidance)


class GuidedPagedAdamW8bit(GuidedAdamW8bit):
    """bitsandbytes' ``PagedAdamW8bit`` (states in paged memory) with guidance."""

    _base_name = "PagedAdamW8bit"
