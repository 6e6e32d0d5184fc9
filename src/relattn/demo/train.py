"""Training one small byte-level language model per position encoding."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import train_batches
from .progress import Progress

# The encodings the demo knows, in display order, and how each maps onto TinyLMConfig.
ENCODINGS: dict[str, dict] = {
    "none": {"pe": "none", "rope": False},
    "rope": {"pe": "none", "rope": True},
    "alibi": {"pe": "alibi", "rope": False},
    "t5": {"pe": "t5", "rope": False},
    "kerple": {"pe": "kerple", "rope": False},
    "offset": {"pe": "offset", "rope": False},
}
DEFAULT_ENCODINGS = ("none", "rope", "alibi", "t5", "kerple")


@dataclass
class TrainSettings:
    """What one training run needs (a subset of the demo's settings)."""

    context: int
    steps: int
    batch_size: int
    d_model: int
    num_layers: int
    num_heads: int
    lr: float
    seed: int


def build_model(name: str, s: TrainSettings, max_seq_len: int) -> nn.Module:
    """A fresh TinyLM for encoding ``name``, initialised from ``s.seed`` (same for every name)."""
    from relattn.models import TinyLM, TinyLMConfig

    config = TinyLMConfig(
        vocab_size=256,
        d_model=s.d_model,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        max_seq_len=max_seq_len,
        backend="auto",
        **ENCODINGS[name],
    )
    torch.manual_seed(s.seed)
    return TinyLM(config)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``s.lr``."""
    warmup = max(1, s.steps // 20)
    if step < warmup:
        return s.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, s.steps - warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(
    model: nn.Module, stream: Tensor, s: TrainSettings, desc: str = "", quiet: bool = False
) -> dict:
    """Train ``model`` on random ``s.context``-byte windows of ``stream`` (same batches for every
    model, since they come from ``s.seed``).

    Returns:
        ``{"final_loss", "seconds", "tokens_per_s", "curve": [[step, loss], ...]}`` where
        ``final_loss`` is the mean training loss (nats/byte) over the last 10% of steps.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )
    batches = train_batches(stream, s.context, s.batch_size, s.seed)
    model.train()
    tail = max(1, s.steps // 10)
    tail_losses: list[float] = []
    curve: list[list[float]] = []
    every = max(1, s.steps // 50)
    smooth = None
    start = time.perf_counter()
    bar = None if quiet else Progress(s.steps, desc)
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        x, y = next(batches)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        if step >= s.steps - tail:
            tail_losses.append(value)
        if step % every == 0 or step == s.steps - 1:
            curve.append([step, value])
        if bar is not None:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * s.batch_size * s.context / max(elapsed, 1e-9)
            bar.update(1, **{"loss": smooth, "tok/s": f"{tok_s / 1000:.1f}k"})
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "final_loss": sum(tail_losses) / len(tail_losses),
        "seconds": seconds,
        "tokens_per_s": s.steps * s.batch_size * s.context / max(seconds, 1e-9),
        "curve": curve,
    }
