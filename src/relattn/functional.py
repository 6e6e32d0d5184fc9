"""``attention()`` and ``attention_weights()``: validation, the encoding's table, dispatch.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq`` a multiple of it),
``Nq`` query rows, ``Nk`` keys, ``D`` head dim. Query row r sits at position ``q_offset + r``,
key column c at position c, and the encoding sees ``Δ = q_offset + r - c``::

    Nq = 3, Nk = 5, q_offset = 2 (decoding 3 new tokens after 2 cached ones), causal:
            keys c = 0 1 2 3 4
    row 0 (pos 2)   ■ ■ ■ · ·
    row 1 (pos 3)   ■ ■ ■ ■ ·
    row 2 (pos 4)   ■ ■ ■ ■ ■
"""

from __future__ import annotations

from torch import Tensor

from .backends import reference
from .call import PE, prepare, run

__all__ = ["PE", "attention", "attention_weights"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pe: PE = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
    backend: str = "auto",
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention with a relative position term.

        α(i, j) = softmax_j( scale·q_i·k_j + PE(i, j) + Mask(i, j) ),   out_i = Σ_j α(i, j)·v_j

    Args:
        q: ``(B, Hq, Nq, D)``.
        k, v: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (GQA / MQA).
        pe: None, an additive encoding from :mod:`relattn.pe`, a :class:`~relattn.pe.RoPE`, a
            term that depends on the tokens (``QueryConditionedBias(...)(r)``,
            ``ForgetGate()(log_f)``), or a sequence of them (RoPE rotates q and k; additive
            terms are summed; at most one of each token term).
        causal: mask keys after the query (``Δ < 0``).
        scale: multiplies ``q·k`` only; default ``1/√D``.
        q_offset: position of query row 0 minus that of key 0 (``Nk - Nq`` when decoding
            with a cache). PE sees ``Δ = q_offset + r - c``.
        backend: ``"auto"`` or a name from :func:`relattn.backends.names`.
        window: sliding window W: key visible iff ``Δ < W`` (and ``Δ > -W`` if not causal).
        doc_ids: ``(B, Nk)`` integer document id of each key position, each document one
            contiguous run; query r belongs to the document of position ``q_offset + r``.
        key_padding_mask: ``(B, Nk)`` bool, True for real keys.

    Returns:
        ``(B, Hq, Nq, D)`` in q's dtype, contiguous. A row that sees no key is 0. Finite inputs
        whose scores ``scale·q·k + PE`` are finite give finite outputs; NaN or Inf in q, k or
        v propagate to the rows that see them (as in any attention); they are not masked.
    """
    call = prepare(
        q, k, v, pe, causal, scale, q_offset, window, doc_ids, key_padding_mask, backend, False
    )
    return run(call)[0]


def attention_weights(
    q: Tensor,
    k: Tensor,
    pe: PE = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The attention weights α, for inspection (materialized by the reference).

    Args: as :func:`attention`, with ``q: (B, Hq, Nq, D)``, ``k: (B, Hkv, Nk, D)``.

    Returns:
        ``(B, Hq, Nq, Nk)`` in float32 (float64 for float64 input); rows sum to 1, or are 0 for
        rows that see no key.
    """
    call = prepare(
        q, k, k, pe, causal=causal, scale=scale, q_offset=q_offset, window=window,
        doc_ids=doc_ids, key_padding_mask=key_padding_mask, backend="reference",
    )  # fmt: skip
    scores = reference.scores_and_weights
    return scores(call.q, call.k, call.table, None, call.problem, call.token)[2]
