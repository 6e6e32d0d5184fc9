"""``relattn explain``'s text: the formula, the tokens, the mask, and per query the keys it sees,
the dot products it computes, the PE term, the scores and the weights."""

from __future__ import annotations

import textwrap

from relattn.viz import format_number

from .compute import Explanation

__all__ = ["render"]

FORMULA = "α(i, j) = softmax_j( scale·q_i·k_j + PE(i, j) + Mask(i, j) )    out_i = Σ_j α(i, j)·v_j"


def _num(x: float, fmt: str = "+.3f") -> str:
    """``x`` formatted with its sign right (:func:`relattn.viz.format_number`): ``+0.000`` only
    for zero, ``-0.0004`` for a small negative value."""
    return format_number(x, fmt)


def _pad(text: str, width: int, right: bool = False) -> str:
    return text.rjust(width) if right else text.ljust(width)


def _columns(rows: list[list[str]], right: list[bool], indent: str = "    ") -> list[str]:
    """Aligned columns; ``rows[0]`` is the header."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [
        indent
        + "  ".join(_pad(cell, w, a) for cell, w, a in zip(r, widths, right, strict=True)).rstrip()
        for r in rows
    ]


def _grid(tokens: list[str], cell, indent: str = "    ") -> list[str]:
    """A query × key grid with token labels; ``cell(i, j)`` gives each entry."""
    labels = [f"{i} {t}" for i, t in enumerate(tokens)]
    lw = max(len(s) for s in labels)
    cells = [[cell(i, j) for j in range(len(tokens))] for i in range(len(tokens))]
    widths = [
        max(len(tokens[j]), *(len(cells[i][j]) for i in range(len(tokens))))
        for j in range(len(tokens))
    ]
    head = " " * lw + "  " + "  ".join(t.center(w) for t, w in zip(tokens, widths, strict=True))
    lines = [indent + head.rstrip()]
    for i, label in enumerate(labels):
        row = "  ".join(c.center(w) for c, w in zip(cells[i], widths, strict=True))
        lines.append(indent + (label.ljust(lw) + "  " + row).rstrip())
    return lines


def _query_detail(ex: Explanation, i: int, heads: list[int]) -> list[str]:
    tok = ex.tokens
    seen = ", ".join(f"{t}({j})" for j, t in enumerate(tok[: i + 1]))
    count = f"{i + 1} key" + ("s" if i else "")
    lines = [f'query {i} "{tok[i]}" sees {count}: {seen}']
    if i + 1 < len(tok):
        later = ", ".join(f"{t}({j})" for j, t in enumerate(tok) if j > i)
        verb = "come" if i + 2 < len(tok) else "comes"
        lines.append(f"  {later} {verb} later: masked, no dot product is computed")
    for h in heads:
        if len(heads) > 1 or h:
            lines.append(f"  head {h}")
        header = ["key", "Δ=i−j"]
        if ex.buckets is not None:
            header.append("bucket")
        header += ["dot product", "scale·q·k", "PE", "score", "weight"]
        rows = [header]
        for j in range(i + 1):
            row = [f"{j} {tok[j]}", str(i - j)]
            if ex.buckets is not None:
                row.append(str(int(ex.buckets[i, j])))
            row += [
                f"q{i}·k{j} = {_num(ex.dot[h, i, j].item())}",
                _num(ex.scale * ex.dot[h, i, j].item()),
                _num(ex.pe[h, i, j].item()),
                _num(ex.scores[h, i, j].item()),
                f"{ex.weights[h, i, j].item():.3f}",
            ]
            rows.append(row)
        total = ex.weights[h, i, : i + 1].sum().item()
        rows.append([""] * (len(header) - 2) + ["sum", f"{total:.3f}"])
        right = [False, True] + [True] * (len(header) - 2)
        right[2 + (ex.buckets is not None)] = False
        lines += _columns(rows, right)
        terms = " + ".join(f"{ex.weights[h, i, j].item():.3f}·v{j}" for j in range(i + 1))
        lines.append(f"    out{i} = {terms}")
    return lines


def render(
    ex: Explanation,
    intro: list[str],
    about: list[str],
    queries: list[int],
    single: bool,
    heads: list[int],
    table: dict | None,
    written: list[str],
) -> str:
    """The whole text.

    Args:
        ex: the numbers.
        intro: how q, k and v were made (seeded vectors or a trained model), one line each.
        about: what the position encoding is, one line each.
        queries: the queries explained.
        single: one query was asked for (every shown head in detail).
        heads: the heads shown.
        table: :func:`relattn.cli.explain.table`'s result, or None.
        written: paths of figures written.
    """
    tok, n = ex.tokens, len(ex.tokens)
    out = [
        "relattn explain — causal attention with a relative position term",
        "",
        "  " + FORMULA,
        "",
    ]
    out += _columns(
        [["token", *tok], ["position", *(str(i) for i in range(n))]],
        [False] + [True] * n,
        indent="  ",
    )
    out += [""] + ["  " + line for line in intro] + [""]
    out += [
        "Position encoding. PE(i, j) is added to the score before the softmax; a table",
        "encoding's depends only on the offset Δ = i − j and the head.",
    ]
    out += ["  " + line for line in about]
    out += [
        "",
        "Causal mask: query i may attend only to keys j ≤ i (itself and earlier tokens), so it",
        "computes exactly i + 1 dot products; later keys get −∞ and weight 0.",
        "  ■ = visible, · = masked",
    ]
    out += _grid(tok, lambda i, j: "■" if ex.mask[i, j] else "·")
    out.append("")
    detail = heads if single else heads[:1]
    out.append(
        "Per query: score = scale·q·k + PE, then weight = softmax of the scores over visible keys."
    )
    if not single and len(heads) > 1:
        out.append(
            f"Head {heads[0]} in detail; every shown head's weights follow (use --query I for "
            "all heads)."
        )
    out.append("")
    for i in queries:
        out += _query_detail(ex, i, detail)
        out.append("")
    if not single:
        for h in heads:
            title = "Weights α" + (f", head {h}" if len(heads) > 1 else "") + " (rows sum to 1):"
            out.append(title)
            out += _grid(
                tok, lambda i, j, h=h: f"{ex.weights[h, i, j].item():.2f}" if j <= i else "·"
            )
            out.append("")
    if table is not None:
        out += _render_table(table)
    for path in written:
        out.append(f"wrote {path}")
    return "\n".join(out).rstrip()


def _render_table(table: dict) -> list[str]:
    values, buckets = table["values"], table["buckets"]
    last = table["offsets"][-1]
    out = [f"Table T[h, Δ] for Δ = 0..{last}: what a kernel reads, PE(i, j) = T[h, i − j]."]
    header = ["Δ"] + (["bucket"] if buckets is not None else [])
    header += [f"head {h}" for h in range(values.shape[0])]
    rows = [header]
    for c, delta in enumerate(table["offsets"]):
        row = [str(delta)] + ([str(int(buckets[c]))] if buckets is not None else [])
        row += [_num(values[h, c].item(), "+.4f") for h in range(values.shape[0])]
        rows.append(row)
    out += _columns(rows, [True] * len(header))
    if buckets is not None:
        out += _bucket_spans([int(b) for b in buckets])
    out.append("")
    return out


def _bucket_spans(buckets: list[int]) -> list[str]:
    """Which offsets each T5 bucket holds, wrapped: ``0–15: one each; 16: Δ 16–18; …``."""
    runs: list[list[int]] = []  # (bucket, first Δ, last Δ)
    for delta, b in enumerate(buckets):
        if runs and runs[-1][0] == b:
            runs[-1][2] = delta
        else:
            runs.append([b, delta, delta])
    exact = 0
    while exact < len(runs) and runs[exact][1] == runs[exact][2] == runs[exact][0]:
        exact += 1
    parts = []
    if exact > 1:
        parts.append(f"buckets 0–{exact - 1} hold one offset each (Δ = bucket)")
        runs = runs[exact:]
    for b, first, last in runs:
        parts.append(f"{b}:\u00a0Δ\u00a0{first}" + (f"–{last}" if last > first else ""))
    text = "Bucket → offsets: " + "; ".join(parts) + "."
    # textwrap never breaks at a no-break space, so "26: Δ 59–66" stays on one line.
    lines = textwrap.wrap(text, width=96, initial_indent="  ", subsequent_indent="    ")
    return [line.replace("\u00a0", " ") for line in lines]
