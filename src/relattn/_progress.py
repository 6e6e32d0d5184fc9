"""Progress on a terminal or in a log: a bar redrawn in place on a TTY, a line every few seconds
elsewhere. Used by the training loop (:mod:`relattn.demo.trainer`) and ``relattn bench``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` steps, with free-form fields (loss, tokens/s, ...).

    On a TTY the bar is redrawn at most every ``interval`` seconds; on anything else (a log
    file, CI) a full line is written every ``line_interval`` seconds and at the end.

    Args:
        total: number of steps (or seconds, for a time budget; see :meth:`goto`).
        desc: label in front of the bar.
        stream: where to write (default ``sys.stderr``).
        width: bar width in characters.
        unit: ``""`` for steps, ``"s"`` for a time budget (shown as m:ss).
    """

    def __init__(
        self,
        total: float,
        desc: str = "",
        stream: TextIO | None = None,
        width: int = 24,
        interval: float = 0.1,
        line_interval: float = 10.0,
        unit: str = "",
        start: float = 0,
    ) -> None:
        self.total = max(1, total)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.unit = unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else line_interval
        self.count = min(self.total, start)
        self.fields: dict[str, str] = {}
        self.start = time.perf_counter()
        self._first = self.count
        self._last = -float("inf")
        self._closed = False

    def update(self, n: float = 1, **fields: object) -> None:
        """Advance by ``n`` steps and set the displayed fields (``loss=1.23``, ...)."""
        self.goto(self.count + n, **fields)

    def goto(self, count: float, **fields: object) -> None:
        """Set the position to ``count`` (elapsed seconds for a time budget)."""
        self.count = min(self.total, count)
        for key, value in fields.items():
            self.fields[key] = f"{value:.3f}" if isinstance(value, float) else str(value)
        now = time.perf_counter()
        if now - self._last >= self.interval or self.count >= self.total:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        self._closed = True
        self._draw(final=True)

    def _amount(self, x: float) -> str:
        return format_seconds(x) if self.unit == "s" else str(int(x))

    def line(self) -> str:
        """The current state as one line (without carriage return or newline)."""
        elapsed = time.perf_counter() - self.start
        frac = self.count / self.total
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        done = self.count - self._first
        if done > 0 and self.count < self.total:
            eta = f"{format_seconds(elapsed * (self.total - self.count) / done)} left"
        else:
            eta = f"{format_seconds(elapsed)} elapsed"
        extra = " ".join(f"{k} {v}" for k, v in self.fields.items())
        head = f"{self.desc} " if self.desc else ""
        amount = f"{self._amount(self.count)}/{self._amount(self.total)}"
        return f"{head}[{bar}] {amount} {extra} {eta}".replace("  ", " ")

    def _draw(self, final: bool) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final or self.count < self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
