"""One training step (forward + backward) of tiny Inkling-family models at N tokens, on the
model's own eager path (the dense ``(B, H, N, N)`` band bias) and through relattn
(``relattn.integrations.transformers.apply``): wall time and peak memory.

Models are random, built from configs (nothing downloaded): hidden 128, 4 query heads over 2
key/value heads of dim 32, one sliding layer (window 512, band extent 512) and one global
layer (band extent 1024, d_rel 16, log-scaling from position 1024), a few small experts.
Batch 1. Contenders run interleaved, round by round; each measurement is one step, timed,
while the resident set is sampled for its peak (``relattn.benchmarking.common.peak_memory``;
on CUDA, ``torch.cuda.max_memory_allocated``). The relattn backend is whatever ``auto`` picks
for the band (printed).

    python benchmarks/hf_inkling.py --n 4096 --repeats 1 --out inkling.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import transformers

from relattn.benchmarking.common import (
    format_machine,
    machine_info,
    markdown_table,
    peak_memory,
    synchronize,
)
from relattn.integrations.transformers import apply

TINY = dict(
    vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=32,
    sliding_window_size=512, d_rel=16, rel_extent=1024, log_scaling_n_floor=1024,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    max_position_embeddings=1 << 16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_hidden_layers=2, layer_types=["hybrid_sliding", "hybrid"],
)  # fmt: skip


def build(family: str) -> torch.nn.Module:
    """The tiny eager model of ``family``."""
    torch.manual_seed(0)
    t = transformers
    cfg = {**TINY, "attn_implementation": "eager"}
    if family == "inkling":
        config = t.InklingTextConfig(**cfg, intermediate_size=256, n_shared_experts=1)
        return t.InklingForCausalLM(config)
    if family == "inkling2":
        config = t.Inkling2TextConfig(**cfg, n_layers_per_attn_res_block=1, unpadded_vocab_size=512)
        return t.Inkling2ForCausalLM(config)
    if family == "inkling2_loop":
        config = t.Inkling2LoopTextConfig(
            **cfg, n_layers_per_attn_res_block=1, unpadded_vocab_size=512,
            loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=16,
        )  # fmt: skip
        return t.Inkling2LoopForCausalLM(config)
    raise ValueError(family)


def step(model: torch.nn.Module, n: int) -> None:
    """One training step's forward and backward at N tokens (batch 1)."""
    g = torch.Generator().manual_seed(n)
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def backend_used(model: torch.nn.Module, n: int) -> str:
    """The relattn backend ``auto`` picks for the applied model's band calls at N tokens."""
    from relattn.call import prepare
    from relattn.pe.token import BandTerm

    q = torch.zeros(1, TINY["num_attention_heads"], n, TINY["head_dim"], requires_grad=True)
    k = torch.zeros(1, TINY["num_key_value_heads"], n, TINY["head_dim"])
    r = torch.zeros(1, TINY["num_attention_heads"], n, TINY["d_rel"])
    term = BandTerm(r, torch.zeros(TINY["d_rel"], TINY["rel_extent"]))
    return prepare(q, k, k, term).backend.name


def measure(family: str, n: int, repeats: int, device: torch.device, say) -> list[dict]:
    eager = build(family).to(device).train()
    models = {"eager": eager, "relattn": apply(copy.deepcopy(eager))}
    for model in models.values():
        step(model, 64)  # lazy initialization outside the measurements
    times: dict[str, list[float]] = {c: [] for c in models}
    peaks: dict[str, list[float]] = {c: [] for c in models}
    for _ in range(repeats):
        for contender, model in models.items():
            elapsed: list[float] = []

            def run(model=model, elapsed=elapsed) -> None:
                synchronize(device)
                start = time.perf_counter()
                step(model, n)
                synchronize(device)
                elapsed.append(time.perf_counter() - start)

            peak = peak_memory(run, device) / 2**20
            times[contender].append(elapsed[0])
            peaks[contender].append(peak)
            say(f"{family} N={n} {contender}: {elapsed[0]:.2f} s, peak {peak:.0f} MiB")
    t = {c: statistics.median(v) for c, v in times.items()}
    p = {c: max(v) for c, v in peaks.items()}
    return [
        {
            "model": family, "n": n, "eager_s": t["eager"], "relattn_s": t["relattn"],
            "speedup": t["eager"] / t["relattn"], "eager_mib": p["eager"],
            "relattn_mib": p["relattn"], "memory_ratio": p["relattn"] / p["eager"],
        }
    ]  # fmt: skip


COLUMNS = [
    ("model", "model"),
    ("n", "N"),
    ("eager_s", "eager fwd+bwd s"),
    ("relattn_s", "relattn fwd+bwd s"),
    ("speedup", "eager ÷ relattn (time)"),
    ("eager_mib", "eager peak MiB"),
    ("relattn_mib", "relattn peak MiB"),
    ("memory_ratio", "relattn ÷ eager (peak)"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument(
        "--families", nargs="+", default=["inkling", "inkling2", "inkling2_loop"],
        choices=["inkling", "inkling2", "inkling2_loop"],
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    say(f"relattn backend for the band at N={args.n}: {backend_used(build('inkling'), args.n)}")
    rows = []
    for family in args.families:
        rows += measure(family, args.n, args.repeats, device, say)
    report = "\n".join(
        [
            f"# Inkling-family training step, N = {args.n}, batch 1",
            "",
            markdown_table(rows, COLUMNS),
            "",
            format_machine(machine_info()),
        ]
    )
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
