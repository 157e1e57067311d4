"""bitsandbytes integration: guided 8-bit and paged AdamW.

Thin constructors over :class:`~sgg_optim.GuidedOptimizer`; bitsandbytes is imported
only when one is built.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.optim import Optimizer

from ..adamw import split_guidance_kwargs
from ..optimizer import GuidedOptimizer, ReferenceSpec


def _bnb_optimizer(name: str) -> Callable[..., Optimizer]:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as e:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(f"{name} needs bitsandbytes: pip install 'sgg-optim[bnb]'") from e
    return getattr(bnb_optim, name)


class GuidedAdamW8bit(GuidedOptimizer):
    """bitsandbytes' ``AdamW8bit`` (8-bit blockwise optimizer states) with guidance.

    Guidance edits ``.grad`` in place and then calls bnb's own step: its quantised
    state and its param groups (keyed by ``GlobalOptimManager``) are never touched.
    """

    _base_name = "AdamW8bit"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 reference: ReferenceSpec = "ema", **kwargs: Any) -> None:
        guidance, base_kwargs = split_guidance_kwargs(kwargs)
        base = _bnb_optimizer(self._base_name)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                               amsgrad=amsgrad, **base_kwargs)
        super().__init__(base, reference=reference, **guidance)


class GuidedPagedAdamW8bit(GuidedAdamW8bit):
    """bitsandbytes' ``PagedAdamW8bit`` (states in paged memory) with guidance."""

    _base_name = "PagedAdamW8bit"
