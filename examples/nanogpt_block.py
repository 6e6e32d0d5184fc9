"""relattn's attention inside a nanoGPT-style block: the block reads top to bottom like the
formula, and the model has no absolute position embedding at all.

    python examples/nanogpt_block.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import relattn
from relattn.pe import T5Bias


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.pe = T5Bias(n_head)  # learned bias per head per bucket of i - j

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        b, n, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (t.view(b, n, self.n_head, c // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = relattn.attention(q, k, v, self.pe)  # causal: softmax(q·k/√d + PE + Mask)·v
        return self.c_proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        hidden = 4 * d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


torch.manual_seed(0)
text = b"relative positions only: no absolute position embedding anywhere. " * 4
data = torch.tensor(list(text))
wte = nn.Embedding(256, 64)
nn.init.normal_(wte.weight, std=0.02)
blocks = nn.Sequential(Block(64, 4), Block(64, 4))
opt = torch.optim.AdamW([*wte.parameters(), *blocks.parameters()], lr=3e-3)
for step in range(60):
    x, y = data[None, :-1], data[None, 1:]
    logits = blocks(wte(x)) @ wte.weight.T  # tied output head
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 or step == 59:
        print(f"step {step:2d}  loss {loss.item():.3f}")
print("T5 bias of block 0 got gradients:", blocks[0].attn.pe.weight.grad is not None)
