"""Position terms that depend on the tokens: a query-conditioned banded bias and a forget gate.

Every other encoding is a table over offsets, fixed for a call. These two condition the term
on the tokens, so each call brings its own tensors; the encoding module holds what is learned
once (the band's matrix P) and calling it with the per-call tensors gives the *term* that
:func:`relattn.attention` takes as ``pe`` (alone, or in a list with RoPE and table
encodings)::

    qcb = relattn.pe.QueryConditionedBias(num_heads=8, rank=16, extent=1024)
    out = relattn.attention(q, k, v, qcb(r))                      # r (B, Hq, Nq, rank)
    out = relattn.attention(q, k, v, relattn.pe.ForgetGate()(log_f))   # log_f (B, Hq, Nk)

With the query at position ``p_i = q_offset + i`` and key ``j`` at ``j``, ``Δ = p_i - j``:

* the banded bias (Inkling): ``PE(i, j) = Σ_c r[b, h, i, c] · P[c, Δ]`` for ``0 <= Δ < W``
  (``W`` = extent), 0 beyond the band and for keys after the query;
* the forget gate (FoX): ``F = cumsum(log f)`` over key positions, ``PE(i, j) = F[p_i] - F[j]``
  for ``Δ >= 0`` (a product of forget gates, ``≤ 0``); keys after the query (bidirectional
  calls only) get ``F[j] - F[p_i]``, so the term is ``-|F[p_i] - F[j]|`` both ways and ALiBi
  ``-m·|Δ|`` is the special case ``log f = -m``.

Gradients reach r, P and log f (and through them whatever computed them) on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_bool, check_int, shape_str
from .registry import Param, register

__all__ = ["BandTerm", "ForgetGate", "GateTerm", "QueryConditionedBias", "TokenTerm"]


class TokenTerm:
    """A position term of one call that depends on the tokens (what :class:`QueryConditionedBias`
    and :class:`ForgetGate` return when called); ``relattn.attention`` takes it as ``pe``.

    Attributes:
        num_heads: Hq, the query heads it serves.
    """

    num_heads: int

    def bias(self, nq: int, nk: int, q_offset: int = 0) -> Tensor:
        """The dense term ``(B, Hq, nq, nk)`` for inspection (``explain``, tests): ``O(N²)``
        memory; attention never builds it. Entries that masks hide are included."""
        raise NotImplementedError


def _check_bias_args(nq: object, nk: object, q_offset: object) -> tuple[int, int, int]:
    """``bias``'s arguments as ints (``nq, nk >= 0``), else a TypeError / ValueError naming one."""
    return (
        check_int("nq", nq, min=0),
        check_int("nk", nk, min=0),
        check_int("q_offset", q_offset, min=-(1 << 62), max=1 << 62),
    )


def check_log_f_values(log_f: Tensor) -> None:
    """Raise a ValueError unless every ``log f`` is finite and ``<= 0`` (eager calls; under
    torch.compile the check is skipped, on accelerators it is asynchronous).

    A gate of exactly 0 (``log f = -inf``, e.g. ``log(sigmoid(x))`` underflowing) is refused:
    ``F`` would be ``-inf`` from there on and ``F_i - F_j = -inf - (-inf)`` NaN on every
    backend. ``logsigmoid(x)`` gives the same gates without the underflow.
    """
    if not log_f.numel() or torch.compiler.is_compiling():
        return
    ok = ((log_f <= 0) & (log_f > float("-inf"))).all()  # NaN fails it too
    message = (
        "log_f must be <= 0 and finite everywhere (the log of a forget gate f in (0, 1]; "
        "a gate of exactly 0 gives -inf: use logsigmoid(x), not log(sigmoid(x)))"
    )
    if log_f.device.type == "cpu":
        if not bool(ok):
            bad = log_f.detach()
            bad = bad[~((bad <= 0) & (bad > float("-inf")))]
            raise ValueError(f"{message}; got a value {bad[0].item():g}")
    else:
        torch._assert_async(ok, message)  # no host sync on accelerators


def _grid(nq: int, nk: int, q_offset: int, device: torch.device) -> Tensor:
    rows = torch.arange(nq, device=device).view(-1, 1)
    return q_offset + rows - torch.arange(nk, device=device)


class BandTerm(TokenTerm):
    """The query-conditioned banded bias of one call: ``PE(i, j) = Σ_c r[b, h, i, c]·P[c, Δ]``
    for ``0 <= Δ < W``, else 0.

    Args:
        r: ``(B, Hq, Nq, R)``, each query row's latent (the rows of this call's queries).
        weight: ``(R, W)`` shared by the heads, or ``(Hq, R, W)``.
    """

    def __init__(self, r: Tensor, weight: Tensor) -> None:
        if not isinstance(weight, Tensor) or weight.dim() not in (2, 3):
            raise ValueError(
                "weight must be (rank, extent) or (num_heads, rank, extent); got "
                + (shape_str(weight) if isinstance(weight, Tensor) else type(weight).__name__)
            )
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor; got {weight.dtype}")
        rank, extent = weight.shape[-2], weight.shape[-1]
        if rank < 1 or extent < 1:
            raise ValueError(f"weight must have rank >= 1 and extent >= 1; got {shape_str(weight)}")
        if not isinstance(r, Tensor):
            raise TypeError(f"r must be a torch.Tensor (B, Hq, Nq, rank); got {type(r).__name__}")
        if r.dim() != 4 or r.shape[-1] != rank:
            raise ValueError(
                f"r must be 4-D (B, Hq, Nq, rank={rank}); got {r.dim()}-D shape {shape_str(r)}"
            )
        if weight.dim() == 3 and weight.shape[0] != r.shape[1]:
            raise ValueError(
                f"r must have weight's {weight.shape[0]} heads: (B, Hq={weight.shape[0]}, Nq, "
                f"rank); got {shape_str(r)}"
            )
        if not r.is_floating_point():
            raise TypeError(f"r must be a floating-point tensor; got dtype {r.dtype}")
        if r.device != weight.device:
            raise ValueError(
                f"r must be on the weight's device {weight.device}; got {r.device} "
                "(move the encoding with .to(device))"
            )
        self.r, self.weight = r, weight
        self.num_heads = r.shape[1]
        self.rank, self.extent = rank, extent

    def bias(self, nq: int, nk: int, q_offset: int = 0) -> Tensor:
        nq, nk, q_offset = _check_bias_args(nq, nk, q_offset)
        r, w = self.r, self.weight
        if r.shape[2] != nq:
            raise ValueError(f"r has {r.shape[2]} query rows; bias asked for nq={nq}")
        delta = _grid(nq, nk, q_offset, r.device)
        inside = (delta >= 0) & (delta < self.extent)
        col = delta.clamp(0, self.extent - 1)
        dt = torch.promote_types(torch.promote_types(r.dtype, w.dtype), torch.float32)
        if w.dim() == 2:
            out = torch.einsum("bhic,cij->bhij", r.to(dt), w.to(dt)[:, col])
        else:
            out = torch.einsum("bhic,hcij->bhij", r.to(dt), w.to(dt)[:, :, col])
        return torch.where(inside, out, torch.zeros((), dtype=dt, device=r.device))

    def __repr__(self) -> str:
        return f"BandTerm(r={shape_str(self.r)}, weight={shape_str(self.weight)})"


class GateTerm(TokenTerm):
    """The forget gate's term of one call from the cumulative log forget values ``F``
    ``(B, Hq, Nk)``, one per key position (``F[j] = Σ_{t <= j} log f_t``): ``PE(i, j) =
    F[q_offset + i] - F[j]`` for keys at or before the query, ``F[j] - F[q_offset + i]`` after.

    Built by :class:`ForgetGate` (from log f) or :meth:`from_cumulative` (a KV cache keeps F).
    """

    def __init__(self, cumulative: Tensor) -> None:
        if not isinstance(cumulative, Tensor):
            raise TypeError(
                f"the forget gate's F must be a torch.Tensor (B, Hq, Nk); got "
                f"{type(cumulative).__name__}"
            )
        if cumulative.dim() != 3:
            raise ValueError(
                f"the forget gate's F must be 3-D (B, Hq, Nk); got {cumulative.dim()}-D shape "
                f"{shape_str(cumulative)}"
            )
        if not cumulative.is_floating_point():
            raise TypeError(f"the forget gate's F must be floating-point; got {cumulative.dtype}")
        self.cumulative = cumulative
        self.num_heads = cumulative.shape[1]

    @classmethod
    def from_cumulative(cls, cumulative: Tensor) -> GateTerm:
        """The term from ``F`` ``(B, Hq, Nk)`` already summed (non-increasing along keys).

        ``F`` must be finite (checked in eager calls: a NaN or an infinity would make every
        score of its row or column NaN)."""
        term = cls(cumulative)
        if cumulative.numel() and not torch.compiler.is_compiling():
            ok = torch.isfinite(cumulative).all()
            message = "the forget gate's F must be finite everywhere"
            if cumulative.device.type == "cpu":
                if not bool(ok):
                    bad = cumulative.detach()
                    raise ValueError(f"{message}; got a value {bad[~torch.isfinite(bad)][0]:g}")
            else:
                torch._assert_async(ok, message)
        return term

    def bias(self, nq: int, nk: int, q_offset: int = 0) -> Tensor:
        nq, nk, q_offset = _check_bias_args(nq, nk, q_offset)
        f = self.cumulative
        if f.shape[2] != nk or q_offset < 0 or q_offset + nq > nk:
            raise ValueError(
                f"the forget gate's F covers {f.shape[2]} key positions; bias asked for nq={nq}, "
                f"nk={nk}, q_offset={q_offset} (needs nk = {f.shape[2]} and queries within it)"
            )
        fq = f[:, :, q_offset : q_offset + nq, None]
        fk = f[:, :, None, :]
        delta = _grid(nq, nk, q_offset, f.device)
        return torch.where(delta >= 0, fq - fk, fk - fq)

    def __repr__(self) -> str:
        return f"GateTerm(F={shape_str(self.cumulative)})"


@register(
    "inkling",
    description=(
        "Query-conditioned banded bias (Inkling): PE(i, j) = r_i·P[:, i - j] for "
        "0 <= i - j < extent, r_i projected from query i's input, P learned"
    ),
    learnable=True,
    params=(
        Param("rank", int, 16, "latent size per head (r's width)"),
        Param("extent", int, 1024, "band width W: offsets 0 .. W - 1 get a term"),
    ),
    token=True,
)
class QueryConditionedBias(nn.Module):
    """A learned banded relative bias conditioned on each query (as in Inkling).

    ``PE(i, j) = Σ_c r[b, h, i, c] · P[c, i - j]`` for ``0 <= i - j < extent``, 0 beyond: each
    query's latent ``r`` (``rank`` numbers per head, computed by the model from the query's
    input) weighs ``rank`` learned profiles over the offsets. Call the module with ``r`` to get
    the term :func:`relattn.attention` takes as ``pe``.

    Args:
        num_heads: Hq.
        rank: R, the latent's size per head.
        extent: W, the band's width in offsets (offsets ``0 .. W - 1`` get a term).
        shared_heads: one P ``(rank, extent)`` for all heads (True) or one per head
            ``(num_heads, rank, extent)``.

    Attributes:
        weight: P, ``(rank, extent)`` or ``(num_heads, rank, extent)``.
    """

    def __init__(
        self, num_heads: int, rank: int = 16, extent: int = 1024, shared_heads: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = check_int("num_heads", num_heads, min=1)
        self.rank = check_int("rank", rank, min=1, max=1 << 12)
        self.extent = check_int("extent", extent, min=1, max=1 << 24)
        self.shared_heads = check_bool("shared_heads", shared_heads)
        shape = (rank, extent) if shared_heads else (num_heads, rank, extent)
        self.weight = nn.Parameter(torch.zeros(shape))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, r: Tensor) -> BandTerm:
        """The term of one call.

        Args:
            r: ``(B, num_heads, Nq, rank)``, the latents of this call's query rows (a decoding
                step passes the new queries' only).

        Returns:
            A :class:`BandTerm` for ``relattn.attention``'s ``pe``.
        """
        if not isinstance(r, Tensor):
            raise TypeError(f"r must be a torch.Tensor (B, Hq, Nq, rank); got {type(r).__name__}")
        if r.dim() != 4 or r.shape[1] != self.num_heads or r.shape[3] != self.rank:
            raise ValueError(
                f"r must be 4-D (B, Hq={self.num_heads}, Nq, rank={self.rank}); got "
                f"{r.dim()}-D shape {shape_str(r)}"
            )
        return BandTerm(r, self.weight)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, rank={self.rank}, extent={self.extent}, "
            f"shared_heads={self.shared_heads}"
        )


def _build_forget_gate(num_heads: int, head_dim: int | None = None) -> ForgetGate:
    return ForgetGate()


@register(
    "fox",
    description=(
        "Forget gate (FoX): PE(i, j) = Σ_{j < t <= i} log σ(w·x_t + b), a decay the tokens "
        "set, learned through the layer's gate projection"
    ),
    learnable=True,
    build=_build_forget_gate,
    token=True,
)
class ForgetGate(nn.Module):
    """A forget gate's decay (FoX, the Forgetting Transformer): ``PE(i, j) = Σ_{j < t <= i}
    log f_t``, the log of the product of the gates between key and query.

    The module learns nothing itself (the gate ``log f = log σ(w·x + b)`` is the model's
    projection); calling it with ``log f`` takes the cumulative sum ``F`` (in float64, whatever
    log f's dtype) and gives the term :func:`relattn.attention` takes as ``pe``; the gradient
    reaches ``log f`` through it.
    """

    def forward(self, log_f: Tensor) -> GateTerm:
        """The term of one call.

        Args:
            log_f: ``(B, Hq, Nk)``, finite and ``<= 0`` for every key position (query row ``i``
                sits at key position ``q_offset + i``).

        Returns:
            A :class:`GateTerm` for ``relattn.attention``'s ``pe``.
        """
        if not isinstance(log_f, Tensor):
            raise TypeError(f"log_f must be a torch.Tensor (B, Hq, Nk); got {type(log_f).__name__}")
        if log_f.dim() != 3:
            raise ValueError(
                f"log_f must be 3-D (B, Hq, Nk); got {log_f.dim()}-D shape {shape_str(log_f)}"
            )
        if not log_f.is_floating_point():
            raise TypeError(f"log_f must be a floating-point tensor; got dtype {log_f.dtype}")
        check_log_f_values(log_f)
        # float64: F grows without bound over a long sequence, and the call subtracts its
        # trend before the kernels' float32 (relattn.call.token_terms); a float32 F would
        # already have lost the digits a nearby key's term needs.
        return GateTerm(torch.cumsum(log_f.to(torch.float64), dim=-1))
