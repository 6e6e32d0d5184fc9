"""``relattn bench``: a quick run prints a table and writes it; bad flags exit 2."""

import pytest

from relattn.cli.main import main


def test_quick_bench_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## CPU" in printed and "|" in printed
    written = out.read_text()
    assert written.startswith("# relattn bench") and "## CPU" in written
    table = [line for line in written.splitlines() if line.startswith("|")]
    assert len(table) >= 3  # header, rule, at least one row


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--n", "abc"], "--n"),
        (["--n", "0"], "--n"),
        (["--n", ","], "--n"),
        (["--repeats", "0"], "--repeats"),
        (["--threads", "0"], "--threads"),
        (["--out", "/no/such/dir/bench.md"], "--out"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, extra, needle):
    assert main(["bench", "--quick", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("relattn: error:"), err
    assert needle in err[0]
