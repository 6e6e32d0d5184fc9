"""The whole demo: train one model per encoding, evaluate it at growing lengths, write the report.

What is on disk always agrees with itself:

- one run at a time per folder (a lock; a second run is refused in one line);
- after each model: its checkpoint (written beside and renamed), then its entry in results.json
  (written beside and renamed), then the figures and the report; the old report is deleted
  before results.json changes, so a report, where there is one, describes the results next to
  it;
- ``resume=True`` keeps only what checks out: a results.json that is not a results object, a
  checkpoint that does not load or holds another encoding's model, an entry without its
  evaluation — each is said and trained again.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._io import FolderLock
from . import evaluate, probe, report, trainer
from .data import Corpus, CorpusError, load_corpus
from .model_folders import save_model_dir
from .settings import DemoSettings

# A figure of every head of every layer is drawn on this many held-out bytes.
ATTENTION_BYTES = 48
# Sample generations: prompt and continuation lengths in bytes.
PROMPT_BYTES, SAMPLE_BYTES = 64, 160


class DemoError(ValueError):
    """The demo cannot run as asked (bad settings, mismatched resume, unusable corpus)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    """The machine the numbers come from."""
    from relattn.benchmarking.common import machine_info

    return dict(machine_info())


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
        **(saved.get("settings") or {}),
        **{"corpus." + k: v for k, v in (saved.get("corpus") or {}).items()},
    }
    diff = [f"{k}: saved {have.get(k)!r}, now {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise DemoError(
            f"--resume: settings differ from the run saved in {path} ({'; '.join(diff)}); "
            "run without --resume to start over, or choose another --out"
        )


def _saved_results(path: Path, log: Callable[[str], None]) -> dict | None:
    """results.json if it is a results object; None (and why, in the log) otherwise."""
    raw = report.read_json(path)
    if raw is None:
        log(f"resume: no readable results in {path}; training every model")
        return None
    problem = None
    if not isinstance(raw, dict):
        problem = f"it holds a {type(raw).__name__}, not a results object"
    elif not isinstance(raw.get("models"), dict) or not isinstance(raw.get("settings"), dict):
        problem = "it has no 'models' and 'settings' objects"
    if problem:
        log(f"resume: {path} is not a demo's results ({problem}); training every model")
        return None
    return raw


def _resumable(
    name: str,
    entry: Any,
    folder: Path,
    expected: dict,
    lengths: list[int],
    log: Callable[[str], None],
):
    """The saved model for ``name`` if its entry and checkpoint check out, else None."""
    from relattn.models import TinyLM

    if entry is None:
        return None
    rows = entry.get("eval") if isinstance(entry, dict) else None
    if not isinstance(rows, list) or [r.get("length") for r in rows if isinstance(r, dict)] != (
        lengths
    ):
        log(f"resume: results for {name} are incomplete; training {name} again")
        return None
    try:
        model = TinyLM.load(folder)
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint is retrained)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        log(f"resume: {folder} is unreadable ({first}); training {name} again")
        return None
    have = dataclasses.asdict(model.config)
    if have != expected or entry.get("config") != expected:
        what = f"pe {have.get('pe')!r}, rope {have.get('rope')}"
        log(f"resume: {folder} holds another model ({what}); training {name} again")
        return None
    return model


def run(
    settings: DemoSettings,
    out: Path,
    resume: bool = False,
    log: Callable[[str], None] = _log,
) -> tuple[dict, list[str]]:
    """Run the demo into folder ``out`` (locked for the duration).

    Returns:
        ``(results, summary)``: the contents of results.json and the plain-language summary.
    """
    start = time.perf_counter()
    lengths = settings.eval_lengths
    total = evaluate.eval_total(lengths, settings.eval_bytes)
    corpus = _corpus(settings, total)
    with FolderLock(out, "another relattn demo", elsewhere="another --out"):
        return _run(settings, out, resume, log, corpus, total, start)


def _corpus(settings: DemoSettings, total: int) -> Corpus:
    lengths = settings.eval_lengths
    try:
        corpus = load_corpus(
            settings.data,
            seed=settings.seed,
            train_bytes=settings.train_bytes,
            heldout_bytes=total + 1,
        )
    except CorpusError as e:
        raise DemoError(str(e)) from None
    held = corpus.heldout.numel()
    if held < total + 1:
        longest = lengths[-1]
        fits = (held - 1) // longest * longest
        fix = (
            f"pass --eval-bytes {fits} (or give more text)"
            if fits >= 2 * longest
            else "give more text, or a smaller --context (evaluation needs two windows of "
            f"{longest} bytes)"
        )
        raise DemoError(
            f"the held-out text has {held} bytes ({corpus.sentence()}); --eval-bytes "
            f"{settings.eval_bytes} at lengths up to {longest} needs {total + 1}: {fix}"
        )
    if corpus.train.numel() < settings.context + 2:
        raise DemoError(
            f"the training text has {corpus.train.numel()} bytes; --context {settings.context} "
            "needs more"
        )
    return corpus


def _run(settings, out, resume, log, corpus, total, start) -> tuple[dict, list[str]]:
    lengths = settings.eval_lengths
    results_path = out / "results.json"
    results = _saved_results(results_path, log) if resume else None
    if results is not None:
        _check_resume(results, settings, corpus, results_path)
    if results is None:
        results = _fresh(settings, corpus)
    log(
        f"corpus: {corpus.source}: {corpus.sentence()}; evaluating on {total} held-out bytes; "
        f"torch threads: {torch.get_num_threads()}"
    )
    results["protocol"] = report.PROTOCOL.format(context=settings.context, total=total)
    results["torch_threads"] = torch.get_num_threads()
    report.remove_reports(out)
    report.write_json(results_path, results)

    ts = settings.train_settings()
    models: dict[str, Any] = {}
    for index, name in enumerate(settings.encodings, 1):
        names = [n for n in name.split("+") if n != "none"]
        folder = out / "checkpoints" / name
        fresh = trainer.build_model(names, ts)
        expected = dataclasses.asdict(fresh.config)
        saved = None
        if resume:
            saved = _resumable(name, results["models"].get(name), folder, expected, lengths, log)
        if saved is not None:
            log(f"resume: {name} already trained ({folder}); skipping")
            models[name] = saved
            continue
        results["models"].pop(name, None)
        (out / f"attention-{name}.png").unlink(missing_ok=True)
        tag = f"[{index}/{len(settings.encodings)}] {name:<6}"
        trained = trainer.train_model(fresh, corpus.train, ts, desc=tag)
        rows = evaluate.evaluate(fresh, corpus.heldout, lengths, total)
        log(
            f"{tag} eval ppl: "
            + ", ".join(f"N={r['length']}: {r['ppl']:.3f}" for r in rows)
            + f" ({sum(r['seconds'] for r in rows):.1f}s)"
        )
        save_model_dir(fresh, folder)
        entry = {
            "config": expected,
            "parameters": fresh.num_parameters(),
            "train": trained,
            "eval": rows,
            "checkpoint": str(folder.relative_to(out)),
            "sample": _sample(fresh, corpus),
        }
        report.remove_reports(out)
        results["models"][name] = entry
        report.write_json(results_path, results)
        models[name] = fresh
        _report(models, results, corpus, settings, out, final=False)

    results["seconds_this_run"] = time.perf_counter() - start
    report.remove_reports(out)
    report.write_json(results_path, results)
    _report(models, results, corpus, settings, out, final=True)
    names = [n for n in settings.encodings if n in results["models"]]
    summary = report.summarize({n: results["models"][n] for n in names}, settings.context)
    return results, summary


def _sample(model, corpus: Corpus) -> dict[str, str]:
    """A continuation of a held-out prompt (seeded, so the report is reproducible)."""
    from relattn.models import ids_to_text

    from .sample import sample_bytes

    prompt = corpus.heldout[:PROMPT_BYTES].long()
    ids = list(sample_bytes(model, prompt, SAMPLE_BYTES, temperature=0.8, top_k=40, seed=0))
    return {"prompt": ids_to_text(prompt), "continuation": ids_to_text(torch.tensor(ids))}


def _report(models, results, corpus, settings, out: Path, final: bool) -> None:
    """Figures, then results.json with their names, then the report. Between models
    (``final=False``) only the finished models' attention figures are drawn; the figures that
    compare every model are drawn once at the end (and removed until then, so none is stale)."""
    names = [n for n in settings.encodings if n in results["models"]]
    images = _plots(models, results, corpus, settings, out, final)
    results["images"] = images
    report.write_json(out / "results.json", results)
    report.write_reports(out, results, names, images)


def _plots(models, results, corpus, settings, out: Path, final: bool) -> dict[str, str]:
    from relattn import viz

    try:
        viz.require_matplotlib()
    except viz.PlotUnavailable:
        return {}
    names = [n for n in settings.encodings if n in results["models"]]
    images = _comparisons(models, results, settings, out, names) if final else {}
    sample = corpus.heldout[:ATTENTION_BYTES].long()
    tokens = [probe.byte_label(int(b)) for b in sample]
    for name in names:
        file = f"attention-{name}.png"
        if name in models and not (out / file).exists():
            weights = probe.attention_maps(models[name], sample.unsqueeze(0))
            viz.plot_attention_heads(
                tokens, weights, out / file, title=f"{name}: attention on held-out text"
            )
        if (out / file).exists():
            images[f"attention-{name}"] = file
    keep = set(images.values())
    ours = [out / f for f in ("perplexity.png", "loss.png", "tables.png", "attention.png")]
    for stale in [*ours, *out.glob("attention-*.png")]:  # none left from an earlier run
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return images


def _comparisons(models, results, settings, out: Path, names: list[str]) -> dict[str, str]:
    from relattn import pe, viz

    images: dict[str, str] = {}
    viz.plot_perplexity(
        {n: results["models"][n]["eval"] for n in names}, settings.context, out / "perplexity.png"
    )
    images["perplexity"] = "perplexity.png"
    viz.plot_loss({n: results["models"][n]["train"]["curve"] for n in names}, out / "loss.png")
    images["loss"] = "loss.png"
    longest = settings.eval_lengths[-1]
    learned = {
        n: probe.learned_tables(m, longest - 1)
        for n, m in models.items()
        if any(
            pe.spec(part).learnable and pe.spec(part).additive and not pe.spec(part).token
            for part in n.split("+")
            if part != "none"
        )
    }
    if viz.plot_learned_tables(
        {n: t for n, t in learned.items() if t}, settings.context, out / "tables.png"
    ):
        images["tables"] = "tables.png"
    return images
