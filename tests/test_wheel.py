"""Installing relattn as a library: build the wheel, install it into a fresh virtual
environment that does not see this source tree, import it and run a forward pass."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    # Build from a copy, so the build leaves nothing in the working tree.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(dist),
        str(source),
    )
    (wheel,) = dist.glob("relattn-*.whl")
    with zipfile.ZipFile(wheel) as zf:  # the CPU kernel's source, compiled at first use
        assert "relattn/backends/_cpu_kernel.cpp" in zf.namelist()

    # A fresh environment with the wheel installed; its dependencies (torch, numpy) come from
    # the running environment's site-packages through a .pth line, which does not run that
    # environment's editable hook, so this source tree stays invisible.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        str(wheel),
    )
    purelib = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    deps = Path(torch.__file__).resolve().parent.parent
    (Path(purelib.stdout.strip()) / "deps.pth").write_text(f"{deps}\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import relattn, torch\n"
        "from relattn.pe import ALiBi\n"
        "q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))\n"
        "out = relattn.attention(q, k, v, ALiBi(2))\n"
        "from relattn.backends import cpu_kernel\n"
        "assert cpu_kernel.SOURCE.is_file(), cpu_kernel.SOURCE\n"
        "print(relattn.__file__, tuple(out.shape), relattn.__version__)\n"
    )
    proc = _run(str(python), "-c", code, cwd=tmp_path, env=env)
    location, shape = proc.stdout.split()[0], proc.stdout.split(")")[0]
    assert Path(location).resolve().is_relative_to(venv.resolve()), location
    assert "(1, 2, 16, 8" in shape and "0+unknown" not in proc.stdout
    version = _run(str(venv / "bin" / "relattn"), "--version", cwd=tmp_path, env=env)
    assert version.stdout.startswith("relattn ")
