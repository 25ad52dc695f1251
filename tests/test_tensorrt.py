"""TensorRT: the engine cache's refusal rules (pure Python, run everywhere) and, where ``tensorrt``
imports and a GPU answers, a real engine build, guard and parity run (skipped with the reason elsewhere).

The cache tests write placeholder bytes as "engines": they check keys, sidecars and refusals, which
never deserialize anything. Nothing here pretends to be TensorRT.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edge_ad.bundle import Bundle
from edge_ad.runtime.backends import engine_cache, tensorrt_usable
from edge_ad.runtime.backends.engine_cache import Target

ORIN = Target("8.7", "10.3.0", "Orin")
SHA = "ab" * 32


def _bundle(tmp_path) -> Bundle:
    b = Bundle.create(tmp_path / "b", {"kind": "efficientad-s", "image_size": [64, 64],
                                       "outputs": ["map_st", "map_ae"]})
    b.add_file("model.onnx", data=b"fp32 graph bytes")
    b.add_file("model.int8.onnx", data=b"int8 graph bytes")
    return b


def _put(b, precision="int8", target=ORIN, source="model.int8.onnx", guard=True) -> str:
    key = engine_cache.engine_key(engine_cache.model_sha(b), precision, target)
    side = engine_cache.make_sidecar(b, precision, target, "", source, 8, "weak", 1024, 12.0)
    if guard:
        side["guard"] = {"passed": True}
    engine_cache.write(b, key, b"serialized engine " + precision.encode(), side)
    return key


def test_engine_key_names_model_precision_gpu_and_tensorrt():
    key = engine_cache.engine_key(SHA, "fp16", ORIN)
    assert key == "abababababababab-fp16-sm87-trt10.3.0"
    assert engine_cache.parse_key(key) == {"model_sha16": "abababababababab", "precision": "fp16",
                                           "sm": "sm87", "trt_version": "10.3.0"}
    assert engine_cache.parse_key("whatever") is None
    with pytest.raises(ValueError):
        engine_cache.engine_key("not-hex", "fp16", ORIN)


def test_valid_engine_is_accepted_with_its_sidecar(tmp_path):
    b = _bundle(tmp_path)
    key = _put(b)
    c = engine_cache.check(b, "int8", ORIN, require_guard=True)
    assert c.ok and c.reason == "" and c.key == key and c.engine.name == f"{key}.engine"
    side = json.loads(c.sidecar.read_text())
    assert side["compute_capability"] == "8.7" and side["tensorrt"] == "10.3.0"
    assert side["source_graph"] == "model.int8.onnx" and side["source_sha256"] == b.graph_hash("model.int8.onnx")
    assert side["engine_sha256"] and side["image_size"] == [64, 64]


@pytest.mark.parametrize("change,reason", [
    ("other_gpu", "-int8-sm87-trt10.3.0.engine was built for another GPU (sm87, TensorRT 10.3.0; this device is "
                  "sm72, TensorRT 10.3.0)"),   # a bundle copied from another device
    ("other_trt", "the int8 engine built by TensorRT 10.3.0 is stale (this device has 10.7.0)"),   # JetPack upgrade
    ("model_changed", "no int8 engine for this model"),
    ("requantized", "source graph model.int8.onnx changed"),
    ("corrupt", "does not match its sidecar"),
    ("truncated", "does not match its sidecar"),
    ("no_sidecar", "sidecar missing"),
    ("bad_sidecar", "unreadable sidecar"),
    ("foreign_sidecar", "built for another GPU architecture"),
    ("unguarded", "never passed the accuracy guard"),
    ("guard_not_object", "guard is list, expected an object"),
])
def test_stale_foreign_or_corrupt_engines_are_refused(tmp_path, change, reason):
    b = _bundle(tmp_path)
    key = _put(b, guard=change != "unguarded")
    eng, side = engine_cache.paths(b, key)
    target = ORIN
    if change == "other_gpu":
        target = Target("7.2", "10.3.0", "Xavier")
    elif change == "other_trt":
        target = Target("8.7", "10.7.0", "Orin")
    elif change == "model_changed":
        b.add_file("model.onnx", data=b"re-exported graph")
    elif change == "requantized":
        b.add_file("model.int8.onnx", data=b"new int8 graph")
    elif change == "corrupt":
        data = bytearray(eng.read_bytes())
        data[3] ^= 0x01
        eng.write_bytes(bytes(data))
    elif change == "truncated":
        eng.write_bytes(eng.read_bytes()[:5])
    elif change == "no_sidecar":
        side.unlink()
    elif change == "bad_sidecar":
        side.write_text("{not json")
    elif change == "foreign_sidecar":  # a file copied under this machine's key from another device
        meta = json.loads(side.read_text())
        meta["compute_capability"] = "8.6"
        side.write_text(json.dumps(meta))
    elif change == "guard_not_object":  # hand-edited; used to raise AttributeError in check() and best()
        meta = json.loads(side.read_text())
        meta["guard"] = ["passed"]
        side.write_text(json.dumps(meta))
        assert engine_cache.best(b, target) is None
    c = engine_cache.check(b, "int8", target, require_guard=True)
    assert not c.ok
    assert reason in c.reason


AGX_64 = Target("8.7", "10.3.0", "Orin", 16, 62_841)        # Jetson AGX Orin 64GB: the CUDA name is "Orin" on
NX_16 = Target("8.7", "10.3.0", "Orin", 8, 15_388)           # every Orin module; the SMs and the memory differ
NX_8 = Target("8.7", "10.3.0", "Orin", 8, 7_620)


@pytest.mark.parametrize("built_on,runs_on,reason", [
    (AGX_64, NX_8, "built on another GPU model (16 SMs, this device has 8)"),
    (NX_16, NX_8, "built on another GPU model (15,388 MiB of memory, this device has 7,620 MiB)"),
    (Target("8.6", "10.3.0", "NVIDIA GeForce RTX 3080", 68, 10_240), Target("8.6", "10.3.0", "NVIDIA RTX A4000", 48, 16_376),
     "built on another GPU model (gpu_name 'NVIDIA GeForce RTX 3080', this device has 'NVIDIA RTX A4000')"),
    (NX_8, Target("8.7", "10.3.0", "Orin", 8, 7_400), None),     # the memory a kernel update leaves: the same module
    (Target("8.7", "10.3.0", "Orin"), NX_8, None),                # a sidecar of an earlier edge-ad: name only
])
def test_an_engine_built_on_another_gpu_model_is_refused(tmp_path, built_on, runs_on, reason):
    """Same architecture and TensorRT (the same key), another GPU model: the sidecar recorded the GPU name but
    it was never compared, so an engine copied from an AGX Orin ran on an Orin NX. NVIDIA's engines are
    specific to the GPU model they were built on."""
    b = _bundle(tmp_path)
    _put(b, "int8", target=built_on)
    c = engine_cache.check(b, "int8", runs_on, require_guard=True)
    if reason is None:
        assert c.ok, c.reason
    else:
        assert not c.ok and reason in c.reason, c.reason
        assert engine_cache.best(b, runs_on) is None


def test_the_gpu_model_is_read_from_cuda(monkeypatch):
    """current_target takes the GPU's name, SM count and memory from cuda-python's cudaGetDeviceProperties
    (a stand-in module here: only our parsing of what it returns is tested)."""
    from edge_ad.runtime.backends.cuda import CudaPython
    from edge_ad.runtime.backends.tensorrt import current_target

    class Prop:
        name = b"Orin\0\0\0"
        multiProcessorCount = 8
        totalGlobalMem = (7_620 << 20) + 4_096

    class RT:
        class cudaDeviceAttr:
            cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor = "major", "minor"

        cudaGetDeviceCount = staticmethod(lambda: (0, 1))
        cudaGetDeviceProperties = staticmethod(lambda i: (0, Prop()))
        cudaDeviceGetAttribute = staticmethod(lambda attr, i: (0, 8 if attr == "major" else 7))

    api = CudaPython.__new__(CudaPython)
    api.rt = RT
    assert current_target(_FakeTRT, api, 0) == Target("8.7", "10.3.0", "Orin", 8, 7_620)


def test_best_prefers_the_active_precision_then_int8(tmp_path):
    b = _bundle(tmp_path)
    assert engine_cache.best(b, ORIN) is None
    _put(b, "fp16", source="model.onnx")
    assert engine_cache.best(b, ORIN).meta["precision"] == "fp16"
    _put(b, "int8")
    assert engine_cache.best(b, ORIN).meta["precision"] == "int8"
    assert engine_cache.best(b, ORIN, prefer="fp16").meta["precision"] == "fp16"
    _put(b, "fp32", source="model.onnx", guard=False)   # unguarded: never picked
    assert engine_cache.best(b, ORIN, prefer="fp32").meta["precision"] == "int8"


def test_scan_reports_engines_of_other_devices_and_remove(tmp_path):
    b = _bundle(tmp_path)
    mine = _put(b, "int8")
    theirs = _put(b, "int8", target=Target("7.2", "8.6.2", "Xavier"))
    (b.engines_dir / "junk.engine").write_bytes(b"x")
    found = {c.key: c for c in engine_cache.scan(b, ORIN)}
    assert found[mine].ok
    assert not found[theirs].ok and "sm72 / TensorRT 8.6.2" in found[theirs].reason
    assert not found["junk"].ok and "not an edge-ad engine key" in found["junk"].reason
    engine_cache.remove(b, theirs)
    assert not any(p.name.startswith(theirs) for p in b.engines_dir.iterdir())
    assert engine_cache.timing_cache_path(b, ORIN).name == "timing-sm87-trt10.3.0.cache"


def test_the_engines_of_other_models_are_named_by_their_key_sorted(tmp_path):
    """An absent engine's reason (check) and no_engine's each listed the engines "present for other models" with a
    glob of their own: every name with "-<precision>-" in directory order, or every name ending in .engine, so files
    that are no edge-ad engine (junk.engine, one renamed by hand) were named as engines of another model. One helper
    lists them now, by name: the files whose key names another model, of the precision asked when there is one."""
    b = _bundle(tmp_path)
    assert engine_cache.no_engine(b, ORIN) == ("no engine of this model in the bundle's engines/", "best")
    old = [_put(b, "int8"), _put(b, "fp16")]                   # the engines of two models re-exported since
    b.add_file("model.onnx", data=b"re-exported graph")
    old.append(_put(b, "int8"))
    b.add_file("model.onnx", data=b"re-exported again")
    for junk in ("junk.engine", "zz-int8-renamed.engine"):
        (b.engines_dir / junk).write_bytes(b"x")
    int8 = sorted(f"{k}.engine" for k in old if "-int8-" in k)
    assert engine_cache.check(b, "int8", ORIN).reason == (
        f"no int8 engine for this model on sm87 with TensorRT 10.3.0 (engines present for other models: "
        f"{', '.join(int8)})")
    assert engine_cache.check(b, "fp32", ORIN).reason == "no fp32 engine for this model on sm87 with TensorRT 10.3.0"
    assert engine_cache.no_engine(b, ORIN) == (
        f"no engine of this model in the bundle's engines/ (engines present for other models: "
        f"{', '.join(sorted(f'{k}.engine' for k in old))})", "best")


@pytest.mark.parametrize("passed", [True, False])
def test_a_cut_while_an_engine_is_switched_in_never_leaves_a_record_of_an_engine_not_there(tmp_path, monkeypatch,
                                                                                         passed):
    """compile_bundle's last step (record_engine) with a placeholder engine as build_engine leaves it (engine
    and sidecar, no guard yet); a power cut at each rename or delete in turn: the bundle still opens and
    verifies (the report was written before the manifest that records it: a cut between them left a
    quant_report.json whose sha256 the manifest refused), an engine the report says passed is in place and
    guarded, the active precision never switches ahead of that record, and a failed engine is never left
    runnable."""
    import os

    from edge_ad.compile import guard as guard_mod
    from edge_ad.compile.tensorrt import record_engine
    from fixtures_bundle import power_cut

    seen_done = False
    for cut_at in range(1, 40):
        b = _bundle(tmp_path / f"c{cut_at}")
        guard_mod.write_report(b, [{"candidate": "onnxruntime-int8", "passed": True}])   # quantize's
        key = _put(b, "int8", guard=False)
        entry = {"candidate": f"tensorrt-int8-{key.split('-', 2)[2]}", "passed": passed, "checked": 12,
                 "rank_corr": 0.999, "auroc": 1.0, "engine": f"{key}.engine"}
        with power_cut(monkeypatch, cut_at, os.replace, os.unlink) as cut:
            assert record_engine(b, key, dict(entry), "int8") is passed
        done = not cut.hit
        on_disk = Bundle.open(b.path, verify=True)
        report = json.loads(on_disk.file("quant_report.json").read_text())["candidates"]
        assert "onnxruntime-int8" in report
        usable = engine_cache.check(on_disk, "int8", ORIN, require_guard=True).ok
        rec = report.get(entry["candidate"])
        if passed:
            if rec is not None:                       # the record names an engine that is there, guarded
                assert rec["passed"] and usable and (on_disk.engines_dir / rec["engine"]).is_file()
            assert on_disk.active_precision != "int8" or rec is not None   # never switched ahead of its record
        else:
            assert not usable and on_disk.active_precision != "int8"
            if rec is not None:
                assert not rec["passed"]
        if done:
            assert rec is not None and usable == passed and not list(b.path.glob(".new-*"))
            assert (on_disk.engines_dir / entry["engine"]).is_file() == passed
            seen_done = True
            break
    assert seen_done


# ------------------------------------------------------------ a rebuild never leaves the line without an engine
class _FakeTRT:
    """Stands in for the ``tensorrt`` module in build_engine's control flow: only its version is read there;
    TensorRT's own part (:func:`edge_ad.compile.tensorrt._serialize`) is replaced by each test. Not TensorRT."""

    __version__ = ORIN.trt_version


class _FakeCuda:
    @contextlib.contextmanager
    def activate(self, index):
        yield

    def close(self):
        pass


def _compile_here(monkeypatch, serialize, guard_passes=True, cuda=None):
    """compile_bundle / build_engine with TensorRT, the GPU, the guard set and the guarded backend replaced:
    ``serialize`` stands in for the TensorRT build (return engine bytes or raise); the guard passes or fails
    as told (``guard_passes``: a bool, or the precisions that pass); ``cuda``: the CUDA binding (default: one
    that does nothing). Returns the guard calls (the engine file each one ran)."""
    from edge_ad.compile import guard as guard_mod
    from edge_ad.compile import tensorrt as trt_compile
    from edge_ad.runtime.backends import cuda as cuda_mod
    from edge_ad.runtime.backends import tensorrt as trt_backend

    guarded = []

    class Backend:
        def __init__(self, bundle, precision=None, device=None, engine_path=None):
            self.engine_path = engine_path

        def close(self):
            pass

    def evaluate(bundle, backend, gset, ref, limits, name=None):
        guarded.append(backend.engine_path)
        passes = guard_passes if isinstance(guard_passes, bool) else name.split("-")[1] in guard_passes
        return {"candidate": name, "passed": passes, "checked": 8, "rank_corr": 0.999 if passes else 0.5,
                "auroc": {"synthetic": {"fp32": 1.0, "candidate": 1.0 if passes else 0.6}}, "agreement": 1.0,
                "max_map_error_rel": 0.1, "failures": [] if passes else ["rank corr 0.5 < 0.99"]}

    monkeypatch.setattr(trt_compile, "import_tensorrt", lambda: _FakeTRT)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: _FakeTRT)
    monkeypatch.setattr(cuda_mod, "cuda_api", lambda: cuda or _FakeCuda())
    monkeypatch.setattr(trt_compile, "current_target", lambda trt, cuda, index=0: ORIN)
    monkeypatch.setattr(trt_compile, "_serialize", lambda *a, **k: serialize())
    monkeypatch.setattr(trt_backend, "TensorRTBackend", Backend)
    monkeypatch.setattr(guard_mod, "training_images", lambda bundle, calib_dir=None: ([], []))
    monkeypatch.setattr(guard_mod, "prepare_guard_set", lambda *a, **k: None)
    monkeypatch.setattr(guard_mod, "evaluate", evaluate)
    return guarded


def _in_use(b, precision="fp16"):
    """The engine run would open for ``precision`` (its bytes), or None."""
    c = engine_cache.check(b, precision, ORIN, require_guard=True)
    return c.engine.read_bytes() if c.ok else None


@pytest.mark.parametrize("failure", ["build", "guard", "guard crashed"])
def test_a_failed_rebuild_keeps_the_guarded_engine_in_use(tmp_path, monkeypatch, failure):
    """compile --force (or other --max-batch / --workspace) used to delete the guarded engine before building
    the new one: a build that failed (parser error, out of memory) or failed its guard left no engine, and
    run could not start. The new engine is now built beside it and switched in only once guarded."""
    from edge_ad.compile.tensorrt import compile_bundle
    from edge_ad.errors import GuardFailure, RuntimeFailure

    b = _bundle(tmp_path)
    key = _put(b, "fp16", source="model.onnx")
    old = _in_use(b)

    def serialize():
        if failure == "build":
            raise RuntimeFailure("TensorRT could not build the fp16 engine from model.onnx: out of memory")
        return b"new fp16 engine"

    guarded = _compile_here(monkeypatch, serialize, guard_passes=failure != "guard")
    if failure == "guard crashed":
        from edge_ad.compile import guard as guard_mod

        monkeypatch.setattr(guard_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeFailure("CUDA error")))
    expect = {"build": RuntimeFailure, "guard": GuardFailure, "guard crashed": RuntimeFailure}[failure]
    with pytest.raises(expect) as err:
        compile_bundle(b, "fp16", force=True, progress=False)
    if failure != "guard crashed":
        assert f"the engine in use, {key}.engine" in str(err.value) and "is kept and still runs" in str(err.value)
    assert _in_use(b) == old                                  # still there, still guarded, still the old one
    assert sorted(p.name for p in b.engines_dir.iterdir()) == [f"{key}.engine", f"{key}.json"]  # no .new left
    if failure == "guard":
        assert guarded == [engine_cache.paths(b, key, pending=True)[0]]   # the guard ran the new engine, not the old
        entry = json.loads(b.file("quant_report.json").read_text())["candidates"]["tensorrt-fp16-sm87-trt10.3.0"]
        assert not entry["passed"] and entry["kept"] == f"{key}.engine"


def test_a_rebuild_that_passes_its_guard_replaces_the_engine(tmp_path, monkeypatch):
    from edge_ad.compile.tensorrt import compile_bundle

    b = _bundle(tmp_path)
    key = _put(b, "fp16", source="model.onnx")
    (b.engines_dir / f"{key}.engine.new").write_bytes(b"left by a power cut during an earlier build")
    guarded = _compile_here(monkeypatch, lambda: b"new fp16 engine")
    entry = compile_bundle(b, "fp16", max_batch=4, progress=False)   # other options than the cached engine's
    assert entry["passed"] and entry["built"] and entry["engine"] == f"{key}.engine" and "kept" not in entry
    assert "built with other options (max_batch 8, asked 4)" in entry["refused"][0]
    assert guarded == [engine_cache.paths(b, key, pending=True)[0]]
    assert _in_use(b) == b"new fp16 engine"
    meta = engine_cache.check(b, "fp16", ORIN).meta
    assert meta["max_batch"] == 4 and meta["guard"]["passed"] and "replacing" not in meta
    assert sorted(p.name for p in b.engines_dir.iterdir()) == [f"{key}.engine", f"{key}.json"]


@pytest.mark.parametrize("passing,built", [({"int8", "fp16", "fp32"}, "int8"), ({"fp16", "fp32"}, "fp16"),
                                            ({"fp32"}, "fp32")])
def test_best_is_int8_else_fp16_else_fp32(tmp_path, monkeypatch, passing, built):
    """--precision best (and so an install on a TensorRT line with model.precision empty): the first of INT8,
    FP16, FP32 whose engine passes its guard; FP32 used not to be tried, leaving no engine at all."""
    from edge_ad.compile.tensorrt import compile_bundle

    b = _bundle(tmp_path)
    guarded = _compile_here(monkeypatch, lambda: b"engine bytes", guard_passes=passing)
    entry = compile_bundle(b, "best", progress=False)
    assert entry["passed"] and entry["candidate"].startswith(f"tensorrt-{built}-")
    assert [p.name.split("-")[1] for p in guarded] == ["int8", "fp16", "fp32"][:len(guarded)]
    assert _in_use(b, built) == b"engine bytes" and {p.suffix for p in b.engines_dir.iterdir()} == {".engine", ".json"}


def test_best_whose_fp32_cannot_be_built_says_the_fp16_guard_failure_too(tmp_path, monkeypatch):
    """--precision best: INT8 and FP16 built and failed their guards, then FP32 failed to build: the error named
    the FP32 build failure only, as if FP16 had not been tried; it now says the FP16 guard's verdict too."""
    from edge_ad.compile.tensorrt import compile_bundle
    from edge_ad.errors import RuntimeFailure

    b = _bundle(tmp_path)
    builds = []

    def serialize():
        builds.append(1)
        if len(builds) == 3:                                  # int8, fp16, then fp32
            raise RuntimeFailure("TensorRT could not build the engine: out of memory")
        return b"engine bytes"

    _compile_here(monkeypatch, serialize, guard_passes=set())
    with pytest.raises(RuntimeFailure, match=r"out of memory \(before it, the tensorrt-fp16-\S+ engine failed its "
                                             r"guard: tensorrt-fp16-\S+: FAIL  rank corr 0\.5000"):
        compile_bundle(b, "best", progress=False)
    assert len(builds) == 3


def test_a_cut_while_a_rebuilt_engine_is_switched_in_leaves_the_old_or_the_new_engine(tmp_path, monkeypatch):
    """A power cut at each rename or delete of the switch (record_engine with a pending engine): run always
    finds a guarded engine, the old one or the new one, never none and never one the sidecar does not
    describe; the next build (engine_cache.recover) finishes or drops what the cut left."""
    import os

    from edge_ad.compile.tensorrt import record_engine
    from fixtures_bundle import power_cut

    seen_done = False
    for cut_at in range(1, 40):
        b = _bundle(tmp_path / f"c{cut_at}")
        key = _put(b, "fp16", source="model.onnx")
        old = _in_use(b)
        side = engine_cache.make_sidecar(b, "fp16", ORIN, "", "model.onnx", 4, "weak", 1024, 3.0)
        engine_cache.write(b, key, b"new fp16 engine", side, pending=True)
        entry = {"candidate": "tensorrt-fp16-sm87-trt10.3.0", "passed": True, "checked": 8, "rank_corr": 0.999,
                 "auroc": 1.0, "engine": f"{key}.engine"}
        with power_cut(monkeypatch, cut_at, os.replace, os.unlink) as cut:
            assert record_engine(b, key, dict(entry), "fp16", pending=True)
        Bundle.open(b.path, verify=True)
        assert _in_use(b) in (old, b"new fp16 engine"), cut_at
        engine_cache.recover(b, key)
        assert _in_use(b) in (old, b"new fp16 engine"), cut_at
        assert sorted(p.name for p in b.engines_dir.iterdir()) == [f"{key}.engine", f"{key}.json"], cut_at
        assert "replacing" not in json.loads(engine_cache.paths(b, key)[1].read_text())
        if not cut.hit:
            assert _in_use(b) == b"new fp16 engine"
            seen_done = True
            break
    assert seen_done


def test_supported_tensorrt_releases():
    from edge_ad.runtime.backends.tensorrt import trt_supported

    assert [trt_supported(v) for v in ("8.5.2.2", "8.6.2.3", "10.3.0.30", "10.13.0", "11.0.0", "7.1.3", "x")] \
        == [False, True, True, True, True, False, False]        # 8.5 is JetPack 5's: refused by compile


def test_cuda_status_check_raises_with_the_error():
    from edge_ad.runtime.backends.cuda import CudaError, check

    assert check((0, 7)) == 7 and check(0) is None and check((0, 1, 2)) == (1, 2)
    with pytest.raises(CudaError, match=r"cudaMalloc\(64\) failed: .*2"):
        check((2,), "cudaMalloc(64)")


# ------------------------------------------------------------- the device is current on the inference thread
class _StandInCudaRuntime:
    """cuda-python's runtime module as far as the backend uses it, keeping cudaSetDevice per thread as CUDA
    does (a thread that never set it is on device 0); each copy records the device current on its thread.
    Not CUDA: it tests our calls, not the driver."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        import threading

        self.local, self.copies = threading.local(), []

    def cudaSetDevice(self, index):
        self.local.device = index
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import threading

        self.copies.append((threading.current_thread().name, getattr(self.local, "device", 0)))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


class _StandInPycuda:
    """pycuda.driver as far as the backend uses it: a context stack per thread, as CUDA and pycuda keep it;
    each copy records whether the device's primary context is current on its thread; ``retained`` counts the
    primary context's retains less its releases (detach: a second one is an error, as in pycuda). Not CUDA."""

    class Error(Exception):
        pass

    def __init__(self):
        import threading

        local, drv = threading.local(), self
        self.copies, self.left_pushed, self.retained = [], {}, 0

        def stack():
            if not hasattr(local, "stack"):
                local.stack = []
            return local.stack

        class Context:
            def push(self):
                stack().append(self)
                drv.left_pushed[threading.current_thread().name] = len(stack())

            @staticmethod
            def pop():
                stack().pop()
                drv.left_pushed[threading.current_thread().name] = len(stack())

            @staticmethod
            def get_current():
                return stack()[-1] if stack() else None

            def detach(self):
                if self.detached:
                    raise drv.Error("context::detach failed: invalid device context - cannot detach from invalid "
                                    "context")
                self.detached = True
                drv.retained -= 1

        def retain(_):
            drv.primary = Context()
            drv.primary.detached = False
            drv.retained += 1
            return drv.primary

        self.primary = None
        self.Context, self.stack = Context, stack
        self.Device = lambda index: type("Device", (), {"retain_primary_context": retain})()

    def memcpy_htod_async(self, dst, src, stream):
        import threading

        self.copies.append((threading.current_thread().name, self.Context.get_current() is self.primary))

    memcpy_dtoh_async = memcpy_htod_async


@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
def test_inference_makes_the_device_current_on_its_own_thread(binding):
    """The backend was opened on one thread and inferred on the runtime's edge-ad-inference thread, where the
    device was never made current: with cuda-python cudaSetDevice is per thread, so cuda:1 ran on device 0
    there; with pycuda the primary context was pushed only on the opening thread. Every inference now makes it
    current on its own thread first (pycuda: pushed for the call and popped after). The binding's CUDA module
    is a stand-in: this checks our calls, on the threads that make them, not CUDA (docs/compile.md)."""
    import threading

    from edge_ad.runtime.backends.cuda import CudaPython, PyCuda
    from edge_ad.runtime.backends.tensorrt import TensorRTBackend

    if binding == "cuda-python":
        api, fake = CudaPython.__new__(CudaPython), _StandInCudaRuntime()
        api.rt, stream, want = fake, 7, ("edge-ad-inference", 1)
    else:
        api, fake = PyCuda.__new__(PyCuda), _StandInPycuda()
        api.drv, api._ctx = fake, None
        stream = type("Stream", (), {"handle": 7, "synchronize": lambda self: None})()
        want = ("edge-ad-inference", True)

    class ExecutionContext:   # TensorRT's, as far as _run uses it
        def set_input_shape(self, name, shape):
            self.batch = shape[0]
            return True

        def execute_async_v3(self, handle):
            return True

        def get_tensor_shape(self, name):
            return (self.batch, 1, 8, 8)

    be = TensorRTBackend.__new__(TensorRTBackend)
    be.image_size, be.output_names, be.max_batch, be._bufs = (64, 64), ["map"], 4, []
    be._cuda, be._index, be._stream, be._context, be._logger = api, 1, stream, ExecutionContext(), None
    be._io = {"image": (np.zeros(4 * 3 * 64 * 64 * 4, np.uint8), 1000, np.dtype(np.float32)),
              "map": (np.zeros(4 * 64 * 4, np.uint8), 2000, np.dtype(np.float32))}
    done = []
    t = threading.Thread(target=lambda: done.append(be.infer(np.zeros((2, 3, 64, 64), np.float32))),
                         name="edge-ad-inference")
    t.start()
    t.join()
    assert done and done[0]["map"].shape == (2, 1, 8, 8)
    assert fake.copies == [want, want]   # image in, map out: both with the device current on that thread
    if binding == "pycuda":
        assert fake.left_pushed == {"edge-ad-inference": 0}   # popped again: pycuda aborts on a thread left so
    be._stream = None
    be.close()
    if binding == "pycuda":
        assert fake.retained == 0   # closed: the primary context is released (our call; pycuda: on the thread
        #                             that retained it, the opening one in the runtime)


@pytest.mark.parametrize("binding", ["cuda-python", "pycuda"])
def test_a_build_makes_the_device_current_on_its_thread_and_leaves_no_context_pushed(tmp_path, monkeypatch,
                                                                                      binding):
    """build_engine pushed pycuda's primary context on its thread (PyCuda.set_device) and never popped it: pycuda
    aborts a process whose thread ends with a context still pushed (a build off the main thread: update_model's
    on the MQTT command worker). The build now runs inside activate(device), as inference does: the device is
    current on the building thread during the build, and pycuda's stack is empty after. Stand-in binding modules,
    as above: our calls, not CUDA."""
    import threading

    from edge_ad.compile.tensorrt import compile_bundle
    from edge_ad.runtime.backends.cuda import CudaPython, PyCuda

    if binding == "cuda-python":
        api, fake = CudaPython.__new__(CudaPython), _StandInCudaRuntime()
        api.rt, want = fake, 1

        def current():
            return getattr(fake.local, "device", 0)
    else:
        api, fake = PyCuda.__new__(PyCuda), _StandInPycuda()
        api.drv, api._ctx, want = fake, None, True

        def current():
            return fake.Context.get_current() is fake.primary

    during = []

    def serialize():
        during.append(current())
        return b"engine bytes"

    b = _bundle(tmp_path)
    _compile_here(monkeypatch, serialize, cuda=api)
    done = []
    t = threading.Thread(target=lambda: done.append(compile_bundle(b, "fp16", device=1, progress=False)),
                         name="edge-ad-compile")
    t.start()
    t.join()
    assert done and done[0]["passed"] and during == [want]
    if binding == "pycuda":
        assert fake.left_pushed == {"edge-ad-compile": 0}   # popped again: pycuda aborts on a thread left so
        assert fake.retained == 0   # and the primary context the build retained is released after it


def test_pycuda_close_releases_the_primary_context_once():
    """PyCuda.close() dropped its reference to the primary context it retained and left the release to the context
    object's destructor, which never runs while anything else holds it (a buffer whose free failed, a stream). It
    now releases it (pycuda's detach), once: a second close, or one before anything retained it, does nothing (a
    second detach is an error in pycuda). The backend's close releases it too, and says when the release failed.
    pycuda is a stand-in here, as above."""
    from edge_ad.errors import RuntimeFailure
    from edge_ad.runtime.backends.cuda import PyCuda
    from edge_ad.runtime.backends.tensorrt import TensorRTBackend

    api, fake = PyCuda.__new__(PyCuda), _StandInPycuda()
    api.drv, api._ctx = fake, None
    api.close()                                  # nothing retained yet
    with api.activate(1):
        assert fake.retained == 1
    api.close()
    assert fake.retained == 0 and fake.primary.detached
    api.close()                                  # once: no second detach
    with api.activate(0):                        # opened again: retained again, released again
        pass
    api.close()
    assert fake.retained == 0

    be = TensorRTBackend.__new__(TensorRTBackend)
    be._cuda, be._index, be._bufs, be._stream = api, 0, [], None
    with api.activate(0):
        pass
    fake.primary.detached = True                 # the release fails: said, and the backend is closed all the same
    with pytest.raises(RuntimeFailure, match=r"cuDevicePrimaryCtxRelease failed: .*cannot detach"):
        be.close()
    assert be._cuda is None and api._ctx is None
    be.close()                                   # closed: nothing more to do


@pytest.mark.skipif(tensorrt_usable()[0], reason="tensorrt is installed here")
def test_compile_without_tensorrt_exits_2_saying_what_to_install(tmp_path):
    from edge_ad.cli import main

    b = _bundle(tmp_path)
    r = CliRunner().invoke(main, ["compile", "--bundle", str(b.path)])
    assert r.exit_code == 2
    assert "python3-libnvinfer" in r.output and "pip install tensorrt" in r.output


def test_compile_names_a_wrong_bundle_before_looking_for_tensorrt(tmp_path):
    from edge_ad.cli import main

    r = CliRunner().invoke(main, ["compile", "--bundle", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "missing: bundle folder not found" in r.output, r.output  # was "TensorRT ..."
    for opt, bad in (("--max-batch", "0"), ("--workspace", "8"), ("--device", "-1"), ("--min-agreement", "nan")):
        r = CliRunner().invoke(main, ["compile", "--bundle", str(tmp_path), opt, bad])
        assert r.exit_code == 2 and opt in r.output, r.output


@pytest.mark.skipif(tensorrt_usable()[0], reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_is_an_input_error(tmp_path):
    from edge_ad.errors import InputError
    from edge_ad.runtime.backends import open_backend

    with pytest.raises(InputError, match="TensorRT's Python package is not installed"):
        open_backend(_bundle(tmp_path), "tensorrt", "fp16")


# ------------------------------------------------------------------------- real TensorRT
_TRT_OK, _TRT_WHY = tensorrt_usable()


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    if not _TRT_OK:
        pytest.skip(_TRT_WHY)
    pytest.importorskip("torch")
    from test_backends import make_bundle

    b, m = make_bundle(tmp_path_factory.mktemp("trt") / "b")
    return b, m


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _TRT_OK, reason=_TRT_WHY)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_builds_guards_caches_and_matches(trt_bundle, tmp_path, precision):
    import torch

    from edge_ad.compile.guard import GuardLimits
    from edge_ad.compile.tensorrt import build_engine, compile_bundle
    from edge_ad.runtime.backends import open_backend

    src, module = trt_bundle
    shutil.copytree(src.path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    loose = GuardLimits(max_auroc_drop=1.0, min_rank_corr=-1.0) if precision == "fp16" else None
    entry = compile_bundle(b, precision, max_batch=4, guard_normals=4, limits=loose, progress=False)
    assert entry["built"] and entry["engine"].endswith(".engine")
    again = build_engine(b, precision, max_batch=4, progress=False)
    assert not again.built                       # a valid cached engine is reused
    assert engine_cache.timing_cache_path(b, _target()).is_file()   # persisted for the next build

    x = np.random.default_rng(0).uniform(0, 255, (6, 3, 64, 64)).astype(np.float32)  # > max_batch: split
    with torch.inference_mode():
        ref = [t.numpy() for t in module(torch.from_numpy(x))]
    with open_backend(b, "tensorrt", precision) as be:
        assert be.name == "tensorrt" and be.max_batch == 4 and be.precision == precision
        out = be.infer(x)
    tol = 1e-3 if precision == "fp32" else 5e-2
    for name, r in zip(module.output_names, ref):
        assert np.max(np.abs(out[name] - r)) / np.max(np.abs(r)) <= tol

    # corrupt the engine: refused with the reason, then rebuilt by compile
    eng = again.check.engine
    eng.write_bytes(eng.read_bytes()[:-100])
    from edge_ad.errors import InputError
    with pytest.raises(InputError, match="does not match its sidecar"):
        open_backend(b, "tensorrt", precision)
    rebuilt = compile_bundle(b, precision, max_batch=4, guard_normals=4, limits=loose, progress=False)
    assert rebuilt["built"] and rebuilt["refused"] and "does not match" in rebuilt["refused"][0]
    # other build options: the cached engine is not silently reused (build_engine alone leaves the new
    # engine beside the one in use; compile_bundle switches it in once guarded)
    other = compile_bundle(b, precision, max_batch=8, guard_normals=4, limits=loose, progress=False)
    assert other["built"] and "built with other options (max_batch 4, asked 8)" in other["refused"][0]
    assert not list(b.engines_dir.glob("*.new"))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _TRT_OK, reason=_TRT_WHY)
def test_real_install_on_a_tensorrt_line_builds_and_guards_the_new_release_engine(trt_bundle, tmp_path):
    """An archive carries no engine: 'bundle install' on a backend tensorrt line builds and guards it in the
    release (here from the bundle's recorded training data), then opens the release as the line does."""
    from edge_ad.calibration import install_bundle, pack_bundle
    from edge_ad.calibration.deploy import open_probe
    from edge_ad.runtime.backends import open_backend

    src, _ = trt_bundle
    arch = pack_bundle(src.path, tmp_path / "b.tar")
    res = install_bundle(arch, tmp_path / "deploy", require_golden=False, backend="tensorrt", device="cuda:0",
                         probe=open_probe("tensorrt", None, "cuda:0"), progress=False)
    release = Bundle.open(res.path, verify=True)
    assert list(release.engines_dir.glob("*.engine"))
    assert engine_cache.check(release, release.active_precision, _target(), require_guard=True).ok
    with open_backend(release, "tensorrt", None, "cuda:0") as be:
        assert be.name == "tensorrt"


def _target():
    from edge_ad.runtime.backends.cuda import cuda_api
    from edge_ad.runtime.backends.tensorrt import current_target, import_tensorrt

    return current_target(import_tensorrt(), cuda_api(), 0)

