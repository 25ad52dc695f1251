"""Keeping a camera alive: reconnect with back-off, a watchdog for silence, outage events and counters.

:class:`Camera` wraps a :class:`~edge_ad.runtime.sources.Source`. ``read()`` returns the next frame,
``None`` at the end of a finite stream, and rides out outages: a failed open or read starts an outage
(an event and a counter), the source is reopened after 0.5, 1, 2, ... s (up to ``backoff_max_s``, with
jitter), and the first frame after it ends the outage (another event). With ``reconnect_attempts`` > 0 it
gives up after that many failed attempts in one outage and raises :class:`SourceLost`.

The watchdog (``watchdog()``, called by the service every second) declares an outage when one read has
been blocked for more than ``watchdog_s`` (a camera that stalls without an error); the systemd watchdog
stops being fed if it stays stuck, so systemd restarts the service. The pacing wait of a paced source
(``fps=N`` of a file, folder or generated source: :meth:`Source.wait_turn`) comes before the read and is
not timed: ``read_started`` is when the read of the last frame began, after that wait (the pipeline's
capture time, start of ``stages_ms.capture`` and ``latency_ms``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable

from .sources import RawFrame, Source, SourceLost

log = logging.getLogger(__name__)


class Camera:
    def __init__(self, source: Source, stop: threading.Event, on_event: Callable[[dict], None] | None = None,
                 reconnect: bool = True, reconnect_attempts: int = 0, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, watchdog_s: float = 10.0):
        self.source = source
        self.stop = stop
        self.on_event = on_event or (lambda e: None)
        self.reconnect = reconnect
        self.reconnect_attempts = int(reconnect_attempts)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.watchdog_s = float(watchdog_s)
        self._open = False
        self._lock = threading.Lock()
        # counters (read by telemetry)
        self.frames = 0
        self.outages = 0
        self.reconnects = 0
        self.open_failures = 0
        self.watchdog_trips = 0
        self.in_outage = False
        self.outage_since = 0.0
        self.last_error = ""
        self.last_frame_t = 0.0
        self._read_started = 0.0   # monotonic start of the read in progress (0: not reading)
        # (time.perf_counter(), time.time()) when the read of the last frame began, after the pacing wait
        self.read_started = (0.0, 0.0)
        self._attempts = 0
        self._next_open = 0.0
        self._delay = self.backoff_initial_s
        self._watchdog_tripped = False

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def connected(self) -> bool:
        return self._open and not self.in_outage

    def stats(self) -> dict[str, Any]:
        return {"uri": self.name, "connected": self.connected, "frames": self.frames, "outages": self.outages,
                "reconnects": self.reconnects, "open_failures": self.open_failures,
                "watchdog_trips": self.watchdog_trips, "in_outage": self.in_outage,
                "outage_s": round(time.monotonic() - self.outage_since, 1) if self.in_outage else 0.0,
                "last_error": self.last_error}

    # ------------------------------------------------------------------ outages
    def _start_outage(self, reason: str) -> None:
        self.last_error = reason
        with self._lock:
            if self.in_outage:
                return
            self.in_outage = True
            self.outage_since = time.monotonic()
            self.outages += 1
        log.warning("source outage: %s", reason)
        self.on_event({"type": "source_lost", "source": self.name, "reason": reason, "outages": self.outages})

    def _end_outage(self) -> None:
        with self._lock:
            if not self.in_outage:
                return
            self.in_outage = False
            dur = time.monotonic() - self.outage_since
        log.warning("source restored after %.1f s: %s", dur, self.name)
        self.on_event({"type": "source_restored", "source": self.name, "outage_s": round(dur, 3),
                       "reconnects": self.reconnects})

    def _backoff(self) -> None:
        delay = min(self._delay, self.backoff_max_s)
        delay *= random.uniform(0.8, 1.2)  # jitter: cameras of one site do not reconnect in lockstep
        self._next_open = time.monotonic() + delay
        self._delay = min(self._delay * 2.0, self.backoff_max_s)

    def _give_up(self, reason: str) -> SourceLost:
        return SourceLost(f"{self.name}: gave up after {self._attempts} reconnect attempt(s): {reason}")

    # ------------------------------------------------------------------ reading
    def open(self) -> None:
        """Open the source now, once: :class:`SourceLost` when it cannot be, with no outage, event or retry
        (a one-shot command whose source must be there when it starts: ``edge-ad capture`` without
        ``--config``). ``read()`` then goes on from the open source, and rides out later outages as usual."""
        self.source.open()
        self._open = True

    def _try_open(self) -> bool:
        wait = self._next_open - time.monotonic()
        if wait > 0 and self.stop.wait(wait):
            return False
        try:
            self.source.open()
        except SourceLost as exc:
            self.open_failures += 1
            self._failed(str(exc), counted=True)
            return False
        if self.in_outage:
            self.reconnects += 1
        self._open = True
        return True

    def _failed(self, reason: str, counted: bool) -> None:
        """Record a failure; raise when reconnecting is off or the attempts are used up, else back off.

        Open failures always count as attempts; a read failure counts when it happens while recovering
        (a camera that opens but never delivers must not be retried forever when attempts are bounded).
        """
        was_out = self.in_outage
        self._start_outage(reason)
        if not self.reconnect:
            raise SourceLost(f"{reason} (source.reconnect is off)")
        if counted or was_out:
            self._attempts += 1
        if self.reconnect_attempts and self._attempts >= self.reconnect_attempts:
            raise self._give_up(reason)
        self._backoff()

    def read(self) -> RawFrame | None:
        """The next frame; None at the end of a finite source or when stopped; SourceLost when given up."""
        while not self.stop.is_set():
            if not self._open and not self._try_open():
                continue
            # a paced file/folder/generated source waits for its frame's turn here, before the watchdog's
            # clock starts: that wait is not a blocked read (fps=0.05 with watchdog_s=10 is no outage)
            if not self.source.wait_turn(self.stop):
                continue
            self._read_started = time.monotonic()
            started = (time.perf_counter(), time.time())
            try:
                frame = self.source.read()
            except SourceLost as exc:
                self._read_started = 0.0
                self._close_source()
                self._failed(str(exc), counted=False)
                continue
            finally:
                self._read_started = 0.0
            if frame is None:
                return None
            self.frames += 1
            self.read_started = started
            self.last_frame_t = time.monotonic()
            self._attempts = 0
            self._delay = self.backoff_initial_s
            self._watchdog_tripped = False
            self._end_outage()
            return frame
        return None

    def watchdog(self, now: float | None = None) -> bool:
        """Declare an outage when the read in progress has been blocked longer than ``watchdog_s``."""
        if self.watchdog_s <= 0 or self._watchdog_tripped:
            return False
        started = self._read_started
        now = time.monotonic() if now is None else now
        if started and now - started > self.watchdog_s:
            self._watchdog_tripped = True
            self.watchdog_trips += 1
            self._start_outage(f"no frame for {now - started:.1f} s (watchdog {self.watchdog_s:g} s)")
            return True
        return False

    @property
    def stalled_for(self) -> float:
        """Seconds the read in progress has been blocked (0 when not reading)."""
        started = self._read_started
        return time.monotonic() - started if started else 0.0

    def _close_source(self) -> None:
        self._open = False
        try:
            self.source.close()
        except Exception as exc:  # a dying device may raise on release; it is gone either way
            log.debug("closing %s: %s", self.name, exc)

    def close(self) -> None:
        self._close_source()
