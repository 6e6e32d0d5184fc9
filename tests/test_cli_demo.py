"""``relattn demo``: the report it writes, interrupt and resume, and its errors."""

import io
import json
import math
import subprocess
import sys

import pytest

from relattn.cli.main import main
from relattn.demo import train

# Smaller still than --quick: the tests check the plumbing, not the numbers.
TINY = ["demo", "--quick", "--threads", "1", "--steps", "6", "--max-bytes", "40000"]
REPORT_FILES = [
    "report.md",
    "report.html",
    "results.json",
    "perplexity.png",
    "tables.png",
    "attention.png",
]


def test_quick_demo_writes_the_whole_report(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "relattn", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == list(train.DEFAULT_ENCODINGS)
    assert results["settings"]["eval_lengths"] == [64, 128, 256, 512]
    assert results["machine"]
    for name, entry in results["models"].items():
        assert [r["length"] for r in entry["eval"]] == [64, 128, 256, 512]
        for row in entry["eval"]:
            assert math.isfinite(row["ppl"]) and row["ppl"] > 1
            assert row["bpb"] == pytest.approx(math.log2(row["ppl"]))
        assert math.isfinite(entry["train"]["final_loss"])
        ckpt = out / entry["checkpoint"]
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file(), name
    md = (out / "report.md").read_text()
    assert "![" in md and "| kerple |" in md and "Protocol" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "Report:" in proc.stdout and "N=512" in proc.stdout


def test_checkpoints_load_and_reproduce_the_numbers(tmp_path):
    import torch

    from relattn.demo.data import load_corpus
    from relattn.demo.evaluate import perplexity
    from relattn.models import TinyLM

    out = tmp_path / "r"
    assert main([*TINY, "--pe", "alibi", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["models"]["alibi"]
    model = TinyLM.load(out / entry["checkpoint"])
    s = results["settings"]
    total = entry["eval"][0]["tokens"]
    corpus = load_corpus(
        None, seed=s["seed"], train_bytes=s["train_bytes"], heldout_bytes=total + 1
    )
    with torch.no_grad():
        row = perplexity(model, corpus.heldout, s["context"], total)
    assert row["ppl"] == pytest.approx(entry["eval"][0]["ppl"], rel=1e-4)


def test_interrupted_run_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    args = [*TINY, "--pe", "none,alibi", "--out", str(out)]
    real = train.train_model
    trained = []

    def interrupt_at_alibi(model, stream, s, desc="", quiet=False):
        if model.config.pe == "alibi":
            raise KeyboardInterrupt
        trained.append(model.config.pe)
        return real(model, stream, s, desc=desc, quiet=quiet)

    monkeypatch.setattr(train, "train_model", interrupt_at_alibi)
    assert main(args) == 130
    assert trained == ["none"]
    partial = json.loads((out / "results.json").read_text())
    assert list(partial["models"]) == ["none"]
    weights = out / "checkpoints" / "none" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert "--resume" in capsys.readouterr().err

    def count(model, stream, s, desc="", quiet=False):
        trained.append(model.config.pe)
        return real(model, stream, s, desc=desc, quiet=quiet)

    monkeypatch.setattr(train, "train_model", count)
    assert main([*args, "--resume"]) == 0
    assert trained == ["none", "alibi"]  # none was not trained again
    assert weights.stat().st_mtime_ns == stamp
    assert "resume: none already trained" in capsys.readouterr().err
    done = json.loads((out / "results.json").read_text())
    assert list(done["models"]) == ["none", "alibi"]
    assert done["models"]["none"] == partial["models"]["none"]
    assert (out / "report.md").is_file()

    # Resuming with different settings is refused, in one line.
    assert main([*args, "--resume", "--context", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings differ" in err[0] and "context" in err[0]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--pe", "nope"], "unknown encoding"),
        (["--pe", "t5,t5"], "twice"),
        (["--pe", ","], "at least one"),
        (["--context", "1"], "--context"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threads", "0"], "--threads"),
        (["--data", "/no/such/corpus"], "does not exist"),
        (["--data", "EMPTY_DIR"], "no files"),
        (["--context", "abc"], "invalid int"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [str(empty) if a == "EMPTY_DIR" else a for a in extra]
    assert main([*TINY, "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relattn: error:"), err
    assert needle in err[0]


def test_any_text_file_can_be_the_corpus(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    lines = [
        f"line {i}: the quick brown fox jumps over the lazy dog {i * i}\n" for i in range(3000)
    ]
    text.write_text("".join(lines))
    out = tmp_path / "r"
    assert main([*TINY, "--pe", "t5", "--data", str(text), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["corpus"]["source"] == str(text)
    assert results["corpus"]["heldout_files"] >= 1


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_redraws_on_a_terminal_and_writes_lines_elsewhere(tty):
    from relattn.demo.progress import Progress

    stream = _Stream(tty)
    with Progress(50, "model", stream=stream, interval=0.0, line_interval=0.0) as bar:
        for step in range(50):
            bar.update(1, loss=1.0 / (step + 1))
    text = stream.getvalue()
    assert "50/50" in text and "loss 0.020" in text
    if tty:
        assert text.count("\r") >= 50 and text.endswith("\n")
    else:
        assert "\r" not in text and len(text.splitlines()) >= 50
