"""TinyLM.generate throughput on the CPU: relattn (``backend="auto"``) against the same model
whose attention layers build the bias as a dense tensor and call torch's SDPA (the baseline,
written here, not in the library). Greedy, 256 new tokens after prompts of 512 and 2048.

    python benchmarks/generation.py --threads 1 2 --out generation.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from relattn._machine import CPU
from relattn.benchmarking.common import format_machine, machine_info, markdown_table, write_report
from relattn.models import TinyLM, TinyLMConfig
from relattn.pe.base import offsets_grid


def sdpa_with_materialized_bias(self, x, *, cache=None, doc_ids=None, window=None,
                                key_padding_mask=None, context_parallel=None):  # fmt: skip
    """RelativeSelfAttention.forward as users write it without relattn: the (H, n, Nk) bias
    from the encoding, the causal mask filled in, then SDPA. Causal, no RoPE, no masks, one
    process (the keyword arguments it takes are the layer's, so the model calls it unchanged)."""
    if any(a is not None for a in (doc_ids, window, key_padding_mask, context_parallel)):
        raise ValueError("the baseline runs plain causal attention only")
    b, n, _ = x.shape
    q, k, v = self.project(x)
    q_offset = 0
    if cache is not None:
        view = cache.update(k, v)
        k, v, q_offset = view.k, view.v, view.q_offset
    nk = k.shape[2]
    hidden = offsets_grid(n, nk, q_offset, device=x.device) < 0
    bias = self.pe.bias(n, nk, q_offset).masked_fill(hidden, float("-inf"))
    gqa = self.num_kv_heads != self.num_heads
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], enable_gqa=gqa)
    return self.dropout(self.out_proj(y.transpose(1, 2).reshape(b, n, self.d_model)))


def baseline_of(model: TinyLM) -> TinyLM:
    """A copy of ``model`` whose attention layers run :func:`sdpa_with_materialized_bias`."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.attn.forward = types.MethodType(sdpa_with_materialized_bias, block.attn)
    return twin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", help="write the Markdown here")
    parser.add_argument("--json", help="write the raw rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = TinyLMConfig(
        d_model=args.d_model, num_heads=args.heads, num_kv_heads=args.kv_heads,
        num_layers=args.layers, pe="t5", max_seq_len=max(args.prompts) + args.new,
    )  # fmt: skip
    ours = TinyLM(config).eval()
    base = baseline_of(ours)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for p in args.prompts:
            prompt = torch.randint(0, config.vocab_size, (1, p))
            times: dict[str, list[float]] = {"relattn": [], "baseline": []}
            outs = {}
            for model, name in ((ours, "relattn"), (base, "baseline")):  # warm-up
                outs[name] = model.generate(prompt, 8, temperature=0.0)
            for _ in range(args.rounds):
                for model, name in ((ours, "relattn"), (base, "baseline")):
                    start = time.perf_counter()
                    outs[name] = model.generate(prompt, args.new, temperature=0.0)
                    times[name].append(time.perf_counter() - start)
            agree = (outs["relattn"][0, p:] == outs["baseline"][0, p:]).float().mean().item()
            ratios = sorted(b / a for a, b in zip(times["relattn"], times["baseline"], strict=True))
            row = {
                "threads": threads,
                "prompt": p,
                "relattn_tok_s": args.new / statistics.median(times["relattn"]),
                "baseline_tok_s": args.new / statistics.median(times["baseline"]),
                "speedup": statistics.median(ratios),
                "speedup_range": f"{ratios[0]:.3g}–{ratios[-1]:.3g}",
                "agree": agree,
            }
            print(row, file=sys.stderr)
            rows.append(row)
    columns = [
        ("threads", "threads"),
        ("prompt", "prompt"),
        ("relattn_tok_s", "relattn tokens/s"),
        ("baseline_tok_s", "SDPA + bias tokens/s"),
        ("speedup", "speed-up (median of rounds)"),
        ("speedup_range", "min–max over rounds"),
        ("agree", "same greedy tokens"),
    ]
    header = (
        f"TinyLM d_model={config.d_model}, {config.num_layers} layers, {config.num_heads} heads "
        f"({config.num_kv_heads or config.num_heads} kv), head dim {config.head_dim}, T5 bias, "
        f"fp32; greedy generate() of {args.new} tokens, wall time including the prefill, "
        f"{args.rounds} interleaved rounds after a warm-up.\n\nCPU: {CPU.describe()}"
    )
    text = f"{header}\n\n{format_machine(machine_info())}\n\n{markdown_table(rows, columns)}\n"
    write_report(text, machine_info(), rows, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
