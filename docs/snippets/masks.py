import torch

import relattn
from relattn.pe import ALiBi

B, H, N, D = 1, 4, 12, 16
q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
alibi = ALiBi(H)

windowed = relattn.attention(q, k, v, alibi, window=4)  # each token sees itself and 3 before
doc_ids = torch.tensor([[0] * 5 + [1] * 7])  # two documents packed in one row
packed = relattn.attention(q, k, v, alibi, doc_ids=doc_ids)
first = relattn.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], alibi)
assert torch.allclose(packed[:, :, :5], first, atol=1e-6)  # = the document on its own
real = torch.tensor([[True] * 10 + [False] * 2])  # the last two keys are padding
padded = relattn.attention(q, k, v, alibi, key_padding_mask=real)
