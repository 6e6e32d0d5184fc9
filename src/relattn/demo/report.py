"""The demo's report: results.json (every number), report.md and report.html, and the summary.

Both documents are rendered from one list of blocks (heading, paragraph, table, image), so they
always say the same thing; the HTML embeds the images so it is a single self-contained file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from .._io import atomic_write_text

REPORT_FILES = ("report.md", "report.html")

PROTOCOL = (
    "Each model is trained on random {context}-byte windows of the training files. Held-out "
    "perplexity is measured on files never seen in training: the first {total} bytes of the "
    "held-out stream are cut into non-overlapping windows of each evaluation length, every "
    "window starts from an empty context, and the loss is averaged over all positions of all "
    "windows. Every model and every length sees exactly the same bytes, so numbers are directly "
    "comparable. Perplexity is per byte (exp of the mean loss in nats); bits per byte = "
    "loss / ln 2. The evaluation uses relattn's fused backend (backend='auto')."
)


# ----------------------------------------------------------------------------- results.json


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a crash never leaves half a file)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """The saved JSON value, or None if there is none (or it is unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_reports(folder: Path) -> None:
    """Delete report.md and report.html: done before results.json changes, so that a report,
    where there is one, always describes the results beside it."""
    for name in REPORT_FILES:
        (folder / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- summary


def _ratio(rows: list[dict]) -> float:
    return rows[-1]["ppl"] / rows[0]["ppl"]


def summarize(models: dict[str, dict], context: int) -> list[str]:
    """Plain-language sentences about what the numbers show (whatever they show).

    Args:
        models: encoding name -> its results entry (with ``"eval"`` rows, shortest length first).
        context: the training length.
    """
    names = [n for n in models if models[n].get("eval")]
    if not names:
        return ["No model finished, so there is nothing to compare yet."]
    rows = {n: models[n]["eval"] for n in names}
    longest = rows[names[0]][-1]["length"]
    at_train = {n: next(r["ppl"] for r in rows[n] if r["length"] == context) for n in names}
    at_long = {n: rows[n][-1]["ppl"] for n in names}
    lines = []
    best_short = min(names, key=at_train.__getitem__)
    best_long = min(names, key=at_long.__getitem__)
    lines.append(
        f"At the training length ({context} bytes) the best held-out perplexity is "
        f"{best_short}'s ({at_train[best_short]:.3f})."
    )
    kept: list[str] = []
    mild: list[str] = []
    broke: list[str] = []
    for n in names:
        ratio = at_long[n] / at_train[n]
        (kept if ratio <= 1.02 else mild if ratio <= 1.25 else broke).append(f"{n} ×{ratio:.2f}")
    span = f"from {context} to {longest} bytes ({longest // context}× the training length)"
    if kept:
        lines.append(f"Perplexity held steady or improved {span} for: {', '.join(kept)}.")
    if mild:
        lines.append(f"Perplexity rose moderately {span} for: {', '.join(mild)}.")
    if broke:
        lines.append(
            f"Perplexity rose sharply {span} for: {', '.join(broke)} — these models do not "
            "extrapolate beyond the length they were trained on."
        )
    lines.append(
        f"At {longest} bytes the best is {best_long} ({at_long[best_long]:.3f})"
        + (
            "."
            if best_long == best_short
            else f", while {best_short} was best at the training length."
        )
    )
    if not kept:
        lines.append(
            "No model kept its training-length perplexity on longer windows in this run; with "
            "such short training the comparison is indicative only."
        )
    return lines


# ----------------------------------------------------------------------------- documents


def _fmt(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else str(x)


def blocks(results: dict, names: list[str], images: dict[str, str]) -> list[tuple]:
    """The report's content as ``(kind, ...)`` blocks: ``("h", level, text)``, ``("p", text)``,
    ``("table", header, rows)``, ``("img", file, caption)``, ``("code", text)``."""
    s = results["settings"]
    models = {n: results["models"][n] for n in names if n in results["models"]}
    done = [n for n in names if n in models]
    lengths = [r["length"] for r in models[done[0]]["eval"]] if done else []
    out: list[tuple] = [("h", 1, "relattn demo: train short, test long")]
    corpus = results.get("corpus", {})
    unit = corpus.get("unit", "file")
    where = (
        f"1 file cut into {corpus.get('train_files', '?')} training chunks and "
        f"{corpus.get('heldout_files', '?')} held-out chunks"
        if unit == "chunk"
        else f"{corpus.get('train_files', '?')} training files and "
        f"{corpus.get('heldout_files', '?')} held-out files"
    )
    pending = [n for n in names if n not in models]
    out.append(
        (
            "p",
            f"{len(done)} byte-level TinyLMs ({s['num_layers']} layers, d_model {s['d_model']}, "
            f"{s['num_heads']} heads), one per position encoding, each trained for "
            f"{s['steps']} steps of batch {s['batch_size']} at context {s['context']} on "
            f"{corpus.get('source', '?')} ({where}; {corpus.get('train_bytes', '?')} training "
            f"bytes), seed {s['seed']}."
            + (f" Not finished yet: {', '.join(pending)}." if pending else ""),
        )
    )
    out.append(("h", 2, "Held-out perplexity per byte"))
    header = ["encoding"] + [f"N={n}" + (" (train)" if n == s["context"] else "") for n in lengths]
    header.append(f"ppl@{lengths[-1]} / ppl@{s['context']}" if lengths else "ratio")
    ppl_rows = []
    bpb_rows = []
    for n in done:
        ev = models[n]["eval"]
        ppl_rows.append([n] + [_fmt(r["ppl"]) for r in ev] + [f"{_ratio(ev):.2f}"])
        bpb_rows.append([n] + [_fmt(r["bpb"]) for r in ev])
    out.append(("table", header, ppl_rows))
    out.append(("h", 2, "Bits per byte"))
    out.append(("table", header[:-1], bpb_rows))
    out.append(("h", 2, "What the numbers show"))
    for line in summarize(models, s["context"]):
        out.append(("p", line))
    out.append(("h", 2, "Protocol"))
    total = models[done[0]]["eval"][0]["tokens"] if done else "?"
    out.append(("p", PROTOCOL.format(context=s["context"], total=total)))
    out.append(("h", 2, "Training"))
    train_header = ["encoding", "parameters", "final train loss", "train time (s)", "tokens/s"]
    train_rows = [
        [
            n,
            str(models[n]["parameters"]),
            _fmt(models[n]["train"]["final_loss"]),
            f"{models[n]['train']['seconds']:.1f}",
            f"{models[n]['train']['tokens_per_s']:.0f}",
        ]
        for n in done
    ]
    out.append(("table", train_header, train_rows))
    captions = {
        "perplexity": "Held-out perplexity against evaluation length.",
        "loss": "Training loss (nats per byte) against step, one line per model.",
        "tables": "Learned additive position tables per head against offset (log scale).",
    }
    attention = {k: f for k, f in images.items() if k.startswith("attention-")}
    if images:
        out.append(("h", 2, "Plots"))
        for key, file in images.items():
            if key not in attention:
                out.append(("img", file, captions.get(key, key)))
    if attention:
        out.append(("h", 2, "What the models attend to"))
        out.append(
            (
                "p",
                "Every head of every layer of each model on the same held-out bytes, from the "
                "trained model's own queries and keys (as `relattn explain --checkpoint` shows "
                "them). Row i is query i's weights α(i, j) over keys j: a linear colour scale "
                "from 0 (white) to 1 (dark blue); grey cells are masked (j > i), no "
                "dot product is computed there. ␣ is a space, ⏎ a newline.",
            )
        )
        for key, file in attention.items():
            out.append(("img", file, f"{key.removeprefix('attention-')}: attention weights."))
    samples = [(n, models[n]["sample"]) for n in done if isinstance(models[n].get("sample"), dict)]
    if samples:
        out.append(("h", 2, "Sample generations"))
        out.append(
            (
                "p",
                f"Each model continues the same held-out prompt (temperature 0.8, top-k 40, "
                f"seed 0, KV cache). Prompt: {samples[0][1]['prompt']!r}",
            )
        )
        for n, sample in samples:
            out.append(("h", 3, n))
            out.append(("code", sample["prompt"] + sample["continuation"]))
    machine = results.get("machine") or {}
    if machine:
        desc = ", ".join(f"{k}: {v}" for k, v in machine.items() if not isinstance(v, dict | list))
        out.append(("h", 2, "Machine"))
        out.append(("p", desc))
    out.append(
        (
            "p",
            "Every number, the settings and the machine are in results.json; checkpoints are in "
            "checkpoints/ (load with relattn.models.TinyLM.load).",
        )
    )
    return out


def to_markdown(content: list[tuple]) -> str:
    """Render :func:`blocks` as Markdown."""
    parts = []
    for block in content:
        if block[0] == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif block[0] == "p":
            parts.append(block[1])
        elif block[0] == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif block[0] == "img":
            parts.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        elif block[0] == "code":
            fence = "````" if "```" in block[1] else "```"
            parts.append(f"{fence}text\n{block[1]}\n{fence}")
    return "\n\n".join(parts) + "\n"


def to_html(content: list[tuple], folder: Path) -> str:
    """Render :func:`blocks` as one self-contained HTML page (images inlined as data URIs)."""
    e = html.escape
    body = []
    for block in content:
        if block[0] == "h":
            body.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif block[0] == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif block[0] == "code":
            body.append(f"<pre>{e(block[1])}</pre>")
        elif block[0] == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(block[2])}">'
                f"<figcaption>{e(block[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:1rem 0}"
        "th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%}"
        "figcaption{font-style:italic;color:#555}pre{background:#f6f6f6;padding:.6rem;"
        "white-space:pre-wrap}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>relattn demo report</title><style>{style}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_reports(folder: Path, results: dict, names: list[str], images: dict[str, str]) -> None:
    """Write ``report.md`` and ``report.html`` into ``folder`` (each atomically)."""
    content = blocks(results, names, images)
    atomic_write_text(folder / "report.md", to_markdown(content))
    atomic_write_text(folder / "report.html", to_html(content, folder))
