"""The contract every additive relative position encoding follows: a table over offsets."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .._validate import check_int

# Attributes every nn.Module has (hook dicts, the parameter and buffer registries, ...): not part
# of what a table depends on (parameters and buffers are keyed one by one instead).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_PLAIN = (int, float, bool, str, type(None), torch.dtype)
# Stay clear of int64's ends when widening a cached range.
_OFFSET_LIMIT = 1 << 62
# Kept outside the modules so the cached tables never enter state_dict, pickles or deepcopies.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PositionEncoding(nn.Module):
    """An additive relative position term ``PE(i, j) = f_h(i - j)``.

    Subclasses call ``super().__init__(num_heads)`` and implement :meth:`table`; everything
    else (the dense bias for inspection, every backend's fast path and the gradient into the
    module's parameters) is derived from it.

    Args:
        num_heads: H, the number of query heads the encoding serves (a subclass that passes
            None must set ``self.num_heads`` itself).
    """

    num_heads: int

    def __init__(self, num_heads: int | None = None) -> None:
        super().__init__()
        if num_heads is not None:
            self.num_heads = check_int("num_heads", num_heads, min=1)

    def table(self, lo: int, hi: int) -> Tensor:
        """PE for the offsets ``lo .. hi`` (inclusive).

        Returns:
            Tensor of shape ``(H, hi - lo + 1)`` whose column ``t`` holds PE for offset
            ``Δ = lo + t``. Gradients flow from it into the module's parameters.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement table(lo, hi)")

    def tied_from(self, lo: int, hi: int) -> int | None:
        """Where the table's tied tail begins: the smallest offset ``t`` (``lo <= t < hi``) such
        that every column for the offsets ``t .. hi`` is the same parameter in each head (T5's
        last bucket, a clipped :class:`~relattn.pe.OffsetBias`), or None (the default: no such
        promise). A backend may then return those columns' gradient summed into column ``t``
        and zero after it: the parameter's gradient is the same. Declare it only for columns
        that are one parameter by construction, never for columns equal by chance."""
        return None

    def cached_table(self, lo: int, hi: int) -> Tensor:
        """:meth:`table`, reused between calls while nothing it depends on has changed.

        Decoding asks for ``table(0, N - 1)`` with N one larger at every token; recomputing T5's
        buckets each time costs more than attending over a short cache. The table is kept for a
        range that grows geometrically, and a call is answered from it only when every
        parameter and buffer of the module and its submodules is the same tensor, on the same
        memory, at the same version counter (an optimizer step, ``load_state_dict`` or any
        in-place change bumps it), every other attribute holds the same plain value (a number,
        string or tensor), the kept table itself is unchanged, and no gradient is needed (grad
        mode off, or no parameter requires grad). Otherwise, or when an attribute of another
        kind (a list, an object) might have changed, :meth:`table` is computed afresh.

        Returns:
            ``(H, hi - lo + 1)``, as :meth:`table` (possibly a view of a wider kept table; do
            not modify it in place).
        """
        return self._cached(lo, hi, False)

    def cached_reversed(self, lo: int, hi: int) -> tuple[Tensor, int]:
        """:meth:`cached_table` with its columns in reverse order, as a decoding step lays them
        over the keys (offset ``hi`` against the first key): ``(rows, start)`` such that
        ``rows[:, start : start + hi - lo + 1]`` is ``cached_table(lo, hi).flip(-1)``.

        Kept flipped beside the cached table (flipped once per cache entry, not per token) and
        not narrowed (a view costs a few µs, which a one-token step counts). An encoding that
        overrides :meth:`cached_table` is asked for it and the answer flipped.

        Returns:
            ``rows (H, W)`` with ``W >= start + hi - lo + 1`` and ``start >= 0`` (do not
            modify it in place).
        """
        if type(self).cached_table is not PositionEncoding.cached_table:
            return _flip(self.cached_table(lo, hi), True)
        entry = _CACHE.get(self)  # _cached's first step, here to save a decoding step a call
        if entry is not None and self._unchanged(entry[7]) and not torch.compiler.is_compiling():
            served = _serve(entry, lo, hi, True)
            if served is not None:
                return served
        return self._cached(lo, hi, True)

    def _cached(self, lo: int, hi: int, reverse: bool):
        """:meth:`cached_table`; with ``reverse``, ``(rows, start)`` such that
        ``rows[:, start : start + hi - lo + 1]`` holds its columns in reverse order (offset
        ``hi`` first), as decoding lays them over the keys: kept flipped beside the table, and
        not narrowed here (a view costs a few µs, which a decoding step counts)."""
        if torch.compiler.is_compiling():
            return _flip(self.table(lo, hi), reverse)
        entry = _CACHE.get(self)
        if entry is not None and self._unchanged(entry[7]):
            served = _serve(entry, lo, hi, reverse)
            if served is not None:
                return served
        inputs = self._table_inputs()
        try:
            key = tuple(_tensor_key(t) if isinstance(t, Tensor) else t for t in inputs or ())
        except RuntimeError:  # a tensor without storage or version counter (functorch)
            inputs = None
        if inputs is None:
            return _flip(self.table(lo, hi), reverse)
        snap = self._snapshot()  # taken with the key, before table() runs
        if entry is not None and entry[0] == key:
            if not self._unchanged(entry[7]):  # e.g. a plain value replaced by an equal one
                entry = _CACHE[self] = (*entry[:7], snap)
            served = _serve(entry, lo, hi, reverse)
            if served is not None:
                return served
            c_lo, c_hi = entry[1], entry[2]
            # Widen on the side that moved by the kept width, so a decoding loop recomputes the
            # table O(log N) times rather than at every token.
            width = c_hi - c_lo + 1
            new_lo = min(lo, c_lo - width) if lo < c_lo else c_lo
            new_hi = max(hi, c_hi + width) if hi > c_hi else c_hi
            new_lo, new_hi = max(new_lo, -_OFFSET_LIMIT), min(new_hi, _OFFSET_LIMIT)
        else:
            new_lo, new_hi = lo, hi
        table = self.table(new_lo, new_hi)
        malformed = (
            not isinstance(table, Tensor)
            or table.dim() != 2
            or table.shape[1] != new_hi - new_lo + 1
        )
        if malformed or table.requires_grad:
            return _flip(self.table(lo, hi), reverse)  # uncached: the caller reports it
        # The entry holds every keyed tensor and its storage, so while it lives no other tensor
        # can take their ids or memory and match the key by accident.
        refs = [(t, t.untyped_storage()) for t in inputs if isinstance(t, Tensor)]
        entry = _CACHE[self] = (key, new_lo, new_hi, table, _version(table), refs, [], snap)
        return _serve(entry, lo, hi, reverse)

    def _snapshot(self) -> tuple | None:
        """What :meth:`_unchanged` compares: for a module without submodules, every attribute
        by identity (tensors also by :func:`_tensor_key`) and every parameter and buffer by
        name, identity and key. None (no quick check) for a module with submodules."""
        if self._modules:
            return None
        # nn.Module's own internals are left out, as from the key (their hooks may refer back to
        # the module, which the cache must not keep alive).
        names = vars(self)
        attrs = tuple(
            (k, v, _tensor_key(v) if isinstance(v, Tensor) else None)
            for k, v in names.items()
            if k not in _MODULE_INTERNALS
        )
        tensors = tuple(
            (i, k, t, None if t is None else _tensor_key(t))
            for i, where in enumerate(self._tensor_dicts())
            for k, t in where.items()
        )
        sizes = len(names), len(self._parameters), len(self._buffers)
        return torch.is_inference_mode_enabled(), sizes, attrs, tensors

    def _tensor_dicts(self) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
        return self._parameters, self._buffers  # type: ignore[return-value]

    def _unchanged(self, snap: tuple | None) -> bool:
        """True only if nothing the cache key covers can have changed since :meth:`_snapshot`
        (stricter than the key: a plain value counts as changed when it is another object, even
        an equal one), and no gradient is needed. A decoding step then skips building the key,
        which costs more than a short step's attention (False: the full key decides). The
        attribute and tensor counts catch an added or removed name; each snapshot name is
        then looked up, not every attribute of the module walked (a few µs per token)."""
        if snap is None or torch.is_inference_mode_enabled() != snap[0]:
            return False
        names, dicts = vars(self), (self._parameters, self._buffers)
        if snap[1] != (len(names), len(dicts[0]), len(dicts[1])):
            return False
        for k, v0, key0 in snap[2]:
            v = names.get(k, _ABSENT)
            if v is not v0 or key0 is not None and _tensor_key(v) != key0:
                return False
        grad = torch.is_grad_enabled()
        for i, k, t0, key0 in snap[3]:
            t = dicts[i].get(k, _ABSENT)
            if t is not t0:
                return False
            if t is None:
                continue
            if grad and t.requires_grad:
                return False
            # _tensor_key(t) != key0, written out (a decoding step runs it per token)
            version = None if t.is_inference() else t._version
            key = (id(t), t.data_ptr(), version, t.shape, t.stride(), t.storage_offset(),
                   t.dtype, t.device)  # fmt: skip
            if key != key0:
                return False
        return True

    def _table_inputs(self) -> list | None:
        """Everything :meth:`table` may read (tensors, plain values, types, names), or None
        when the table must not be cached."""
        grad = torch.is_grad_enabled()
        inputs: list = [torch.is_inference_mode_enabled()]
        for module in self.modules() if self._modules else (self,):
            inputs.append(type(module))
            for name, value in vars(module).items():
                if name in _MODULE_INTERNALS:
                    continue
                if isinstance(value, nn.Module):
                    # Held without registration (e.g. the integrations' view of a model's
                    # weight): its tensors are not tracked, so the table must not be cached.
                    return None
                if not isinstance(value, (Tensor, *_PLAIN)):
                    return None  # a list, a callable, ...: cannot tell if it changed
                inputs += [name, value]
            for name, t in (*module._parameters.items(), *module._buffers.items()):
                if t is not None and grad and t.requires_grad:
                    return None
                inputs += [name, t]
        return inputs

    def closed_form_slopes(self) -> Tensor | None:
        """Per-head slopes ``m_h`` of shape ``(H,)`` when ``PE = -m_h·|Δ|`` exactly and nothing
        about it is learned; kernels then compute the term in closed form instead of reading a
        table. None (the default) means: read the table."""
        return None

    def bias(self, nq: int, nk: int, q_offset: int = 0) -> Tensor:
        """The dense bias, for inspection only (kernels never build it).

        Returns:
            Tensor of shape ``(H, nq, nk)`` with entry ``[h, r, c] = PE_h(q_offset + r - c)``.
        """
        lo, hi = q_offset - (nk - 1), q_offset + nq - 1
        t = self.table(lo, hi)
        delta = offsets_grid(nq, nk, q_offset, device=t.device)
        return t[:, delta - lo]

    def forward(self, lo: int, hi: int) -> Tensor:
        return self.table(lo, hi)


def _serve(entry: tuple, lo: int, hi: int, reverse: bool):
    """The answer from a valid cache entry (see ``_cached``), or None when the kept table
    does not cover ``lo .. hi`` or was modified in place. The reversed copy is made once."""
    c_lo, c_hi, kept, version, flipped = entry[1], entry[2], entry[3], entry[4], entry[6]
    # (_version() written out: a decoding step runs this per token)
    now = None if kept.is_inference() else kept._version
    if not (c_lo <= lo and hi <= c_hi and now == version):
        return None
    if not reverse:
        return kept.narrow(1, lo - c_lo, hi - lo + 1)
    rev = flipped[0] if flipped else None
    if rev is None or (None if rev.is_inference() else rev._version) != flipped[1]:
        rev = kept.flip(-1)
        flipped[:] = [rev, _version(rev)]
    return flipped[0], c_hi - hi


def _flip(t, reverse: bool):
    """``t``, or with ``reverse`` ``(t with its columns reversed, 0)`` (a malformed table
    goes back as it is, for the caller to report)."""
    if not reverse:
        return t
    return (t.flip(-1) if isinstance(t, Tensor) and t.dim() == 2 else t), 0


_ABSENT = object()  # a name not there (None may be a value)


def _version(t: Tensor) -> int | None:
    """The version counter (None for an inference tensor, which has none)."""
    return None if t.is_inference() else t._version


def _tensor_key(t: Tensor) -> tuple:
    version = None if t.is_inference() else t._version  # _version() written out: per token
    return (id(t), t.data_ptr(), version, t.shape, t.stride(), t.storage_offset(), t.dtype,
            t.device)  # fmt: skip


def offsets_grid(nq: int, nk: int, q_offset: int = 0, device=None) -> Tensor:
    """``Δ[r, c] = q_offset + r - c`` as a ``(nq, nk)`` int64 tensor."""
    r = torch.arange(nq, device=device).unsqueeze(1)
    c = torch.arange(nk, device=device).unsqueeze(0)
    return q_offset + r - c


def tied_run_start(index: Tensor, lo: int) -> int | None:
    """The first offset of the run at the table's end whose parameter columns (``index``, one
    per offset ``lo .. hi``) all equal the last one's; None when that run is one column."""
    last = index[-1]
    differ = torch.nonzero(index != last)
    start = int(differ[-1]) + 1 if differ.numel() else 0
    return lo + start if start < index.numel() - 1 else None


def offsets(lo: int, hi: int, device=None) -> Tensor:
    """The offsets ``lo .. hi`` as an int64 tensor of length ``hi - lo + 1``."""
    if hi < lo:
        raise ValueError(f"table(lo, hi) needs lo <= hi; got lo={lo}, hi={hi}")
    return torch.arange(lo, hi + 1, device=device)
