"""One training step (forward + backward) of transformers models on their own attention paths and
through relattn (``relattn.integrations.transformers.apply``): wall time and peak memory.

Models are random, built from configs: a T5-small-sized T5 (6 + 6 layers, d_model 512, 8 heads)
and a BLOOM-560m-sized BLOOM (24 layers, hidden 1024, 16 heads; ``--bloom-layers`` and
``--bloom-vocab`` shrink it to what a machine's memory holds). Batch 1; T5 gets N encoder and N
decoder tokens. Contenders run interleaved, round by round; each measurement is one step,
timed, while the resident set is sampled for its peak (``relattn.benchmarking.common.peak_memory``;
on CUDA, ``torch.cuda.max_memory_allocated``).

    python benchmarks/hf_models.py --ns 1024 2048 4096 --repeats 1 --out hf.md
    python benchmarks/hf_models.py --device cuda --dtype bfloat16 --repeats 3  # with a GPU
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

T5_SMALL = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
    num_heads=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
)  # fmt: skip
BLOOM_560M = dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)


def t5_contenders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    eager = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**T5_SMALL, attn_implementation="eager")
    )
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    return {"eager": eager, "sdpa": sdpa, "relattn": apply(copy.deepcopy(eager))}


def bloom_contenders(layers: int, vocab: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = {**BLOOM_560M, "n_layer": layers, "vocab_size": vocab}
    eager = transformers.BloomForCausalLM(
        transformers.BloomConfig(**cfg, attn_implementation="eager")
    )
    # BLOOM has no SDPA path in transformers (its attention is eager-only).
    return {"eager": eager, "relattn": apply(copy.deepcopy(eager))}


def step(model: torch.nn.Module, n: int, seq2seq: bool) -> None:
    """One training step's forward and backward at N tokens (batch 1), on the model's device."""
    g = torch.Generator().manual_seed(n)
    device = next(model.parameters()).device
    ids = torch.randint(2, model.config.vocab_size, (1, n), generator=g).to(device)
    model.zero_grad(set_to_none=True)
    if seq2seq:
        labels = torch.randint(2, model.config.vocab_size, (1, n), generator=g).to(device)
        loss = model(input_ids=ids, labels=labels).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def available_mib(device: torch.device) -> float:
    """Free memory in MiB: the GPU's on CUDA, else MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def predict_peak(history: list[tuple[int, float]], n: int) -> float | None:
    """Peak MiB at ``n`` from earlier runs: ``a·N + c·N²`` through the last two points (c >= 0),
    or ``∝ N²`` from a single one; None without any."""
    if not history:
        return None
    if len(history) == 1:
        n0, p0 = history[0]
        return p0 * (n / n0) ** 2
    (n1, p1), (n2, p2) = history[-2:]
    c = max(0.0, (p2 / n2 - p1 / n1) / (n2 - n1))
    a = p2 / n2 - c * n2
    return a * n + c * n * n


def measure(
    name: str, models: dict, ns: list[int], repeats: int, share: float, say, device: torch.device
) -> list[dict]:
    seq2seq = name == "t5"
    history: dict[str, list[tuple[int, float]]] = {c: [] for c in models}  # (N, peak MiB)
    for model in models.values():
        model.train()
        step(model, 64, seq2seq)  # lazy initialization outside the measurements
    rows = []
    for n in ns:
        times: dict[str, list[float]] = {c: [] for c in models}
        peaks: dict[str, list[float]] = {c: [] for c in models}
        for contender in models:
            # Quadratic paths grow as N²: a run predicted past `share` of the memory the machine
            # has free is skipped, not attempted (the kernel's OOM killer would end it).
            predicted = predict_peak(history[contender], n)
            if predicted is not None:
                if predicted > share * available_mib(device):
                    times[contender] = (
                        f"skipped: predicted {predicted / 1024:.1f} GiB > {share:.0%} of the "
                        f"{available_mib(device) / 1024:.1f} GiB available"
                    )
        for _ in range(repeats):
            for contender, model in models.items():
                if not isinstance(times[contender], list):
                    continue
                elapsed = []

                def run(model=model, elapsed=elapsed, n=n) -> None:
                    synchronize(device)
                    start = time.perf_counter()
                    step(model, n, seq2seq)
                    synchronize(device)
                    elapsed.append(time.perf_counter() - start)

                peak = peak_memory(run, device) / 2**20
                times[contender].append(elapsed[0])
                peaks[contender].append(peak)
                history[contender].append((n, peak))
                say(f"{name} N={n} {contender}: {elapsed[0]:.2f} s, peak {peak:.0f} MiB")
        base = {c: statistics.median(t) for c, t in times.items() if isinstance(t, list) and t}
        for contender in models:
            t = times[contender]
            row = {"model": name, "n": n, "path": contender}
            if isinstance(t, list) and t:
                row["time_s"] = statistics.median(t)
                row["peak_mib"] = max(peaks[contender])
                if contender != "relattn" and "relattn" in base:
                    row["relattn_speedup"] = row["time_s"] / base["relattn"]
                    row["relattn_memory_ratio"] = max(peaks["relattn"]) / row["peak_mib"]
            else:
                row["note"] = t
            rows.append(row)
    return rows


COLUMNS = [
    ("model", "model"),
    ("n", "N"),
    ("path", "attention path"),
    ("time_s", "fwd+bwd s"),
    ("peak_mib", "peak MiB"),
    ("relattn_speedup", "this path ÷ relattn (time)"),
    ("relattn_memory_ratio", "relattn ÷ this path (peak)"),
    ("note", "note"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--models", nargs="+", default=["t5", "bloom"], choices=["t5", "bloom"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bloom-layers", type=int, default=BLOOM_560M["n_layer"])
    parser.add_argument("--bloom-vocab", type=int, default=BLOOM_560M["vocab_size"])
    parser.add_argument(
        "--memory-share", type=float, default=0.6,
        help="skip a run whose predicted peak passes this share of the available memory",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="the models' parameter dtype",
    )  # fmt: skip
    parser.add_argument("--out", help="write the Markdown report here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    dtype = getattr(torch, args.dtype)

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    rows = []
    for name in args.models:
        models = (
            t5_contenders()
            if name == "t5"
            else bloom_contenders(args.bloom_layers, args.bloom_vocab)
        )
        models = {c: m.to(device=device, dtype=dtype) for c, m in models.items()}
        rows += measure(name, models, args.ns, args.repeats, args.memory_share, say, device)
        del models
    info = machine_info()
    bloom = f"BLOOM: {args.bloom_layers} layers, vocabulary {args.bloom_vocab}; "
    text = (
        f"transformers {transformers.__version__}; {bloom if 'bloom' in args.models else ''}"
        f"{args.device}, {args.dtype}; {args.repeats} round(s)\n\n{format_machine(info)}\n\n"
        f"{markdown_table(rows, COLUMNS)}\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
