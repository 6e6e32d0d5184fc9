"""Interchangeable exact attention kernels behind one protocol (:class:`Backend`).

Built in: ``reference`` (the specification, plain autograd), ``chunked`` (block by block in
PyTorch; CPU, and CUDA without Triton), ``decode`` (few query rows against a long KV cache, one
pass over the keys), ``cpu_kernel`` (a fused C++ CPU kernel, one parallel region per pass,
compiled at first use), ``triton`` (FlashAttention-2-style GPU kernels). A new backend
subclasses :class:`Backend` and calls :func:`register`; ``backend="auto"`` then weighs its
:meth:`~Backend.priority` with the others'.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..problem import Problem
from .base import Backend, Call

__all__ = ["Backend", "Call", "choose", "get", "names", "register"]

_REGISTRY: dict[str, Backend] = {}
# Built-in backends load on first use (triton's module is cheap, triton itself loads later).
_BUILTIN = {
    "reference": "relattn.backends.reference",
    "chunked": "relattn.backends.chunked",
    "decode": "relattn.backends.decode",
    "cpu_kernel": "relattn.backends.cpu_kernel",
    "triton": "relattn.backends.triton_backend",
}
# Built-in backends that ``auto`` can pick only on these device types: on others it does not
# import them (importing triton costs about 0.4 s of a first call on the CPU).
_AUTO_DEVICES = {"triton": ("cuda",)}
_UNAVAILABLE: dict[str, str] = {}
# ``auto``'s candidates per device type, highest top_priority first (cleared by register).
_CANDIDATES: dict[str, list[Backend]] = {}
_ORDER: dict[str, int] = {}


def register(backend: Backend) -> Backend:
    """Make ``backend`` available as ``backend=backend.name`` (replacing an earlier one)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a relattn.backends.Backend; got {type(backend).__name__}")
    if (
        not isinstance(backend.name, str)
        or not backend.name.isidentifier()
        or backend.name == "auto"
    ):
        raise ValueError(
            f"backend.name must be an identifier other than 'auto'; got {backend.name!r}"
        )
    _REGISTRY[backend.name] = backend
    _CANDIDATES.clear()
    return backend


def known(name: object) -> bool:
    """Whether ``name`` is ``"auto"`` or a backend name (cheaper than ``name in names()``)."""
    return type(name) is str and (name == "auto" or name in _REGISTRY or name in _BUILTIN)


def names() -> list[str]:
    """``"auto"`` and every backend name, built in or registered."""
    return ["auto", *dict.fromkeys([*_BUILTIN, *_REGISTRY])]


def get(name: str) -> Backend:
    """The backend called ``name``; a clear error if there is none or it cannot load here."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not isinstance(name, str) or name not in _BUILTIN:
        raise ValueError(f"backend must be one of {names()}; got {name!r}")
    if name in _UNAVAILABLE:  # a failed import is not retried on every call
        raise RuntimeError(_UNAVAILABLE[name])
    try:
        module = importlib.import_module(_BUILTIN[name])
    except ImportError as e:
        _UNAVAILABLE[name] = f"backend={name!r} is not available here: {e}"
        raise RuntimeError(_UNAVAILABLE[name]) from e
    return register(module.BACKEND)


def _candidates(device_type: str) -> list[Backend]:
    """The backends ``auto`` weighs on ``device_type``, highest ``top_priority`` first."""
    found = _CANDIDATES.get(device_type)
    if found is not None:
        return found
    found = []
    for name in names()[1:]:
        if name not in _REGISTRY and device_type not in _AUTO_DEVICES.get(name, (device_type,)):
            continue
        try:
            backend = get(name)
        except RuntimeError:
            continue
        if backend.devices is None or device_type in backend.devices:
            found.append(backend)
    _ORDER.update((b.name, i) for i, b in enumerate(found))  # ties: registration order
    found.sort(key=lambda b: -b.top_priority)
    _CANDIDATES[device_type] = found
    return found


def choose(
    name: str,
    q: Tensor,
    k: Tensor,
    problem: Problem,
    context_parallel: bool = False,
    compiling: bool | None = None,
    token: bool = False,
) -> Backend:
    """Resolve ``backend=name`` for these inputs: the one dispatcher.

    ``"auto"`` takes the highest :meth:`~Backend.priority` among backends that can run the
    inputs (``context_parallel``: among those whose ``context_parallel`` attribute is True).
    Backends are weighed in order of their ``top_priority``, and weighing stops once no later
    one can outrank the best found. Under ``torch.compile`` only priorities are weighed (they
    read static facts), and the custom op reports a backend that cannot run when it does. An
    explicit name is checked with :meth:`~Backend.unsupported` (in eager mode). ``compiling``:
    ``torch.compiler.is_compiling()``, if the caller has asked already. ``token``: the call has
    terms that depend on the tokens (only backends with ``token_terms`` can run it).
    """
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if name == "auto":
        # (priority, registration rank, backend), best first; settled from the top as soon as
        # no backend still to weigh can outrank it.
        ranked: list[tuple[float, int, Backend]] = []
        device = "cpu" if q.is_cpu else q.device.type  # is_cpu: 50 ns; device.type: 280
        for rank, backend in enumerate(_candidates(device)):
            while ranked and backend.top_priority < ranked[0][0]:
                found = ranked.pop(0)[2]
                if compiling or found.unsupported(q, k, problem) is None:
                    return found
            if context_parallel and not backend.context_parallel:
                continue
            if token and not backend.token_terms:
                continue
            if backend.dtypes is not None and q.dtype not in backend.dtypes:
                continue
            p = backend.priority(q, k, problem)
            if p is not None and not ranked and p >= backend.top_priority:
                # No backend after it can outrank it (ties go to the earlier registered).
                if compiling or backend.unsupported(q, k, problem) is None:
                    return backend
                continue
            if p is not None:
                ranked.append((p, _ORDER.get(backend.name, rank), backend))
                if len(ranked) > 1:
                    ranked.sort(key=_rank)
        for _, _, backend in ranked:
            if compiling or backend.unsupported(q, k, problem) is None:
                return backend
        return get("chunked" if context_parallel else "reference")
    backend = get(name)
    if token and not backend.token_terms:
        able = [n for n in names()[1:] if n in _REGISTRY and _REGISTRY[n].token_terms]
        raise RuntimeError(
            f"backend={name!r} cannot run this call: it does not compute the terms that depend "
            f"on the tokens (QueryConditionedBias, ForgetGate); backends that do: {able}"
        )
    if not compiling:
        reason = backend.unsupported(q, k, problem)
        if reason:
            raise RuntimeError(f"backend={name!r} cannot run this call: {reason}")
    return backend


def _rank(r: tuple[float, int, Backend]) -> tuple[float, int]:
    """Best first: the highest priority, then the earliest registered."""
    return -r[0], r[1]


def _load_builtins() -> None:
    """Import the built-in backend modules now (each is cheap: triton's imports Triton only on
    its first call), so that no import happens while torch.compile traces a first call (Dynamo
    cannot trace ``import_module``; fullgraph=True would fail)."""
    for name in _BUILTIN:
        try:
            get(name)
        except RuntimeError:
            pass  # remembered in _UNAVAILABLE; an explicit backend=name says why


_load_builtins()
