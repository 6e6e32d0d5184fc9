import torch

from relattn.nn import RelativeSelfAttention

attn = RelativeSelfAttention(d_model=256, num_heads=8, num_kv_heads=2, pe="t5", rope=False)
x = torch.randn(2, 16, 256)
y = attn(x)  # (B, N, 256) -> (B, N, 256)
