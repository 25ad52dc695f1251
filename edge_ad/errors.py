"""Exceptions that carry the exit code the CLI returns (0 ok, 2 usage or input error, 1 runtime failure, 3 a
device that is offline: :class:`DeviceOffline`), and
helpers that word their messages (:func:`os_error_text`, :func:`clip_text`, :func:`name_text`) or tell a
closed pipe (:func:`reader_gone`)."""

import errno
import os
import re
import select
from typing import Any


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


SURROGATE = re.compile("[\ud800-\udfff]")   # a lone surrogate: what json.loads leaves of an unpaired escape, and
# what Python reads a file-name byte that is not UTF-8 as (surrogateescape)


def _escaped(found: "re.Match") -> str:
    c = ord(found.group())
    return f"\\x{c - 0xdc00:02x}" if 0xdc80 <= c <= 0xdcff else f"\\u{c:04x}"


def name_text(name: "str | bytes | os.PathLike") -> str:
    """A file name or path (or any text) as valid Unicode, the one way edge-ad shows and stores such a name in
    text (JSON files, MQTT payloads, results.jsonl, calibration.json, report.json, log lines, picture captions).
    A byte of a name that is not UTF-8 (Linux allows any byte but ``/`` and NUL), which Python reads as a lone
    surrogate (``\\udcfe``, PEP 383), becomes the 4 characters ``\\xfe``, as
    ``os.fsencode(name).decode("utf-8", "backslashreplace")`` shows it; any other lone surrogate (a JSON
    ``"\\ud800"`` escape) its escape ``\\ud800``. Valid text comes back as it is. Such text cannot be encoded
    in UTF-8 at all: a JSON payload holding it could not be sent or written (a result lost, a calibration
    that stopped ``run``), and OpenCV crashed drawing it."""
    text = os.fsdecode(name) if not isinstance(name, str) else name
    return text if SURROGATE.search(text) is None else SURROGATE.sub(_escaped, text)


def valid_unicode(value: Any) -> Any:
    """``value`` with every string in it (in lists, tuples and dicts, keys too) through :func:`name_text`: what a
    JSON record holding file names is stored or sent as. Tuples become lists, other values stay."""
    if isinstance(value, str):
        return name_text(value)
    if isinstance(value, dict):
        return {valid_unicode(k): valid_unicode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [valid_unicode(v) for v in value]
    return value


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
