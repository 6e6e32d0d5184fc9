"""The C++ CPU kernel under AddressSanitizer and UBSan (``make test-sanitize``).

Builds ``src/relattn/backends/_cpu_kernel.cpp`` with ``-fsanitize=address,undefined`` into a
directory of its own (``RELATTN_CPU_KERNEL_FLAGS`` gives the build its own name, so it never
replaces the ordinary one), then runs the tests that reach the kernel -- conformance, layouts,
decode and property tests, selected to the CPU kernel and ``auto`` -- in a Python with the
sanitizer runtimes preloaded (Python itself is not instrumented, so leak detection is off).
Any report fails the run: ``halt_on_error`` and ``-fno-sanitize-recover`` make the process
exit non-zero at the first one.

First, unless ``--no-proof``, it proves that it would notice: a scratch copy of the source with
a deliberate off-by-one (the table read one column to the right, past the table's end for the
last head) is built the same way and one call through it must end in AddressSanitizer's
heap-buffer-overflow report; a run that does not is a failure of this script.

    python tools/sanitize.py [--no-proof] [--proof-only] [--build-dir DIR] [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "relattn" / "backends" / "_cpu_kernel.cpp"
FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
# Leaks: Python's own allocations are never freed at exit, so leak detection would report them.
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=0:verify_asan_link_order=0"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"
# What the run covers: every test that calls the kernel, in a few minutes on 2 cores.
TESTS = [
    "tests/test_cpu_kernel.py",
    "tests/test_layouts.py",
    "tests/test_conformance.py",
    "tests/test_decode.py",
    "tests/test_properties.py",
]
SELECT = "(cpu_kernel or auto) and not bfloat16 and not float16"  # the kernel declines those
# The deliberate off-by-one of the proof: F's table column t + 1 instead of t.
BUG = ("val = tp[h * T_cols + t];", "val = tp[h * T_cols + t + 1];")
PROOF_CALL = """
import sys
from pathlib import Path
import torch
import relattn
from relattn.backends import cpu_kernel
from relattn.pe import T5Bias
cpu_kernel.SOURCE = Path(sys.argv[1])  # the scratch copy: its own build name
q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
out = relattn.attention(q, k, v, T5Bias(2), backend="cpu_kernel")
print("no report; max |out| =", out.abs().max().item())
"""


def runtime(name: str) -> str:
    """The compiler's sanitizer runtime ``name`` (e.g. libasan.so), as a path."""
    cxx = os.environ.get("CXX", "c++")
    path = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"sanitize: {cxx} has no {name} (install the compiler's sanitizer runtimes)")
    return path


def environment(build_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RELATTN_CPU_KERNEL_DIR=str(build_dir),
        RELATTN_CPU_KERNEL_FLAGS=FLAGS,
        LD_PRELOAD=" ".join([runtime("libasan.so"), runtime("libubsan.so")]),
        ASAN_OPTIONS=ASAN_OPTIONS,
        UBSAN_OPTIONS=UBSAN_OPTIONS,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    return env


def start_proof(build_dir: Path, scratch: Path) -> subprocess.Popen:
    """Build the off-by-one copy and make one call through it (in the background)."""
    text = SOURCE.read_text()
    if text.count(BUG[0]) != 1:
        sys.exit(f"sanitize: the proof's line {BUG[0]!r} is not in {SOURCE} once; update BUG")
    bad = scratch / "_cpu_kernel.cpp"
    bad.write_text(text.replace(*BUG))
    return subprocess.Popen(
        [sys.executable, "-c", PROOF_CALL, str(bad)],
        env=environment(build_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_proof(proof: subprocess.Popen, start: float) -> None:
    """Require AddressSanitizer's report of the off-by-one, and a failing exit."""
    out, err = proof.communicate()
    if proof.returncode == 0 or "ERROR: AddressSanitizer: heap-buffer-overflow" not in err:
        print(out, err[-4000:], sep="\n", file=sys.stderr)
        sys.exit(
            "sanitize: the deliberate off-by-one was NOT reported (exit code "
            f"{proof.returncode}): the sanitizer build does not catch out-of-bounds reads"
        )
    line = next(x for x in err.splitlines() if "AddressSanitizer" in x)
    print(f"sanitize: proof ok in {time.monotonic() - start:.0f} s: the off-by-one gives {line!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-proof", action="store_true", help="skip the off-by-one proof")
    parser.add_argument("--proof-only", action="store_true", help="only the off-by-one proof")
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "relattn-sanitize",
        help="where the sanitizer builds go (default: ~/.cache/relattn-sanitize)",
    )
    parser.add_argument("pytest_args", nargs="*", help="replaces the default test selection")
    args = parser.parse_args()
    args.build_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relattn-sanitize-proof-") as scratch:
        # The two builds (the proof's scratch copy and the real source) run side by side.
        proof = None if args.no_proof else start_proof(args.build_dir, Path(scratch))
        build = None
        if not args.proof_only:
            load = (
                "from relattn.backends import cpu_kernel; m = cpu_kernel.load(); "
                "assert '-fsanitize=address,undefined' in cpu_kernel._cflags(), 'flags'; "
                "print('sanitize: kernel', m.__file__)"
            )
            build = subprocess.Popen([sys.executable, "-c", load], env=environment(args.build_dir))
        if proof is not None:
            check_proof(proof, start)
        if build is None:
            return
        if build.wait():
            sys.exit("sanitize: the sanitizer build of the CPU kernel failed")
    print(f"sanitize: built in {time.monotonic() - start:.0f} s")
    tests = args.pytest_args or [*TESTS, "-k", SELECT]
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", *tests]
    code = subprocess.run(cmd, env=environment(args.build_dir), cwd=ROOT).returncode
    print(f"sanitize: exit {code}, {time.monotonic() - start:.0f} s in all")
    sys.exit(code)


if __name__ == "__main__":
    main()
