"""Tests specific to the chunked backend: the custom op's registration, float64 gradients,
torch.compile, block boundaries, large offsets and memory. Accuracy over backends × encodings ×
masks × dtypes lives in the conformance suite."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import relattn
import relattn._custom_op  # noqa: F401  (registers torch.ops.relattn.attention)
from relattn.pe import ALiBi, Kerple, T5Bias


def _rand(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, grad=False):
    return (
        _rand(b, hq, nq, d, dtype=dtype, seed=1, grad=grad),
        _rand(b, hkv, nk, d, dtype=dtype, seed=2, grad=grad),
        _rand(b, hkv, nk, d, dtype=dtype, seed=3, grad=grad),
    )


def _both(q, k, v, pe, **kw):
    """Output and gradients (q, k, v, encoding parameters) from reference and chunked."""
    results = []
    for backend in ("reference", "chunked"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = relattn.attention(*leaves, pe, backend=backend, **kw)
        grad = _rand(*out.shape, dtype=out.dtype, seed=9)
        params = list(pe.parameters()) if pe is not None else []
        grads = torch.autograd.grad(out, leaves + params, grad, allow_unused=True)
        results.append([out, *grads])
    return results


def _assert_close(a, b, atol, rtol=0.0):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert not torch.isnan(y).any()
        torch.testing.assert_close(y.double(), x.double(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- the custom op


def _op_args(table=None, slopes=None, doc_ids=None, kpm=None, causal=True, q_offset=0, window=0):
    q, k, v = _qkv(2, 4, 2, 9, 11, 8, dtype=torch.float64, grad=True)
    return (q, k, v, table, slopes, None, None, None, None, doc_ids, kpm, 0 if causal else -10,
            0.3, causal, q_offset, window, "chunked")  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["table", "slopes", "none", "masks"],
)
def test_opcheck(case):
    table = _rand(4, 21, dtype=torch.float64, seed=5, grad=True)
    if case == "table":
        args = _op_args(table=table, causal=False)
    elif case == "slopes":
        args = _op_args(slopes=torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64))
    elif case == "none":
        args = _op_args(q_offset=2, window=4)
    else:
        doc = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
        kpm = torch.ones(2, 11, dtype=torch.bool)
        kpm[1, 3] = False
        args = _op_args(table=table, doc_ids=doc, kpm=kpm, causal=False, q_offset=2)
    torch.library.opcheck(torch.ops.relattn.attention.default, args)


@pytest.mark.parametrize("window", [None, 3])
def test_gradcheck_through_encodings(window):
    q, k, v = _qkv(1, 4, 2, 6, 8, 4, dtype=torch.float64, grad=True)
    t5 = T5Bias(4, num_buckets=8, max_distance=16).double()
    kerple = Kerple(4).double()
    kpm = torch.tensor([[True] * 7 + [False]])

    # The encodings' own parameters are gradcheck inputs: gradcheck perturbs them in place.
    params = (t5.weight, kerple.raw_r1, kerple.raw_r2)

    def f(q, k, v, *params):
        return relattn.attention(
            q, k, v, [t5, kerple], backend="chunked", q_offset=2, window=window,
            key_padding_mask=kpm,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v, *params), fast_mode=True)


def test_gradcheck_bidirectional_gqa_docs():
    q, k, v = _qkv(2, 4, 1, 7, 7, 4, dtype=torch.float64, grad=True)
    table = _rand(4, 13, dtype=torch.float64, seed=4, grad=True)
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])

    def f(q, k, v, table):
        out, _ = torch.ops.relattn.attention(
            q, k, v, table, None, None, None, None, None, doc, None, -6, 0.5, False, 0, 0, "chunked"
        )
        return out

    assert torch.autograd.gradcheck(f, (q, k, v, table), fast_mode=True)


def test_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = T5Bias(2, num_buckets=8, max_distance=16)

        def forward(self, q, k, v):
            return relattn.attention(q, k, v, self.pe, backend="chunked")

    torch._dynamo.reset()
    model = Block()
    q, k, v = _qkv(1, 2, 2, 16, 16, 8, grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    ref = _both(q, k, v, model.pe)[0]
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    assert model.pe.weight.grad is not None and q.grad is not None


def test_compile_fullgraph_op():
    """The custom op itself is one graph node under fullgraph compile, table grads included."""
    pe = T5Bias(2, num_buckets=8, max_distance=16)

    def f(q, k, v):
        out, _ = torch.ops.relattn.attention(
            q, k, v, pe.table(0, 15), None, *[None] * 4, None, None, 0, 0.25, True, 0, 0, "chunked"
        )
        return out

    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 2, 16, 16, 8, grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, f(q, k, v))
    assert pe.weight.grad is not None and pe.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- block boundaries


@pytest.mark.parametrize(
    "nq,nk,q_offset",
    [(1, 1, 0), (1, 300, 299), (257, 257, 0), (300, 513, 213), (300, 200, -50), (513, 300, 7)],
)
@pytest.mark.parametrize("causal", [True, False])
def test_block_boundaries(nq, nk, q_offset, causal):
    pe = T5Bias(4, bidirectional=not causal)
    q, k, v = _qkv(1, 4, 2, nq, nk, 16, dtype=torch.float64)
    ref, got = _both(q, k, v, pe, causal=causal, q_offset=q_offset)
    _assert_close(ref, got, atol=1e-10)


def test_small_blocks_all_masks(monkeypatch):
    """Many blocks with documents and padding straddling block edges (the block size is a
    private knob; shrinking it exercises every boundary on small inputs)."""
    from relattn.backends import chunked

    monkeypatch.setattr(chunked, "BLOCK_M", 8)
    pe = ALiBi(4, learnable=True).double()
    q, k, v = _qkv(2, 4, 2, 37, 45, 8, dtype=torch.float64)
    doc = torch.zeros(2, 45, dtype=torch.long)
    doc[0, 11:] = 1
    doc[0, 30:] = 2
    doc[1, 20:] = 1
    kpm = torch.ones(2, 45, dtype=torch.bool)
    kpm[0, [0, 9, 15, 16]] = False
    kpm[1, 8:16] = False  # rows 0..7 of batch 1 (positions 8..15) see only padding
    for kw in (
        dict(q_offset=8, doc_ids=doc, key_padding_mask=kpm),
        dict(q_offset=8, window=5, key_padding_mask=kpm),
        dict(q_offset=-10, window=12, causal=False),
    ):
        ref, got = _both(q, k, v, pe, **kw)
        _assert_close(ref, got, atol=1e-10)


def test_rows_without_keys_and_very_negative_scores():
    q, k, v = _qkv(1, 2, 2, 6, 6, 4)
    q = q * 1e3  # scores around ±1e4: no overflow, one key takes all the weight
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = relattn.attention(*leaves, T5Bias(2), backend="chunked", q_offset=-3)
    out.sum().backward()
    assert torch.all(out[:, :, :3] == 0)  # positions -3..-1 see no key
    for t in [out, *(x.grad for x in leaves)]:
        assert torch.isfinite(t).all()
    assert torch.all(leaves[0].grad[:, :, :3] == 0)
    ref = relattn.attention(q, k, v, T5Bias(2), backend="reference", q_offset=-3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_float64_huge_negative_table_entries_match_reference():
    """float64 scores down to -1e39 (a T5 bucket used as padding) are beyond float32's range:
    the softmax statistics stay in float64, so chunked's gradients equal reference's."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
                         for _ in range(4))  # fmt: skip
    weight = torch.randn(2, 8, generator=g, dtype=torch.float64)
    weight[:, 3] = -1e39  # offsets in bucket 3 are all but hidden
    res = {}
    for backend in ("chunked", "reference"):
        pe = T5Bias(2, 8, 20).double()
        with torch.no_grad():
            pe.weight.copy_(weight.view_as(pe.weight))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = relattn.attention(*leaves, pe, backend=backend)
        grads = torch.autograd.grad(out, [*leaves, pe.weight], grad_out)
        res[backend] = [out, *grads]
    for a, b in zip(res["chunked"], res["reference"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lse_of_empty_rows_is_neg_inf():
    q, k, v = _qkv(1, 2, 2, 4, 4, 4)
    kpm = torch.tensor([[False, False, True, True]])
    none4 = [None] * 4
    out, lse = torch.ops.relattn.attention(q, k, v, None, None, *none4, None, kpm, 0, 0.5, True,
                                           0, 0, "chunked")  # fmt: skip
    assert torch.all(lse[:, :, :2] == -math.inf) and torch.isfinite(lse[:, :, 2:]).all()
    assert torch.all(out[:, :, :2] == 0)


def test_alibi_large_offsets_steep_slopes():
    """ALiBi with 8 heads (slopes up to 1/2) for the last rows of N = 16384: biases down to
    about -8192 must neither overflow nor hide the row maximum."""
    n, rows, h, d = 16384, 4, 8, 16
    q, k, v = _qkv(1, h, h, rows, n, d)
    pe = ALiBi(h)
    out = relattn.attention(q, k, v, pe, backend="chunked", q_offset=n - rows)
    delta = (n - rows + torch.arange(rows))[:, None] - torch.arange(n)[None, :]
    bias = -pe.slopes.double()[:, None, None] * delta.abs().double()
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d) + bias
    s = s.masked_fill(delta < 0, -math.inf)
    ref = torch.softmax(s, -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_bad_table_shape_names_the_argument():
    q, k, v = _qkv(1, 2, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="table"):
        torch.ops.relattn.attention(q, k, v, torch.zeros(3, 4), None, *[None] * 4, None, None, 0,
                                    0.5, True, 0, 0, "chunked")  # fmt: skip


# ----------------------------------------------------------------------------- building blocks


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), m=st.integers(1, 12), keys=st.integers(1, 40))
def test_antidiagonal_sums(n, m, keys):
    """The table-gradient reduction against a loop over the rows, for every shape: keys
    shorter than, equal to and longer than the rows, one row, one key."""
    from relattn.backends.chunked import _antidiagonal_sums

    x = torch.randn(n, m, keys, dtype=torch.float64)
    want = torch.zeros(n, m + keys - 1, dtype=torch.float64)
    for r in range(m):
        want[:, r : r + keys] += x[:, r]
    torch.testing.assert_close(_antidiagonal_sums(x), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["_softmax_backward", "_softmax_backward_generic"])
def test_softmax_backward_in_place(name):
    """dS = P∘(dP - Σ dP∘P) in place, rows of zeros (rows that see no key) staying zero; the
    generic version is the one CUDA tensors take."""
    from relattn.backends import chunked

    p = torch.softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1)
    p[1, 2] = 0.0
    dp = torch.randn(3, 5, 7, dtype=torch.float64)
    want = p * (dp - (dp * p).sum(-1, keepdim=True))
    ds = dp.clone()
    getattr(chunked, name)(ds, p)
    torch.testing.assert_close(ds, want, atol=1e-14, rtol=0)
    assert torch.all(ds[1, 2] == 0)


# ----------------------------------------------------------------------------- memory


def test_no_quadratic_allocation():
    """fwd+bwd at N = 8192: no single allocation comes near N×N floats (256 MiB)."""
    n = 8192
    q, k, v = _qkv(1, 1, 1, n, n, 16, grad=True)
    pe = T5Bias(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        relattn.attention(q, k, v, pe, backend="chunked").sum().backward()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert largest > 0  # the profiler did see allocations
    assert largest < n * n * 4 / 16, f"an op allocated {largest / 2**20:.1f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    q, k, v = (t.cuda() for t in _qkv(2, 4, 2, 300, 300, 32))
    pe = T5Bias(4).cuda()
    ref, got = _both(q, k, v, pe, q_offset=0, window=100)
    _assert_close(ref, got, atol=1e-4, rtol=1e-4)
