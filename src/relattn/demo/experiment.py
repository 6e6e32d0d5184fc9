"""The whole demo: train one model per encoding, evaluate it at growing lengths, write the report.

Results are saved after every model (checkpoint first, then its entry in results.json), so an
interrupted run keeps what it finished and ``resume=True`` picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import evaluate, plots, probe, report, train
from .data import Corpus, load_corpus
from .settings import DemoSettings


class DemoError(ValueError):
    """The demo cannot run as asked (bad settings, mismatched resume, unusable corpus)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    """The machine the numbers come from (relattn.bench.common.machine_info when available)."""
    try:
        from relattn.bench.common import machine_info

        return dict(machine_info())
    except Exception:  # the benchmark package is optional here; fall back to the basics
        return {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }


def _fresh(settings: DemoSettings, corpus: Corpus) -> dict:
    import relattn

    return {
        "relattn_version": relattn.__version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": settings.comparable(),
        "corpus": corpus.describe(),
        "machine": machine(),
        "models": {},
    }


def _check_resume(saved: dict, settings: DemoSettings, corpus: Corpus, path: Path) -> None:
    want = {**settings.comparable(), **{"corpus." + k: v for k, v in corpus.describe().items()}}
    have = {
        **saved.get("settings", {}),
        **{"corpus." + k: v for k, v in saved.get("corpus", {}).items()},
    }
    diff = [f"{k}: saved {have.get(k)!r}, now {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise DemoError(
            f"--resume: settings differ from the run saved in {path} ({'; '.join(diff)}); "
            "run without --resume to start over, or choose another --out"
        )


def _checkpoint_ok(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def run(
    settings: DemoSettings,
    out: Path,
    resume: bool = False,
    log: Callable[[str], None] = _log,
) -> tuple[dict, list[str]]:
    """Run the demo into folder ``out``.

    Returns:
        ``(results, summary)``: the contents of results.json and the plain-language summary.
    """
    from relattn.models import TinyLM

    start = time.perf_counter()
    lengths = settings.eval_lengths
    total = evaluate.eval_total(lengths, settings.eval_bytes)
    try:
        corpus = load_corpus(
            settings.data,
            seed=settings.seed,
            train_bytes=settings.train_bytes,
            heldout_bytes=total + 1,
        )
    except ValueError as e:
        raise DemoError(str(e)) from None
    if corpus.heldout.numel() < total + 1:
        raise DemoError(
            f"the held-out files hold {corpus.heldout.numel()} bytes; evaluating at "
            f"{lengths[-1]} bytes needs {total + 1} (use more --data, or a smaller --context)"
        )
    if corpus.train.numel() < settings.context + 2:
        raise DemoError(
            f"the training files hold {corpus.train.numel()} bytes; --context "
            f"{settings.context} needs more"
        )
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = None
    if resume:
        results = report.read_json(results_path)
        if results is None:
            log(f"resume: no results in {results_path}; starting from scratch")
        else:
            _check_resume(results, settings, corpus, results_path)
    if results is None:
        results = _fresh(settings, corpus)
    log(
        f"corpus: {corpus.source}: {corpus.train_files} training files "
        f"({corpus.train.numel()} bytes), {corpus.heldout_files} held-out files "
        f"(evaluating on {total} bytes); torch threads: {torch.get_num_threads()}"
    )
    results["protocol"] = report.PROTOCOL.format(context=settings.context, total=total)
    results["torch_threads"] = torch.get_num_threads()
    report.write_json(results_path, results)

    ts = settings.train_settings()
    models = {}
    for index, name in enumerate(settings.encodings, 1):
        folder = out / "checkpoints" / name
        entry = results["models"].get(name)
        if resume and entry is not None and entry.get("eval") and _checkpoint_ok(folder):
            log(f"resume: {name} already trained ({folder}); skipping")
            models[name] = TinyLM.load(folder)
            continue
        model = train.build_model(name, ts, max_seq_len=lengths[-1])
        tag = f"[{index}/{len(settings.encodings)}] {name:<6}"
        trained = train.train_model(model, corpus.train, ts, desc=tag)
        rows = evaluate.evaluate(model, corpus.heldout, lengths, total)
        log(
            f"{tag} eval ppl: "
            + ", ".join(f"N={r['length']}: {r['ppl']:.3f}" for r in rows)
            + f" ({sum(r['seconds'] for r in rows):.1f}s)"
        )
        model.save(folder)
        results["models"][name] = {
            "config": dataclasses.asdict(model.config),
            "parameters": model.num_parameters(),
            "train": trained,
            "eval": rows,
            "checkpoint": str(folder.relative_to(out)),
        }
        report.write_json(results_path, results)
        models[name] = model

    images = _plots(models, results, corpus, settings, out)
    results["images"] = images
    results["seconds_this_run"] = time.perf_counter() - start
    report.write_json(results_path, results)
    names = [n for n in settings.encodings if n in results["models"]]
    report.write_reports(out, results, names, images)
    summary = report.summarize({n: results["models"][n] for n in names}, settings.context)
    return results, summary


def _plots(
    models: dict, results: dict, corpus: Corpus, settings: DemoSettings, out: Path
) -> dict[str, str]:
    images = {}
    evals = {name: results["models"][name]["eval"] for name in models}
    if plots.plot_perplexity(evals, settings.context, out / "perplexity.png"):
        images["perplexity"] = "perplexity.png"
    longest = settings.eval_lengths[-1]
    tables = {n: probe.learned_tables(m, longest - 1) for n, m in models.items()}
    tables = {n: t for n, t in tables.items() if t and n in ("t5", "kerple")}
    if plots.plot_tables(tables, settings.context, out / "tables.png"):
        images["tables"] = "tables.png"
    sample = corpus.heldout[: min(2 * settings.context, 256)].long().unsqueeze(0)
    layer, head = 0, 0
    weights = {n: probe.attention_map(m, sample, layer, head) for n, m in models.items()}
    if plots.plot_attention(weights, layer, head, settings.context, out / "attention.png"):
        images["attention"] = "attention.png"
    for key in ("perplexity", "tables", "attention"):  # no stale figure from an earlier run
        if key not in images:
            (out / f"{key}.png").unlink(missing_ok=True)
    return images
