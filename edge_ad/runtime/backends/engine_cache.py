"""TensorRT engine cache of a bundle: keys, sidecars and the checks that refuse a wrong engine.

An engine is tied to the model, the precision, the GPU architecture and the TensorRT version. Its key
says all four::

    engines/<model sha256[:16]>-<precision>-sm<major><minor>-trt<version>.engine
    engines/<same key>.json      sidecar: what it was built from, on what, and the engine's sha256

It is also tied to the GPU model (name, SM count, memory: :func:`_other_gpu_model`), which the sidecar
records. An engine is used only when its sidecar matches this machine and this bundle and the file's
sha256 matches the sidecar. Anything else (another GPU, another TensorRT, a changed or re-quantized
model, a truncated or altered file, a missing sidecar) is refused with the reason; ``edge-ad compile``
then rebuilds it. Pure Python: tested without TensorRT.

A rebuild never deletes the engine in use first: the new engine is written beside it as
``<key>.engine.new`` with ``<key>.json.new`` (:func:`write` with ``pending``), guarded from there, and
only then switched in by :func:`swap_in`; a failed build or guard drops the pending pair
(:func:`discard_pending`), and the engine that was there stays.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ... import __version__, atomic
from ...bundle import Bundle, now_iso

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
_KEY_RE = re.compile(r"^(?P<sha>[0-9a-f]{16})-(?P<prec>fp32|fp16|int8)-sm(?P<cc>\d+)-trt(?P<trt>[0-9][0-9.]*)$")


@dataclass(frozen=True)
class Target:
    """Where an engine runs: GPU compute capability ("8.7"), TensorRT version, and the GPU model: its CUDA
    name, number of SMs and memory (MiB). On a Jetson the name is "Orin" for every Orin module, so the SM
    count and the memory tell the modules apart (0: not known)."""

    compute_capability: str
    trt_version: str
    gpu_name: str = ""
    sm_count: int = 0
    memory_mib: int = 0

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class EngineCheck:
    key: str
    engine: Path
    sidecar: Path
    ok: bool
    reason: str = ""             # why it is refused ("" when ok)
    meta: dict | None = None     # the sidecar, when readable


def engine_key(model_sha256: str, precision: str, target: Target) -> str:
    if not re.fullmatch(r"[0-9a-f]{16,64}", model_sha256 or ""):
        raise ValueError(f"model sha256 '{model_sha256}' is not a hex digest")
    if not re.fullmatch(r"[0-9][0-9.]*", target.trt_version):
        raise ValueError(f"TensorRT version '{target.trt_version}' is not a version number")
    return f"{model_sha256[:16]}-{precision}-{target.sm}-trt{target.trt_version}"


def parse_key(key: str) -> dict | None:
    m = _KEY_RE.match(key)
    if not m:
        return None
    return {"model_sha16": m["sha"], "precision": m["prec"], "sm": "sm" + m["cc"], "trt_version": m["trt"]}


def paths(bundle: Bundle, key: str, pending: bool = False) -> tuple[Path, Path]:
    """The engine and sidecar of ``key``; ``pending``: those of a new engine not switched in yet
    (``<key>.engine.new``, ``<key>.json.new``: no ``.engine`` suffix, so nothing lists or runs them)."""
    d = bundle.engines_dir
    new = ".new" if pending else ""
    return d / f"{key}.engine{new}", d / f"{key}.json{new}"


def timing_cache_path(bundle: Bundle, target: Target) -> Path:
    """Timing caches are per GPU architecture and TensorRT version, shared by all precisions."""
    return bundle.engines_dir / f"timing-{target.sm}-trt{target.trt_version}.cache"


def model_sha(bundle: Bundle) -> str:
    """The FP32 model's identity: engines of every precision are keyed by it."""
    sha = bundle.graph_hash("model.onnx")
    if not sha:
        raise FileNotFoundError(f"{bundle.file('model.onnx')}: not found; run 'edge-ad export'")
    return sha


def make_sidecar(bundle: Bundle, precision: str, target: Target, engine_sha256: str, source_graph: str,
                 max_batch: int, typing: str, workspace_mib: int, build_seconds: float) -> dict:
    return {
        "format": SIDECAR_FORMAT,
        "model_sha256": model_sha(bundle),
        "precision": precision,
        "source_graph": source_graph,
        "source_sha256": bundle.graph_hash(source_graph),
        "compute_capability": target.compute_capability,
        "gpu_name": target.gpu_name,
        "sm_count": int(target.sm_count),
        "gpu_memory_mib": int(target.memory_mib),
        "tensorrt": target.trt_version,
        "engine_sha256": engine_sha256,
        "image_size": list(bundle.image_size),
        "outputs": bundle.outputs,
        "max_batch": int(max_batch),
        "typing": typing,
        "workspace_mib": int(workspace_mib),
        "build_seconds": round(float(build_seconds), 2),
        "built": now_iso(),
        "edge_ad": __version__,
    }


def check(bundle: Bundle, precision: str, target: Target, require_guard: bool = False,
          pending: bool = False) -> EngineCheck:
    """Is there a usable engine for ``precision`` on ``target``? Never raises for a bad engine.

    ``require_guard``: also refuse an engine whose sidecar does not record a passed accuracy guard
    (``edge-ad compile`` builds, guards, then records; an interrupted compile leaves none). ``pending``:
    check the new engine written beside the one in use (:func:`paths`) instead.
    """
    try:
        key = engine_key(model_sha(bundle), precision, target)
    except (FileNotFoundError, ValueError) as exc:
        return EngineCheck("", Path(), Path(), False, str(exc))
    eng, side = paths(bundle, key, pending)
    if not eng.is_file():
        return EngineCheck(key, eng, side, False, _absent(bundle, precision, target))
    reason, meta = validate_sidecar(bundle, key, precision, target, pending)
    if reason is None:
        got = atomic.sha256_file(eng)
        if got != meta["engine_sha256"]:
            reason = (f"{eng.name}: sha256 {got[:12]}… does not match its sidecar "
                      f"({str(meta['engine_sha256'])[:12]}…); the file is corrupt or was changed")
    if reason is None and require_guard and not (meta.get("guard") or {}).get("passed"):
        reason = f"{eng.name}: never passed the accuracy guard (run 'edge-ad compile')"
    return EngineCheck(key, eng, side, reason is None, reason or "", meta)


def validate_sidecar(bundle: Bundle, key: str, precision: str, target: Target,
                     pending: bool = False) -> tuple[str | None, dict | None]:
    """(None, sidecar) when the sidecar matches this bundle and target; (reason, sidecar or None) if not.
    The sidecar is the one in force (:func:`_in_force`: a switch a power cut interrupted has two)."""
    eng, side = paths(bundle, key, pending)
    if not side.is_file():
        return f"{side.name}: sidecar missing (an engine without one is never run)", None
    try:
        meta = _in_force(_read(side), eng)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{side.name}: unreadable sidecar ({exc})", None
    if meta.get("format") != SIDECAR_FORMAT:
        return f"{side.name}: sidecar format {meta.get('format')!r}, expected {SIDECAR_FORMAT}", meta
    expect = {
        "model_sha256": model_sha(bundle),
        "precision": precision,
        "compute_capability": target.compute_capability,
        "tensorrt": target.trt_version,
        "image_size": list(bundle.image_size),
        "outputs": bundle.outputs,
    }
    what = {"model_sha256": "built from another model", "precision": "another precision",
            "compute_capability": "built for another GPU architecture", "tensorrt": "built by another TensorRT",
            "image_size": "another input size", "outputs": "other outputs"}
    for field, want in expect.items():
        if meta.get(field) != want:
            return (f"{side.name}: {what[field]} ({field} {meta.get(field)!r}, this machine/bundle has "
                    f"{want!r})"), meta
    other_gpu = _other_gpu_model(meta, target)
    if other_gpu:
        return f"{side.name}: built on another GPU model ({other_gpu}); engines are specific to it", meta
    src = meta.get("source_graph")
    if not isinstance(src, str) or not src:
        return f"{side.name}: names no source graph", meta
    if bundle.graph_hash(src) != meta.get("source_sha256"):
        return (f"{side.name}: its source graph {src} changed since the engine was built "
                "(re-quantized or re-exported)"), meta
    if not isinstance(meta.get("engine_sha256"), str):
        return f"{side.name}: no engine_sha256", meta
    if not isinstance(meta.get("guard", {}), dict):
        return f"{side.name}: guard is {type(meta['guard']).__name__}, expected an object or none", meta
    return None, meta


def _order(prefer: str | None) -> list[str]:
    return ([prefer] if prefer else []) + [p for p in ("int8", "fp16", "fp32") if p != prefer]


MEMORY_TOLERANCE = 1.25   # the memory a device reports may move a little with its kernel; modules differ 2x


def _other_gpu_model(meta: dict, target: Target) -> str:
    """How the GPU an engine was built on differs from ``target``'s ("" when it does not): the CUDA name,
    then (the name being "Orin" for every Orin module) the SM count and the memory, NVIDIA's engines being
    specific to the exact GPU model, not only to its architecture. A field either side does not know (a
    sidecar from an earlier edge-ad has no SM count or memory) is not compared."""
    name = meta.get("gpu_name")
    if name and target.gpu_name and name != target.gpu_name:
        return f"gpu_name {name!r}, this device has {target.gpu_name!r}"
    sms = meta.get("sm_count")
    if isinstance(sms, int) and sms > 0 and target.sm_count > 0 and sms != target.sm_count:
        return f"{sms} SMs, this device has {target.sm_count}"
    mib = meta.get("gpu_memory_mib")
    if isinstance(mib, (int, float)) and mib > 0 and target.memory_mib > 0 and \
            max(mib, target.memory_mib) > MEMORY_TOLERANCE * min(mib, target.memory_mib):
        return f"{mib:,.0f} MiB of memory, this device has {target.memory_mib:,} MiB"
    return ""


def select(bundle: Bundle, target: Target, precision: str | None = None) -> EngineCheck | None:
    """The guarded engine run opens: ``precision``'s, or with none :func:`best`'s, the bundle's active precision
    first; None when there is none (:func:`no_engine` says why)."""
    if precision is None:
        return best(bundle, target, prefer=bundle.active_precision)
    c = check(bundle, precision, target, require_guard=True)
    return c if c.ok else None


def best(bundle: Bundle, target: Target, prefer: str | None = None) -> EngineCheck | None:
    """The guarded engine to run when no precision is asked for: ``prefer`` first, then int8, fp16, fp32."""
    for prec in _order(prefer):
        c = check(bundle, prec, target, require_guard=True)
        if c.ok:
            return c
    return None


def model_engines(bundle: Bundle) -> list[dict]:
    """The engine files of this bundle's model, for any precision, GPU or TensorRT version: :func:`parse_key`'s
    fields and ``file`` (the name), sorted by name; [] without ``model.onnx``."""
    d = bundle.engines_dir
    try:
        sha16 = model_sha(bundle)[:16]
    except FileNotFoundError:
        return []
    if not d.is_dir():
        return []
    found = ((parse_key(p.stem), p.name) for p in sorted(d.glob("*.engine")))
    return [dict(k, file=name) for k, name in found if k is not None and k["model_sha16"] == sha16]


def _absent(bundle: Bundle, precision: str, target: Target) -> str:
    """Why there is no ``precision`` engine for ``target``: the engines of this model there are for another
    TensorRT (stale: a JetPack upgrade) or another GPU (a copied bundle), or none at all."""
    mine = [k for k in model_engines(bundle) if k["precision"] == precision]
    if mine:
        return "; ".join(_foreign_text(k, target) for k in mine)
    return f"no {precision} engine for this model on {target.sm} with TensorRT {target.trt_version}" + \
        _other_models_note(bundle, precision)


def _other_models_note(bundle: Bundle, precision: str | None = None) -> str:
    """" (engines present for other models: A, B)", by name: the engine files in the bundle's engines/ whose key
    (:func:`parse_key`) names another model (one exported before, say): those of ``precision`` when given (why
    that precision's engine is absent: :func:`_absent`), else every one (why no engine of this model is there at
    all: :func:`no_engine`); "" when there is none. A file whose name is no engine key is not listed: nothing says
    it is another model's (:func:`scan` names it)."""
    d = bundle.engines_dir
    if not d.is_dir():
        return ""
    sha16 = model_sha(bundle)[:16]
    others = [p.name for p in sorted(d.glob("*.engine")) if (k := parse_key(p.stem)) is not None
              and k["model_sha16"] != sha16 and precision in (None, k["precision"])]
    return f" (engines present for other models: {', '.join(others)})" if others else ""


def _foreign_text(k: dict, target: Target) -> str:
    if k["sm"] == target.sm:
        return (f"the {k['precision']} engine built by TensorRT {k['trt_version']} is stale (this device has "
                f"{target.trt_version})")
    return (f"the {k['precision']} engine {k['file']} was built for another GPU ({k['sm']}, TensorRT "
            f"{k['trt_version']}; this device is {target.sm}, TensorRT {target.trt_version})")


def no_engine(bundle: Bundle, target: Target, precision: str | None = None) -> tuple[str, str]:
    """(why, what to build) when run has no guarded engine to open: ``precision`` (the config's
    ``model.precision``), or, when it is None, any in :func:`best`'s order. The one source of the words and
    the hint of ``run`` (the TensorRT backend) and ``doctor``: the first engine of this model that is there
    but refused (corrupt, never guarded, stale after a TensorRT upgrade, built on another GPU) gives the
    reason, and its precision is the one to rebuild; with none, ``precision``, else ``best`` (what
    ``edge-ad compile --precision best`` builds). :func:`compile_command` words the hint."""
    order = [precision] if precision else _order(bundle.active_precision)
    first, have = None, set()
    for p in order:   # one at a time: a check hashes the engine, and the first one there answers
        c = check(bundle, p, target, require_guard=True)
        if first is None:
            first = c
            if not c.key:   # no model.onnx: check() says so
                return c.reason, precision or "best"
            have = {k["precision"] for k in model_engines(bundle)}
        if c.engine.is_file() or p in have:
            return c.reason, p
    if precision:
        return first.reason, precision
    return f"no engine of this model in the bundle's engines/{_other_models_note(bundle)}", "best"


def compile_command(bundle: Bundle, precision: str) -> str:
    """The command that builds, guards and records the engine of ``precision`` (or ``best``) on this device."""
    return f"edge-ad compile --bundle {bundle.path} --precision {precision}"


def scan(bundle: Bundle, target: Target) -> list[EngineCheck]:
    """Every engine file in the bundle, checked against this machine (for reports and clean-up)."""
    out = []
    d = bundle.engines_dir
    if not d.is_dir():
        return out
    for eng in sorted(d.glob("*.engine")):
        key = eng.stem
        parsed = parse_key(key)
        side = eng.with_suffix(".json")
        if parsed is None:
            out.append(EngineCheck(key, eng, side, False, f"{eng.name}: not an edge-ad engine key"))
            continue
        c = check(bundle, parsed["precision"], target)
        if c.key == key:
            out.append(c)
        else:
            out.append(EngineCheck(key, eng, side, False,
                                   f"{eng.name}: for {parsed['sm']} / TensorRT {parsed['trt_version']} / "
                                   f"model {parsed['model_sha16']}; this is {target.sm} / TensorRT "
                                   f"{target.trt_version} / model {c.key[:16]}"))
    return out


def write(bundle: Bundle, key: str, engine: bytes, sidecar: dict, pending: bool = False) -> Path:
    """Engine first, sidecar last (atomically each): a power cut leaves no sidecar for a torn engine.
    ``pending``: beside the engine in use, to be switched in by :func:`swap_in` (:func:`paths`)."""
    eng, side = paths(bundle, key, pending)
    atomic.write_bytes(eng, engine)
    sidecar = dict(sidecar, engine_sha256=atomic.sha256_file(eng))
    atomic.write_json(side, sidecar)
    return eng


def update_sidecar(bundle: Bundle, key: str, pending: bool = False, **fields) -> None:
    eng, side = paths(bundle, key, pending)
    meta = _in_force(_read(side), eng)
    meta.update(fields)
    atomic.write_json(side, meta)


def swap_in(bundle: Bundle, key: str) -> None:
    """Switch the pending engine of ``key`` (written and guarded beside the one in use) in, so that a power cut
    at any point leaves one usable engine, the old or the new (never none, never a torn pair):

    1. the sidecar in use gets the new sidecar as ``replacing`` (:func:`_in_force` takes it for the engine
       whose sha256 it records, the old sidecar for the old engine);
    2. the new engine is renamed over the old one;
    3. the new sidecar is renamed over the old one.

    With no readable sidecar in use (no engine, or one that was never usable) step 1 is skipped."""
    eng, side = paths(bundle, key)
    new_eng, new_side = paths(bundle, key, pending=True)
    new = _read(new_side)
    try:
        old = _in_force(_read(side), eng) if eng.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        old = None
    if old is not None:
        atomic.write_json(side, dict(old, replacing=new))
    os.replace(new_eng, eng)
    os.replace(new_side, side)
    atomic._fsync_dir(side.parent)


def discard_pending(bundle: Bundle, key: str) -> None:
    """Drop the pending engine of ``key`` (a failed build or guard); the engine in use is not touched."""
    for p in reversed(paths(bundle, key, pending=True)):
        p.unlink(missing_ok=True)


def recover(bundle: Bundle, key: str) -> None:
    """Finish or undo what a power cut interrupted for ``key`` (called before a build): a switch cut after its
    engine rename is completed (the new sidecar renamed in), a pending pair not switched in is dropped, and a
    sidecar with a ``replacing`` record is written back as the one in force alone."""
    eng, side = paths(bundle, key)
    new_eng, new_side = paths(bundle, key, pending=True)
    if new_side.is_file() and not new_eng.exists() and eng.is_file():   # cut between steps 2 and 3 of swap_in
        try:
            done = _read(new_side).get("engine_sha256") == atomic.sha256_file(eng)
        except (OSError, UnicodeDecodeError, ValueError):
            done = False
        if done:
            os.replace(new_side, side)
            atomic._fsync_dir(side.parent)
    discard_pending(bundle, key)
    try:
        meta = _read(side)
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if "replacing" in meta:
        atomic.write_json(side, _in_force(meta, eng))


def _read(side: Path) -> dict:
    meta = json.loads(side.read_text("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def _in_force(meta: dict, eng: Path) -> dict:
    """The sidecar that describes the engine file ``eng``: ``meta``, or, during a switch (:func:`swap_in`),
    its ``replacing`` record once the new engine has been renamed in (the file's sha256 is the new one's)."""
    new = meta.get("replacing")
    if not isinstance(new, dict):
        return meta
    try:
        got = atomic.sha256_file(eng)
    except OSError:
        got = None
    if got is not None and got != meta.get("engine_sha256") and got == new.get("engine_sha256"):
        return new
    return {k: v for k, v in meta.items() if k != "replacing"}


def remove(bundle: Bundle, key: str) -> None:
    """Sidecar first (so a half-removed engine is already refused), then the engine; a pending one too."""
    eng, side = paths(bundle, key)
    for p in (side, eng):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    discard_pending(bundle, key)
