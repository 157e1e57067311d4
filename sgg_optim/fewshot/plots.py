"""One PNG per comparison: accuracy bars, gradient-norm curves, update-cosine curves."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence


def _mean_curve(traces: Sequence[Sequence[float]]) -> list[float]:
    n = min(len(t) for t in traces)
    out = []
    for i in range(n):
        vals = [t[i] for t in traces if t[i] is not None and math.isfinite(t[i])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def comparison_plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "",
                    chance: float | None = None) -> Path:
    """Write a 3-panel PNG from result rows (one per strategy and seed, with ``trace``).

    The accuracy axis starts at 0, so bar heights compare as ratios; ``chance`` (default
    the rows' ``eval_majority``, the accuracy of always predicting the majority class) is
    drawn as a dashed line. The update-cosine panel says what a higher value means.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["strategy"]].append(r)
    names = list(by)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    acc = [[r["accuracy"] for r in by[n]] for n in names]
    means = [sum(a) / len(a) for a in acc]
    axes[0].bar(names, means, color=[f"C{i}" for i in range(len(names))], alpha=0.7)
    for i, a in enumerate(acc):
        axes[0].scatter([i] * len(a), a, color="k", s=12, zorder=3)
    axes[0].set_ylabel("eval accuracy (bars: mean, dots: seeds)")
    axes[0].set_ylim(0.0, 1.0)
    if chance is None:
        majority = [r["eval_majority"] for r in rows if r.get("eval_majority") is not None]
        chance = max(majority) if majority else None
    if chance is not None:
        axes[0].axhline(chance, color="0.4", ls="--", lw=1)
        axes[0].text(-0.4, chance + 0.01, f"majority class {100 * chance:.0f}%", fontsize=8, color="0.3")
    for i, n in enumerate(names):
        for key, ax, label in (("grad_norm", axes[1], "gradient norm (before clipping/guidance)"),
                               ("update_cos", axes[2], "cos(update_t, update_t-1)")):
            for r in by[n]:
                ax.plot(r["trace"][key], color=f"C{i}", alpha=0.2, lw=0.8)
            ax.plot(_mean_curve([r["trace"][key] for r in by[n]]), color=f"C{i}", lw=2, label=n)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
    axes[2].set_title("higher: consecutive updates agree (a steadier path);\nnear 0 or negative: updates zig-zag",
                      fontsize=8, color="0.3")
    axes[1].set_yscale("log")
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
