"""The one ``edge-ad`` entry point. Thin: parse arguments, call the library, print.

Commands live in small modules of this package, one per area, each registering on :data:`main`.
Heavy imports (torch, onnxruntime) happen inside the commands, so ``edge-ad --help`` is instant and a
runtime-only install never needs torch.

Exit codes: 0 ok, 2 usage or input error, 1 runtime failure; a training loop stopped by a signal:
128 + the signal (130 Ctrl-C, 143 SIGTERM). A command whose stdout's reader went away (``edge-ad monitor --json
| head -1``) stops there quietly with 0, as ``edge-ad run`` does: no failure of its own (:func:`drop_stdout`).

Ctrl-C anywhere from the import of this package to the end of the command (loading the commands, parsing the
arguments, the command itself, unless it handles Ctrl-C itself as ``run`` does) prints ``interrupted`` (or a
training loop's message) and exits 130, never a traceback (:mod:`.interrupt`); once the command has finished,
the console entry point ignores Ctrl-C, so that its exit status is the command's own (the interpreter's
shutdown would otherwise die by the signal after the work was done).
"""

from __future__ import annotations

from . import interrupt  # first: a Ctrl-C while the commands load exits with "interrupted", no traceback

import errno
import importlib
import logging
import os
import signal
import sys
import threading

import click

from .. import __version__
from ..errors import EdgeADError, name_text, os_error_text, reader_gone

# Modules that add commands to `main`. Each owns one area of the CLI.
COMMAND_MODULES = ("train", "compile", "run", "mqtt", "calibrate", "deploy", "demo")


class _Group(click.Group):
    entry_point = False   # this call of main() is the process's (edge-ad, python -m edge_ad): see main()

    def main(self, args=None, *rest, **kwargs):
        """The console entry point calls this with no ``args`` (they come from sys.argv); a test's runner gives
        them. A Ctrl-C outside the command and click's own handling is told as in a command; once the command
        is done the entry point's process ignores Ctrl-C, so a late one cannot turn its exit status into a death
        by the signal during the interpreter's shutdown."""
        self.entry_point = args is None and threading.current_thread() is threading.main_thread()
        try:
            return super().main(args, *rest, **kwargs)
        except KeyboardInterrupt as exc:
            interrupt.interrupted(exc)
        finally:
            self._done()

    def _done(self) -> None:
        if self.entry_point:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def make_context(self, *args, **kwargs):
        try:   # click would print "Aborted!" and exit 1 for a Ctrl-C while it parses the arguments
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:
            interrupt.interrupted(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeADError as exc:
            click.echo(name_text(f"error: {exc}"), err=True)   # a file name that is not UTF-8 as \xfe
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            if not reader_gone(sys.stdout):   # a socket, a child's pipe: a real crash
                raise
            drop_stdout()                     # `... | head -1`: the reader has what it wanted
            sys.exit(0)
        except KeyboardInterrupt as exc:  # a training loop's says where it stopped and how to go on
            interrupt.interrupted(exc)
        except OSError as exc:
            # not about a path the user gave (a socket, a device): a real crash; a full or failing disk is not
            if exc.filename is None and exc.errno not in _DISK_ERRNOS:
                raise
            logging.getLogger(__name__).debug("OS error", exc_info=True)
            click.echo(name_text(f"error: {os_error_text(exc)}"), err=True)
            sys.exit(2 if exc.errno in _INPUT_ERRNOS else 1)
        finally:   # the command is done (or failed, or was interrupted): its exit status stands
            self._done()


def drop_stdout() -> None:
    """The reader of stdout closed the pipe: send what is still to be written (buffered text, a summary)
    to /dev/null, so that neither it nor the interpreter's flush at exit raises a second BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):   # no real stdout (a test's runner): nothing will be flushed to a pipe
        pass


# OS errors about a path the user named (a file where a folder must be, a missing parent, no
# permission): input errors (exit 2). Others with a path (disk full, I/O error): runtime failures (exit 1).
_DISK_ERRNOS = {errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}
_INPUT_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edge-ad")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """edge-ad: visual anomaly inspection for factory lines on edge devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class _LogFormatter(logging.Formatter):
    """Log lines show a file name that is not UTF-8 as every record of edge-ad stores it (``\\xfe``:
    :func:`~edge_ad.errors.name_text`), not as Python's stderr escapes the lone surrogate (``\\udcfe``)."""

    def format(self, record: logging.LogRecord) -> str:
        return name_text(super().format(record))


try:
    for _name in COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{_name}")
        except ModuleNotFoundError as _exc:  # a module of this package not written yet
            if _exc.name != f"{__name__}.{_name}":
                raise
finally:
    interrupt.loaded()
