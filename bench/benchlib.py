"""What the benches share: argument types checked at parsing, the dataset check, where results go.

Results: every bench prints its tables and writes its JSON to ``--out``, by default under ``bench/out/``
(git-ignored). The figures quoted in README.md are the tracked ``bench/results/*.json``; a run replaces
them only when asked to, with ``--out bench/results/NAME.json`` (``speed.py``: ``--out bench/results``).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "magnetic_tile"
DATA_HELP = ("MVTec-layout category (train/good, test/good, test/<defect>); default $EDGE_AD_BENCH_DATA or "
             f"{DEFAULT_DATA}, skipped when that default is absent")


MODELS = ("efficientad-s", "efficientad-m", "fader", "gaussian")


def out_default(name: str) -> str:
    """The default ``--out`` of a bench: ``bench/out/NAME``."""
    return str(OUT / name)


def at_least(low: int):
    """argparse type: an integer >= ``low``."""
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v}: expected an integer >= {low}")
        return v
    return conv


def _finite(text: str, zero_ok: bool) -> float:
    want = "a finite number >= 0" if zero_ok else "a finite number > 0"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {want}") from None
    if not ((v >= 0 if zero_ok else v > 0) and v != float("inf")):   # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"{text}: expected {want}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _finite(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite(text, zero_ok=True)


def model_list(text: str) -> list[str]:
    """argparse type: comma-separated model kinds out of :data:`MODELS`, in the order given."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODELS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown model {', '.join(bad) or '(none given)'}; "
                                         f"expected a comma-separated subset of {', '.join(MODELS)}")
    return kinds


def bundle_dir(text: str) -> Path:
    """argparse type: a bundle folder (one with a manifest.json)."""
    if not Path(text, "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a bundle folder (no manifest.json in it)")
    return Path(text)


def checked(check, name: str):
    """argparse type from an edge_ad check that raises InputError (e.g. ``scoring.check_policy``)."""
    def conv(text: str):
        from edge_ad.errors import InputError

        try:
            check(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    conv.__name__ = name          # argparse names the type in its fallback message
    return conv


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 (``1,8,32``), sorted, without repeats."""
    conv = at_least(1)
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1, e.g. 1,8")
    try:
        return sorted({conv(t) for t in items})
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def kind_dir(text: str) -> tuple[str, str]:
    """argparse type: ``KIND=DIR``."""
    kind, sep, path = text.partition("=")
    if not sep or not kind.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=DIR, e.g. gaussian=bundles/mt")
    return kind.strip(), path.strip()


def dataset(ap: argparse.ArgumentParser, given: str | None, need: tuple[str, ...] = ("train/good",)) -> Path | None:
    """The dataset folder: ``--data``, else $EDGE_AD_BENCH_DATA, else the shared Magnetic Tile split. One
    that was named (flag or variable) and lacks a ``need`` folder is an argument error (exit 2); the default
    one absent prints ``skipped`` and gives None (the bench returns 0: the data are not on every machine)."""
    env = os.environ.get("EDGE_AD_BENCH_DATA") or None
    path = Path(given or env or DEFAULT_DATA)
    missing = [d for d in need if not (path / d).is_dir()]
    if not missing:
        return path
    if given or env:
        what = "--data" if given else "EDGE_AD_BENCH_DATA"
        ap.error(f"{what} {path}: no {' or '.join(missing)} folder in it (expected the MVTec layout: "
                 "train/good, test/good, test/<defect>)")
    print(f"skipped: dataset not found at {path} (expected the MVTec layout: train/good, test/good, test/<defect>)")
    return None


def dataset_name(path: Path) -> str:
    """What a table calls the dataset at ``path``: the title of its README (README.md, README.txt or README:
    the first non-empty line, a Markdown heading's ``#`` dropped), else "Magnetic Tile" for the shared split,
    else the folder's name."""
    for name in ("README.md", "README.txt", "README"):
        try:
            lines = (path / name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        title = next((x.strip().lstrip("#").strip() for x in lines if x.strip().lstrip("#").strip()), "")
        if title:
            return title[:80]
    if path.resolve() == DEFAULT_DATA.resolve():
        return "Magnetic Tile"
    return path.resolve().name


def fail(prog: str, msg: str):
    """End the bench as an argument error does: ``PROG: error: MSG`` on stderr, exit 2."""
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def input_errors_exit_2(main):
    """Decorator of a bench's ``main``: an InputError from edge_ad (a bundle it cannot open, too few usable
    frames) ends it with :func:`fail` instead of a traceback."""
    prog = main.__module__ + ".py"

    @functools.wraps(main)
    def wrapper(argv=None):
        from edge_ad.errors import InputError

        try:
            return main(argv)
        except InputError as exc:
            fail(prog, str(exc))
    return wrapper


def command(name: str, argv) -> str:
    """The command line of this run, for its results JSON: ``python bench/NAME.py ARGS``."""
    return shlex.join(["python", f"bench/{name}.py", *(sys.argv[1:] if argv is None else argv)])


def check_work(ap: argparse.ArgumentParser, path: str | os.PathLike) -> Path:
    """``--work`` made (with its parents) and writable before the run; an argument error otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--work {p}: cannot make the folder ({exc.strerror}); expected a writable folder")
    if not os.access(p, os.W_OK | os.X_OK):
        ap.error(f"--work {p}: the folder is not writable; expected a writable folder")
    return p


def write_json(path: str | os.PathLike, obj) -> None:
    from edge_ad import atomic

    atomic.write_json(path, obj)


def merge_json(path: str | os.PathLike, rows: dict) -> None:
    """Merge ``rows`` into the JSON object in ``path`` (made when missing; an unreadable one is replaced),
    under a lock of its folder: concurrent runs writing the same file (bench/gpu_teacher.sh) keep every
    row. The write is atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            prev = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            prev = {}
        if not isinstance(prev, dict):
            prev = {}
        prev.update(rows)
        write_json(path, prev)
    finally:
        os.close(fd)


def check_out(ap: argparse.ArgumentParser, path: str | os.PathLike, folder: bool = False) -> Path:
    """``--out`` checked before the (long) measurement: a file name (or a folder with ``folder``) that can
    be written; an argument error otherwise."""
    from edge_ad import atomic
    from edge_ad.errors import InputError

    p = Path(path)
    try:
        if folder:
            if p.exists() and not p.is_dir():
                raise InputError(f"--out {p}: is a file; expected a folder")
            atomic.check_creatable(p / "speed.json")
        else:
            atomic.check_creatable(p)
    except InputError as exc:
        ap.error(str(exc))
    return p
