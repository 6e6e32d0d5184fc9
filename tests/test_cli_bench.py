"""``relattn bench``: a quick run prints a table and writes it; bad flags exit 2."""

import pytest

from relattn.cli.main import main


def test_quick_bench_prints_and_writes_the_table(tmp_path, capsys):
    """--quick times enough rounds for a spread (one round once printed "0.883–0.883") and says
    plainly that its numbers are a smoke run, not a measurement."""
    from relattn.benchmarking.common import MIN_ROUNDS_FOR_IQR
    from relattn.cli.bench import QUICK_CAVEAT

    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--json", str(raw)]) == 0
    printed = capsys.readouterr().out
    assert "## CPU" in printed and "|" in printed
    written = out.read_text()
    assert written.startswith("# relattn bench") and "## CPU" in written
    assert QUICK_CAVEAT in written
    table = [line for line in written.splitlines() if line.startswith("|")]
    assert len(table) >= 3  # header, rule, at least one row
    import json

    paired = [r for r in json.loads(raw.read_text())["rows"]["cpu"] if "rounds" in r]
    assert paired and all(
        r["rounds"] >= MIN_ROUNDS_FOR_IQR and r["fwd_rounds"] >= MIN_ROUNDS_FOR_IQR for r in paired
    )
    assert "no spread" not in written


def test_bfloat16_bench_names_the_dtype_and_the_kernel_path(tmp_path, capsys):
    """--dtype bfloat16 times every contender in bf16 and says what auto ran (on the CPU
    kernel: the widening and the tile products)."""
    import json

    from relattn.backends import cpu_kernel

    raw = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--device", "cpu", "--dtype", "bfloat16", "--n", "320"]
    assert main([*argv, "--repeats", "1", "--json", str(raw)]) == 0
    printed = capsys.readouterr().out
    assert "bfloat16, B=1" in printed and "fp32" not in printed
    rows = json.loads(raw.read_text())["rows"]["cpu"]
    auto = next(r for r in rows if r["key"] == "auto")
    if cpu_kernel.available():
        assert "cpu_kernel: bfloat16 " in auto["contender"]
    assert all(isinstance(r.get("fwd_s"), float) for r in rows if r["key"] != "flex"), rows


def test_the_benchmark_script_is_the_same_front_end(tmp_path):
    """benchmarks/cpu_attention.py takes relattn bench's flags and writes the same files."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_attention.py"
    md, raw = tmp_path / "cpu.md", tmp_path / "cpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--n",
            "64",
            "--repeats",
            "1",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(md),
            "--json",
            str(raw),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## CPU" in md.read_text() and "## GPU" not in md.read_text()
    rows = json.loads(raw.read_text())["rows"]["cpu"]
    assert {r["n"] for r in rows} == {64}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--n", "abc"], "--n"),
        (["--n", "0"], "--n"),
        (["--n", ","], "--n"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "0"], "--threads"),
        (["--threads", "100000"], "--threads"),
        (["--n", "99999999999"], "--n"),
        (["--out", "/no/such/dir/bench.md"], "--out"),
        (["--out", "/proc/bench.md"], "--out"),  # not writable: refused before measuring
        (["--json", "/no/such/dir/bench.json"], "--json"),
        (["--bogus"], "unrecognized"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, monkeypatch, extra, needle):
    from relattn.benchmarking import cpu

    def never(*args, **kwargs):
        raise AssertionError("measured before checking the flags")

    monkeypatch.setattr(cpu, "run", never)
    assert main(["bench", "--quick", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relattn: error:"), err
    assert needle in err[0]


def test_rounds_and_paired_ratios():
    """Times come per round for each contender; a failing contender is reported, not timed;
    ratios are taken round by round and summarized by quartiles."""
    from relattn.benchmarking.common import medians, round_ratios, time_rounds

    calls = []

    def boom():
        raise RuntimeError("no backward")

    rounds = time_rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": boom},
        repeats=3,
        warmup=1,
    )
    assert calls == ["a", "b"] * 4  # warm-up then three rounds, interleaved
    assert len(rounds["a"]) == len(rounds["b"]) == 3
    assert rounds["bad"] == "RuntimeError: no backward"
    assert medians(rounds)["bad"] == "RuntimeError: no backward"

    fake = {"x": [2.0, 4.0, 9.0, 8.0, 2.0], "y": [1.0, 1.0, 3.0, 2.0, 2.0], "err": "boom"}
    # per-round ratios 2, 4, 3, 4, 1 -> sorted 1, 2, 3, 4, 4
    assert round_ratios(fake, "x", "y") == (2.0, 3.0, 4.0)
    assert round_ratios(fake, "x", "err") is None
    assert round_ratios(fake, "x", "missing") is None
    assert round_ratios({"x": [3.0], "y": [1.5]}, "x", "y") == (2.0, 2.0, 2.0)


def test_time_rounds_takes_more_rounds_while_the_calls_are_short(monkeypatch):
    """At least ``repeats`` rounds, then more until the timed calls add up to ``min_time`` (a
    fake clock: every call takes 1/8 s, exact in binary), capped by ``max_rounds``; warm-up
    calls are not timed and come before every timed call."""
    from relattn.benchmarking import common

    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    calls = []

    def call(name):
        def fn():
            calls.append(name)
            now[0] += 0.125

        return fn

    fns = {"a": call("a"), "b": call("b")}
    rounds = common.time_rounds(fns, repeats=2, warmup=2, min_time=1.25)
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up, untimed
    assert len(rounds["a"]) == len(rounds["b"]) == 5  # 2 x 1/8 s per round, 1.25 s in all
    assert rounds["a"] == [0.125] * 5
    calls.clear()
    assert len(common.time_rounds(fns, repeats=7, warmup=0, min_time=0.01)["a"]) == 7
    assert len(common.time_rounds(fns, 1, warmup=0, min_time=100, max_rounds=9)["b"]) == 9


def test_a_spread_is_printed_only_from_enough_rounds():
    from relattn.benchmarking.common import MIN_ROUNDS_FOR_IQR, spread

    assert spread((0.883, 0.883, 0.883), 1) == "0.883 (1 round: no spread)"
    assert spread((1.0, 2.0, 3.0), MIN_ROUNDS_FOR_IQR - 1) == "2 (4 rounds: no spread)"
    assert spread((1.5, 2.0, 2.5), MIN_ROUNDS_FOR_IQR) == "2 (1.5–2.5)"
    assert spread((0.1, 1.0, 9.9), MIN_ROUNDS_FOR_IQR) == "1 (0.1–9.9) noisy"
    assert spread(None, 3) == ""


def test_cpu_report_has_the_paired_ratio_table():
    from relattn.benchmarking import cpu

    rows = cpu.run([64, 300], repeats=1, quick=True)
    for key in ("auto", "chunked"):
        row = next(r for r in rows if r["key"] == key)
        assert row["rounds"] == row["fwd_rounds"] == 1 and len(row["speedup_over_bias"]) == 3
    # auto names the backend it ran, as dispatch chooses it for a training call
    auto = {r["n"]: r["contender"] for r in rows if r["key"] == "auto"}
    assert auto == {n: f"relattn auto (ran {cpu.auto_choice(n)})" for n in (64, 300)}
    assert cpu.auto_choice(300) != "reference"
    text = cpu.to_markdown(rows)
    assert "Per-round ratios of relattn" in text
    assert "SDPA + bias fwd+bwd ÷ relattn" in text and "relattn auto (ran" in text
    # one round: a median, never a range of one sample
    paired = text.split("Per-round ratios of relattn")[1]
    assert "1 round: no spread" in paired and "–" not in paired.split("|\n|---")[1]


def test_forward_backward_below_forward_is_flagged(monkeypatch):
    """A fwd+bwd median below the fwd median cannot be real (0.017 s against 0.172 s was once
    printed as is): the row says it is noise."""
    from relattn.benchmarking import cpu

    passes = []

    def fake_rounds(fns, repeats, warmup=1, device=None, min_time=0.0, max_rounds=1000):
        passes.append(fns)  # run() times the forward first, then the forward+backward
        return {name: [0.172 if len(passes) % 2 else 0.017] * repeats for name in fns}

    monkeypatch.setattr(cpu, "time_rounds", fake_rounds)
    rows = cpu.run([32], repeats=5, quick=True)
    assert len(passes) == 2 and rows
    assert all("fwd+bwd timed below fwd" in (r["note"] or "") for r in rows)


def test_the_generation_baseline_is_the_same_model(monkeypatch):
    """benchmarks/generation.py's baseline (the bias materialized, then SDPA) computes what the
    relattn model computes: same logits, same greedy tokens with the KV cache. It takes every
    keyword the layer is called with (a new one broke it once)."""
    import importlib.util
    import sys
    from pathlib import Path

    import torch

    from relattn.models import TinyLM, TinyLMConfig

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("generation_bench", folder / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "generation_bench", bench)
    spec.loader.exec_module(bench)

    torch.manual_seed(0)
    config = TinyLMConfig(vocab_size=40, d_model=32, num_heads=4, num_layers=2, max_seq_len=64)
    model = TinyLM(config).eval()
    twin = bench.baseline_of(model).eval()
    tokens = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens), model(tokens), rtol=1e-4, atol=1e-5)
        prompt = tokens[:1, :9]
        assert torch.equal(
            twin.generate(prompt, 6, temperature=0.0), model.generate(prompt, 6, temperature=0.0)
        )


def test_decode_benchmark_rows_and_table():
    """benchmarks/decode.py's rows: ratios and both overheads (three contenders interleaved,
    and relattn with SDPA alone) per encoding and cache length, in the Markdown table."""
    from relattn.benchmarking import decode

    rows = decode.decode_rows([16], ["t5", "alibi"], 3)
    assert [(r["encoding"], r["nk"]) for r in rows] == [("t5", 16), ("alibi", 16)]
    for r in rows:
        for key in ("vs_sdpa", "vs_bias", "overhead_us", "paired_overhead_us"):
            q1, q2, q3 = r[key]
            assert q1 <= q2 <= q3
    text = decode.to_markdown(rows)
    assert "the same, the two alone, µs" in text and text.count("\n") >= 3
    import torch

    (row,) = decode.decode_rows([16], ["t5"], 3, dtype=torch.bfloat16)
    assert row["relattn_s"] > 0 and row["vs_sdpa"] is not None
    assert decode.describe(torch.bfloat16).startswith("bfloat16, ")
