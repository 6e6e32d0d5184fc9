"""The two extension points work with no edit outside this file.

- A new encoding (one class, one ``table``) registered here works in attention on every
  backend (the whole conformance grid of masks), the layer and TinyLM.
- A toy backend (materializing, written here) registered here passes the conformance grid
  through ``backend="toy"``.
"""

from __future__ import annotations

import json

import pytest
import torch
from cases import BACKENDS, MASKS, check_fp32, check_low_precision, randomize
from oracle import ORACLES

import relattn
import relattn._custom_op  # noqa: F401  (registers torch.ops.relattn.attention)
from relattn.backends import Backend
from relattn.models import TinyLM, TinyLMConfig
from relattn.nn import RelativeSelfAttention
from relattn.pe import PositionEncoding, offsets_grid


@relattn.pe.register(
    "cosine_decay",
    description="test-only: w_h·cos(Δ/4)/(1 + |Δ|), one learnable weight per head",
    learnable=True,
)
class CosineDecay(PositionEncoding):
    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads)
        self.weight = torch.nn.Parameter(torch.ones(num_heads))

    def table(self, lo: int, hi: int) -> torch.Tensor:
        d = torch.arange(lo, hi + 1, device=self.weight.device).to(self.weight.dtype)
        return self.weight[:, None] * torch.cos(d / 4) / (1 + d.abs())


def _cosine_decay_math(enc, leaves, delta, dtype):
    """The definition again, in float64, from the test's own parameters."""
    d = delta.to(dtype)
    return leaves["weight"].view(-1, *[1] * d.dim()) * torch.cos(d / 4) / (1 + d.abs())


ORACLES[CosineDecay] = _cosine_decay_math
ENCODING = {"cosine_decay": lambda h, d, g: randomize(CosineDecay(h), g, std=0.5)}


class ToyBackend(Backend):
    """Materializes the scores in float64 and differentiates by autograd."""

    name = "toy"

    def forward(self, call):
        q = call.q
        out, lse = self._math(*call[:6])
        return out.to(q.dtype), lse.float()

    def backward(self, call, grad_out, out, lse):
        # A custom op's kernel runs below autograd: the softmax backward by hand, in float64.
        q, k, v, table, slopes, problem = call[:6]
        group = q.shape[1] // k.shape[1]
        p, delta, _ = self._weights(q, k, table, slopes, problem)
        kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
        do = grad_out.double()
        dp = do @ vv.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = problem.scale * ds @ kk
        dk = problem.scale * ds.transpose(-1, -2) @ q.double()
        dv = p.transpose(-1, -2) @ do
        dk, dv = (t.unflatten(1, (-1, group)).sum(2) for t in (dk, dv))
        dtable = None
        if table is not None:
            dtable = torch.zeros(table.shape, dtype=torch.float64)
            for t in range(table.shape[1]):  # offset lo + t collects the dS of its diagonal
                dtable[:, t] = (ds * (delta == problem.lo + t)).sum((0, 2, 3))
            dtable = dtable.to(table.dtype)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dtable

    @staticmethod
    def _weights(q, k, table, slopes, problem):
        group = q.shape[1] // k.shape[1]
        kk = k.double().repeat_interleave(group, 1)
        s = problem.scale * q.double() @ kk.transpose(-1, -2)
        delta = offsets_grid(q.shape[2], k.shape[2], problem.q_offset)
        if table is not None:
            s = s + table.double()[:, (delta - problem.lo).clamp(0, table.shape[1] - 1)]
        if slopes is not None:
            s = s - slopes.double()[:, None, None] * delta.abs()
        mask = relattn.masks.visible(delta, problem).expand(s.shape)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(torch.where(mask.any(-1, keepdim=True), s, 0.0), -1)
        return torch.where(mask, p, 0.0), delta, torch.logsumexp(s, -1)

    def _math(self, q, k, v, table, slopes, problem):
        group = q.shape[1] // k.shape[1]
        p, _, lse = self._weights(q, k, table, slopes, problem)
        return p @ v.double().repeat_interleave(group, 1), lse


relattn.backends.register(ToyBackend())


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_new_encoding_every_backend_every_mask(backend, mask_name):
    shape = (2, 4, 2, 19, 16)
    check_fp32(backend, "cosine_decay", mask_name, shape, encodings=ENCODING)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_new_encoding_low_precision(backend):
    check_low_precision(
        backend, "cosine_decay", "causal", (2, 4, 2, 19, 16), torch.bfloat16, encodings=ENCODING
    )


def test_new_encoding_in_the_registry_layer_and_model():
    assert "cosine_decay" in relattn.pe.names()
    assert isinstance(relattn.pe.create("cosine_decay", 3), CosineDecay)
    layer = RelativeSelfAttention(32, 4, pe="cosine_decay")
    assert isinstance(layer.pe, CosineDecay)
    x = torch.randn(2, 9, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.pe.weight.grad is not None and layer.pe.weight.grad.abs().sum() > 0
    model = TinyLM(TinyLMConfig(pe="cosine_decay", d_model=32, num_heads=4, num_layers=1))
    logits = model(torch.randint(0, 256, (1, 12)))
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("enc_name", ["none", "t5", "alibi", "kerple_power", "rope+t5"])
def test_toy_backend_conformance(enc_name, mask_name):
    check_fp32("toy", enc_name, mask_name, (2, 4, 2, 19, 16))


def test_toy_backend_is_listed_and_never_auto():
    assert "toy" in relattn.backends.names()
    q = torch.randn(1, 2, 100, 8)
    problem = relattn.Problem(lo=0, scale=1.0)
    assert relattn.backends.choose("auto", q, q, problem).name != "toy"


@pytest.mark.parametrize("backend", ["reference", "toy"])
def test_op_backward_by_gradcheck(backend):
    """The hand-written backwards (reference's and the toy's) through the custom op, checked
    numerically in float64, table gradient included, with padding, documents and GQA."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))  # fmt: skip
    table = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [3] * 7])
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 2] = False

    def f(q, k, v, table):
        out, lse = torch.ops.relattn.attention(
            q, k, v, table, None, None, None, None, None, doc, kpm, -5, 0.7, False, 1, 0, backend
        )
        return out

    assert torch.autograd.gradcheck(f, (q, k, v, table), fast_mode=True)


def test_new_encoding_in_relattn_explain(capsys):
    """`relattn explain --pe NAME` takes the registered encoding, its PE column included."""
    from relattn.cli.main import main

    assert main(["explain", "The quick brown fox", "--query", "2", "--pe", "cosine_decay"]) == 0
    out = capsys.readouterr().out
    assert "test-only: w_h·cos(Δ/4)" in out and "q2·k0" in out
    assert main(["explain", "a b c", "--pe", "cosine_decay", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["encoding"]["names"] == ["cosine_decay"]
    # PE of query 2 against keys 0..2 (Δ = 2, 1, 0) is w·cos(Δ/4)/(1 + Δ), w from --seed
    pe = torch.tensor(report["pe"][2][0])
    delta = torch.tensor([2.0, 1.0, 0.0])
    w = pe[2]  # Δ = 0: w·cos(0)/1
    torch.testing.assert_close(pe, w * torch.cos(delta / 4) / (1 + delta))
