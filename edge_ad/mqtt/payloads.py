"""JSON encoding of payloads: compact, strict (no NaN), numpy scalars and arrays accepted."""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from typing import Any

from ..errors import InputError

SCHEMA_VERSION = 1


def now_iso() -> str:
    """UTC time, RFC 3339 with milliseconds: ``2025-05-01T12:00:00.123Z``."""
    return iso_from_unix(time.time())


def iso_from_unix(t: float) -> str:
    """RFC 3339 UTC with milliseconds for a unix time."""
    stamp = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def finite_number(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (bool, NaN, 1e400, an int beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def parse_time(value: Any) -> float | None:
    """Unix seconds from a number or an RFC 3339 string; None when it is neither."""
    if isinstance(value, (bool, int, float)):
        return finite_number(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            stamp = _dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_dt.timezone.utc)
        return stamp.timestamp()
    return None


def _default(obj: Any) -> Any:
    # numpy without importing it: scalars have .item(), arrays .tolist()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def encode(obj: Any, what: str = "payload") -> bytes:
    """Compact UTF-8 JSON. Raises :class:`InputError` naming ``what`` for NaN / infinity, a string that is not
    valid Unicode (a lone surrogate) or a value JSON cannot hold."""
    try:
        return json.dumps(obj, separators=(",", ":"), default=_default, allow_nan=False,
                          ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:   # a ValueError too, but not a NaN
        bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
        near = exc.object[max(0, exc.start - 40):exc.start].encode("utf-8", "backslashreplace").decode("utf-8")
        raise InputError(f"{what}: a string is not valid Unicode: it holds a lone surrogate ({bad}), which has no "
                         f"UTF-8 form (after ...{near})") from None
    except ValueError as exc:
        raise InputError(f"{what}: {exc} (NaN and infinity are not valid JSON)") from None
    except TypeError as exc:
        raise InputError(f"{what}: {exc}") from None


def decode(data: bytes | str, what: str = "payload") -> Any:
    """Parse JSON; raises :class:`InputError` naming ``what``."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what}: not valid UTF-8 JSON ({exc})") from None


def status_state(payload: bytes) -> tuple[str, dict]:
    """A device's ``status`` message: ``online`` / ``offline`` / ``unknown`` and its body (JSON, or a
    plain-text state)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        body = {"state": payload.decode("utf-8", errors="replace").strip().lower()}
    if not isinstance(body, dict):
        body = {}
    state = body.get("state")
    return (state if state in ("online", "offline") else "unknown"), body


def status_since(body: dict, word: str = "since") -> str:
    """" since TS" (or another ``word``: " at TS") for a status ``body`` (:func:`status_state`) whose ``ts`` is a
    text (the device's RFC 3339 time), to follow the state it names in a message; "" when its ``ts`` is missing,
    empty or not a text (a will carries none)."""
    ts = body.get("ts")
    return f" {word} {ts}" if isinstance(ts, str) and ts else ""
