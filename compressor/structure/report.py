"""Human views of a ScoreTable: a text table and a PNG plot (one line per metric over depth)."""

from __future__ import annotations

import io
import math

from .scores import METRICS, ScoreTable


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def score_table_text(table: ScoreTable) -> str:
    """Fixed-width table: one row per block, one column per metric (and branch metric when present)."""
    cols: list[tuple[str, list[float]]] = [(m, table.blocks[m]) for m in METRICS if m in table.blocks]
    for kind, metrics in table.sublayers.items():
        short = "attn" if kind == "attention" else kind
        cols += [(f"{short}.{m}", metrics[m]) for m in ("bi", "loss", "kl") if m in metrics]
    widths = [max(9, len(name) + 1) for name, _ in cols]
    lines = ["block " + "".join(name.rjust(w) for (name, _), w in zip(cols, widths))]
    for i in range(table.depth):
        lines.append(f"{i:5d} " + "".join(_fmt(values[i]).rjust(w) for (_, values), w in zip(cols, widths)))
    if table.angular:
        n = max(table.angular)
        d = table.angular[n]
        best = min(range(len(d)), key=lambda i: d[i])
        lines.append(f"angular distance d(l, l+{n}): smallest at l={best} ({d[best]:.4f})")
    if table.base_loss is not None:
        lines.append(f"base calibration loss: {table.base_loss:.4f}")
    lines.append("higher = more important; loss/kl: increase when the unit alone is skipped")
    return "\n".join(lines)


def score_plot_png(table: ScoreTable) -> bytes:
    """PNG with one line per block metric over depth, each scaled to [0, 1] (min-max) to share one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    xs = list(range(table.depth))
    for name in METRICS:
        values = table.blocks.get(name)
        if not values or any(math.isnan(v) for v in values):
            continue
        lo, hi = min(values), max(values)
        scaled = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
        ax.plot(xs, scaled, marker="o", markersize=3, label=f"{name} [{_fmt(lo)}, {_fmt(hi)}]")
    ax.set_xlabel("block")
    ax.set_ylabel("importance (min-max scaled)")
    ax.set_title("block importance scores")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
