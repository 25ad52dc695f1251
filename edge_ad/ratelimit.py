"""Reporting a recurring failure without flooding the log: the first occurrence at once, then at most one
report per interval saying how many occurred since. A full disk or a full outbox on a 50 fps line fails
50 times a second; a line per failure hides everything else (journald rate-limits the service).

What :meth:`LogLimiter.hit` holds back is reported by a later hit after the interval, or by
:meth:`LogLimiter.flush` (a timer, the stop) when none comes.

Used for failed output writes (:mod:`edge_ad.runtime.reporting`), messages the full outbox drops
(:mod:`edge_ad.mqtt.outbox`), acknowledged messages it cannot delete, messages too large for the broker or
refused by it and connections lost right after the same message (:mod:`edge_ad.mqtt.sender`), the messages the
link does not send or the broker refuses (:mod:`edge_ad.mqtt.link`), and the messages the fleet monitor finds
missing (:mod:`edge_ad.mqtt.monitor`); each flushes what is held at its clean stop, so the log counts every one.
"""

from __future__ import annotations

import threading
import time

REPORT_EVERY_S = 60.0   # a recurring failure is reported at most this often (per key)


class LogLimiter:
    """Counts occurrences per key; :meth:`hit` says when to report them. Thread-safe."""

    def __init__(self, every_s: float | None = None):
        self.every_s = every_s            # None: REPORT_EVERY_S as it is when asked (tests change it)
        self._lock = threading.Lock()
        self._state: dict[str, list] = {}   # key -> [last report (monotonic) or None, occurrences since, failing]

    def hit(self, key: str = "", n: int = 1) -> int:
        """Count ``n`` occurrences of ``key``. Returns how many to report now (all since the last report,
        these included), or 0 while the last report of ``key`` is younger than the interval."""
        every = REPORT_EVERY_S if self.every_s is None else self.every_s
        now = time.monotonic()
        with self._lock:
            st = self._state.setdefault(key, [None, 0, False])
            st[1] += n
            st[2] = True
            if st[0] is not None and now - st[0] < every:
                return 0
            since, st[0], st[1] = st[1], now, 0
            return since

    def flush(self, force: bool = False) -> dict[str, int]:
        """The occurrences :meth:`hit` held back (it returned 0 for them), per key, once the interval since
        that key's last report has passed (``force``: at once, e.g. at the stop): reported now, so the caller
        logs them ("N more since"), and the interval starts again. Without it a failure that stops recurring
        within the interval after a report is never told: only a later :meth:`hit` reports the count. Call it
        on a timer and at the end."""
        every = REPORT_EVERY_S if self.every_s is None else self.every_s
        now = time.monotonic()
        due: dict[str, int] = {}
        with self._lock:
            for key, st in self._state.items():
                if st[1] > 0 and (force or st[0] is None or now - st[0] >= every):
                    due[key] = st[1]
                    st[0], st[1] = now, 0
        return due

    def clear(self, key: str = "") -> bool:
        """``key`` works again. True when it was failing until now (say so once); the occurrences not
        reported yet are forgotten, and the interval since the last report still holds."""
        with self._lock:
            st = self._state.get(key)
            if st is None or not st[2]:
                return False
            st[1], st[2] = 0, False
            return True

    @property
    def interval_s(self) -> float:
        return REPORT_EVERY_S if self.every_s is None else self.every_s
