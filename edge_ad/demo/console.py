"""Console output of the demo: one line per step with its timing, and the live monitor table."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from ..errors import EdgeADError
from .plan import DemoFailure

STEPS = ("data", "train", "evaluate", "quantize", "broker", "inspect", "stop", "report")


class Console:
    """Step lines, sub-lines, and the live monitor table (redrawn in place on a terminal, plain lines
    otherwise). Every write goes through here so the table never garbles a message."""

    def __init__(self, out: TextIO | None = None, live: bool | None = None):
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self._drawn = 0
        self._lock = threading.Lock()

    def _clear(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            self.out.write(text + "\n")
            self.out.flush()

    def table(self, text: str) -> None:
        """A live table (terminal only): replaces the previous one. Lines are cut to the terminal's width,
        so none wraps and the redraw moves back over exactly the lines it wrote."""
        import shutil

        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        text = "\n".join(line[:width] for line in text.splitlines())
        with self._lock:
            self._clear()
            self.out.write(text + "\n")
            self.out.flush()
            self._drawn = text.count("\n") + 1

    def release(self) -> None:
        """Keep the last table on screen; later lines go below it."""
        with self._lock:
            self._drawn = 0


@dataclass
class StepRecord:
    index: int
    name: str
    seconds: float = 0.0
    status: str = "pending"      # ok | warning | failed | skipped
    summary: str = ""


class Steps:
    def __init__(self, console: Console):
        self.console = console
        self.records = [StepRecord(i + 1, n) for i, n in enumerate(STEPS)]

    def get(self, name: str) -> StepRecord:
        return self.records[STEPS.index(name)]

    def prefix(self, name: str) -> str:
        return f"[{STEPS.index(name) + 1}/{len(STEPS)}] {name:<9}"

    def run(self, name: str, fn: Callable[[], tuple[str, str]]):
        """Run ``fn`` (returns (status, summary)); print one line; a failure raises DemoFailure."""
        rec = self.get(name)
        t0 = time.monotonic()
        try:
            status, summary = fn()
        except KeyboardInterrupt:
            rec.seconds, rec.status, rec.summary = time.monotonic() - t0, "failed", "interrupted"
            raise
        except EdgeADError as exc:
            rec.seconds, rec.status, rec.summary = time.monotonic() - t0, "failed", str(exc)
            self.console.line(f"{self.prefix(name)} {rec.seconds:6.1f} s  FAILED: {exc}")
            raise DemoFailure(f"demo step {rec.index} ({name}) failed: {exc}") from exc
        except Exception as exc:  # an unexpected error still ends with a clear message and exit code 1
            rec.seconds, rec.status = time.monotonic() - t0, "failed"
            rec.summary = f"{type(exc).__name__}: {exc}"
            self.console.line(f"{self.prefix(name)} {rec.seconds:6.1f} s  FAILED: {rec.summary}")
            raise DemoFailure(f"demo step {rec.index} ({name}) failed: {rec.summary}") from exc
        rec.seconds, rec.status, rec.summary = time.monotonic() - t0, status, summary
        self.console.line(f"{self.prefix(name)} {rec.seconds:6.1f} s  {summary}")
        return rec
