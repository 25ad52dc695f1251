"""Ctrl-C in the ``edge-ad`` entry point: ``interrupted`` and exit 130, never a traceback.

Importing this module (the first thing :mod:`edge_ad.cli` does) makes a Ctrl-C while the commands load (click,
each command module) exit at once with that message: Python's own handler would raise a KeyboardInterrupt
with a traceback of whatever import it hit. :func:`loaded` puts Python's handler back, for the commands'
KeyboardInterrupt. Only where Ctrl-C is Python's (not ignored: a background job, nohup), and in the main thread
(a signal handler can be set only there).
"""

from __future__ import annotations

import signal
import sys
import threading


def interrupted(exc: BaseException | None = None):
    """Ctrl-C (or SIGTERM to a training loop): its message (a training loop's says where it stopped and how to
    go on), else ``interrupted``; exit 128 + the signal, as the shell reports it: 130 for Ctrl-C, 143 for
    SIGTERM (systemd, docker stop)."""
    print(str(exc or "") or "interrupted", file=sys.stderr, flush=True)
    sys.exit(128 + (getattr(exc, "signum", None) or signal.SIGINT))


def _while_loading(signum, frame):
    interrupted()


def loaded() -> None:
    """The commands are loaded: Python's handler again (a KeyboardInterrupt the commands and the CLI handle)."""
    if signal.getsignal(signal.SIGINT) is _while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _while_loading)
