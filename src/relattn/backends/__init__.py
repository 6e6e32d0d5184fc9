"""Interchangeable exact attention kernels behind one signature.

A fused backend is a module with

    forward(q, k, v, table, slopes, doc_ids, key_padding_mask, lo, scale, causal, q_offset, window)
        -> (out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32, -inf for rows with no key)
    backward(grad_out, q, k, v, out, lse, table, slopes, doc_ids, key_padding_mask,
             lo, scale, causal, q_offset, window)
        -> (dq, dk, dv, dtable)        # dtable: (H, T) like table, or None when table is None

``table`` is ``(Hq, hi - lo + 1)`` with column t the PE of offset ``lo + t`` (or None);
``slopes`` is ``(Hq,)`` for fixed ALiBi computed in closed form ``-slope·|Δ|`` (or None; never
both). ``window`` is 0 for none. See ``relattn.masks`` for visibility.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module path; "reference" is plain autograd and is not called through the custom op.
BACKENDS: dict[str, str] = {
    "reference": "relattn.backends.reference",
    "chunked": "relattn.backends.chunked",
    "triton": "relattn.backends.triton_backend",
}


def names() -> list[str]:
    return ["auto", *BACKENDS]


def load(name: str) -> ModuleType:
    """Import a backend module, with a clear error when it cannot run here."""
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise RuntimeError(f"backend={name!r} is not available here: {e}") from e
