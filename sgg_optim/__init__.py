"""sgg-optim: structured gradient guidance for stable few-shot fine-tuning.

Wrap any optimizer: ``GuidedOptimizer(torch.optim.AdamW(...))``, or swap the import:
``from sgg_optim import GuidedAdamW as AdamW``.

The public names are imported on first use (PEP 562), so tools that only need a
submodule (``sgg-optim --help``) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .adamw import GuidedAdamW
    from .config import GuidanceConfig
    from .integrations.bitsandbytes import GuidedAdamW8bit, GuidedPagedAdamW8bit
    from .optimizer import GuidedOptimizer
    from .reference import Reference, capture_reference

_LAZY = {
    "GuidanceConfig": ".config",
    "GuidedAdamW": ".adamw",
    "GuidedAdamW8bit": ".integrations.bitsandbytes",
    "GuidedOptimizer": ".optimizer",
    "GuidedPagedAdamW8bit": ".integrations.bitsandbytes",
    "Reference": ".reference",
    "capture_reference": ".reference",
}

__all__ = ["GuidanceConfig", "GuidedAdamW", "GuidedAdamW8bit", "GuidedOptimizer", "GuidedPagedAdamW8bit", "Reference",
           "capture_reference", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sgg_optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
