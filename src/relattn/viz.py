"""Plot helpers: heatmaps of the mask, the PE term and the weights, and an encoding's table.

matplotlib is optional (``pip install relattn[plot]``) and imported only when a plot is drawn.
Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so
plotting touches no global state (no backend switch, no open-figure registry).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PlotUnavailable", "plot_explain", "plot_table", "require_matplotlib"]

# Cells are annotated with their value when the grid is at most this many tokens wide.
_ANNOTATE_MAX = 12


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


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _label(x: float, fmt: str) -> str:
    """``x`` formatted; a value that rounds to zero prints as 0, never ``-0.00``."""
    text = format(x, fmt)
    return format(0.0, fmt) if float(text) == 0 else text


def _heatmap(
    fig, ax, values: np.ndarray, tokens: Sequence[str], title: str, cmap: str, fmt: str,
    dark_high: bool = True,
) -> None:  # fmt: skip
    """One (N, N) panel: queries down, keys across; NaN cells (masked) drawn blank.

    ``dark_high``: the colormap is dark at high values (so their labels are written in white).
    """
    import matplotlib as mpl

    colormap = mpl.colormaps[cmap].with_extremes(bad="#eeeeee")
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=vmin, vmax=vmax)
    n = len(tokens)
    ax.set_xticks(range(n), [f"{t}\n{j}" for j, t in enumerate(tokens)], fontsize=8)
    ax.set_yticks(range(n), [f"{i} {t}" for i, t in enumerate(tokens)], fontsize=8)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)
    ax.set_title(title, fontsize=9)
    if fmt and n <= _ANNOTATE_MAX:
        if fmt.startswith("+") and finite.size and np.abs(finite).max() < 0.5:
            fmt = "+.3f"  # small PE values (gentle ALiBi heads) keep a significant digit
        middle = (vmin + vmax) / 2
        for i in range(n):
            for j in range(n):
                if np.isfinite(values[i, j]):
                    dark = (values[i, j] > middle) == dark_high
                    ax.text(
                        j, i, _label(values[i, j], fmt), ha="center", va="center",
                        fontsize=7, color="white" if dark else "black",
                    )  # fmt: skip
    if fmt:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_explain(
    tokens: Sequence[str],
    mask: Any,
    pe: Any | None,
    weights: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> None:
    """Heatmaps of the causal mask, the PE term and the weights, one panel per head, as a PNG.

    Args:
        tokens: the N token labels (axes: query i down, key j across).
        mask: ``(N, N)`` bool or 0/1, True where key j is visible to query i.
        pe: ``(H, N, N)`` PE(i, j) per head, or None when there is no additive term.
        weights: ``(H, N, N)`` attention weights α per head.
        path: where to write the PNG (always PNG, whatever the suffix).
        title: a line above the panels.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        OSError: ``path`` cannot be written.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    visible = _array(mask) > 0
    w = _array(weights)
    num_heads, n = w.shape[0], len(tokens)
    if visible.shape != (n, n) or w.shape[1:] != (n, n):
        raise ValueError(
            f"mask must be (N, N) and weights (H, N, N) with N = {n} tokens; "
            f"got mask {visible.shape}, weights {w.shape}"
        )
    rows = [("weights α", np.where(visible, w, np.nan), "Blues", ".2f", True)]
    if pe is not None:
        p = _array(pe)
        if p.shape != w.shape:
            raise ValueError(f"pe must have the weights' shape {w.shape}; got {p.shape}")
        rows.insert(0, ("PE(i, j)", np.where(visible, p, np.nan), "viridis", "+.2f", False))

    size = 1.0 + 0.45 * n
    fig = Figure(
        figsize=((num_heads + 1) * size + 1.5, len(rows) * size + 1.2), layout="constrained"
    )
    axes = fig.subplots(len(rows), num_heads + 1, squeeze=False)
    grid = np.where(visible, 1.0, 0.0)
    _heatmap(fig, axes[0, 0], grid, tokens, "causal mask\n(dark: j ≤ i visible)", "Greys", "")
    for r in range(1, len(rows)):
        axes[r, 0].axis("off")
    axes[-1, 0].text(
        0.5, 0.5, "α(i, j) = softmax_j(\n  scale·q_i·k_j\n  + PE(i, j)\n  + Mask(i, j) )",
        ha="center", va="center", fontsize=9, family="monospace", transform=axes[-1, 0].transAxes,
    )  # fmt: skip
    for r, (name, values, cmap, fmt, dark_high) in enumerate(rows):
        for h in range(num_heads):
            label = f"{name}, head {h}"
            _heatmap(fig, axes[r, h + 1], values[h], tokens, label, cmap, fmt, dark_high)
    if title:
        fig.suptitle(title, fontsize=10)
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
    from matplotlib.figure import Figure

    t = _array(table)
    x = _array(offsets)
    if t.ndim != 2 or t.shape[1] != x.shape[0]:
        raise ValueError(f"table must be (H, K) with K = {x.shape[0]} offsets; got {t.shape}")
    panels = 1 if buckets is None else 2
    fig = Figure(figsize=(8, 3.2 * panels + 0.6), layout="constrained")
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
