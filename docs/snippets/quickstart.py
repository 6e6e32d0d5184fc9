import torch

import relattn
from relattn.pe import T5Bias

B, H, N, D = 2, 8, 1024, 64
q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
t5 = T5Bias(num_heads=H)  # learnable: one scalar per head per bucket

out = relattn.attention(q, k, v, t5)  # (B, H, N, D); causal by default
out.sum().backward()  # grads for q, k, v and t5.weight
alpha = relattn.attention_weights(q[:, :, :8], k[:, :, :8], t5)  # (B, H, 8, 8), for inspection
