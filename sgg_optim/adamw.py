"""Drop-in guided AdamW: a few lines of constructor over GuidedOptimizer.

``from sgg_optim import GuidedAdamW as AdamW`` keeps an existing script's call as it is;
guidance keywords may be added beside the AdamW ones.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from .config import GuidanceConfig
from .optimizer import GuidedOptimizer, ReferenceSpec, check_keywords


def split_guidance_kwargs(kwargs: dict[str, Any], base: Optional[Callable[..., Any]] = None,
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(guidance keywords, base-optimizer keywords).

    With ``base`` (the base optimizer's class), a keyword that neither guidance nor
    ``base`` accepts raises ``TypeError`` naming the closest valid keyword, instead of
    the base optimizer's bare "unexpected keyword argument".

    Example:
        >>> split_guidance_kwargs({"max_angle": 45, "foreach": True}, torch.optim.AdamW)
        ({'max_angle': 45}, {'foreach': True})
    """
    names = GuidanceConfig.keywords()
    guidance = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    accepted = _keywords(base) if base is not None else None
    if accepted is not None and set(rest) - accepted:
        check_keywords({k: v for k, v in rest.items() if k not in accepted},
                       f"{getattr(base, '__name__', 'the optimizer')} with guidance")
    return guidance, rest


def _keywords(fn: Callable[..., Any]) -> Optional[set[str]]:
    """The keyword names ``fn`` accepts, or None if it takes ``**kwargs`` (or has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)}


class GuidedAdamW(GuidedOptimizer):
    """``torch.optim.AdamW`` with guidance; same positional signature.

    Subclasses guide another AdamW-like optimizer by overriding :meth:`base_class`
    (bitsandbytes' 8-bit and paged variants do).

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
        cls = self.base_class()
        guidance, base_kwargs = split_guidance_kwargs(kwargs, cls)
        base = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **base_kwargs)
        super().__init__(base, reference=reference, **guidance)

    @classmethod
    def base_class(cls) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class that does the update: ``torch.optim.AdamW``."""
        return torch.optim.AdamW
