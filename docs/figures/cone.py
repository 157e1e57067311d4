"""Draw docs/figures/cone.png: the cone rule rotating g onto the cone around r.

    python docs/figures/cone.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Arc, Wedge  # noqa: E402

MAX_ANGLE = 45.0           # cone half-angle, degrees
R_ANGLE = 10.0             # direction of r
G_ANGLE = R_ANGLE + 115.0  # g is 115 degrees away from r: outside the cone
G_NORM, R_NORM = 1.0, 0.8


def unit(deg: float) -> np.ndarray:
    return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])


def main() -> None:
    r = R_NORM * unit(R_ANGLE)
    g = G_NORM * unit(G_ANGLE)
    # The library's formula: g' = |g| (c r/|r| + sqrt(1-c^2) g_perp/|g_perp|).
    c = np.cos(np.radians(MAX_ANGLE))
    g_perp = g - (g @ r) / (r @ r) * r
    g_rot = np.linalg.norm(g) * (c * r / np.linalg.norm(r) + np.sqrt(1 - c * c) * g_perp / np.linalg.norm(g_perp))

    fig, ax = plt.subplots(figsize=(5.6, 4.4), dpi=110)
    ax.add_patch(Wedge((0, 0), 1.15, R_ANGLE - MAX_ANGLE, R_ANGLE + MAX_ANGLE,
                       color="tab:blue", alpha=0.12, lw=0))
    for side in (-1, 1):
        edge = 1.15 * unit(R_ANGLE + side * MAX_ANGLE)
        ax.plot([0, edge[0]], [0, edge[1]], color="tab:blue", lw=0.8, ls="--")
    ax.add_patch(Arc((0, 0), 2 * G_NORM, 2 * G_NORM, theta1=R_ANGLE + MAX_ANGLE, theta2=G_ANGLE,
                     color="0.45", lw=1.2, ls=":"))
    ax.add_patch(Arc((0, 0), 0.7, 0.7, theta1=R_ANGLE, theta2=R_ANGLE + MAX_ANGLE, color="tab:blue", lw=1))

    def arrow(v: np.ndarray, color: str, **kw: object) -> None:
        ax.annotate("", xy=v, xytext=(0, 0),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=2, shrinkA=0, shrinkB=0, **kw))

    arrow(r, "tab:blue")
    arrow(g, "tab:red")
    arrow(g_rot, "tab:green")
    ax.text(*(r + 0.05 * unit(R_ANGLE - 90)), "r", color="tab:blue", fontsize=13, ha="left", va="top")
    ax.text(*(g * 1.08), "g", color="tab:red", fontsize=13, ha="right", va="bottom")
    ax.text(*(g_rot * 0.55 + 0.05 * unit(R_ANGLE + MAX_ANGLE + 90)), "g'", color="tab:green", fontsize=13,
            ha="right", va="center")
    mid = 0.42 * unit(R_ANGLE + MAX_ANGLE / 2)
    ax.text(*mid, "max_angle", color="tab:blue", fontsize=9, ha="left", va="center")
    ax.text(*(1.05 * unit((R_ANGLE + MAX_ANGLE + G_ANGLE) / 2)), "rotation keeps |g'| = |g|", color="0.35",
            fontsize=9, ha="center", va="bottom")
    inside = "inside the cone\n(cos(g, r) >= cos(max_angle))\ng is left as it is"
    ax.text(*(0.62 * unit(R_ANGLE - MAX_ANGLE / 2)), inside, color="tab:blue", fontsize=8, ha="left", va="center")

    ax.plot(0, 0, "ko", ms=3)
    ax.set_xlim(-0.95, 1.5)
    ax.set_ylim(-0.7, 1.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("direction=\"cone\": g outside the cone is rotated onto its edge", fontsize=10)
    fig.tight_layout()
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
