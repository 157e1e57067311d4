#!/usr/bin/env python
"""Where a chosen-lr difference comes from: the row at a fixed lr, or the lr choice.

At the validation-chosen lr a row and its baseline are compared on each (task, K, seed)
pair at the lr each one chose. That difference splits exactly, in either order
(:func:`sgg_optim.fewshot.results.choice_split`), into the row's effect at one fixed lr
(the row's chosen lr, or the baseline's) and what the other lr choice does (to the
baseline, or to the row; zero where both chose the same lr). A method that helps shows it
in the fixed-lr part whichever lr is held; the rest comes with a choice made on 16
validation examples per class. This prints both orders, over all pairs, split by
whether the choices agree, and by task, from a results file (nothing trained).

    python benchmarks/lr_choice_split.py benchmarks/results/protocol_v2.jsonl \\
        --row setfit+cone-ema --baseline setfit
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from sgg_optim.fewshot.results import ChoiceSplit, bootstrap_ci, choice_split


def _cell(diffs: list[float]) -> str:
    """Mean in points and its bootstrap interval (no interval under two values)."""
    mean = 100 * sum(diffs) / len(diffs)
    lo, hi = bootstrap_ci(diffs)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:+.1f}"
    return f"{mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--row", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    with open(args.results) as f:
        rows = [r for r in map(json.loads, f)
                if r.get("k") == args.k and r["strategy"] in (args.row, args.baseline)]
    groups: dict[str, list[ChoiceSplit]] = defaultdict(list)
    for pair, parts in choice_split(rows, args.row, args.baseline).items():
        for g in ("all pairs", "same lr chosen" if parts.same_lr else "different lr chosen", pair[0]):
            groups[g].append(parts)
    print(f"{args.row} - {args.baseline}, accuracy points, each at its validation-chosen lr (K={args.k}); "
          f"the row's effect at a fixed lr, and the lr choice's part (the rest)\n")
    r, b = args.row, args.baseline
    print(f"| pairs | n | Δ [95% CI] | at {r}'s lr | the rest ({b} at {r}'s lr - at its own) "
          f"| at {b}'s lr | the rest ({r} at its lr - at {b}'s) |")
    print("|---|---|---|---|---|---|---|")
    order = ["all pairs", "same lr chosen", "different lr chosen"]
    for g in order + sorted(set(groups) - set(order)):
        if groups.get(g):
            splits = groups[g]
            cols = [[p.difference for p in splits], [p.at_row_lr for p in splits],
                    [p.difference - p.at_row_lr for p in splits], [p.at_baseline_lr for p in splits],
                    [p.difference - p.at_baseline_lr for p in splits]]
            print(f"| {g} | {len(splits)} | " + " | ".join(map(_cell, cols)) + " |")


if __name__ == "__main__":
    main()
