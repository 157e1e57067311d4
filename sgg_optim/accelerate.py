"""``sgg_optim.accelerate``: the documented import path of the Accelerate integration.

The code lives in :mod:`sgg_optim.integrations.accelerate` (integrations sit at the
edge of the package); this module keeps ``from sgg_optim.accelerate import
GuidancePlugin`` working.
"""

from .integrations.accelerate import ENV_PREFIX, GuidanceCheckpoint, GuidancePlugin, find_guided, flat_stats

__all__ = ["ENV_PREFIX", "GuidanceCheckpoint", "GuidancePlugin", "find_guided", "flat_stats"]
