"""A one-line progress report on stderr for long batch jobs, at most once a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts done and rejected units and redraws `label: done (rate/s), rejected, pct`."""

    def __init__(self, label: str, total: int | None = None, out: TextIO | None = None) -> None:
        self.label, self.total, self.out = label, total, out or sys.stderr
        self.done = self.rejected = 0
        self.started = self._drawn = time.monotonic()
        self._tty = self.out.isatty()

    def advance(self, done: int = 0, rejected: int = 0, position: int | None = None) -> None:
        self.done += done
        self.rejected += rejected
        if position is not None:
            self._position = position
        now = time.monotonic()
        if now - self._drawn >= 1.0:
            self._drawn = now
            self._draw(final=False)

    def finish(self) -> None:
        self._draw(final=True)

    def _draw(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        text = f"{self.label}: {self.done:,} ({self.done / elapsed:,.0f}/s)"
        if self.rejected:
            text += f", {self.rejected:,} rejected"
        position = getattr(self, "_position", None)
        if self.total and position is not None:
            text += f", {min(100.0, 100 * position / self.total):.0f}%"
        if final:
            text += f", {elapsed:.1f}s"
        end = "\n" if final or not self._tty else ""
        self.out.write(("\r" if self._tty else "") + text + end)
        self.out.flush()
