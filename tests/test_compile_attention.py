"""torch.compile with the default inductor backend on the inputs models really pass: q, k, v as
non-contiguous views of one fused projection, every mask, the layer, and the custom op's fake
strides (opcheck on non-contiguous inputs). Also double backward: clear error or exact."""

from __future__ import annotations

import pytest
import torch

import relattn
import relattn._custom_op  # noqa: F401  (registers torch.ops.relattn.attention)
from relattn.nn import RelativeSelfAttention
from relattn.pe import ALiBi, T5Bias

B, H, HKV, N, D = 2, 4, 2, 48, 16


def _views(seed: int):
    """q, k, v as strided views of one (B, N, H + 2·Hkv, D) projection, like every model's."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, H + 2 * HKV, D, generator=g, requires_grad=True)
    q, k, v = qkv.split([H, HKV, HKV], dim=2)
    return qkv, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _masks():
    doc_ids = torch.tensor([[0] * 20 + [1] * 28, [5] * 48])
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, :7] = False
    return doc_ids, kpm


def _every_mask(q, k, v, pe, doc_ids, kpm):
    """One output per mask kind, summed into one graph (one compilation covers them all)."""
    a = relattn.attention
    outs = [
        a(q, k, v, pe),
        a(q, k, v, pe, causal=False),
        a(q, k, v, pe, window=5),
        a(q, k, v, pe, doc_ids=doc_ids),
        a(q, k, v, pe, key_padding_mask=kpm),
        a(q[:, :, -8:], k, v, pe, q_offset=N - 8),
    ]
    return sum(o.float().square().sum() for o in outs)


def test_inductor_noncontiguous_every_mask():
    torch._dynamo.reset()
    pe = T5Bias(H, num_buckets=8, max_distance=20)
    doc_ids, kpm = _masks()

    def loss(q, k, v):
        return _every_mask(q, k, v, [pe], doc_ids, kpm)

    qkv, q, k, v = _views(0)
    assert not q.is_contiguous() and not k.is_contiguous()
    eager = loss(q, k, v)
    (g_eager,) = torch.autograd.grad(eager, qkv)
    w_eager = torch.autograd.grad(loss(*_views(0)[1:]), pe.weight)[0]

    compiled = torch.compile(loss, fullgraph=True)  # default backend: inductor
    qkv2, q2, k2, v2 = _views(0)
    out = compiled(q2, k2, v2)
    (g_comp,) = torch.autograd.grad(out, qkv2)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-5)
    _, q3, k3, v3 = _views(0)
    w_comp = torch.autograd.grad(compiled(q3, k3, v3), pe.weight)[0]
    torch.testing.assert_close(w_comp, w_eager, rtol=1e-4, atol=1e-5)


def test_inductor_layer_training_step():
    """The issue's failing call: compile(RelativeSelfAttention(..., pe="t5")) forward+backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = RelativeSelfAttention(d_model=64, num_heads=4, num_kv_heads=2, pe="t5")
    x = torch.randn(2, 70, 64)
    ref = layer(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    out = torch.compile(layer)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_fullgraph_with_doc_ids_and_closed_form_alibi():
    """doc_ids' data-dependent check is skipped while compiling (no graph break)."""
    torch._dynamo.reset()
    doc_ids, kpm = _masks()
    pe = ALiBi(H)
    _, q, k, v = _views(1)
    f = lambda q, k, v: relattn.attention(q, k, v, pe, doc_ids=doc_ids, key_padding_mask=kpm)  # noqa: E731
    torch.testing.assert_close(
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v)
    )


@pytest.mark.parametrize("layout", ["transposed", "sliced_d"])
def test_opcheck_noncontiguous(layout):
    """The fake kernel's shapes, dtypes and strides match the real one on strided inputs."""
    _, q, k, v = _views(2)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    if layout == "sliced_d":
        q, k, v = (t[..., ::2] for t in (q, k, v))
    table = torch.randn(H, N, dtype=torch.float64, requires_grad=True)
    args = (q, k, v, table, None, None, None, None, None, None, None, 0, 0.3, True, 0, 0, "chunked")
    torch.library.opcheck(torch.ops.relattn.attention.default, args)


def test_double_backward():
    """Reference is plain autograd (exact double backward); a fused backend says it can't."""
    g = torch.Generator().manual_seed(3)
    small = [torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    small = [t.requires_grad_() for t in small]
    t5 = T5Bias(2, 8, 20).double()

    def f(q, k, v):
        return relattn.attention(q, k, v, t5, backend="reference")

    assert torch.autograd.gradgradcheck(f, small, fast_mode=True)
    _, q, k, v = _views(3)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    pe = T5Bias(H, 8, 20).double()
    out = relattn.attention(q, k, v, pe, backend="chunked")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"backend='chunked' does not support double backward"):
        gq.sum().backward()


def test_compile_before_any_eager_call(tmp_path):
    """A fresh process whose first attention call is compiled with fullgraph=True: no backend
    module may be imported while Dynamo traces."""
    import subprocess
    import sys

    script = tmp_path / "first.py"
    script.write_text(
        "import torch, relattn\n"
        "pe = relattn.pe.T5Bias(2, 8, 20)\n"
        "f = torch.compile(lambda q, k, v: relattn.attention(q, k, v, pe), fullgraph=True,\n"
        "                  backend='aot_eager')\n"
        "q = torch.randn(1, 2, 70, 8)\n"
        "print(float((f(q, q, q) - relattn.attention(q, q, q, pe)).abs().max()))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
