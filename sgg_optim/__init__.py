"""sgg-optim: structured gradient guidance for stable few-shot fine-tuning.

Wrap any optimizer: ``GuidedOptimizer(torch.optim.AdamW(...))``, or swap the import:
``from sgg_optim import GuidedAdamW as AdamW``.
"""

from .adamw import GuidedAdamW
from .config import GuidanceConfig
from .optimizer import GuidedOptimizer
from .integrations.bitsandbytes import GuidedAdamW8bit, GuidedPagedAdamW8bit
from .reference import Reference, capture_reference
from .version import __version__

__all__ = [
    "GuidanceConfig",
    "GuidedAdamW",
    "GuidedAdamW8bit",
    "GuidedOptimizer",
    "GuidedPagedAdamW8bit",
    "Reference",
    "capture_reference",
    "__version__",
]
