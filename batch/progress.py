"""Progress on stderr: `Progress`, one line for a `load` or `backfill`, redrawn at most once a
second; `JobBoard`, one line per job of a `batch run`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

__all__ = ["JobBoard", "JobLine", "Progress"]


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


@dataclass(slots=True)
class JobLine:
    """One job's numbers on the board."""

    name: str
    shards: int = 0
    done: int = 0
    rows: int = 0
    rejects: int = 0
    fraction: float = 0.0
    """Fraction of the job's work done, 0..1, for the ETA."""
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None


class JobBoard:
    """One progress line per batch job on stderr: shards done/total, rows, rate, ETA.

    On a terminal the lines are redrawn in place; otherwise a job's line is printed
    when it starts or ends and at most every `every` seconds while it runs. `say`
    prints a message above the board.
    """

    def __init__(
        self,
        names: list[str],
        out: TextIO | None = None,
        *,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out, self.every, self.clock = out or sys.stderr, every, clock
        self.lines = {n: JobLine(n) for n in names}
        self._tty = self.out.isatty()
        self._drawn_lines = 0
        self._last = clock()
        self._printed: dict[str, float] = {}
        self._closed = False

    def say(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self._redraw()

    def close(self) -> None:
        """Stop drawing: the terminal's board is cleared, for a final report below."""
        self._clear()
        self._closed = True

    def update(self, name: str, *, event: bool = False, **values: object) -> None:
        """Change a job's numbers; `event` (start, end) prints its line at once."""
        line = self.lines[name]
        for key, value in values.items():
            setattr(line, key, value)
        now = self.clock()
        if line.state == "running" and line.started is None:
            line.started = now
        if line.state in ("succeeded", "failed", "skipped") and line.ended is None:
            line.ended = now
        if self._tty:
            if event or now - self._last >= 0.2:
                self._last = now
                self._clear()
                self._redraw()
        elif event or now - self._printed.get(name, -1e9) >= self.every:
            self._printed[name] = now
            self.out.write(self.text(line) + "\n")
            self.out.flush()

    def tick(self) -> None:
        """Redraw (terminal) or print the running jobs' lines every `every` s (otherwise)."""
        now = self.clock()
        if self._tty:
            self._clear()
            self._redraw()
            return
        for line in self.lines.values():
            if line.state == "running" and now - self._printed.get(line.name, -1e9) >= self.every:
                self._printed[line.name] = now
                self.out.write(self.text(line) + "\n")
        self.out.flush()

    def text(self, line: JobLine) -> str:
        now = line.ended if line.ended is not None else self.clock()
        elapsed = 0.0 if line.started is None else max(now - line.started, 1e-9)
        text = f"{line.name}: {line.state}"
        if line.shards:
            text += f", {line.done}/{line.shards} shards"
        if line.started is not None:
            text += f", {line.rows:,} rows ({line.rows / elapsed:,.0f}/s)"
        if line.rejects:
            text += f", {line.rejects:,} rejected"
        if line.state == "running":
            if line.fraction > 0:
                left = max(0.0, 1 - line.fraction) / line.fraction
                text += f", ETA {_clock(elapsed * left)}"
            else:
                text += ", ETA ?"  # nothing measured yet: no honest guess
        elif line.ended is not None and line.started is not None:
            text += f", {elapsed:.1f}s"
        return text

    def _clear(self) -> None:
        if self._tty and self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")  # up N lines, clear below
            self._drawn_lines = 0

    def _redraw(self) -> None:
        if self._tty and not self._closed:
            shown = [ln for ln in self.lines.values() if ln.state != "waiting"]
            for line in shown:
                self.out.write(self.text(line) + "\n")
            self._drawn_lines = len(shown)
        self.out.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
