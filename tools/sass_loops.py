"""Instruction counts per loop of a disassembled CUDA kernel (``nvdisasm -c`` output).

A loop is the run of instructions from a label to the last branch back to it that comes before
the kernel's final ``EXIT`` (out-of-line retry and spill blocks sit after it and branch back into
loop bodies; they are not loops). Triton's key loops are single-level, so every instruction of a
body is counted once: a static count per iteration, which tells what a change removes, not time.

    python tools/sass_loops.py KERNEL.sass [...]     # a Markdown table per loop

The classes are the ones the offline gate of ``tools/gpu_compile.py --gate`` reads:

- ``cp_async_4``: 4-byte ``cp.async`` (``LDGSTS.E`` without a width suffix): one per score is
  what a per-score table read compiles to; ``cp_async``: every ``LDGSTS``;
- ``ldg``: global loads (``LDG``); ``ldg_4``: 4-byte ones (no width suffix), what a
  per-score read of a token term compiles to; ``atomic``: global or shared atomics (``RED``,
  ``ATOM``; not ``REDUX``, a warp's register reduction);
- ``wgmma`` (``HGMMA``), ``mma_sync`` (``HMMA``), ``spill`` (``LDL``/``STL``), ``ex2``
  (``MUFU.EX2``), ``tma`` (bulk tensor copies, ``UTMALDG``), ``lds`` (shared-memory loads,
  ``LDS``/``LDSM``), ``total``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")
# Loop bodies shorter than this are wait loops (mbarrier polling), not key loops.
MIN_BODY = 8

CLASSES = (
    "total", "wgmma", "mma_sync", "cp_async", "cp_async_4", "ldg", "ldg_4", "atomic", "spill",
    "ex2", "tma", "lds",
)  # fmt: skip


def classify(opcode: str) -> list[str]:
    """The classes (besides ``total``) an opcode counts in."""
    base = opcode.split(".")[0]
    out = []
    if base == "HGMMA":
        out.append("wgmma")
    elif base == "HMMA":
        out.append("mma_sync")
    elif base == "LDGSTS":
        out.append("cp_async")
        if not re.search(r"\.(32|64|128)\b", opcode):
            out.append("cp_async_4")
    elif base == "LDG":
        out.append("ldg")
        if not re.search(r"\.(64|128)\b", opcode) and not re.search(r"\.(U8|S8|U16|S16)\b", opcode):
            out.append("ldg_4")
    elif base in ("RED", "REDG", "ATOM", "ATOMG", "ATOMS"):
        out.append("atomic")
    elif base in ("LDL", "STL"):
        out.append("spill")
    elif opcode.startswith("MUFU.EX2"):
        out.append("ex2")
    elif base in ("UTMALDG", "UBLKCP"):
        out.append("tma")
    elif base in ("LDS", "LDSM"):
        out.append("lds")
    return out


def loops(sass: str) -> list[Counter]:
    """The counts of each loop of one kernel's SASS, in program order."""
    opcodes: list[str] = []
    exits: list[int] = []
    labels: dict[str, int] = {}
    back: list[tuple[int, str]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        predicate, opcode = m.group(1), m.group(2)
        if predicate and predicate.strip() == "@!PT":
            opcode = "NOP"  # never executes
        if opcode == "EXIT" and not predicate:
            exits.append(len(opcodes))
        target = _TARGET.search(line)
        if target:
            back.append((len(opcodes), target.group(1)))
        opcodes.append(opcode)
    end = exits[-1] if exits else len(opcodes)
    spans: dict[int, int] = {}
    for at, label in back:
        start = labels.get(label)
        if start is not None and start < at < end and at - start >= MIN_BODY:
            spans[start] = max(spans.get(start, at), at)
    result = []
    for start in sorted(spans):
        counts: Counter = Counter()
        for opcode in opcodes[start : spans[start] + 1]:
            if opcode == "NOP":
                continue
            counts["total"] += 1
            for name in classify(opcode):
                counts[name] += 1
        result.append(counts)
    return result


def markdown(named: dict[str, list[Counter]]) -> str:
    """One table row per loop of each named kernel."""
    rows = ["| kernel | loop | " + " | ".join(CLASSES) + " |", "|---|---|" + "---|" * len(CLASSES)]
    for name, counts in named.items():
        for i, c in enumerate(counts):
            rows.append(f"| {name} | {i} | " + " | ".join(str(c[k]) for k in CLASSES) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(markdown({f.stem: loops(f.read_text()) for f in args.files}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
