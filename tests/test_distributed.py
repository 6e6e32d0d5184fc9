"""Context parallelism (relattn.distributed) against one process on the whole sequence.

The tests run in spawned workers (``torch.multiprocessing``, a free port, a gloo group on CPU
with a timeout, and a timeout on the workers), one pool per world size shared by the tests of
this module; each test runs its whole list of cases inside the workers, so process start-up is
paid once per world size. A case shards q, k, v, the cotangent, doc ids and padding with
``relattn.distributed.shard``, runs ``context_parallel_attention`` forward and backward, puts the
output and dq, dk, dv back together with ``unshard``, sums the encodings' parameter gradients
over the group (the documented recipe), and compares all of it with the float64 formula over
the whole sequence (tests/oracle.py) at the conformance suite's float32 tolerance.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import ENCODINGS
from oracle import assert_close_f64, assert_flash_accuracy, run_math, seed_of, visible_mask

import relattn
from relattn.distributed import (
    ContextParallel,
    context_parallel_attention,
    shard,
    shard_positions,
    unshard,
)
from relattn.pe import RoPE, T5Bias

GROUP_TIMEOUT = datetime.timedelta(seconds=30)  # a hung collective fails instead of blocking
WORKERS_TIMEOUT = 120.0  # per test; the slowest takes ~20 s on two busy cores
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    """A worker: join the gloo group, then run ``(fn, args)`` tasks until told to stop."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GROUP_TIMEOUT,
    )
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            fn(rank, world, *args)
            results.put((rank, None))
        except BaseException:  # report everything, keep serving the next test
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    """``world`` spawned processes in one gloo group, reused by every test of that world size
    (process start-up, not the cases, dominates on two cores)."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.closed = False
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results))
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args) -> None:
        """``fn(rank, world, *args)`` on every worker; fails if any raises or none finish."""
        for q in self.tasks:
            q.put((fn, args))
        errors = []
        deadline = time.monotonic() + WORKERS_TIMEOUT
        for _ in range(self.world):
            try:
                rank, err = self.results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close(kill=True)
                pytest.fail(f"context-parallel workers did not finish in {WORKERS_TIMEOUT:.0f} s")
            if err:
                errors.append(f"rank {rank}:\n{err}")
        if errors:
            pytest.fail("\n".join(sorted(errors)), pytrace=False)

    def close(self, kill: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for q, p in zip(self.tasks, self.procs, strict=True):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def pool2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = Pool(4)
    yield pool
    pool.close()


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    enc: str
    causal: bool = True
    window: int | None = None
    docs: bool = False
    padding: bool = False
    hq: int = 4
    hkv: int = 4
    n: int = 32
    b: int = 2
    d: int = 8


# Every encoding, causal and bidirectional, GQA, windows wider and narrower than a chunk,
# documents that cross chunk and shard boundaries (per batch row), padding.
FEATURES = [
    Case("t5"),
    Case("t5_bidir", causal=False),
    Case("alibi", hkv=2),
    Case("alibi_learnable", window=5),
    Case("kerple_log", causal=False, window=7, hkv=2),
    Case("kerple_power", docs=True),
    Case("offset", docs=True, padding=True, hkv=2),
    Case("offset_bidir", causal=False, docs=True, window=6),
    Case("rope", padding=True),
    Case("rope+t5", docs=True, window=11, hkv=2),
    Case("none", causal=False, padding=True),
]
# Four ranks: all heads divisible by 4 for the all-to-all split.
FEATURES_4 = [
    Case("t5", hq=8, hkv=4),
    Case("alibi_learnable", window=5, hq=8, hkv=4),
    Case("kerple_log", causal=False, window=7, hq=8, hkv=4),
    Case("offset", docs=True, padding=True, hq=8, hkv=4),
    Case("offset_bidir", causal=False, docs=True, window=6, hq=4, hkv=4),
    Case("rope+t5", docs=True, window=11, hq=8, hkv=4),
]
STRATEGY_LAYOUTS = [(s, lay) for s in ("ring", "all_to_all") for lay in ("zigzag", "contiguous")]


def _doc_ids(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.zeros(b, n, dtype=torch.long)
    for i in range(b):
        cuts = torch.randperm(n - 1, generator=g)[:3] + 1
        ids[i, cuts] = 1
        ids[i] = ids[i].cumsum(0) + 10 * i
    return ids


def _padding(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    kpm = torch.rand(b, n, generator=g) > 0.25
    kpm[0, :3] = False  # left padding: the first rows of batch 0 see no key
    return kpm


def make(case: Case, seed_parts) -> tuple:
    """Whole-sequence inputs of a case: q, k, v, pe, grad_out and the mask keywords."""
    g = torch.Generator().manual_seed(seed_of(case, *seed_parts))
    torch.manual_seed(seed_of(case, *seed_parts))  # encodings initialize from the global RNG
    q = torch.randn(case.b, case.hq, case.n, case.d, generator=g)
    k = torch.randn(case.b, case.hkv, case.n, case.d, generator=g)
    v = torch.randn(case.b, case.hkv, case.n, case.d, generator=g)
    grad_out = torch.randn(case.b, case.hq, case.n, case.d, generator=g)
    pe = ENCODINGS[case.enc](case.hq, case.d, g)
    kw = {"causal": case.causal, "window": case.window}
    if case.docs:
        kw["doc_ids"] = _doc_ids(case.b, case.n, g)
    if case.padding:
        kw["key_padding_mask"] = _padding(case.b, case.n, g)
    return q, k, v, pe, grad_out, kw


def _additive(pe) -> list:
    items = [] if pe is None else pe if isinstance(pe, list) else [pe]
    return [e for e in items if not isinstance(e, RoPE)]


def run_cp(q, k, v, pe, grad_out, kw, group, strategy, layout, backend="auto") -> dict:
    """Out and gradients of context parallel attention, whole-sequence shaped, on every rank."""
    sq, sk, sv = (shard(t, group, layout, dim=2).requires_grad_(True) for t in (q, k, v))
    skw = dict(kw)
    for name in ("doc_ids", "key_padding_mask"):
        if name in kw:
            skw[name] = shard(kw[name], group, layout, dim=1)
    for enc in _additive(pe):
        enc.zero_grad(set_to_none=True)
    out = context_parallel_attention(
        sq, sk, sv, pe, group=group, strategy=strategy, layout=layout, backend=backend, **skw
    )
    assert out.shape == sq.shape and out.dtype == sq.dtype
    out.backward(shard(grad_out, group, layout, dim=2))
    res = {"out": unshard(out.detach(), group, layout, dim=2)}
    for name, t in (("q", sq), ("k", sk), ("v", sv)):
        res[name] = unshard(t.grad, group, layout, dim=2)
    for i, enc in enumerate(_additive(pe)):
        for name, p in enc.named_parameters():
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=group)  # the recipe: sum over the group
            res[f"pe{i}.{name}"] = grad
    return res


def run_plain(q, k, v, pe, grad_out, kw) -> dict:
    """Out and gradients of the plain ``relattn.attention`` call, keyed as ``run_cp``'s."""
    lq, lk, lv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    for enc in _additive(pe):
        enc.zero_grad(set_to_none=True)
    out = relattn.attention(lq, lk, lv, pe, **kw)
    out.backward(grad_out)
    res = {"out": out.detach(), "q": lq.grad, "k": lk.grad, "v": lv.grad}
    for i, enc in enumerate(_additive(pe)):
        for name, p in enc.named_parameters():
            res[f"pe{i}.{name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return res


def check_case(case: Case, strategy: str, layout: str, group=None, seed_parts=()) -> None:
    q, k, v, pe, grad_out, kw = make(case, (strategy, layout, *seed_parts))
    got = run_cp(q, k, v, pe, grad_out, kw, group, strategy, layout)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label=f"{strategy}/{layout}/{case}: ")
    # Rows that see no key at all give exactly 0, as in one process.
    m = visible_mask(case.b, case.n, case.n, case.causal, 0, case.window, kw.get("doc_ids"),
                     kw.get("key_padding_mask"))  # fmt: skip
    empty = ~m[:, 0].any(-1)
    for name in ("out", "q"):
        rows = got[name].permute(0, 2, 1, 3)[empty]
        assert torch.equal(rows, torch.zeros_like(rows)), f"{case}: {name} of rows without keys"


# ----------------------------------------------------------------------------- workers


def _check_layouts(rank: int, world: int) -> None:
    want = {2: {"contiguous": [[0, 1, 2, 3], [4, 5, 6, 7]],
                "zigzag": [[0, 1, 6, 7], [2, 3, 4, 5]]}}  # fmt: skip
    for layout in ("contiguous", "zigzag"):
        mine = shard(torch.arange(4 * world), None, layout, dim=0)
        assert torch.equal(mine, shard_positions(4, None, layout))
        if world in want:
            assert mine.tolist() == want[world][layout][rank]
        assert torch.equal(unshard(mine, None, layout, dim=0), torch.arange(4 * world))


def _features_worker(rank: int, world: int, cases: list[Case]) -> None:
    _check_layouts(rank, world)
    for strategy, layout in STRATEGY_LAYOUTS:
        for case in cases:
            check_case(case, strategy, layout)


def test_world_2_every_feature(pool2):
    """W = 2: both strategies × both layouts × every encoding, causal and bidirectional, GQA,
    windows, packed documents crossing shards, padding."""
    pool2.run(_features_worker, FEATURES)


def test_world_4_every_strategy_and_layout(pool4):
    """W = 4 (four processes on two cores): a chunk is 4 tokens, so windows and documents span
    several ranks."""
    pool4.run(_features_worker, FEATURES_4)


def _groups_worker(rank: int, world: int) -> None:
    # Two context-parallel groups of two (ranks {0, 1} and {2, 3}): each is one data-parallel
    # replica working on its own sequence.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    for strategy, layout in STRATEGY_LAYOUTS:
        case = Case("rope+t5", docs=True, window=9, hkv=2)
        check_case(case, strategy, layout, group=mine, seed_parts=("replica", rank // 2))
    # A group of one is the plain op, bit for bit.
    singles = [dist.new_group([r]) for r in range(world)]
    q, k, v, pe, _, kw = make(Case("t5", docs=True, padding=True, hkv=2), ("single",))
    want = relattn.attention(q, k, v, pe, **kw)
    for strategy, layout in STRATEGY_LAYOUTS:
        got = context_parallel_attention(
            q, k, v, pe, group=singles[rank], strategy=strategy, layout=layout, **kw
        )
        assert torch.equal(got, want)


def test_data_times_context_parallel_groups_and_group_of_one(pool4):
    pool4.run(_groups_worker)


def _group_of_one_worker(rank: int, world: int) -> None:
    # Every rank alone in its own group: out and every gradient (q, k, v, the encodings'
    # parameters) are the plain op's, bit for bit. Every encoding of FEATURES, each under one
    # strategy × layout in turn (with one rank they do not change the call).
    singles = [dist.new_group([r]) for r in range(world)]
    for i, case in enumerate(FEATURES):
        strategy, layout = STRATEGY_LAYOUTS[i % len(STRATEGY_LAYOUTS)]
        q, k, v, pe, grad_out, kw = make(case, ("group of one", rank))
        got = run_cp(q, k, v, pe, grad_out, kw, singles[rank], strategy, layout)
        want = run_plain(q, k, v, pe, grad_out, kw)
        assert got.keys() == want.keys(), f"{case}: {sorted(got)} vs {sorted(want)}"
        assert len(want) == 4 + sum(len(list(e.parameters())) for e in _additive(pe))
        for name, w in want.items():
            assert torch.equal(got[name], w), f"{strategy}/{layout}/{case}: {name}"


def test_world_1_group_of_one_out_and_gradients(pool4):
    """W = 1: a group of one gives the plain op's output and gradients (q, k, v and the
    encodings' parameters)."""
    pool4.run(_group_of_one_worker)


def test_without_torch_distributed_is_the_plain_op():
    q, k, v, pe, _, kw = make(Case("kerple_log", window=6), ("plain",))
    want = relattn.attention(q, k, v, pe, **kw)
    assert torch.equal(context_parallel_attention(q, k, v, pe, **kw), want)
    assert torch.equal(shard(q, dim=2), q) and torch.equal(unshard(q, dim=2), q)


# ----------------------------------------------------------------------------- the stand-in


@pytest.mark.parametrize(
    "causal, window, q_offset, nq, nk, docs, padding, table",
    [
        (True, 0, 0, 45, 45, False, False, "t5"),
        (False, 0, 0, 40, 40, True, True, "t5"),
        (True, 6, 0, 33, 33, True, False, "slopes"),
        (False, 7, -13, 20, 29, False, True, "t5"),
        (True, 0, 31, 20, 29, False, False, "none"),
        (False, 0, 50, 24, 24, False, False, "t5"),
        (False, 5, 0, 48, 48, True, False, "t5"),  # 20, 24, then 20 keys per block of 16 rows
    ],
)
def test_ring_block_backward_stand_in(monkeypatch, causal, window, q_offset, nq, nk, docs,
                                      padding, table):  # fmt: skip
    """The ring's backward for backends that do not take the row term from ``out``: on one
    whole call (where out and lse are the call's own) it equals the chunked backward, in
    row blocks of 16 (keys of different widths reuse one zero-padded buffer)."""
    from relattn.distributed import _block

    monkeypatch.setattr(_block, "_SCORES_PER_BLOCK", 1)
    g = torch.Generator().manual_seed(seed_of(causal, window, q_offset, nq))
    b, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    lo, hi = relattn.masks.offset_range(nq, nk, causal, q_offset, window)
    tab = torch.randn(hq, hi - lo + 1, generator=g, dtype=torch.float64)
    slopes = torch.rand(hq, generator=g, dtype=torch.float64)
    tab, slopes = (tab, None) if table == "t5" else (None, slopes if table == "slopes" else None)
    doc_ids = _doc_ids(b, nk, g) if docs else None
    kpm = _padding(b, nk, g) if padding else None
    chunked = relattn.backends.get("chunked")
    call = _block.block_call(
        chunked, q, k, v, tab, slopes, lo, 0.3, causal, q_offset, window, doc_ids, kpm
    )
    out, lse = _block._block_forward(call)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = _block._block_backward(call, grad_out, out, lse, partial=False)
    got = _block._backward_from_out(call, grad_out, out, lse)
    for name, w, x in zip(("dq", "dk", "dv", "dtable"), want, got, strict=True):
        if w is None:
            assert x is None
            continue
        assert (w - x).abs().max().item() < 1e-12, name


# ----------------------------------------------------------------------------- errors


def _expect_error(kind, match: str, fn) -> None:
    with pytest.raises(kind, match=match):
        fn()


def _errors_worker(rank: int, world: int) -> None:
    case = Case("t5", docs=True, hkv=2)
    q, k, v, pe, _, kw = make(case, ("errors",))
    sq, sk, sv = (shard(t, None, "zigzag", dim=2) for t in (q, k, v))
    docs = shard(kw["doc_ids"], None, "zigzag", dim=1)
    cpa = context_parallel_attention
    other = rank == 1

    # Shard length not divisible as zigzag needs (the same on every rank).
    odd = sq[:, :, :15]
    _expect_error(ValueError, "must be even", lambda: cpa(odd, odd[:, :2], odd[:, :2]))
    _expect_error(ValueError, "divisible by 4", lambda: shard(q[:, :, :30], dim=2))
    # Ranks disagreeing on shapes: only rank 1's shard is shorter.
    short = (sq[:, :, :8], sk[:, :, :8], sv[:, :, :8]) if other else (sq, sk, sv)
    _expect_error(ValueError, "same q shape", lambda: cpa(*short))
    # Ranks disagreeing on the encoding: its settings, or its parameters' values.
    enc = T5Bias(4, 16 if other else 8, 20)
    _expect_error(ValueError, "same pe", lambda: cpa(sq, sk, sv, enc))
    enc = T5Bias(4, 8, 20)
    with torch.no_grad():
        enc.weight.fill_(float(rank))
    _expect_error(ValueError, "same pe", lambda: cpa(sq, sk, sv, enc))
    # doc_ids: one rank's shard has the wrong shape; one rank passes none; shards that do not
    # fit together (sharded with the other layout).
    bad = kw["doc_ids"] if rank == 0 else docs
    _expect_error(ValueError, "doc_ids must be this rank's shard|rank 0", lambda: cpa(
        sq, sk, sv, doc_ids=bad))  # fmt: skip
    _expect_error(ValueError, "same doc_ids", lambda: cpa(sq, sk, sv, doc_ids=None if other
                                                          else docs))  # fmt: skip
    wrong = shard(kw["doc_ids"], None, "contiguous", dim=1)
    _expect_error(ValueError, "one contiguous run", lambda: cpa(sq, sk, sv, doc_ids=wrong))
    # A wrong type on one rank only: a TypeError on every rank.
    _expect_error(TypeError, "q must be a torch.Tensor|rank 1", lambda: cpa(
        "q" if other else sq, sk, sv))  # fmt: skip
    # Heads not divisible by W for all-to-all; a backend without a log-sum-exp.
    _expect_error(ValueError, "divisible by 2", lambda: cpa(
        sq[:, :3], sk[:, :1], sv[:, :1], strategy="all_to_all"))  # fmt: skip
    _expect_error(ValueError, "reference", lambda: cpa(sq, sk, sv, backend="reference"))
    _expect_error(ValueError, "strategy", lambda: cpa(sq, sk, sv, strategy="tree"))

    # A custom encoding whose table is one column short: the same ValueError on every rank.
    class Short(T5Bias):
        def table(self, lo, hi):
            return super().table(lo, hi)[:, :-1]

    short_enc = Short(4, 8, 20)
    with torch.no_grad():
        short_enc.weight.fill_(0.5)  # the same on every rank
    _expect_error(ValueError, "must return shape", lambda: cpa(sq, sk, sv, short_enc))
    # unshard with shapes that differ between ranks.
    _expect_error(ValueError, "same shard shape", lambda: unshard(sq[:, :, : 8 if other else 16],
                                                                  dim=2))  # fmt: skip
    # After all that, the group still works: nobody was left inside a collective.
    check_case(case, "ring", "zigzag")


def test_bad_input_raises_on_every_rank_and_no_rank_hangs(pool2):
    """Each bad call must raise on both ranks (pytest.raises in each worker); a rank left in a
    collective would time out on the group (30 s) and fail the workers."""
    pool2.run(_errors_worker)


# ----------------------------------------------------------------------------- explicit backends


def _backend_worker(rank: int, world: int, backend: str) -> None:
    # chunked: the ring's PyTorch stand-in backward; cpu_kernel: the kernel's own backward,
    # which takes the softmax backward's row term from the global `out`.
    case = Case("rope+t5", docs=True, padding=True, hkv=2, n=16, b=1, d=16)
    q, k, v, pe, grad_out, kw = make(case, (backend,))
    for strategy, layout in (("ring", "zigzag"), ("ring", "contiguous"), ("all_to_all", "zigzag")):
        got = run_cp(q, k, v, pe, grad_out, kw, None, strategy, layout, backend=backend)
        truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
        assert_close_f64(got, truth, label=f"{strategy}/{layout}/{backend}: ")


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_through_each_cpu_backend(pool2, backend, dtype):
    if backend == "cpu_kernel":
        from relattn.backends import cpu_kernel

        if not cpu_kernel.available():
            pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.build_error()}")
    pool2.run(_backend_worker if dtype == "float32" else _bf16_worker, backend)


def _bf16_worker(rank: int, world: int, backend: str) -> None:
    # 16-bit blocks: the partial lse merge and the kernel's backward (bf16 out, float32 lse);
    # D = 32, where the CPU kernel multiplies bf16 in pairs of features on AVX-512-BF16.
    case = Case("t5", docs=True, padding=True, hkv=2, n=16, b=1, d=32)
    q, k, v, pe, grad_out, kw = make(case, (backend, "bf16"))
    q, k, v, grad_out = (t.to(torch.bfloat16) for t in (q, k, v, grad_out))
    got = run_cp(q, k, v, pe, grad_out, kw, None, "ring", "zigzag", backend=backend)
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    naive = run_math(q, k, v, pe, grad_out, torch.bfloat16, **kw)
    assert_flash_accuracy(got, naive, truth, torch.bfloat16, label=f"ring bf16/{backend}: ")


def test_auto_ring_backend_on_cpu():
    from relattn.backends import choose, cpu_kernel
    from relattn.problem import Problem

    q = torch.zeros(1, 2, 8, 4)
    want = "cpu_kernel" if cpu_kernel.available() else "chunked"
    p = Problem(lo=0, scale=1.0)
    assert choose("auto", q, q, p, context_parallel=True).name == want
    assert choose("auto", q.bfloat16(), q.bfloat16(), p, context_parallel=True).name == want


# ----------------------------------------------------------------------------- triton route


def _triton_worker(rank: int, world: int) -> None:
    # The triton backend runs the ring blocks' forward; their backward is the blockwise stand-in
    # (triton takes the softmax backward's row term from its own block probabilities, not from
    # the global `out`). The interpreter runs it on CPU.
    case = Case("rope+t5", docs=True, padding=True, hkv=2, n=16, b=1, d=16)
    q, k, v, pe, grad_out, kw = make(case, ("triton",))
    got = run_cp(q, k, v, pe, grad_out, kw, None, "ring", "zigzag", backend="triton")
    truth = run_math(q, k, v, pe, grad_out, torch.float64, **kw)
    assert_close_f64(got, truth, label="ring/triton: ")


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or Triton's interpreter")  # fmt: skip
def test_ring_through_the_triton_backward(pool2):
    pytest.importorskip("triton")
    pool2.run(_triton_worker)


# ----------------------------------------------------------------------------- training


def _training_worker(rank: int, world: int) -> None:
    from relattn.models import TinyLM, TinyLMConfig

    for strategy, layout, pe, rope in (("ring", "zigzag", "t5", True),
                                       ("all_to_all", "contiguous", "kerple", False),
                                       ("ring", "zigzag", "fox", False),
                                       ("all_to_all", "contiguous", "inkling", True),
                                       ("ring", "contiguous", "inkling", False)):  # fmt: skip
        torch.manual_seed(0)
        cfg = TinyLMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           pe=pe, rope=rope)  # fmt: skip
        model = TinyLM(cfg)
        idx = torch.randint(0, 32, (2, 33), generator=torch.Generator().manual_seed(1))
        inputs, targets = idx[:, :-1], idx[:, 1:]
        docs = torch.zeros_like(inputs)
        docs[0, 13:] = 1
        docs[1, 21:] = 5
        # One process, whole sequence: mean loss over all tokens.
        logits = model(inputs, doc_ids=docs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        # Context parallel: each rank's loss is its tokens' share of the same mean, and every
        # parameter's gradient is summed over the group.
        cp = ContextParallel(None, strategy, layout)
        x, y, d = (shard(t, None, layout, dim=1) for t in (inputs, targets, docs))
        logits = model(x, doc_ids=d, context_parallel=cp)
        loss = (
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            / targets.numel()
        )
        loss.backward()
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            tol = 1e-5 * (1 + want[name].abs().max().item())
            err = (grad - want[name]).abs().max().item()
            assert err <= tol, f"{strategy}: {name}: gradient error {err:.3g} > {tol:.3g}"


def test_training_step_gives_the_whole_sequence_gradients(pool2):
    """TinyLM with RoPE, GQA and packed documents: every parameter's gradient (embedding,
    projections, norms, the encodings, the forget gate's and the band's projections and P)
    equals one process on the whole sequence."""
    pool2.run(_training_worker)


def test_example_cp_train_with_torchrun():
    """examples/cp_train.py under ``torchrun --nproc-per-node 2``: the context-parallel losses
    equal the single-process losses of the same steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "cp_train.py"), "--seq-len", "64", "--steps", "3",
           "--d-model", "32", "--layers", "1", "--check"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKERS_TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cp loss" in res.stdout and "agree" in res.stdout, res.stdout


# ----------------------------------------------------------------------------- token terms


@dataclass(frozen=True)
class TokenCase:
    """A call with the query-conditioned band (``extent`` > 0) and/or the forget gate."""

    extent: int = 0  # the band's W; 0: no band
    gate: bool = False
    shared: bool = True  # one P for all heads, or one per head
    causal: bool = True
    window: int | None = None
    docs: bool = False
    padding: bool = False
    pe: str = "none"  # an additive encoding / RoPE beside the terms (cases.ENCODINGS)
    hq: int = 4
    hkv: int = 2
    n: int = 32
    b: int = 2
    d: int = 8
    rank: int = 3


TOKEN_CASES = [
    TokenCase(extent=5),  # a band narrower than a chunk
    TokenCase(extent=20, shared=False, causal=False, padding=True),  # wider: reaches 2+ chunks
    TokenCase(gate=True, docs=True),
    TokenCase(gate=True, causal=False, window=9, hkv=4),
    TokenCase(extent=11, gate=True, pe="rope+t5", docs=True, window=13),
    TokenCase(extent=40, gate=True, shared=False, hkv=1, padding=True, pe="alibi"),
]
TOKEN_CASES_4 = [
    TokenCase(extent=11, gate=True, hq=8, hkv=4, docs=True),
    TokenCase(extent=6, gate=True, shared=False, causal=False, hq=4, hkv=4, pe="t5_bidir"),
]


def make_token(case: TokenCase, seed_parts) -> tuple:
    """Whole-sequence inputs: q, k, v, grad_out, r, weight, log_f (None when absent), pe, kw."""
    g = torch.Generator().manual_seed(seed_of(case, *seed_parts))
    torch.manual_seed(seed_of(case, *seed_parts))
    b, hq, n = case.b, case.hq, case.n
    q = torch.randn(b, hq, n, case.d, generator=g)
    k = torch.randn(b, case.hkv, n, case.d, generator=g)
    v = torch.randn(b, case.hkv, n, case.d, generator=g)
    grad_out = torch.randn(b, hq, n, case.d, generator=g)
    r = weight = log_f = None
    if case.extent:
        r = torch.randn(b, hq, n, case.rank, generator=g)
        shape = (case.rank, case.extent) if case.shared else (hq, case.rank, case.extent)
        weight = torch.randn(shape, generator=g)
    if case.gate:
        log_f = -0.3 * torch.rand(b, hq, n, generator=g)
    pe = ENCODINGS[case.pe](hq, case.d, g)
    kw = {"causal": case.causal, "window": case.window}
    if case.docs:
        kw["doc_ids"] = _doc_ids(b, n, g)
    if case.padding:
        kw["key_padding_mask"] = _padding(b, n, g)
    return q, k, v, grad_out, r, weight, log_f, pe, kw


def run_token_cp(inputs, group, strategy, layout, backend="auto") -> dict:
    """Out and the gradients of q, k, v, r, weight, log_f (those given), whole-sequence shaped:
    each rank passes its shards (r and log_f too) and the weight's gradient is summed over the
    group (the recipe for parameters)."""
    from relattn.pe import ForgetGate, QueryConditionedBias

    q, k, v, grad_out, r, weight, log_f, pe, kw = inputs
    leaves = {name: shard(t, group, layout, dim=2).requires_grad_(True)
              for name, t in (("q", q), ("k", k), ("v", v), ("r", r), ("log_f", log_f))
              if t is not None}  # fmt: skip
    skw = dict(kw)
    for name in ("doc_ids", "key_padding_mask"):
        if name in kw:
            skw[name] = shard(kw[name], group, layout, dim=1)
    terms = [] if pe is None else list(pe) if isinstance(pe, list) else [pe]
    qcb = None
    if r is not None:
        qcb = QueryConditionedBias(q.shape[1], weight.shape[-2], weight.shape[-1],
                                   shared_heads=weight.dim() == 2)  # fmt: skip
        with torch.no_grad():
            qcb.weight.copy_(weight)
        terms.append(qcb(leaves["r"]))
    if log_f is not None:
        terms.append(ForgetGate()(leaves["log_f"]))
    out = context_parallel_attention(leaves["q"], leaves["k"], leaves["v"], terms, group=group,
                                     strategy=strategy, layout=layout, backend=backend,
                                     **skw)  # fmt: skip
    assert out.shape == leaves["q"].shape and out.dtype == q.dtype
    out.backward(shard(grad_out, group, layout, dim=2))
    res = {"out": unshard(out.detach(), group, layout, dim=2)}
    for name, t in leaves.items():
        grad = t.grad if t.grad is not None else torch.zeros_like(t)
        res[name] = unshard(grad, group, layout, dim=2)
    if qcb is not None:
        grad = qcb.weight.grad.clone()
        dist.all_reduce(grad, group=group)
        res["weight"] = grad
    return {n: res[n] for n in ("out", "q", "k", "v", "r", "weight", "log_f") if n in res}


def check_token_case(case: TokenCase, strategy: str, layout: str, backend="auto",
                     group=None) -> None:  # fmt: skip
    from token_oracle import run_token_math

    inputs = make_token(case, (strategy, layout))
    q, k, v, grad_out, r, weight, log_f, pe, kw = inputs
    got = run_token_cp(inputs, group, strategy, layout, backend)
    truth = run_token_math(q, k, v, grad_out, r=r, weight=weight, log_f=log_f, pe=pe, **kw)
    assert_close_f64(got, truth, label=f"{strategy}/{layout}/{backend}/{case}: ")


def _token_worker(rank: int, world: int, cases: list[TokenCase], strategies) -> None:
    for strategy, layout in strategies:
        for case in cases:
            if strategy == "all_to_all" and case.hkv % world:
                continue  # MQA: no heads to split
            check_token_case(case, strategy, layout)


def test_token_terms_world_2(pool2):
    """W = 2: the band (narrower and wider than a chunk, shared and per-head P), the forget
    gate, both, beside RoPE and tables, GQA and MQA, windows, documents, padding: out and every
    gradient (q, k, v, r, P, log f) against float64 math over the whole sequence."""
    pool2.run(_token_worker, TOKEN_CASES, STRATEGY_LAYOUTS)


def test_token_terms_world_4(pool4):
    """W = 4: F's offsets come from three earlier ranks' totals; a band wider than a chunk."""
    pool4.run(_token_worker, TOKEN_CASES_4, STRATEGY_LAYOUTS[:3])


def _token_group_of_one_worker(rank: int, world: int) -> None:
    # W = 1: the plain op on the whole sequence, bit for bit.
    singles = [dist.new_group([r]) for r in range(world)]
    case = TokenCase(extent=7, gate=True, docs=True)
    inputs = make_token(case, ("one", rank))
    got = run_token_cp(inputs, singles[rank], "ring", "zigzag")
    from token_oracle import run_token_relattn

    q, k, v, grad_out, r, weight, log_f, pe, kw = inputs
    want = run_token_relattn(q, k, v, grad_out, "auto", r=r, weight=weight, log_f=log_f, **kw)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_token_terms_world_1(pool2):
    pool2.run(_token_group_of_one_worker)


@pytest.mark.parametrize("backend", ["chunked", "cpu_kernel"])
def test_token_terms_through_each_cpu_backend(pool2, backend):
    if backend == "cpu_kernel":
        from relattn.backends import cpu_kernel

        if not cpu_kernel.available():
            pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.build_error()}")
    pool2.run(_token_backend_worker, backend)


def _token_backend_worker(rank: int, world: int, backend: str) -> None:
    # A backend with token_terms runs the blocks' forward itself (and, if it takes the row term
    # from out, the ring's backward too); the others run the blockwise stand-ins.
    from relattn.distributed import _block

    impl = relattn.backends.get(backend)
    used = {"forward": 0, "backward": 0}
    forward, backward = _block._forward_stand_in, _block._backward_from_out

    def counted(name, fn):
        def wrapper(*args):
            used[name] += 1
            return fn(*args)

        return wrapper

    _block._forward_stand_in = counted("forward", forward)
    _block._backward_from_out = counted("backward", backward)
    try:
        case = TokenCase(extent=9, gate=True, shared=False, docs=True, padding=True, d=16, n=16)
        for strategy, layout in (("ring", "zigzag"), ("all_to_all", "contiguous")):
            check_token_case(case, strategy, layout, backend=backend)
    finally:
        _block._forward_stand_in, _block._backward_from_out = forward, backward
    assert (used["forward"] > 0) == (not impl.token_terms), used
    assert (used["backward"] > 0) == (not (impl.token_terms and impl.row_term_from_out)), used


def _token_errors_worker(rank: int, world: int) -> None:
    from relattn.pe import ForgetGate, QueryConditionedBias

    case = TokenCase(extent=5, gate=True)
    q, k, v, _, r, weight, log_f, _, _ = make_token(case, ("errors",))
    sq, sk, sv, sr, sf = (shard(t, None, "zigzag", dim=2) for t in (q, k, v, r, log_f))
    cpa = context_parallel_attention
    qcb = QueryConditionedBias(4, 3, 5)
    with torch.no_grad():
        qcb.weight.copy_(weight)
    # The whole sequence's r (or log f) instead of this rank's shard, on every rank or one.
    _expect_error(ValueError, r"r must be this rank's shard.*\(2, 4, 16, 3\)", lambda: cpa(
        sq, sk, sv, qcb(r)))  # fmt: skip
    bad = sf if rank == 0 else log_f
    _expect_error(ValueError, "log_f must be this rank's shard|rank 1", lambda: cpa(
        sq, sk, sv, ForgetGate()(bad)))  # fmt: skip
    # Ranks whose band weights differ.
    other = QueryConditionedBias(4, 3, 5)
    with torch.no_grad():
        other.weight.fill_(float(rank))
    _expect_error(ValueError, "same pe", lambda: cpa(sq, sk, sv, other(sr)))
    # One rank needs gradients, the other not (its backward would wait forever).
    qcb.requires_grad_(False)
    leaf = sq.clone().requires_grad_(rank == 0)
    _expect_error(ValueError, "same need for gradients", lambda: cpa(leaf, sk, sv, qcb(sr)))
    # Still in step afterwards.
    check_token_case(case, "ring", "zigzag")


def test_token_terms_bad_input(pool2):
    pool2.run(_token_errors_worker)


@pytest.mark.parametrize(
    "causal, window, q_offset, nq, nk, band, gate, per_head, docs",
    [
        (True, 0, 0, 45, 45, True, True, False, False),
        (False, 0, 0, 40, 40, True, True, True, True),
        (True, 6, 0, 33, 33, False, True, False, True),
        (False, 7, -13, 20, 29, True, False, True, False),
        (True, 0, 31, 20, 51, True, True, False, False),
        (False, 0, 3, 24, 30, True, True, True, False),
    ],
)
def test_token_stand_in_equals_the_reference(monkeypatch, causal, window, q_offset, nq, nk, band,
                                             gate, per_head, docs):  # fmt: skip
    """The blockwise stand-in (forward and backward, row blocks of 16) with the band and the
    gate equals the reference backend's on one whole call, float64."""
    from relattn.backends.base import TokenTerms
    from relattn.distributed import _block

    monkeypatch.setattr(_block, "_SCORES_PER_BLOCK", 1)
    g = torch.Generator().manual_seed(seed_of(causal, window, q_offset, nq, "token"))
    b, hq, hkv, d, rank, extent, dt = 2, 4, 2, 8, 3, 7, torch.float64
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dt)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dt)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dt)
    lo, hi = relattn.masks.offset_range(nq, nk, causal, q_offset, window)
    tab = torch.randn(hq, hi - lo + 1, generator=g, dtype=dt)
    r = torch.randn(b, hq, nq, rank, generator=g, dtype=dt) if band else None
    w = torch.randn(hq if per_head else 1, rank, extent, generator=g, dtype=dt) if band else None
    f = torch.cumsum(-torch.rand(b, hq, max(nk, q_offset + nq) + 20, generator=g, dtype=dt), -1)
    fk = f[..., 20 : 20 + nk].contiguous() if gate else None
    fq = f[..., 20 + q_offset : 20 + q_offset + nq].contiguous() if gate else None
    doc_ids = _doc_ids(b, nk, g) if docs else None
    ref = relattn.backends.get("reference")
    call = _block.block_call(ref, q, k, v, tab, None, lo, 0.3, causal, q_offset, window, doc_ids,
                             None, TokenTerms(r, w, fq, fk))  # fmt: skip
    out, lse = ref.forward(call)
    got_out, got_lse = _block._forward_stand_in(call)
    assert torch.equal(lse == float("-inf"), got_lse == float("-inf"))
    seen = lse > float("-inf")
    assert (out - got_out).abs().max().item() < 1e-12
    assert (lse[seen] - got_lse[seen]).abs().max().item() < 1e-12
    grad_out = torch.randn(out.shape, generator=g, dtype=dt)
    want = ref.backward(call, grad_out, out, lse)
    got = _block._backward_from_out(call, grad_out, out, lse)
    names = ("dq", "dk", "dv", "dtable", "dr", "dweight", "dfq", "dfk")
    for name, x, y in zip(names, want, got, strict=True):
        if x is None:
            assert y is None, name
            continue
        assert (x - y).abs().max().item() < 1e-12, name
