import torch

import relattn
from relattn.pe import PositionEncoding, T5Bias


class Scaled(PositionEncoding):
    def __init__(self, inner, factor):
        super().__init__(inner.num_heads)
        self.inner, self.factor = inner, factor

    def table(self, lo, hi):
        return self.inner.table(lo, hi) * self.factor


B, H, N, D = 1, 4, 16, 32
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
t5 = T5Bias(H)
out = relattn.attention(q, k, v, Scaled(t5, D**-0.5))  # = softmax((q·k + PE)/√D + Mask)·v
