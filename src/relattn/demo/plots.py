"""The demo's PNG figures. Uses matplotlib's object API (no pyplot, no global backend state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {
    "none": "#7f7f7f",
    "rope": "#1f77b4",
    "alibi": "#2ca02c",
    "t5": "#d62728",
    "kerple": "#9467bd",
    "offset": "#ff7f0e",
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_perplexity(results: dict[str, list[dict]], context: int, path: Path) -> Path:
    """Held-out perplexity against evaluation length, one line per encoding.

    Args:
        results: encoding name -> the evaluation rows (``length``, ``ppl``) of that model.
        context: the training length, marked on the plot.
        path: where to write the PNG.
    """
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    lengths = sorted({row["length"] for rows in results.values() for row in rows})
    for name, rows in results.items():
        xs = [row["length"] for row in rows]
        ys = [row["ppl"] for row in rows]
        ax.plot(xs, ys, marker="o", label=name, color=COLORS.get(name))
    ax.axvline(context, color="black", linestyle=":", linewidth=1)
    ymin, ymax = ax.get_ylim()
    ax.text(context, ymax, " trained at", va="top", ha="left", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("evaluation length (bytes)")
    ax.set_ylabel("held-out perplexity per byte (log)")
    ax.set_title(f"Train at {context}, test longer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def plot_tables(
    tables: dict[str, list[np.ndarray]], context: int, path: Path, lo: int = 0
) -> Path | None:
    """Learned bias against offset for every head, one subplot per (encoding, layer).

    Args:
        tables: encoding name -> one ``(H, n)`` array per layer, column ``t`` for offset ``lo + t``.
        context: the training length; offsets beyond ``context - 1`` were never trained on.
        path: where to write the PNG.

    Returns:
        ``path``, or None if there is nothing to plot.
    """
    if not tables:
        return None
    rows, cols = len(tables), max(len(t) for t in tables.values())
    fig = _figure(3.4 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (name, layers) in enumerate(tables.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(layers):
                ax.set_axis_off()
                continue
            table = layers[c]
            offsets = np.arange(lo, lo + table.shape[1])
            for h in range(table.shape[0]):
                ax.plot(offsets, table[h], linewidth=1, label=f"head {h}")
            ax.axvline(context - 1, color="black", linestyle=":", linewidth=1)
            ax.set_xscale("symlog", linthresh=1, linscale=0.4)
            ax.set_xlim(lo, offsets[-1])
            ticks = [0] + [2**p for p in range(0, int(np.log2(max(1, offsets[-1]))) + 1, 2)]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_title(f"{name}, layer {c}", fontsize=9)
            ax.set_xlabel("offset i − j", fontsize=8)
            ax.set_ylabel("bias", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=6)
    fig.suptitle("Learned position tables (dotted: longest offset seen in training)", fontsize=10)
    fig.savefig(path)
    return path


def plot_attention(
    weights: dict[str, np.ndarray], layer: int, head: int, context: int, path: Path
) -> Path | None:
    """One head's attention weights on the same sample, one panel per encoding.

    Args:
        weights: encoding name -> ``(N, N)`` weights (rows: queries, columns: keys).
        layer, head: which head is shown (for the title).
        context: the training length, marked on each panel.
        path: where to write the PNG.
    """
    if not weights:
        return None
    from matplotlib.colors import PowerNorm

    n = len(weights)
    fig = _figure(2.9 * n + 0.6, 3.2)
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (name, w) in zip(axes, weights.items(), strict=True):
        image = ax.imshow(w, cmap="viridis", norm=PowerNorm(0.3, vmin=0, vmax=1))
        ax.axhline(context - 0.5, color="white", linestyle=":", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("query i", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="α(i, j)")
    fig.suptitle(
        f"Attention weights, layer {layer} head {head} (dotted: training length)", fontsize=10
    )
    fig.savefig(path)
    return path
