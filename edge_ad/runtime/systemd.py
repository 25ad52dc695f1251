"""systemd notifications (``sd_notify``) over ``$NOTIFY_SOCKET``, without a dependency.

Under a unit with ``Type=notify`` the loop sends ``READY=1`` once the model is open and its threads run
(before the first frame: the capture thread opens the camera, retrying), ``WATCHDOG=1`` while it
is healthy (at half of ``WatchdogSec``), ``STATUS=...`` lines, and ``STOPPING=1`` when it drains. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import collections
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr:
            if addr.startswith("@"):  # abstract namespace
                self._addr = "\0" + addr[1:]
            elif addr.startswith("/"):
                self._addr = addr
            else:
                log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", addr)
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = 0.0
        if usec.isdigit() and int(usec) > 0 and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        # the last messages sent (for tests and 'status'): bounded, since a service sends a watchdog
        # ping every few seconds for months
        self.sent: collections.deque[str] = collections.deque(maxlen=64)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        msg = "\n".join(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)   # a stalled reader must never stall the loop
            self._sock.sendto(msg.encode("utf-8"), self._addr)
            self.sent.append(msg)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", msg, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
