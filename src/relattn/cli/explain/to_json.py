"""``relattn explain --json``: one object with every number shown (schema in the command's help)."""

from __future__ import annotations

from typing import Any

from .compute import Explanation

__all__ = ["to_json"]

_PER_QUERY = ("visible", "offsets", "buckets", "dot_products", "pe", "scores", "weights", "output")


def to_json(
    ex: Explanation,
    encoding: dict[str, Any],
    meta: dict[str, Any],
    queries: list[int],
    single: bool,
    heads: list[int],
    table: dict | None,
) -> dict[str, Any]:
    """The JSON object: ``meta`` (heads, dim, seed or checkpoint...), the encoding, the mask,
    and per query (a list of them unless ``single``) the numbers of the ``heads`` shown."""
    per_query: dict[str, list] = {key: [] for key in _PER_QUERY}
    for i in queries:
        keys = slice(0, i + 1)
        per_query["visible"].append(list(range(i + 1)))
        per_query["offsets"].append([i - j for j in range(i + 1)])
        per_query["buckets"].append(None if ex.buckets is None else ex.buckets[i, keys].tolist())
        per_query["dot_products"].append(ex.dot[heads, i, keys].tolist())
        per_query["pe"].append(ex.pe[heads, i, keys].tolist())
        per_query["scores"].append(ex.scores[heads, i, keys].tolist())
        per_query["weights"].append(ex.weights[heads, i, keys].tolist())
        per_query["output"].append(ex.output[heads, i].tolist())
    obj: dict[str, Any] = {
        "tokens": ex.tokens,
        "encoding": encoding,
        **meta,
        "shown_heads": heads,
        "scale": ex.scale,
        "mask": ex.mask.int().tolist(),
        "query": queries[0] if single else queries,
    }
    obj.update({key: values[0] if single else values for key, values in per_query.items()})
    if table is not None:
        b = table["buckets"]
        obj["table"] = {
            "offsets": table["offsets"],
            "values": table["values"].tolist(),
            "buckets": None if b is None else b.tolist(),
        }
    return obj
