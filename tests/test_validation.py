"""Bad input: every error names the argument and what arrived. And what NaN / Inf inputs give."""

from __future__ import annotations

import re

import pytest
import torch
from cases import BACKENDS

import relattn
from relattn.pe import ALiBi, RoPE, T5Bias

B, H, N, D = 2, 4, 8, 16


def qkv(b=B, hq=H, hkv=H, nq=N, nk=N, d=D, dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d if dv is None else dv, generator=g).to(dtype)
    return q, k, v


# ----------------------------------------------------------------------------- tensor shapes


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dims", [3, 5])
def test_wrong_rank(which, dims):
    t = dict(zip("qkv", qkv(), strict=True))
    x = t[which]
    t[which] = x[0] if dims == 3 else x.unsqueeze(0)
    shape = re.escape(str(tuple(t[which].shape)).replace(",)", ")"))
    with pytest.raises(ValueError, match=rf"{which} must be 4-D.*{dims}-D.*{shape}"):
        relattn.attention(t["q"], t["k"], t["v"])


def test_wrong_rank_in_attention_weights():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"k must be 4-D.*3-D"):
        relattn.attention_weights(q, k[0])


def test_v_head_dim_differs_from_k():
    q, k, v = qkv(dv=8)
    with pytest.raises(ValueError, match=r"v must have shape.*\(2, 4, 8, 16\).*\(2, 4, 8, 8\)"):
        relattn.attention(q, k, v)


def test_k_head_dim_differs_from_q():
    q, _, _ = qkv()
    _, k, v = qkv(d=8)
    with pytest.raises(ValueError, match=r"k must have q's head dim D=16.*\(2, 4, 8, 8\)"):
        relattn.attention(q, k, v)


def test_batch_mismatch():
    q, _, _ = qkv()
    _, k, v = qkv(b=3)
    with pytest.raises(ValueError, match=r"batch size 2.*k \(3, 4, 8, 16\)"):
        relattn.attention(q, k, v)
    _, k2, _ = qkv()
    with pytest.raises(ValueError, match=r"batch size 2.*v \(3, 4, 8, 16\)"):
        relattn.attention(q, k2, v)


def test_nk_mismatch_between_k_and_v():
    q, k, _ = qkv()
    _, _, v = qkv(nk=N + 1)
    with pytest.raises(ValueError, match=r"v must have shape.*like k.*\(2, 4, 9, 16\)"):
        relattn.attention(q, k, v)


def test_hq_not_a_multiple_of_hkv():
    q, k, v = qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match=r"Hq.*multiple.*Hkv.*Hq=4, Hkv=3"):
        relattn.attention(q, k, v)


def test_kv_heads_differ_between_k_and_v():
    q, k, _ = qkv(hkv=2)
    _, _, v = qkv(hkv=4)
    with pytest.raises(ValueError, match=r"v must have shape.*\(2, 4, 8, 16\)"):
        relattn.attention(q, k, v)


def test_empty_sequence():
    q, k, v = qkv(nq=0)
    with pytest.raises(ValueError, match=r"non-empty.*q \(2, 4, 0, 16\)"):
        relattn.attention(q, k, v)


def test_not_a_tensor():
    _, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor; got list"):
        relattn.attention([[1.0]], k, v)


def test_integer_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a floating-point.*torch.int64"):
        relattn.attention(q.long(), k, v)


# ----------------------------------------------------------------------------- dtype / device


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch(which):
    t = dict(zip("qkv", qkv(), strict=True))
    t[which] = t[which].half()
    with pytest.raises(TypeError, match=rf"{which} must have q's dtype torch.float32.*float16"):
        relattn.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch(which):
    t = dict(zip("qkv", qkv(), strict=True))
    t[which] = t[which].to("meta")
    with pytest.raises(ValueError, match=rf"{which} must be on q's device cpu; got meta"):
        relattn.attention(t["q"], t["k"], t["v"])


@pytest.mark.parametrize("name", ["doc_ids", "key_padding_mask"])
def test_per_key_tensor_on_another_device(name):
    q, k, v = qkv()
    t = torch.zeros(B, N, dtype=torch.long if name == "doc_ids" else torch.bool, device="meta")
    with pytest.raises(ValueError, match=rf"{name} must be on q's device cpu; got meta"):
        relattn.attention(q, k, v, **{name: t})


# ----------------------------------------------------------------------------- pe


def test_pe_head_count_differs_from_hq():
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match=r"pe T5Bias has num_heads=2.*Hq=4"):
        relattn.attention(q, k, v, T5Bias(2))
    with pytest.raises(ValueError, match=r"pe ALiBi has num_heads=8.*Hq=4"):
        relattn.attention_weights(q, k, [RoPE(D), ALiBi(8)])


def test_rope_head_dim_differs_from_d():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"pe RoPE has head_dim=8.*D=16"):
        relattn.attention(q, k, v, RoPE(8))


def test_two_ropes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"pe may contain at most one RoPE"):
        relattn.attention(q, k, v, [RoPE(D), RoPE(D)])


def test_pe_of_the_wrong_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"pe must be.*got str"):
        relattn.attention(q, k, v, "alibi")
    with pytest.raises(TypeError, match=r"pe must be.*got Tensor"):
        relattn.attention(q, k, v, torch.zeros(H, 2 * N - 1))


# ----------------------------------------------------------------------------- scalars


@pytest.mark.parametrize(
    "value, shown",
    [(1.0, r"float 1\.0"), (torch.tensor(1), r"Tensor tensor\(1\)"), (True, r"bool True"),
     (None, r"NoneType None"), ("1", r"str '1'")],
)  # fmt: skip
@pytest.mark.parametrize("fn", ["attention", "attention_weights"])
def test_q_offset_not_an_int(value, shown, fn):
    q, k, v = qkv()
    args = (q, k, v) if fn == "attention" else (q, k)
    with pytest.raises(TypeError, match=rf"q_offset must be an int.*; got {shown}"):
        getattr(relattn, fn)(*args, q_offset=value)


@pytest.mark.parametrize(
    "value, error, shown",
    [(float("inf"), ValueError, "inf"), (float("nan"), ValueError, "nan"),
     (1e400, ValueError, "inf"), ("0.25", TypeError, "str '0.25'"), (True, TypeError, "bool True"),
     (torch.tensor(0.25), TypeError, r"Tensor tensor\(0.2500\)")],
)  # fmt: skip
def test_bad_scale(value, error, shown):
    q, k, v = qkv()
    with pytest.raises(error, match=rf"scale must be a finite float or None; got {shown}"):
        relattn.attention(q, k, v, scale=value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_causal_not_a_bool(value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"causal must be a bool; got {type(value).__name__}"):
        relattn.attention(q, k, v, causal=value)


@pytest.mark.parametrize("name", ["cuda", "flash", "", "Reference"])
def test_unknown_backend_lists_the_valid_names(name):
    q, k, v = qkv()
    # every built-in name is listed (tests may register more, e.g. test_extensibility's "toy")
    valid = r"\['auto', 'reference', 'chunked', 'decode', 'cpu_kernel', 'triton'[^]]*\]"
    with pytest.raises(ValueError, match=rf"backend must be one of {valid}; got '{name}'"):
        relattn.attention(q, k, v, backend=name)


def test_backend_not_a_string():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be one of .*; got None"):
        relattn.attention(q, k, v, backend=None)


@pytest.mark.parametrize(
    "value, error, shown",
    [(0, ValueError, "0"), (-3, ValueError, "-3"), (2.5, TypeError, "float 2.5"),
     (True, TypeError, "bool True"), ("4", TypeError, "str '4'")],
)  # fmt: skip
def test_bad_window(value, error, shown):
    q, k, v = qkv()
    with pytest.raises(error, match=rf"window must be None or an int >= 1; got {shown}"):
        relattn.attention(q, k, v, window=value)


# ----------------------------------------------------------------------------- doc_ids / padding


@pytest.mark.parametrize("name", ["doc_ids", "key_padding_mask"])
@pytest.mark.parametrize("shape", [(B, N - 1), (B + 1, N), (N,), (B, 1, N)])
def test_per_key_tensor_wrong_shape(name, shape):
    q, k, v = qkv()
    t = torch.ones(shape, dtype=torch.long if name == "doc_ids" else torch.bool)
    got = re.escape("(" + ", ".join(map(str, shape)) + ")")
    msg = rf"{name} must have shape \(B, Nk\) = \(2, 8\); got {got}"
    with pytest.raises(ValueError, match=msg):
        relattn.attention(q, k, v, **{name: t})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_doc_ids_wrong_dtype(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"doc_ids must be an integer tensor; got dtype {dtype}"):
        relattn.attention(q, k, v, doc_ids=torch.zeros(B, N, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_key_padding_mask_wrong_dtype(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"key_padding_mask must be a bool.*got dtype {dtype}"):
        relattn.attention(q, k, v, key_padding_mask=torch.ones(B, N, dtype=dtype))


@pytest.mark.parametrize("name", ["doc_ids", "key_padding_mask"])
def test_per_key_not_a_tensor(name):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor.*got list"):
        relattn.attention(q, k, v, **{name: [[1] * N] * B})


def test_doc_ids_not_contiguous():
    q, k, v = qkv()
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2], [0] * 8])
    with pytest.raises(ValueError, match=r"doc_ids must give each document one contiguous run"):
        relattn.attention(q, k, v, doc_ids=ids)


@pytest.mark.parametrize("q_offset, nq", [(-1, 8), (1, 8), (5, 4)])
def test_doc_ids_query_positions_outside_the_keys(q_offset, nq):
    q, k, v = qkv(nq=nq)
    ids = torch.zeros(B, N, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"doc_ids.*q_offset={q_offset}, Nq={nq}, Nk=8"):
        relattn.attention(q, k, v, doc_ids=ids, q_offset=q_offset)


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_key_reaches_every_row_that_sees_it(backend, where, value):
    """Documented behaviour (README, "NaN and Inf inputs"): non-finite keys and values are not
    sanitized. Every row that sees position j is affected: a NaN (in k or v) or an infinite
    value makes the row non-finite; an infinite key gives a score of ±inf: +inf makes the row NaN
    (inf - inf in the softmax), -inf gives that key weight 0. Rows that mask j are not promised
    to stay finite (0·NaN = NaN in the weighted sum), so this test does not look at them."""
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=12, nk=12)
    j, ch = 5, 3
    (k if where == "k" else v)[0, 0, j, ch] = value
    out = relattn.attention(q, k, v, ALiBi(2), backend=backend)
    after = out[0, :, j:]  # (H, N - j, D): the rows that see key j
    if where == "v" or value != value:  # NaN anywhere, or an infinite value
        assert not torch.isfinite(after).all(dim=-1).any(), "a row that sees it is finite"
        return
    plus_inf = (q[0, :, j:, ch] * value) > 0  # score +inf
    assert torch.isnan(after[plus_inf]).all()
    # score -inf: the key drops out of those rows, as if it were padding
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, j] = False
    k2 = k.clone()
    k2[0, 0, j, ch] = 0.0
    hidden = relattn.attention(q, k2, v, ALiBi(2), key_padding_mask=kpm, backend="reference")
    torch.testing.assert_close(after[~plus_inf], hidden[0, :, j:][~plus_inf], rtol=1e-5,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_poisons_only_its_row(backend):
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=12, nk=12)
    q[0, 1, 7, 0] = float("nan")
    out = relattn.attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 1, 7]).all()
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[0, 1, 7] = True
    assert torch.isfinite(out[~bad]).all()
