"""Argument checks shared by every public entry point, with one convention.

A wrong *type* raises ``TypeError``, a wrong *value* raises ``ValueError``; every message names
the argument, says what was expected and shows what arrived. Call sites are one line:
``window = check_int("window", window, min=1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# Python ints the library passes on to torch (as positions, seeds, sizes) must fit in int64.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int(
    name: str, value: Any, *, min: int | None = None, max: int | None = None, hint: str = ""
) -> int:
    """``value`` as an int within ``[min, max]`` (bools are not ints here), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{_range(min, max)}; got {show(value)}{hint}")
    low = INT64_MIN if min is None else min
    high = INT64_MAX if max is None else max
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int{_range(min, max)}; got {value!r}{hint}")
    return int(value)


def check_optional_int(
    name: str, value: Any, *, min: int | None = None, max: int | None = None
) -> int | None:
    """None, or ``value`` as an int within ``[min, max]``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or an int{_range(min, max)}; got {show(value)}")
    if not (min is None or value >= min) or not (max is None or value <= max):
        raise ValueError(f"{name} must be None or an int{_range(min, max)}; got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; truthy stand-ins (``"no"``, ``1``) are refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {show(value)}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """``value`` as a finite float in the given interval (open ends when asked), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number; got {show(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number; got {value!r}") from None
    bad = not math.isfinite(x)
    if min is not None:
        bad = bad or (x <= min if min_open else x < min)
    if max is not None:
        bad = bad or (x >= max if max_open else x > max)
    if bad:
        lo = "" if min is None else ("(" if min_open else "[") + f"{min:g}"
        hi = "" if max is None else f"{max:g}" + (")" if max_open else "]")
        where = (
            f" in {lo or '(-inf'}, {hi or 'inf)'}" if (min is not None or max is not None) else ""
        )
        raise ValueError(f"{name} must be a finite number{where}; got {value!r}")
    return x


def check_choice(name: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``, else raise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}; got {show(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _range(min: int | None, max: int | None) -> str:
    if min is not None and max is not None:
        return f" in [{min}, {max}]"
    if min is not None:
        return f" >= {min}"
    if max is not None:
        return f" <= {max}"
    return ""


def show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
