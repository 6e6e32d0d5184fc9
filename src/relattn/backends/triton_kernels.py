"""The Triton kernels of ``backend="triton"``: FlashAttention-2 tiles that read the table by offset.

Every kernel works in tiles of query rows r and key columns c with ``Δ = q_offset + r - c``;
scores are ``scale·q·k + T[h, Δ - lo]`` (or ``-slope·|Δ|`` for fixed ALiBi), kept in base-2 units
(``·log2 e``) so the softmax uses ``exp2``. The launch code lives in ``triton_backend``.

Loops over blocks run in three compile-time stages (``tl.static_range(3)``): masked blocks before
the band that every row sees, the unmasked blocks inside it, and masked blocks after it. For causal
attention that is "below the diagonal" (no masking work at all) and "on the diagonal"; a window
adds masked blocks on its far edge. ``doc_ids`` and ``key_padding_mask`` narrow the block range and
still mask every tile (they are per-element).

Triton decides between compiling and interpreting (``TRITON_INTERPRET``) when a ``@triton.jit``
decorator runs, so this module's mode is fixed when it is first imported; ``triton_backend``
imports it on first use and reports a mode change after that.
"""

from __future__ import annotations

import contextlib
import functools
import os

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Zero columns on each side of the band's padded weight (see _band_slice): at least the widest
# tile's BAND_VEC, so a tile that touches 0 <= Δ < W reads inside the padded rows unmasked.
BAND_PAD: tl.constexpr = tl.constexpr(256)

INTERPRET = bool(triton.knobs.runtime.interpret)
# Programs the band's gradient kernel (attn_bwd_band_dp) aims for: query blocks are grouped so
# that groups × batch × heads is about this many (each group keeps a partial dP per diagonal).
BAND_GRAD_PROGRAMS = 1024


# ----------------------------------------------------------------------------- configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (up to 64, and 128), the first
# being the one used when autotuning is off; autotuning picks among those the device's shared
# memory holds. The first ones compile without register spills in bf16 with a table, causal, for
# sm_80 and sm_90a (tools/gpu_compile.py, triton 3.6 and 3.9); larger backward tiles spill there.
# D = 128 was timed on an H100 (benchmarks/triton_configs.py, BENCHMARKS.md, 2026-11-27): the
# forward's larger tiles (128×64 with 8 warps: 414 TFLOP/s with closed-form ALiBi against 375 for
# 64×32) joined the list, and 128×128 with 8 warps since the forward streams k and v through
# tensor descriptors (222 registers, no spill on sm_90a: 9 instructions a score against 12 at
# 128×64; not yet timed); the backward's did not beat the first by more than 4 %. D <= 64 is
# not yet timed on a GPU. dq keeps 64-row tiles only: a 32-row tile cannot use wgmma (rule M4
# of tools/gpu_compile.py --gate).
CANDIDATES = {
    "attn_fwd": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
                 128: [(64, 32, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3),
                       (64, 64, 4, 3), (128, 128, 8, 2)]},
    "attn_bwd_dq": {64: [(64, 32, 4, 2)],
                    128: [(64, 32, 4, 2)]},
    "attn_bwd_dkdv": {64: [(32, 64, 4, 2)],
                      128: [(32, 32, 4, 2), (16, 64, 4, 2)]},
}
AUTOTUNED = set(CANDIDATES)
PREPROCESS_BLOCK = 16 if INTERPRET else 64
TABLE_ENDS_BLOCK = 16 if INTERPRET else 1024
# Decoding (at most this many query rows) takes the split-KV kernel when the keys span at least
# SPLITKV_MIN_BLOCKS of its key blocks; below that one query block already has enough work.
SPLITKV_MAX_ROWS = 16
SPLITKV_MIN_BLOCKS = 4
# Tensor descriptors (TMA: one bulk copy per tile instead of a cp.async per 16 bytes, no address
# arithmetic in the loops) for the tiles the key and query loops stream: "auto" uses them on
# Hopper and later when the tensors' alignment allows (never in the interpreter), "on" wherever
# the alignment allows (the interpreter included: how the tests run that path), "off" never.
TMA_MODE = os.environ.get("RELATTN_TRITON_TMA", "auto")
# Autotuning on (the default) or off (RELATTN_TRITON_AUTOTUNE=0: the first kept config, as the
# GPU check's test steps use so that each compile-time variant compiles one config).
AUTOTUNE = os.environ.get("RELATTN_TRITON_AUTOTUNE", "1") != "0"


def band_config(head_dim: int, elt: int) -> dict[str, int]:
    """Tile size and launch options of the (not autotuned) band kernel of the deterministic path:
    64 × 64 tiles for 16-bit inputs up to D = 64, else 32 × 32 (64 × 64 spilled registers)."""
    if INTERPRET:
        return {"BLOCK": 16, "num_warps": 1, "num_stages": 1}
    block = 64 if head_dim <= 64 and elt == 2 else 32
    return {"BLOCK": block, "num_warps": 4, "num_stages": 3 if elt == 2 else 2}


def splitkv_config(head_dim: int, elt: int) -> dict[str, int]:
    """Tile sizes and launch options of the split-KV decoding kernel (not autotuned): up to
    SPLITKV_MAX_ROWS query rows, 64 keys a block."""
    if INTERPRET:
        return {"BLOCK_M": SPLITKV_MAX_ROWS, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    return {"BLOCK_M": SPLITKV_MAX_ROWS, "BLOCK_N": 64, "num_warps": 4,
            "num_stages": 3 if elt == 2 else 2}


# Kernels the ahead-of-time compile check covers, with the constexprs and launch options of those
# that are not autotuned (a function of head dim and element size).
AOT_KERNELS = {
    "attn_fwd": {},
    "attn_fwd_splitkv": {"options": splitkv_config},
    "bwd_preprocess": {"options": lambda d, e: {"BLOCK_M": PREPROCESS_BLOCK}},
    "attn_bwd_dq": {},
    "attn_bwd_dkdv": {},
    "attn_bwd_table_bands": {"options": band_config},
    "attn_bwd_band_dp": {"options": band_config},
    "table_ends": {"options": lambda d, e: {"BLOCK": TABLE_ENDS_BLOCK}},
}


def config_constexprs(kernel: str, config: tuple[int, int, int, int]) -> dict[str, int]:
    return {"BLOCK_M": config[0], "BLOCK_N": config[1]}


def shared_memory_estimate(kernel: str, config, block_d: int, elt: int, has_table: bool,
                           has_band: bool = False) -> int:
    """Bytes of shared memory a config needs, from what Triton's pipeliner stages: each stage's
    streamed tiles (k, v; q, dO for dk/dv), the table's per-tile vector (float32, 2·max(BM, BN)
    a stage, and its gather), the band's per-tile product and its shear (a BLOCK_M × 2·BLOCK_N
    float32 tile), the resident tiles and layout conversions, plus 2 KiB. An upper bound,
    checked against every ahead-of-time compile."""
    m, n, _, stages = config
    table = (stages + 1) * 2 * max(m, n) * 4 if has_table else 0
    table += m * 2 * n * 4 if has_band else 0
    if kernel == "attn_fwd":  # + p converted for the p·v dot
        size = stages * 2 * n * block_d * elt + m * block_d * elt + m * n * elt
    elif kernel == "attn_bwd_dq":
        size = stages * 2 * n * block_d * elt + 2 * m * block_d * elt
    else:  # dk/dv: q and dO stream; k, v resident; p and dS transposed through shared memory
        size = stages * 2 * m * block_d * elt + 2 * n * block_d * elt + 2 * m * n * elt
    return size + table + 2048


def kept_configs(kernel: str, head_dim: int, elt: int, smem_limit: int | None,
                 has_table: bool = True, has_band: bool = False) -> list:
    """The candidates of an autotuned kernel that pruning keeps for this head dim, element size
    and per-block shared memory limit (all of them when the limit is None); [None] for a kernel
    that is not autotuned. Never empty: the smallest candidate stays if none fits."""
    if kernel not in CANDIDATES:
        return [None]
    block_d = max(16, triton.next_power_of_2(head_dim))
    candidates = CANDIDATES[kernel][64 if block_d <= 64 else 128]
    if smem_limit is None:
        return list(candidates)
    size = lambda c: shared_memory_estimate(kernel, c, block_d, elt, has_table, has_band)
    kept = [c for c in candidates if size(c) <= smem_limit]
    return kept or [min(candidates, key=size)]


@functools.cache
def device_shared_memory(device: int) -> int:
    """The per-block shared memory limit (opt-in maximum) of a CUDA device, in bytes."""
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    return int(props["max_shared_mem"])


_FORCED: dict[str, tuple[int, int, int, int]] = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: tuple[int, int, int, int]):
    """Run ``kernel`` with exactly this config inside the block (for tests of every config)."""
    tuner = globals()[kernel]
    _FORCED[kernel] = config
    tuner.cache.clear()
    try:
        yield
    finally:
        del _FORCED[kernel]
        tuner.cache.clear()


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        q = args["Q"]
        if kernel in _FORCED:
            wanted = [_FORCED[kernel]]
        else:
            limit = device_shared_memory(q.device.index)
            wanted = kept_configs(kernel, args["HEAD_DIM"], q.element_size(), limit,
                                  bool(args.get("HAS_TABLE", True)),
                                  bool(args.get("HAS_BAND", False)))
            if not AUTOTUNE:
                wanted = wanted[:1]
        by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                    for c in configs}
        # A forced config need not be a candidate (benchmarks/triton_configs.py sweeps others).
        return [by_shape.get(w) or _config(*w) for w in wanted]

    return prune


def _configs(kernel: str) -> list[triton.Config]:
    """Every candidate of ``kernel`` as a triton.Config (pruning picks per call); one tiny config
    on the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    shapes = dict.fromkeys(c for lists in CANDIDATES[kernel].values() for c in lists)
    return [_config(*shape) for shape in shapes]


def _config(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _autotune(kernel: str, **kwargs):
    # seq_bucket (the next power of two of the longer sequence) makes the sequence length part of
    # the key without retuning for every length.
    key = ["BLOCK_D", "CAUSAL", "WINDOW", "HAS_TABLE", "HAS_SLOPES", "HAS_DOC", "HAS_KPM",
           "HAS_BAND", "HAS_GATE", "R_PAD", "seq_bucket"]
    if kernel != "attn_bwd_dkdv":
        key.insert(-1, "TMA")
    return triton.autotune(configs=_configs(kernel), key=key,
                           prune_configs_by={"early_config_prune": _prune(kernel)}, **kwargs)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bfloat16 bit patterns as integers; fp32 operands give the same
    # products (bf16 x bf16 is exact in fp32) with the same fp32 accumulation.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(base, offs, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK: tl.constexpr):
    """A (len(offs), BLOCK_D) tile of rows ``offs``; rows >= n_rows read 0 when CHECK."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    mask = offs_d[None, :] < HEAD_DIM
    if CHECK:
        mask = mask & (offs[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, offs, stride, n_rows, offs_d, x, HEAD_DIM: tl.constexpr):
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(offs[:, None] < n_rows) & (offs_d < HEAD_DIM))


@triton.jit
def _row_source(base, n_rows, stride, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What a key or query loop reads its (BLOCK_ROWS × BLOCK_D) tiles of ``base``'s rows
    from: with TMA a tensor descriptor over the (n_rows × HEAD_DIM) matrix (one bulk copy per
    tile, rows and columns outside it read 0), else ``base`` (:func:`_load_rows`)."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _load_tile(src, start, offs, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr,
               CHECK: tl.constexpr, TMA: tl.constexpr):
    """Rows ``offs`` (``start + arange``) of a :func:`_row_source`; rows >= n_rows read 0 when
    CHECK (always, with TMA)."""
    if TMA:
        x = src.load([start, 0])
    else:
        x = _load_rows(src, offs, stride, n_rows, offs_d, HEAD_DIM, CHECK)
    return x


@triton.jit
def _load_row_term(NegLse2_row, offs_m, Nq, CHECK: tl.constexpr):
    """The backward kernels' per-row term of the scores, (len(offs_m), 1): -lse·log2 e (the
    host's, so every kernel adds the same float), -inf for rows past Nq and rows that see no
    key, so their p = exp2(s) is 0."""
    if CHECK:
        t = tl.load(NegLse2_row + offs_m, mask=offs_m < Nq, other=float("-inf"))
    else:
        t = tl.load(NegLse2_row + offs_m)
    return t[:, None]


@triton.jit
def _load_row_stat(Row, offs_m, Nq, CHECK: tl.constexpr):
    """A float32 per-row statistic (D_i, the renormalization factor); 0 past Nq."""
    if CHECK:
        return tl.load(Row + offs_m, mask=offs_m < Nq, other=0.0)
    return tl.load(Row + offs_m)


@triton.jit
def _doc_range(DocStart_row, DocEnd_row, q_offset, offs_m, Nq, HAS_DOC: tl.constexpr):
    """First and last key position of each query row's document (documents are contiguous runs);
    placeholders without documents."""
    doc_lo = offs_m
    doc_hi = offs_m
    if HAS_DOC:
        doc_lo = tl.load(DocStart_row + q_offset + offs_m, mask=offs_m < Nq, other=0)
        doc_hi = tl.load(DocEnd_row + q_offset + offs_m, mask=offs_m < Nq, other=-1)
    return doc_lo, doc_hi


@triton.jit
def _key_padding(Kpm_row, offs_n, Nk, HAS_KPM: tl.constexpr):
    """key_padding_mask of keys ``offs_n`` (nonzero: real key); a placeholder without one."""
    kp = offs_n
    if HAS_KPM:
        kp = tl.load(Kpm_row + offs_n, mask=offs_n < Nk, other=0)
    return kp


@triton.jit
def _uniform_value(table_row, T, HAS_TABLE: tl.constexpr, UNIFORM: tl.constexpr):
    """The one table value (base 2) of a stage whose tiles lie in the table's constant tail
    (UNIFORM 1) or head (2), loaded once before the stage's loop; 0.0 otherwise."""
    c = 0.0
    if HAS_TABLE and UNIFORM == 1:
        c = tl.load(table_row + T - 1).to(tl.float32) * LOG2E
    elif HAS_TABLE and UNIFORM == 2:
        c = tl.load(table_row).to(tl.float32) * LOG2E
    return c


@triton.jit
def _score(qk, offs_m, offs_n, row_first, col_first, table_row, slope, q_offset, lo, T, qk_scale,
           uniform, row_term, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
           UNIFORM: tl.constexpr, ROW_TERM: tl.constexpr):
    """Scores in base-2 units of a (query rows × keys) tile, rows ``offs_m = row_first +
    arange``, keys ``offs_n = col_first + arange``, and the offsets Δ. UNIFORM (1: tail, 2:
    head) says every pair's table column lies in the table's constant tail or head
    (:func:`table_ends`): the tile adds ``uniform`` (:func:`_uniform_value`, loaded once a
    stage) instead of a gathered vector; 0: no such promise. With ROW_TERM the (BM, 1)
    ``row_term`` is added after: the backward kernels' -lse·log2 e, so p = exp2(s). It is not
    folded into the scale's FFMA: each score must round as the forward's and the other
    backward kernels' do, or their p differ by a rounding of |s| (1e-3 at scores of 1e4)."""
    delta = q_offset + offs_m[:, None] - offs_n[None, :]
    # Scale and position term as one FFMA per score (log2 e is in qk_scale and the term).
    if HAS_TABLE and UNIFORM != 0:
        s = tl.fma(qk, qk_scale, uniform)
    elif HAS_TABLE or HAS_SLOPES:
        # The term at the tile's BM + BN - 1 offsets from d0 on as one vector (one table load,
        # or BM + BN - 1 closed-form values, per tile, not per score), expanded to the tile by
        # a 1-D gather on the flattened offset: the same value per score as computing it there.
        # d0 from the tile's first row and key (scalars), not a reduction over the tile. (An
        # index written as the loop-invariant m - n + BN - 1 made ptxas serialize dq's wgmma.)
        BM: tl.constexpr = qk.shape[0]
        BN: tl.constexpr = qk.shape[1]
        VEC: tl.constexpr = 2 * BM if BM >= BN else 2 * BN  # a power of 2 >= BM + BN - 1
        d0 = q_offset + row_first - col_first - (BN - 1)
        d = d0 + tl.arange(0, VEC)
        if HAS_TABLE:
            # Masked pairs may fall off the table: clamp, they are discarded by the mask.
            col = tl.minimum(tl.maximum(d - lo, 0), T - 1)
            vec = tl.load(table_row + col).to(tl.float32) * LOG2E
        else:
            vec = -(slope * tl.abs(d).to(tl.float32))
        term = tl.reshape(tl.gather(vec, tl.reshape(delta - d0, (BM * BN,)), 0), (BM, BN))
        s = tl.fma(qk, qk_scale, term)
    else:
        s = qk * qk_scale
    if ROW_TERM:
        s += row_term
    return s, delta


@triton.jit
def _hide(s, delta, offs_m, offs_n, kp, doc_lo, doc_hi, Nq, Nk, window,
          MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
          HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr):
    """Scores of a (queries × keys) tile with the pairs hidden by the masks (see relattn.masks)
    set to -inf. ``doc_lo/doc_hi`` run along the queries (:func:`_doc_range`), ``kp`` along the
    keys (:func:`_key_padding`); MASKED adds the causal and window masks and the ragged edges."""
    vis = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if MASKED:
        if CAUSAL:
            vis = vis & (delta >= 0)
        if WINDOW:
            vis = vis & (delta < window)
            if not CAUSAL:
                vis = vis & (delta > -window)
    if HAS_DOC:
        vis = vis & (offs_n[None, :] >= doc_lo[:, None]) & (offs_n[None, :] <= doc_hi[:, None])
    if HAS_KPM:
        vis = vis & (kp[None, :] != 0)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _stages(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block indices of the three stages for indices ``lo..hi`` (some pair visible) of which
    ``full_lo..full_hi`` are visible to every pair: returns (begin, mid_begin, mid_end, end);
    blocks [begin, mid_begin) and [mid_end, end) need masking, [mid_begin, mid_end) do not."""
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(full_hi, hi)
    begin = lo // BLOCK  # lo >= 0
    end = tl.where(hi >= lo, hi // BLOCK + 1, begin)
    f_begin = (full_lo + BLOCK - 1) // BLOCK
    f_end = tl.maximum(full_hi + 1, 0) // BLOCK
    has_full = f_begin < f_end
    mid_begin = tl.where(has_full, f_begin, end)
    mid_end = tl.where(has_full, f_end, end)
    return begin, mid_begin, mid_end, end


@triton.jit
def _key_range(row_first, row_last, q_offset, Nk, window,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Keys seen by some row of ``row_first..row_last`` and keys seen by all of them."""
    p0 = q_offset + row_first
    p1 = q_offset + row_last
    lo = 0
    hi = Nk - 1
    full_lo = 0
    full_hi = Nk - 1
    if CAUSAL:
        hi = tl.minimum(hi, p1)
        full_hi = tl.minimum(full_hi, p0)
    if WINDOW:
        lo = tl.maximum(lo, p0 - window + 1)
        full_lo = tl.maximum(full_lo, p1 - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, p1 + window - 1)
            full_hi = tl.minimum(full_hi, p0 + window - 1)
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_range(col_first, col_last, q_offset, Nq, window,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows that see some key of ``col_first..col_last`` and rows that see all of them."""
    lo = 0
    hi = Nq - 1
    full_lo = 0
    full_hi = Nq - 1
    if CAUSAL:
        lo = tl.maximum(lo, col_first - q_offset)
        full_lo = tl.maximum(full_lo, col_last - q_offset)
    if WINDOW:
        hi = tl.minimum(hi, col_last + window - 1 - q_offset)
        full_hi = tl.minimum(full_hi, col_first + window - 1 - q_offset)
        if not CAUSAL:
            lo = tl.maximum(lo, col_first - window + 1 - q_offset)
            full_lo = tl.maximum(full_lo, col_last - window + 1 - q_offset)
    return lo, hi, full_lo, full_hi


@triton.jit
def _query_block(b, h, pid_m, offs_m, Slopes, DocStart, DocEnd, KvBounds, Nq, Nk, q_offset,
                 window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SLOPES: tl.constexpr,
                 HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """What a program over one block of query rows needs before its key loop: the ALiBi slope
    (log2 units), each row's document key range, and the key blocks of its three stages."""
    slope = 0.0
    if HAS_SLOPES:
        slope = tl.load(Slopes + h).to(tl.float32) * LOG2E
    doc_lo, doc_hi = _doc_range(DocStart + b * Nk, DocEnd + b * Nk, q_offset, offs_m, Nq, HAS_DOC)
    row_first = pid_m * BLOCK_M
    row_last = tl.minimum(row_first + BLOCK_M, Nq) - 1
    lo, hi, full_lo, full_hi = _key_range(row_first, row_last, q_offset, Nk, window, CAUSAL,
                                          WINDOW)
    # Narrow to the documents of the first and last row and to the real (unpadded) keys.
    if HAS_DOC:
        lo = tl.maximum(lo, tl.load(DocStart + b * Nk + q_offset + row_first))
        hi = tl.minimum(hi, tl.load(DocEnd + b * Nk + q_offset + row_last))
    if HAS_KPM:
        lo = tl.maximum(lo, tl.load(KvBounds + 2 * b))
        hi = tl.minimum(hi, tl.load(KvBounds + 2 * b + 1))
    begin, mid_begin, mid_end, end = _stages(lo, hi, full_lo, full_hi, BLOCK_N)
    return slope, doc_lo, doc_hi, begin, mid_begin, mid_end, end


@triton.jit
def _uniform_blocks(TableEnds, h, row_first, q_offset, lo, mid_begin, mid_end,
                    HAS_TABLE: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Split the unmasked key blocks [mid_begin, mid_end) of the query rows from ``row_first``
    at (tail_end, head_begin): blocks before tail_end see only the table's constant tail
    (every column Δ - lo >= ends_hi), blocks from head_begin only its constant head (<=
    ends_lo), as :func:`table_ends` found them for head ``h``. Keys further left have larger
    offsets. Without a table: (mid_begin, mid_end), every block plain; without HEAD (the
    caller runs no head stage) head_begin is mid_end."""
    tail_end = mid_begin
    head_begin = mid_end
    if HAS_TABLE:
        ends_lo = tl.load(TableEnds + 2 * h)
        ends_hi = tl.load(TableEnds + 2 * h + 1)
        # key block j: smallest column q_offset + row_first - (j·BLOCK_N + BLOCK_N - 1) - lo,
        # largest q_offset + row_first + BLOCK_M - 1 - j·BLOCK_N - lo
        x = q_offset + row_first - lo - ends_hi + 1
        y = q_offset + row_first + BLOCK_M - 1 - lo - ends_lo
        tail = tl.maximum(x, 0) // BLOCK_N  # j < tail: smallest column >= ends_hi
        head = (tl.maximum(y, 0) + BLOCK_N - 1) // BLOCK_N  # j >= head: largest <= ends_lo
        tail_end = tl.minimum(tl.maximum(tail, mid_begin), mid_end)
        if HEAD:
            head_begin = tl.minimum(tl.maximum(head, tail_end), mid_end)
    return tail_end, head_begin


@triton.jit
def _uniform_rows(TableEnds, h, col_first, q_offset, lo, mid_begin, mid_end,
                  HAS_TABLE: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The dk/dv kernel's counterpart of :func:`_uniform_blocks`: split the unmasked query
    blocks [mid_begin, mid_end) of the keys from ``col_first`` at (head_end, tail_begin):
    blocks before head_end see only the table's constant head, blocks from tail_begin only its
    constant tail (rows further down have larger offsets). Without a table (or without HEAD,
    for the head) the runs are empty."""
    head_end = mid_begin
    tail_begin = mid_end
    if HAS_TABLE:
        ends_lo = tl.load(TableEnds + 2 * h)
        ends_hi = tl.load(TableEnds + 2 * h + 1)
        # query block i: smallest column q_offset + i·BLOCK_M - (col_first + BLOCK_N - 1) - lo,
        # largest q_offset + i·BLOCK_M + BLOCK_M - 1 - col_first - lo
        x = ends_hi + lo + col_first + BLOCK_N - 1 - q_offset  # i·BLOCK_M >= x: tail
        y = ends_lo + lo + col_first - (BLOCK_M - 1) - q_offset  # i·BLOCK_M <= y: head
        tail = (tl.maximum(x, 0) + BLOCK_M - 1) // BLOCK_M
        tail_begin = tl.minimum(tl.maximum(tail, mid_begin), mid_end)
        if HEAD:
            head = tl.where(y >= 0, y // BLOCK_M + 1, 0)
            head_end = tl.minimum(tl.maximum(head, mid_begin), tail_begin)
    return head_end, tail_begin


@triton.jit
def _key_stage(begin, mid_begin, tail_end, head_begin, mid_end, end, STAGE: tl.constexpr):
    """The key blocks of one of five stages: 0 and 4 masked, 1 the unmasked blocks in the
    table's constant tail, 2 the other unmasked blocks, 3 those in its constant head."""
    first = begin
    last = mid_begin
    if STAGE == 1:
        first = mid_begin
        last = tail_end
    if STAGE == 2:
        first = tail_end
        last = head_begin
    if STAGE == 3:
        first = head_begin
        last = mid_end
    if STAGE == 4:
        first = mid_end
        last = end
    return first, last


@triton.jit
def table_ends(Table, TableEnds, T, stride_t, BLOCK: tl.constexpr):
    """One program per head: TableEnds[h] = (ends_lo, ends_hi), the last column up to which the
    row equals its first column and the first column from which it equals its last (exact
    comparison; a NaN breaks a run). The attention kernels add one value to a tile whose
    columns all lie in such a run instead of loading one per score."""
    h = tl.program_id(0)
    row = Table + h * stride_t
    first = tl.load(row)
    last = tl.load(row + T - 1)
    head_end = T  # first column that differs from the first
    tail_start = 0  # one past the last column that differs from the last
    for c0 in range(0, T, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        inside = cols < T
        x = tl.load(row + cols, mask=inside, other=0.0)
        head_end = tl.minimum(head_end, tl.min(tl.where(inside & (x != first), cols, T)))
        tail_start = tl.maximum(tail_start, tl.max(tl.where(inside & (x != last), cols + 1, 0)))
    tl.store(TableEnds + 2 * h, head_end - 1)
    tl.store(TableEnds + 2 * h + 1, tail_start)


# ----------------------------------------------------------------------------- token terms
#
# The query-conditioned band ``Σ_c r[i, c]·P[c, Δ]`` (0 <= Δ < W) and the forget gate
# ``±(fq_i - fk_j)`` (sign of Δ), both in base-2 units: r, fq and fk are scaled by log2 e where
# they are loaded. The band of a tile, per group of BG rows (half the tile's, at least 16; 16
# for dq's gradient): one dot, RP = r_g (BG × R_PAD) @ P[:, span_g] (R_PAD × VG, VG a power of 2
# >= the group's BG + BN - 1 offsets), and a shear term[m, n] = RP[m, m + BN - 1 - n], a 1-D
# gather on RP flattened (and the unshear of dS, its adjoint, one on dS flattened). A 1-D
# gather's source spans the warps, so Triton lowers it through shared memory (one store per
# source element, one load per output, the output in the score tile's layout); a gather along
# RP's rows would be warp-local: per output one shuffle per register of its row, and the score
# tile in the gather's layout (tools/gpu_compile.py's gate, BENCHMARKS.md). P arrives padded
# (launcher: ``_band_weight``): rows to R_PAD, at least BAND_PAD zero columns on each side,
# offset 0 at ``band_col0`` (so every span starts at a multiple of 4), row length a multiple of
# 16: a tile reads its spans as aligned vectors with no mask, and columns outside 0 <= Δ < W
# are zeros. Key blocks whose offsets all miss [0, W) skip the band (a uniform branch).


@triton.jit
def _load_latent(Rq_row, offs_m, Nq, rank, R_PAD: tl.constexpr):
    """r of rows ``offs_m`` (BM × R_PAD, zero past Nq and past the rank), in float32."""
    c = tl.arange(0, R_PAD)
    mask = (offs_m[:, None] < Nq) & (c[None, :] < rank)
    return tl.load(Rq_row + offs_m[:, None] * rank + c[None, :], mask=mask, other=0.0)


@triton.jit
def _load_gate(F_row, offs, n, CHECK: tl.constexpr):
    """F at positions ``offs`` in base-2 units (0 past n when CHECK)."""
    if CHECK:
        f = tl.load(F_row + offs, mask=offs < n, other=0.0)
    else:
        f = tl.load(F_row + offs)
    return f * LOG2E


@triton.jit
def _band_active(row_first, col_first, q_offset, extent, BM: tl.constexpr, BN: tl.constexpr):
    """Whether the tile of rows row_first.. and keys col_first.. has an offset in [0, W)."""
    dmax = q_offset + row_first + BM - 1 - col_first
    dmin = q_offset + row_first - (col_first + BN - 1)
    return (dmax >= 0) & (dmin < extent)


@triton.jit
def _band_slice(Pw_row, stride_pr, band_col0, row_first, col_first, q_offset,
                R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr):
    """P's columns for a (BM × BN) tile by groups of BG rows:
    (G, R_PAD, VG), VG a power of 2 >= BG + BN - 1, group g's from the padded column of its
    smallest offset ``dmin + g·BG``. The launcher puts offset 0 at ``band_col0`` so that this
    column is a multiple of 4 (blocks start at multiples of 16): aligned vectors."""
    G: tl.constexpr = BM // BG
    VG: tl.constexpr = 2 * BN if BG <= BN else 2 * BG  # >= BG + BN - 1
    col = q_offset + row_first - (col_first + BN - 1) + band_col0  # > 0 for an active tile
    base = (col // 4) * 4  # == col; says so to the compiler
    g = tl.arange(0, G)
    c = tl.arange(0, R_PAD)
    t = tl.arange(0, VG)
    return tl.load(Pw_row + base + g[:, None, None] * BG + c[None, :, None] * stride_pr
                   + t[None, None, :])


@triton.jit
def _band_term(r_tile, pslice, BN: tl.constexpr, PRECISION: tl.constexpr):
    """The band of a (BM × BN) tile from its rows' r (BM × R_PAD) and its P slice: per row
    group, RP = r_g @ P_g (BG × VG), then the shear term[m, n] = RP[m, m + BN - 1 - n]."""
    G: tl.constexpr = pslice.shape[0]
    R_PAD: tl.constexpr = pslice.shape[1]
    VG: tl.constexpr = pslice.shape[2]
    BM: tl.constexpr = r_tile.shape[0]
    BG: tl.constexpr = BM // G
    if G == 1:
        rp = tl.dot(r_tile, tl.reshape(pslice, (R_PAD, VG)), input_precision=PRECISION)
    else:
        rp = tl.dot(tl.reshape(r_tile, (G, BG, R_PAD)), pslice, input_precision=PRECISION)
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    idx = m[:, None] * VG + (m[:, None] % BG) - n[None, :] + (BN - 1)
    flat = tl.reshape(rp, (BM * VG,))
    return tl.reshape(tl.gather(flat, tl.reshape(idx, (BM * BN,)), 0), (BM, BN))


@triton.jit
def _band_unshear(ds, G: tl.constexpr, VG: tl.constexpr):
    """dS (BM × BN) laid out by offset per row group: X[g, m, t] = dS[g·BG + m, n] for the n
    with m + BN - 1 - n = t, 0 where there is none (G × BG × VG)."""
    BM: tl.constexpr = ds.shape[0]
    BN: tl.constexpr = ds.shape[1]
    BG: tl.constexpr = BM // G
    g = tl.arange(0, G)[:, None, None]
    m = tl.arange(0, BG)[None, :, None]
    t = tl.arange(0, VG)[None, None, :]
    n = m - t + (BN - 1)
    inside = (n >= 0) & (n < BN)
    idx = (g * BG + m) * BN + tl.minimum(tl.maximum(n, 0), BN - 1)
    x = tl.gather(tl.reshape(ds, (BM * BN,)), tl.reshape(idx, (G * BG * VG,)), 0)
    return tl.where(inside, tl.reshape(x, (G, BG, VG)), 0.0)


@triton.jit
def _row_token_terms(Rq, Fq, bh, offs_m, Nq, rank, HAS_BAND: tl.constexpr,
                     HAS_GATE: tl.constexpr, R_PAD: tl.constexpr):
    """A query block's r (BM × R_PAD) and fq (BM), base 2; placeholders for absent terms."""
    r_tile = 0.0
    fq = 0.0
    if HAS_BAND:
        r_tile = _load_latent(Rq + bh * Nq * rank, offs_m, Nq, rank, R_PAD) * LOG2E
    if HAS_GATE:
        fq = _load_gate(Fq + bh * Nq, offs_m, Nq, True)
    return r_tile, fq


@triton.jit
def _token_score(s, delta, row_first, col_first, r_tile, Pw_row, stride_pr, band_col0, fq, fk,
                 q_offset, extent, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr,
                 HAS_GATE: tl.constexpr,
                 R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Scores (base 2) plus the gate (rows' fq, keys' fk, both base 2) and, on tiles that
    touch 0 <= Δ < W, the band."""
    if HAS_GATE:
        g = fq[:, None] - fk[None, :]
        if not CAUSAL:
            g = tl.where(delta >= 0, g, -g)
        s += g
    if HAS_BAND:
        BM: tl.constexpr = s.shape[0]
        BN: tl.constexpr = s.shape[1]
        if _band_active(row_first, col_first, q_offset, extent, BM, BN):
            BG: tl.constexpr = BM // 2 if BM >= 32 else BM
            pslice = _band_slice(Pw_row, stride_pr, band_col0, row_first, col_first, q_offset,
                                 R_PAD, BM, BN, BG)
            s += _band_term(r_tile, pslice, BN, PRECISION)
    return s


# ----------------------------------------------------------------------------- forward


@triton.jit
def _row_tile_scores(q, k, offs_m, offs_n, table_row, slope, doc_lo, doc_hi, Kpm_row,
                     Nq, Nk, T, lo, q_offset, window, qk_scale, row_first, start_n, r_tile,
                     Pw_row, stride_pr, band_col0, fq, Fk_row, extent, uniform, row_term,
                     ROW_TERM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr,
                     HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr, HAS_DOC: tl.constexpr,
                     HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     UNIFORM: tl.constexpr, HAS_BAND: tl.constexpr, HAS_GATE: tl.constexpr,
                     R_PAD: tl.constexpr):
    """The scores (base 2) of a (query rows × keys) tile in the key loop of the forward and dq
    kernels, hidden pairs at -inf: the rows carry their document range (and r, fq for the
    token terms), the keys their padding."""
    qk = _dot(q, tl.trans(k), UPCAST, PRECISION)
    s, delta = _score(qk, offs_m, offs_n, row_first, start_n, table_row, slope, q_offset, lo,
                      T, qk_scale, uniform, row_term, HAS_TABLE, HAS_SLOPES, UNIFORM, ROW_TERM)
    if HAS_BAND or HAS_GATE:
        fk = 0.0
        if HAS_GATE:
            fk = _load_gate(Fk_row, offs_n, Nk, MASKED)
        s = _token_score(s, delta, row_first, start_n, r_tile, Pw_row, stride_pr, band_col0, fq, fk,
                         q_offset, extent, CAUSAL, HAS_BAND, HAS_GATE, R_PAD, PRECISION)
    if MASKED or HAS_DOC or HAS_KPM:
        kp = _key_padding(Kpm_row, offs_n, Nk, HAS_KPM)
        s = _hide(s, delta, offs_m, offs_n, kp, doc_lo, doc_hi, Nq, Nk, window,
                  MASKED, CAUSAL, WINDOW, HAS_DOC, HAS_KPM)
    return s


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, block_begin, block_end,
                offs_m, offs_d, table_row, slope, doc_lo, doc_hi, Kpm_row,
                Nq, Nk, T, lo, q_offset, window, qk_scale, row_first, r_tile, Pw_row, stride_pr,
                band_col0,
                fq, Fk_row, extent,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, UNIFORM: tl.constexpr,
                HAS_BAND: tl.constexpr, HAS_GATE: tl.constexpr, R_PAD: tl.constexpr,
                TMA: tl.constexpr):
    uniform = _uniform_value(table_row, T, HAS_TABLE, UNIFORM)
    for start_n in tl.range(block_begin * BLOCK_N, block_end * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, start_n, offs_n, stride_kn, Nk, offs_d, HEAD_DIM, MASKED, TMA)
        s = _row_tile_scores(q, k, offs_m, offs_n, table_row, slope, doc_lo, doc_hi, Kpm_row,
                             Nq, Nk, T, lo, q_offset, window, qk_scale, row_first, start_n,
                             r_tile, Pw_row, stride_pr, band_col0, fq, Fk_row, extent, uniform,
                             0.0, False, MASKED, CAUSAL,
                             WINDOW, HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, UPCAST, PRECISION,
                             UNIFORM, HAS_BAND, HAS_GATE, R_PAD)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 keeps p = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_base, start_n, offs_n, stride_vn, Nk, offs_d, HEAD_DIM, MASKED, TMA)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("attn_fwd")
@triton.jit
def attn_fwd(Q, K, V, Out, Lse, Table, TableEnds, Slopes, DocStart, DocEnd, Kpm, KvBounds,
             Rq, Pw, Fq, Fk,
             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_t,
             stride_ph, stride_pr, band_col0, Hq, group, Nq, Nk, T, lo, q_offset, window, rank,
             extent,
             qk_scale, seq_bucket,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
             HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
             PRECISION: tl.constexpr, HAS_BAND: tl.constexpr, HAS_GATE: tl.constexpr,
             R_PAD: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One program per (query block, head, batch): out (B, Hq, Nq, D) and lse (B, Hq, Nq).

    With HAS_BAND / HAS_GATE: r (Rq, (B, Hq, Nq, rank)), the padded weight (Pw, head h at
    ``h·stride_ph``, rows ``stride_pr`` apart, offset 0 at column ``band_col0``), fq (Fq,
    (B, Hq, Nq)) and fk (Fk, (B, Hq, Nk)), float32 contiguous."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * Hq + h
    hk = h // group  # GQA: kv head read in place, never repeated
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, True)
    K_base = _row_source(K + b * stride_kb + hk * stride_kh, Nk, stride_kn, HEAD_DIM, BLOCK_N,
                         BLOCK_D, TMA)
    V_base = _row_source(V + b * stride_vb + hk * stride_vh, Nk, stride_vn, HEAD_DIM, BLOCK_N,
                         BLOCK_D, TMA)
    slope, doc_lo, doc_hi, begin, mid_begin, mid_end, end = _query_block(
        b, h, pid_m, offs_m, Slopes, DocStart, DocEnd, KvBounds, Nq, Nk, q_offset, window,
        CAUSAL, WINDOW, HAS_SLOPES, HAS_DOC, HAS_KPM, BLOCK_M, BLOCK_N)

    # Causal attention has no constant head worth a stage (offsets start at 0): no stage 3.
    tail_end, head_begin = _uniform_blocks(TableEnds, h, pid_m * BLOCK_M, q_offset, lo,
                                           mid_begin, mid_end, HAS_TABLE, not CAUSAL, BLOCK_M,
                                           BLOCK_N)

    r_tile, fq = _row_token_terms(Rq, Fq, bh, offs_m, Nq, rank, HAS_BAND, HAS_GATE, R_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for stage in tl.static_range(5):
        if (HAS_TABLE or stage % 2 == 0) and not (CAUSAL and stage == 3):
            first, last = _key_stage(begin, mid_begin, tail_end, head_begin, mid_end, end, stage)
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, first, last, offs_m,
                offs_d, Table + h * stride_t, slope, doc_lo, doc_hi, Kpm + b * Nk, Nq, Nk, T, lo,
                q_offset, window, qk_scale, pid_m * BLOCK_M, r_tile, Pw + h * stride_ph,
                stride_pr, band_col0, fq, Fk + bh * Nk, extent, HEAD_DIM, stage == 0 or stage == 4,
                CAUSAL,
                WINDOW, HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, UPCAST, PRECISION, BLOCK_N,
                (stage == 1) + 2 * (stage == 3), HAS_BAND, HAS_GATE, R_PAD, TMA)

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    _store_rows(Out + b * stride_ob + h * stride_oh, offs_m, stride_on, Nq, offs_d, out, HEAD_DIM)
    tl.store(Lse + bh * Nq + offs_m, lse, mask=offs_m < Nq)


# ----------------------------------------------------------------------------- decoding


@triton.jit
def attn_fwd_splitkv(Q, K, V, PartialOut, PartialLse, Table, Slopes, DocStart, DocEnd, Kpm,
                     KvBounds, Rq, Pw, Fq, Fk, stride_qb, stride_qh, stride_qn, stride_kb,
                     stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_t, stride_ph,
                     stride_pr, band_col0, Hq, group, Nq, Nk, T, lo, q_offset, window, rank, extent,
                     qk_scale, num_splits, split_blocks,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                     HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, HAS_BAND: tl.constexpr, HAS_GATE: tl.constexpr,
                     R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-KV forward for a few query rows (Nq <= BLOCK_M) against many keys: one program per
    (key split, head, batch) runs the forward's key loop over ``split_blocks`` key blocks and
    writes that split's normalized output and log-sum-exp, PartialOut (B, Hq, splits, Nq, D)
    and PartialLse (B, Hq, splits, Nq) float32; the host merges the splits. One query block
    alone would leave all but B·Hq of the GPU's programs idle."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, True)
    slope, doc_lo, doc_hi, begin, mid_begin, mid_end, end = _query_block(
        b, h, 0, offs_m, Slopes, DocStart, DocEnd, KvBounds, Nq, Nk, q_offset, window,
        CAUSAL, WINDOW, HAS_SLOPES, HAS_DOC, HAS_KPM, BLOCK_M, BLOCK_N)
    first = tl.maximum(begin, split * split_blocks)
    last = tl.minimum(end, (split + 1) * split_blocks)
    r_tile, fq = _row_token_terms(Rq, Fq, b * Hq + h, offs_m, Nq, rank, HAS_BAND, HAS_GATE, R_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Every block masked: decoding reads few keys per row, and one loop keeps the code small.
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
        stride_kn, stride_vn, first, last, offs_m, offs_d, Table + h * stride_t, slope, doc_lo,
        doc_hi, Kpm + b * Nk, Nq, Nk, T, lo, q_offset, window, qk_scale, 0, r_tile,
        Pw + h * stride_ph, stride_pr, band_col0, fq, Fk + (b * Hq + h) * Nk, extent, HEAD_DIM,
        True, CAUSAL,
        WINDOW, HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, UPCAST, PRECISION, BLOCK_N, 0, HAS_BAND,
        HAS_GATE, R_PAD, False)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    row = (b * Hq + h) * num_splits + split
    _store_rows(PartialOut + row * Nq * HEAD_DIM, offs_m, HEAD_DIM, Nq, offs_d, out, HEAD_DIM)
    tl.store(PartialLse + row * Nq + offs_m, lse, mask=offs_m < Nq)


# ----------------------------------------------------------------------------- backward


@triton.jit
def bwd_preprocess(Out, dOut, DeltaOut, stride_ob, stride_oh, stride_on,
                   stride_db, stride_dh, stride_dn, Hq, Nq, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``DeltaOut = rowsum(dO · O)`` (B, Hq, Nq) in float32, from the stored output (dq only)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, stride_on, Nq, offs_d,
                   HEAD_DIM, True)
    do = _load_rows(dOut + b * stride_db + h * stride_dh, offs_m, stride_dn, Nq, offs_d,
                    HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DeltaOut + (b * Hq + h) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _dq_blocks(dq, l_i, pdp_i, gq_a, gq_b, q, do, row_term, di, K_base, V_base, stride_kn,
               stride_vn,
               block_begin, block_end, offs_m, offs_d, table_row, slope, doc_lo, doc_hi, Kpm_row,
               Nq, Nk, T, lo, q_offset, window, qk_scale, row_first, r_tile, Pw_row, stride_pr,
               band_col0,
               fq, Fk_row, extent,
               HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
               HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BAND: tl.constexpr,
               HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, TMA: tl.constexpr):
    for start_n in tl.range(block_begin * BLOCK_N, block_end * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, start_n, offs_n, stride_kn, Nk, offs_d, HEAD_DIM, MASKED, TMA)
        v = _load_tile(V_base, start_n, offs_n, stride_vn, Nk, offs_d, HEAD_DIM, MASKED, TMA)
        s = _row_tile_scores(q, k, offs_m, offs_n, table_row, slope, doc_lo, doc_hi, Kpm_row,
                             Nq, Nk, T, lo, q_offset, window, qk_scale, row_first, start_n,
                             r_tile, Pw_row, stride_pr, band_col0, fq, Fk_row, extent, 0.0,
                             row_term, True, MASKED, CAUSAL,
                             WINDOW, HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, UPCAST, PRECISION,
                             0, HAS_BAND, HAS_GATE, R_PAD)
        p = tl.math.exp2(s)
        l_i += tl.sum(p, 1)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        pdp_i += tl.sum(p * dp, 1)
        ds = p * (dp - di[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
        # The gate's dfq takes the exact D_i (known after the loop): the sums of sign·p·dP
        # and of sign·p are kept apart, dS = inv·(p·dP - D·p) (see attn_bwd_dq).
        if HAS_GATE and not CAUSAL:  # dfq = Σ_j sign(Δ)·dS; 0 when every Δ >= 0
            sp = tl.where(q_offset + offs_m[:, None] - offs_n[None, :] >= 0, p, -p)
            gq_a += tl.sum(sp * dp, 1)
            gq_b += tl.sum(sp, 1)
        # The band's gradients (dr and dP) are attn_bwd_band_dp's: here the band only adds to
        # the scores, as in the forward.
    return dq, l_i, pdp_i, gq_a, gq_b


@_autotune("attn_bwd_dq")
@triton.jit
def attn_bwd_dq(Q, K, V, dOut, NegLse2, DeltaOut, Delta, Inv, dQ, Table, Slopes, DocStart,
                DocEnd, Kpm, KvBounds, Rq, Pw, Fq, Fk, dFq,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn, stride_t,
                stride_ph, stride_pr, band_col0, Hq, group, Nq, Nk, T, lo, q_offset, window, rank,
                extent,
                qk_scale, scale, seq_bucket,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, HAS_BAND: tl.constexpr, HAS_GATE: tl.constexpr,
                R_PAD: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """One program per (query block, head, batch); the key loop mirrors the forward's.
    dQ is contiguous (B, Hq, Nq, D); with the gate also dFq (B, Hq, Nq), float32 (the band's
    gradients are attn_bwd_band_dp's)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * Hq + h
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, True)
    do = _load_rows(dOut + b * stride_db + h * stride_dh, offs_m, stride_dn, Nq, offs_d,
                    HEAD_DIM, True)
    row_term = _load_row_term(NegLse2 + bh * Nq, offs_m, Nq, True)
    # D_i from the stored low-precision output: its rounding moves dq by about one unit of q's
    # dtype (as rounding ds does). The table gradient cannot take that: there each row's dS must
    # sum to zero, or the residue lands on every offset the row sees, so this kernel also sums
    # the exact D_i = Σ_j P·dP in float32 and leaves it in Delta for the dk/dv and band kernels.
    di = _load_row_stat(DeltaOut + bh * Nq, offs_m, Nq, True)
    K_base = _row_source(K + b * stride_kb + hk * stride_kh, Nk, stride_kn, HEAD_DIM, BLOCK_N,
                         BLOCK_D, TMA)
    V_base = _row_source(V + b * stride_vb + hk * stride_vh, Nk, stride_vn, HEAD_DIM, BLOCK_N,
                         BLOCK_D, TMA)
    slope, doc_lo, doc_hi, begin, mid_begin, mid_end, end = _query_block(
        b, h, pid_m, offs_m, Slopes, DocStart, DocEnd, KvBounds, Nq, Nk, q_offset, window,
        CAUSAL, WINDOW, HAS_SLOPES, HAS_DOC, HAS_KPM, BLOCK_M, BLOCK_N)

    r_tile, fq = _row_token_terms(Rq, Fq, bh, offs_m, Nq, rank, HAS_BAND, HAS_GATE, R_PAD)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pdp_i = tl.zeros([BLOCK_M], tl.float32)
    gq_a = 0.0
    gq_b = 0.0
    if HAS_GATE and not CAUSAL:
        gq_a = tl.zeros([BLOCK_M], tl.float32)
        gq_b = tl.zeros([BLOCK_M], tl.float32)
    # Three stages, per-score table loads throughout: the forward's constant-run stages cost
    # this kernel register spills at D = 128 (tools/gpu_compile.py).
    for stage in tl.static_range(3):
        # three stages: the five of _key_stage without the constant runs
        first, last = _key_stage(begin, mid_begin, mid_begin, mid_end, mid_end, end, 2 * stage)
        dq, l_i, pdp_i, gq_a, gq_b = _dq_blocks(
            dq, l_i, pdp_i, gq_a, gq_b, q, do, row_term, di, K_base, V_base, stride_kn,
            stride_vn, first, last, offs_m, offs_d, Table + h * stride_t, slope, doc_lo, doc_hi,
            Kpm + b * Nk, Nq, Nk, T, lo, q_offset, window, qk_scale, pid_m * BLOCK_M, r_tile,
            Pw + h * stride_ph, stride_pr, band_col0, fq, Fk + bh * Nk, extent, HEAD_DIM,
            stage != 1,
            CAUSAL, WINDOW, HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, UPCAST, PRECISION, BLOCK_N,
            HAS_BAND, HAS_GATE, R_PAD, TMA)
    # lse is float32, so exp(s - lse) carries its rounding (|lse|·2^-24, 1e-3 at scores of 1e4)
    # as a per-row scale error that does not average out: rescale each row of p to sum to 1.
    # Inv is that factor for the dk/dv and band kernels, which do not see whole rows.
    inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    tl.store(Inv + bh * Nq + offs_m, inv, mask=offs_m < Nq)
    d_exact = pdp_i * inv
    tl.store(Delta + bh * Nq + offs_m, d_exact, mask=offs_m < Nq)
    if HAS_GATE:
        dfq = tl.zeros([BLOCK_M], tl.float32)
        if not CAUSAL:
            dfq = (gq_a - d_exact * gq_b) * inv
        tl.store(dFq + bh * Nq + offs_m, dfq, mask=offs_m < Nq)
    dq = dq * (inv * scale)[:, None]
    _store_rows(dQ + bh * Nq * HEAD_DIM, offs_m, HEAD_DIM, Nq, offs_d, dq, HEAD_DIM)


@triton.jit
def _dkdv_blocks(dk, dv, dfk, k, v, Q_base, dO_base, stride_qn, stride_dn, NegLse2_row,
                 Delta_row, Inv_row, block_begin, block_end, start_n, offs_n, offs_d, kp, table_row,
                 DTable_row, slope, DocStart_row, DocEnd_row, Nq, Nk, T, lo, q_offset, window,
                 qk_scale, Rq_row, Pw_row, stride_pr, band_col0, Fq_row, fk, rank, extent,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                 HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_TABLE: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BAND: tl.constexpr,
                 HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, UNIFORM: tl.constexpr):
    """The query blocks [block_begin, block_end) of one stage of the dk/dv kernel. UNIFORM (1:
    tail, 2: head) says every pair's table column lies in the table's constant tail or head:
    the scores add one value, not a gathered vector. With ATOMIC_TABLE each tile's dS is summed
    along its diagonals (:func:`_diagonal_sums`) and added by one atomic per offset, BLOCK_M +
    BLOCK_N - 1 a tile, none per score (in a constant run too: equal columns still have their
    own gradients)."""
    NEED_MASK: tl.constexpr = MASKED or HAS_DOC or HAS_KPM
    uniform = _uniform_value(table_row, T, HAS_TABLE, UNIFORM)
    for start_m in tl.range(block_begin * BLOCK_M, block_end * BLOCK_M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_base, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, MASKED)
        do = _load_rows(dO_base, offs_m, stride_dn, Nq, offs_d, HEAD_DIM, MASKED)
        row_term = _load_row_term(NegLse2_row, offs_m, Nq, MASKED)
        di = _load_row_stat(Delta_row, offs_m, Nq, MASKED)
        inv = _load_row_stat(Inv_row, offs_m, Nq, MASKED)
        # Scores in the (queries × keys) orientation of the forward and dq kernels: the same
        # dot gives the same rounding, so p here matches the p that inv normalizes (with scores
        # of 1e4 a transposed dot's rounding alone would move p by 1e-3).
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION)
        s, delta = _score(qk, offs_m, offs_n, start_m, start_n, table_row, slope, q_offset, lo,
                          T, qk_scale, uniform, row_term, HAS_TABLE, HAS_SLOPES, UNIFORM, True)
        if HAS_BAND or HAS_GATE:
            r_tile = 0.0
            fq = 0.0
            if HAS_BAND:
                r_tile = _load_latent(Rq_row, offs_m, Nq, rank, R_PAD) * LOG2E
            if HAS_GATE:
                fq = _load_gate(Fq_row, offs_m, Nq, MASKED)
            s = _token_score(s, delta, start_m, start_n, r_tile, Pw_row, stride_pr, band_col0, fq,
                             fk,
                             q_offset, extent, CAUSAL, HAS_BAND, HAS_GATE, R_PAD, PRECISION)
        if NEED_MASK:
            doc_lo, doc_hi = _doc_range(DocStart_row, DocEnd_row, q_offset, offs_m, Nq, HAS_DOC)
            s = _hide(s, delta, offs_m, offs_n, kp, doc_lo, doc_hi, Nq, Nk, window,
                      MASKED, CAUSAL, WINDOW, HAS_DOC, HAS_KPM)
        p = tl.math.exp2(s) * inv[:, None]
        dv += _dot(tl.trans(p).to(do.dtype), do, UPCAST, PRECISION)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - di[:, None])  # ∂L/∂score, queries × keys
        dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST, PRECISION)
        if HAS_GATE:  # dfk = -Σ_i sign(Δ)·dS
            if CAUSAL:
                dfk -= tl.sum(ds, 0)
            else:
                dfk -= tl.sum(tl.where(delta >= 0, ds, -ds), 0)
        if HAS_TABLE and ATOMIC_TABLE:
            # (W, BN) sums, sums[w, j] at offset Δ = d0 + BN - 1 - j + w·BN (d0 the tile's
            # smallest); hidden and ragged pairs have ds = 0. One relaxed atomic per offset.
            sums = _diagonal_sums(ds)
            w = tl.arange(0, sums.shape[0])[:, None]
            j = tl.arange(0, BLOCK_N)[None, :]
            t = BLOCK_N - 1 - j + w * BLOCK_N
            col = q_offset + start_m - (start_n + BLOCK_N - 1) - lo + t
            keep = t < BLOCK_M + BLOCK_N - 1
            if MASKED:  # 0 <= col < T as one unsigned comparison (T >= 1)
                keep = keep & (col.to(tl.uint32, bitcast=True) < T)
            tl.atomic_add(DTable_row + col, sums, mask=keep, sem="relaxed")
    return dk, dv, dfk


@triton.jit
def _diagonal_sums(ds):
    """The sums of a (BM × BN) tile along its diagonals without a gather of BM + BN - 1 columns
    per row: row m rotated left by m (a gather along the keys, within each row, one element per
    score: X[m, j] = dS[m, (m + j) mod BN]) puts in column j the pairs of offset m - n + BN - 1 =
    BN - 1 - j + w·BN, w = (m + j) // BN; the rows of each class w are summed. Returns (W, BN),
    W the next power of 2 >= the number of classes (empty classes sum to 0). The gather along
    axis 1 (12 SHFL a loop at 32×32, 4 warps) holds fewer registers than a 1-D gather on the
    flattened tile (shared memory, 8 hoisted addresses a thread), which spilled at D = 128 on
    sm_90a."""
    BM: tl.constexpr = ds.shape[0]
    BN: tl.constexpr = ds.shape[1]
    CLASSES: tl.constexpr = (BM + BN - 2) // BN + 1
    W: tl.constexpr = 2 if CLASSES <= 2 else (4 if CLASSES <= 4 else 8)
    m = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    x = tl.gather(ds, (m + j) % BN, 1)
    cls = (m + j) // BN
    w = tl.arange(0, W)[:, None, None]
    return tl.sum(tl.where(cls[None, :, :] == w, x[None, :, :], 0.0), 1)


@_autotune("attn_bwd_dkdv", reset_to_zero=["DTable"])
@triton.jit
def attn_bwd_dkdv(Q, K, V, dOut, NegLse2, Delta, Inv, dK, dV, Table, TableEnds, DTable, Slopes,
                  DocStart, DocEnd, Kpm, KvBounds, Rq, Pw, Fq, Fk, dFk,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn, stride_t,
                  stride_ph, stride_pr, band_col0, Hq, group, Nq, Nk, T, lo, q_offset, window,
                  rank, extent,
                  qk_scale, scale, seq_bucket,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                  HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_TABLE: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BAND: tl.constexpr,
                  HAS_GATE: tl.constexpr, R_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, query head, batch): that head's share of dk, dv, and, unless
    deterministic, of the table gradient (atomics: one per offset of a tile whose table columns
    vary, one per program and constant run of the table, :func:`table_ends`; none per score).
    dK, dV are contiguous (B, Hq, Nk, D); with
    GQA the host sums each kv head's group (a loop over the group here would keep every stage's
    hoisted values live across it and spill registers at D = 128). With the gate also dFk
    (B, Hq, Nk) float32, the column sums of dS (the band's weight gradient is
    attn_bwd_band_dp's)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * Hq + h
    hk = h // group
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_kn, Nk, offs_d, HEAD_DIM,
                   True)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vn, Nk, offs_d, HEAD_DIM,
                   True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    col_last = tl.minimum(start_n + BLOCK_N, Nk) - 1
    r_lo, r_hi, f_lo, f_hi = _query_range(start_n, col_last, q_offset, Nq, window, CAUSAL, WINDOW)
    kp = _key_padding(Kpm + b * Nk, offs_n, Nk, HAS_KPM)
    if HAS_DOC:
        r_lo = tl.maximum(r_lo, tl.load(DocStart + b * Nk + start_n) - q_offset)
        r_hi = tl.minimum(r_hi, tl.load(DocEnd + b * Nk + col_last) - q_offset)
    if HAS_KPM:
        padded = (col_last < tl.load(KvBounds + 2 * b)) | (start_n > tl.load(KvBounds + 2 * b + 1))
        r_hi = tl.where(padded, -1, r_hi)
    # A ragged key block needs its column mask on every tile.
    f_hi = tl.where(start_n + BLOCK_N > Nk, -1, f_hi)
    begin, mid_begin, mid_end, end = _stages(tl.maximum(r_lo, 0), r_hi, f_lo, f_hi, BLOCK_M)

    slope = 0.0
    if HAS_SLOPES:
        slope = tl.load(Slopes + h).to(tl.float32) * LOG2E
    fk = 0.0
    dfk = 0.0
    if HAS_GATE:
        fk = _load_gate(Fk + bh * Nk, offs_n, Nk, True)
        dfk = tl.zeros([BLOCK_N], tl.float32)
    # Five stages over the query blocks (rows ascending, so offsets ascending): masked, the
    # table's constant head (bidirectional only: causal offsets start at 0), varying columns,
    # its constant tail, masked; without a table the runs are empty and not compiled.
    head_end, tail_begin = _uniform_rows(TableEnds, h, start_n, q_offset, lo, mid_begin, mid_end,
                                         HAS_TABLE, not CAUSAL, BLOCK_M, BLOCK_N)
    # q and dO stream through pointers: tensor descriptors here cost 40 registers and spilled
    # with the table gradient's atomics (sm_90a, D = 128, 32×32 tiles) for no fewer
    # instructions a loop (tools/gpu_compile.py; BENCHMARKS.md).
    Q_base = Q + b * stride_qb + h * stride_qh
    dO_base = dOut + b * stride_db + h * stride_dh
    for stage in tl.static_range(5):
        if (HAS_TABLE or stage % 2 == 0) and not (CAUSAL and stage == 1):
            first, last = _key_stage(begin, mid_begin, head_end, tail_begin, mid_end, end, stage)
            dk, dv, dfk = _dkdv_blocks(
                dk, dv, dfk, k, v, Q_base, dO_base, stride_qn, stride_dn, NegLse2 + bh * Nq,
                Delta + bh * Nq, Inv + bh * Nq, first, last, start_n, offs_n, offs_d, kp,
                Table + h * stride_t, DTable + h * T, slope, DocStart + b * Nk, DocEnd + b * Nk,
                Nq, Nk, T, lo, q_offset, window, qk_scale, Rq + bh * Nq * rank,
                Pw + h * stride_ph, stride_pr, band_col0, Fq + bh * Nq, fk, rank, extent,
                HEAD_DIM, stage == 0 or stage == 4, CAUSAL, WINDOW,
                HAS_TABLE, HAS_SLOPES, HAS_DOC, HAS_KPM, ATOMIC_TABLE, UPCAST, PRECISION, BLOCK_M,
                BLOCK_N, HAS_BAND, HAS_GATE, R_PAD, (stage == 3) + 2 * (stage == 1))
    if HAS_GATE:
        tl.store(dFk + bh * Nk + offs_n, dfk, mask=offs_n < Nk)

    _store_rows(dK + bh * Nk * HEAD_DIM, offs_n, HEAD_DIM, Nk, offs_d, dk * scale, HEAD_DIM)
    _store_rows(dV + bh * Nk * HEAD_DIM, offs_n, HEAD_DIM, Nk, offs_d, dv, HEAD_DIM)


@triton.jit
def attn_bwd_table_bands(Q, K, V, dOut, NegLse2, Delta, Inv, Table, Partial, DocStart, DocEnd,
                         Kpm, Rq, Pw, Fq, Fk,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                         stride_t, stride_ph, stride_pr, band_col0, Hq, group, Nq, Nk, T, lo,
                         q_offset,
                         window, rank, extent, qk_scale, num_bands, band_min,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                         WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_BAND: tl.constexpr,
                         HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic table gradient: one program per (block diagonal d = m - n, head, batch).

    Pair (r, c) of every tile on a block diagonal has the same offset
    ``Δ = q_offset + d·BLOCK + r - c``, so the program adds its tiles' ∂L/∂score elementwise, in a
    fixed order, and writes the sum to ``Partial[b, h, band]`` (BLOCK × BLOCK, no atomics); the
    host sums batches and diagonals. Recomputes p and dp (two extra dots a tile).
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * Hq + h
    hk = h // group
    d = band_min + pid
    delta0 = q_offset + d * BLOCK
    n_begin = tl.maximum(0, -d)
    n_end = tl.minimum(tl.cdiv(Nk, BLOCK), tl.cdiv(Nq, BLOCK) - d)
    # The band's offsets miss the table's range [lo, lo + T - 1]: nothing visible there.
    outside = (delta0 + BLOCK - 1 < lo) | (delta0 - BLOCK + 1 > lo + T - 1)
    n_end = tl.where(outside, n_begin, n_end)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    Q_base = Q + b * stride_qb + h * stride_qh
    dO_base = dOut + b * stride_db + h * stride_dh
    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    for n in range(n_begin, n_end):
        offs_m = (n + d) * BLOCK + tl.arange(0, BLOCK)
        offs_n = n * BLOCK + tl.arange(0, BLOCK)
        q = _load_rows(Q_base, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, True)
        do = _load_rows(dO_base, offs_m, stride_dn, Nq, offs_d, HEAD_DIM, True)
        k = _load_rows(K_base, offs_n, stride_kn, Nk, offs_d, HEAD_DIM, True)
        v = _load_rows(V_base, offs_n, stride_vn, Nk, offs_d, HEAD_DIM, True)
        row_term = _load_row_term(NegLse2 + bh * Nq, offs_m, Nq, True)
        di = _load_row_stat(Delta + bh * Nq, offs_m, Nq, True)
        inv = _load_row_stat(Inv + bh * Nq, offs_m, Nq, True)
        qk = _dot(q, tl.trans(k), UPCAST, PRECISION)
        s, delta = _score(qk, offs_m, offs_n, (n + d) * BLOCK, n * BLOCK, Table + h * stride_t,
                          0.0, q_offset, lo, T, qk_scale, 0.0, row_term, True, False,
                          0, True)
        if HAS_BAND or HAS_GATE:
            r_tile, fq = _row_token_terms(Rq, Fq, bh, offs_m, Nq, rank, HAS_BAND, HAS_GATE,
                                          R_PAD)
            fk = 0.0
            if HAS_GATE:
                fk = _load_gate(Fk + bh * Nk, offs_n, Nk, True)
            s = _token_score(s, delta, (n + d) * BLOCK, n * BLOCK, r_tile, Pw + h * stride_ph,
                             stride_pr, band_col0, fq, fk, q_offset, extent, CAUSAL, HAS_BAND,
                             HAS_GATE,
                             R_PAD, PRECISION)
        doc_lo, doc_hi = _doc_range(DocStart + b * Nk, DocEnd + b * Nk, q_offset, offs_m, Nq,
                                    HAS_DOC)
        kp = _key_padding(Kpm + b * Nk, offs_n, Nk, HAS_KPM)
        s = _hide(s, delta, offs_m, offs_n, kp, doc_lo, doc_hi, Nq, Nk, window,
                  True, CAUSAL, WINDOW, HAS_DOC, HAS_KPM)
        p = tl.math.exp2(s) * inv[:, None]
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        acc += p * (dp - di[:, None])
    r = tl.arange(0, BLOCK)
    tile = Partial + (bh * num_bands + pid) * (BLOCK * BLOCK)
    tl.store(tile + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def attn_bwd_band_dp(Q, K, V, dOut, NegLse2, Delta, Inv, Table, Slopes, DocStart, DocEnd, Kpm,
                     Rq, Pw, Fq, Fk, PartialP, dR,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                     stride_t, stride_ph, stride_pr, band_col0, Hq, group, Nq, Nk, T, lo, q_offset,
                     window,
                     rank, extent, qk_scale, num_bands, band_min, num_groups, group_blocks,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     WINDOW: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
                     HAS_DOC: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, R_PAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """The band's gradients dr and dP without atomics, from the tiles that meet 0 <= Δ < W only:
    one program per (group of ``group_blocks`` query blocks, head, batch), walking each of its
    query blocks' tiles on the block diagonals ``band_min .. band_min + num_bands - 1``.

    Every tile on block diagonal d (rows (n + d)·BLOCK.., keys n·BLOCK..) has the offsets
    ``Δ = q_offset + d·BLOCK + r - c``, so one P slice (R_PAD × 2·BLOCK) and one unshear: the
    program recomputes the tile's dS (every term of the score, as the dk/dv kernel does, with
    the exact D_i and the rows' 1/l from the dq kernel), lays it out by offset (X, BLOCK ×
    2·BLOCK), adds ``X·P_sliceᵀ`` to its rows' dr (kept in registers over the row's diagonals,
    written once to dR (B, Hq, Nq, rank) float32) and ``rᵀ·X`` to the group's partial of
    diagonal d in ``PartialP[b, h, group, d]`` (R_PAD × 2·BLOCK, zeroed by the host; only this
    program touches it, in a fixed order); the host sums groups, batches, heads sharing a weight
    and the diagonals' overlapping columns. Recomputes p and dp (two extra dots a tile, on the
    band's tiles only).
    """
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * Hq + h
    hk = h // group
    n_kb = tl.cdiv(Nk, BLOCK)
    m_begin = pid * group_blocks
    m_end = tl.minimum(m_begin + group_blocks, tl.cdiv(Nq, BLOCK))
    offs_d = tl.arange(0, BLOCK_D)
    VEC: tl.constexpr = 2 * BLOCK
    Q_base = Q + b * stride_qb + h * stride_qh
    dO_base = dOut + b * stride_db + h * stride_dh
    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    Pw_row = Pw + h * stride_ph
    c = tl.arange(0, R_PAD)
    t = tl.arange(0, VEC)
    part = PartialP + (bh * num_groups + pid) * num_bands * (R_PAD * VEC) + c[:, None] * VEC \
        + t[None, :]
    slope = 0.0
    if HAS_SLOPES:
        slope = tl.load(Slopes + h).to(tl.float32) * LOG2E
    for m in range(m_begin, m_end):
        # The previous row block's partial stores (other threads' elements) before these loads.
        tl.debug_barrier()
        offs_m = m * BLOCK + tl.arange(0, BLOCK)
        q = _load_rows(Q_base, offs_m, stride_qn, Nq, offs_d, HEAD_DIM, True)
        do = _load_rows(dO_base, offs_m, stride_dn, Nq, offs_d, HEAD_DIM, True)
        row_term = _load_row_term(NegLse2 + bh * Nq, offs_m, Nq, True)
        di = _load_row_stat(Delta + bh * Nq, offs_m, Nq, True)
        inv = _load_row_stat(Inv + bh * Nq, offs_m, Nq, True)
        r = _load_latent(Rq + bh * Nq * rank, offs_m, Nq, rank, R_PAD)
        doc_lo, doc_hi = _doc_range(DocStart + b * Nk, DocEnd + b * Nk, q_offset, offs_m, Nq,
                                    HAS_DOC)
        dr = tl.zeros([BLOCK, R_PAD], tl.float32)
        # diagonal d = band_min + i meets key block n = m - d in [0, n_kb)
        i_begin = tl.maximum(0, m - (n_kb - 1) - band_min)
        i_end = tl.minimum(num_bands, m - band_min + 1)
        for i in range(i_begin, i_end):
            d = band_min + i
            offs_n = (m - d) * BLOCK + tl.arange(0, BLOCK)
            k = _load_rows(K_base, offs_n, stride_kn, Nk, offs_d, HEAD_DIM, True)
            v = _load_rows(V_base, offs_n, stride_vn, Nk, offs_d, HEAD_DIM, True)
            pslice = tl.reshape(_band_slice(Pw_row, stride_pr, band_col0, d * BLOCK, 0, q_offset,
                                            R_PAD, BLOCK, BLOCK, BLOCK), (R_PAD, VEC))
            qk = _dot(q, tl.trans(k), UPCAST, PRECISION)
            s, delta = _score(qk, offs_m, offs_n, m * BLOCK, (m - d) * BLOCK,
                              Table + h * stride_t, slope, q_offset, lo, T, qk_scale, 0.0,
                              row_term, HAS_TABLE, HAS_SLOPES, 0, True)
            s += _band_term(r * LOG2E, tl.reshape(pslice, (1, R_PAD, VEC)), BLOCK, PRECISION)
            if HAS_GATE:
                # fq reloaded per tile (cached): held across the diagonals it spilled (sm_90a)
                fq_t = _load_gate(Fq + bh * Nq, offs_m, Nq, True)
                g = fq_t[:, None] - _load_gate(Fk + bh * Nk, offs_n, Nk, True)[None, :]
                if not CAUSAL:
                    g = tl.where(delta >= 0, g, -g)
                s += g
            kp = _key_padding(Kpm + b * Nk, offs_n, Nk, HAS_KPM)
            s = _hide(s, delta, offs_m, offs_n, kp, doc_lo, doc_hi, Nq, Nk, window,
                      True, CAUSAL, WINDOW, HAS_DOC, HAS_KPM)
            p = tl.math.exp2(s) * inv[:, None]
            dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
            ds = p * (dp - di[:, None])
            x = tl.reshape(_band_unshear(ds, 1, VEC), (BLOCK, VEC))
            dr += tl.dot(x, tl.trans(pslice), input_precision=PRECISION)
            part_i = part + i * (R_PAD * VEC)
            tl.store(part_i, tl.load(part_i) + tl.dot(tl.trans(r), x, input_precision=PRECISION))
        tl.store(dR + (bh * Nq + offs_m[:, None]) * rank + c[None, :], dr,
                 mask=(offs_m[:, None] < Nq) & (c[None, :] < rank))
