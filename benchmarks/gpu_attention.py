"""GPU benchmark: relattn triton vs FlexAttention (score_mod) vs SDPA with the bias vs SDPA
flash/cuDNN is_causal. The same flags as ``relattn bench`` (see ``--help``); ``--check`` runs what
issue 10's targets need and adds the targets table (``make gpu-check`` runs it):

    python benchmarks/gpu_attention.py --check --out gpu.md --json gpu.json
"""

from __future__ import annotations

from relattn.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main(device="gpu"))
