"""The Concepts page's figures and numbers, computed by relattn while the site builds.

Every figure under ``figures/`` and every ``<!-- relattn: NAME -->`` marker in a page is
produced here by calling relattn (attention weights, encodings' tables, T5's buckets), so the
page cannot drift from the library: nothing on it is typed in by hand.
"""

from __future__ import annotations

import io
import math

import torch
from matplotlib.figure import Figure
from mkdocs.structure.files import File

import relattn
from relattn.cli.explain.compute import embed
from relattn.pe import ALiBi, Kerple, T5Bias, alibi_slopes

TOKENS = "the cat saw the dog".split()
HEAD_DIM = 8
SEED = 4


# ----------------------------------------------------------------------------- numbers


def _qkv():
    """Seeded per-word vectors, as ``relattn explain`` makes them: equal words, equal vectors."""
    return embed(TOKENS, 1, HEAD_DIM, SEED)


def _weights(pe) -> torch.Tensor:
    q, k, _ = _qkv()
    return relattn.attention_weights(q, k, pe)[0, 0]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x: float, fmt: str = "+.3f") -> str:
    text = format(x, fmt)
    return format(0.0, fmt) if float(text) == 0 else text


def table_query_dots() -> str:
    """Query 4's dot products, scores and weights with ALiBi and with no PE."""
    q, k, _ = _qkv()
    i, scale = 4, 1 / math.sqrt(HEAD_DIM)
    alibi = ALiBi(1, slopes=[0.5])
    pe = alibi.bias(len(TOKENS), len(TOKENS))[0]
    with_pe, without = _weights(alibi), _weights(None)
    rows = []
    for j in range(i + 1):
        dot = float(q[0, 0, i] @ k[0, 0, j])
        rows.append(
            [
                f"{j} *{TOKENS[j]}*",
                str(i - j),
                _f(dot),
                _f(scale * dot),
                _f(float(pe[i, j])),
                _f(scale * dot + float(pe[i, j])),
                f"{without[i, j]:.3f}",
                f"{with_pe[i, j]:.3f}",
            ]
        )
    header = [
        "key j",
        "Δ = i − j",
        "q₄·k_j",
        "scale·q·k",
        "PE (ALiBi, m = 0.5)",
        "score",
        "α without PE",
        "α with ALiBi",
    ]
    return _md_table(header, rows)


def table_t5_textbook() -> str:
    """The textbook T5 bucketing with n_b = 3, dist_max = 5."""
    t5 = T5Bias.from_textbook(1, n_b=3, dist_max=5)
    offsets = list(range(0, 9))
    buckets = t5.buckets(torch.tensor(offsets)).tolist()
    return _md_table(["Δ = i − j", *map(str, offsets)], [["bucket", *map(str, buckets)]])


def table_t5_default() -> str:
    """Which offsets share a bucket with T5's defaults (32 buckets, max distance 128)."""
    t5 = T5Bias(1)
    b = t5.buckets(torch.arange(0, 200)).tolist()
    runs: list[list[int]] = []
    for delta, bucket in enumerate(b):
        if runs and runs[-1][0] == bucket:
            runs[-1][2] = delta
        else:
            runs.append([bucket, delta, delta])
    rows = [
        [str(bk), str(lo) if lo == hi else f"{lo}–{hi}" + (" and beyond" if hi == 199 else "")]
        for bk, lo, hi in runs
        if lo != hi or bk >= 14
    ]
    exact = sum(1 for bk, lo, hi in runs if lo == hi == bk)
    head = f"Buckets 0–{exact - 1} hold one offset each (Δ = bucket); then:\n\n"
    return head + _md_table(["bucket", "offsets Δ"], rows)


def table_alibi_slopes() -> str:
    slopes = alibi_slopes(8)
    return _md_table(["head", *map(str, range(8))], [["m_h", *(f"{m:.4g}" for m in slopes)]])


# ----------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _grid_axes(ax, n: int) -> None:
    ax.set_xticks(range(n), [f"{t}\n{j}" for j, t in enumerate(TOKENS)], fontsize=8)
    ax.set_yticks(range(n), [f"{i} {t}" for i, t in enumerate(TOKENS)], fontsize=8)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)


def fig_mask() -> bytes:
    n = len(TOKENS)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    fig = Figure(figsize=(4.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(mask.float().numpy(), cmap="Greys", vmin=0, vmax=1.6)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                "0" if mask[i, j] else "−∞",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if mask[i, j] else "black",
            )
    _grid_axes(ax, n)
    ax.set_title("Mask(i, j): 0 where j ≤ i, −∞ above", fontsize=9)
    return _png(fig)


def fig_scores() -> bytes:
    """scale·q·k, PE and the weights, with and without ALiBi, masked cells blank."""
    q, k, _ = _qkv()
    n = len(TOKENS)
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    scale = 1 / math.sqrt(HEAD_DIM)
    alibi = ALiBi(1, slopes=[0.5])
    panels = [
        ("scale·q_i·k_j", scale * (q[0, 0] @ k[0, 0].T), "RdBu_r", None),
        ("PE(i, j) (ALiBi, m = 0.5)", alibi.bias(n, n)[0], "viridis", None),
        ("α without PE", _weights(None), "Blues", (0, 1)),
        ("α with ALiBi", _weights(alibi), "Blues", (0, 1)),
    ]
    fig = Figure(figsize=(13, 3.7), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (title, values, cmap, limits) in zip(axes, panels, strict=True):
        shown = values.masked_fill(~visible, float("nan")).numpy()
        import matplotlib as mpl

        colormap = mpl.colormaps[cmap].with_extremes(bad="#d9d9d9")
        lo, hi = limits or (float(values[visible].min()), float(values[visible].max()))
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        image = ax.imshow(shown, cmap=colormap, vmin=lo, vmax=hi)
        for i in range(n):
            for j in range(i + 1):
                ax.text(j, i, _f(shown[i, j], ".2f"), ha="center", va="center", fontsize=7)
        _grid_axes(ax, n)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.75)
    fig.suptitle("grey: masked, no dot product computed", fontsize=9)
    return _png(fig)


def fig_t5_buckets() -> bytes:
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    offsets = torch.arange(0, 200)
    for nb, md in ((32, 128), (16, 64)):
        ax.plot(
            offsets,
            T5Bias(1, nb, md).buckets(offsets),
            drawstyle="steps-post",
            label=f"num_buckets {nb}, max_distance {md}",
        )
    ax.set_xlabel("offset Δ = i − j")
    ax.set_ylabel("bucket")
    ax.set_title("T5: one bucket per small offset, then logarithmically wider", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_curves() -> bytes:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    n = 64
    offsets = torch.arange(n + 1)
    with torch.no_grad():
        table = ALiBi(8).table(0, n)
    for h in range(8):
        left.plot(offsets, table[h], label=f"head {h}")
    left.set_title("ALiBi, 8 heads: −m_h·Δ", fontsize=10)
    left.legend(fontsize=7, ncols=2)
    with torch.no_grad():
        for kind, r1, r2 in (
            ("log", 1.0, 1.0),
            ("log", 2.0, 0.2),
            ("power", 0.5, 0.5),
            ("power", 0.05, 1.5),
        ):
            curve = Kerple(1, kind, r1=r1, r2=r2).table(0, n)[0]
            right.plot(offsets, curve, label=f"{kind}: r1={r1}, r2={r2}")
    right.set_title("KERPLE: −r1·log(1 + r2·Δ) and −r1·Δ^r2", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("offset Δ = i − j")
        ax.set_ylabel("PE")
        ax.grid(alpha=0.3)
    return _png(fig)


def _term_image(ax, values: torch.Tensor, title: str) -> None:
    """A causal (n, n) term with the hidden cells blank."""
    import matplotlib as mpl

    n = values.shape[0]
    shown = values.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("nan"))
    colormap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(shown.numpy(), cmap=colormap)
    ax.set_xlabel("key j", fontsize=8)
    ax.set_ylabel("query i", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.75)


def fig_token_band() -> bytes:
    """The banded bias: P's two profiles, two queries' mixtures, the term per query."""
    from relattn.pe import QueryConditionedBias

    n, width = 24, 12
    offsets = torch.arange(width)
    qcb = QueryConditionedBias(1, rank=2, extent=width)
    with torch.no_grad():
        qcb.weight.copy_(torch.stack([-0.4 * offsets.float(), -2.0 * (offsets - 8).abs() / 8]))
        mix = torch.sigmoid(torch.linspace(-3, 3, n))  # later queries lean on the far profile
        r = torch.stack([1 - mix, 2 * mix], dim=-1).view(1, 1, n, 2)
        term = qcb(r).bias(n, n)[0, 0]
        p = qcb.weight.detach()
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    a.plot(offsets, p[0], label="profile 0: near")
    a.plot(offsets, p[1], label="profile 1: about 8 back")
    a.set_title(f"P: rank 2 profiles over offsets 0 … {width - 1}", fontsize=9)
    for i in (3, n - 3):
        b.plot(
            offsets,
            r[0, 0, i] @ p,
            label=f"query {i}: r = ({r[0, 0, i, 0]:.2f}, {r[0, 0, i, 1]:.2f})",
        )
    b.set_title("PE(i, i − Δ) = r_i · P[:, Δ], two queries", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("offset Δ = i − j", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _term_image(c, term, f"the term, 0 beyond the band (Δ ≥ {width})")
    return _png(fig)


def fig_token_gate() -> bytes:
    """The forget gate: per-token gates, F, and the term F_i - F_j."""
    from relattn.pe import ForgetGate

    n = 24
    gates = torch.full((n,), 0.9)
    gates[9] = 0.05  # a token that forgets what came before it
    gates[17] = 0.3
    with torch.no_grad():
        term = ForgetGate()(gates.log().view(1, 1, n))
        f = term.cumulative[0, 0]
        values = term.bias(n, n)[0, 0]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    a.bar(range(n), gates)
    a.set_title("gate f_t per token (9 and 17 forget)", fontsize=9)
    b.plot(range(n), f, marker=".")
    b.set_title("F_t = Σ log f (non-increasing)", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("token t", fontsize=8)
        ax.grid(alpha=0.3)
    _term_image(c, values, "the term F_i − F_j")
    return _png(fig)


FIGURES = {
    "token-band": fig_token_band,
    "token-gate": fig_token_gate,
    "mask": fig_mask,
    "scores": fig_scores,
    "t5-buckets": fig_t5_buckets,
    "curves": fig_curves,
}
TABLES = {
    "query-dots": table_query_dots,
    "t5-textbook": table_t5_textbook,
    "t5-default": table_t5_default,
    "alibi-slopes": table_alibi_slopes,
}


# ----------------------------------------------------------------------------- mkdocs events


def on_files(files, config, **kwargs):
    torch.manual_seed(0)
    for name, draw in FIGURES.items():
        files.append(File.generated(config, f"figures/{name}.png", content=draw()))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    for name, make in TABLES.items():
        marker = f"<!-- relattn: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    if "<!-- relattn:" in markdown:
        start = markdown.index("<!-- relattn:")
        raise ValueError(f"{page.file.src_uri}: unknown marker {markdown[start : start + 40]!r}")
    return markdown
