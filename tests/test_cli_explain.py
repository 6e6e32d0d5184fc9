"""``relattn explain``: the numbers shown are the library's; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import relattn
from relattn.cli import main as cli
from relattn.cli.explain import encodings
from relattn.cli.explain.compute import embed
from relattn.pe import T5Bias, alibi_slopes

FOX = "The quick brown fox"
# Every registered table encoding, and none: a newly registered one joins with no edit here.
# Terms the tokens set (spec.token: inkling, fox) have no table to show: explain refuses them
# with a clear error (test_token_terms_are_refused_clearly).
TABLES = [n for n in relattn.pe.names() if not relattn.pe.spec(n).token]
TOKEN_TERMS = [n for n in relattn.pe.names() if relattn.pe.spec(n).token]
ENCODINGS = ["none", *TABLES]
LEARNABLE = [n for n in TABLES if relattn.pe.spec(n).learnable]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def explain(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["explain", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def subprocess_explain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relattn.cli.main", "explain", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def explain_json(capsys, *args: str) -> dict:
    rc, out, err = explain(capsys, *args, "--json")
    assert rc == 0 and err == ""
    return json.loads(out)


# ----------------------------------------------------------------------------- text


def test_query_2_computes_exactly_three_dot_products():
    proc = subprocess_explain(FOX, "--query", "2")
    assert proc.returncode == 0 and proc.stderr == ""
    out = proc.stdout
    assert 'query 2 "brown" sees 3 keys: The(0), quick(1), brown(2)' in out
    for j in range(3):
        assert out.count(f"q2·k{j} =") == 1
    assert "q2·k3" not in out
    assert "sum   1.000" in out


@pytest.mark.parametrize("pe", ENCODINGS)
def test_every_encoding_explains_all_queries(capsys, pe):
    rc, out, err = explain(capsys, FOX, "--pe", pe, "--heads", "2")
    assert rc == 0 and err == ""
    for i in range(4):
        assert f"query {i} " in out
        assert f"q{i}·k{i} =" in out
    assert "Causal mask" in out and "Weights α, head 1" in out
    assert ("ILLUSTRATIVE" in out) == (pe in LEARNABLE)


def test_query_shows_every_head_in_detail(capsys):
    rc, out, _ = explain(capsys, FOX, "--pe", "alibi", "--heads", "3", "--query", "1")
    assert rc == 0
    assert out.count("q1·k0 =") == 3 and "head 2" in out


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("pe", ENCODINGS)
def test_json_numbers_are_the_librarys(capsys, pe, rope):
    heads, dim, seed = 2, 6, 3
    names = [] if pe == "none" else [pe]
    if rope and "rope" not in names:
        names = ["rope", *names]
    spelled = "+".join(names) or "none"
    args = [FOX, "--pe", spelled, "--heads", str(heads), "--dim", str(dim), "--seed", str(seed)]
    obj = explain_json(capsys, *args, "--query", "2")
    assert obj["tokens"] == FOX.split()
    assert obj["query"] == 2 and obj["visible"] == [0, 1, 2] and obj["offsets"] == [2, 1, 0]
    assert obj["mask"] == [[int(j <= i) for j in range(4)] for i in range(4)]

    q, k, _ = embed(FOX.split(), heads, dim, seed)
    modules = encodings.build(names, heads, dim, seed, {})
    expected = relattn.attention_weights(q, k, modules or None)[0, :, 2, :3]
    weights = torch.tensor(obj["weights"])
    assert weights.shape == (heads, 3)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(heads, dtype=weights.dtype))

    # the shown pieces add up: score = scale·q·k + PE, weight = softmax(score)
    dot, pe_term = torch.tensor(obj["dot_products"]), torch.tensor(obj["pe"])
    assert obj["scale"] == pytest.approx(1 / math.sqrt(dim))
    scores = torch.tensor(obj["scores"])
    torch.testing.assert_close(scores, obj["scale"] * dot + pe_term)
    torch.testing.assert_close(torch.softmax(scores, -1), weights)
    if "rope" not in names:
        torch.testing.assert_close(dot, torch.einsum("hd,hjd->hj", q[0, :, 2], k[0, :, :3]))
    if not any(relattn.pe.spec(n).additive for n in names):
        assert pe_term.abs().max() == 0
    else:
        assert pe_term.abs().max() > 0.01  # visible, even for learned encodings


def test_json_all_queries_is_one_entry_per_query(capsys):
    obj = explain_json(capsys, FOX, "--pe", "t5", "--heads", "2")
    assert obj["query"] == [0, 1, 2, 3]
    assert obj["visible"] == [list(range(i + 1)) for i in range(4)]
    for i in range(4):
        assert torch.tensor(obj["dot_products"][i]).shape == (2, i + 1)
        assert torch.tensor(obj["weights"][i]).sum(-1).tolist() == pytest.approx([1.0, 1.0])
        assert obj["buckets"][i] == list(range(i, -1, -1))
        assert len(obj["output"][i]) == 2 and len(obj["output"][i][0]) == 8


def test_alibi_uses_the_papers_slopes(capsys):
    obj = explain_json(capsys, FOX, "--pe", "alibi", "--heads", "4", "--query", "3")
    slopes = alibi_slopes(4)
    assert obj["encoding"]["slopes"] == pytest.approx(slopes)
    assert not obj["encoding"]["illustrative"]
    for h, m in enumerate(slopes):
        assert obj["pe"][h] == pytest.approx([-m * d for d in (3, 2, 1, 0)])


def test_vectors_are_per_word_and_deterministic(capsys):
    first = explain_json(capsys, "a b a", "--seed", "7")
    again = explain_json(capsys, "a b a", "--seed", "7")
    other = explain_json(capsys, "a b a", "--seed", "8")
    assert first == again and first["dot_products"] != other["dot_products"]
    dots = first["dot_products"]
    assert dots[2][0][0] == dots[0][0][0] == dots[2][0][2]  # "a" at 0 and 2: the same q and k


def test_rope_makes_dot_products_depend_on_offset_only(capsys):
    dots = explain_json(capsys, "x x x x", "--pe", "rope")["dot_products"]
    assert dots[3][0][3] == pytest.approx(dots[0][0][0], abs=1e-5)
    assert dots[3][0][2] == pytest.approx(dots[1][0][0], abs=1e-5)
    assert dots[3][0][2] != pytest.approx(dots[3][0][3], abs=1e-3)


# ----------------------------------------------------------------------------- --table


def test_table_prints_t5_buckets_from_the_flags(capsys):
    rc, out, _ = explain(
        capsys,
        FOX,
        "--pe",
        "t5",
        "--t5-num-buckets",
        "32",
        "--t5-max-distance",
        "128",
        "--table",
        "64",
    )
    assert rc == 0
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["64"])
    assert row[1] == "26"
    assert "26: Δ 59–64" in out

    small = ["--t5-num-buckets", "8", "--t5-max-distance", "20"]
    obj = explain_json(capsys, FOX, "--pe", "t5", *small)
    assert "table" not in obj
    obj = explain_json(capsys, FOX, "--pe", "t5", *small, "--table", "30")
    assert obj["encoding"]["params"] == {"t5.num_buckets": 8, "t5.max_distance": 20}
    assert obj["table"]["buckets"] == T5Bias(1, 8, 20).buckets(torch.arange(31)).tolist()
    assert obj["table"]["offsets"] == list(range(31))
    assert torch.tensor(obj["table"]["values"]).shape == (1, 31)


# Additive encodings without buckets: every registered one but T5 (its buckets are tested
# above) and RoPE (a rotation, no table).
@pytest.mark.parametrize("pe", [n for n in TABLES if n not in ("t5", "rope")])
def test_table_other_encodings(capsys, pe):
    obj = explain_json(capsys, FOX, "--pe", pe, "--heads", "2", "--table", "5")
    assert obj["table"]["buckets"] is None
    values = torch.tensor(obj["table"]["values"])
    assert values.shape == (2, 6)
    pe_q3 = torch.tensor(obj["pe"][3])  # offsets 3, 2, 1, 0
    torch.testing.assert_close(pe_q3, values[:, [3, 2, 1, 0]])


def _softmax_of_scores(obj) -> None:
    """Each query's weights are the softmax of its scores, and scores = scale·dot + PE."""
    for row in range(len(obj["tokens"])):
        dots, pe = torch.tensor(obj["dot_products"][row]), torch.tensor(obj["pe"][row])
        scores = torch.tensor(obj["scores"][row])
        torch.testing.assert_close(scores, obj["scale"] * dots + pe)
        torch.testing.assert_close(torch.tensor(obj["weights"][row]), scores.softmax(-1))


@pytest.mark.parametrize("pe", ["fox", "rope+fox"])
def test_forget_gate_shows_each_querys_decay(capsys, pe):
    """FoX: PE(i, j) = F_i - F_j is 0 at Δ = 0 and falls with distance (a product of gates
    below 1), and it is each query's own: the gates between key and query set it."""
    obj = explain_json(capsys, FOX, "--pe", pe, "--heads", "2")
    _softmax_of_scores(obj)
    for row in range(len(obj["tokens"])):
        values = torch.tensor(obj["pe"][row])  # (H, keys 0..row), offsets row .. 0
        assert torch.all(values[:, -1] == 0)
        assert torch.all(values <= 0) and torch.all(values[:, 1:] >= values[:, :-1])
    # the decay from key 0 to query 2 is the decay to query 1 plus gate 2's log
    q1, q2 = torch.tensor(obj["pe"][1]), torch.tensor(obj["pe"][2])
    gate2 = q2[:, 1]  # F_2 - F_1 = log f_2
    torch.testing.assert_close(q2[:, 0], q1[:, 0] + gate2)


def test_banded_bias_shows_each_querys_profile(capsys):
    """Inkling: PE(i, j) = r_i·P[:, Δ], 0 from the band's end on, and two queries at the same
    offset get different values (their own r)."""
    obj = explain_json(capsys, FOX, "--pe", "inkling", "--inkling-extent", "2", "--heads", "2")
    _softmax_of_scores(obj)
    n = len(obj["tokens"])
    for row in range(n):
        values = torch.tensor(obj["pe"][row])  # offsets row .. 0
        assert torch.all(values[:, : max(0, row - 1)] == 0)  # Δ >= 2: beyond the band
    at_one = [torch.tensor(obj["pe"][row])[:, -2] for row in range(1, n)]  # Δ = 1
    assert any(not torch.equal(at_one[0], x) for x in at_one[1:])


# ----------------------------------------------------------------------------- --png


def test_png_writes_heatmaps_and_table(capsys, tmp_path):
    path = tmp_path / "fox.png"
    rc, out, err = explain(
        capsys, FOX, "--pe", "t5", "--heads", "2", "--png", str(path), "--table", "20"
    )
    assert rc == 0 and err == ""
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "fox-table.png").read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {path}" in out


def test_png_with_json_keeps_stdout_one_object(capsys, tmp_path):
    path = tmp_path / "out.png"
    obj = explain_json(capsys, FOX, "--png", str(path))
    assert obj["tokens"] == FOX.split() and path.read_bytes()[:8] == PNG_MAGIC


def test_png_without_matplotlib_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, err = explain(capsys, FOX, "--png", str(tmp_path / "x.png"))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "pip install relattn[plot]" in err


# ----------------------------------------------------------------------------- bad input


BAD = [
    ["", "--query", "0"],
    [" ".join(["w"] * 129)],  # more words than explain shows
    [FOX, "--offset-max-offset", "1000000000", "--pe", "offset"],
    [FOX, "--seed", str(2**64)],
    [FOX, "--seed", "-1"],
    [FOX, "--head", "1"],
    [FOX, "--layer", "0"],  # only with --checkpoint
    [FOX, "--pe", "t5+t5"],
    [FOX, "--pe", "none+t5"],
    [FOX, "--pe", "rope+"],
    [FOX, "--checkpoint", "/no/such/checkpoint"],
    ["   "],
    [FOX, "--query", "4"],
    [FOX, "--query", "-1"],
    [FOX, "--pe", "sinusoidal"],
    [FOX, "--heads", "0"],
    [FOX, "--heads", "two"],
    [FOX, "--dim", "0"],
    [FOX, "--dim", "7", "--pe", "rope"],
    [FOX, "--pe", "t5", "--table", "-1"],
    [FOX, "--table", "5000"],
    [FOX, "--t5-num-buckets", "8"],  # default --pe is alibi
    [FOX, "--pe", "alibi", "--t5-max-distance", "64"],
    [FOX, "--pe", "t5", "--kerple-kind", "power"],
    [FOX, "--pe", "kerple", "--kerple-kind", "cubic"],
    [FOX, "--pe", "kerple", "--offset-max-offset", "4"],
    [FOX, "--rope-base", "500"],
    [FOX, "--pe", "t5", "--t5-num-buckets", "1"],
    [FOX, "--pe", "t5", "--t5-num-buckets", "eight"],
    [FOX, "--pe", "t5", "--t5-num-buckets", "32", "--t5-max-distance", "8"],
    [FOX, "--pe", "offset", "--offset-max-offset", "-2"],
    [FOX, "--pe", "rope", "--rope-base", "0.5"],
    [FOX, "--pe", "rope", "--rope-base", "inf"],
    [FOX, "--png", "/nonexistent-dir/x.png"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a).strip() or "blank")
def test_bad_input_is_one_line_and_exit_2(capsys, args):
    rc, out, err = explain(capsys, *args)
    assert rc == 2 and out == ""
    assert err.startswith("relattn: error: ") and err.count("\n") == 1


def test_unwritable_png_directory(capsys, tmp_path):
    rc, _, err = explain(capsys, FOX, "--png", str(tmp_path))  # a directory, not a file
    assert rc == 2 and err.count("\n") == 1 and "--png" in err


@pytest.mark.parametrize(
    "args, needle",
    [(["  ", "--json"], "at least one word"), ([FOX, "--query", "4"], "--query")],
)
def test_bad_input_subprocess(args, needle):
    proc = subprocess_explain(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the registry


def test_table_works_with_the_default_encoding(capsys):
    obj = explain_json(capsys, FOX, "--heads", "2", "--table", "4")
    assert obj["encoding"]["pe"] == "alibi"
    slopes = alibi_slopes(2)
    expected = [[-m * d for d in range(5)] for m in slopes]
    assert obj["table"]["values"] == [pytest.approx(row) for row in expected]
    rc, out, err = explain(capsys, FOX, "--pe", "rope", "--table", "3")  # no additive term
    assert rc == 0 and "+0.0000" in out


def test_a_newly_registered_encoding_is_explained_with_its_parameters(capsys):
    @relattn.pe.register(
        "tests_step",
        description="a step: -height for offsets beyond a threshold",
        learnable=False,
        params=(relattn.pe.Param("threshold", int, 2, "first offset penalised"),),
    )
    class Step(relattn.pe.PositionEncoding):
        def __init__(self, num_heads, threshold=2):
            super().__init__(num_heads)
            self.threshold = threshold

        def table(self, lo, hi):
            d = torch.arange(lo, hi + 1, dtype=torch.float32)
            return -(d >= self.threshold).float().expand(self.num_heads, -1)

    try:
        obj = explain_json(
            capsys, FOX, "--pe", "tests_step", "--tests-step-threshold", "1", "--query", "3"
        )
        assert obj["pe"] == [[-1.0, -1.0, -1.0, 0.0]]  # offsets 3, 2, 1, 0
        assert obj["encoding"]["params"] == {"tests_step.threshold": 1}
        rc, out, _ = explain(capsys, FOX, "--pe", "tests_step")
        assert rc == 0 and "a step: -height" in out
    finally:
        relattn.pe.registry._REGISTRY.pop("tests_step")


def test_output_into_a_closed_pipe_is_quiet():
    """``relattn explain ... | head -1``: no BrokenPipeError traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m relattn explain '{' '.join(['w'] * 60)}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.startswith("relattn explain")
    assert proc.stderr == ""
