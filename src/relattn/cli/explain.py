"""``relattn explain``: the attention formula made visible, query by query.

    relattn explain "The quick brown fox" [--pe none|t5|alibi|kerple|offset] [--rope]
        [--heads H] [--dim D] [--query I] [--seed S] [--table N] [--png FILE] [--json]

Tokens are the whitespace-separated words. Each word gets seeded random q, k, v vectors (per
head), drawn from a generator seeded with ``crc32(seed, word)``, so the same word always gets the
same vectors, on every run and machine. Learned encodings (t5, kerple, offset) have no trained
values here; they are initialized from the seed (illustrative values), while ALiBi uses the paper's
slopes. The weights shown are :func:`relattn.attention_weights`'s, checked against the softmax of
the scores shown.

Encoding flags apply to one ``--pe`` only (any other combination is an error):
``--buckets``/``--max-distance`` (t5), ``--kernel log|power`` (kerple), ``--max-offset`` (offset),
``--rope-base`` (with ``--rope``, which composes with any ``--pe``).

``--json`` prints one object::

    tokens        [str]                    the N words
    encoding      {pe, rope, params, illustrative, slopes?}   params: the encoding's flags
    heads, dim    int                      H and D
    seed          int
    scale         float                    multiplies q·k (1/√D)
    mask          [[0|1] * N] * N          mask[i][j] = 1 where query i sees key j (j ≤ i)
    query         int | [int]              --query I, or every query 0..N-1
    visible       [int] | [[int]]          key positions the query sees (0..i)

and, per query (a list of these, one per query, when --query is not given), lists aligned with
``visible``, one row per head (``[h][n]`` is head h, key ``visible[n]``)::

    offsets       [int]                    Δ = i − j for each visible key
    buckets       [int] | null             T5 bucket of each Δ (null for other encodings)
    dot_products  [[float]] (H × keys)     q_i·k_j (after RoPE's rotation when --rope)
    pe            [[float]] (H × keys)     PE(i, j), 0 without an additive encoding
    scores        [[float]] (H × keys)     scale·q_i·k_j + PE(i, j)
    weights       [[float]] (H × keys)     α(i, j), each row sums to 1
    output        [[float]] (H × D)        out_i = Σ_j α(i, j)·v_j

With ``--table N`` it also holds ``table: {offsets: [0..N], values: [[float]] (H × N+1),
buckets: [int] | null}``. Floats are full float32 values, unrounded.

``--png FILE`` writes heatmaps (mask, PE, weights per head); with ``--table`` the table plot goes
to ``FILE`` with ``-table`` before the suffix (``fox.png`` → ``fox-table.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, PositionEncoding, RoPE, T5Bias

ENCODINGS = ("none", "t5", "alibi", "kerple", "offset")
# flag dest -> (the --pe it belongs to, the flag as typed); None means "with --rope".
_OWNED = {
    "buckets": ("t5", "--buckets"),
    "max_distance": ("t5", "--max-distance"),
    "kernel": ("kerple", "--kernel"),
    "max_offset": ("offset", "--max-offset"),
    "rope_base": (None, "--rope-base"),
}
_DEFAULTS = {"buckets": 32, "max_distance": 128, "kernel": "log", "max_offset": 8, "rope_base": 1e4}
_MAX_HEADS, _MAX_DIM, _MAX_TABLE = 64, 1024, 4096

_ABOUT = {
    "none": "no position term: PE = 0, so apart from the mask attention cannot tell word order.",
    "t5": "T5: offsets Δ fall into buckets (one per offset for small Δ, then logarithmically\n"
    "wider up to max-distance); each head learns one number per bucket.",
    "alibi": "ALiBi: PE = −m_h·Δ, a penalty growing linearly with distance; m_h are the\n"
    "paper's fixed slopes (2^(−8/H), 2^(−16/H), …), nothing is learned.",
    "kerple-log": "KERPLE (log kernel): PE = −r1·log(1 + r2·Δ), r1, r2 > 0 learned per head.",
    "kerple-power": "KERPLE (power kernel): PE = −r1·Δ^r2, r1 > 0 and 0 < r2 ≤ 2 learned per head.",
    "offset": "offset bias: one learned number per head per offset Δ up to max-offset;\n"
    "farther offsets share the last one.",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the sentence; tokens are its whitespace-separated words")
    parser.add_argument("--pe", default="none", choices=ENCODINGS, help="additive encoding")
    parser.add_argument("--rope", action="store_true", help="rotate q and k with RoPE first")
    parser.add_argument("--heads", type=int, default=1, metavar="H", help="heads (default 1)")
    parser.add_argument("--dim", type=int, default=8, metavar="D", help="head dim (default 8)")
    parser.add_argument("--query", type=int, metavar="I", help="explain only query I")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="embedding seed")
    parser.add_argument("--table", type=int, metavar="N", help="print the table for Δ = 0..N")
    parser.add_argument("--png", metavar="FILE", help="write heatmaps to a PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    enc = parser.add_argument_group("encoding parameters (each for one --pe)")
    enc.add_argument("--buckets", type=int, metavar="B", help="t5: number of buckets (32)")
    enc.add_argument("--max-distance", type=int, metavar="M", help="t5: max distance (128)")
    enc.add_argument("--kernel", choices=("log", "power"), help="kerple: kernel (log)")
    enc.add_argument("--max-offset", type=int, metavar="M", help="offset: largest offset (8)")
    enc.add_argument("--rope-base", type=float, metavar="BASE", help="rope: base (10000)")


# ----------------------------------------------------------------------------- the numbers


@dataclass
class Explanation:
    """Everything ``explain`` shows, for all queries and heads (``N`` tokens, ``H`` heads)."""

    tokens: list[str]
    scale: float
    mask: Tensor  # (N, N) bool, key j visible to query i
    dot: Tensor  # (H, N, N) q_i·k_j
    pe: Tensor  # (H, N, N) PE(i, j)
    scores: Tensor  # (H, N, N) scale·q·k + PE
    weights: Tensor  # (H, N, N) α from relattn.attention_weights
    output: Tensor  # (H, N, D)
    buckets: Tensor | None  # (N, N) T5 bucket of each Δ


def _seeded(seed: int, *labels: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash (crc32) of ``seed`` and ``labels``."""
    key = "\x00".join([str(seed), *labels]).encode("utf-8")
    return torch.Generator().manual_seed(zlib.crc32(key))


def embed(tokens: list[str], num_heads: int, head_dim: int, seed: int) -> tuple[Tensor, ...]:
    """Seeded random q, k, v of shape ``(1, H, N, D)``; equal words get equal vectors."""
    per_word = [
        torch.randn(3, num_heads, head_dim, generator=_seeded(seed, "word", w)) for w in tokens
    ]
    qkv = torch.stack(per_word, dim=2)  # (3, H, N, D)
    return tuple(x.unsqueeze(0) for x in qkv)


def build_encoding(name: str, num_heads: int, seed: int, **params) -> PositionEncoding | None:
    """The ``--pe`` encoding; learned ones get deterministic, visible values from ``seed``.

    Raises:
        ValueError: a parameter the encoding rejects.
    """
    if name == "none":
        return None
    if name == "alibi":
        return ALiBi(num_heads)
    g = _seeded(seed, "pe", name)
    with torch.random.fork_rng(devices=[]):  # constructors draw from the global RNG
        if name == "t5":
            enc = T5Bias(num_heads, params["buckets"], params["max_distance"])
            values = {"weight": torch.randn(num_heads, enc.num_buckets, generator=g)}
        elif name == "kerple":
            enc = Kerple(num_heads, kind=params["kernel"])
            values = {
                "raw_r1": torch.randn(num_heads, generator=g),
                "raw_r2": torch.randn(num_heads, generator=g),
            }
        elif name == "offset":
            enc = OffsetBias(num_heads, params["max_offset"])
            values = {"weight": torch.randn(num_heads, enc.max_offset + 1, generator=g)}
        else:
            raise ValueError(f"pe must be one of {ENCODINGS}; got {name!r}")
    with torch.no_grad():
        for attr, value in values.items():
            getattr(enc, attr).copy_(value)
    return enc.requires_grad_(False)


def explain(
    tokens: list[str], q: Tensor, k: Tensor, v: Tensor, enc: PositionEncoding | None, rope=None
) -> Explanation:
    """Scores, PE and weights of causal attention over ``tokens`` (q, k, v: ``(1, H, N, D)``).

    The weights are :func:`relattn.attention_weights`'s; they are checked against the softmax
    of the scores computed here, so the numbers shown are the library's.
    """
    num_heads, n, d = q.shape[1:]
    scale = 1.0 / math.sqrt(d)
    pe_list = [p for p in (rope, enc) if p is not None]
    qr, kr = (rope.rotate(q), rope.rotate(k)) if rope is not None else (q, k)
    dot = (qr @ kr.transpose(-1, -2))[0]
    pe = enc.bias(n, n) if enc is not None else torch.zeros(num_heads, n, n)
    scores = scale * dot + pe
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        weights = relattn.attention_weights(q, k, pe_list or None)[0]
        output = relattn.attention(q, k, v, pe_list or None)[0]
    mine = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    if not torch.allclose(mine, weights, rtol=1e-5, atol=1e-6):
        err = (mine - weights).abs().max().item()
        raise AssertionError(f"explain's softmax differs from attention_weights by {err:.3g}")
    buckets = None
    if isinstance(enc, T5Bias):
        buckets = enc.buckets(torch.arange(n)[:, None] - torch.arange(n)[None, :])
    return Explanation(tokens, scale, mask, dot, pe, scores, weights, output, buckets)


# ----------------------------------------------------------------------------- the command


def _error(message: str) -> Exception:
    """A :class:`relattn.cli.main.CLIError`: one line on stderr, exit code 2."""
    from .main import CLIError

    return CLIError(message)


def _validate(args: argparse.Namespace) -> list[str]:
    tokens = args.text.split()
    if not tokens:
        raise _error("text must contain at least one word; got an empty or blank string")
    if not 1 <= args.heads <= _MAX_HEADS:
        raise _error(f"--heads must be between 1 and {_MAX_HEADS}; got {args.heads}")
    if not 1 <= args.dim <= _MAX_DIM:
        raise _error(f"--dim must be between 1 and {_MAX_DIM}; got {args.dim}")
    if args.rope and args.dim % 2:
        raise _error(f"--dim must be even with --rope (RoPE rotates pairs); got {args.dim}")
    if args.query is not None and not 0 <= args.query < len(tokens):
        words = f"{len(tokens)} word" + ("s" if len(tokens) > 1 else "")
        raise _error(
            f"--query must be between 0 and {len(tokens) - 1} (the text has {words}); "
            f"got {args.query}"
        )
    if args.table is not None:
        if not 0 <= args.table <= _MAX_TABLE:
            raise _error(f"--table must be between 0 and {_MAX_TABLE}; got {args.table}")
        if args.pe == "none":
            raise _error("--table needs an additive encoding (--pe t5|alibi|kerple|offset)")
    for dest, (owner, flag) in _OWNED.items():
        if getattr(args, dest) is None:
            continue
        if owner is None and not args.rope:
            raise _error(f"{flag} applies only with --rope")
        if owner is not None and args.pe != owner:
            raise _error(f"{flag} applies only to --pe {owner}; got --pe {args.pe}")
    if args.png is not None:
        path = Path(args.png)
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise _error(f"--png cannot write {args.png!r} (no such writable directory or file)")
    return tokens


def _params(args: argparse.Namespace) -> dict:
    return {
        dest: getattr(args, dest) if getattr(args, dest) is not None else _DEFAULTS[dest]
        for dest in _OWNED
    }


def run(args: argparse.Namespace) -> int:
    tokens = _validate(args)
    params = _params(args)
    try:
        enc = build_encoding(args.pe, args.heads, args.seed, **params)
    except (ValueError, TypeError) as e:
        raise _error(f"--pe {args.pe}: {e}") from None
    try:
        rope = RoPE(args.dim, params["rope_base"]) if args.rope else None
    except ValueError as e:
        raise _error(f"--rope: {e}") from None
    q, k, v = embed(tokens, args.heads, args.dim, args.seed)
    ex = explain(tokens, q, k, v, enc, rope)
    queries = [args.query] if args.query is not None else list(range(len(tokens)))
    table = _table(enc, args.table) if args.table is not None else None

    written = _write_pngs(args, ex, enc, table) if args.png is not None else []
    used = {d: params[d] for d, (owner, _) in _OWNED.items() if owner == args.pe}
    if args.rope:
        used["rope_base"] = params["rope_base"]
    if args.json:
        obj = _to_json(ex, enc, args, used, queries, table)
        print(json.dumps(obj, ensure_ascii=False))
        return 0
    print(_render(ex, enc, args, used, queries, table, written))
    return 0


def _table(enc: PositionEncoding, n: int) -> dict:
    with torch.no_grad():
        values = enc.table(0, n)
    buckets = enc.buckets(torch.arange(n + 1)) if isinstance(enc, T5Bias) else None
    return {"offsets": list(range(n + 1)), "values": values, "buckets": buckets}


def _write_pngs(args, ex: Explanation, enc, table) -> list[str]:
    from relattn import viz

    name = args.pe + (" + RoPE" if args.rope else "")
    if args.pe in ("t5", "kerple", "offset"):
        name += f" (illustrative values: random init, seed {args.seed})"
    paths = [args.png]
    try:
        pe = ex.pe if enc is not None else None
        viz.plot_explain(
            ex.tokens, ex.mask, pe, ex.weights, args.png, title=f"relattn explain — pe: {name}"
        )
        if table is not None:
            path = Path(args.png)
            paths.append(str(path.with_name(path.stem + "-table" + (path.suffix or ".png"))))
            viz.plot_table(
                table["values"], table["offsets"], paths[-1], table["buckets"],
                title=f"{name}: table T[h, Δ], Δ = 0..{args.table}",
            )  # fmt: skip
    except viz.PlotUnavailable as e:
        raise _error(str(e)) from None
    except OSError as e:
        raise _error(f"--png cannot write {paths[-1]!r}: {e.strerror or e}") from None
    return paths


# ----------------------------------------------------------------------------- JSON


def _floats(t: Tensor) -> list:
    return t.tolist()


def _to_json(ex: Explanation, enc, args, params: dict, queries: list[int], table) -> dict:
    encoding = {
        "pe": args.pe,
        "rope": bool(args.rope),
        "params": params,
        "illustrative": args.pe in ("t5", "kerple", "offset"),
    }
    if isinstance(enc, ALiBi):
        encoding["slopes"] = _floats(enc.slopes)
    per_query = {
        key: []
        for key in ("visible", "offsets", "buckets", "dot_products", "pe", "scores", "weights")
    }
    per_query["output"] = []
    for i in queries:
        keys = slice(0, i + 1)
        per_query["visible"].append(list(range(i + 1)))
        per_query["offsets"].append([i - j for j in range(i + 1)])
        per_query["buckets"].append(None if ex.buckets is None else ex.buckets[i, keys].tolist())
        per_query["dot_products"].append(_floats(ex.dot[:, i, keys]))
        per_query["pe"].append(_floats(ex.pe[:, i, keys]))
        per_query["scores"].append(_floats(ex.scores[:, i, keys]))
        per_query["weights"].append(_floats(ex.weights[:, i, keys]))
        per_query["output"].append(_floats(ex.output[:, i]))
    single = args.query is not None
    obj = {
        "tokens": ex.tokens,
        "encoding": encoding,
        "heads": args.heads,
        "dim": args.dim,
        "seed": args.seed,
        "scale": ex.scale,
        "mask": ex.mask.int().tolist(),
        "query": queries[0] if single else queries,
    }
    obj.update({key: values[0] if single else values for key, values in per_query.items()})
    if table is not None:
        b = table["buckets"]
        obj["table"] = {
            "offsets": table["offsets"],
            "values": _floats(table["values"]),
            "buckets": None if b is None else b.tolist(),
        }
    return obj


# ----------------------------------------------------------------------------- text


def _num(x: float, fmt: str = "+.3f") -> str:
    """``x`` formatted; a value that rounds to zero prints as 0, never ``-0.000``."""
    text = format(x, fmt)
    return format(0.0, fmt) if float(text) == 0 else text


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


def _describe(enc, args, params: dict) -> list[str]:
    key = f"kerple-{params['kernel']}" if args.pe == "kerple" else args.pe
    lines = _ABOUT[key].split("\n")
    if args.pe == "none" and args.rope:
        lines = ["no additive term: PE = 0; RoPE (below) carries the positions."]
    if args.pe == "t5":
        lines.append(f"buckets {params['buckets']}, max distance {params['max_distance']}.")
    if args.pe == "offset":
        lines.append(f"max offset {params['max_offset']}.")
    if isinstance(enc, ALiBi):
        slopes = ", ".join(f"h{h}: {m:.4g}" for h, m in enumerate(enc.slopes.tolist()))
        lines.append(
            f"slopes {slopes}" + ("  (try --heads 8: steeper heads)" if args.heads < 4 else "")
        )
    if isinstance(enc, Kerple):
        r = ", ".join(
            f"h{h}: r1={a:.3f} r2={b:.3f}"
            for h, (a, b) in enumerate(zip(enc.r1.tolist(), enc.r2.tolist(), strict=True))
        )
        lines.append(r)
    if args.pe in ("t5", "kerple", "offset"):
        lines.append(
            f"Its values are ILLUSTRATIVE (random init from --seed {args.seed}): a real model "
            "learns them."
        )
    if args.rope:
        lines += [
            f"RoPE (base {params['rope_base']:g}) rotates q and k by their positions before the",
            "dot product, so q_i·k_j itself depends on Δ; the dot products shown are rotated.",
        ]
    return lines


def _query_block(ex: Explanation, i: int, heads: list[int]) -> list[str]:
    tok = ex.tokens
    seen = ", ".join(f"{t}({j})" for j, t in enumerate(tok[: i + 1]))
    count = f"{i + 1} key" + ("s" if i else "")
    lines = [f'query {i} "{tok[i]}" sees {count}: {seen}']
    if i + 1 < len(tok):
        later = ", ".join(f"{t}({j})" for j, t in enumerate(tok) if j > i)
        verb = "come" if i + 2 < len(tok) else "comes"
        lines.append(f"  {later} {verb} later: masked, no dot product is computed")
    for h in heads:
        if len(ex.weights) > 1:
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


def _render(ex, enc, args, params, queries, table, written) -> str:
    tok, n = ex.tokens, len(ex.tokens)
    d = args.dim
    name = args.pe + (" + RoPE" if args.rope else "")
    out = [
        "relattn explain — causal attention with a relative position term",
        "",
        "  α(i, j) = softmax_j( scale·q_i·k_j + PE(i, j) + Mask(i, j) )    out_i = Σ_j α(i, j)·v_j",
        "",
    ]
    out += _columns(
        [["token", *tok], ["position", *(str(i) for i in range(n))]],
        [False] + [True] * n,
        indent="  ",
    )
    out += [
        "",
        f"  q, k, v: seeded random vectors per word (--seed {args.seed}; a repeated word gets the "
        "same ones)",
        f"  heads H = {args.heads}, head dim D = {d}, scale = 1/√{d} = {ex.scale:.3f}",
        "",
        f"Position encoding: {name}. PE(i, j) depends only on the offset Δ = i − j and the head;",
        "it is added to the score before the softmax.",
    ]
    out += ["  " + line for line in _describe(enc, args, params)]
    out += [
        "",
        "Causal mask: query i may attend only to keys j ≤ i (itself and earlier words), so it",
        "computes exactly i + 1 dot products; later keys get −∞ and weight 0.",
        "  ■ = visible, · = masked",
    ]
    out += _grid(tok, lambda i, j: "■" if ex.mask[i, j] else "·")
    out.append("")
    single = args.query is not None
    detail = list(range(args.heads)) if single else [0]
    out.append(
        "Per query: score = scale·q·k + PE, then weight = softmax of the scores over visible keys."
    )
    if not single and args.heads > 1:
        out.append("Head 0 in detail; every head's weights follow (use --query I for all heads).")
    out.append("")
    for i in queries:
        out += _query_block(ex, i, detail)
        out.append("")
    if not single:
        for h in range(args.heads):
            title = "Weights α" + (f", head {h}" if args.heads > 1 else "") + " (rows sum to 1):"
            out.append(title)
            out += _grid(
                tok, lambda i, j, h=h: f"{ex.weights[h, i, j].item():.2f}" if j <= i else "·"
            )
            out.append("")
    if table is not None:
        out += _render_table(table, args)
    for path in written:
        out.append(f"wrote {path}")
    return "\n".join(out).rstrip()


def _render_table(table: dict, args) -> list[str]:
    values, buckets = table["values"], table["buckets"]
    out = [
        f"Table T[h, Δ] for Δ = 0..{args.table}: what a kernel reads, PE(i, j) = T[h, i − j].",
    ]
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
    runs = []  # (bucket, first Δ, last Δ)
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
