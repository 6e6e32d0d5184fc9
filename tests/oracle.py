"""An independent float64 implementation of the formula, and the accuracy criteria.

Nothing here calls relattn internals: every position term is rebuilt from the encoding's own
parameters (T5 buckets by a port of T5's ``_relative_position_bucket``, ALiBi ``-m|Δ|``, KERPLE
from ``r1, r2``, OffsetBias from ``weight``, RoPE from ``head_dim`` and ``base``). An encoding
defined in a test adds its own definition to :data:`ORACLES`.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable

import numpy as np
import torch

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias

# Encoding class -> f(enc, leaves, delta, dtype) giving PE of shape (H, *delta.shape): the
# definitions of encodings that tests add (the built-in ones are written out in pe_bias).
ORACLES: dict[type, Callable] = {}


def seed_of(*parts) -> int:
    """A deterministic seed from a test's identifying parts (stable across processes)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- T5 buckets


def t5_relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's ``_relative_position_bucket`` (Mesh TensorFlow ``transformer/attention.py``, and the
    Hugging Face port), in numpy with the original's float32 logarithm.

    ``relative_position`` is ``memory_position - query_position`` (key minus query), as in T5.
    """
    ret = np.zeros_like(relative_position, dtype=np.int64)
    n = -relative_position.astype(np.int64)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        # tf.log(tf.to_float(n) / max_exact) / math.log(max_distance / max_exact) * (nb - me),
        # every operand a float32 tensor as TF converts the Python scalars.
        logn = np.log(n.astype(np.float32) / np.float32(max_exact))
        ratio = logn / np.float32(math.log(max_distance / max_exact))
        large = ratio * np.float32(num_buckets - max_exact)
    large = np.where(is_small, 0, large)  # avoid casting -inf; those entries are not used
    val_if_large = max_exact + large.astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


# ----------------------------------------------------------------------------- PE in float64


def delta_grid(nq: int, nk: int, q_offset: int) -> torch.Tensor:
    """``Δ[r, c] = q_offset + r - c``."""
    r = torch.arange(nq).view(-1, 1)
    c = torch.arange(nk).view(1, -1)
    return q_offset + r - c


def pe_leaves(enc, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fresh leaf copies (``dtype``, requires_grad) of an encoding's learnable parameters."""
    return {
        name: p.detach().to(dtype).clone().requires_grad_(True)
        for name, p in enc.named_parameters()
    }


def per_head(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(H,)`` viewed to broadcast against ``(H, *d.shape)``."""
    return x.view(-1, *([1] * d.dim()))


def pe_bias(enc, leaves: dict[str, torch.Tensor], delta: torch.Tensor, dtype) -> torch.Tensor:
    """``PE_h(Δ)`` of shape ``(H, *delta.shape)`` in ``dtype``, written from the encoding's
    definition and parameters (``leaves`` replaces its learnable parameters)."""
    d = delta.to(dtype)
    if isinstance(enc, T5Bias):
        b = t5_relative_position_bucket(
            -delta.numpy(), enc.bidirectional, enc.num_buckets, enc.max_distance
        )
        return leaves["weight"][:, torch.from_numpy(b)]
    if isinstance(enc, ALiBi):
        m = leaves["_slopes"] if enc.learnable else enc.slopes.detach().to(dtype)
        return -per_head(m, d) * d.abs()
    if isinstance(enc, Kerple):
        floor = 1e-4  # Kerple keeps r1, r2 >= 1e-4 (see relattn.pe.kerple)
        r1 = floor + per_head(torch.log1p(torch.exp(leaves["raw_r1"])), d)  # softplus
        raw2 = per_head(leaves["raw_r2"], d)
        a = d.abs()
        if enc.kind == "log":
            return -r1 * torch.log1p((floor + torch.log1p(torch.exp(raw2))) * a)
        r2 = floor + (2.0 - floor) / (1.0 + torch.exp(-raw2))  # floor + (2 - floor)·sigmoid
        # |Δ|^r2, with 0^r2 = 0 and no NaN gradient at |Δ| = 0
        pos = torch.where(a > 0, a, torch.ones_like(a))
        return -r1 * torch.where(a > 0, torch.exp(r2 * torch.log(pos)), torch.zeros_like(a))
    if isinstance(enc, OffsetBias):
        m = enc.max_offset
        if enc.bidirectional:
            col = delta.clamp(-m, m) + m
        else:
            col = delta.abs().clamp(max=m)
        return leaves["weight"][:, col]
    if type(enc) in ORACLES:
        return ORACLES[type(enc)](enc, leaves, delta, dtype)
    if hasattr(enc, "inner") and hasattr(enc, "factor"):  # the tests' Scaled wrapper
        inner = {k[len("inner.") :]: v for k, v in leaves.items() if k.startswith("inner.")}
        return pe_bias(enc.inner, inner, delta, dtype) * enc.factor
    raise TypeError(f"no independent implementation for {type(enc).__name__}")


def rope_rotate(x: torch.Tensor, rope: RoPE, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / Llama layout) in x's dtype.

    Frequencies ``1 / base^(2p/D)`` and angles in float64 (the definition); the rotation is
    then computed in x's dtype.
    """
    d = rope.head_dim
    inv_freq = 1.0 / (rope.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.to(torch.float64).view(-1, 1) * inv_freq.view(1, -1)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def as_list(pe) -> list:
    if pe is None:
        return []
    return list(pe) if isinstance(pe, (list, tuple)) else [pe]


# ----------------------------------------------------------------------------- the formula


def visible_mask(b, nq, nk, causal, q_offset, window, doc_ids, key_padding_mask):
    """``(B, 1, Nq, Nk)`` bool visibility, from the definition."""
    delta = delta_grid(nq, nk, q_offset)
    m = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        m &= delta >= 0
    if window is not None:
        m &= delta < window
        if not causal:
            m &= delta > -window
    m = m.expand(b, 1, nq, nk).clone()
    for bi in range(b):
        for r in range(nq):
            if doc_ids is not None:
                m[bi, 0, r] &= doc_ids[bi] == doc_ids[bi, q_offset + r]
            if key_padding_mask is not None:
                m[bi, 0, r] &= key_padding_mask[bi]
    return m


def attention_math(
    q, k, v, pe=None, *, leaves=None, dtype=torch.float64, causal=True, scale=None,
    q_offset=0, window=None, doc_ids=None, key_padding_mask=None, bias=None,
):  # fmt: skip
    """The formula, computed entirely in ``dtype`` (float64: the truth; the input dtype: the
    naive implementation a user would write, softmax in that dtype too).

    ``leaves``: one dict per additive encoding (as :func:`pe_leaves`), the parameters to use.
    ``bias``: an extra term ``(B, Hq, Nq, Nk)`` added to the scores (the token terms').
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    encs = as_list(pe)
    ropes = [e for e in encs if isinstance(e, RoPE)]
    additive = [e for e in encs if not isinstance(e, RoPE)]
    if ropes:
        q = rope_rotate(q, ropes[0], q_offset + torch.arange(nq))
        k = rope_rotate(k, ropes[0], torch.arange(nk))
    group = hq // hkv
    idx = torch.arange(hq) // group  # query head h reads kv head h // group
    k, v = k[:, idx], v[:, idx]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    s = (q @ k.transpose(-1, -2)) * scale
    delta = delta_grid(nq, nk, q_offset)
    if leaves is None:
        leaves = [pe_leaves(e, dtype) for e in additive]
    for enc, lv in zip(additive, leaves, strict=True):
        s = s + pe_bias(enc, lv, delta, dtype).unsqueeze(0)
    if bias is not None:
        s = s + bias.to(dtype)
    vis = visible_mask(b, nq, nk, causal, q_offset, window, doc_ids, key_padding_mask)
    s = s.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    w = torch.softmax(torch.where(any_vis, s, torch.zeros((), dtype=dtype)), dim=-1)
    w = torch.where(vis, w, torch.zeros((), dtype=dtype))
    return w @ v


def grads_of(out, grad_out, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"out": out, name: d(out·grad_out)/d tensor}`` for every named tensor."""
    names = list(named)
    gs = torch.autograd.grad(out, [named[n] for n in names], grad_out.to(out.dtype),
                             allow_unused=True)  # fmt: skip
    res = {"out": out.detach()}
    for n, g in zip(names, gs, strict=True):
        res[n] = torch.zeros_like(named[n]) if g is None else g
    return res


def additive_encodings(pe) -> list:
    return [e for e in as_list(pe) if not isinstance(e, RoPE)]


def run_math(q, k, v, pe, grad_out, dtype, **kw) -> dict[str, torch.Tensor]:
    """Out and gradients (q, k, v, every learnable PE parameter) of :func:`attention_math`."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    leaves = [pe_leaves(e, dtype) for e in additive_encodings(pe)]
    out = attention_math(qq, kk, vv, pe, leaves=leaves, dtype=dtype, **kw)
    named = {"q": qq, "k": kk, "v": vv}
    for i, lv in enumerate(leaves):
        named.update({f"pe{i}.{n}": t for n, t in lv.items()})
    return grads_of(out, grad_out, named)


def run_relattn(q, k, v, pe, grad_out, backend, device="cpu", **kw) -> dict[str, torch.Tensor]:
    """Out and gradients of ``relattn.attention`` with the given backend, computed on
    ``device`` (inputs, encodings and masks moved there) and returned on the CPU."""
    qq, kk, vv = (t.detach().to(device).clone().requires_grad_(True) for t in (q, k, v))
    if device != "cpu":
        pe = [copy.deepcopy(e).to(device) for e in as_list(pe)]
        kw = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    out = relattn.attention(qq, kk, vv, pe, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    named = {"q": qq, "k": kk, "v": vv}
    for i, e in enumerate(additive_encodings(pe)):
        named.update({f"pe{i}.{n}": p for n, p in e.named_parameters()})
    return {n: t.cpu() for n, t in grads_of(out, grad_out.to(device), named).items()}


# ----------------------------------------------------------------------------- comparisons


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close_f64(got: dict, truth: dict, rtol: float = 1e-5, label: str = "") -> None:
    """Every tensor within ``rtol · (1 + max|truth|)`` of the truth, and no NaN."""
    assert got.keys() == truth.keys()
    for name in truth:
        g, t = got[name], truth[name]
        assert g.shape == t.shape, f"{label}{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert not torch.isnan(g).any(), f"{label}{name}: NaN"
        tol = rtol * (1.0 + t.abs().max().item())
        err = max_err(g, t)
        assert err <= tol, f"{label}{name}: max error {err:.3g} > {tol:.3g}"


def assert_flash_accuracy(got: dict, naive: dict, truth: dict, dtype, label: str = "") -> None:
    """FlashAttention's criterion: against the float64 truth, the backend's max error on out and
    on every gradient is at most 2× that of the naive implementation in the same dtype, plus an
    epsilon of about one unit of ``dtype`` at the tensor's magnitude."""
    assert got.keys() == truth.keys() == naive.keys()
    for name in truth:
        g, n, t = got[name], naive[name], truth[name]
        assert g.shape == t.shape, f"{label}{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{label}{name}: not finite"
        eps = torch.finfo(dtype).eps * (1.0 + t.abs().max().item())
        err_g, err_n = max_err(g, t), max_err(n, t)
        assert err_g <= 2 * err_n + eps, (
            f"{label}{name}: error {err_g:.3g} > 2 × naive {dtype} error {err_n:.3g} + {eps:.3g}"
        )
