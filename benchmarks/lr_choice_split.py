#!/usr/bin/env python
"""Where a chosen-lr difference comes from: the row at a fixed lr, or the lr choice.

At the validation-chosen lr a row and its baseline are compared on each (task, K, seed)
pair at the lr each one chose. That difference is exactly the sum of two parts
(:func:`sgg_optim.fewshot.results.choice_split`): the row's effect at the lr it chose, and
what choosing that lr instead of the baseline's would have done to the baseline itself
(zero where both chose the same lr). A method that helps shows it in the first part; the
second is the luck of a choice made on 16 validation examples per class. This prints
both, over all pairs, split by whether the choices agree, and by task, from a results
file (nothing trained).

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
    print(f"{args.row} - {args.baseline}, accuracy points, each at its validation-chosen lr (K={args.k})\n")
    print(f"| pairs | n | Δ [95% CI] | {args.row} - {args.baseline} at {args.row}'s lr "
          f"| {args.baseline} at {args.row}'s lr - at its own |")
    print("|---|---|---|---|---|")
    order = ["all pairs", "same lr chosen", "different lr chosen"]
    for g in order + sorted(set(groups) - set(order)):
        if groups.get(g):
            cols = [_cell([p[i] for p in groups[g]]) for i in range(3)]
            print(f"| {g} | {len(groups[g])} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
