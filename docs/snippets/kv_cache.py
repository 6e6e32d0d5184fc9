import torch

from relattn import KVCache
from relattn.nn import RelativeSelfAttention

layer = RelativeSelfAttention(d_model=64, num_heads=4, pe="alibi").eval()
x = torch.randn(1, 10, 64)
full = layer(x)  # all 10 positions at once

cache = KVCache(num_layers=1, batch_size=1, num_kv_heads=4, head_dim=16, capacity=10)
steps = [layer(x[:, :6], cache=cache.layer(0))]  # prefill 6 positions
steps += [layer(x[:, t : t + 1], cache=cache.layer(0)) for t in range(6, 10)]  # one at a time
assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
