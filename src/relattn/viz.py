"""Every figure the tools draw: explain's heatmaps and tables, the demo's perplexity, loss,
learned-table and attention figures.

matplotlib is optional (``pip install relattn[plot]``) and imported only when a plot is drawn.
Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so
plotting touches no global state (no backend switch, no open-figure registry). Attention weights
are always drawn on a linear scale from 0 to 1, and masked cells (no dot product computed) in a
hatched grey that no weight can take.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PlotUnavailable",
    "format_number",
    "plot_attention_heads",
    "plot_explain",
    "plot_learned_tables",
    "plot_loss",
    "plot_perplexity",
    "plot_table",
    "require_matplotlib",
]

# Cells are annotated with their value when the grid is at most this many tokens wide.
_ANNOTATE_MAX = 12
# Token labels are drawn on every axis tick up to this many tokens, then thinned.
_LABEL_MAX = 40
MASKED = "#d9d9d9"
MASKED_NOTE = "grey: masked (j > i), no dot product"
# Masked cells are also hatched up to this many tokens.
_HATCH_MAX = 24


class PlotUnavailable(ImportError):
    """matplotlib is missing; the message names the extra that installs it."""


def require_matplotlib() -> Any:
    """Import matplotlib, or raise :class:`PlotUnavailable` naming the ``plot`` extra."""
    try:
        import matplotlib  # the parent first: a cached submodule must not hide its absence
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise PlotUnavailable(
            "plotting needs matplotlib, which is not installed: pip install relattn[plot]"
        ) from e
    return matplotlib


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def format_number(x: float, fmt: str) -> str:
    """``x`` formatted with ``fmt`` (``"+.3f"``, ``".2f"``), its sign always right: exactly zero
    prints as zero (``+0.000``, never ``-0.000``), and a nonzero value that would round to zero
    gets up to three more decimals (``-0.0004``), or else keeps its sign (``-0.000``), never
    ``+0.000`` for a negative value."""
    text = format(x, fmt)
    if x == 0:
        return format(0.0, fmt)
    if float(text) != 0 or not fmt.endswith("f"):
        return text
    head, _, digits = fmt[:-1].rpartition(".")
    for extra in range(1, 4):
        longer = format(x, f"{head}.{int(digits or 6) + extra}f")
        if float(longer) != 0:
            return longer
    return text


_label = format_number


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per name from matplotlib's default cycle, in order (no fixed list of names)."""
    import matplotlib as mpl

    cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _token_axes(ax, tokens: Sequence[str], fontsize: float = 8) -> None:
    n = len(tokens)
    step = max(1, -(-n // _LABEL_MAX))
    ticks = list(range(0, n, step))
    ax.set_xticks(
        ticks,
        [f"{tokens[j]}\n{j}" if n <= _ANNOTATE_MAX else tokens[j] for j in ticks],
        fontsize=fontsize,
    )
    ax.set_yticks(ticks, [f"{i} {tokens[i]}" for i in ticks], fontsize=fontsize)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)


def _heatmap(ax, values: np.ndarray, cmap: str, vmin: float, vmax: float):
    """One (N, N) panel: queries down, keys across; NaN cells (masked) hatched grey."""
    import matplotlib as mpl

    n = values.shape[0]
    colormap = mpl.colormaps[cmap].with_extremes(bad=MASKED)
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    from matplotlib.patches import Rectangle

    hidden = ~np.isfinite(values)
    if n > _HATCH_MAX:  # hatching many cells is slow to render; the grey alone is distinct
        return image
    for i in range(n):  # one hatched strip per row over its run of masked cells
        cols = np.flatnonzero(hidden[i])
        if cols.size:
            ax.add_patch(
                Rectangle(
                    (cols[0] - 0.5, i - 0.5),
                    cols[-1] - cols[0] + 1,
                    1,
                    fill=False,
                    hatch="///",
                    edgecolor="#9a9a9a",
                    linewidth=0,
                )
            )
    return image


def _annotate(ax, values: np.ndarray, fmt: str, vmin: float, vmax: float, dark_high: bool):
    n = values.shape[0]
    middle = (vmin + vmax) / 2
    for i in range(n):
        for j in range(n):
            if np.isfinite(values[i, j]):
                dark = (values[i, j] > middle) == dark_high
                ax.text(
                    j,
                    i,
                    _label(values[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )


def plot_explain(
    tokens: Sequence[str],
    mask: Any,
    pe: Any | None,
    weights: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    heads: Sequence[int] | None = None,
) -> None:
    """Heatmaps of the causal mask, the PE term and the weights, one column per head, as a PNG.

    Weights share one linear colour scale from 0 to 1; the PE panels share one scale across
    heads; masked cells are hatched grey, distinct from a weight of 0.

    Args:
        tokens: the N token labels (axes: query i down, key j across).
        mask: ``(N, N)`` bool or 0/1, True where key j is visible to query i.
        pe: ``(H, N, N)`` PE(i, j) per head, or None when there is no additive term.
        weights: ``(H, N, N)`` attention weights α per head.
        path: where to write the PNG (always PNG, whatever the suffix).
        title: a line above the panels.
        heads: the head numbers of the H panels (default ``0..H-1``).

    Raises:
        PlotUnavailable: matplotlib is not installed.
        OSError: ``path`` cannot be written.
    """
    require_matplotlib()
    visible = _array(mask) > 0
    w = _array(weights)
    num_heads, n = w.shape[0], len(tokens)
    if visible.shape != (n, n) or w.shape[1:] != (n, n):
        raise ValueError(
            f"mask must be (N, N) and weights (H, N, N) with N = {n} tokens; "
            f"got mask {visible.shape}, weights {w.shape}"
        )
    heads = list(range(num_heads)) if heads is None else list(heads)
    rows = [("weights α", np.where(visible, w, np.nan), "Blues", ".2f", True, 0.0, 1.0)]
    if pe is not None:
        p = _array(pe)
        if p.shape != w.shape:
            raise ValueError(f"pe must have the weights' shape {w.shape}; got {p.shape}")
        shown = np.where(visible, p, np.nan)
        finite = shown[np.isfinite(shown)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        fmt = "+.3f" if finite.size and np.abs(finite).max() < 0.5 else "+.2f"
        rows.insert(0, ("PE(i, j)", shown, "viridis", fmt, False, lo, hi))

    size = min(6.0, 1.2 + 0.42 * n)
    fig = _figure((num_heads + 1) * size + 1.2, len(rows) * size + 1.4)
    axes = fig.subplots(len(rows), num_heads + 1, squeeze=False)
    ax = axes[0, 0]
    # Drawn as the other panels are: masked cells hatched grey, visible ones white (adding 0).
    _heatmap(ax, np.where(visible, 0.0, np.nan), "Greys", 0.0, 1.0)
    if n <= _ANNOTATE_MAX:
        _annotate(ax, np.where(visible, 0.0, np.nan), ".0f", 0.0, 1.0, True)
    _token_axes(ax, tokens)
    ax.set_title("causal mask Mask(i, j)\n(white: j ≤ i visible, adds 0)", fontsize=9)
    for r in range(1, len(rows)):
        axes[r, 0].axis("off")
    for r, (name, values, cmap, fmt, dark_high, lo, hi) in enumerate(rows):
        image = None
        for c, h in enumerate(heads):
            ax = axes[r, c + 1]
            image = _heatmap(ax, values[c], cmap, lo, hi)
            _token_axes(ax, tokens)
            ax.set_title(f"{name}, head {h}", fontsize=9)
            if n <= _ANNOTATE_MAX:
                _annotate(ax, values[c], fmt, lo, hi, dark_high)
        bar = fig.colorbar(image, ax=list(axes[r, 1:]), shrink=0.9, pad=0.02)
        bar.set_label(
            name + (" (linear, 0 to 1)" if name.startswith("weights") else ""), fontsize=8
        )
        bar.ax.tick_params(labelsize=7)
    formula = "α(i, j) = softmax_j( scale·q_i·k_j + PE(i, j) + Mask(i, j) )"
    fig.suptitle((title + "\n" if title else "") + formula + f"    ({MASKED_NOTE})", fontsize=10)
    fig.savefig(path, format="png", dpi=110)


def plot_attention_heads(
    tokens: Sequence[str], weights: Any, path: str | os.PathLike, *, title: str | None = None
) -> None:
    """Every head of every layer: ``weights[l, h]`` as a grid of heatmaps (layers down, heads
    across), one linear colour scale from 0 to 1, masked cells hatched grey.

    Args:
        tokens: the N token labels.
        weights: ``(L, H, N, N)`` attention weights.
        path: where to write the PNG.
        title: a line above the panels.
    """
    require_matplotlib()
    w = _array(weights)
    layers, heads, n = w.shape[0], w.shape[1], w.shape[2]
    if w.shape[3] != n or len(tokens) != n:
        raise ValueError(f"weights must be (L, H, N, N) with N = {len(tokens)}; got {w.shape}")
    visible = np.tril(np.ones((n, n), dtype=bool))
    size = 3.0
    fig = _figure(heads * size + 1.0, layers * size + 0.9)
    axes = fig.subplots(layers, heads, squeeze=False)
    image = None
    for layer in range(layers):
        for h in range(heads):
            ax = axes[layer, h]
            image = _heatmap(ax, np.where(visible, w[layer, h], np.nan), "Blues", 0.0, 1.0)
            _token_axes(ax, tokens, fontsize=5)
            if h:  # token labels on the outer panels only: text layout dominates drawing time
                ax.set_yticks([])
                ax.set_ylabel("")
            if layer + 1 < layers:
                ax.set_xticks([])
                ax.set_xlabel("")
            ax.set_title(f"layer {layer}, head {h}", fontsize=8)
    bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.8, pad=0.01)
    bar.set_label("α(i, j), linear scale 0 to 1", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + MASKED_NOTE, fontsize=10)
    fig.savefig(path, format="png", dpi=110)


def plot_table(
    table: Any,
    offsets: Any,
    path: str | os.PathLike,
    buckets: Any | None = None,
    *,
    title: str | None = None,
) -> None:
    """An encoding's table ``T[h, Δ]`` against the offset Δ, one line per head, as a PNG.

    Args:
        table: ``(H, K)`` PE values per head for the K offsets.
        offsets: the K offsets Δ (x axis).
        path: where to write the PNG.
        buckets: optional ``(K,)`` bucket index of each offset (T5); drawn in a second panel.
        title: a line above the panels.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        OSError: ``path`` cannot be written.
    """
    require_matplotlib()
    t = _array(table)
    x = _array(offsets)
    if t.ndim != 2 or t.shape[1] != x.shape[0]:
        raise ValueError(f"table must be (H, K) with K = {x.shape[0]} offsets; got {t.shape}")
    panels = 1 if buckets is None else 2
    fig = _figure(8, 3.2 * panels + 0.6)
    axes = fig.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]
    step = "steps-mid" if buckets is not None else "default"
    for h in range(t.shape[0]):
        axes[0].plot(
            x, t[h], drawstyle=step, marker="." if x.size <= 64 else None, label=f"head {h}"
        )
    axes[0].axhline(0.0, color="#999999", linewidth=0.8)
    axes[0].set_ylabel("PE = T[h, Δ]")
    axes[0].legend(fontsize=8, ncols=max(1, t.shape[0] // 8))
    axes[0].grid(alpha=0.3)
    if buckets is not None:
        b = _array(buckets)
        axes[1].plot(x, b, drawstyle="steps-mid", color="black")
        axes[1].set_ylabel("bucket")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("offset Δ = i − j")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png", dpi=110)


def plot_perplexity(results: dict[str, list[dict]], context: int, path: str | os.PathLike):
    """Held-out perplexity against evaluation length, one line per model.

    Args:
        results: model name -> its evaluation rows (``length``, ``ppl``).
        context: the training length, marked on the plot.
        path: where to write the PNG.
    """
    require_matplotlib()
    from matplotlib.ticker import FuncFormatter

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    colors = _colors(list(results))
    lengths = sorted({row["length"] for rows in results.values() for row in rows})
    for name, rows in results.items():
        xs = [row["length"] for row in rows]
        ys = [row["ppl"] for row in rows]
        ax.plot(xs, ys, marker="o", label=name, color=colors[name])
    ax.axvline(context, color="black", linestyle=":", linewidth=1)
    ax.text(context, ax.get_ylim()[1], " trained at", va="top", ha="left", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("evaluation length (bytes)")
    ax.set_ylabel("held-out perplexity per byte (log)")
    ax.set_title(f"Train at {context}, test longer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_loss(curves: dict[str, list[list[float]]], path: str | os.PathLike):
    """Training loss against step, one line per model.

    Args:
        curves: model name -> ``[[step, loss], ...]`` (loss in nats per byte).
        path: where to write the PNG.
    """
    require_matplotlib()
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    colors = _colors(list(curves))
    for name, curve in curves.items():
        if curve:
            steps, losses = zip(*curve, strict=True)
            ax.plot(steps, losses, label=name, color=colors[name], linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png", dpi=110)
    return path


def plot_learned_tables(tables: dict[str, list[np.ndarray]], context: int, path: str | os.PathLike):
    """Learned bias against offset for every head, one subplot per (model, layer).

    Args:
        tables: model name -> one ``(H, n)`` array per layer, column ``t`` for offset ``t``.
        context: the training length; offsets beyond ``context - 1`` were never trained on.
        path: where to write the PNG.

    Returns:
        ``path``, or None if there is nothing to plot.
    """
    if not tables:
        return None
    require_matplotlib()
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
            offsets = np.arange(table.shape[1])
            for h in range(table.shape[0]):
                ax.plot(offsets, table[h], linewidth=1, label=f"head {h}")
            ax.axvline(context - 1, color="black", linestyle=":", linewidth=1)
            ax.set_xscale("symlog", linthresh=1, linscale=0.4)
            ax.set_xlim(0, offsets[-1])
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
    fig.savefig(path, format="png", dpi=110)
    return path
