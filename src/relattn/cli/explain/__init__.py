"""``relattn explain``: the attention formula made visible, query by query.

    relattn explain "The quick brown fox" [--pe NAME|none|rope+NAME] [--heads H] [--dim D]
        [--query I] [--head H] [--seed S] [--table N] [--png FILE] [--json]
    relattn explain --checkpoint DIR "some text" [--layer L] [--head H] [--query I] ...

Without --checkpoint, tokens are the whitespace-separated words, and each word gets seeded
random q, k, v vectors (per head), drawn from a generator seeded with crc32(seed, word), so the
same word always gets the same vectors, on every run and machine. Encodings come from the
registry (relattn.pe.names()); a learnable one has no trained values here and is initialised from
the seed (illustrative values), while a fixed one (ALiBi) uses its real values. With
--checkpoint (a folder written by `relattn train` or `relattn demo`), tokens are the text's
bytes and q, k, v are the trained model's own, at layer --layer.

Each registered encoding's constructor parameters are flags named --ENCODING-PARAM
(--t5-num-buckets, --rope-base, ...), valid only when that encoding is in --pe.

--json prints one object:

    tokens        [str]                    the N tokens
    encoding      {pe, names, params, illustrative, checkpoint?, layer?}
    heads, dim    int                      H and D (and seed, or checkpoint and layer)
    shown_heads   [int]                    the heads whose numbers follow (--head, or all)
    scale         float                    multiplies q·k (1/√D)
    mask          [[0|1] * N] * N          mask[i][j] = 1 where query i sees key j (j ≤ i)
    query         int | [int]              --query I, or every query 0..N-1
    visible       [int] | [[int]]          key positions the query sees (0..i)

and, per query (a list of these, one per query, when --query is not given), lists aligned with
visible, one row per shown head ([h][n] is shown head h, key visible[n]):

    offsets       [int]                    Δ = i − j for each visible key
    buckets       [int] | null             bucket of each Δ (T5), else null
    dot_products  [[float]] (H × keys)     q_i·k_j (after RoPE's rotation)
    pe            [[float]] (H × keys)     PE(i, j), 0 without an additive encoding
    scores        [[float]] (H × keys)     scale·q_i·k_j + PE(i, j)
    weights       [[float]] (H × keys)     α(i, j), each row sums to 1
    output        [[float]] (H × D)        out_i = Σ_j α(i, j)·v_j

With --table N it also holds table: {offsets: [0..N], values: [[float]] (H × N+1), buckets}.
Floats are full float32 values, unrounded.

--png FILE writes heatmaps (mask, PE, weights; one column per head); with --table the table plot
goes to FILE with -table before the suffix (fox.png -> fox-table.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from relattn.demo.probe import block, byte_label, encoding_names

from ..._errors import UserError
from .._args import bounded_int, seed_flag
from .._paths import check_writable_file
from .._pe_flags import add_encoding_params, describe_params, encoding_kwargs, parse_pe
from . import compute, encodings, render, to_json

MAX_TOKENS, MAX_HEADS, MAX_DIM, MAX_TABLE = 128, 64, 1024, 4096
DEFAULT_PE, DEFAULT_HEADS, DEFAULT_DIM, DEFAULT_SEED = "alibi", 1, 8, 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("text", help="the sentence: its words (or, with --checkpoint, bytes)")
    parser.add_argument(
        "--pe",
        metavar="NAME",
        help=f"encoding: none, a registered name, or rope+NAME (default {DEFAULT_PE})",
    )
    parser.add_argument(
        "--heads",
        type=bounded_int(1, MAX_HEADS),
        metavar="H",
        help=f"heads (default {DEFAULT_HEADS})",
    )
    parser.add_argument(
        "--dim", type=bounded_int(1, MAX_DIM), metavar="D", help=f"head dim (default {DEFAULT_DIM})"
    )
    parser.add_argument("--query", type=int, metavar="I", help="explain only query I")
    parser.add_argument("--head", type=int, metavar="H", help="show only head H")
    seed_flag(parser, f"embedding seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--table",
        type=bounded_int(0, MAX_TABLE),
        metavar="N",
        help="print the PE table for Δ = 0..N",
    )
    parser.add_argument("--png", metavar="FILE", help="write heatmaps to a PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--checkpoint", metavar="DIR", help="a trained model's real q and k")
    parser.add_argument("--layer", type=int, metavar="L", help="with --checkpoint: the layer (0)")
    add_encoding_params(parser)


def _tokens(args: argparse.Namespace) -> list[str]:
    if args.checkpoint is not None:
        data = args.text.encode("utf-8")
        tokens = [byte_label(b) for b in data]
        unit = "byte"
    else:
        tokens = args.text.split()
        unit = "word"
    if not tokens:
        raise UserError(f"text must contain at least one {unit}; got an empty or blank string")
    if len(tokens) > MAX_TOKENS:
        raise UserError(
            f"text must have at most {MAX_TOKENS} {unit}s (explain prints every query's every "
            f"key); got {len(tokens)}"
        )
    if args.query is not None and not 0 <= args.query < len(tokens):
        many = f"{len(tokens)} {unit}" + ("s" if len(tokens) > 1 else "")
        raise UserError(
            f"--query must be between 0 and {len(tokens) - 1} (the text has {many}); "
            f"got {args.query}"
        )
    return tokens


def _from_seeded_vectors(args: argparse.Namespace, tokens: list[str]):
    if args.layer is not None:
        raise UserError("--layer applies only with --checkpoint")
    names = parse_pe(args.pe if args.pe is not None else DEFAULT_PE)
    heads = args.heads or DEFAULT_HEADS
    dim = args.dim or DEFAULT_DIM
    seed = DEFAULT_SEED if args.seed is None else args.seed
    kwargs = encoding_kwargs(args, names)
    try:
        modules = encodings.build(names, heads, dim, seed, kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"--pe {'+'.join(names) or 'none'}: {e}") from None
    q, k, v = compute.embed(tokens, heads, dim, seed)
    ex = compute.explain(tokens, q, k, v, encodings.call_terms(modules, tokens, heads, seed))
    used = describe_params(names, kwargs)
    encoding: dict[str, Any] = {
        "pe": "+".join(names) or "none",
        "names": names,
        "params": used,
        "illustrative": encodings.is_illustrative(names),
    }
    for module in modules:
        slopes = getattr(module, "slopes", None)
        if isinstance(slopes, torch.Tensor):
            encoding["slopes"] = slopes.tolist()
    meta = {"heads": heads, "dim": dim, "seed": seed}
    intro = [
        f"q, k, v: seeded random vectors per word (--seed {seed}; a repeated word gets the "
        "same ones)",
        f"heads H = {heads}, head dim D = {dim}, scale = 1/√{dim} = {ex.scale:.3f}",
    ]
    about = encodings.describe(names, modules, used)
    name = encoding["pe"] + (
        f" (illustrative values, seed {seed})" if encoding["illustrative"] else ""
    )
    return ex, modules, encoding, meta, intro, about, f"relattn explain — pe: {name}"


def _from_checkpoint(args: argparse.Namespace, tokens: list[str]):
    given = [
        f
        for f, v in (
            ("--pe", args.pe),
            ("--heads", args.heads),
            ("--dim", args.dim),
            ("--seed", args.seed),
        )
        if v is not None
    ]
    given += [k for k, v in vars(args).items() if k.startswith("pe_") and v is not None]
    if given:
        raise UserError(f"{given[0]} does not apply with --checkpoint (the model defines it)")
    from relattn.demo.model_folders import load_model

    model = load_model(args.checkpoint, "--checkpoint")
    config = model.config
    layer = 0 if args.layer is None else args.layer
    if not 0 <= layer < config.num_layers:
        raise UserError(
            f"--layer must be between 0 and {config.num_layers - 1} (the model has "
            f"{config.num_layers} layers); got {layer}"
        )
    ids = torch.tensor([list(args.text.encode("utf-8"))], dtype=torch.long)
    if ids.max() >= config.vocab_size:
        raise UserError(
            f"the text has bytes above the model's vocabulary ({config.vocab_size} tokens)"
        )
    attn = block(model, layer).attn
    names = encoding_names(attn)
    ex = compute.from_model(model, ids, tokens, layer)
    encoding: dict[str, Any] = {
        "pe": "+".join(names) or "none",
        "names": names,
        "params": {},
        "illustrative": False,
        "checkpoint": str(args.checkpoint),
        "layer": layer,
    }
    meta = {
        "heads": config.num_heads,
        "dim": config.head_dim,
        "checkpoint": str(args.checkpoint),
        "layer": layer,
    }
    intro = [
        f"q, k, v: the trained model's own, layer {layer} of {config.num_layers}, from "
        f"{args.checkpoint}",
        f"tokens: the text's {len(tokens)} bytes (␣ = space); heads H = {config.num_heads}, "
        f"head dim D = {config.head_dim}, scale = {ex.scale:.3f}",
    ]
    modules = [m for m in (attn.rope, attn.pe) if m is not None]
    about = [f"{encoding['pe']}: the checkpoint's values (layer {layer})."] + [
        "  " + line for m in modules for line in encodings._per_head(m)
    ]
    title = f"relattn explain — {args.checkpoint}, layer {layer} ({encoding['pe']})"
    return ex, modules, encoding, meta, intro, about, title


def table(modules: list, n: int) -> dict:
    """The sum of the additive encodings' tables for offsets ``0..n`` (zeros without one)."""
    from relattn.pe import PositionEncoding

    additive = [m for m in modules if isinstance(m, PositionEncoding)]
    heads = additive[0].num_heads if additive else 1
    values = torch.zeros(heads, n + 1)
    buckets = None
    with torch.no_grad():
        for m in additive:
            values = values + m.table(0, n).float()
            of = getattr(m, "buckets", None)  # T5's bucket of each offset
            if callable(of):
                buckets = of(torch.arange(n + 1))
    return {"offsets": list(range(n + 1)), "values": values, "buckets": buckets}


def run(args: argparse.Namespace) -> int:
    """Explain, print the text or the JSON, and write the figures."""
    tokens = _tokens(args)
    if args.png is not None:
        check_writable_file("--png", args.png)
    if args.checkpoint is not None:
        ex, modules, encoding, meta, intro, about, title = _from_checkpoint(args, tokens)
    else:
        ex, modules, encoding, meta, intro, about, title = _from_seeded_vectors(args, tokens)
    num_heads = ex.weights.shape[0]
    if args.head is not None and not 0 <= args.head < num_heads:
        raise UserError(f"--head must be between 0 and {num_heads - 1}; got {args.head}")
    heads = [args.head] if args.head is not None else list(range(num_heads))
    single = args.query is not None
    queries = [args.query] if single else list(range(len(tokens)))
    tab = table(modules, args.table) if args.table is not None else None
    written = _write_pngs(args.png, ex, modules, heads, tab, title) if args.png else []
    if args.json:
        obj = to_json.to_json(ex, encoding, meta, queries, single, heads, tab)
        print(json.dumps(obj, ensure_ascii=False))
    else:
        print(render.render(ex, intro, about, queries, single, heads, tab, written))
    return 0


def _write_pngs(png: str, ex, modules, heads: list[int], tab, title: str) -> list[str]:
    from relattn import viz
    from relattn.pe import PositionEncoding

    additive = any(isinstance(m, PositionEncoding) for m in modules)
    paths = [png]
    try:
        viz.plot_explain(
            ex.tokens,
            ex.mask,
            ex.pe[heads] if additive else None,
            ex.weights[heads],
            png,
            title=title,
            heads=heads,
        )
        if tab is not None:
            path = Path(png)
            paths.append(str(path.with_name(path.stem + "-table" + (path.suffix or ".png"))))
            viz.plot_table(
                tab["values"],
                tab["offsets"],
                paths[-1],
                tab["buckets"],
                title=f"table T[h, Δ], Δ = 0..{tab['offsets'][-1]}",
            )
    except viz.PlotUnavailable as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"--png cannot write {paths[-1]!r}: {e.strerror or e}") from None
    return paths
