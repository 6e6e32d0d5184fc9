"""``relattn train`` → ``generate`` → ``explain --checkpoint`` on a user's text file, Ctrl-C and
``--resume``, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from relattn.cli.main import main
from relattn.demo import trainer
from relattn.models import TinyLM

TINY = [
    "--context",
    "32",
    "--d-model",
    "16",
    "--heads",
    "2",
    "--layers",
    "1",
    "--batch-size",
    "4",
    "--eval-bytes",
    "2048",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    lines = [f"note {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(400)]
    path.write_text("".join(lines))
    return path


def _relattn(*args: str, timeout: int = 120, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relattn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(umask),
    )


def test_train_generate_explain_end_to_end(tmp_path, text_file):
    """The path a new user takes, as separate processes, on their own text file."""
    ckpt = tmp_path / "model"
    proc = _relattn(
        "train", str(text_file), *TINY, "--steps", "12", "--out", str(ckpt), umask=0o002
    )
    assert proc.returncode == 0, proc.stderr
    # every file as the umask says (training.json and training_state.pt were once 0600), and
    # no .lock left behind
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in ckpt.iterdir()}
    assert modes == dict.fromkeys(
        ["config.json", "model.safetensors", "training.json", "training_state.pt"], "0o664"
    )
    assert "held-out perplexity per byte at N=32" in proc.stdout
    assert "12/12" in proc.stderr and "tok/s" in proc.stderr and "loss" in proc.stderr
    info = json.loads((ckpt / "training.json").read_text())
    assert info["finished"] and info["train"]["steps"] == 12 and info["eval"]["ppl"] > 1
    assert info["corpus"]["unit"] == "chunk"

    proc = _relattn(
        "generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "40",
        "--seed",
        "3",
        "--temperature",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the quick") and proc.stderr == ""
    # greedy decoding with the KV cache = greedy decoding by full forwards
    model = TinyLM.load(ckpt)
    ids = torch.tensor([list(b"the quick")])
    with torch.no_grad():
        for _ in range(40):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    assert proc.stdout.rstrip("\n") == expected
    # in bfloat16: the same model, rounded, decodes 40 bytes (the C++ kernels' 16-bit paths)
    argv = ["--checkpoint", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "40"]
    proc = _relattn("generate", *argv, "--temperature", "0", "--dtype", "bfloat16")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("the quick") and len(proc.stdout.rstrip("\n")) >= 9 + 40 // 4

    png = tmp_path / "att.png"
    proc = _relattn("explain", "--checkpoint", str(ckpt), "the fox", "--json", "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["tokens"] == ["t", "h", "e", "␣", "f", "o", "x"]
    assert obj["heads"] == 2 and obj["layer"] == 0 and not obj["encoding"]["illustrative"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_explain_checkpoint_shows_the_models_real_weights(tmp_path, text_file, capsys):
    import relattn
    from relattn.demo.probe import layer_qkv

    ckpt = tmp_path / "m"
    assert (
        main(
            ["train", str(text_file), *TINY, "--steps", "3", "--pe", "rope+t5", "--out", str(ckpt)]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["explain", "--checkpoint", str(ckpt), "ab cd", "--json", "--head", "1"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["encoding"]["pe"] == "rope+t5" and obj["shown_heads"] == [1]
    model = TinyLM.load(ckpt)
    attn = model.blocks[0].attn
    q, k, _ = layer_qkv(model, torch.tensor([list(b"ab cd")]), 0)
    expected = relattn.attention_weights(q, k, [attn.rope, attn.pe])[0, 1]
    for i in range(5):
        torch.testing.assert_close(torch.tensor(obj["weights"][i][0]), expected[i, : i + 1])


@pytest.mark.parametrize("pe", ["fox", "inkling"])
def test_explain_checkpoint_shows_token_terms(tmp_path, text_file, capsys, pe):
    """A model whose term the tokens set: explain shows the layer's own r or gates, computed
    from the text by the trained projection (the weights equal the model's own)."""
    import relattn
    from relattn.demo.probe import layer_input

    ckpt = tmp_path / "m"
    args = ["train", str(text_file), *TINY, "--steps", "2", "--pe", pe, "--out", str(ckpt)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["explain", "--checkpoint", str(ckpt), "ab cd", "--json", "--head", "0"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["encoding"]["pe"] == pe
    model = TinyLM.load(ckpt)
    attn = model.blocks[0].attn
    x = layer_input(model, torch.tensor([list(b"ab cd")]), 0)
    with torch.no_grad():
        q, k, _ = attn.project(x)
        terms = attn.position_terms(x)
        expected = relattn.attention_weights(q, k, terms)[0, 0]
        pe_dense = terms[-1].bias(5, 5)[0, 0].float()
    for i in range(5):
        torch.testing.assert_close(torch.tensor(obj["weights"][i][0]), expected[i, : i + 1])
        torch.testing.assert_close(torch.tensor(obj["pe"][i][0]), pe_dense[i, : i + 1])


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(
    tmp_path, text_file, monkeypatch, capsys
):
    args = ["train", str(text_file), *TINY, "--steps", "8"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    real_step = trainer.Trainer._step

    def stop_at_5(self, every):
        if self.step == 5:
            raise KeyboardInterrupt
        real_step(self, every)

    monkeypatch.setattr(trainer.Trainer, "_step", stop_at_5)
    out = tmp_path / "split"
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "stopped at step 5" in err and "--resume" in err
    assert json.loads((out / "training.json").read_text())["finished"] is False
    assert TinyLM.load(out) is not None  # the interrupted run is a usable checkpoint

    monkeypatch.setattr(trainer.Trainer, "_step", real_step)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    whole, split = TinyLM.load(tmp_path / "whole"), TinyLM.load(out)
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), split.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resume_refuses_other_settings_and_state_from_other_weights(tmp_path, text_file, capsys):
    out = tmp_path / "m"
    assert main(["train", str(text_file), *TINY, "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        main(["train", str(text_file), *TINY, "--steps", "3", "--out", str(out), "--resume"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings differ" in err[0] and "steps" in err[0]
    # weights replaced behind the state's back: the state is refused, not paired with them
    other = TinyLM.load(out)
    with torch.no_grad():
        other.embed.weight.add_(1.0)
    other.save(out.parent / "other")  # save refuses a folder with training files in it
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(out.parent / "other" / name, out / name)
    assert main(["train", str(text_file), *TINY, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to other weights" in err[0]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("empty file", "is empty"),
        ("binary file", "not text"),
        ("folder without text", "holds no text"),
        ("missing", "does not exist"),
        ("context longer than the text", "--context 4096 is longer than the text"),
        ("model already there", "already holds a model"),
        ("resume with nothing saved", "nothing to resume"),
        ("both budgets", "not allowed with argument"),
        ("bad pe", "unknown encoding"),
        ("two additive encodings", "one additive encoding"),
        ("seed too large", "--seed"),
        ("unwritable out", "--out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, text_file, capsys, case, needle):
    data, extra = str(text_file), []
    if case == "empty file":
        (tmp_path / "e.txt").write_text("")
        data = str(tmp_path / "e.txt")
    elif case == "binary file":
        (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 8)
        data = str(tmp_path / "b.bin")
    elif case == "folder without text":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "x.bin").write_bytes(b"\0" * 100)
        (tmp_path / "d" / "y.txt").write_text("")
        data = str(tmp_path / "d")
    elif case == "missing":
        data = str(tmp_path / "nope.txt")
    elif case == "context longer than the text":
        extra = ["--context", "4096"]
    elif case == "model already there":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "config.json").write_text("{}")
    elif case == "resume with nothing saved":
        extra = ["--resume"]
    elif case == "both budgets":
        extra = ["--steps", "3", "--minutes", "1"]
    elif case == "bad pe":
        extra = ["--pe", "sinusoid"]
    elif case == "two additive encodings":
        extra = ["--pe", "alibi+t5"]
    elif case == "seed too large":
        extra = ["--seed", str(2**64)]
    out = "/proc/cannot-write" if case == "unwritable out" else str(tmp_path / "out")
    assert main(["train", data, *TINY, "--steps", "1", "--out", out, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relattn: error:"), err
    assert needle in err[0], err
    # the text is a positional argument: named as usage names it, not as the demo's --data
    assert "--data" not in err[0], err
    if case in ("empty file", "binary file", "folder without text", "missing"):
        assert f"FILE_OR_FOLDER {data!r}" in err[0], err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--checkpoint", "MISSING"], "does not exist"),
        (["--checkpoint", "NOT_A_MODEL"], "not a usable checkpoint"),
        (["--prompt", ""], "--prompt"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--seed", str(2**64)], "--seed"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_generate_bad_input(tmp_path, capsys, extra, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("[]")
    (tmp_path / "folder" / "model.safetensors").write_bytes(b"x")
    args = {"--checkpoint": str(tmp_path / "folder"), "--prompt": "hi"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = {
            "MISSING": str(tmp_path / "nope"),
            "NOT_A_MODEL": str(tmp_path / "folder"),
        }.get(value, value)
    argv = ["generate"] + [x for pair in args.items() for x in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_tiny_temperatures_decode_greedily_without_overflow():
    from relattn.demo.sample import sample_bytes
    from relattn.models import TinyLMConfig

    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(d_model=16, num_heads=2, num_layers=1, pe="alibi"))
    prompt = torch.tensor(list(b"abc"))
    greedy = list(sample_bytes(model, prompt, 20, temperature=0))
    assert list(sample_bytes(model, prompt, 20, temperature=1e-300, seed=1)) == greedy
