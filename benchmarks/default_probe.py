"""Which part of the default guidance moves the one-import swap, on the toy task of
``examples/replace_adamw.py`` (synthetic 4-class data, 10% flipped labels, 200 AdamW
steps, lr 3e-3, held-out accuracy, 5 seeds, same initialisation and batches per seed).

A mechanism probe, not a benchmark: defaults are chosen on the few-shot validation
protocol (``sgg-optim bench``, docs/results.md), never on this.

    python benchmarks/default_probe.py
"""

import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from replace_adamw import run  # noqa: E402

from sgg_optim import GuidedAdamW  # noqa: E402

VARIANTS = {"defaults (cone 60, adaptive, EMA 0.9)": {}, "magnitude only (direction off)": {"direction": "off"},
            "cone only (magnitude off)": {"magnitude": "off"}, "cone 80": {"max_angle": 80},
            "EMA beta 0.99": {"ema_beta": 0.99}, "project (A-GEM) on the EMA": {"direction": "project"}}


def main() -> None:
    seeds = range(5)
    base = [run(torch.optim.AdamW, s, 200)[0] for s in seeds]
    print("| optimizer | held-out accuracy % (mean of 5 seeds) | paired difference vs AdamW | seeds ahead |")
    print("|---|---|---|---|")
    print(f"| torch.optim.AdamW | {100 * statistics.fmean(base):.1f} | — | — |")
    for name, kw in VARIANTS.items():
        acc = [run(functools.partial(GuidedAdamW, **kw), s, 200)[0] for s in seeds]
        diff = [b - a for a, b in zip(base, acc)]
        print(f"| GuidedAdamW, {name} | {100 * statistics.fmean(acc):.1f} | {100 * statistics.fmean(diff):+.1f} | "
              f"{sum(d > 0 for d in diff)}/5 |", flush=True)


if __name__ == "__main__":
    main()
