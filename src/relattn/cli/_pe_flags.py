"""The encoding flags every command shares, read from the registry: ``--pe`` (one encoding,
``none``, or a composition such as ``rope+t5``) and one flag per constructor parameter of every
registered encoding (``--t5-num-buckets``, ``--rope-base``, ...)."""

from __future__ import annotations

import argparse
from typing import Any

from .._errors import UserError

__all__ = ["add_encoding_params", "describe_params", "encoding_kwargs", "parse_pe"]

# Integer encoding parameters from the command line are capped here: a table has one column
# per offset, and a typo like 1e9 must not allocate gigabytes.
PARAM_INT_MAX = 1 << 16


def parse_pe(text: str, flag: str = "--pe") -> list[str]:
    """One encoding, ``none``, or a composition ``rope+t5`` (names from the registry).

    Returns:
        The registered names in the composition (empty for ``none``).
    """
    from relattn import pe

    choices = ["none", *pe.names()]
    parts = [p.strip().lower() for p in text.split("+")]
    if not all(parts):
        raise UserError(
            f"{flag} must be an encoding from {','.join(choices)} or a composition "
            f"like rope+t5; got {text!r}"
        )
    unknown = [p for p in parts if p not in choices]
    if unknown:
        raise UserError(
            f"{flag}: unknown encoding {unknown[0]!r}; choose from "
            f"{','.join(choices)} (or compose them: rope+t5)"
        )
    if len(set(parts)) != len(parts):
        raise UserError(f"{flag} names an encoding twice: {text!r}")
    if "none" in parts and len(parts) > 1:
        raise UserError(f"{flag}: 'none' cannot be composed with other encodings; got {text!r}")
    return [p for p in parts if p != "none"]


def _param_flag(encoding: str, param: str) -> str:
    return f"--{encoding}-{param}".replace("_", "-")


def add_encoding_params(parser: argparse.ArgumentParser) -> None:
    """One flag per constructor parameter of every registered encoding: ``--t5-num-buckets``,
    ``--rope-base``, ... (read from :func:`relattn.pe.specs`, so a newly registered encoding's
    parameters appear with no edit here)."""
    from relattn import pe

    group = parser.add_argument_group(
        "encoding parameters", "each applies only when its encoding is in --pe"
    )
    for spec in pe.specs():
        for p in spec.params:
            flag = _param_flag(spec.name, p.name)
            dest = f"pe_{spec.name}_{p.name}"
            default = f" (default {p.default})"
            if p.type is bool:
                group.add_argument(
                    flag,
                    dest=dest,
                    action="store_const",
                    const=True,
                    default=None,
                    help=f"{spec.name}: {p.help}",
                )
            else:
                group.add_argument(
                    flag,
                    dest=dest,
                    default=None,
                    metavar=p.name.upper(),
                    choices=p.choices,
                    help=f"{spec.name}: {p.help}{default}",
                )


def encoding_kwargs(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """The parameters given on the command line for each encoding in ``names``, converted to the
    types the registry declares; a parameter of an encoding not in ``names`` is an error."""
    from relattn import pe

    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for spec in pe.specs():
        for p in spec.params:
            value = getattr(args, f"pe_{spec.name}_{p.name}", None)
            if value is None:
                continue
            flag = _param_flag(spec.name, p.name)
            if spec.name not in names:
                raise UserError(f"{flag} applies only when --pe includes {spec.name}")
            out[spec.name][p.name] = _convert(flag, p, value)
    return out


def _convert(flag: str, p: Any, value: Any) -> Any:
    if p.type is bool:
        return bool(value)
    if p.choices is not None or p.type is str:
        return str(value)
    try:
        converted = p.type(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{flag} must be {'an int' if p.type is int else 'a number'}; got {value!r}"
        ) from None
    if p.type is int and abs(converted) > PARAM_INT_MAX:
        raise UserError(f"{flag} must be at most {PARAM_INT_MAX} here; got {value}")
    if p.type is float and not abs(converted) < float("inf"):
        raise UserError(f"{flag} must be a finite number; got {value!r}")
    return converted


def describe_params(names: list[str], kwargs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every parameter of the named encodings with its value (given or default), for reports."""
    from relattn import pe

    used: dict[str, Any] = {}
    for name in names:
        for p in pe.spec(name).params:
            used[f"{name}.{p.name}"] = kwargs.get(name, {}).get(p.name, p.default)
    return used
