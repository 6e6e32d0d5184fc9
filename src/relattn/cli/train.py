"""``relattn train``: train a small byte-level language model on your own text.

    relattn train [FILE_OR_FOLDER] [--pe alibi] [--context 128] [--steps N | --minutes M]
        [--out DIR] [--resume]

The text is a file, a folder of text files, or (by default) the Python standard library's own
.py files. It is split into training and held-out parts (by file, or by chunk of a single file);
the model trains on random --context-byte windows, shows loss and tokens/s as it goes, and
reports held-out perplexity at the end. DIR then holds a checkpoint that `relattn generate
--checkpoint DIR` and `relattn explain --checkpoint DIR` read. Ctrl-C saves the run so far;
`--resume` continues it with the same settings.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import UserError
from .._io import FolderLock
from ._args import bounded_float, bounded_int, seed_flag
from ._paths import check_writable_dir
from ._pe_flags import parse_pe
from ._threads import default_threads, threads_flag, torch_threads

# Flag -> (settings key, default). The settings of a run are what --resume must match.
DEFAULTS = {
    "pe": "alibi",
    "context": 128,
    "steps": None,
    "minutes": None,
    "batch_size": 16,
    "d_model": 64,
    "layers": 2,
    "heads": 4,
    "lr": 3e-3,
    "seed": 0,
    "max_bytes": 16_000_000,
    "eval_bytes": 65_536,
}
DEFAULT_STEPS = 500
# The text's positional argument, as usage, argparse's errors and the corpus errors name it.
DATA_METAVAR = "FILE_OR_FOLDER"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument(
        "data",
        nargs="?",
        metavar=DATA_METAVAR,
        help="the text to learn (default: the Python standard library's .py files)",
    )
    parser.add_argument(
        "--pe",
        metavar="NAME",
        help=f"encoding: none, a registered name, or rope+NAME (default {DEFAULTS['pe']})",
    )
    _setting(parser, "--context", bounded_int(2, 1 << 16), "L", "training window in bytes")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=bounded_int(1, 10**9),
        metavar="N",
        help=f"training steps (default {DEFAULT_STEPS})",
    )
    budget.add_argument(
        "--minutes",
        type=bounded_float(0.01, 10**6),
        metavar="M",
        help="train for this long instead of a number of steps",
    )
    parser.add_argument(
        "--out",
        default="relattn-model",
        metavar="DIR",
        help="checkpoint folder (default relattn-model)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    model = parser.add_argument_group("model and optimisation")
    _setting(model, "--batch-size", bounded_int(1, 1 << 16), "B", "windows per step")
    _setting(model, "--d-model", bounded_int(1, 1 << 14), "W", "model width")
    _setting(model, "--layers", bounded_int(1, 256), "L", "blocks")
    _setting(model, "--heads", bounded_int(1, 1024), "H", "attention heads")
    _setting(model, "--lr", bounded_float(1e-8, 10.0), "LR", "peak learning rate")
    seed_flag(model, "split, initialisation and batch order (default 0)")
    _setting(model, "--max-bytes", bounded_int(1, 1 << 40), "N", "cap on training bytes read")
    _setting(model, "--eval-bytes", bounded_int(1, 1 << 30), "N", "held-out bytes evaluated")
    threads_flag(parser, "the cores not already busy")


def _setting(
    group: argparse._ActionsContainer,
    flag: str,
    parse: Callable[[str], Any],
    metavar: str,
    what: str,
) -> None:
    """A flag for one of the run's settings; its help ends with the default from DEFAULTS (the
    flag has none of its own, so that --resume can tell a flag given from one left out)."""
    default = DEFAULTS[flag[2:].replace("-", "_")]
    group.add_argument(flag, type=parse, metavar=metavar, help=f"{what} (default {default})")


def _settings(args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: the flags given over the saved run's (with --resume) or defaults."""
    given = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None}
    data = str(Path(args.data).expanduser().resolve()) if args.data is not None else None
    if saved is None:
        settings = {**DEFAULTS, **given, "data": data}
        if settings["steps"] is None and settings["minutes"] is None:
            settings["steps"] = DEFAULT_STEPS
        return settings
    if args.data is not None:
        given["data"] = data
    differ = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in given.items() if saved.get(k) != v
    ]
    if differ:
        raise UserError(
            f"--resume: settings differ from the saved run ({'; '.join(differ)}); "
            "run without --resume to start over"
        )
    return dict(saved)


def run(args: argparse.Namespace) -> int:
    """Train (or resume), save, evaluate and say what to run next."""
    out = check_writable_dir("--out", args.out)
    if args.pe is not None:
        parse_pe(args.pe)  # a bad --pe is reported before anything is read
    lock = FolderLock(out, "relattn train", elsewhere="another --out")
    with lock, torch_threads(args.threads or default_threads()):
        return _train(args, out)


def _train(args: argparse.Namespace, out: Path) -> int:
    from ..demo import evaluate, model_folders, trainer
    from ..demo.data import CorpusError, load_corpus

    saved_model = state = saved = None
    if args.resume:
        saved_model, info, state = model_folders.read_training(out)
        saved = info.get("settings")
        if not isinstance(saved, dict):
            raise UserError(
                f"--resume: {out / model_folders.INFO_FILE} has no settings; run "
                "without --resume to start over"
            )
    elif (out / "config.json").exists() and not args.overwrite:
        raise UserError(
            f"--out {str(out)!r} already holds a model; --resume continues it, "
            "--overwrite replaces it, or choose another --out"
        )
    s = _settings(args, saved)
    names = parse_pe(s["pe"])
    try:
        corpus = load_corpus(
            s["data"],
            seed=s["seed"],
            train_bytes=s["max_bytes"],
            heldout_bytes=s["eval_bytes"] + 1,
            max_file_bytes=None,
            name=DATA_METAVAR,  # positional: named as usage and argparse's errors name it
        )
    except CorpusError as e:
        raise UserError(str(e)) from None
    context = s["context"]
    if corpus.train.numel() < context + 2 or corpus.heldout.numel() < context + 1:
        raise UserError(
            f"--context {context} is longer than the text allows ({corpus.sentence()}); "
            "give more text or a smaller --context"
        )
    ts = trainer.TrainSettings(
        context=context,
        steps=s["steps"],
        batch_size=s["batch_size"],
        d_model=s["d_model"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        lr=s["lr"],
        seed=s["seed"],
        minutes=s["minutes"],
    )
    try:
        model = saved_model if saved_model is not None else trainer.build_model(names, ts)
    except ValueError as e:
        raise UserError(f"--pe {s['pe']}: {e}") from None
    info = {
        "settings": s,
        "corpus": corpus.describe(),
        "parameters": model.num_parameters(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    print(
        f"relattn train: TinyLM ({model.num_parameters()} parameters, pe {s['pe']}) on "
        f"{corpus.source}: {corpus.sentence()}",
        file=sys.stderr,
    )
    loop = trainer.Trainer(model, corpus.train, ts, state)
    try:
        result = loop.run(desc="train")
    except trainer.Interrupted as stop:
        model_folders.save_training(out, model, stop.state, {**info, "finished": False})
        print(
            f"relattn train: stopped at step {stop.state['step']}; saved to {out} — run the "
            "same command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    total = min(s["eval_bytes"], corpus.heldout.numel() - 1) // context * context
    row = evaluate.perplexity(model, corpus.heldout, context, total)
    info.update(finished=True, train=result, eval=row)
    model_folders.save_training(out, model, loop.state(), info)
    print(
        f"held-out perplexity per byte at N={context}: {row['ppl']:.3f} "
        f"({row['bpb']:.3f} bits/byte, {row['tokens']} bytes never trained on)\n"
        f"saved {out}\n"
        f"next: relattn generate --checkpoint {out} --prompt 'some text'\n"
        f"      relattn explain --checkpoint {out} 'some text' --png attention.png"
    )
    return 0
