#!/usr/bin/env python
"""How often the cone acted, per row and learning rate, from a results file's traces.

A cone row rotates a step's gradient when its cosine with the reference is below
``cos(max_angle)``; every run's trace keeps that cosine (``ref_cos``; empty while an EMA
reference warms up and direction guidance is off), so the fraction of guided steps on
which the cone acted is read back without training anything. Rows without a cone
(AdamW, projection, SetFit) are skipped.

    python benchmarks/guidance_activity.py benchmarks/results/protocol_v2.jsonl [--k 16]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict

from sgg_optim.fewshot.strategies import get_strategy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    acted: dict[tuple[str, float], list[float]] = defaultdict(list)
    cosines: dict[tuple[str, float], list[float]] = defaultdict(list)
    with open(args.results) as f:
        for line in f:
            row = json.loads(line)
            if row.get("k") != args.k or "trace" not in row:
                continue
            try:
                guidance = get_strategy(row["strategy"]).guidance or {}
            except KeyError:
                continue
            if guidance.get("direction") != "cone":
                continue
            edge = math.cos(math.radians(guidance.get("max_angle", 60.0)))
            cos = [c for c in row["trace"]["ref_cos"] if c is not None and math.isfinite(c)]
            if cos:
                key = (row["strategy"], float(row["lr"]))
                acted[key].append(sum(c < edge for c in cos) / len(cos))
                cosines[key].extend(cos)
    print("| row | lr | runs | guided steps the cone acted on | median cos(g, reference) |")
    print("|---|---|---|---|---|")
    for key in sorted(acted):
        print(f"| {key[0]} | {key[1]:g} | {len(acted[key])} | {100 * statistics.mean(acted[key]):.0f}% "
              f"| {statistics.median(cosines[key]):.2f} |")


if __name__ == "__main__":
    main()
