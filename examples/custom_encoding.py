"""A new position encoding in one class: register it, and attention, the layer, TinyLM and
`relattn explain --pe capped` take it, on every backend, with its gradient.

    python examples/custom_encoding.py
"""

import torch

import relattn
from relattn.models import TinyLM, TinyLMConfig
from relattn.nn import RelativeSelfAttention
from relattn.pe import Param, PositionEncoding, register


@register(
    "capped",
    description="capped linear: -a_h·min(|i-j|, cap), a learnable per head",
    learnable=True,
    params=(Param("cap", int, 16, "offsets beyond this cost no more"),),
)
class CappedLinear(PositionEncoding):
    def __init__(self, num_heads: int, cap: int = 16) -> None:
        super().__init__(num_heads)
        self.cap = cap
        self.a = torch.nn.Parameter(torch.linspace(0.1, 1.0, num_heads))

    def table(self, lo: int, hi: int) -> torch.Tensor:
        """(H, hi - lo + 1): PE for the offsets lo..hi."""
        d = torch.arange(lo, hi + 1, device=self.a.device).abs().clamp(max=self.cap)
        return -self.a[:, None] * d.to(self.a.dtype)


B, H, N, D = 2, 4, 256, 32
q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
pe = relattn.pe.create("capped", H, cap=8)

# Every backend computes the same thing, and the gradient reaches the encoding's parameter.
ref = relattn.attention(q, k, v, pe, backend="reference")
fast = relattn.attention(q, k, v, pe, backend="chunked")
print("chunked vs reference, max |diff|:", (fast - ref).abs().max().item())
assert torch.allclose(fast, ref, atol=1e-5)
fast.sum().backward()
print("gradient of a:", pe.a.grad)

# By name in the layer and the model, like the built-in encodings.
layer = RelativeSelfAttention(d_model=64, num_heads=4, pe="capped")
print("layer:", layer(torch.randn(1, 10, 64)).shape)
model = TinyLM(TinyLMConfig(d_model=32, num_heads=2, num_layers=1, pe="capped"))
print("TinyLM logits:", model(torch.randint(0, 256, (1, 12))).shape)
