"""``backend="triton"``: launch code for the FlashAttention-2 kernels in ``triton_kernels``.

Runs on CUDA tensors, or anywhere with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by
the tests). Importing this module does not import triton: the kernels (and triton) are imported on
the backend's first call, so CPU-only users never pay for it. Triton reads ``TRITON_INTERPRET``
whenever ``@triton.jit`` runs (for its own library at ``import triton``, for our kernels when
``triton_kernels`` is imported), so the variable may be set at any time before the first call, and
not changed after.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType

import torch
from torch import Tensor

from ..masks import doc_bounds
from ..problem import Problem
from .base import Backend, Call, Layout, TokenTerms, fits

__all__ = ["BACKEND", "TritonBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


@functools.cache
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _library_interpreted() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def _kernels() -> ModuleType:
    from . import triton_kernels

    return triton_kernels


def _kernel_mode_changed() -> bool:
    """The kernels were loaded in one mode (compiled or interpreted) and TRITON_INTERPRET now
    says the other; a decorated ``@triton.jit`` function cannot change its mode."""
    loaded = sys.modules.get(f"{__package__}.triton_kernels")
    return loaded is not None and loaded.INTERPRET != _interpreting()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------- host-side prep


def _unit_stride(name: str, x: Tensor) -> Tensor:
    """``x``, which the kernels index by its (b, h, n) strides with D dense (the backend's
    declared layout, which :func:`~relattn.backends.base.conform` gives); anything else is
    refused rather than read wrongly."""
    if not fits(x, "rows"):
        raise ValueError(
            f"triton backend: {name} must have unit stride along D (the last dim); got shape "
            f"{tuple(x.shape)}, strides {tuple(x.stride())}"
        )
    return x


def _doc_ranges(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """First and last position of each position's document, ``(B, Nk)`` int32 each (the kernels
    take inclusive ends; :func:`relattn.masks.doc_bounds` gives one past the last)."""
    start, end = doc_bounds(doc_ids)
    return start.to(torch.int32).contiguous(), (end - 1).to(torch.int32).contiguous()


def _key_bounds(key_padding_mask: Tensor) -> Tensor:
    """First and last real key of each batch row, ``(B, 2)`` int32 (Nk, -1 when none)."""
    b, nk = key_padding_mask.shape
    pos = torch.arange(nk, device=key_padding_mask.device).expand(b, nk)
    first = torch.where(key_padding_mask, pos, nk).amin(1)
    last = torch.where(key_padding_mask, pos, -1).amax(1)
    return torch.stack([first, last], 1).to(torch.int32).contiguous()


def _band_col0(K: ModuleType, q_offset: int) -> int:
    """The padded weight's column of offset 0: BAND_PAD zero columns or up to 3 more, so that
    each tile's smallest offset ``q_offset + 16·x - (BLOCK_N - 1)`` lands on a multiple of 4."""
    return int(K.BAND_PAD) + (3 - q_offset) % 4


def _band_weight(K: ModuleType, weight: Tensor, r_pad: int, col0: int) -> Tensor:
    """The band's weight ``(Hw, R, W)`` as the kernels read it: float32 ``(Hw, r_pad, WP)``,
    rows past R zero, offset 0 at column ``col0`` (zeros before it), at least BAND_PAD zero
    columns after offset W - 1, WP a multiple of 16 (each tile reads its offsets as aligned
    vectors, unmasked: see ``triton_kernels._band_slice``)."""
    hw, rank, extent = weight.shape
    width = _cdiv(col0 + extent + int(K.BAND_PAD), 16) * 16
    out = weight.new_zeros((hw, r_pad, width), dtype=torch.float32)
    out[:, :rank, col0 : col0 + extent] = weight
    return out


def _tma_rows(x: Tensor) -> bool:
    """Whether a tensor descriptor can stream ``x (B, H, N, D)``'s rows: TMA needs a 16-byte
    aligned base for every (b, h) and row strides that are nonzero multiples of 16 bytes."""
    elt = x.element_size()
    sb, sh, sn = x.stride()[:3]
    return (
        x.data_ptr() % 16 == 0
        and (sb * elt) % 16 == 0
        and (sh * elt) % 16 == 0
        and sn > 0
        and (sn * elt) % 16 == 0
    )


def _tma(K: ModuleType, *tensors: Tensor) -> bool:
    """The TMA constexpr of a kernel that streams these tensors' rows (``K.TMA_MODE``): on a GPU
    of compute capability 9.0 or later under "auto", anywhere under "on", when each tensor's
    alignment allows (the pointer path otherwise)."""
    mode = K.TMA_MODE
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"RELATTN_TRITON_TMA must be auto, on or off; got {mode!r}")
    if mode == "off" or not all(_tma_rows(t) for t in tensors):
        return False
    if mode == "on":
        return True
    x = tensors[0]
    return (
        not K.INTERPRET
        and x.device.type == "cuda"
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _descriptor_scratch() -> None:
    """Kernels that build tensor descriptors on the device ask Triton for a global scratch
    buffer at each launch, from the allocator ``triton.set_allocator`` set (per thread: the
    autograd engine's threads start without one). Sets one that allocates with torch unless
    one is set."""
    import triton

    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another triton layout: set ours each time
        pass
    triton.set_allocator(_scratch)


class _Launch:
    """Arguments shared by every kernel of one call."""

    def __init__(
        self,
        K: ModuleType,
        q,
        k,
        v,
        table,
        slopes,
        problem: Problem,
        token: TokenTerms | None = None,
    ):
        self.q, self.k, self.v = _unit_stride("q", q), _unit_stride("k", k), _unit_stride("v", v)
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.lo, self.scale = problem.lo, problem.scale
        self.q_offset, self.window = problem.q_offset, problem.window
        dev = q.device
        self.dummy_f = dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
        self.dummy_i = dummy_i = torch.zeros(2, dtype=torch.int32, device=dev)
        self.table = table.contiguous() if table is not None else dummy_f
        self.slopes = slopes.contiguous() if slopes is not None else dummy_f
        self.t = table.shape[1] if table is not None else 1
        if problem.doc_ids is not None:
            self.doc_start, self.doc_end = _doc_ranges(problem.doc_ids)
        else:
            self.doc_start = self.doc_end = dummy_i
        kpm = problem.key_padding_mask
        if kpm is not None:
            self.kpm = kpm.contiguous().view(torch.uint8)
            self.kv_bounds = _key_bounds(kpm)
        else:
            self.kpm, self.kv_bounds = dummy_i, dummy_i
        tf32 = q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        self.flags = dict(
            HEAD_DIM=self.d,
            BLOCK_D=max(16, _pow2_at_least(self.d)),
            CAUSAL=problem.causal,
            WINDOW=problem.window > 0,
            HAS_DOC=problem.doc_ids is not None,
            HAS_KPM=kpm is not None,
            UPCAST=K.INTERPRET and q.dtype == torch.bfloat16,
            PRECISION="tf32" if tf32 else "ieee",
        )
        self.encoding = {"HAS_TABLE": table is not None, "HAS_SLOPES": slopes is not None}
        token = token or TokenTerms(None, None, None, None)
        self.token = token
        r, weight = token.r, token.weight
        self.has_band, self.has_gate = r is not None, token.fq is not None
        self.rank = r.shape[-1] if r is not None else 1
        self.r_pad = max(16, _pow2_at_least(self.rank)) if r is not None else 16
        self.extent = weight.shape[-1] if weight is not None else 1
        self.hw = weight.shape[0] if weight is not None else 1
        f32 = lambda t: t.to(torch.float32).contiguous() if t is not None else dummy_f
        self.band_col0 = _band_col0(K, self.q_offset)
        if weight is not None:
            self.pw = _band_weight(K, weight, self.r_pad, self.band_col0)
        else:
            self.pw = dummy_f
        # Heads sharing one weight read it at stride 0.
        stride_ph = self.pw.stride(0) if self.has_band and self.hw > 1 else 0
        stride_pr = self.pw.stride(1) if self.has_band else 0
        self.seq_bucket = _pow2_at_least(max(self.nq, self.nk))  # part of the autotune key
        # The forward and dq stream k and v through tensor descriptors where TMA can take them
        # (dk/dv streams q and dO through pointers: see triton_kernels.attn_bwd_dkdv).
        self.tma_kv = _tma(K, self.k, self.v)
        # What every kernel of the call may read, by the kernels' parameter names; each launch
        # adds its own outputs (see _run, which hands a kernel the names it declares).
        self.args: dict = dict(
            Q=self.q, K=self.k, V=self.v, Table=self.table, Slopes=self.slopes,
            DocStart=self.doc_start, DocEnd=self.doc_end, Kpm=self.kpm, KvBounds=self.kv_bounds,
            **_strides("q", self.q), **_strides("k", self.k), **_strides("v", self.v),
            stride_t=self.table.stride(0), Hq=self.hq, group=self.hq // self.hkv, Nq=self.nq,
            Nk=self.nk, T=self.t, lo=self.lo, q_offset=self.q_offset, window=self.window,
            qk_scale=self.scale * _LOG2E, scale=self.scale, seq_bucket=self.seq_bucket,
            **self.encoding, **self.flags,
            Rq=f32(token.r), Pw=self.pw, Fq=f32(token.fq), Fk=f32(token.fk),
            stride_ph=stride_ph, stride_pr=stride_pr, band_col0=self.band_col0, rank=self.rank,
            extent=self.extent,
            HAS_BAND=self.has_band, HAS_GATE=self.has_gate, R_PAD=self.r_pad, TMA=self.tma_kv,
        )  # fmt: skip

    def table_ends(self, K: ModuleType) -> Tensor:
        """(Hq, 2) int32: per head, the table's constant head and tail (``table_ends``); the
        forward kernel adds one value to a tile inside either."""
        if not self.encoding["HAS_TABLE"]:
            return self.dummy_i
        ends = torch.empty((self.hq, 2), dtype=torch.int32, device=self.q.device)
        args = {"TableEnds": ends, "BLOCK": K.TABLE_ENDS_BLOCK, **self.args}
        _run(K.table_ends, (self.hq,), args)
        return ends


def _strides(name: str, t: Tensor) -> dict[str, int]:
    """``stride_<name>b``, ``stride_<name>h``, ``stride_<name>n`` of ``t (B, H, N, D)``."""
    sb, sh, sn = t.stride()[:3]
    return {f"stride_{name}b": sb, f"stride_{name}h": sh, f"stride_{name}n": sn}


def _run(kernel, grid, args: dict) -> None:
    """Launch ``kernel`` on ``grid`` with its parameters taken from ``args`` by name (names it
    does not declare are left out; one it declares and ``args`` lacks is Triton's error, unless
    an autotune config gives it). The one way the backend passes arguments: adding a
    parameter to a kernel is one entry in :attr:`_Launch.args` or at its launch. Launch
    options (``num_warps``, ``num_stages``) in ``args`` pass too."""
    names = (*kernel.arg_names, *_LAUNCH_OPTIONS)
    if args.get("TMA") and "TMA" in kernel.arg_names:
        _descriptor_scratch()
    kernel[grid](**{name: args[name] for name in names if name in args})


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


# ----------------------------------------------------------------------------- the backend


class TritonBackend(Backend):
    """FlashAttention-2 style kernels that read the position table by offset (see
    ``triton_kernels``); the table gradient comes out of the dk/dv pass."""

    name = "triton"
    layout = Layout(q="rows", kv="rows")  # the kernels take strides of (B, H, N), D dense
    context_parallel = True
    devices = ("cuda",)  # where auto picks it (TRITON_INTERPRET=1 runs it on the CPU)
    dtypes = _DTYPES
    top_priority = 20.0
    token_terms = True
    tied_runs = True  # a tied tail's gradient comes from the other columns' (backward)

    def priority(self, q: Tensor, k: Tensor, problem: Problem) -> float | None:
        """20 for CUDA tensors when triton is installed; never picked automatically elsewhere
        (the CPU interpreter is for tests), nor for float32 without TF32: exact float32 dots run
        on CUDA cores in these kernels and spill registers (tools/gpu_compile.py), where the
        chunked backend's matmuls do better."""
        if q.device.type != "cuda" or not _installed():
            return None
        if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            return None
        return 20.0

    def unsupported(self, q: Tensor, k: Tensor, problem: Problem | None) -> str | None:
        """None if the kernels can run on these inputs, else the reason.

        Args:
            q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; problem: unused (every mask runs).
        """
        if not _installed():
            return "triton is not installed (pip install 'relattn[triton]')"
        if _interpreting() and not _library_interpreted():
            return (
                "TRITON_INTERPRET=1 was set after triton was imported; triton reads it at import, "
                "so set it before importing triton"
            )
        if q.device.type != "cuda" and not _interpreting():
            return (
                f"q is on {q.device.type}; Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 to run them in Triton's CPU interpreter)"
            )
        if _kernel_mode_changed():
            return (
                "TRITON_INTERPRET changed after the triton kernels were first used; set it once, "
                "before the first call"
            )
        if q.dtype not in _DTYPES:
            return (
                f"q has dtype {q.dtype}; the triton backend supports float16, bfloat16 and float32"
            )
        if q.shape[-1] > _MAX_HEAD_DIM:
            return f"head dim D={q.shape[-1]} is larger than the triton backend's {_MAX_HEAD_DIM}"
        return None

    def forward(self, call: Call) -> tuple[Tensor, Tensor]:
        """``(out (B, Hq, Nq, D) in q's dtype, lse (B, Hq, Nq) float32)``.

        ``call``: q ``(B, Hq, Nq, D)``; k, v ``(B, Hkv, Nk, D)``; table ``(Hq, T)`` float32,
        column t is offset ``problem.lo + t``, or None; slopes ``(Hq,)`` fixed ALiBi slopes
        (``-slope·|Δ|`` in closed form), or None; never both.
        """
        q, k, v, table, slopes, problem = call[:6]
        K = _kernels()
        a = _Launch(K, q, k, v, table, slopes, problem, call.token)
        splits = _decode_splits(K, a)
        if splits > 1:
            return _forward_splitkv(K, a, splits)
        out = torch.empty((a.b, a.hq, a.nq, a.d), dtype=q.dtype, device=q.device)
        lse = torch.empty((a.b, a.hq, a.nq), dtype=torch.float32, device=q.device)
        grid = lambda meta: (_cdiv(a.nq, meta["BLOCK_M"]), a.hq, a.b)
        args = {"Out": out, "Lse": lse, "TableEnds": a.table_ends(K), **_strides("o", out)}
        _run(K.attn_fwd, grid, {**a.args, **args})
        return out, lse

    def backward(
        self, call: Call, grad_out: Tensor, out: Tensor, lse: Tensor
    ) -> tuple[Tensor | None, ...]:
        """``(dq, dk, dv, dtable)`` shaped like q, k, v and table (dtable None without one);
        with ``call.token`` followed by ``(dr, dweight, dfq, dfk)`` shaped like its tensors
        (None for an absent pair), each gradient in its tensor's dtype.

        With ``call.tied`` (a table whose columns from that offset on are one parameter per
        head: T5, a clipped OffsetBias) the table gradient never uses atomics: dk/dv adds no
        table gradient, the band kernel walks the block diagonals of the untied columns only,
        and the tied run's sum is minus theirs (each row's ∂L/∂score sums to zero); that
        column holds the sum, the run's later ones 0. Otherwise, under
        ``torch.use_deterministic_algorithms(True)`` no kernel uses atomics and the
        gradients are bit-identical across runs (the band's gradients never use them: dr per
        row from one program, dP from partials per group of rows and diagonal summed by the
        host).
        """
        q, k, v, table, slopes, problem = call[:6]
        K = _kernels()
        a = _Launch(K, q, k, v, table, slopes, problem, call.token)
        out, grad_out = _unit_stride("out", out), _unit_stride("grad_out", grad_out)
        lse = lse.contiguous()
        dev = q.device
        delta_out = torch.empty((a.b, a.hq, a.nq), dtype=torch.float32, device=dev)
        pre = K.PREPROCESS_BLOCK
        # Every backward kernel adds -lse·log2 e to its scores (p = exp2(s)): one float per row,
        # computed here once so that the kernels' p agree bit for bit; -inf where no key is seen.
        lse = lse.to(torch.float32)
        neg_lse2 = torch.where(lse == float("-inf"), float("-inf"), lse * -_LOG2E)
        grads = {"dOut": grad_out, "NegLse2": neg_lse2, "DeltaOut": delta_out,
                 **_strides("d", grad_out)}  # fmt: skip
        args = {**a.args, **grads, "Out": out, **_strides("o", out), "BLOCK_M": pre}
        _run(K.bwd_preprocess, (_cdiv(a.nq, pre), a.hq, a.b), args)

        deterministic = torch.are_deterministic_algorithms_enabled()
        # A tied tail (T5 past max_distance, a clipped OffsetBias: call.tied) needs only its
        # sum, which the other columns give (below): no table gradient in dk/dv then, and the
        # band kernel walks only the block diagonals that meet the untied columns.
        tied = call.tied if table is not None else None
        if tied is not None and not _few_bands(K, a, tied):
            tied = None  # bidirectional: most diagonals hold untied columns
        atomic = table is not None and not deterministic and tied is None
        # Without atomics DTable is a placeholder; it must not alias the table (autotuning
        # zeroes it).
        dtable = torch.zeros((a.hq, a.t) if atomic else (1,), dtype=torch.float32, device=dev)
        dq = torch.empty((a.b, a.hq, a.nq, a.d), dtype=q.dtype, device=dev)
        # dk/dv per query head; with GQA in float32, summed over each kv head's group below.
        per_head = k.dtype if a.hq == a.hkv else torch.float32
        dk = torch.empty((a.b, a.hq, a.nk, a.d), dtype=per_head, device=dev)
        dv = torch.empty((a.b, a.hq, a.nk, a.d), dtype=per_head, device=dev)
        # dq first: it sees whole rows and leaves, per row, the renormalization factor in inv
        # and D = Σ_j P·dP in delta, both in float32 from the recomputed weights.
        inv, delta = torch.empty_like(delta_out), torch.empty_like(delta_out)
        grads.update(Delta=delta, Inv=inv)
        dummy = a.dummy_f
        dfq = torch.empty((a.b, a.hq, a.nq), dtype=torch.float32, device=dev)
        dfk = torch.empty((a.b, a.hq, a.nk), dtype=torch.float32, device=dev)
        if not a.has_gate:
            dfq = dfk = dummy
        grid_q = lambda meta: (_cdiv(a.nq, meta["BLOCK_M"]), a.hq, a.b)
        _run(K.attn_bwd_dq, grid_q, {**a.args, **grads, "dQ": dq, "dFq": dfq})
        grid_kv = lambda meta: (_cdiv(a.nk, meta["BLOCK_N"]), a.hq, a.b)
        # dk/dv splits its query blocks at the table's constant runs, as the forward does.
        outputs = {"dK": dk, "dV": dv, "DTable": dtable, "ATOMIC_TABLE": atomic, "dFk": dfk,
                   "TableEnds": a.table_ends(K)}  # fmt: skip
        _run(K.attn_bwd_dkdv, grid_kv, {**a.args, **grads, **outputs})
        if a.hq != a.hkv:
            group = (a.b, a.hkv, a.hq // a.hkv, a.nk, a.d)
            dk = dk.view(group).sum(2).to(k.dtype)
            dv = dv.view(group).sum(2).to(v.dtype)
        dtable_out = None
        if table is not None:
            if tied is not None:
                dtable = _table_grad_tied(K, a, grads, tied)
            elif deterministic:
                dtable = _table_grad_bands(K, a, grads)
            dtable_out = dtable.to(table.dtype)
        if call.token is None:
            return dq, dk, dv, dtable_out
        t = call.token
        band: tuple[Tensor | None, Tensor | None] = (None, None)
        gate: tuple[Tensor | None, Tensor | None] = (None, None)
        if a.has_band:
            assert t.r is not None and t.weight is not None
            dr, dweight = _band_grads(K, a, grads)
            band = (dr.to(t.r.dtype), dweight.to(t.weight.dtype))
        if a.has_gate:
            assert t.fq is not None and t.fk is not None
            gate = (dfq.to(t.fq.dtype), dfk.to(t.fk.dtype))
        return dq, dk, dv, dtable_out, *band, *gate


def _decode_splits(K: ModuleType, a: _Launch) -> int:
    """How many key splits the split-KV kernel should use (1: the ordinary forward): enough
    programs for two waves of the GPU's SMs when a few query rows face many key blocks."""
    block_n = K.splitkv_config(a.d, a.q.element_size())["BLOCK_N"]
    blocks = _cdiv(a.nk, block_n)
    if a.nq > K.SPLITKV_MAX_ROWS or blocks < K.SPLITKV_MIN_BLOCKS:
        return 1
    if a.q.device.type == "cuda":
        programs = 2 * torch.cuda.get_device_properties(a.q.device).multi_processor_count
    else:  # the interpreter: three splits a row block, so the tests cross split boundaries
        programs = 3 * a.b * a.hq
    per_split = _cdiv(blocks, max(1, min(blocks, _cdiv(programs, a.b * a.hq))))
    return _cdiv(blocks, per_split)


def _forward_splitkv(K: ModuleType, a: _Launch, splits: int) -> tuple[Tensor, Tensor]:
    """Decoding: each split's softmax over its keys, merged by their log-sum-exp."""
    config = K.splitkv_config(a.d, a.q.element_size())
    per_split = _cdiv(_cdiv(a.nk, config["BLOCK_N"]), splits)
    dev = a.q.device
    part_out = torch.empty((a.b, a.hq, splits, a.nq, a.d), dtype=torch.float32, device=dev)
    part_lse = torch.empty((a.b, a.hq, splits, a.nq), dtype=torch.float32, device=dev)
    args = {"PartialOut": part_out, "PartialLse": part_lse, "num_splits": splits}
    _run(K.attn_fwd_splitkv, (splits, a.hq, a.b), {**a.args, **args, **config,
                                                   "split_blocks": per_split})  # fmt: skip
    lse = torch.logsumexp(part_lse, 2)  # -inf for rows with no visible key
    weight = torch.exp(part_lse - lse.unsqueeze(2)).nan_to_num(0.0)
    out = (weight.unsqueeze(-1) * part_out).sum(2)
    return out.to(a.q.dtype), lse


def _band_groups(K: ModuleType, a: _Launch, num_q_blocks: int) -> tuple[int, int]:
    """(groups, query blocks per group) of the band's gradient kernel: about
    ``K.BAND_GRAD_PROGRAMS`` programs in all (each group's partial dP is R_PAD × 2·BLOCK per
    diagonal: ~4 KiB · diagonals per program); the interpreter takes two blocks a group, so
    the tests cross group boundaries."""
    if K.INTERPRET:
        per = 2
    else:
        per = _cdiv(num_q_blocks, max(1, _cdiv(K.BAND_GRAD_PROGRAMS, a.b * a.hq)))
    return _cdiv(num_q_blocks, per), per


def _band_grads(K: ModuleType, a: _Launch, grads: dict) -> tuple[Tensor, Tensor]:
    """dr ``(B, Hq, Nq, R)`` and dP ``(Hw, R, W)``, float32, without atomics, from the band's
    tiles only: per (group of query blocks, head, batch) the kernel writes its rows' dr and,
    per block diagonal that meets 0 <= Δ < W, the group's ``rᵀ·X`` (R_PAD × 2·BLOCK, from the
    padded column ``base_0 + i·BLOCK`` for the i-th diagonal); then, in a fixed order, the sum
    over groups, batches, the diagonals' overlapping columns and the heads that share a
    weight."""
    config = K.band_config(a.d, a.q.element_size())
    block = config["BLOCK"]
    col0, extent, r_pad = a.band_col0, a.extent, a.r_pad
    # Diagonal d holds Δ in [q_offset + d·block - (block - 1), q_offset + d·block + block - 1].
    n_q, n_k = _cdiv(a.nq, block), _cdiv(a.nk, block)
    d_lo = max(-(n_k - 1), -((a.q_offset + block - 1) // block))  # ceil((-q_offset-block+1)/b)
    d_hi = min(n_q - 1, (extent - 2 + block - a.q_offset) // block)
    dev = a.q.device
    if d_hi < d_lo:
        return (torch.zeros((a.b, a.hq, a.nq, a.rank), dtype=torch.float32, device=dev),
                torch.zeros((a.hw, a.rank, extent), dtype=torch.float32, device=dev))  # fmt: skip
    num = d_hi - d_lo + 1
    vec = 2 * block
    groups, per = _band_groups(K, a, n_q)
    partial = torch.zeros((a.b, a.hq, groups, num, r_pad, vec), dtype=torch.float32, device=dev)
    dr = torch.empty((a.b, a.hq, a.nq, a.rank), dtype=torch.float32, device=dev)
    args = {"PartialP": partial, "dR": dr, "num_bands": num, "band_min": d_lo,
            "num_groups": groups, "group_blocks": per, **config}  # fmt: skip
    _run(K.attn_bwd_band_dp, (groups, a.hq, a.b), {**a.args, **grads, **args})
    part = partial.sum((0, 2)).view(a.hq, num, r_pad, 2, block)
    cols = part.new_zeros((a.hq, r_pad, num + 1, block))
    for j in range(2):  # diagonal i's j-th half covers chunk i + j
        cols[:, :, j : j + num] += part[:, :, :, j].transpose(1, 2)
    cols = cols.flatten(2)  # column x: padded column base_0 + x
    base0 = a.q_offset + d_lo * block - (block - 1) + col0
    start = col0 - base0  # offset 0's column in cols
    grad = cols.new_zeros((a.hq, a.rank, extent))
    x0, x1 = max(start, 0), min(start + extent, cols.shape[-1])
    if x1 > x0:
        grad[:, :, x0 - start : x1 - start] = cols[:, : a.rank, x0:x1]
    if a.hw == 1:
        return dr, grad.sum(0, keepdim=True)
    return dr, grad


def _band_range(K: ModuleType, a: _Launch, last: int | None = None) -> tuple[int, int, int]:
    """``(band_min, num_bands, all_bands)``: the block diagonals of the band kernels' tiles that
    meet the table (offsets lo .. lo + T - 1), up to ``last``; all of the call's diagonals.
    Block diagonal d holds the offsets ``q_offset + d·BLOCK - (BLOCK - 1) .. + (BLOCK - 1)``."""
    block = K.band_config(a.d, a.q.element_size())["BLOCK"]
    n_q, n_k = _cdiv(a.nq, block), _cdiv(a.nk, block)
    band_min = max(-(n_k - 1), -((a.q_offset + block - 1 - a.lo) // block))
    band_max = min(n_q - 1, (a.lo + a.t - 1 - a.q_offset + block - 1) // block)
    if last is not None:
        band_max = min(band_max, last)
    return band_min, max(1, band_max - band_min + 1), n_q + n_k - 1


def _last_untied_band(K: ModuleType, a: _Launch, tied: int) -> int:
    """The last block diagonal whose smallest offset lies before ``tied``."""
    block = K.band_config(a.d, a.q.element_size())["BLOCK"]
    return (tied - 1 - a.q_offset + block - 1) // block  # floor division: exact for < 0


def _few_bands(K: ModuleType, a: _Launch, tied: int) -> bool:
    """Whether the tied path walks few block diagonals (at most 8, or an eighth of the call's):
    a causal call's untied columns sit near the diagonal (5 of 511 at N = 8192 for
    T5Bias(16)); a bidirectional one's negative offsets cover half the diagonals, where the
    per-tile atomics of dk/dv cost less than walking them again."""
    _, walked, total = _band_range(K, a, _last_untied_band(K, a, tied))
    return walked <= max(8, total // 8)


def _table_grad_tied(K: ModuleType, a: _Launch, grads: dict, tied: int) -> Tensor:
    """The table gradient when the columns of offsets ``tied .. hi`` are one parameter per head:
    every column before ``tied`` exactly (the band kernel over the block diagonals that meet
    them only), and their sum into column ``tied``, zeros after it. Each row's ∂L/∂score sums
    to zero (p sums to 1 with inv, and D_i is the exact Σ_j p·dP), so over the batch and rows
    the tied columns' sum is minus the others': no tile in the tied tail is walked. Without
    atomics, so deterministic."""
    col = tied - a.lo  # the tied run's first column
    if col == 0:  # every visible offset tied: a constant added to every score, no gradient
        return torch.zeros((a.hq, a.t), dtype=torch.float32, device=a.q.device)
    dtable = _table_grad_bands(K, a, grads, _last_untied_band(K, a, tied))
    dtable[:, col] = -dtable[:, :col].sum(1)
    dtable[:, col + 1 :] = 0.0
    return dtable


def _table_grad_bands(K: ModuleType, a: _Launch, grads: dict, last: int | None = None) -> Tensor:
    """The table gradient without atomics: per block diagonal, the elementwise sum of its tiles'
    ∂L/∂score (every tile pair (r, c) there has offset ``q_offset + d·BLOCK + r - c``), then
    that sum's diagonals and the overlapping neighbours added in a fixed order. ``last``: the
    last block diagonal to walk (the columns only it and later ones meet are left partial)."""
    config = K.band_config(a.d, a.q.element_size())
    block = config["BLOCK"]
    # only the block diagonals that meet the table's lo .. lo + T - 1 (every visible offset)
    band_min, num_bands, _ = _band_range(K, a, last)
    shape = (a.b, a.hq, num_bands, block, block)
    partial = torch.empty(shape, dtype=torch.float32, device=a.q.device)
    args = {"Partial": partial, "num_bands": num_bands, "band_min": band_min, **config}
    _run(K.attn_bwd_table_bands, (num_bands, a.hq, a.b), {**a.args, **grads, **args})
    partial = partial.sum(0)
    # Diagonal sums of each (r, c) tile: flip c, pad each row with `block` zeros and re-read the
    # rows one element shorter, so row r shifts by r and column t holds r - c = t - (block - 1).
    skew = torch.nn.functional.pad(partial.flip(-1), (0, block)).flatten(-2)
    skew = skew[..., : block * (2 * block - 1)].view(a.hq, num_bands, block, 2 * block - 1)
    diag = torch.nn.functional.pad(skew.sum(-2), (0, 1))  # (Hq, bands, 2·block)
    # Band i's t covers offset q_offset + (band_min + i)·block + t - (block - 1): its second half
    # and band i + 1's first half cover the same offsets.
    zero = diag.new_zeros((a.hq, block))
    flat = torch.cat([diag[..., :block].flatten(1), zero], 1)
    flat = flat + torch.cat([zero, diag[..., block:].flatten(1)], 1)
    start = a.lo - (a.q_offset + band_min * block - (block - 1))  # flat[:, x]: offset ... + x
    dtable = flat.new_zeros((a.hq, a.t))
    x0, x1 = max(start, 0), min(start + a.t, flat.shape[1])
    if x1 > x0:
        dtable[:, x0 - start : x1 - start] = flat[:, x0:x1]
    return dtable


BACKEND = TritonBackend()
