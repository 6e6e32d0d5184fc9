"""``relattn demo``: the report it writes, interrupt and resume, and its errors."""

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relattn.cli.main import main
from relattn.demo import trainer

# Smaller still than --quick: the tests check the plumbing, not the numbers.
TINY = ["demo", "--quick", "--threads", "1", "--steps", "6", "--max-bytes", "40000"]
REPORT_FILES = [
    "report.md",
    "report.html",
    "results.json",
    "perplexity.png",
    "loss.png",
    "tables.png",
]


def test_quick_demo_writes_the_whole_report(tmp_path):
    """... readable as the umask says (the atomic writes once made report.html, report.md and
    results.json 0600 beside 0644 figures; 027 here gives 0640), and no .lock left behind."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "relattn", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert proc.returncode == 0, proc.stderr
    for name in REPORT_FILES + [f"attention-{n}.png" for n in trainer.DEFAULT_ENCODINGS]:
        assert (out / name).stat().st_size > 0, name
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert set(REPORT_FILES) <= set(modes) and set(modes.values()) == {"0o640"}, modes
    folders = {p.name: oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")] if p.is_dir()}
    assert len(folders) > 1 and set(folders.values()) == {"0o750"}, folders
    assert not list(out.rglob(".lock")) and not list(out.rglob(".*"))
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == list(trainer.DEFAULT_ENCODINGS)
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
    assert "Sample generations" in md and "linear colour scale" in md and "loss.png" in md
    for name, entry in results["models"].items():
        assert set(entry["sample"]) == {"prompt", "continuation"}
        assert f"attention-{name}.png" in md
        # checkpoints do not cap generation at the evaluation length
        assert entry["config"]["max_seq_len"] > 100_000
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
    real = trainer.train_model
    trained = []

    def interrupt_at_alibi(model, stream, s, desc="", quiet=False):  # noqa: ARG001
        if model.config.pe == "alibi":
            raise KeyboardInterrupt
        trained.append(model.config.pe)
        return real(model, stream, s, desc=desc, quiet=quiet)

    monkeypatch.setattr(trainer, "train_model", interrupt_at_alibi)
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

    monkeypatch.setattr(trainer, "train_model", count)
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
        (["--pe", "alibi+t5"], "one additive"),
        (["--pe", ","], "at least one"),
        (["--context", "1"], "--context"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threads", "0"], "--threads"),
        (["--threads", "100000"], "--threads"),
        (["--seed", str(2**64)], "--seed"),
        (["--data", "/no/such/corpus"], "does not exist"),
        (["--data", "EMPTY_DIR"], "no files"),
        (["--data", "EMPTY_FILE"], "is empty"),
        (["--data", "BINARY_FILE"], "not text"),
        (["--context", "abc"], "--context"),
        (["--out", "/proc/relattn-cannot-write-here"], "--out"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    files = {
        "EMPTY_DIR": empty,
        "EMPTY_FILE": tmp_path / "empty.txt",
        "BINARY_FILE": tmp_path / "blob.bin",
    }
    extra = [str(files.get(a, a)) for a in extra]
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
    assert results["corpus"]["unit"] == "chunk" and results["corpus"]["heldout_files"] >= 1
    assert "1 file cut into" in capsys.readouterr().err
    assert "1 file cut into" in (out / "report.md").read_text()


def test_a_small_file_without_quick_names_eval_bytes(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i}: some words to learn from\n" for i in range(2000)))
    assert main(["demo", "--data", str(text), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-bytes" in err[0] and "1 file cut into" in err[0], err


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_redraws_on_a_terminal_and_writes_lines_elsewhere(tty):
    from relattn._progress import Progress

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


# ----------------------------------------------------------------------------- what is on disk


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished two-model run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "r"
    assert main([*TINY, "--pe", "none,alibi", "--out", str(out)]) == 0
    return out


def _run_two(tmp_path, finished):
    out = tmp_path / "r"
    shutil.copytree(finished, out)
    return out


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, capsys):
    from relattn._io import FolderLock

    out = tmp_path / "r"
    with FolderLock(out, "a test"):  # as if another demo were running there
        assert main([*TINY, "--pe", "none", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use" in err[0] and "--out" in err[0], err
    assert not (out / "results.json").exists()


def test_a_fresh_run_never_leaves_the_old_report_beside_new_results(
    tmp_path, monkeypatch, finished_run
):
    out = _run_two(tmp_path, finished_run)
    assert (out / "report.md").is_file()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_model", interrupt)
    assert main([*TINY, "--pe", "none,alibi", "--out", str(out)]) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == {}
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


def _corrupt(out, how):
    ckpt = out / "checkpoints"
    if how == "truncated weights":
        weights = ckpt / "alibi" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "corrupt config":
        (ckpt / "alibi" / "config.json").write_text("{not json")
    elif how == "swapped folders":
        (ckpt / "none").rename(ckpt / "tmp")
        (ckpt / "alibi").rename(ckpt / "none")
        (ckpt / "tmp").rename(ckpt / "alibi")
    elif how == "results is a list":
        (out / "results.json").write_text("[]")
    elif how == "models is a list":
        results = json.loads((out / "results.json").read_text())
        results["models"] = []
        (out / "results.json").write_text(json.dumps(results))
    elif how == "entry without eval":
        results = json.loads((out / "results.json").read_text())
        del results["models"]["alibi"]["eval"]
        (out / "results.json").write_text(json.dumps(results))


@pytest.mark.parametrize(
    "how, retrained, said",
    [
        ("truncated weights", ["alibi"], "unreadable"),
        ("corrupt config", ["alibi"], "unreadable"),
        ("swapped folders", ["none", "alibi"], "holds another model"),
        ("results is a list", ["none", "alibi"], "not a demo's results"),
        ("models is a list", ["none", "alibi"], "not a demo's results"),
        ("entry without eval", ["alibi"], "incomplete"),
    ],
)
def test_resume_on_broken_state_retrains_what_is_broken_and_says_so(
    tmp_path, monkeypatch, capsys, finished_run, how, retrained, said
):
    out = _run_two(tmp_path, finished_run)
    _corrupt(out, how)
    capsys.readouterr()
    real, trained = trainer.train_model, []

    def count(model, stream, s, desc="", quiet=False):
        trained.append("alibi" if model.config.pe == "alibi" else "none")
        return real(model, stream, s, desc=desc, quiet=quiet)

    monkeypatch.setattr(trainer, "train_model", count)
    assert main([*TINY, "--pe", "none,alibi", "--out", str(out), "--resume"]) == 0
    assert trained == retrained
    assert said in capsys.readouterr().err
    from relattn.models import TinyLM

    results = json.loads((out / "results.json").read_text())
    for name in ("none", "alibi"):
        config = TinyLM.load(out / "checkpoints" / name).config
        assert config.pe == name and results["models"][name]["config"]["pe"] == name


def test_checkpoint_saves_are_atomic(tmp_path, monkeypatch):
    """A save that dies midway leaves the previous checkpoint as it was."""
    from relattn.demo.model_folders import save_model_dir
    from relattn.models import TinyLM, TinyLMConfig

    folder = tmp_path / "ckpt"
    first = TinyLM(TinyLMConfig(d_model=16, num_heads=2, num_layers=1, pe="alibi"))
    save_model_dir(first, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def dies(self, path):
        (Path(path) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(TinyLM, "save", dies)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(first, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left


def test_generate_and_explain_read_a_demo_checkpoint(tmp_path, capsys):
    """The demo's own folder layout (report/checkpoints/NAME) feeds generate and explain."""
    out = tmp_path / "report"
    assert main([*TINY, "--pe", "alibi", "--out", str(out)]) == 0
    ckpt = out / json.loads((out / "results.json").read_text())["models"]["alibi"]["checkpoint"]
    assert ckpt == out / "checkpoints" / "alibi"
    capsys.readouterr()

    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "20"]
    assert main([*argv, "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f(") and len(text.rstrip("\n")) > len("def f(")

    png = tmp_path / "att.png"
    argv = ["explain", "--checkpoint", str(ckpt), "x = 1", "--json", "--png", str(png)]
    assert main([*argv, "--layer", "1"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["tokens"] == ["x", "␣", "=", "␣", "1"] and obj["layer"] == 1
    assert obj["encoding"]["pe"] == "alibi" and not obj["encoding"]["illustrative"]
    assert png.read_bytes()[:4] == b"\x89PNG"
