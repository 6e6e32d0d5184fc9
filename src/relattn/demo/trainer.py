"""Training a small byte-level TinyLM: the loop ``relattn train`` and ``relattn demo`` share.

A run stops after ``steps`` steps or ``minutes`` of training, whichever the settings give; the
learning-rate schedule (linear warm-up, cosine decay to 10 %) follows the fraction done of
either. Everything needed to continue a run (optimizer, batch order, step, elapsed time, loss
curve) is in :meth:`Trainer.state`, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from relattn import pe as encodings
from relattn.models import TinyLM, TinyLMConfig

from .._progress import Progress
from .data import Batches

__all__ = [
    "DEFAULT_ENCODINGS",
    "Interrupted",
    "TrainSettings",
    "Trainer",
    "build_model",
    "model_encoding",
    "train_model",
]

# The demo's default selection (any composition of registered names works).
DEFAULT_ENCODINGS = ("none", "rope", "alibi", "t5", "kerple", "fox", "inkling")


@dataclass
class TrainSettings:
    """What one training run needs."""

    context: int
    steps: int | None
    batch_size: int
    d_model: int
    num_layers: int
    num_heads: int
    lr: float
    seed: int
    minutes: float | None = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; :attr:`state` holds the run up to the last finished step."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__("training interrupted")
        self.state = state


def model_encoding(names: list[str]) -> dict[str, Any]:
    """TinyLMConfig's ``pe`` and ``rope`` for a composition of registered names (``[]`` is
    none; ``rope+t5`` is T5 with RoPE).

    Raises:
        ValueError: more than one additive encoding, or a rotation other than RoPE.
    """
    additive = [n for n in names if encodings.spec(n).additive]
    rotations = [n for n in names if not encodings.spec(n).additive]
    if len(additive) > 1:
        raise ValueError(f"a TinyLM takes one additive encoding; got {'+'.join(additive)}")
    if any(r != "rope" for r in rotations):
        raise ValueError(f"a TinyLM's only rotation is rope; got {'+'.join(rotations)}")
    return {"pe": additive[0] if additive else "none", "rope": bool(rotations)}


def build_model(names: list[str], s: TrainSettings, max_seq_len: int = 1 << 20) -> TinyLM:
    """A fresh TinyLM for the encodings ``names``, initialised from ``s.seed``.

    ``max_seq_len`` is only the default KV-cache capacity of ``generate()``: the model has no
    absolute positions, so nothing else depends on it, and it is set high so that a checkpoint
    never caps a generation below what the machine's memory allows.
    """
    config = TinyLMConfig(
        vocab_size=256,
        d_model=s.d_model,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        max_seq_len=max_seq_len,
        backend="auto",
        **model_encoding(names),
    )
    torch.manual_seed(s.seed)
    return TinyLM(config)


def lr_at(fraction: float, s: TrainSettings) -> float:
    """Linear warm-up over the first 5 % of the run, then cosine decay to 10 % of ``s.lr``."""
    warmup = 0.05
    if fraction < warmup:
        return s.lr * max(fraction, 0.002) / warmup
    t = min(1.0, (fraction - warmup) / (1 - warmup))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    """One model's training run on random ``s.context``-byte windows of ``stream``.

    Args:
        model: the TinyLM.
        stream: training bytes (uint8).
        s: the settings (``steps`` or ``minutes``).
        state: a :meth:`state` from an earlier run of the same settings, to continue it.
    """

    def __init__(
        self, model: TinyLM, stream: Tensor, s: TrainSettings, state: dict | None = None
    ) -> None:
        # The run's length: steps, or seconds of a time budget (shown as m:ss).
        self.budget: float
        if s.steps is not None and s.minutes is None:
            self.budget, self.unit = s.steps, ""
        elif s.minutes is not None and s.steps is None:
            self.budget, self.unit = 60 * s.minutes, "s"
        else:
            raise ValueError("give exactly one of steps and minutes")
        self.model, self.s = model, s
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
            lr=s.lr,
            betas=(0.9, 0.95),
        )
        self.batches = Batches(stream, s.context, s.batch_size, s.seed)
        self.step, self.elapsed = 0, 0.0
        self.curve: list[list[float]] = []
        self.recent: list[float] = []
        self.smooth: float | None = None
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.batches.generator.set_state(state["generator"])
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
            self.curve = [list(p) for p in state["curve"]]
            self.recent = list(state["recent"])
            self.smooth = state["smooth"]

    def fraction(self) -> float:
        """How much of the run is done, in [0, 1]."""
        return self.position() / self.budget

    def state(self) -> dict[str, Any]:
        """Everything :class:`Trainer` needs to continue this run (with the model's weights)."""
        return {
            "optimizer": self.opt.state_dict(),
            "generator": self.batches.generator.get_state(),
            "step": self.step,
            "elapsed": self.elapsed,
            "curve": self.curve,
            "recent": self.recent,
            "smooth": self.smooth,
        }

    def run(self, desc: str = "", quiet: bool = False) -> dict[str, Any]:
        """Train to the end of the run.

        Returns:
            ``{"final_loss", "steps", "seconds", "tokens_per_s", "curve": [[step, loss], ...]}``
            where ``final_loss`` is the mean training loss (nats/byte) of the last 10 % of
            steps (at most 50).

        Raises:
            Interrupted: on Ctrl-C, with the state after the last finished step.
        """
        s, model = self.s, self.model
        start_step, start_elapsed = self.step, self.elapsed
        bar = None if quiet else Progress(self.budget, desc, unit=self.unit, start=self.position())
        every = max(1, (s.steps or 500) // 50)
        model.train()
        t0 = time.perf_counter() - self.elapsed
        try:
            while self.fraction() < 1:
                self._step(every)
                self.elapsed = time.perf_counter() - t0
                if bar is not None:
                    run_s = self.elapsed - start_elapsed
                    tok_s = (self.step - start_step) * s.batch_size * s.context / max(run_s, 1e-9)
                    bar.goto(self.position(), loss=self.smooth, **{"tok/s": _k(tok_s)})
        except KeyboardInterrupt:
            raise Interrupted(self.state()) from None
        finally:
            if bar is not None:
                bar.close()
        model.eval()
        if self.curve and self.curve[-1][0] != self.step - 1 and self.recent:
            self.curve.append([self.step - 1, self.recent[-1]])
        seconds = max(self.elapsed, 1e-9)
        return {
            "final_loss": sum(self.recent) / max(1, len(self.recent)),
            "steps": self.step,
            "seconds": self.elapsed,
            "tokens_per_s": self.step * s.batch_size * s.context / seconds,
            "curve": self.curve,
        }

    def position(self) -> float:
        """Steps done, or seconds trained for a time budget."""
        return self.elapsed if self.unit == "s" else self.step

    def _step(self, every: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.fraction(), self.s)
        x, y = next(self.batches)
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {self.step}")
        self.smooth = value if self.smooth is None else 0.9 * self.smooth + 0.1 * value
        keep = max(1, min(50, (self.s.steps or 500) // 10))
        self.recent = (self.recent + [value])[-keep:]
        if self.step % every == 0:
            self.curve.append([self.step, value])
        self.step += 1


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def train_model(
    model: TinyLM, stream: Tensor, s: TrainSettings, desc: str = "", quiet: bool = False
) -> dict[str, Any]:
    """Train ``model`` from scratch for the run ``s`` describes (see :meth:`Trainer.run`)."""
    return Trainer(model, stream, s).run(desc=desc, quiet=quiet)
