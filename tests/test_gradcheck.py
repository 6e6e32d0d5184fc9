"""torch.autograd.gradcheck in float64 through q, k, v and every learnable encoding's
parameters, for the reference backend and the chunked one (through the custom op)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias

GRAD_BACKENDS = ["reference", "chunked"]

ENCODINGS = {
    "none": lambda h, d: None,
    "t5": lambda h, d: T5Bias(h, num_buckets=6, max_distance=9),
    "t5_bidir": lambda h, d: T5Bias(h, num_buckets=8, max_distance=9, bidirectional=True),
    "offset": lambda h, d: OffsetBias(h, max_offset=3),
    "offset_bidir": lambda h, d: OffsetBias(h, max_offset=2, bidirectional=True),
    "alibi_learnable": lambda h, d: ALiBi(h, learnable=True),
    "kerple_log": lambda h, d: Kerple(h, "log", r1=0.7, r2=1.3),
    "kerple_power": lambda h, d: Kerple(h, "power", r1=0.7, r2=1.3),
    "rope+t5": lambda h, d: [RoPE(d), T5Bias(h, num_buckets=6, max_distance=9)],
}

# (causal, q_offset, Nq, Nk)
MASKS = {
    "causal": (True, 0, 5, 5),
    "bidirectional": (False, 0, 5, 5),
    "q_offset": (True, 3, 3, 6),
    "bidir_q_offset": (False, -2, 4, 5),
}


class _Call(nn.Module):
    """Holds the encoding so torch.func.functional_call can swap its parameters for inputs."""

    def __init__(self, pe, backend, **kw):
        super().__init__()
        self.pe = nn.ModuleList(pe) if isinstance(pe, list) else pe
        self.backend, self.kw = backend, kw

    def forward(self, q, k, v):
        pe = list(self.pe) if isinstance(self.pe, nn.ModuleList) else self.pe
        return relattn.attention(q, k, v, pe, backend=self.backend, **self.kw)


def gradcheck_through(call: _Call, q, k, v, fast_mode: bool = True) -> None:
    """gradcheck with respect to q, k, v and every parameter of the held encoding (fast mode
    checks the Jacobian along random directions; slow mode, entry by entry)."""
    call = call.double()
    with torch.no_grad():
        for p in call.parameters():  # away from zero-initialised symmetries
            p.add_(torch.randn_like(p) * 0.3)
    names = [n for n, _ in call.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in call.parameters())

    def f(q, k, v, *ps):
        return torch.func.functional_call(call, dict(zip(names, ps, strict=True)), (q, k, v))

    out = f(q, k, v, *params)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(
        f, (q, k, v, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode
    )


def _qkv(b, hq, hkv, nq, nk, d):
    return (
        torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
        for h, n in ((hq, nq), (hkv, nk), (hkv, nk))
    )


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_gradcheck(backend, enc_name, mask_name):
    """GQA (Hq = 2, Hkv = 1), causal and bidirectional, with and without q_offset."""
    causal, q_offset, nq, nk = MASKS[mask_name]
    b, hq, hkv, d = 1, 2, 1, 4
    torch.manual_seed(0)
    call = _Call(ENCODINGS[enc_name](hq, d), backend, causal=causal, q_offset=q_offset)
    gradcheck_through(call, *_qkv(b, hq, hkv, nq, nk, d))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("enc_name", ["t5", "kerple_power"])
def test_gradcheck_masks(backend, enc_name):
    """Window, packed documents and key padding (the first row of batch 0 sees no key)."""
    torch.manual_seed(1)
    b, hq, hkv, n, d = 2, 2, 2, 6, 4
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [4, 4, 5, 5, 5, 5]])
    kpm = torch.tensor([[False, True, True, True, True, True], [True] * 5 + [False]])
    call = _Call(ENCODINGS[enc_name](hq, d), backend, window=3, doc_ids=doc_ids,
                 key_padding_mask=kpm)  # fmt: skip
    gradcheck_through(call, *_qkv(b, hq, hkv, n, n, d))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gradcheck_full_jacobian(backend):
    """The whole Jacobian, entry by entry, for one GQA case with q_offset and a learnable table."""
    torch.manual_seed(2)
    call = _Call(ENCODINGS["rope+t5"](2, 4), backend, q_offset=2)
    gradcheck_through(call, *_qkv(1, 2, 1, 3, 5, 4), fast_mode=False)
