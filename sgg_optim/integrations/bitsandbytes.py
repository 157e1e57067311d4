"""bitsandbytes integration: guided 8-bit and paged AdamW.

Thin constructors over :class:`~sgg_optim.GuidedOptimizer`; bitsandbytes is imported
only when one is built. Guidance edits ``.grad`` in place before bnb's own ``step``, so
bnb's quantised optimizer state is never touched and its param groups (which
``GlobalOptimManager`` keys on by index and ``id``) are never rebuilt or reordered.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.nn import Module
from torch.optim import Optimizer

from ..adamw import GuidedAdamW


def _bnb_optimizer(name: str) -> Callable[..., Optimizer]:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as e:  # pragma: no cover - exercised only without bitsandbytes
        raise ImportError(f"{name} needs bitsandbytes: pip install 'sgg-optim[bnb]'") from e
    return getattr(bnb_optim, name)


class GuidedAdamW8bit(GuidedAdamW):
    """bitsandbytes' ``AdamW8bit`` (8-bit blockwise optimizer states) with guidance.

    Guidance edits ``.grad`` in place and then calls bnb's own step: its quantised
    state and its param groups (keyed by ``GlobalOptimManager``) are never touched.
    """

    _base_name = "AdamW8bit"

    @classmethod
    def base_class(cls) -> Callable[..., Optimizer]:
        """bitsandbytes' optimizer class (imported only now)."""
        return _bnb_optimizer(cls._base_name)


class GuidedPagedAdamW8bit(GuidedAdamW8bit):
    """bitsandbytes' ``PagedAdamW8bit`` (states in paged memory) with guidance."""

    _base_name = "PagedAdamW8bit"


def keep_4bit_layout_for_training(model: Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.50 rewrites a ``Linear4bit`` weight in
    place into an inference-only layout the first time the layer runs in eval mode
    without grad. After that, training forwards go through ``gemv_4bit``, which has no
    autograd formula: the gradient stops at every frozen 4-bit layer, so LoRA adapters
    before the last layer get wrong gradients (off by ~40% in a 2-layer Llama), and the
    "frozen" packed weight bytes have changed. QLoRA recipes that evaluate between
    training steps hit this; call this once after loading the model.

    Example:
        >>> import torch, bitsandbytes as bnb
        >>> model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32))
        >>> keep_4bit_layout_for_training(model)
        1
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - exercised only without bitsandbytes
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)
