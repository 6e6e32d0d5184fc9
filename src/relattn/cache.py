"""KV cache for incremental decoding: preallocated keys and values per layer.

A layer at step t holds keys for the absolute positions it has seen. New tokens append their keys
and attend with ``q_offset`` = the number of keys kept before the append, so the encoding sees the
true offsets ``Δ = i - j`` exactly as in one full forward pass.

With a sliding window W, a query at position p sees keys ``p - W + 1 .. p``, so only the last
``W - 1`` keys can ever be read again; the cache keeps exactly those (shifted to the front of the
buffer, so column order stays position order, which the offset tables rely on). The sequence may
then grow past the stored size; ``capacity`` still bounds the total length unless it is None.

A forget gate (``pe="fox"``) needs its cumulative log gate ``F`` at every key: the cache keeps
it beside the keys, per query head, ``(B, Hq, slots)`` in float64 (F grows without bound
over a long stream; each call subtracts its trend before the kernels), appended as
``F_last + cumsum(log f)`` of the new tokens (see :meth:`LayerCache.update`).
The banded bias (``pe="inkling"``) needs only the new queries' latents, nothing cached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._validate import check_int, check_optional_int, is_integer_dtype, shape_str, show
from .masks import within_doc_positions
from .pe.token import check_log_f_values

__all__ = ["CacheView", "KVCache", "LayerCache"]


class CacheView(NamedTuple):
    """What a layer attends over after appending to its cache.

    k, v: ``(B, Hkv, Nk, D)`` kept keys followed by the new ones.
    q_offset: number of keys kept before the append (position of the first new query minus that
        of key column 0).
    doc_ids: ``(B, Nk)`` or None. key_padding_mask: ``(B, Nk)`` bool or None.
    gate: ``(B, Hq, Nk)`` the forget gate's cumulative log F at the kept keys and the new ones
        (float64), when :meth:`LayerCache.update` was given
        ``log_f``; else None.
    """

    k: Tensor
    v: Tensor
    q_offset: int
    doc_ids: Tensor | None
    key_padding_mask: Tensor | None
    gate: Tensor | None = None


class LayerCache:
    """One layer's keys and values. Obtain it from :meth:`KVCache.layer`; don't build it directly.

    Storage: ``k``, ``v`` of shape ``(B, Hkv, S, D)`` with ``S = capacity`` (no window) or
    ``min(W - 1, capacity)`` (window W); the first ``kept`` columns are valid. A forget gate's
    ``F`` ``(B, Hq, S)`` is allocated at the first update that gives ``log_f``.
    """

    def __init__(
        self,
        index: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int | None,
        dtype: torch.dtype,
        device: torch.device,
        window: int | None,
    ) -> None:
        self.index = index
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.window = window
        self.dtype = dtype
        if window is None:
            if capacity is None:
                raise ValueError("capacity must be an int when there is no window; got None")
            slots = capacity
        else:
            slots = window - 1 if capacity is None else min(window - 1, capacity)
        shape = (batch_size, num_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k.device  # "cuda" -> "cuda:0", to compare with inputs' devices
        self._doc_ids = torch.zeros((batch_size, slots), dtype=torch.long, device=device)
        self._padding = torch.ones((batch_size, slots), dtype=torch.bool, device=device)
        self._gate: Tensor | None = None  # (B, Hq, S) F at the kept keys, from the first log_f
        self._gate_last: Tensor | None = None  # (B, Hq) F at the last position seen
        self.reset()

    def reset(self) -> None:
        """Forget every position (storage is kept and overwritten)."""
        self.length = 0  # absolute positions seen
        self.kept = 0  # positions still stored
        self.has_doc_ids: bool | None = None
        self.has_padding = False
        self.has_gate: bool | None = None
        self.last_doc: Tensor | None = None
        self.doc_start: Tensor | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def positions(self, doc_ids: Tensor | None) -> Tensor | int:
        """RoPE positions of the next tokens: absolute, or within their document with doc_ids.

        Args:
            doc_ids: ``(B, n)`` the new tokens' document ids, or None.

        Returns:
            An int (the absolute position of the first new token) or a ``(B, n)`` tensor.
        """
        if doc_ids is None:
            return self.length
        return within_doc_positions(doc_ids, self.length, self.last_doc, self.doc_start)[0]

    def update(
        self,
        k: Tensor,
        v: Tensor,
        doc_ids: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        log_f: Tensor | None = None,
    ) -> CacheView:
        """Append new keys and values and return everything the new queries attend over.

        Args:
            k, v: ``(B, Hkv, n, D)`` the new tokens' keys (RoPE already applied) and values.
            doc_ids: ``(B, n)`` integer document ids of the new tokens, or None. Give it in every
                call on a cache or in none.
            key_padding_mask: ``(B, n)`` bool, True for real tokens, or None (all real).
            log_f: ``(B, Hq, n)`` the new tokens' log forget gates (``pe="fox"``), or None.
                Give it in every call on a cache or in none; the view's ``gate`` is then F at
                every key it holds (``F_last + cumsum(log_f)`` for the new ones).

        Returns:
            A :class:`CacheView`. Stored keys are detached; the new keys in the view keep their
            graph, so gradients reach the new tokens (never the cached ones).

        Bad arguments and overflow raise before anything is stored. An error raised later, by
        the attention call itself (e.g. a document id reused after another document), leaves
        the new positions appended: call :meth:`reset` and start over.
        """
        self._check(k, v, doc_ids, key_padding_mask)
        self._check_gate(log_f, k.shape[0], k.shape[2])
        n = k.shape[2]
        m = self.kept
        gate_new = None if log_f is None else self._gate_from(log_f)
        self.has_doc_ids = doc_ids is not None
        if doc_ids is None:
            doc_ids_new = torch.zeros((self.batch_size, n), dtype=torch.long, device=self.device)
        else:
            doc_ids_new = doc_ids.to(torch.long)
            _, starts = within_doc_positions(
                doc_ids_new, self.length, self.last_doc, self.doc_start
            )
            self.last_doc, self.doc_start = doc_ids_new[:, -1].clone(), starts[:, -1].clone()
        if key_padding_mask is None:
            padding_new = torch.ones((self.batch_size, n), dtype=torch.bool, device=self.device)
        else:
            padding_new = key_padding_mask
            self.has_padding = True

        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if self.window is None:
            # Write in place; attend over a view of the buffer (no copy) unless autograd needs
            # the new keys' graph.
            self.k[:, :, m : m + n] = k.detach()
            self.v[:, :, m : m + n] = v.detach()
            self._doc_ids[:, m : m + n] = doc_ids_new
            self._padding[:, m : m + n] = padding_new
            if grad:
                k_all = torch.cat([self.k[:, :, :m], k], dim=2)
                v_all = torch.cat([self.v[:, :, :m], v], dim=2)
            else:
                k_all, v_all = self.k[:, :, : m + n], self.v[:, :, : m + n]
            doc_all, pad_all = self._doc_ids[:, : m + n], self._padding[:, : m + n]
            gate_all = None
            if gate_new is not None:
                assert self._gate is not None  # allocated by _gate_from
                self._gate[:, :, m : m + n] = gate_new.detach()
                if gate_new.requires_grad:
                    gate_all = torch.cat([self._gate[:, :, :m], gate_new], dim=2)
                else:
                    gate_all = self._gate[:, :, : m + n]
            self.kept = m + n
        else:
            # Attend over kept + new, then keep the last W - 1 (shifted to the front).
            k_all = torch.cat([self.k[:, :, :m], k], dim=2)
            v_all = torch.cat([self.v[:, :, :m], v], dim=2)
            doc_all = torch.cat([self._doc_ids[:, :m], doc_ids_new], dim=1)
            pad_all = torch.cat([self._padding[:, :m], padding_new], dim=1)
            keep = min(self.slots, m + n)
            self.k[:, :, :keep] = k_all[:, :, m + n - keep :].detach()
            self.v[:, :, :keep] = v_all[:, :, m + n - keep :].detach()
            self._doc_ids[:, :keep] = doc_all[:, m + n - keep :]
            self._padding[:, :keep] = pad_all[:, m + n - keep :]
            gate_all = None
            if gate_new is not None:
                assert self._gate is not None  # allocated by _gate_from
                gate_all = torch.cat([self._gate[:, :, :m], gate_new], dim=2)
                self._gate[:, :, :keep] = gate_all[:, :, m + n - keep :].detach()
            self.kept = keep
        self.length += n
        return CacheView(
            k_all,
            v_all,
            m,
            doc_all if self.has_doc_ids else None,
            pad_all if self.has_padding else None,
            gate_all,
        )

    def _gate_from(self, log_f: Tensor) -> Tensor:
        """F at the new positions, ``(B, Hq, n)``: the last position's F plus the cumulative sum
        of ``log_f`` (in float64, as :class:`~relattn.pe.ForgetGate` takes it: F grows without
        bound over a long stream), keeping ``log_f``'s graph; the storage is allocated at the
        first call."""
        dtype = torch.float64
        b, hq = log_f.shape[0], log_f.shape[1]
        if self._gate is None or self._gate.shape[1] != hq or self._gate.dtype != dtype:
            self._gate = torch.zeros((b, hq, self.slots), dtype=dtype, device=self.device)
            self._gate_last = torch.zeros((b, hq), dtype=dtype, device=self.device)
        assert self._gate_last is not None
        gate = torch.cumsum(log_f.to(dtype), dim=-1)
        if self.length > 0:
            gate = gate + self._gate_last[:, :, None]
        self._gate_last = gate[:, :, -1].detach().clone()
        self.has_gate = True
        return gate

    def _check_gate(self, log_f: Tensor | None, b: int, n: int) -> None:
        if log_f is not None:
            if not isinstance(log_f, Tensor):
                raise TypeError(
                    f"log_f must be a torch.Tensor (B, Hq, n) or None; got {show(log_f)}"
                )
            if log_f.dim() != 3 or log_f.shape[0] != b or log_f.shape[2] != n:
                raise ValueError(
                    f"log_f must cover the new tokens: shape (B, Hq, n) with (B, n) = ({b}, {n}); "
                    f"got {shape_str(log_f)}"
                )
            if not log_f.is_floating_point():
                raise TypeError(f"log_f must be a floating-point tensor; got dtype {log_f.dtype}")
            if log_f.device != self.device:
                raise ValueError(
                    f"log_f must be on the cache's device {self.device}; got {log_f.device}"
                )
            check_log_f_values(log_f)
            if self.length > 0 and self._gate is not None and self._gate.shape[1] != log_f.shape[1]:
                raise ValueError(
                    f"log_f must have the {self._gate.shape[1]} heads of the earlier calls on this "
                    f"cache; got {shape_str(log_f)} (call reset() to start over)"
                )
        if self.length > 0 and bool(self.has_gate) != (log_f is not None):
            raise ValueError(
                "log_f (a forget gate) must be given in every call on a cache or in none; this "
                "cache was filled " + ("with" if self.has_gate else "without") + " it (call "
                "reset() to start over)"
            )

    def _check(self, k, v, doc_ids, key_padding_mask) -> None:
        expected = (self.batch_size, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            what = "keys" if name == "k" else "values"
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} (the new {what}) must be a torch.Tensor; got {show(t)}")
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                raise ValueError(
                    f"{name} (the new {what}) must have shape (B, Hkv, n, D) with (B, Hkv, D) = "
                    f"{expected} as the cache was built; got {shape_str(t)}"
                )
            if t.dtype != self.dtype:
                raise TypeError(
                    f"{name} (the new {what}) must have the cache's dtype {self.dtype}; "
                    f"got {t.dtype}"
                )
            if t.device != self.device:
                raise ValueError(
                    f"{name} (the new {what}) must be on the cache's device {self.device}; "
                    f"got {t.device}"
                )
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape; got {shape_str(k)}, {shape_str(v)}"
            )
        n = k.shape[2]
        if self.capacity is not None and self.length + n > self.capacity:
            raise ValueError(
                f"KVCache overflow in layer {self.index}: it holds {self.length} positions and "
                f"{n} more would exceed capacity={self.capacity}; build the cache with a larger "
                "capacity"
            )
        for name, t in (("doc_ids", doc_ids), ("key_padding_mask", key_padding_mask)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None; got {show(t)}")
            if tuple(t.shape) != (k.shape[0], n):
                raise ValueError(
                    f"{name} with a cache must cover the new tokens only: shape (B, n) = "
                    f"({k.shape[0]}, {n}); got {shape_str(t)}"
                )
            if t.device != self.device:
                where = f"the cache's device {self.device}"
                raise ValueError(f"{name} must be on {where}; got {t.device}")
        if self.length > 0 and self.has_doc_ids != (doc_ids is not None):
            raise ValueError(
                "doc_ids must be given in every call on a cache or in none; this cache was filled "
                + ("with" if self.has_doc_ids else "without")
                + " doc_ids (call reset() to start over)"
            )
        if doc_ids is not None and not is_integer_dtype(doc_ids.dtype):
            raise TypeError(f"doc_ids must be an integer tensor; got dtype {doc_ids.dtype}")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor; got dtype {key_padding_mask.dtype}"
            )

    def __repr__(self) -> str:
        return (
            f"LayerCache(index={self.index}, length={self.length}, kept={self.kept}, "
            f"slots={self.slots}, window={self.window})"
        )


class KVCache:
    """Preallocated keys and values for every layer of a model, for incremental decoding.

    Each attention layer takes its own view, ``cache.layer(i)``, appends its new keys and values
    (RoPE keys are stored rotated at their absolute positions) and attends with the true offsets.

    Args:
        num_layers: number of attention layers.
        batch_size: B.
        num_kv_heads: Hkv.
        head_dim: D.
        capacity: the most positions the sequence may reach; appending beyond raises. None is
            allowed only with a window (an unbounded stream in ``W - 1`` slots).
        dtype, device: of the stored keys and values (must match the model's).
        window: sliding window W; only the last ``W - 1`` positions are stored.

    Example::

        cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=4, head_dim=32, capacity=512)
        y = layer(x_prompt, cache=cache.layer(0))   # prefill
        y = layer(x_next, cache=cache.layer(0))     # one token
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int | None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        window: int | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            check_int(name, value, min=1)
        window = check_optional_int("window", window, min=1)
        if capacity is None and window is None:
            raise ValueError("capacity must be an int >= 1 (None only with a window); got None")
        capacity = check_optional_int("capacity", capacity, min=1)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a floating-point torch.dtype; got {show(dtype)}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype; got {dtype}")
        device = _device(device)
        self.capacity = capacity
        self.window = window
        self.dtype = dtype
        if window is None:
            slots = capacity if capacity is not None else 0
        else:
            slots = window - 1 if capacity is None else min(window - 1, capacity)
        try:
            self.layers = [
                LayerCache(i, batch_size, num_kv_heads, head_dim, capacity, dtype, device, window)
                for i in range(num_layers)
            ]
        except RuntimeError as e:  # out of memory, or more elements than a tensor can hold
            elements = 2 * num_layers * batch_size * num_kv_heads * slots * head_dim
            gib = elements * dtype.itemsize / 2**30
            raise ValueError(
                f"KVCache of capacity={capacity} (num_layers={num_layers}, batch_size="
                f"{batch_size}, num_kv_heads={num_kv_heads}, head_dim={head_dim}) needs "
                f"{gib:.3g} GiB for keys and values on {device}, and allocating it failed "
                f"({str(e).splitlines()[0]}); lower capacity or batch_size, or use a window"
            ) from None

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def layer(self, index: int) -> LayerCache:
        """The cache of layer ``index`` (pass it as the attention layer's ``cache``)."""
        return self.layers[check_int("index", index, min=0, max=len(self.layers) - 1)]

    @property
    def length(self) -> int:
        """Positions seen by every layer (the absolute position of the next token)."""
        return min(layer.length for layer in self.layers)

    def reset(self) -> None:
        """Forget every position in every layer."""
        for layer in self.layers:
            layer.reset()

    def __repr__(self) -> str:
        first = self.layers[0]
        return (
            f"KVCache(num_layers={self.num_layers}, batch_size={first.batch_size}, "
            f"num_kv_heads={first.num_kv_heads}, head_dim={first.head_dim}, "
            f"capacity={self.capacity}, window={self.window}, length={self.length}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _device(device) -> torch.device:
    """``device`` as a torch.device that can hold tensors here, else a clear error."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a torch.device, a str or None; got {show(device)}")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # unknown name, or no such device
        raise ValueError(
            f"device must be a device this machine has; got {device!r} ({str(e).splitlines()[0]})"
        ) from None
    return device
