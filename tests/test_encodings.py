"""Known values and behaviour of each position encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracle import delta_grid, pe_bias, pe_leaves, t5_relative_position_bucket

from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias, alibi_slopes

# ----------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_8_heads():
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)], rel=1e-12)


def test_alibi_slopes_12_heads_follow_the_paper():
    """Not a power of two: the 8-head slopes, then every other slope of the 16-head list."""
    sixteen = [2.0 ** (-0.5 * i) for i in range(1, 17)]
    assert alibi_slopes(16) == pytest.approx(sixteen, rel=1e-12)
    expected = [2.0**-i for i in range(1, 9)] + sixteen[0::2][:4]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-12)
    assert ALiBi(12).slopes.tolist() == pytest.approx(expected, rel=1e-6)


def test_alibi_table_values():
    enc = ALiBi(4)
    t = enc.table(-2, 3)
    m = torch.tensor(alibi_slopes(4))
    expected = -m[:, None] * torch.tensor([2.0, 1, 0, 1, 2, 3])[None]
    torch.testing.assert_close(t, expected)


def test_learnable_alibi_slopes_get_gradients():
    enc = ALiBi(4, learnable=True)
    assert [n for n, _ in enc.named_parameters()] != []
    t = enc.table(0, 5)
    w = torch.randn_like(t)
    (t * w).sum().backward()
    (p,) = enc.parameters()
    # d/dm_h Σ_Δ w[h, Δ]·(-m_h·|Δ|) = -Σ_Δ w[h, Δ]·|Δ|
    expected = -(w * torch.arange(6.0)).sum(1)
    torch.testing.assert_close(p.grad, expected)


def test_fixed_alibi_has_no_parameters():
    assert list(ALiBi(4).parameters()) == []


# ----------------------------------------------------------------------------- T5


def test_t5_textbook_buckets():
    """n_b = 3, dist_max = 5: offsets 0, 1 -> 0, 1; 2, 3 -> 2; 4 and beyond -> 3."""
    enc = T5Bias.from_textbook(2, n_b=3, dist_max=5)
    assert enc.weight.shape == (2, 4)
    got = enc.buckets(torch.arange(0, 12)).tolist()
    assert got == [0, 1, 2, 2] + [3] * 8


def test_t5_default_offset_64_is_bucket_26():
    enc = T5Bias(1, num_buckets=32, max_distance=128)
    assert int(enc.buckets(64)) == 26
    assert int(enc.buckets(torch.tensor([64]))[0]) == 26


def test_t5_unidirectional_negative_offsets_use_bucket_0():
    enc = T5Bias(1, num_buckets=32, max_distance=128)
    assert enc.buckets(torch.tensor([-1, -5, -1000])).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "num_buckets, max_distance", [(32, 128), (8, 20), (4, 5), (16, 64), (64, 1000), (7, 100)]
)
def test_t5_buckets_match_t5s_function(bidirectional, num_buckets, max_distance):
    """Every offset in -2000 .. 2000 lands in the bucket of T5's own _relative_position_bucket
    (ported in oracle.py; T5 passes memory_position - query_position = -Δ)."""
    enc = T5Bias(1, num_buckets, max_distance, bidirectional=bidirectional)
    delta = np.arange(-2000, 2001)
    expected = t5_relative_position_bucket(-delta, bidirectional, num_buckets, max_distance)
    got = enc.buckets(torch.from_numpy(delta)).numpy()
    bad = np.nonzero(got != expected)[0]
    assert bad.size == 0, f"offsets {delta[bad][:10]} -> {got[bad][:10]}, T5: {expected[bad][:10]}"
    assert got.min() >= 0 and got.max() < num_buckets


def test_t5_bidirectional_sides():
    enc = T5Bias(1, num_buckets=32, max_distance=128, bidirectional=True)
    b = enc.buckets(torch.tensor([0, 1, 7, -1, -7, 5000, -5000])).tolist()
    assert b == [0, 1, 7, 17, 23, 15, 31]


def test_t5_table_gathers_weight():
    enc = T5Bias(3, num_buckets=8, max_distance=20)
    t = enc.table(-3, 30)
    assert t.shape == (3, 34)
    idx = enc.buckets(torch.arange(-3, 31))
    torch.testing.assert_close(t, enc.weight[:, idx])
    assert t[:, 3].tolist() == enc.weight[:, 0].tolist()  # column 3 is Δ = 0


# ----------------------------------------------------------------------------- table / bias

ALL = {
    "t5": lambda: T5Bias(3, 8, 20),
    "t5_bidir": lambda: T5Bias(3, 8, 20, bidirectional=True),
    "alibi": lambda: ALiBi(3),
    "alibi_learnable": lambda: ALiBi(3, learnable=True),
    "kerple_log": lambda: Kerple(3, "log", r1=0.7, r2=1.5),
    "kerple_power": lambda: Kerple(3, "power", r1=0.7, r2=1.5),
    "offset": lambda: OffsetBias(3, 4),
    "offset_bidir": lambda: OffsetBias(3, 4, bidirectional=True),
}


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 9), (-7, 3), (-5, -2), (100, 140)])
def test_table_shape_and_columns(name, lo, hi):
    """table(lo, hi) is (H, hi - lo + 1), column t holding PE(Δ = lo + t), per the definition."""
    torch.manual_seed(0)
    enc = ALL[name]()
    t = enc.table(lo, hi)
    assert t.shape == (3, hi - lo + 1)
    expected = pe_bias(enc, pe_leaves(enc, torch.float64), torch.arange(lo, hi + 1), torch.float64)
    torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-6)
    sub = enc.table(lo + (hi - lo) // 2, hi)  # a sub-range gives the same columns
    torch.testing.assert_close(sub, t[:, (hi - lo) // 2 :])


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("nq, nk, q_offset", [(5, 5, 0), (2, 9, 7), (6, 3, -4), (1, 1, 0)])
def test_bias_equals_table_gathered(name, nq, nk, q_offset):
    torch.manual_seed(0)
    enc = ALL[name]()
    b = enc.bias(nq, nk, q_offset)
    assert b.shape == (3, nq, nk)
    delta = delta_grid(nq, nk, q_offset)
    lo, hi = int(delta.min()), int(delta.max())
    assert torch.equal(b, enc.table(lo, hi)[:, delta - lo])


@pytest.mark.parametrize("name", [n for n in ALL if n != "alibi"])
def test_gradients_flow_from_table_into_parameters(name):
    torch.manual_seed(0)
    enc = ALL[name]()
    t = enc.table(-6, 25)
    w = torch.randn_like(t)
    (t * w).sum().backward()
    leaves = pe_leaves(enc, torch.float64)
    expected = pe_bias(enc, leaves, torch.arange(-6, 26), torch.float64)
    grads = torch.autograd.grad((expected * w.double()).sum(), list(leaves.values()))
    for (pname, p), g in zip(enc.named_parameters(), grads, strict=True):
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Kerple


def test_kerple_values():
    enc = Kerple(2, "log", r1=0.5, r2=2.0)
    torch.testing.assert_close(enc.r1, torch.full((2,), 0.5))
    torch.testing.assert_close(enc.r2, torch.full((2,), 2.0))
    d = torch.arange(-3, 4).abs().float()
    torch.testing.assert_close(enc.table(-3, 3), (-0.5 * torch.log1p(2.0 * d)).expand(2, 7))
    enc = Kerple(2, "power", r1=0.5, r2=1.5)
    torch.testing.assert_close(enc.r2, torch.full((2,), 1.5))
    torch.testing.assert_close(enc.table(-3, 3), (-0.5 * d**1.5).expand(2, 7))


def _huge_step(kind, sign, lr=1e3):
    enc = Kerple(4, kind, r1=1.0, r2=1.0)
    opt = torch.optim.SGD(enc.parameters(), lr=lr)
    for _ in range(2):
        opt.zero_grad()
        (sign * enc.table(0, 50).sum()).backward()
        opt.step()
    return enc


@pytest.mark.parametrize("kind", ["log", "power"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kerple_parameters_stay_valid_after_a_huge_step(kind, sign):
    """After optimizer steps with a huge learning rate pushing either way, r1 and r2 are finite
    and non-negative, the power kernel's r2 is at most 2, and the table stays finite."""
    enc = _huge_step(kind, sign)
    r1, r2 = enc.r1.detach(), enc.r2.detach()
    assert torch.isfinite(r1).all() and torch.isfinite(r2).all()
    assert (r1 >= 0).all() and (r2 >= 0).all()
    if kind == "power":
        assert (r2 <= 2).all()
    assert torch.isfinite(enc.table(-20, 20)).all()
    for p in enc.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_parameters_stay_strictly_positive_after_a_huge_step(kind):
    enc = _huge_step(kind, -1.0)
    assert (enc.r1 > 0).all() and (enc.r2 > 0).all()


def test_kerple_power_finite_gradients_at_zero_offset():
    enc = Kerple(2, "power", r1=1.0, r2=0.5)
    t = enc.table(-2, 2)  # includes Δ = 0
    assert t[:, 2].tolist() == [0.0, 0.0]
    t.sum().backward()
    for p in enc.parameters():
        assert torch.isfinite(p.grad).all()
    enc.zero_grad()
    enc.table(0, 0).sum().backward()
    for p in enc.parameters():
        assert torch.isfinite(p.grad).all()
        assert (p.grad == 0).all()


# ----------------------------------------------------------------------------- OffsetBias


def test_offset_bias_clipping_and_symmetry():
    enc = OffsetBias(2, max_offset=3)
    with torch.no_grad():
        enc.weight.copy_(torch.arange(8.0).view(2, 4))
    t = enc.table(-6, 6)  # Δ = -6 .. 6
    # symmetric: u[min(|Δ|, 3)]
    assert t[0].tolist() == [3, 3, 3, 3, 2, 1, 0, 1, 2, 3, 3, 3, 3]
    assert t[1].tolist() == [7, 7, 7, 7, 6, 5, 4, 5, 6, 7, 7, 7, 7]


def test_offset_bias_bidirectional_negatives():
    enc = OffsetBias(1, max_offset=2, bidirectional=True)
    assert enc.weight.shape == (1, 5)
    with torch.no_grad():
        enc.weight.copy_(torch.tensor([[10.0, 11, 12, 13, 14]]))  # Δ = -2, -1, 0, 1, 2
    assert enc.table(-4, 4)[0].tolist() == [10, 10, 10, 11, 12, 13, 14, 14, 14]


def test_offset_bias_gradient_accumulates_clipped_offsets():
    enc = OffsetBias(1, max_offset=2)
    enc.table(0, 5).sum().backward()
    assert enc.weight.grad.tolist() == [[1.0, 1.0, 4.0]]


# ----------------------------------------------------------------------------- RoPE


def _rotated_dots(rope, q, k, i, j):
    qi = rope.rotate(q.view(1, 1, 1, -1), i)
    kj = rope.rotate(k.view(1, 1, 1, -1), j)
    return (qi.double() * kj.double()).sum().item()


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_rope_dot_depends_only_on_offset(head_dim):
    torch.manual_seed(0)
    rope = RoPE(head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    for delta in (0, 1, 5, -3):
        ref = _rotated_dots(rope, q, k, 10 + delta, 10)
        for base in (3, 200, 1000):
            got = _rotated_dots(rope, q, k, base + delta, base)
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-4)
    # and it does depend on the offset
    assert _rotated_dots(rope, q, k, 1, 0) != pytest.approx(_rotated_dots(rope, q, k, 4, 0))


def test_rope_preserves_norm_and_position_zero_is_identity():
    torch.manual_seed(0)
    rope = RoPE(16)
    x = torch.randn(2, 3, 7, 16)
    y = rope.rotate(x, 5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope.rotate(x[:, :, :1], 0), x[:, :, :1])


def test_rope_int_and_tensor_positions_agree():
    torch.manual_seed(0)
    rope = RoPE(16)
    x = torch.randn(2, 3, 7, 16)
    by_int = rope.rotate(x, 4)
    torch.testing.assert_close(rope.rotate(x, torch.arange(4, 11)), by_int, rtol=0, atol=0)
    per_batch = torch.stack([torch.arange(4, 11), torch.arange(0, 7)])
    y = rope.rotate(x, per_batch)
    torch.testing.assert_close(y[0], by_int[0], rtol=0, atol=0)
    torch.testing.assert_close(y[1], rope.rotate(x, 0)[1], rtol=0, atol=0)


def test_rope_matches_rotate_half_definition():
    torch.manual_seed(0)
    rope = RoPE(8, base=100.0)
    x = torch.randn(1, 2, 5, 8)
    pos = torch.arange(3, 8)
    # pair p turns by position · base^(-2p/D); channels (p, p + D/2) form the pair
    theta = pos[:, None].double() * 100.0 ** (-torch.arange(0, 8, 2).double() / 8)
    x1, x2 = x[..., :4].double(), x[..., 4:].double()
    expected = torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()],
                         dim=-1)  # fmt: skip
    torch.testing.assert_close(rope.rotate(x, 3).double(), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(rope.base, 100.0)


def test_rope_float64_is_computed_in_float64():
    """float64 inputs keep float64 angles: at positions near 1e6 a float32 angle is off by
    ~0.06 rad, a float64 one by ~1e-10."""
    torch.manual_seed(0)
    rope = RoPE(8)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    start = 1_000_003
    pos = torch.arange(start, start + 5, dtype=torch.float64)
    theta = pos[:, None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()],
                         dim=-1)  # fmt: skip
    got = rope.rotate(x, start)
    assert got.dtype == torch.float64
    assert (got - expected).abs().max().item() < 1e-9


# ----------------------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    "make, exc, arg",
    [
        (lambda: ALiBi(0), ValueError, "num_heads"),
        (lambda: ALiBi(2.5), TypeError, "num_heads"),
        (lambda: ALiBi(True), TypeError, "num_heads"),
        (lambda: T5Bias(0), ValueError, "num_heads"),
        (lambda: T5Bias(2, num_buckets=1), ValueError, "num_buckets"),
        (lambda: T5Bias(2, num_buckets=3, bidirectional=True), ValueError, "num_buckets"),
        (lambda: T5Bias(2, num_buckets=8.0), TypeError, "num_buckets"),
        (lambda: T5Bias(2, num_buckets=32, max_distance=16), ValueError, "max_distance"),
        (lambda: T5Bias(2, max_distance=128.0), TypeError, "max_distance"),
        (lambda: Kerple(2, "cubic"), ValueError, "kind"),
        (lambda: Kerple(2, "log", r1=0.0), ValueError, "r1"),
        (lambda: Kerple(2, "log", r1=-1.0), ValueError, "r1"),
        (lambda: Kerple(2, "log", r2=0.0), ValueError, "r2"),
        (lambda: Kerple(2, "power", r2=2.5), ValueError, "r2"),
        (lambda: Kerple(2, "power", r2=0.0), ValueError, "r2"),
        (lambda: Kerple(0), ValueError, "num_heads"),
        (lambda: OffsetBias(2, max_offset=-1), ValueError, "max_offset"),
        (lambda: OffsetBias(2, max_offset=3.0), TypeError, "max_offset"),
        (lambda: OffsetBias(-1, max_offset=3), ValueError, "num_heads"),
        (lambda: RoPE(7), ValueError, "head_dim"),
        (lambda: RoPE(0), ValueError, "head_dim"),
        (lambda: RoPE(16.0), TypeError, "head_dim"),
        (lambda: RoPE(16, base=1.0), ValueError, "base"),
        (lambda: RoPE(16, base="10000"), TypeError, "base"),
        (lambda: Kerple(2, r1="1"), TypeError, "r1"),
        (lambda: Kerple(2, r1=float("inf")), ValueError, "r1"),
        (lambda: Kerple(2, r2=float("nan")), ValueError, "r2"),
        (lambda: T5Bias(2, bidirectional="no"), TypeError, "bidirectional"),
        (lambda: ALiBi(2, learnable=1), TypeError, "learnable"),
        (lambda: ALiBi(2, slopes=[1.0]), ValueError, "slopes"),
        (lambda: ALiBi(2, slopes=[1.0, float("inf")]), ValueError, "slopes"),
        (lambda: ALiBi(2, slopes="ab"), TypeError, "slopes"),
        (lambda: OffsetBias(2, bidirectional="yes"), TypeError, "bidirectional"),
        (lambda: OffsetBias(2, max_offset=10**9), ValueError, "max_offset"),
    ],
)
def test_bad_constructor_arguments(make, exc, arg):
    with pytest.raises(exc, match=arg):
        make()


def test_rope_rotate_bad_positions():
    rope = RoPE(8)
    with pytest.raises(ValueError, match=r"positions.*\(5,\)"):
        rope.rotate(torch.randn(1, 1, 5, 8), torch.arange(4))
    with pytest.raises(ValueError, match=r"x must have shape"):
        rope.rotate(torch.randn(1, 1, 5, 6), 0)
