"""TensorRT engines, built on the device from the bundle's ONNX graphs, cached and guarded.

Versions and how precision is chosen:

- TensorRT 8.6 (JetPack 6.0) and 10.x (JetPack 6.1 / 6.2, 10.3): *weakly typed* networks with builder
  precision flags. fp16: ``model.onnx`` with ``BuilderFlag.FP16``, the map head (every layer after the
  last convolution) pinned to FP32 with ``OBEY_PRECISION_CONSTRAINTS``. int8: the Q/DQ graph
  ``model.int8.onnx`` with ``BuilderFlag.INT8`` (explicit quantization: the scales come from the graph,
  no calibrator); layers without Q/DQ run FP32. 8.6 also needs the EXPLICIT_BATCH creation flag.
- TensorRT 11.x: *strongly typed* networks only (no precision flags, no calibrators): the precision
  comes from the graph, so fp16 builds ``model.fp16.onnx`` and int8 builds ``model.int8.onnx``.
  ``typing="strong"`` does the same on 10.x.

Every build: all ONNX parser errors reported, an optimization profile for batch 1..max_batch, a
workspace limit, a persisted timing cache (per GPU architecture and TensorRT version), the engine
deserialized once to check it, then written with its sidecar (:mod:`..runtime.backends.engine_cache`)
beside the engine in use, if any. An engine already in the cache is reused only when the cache accepts
it; otherwise the refusal is reported and the engine rebuilt. :func:`compile_bundle` then runs the
accuracy guard on the new engine and switches it in only when it passed (:func:`record_engine`): a
failed build or guard, or a power cut, leaves the engine that was in use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..bundle import Bundle
from ..errors import InputError, RuntimeFailure
from ..runtime.backends import engine_cache
from ..runtime.backends.engine_cache import EngineCheck
from ..runtime.backends.tensorrt import (_Logger, current_target, deserialize, import_tensorrt, trt_major,
                                         trt_supported)

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_MIB = 1024


@dataclass
class BuildResult:
    check: EngineCheck
    built: bool            # False: a valid engine was already cached
    refused: list[str]     # reasons earlier engines for this key were refused
    seconds: float
    source_graph: str
    typing: str
    kept: EngineCheck | None = None   # a rebuild: the guarded engine in use, kept until the new one is guarded


def source_graph(precision: str, strong: bool) -> str:
    if precision == "int8":
        return "model.int8.onnx"
    if precision == "fp16" and strong:
        return "model.fp16.onnx"
    return "model.onnx"


def build_engine(bundle: Bundle, precision: str, max_batch: int = DEFAULT_MAX_BATCH,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, device: int = 0, typing: str = "auto",
                 opt_batch: int = 1, force: bool = False, progress: bool = True) -> BuildResult:
    """Build (or reuse a valid cached) engine for ``precision``; returns where it is and what happened.

    A new engine is written beside the one in use (``engines/<key>.engine.new``, :func:`engine_cache.paths`):
    ``check`` names it, and :func:`record_engine` switches it in once it has passed its guard. A build that
    fails (parser error, out of memory, interrupted) leaves the engine in use as it was and says so when
    it is a guarded one (:func:`kept_note`)."""
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"precision '{precision}': expected fp32, fp16 or int8")
    if typing not in ("auto", "weak", "strong"):
        raise InputError(f"typing '{typing}': expected auto, weak or strong")
    if not 1 <= int(opt_batch) <= int(max_batch):
        raise InputError(f"opt batch {opt_batch} must lie in 1..max batch {max_batch}")
    trt = import_tensorrt()
    from ..runtime.backends.cuda import cuda_api

    cuda = cuda_api()
    # the device current on this thread for the build only: pycuda pushes its context here and pops it after (it
    # aborts the process when a thread ends with a context still pushed); cuda-python sets the device here
    try:
        with cuda.activate(device):
            return _build(trt, cuda, bundle, precision, max_batch, workspace_mib, device, typing, opt_batch, force,
                          progress)
    finally:
        cuda.close()   # pycuda: releases the primary context activate retained, on this thread


def _build(trt, cuda, bundle: Bundle, precision: str, max_batch: int, workspace_mib: int, device: int, typing: str,
           opt_batch: int, force: bool, progress: bool) -> BuildResult:
    """:func:`build_engine` with the device current (the options checked)."""
    target = current_target(trt, cuda, device)
    major = trt_major(trt)
    if not trt_supported(trt.__version__):
        raise InputError(f"TensorRT {trt.__version__}: edge-ad needs TensorRT 8.6, 10.x or 11.x")
    strong = typing == "strong" or (typing == "auto" and major >= 11)
    if major >= 11 and typing == "weak":
        raise InputError("TensorRT 11 builds strongly typed networks only; use typing 'auto' or 'strong'")
    if strong and major < 10:
        raise InputError(f"strongly typed networks need TensorRT 10 or newer (this is {trt.__version__})")

    refused = []
    try:
        key = engine_cache.engine_key(engine_cache.model_sha(bundle), precision, target)
    except (FileNotFoundError, ValueError):
        key = ""   # no model.onnx: check() says so, and the build is refused with its reason below
    if key:
        engine_cache.recover(bundle, key)   # what a power cut in an earlier build or switch left
    chk = engine_cache.check(bundle, precision, target)
    # a cached engine is reused only when it was built with the options asked for now
    wanted = {"max_batch": int(max_batch), "typing": "strong" if strong else "weak",
              "workspace_mib": int(workspace_mib)}
    differs = [f"{k} {(chk.meta or {}).get(k)!r}, asked {v!r}" for k, v in wanted.items()
               if (chk.meta or {}).get(k) != v] if chk.ok else []
    if chk.ok and not force and not differs:
        _say(progress, f"engine {chk.engine.name} is valid for this GPU and TensorRT; not rebuilding")
        return BuildResult(chk, False, [], 0.0, chk.meta.get("source_graph", ""), chk.meta.get("typing", ""))
    kept = chk if chk.ok and (chk.meta.get("guard") or {}).get("passed") else None
    if chk.engine.name and chk.engine.is_file():
        refused.append(chk.reason if not chk.ok else
                       "rebuild forced" if force else "built with other options (" + "; ".join(differs) + ")")
        _say(progress, f"refusing engine {chk.engine.name}: {refused[-1]}; rebuilding"
                       + (" beside it (it stays in use until the new one has passed its guard)" if kept else ""))
    for other in engine_cache.scan(bundle, target):
        if not other.ok:
            log.info("engine cache: %s", other.reason)

    if not key:
        raise InputError(chk.reason)
    graph = source_graph(precision, strong)
    try:
        path = bundle.check_graph(graph)  # on disk, recorded by the manifest, sha256 checked
        _say(progress, f"building a TensorRT {trt.__version__} {precision} engine from {graph} for "
                       f"{target.gpu_name} ({target.sm}), batch 1..{max_batch}, "
                       f"{'strongly' if strong else 'weakly'} typed (this takes minutes on a Jetson)")
        t0 = time.perf_counter()
        data = _serialize(trt, bundle, path, precision, strong, major, max_batch, opt_batch, workspace_mib,
                          engine_cache.timing_cache_path(bundle, target))
        seconds = time.perf_counter() - t0
        side = engine_cache.make_sidecar(bundle, precision, target, "", graph, max_batch,
                                         "strong" if strong else "weak", workspace_mib, seconds)
        engine_cache.write(bundle, key, data, side, pending=True)   # beside the engine in use
        chk = engine_cache.check(bundle, precision, target, pending=True)
        if not chk.ok:  # a write that does not read back is a disk problem, not a model problem
            raise RuntimeFailure(f"engine written but refused on reading back: {chk.reason}")
    except BaseException as exc:
        engine_cache.discard_pending(bundle, key)
        if kept is not None and isinstance(exc, (RuntimeFailure, InputError)):
            exc.args = (f"{exc}; {kept_note(kept)}",)
        raise
    _say(progress, f"wrote {chk.engine} ({len(data) / 1e6:.1f} MB, {seconds:.0f} s)")
    return BuildResult(chk, True, refused, seconds, graph, "strong" if strong else "weak", kept)


def kept_note(kept: EngineCheck) -> str:
    """What a failed rebuild says of the guarded engine it leaves in use."""
    return f"the engine in use, {kept.engine.name} (guarded), is kept and still runs"


def _serialize(trt, bundle: Bundle, path: Path, precision: str, strong: bool, major: int, max_batch: int,
               opt_batch: int, workspace_mib: int, tc_path: Path) -> bytes:
    """TensorRT's part of a build: parse ``path``, set precision, profile, workspace and timing cache, build,
    deserialize the result once to check its tensors; returns the serialized engine."""
    h, w = bundle.image_size
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeFailure(f"{path}: TensorRT's ONNX parser failed with {len(errors)} error(s):\n  "
                             + "\n  ".join(errors or logger.errors() or ["(no message)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not strong:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            pinned = pin_head_fp32(trt, network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            log.info("fp16: %d map-head layers pinned to FP32", pinned)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, h, w), (int(opt_batch), 3, h, w), (int(max_batch), 3, h, w))
    config.add_optimization_profile(profile)
    cache = _timing_cache(config, tc_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeFailure(f"TensorRT could not build the {precision} engine from {path.name}:\n  "
                             + "\n  ".join(logger.errors() or ["(no error message; run with -vv)"]))
    data = bytes(memoryview(serialized))
    if cache is not None:
        from .. import atomic

        atomic.write_bytes(tc_path, bytes(memoryview(config.get_timing_cache().serialize())))
    _runtime, engine = deserialize(trt, logger, data, f"new {precision} engine")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    missing = [n for n in ["image"] + bundle.outputs if n not in names]
    if missing:
        raise RuntimeFailure(f"the built engine lacks tensors {missing} (has {names})")
    del engine, _runtime
    return data


def pin_head_fp32(trt, network) -> int:
    """Pin every layer with no convolution downstream (the map head) to FP32; returns how many."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None:
                consumers.setdefault(t.name, []).append(i)
    conv = {trt.LayerType.CONVOLUTION, trt.LayerType.DECONVOLUTION}
    below = [False] * len(layers)
    for i in range(len(layers) - 1, -1, -1):  # layers are in topological order
        layer = layers[i]
        for j in range(layer.num_outputs):
            for c in consumers.get(layer.get_output(j).name, []):
                if layers[c].type in conv or below[c]:
                    below[i] = True
    n = 0
    for i, layer in enumerate(layers):
        if below[i] or layer.type in conv:
            continue
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE, trt.LayerType.SHUFFLE):
            continue  # shape plumbing and constants carry no arithmetic worth pinning
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        n += 1
    return n


def _timing_cache(config, path: Path):
    data = b""
    if path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as exc:  # a corrupt or foreign cache file: start a fresh one
        log.warning("%s: timing cache unusable (%s); starting a new one", path, exc)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("%s: timing cache refused; building without it", path)
        return None
    return cache


def compile_bundle(bundle: Bundle, precision: str = "best", max_batch: int = DEFAULT_MAX_BATCH,
                   workspace_mib: int = DEFAULT_WORKSPACE_MIB, device: int = 0, typing: str = "auto",
                   force: bool = False, test_dir=None, limits=None, guard_normals: int = 32,
                   calib_dir=None, test_limit: int = 100, progress: bool = True) -> dict:
    """Build (or reuse) the engine, guard it against FP32, make its precision active. Returns the guard
    entry. ``best``: int8 when the bundle has a (guarded) INT8 graph, falling back to fp16 when the INT8
    engine cannot be built or fails its guard, and to fp32 when fp16 fails too; without an INT8 graph fp16,
    then fp32. A failed engine is removed, never left to be run."""
    from ..errors import GuardFailure
    from ..runtime.backends.tensorrt import TensorRTBackend
    from . import guard as guard_mod

    import_tensorrt()  # say what to install before anything else
    if precision == "best":
        order = (["int8"] if bundle.has("model.int8.onnx") else []) + ["fp16", "fp32"]
        refused = bundle.graph_refusal("model.int8.onnx")
        if refused is not None:
            _say(progress, f"no INT8 engine: {refused['why']}; building FP16")
    elif precision in ("fp32", "fp16", "int8"):
        order = [precision]
    else:
        raise InputError(f"precision '{precision}': expected fp16, int8, fp32 or best")
    _, held_out = guard_mod.training_images(bundle, calib_dir)
    gset = guard_mod.prepare_guard_set(bundle, held_out, test_dir=test_dir, test_limit=test_limit,
                                       n_normal=guard_normals)
    last_failure = None
    for prec in order:
        try:
            res = build_engine(bundle, prec, max_batch, workspace_mib, device, typing, force=force,
                               progress=progress)
        except (RuntimeFailure, InputError) as exc:
            if prec == order[-1]:
                if last_failure is not None:   # the one before built but failed its guard: the error says both
                    kind = RuntimeFailure if isinstance(exc, RuntimeFailure) else InputError
                    raise kind(f"{exc} (before it, the {last_failure['candidate']} engine failed its guard: "
                               f"{guard_mod.summary(last_failure)})") from exc
                raise
            _say(progress, f"{prec} engine could not be built ({exc}); trying {order[order.index(prec) + 1]}")
            continue
        try:
            backend = TensorRTBackend(bundle, precision=prec, device=f"cuda:{device}", engine_path=res.check.engine)
            try:
                name = f"tensorrt-{prec}-{res.check.key.split('-', 2)[2]}"
                entry = guard_mod.evaluate(bundle, backend, gset, None, limits, name=name)
            finally:
                backend.close()
        except BaseException:   # the new engine is not switched in; the one in use stays
            if res.built:
                engine_cache.discard_pending(bundle, res.check.key)
            raise
        entry.update(engine=f"{res.check.key}.engine", built=res.built, refused=res.refused,
                     build_seconds=res.seconds, source_graph=res.source_graph, typing=res.typing)
        if not entry["passed"] and res.kept is not None:
            entry["kept"] = res.kept.engine.name
        if record_engine(bundle, res.check.key, entry, prec, pending=res.built):
            _say(progress, guard_mod.summary(entry))
            return entry
        _say(progress, guard_mod.summary(entry))
        last_failure = entry
        _say(progress, f"{prec} engine failed the guard and was removed"
                       + (f"; {kept_note(res.kept)}" if res.kept is not None else ""))
    guard_mod.raise_on_failure([last_failure])
    raise GuardFailure("no engine passed the guard")


def record_engine(bundle: Bundle, key: str, entry: dict, precision: str, pending: bool = False) -> bool:
    """Switch the engine ``key`` (written with its sidecar by :func:`build_engine`; ``pending``: beside the
    engine in use, as a new build writes it) in when its guard ``entry`` passed, else out, and record
    ``entry`` in ``quant_report.json``; returns whether it passed.

    The engine first, then the records that name it, so that a power cut at any point leaves a bundle
    that opens and no record of an engine that is not in force:

    - passed: the sidecar records the guard (from then on the runtime may run the engine: it runs only
      engines whose sidecar says they passed); a pending engine is then switched in over the one in use
      (:func:`engine_cache.swap_in`: a cut leaves the old engine or the new one usable, never none); then the
      report and the active precision change as one (:func:`guard.write_report`: :meth:`Bundle.replace_files`,
      as ``edge-ad quantize`` switches its graphs in). The report was written first, on its own and then
      recorded: a cut between the two left a ``quant_report.json`` whose sha256 the manifest refused (a bundle
      that no longer opened), a cut before the sidecar a report saying "passed" of an engine the runtime refuses;
    - failed: the engine goes (a pending one alone, the engine in use staying: ``entry["kept"]`` names it; else
      sidecar first, :func:`engine_cache.remove`), then the report says why.
    """
    from . import guard as guard_mod

    if entry["passed"]:
        engine_cache.update_sidecar(bundle, key, pending=pending, guard={
            "passed": True, "checked": entry["checked"], "rank_corr": entry["rank_corr"],
            "auroc": entry["auroc"]})
        if pending:
            engine_cache.swap_in(bundle, key)
        graph = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[precision]
        # an fp16 engine built from model.onnx leaves the ONNX side as it is
        guard_mod.write_report(bundle, [entry], meta={"active": {"graph": graph, "precision": precision}}
                               if bundle.has(graph) else None)
        return True
    if pending:
        engine_cache.discard_pending(bundle, key)
    else:
        engine_cache.remove(bundle, key)
    guard_mod.write_report(bundle, [entry])
    return False


def _say(progress: bool, msg: str) -> None:
    if progress:
        import click

        click.echo(msg, err=True)
    log.info(msg)
