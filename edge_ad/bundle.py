"""The model bundle: a folder holding everything a device needs to inspect.

::

    manifest.json          model kind, input size, output names, versions, sha256 of every file, the
                           training record and what its images were (``data``: bit depth, channels)
    model.onnx             FP32 graph (normalization inside, raw maps out)
    model.int8.onnx        Q/DQ graph, when quantized      model.fp16.onnx   FP16 graph
    checkpoint.pt          torch weights (state_dict) for fine-tuning and re-export
    calibration.json       the calibration in force (byte-identical to its calibration.d/ entry)
    calibration.d/NNNN.json  every calibration version ever written
    calibration.d/rollbacks.json  the rollbacks (the newest 1000): to which version, from which, when, by what
    calibration.d/.held-<id>.json  the version a running 'edge-ad run' decides with (and its .lock: held while
                           it runs), so that 'edge-ad calibrate --prune' keeps it; local, never shipped
    engines/<key>.engine   TensorRT engines
    quant_report.json      guard results
    training_images.json   fingerprints (size, sha256 prefix) of the training and validation image files

Besides the bundle, its folder may hold what is local to one machine or one run and never ships with it
(:data:`NOT_SHIPPED`): ``train_state.pt`` (``edge-ad train --resume``'s checkpoint), ``engines/`` (built
for one GPU), ``eval/`` (the last report).

Every write is atomic (temp file + fsync + rename); a change of several files at once goes through
:meth:`Bundle.replace_files`, ordered so the manifest on disk always agrees with the files. The
manifest records the sha256 of every file so a corrupt copy is refused, and ``manifest["active"]`` names
the graph that inspects (FP32 until a quantized graph passes the guard).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import __version__, atomic
from .errors import InputError
from .scoring import Calibration

FORMAT = "edge-ad-bundle"
FORMAT_VERSION = 1
MODEL_KINDS = ("efficientad-s", "efficientad-m", "fader", "gaussian")
_CAL_RE = re.compile(r"^(\d{4,})\.json$")
ROLLBACKS_KEPT = 1000   # rollbacks.json keeps the newest records: one is written per rollback, for ever
_HELD_RE = re.compile(r"^\.held-([0-9a-f]{16})\.(json|lock)$")   # CalibrationHold's records in calibration.d/
log = logging.getLogger(__name__)

# What a bundle folder may hold that is not part of the bundle: training state for 'edge-ad train --resume'
# (never shipped: optimizer state, tens of MB) and what belongs to one machine or run (TensorRT engines are
# built per GPU, eval/ is the last report). Never packed into an update archive nor copied into an --adapt
# candidate.
TRAINING_STATE = ("train_state.pt",)
LOCAL_ONLY = ("engines", "eval", "timing.cache")
NOT_SHIPPED = TRAINING_STATE + LOCAL_ONLY
# The fingerprints of the image files a model was trained on (:meth:`Bundle.training_fingerprints`), so that
# a calibration on a device, where the training folder is not, still recognises copies of them.
TRAINING_IMAGES = "training_images.json"
_TRAINING_IMAGES_FORMAT = "edge-ad-training-images"
# Everything else a bundle folder holds (top-level names): 'edge-ad train' replaces a folder that holds
# only these (and the manifest's files) as a whole, and refuses one that holds anything else.
BUNDLE_ENTRIES = ("manifest.json", "checkpoint.pt", "calibration.json", "calibration.d", "gaussian.d",
                  "model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8-u8.onnx", "quant_report.json",
                  TRAINING_IMAGES)
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
# replace_files' staged files, atomic writes' temp files, quantize's work folders
_TEMP_RE = re.compile(r"^\.(new-.+|quantize-.+|.+\.tmp)$")
GRAPH_HINTS = {"model.onnx": "run 'edge-ad export'", "model.fp16.onnx": "run 'edge-ad quantize --precision fp16'",
               "model.int8.onnx": "run 'edge-ad quantize --precision int8'",
               "model.int8-u8.onnx": "run 'edge-ad quantize --precision int8'"}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def version_runs(versions: Iterable[int], most: int | None = None) -> str:
    """``v1, v4-v9, v12``: calibration versions in runs (a history holds thousands); ``none`` when empty.
    ``most``: at most that many runs shown, a third of them the oldest and the rest the newest, those between
    counted (``v1, ... 40 more runs ..., v2990-v3000``), so a message stays short whatever the history."""
    runs: list[list[int]] = []
    for v in sorted(versions):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    shown = [f"v{a}" if a == z else f"v{a}-v{z}" for a, z in runs]
    if most is not None and len(shown) > max(most, 2):
        head = max(1, most // 3)
        tail = max(1, most - head)
        shown = [*shown[:head], f"... {len(shown) - head - tail} more runs ...", *shown[-tail:]]
    return ", ".join(shown) or "none"


@functools.lru_cache(maxsize=1)
def _manifest_validator():
    import jsonschema

    schema = json.loads((resources.files("edge_ad") / "schemas" / "manifest.schema.json").read_text("utf-8"))
    return jsonschema.validators.validator_for(schema)(schema)


def manifest_problems(manifest: Any) -> list[str]:
    """What in ``manifest`` breaks ``edge_ad/schemas/manifest.schema.json``, as ``field: message`` lines
    (``model.image_size.0: 0 is less than the minimum of 64``); empty when it is valid."""
    out = []
    for err in sorted(_manifest_validator().iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in err.absolute_path) or "manifest"
        expected = err.schema.get("description") if isinstance(err.schema, dict) else None
        out.append(f"{where}: {err.message}" + (f" (expected {expected})" if expected else ""))
    if not out:  # valid so far: image_size is [H, W]; that H == W is beyond JSON Schema
        h, w = manifest["model"]["image_size"]
        if h != w:
            out.append(f"model.image_size: [{h}, {w}] is not square (expected [N, N]: every model takes "
                       "square inputs)")
        out += _active_problems(manifest["active"])
    return out


def _active_problems(active: dict) -> list[str]:
    """What is wrong with a manifest's ``active`` record, beyond JSON Schema: a graph that is not a graph of
    its precision (``model.int8.onnx`` with precision ``fp32``). The backends open the graph of the precision
    (``run``, ``eval``, ``calibrate`` ran model.onnx) where ``doctor``, ``pack``, ``install`` and the model's
    hash took the graph named: edge-ad writes the two together, so such a record was edited or damaged, and
    every command refuses it alike."""
    from .runtime.backends.base import CPU_INT8_FILE, GRAPH_FILES

    graph, precision = active["graph"], active.get("precision", "fp32")
    graphs = [GRAPH_FILES[precision], *([CPU_INT8_FILE] if precision == "int8" else [])]
    if graph in graphs:
        return []
    return [f"active: graph '{graph}' is not a graph of precision '{precision}' (expected {' or '.join(graphs)}): "
            "the precision decides the graph edge-ad run opens, and export, quantize and compile set the two "
            "together; set both to the graph to run, e.g. {\"graph\": \"model.onnx\", \"precision\": \"fp32\"}"]


def check_manifest(manifest: Any, where: str | os.PathLike) -> None:
    """:class:`InputError` naming ``where`` and every bad field of a manifest (types, image size, names)."""
    problems = manifest_problems(manifest)
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))


_MEMBER_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """The names in folder ``path`` that are no part of an edge-ad bundle folder (:data:`BUNDLE_ENTRIES`,
    :data:`NOT_SHIPPED`, the top folders of the files its manifest records, edge-ad's temp files): what a
    command that replaces a bundle folder as a whole must not delete. Empty for a bundle folder, an empty
    folder, or one holding only training state."""
    path = Path(path)
    known = set(BUNDLE_ENTRIES) | set(NOT_SHIPPED)
    try:
        files = json.loads((path / "manifest.json").read_text("utf-8")).get("files")
        known |= {str(n).split("/")[0] for n in files} if isinstance(files, dict) else set()
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        pass
    return sorted(p.name for p in path.iterdir() if p.name not in known and not _TEMP_RE.match(p.name))


def is_bundle_folder(path: str | os.PathLike) -> bool:
    """``path`` holds an edge-ad bundle: a manifest.json whose 'format' is edge-ad's (readable or not
    against the schema: a damaged bundle is still a bundle)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def training_images_bytes(train: Iterable[Sequence], val: Iterable[Sequence]) -> bytes:
    """The content of :data:`TRAINING_IMAGES`: the ``[bytes, fingerprint]`` of each training (``train``) and
    validation (``val``) image file (:func:`~edge_ad.data.image.fingerprint`), one JSON line, about 30
    bytes an image."""
    doc = {"format": _TRAINING_IMAGES_FORMAT, "fingerprint": "the first 16 hex digits of the sha256 of the "
           "image file's bytes", "train": [[int(n), str(h)] for n, h in train],
           "val": [[int(n), str(h)] for n, h in val]}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")


def check_member(name: Any, what: str = "bundle file name") -> str:
    """``name`` if it is a relative path inside a bundle (parts of letters, digits, ``_ . + -`` joined by
    ``/``, none starting with a dot, so no ``..`` and no absolute path); else :class:`InputError`."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_MEMBER_PART.fullmatch(p) for p in parts):
        raise InputError(f"{what} {name!r}: expected a relative path inside the bundle (letters, digits, "
                         "'_', '.', '+', '-' in parts joined by '/', none starting with '.')")
    return name


class Bundle:
    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | os.PathLike, model: dict[str, Any]) -> "Bundle":
        """Start a bundle in a new or empty folder (never over a bundle: its files would mix with the new
        ones). ``model`` needs kind, image_size [H, W] and outputs (raw map names)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a folder")
        if path.is_dir() and any(path.iterdir()):
            raise InputError(f"{path}: not empty ({', '.join(sorted(p.name for p in path.iterdir())[:5])}); a new "
                             "bundle is made in a new or empty folder ('edge-ad train' replaces a bundle folder "
                             "as a whole)")
        for key in ("kind", "image_size", "outputs"):
            if key not in model:
                raise InputError(f"bundle model description lacks '{key}'")
        if model["kind"] not in MODEL_KINDS:
            raise InputError(f"model kind '{model['kind']}': expected one of {', '.join(MODEL_KINDS)}")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": now_iso(),
            "model": dict(model),
            "versions": {"edge_ad": __version__},
            "files": {},
            "active": {"graph": "model.onnx", "precision": "fp32"},
        }
        check_manifest(manifest, path / "manifest.json")
        path.mkdir(parents=True, exist_ok=True)
        b = cls(path, manifest)
        b.save_manifest()
        return b

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "Bundle":
        path = Path(path)
        mf = path / "manifest.json"
        if not path.is_dir():
            new, old = atomic.switch_leftovers(path)
            whole = [p for p in new if is_bundle_folder(p)]
            if whole and old and not path.exists():
                raise InputError(f"{path}: bundle folder not found; a training into it was cut off while switching "
                                 f"bundles and left the new one beside it, in {whole[0].name}: put it in place "
                                 f"with: mv {whole[0]} {path}")
            raise InputError(f"{path}: bundle folder not found")
        if not mf.is_file():
            raise InputError(f"{mf}: not found; a bundle folder holds a manifest.json (made by 'edge-ad train')")
        try:
            manifest = json.loads(mf.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{mf}: unreadable manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(f"{mf}: 'format' is not '{FORMAT}'")
        fv = manifest.get("format_version", 0)
        if isinstance(fv, int) and not isinstance(fv, bool) and fv > FORMAT_VERSION:
            raise InputError(f"{mf}: format_version {fv} is newer than this edge_ad understands "
                             f"({FORMAT_VERSION}); upgrade edge-ad")
        check_manifest(manifest, mf)
        b = cls(path, manifest)
        if verify:
            b.verify()
        return b

    # ----------------------------------------------------------------- manifest and files
    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def kind(self) -> str:
        return self.model["kind"]

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.model["image_size"]
        return int(h), int(w)

    @property
    def outputs(self) -> list[str]:
        return list(self.model["outputs"])

    def file(self, name: str) -> Path:
        """The path of bundle member ``name`` (from the manifest or a calibration): a relative path that
        stays inside the bundle, else :class:`InputError` (a crafted bundle must not read or write
        elsewhere)."""
        return self.path / check_member(name, f"{self.path}: file name")

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def save_manifest(self) -> None:
        atomic.write_json(self.path / "manifest.json", self.manifest)

    def add_file(self, name: str, data: bytes | None = None, src: str | os.PathLike | None = None,
                 save: bool = True) -> str:
        """Write ``name`` atomically (from bytes or a source file), record its sha256; returns the hash."""
        dst = self.file(name)
        if data is not None:
            atomic.write_bytes(dst, data)
        elif src is not None:
            if Path(src).resolve() != dst.resolve():
                atomic.copy_file(src, dst)
        elif not dst.is_file():
            raise InputError(f"{dst}: not found")
        digest = atomic.sha256_file(dst)
        self.manifest["files"][name] = {"sha256": digest, "bytes": dst.stat().st_size}
        if save:
            self.save_manifest()
        return digest

    def remove_file(self, name: str, save: bool = True) -> None:
        self.manifest["files"].pop(name, None)
        try:
            self.file(name).unlink()
        except FileNotFoundError:
            pass
        if save:
            self.save_manifest()

    def replace_files(self, files: dict[str, bytes | str | os.PathLike], remove: Iterable[str] = (),
                      meta: dict[str, Any] | None = None) -> dict[str, str]:
        """Replace several members, remove others and set top-level manifest fields (``meta``, e.g.
        ``active``) as one change; returns the new files' sha256. ``files`` maps a member name to its new
        bytes or a source file.

        Ordered so that at every moment the manifest on disk agrees with the files it names:

        1. every new file is written (atomically) beside its place, under ``.new-NAME``; a failure here
           (disk full) deletes them and leaves the bundle, manifest included, as it was;
        2. an interim manifest is saved: it no longer names the files removed, and records each replaced
           file as its old or its new version (``replacing``: the new sha256, which :meth:`verify`,
           :meth:`check_graph` and :meth:`model_hash` accept as well); if the active graph is removed or
           replaced (but for ``model.onnx``), the FP32 ``model.onnx`` is active meanwhile;
        3. the new files are renamed into place and the removed ones deleted (only now that the manifest
           on disk no longer names them);
        4. the new manifest is saved.

        A power cut or a failure after step 1 (nothing left there to fill the disk: renames and one small
        manifest) leaves the step-2 manifest: a complete bundle that verifies and runs, each replaced file
        old or new, whole (the same command run again completes the change). The next change settles such
        a leftover ``replacing`` first (:meth:`_settled_files`: each file recorded as the version on disk), so
        a change of other files never drops it with the old sha256 of a file already renamed in.
        ``self.manifest`` always follows what is on disk.
        """
        names = list(files)
        gone = [n for n in dict.fromkeys(remove) if n not in files]
        for n in names + gone:
            self.file(n)   # a member name (checked before anything is written)
        changed = set(names) | set(gone)
        settled = self._settled_files(changed)   # checked before anything is written, too
        staged: dict[str, Path] = {}
        try:
            for name, content in files.items():
                dst = self.file(name)
                tmp = dst.with_name(f".new-{dst.name}")
                try:
                    if isinstance(content, (bytes, bytearray)):
                        atomic.write_bytes(tmp, bytes(content))
                    else:
                        atomic.copy_file(content, tmp)
                except OSError as exc:
                    if exc.filename != str(tmp):
                        raise
                    raise type(exc)(exc.errno, exc.strerror or str(exc), str(dst)) from exc   # the file meant
                staged[name] = tmp
            records = {n: {"sha256": atomic.sha256_file(p), "bytes": p.stat().st_size} for n, p in staged.items()}
            interim = copy.deepcopy(self.manifest)
            # a 'replacing' left by an earlier change a power cut interrupted: each of its files recorded as
            # the version on disk (dropped unsettled, the manifest kept the old sha256 of a file renamed in)
            interim.pop("replacing", None)
            interim["files"] = settled
            for n in gone:
                interim["files"].pop(n, None)
            if records:
                interim["replacing"] = copy.deepcopy(records)
            if interim["active"]["graph"] in changed and interim["active"]["graph"] != "model.onnx":
                interim["active"] = {"graph": "model.onnx", "precision": "fp32"}
            if interim != self.manifest:
                atomic.write_json(self.path / "manifest.json", interim)
        except BaseException:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        final = copy.deepcopy(interim)
        final.pop("replacing", None)
        final.update(copy.deepcopy(meta or {}))
        final["files"].update(records)
        self.manifest = interim   # what is on disk until the end
        folders = set()
        for name, tmp in staged.items():
            os.replace(tmp, self.file(name))
            folders.add(tmp.parent)
        for name in gone:
            self.file(name).unlink(missing_ok=True)
            folders.add(self.file(name).parent)
        for folder in folders:
            atomic._fsync_dir(folder)
        atomic.write_json(self.path / "manifest.json", final)
        self.manifest = final
        return {n: r["sha256"] for n, r in records.items()}

    def _settled_files(self, changed: set[str]) -> dict[str, dict]:
        """The manifest's ``files`` with each entry of a leftover ``replacing`` (a :meth:`replace_files` a power
        cut interrupted) settled as :meth:`verify` accepts it: the record (old or new) that the file on disk
        matches; a new file never renamed in is not part of the bundle. Any other file is refused, naming
        it, before anything is written; but for one this change replaces or removes (its record is replaced
        or dropped: the change repairs it)."""
        files = copy.deepcopy(self.manifest["files"])
        for name, new in self.replacing.items():
            p = self.file(name)
            if not p.is_file():
                if name in files and name not in changed:
                    raise InputError(f"{p}: listed in manifest.json but missing; nothing was changed")
                continue
            got = atomic.sha256_file(p)
            if got == new["sha256"]:
                files[name] = copy.deepcopy(new)
            elif name in changed:
                continue
            elif name not in files or got != files[name]["sha256"]:
                want = " or ".join(r["sha256"][:12] + "…" for r in (files.get(name), new) if r)
                raise InputError(f"{p}: sha256 {got[:12]}… does not match manifest.json ({want}); the file is "
                                 "corrupt or was changed; nothing was changed")
        return files

    @property
    def replacing(self) -> dict[str, dict]:
        """{name: new record} of the files a :meth:`replace_files` a power cut interrupted was renaming in
        (each is its recorded version or this one)."""
        rep = self.manifest.get("replacing")
        return rep if isinstance(rep, dict) else {}

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sha256 of every recorded file (or of ``names``) and that the calibration in force is
        byte-identical to its history file; raise naming the first bad one."""
        if names is None:
            self._verify_calibration()
        files, replacing = self.manifest["files"], self.replacing
        for name in (names if names is not None else list({**files, **replacing})):
            if name not in files and name not in replacing:
                raise InputError(f"{self.path}: '{name}' is not recorded in manifest.json")
            p = self.file(name)
            if not p.is_file():
                if name not in files:   # a new file a power cut kept from its place: not part of the bundle yet
                    continue
                raise InputError(f"{p}: listed in manifest.json but missing")
            got = atomic.sha256_file(p)
            ok = {r["sha256"] for r in (files.get(name), replacing.get(name)) if r}
            if got not in ok:
                want = (files.get(name) or replacing[name])["sha256"]
                raise InputError(f"{p}: sha256 {got[:12]}… does not match manifest.json "
                                 f"({want[:12]}…); the file is corrupt or was changed")

    def _verify_calibration(self) -> None:
        p = self.path / "calibration.json"
        if not p.is_file():
            return
        version = self.calibration().version
        hist = self.calibration_version_file(version)
        if not hist.is_file():
            raise InputError(f"{p}: calibration version {version} has no history file {hist.name} in "
                             f"{self.calibration_dir}")
        if hist.read_bytes() != p.read_bytes():
            raise InputError(f"{p}: differs from {hist} (version {version}); the file is corrupt or was "
                             "edited by hand (use 'edge-ad calibrate --rollback VERSION' to restore one)")

    def training_fingerprints(self) -> dict[str, frozenset[tuple[int, str]]] | None:
        """``{"train": ..., "val": ...}``: the ``(bytes, fingerprint)`` of the image files the model was trained
        on and of its validation split, from :data:`TRAINING_IMAGES` (written by ``edge-ad train``; None for a
        bundle without it, trained before it was). The file is checked against its sha256 in manifest.json
        and read whole; a damaged one is an :class:`InputError` naming it."""
        if TRAINING_IMAGES not in self.manifest["files"] and TRAINING_IMAGES not in self.replacing:
            return None
        self.verify([TRAINING_IMAGES])
        p = self.file(TRAINING_IMAGES)
        try:
            doc = json.loads(p.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{p}: unreadable ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != _TRAINING_IMAGES_FORMAT:
            raise InputError(f"{p}: 'format' is not '{_TRAINING_IMAGES_FORMAT}'")
        out = {}
        for split in ("train", "val"):
            entries = doc.get(split)
            if not isinstance(entries, list):
                raise InputError(f"{p}: '{split}' is {type(entries).__name__}; expected a list of [bytes, "
                                 "fingerprint] pairs")
            for i, e in enumerate(entries):
                if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
                        and e[0] >= 0 and isinstance(e[1], str) and _HEX16.match(e[1])):
                    raise InputError(f"{p}: '{split}' entry {i} is {str(e)[:60]}; expected [bytes, fingerprint]: "
                                     "a whole number >= 0 and 16 lowercase hex digits")
            out[split] = frozenset((n, h) for n, h in entries)
        return out

    # ----------------------------------------------------------------- active graph
    @property
    def active_graph(self) -> str:
        return self.manifest["active"]["graph"]

    @property
    def active_precision(self) -> str:
        return self.manifest["active"].get("precision", "fp32")

    def graph_for(self, precision: str | None = None) -> Path:
        """Path of the ONNX graph for a precision ('fp32', 'fp16', 'int8'; None = the active one)."""
        if precision is None:
            name = self.active_graph
        else:
            name = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
                    "int8-u8": "model.int8-u8.onnx"}.get(precision)
            if name is None:
                raise InputError(f"precision '{precision}': expected fp32, fp16, int8 or int8-u8")
        p = self.file(name)
        if not p.is_file():   # the active graph's precision is its own, not the None asked for
            raise InputError(f"{p}: not found; {GRAPH_HINTS.get(name, 'run ' + repr('edge-ad export'))}")
        return p

    def check_graph(self, name: str | None = None, verify: bool = True) -> Path:
        """The path of graph ``name`` (None: the active one) when it is on disk and manifest.json records it
        (and, with ``verify``, its sha256 matches); else :class:`InputError`. A graph the manifest does not
        record is not this bundle's model (left from an earlier one, or copied in by hand): never run."""
        name = name or self.active_graph
        p = self.file(name)
        hint = GRAPH_HINTS.get(name, "run 'edge-ad export'")
        if not p.is_file():
            refused = self.graph_refusal(name)
            if refused is not None:
                raise InputError(f"{p}: not in the bundle: {refused['why']}; {refused['fix']}")
            raise InputError(f"{p}: not found; {hint}")
        if name not in self.manifest["files"] and name not in self.replacing:
            raise InputError(f"{p}: not recorded in {self.path / 'manifest.json'}, so it is not this bundle's "
                             f"model (left from an earlier model, or copied in by hand); {hint}")
        if verify:
            self.verify([name])
        return p

    def graph_refusal(self, name: str) -> dict | None:
        """The record of INT8 graph ``name`` that the accuracy guard refused when this ``model.onnx`` was quantized
        (``manifest["quantized"]["int8"]["refused"][name]``: ``why`` and ``fix`` in words, the failures, the CPU),
        or None: ``name`` is in the bundle, was not refused, or the record is of an earlier model."""
        q = (self.manifest.get("quantized") or {}).get("int8")
        refused = q.get("refused") if isinstance(q, dict) else None
        rec = refused.get(name) if isinstance(refused, dict) else None
        if not isinstance(rec, dict) or name in self.manifest["files"]:
            return None
        if q.get("source_sha256") != self.graph_hash("model.onnx"):
            return None
        return {"why": "the accuracy guard refused it", "fix": GRAPH_HINTS.get(name, ""), **rec}

    def set_active(self, graph: str, precision: str) -> None:
        self.manifest["active"] = {"graph": graph, "precision": precision}
        self.save_manifest()

    def graph_hash(self, graph: str | None = None) -> str:
        """The sha256 of graph ``graph`` (default: the active one), as manifest.json records it; '' when it
        is missing. What TensorRT engines, quantized graphs and guard reports name their source graph by."""
        return self._recorded_sha256(graph or self.active_graph)

    def _recorded_sha256(self, name: str) -> str:
        rec = self.manifest["files"].get(name)
        if rec is None or name in self.replacing:   # old or new: the file says which
            p = self.file(name)
            return atomic.sha256_file(p) if p.is_file() else ""
        return rec["sha256"]

    def model_hash(self, graph: str | None = None, calibration: Calibration | None = None) -> str:
        """The model's identity: what turns a frame into raw anomaly maps (the calibration's map
        normalization and threshold are not part of it; their version is reported on its own).

        For every kind but ``gaussian``: the sha256 of the graph (:meth:`graph_hash`; default the active
        one), the same whichever backend or precision runs it. A Gaussian bundle's graph is the pretrained
        feature extractor, the same for every Gaussian bundle of an input size; its model is the Gaussian
        statistics fitted on the training images (``gaussian.d/NNNN.npz``, named by the calibration in force
        as ``extra.gaussian``, and refitted by a recalibration). Its identity is the sha256 of the UTF-8 text
        ``"<graph sha256>\n<statistics sha256>\n"`` (both as manifest.json records them): two Gaussian
        bundles trained on different images differ, and so does one before and after a refit.
        ``calibration``: the calibration in force (default: the bundle's ``calibration.json``; a bundle
        without one, or a calibration that names no statistics, gives the graph's sha256).
        """
        graph_sha = self.graph_hash(graph)
        if self.kind != "gaussian" or not graph_sha:
            return graph_sha
        if calibration is None:
            if not (self.path / "calibration.json").is_file():
                return graph_sha
            calibration = self.calibration()
        stats = str(calibration.extra.get("gaussian") or "")
        stats_sha = self._recorded_sha256(stats) if stats else ""
        if not stats_sha:
            return graph_sha
        return hashlib.sha256(f"{graph_sha}\n{stats_sha}\n".encode("utf-8")).hexdigest()

    def check_writable(self, what: str, *folders: str | None) -> None:
        """Before work that ends in writing this bundle (``what``: the command, e.g. ``calibrate``; minutes of
        frames or an export): the bundle folder and each of its sub-``folders`` written (None: none) can be
        written in by this process (:func:`~edge_ad.atomic.check_writable`), else an InputError naming the
        folder, and nothing was done. The work then never ends in a permission error on its last file."""
        for sub in (None, *folders):
            try:
                atomic.check_writable(self.path / sub if sub else self.path, f"{what} {self.path}")
            except InputError as exc:
                raise InputError(f"{exc}; nothing was changed") from None

    @property
    def engines_dir(self) -> Path:
        return self.path / "engines"

    # ----------------------------------------------------------------- calibration
    @property
    def calibration_dir(self) -> Path:
        return self.path / "calibration.d"

    def calibration_lock(self):
        """One calibration change of this bundle at a time (``edge-ad calibrate`` and its ``--rollback``, the
        runtime's MQTT calibrate / rollback_calibration / persisted set_threshold), held from before the
        frames are collected to the switch: a second is refused at once (RuntimeFailure) instead of
        silently replacing the first's calibration. Re-entrant in one thread."""
        return atomic.folder_lock(self.path, f"{self.path}: another calibration of this bundle is running "
                                  "(edge-ad calibrate, or the MQTT calibrate, rollback_calibration or set_threshold "
                                  "of a running edge-ad run); try again when it has finished")

    def calibration_versions(self) -> list[int]:
        d = self.calibration_dir
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for f in d.iterdir() if (m := _CAL_RE.match(f.name)))

    def calibration(self) -> Calibration:
        p = self.path / "calibration.json"
        if not p.is_file():
            raise InputError(f"{p}: not found; the bundle has no calibration (train or calibrate it first)")
        return _read_calibration(p)[0]

    def calibration_at(self, version: int) -> Calibration:
        """Calibration ``version`` from its history file, checked like the one in force."""
        p = self.calibration_version_file(version)
        if not p.is_file():
            raise InputError(f"{p}: calibration version {version} not found")
        return _read_calibration(p)[0]

    def next_calibration_version(self) -> int:
        """One more than the newest version kept or in force: versions never go back nor get reused, even
        when the history folder was emptied."""
        versions = self.calibration_versions()
        newest = versions[-1] if versions else 0
        if self.has("calibration.json"):
            try:
                newest = max(newest, self.calibration().version)
            except InputError:
                pass  # an unreadable calibration in force is replaced; the history still numbers it
        return newest + 1

    def calibration_version_file(self, version: int) -> Path:
        return self.calibration_dir / f"{version:04d}.json"

    def write_calibration(self, cal: Calibration) -> Calibration:
        """Store ``cal`` as the next version and put it in force. Returns it with version and date set.

        Order matters for power cuts: the history file is written (atomically) first, then
        calibration.json is replaced atomically. A cut between the two leaves the old calibration in force.
        ``extra["previous_version"]`` records the version in force it replaces (:meth:`previous_calibration_version`).
        Credentials of a URI in ``cal.source`` are replaced by ``***`` (:func:`~edge_ad.runtime.sources.redact_text`).
        """
        version = self.next_calibration_version()
        extra = {k: v for k, v in cal.extra.items() if k != "previous_version"}
        try:  # the one it replaces: where a rollback without a version goes back to
            if self.has("calibration.json"):
                extra["previous_version"] = self.calibration().version
        except InputError:
            pass  # an unreadable calibration in force: nothing to go back to
        from .runtime.sources import redact_text

        # the record travels (bundle archives, the retained MQTT calibration): a camera URI in its source
        # ("edge-ad calibrate: rtsp://user:password@cam/1") is stored without its credentials
        cal = cal.replace(version=version, created=cal.created or now_iso(), extra=extra,
                          source=redact_text(cal.source))
        data = (json.dumps(cal.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")
        atomic.write_bytes(self.calibration_version_file(version), data)
        self._put_calibration(data)
        return cal

    def _put_calibration(self, data: bytes) -> None:
        """One atomic rename puts a calibration in force. Its integrity is not a manifest hash (a power
        cut between two files could leave them disagreeing) but its byte-identity with the history
        file of its version, which :meth:`verify` checks."""
        atomic.write_bytes(self.path / "calibration.json", data)
        if self.manifest["files"].pop("calibration.json", None) is not None:  # bundles of early versions
            self.save_manifest()

    def previous_calibration_version(self) -> int:
        """The version a rollback without a version puts back: the one the calibration in force replaced
        when it was written (``extra["previous_version"]``; for files written before that was recorded, a
        recalibration's ``extra["recalibration"]["previous_version"]``), else the newest older version.
        Not simply the next lower number: after v3 -> rollback to v2 -> v4, the one before v4 is v2."""
        cal = self.calibration()
        rec = cal.extra.get("previous_version")
        refit = cal.extra.get("recalibration")
        if rec is None and isinstance(refit, dict) and cal.policy != "manual":  # manual: set_threshold's copy
            rec = refit.get("previous_version")
        if isinstance(rec, int) and not isinstance(rec, bool) and 0 < rec < cal.version:
            return rec
        older = [v for v in self.calibration_versions() if v < cal.version]
        if not older:
            raise InputError(f"calibration version {cal.version} is the oldest; nothing to roll back to")
        return older[-1]

    @property
    def rollback_log(self) -> Path:
        return self.calibration_dir / "rollbacks.json"

    def calibration_rollbacks(self) -> list[dict]:
        """The rollbacks recorded (oldest first; the newest :data:`ROLLBACKS_KEPT`): ``version`` put back,
        ``previous_version`` (None when the one in force was unreadable), ``ts``, ``by`` (``cli``, ``mqtt``,
        ``mqtt (client ID)``). An unreadable log reads as none: it is a record, never needed to run."""
        return self._rollback_records() or []

    def _rollback_records(self) -> list[dict] | None:
        """:meth:`calibration_rollbacks`, None when the log is there but unreadable (not a JSON list)."""
        try:
            records = json.loads(self.rollback_log.read_text("utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return None
        return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else None

    def _write_rollbacks(self, records: list[dict]) -> None:
        """Write the rollback log (atomic), keeping its newest :data:`ROLLBACKS_KEPT` records."""
        atomic.write_json(self.rollback_log, records[-ROLLBACKS_KEPT:])

    def drop_rollbacks(self, kept: Iterable[int] | None = None, dry_run: bool = False) -> int:
        """Drop the rollback records that put back a version the history does not keep (``kept``; default: the
        versions on disk): pruned, or deleted by hand. ``--list`` shows a record under the version it put back,
        so these say nothing any more. A record that put back a kept version stays, also when the version it
        replaced is gone (it still says where it came from). Returns how many are (``dry_run``: would be)
        dropped; an unreadable log is left as it is."""
        records = self._rollback_records()
        if not records:
            return 0
        kept = set(self.calibration_versions() if kept is None else kept)
        left = [r for r in records if not isinstance(r.get("version"), int) or r["version"] in kept]
        if len(left) < len(records) and not dry_run:
            self._write_rollbacks(left)
        return len(records) - len(left)

    def calibration_holders(self, remove_stale: bool = False) -> dict[int, list[dict]]:
        """``{version: [record, ...]}``: the calibration versions running processes decide with, as their
        :class:`CalibrationHold` records them (``edge-ad run`` after a calibration written beside it and not
        reloaded yet: another version than the one in force). Each record: ``version``, ``pid``, ``by``,
        ``since``. A record whose process is gone (killed, a power cut: the kernel's lock on it is released)
        is not counted; ``remove_stale`` deletes it. Where the kernel's lock is missing (not POSIX) none."""
        return _held_records(self.calibration_dir, remove_stale)

    @staticmethod
    def holders_of(bundle_dir: str | os.PathLike) -> dict[int, list[dict]]:
        """:meth:`calibration_holders` of the bundle folder ``bundle_dir``, without opening it (no manifest read:
        another release of a deploy folder, which may be damaged)."""
        return _held_records(Path(bundle_dir) / "calibration.d", False)

    def rollback_calibration(self, version: int | None = None, by: str = "") -> Calibration:
        """Put an earlier calibration version back in force, byte for byte, and record it in
        :attr:`rollback_log` (``by``: what asked for it).

        Without ``version``: the one the calibration in force replaced (:meth:`previous_calibration_version`).
        """
        versions = self.calibration_versions()
        if not versions:
            raise InputError(f"{self.calibration_dir}: no calibration history to roll back to")
        if version is None:  # an explicit version also repairs an unreadable calibration in force
            version = self.previous_calibration_version()
        if version not in versions:   # the versions in runs, at most a dozen: a history holds thousands
            why = (f"the newest is v{versions[-1]}" if version > versions[-1] else "versions start at v1"
                   if version < 1 else "no longer kept: pruned, or deleted by hand")
            raise InputError(f"calibration version {version} not found ({why}); {len(versions)} kept: "
                             f"{version_runs(versions, most=12)} ('edge-ad calibrate --list' lists them all, the MQTT "
                             "status's calibration.versions the newest); the calibration in force is unchanged")
        _, data = _read_calibration(self.calibration_version_file(version))
        try:
            before = self.calibration().version if self.has("calibration.json") else None
        except InputError:
            before = None   # unreadable: an explicit version repairs it
        self._put_calibration(data)
        record = {"version": version, "previous_version": before, "ts": now_iso(), "by": by or "api"}
        try:   # after the switch, which is done: a full disk costs the record, not the rollback
            self._write_rollbacks(self.calibration_rollbacks() + [record])
        except OSError as exc:
            log.warning("rollback to calibration v%d not recorded in %s: %s", version, self.rollback_log, exc)
        return self.calibration()


class CalibrationHold:
    """What a running process (``edge-ad run``) records of the calibration version it decides with, so that
    ``edge-ad calibrate --prune`` keeps that version while the process may still roll back from it or to it:
    after ``edge-ad calibrate`` wrote a new version beside it, the line decides with the old one until it
    reloads, and nothing else on disk says so.

    :meth:`put` writes ``calibration.d/.held-<id>.json`` (atomic; ``version``, ``pid``, ``by``, ``since``) in
    the bundle's folder, and holds the kernel's lock (flock) on ``.held-<id>.lock`` beside it from then on;
    called again with another version it rewrites the record, with another bundle it moves it there.
    :meth:`release` (a clean stop) deletes both. A process that dies however it dies (killed, a power cut)
    releases the lock with it, so its record is known stale (:meth:`Bundle.calibration_holders`), also from
    another PID namespace (a container) sharing the folder. Never raises: a record that cannot be written (a
    read-only bundle) is logged once as a WARNING, and the run goes on. Not POSIX (no flock): nothing recorded."""

    def __init__(self, by: str = "edge-ad run"):
        self.by = by
        self.id = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._folder: Path | None = None
        self._failed: str | None = None   # the last error logged (said once)

    @property
    def record(self) -> Path | None:
        return self._folder / f".held-{self.id}.json" if self._folder is not None else None

    def put(self, bundle: "Bundle", version: int) -> None:
        """Record ``version`` of ``bundle`` as the one this process decides with."""
        try:
            import fcntl
        except ImportError:
            return
        folder = bundle.calibration_dir
        with self._lock:
            try:
                if not folder.is_dir():   # no history to prune: nothing to keep
                    self._drop()
                    return
                if self._folder is None or self._folder.resolve() != folder.resolve():
                    self._drop()
                    _held_records(folder, remove_stale=True)   # what killed runs left there
                    # locked before it appears under its name: a lock file there unlocked is a stale one
                    fd, tmp = tempfile.mkstemp(prefix=f".held-{self.id}.", suffix=".tmp", dir=folder)
                    try:
                        os.fchmod(fd, 0o644)
                        fcntl.flock(fd, fcntl.LOCK_EX)
                        os.replace(tmp, folder / f".held-{self.id}.lock")
                    except BaseException:
                        os.close(fd)
                        Path(tmp).unlink(missing_ok=True)
                        raise
                    self._fd, self._folder = fd, folder
                atomic.write_json(self.record, {"version": int(version), "pid": os.getpid(), "by": self.by,
                                                "since": now_iso()})
                self._failed = None
            except OSError as exc:
                why = f"{exc}"
                if why != self._failed:
                    self._failed = why
                    log.warning("%s: cannot record that %s decides with calibration v%d (%s): 'edge-ad calibrate "
                                "--prune' may delete that version while it runs", folder, self.by, version, why)

    def release(self) -> None:
        """Delete the record (a clean stop); nothing held any more."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._folder is None:
            return
        record, lock = self.record, self._folder / f".held-{self.id}.lock"
        try:
            record.unlink(missing_ok=True)   # the record first: a record without its lock reads as stale
            lock.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: cannot remove this run's calibration record (%s); it reads as stale once this "
                        "process has ended", record, exc)
        finally:
            os.close(self._fd)
            self._fd, self._folder = None, None


def _held_records(folder: Path, remove_stale: bool) -> dict[int, list[dict]]:
    """:meth:`Bundle.calibration_holders` of the history folder ``folder``."""
    try:
        import fcntl
    except ImportError:
        return {}
    try:
        ids = sorted({m.group(1) for p in folder.iterdir() if (m := _HELD_RE.match(p.name))})
    except OSError:
        return {}
    out: dict[int, list[dict]] = {}
    for hid in ids:
        record, lock = folder / f".held-{hid}.json", folder / f".held-{hid}.lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            fd = None   # a record without its lock: a process stopped between the two removals
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:   # held: its process runs
                    try:
                        rec = json.loads(record.read_text("utf-8"))
                        v = rec["version"]
                    except FileNotFoundError:
                        continue   # a clean stop, just now
                    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
                        log.warning("%s: unreadable (%s); the version it records is not known", record, exc)
                        continue
                    if isinstance(v, int) and not isinstance(v, bool):
                        out.setdefault(v, []).append(rec)
                    continue
            if remove_stale:   # nobody holds it (we do, now): its process is gone, and an id is never reused
                record.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
                log.info("removed %s: the record of a process that ended without removing it", record)
        except OSError as exc:
            log.warning("%s: cannot remove this stale record (%s)", record, exc)
        finally:
            if fd is not None:
                os.close(fd)
    return out


def _read_calibration(p: Path) -> tuple[Calibration, bytes]:
    """A calibration file, checked (:meth:`Calibration.from_dict`), and its exact bytes."""
    try:
        data = p.read_bytes()
        d = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: unreadable calibration ({exc})") from exc
    return Calibration.from_dict(d, where=str(p)), data
