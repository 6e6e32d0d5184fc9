"""The inputs every suite draws from: backends, devices, encodings, masks and shapes.

Encodings come from the registry (:func:`relattn.pe.names`): a newly registered encoding joins
:data:`LAYER_ENCODINGS` and, through :func:`registry_variants`, the conformance grid (a term
the tokens set joins the layer's and the model's suites, on the backends that compute it). A
backend joins :data:`BACKENDS` by registering itself before collection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from oracle import (
    assert_close_f64,
    assert_flash_accuracy,
    run_math,
    run_relattn,
    seed_of,
    visible_mask,
)

import relattn
from relattn.pe import ALiBi, Kerple, OffsetBias, RoPE, T5Bias

# Every backend the CPU suites run, from the registry. With CUDA present the Triton interpreter is
# off and triton refuses CPU tensors, so it runs in the CUDA cases instead (backends_for).
_ALL_BACKENDS = relattn.backends.names()[1:]
BACKENDS = [b for b in _ALL_BACKENDS if not (b == "triton" and torch.cuda.is_available())]


# Backends for CPU tensors only (they decline CUDA tensors, and auto never offers them any).
CPU_ONLY = {"cpu_kernel"}


def backends_for(device: str) -> list[str]:
    """The backends a suite runs on ``device``."""
    return BACKENDS if device == "cpu" else [b for b in _ALL_BACKENDS if b not in CPU_ONLY]


# Every device the suites run on: CUDA joins where there is one (``make gpu-check``).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every name a layer or TinyLM accepts for ``pe``.
LAYER_ENCODINGS = ["none", *relattn.pe.names()]


def skip_unless_token_backend(pe: str, backend: str) -> None:
    """Skip a pe the tokens set (inkling, fox: ``spec.token``) on a backend that cannot
    compute it (``token_terms`` False): dispatch refuses such calls with a clear error."""
    name = pe.split("+")[-1]
    if name in relattn.pe.names() and relattn.pe.spec(name).token:
        if not relattn.backends.get(backend).token_terms:
            pytest.skip(f"backend {backend!r} does not compute the terms that depend on the tokens")


def strengthen(layer):
    """A layer's position terms made large enough to matter: its encoding's parameters moved
    by N(0, 0.5²), a forget gate's bias lowered by 3 (gates about 0.5 .. 0.95)."""
    with torch.no_grad():
        if layer.pe is not None:
            for p in layer.pe.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        if getattr(layer, "gate_proj", None) is not None:
            layer.gate_proj.bias.sub_(3.0)
    return layer


def randomize(enc, g: torch.Generator, std: float = 1.0):
    """Learnable parameters drawn large enough that the position term matters."""
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return enc


# ----------------------------------------------------------------------------- encodings


def _t5(bidirectional):
    return lambda h, d, g: randomize(T5Bias(h, 8, 20, bidirectional=bidirectional), g)


def _kerple(kind):
    def make(h, d, g):
        enc = Kerple(h, kind, r1=0.5, r2=0.7)
        return randomize(enc, g, std=0.5)

    return make


ENCODINGS: dict[str, object] = {
    "none": lambda h, d, g: None,
    "t5": _t5(False),
    "t5_bidir": _t5(True),
    "alibi": lambda h, d, g: ALiBi(h),
    "alibi_learnable": lambda h, d, g: randomize(ALiBi(h, learnable=True), g, std=0.05),
    "kerple_log": _kerple("log"),
    "kerple_power": _kerple("power"),
    "offset": lambda h, d, g: randomize(OffsetBias(h, max_offset=9), g),
    "offset_bidir": lambda h, d, g: randomize(OffsetBias(h, max_offset=6, bidirectional=True), g),
    "rope": lambda h, d, g: RoPE(d),
    "rope+t5": lambda h, d, g: [RoPE(d), _t5(False)(h, d, g)],
}


def registry_variants() -> dict[str, object]:
    """:data:`ENCODINGS` plus every registered encoding not covered there, built with its
    registry defaults (randomized), so a new encoding joins the grid by registering. Terms the
    tokens set (``spec.token``: inkling, fox) are no module ``pe`` takes as it is; their grid
    is tests/test_token_terms.py."""
    covered = {"t5", "alibi", "kerple", "offset", "rope"}
    out = dict(ENCODINGS)
    for spec in relattn.pe.specs():
        if spec.name not in covered and not spec.token:
            out[spec.name] = lambda h, d, g, s=spec: randomize(s.create(h, d), g, std=0.5)
    return out


# ----------------------------------------------------------------------------- masks


def _doc_ids(b, n, g):
    ids = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        cuts = torch.randperm(max(n - 1, 1), generator=g)[: min(3, n - 1)] + 1
        ids[i, cuts] = 1
        ids[i] = ids[i].cumsum(0) + 10 * i  # contiguous runs, ids need not start at 0
    return ids


def _key_padding(b, n, g):
    kpm = torch.rand(b, n, generator=g) > 0.25
    kpm[0, : min(3, n)] = False  # left padding: the first rows of batch 0 see no key
    if b > 1:
        kpm[1, -min(2, n) :] = False
    return kpm


@dataclass
class Mask:
    """How a mask turns a sequence length N into (Nq, Nk, keyword arguments)."""

    nq: object = lambda n: n
    nk: object = lambda n: n
    kwargs: object = lambda b, n, g: {}
    extra: dict = field(default_factory=dict)

    def make(self, b, n, g):
        nq, nk = self.nq(n), self.nk(n)
        kw = dict(self.extra)
        kw.update(self.kwargs(b, nk, g))
        if "q_offset" in kw and callable(kw["q_offset"]):
            kw["q_offset"] = kw["q_offset"](nq, nk)
        return nq, nk, kw


MASKS: dict[str, Mask] = {
    "causal": Mask(),
    "bidirectional": Mask(extra={"causal": False}),
    "q_offset": Mask(  # decoding-like: the last Nq positions against all Nk keys
        nq=lambda n: max(1, n // 4),
        extra={"q_offset": lambda nq, nk: nk - nq},
    ),
    "neg_q_offset": Mask(extra={"q_offset": lambda nq, nk: -min(3, nq)}),
    "cross_bidir": Mask(nq=lambda n: max(1, n // 2), extra={"causal": False, "q_offset": 2}),
    "window": Mask(extra={"window": 5}),
    "window_bidir": Mask(extra={"window": 4, "causal": False}),
    "doc_ids": Mask(kwargs=lambda b, n, g: {"doc_ids": _doc_ids(b, n, g)}),
    "key_padding": Mask(kwargs=lambda b, n, g: {"key_padding_mask": _key_padding(b, n, g)}),
}

# ----------------------------------------------------------------------------- shapes

# (B, Hq, Hkv, N, D)
SHAPES = {
    "gqa_odd": (2, 4, 2, 37, 16),
    "mqa": (1, 4, 1, 24, 16),
    "n1": (2, 2, 2, 1, 16),
    "mha_d32": (1, 2, 2, 50, 32),
    "long": (1, 2, 1, 150, 16),  # crosses several blocks of a tiled kernel
    # D = 64 across query and key blocks: the CPU kernel's bf16 tiles (pairs of features) run
    "d64_blocks": (1, 4, 2, 300, 64),
}
# The Triton backend runs through the interpreter on CPU: tiny shapes only (N <= 64, D = 16).
TRITON_SHAPES = {
    "gqa_odd": (2, 4, 2, 19, 16),
    "mqa": (1, 4, 1, 24, 16),
    "n1": (2, 2, 2, 1, 16),
    "n64": (1, 2, 2, 64, 16),
}


def shapes_for(backend: str, device: str = "cpu") -> dict[str, tuple]:
    """The shapes a backend affords on a device (the interpreter only tiny ones)."""
    return TRITON_SHAPES if backend == "triton" and device == "cpu" else SHAPES


# ----------------------------------------------------------------------------- a case


def make_case(enc_name, mask_name, shape, dtype, encodings=None):
    """Inputs (on the CPU) of one conformance case: ``q, k, v, pe, grad_out, kwargs``."""
    b, hq, hkv, n, d = shape
    g = torch.Generator().manual_seed(seed_of(enc_name, mask_name, shape))
    nq, nk, kw = MASKS[mask_name].make(b, n, g)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    grad_out = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    pe = (encodings or registry_variants())[enc_name](hq, d, g)
    return q, k, v, pe, grad_out, kw


def skip_unless_runs(backend, q, k, kw, device="cpu"):
    """Skip the case where ``backend`` declines these inputs and does not claim them: its
    ``unsupported`` reason (the CPU kernel's bf16, which ``auto`` sends to chunked, or a kernel
    that could not be built here, which test_cpu_kernel.py reports as one failure) where its
    ``priority`` is None. A backend that declines a case its own priority claims fails: an
    over-broad ``unsupported`` would otherwise shrink the grid silently (``auto`` would pass
    the case on to the next backend)."""
    from relattn.problem import Problem

    on = lambda t: None if t is None else t.to(device)
    problem = Problem(
        lo=0,
        scale=1.0,
        causal=kw.get("causal", True),
        q_offset=kw.get("q_offset", 0),
        window=kw.get("window") or 0,
        doc_ids=on(kw.get("doc_ids")),
        key_padding_mask=on(kw.get("key_padding_mask")),
    )
    impl = relattn.backends.get(backend)
    qd, kd = q.to(device), k.to(device)
    reason = impl.unsupported(qd, kd, problem)
    if reason is None:
        return
    claimed = impl.priority(qd, kd, problem)
    if claimed is not None:
        pytest.fail(f"{backend} declines a case its priority ({claimed}) claims: {reason}")
    pytest.skip(f"{backend} declines: {reason}")


def _rows_without_keys_are_zero(got, kw, shape_q):
    """The rows that see no key give exactly 0 out and 0 dq."""
    b, _, nq, _ = shape_q
    nk = kw["_nk"]
    m = visible_mask(
        b, nq, nk, kw.get("causal", True), kw.get("q_offset", 0), kw.get("window"),
        kw.get("doc_ids"), kw.get("key_padding_mask"),
    )  # fmt: skip
    vis = m[:, 0].any(-1)  # (B, Nq)
    empty = ~vis
    for name in ("out", "q"):
        t = got[name].permute(0, 2, 1, 3)  # (B, Nq, H, D)
        assert torch.equal(t[empty], torch.zeros_like(t[empty])), f"{name}: rows without keys"


def check_fp32(backend, enc_name, mask_name, shape, device="cpu", encodings=None):
    """Out and every gradient against float64 math and against the reference backend."""
    case = make_case(enc_name, mask_name, shape, torch.float32, encodings)
    q, k, v, pe, grad_out, kw = case
    skip_unless_runs(backend, q, k, kw, device)
    got = run_relattn(q, k, v, pe, grad_out, backend, device, **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"{backend} vs float64: ")
    if backend != "reference":
        ref = run_relattn(q, k, v, pe, grad_out, "reference", **kw)
        assert_close_f64(got, ref, label=f"{backend} vs reference: ")
    _rows_without_keys_are_zero(got, {**kw, "_nk": k.shape[2]}, q.shape)


def check_low_precision(backend, enc_name, mask_name, shape, dtype, device="cpu", encodings=None):
    """bf16/fp16 against float64 with FlashAttention's criterion (2x the naive error)."""
    q, k, v, pe, grad_out, kw = make_case(enc_name, mask_name, shape, dtype, encodings)
    skip_unless_runs(backend, q, k, kw, device)
    got = run_relattn(q, k, v, pe, grad_out, backend, device, **kw)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    naive = run_math(q, k, v, pe, grad_out, dtype, **kw)
    assert_flash_accuracy(got, naive, truth, dtype, label=f"{backend} {dtype}: ")
    _rows_without_keys_are_zero(got, {**kw, "_nk": k.shape[2]}, q.shape)


# ----------------------------------------------------------------------------- memory layouts


def layouts(ndim: int = 4, expandable: tuple[int, ...] = (0, 1)):
    """A hypothesis strategy of memory layouts for an ``ndim``-d tensor: the order of its dims
    in storage, a step along each (a non-unit last-dim stride among them), padding after each,
    a storage offset, and which of the ``expandable`` dims (batch, heads) are stride-0
    expansions of their first entry. :func:`lay_out` applies one; every property test that
    draws its inputs through it checks every backend on these layouts."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        {
            "order": st.permutations(range(ndim)),
            "step": st.lists(st.sampled_from([1, 1, 2, 3]), min_size=ndim, max_size=ndim),
            "pad": st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim),
            "offset": st.integers(0, 7),
            "expand": st.sets(st.sampled_from(expandable)) if expandable else st.just(set()),
        }
    )


def lay_out(x: torch.Tensor, layout: dict) -> torch.Tensor:
    """``x``'s values (its first entry along each expanded dim, broadcast) in a tensor of that
    ``layout``, whose storage elsewhere holds NaN: a kernel that reads outside the view, or
    assumes other strides, gives NaN or wrong values."""
    shape = x.shape
    for dim in layout["expand"]:
        x = x.narrow(dim, 0, min(1, x.shape[dim]))
    order, step, pad = layout["order"], layout["step"], layout["pad"]
    # Storage dims in `order`, each step·size + pad long; the view takes every step-th entry.
    full = [x.shape[d] * step[d] + pad[d] for d in order]
    size = layout["offset"] + math.prod(full)
    buf = torch.full((size,), float("nan"), dtype=x.dtype)
    stored = buf[layout["offset"] :].view(full)
    view = stored[tuple(slice(0, x.shape[d] * step[d], step[d]) for d in order)]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    view = view.permute(*inverse)
    view.copy_(x)
    return view.expand(shape)
