"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.

A power cut at any point leaves either the old file or the new one, never a torn file. A folder replaced as
a whole (a bundle a training writes, a folder of generic images) is built beside its place and switched in
(:func:`staging_beside`, :func:`switch_folder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

_held: dict[tuple[int, int, int], int] = {}   # folder_lock: (inode, device, thread) -> depth held there
_held_lock = threading.Lock()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(path: Path, mode: int | None) -> int:
    """``mode`` if given; else the mode of the file being replaced; else what ``open()`` would give (0666
    less the umask). A temp file is made 0600, and a bundle written by one user (say root, through sudo)
    must stay readable by the service's user."""
    if mode is not None:
        return mode
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def writing(path: str | os.PathLike, mode: int | None = None, sync: bool = True):
    """Write ``path`` atomically through the binary file this yields: a temp file made with ``mkstemp``
    (``O_EXCL``, a name nobody can guess, so a link planted in a shared folder is never followed) beside it,
    moved over ``path`` when the block ends, removed when it fails. Permissions as :func:`_mode_for` says
    (0600 for secrets). ``sync``: fsync the file and the folder (a record that must survive a power cut; not
    for a stream of pictures)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    perm = _mode_for(path, mode)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:   # a folder that cannot be written: the file meant, not the hidden temp name
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc
    try:
        os.fchmod(fd, perm)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:   # a full disk: say which file
            raise naming(exc, path) from exc
        raise
    if sync:
        _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`writing`)."""
    with writing(path, mode, sync) as fh:
        fh.write(data)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, busy: str):
    """One holder at a time per folder, across processes: the kernel's lock (flock) on the folder, so a
    killed holder leaves none behind. Re-entrant in one thread; another thread or process gets a
    :class:`~edge_ad.errors.Busy` (a RuntimeFailure) with the message ``busy`` at once. Not POSIX: no guard."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    from .errors import Busy

    fd = os.open(folder, os.O_RDONLY)
    key = (*os.fstat(fd)[1:3], threading.get_ident())   # (inode, device, thread): its own flock in another thread
    try:
        with _held_lock:
            depth = _held.get(key, 0)
            if depth == 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Busy(busy) from None
            _held[key] = depth + 1
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
                if _held[key] == 0:
                    del _held[key]
    finally:
        os.close(fd)   # the thread's outermost holder's close releases the lock


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, busy: str):
    """One writer at a time of an output ``path`` (the bundle folder a training replaces as a whole, a
    teacher file), across processes: the kernel's lock (flock) on ``.NAME.lock`` beside it, which holds the
    holder's pid. Another gets an InputError at once: ``busy`` with ``{pid}`` replaced by the holder's.
    A lock file and not :func:`folder_lock` on ``path``: ``path`` may not exist yet, and a training renames
    a new folder into its place. The file goes when released (a killed holder's stays, unlocked, and is
    taken over); missing folders above ``path`` are made, and removed again if they are still empty then.
    Not POSIX: no guard."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    from .errors import InputError

    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    made = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise InputError(busy.replace("{pid}", holder)) from None   # not format(): a path may hold braces
            try:   # the holder before removes the file: a lock on the one it removed guards nothing
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
    except BaseException as exc:
        for folder in made:
            _rmdir_quietly(folder)
        if isinstance(exc, OSError):
            raise naming(exc, lock) from exc
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        try:
            os.unlink(lock)   # while still held: whoever opened it meanwhile sees it gone and opens anew
        except OSError:
            pass
        os.close(fd)
        for folder in made:   # deepest first: an output written there keeps its folder
            _rmdir_quietly(folder)


def _rmdir_quietly(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def remove_unheld(folder: str | os.PathLike) -> bool:
    """Delete ``folder``, a work folder its maker holds with :func:`folder_lock` while it works (a quantize's
    ``.quantize-*``, a training's ``.NAME.new-*``), unless another process or thread holds it: what a
    killed command left behind goes, one still at work keeps it. Returns whether it is gone. Where the
    kernel's lock is missing (not POSIX) nothing is deleted: in use or not cannot be told."""
    if os.name != "posix":
        return False
    from .errors import RuntimeFailure

    try:
        with folder_lock(folder, "held"):
            shutil.rmtree(folder, ignore_errors=True)
    except RuntimeFailure:
        return False
    except FileNotFoundError:
        return True
    return not os.path.exists(folder)


def staging_beside(path: str | os.PathLike) -> Path:
    """A name for the folder that replaces the folder ``path`` to be built in: ``.NAME.new-XXXXXXXX`` beside
    it (made by the caller, held with :func:`folder_lock` while it works, put in place by :func:`switch_folder`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}")


def switch_folder(stage: str | os.PathLike, out: str | os.PathLike, what: str = "folder") -> None:
    """Put the folder ``stage`` (built beside ``out``, :func:`staging_beside`) at ``out``; the folder there before
    (if any), a ``what``, is deleted.

    The old folder is renamed away (``.NAME.old-*``), the new one renamed in, then the old one deleted: a failure or
    power cut before the first rename leaves the old folder whole (and ``stage`` beside it); between the two renames
    (two system calls) both are whole, as ``.NAME.old-*`` and ``.NAME.new-*`` beside ``out``
    (:func:`switch_leftovers`); a second rename that fails puts the old folder back."""
    stage, out = Path(stage), Path(out)
    old = None
    try:
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        os.rename(stage, out)
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("%s: the replaced %s could not be removed entirely; delete it by hand", old, what)


def switch_leftovers(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """What a command that replaces the folder ``path`` as a whole (:func:`switch_folder`) leaves beside it when
    cut off: its staging folders (``.NAME.new-*``, the new folder being built) and replaced folders not yet
    deleted (``.NAME.old-*``), each list newest first. ``path`` missing with both beside it: a power cut between
    the two renames that switch a new folder in (the new one is complete)."""
    path = Path(path)
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(new|old)-[0-9a-f]{{8}}$")
    found: dict[str, list[Path]] = {"new": [], "old": []}
    try:
        for p in path.parent.iterdir():
            if (m := pat.match(p.name)) and p.is_dir() and not p.is_symlink():
                found[m.group(1)].append(p)
    except OSError:
        pass
    newest = lambda p: p.stat().st_mtime  # noqa: E731
    return sorted(found["new"], key=newest, reverse=True), sorted(found["old"], key=newest, reverse=True)


def tidy_switch(path: str | os.PathLike, complete: Callable[[Path], object] = lambda stage: None,
                what: str = "folder") -> None:
    """Before a command replaces the folder ``path`` as a whole (:func:`switch_folder`), what a cut-off one left
    beside it (:func:`switch_leftovers`): a power cut between the two renames (``path`` missing, ``.NAME.old-*``
    beside it) is finished by renaming the newest ``.NAME.new-*`` that ``complete`` accepts (it raises an
    :class:`~edge_ad.errors.EdgeADError` or OSError for one it does not) into place, with a WARNING; the other
    staging folders (a command killed while building one) and the replaced ones (once ``path`` is whole) are
    deleted, but not one another process still holds (:func:`remove_unheld`)."""
    from .errors import EdgeADError

    path = Path(path)
    new, old = switch_leftovers(path)
    if old and not path.exists():
        for stage in new:   # newest first
            try:
                with folder_lock(stage, "held"):
                    complete(stage)
                    os.rename(stage, path)
            except (EdgeADError, OSError):
                continue
            _fsync_dir(path.parent)
            log.warning("%s: a run that replaced it was cut off while switching %ss; its new %s %s was put in "
                        "place", path, what, what, stage.name)
            break
    for p in new + (old if path.is_dir() else []):
        if p.exists() and not remove_unheld(p):
            log.info("%s: left in place (another run holds it)", p)


def naming(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` with the file it was writing: a full disk's ENOSPC (or EIO, EDQUOT) from write() or fsync()
    names no file, and an error must say where."""
    if exc.filename is not None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def check_creatable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Before work whose result goes to ``path`` (a training, several outputs written in turn): ``path``
    is not a folder and the nearest existing folder above it is a writable folder, so the work never ends
    in an unwritable file. Makes nothing; the write makes the missing folders."""
    from .errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder; expected a file name")
    check_writable(path.absolute().parent, f"{what} {path}")
    return path


def check_writable(folder: str | os.PathLike, what: str, why: str = "") -> Path:
    """Before work that ends in writing files in ``folder``: ``folder``, or where it is missing the nearest
    existing folder above it (the write makes the missing ones), is a folder this process can make files
    in; else an :class:`~edge_ad.errors.InputError` ``WHAT: the folder F is not writable`` (saying when the
    file system is read-only, and ``why`` it is written). Returns that folder. Makes nothing."""
    from .errors import InputError

    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{what}: {folder} is a file; a folder was expected there")
    if not os.access(folder, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        notes = [n for n in ("read-only file system" if read_only else "", why) if n]
        raise InputError(f"{what}: the folder {folder} is not writable" + (f" ({'; '.join(notes)})" if notes else ""))
    return folder


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomic copy (whole file read into memory; bundle files are tens of MB at most)."""
    write_bytes(dst, Path(src).read_bytes())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
