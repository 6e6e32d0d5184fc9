"""The encodings by name: one registry that the layers, the model and the tools all read.

A new encoding is one class and one decorator::

    @relattn.pe.register("mine", description="...", learnable=True)
    class Mine(relattn.pe.PositionEncoding):
        def table(self, lo, hi): ...

and then ``RelativeSelfAttention(pe="mine")``, ``TinyLMConfig(pe="mine")``,
``relattn explain --pe mine`` and every backend take it with no other edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._validate import check_int


@dataclass(frozen=True)
class Param:
    """A constructor parameter the command-line tools expose as ``--NAME``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class EncodingSpec:
    """What the tools need to know about one registered encoding.

    Attributes:
        name: the registry key (``pe="t5"``).
        cls: the encoding's class.
        description: one line, shown by ``relattn explain --help`` and reports.
        learnable: whether its default construction has trainable parameters (a token term:
            whether a model learns it, the layer's projection included: FoX's gate).
        additive: False for a rotation of q and k (RoPE), True for a table of PE values.
        params: constructor parameters offered on the command line.
        build: ``build(num_heads, head_dim, **kwargs)`` returning a new module.
        token: True for a term that depends on the tokens (:class:`QueryConditionedBias`,
            :class:`ForgetGate`): the module is not a table over offsets but is called per call
            with tensors a model computes from its input (the layer builds that projection;
            ``relattn.attention`` takes the term the call returns). Tools that show tables
            skip it.
    """

    name: str
    cls: type
    description: str
    learnable: bool
    additive: bool
    params: tuple[Param, ...]
    build: Callable[..., nn.Module] = field(repr=False)
    token: bool = False

    def create(self, num_heads: int, head_dim: int | None = None, **kwargs: Any) -> nn.Module:
        """A fresh module; ``kwargs`` override the constructor's defaults."""
        return self.build(num_heads, head_dim, **kwargs)


_REGISTRY: dict[str, EncodingSpec] = {}


def register(
    name: str,
    *,
    description: str,
    learnable: bool,
    additive: bool = True,
    params: tuple[Param, ...] = (),
    build: Callable[..., nn.Module] | None = None,
    token: bool = False,
) -> Callable[[type], type]:
    """Class decorator adding an encoding to the registry under ``name``.

    By default the module is built as ``cls(num_heads, **kwargs)``; give ``build(num_heads,
    head_dim, **kwargs)`` for a class with another constructor. ``token=True`` marks a term
    that depends on the tokens (see :class:`EncodingSpec`). Registering a name again replaces
    the earlier entry (so a test or notebook can re-run its definition).
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "none":
        raise ValueError(f"name must be an identifier other than 'none'; got {name!r}")

    def decorate(cls: type) -> type:
        def default_build(num_heads: int, head_dim: int | None = None, **kwargs: Any):
            return cls(num_heads, **kwargs)

        _REGISTRY[name] = EncodingSpec(
            name=name,
            cls=cls,
            description=description,
            learnable=learnable,
            additive=additive,
            params=tuple(params),
            build=build or default_build,
            token=bool(token),
        )
        return cls

    return decorate


def names() -> list[str]:
    """Registered encoding names, in registration order (``"none"`` is not one of them)."""
    return list(_REGISTRY)


def spec(name: str) -> EncodingSpec:
    """The registry entry for ``name``; a clear error listing the choices otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"pe must be an encoding name from {names()}; got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"pe must be 'none' or one of {names()}; got {name!r}")
    return _REGISTRY[name]


def specs() -> list[EncodingSpec]:
    return list(_REGISTRY.values())


def create(
    name: str, num_heads: int, head_dim: int | None = None, **kwargs: Any
) -> nn.Module | None:
    """A new encoding module by name: ``create("t5", 8)``; ``"none"`` gives None.

    Args:
        name: ``"none"`` or a registered name (see :func:`names`).
        num_heads: H, the query heads the encoding serves.
        head_dim: D, needed by encodings that act on q and k (RoPE).
        kwargs: constructor arguments overriding the defaults.
    """
    if name == "none":
        return None
    entry = spec(name)
    num_heads = check_int("num_heads", num_heads, min=1)
    return entry.create(num_heads, head_dim, **kwargs)
