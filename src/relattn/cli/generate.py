"""``relattn generate``: continue a prompt with a trained checkpoint, streaming to the terminal.

    relattn generate --checkpoint DIR --prompt "def main(" [--max-new-tokens N]
        [--temperature T] [--top-k K] [--seed S] [--dtype bfloat16]

DIR is a folder written by `relattn train`, `relattn demo` (report/checkpoints/NAME) or
TinyLM.save. Decoding uses the KV cache: one pass over the prompt, then one token per step.
The prompt is printed first, then each new character as soon as it is sampled.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import UserError
from ._args import bounded_float, bounded_int, seed_flag

MAX_NEW_TOKENS = 100_000
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a model folder")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=bounded_int(0, MAX_NEW_TOKENS),
        default=200,
        metavar="N",
        help="bytes to generate (default 200)",
    )
    parser.add_argument(
        "--temperature",
        type=bounded_float(0.0, 100.0),
        default=0.8,
        metavar="T",
        help="0 is greedy; higher is more random (default 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=bounded_int(1, 1 << 20),
        default=None,
        metavar="K",
        help="sample among the K most likely bytes only (default: all)",
    )
    seed_flag(parser, "make the sample reproducible")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="run the model in this dtype: bfloat16 halves the weights and the KV cache "
        "(default float32, the checkpoint's)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and stream the continuation to stdout."""
    from ..demo.model_folders import load_model
    from ..demo.sample import sample_text

    if not args.prompt:
        raise UserError("--prompt must not be empty (the model continues a text)")
    model = load_model(args.checkpoint, "--checkpoint")
    if args.dtype != "float32":
        import torch

        model = model.to(getattr(torch, args.dtype))
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    pieces = sample_text(
        model,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
