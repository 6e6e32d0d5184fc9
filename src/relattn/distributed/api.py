"""``context_parallel_attention``: one sequence sharded over a process group, exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import backends
from .._validate import check_bool, check_choice, check_optional_int
from ..cache import within_doc_positions
from ..call import (
    PE,
    check_per_key,
    check_scale,
    check_tensors,
    encoding_terms,
    split_pe,
    token_terms,
)
from ..functional import attention
from ..masks import contiguous_documents, offset_range
from ..pe.token import BandTerm, GateTerm
from ..problem import Problem
from . import all_to_all, ring
from ._agree import agree, comm_device, float_fact, text_fact
from ._token import global_cumulative
from .layout import check_layout, gather, shard, shard_positions, unshard, world

__all__ = ["STRATEGIES", "ContextParallel", "context_parallel_attention"]

STRATEGIES = ("ring", "all_to_all")


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pe: PE = None,
    *,
    group=None,
    strategy: str = "ring",
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`relattn.attention` over a sequence whose tokens are split across ``group``.

    Every rank of the group calls it with its shard (see :mod:`relattn.distributed.layout`:
    N tokens, rank r holds N/W of them in the order of ``layout``) and gets its shard of the
    output, equal to the rows of one process's ``attention`` over the whole sequence. Offsets
    ``i - j`` (the encoding's table, RoPE's rotation, the causal mask, the window) are global.

    Args:
        q: ``(B, Hq, N/W, D)``, this rank's queries.
        k, v: ``(B, Hkv, N/W, D)``; ``Hq`` a multiple of ``Hkv`` (GQA).
        pe: as :func:`relattn.attention`: None, an additive encoding, a RoPE, a term that
            depends on the tokens, or a list. Terms take this rank's shard:
            ``QueryConditionedBias(...)(r)`` with ``r (B, Hq, N/W, rank)``, the latents of
            this rank's queries, and ``ForgetGate()(log_f)`` with ``log_f (B, Hq, N/W)`` of
            this rank's tokens (its cumulative sum over the shard; the previous positions'
            totals, from the other ranks, are added here, so ``F`` is global).
        group: the context-parallel process group (None: the default group; one process
            without torch.distributed initialized). A group of one is the plain op.
        strategy: ``"ring"`` (keys and values travel around the group) or ``"all_to_all"``
            (heads are split instead of tokens; needs Hq and Hkv divisible by W).
        layout: ``"zigzag"`` (balanced under a causal mask; N/W even) or ``"contiguous"``.
        causal, scale, window: as :func:`relattn.attention`, in global positions.
        doc_ids: ``(B, N/W)`` this rank's shard of the document ids (each document one
            contiguous run of global positions; documents may cross shards).
        key_padding_mask: ``(B, N/W)`` bool shard, True for real tokens.
        backend: ``"auto"`` (triton on CUDA, the CPU kernel on the CPU where it can be built,
            else chunked), ``"chunked"``, ``"cpu_kernel"`` or ``"triton"`` (a fused backend:
            blocks merge by their log-sum-exp, which the reference backend does not return).

    Returns:
        ``(B, Hq, N/W, D)`` in q's dtype: this rank's shard of the output.

    Gradients: dq, dk, dv, and r's and log f's, are this rank's shard of the whole-sequence
    gradients (log f's includes what the later ranks' positions give it). The table's
    gradient (hence the encoding's parameters') and the band's weight's hold this rank's share:
    summed over the group they are the whole-sequence gradient, the same rule as every other
    parameter of a model whose loss is split over the group's tokens (see
    docs/context-parallel.md).

    Raises:
        ValueError, TypeError: on every rank of the group, whichever rank's input is wrong
        (shapes, encodings or options that differ between ranks included).
    """
    _rank, size = world(group)
    if size == 1:
        _choice("strategy", strategy, STRATEGIES)
        check_layout(layout)
        return attention(
            q, k, v, pe, causal=causal, scale=scale, window=window, doc_ids=doc_ids,
            key_padding_mask=key_padding_mask, backend=backend,
        )  # fmt: skip
    facts, error, parsed = _check_local(
        q, k, v, pe, size, strategy, layout, causal, scale, window, doc_ids, key_padding_mask,
        backend,
    )  # fmt: skip
    hint = q.device if isinstance(q, Tensor) else None
    agree(group, comm_device(group, hint), facts, error, "context_parallel_attention")
    rope, additive, terms, scale, window, impl = parsed
    n = q.shape[2]
    docs = gather(doc_ids.to(torch.int64), group, layout, dim=1) if doc_ids is not None else None
    kpm = gather(key_padding_mask, group, layout, dim=1) if key_padding_mask is not None else None
    if docs is not None:
        _check_documents(docs)
    if rope is not None:
        pos = shard_positions(n, group, layout, device=q.device)
        q, k = rope.rotate(q, pos), rope.rotate(k, pos)
    lo, hi = offset_range(n * size, n * size, causal, 0, window)
    table, slopes = encoding_terms(additive, lo, hi, q, impl.closed_form)
    r = weight = f = None
    if terms:
        # checked in _parse; compute dtype; F not detrended (made global below)
        (r, weight, f, _), _ = token_terms(terms, q, n, 0, detrend=False)
        if f is not None:
            f = global_cumulative(f, group, layout)  # a collective (and in the backward)
    rank = dist.get_rank(group)
    if strategy == "ring":
        chunk = n if layout == "contiguous" else n // 2
        steps = ring.ring_steps(size, n, layout, causal, window)
        ring_plan = ring.Plan(group, rank, size, n, chunk, steps, lo, scale, causal, window, impl)
        ring.plan_calls(ring_plan, layout, docs, kpm)
        return ring.RingAttention.apply(q, k, v, table, slopes, r, weight, f, ring_plan)
    plan = all_to_all.Plan(group, rank, size, layout, n, lo, scale, causal, window, impl, docs, kpm)
    return all_to_all.AllToAllAttention.apply(q, k, v, table, slopes, r, weight, f, plan)


@dataclass(frozen=True)
class ContextParallel:
    """How a layer splits its sequence: the group, the strategy and the shard layout.

    Pass it to :class:`relattn.nn.RelativeSelfAttention` or :class:`relattn.models.TinyLM`
    (``context_parallel=``); their inputs are then this rank's shard of the tokens.
    """

    group: object = None
    strategy: str = "ring"
    layout: str = "zigzag"

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        check_layout(self.layout)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, pe: PE = None, **kwargs) -> Tensor:
        """:func:`context_parallel_attention` with this group, strategy and layout."""
        return context_parallel_attention(
            q, k, v, pe, group=self.group, strategy=self.strategy, layout=self.layout, **kwargs
        )

    def positions(self, n_local: int, device=None, doc_ids: Tensor | None = None) -> Tensor:
        """Global positions of this rank's tokens, ``(n_local,)``; with ``doc_ids (B, n_local)``
        the position inside each token's document, ``(B, n_local)`` (a collective)."""
        if doc_ids is None:
            return shard_positions(n_local, self.group, self.layout, device=device)
        whole = unshard(doc_ids.to(torch.int64), self.group, self.layout, dim=1)
        pos = within_doc_positions(whole)[0]
        return shard(pos, self.group, self.layout, dim=1)


# ----------------------------------------------------------------------------- helpers


def _check_documents(docs: Tensor) -> None:
    if not bool(contiguous_documents(docs)):
        raise ValueError(
            "context_parallel_attention: doc_ids must give each document one contiguous run of "
            "global positions; the shards put together do not (were they sharded with the same "
            "layout as q? use relattn.distributed.shard(doc_ids, group, layout, dim=1))"
        )


def _choice(name: str, value, choices) -> str:
    return check_choice(name, value, tuple(choices))


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")" if isinstance(t, Tensor) else "-"


def _fingerprint(name: str, t: Tensor) -> str:
    x = t.detach().double()
    return f"|{name}{tuple(x.shape)}:{x.sum().item()!r}:{(x * x).sum().item()!r}"


def _pe_fact(pe) -> tuple[int, str]:
    """A fingerprint of the encodings: types, settings, and their parameters' values (a token
    term: the band's weight; r and F are each rank's own, their shapes are checked)."""
    items = [] if pe is None else list(pe) if isinstance(pe, (list, tuple)) else [pe]
    parts, names = [], []
    for e in items:
        names.append(type(e).__name__)
        desc = f"{type(e).__name__}({e.extra_repr() if hasattr(e, 'extra_repr') else ''})"
        if isinstance(e, torch.nn.Module):
            for pname, p in [*e.named_parameters(), *e.named_buffers()]:
                desc += _fingerprint(pname, p)
        elif isinstance(e, BandTerm) and isinstance(e.weight, Tensor):
            desc += _fingerprint("weight", e.weight)
        parts.append(desc)
    code = text_fact(";".join(parts))
    return code, f"{'+'.join(names) or 'None'} (fingerprint {code:08x})"


def _check_local(q, k, v, pe, size, strategy, layout, causal, scale, window, doc_ids,
                 key_padding_mask, backend):  # fmt: skip
    """This rank's facts to compare across ranks, its own input error (or None), and the
    parsed arguments ``(rope, additive encodings, scale, window, backend name)``."""
    facts = {
        "q shape (B, Hq, N/W, D)": _shape(q),
        "k shape (B, Hkv, N/W, D)": _shape(k),
        "v shape": _shape(v),
        "dtype": str(getattr(q, "dtype", "-")),
        "device type": str(getattr(getattr(q, "device", None), "type", "-")),
        "causal": repr(causal),
        "window": repr(window),
        "strategy": repr(strategy),
        "layout": repr(layout),
        "backend": repr(backend),
        "doc_ids (given or None)": "given" if doc_ids is not None else "None",
        "key_padding_mask (given or None)": "given" if key_padding_mask is not None else "None",
        "need for gradients": _needs_grad(q, k, v, pe),
    }
    record = {name: (text_fact(val), val) for name, val in facts.items()}
    record["pe"] = _pe_fact(pe)
    record["scale"] = (0, "-")
    try:
        parsed = _parse(q, k, v, pe, size, strategy, layout, causal, scale, window, doc_ids,
                        key_padding_mask, backend)  # fmt: skip
    except (TypeError, ValueError, RuntimeError) as e:
        return record, e, None
    record["scale"] = (float_fact(parsed[3]), repr(parsed[3]))
    return record, None, parsed


def _needs_grad(q, k, v, pe) -> str:
    """Whether this call records a backward (every rank must: the backward is collective)."""
    if not torch.is_grad_enabled():
        return "no (grad mode off)"
    items = [] if pe is None else list(pe) if isinstance(pe, (list, tuple)) else [pe]
    tensors = [q, k, v]
    for e in items:
        if isinstance(e, torch.nn.Module):
            tensors += list(e.parameters())
        elif isinstance(e, BandTerm):
            tensors += [e.r, e.weight]
        elif isinstance(e, GateTerm):
            tensors.append(e.cumulative)
    return "yes" if any(isinstance(t, Tensor) and t.requires_grad for t in tensors) else "no"


def _parse(q, k, v, pe, size, strategy, layout, causal, scale, window, doc_ids,
           key_padding_mask, backend):  # fmt: skip
    """relattn.call's checks (the one validator), the shard's own rules, and the backend
    (``backends.choose`` among backends with ``context_parallel`` set; for ``"auto"`` with
    token terms, among those that also compute them, else chunked: a block whose backend does
    not compute them runs the blockwise stand-in). Returns ``(rope, additive encodings, token
    terms, scale, window, backend)``."""
    _choice("strategy", strategy, STRATEGIES)
    check_layout(layout)
    names = backends.names()
    fused = [n for n in names if n == "auto" or _context_parallel(n)]
    if isinstance(backend, str) and backend in names and backend not in fused:
        raise ValueError(
            f"backend={backend!r} cannot run context parallel: blocks merge by their "
            f"log-sum-exp, which only a fused backend returns; use one of {tuple(fused)}"
        )
    _choice("backend", backend, fused)
    b, hq, n, d, nk = check_tensors(q, k, v)
    if nk != n:
        raise ValueError(
            f"k and v must have shape (B, Hkv, N/W, D) with q's B, N/W and D; got q {_shape(q)}, "
            f"k {_shape(k)}, v {_shape(v)}"
        )
    hkv = k.shape[1]
    if layout == "zigzag" and n % 2:
        raise ValueError(
            f"layout='zigzag' gives each rank two equal chunks, so the shard length N/W must be "
            f"even; got q with N/W = {n} (the sequence length must be divisible by 2W = {2 * size})"
        )
    if strategy == "all_to_all" and (hq % size or hkv % size):
        raise ValueError(
            f"strategy='all_to_all' splits the heads over the {size} ranks, so Hq and Hkv must be "
            f"divisible by {size}; got Hq={hq}, Hkv={hkv} (use strategy='ring')"
        )
    check_bool("causal", causal)
    scale = check_scale(scale, d)
    window = check_optional_int("window", window, min=1) or 0
    for name, t in (("doc_ids", doc_ids), ("key_padding_mask", key_padding_mask)):
        if t is not None:
            check_per_key(name, t, b, n, q, "(B, N/W)")
    rope, additive, terms = split_pe(pe, hq, d)
    for term in terms:
        _check_shard_term(term, b, hq, n, q)
    problem = Problem(0, scale, causal, 0, window, doc_ids, key_padding_mask)
    token = bool(terms) and backend == "auto"
    impl = backends.choose(backend, q, k, problem, context_parallel=True, token=token)
    return rope, additive, terms, scale, window, impl


def _check_shard_term(term, b: int, hq: int, n: int, q: Tensor) -> None:
    """A token term of this rank's shard: r ``(B, Hq, N/W, rank)`` or F ``(B, Hq, N/W)``."""
    if isinstance(term, BandTerm):
        r = term.r
        want = (b, hq, n, term.rank)
        if tuple(r.shape) != want:
            raise ValueError(
                f"r must be this rank's shard, the latents of its queries: shape (B, Hq, N/W, "
                f"rank) = {want}; got {_shape(r)}"
            )
        if r.device != q.device:
            raise ValueError(f"r must be on q's device {q.device}; got {r.device}")
    elif isinstance(term, GateTerm):
        f = term.cumulative
        if tuple(f.shape) != (b, hq, n):
            raise ValueError(
                f"log_f must be this rank's shard, one value per token of the shard: shape "
                f"(B, Hq, N/W) = ({b}, {hq}, {n}); got {_shape(f)}"
            )
        if f.device != q.device:
            raise ValueError(f"log_f must be on q's device {q.device}; got {f.device}")


def _context_parallel(name: str) -> bool:
    try:
        return backends.get(name).context_parallel
    except RuntimeError:  # not available here: choose() says why
        return True
