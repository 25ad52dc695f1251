"""Exceptions that carry the exit code the CLI returns (0 ok, 2 usage or input error, 1 runtime failure, 3 a
device that is offline: :class:`DeviceOffline`), and
helpers that word their messages (:func:`os_error_text`, :func:`clip_text`) or tell a closed pipe
(:func:`reader_gone`)."""

import errno
import select


class EdgeADError(Exception):
    """Base class. ``exit_code`` is what ``edge-ad`` exits with when this escapes a command."""

    exit_code = 1

    def reply_fields(self) -> dict:
        """Fields the MQTT reply's ``error`` object carries beside ``code`` and ``message`` when this fails a
        command (each one the reply schema, ``edge_ad/schemas/reply.schema.json``, names); none by default."""
        return {}


class InputError(EdgeADError):
    """Bad user input: a file, field or value that is not what was expected. Exit code 2."""

    exit_code = 2


class RuntimeFailure(EdgeADError):
    """Something failed while doing valid work (a broker, a device, a numerical guard). Exit code 1."""

    exit_code = 1


class Busy(RuntimeFailure):
    """Another process or thread holds the lock of a folder (:func:`edge_ad.atomic.folder_lock`): nothing
    was done, and the same work may succeed once it is free (a health check's rollback retries it)."""


class DeviceOffline(RuntimeFailure):
    """``edge-ad command``: the device's retained status says it is offline, so the command was not sent.
    Exit code 3 (no reply within the timeout is 1)."""

    exit_code = 3


class DeviceWentOffline(RuntimeFailure):
    """``edge-ad command``: the device's status turned offline (its will, a stop) while the command was under
    way, before its reply came: whether the command ran is unknown. Exit code 1, as no reply within the timeout
    (3 says that nothing was sent)."""


class GuardFailure(RuntimeFailure):
    """A quantized or compiled artefact did not match FP32 closely enough; nothing was switched in."""


def os_error_text(exc: OSError) -> str:
    """``PATH: what went wrong`` for an OSError about a path, e.g. ``out: file exists (a folder was expected)``."""
    what = (exc.strerror or type(exc).__name__).lower()
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        what += " (a folder was expected there)"
    if exc.filename is None:
        return what
    target = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{exc.filename}{target}: {what}"


def clip_text(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (``abc… (70000 characters)``): for a value a
    message or a log line quotes, which may be anything a client sent (jsonschema quotes the offending value
    whole: an 8 MiB command argument was repeated in the reply and in one log line)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def reader_gone(stream) -> bool:
    """Has the reader of ``stream`` (stdout piped into ``head -1``, a consumer that exited) closed its end? A
    pipe's write end then polls as an error, before anything more is written. False for a terminal, a file, a
    stream with no file descriptor (a test's StringIO), and where poll() is missing."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no fileno (io.UnsupportedOperation), closed, no poll()
        return False
