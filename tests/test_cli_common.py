"""What every command shares: --version, one-line errors, and encodings from the registry only.

Safe files and the folder lock: test_io.py; the boundaries between layers: test_architecture.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import relattn
from relattn.cli.main import main

SRC = Path(relattn.__file__).resolve().parent


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relattn {relattn.__version__}"


def test_no_command_is_one_line(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose a command" in err[0]


def test_an_unwritable_working_directory_is_one_line():
    """The demo's default --out is relative: from a folder where nothing can be created (here
    /proc, which refuses even root), it is refused before any work, in one line."""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "relattn", "demo", "--quick"],
        cwd="/proc",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--out 'relattn-report'" in proc.stderr


def test_the_tools_keep_no_list_of_encodings():
    """Every tool iterates relattn.pe's registry: cli/ and demo/ spell no list of encoding names
    (beyond the demo's default selection) and compare against no name (no if-chains). The one
    exception is TinyLMConfig's own ``rope`` flag, which the model maps to."""
    quoted = "|".join(re.escape(n) for n in relattn.pe.names())
    named = re.compile(rf"""["']({quoted})["']""")
    compared = re.compile(rf"""(==|!=|\bin)\s*[(\[]?\s*["']({quoted})["']""")
    allowed = {"demo/trainer.py": ['r != "rope"']}
    offenders = []
    for folder in ("cli", "demo"):
        for path in sorted((SRC / folder).rglob("*.py")):
            rel = str(path.relative_to(SRC))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "DEFAULT_ENCODINGS =" in line or any(a in line for a in allowed.get(rel, [])):
                    continue
                if len(set(named.findall(line))) > 1 or compared.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
