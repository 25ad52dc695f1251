"""Local outputs of the loop: a JSON-lines log with rotation, and NG snapshots with retention limits."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import InputError, valid_unicode

log = logging.getLogger(__name__)


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_line(record: dict[str, Any]) -> bytes:
    """``record`` as one line of UTF-8 JSON; a NaN or infinite number is written as null. UnicodeEncodeError for
    a string that is not valid Unicode."""
    try:
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN / inf is not JSON: such a number is written as null
        text = json.dumps(_finite_or_null(record), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


class JsonlLog:
    """Append one JSON object per line; rotate to ``.1`` ... ``.N`` past ``max_bytes``.

    Each line is written whole and flushed, so a crash leaves at most one partial last line (which
    readers skip; the next line, in this run or the next, starts on its own); ``fsync=True`` also
    survives a power cut at the cost of a disk sync per line.
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = 50_000_000, backups: int = 5,
                 fsync: bool = False, what: str = "the result log"):
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = int(backups)
        self.fsync = bool(fsync)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open {what} for writing ({exc.strerror})") from exc
        # a regular file rotates by size; a pipe, a FIFO or a terminal (``--jsonl /dev/stdout | ...``) has no
        # size to ask (tell() fails on it) and never rotates
        st = os.fstat(self._fh.fileno())
        self._regular = stat.S_ISREG(st.st_mode) and not str(self.path.absolute()).startswith(("/dev/", "/proc/"))
        self._size = st.st_size if self._regular else 0
        self._torn = self._ends_torn()  # the last write left part of a line (a full disk, a power cut)
        self._closed = False
        self.lines = 0
        self.rotations = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one line. A failed write (a full disk) raises OSError and leaves the log usable: the
        next write starts on a fresh line (a torn part line is skipped by readers), so writing resumes
        whole once there is room again."""
        try:
            data = _json_line(record)
        except UnicodeEncodeError:   # a lone surrogate (a file name that is not UTF-8): written as \xfe, not lost
            data = _json_line(valid_unicode(record))
        with self._lock:
            if self._fh.closed:
                if self._closed:
                    raise ValueError(f"{self.path}: the result log is closed")
                self._reopen()           # a rotation failed half-way: reopen (raises while that fails)
            if self._regular and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._torn:
                data = b"\n" + data
            view, done = memoryview(data), 0
            try:
                while done < len(data):  # a nearly full disk may take part of a line
                    done += self._fh.write(view[done:]) or 0
            finally:
                self._size += done
                self._torn = 0 < done < len(data) or (self._torn and done == 0)
            if self.fsync:
                os.fsync(self._fh.fileno())
            self.lines += 1

    def _reopen(self) -> None:
        self._fh = open(self.path, "ab", buffering=0)
        self._size = os.fstat(self._fh.fileno()).st_size if self._regular else 0
        self._torn = self._ends_torn()

    def _ends_torn(self) -> bool:
        """Whether the file ends in part of a line (a power cut or a full disk tore the last write), so
        the next line must start with a newline of its own."""
        if not (self._regular and self._size):
            return False
        try:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                return fh.read(1) != b"\n"
        except OSError:
            return False

    TAIL_BLOCK = 65536

    @property
    def regular(self) -> bool:
        """Is the log a regular file (not a pipe, a terminal or /dev/stdout)?"""
        return self._regular

    def last_record(self) -> dict | None:
        """The last whole record of the log: of the file, or of ``.1`` when the file holds none (a rotation
        just made it). None when there is none, and for a pipe or a terminal (nothing to read back)."""
        if not self._regular:
            return None
        with self._lock:
            for path in (self.path, self.path.with_name(f"{self.path.name}.1")):
                try:
                    rec = _last_record(path, self.TAIL_BLOCK)
                except FileNotFoundError:
                    continue
                if rec is not None:
                    return rec
        return None

    def _rotate(self) -> None:
        self._fh.close()
        try:
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    src = self.path.with_name(f"{self.path.name}.{i}")
                    if src.exists():
                        os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink(missing_ok=True)
        finally:
            self._reopen()           # even when a rename failed: keep appending where we can
        self.rotations += 1

    def flush(self, sync: bool = True) -> None:
        with self._lock:
            if not self._fh.closed and sync:
                try:
                    os.fsync(self._fh.fileno())
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if not self._fh.closed:
                try:
                    os.fsync(self._fh.fileno())
                except OSError:
                    pass
                self._fh.close()


def _last_record(path: Path, block: int) -> dict | None:
    """The last line of ``path`` that is a whole JSON object (a torn line is skipped), read from the end."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            tail = fh.read(end - start) + tail
            end = start
            lines = tail.split(b"\n")
            # the first piece may be the end of a line that starts before what was read
            for line in reversed(lines if end == 0 else lines[1:]):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue      # a torn line
                if isinstance(rec, dict):
                    return rec
            tail = lines[0] if end > 0 else b""
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records of a JSONL log (a torn last line is skipped)."""
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


_SNAP_RE = re.compile(r"^\d{8}T\d{6}")


class SnapshotStore:
    """JPEG snapshots in one folder, oldest deleted first beyond ``max_count`` files or ``max_bytes``."""

    def __init__(self, folder: str | os.PathLike, max_count: int = 1000, max_bytes: int = 500_000_000,
                 quality: int = 90):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.folder}: cannot create the snapshot folder ({exc.strerror})") from exc
        self._probe()
        self.max_count = int(max_count)
        self.max_bytes = int(max_bytes)
        self.quality = int(quality)
        self._lock = threading.Lock()
        for stale in self.folder.glob(".*.jpg*.tmp"):  # left by a process killed mid-write (.NAME.jpg.XXXX.tmp)
            stale.unlink(missing_ok=True)
        existing = sorted((p for p in self.folder.glob("*.jpg") if _SNAP_RE.match(p.name)),
                          key=lambda p: p.name)
        self._files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in existing)
        self._bytes = sum(s for _, s in self._files)
        self.saved = 0
        self.deleted = 0
        self._enforce()

    def _probe(self) -> None:
        """Write and remove a temporary file: a folder that exists but cannot be written (a service user
        that does not own it, a read-only mount) is refused at start, as the result log and the telemetry
        file are, instead of losing every snapshot of the run (``edge-ad doctor``'s disk check agrees)."""
        try:
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=".edge-ad-probe-", suffix=".jpg.tmp")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise InputError(f"{self.folder}: cannot write in the snapshot folder ({exc.strerror or exc}); "
                             "give the service user write access, or choose another output.snapshots_dir") from exc

    @property
    def count(self) -> int:
        return len(self._files)

    @property
    def bytes(self) -> int:
        return self._bytes

    def save(self, name: str, data: bytes) -> Path:
        """Write ``data`` as ``name`` (names sort by time: make them start with YYYYMMDDTHHMMSS)."""
        p = self.folder / name
        # a temp file nobody can guess, removed on failure (a full disk): no partial file, no planted link taken
        atomic.write_bytes(p, data, sync=False)
        with self._lock:
            self._files.append((p, len(data)))
            self._bytes += len(data)
            self.saved += 1
            self._enforce()
        return p

    def _enforce(self) -> None:
        while self._files and (len(self._files) > self.max_count or self._bytes > self.max_bytes):
            p, size = self._files.popleft()
            self._bytes -= size
            try:
                p.unlink()
                self.deleted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("snapshot retention: cannot delete %s (%s)", p, exc)
