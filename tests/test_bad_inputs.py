"""The bad-input corpus for the library's core entry points: every row is a call, the exception
type it must raise, and a regex that names the argument (the models, cache and CLI have their
own corpora). A user's mistake gets TypeError for a wrong type, ValueError for a wrong value,
never another exception, a wrong answer or a NaN."""

from __future__ import annotations

import pytest
import torch

import relattn
from relattn.nn import RelativeSelfAttention
from relattn.pe import ALiBi, Kerple, OffsetBias, PositionEncoding, RoPE, T5Bias

B, H, N, D = 2, 4, 6, 8


def qkv(**over):
    t = {n: torch.randn(B, H, N, D) for n in "qkv"}
    t.update(over)
    return t["q"], t["k"], t["v"]


def attn(**kw):
    q, k, v = qkv(**{n: kw.pop(n) for n in list(kw) if n in "qkv"})
    pe = kw.pop("pe", None)
    return lambda: relattn.attention(q, k, v, pe, **kw)


def weights(**kw):
    q, k, _ = qkv(**{n: kw.pop(n) for n in list(kw) if n in "qk"})
    pe = kw.pop("pe", None)
    return lambda: relattn.attention_weights(q, k, pe, **kw)


class ShortTable(PositionEncoding):
    def __init__(self, h, short=2, rows=None, dims=2, dtype=torch.float32):
        super().__init__(h)
        self.short, self.rows, self.dims, self.dtype = short, rows, dims, dtype

    def table(self, lo, hi):
        t = torch.zeros(self.rows or self.num_heads, hi - lo + 1 - self.short, dtype=self.dtype)
        return t if self.dims == 2 else t[0]


class NoHeads(PositionEncoding):
    def table(self, lo, hi):
        return torch.zeros(4, hi - lo + 1)


class ListTable(PositionEncoding):
    def table(self, lo, hi):
        return [[0.0] * (hi - lo + 1)] * self.num_heads


def list_table():
    enc = ListTable()
    enc.num_heads = H
    return enc


def layer(**kw):
    return lambda: RelativeSelfAttention(**{"d_model": 32, "num_heads": 4, **kw})


def layer_call(**kw):
    x = kw.pop("x", torch.randn(2, 5, 32))
    mod = RelativeSelfAttention(32, 4)
    return lambda: mod(x, **kw)


T, V = TypeError, ValueError
doc_bad = torch.tensor([[0, 0, 1, 1, 0, 0], [0] * 6])
CORPUS = [
    # ---- q, k, v
    (attn(q=torch.randn(H, N, D)), V, r"q must be 4-D"),
    (attn(k=torch.randn(B, H, N)), V, r"k must be 4-D"),
    (attn(v=torch.randn(B, H, N, D, 1)), V, r"v must be 4-D"),
    (attn(q=[[1.0]]), T, r"q must be a torch.Tensor; got list"),
    (attn(k="k"), T, r"k must be a torch.Tensor; got str"),
    (attn(v=None), T, r"v must be a torch.Tensor; got NoneType"),
    (attn(q=torch.zeros(B, H, N, D, dtype=torch.long)), T, r"q must be a floating-point"),
    (attn(k=torch.zeros(B, H, N, D, dtype=torch.bool)), T, r"k must be a floating-point"),
    (attn(q=torch.zeros(B, H, N, D, dtype=torch.complex64)), T, r"q must be a floating-point"),
    (attn(k=torch.randn(B, H, N, D).double()), T, r"k must have q's dtype"),
    (attn(v=torch.randn(B, H, N, D).half()), T, r"v must have q's dtype"),
    (attn(k=torch.randn(B + 1, H, N, D)), V, r"k and v must have q's batch size"),
    (attn(k=torch.randn(B, H, N, D + 1)), V, r"k must have q's head dim"),
    (attn(v=torch.randn(B, H, N + 1, D)), V, r"v must have shape \(B, Hkv, Nk, D\)"),
    (attn(v=torch.randn(B, H, N, D + 2)), V, r"v must have shape"),
    (attn(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D)), V, r"multiple of k's Hkv"),
    (attn(q=torch.randn(B, H, 0, D)), V, r"q and k must be non-empty"),
    (attn(k=torch.randn(B, H, 0, D), v=torch.randn(B, H, 0, D)), V, r"non-empty"),
    (
        attn(q=torch.randn(B, H, N, 0), k=torch.randn(B, H, N, 0), v=torch.randn(B, H, N, 0)),
        V,
        r"non-empty",
    ),
    # ---- the same mistakes in other layouts (strided, permuted, expanded, sliced, decoding):
    # validation names the argument before any kernel sees the strides
    (attn(k=torch.randn(B, H, N, 2 * D + 2)[..., ::2]), V, r"k must have q's head dim"),
    (attn(v=torch.randn(D, N + 1, H, B).permute(3, 2, 1, 0)), V, r"v must have shape"),
    (attn(k=torch.randn(1, H, N, D).expand(B + 1, H, N, D)), V, r"q's batch size"),
    (attn(q=torch.randn(B, H, 1, 2 * D)[..., ::2].double()), T, r"k must have q's dtype"),
    (attn(q=torch.randn(B, 3, 1, D)[..., :D], q_offset=N - 1), V, r"multiple of k's Hkv"),
    (attn(q=torch.randn(B, H, 1, D + 1)[..., 1:], q_offset="5"), T, r"q_offset must be an int"),
    (attn(k=torch.randn(B, H, N, 3 * D)[..., ::3].long()), T, r"k must be a floating-point"),
    (attn(q=torch.randn(B, H, 1, D), pe=ShortTable(H, short=1)), V, r"ShortTable.table"),
    # ---- scalars
    (attn(causal=1), T, r"causal must be a bool; got int 1"),
    (attn(causal="yes"), T, r"causal must be a bool"),
    (attn(causal=None), T, r"causal must be a bool"),
    (attn(scale="0.1"), T, r"scale must be a finite float or None; got str"),
    (attn(scale=True), T, r"scale must be a finite float or None; got bool"),
    (attn(scale=torch.tensor(0.1)), T, r"scale must be a finite float or None; got Tensor"),
    (attn(scale=float("nan")), V, r"scale must be a finite float"),
    (attn(scale=float("inf")), V, r"scale must be a finite float"),
    (attn(scale=-float("inf")), V, r"scale must be a finite float"),
    (attn(scale=10**400), V, r"scale must be a finite float"),
    (attn(q_offset=1.0), T, r"q_offset must be an int"),
    (attn(q_offset="2"), T, r"q_offset must be an int"),
    (attn(q_offset=True), T, r"q_offset must be an int"),
    (attn(q_offset=None), T, r"q_offset must be an int"),
    (attn(q_offset=torch.tensor(1)), T, r"q_offset must be an int"),
    (attn(q_offset=2**63), V, r"q_offset must be an int in"),
    (attn(q_offset=-(2**63)), V, r"q_offset must be an int in"),
    (attn(q_offset=10**30), V, r"q_offset must be an int in"),
    (attn(window=0), V, r"window must be None or an int >= 1; got 0"),
    (attn(window=-1), V, r"window must be None or an int >= 1"),
    (attn(window=1.5), T, r"window must be None or an int >= 1; got float"),
    (attn(window="3"), T, r"window must be None or an int"),
    (attn(window=False), T, r"window must be None or an int"),
    (attn(window=2**70), None, None),  # valid: a window wider than the sequence
    (attn(backend="cuda"), V, r"backend must be one of"),
    (attn(backend=None), V, r"backend must be one of"),
    (attn(backend=3), V, r"backend must be one of"),
    (attn(backend="Reference"), V, r"backend must be one of"),
    # ---- doc_ids and key_padding_mask
    (attn(doc_ids=[[0] * N] * B), T, r"doc_ids must be a torch.Tensor"),
    (attn(doc_ids=torch.zeros(B, N + 1, dtype=torch.long)), V, r"doc_ids must have shape"),
    (attn(doc_ids=torch.zeros(N, dtype=torch.long)), V, r"doc_ids must have shape"),
    (attn(doc_ids=torch.zeros(B, N)), T, r"doc_ids must be an integer tensor; got dtype"),
    (attn(doc_ids=torch.zeros(B, N, dtype=torch.bool)), T, r"doc_ids must be an integer"),
    (attn(doc_ids=torch.zeros(B, N, dtype=torch.complex64)), T, r"doc_ids must be an integer"),
    (attn(doc_ids=doc_bad), V, r"doc_ids must give each document one contiguous run"),
    (attn(doc_ids=torch.zeros(B, N, dtype=torch.long), q_offset=-1), V, r"doc_ids .*q_offset"),
    (attn(doc_ids=torch.zeros(B, N, dtype=torch.long), q_offset=1), V, r"q_offset \+ Nq <= Nk"),
    (attn(key_padding_mask=torch.ones(B, N)), T, r"key_padding_mask must be a bool tensor"),
    (attn(key_padding_mask=torch.ones(B, N, dtype=torch.long)), T, r"key_padding_mask must be"),
    (
        attn(key_padding_mask=torch.ones(B, N + 2, dtype=torch.bool)),
        V,
        r"key_padding_mask must have shape \(B, Nk\)",
    ),
    (attn(key_padding_mask=[True] * N), T, r"key_padding_mask must be a torch.Tensor"),
    # ---- pe
    (attn(pe="t5"), T, r"pe must be None, a relattn.pe encoding, a RoPE"),
    (attn(pe=torch.zeros(H, 11)), T, r"pe must be None, a relattn.pe encoding"),
    (attn(pe=[T5Bias(H), 3]), T, r"pe must be None"),
    (attn(pe=T5Bias(H + 1)), V, r"pe T5Bias has num_heads=5; q has Hq=4"),
    (attn(pe=ALiBi(2)), V, r"pe ALiBi has num_heads=2"),
    (attn(pe=[RoPE(D), RoPE(D)]), V, r"pe may contain at most one RoPE"),
    (attn(pe=RoPE(D + 2)), V, r"pe RoPE has head_dim=10; q has D=8"),
    (attn(pe=ShortTable(H)), V, r"pe ShortTable.table\(.*\) must return shape \(H, hi - lo \+ 1\)"),
    (attn(pe=ShortTable(H, short=0, rows=1)), V, r"pe ShortTable.table.*must return shape"),
    (attn(pe=ShortTable(H, short=0, dims=1)), V, r"pe ShortTable.table.*must return shape"),
    (attn(pe=ShortTable(H, short=-1)), V, r"pe ShortTable.table.*must return shape"),
    (
        attn(pe=ShortTable(H, short=0, dtype=torch.long)),
        T,
        r"pe ShortTable.table must return a floating",
    ),
    (attn(pe=NoHeads()), V, r"pe NoHeads has num_heads=None"),
    (attn(pe=list_table()), T, r"pe ListTable.table\(lo, hi\) must return a Tensor; got list"),
    # ---- attention_weights: the same checks
    (weights(q=torch.randn(H, N, D)), V, r"q must be 4-D"),
    (weights(k=torch.randn(B, H, N, D).double()), T, r"k must have q's dtype"),
    (weights(causal="no"), T, r"causal must be a bool"),
    (weights(window=0), V, r"window must be None or an int"),
    (weights(q_offset=0.5), T, r"q_offset must be an int"),
    (weights(pe=ShortTable(H)), V, r"pe ShortTable.table"),
    (weights(doc_ids=doc_bad), V, r"doc_ids must give each document"),
    (weights(key_padding_mask=torch.ones(B, N)), T, r"key_padding_mask must be a bool"),
    (weights(scale=float("nan")), V, r"scale must be a finite float"),
    # ---- encodings' constructors
    (lambda: T5Bias(0), V, r"num_heads must be an int >= 1; got 0"),
    (lambda: T5Bias("4"), T, r"num_heads must be an int"),
    (lambda: T5Bias(4, num_buckets=1), V, r"num_buckets"),
    (lambda: T5Bias(4, num_buckets=8.0), T, r"num_buckets must be an int"),
    (lambda: T5Bias(4, num_buckets=2**40), V, r"num_buckets"),
    (lambda: T5Bias(4, max_distance=4), V, r"max_distance"),
    (lambda: T5Bias(4, max_distance=None), T, r"max_distance must be an int"),
    (lambda: T5Bias(4, bidirectional=1), T, r"bidirectional must be a bool"),
    (lambda: T5Bias(4, bidirectional="no"), T, r"bidirectional must be a bool"),
    (lambda: ALiBi(-2), V, r"num_heads"),
    (lambda: ALiBi(2.0), T, r"num_heads"),
    (lambda: ALiBi(4, learnable="yes"), T, r"learnable must be a bool"),
    (lambda: ALiBi(4, slopes=[0.5] * 3), V, r"slopes must hold num_heads=4 finite numbers"),
    (lambda: ALiBi(4, slopes=[0.5, 0.5, float("nan"), 0.5]), V, r"slopes must hold"),
    (lambda: ALiBi(4, slopes="abcd"), T, r"slopes must be a sequence or tensor"),
    (lambda: ALiBi(4, slopes=object()), T, r"slopes must be a sequence or tensor"),
    (lambda: Kerple(4, kind="cubic"), V, r"kind must be one of \['log', 'power'\]"),
    (lambda: Kerple(4, kind=1), T, r"kind must be one of"),
    (lambda: Kerple(4, r1=0), V, r"r1 must be a finite number in \(0.0001"),
    (lambda: Kerple(4, r1=float("inf")), V, r"r1 must be a finite number"),
    (lambda: Kerple(4, r1="1"), T, r"r1 must be a finite number; got str"),
    (lambda: Kerple(4, r2=float("nan")), V, r"r2 must be a finite number"),
    (lambda: Kerple(4, kind="power", r2=2.0), V, r"r2 must be a finite number in \(0.0001, 2\)"),
    (lambda: Kerple(4, r2=None), T, r"r2 must be a finite number"),
    (lambda: OffsetBias(4, max_offset=-1), V, r"max_offset must be an int in \[0"),
    (lambda: OffsetBias(4, max_offset=2.0), T, r"max_offset must be an int"),
    (lambda: OffsetBias(4, max_offset=2**40), V, r"max_offset"),
    (lambda: OffsetBias(4, bidirectional=0), T, r"bidirectional must be a bool"),
    (lambda: RoPE(7), V, r"head_dim must be even"),
    (lambda: RoPE(0), V, r"head_dim must be an int >= 2"),
    (lambda: RoPE("8"), T, r"head_dim must be an int"),
    (lambda: RoPE(8, base="10000"), T, r"base must be a finite number; got str"),
    (lambda: RoPE(8, base=1.0), V, r"base must be a finite number in \(1"),
    (lambda: RoPE(8, base=float("inf")), V, r"base must be a finite number"),
    (lambda: RoPE(8).rotate(torch.randn(2, 3, 8)), V, r"x must have shape \(B, H, N, 8\)"),
    (lambda: RoPE(8).rotate(torch.randn(1, 2, 3, 8), torch.arange(4)), V, r"positions must have"),
    # ---- the registry
    (lambda: relattn.pe.create("t6", 4), V, r"pe must be 'none' or one of \["),
    (lambda: relattn.pe.create(None, 4), T, r"pe must be an encoding name"),
    (lambda: relattn.pe.create("t5", 0), V, r"num_heads must be an int >= 1"),
    (lambda: relattn.pe.create("rope", 4), V, r"'rope' encoding needs head_dim"),
    (lambda: relattn.pe.register("not an id", description="", learnable=False), V, r"name must be"),
    (lambda: relattn.pe.register("none", description="", learnable=False), V, r"name must be"),
    (lambda: relattn.backends.register(object()), T, r"backend must be a relattn.backends.Backend"),
    (lambda: relattn.backends.get("nope"), V, r"backend must be one of"),
    # ---- the layer
    (layer(d_model=0), V, r"d_model must be an int >= 1"),
    (layer(d_model=32.0), T, r"d_model must be an int"),
    (layer(num_heads=5), V, r"d_model must be a multiple of num_heads"),
    (layer(num_heads=True), T, r"num_heads must be an int"),
    (layer(num_kv_heads=3), V, r"num_kv_heads must divide num_heads"),
    (layer(num_kv_heads=0), V, r"num_kv_heads must be an int >= 1"),
    (layer(pe="t6"), V, r"pe must be 'none' or one of"),
    (layer(pe=3), T, r"pe must be 'none', one of"),
    (layer(pe=T5Bias(3)), V, r"pe T5Bias has num_heads=3; the layer has num_heads=4"),
    (layer(pe=RoPE(8)), T, r"pe must be an additive encoding; pass RoPE as rope=True"),
    (layer(rope="yes"), T, r"rope must be a bool or a relattn.pe.RoPE"),
    (layer(rope=RoPE(4)), V, r"rope has head_dim=4; the layer's head dim is 8"),
    (layer(dropout=1.0), V, r"dropout must be a finite number in \[0, 1\)"),
    (layer(dropout="0.1"), T, r"dropout must be a finite number"),
    (layer(bias="no"), T, r"bias must be a bool"),
    (layer(backend="flash"), V, r"backend must be one of"),
    (layer(scale="1"), T, r"scale must be a finite number"),
    (layer(scale=float("nan")), V, r"scale must be a finite number"),
    (layer(causal=0), T, r"causal must be a bool"),
    (layer_call(x=torch.randn(5, 32)), V, r"x must have shape \(B, N, d_model=32\)"),
    (layer_call(x=torch.randn(2, 5, 31)), V, r"x must have shape"),
    (layer_call(x=torch.randn(2, 0, 32)), V, r"x must hold at least one token"),
    (layer_call(window=0), V, r"window must be None or an int >= 1"),
    (layer_call(window=2.0), T, r"window must be None or an int"),
    (layer_call(doc_ids=torch.zeros(2, 4, dtype=torch.long)), V, r"doc_ids must have shape"),
    (layer_call(key_padding_mask=torch.ones(2, 5)), T, r"key_padding_mask must be a bool"),
    (layer_call(cache="cache"), T, r"cache must be a KVCache layer view or None"),
]


@pytest.mark.parametrize(
    "call, error, pattern", CORPUS, ids=[f"row{i}" for i in range(len(CORPUS))]
)
def test_bad_input(call, error, pattern):
    if error is None:
        out = call()
        assert torch.isfinite(out).all()
        return
    with pytest.raises(error, match=pattern):
        call()


def test_corpus_size():
    assert len(CORPUS) >= 150


def test_malformed_tables_are_caught_under_no_grad_and_on_repeated_calls():
    """The table cache (active without grad) never trims a wrong-width table into shape."""
    q, k, v = qkv()
    for short in (-1, 1):
        enc = ShortTable(H, short=short)
        for _ in range(2):
            with torch.no_grad(), pytest.raises(ValueError, match="must return shape"):
                relattn.attention(q, k, v, enc)


class ViewOfAnotherModule(PositionEncoding):
    """Reads a weight held by an unregistered module (as the integrations' T5 view does)."""

    def __init__(self, source: torch.nn.Embedding):
        super().__init__(H)
        object.__setattr__(self, "_source", source)

    def table(self, lo, hi):
        return self._source.weight[: hi - lo + 1].t().contiguous()[:H]


def test_table_cache_follows_weights_it_cannot_see():
    source = torch.nn.Embedding(64, H)
    enc = ViewOfAnotherModule(source)
    q, k, v = qkv()
    with torch.no_grad():
        first = relattn.attention(q, k, v, enc)
        source.weight.add_(1.0)
        second = relattn.attention(q, k, v, enc)
    assert not torch.equal(first, second)
    out = relattn.attention(q, k, v, enc)
    out.sum().backward()
    assert source.weight.grad is not None and source.weight.grad.abs().sum() > 0
