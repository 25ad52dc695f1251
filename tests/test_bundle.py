import json

import pytest

from edge_ad.bundle import Bundle
from edge_ad.errors import InputError
from edge_ad.scoring import Calibration, MapNorm

from fixtures_bundle import copy_bundle, gaussian_bundle, power_cut, tiny_bundle  # noqa: F401


def _cal(thr):
    return Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=thr)


def test_create_add_verify(tmp_path):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.add_file("model.onnx", data=b"graph")
    Bundle.open(tmp_path / "b", verify=True)
    (tmp_path / "b" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(InputError, match="model.onnx.*does not match"):
        Bundle.open(tmp_path / "b", verify=True)


def test_open_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="manifest.json"):
        Bundle.open(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text("{broken")
    with pytest.raises(InputError, match="unreadable manifest"):
        Bundle.open(tmp_path / "x")
    with pytest.raises(InputError, match="model kind"):
        Bundle.create(tmp_path / "y", {"kind": "resnet", "image_size": [1, 1], "outputs": []})


def test_calibration_versions_and_bytewise_rollback(tmp_path):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    v1 = b.write_calibration(_cal(0.1))
    first = (tmp_path / "b" / "calibration.json").read_bytes()
    v2 = b.write_calibration(_cal(0.2))
    assert (v1.version, v2.version) == (1, 2)
    assert b.calibration().threshold == 0.2
    assert b.calibration_versions() == [1, 2]
    back = b.rollback_calibration()
    assert back.version == 1 and back.threshold == 0.1
    assert (tmp_path / "b" / "calibration.json").read_bytes() == first
    Bundle.open(tmp_path / "b", verify=True)  # manifest hash follows the rollback
    with pytest.raises(InputError, match="oldest"):
        b.rollback_calibration()
    with pytest.raises(InputError, match="not found"):
        b.rollback_calibration(7)
    assert b.rollback_calibration(2).threshold == 0.2


def test_power_cut_between_history_and_switch_keeps_old_calibration(tmp_path, monkeypatch):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.write_calibration(_cal(0.1))

    def cut(_data):
        raise SystemExit("power cut")

    monkeypatch.setattr(b, "_put_calibration", cut)
    with pytest.raises(SystemExit):
        b.write_calibration(_cal(0.9))
    again = Bundle.open(tmp_path / "b", verify=True)
    assert again.calibration().threshold == 0.1
    assert json.loads((tmp_path / "b" / "calibration.d" / "0002.json").read_text())["threshold"] == 0.9
    assert not list((tmp_path / "b").glob(".*.tmp"))


def test_verify_checks_the_calibration_against_its_history(tmp_path):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.write_calibration(_cal(0.1))
    Bundle.open(tmp_path / "b", verify=True)
    p = tmp_path / "b" / "calibration.json"
    p.write_text(p.read_text().replace("0.1", "0.7"))
    with pytest.raises(InputError, match="differs from"):
        Bundle.open(tmp_path / "b", verify=True)


# ----------------------------------------------------------------------------- manifest fields
def _made(tmp_path):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.add_file("model.onnx", data=b"graph")
    b.write_calibration(_cal(0.1))
    return b


def _edit_manifest(b, edit):
    p = b.path / "manifest.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))


def _set(path, value):
    def edit(d):
        *parents, last = path.split(".")
        for k in parents:
            d = d[k]
        d[last] = value
    return edit


@pytest.mark.parametrize("field, value, message", [
    ("model.image_size", 64, "model.image_size: 64 is not of type 'array'"),
    ("model.image_size", "x", "model.image_size: 'x' is not of type 'array'"),
    ("model.image_size", [0, 0], "model.image_size.0: 0 is less than the minimum of 64"),
    ("model.image_size", [-64, 64], "model.image_size.0: -64 is less than the minimum of 64"),
    ("model.image_size", [100000, 100000], "model.image_size.0: 100000 is greater than the maximum of 4096"),
    ("model.image_size", [32, 32], "model.image_size.0: 32 is less than the minimum of 64"),
    ("model.image_size", [96, 100], "model.image_size.1: 100 is not a multiple of 32"),
    ("model.image_size", [64], "model.image_size: .* is too short"),
    ("model.image_size", [256, 320], "model.image_size: \\[256, 320\\] is not square \\(expected \\[N, N\\]"),
    ("model", [], "model: \\[\\] is not of type 'object'"),
    ("model.kind", "resnet", "model.kind: 'resnet' is not one of"),
    ("model.outputs", [], "model.outputs: \\[\\] should be non-empty"),
    ("model.outputs", "feat", "model.outputs: 'feat' is not of type 'array'"),
    ("model.map_pad", -5, "model.map_pad: -5 is less than the minimum of 0"),
    ("active", None, "active: None is not of type 'object'"),
    ("active.graph", 5, "active.graph: 5 is not of type 'string'"),
    ("files", None, "files: None is not of type 'object'"),
    ("files", [], "files: \\[\\] is not of type 'object'"),
    ("files.model.onnx", "abc", "files.model.onnx: 'abc' is not of type 'object'"),
    ("format_version", "x", "format_version: 'x' is not of type 'integer'"),
    ("data", {"bit_depth": 12}, "data.bit_depth: 12 is not valid .* \\(expected 8, 16 or 32 \\(float\\)"),
    ("data", {"channels": [0, 3]}, "data.channels: \\[0, 3\\] is not valid .* \\(expected 1 to 4"),
    ("data", {"low_bits": 16}, "data.low_bits: 16 is greater than the maximum of 14"),
])
def test_manifest_fields_of_the_wrong_type_or_value_are_refused_with_the_field_named(tmp_path, field, value,
                                                                                     message):
    b = _made(tmp_path)
    edit = _set(field, value) if not field.startswith("files.") else (
        lambda d: d["files"].__setitem__("model.onnx", value))
    _edit_manifest(b, edit)
    with pytest.raises(InputError, match=f"manifest.json: .*{message}"):
        Bundle.open(b.path)


@pytest.mark.parametrize("sha", [5, "abc", None])
def test_a_bad_sha256_entry_is_refused(tmp_path, sha):
    b = _made(tmp_path)
    _edit_manifest(b, lambda d: d["files"]["model.onnx"].__setitem__("sha256", sha))
    with pytest.raises(InputError, match="manifest.json: files.model.onnx.sha256: "):
        Bundle.open(b.path, verify=True)


def test_missing_fields_and_a_newer_format_are_named(tmp_path):
    b = _made(tmp_path)
    _edit_manifest(b, lambda d: d.pop("active"))
    with pytest.raises(InputError, match="manifest.json: manifest: 'active' is a required property"):
        Bundle.open(b.path)
    b = _made(tmp_path / "2")
    _edit_manifest(b, _set("format_version", 2))
    with pytest.raises(InputError, match="format_version 2 is newer"):
        Bundle.open(b.path)


def test_create_refuses_a_bad_model_description_before_making_the_folder(tmp_path):
    with pytest.raises(InputError, match="model.image_size.0: 32 is less than the minimum of 64"):
        Bundle.create(tmp_path / "c", {"kind": "fader", "image_size": [32, 32], "outputs": ["map"]})
    assert not (tmp_path / "c").exists()


def test_manifest_schema_lists_the_model_kinds_the_code_knows():
    from importlib import resources

    from edge_ad.bundle import MODEL_KINDS

    schema = json.loads((resources.files("edge_ad") / "schemas" / "manifest.schema.json").read_text())
    assert tuple(schema["properties"]["model"]["properties"]["kind"]["enum"]) == MODEL_KINDS


def test_bad_calibration_files_are_refused_naming_the_file_and_field(tmp_path):
    b = _made(tmp_path)
    for name in ("calibration.json", "calibration.d/0001.json"):
        p = b.path / name
        d = json.loads(p.read_text())
        d["maps"]["map"]["weight"] = float("nan")
        p.write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"calibration.json: maps.map.weight nan: expected a finite number"):
        b.calibration()
    with pytest.raises(InputError, match=r"0001.json: maps.map.weight nan"):
        b.calibration_at(1)
    (b.path / "calibration.d" / "0001.json").write_text("[]")
    with pytest.raises(InputError, match=r"0001.json: expected a calibration \(a JSON object\), got list"):
        b.rollback_calibration(1)


def test_versions_never_go_back_when_the_history_is_emptied(tmp_path):
    b = _made(tmp_path)
    b.write_calibration(_cal(0.2))
    for p in b.calibration_dir.iterdir():
        p.unlink()
    assert b.write_calibration(_cal(0.3)).version == 3
    assert b.calibration_versions() == [3] and b.calibration().version == 3


def test_an_explicit_rollback_repairs_an_unreadable_calibration_in_force(tmp_path):
    b = _made(tmp_path)
    (b.path / "calibration.json").write_text("{broken")
    with pytest.raises(InputError, match="calibration.json: unreadable calibration"):
        b.calibration()
    assert b.rollback_calibration(1).version == 1
    Bundle.open(b.path, verify=True)


@pytest.mark.parametrize("field, name", [
    ("files", "../outside.bin"), ("files", "/etc/passwd"), ("files", "a/../../b"), ("files", ".hidden"),
    ("active.graph", "../model.onnx"), ("active.graph", "/tmp/model.onnx"), ("active.graph", ""),
])
def test_manifest_file_names_outside_the_bundle_are_refused(tmp_path, field, name):
    b = _made(tmp_path)
    if field == "files":
        edit = lambda d: d["files"].__setitem__(name, dict(d["files"]["model.onnx"]))  # noqa: E731
    else:
        edit = _set(field, name)
    _edit_manifest(b, edit)
    with pytest.raises(InputError, match=f"manifest.json: {field}: .* does not match .*relative path inside"):
        Bundle.open(b.path)


def test_a_member_named_by_a_calibration_stays_inside_the_bundle(tmp_path):
    b = _made(tmp_path)
    assert b.file("gaussian.d/0001-2.npz") == b.path / "gaussian.d" / "0001-2.npz"
    for bad in ("../stats.npz", "/etc/passwd", "a//b", "gaussian.d/../../x", None, 5):
        with pytest.raises(InputError, match="expected a relative path inside the bundle"):
            b.file(bad)
    with pytest.raises(InputError, match="'../x'"):
        b.add_file("../x", data=b"never written")
    assert not (tmp_path / "x").exists()


def test_files_written_keep_ordinary_permissions(tmp_path):
    """Atomic writes go through a 0600 temp file; the result must still be readable by the service's user
    (a bundle trained or recalibrated through sudo), keep the mode of the file it replaces, and a secret
    asks for 0600 itself."""
    import os

    from edge_ad import atomic

    old = os.umask(0o022)
    try:
        b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
        b.add_file("model.onnx", data=b"graph")
        b.write_calibration(Calibration(maps={"feat": MapNorm(0.0, 1.0, 1.0)}, threshold=0.5))
        for name in ("manifest.json", "model.onnx", "calibration.json", "calibration.d/0001.json"):
            assert (b.path / name).stat().st_mode & 0o777 == 0o644, name
        os.chmod(b.path / "calibration.json", 0o640)
        b.write_calibration(Calibration(maps={"feat": MapNorm(0.0, 1.0, 1.0)}, threshold=0.6))
        assert (b.path / "calibration.json").stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        atomic.write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
        os.umask(0o022)
        atomic.write_bytes(tmp_path / "key.pem", b"secret", mode=0o600)
        assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
        assert not [p for p in tmp_path.rglob(".*.tmp")]
    finally:
        os.umask(old)


def _graphs_bundle(path):
    b = Bundle.create(path, {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.add_file("model.onnx", data=b"fp32")
    b.add_file("model.int8.onnx", data=b"old s8")
    b.add_file("model.int8-u8.onnx", data=b"old u8")
    b.add_file("quant_report.json", data=b"{}")
    b.set_active("model.int8.onnx", "int8")
    return b


@pytest.mark.parametrize("remove", [(), ("quant_report.json",)])
def test_replace_files_keeps_manifest_and_files_agreeing_at_every_step(tmp_path, monkeypatch, remove):
    """A power cut at any rename or delete of Bundle.replace_files (each one tried in turn) leaves a bundle
    that verifies and whose active graph is there: the old one, the FP32 one, or the new one."""
    import os

    seen = set()
    for cut_at in range(1, 50):
        b = _graphs_bundle(tmp_path / f"b{cut_at}")
        with power_cut(monkeypatch, cut_at, os.replace, os.unlink) as cut:
            b.replace_files({"model.int8.onnx": b"new s8", "model.int8-u8.onnx": b"new u8"}, remove=remove,
                            meta={"active": {"graph": "model.int8.onnx", "precision": "int8"}, "note": "new"})
        done = not cut.hit
        on_disk = Bundle.open(b.path, verify=True)
        assert on_disk.manifest == b.manifest       # the object follows what is on disk
        graph = on_disk.graph_for().read_bytes()
        state = {b"old s8": "old", b"fp32": "fp32", b"new s8": "new"}[graph]
        seen.add(state)
        if state == "new":
            assert on_disk.manifest["note"] == "new" and on_disk.file("model.int8-u8.onnx").read_bytes() == b"new u8"
            assert on_disk.has("quant_report.json") == (not remove)
        if state == "old":
            assert on_disk.file("model.int8-u8.onnx").read_bytes() == b"old u8"
        if done:
            assert state == "new" and not list(b.path.glob(".new-*"))
            break
    assert seen == {"old", "fp32", "new"}


def test_replace_files_of_model_onnx_leaves_a_bundle_that_runs_at_every_step(tmp_path, monkeypatch):
    """A re-export replaces model.onnx itself: a power cut at any write, rename or delete leaves a bundle
    whose model.onnx (old or new, whole) is recorded, verifies and runs; it did not: the interim manifest
    no longer recorded model.onnx, so the bundle refused to run until torch re-exported it."""
    import hashlib
    import os

    from edge_ad import atomic

    seen = set()
    for cut_at in range(1, 50):
        b = _graphs_bundle(tmp_path / f"b{cut_at}")
        with power_cut(monkeypatch, cut_at, os.replace, os.unlink, atomic.write_bytes) as cut:
            b.replace_files({"model.onnx": b"new fp32"}, remove=["model.int8.onnx", "model.int8-u8.onnx"],
                            meta={"active": {"graph": "model.onnx", "precision": "fp32"}})
        done = not cut.hit
        on_disk = Bundle.open(b.path, verify=True)
        graph = on_disk.check_graph()          # what 'edge-ad run' asks
        seen.add(graph.read_bytes())
        assert on_disk.model_hash() == hashlib.sha256(graph.read_bytes()).hexdigest()
        if done:
            assert "replacing" not in on_disk.manifest and not list(b.path.glob(".new-*"))
            break
    assert seen == {b"old s8", b"fp32", b"new fp32"}


def test_replace_files_failing_to_write_changes_nothing(tmp_path, monkeypatch):
    from fixtures_bundle import disk_full_for

    b = _graphs_bundle(tmp_path / "b")
    before = (b.path / "manifest.json").read_text()
    disk_full_for(monkeypatch, "model.int8-u8.onnx")
    with pytest.raises(OSError, match="No space left"):
        b.replace_files({"model.int8.onnx": b"new s8", "model.int8-u8.onnx": b"new u8"}, remove=["quant_report.json"])
    assert (b.path / "manifest.json").read_text() == before
    again = Bundle.open(b.path, verify=True)
    assert again.manifest == b.manifest and again.graph_for().read_bytes() == b"old s8"
    assert again.has("quant_report.json") and not list(b.path.glob(".new-*"))


def test_a_guard_report_written_again_is_never_torn_from_its_manifest(tmp_path, monkeypatch):
    """guard.write_report (edge-ad compile's engine records, a quantize whose guard failed) wrote the report,
    then the manifest recording it: a power cut between the two left a bundle that no longer opened
    (quant_report.json's sha256 refused). At every rename it is the old report or the new one now."""
    import os

    from edge_ad.compile import guard as guard_mod

    for cut_at in range(1, 20):
        b = _graphs_bundle(tmp_path / f"b{cut_at}")
        with power_cut(monkeypatch, cut_at, os.replace) as cut:
            guard_mod.write_report(b, [{"candidate": "onnxruntime-int8", "passed": False}])
        done = not cut.hit
        report = json.loads(Bundle.open(b.path, verify=True).file("quant_report.json").read_text())
        assert report == {} or report["candidates"]["onnxruntime-int8"]["passed"] is False
        if done:
            assert report and not list(b.path.glob(".new-*"))
            break
    assert done


@pytest.mark.parametrize("renamed", [True, False])
def test_a_report_write_settles_a_change_a_power_cut_left(tmp_path, renamed):
    """A re-export cut by a power cut leaves 'replacing' (model.onnx old or new); the next change of other
    files (guard.write_report: edge-ad compile's engine records, a quantize whose guard failed) dropped it
    unsettled: the manifest kept the old sha256 of a model.onnx already renamed in, and the bundle no
    longer opened (run, pack, doctor refused it). Now the file on disk is recorded as it is."""
    import hashlib

    from edge_ad.compile import guard as guard_mod
    from fixtures_bundle import cut_replace

    b = cut_replace(_graphs_bundle(tmp_path / "b"), {"model.onnx": b"new fp32", "model.fp16.onnx": b"fp16"},
                    renamed=renamed)
    guard_mod.write_report(b, [{"candidate": "tensorrt-fp16", "passed": False}])
    again = Bundle.open(b.path, verify=True)
    assert again.manifest == b.manifest and "replacing" not in again.manifest
    on_disk = again.file("model.onnx").read_bytes()
    assert on_disk == (b"new fp32" if renamed else b"fp32")
    assert again.manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(on_disk).hexdigest()
    # a file the cut change added: recorded when it was renamed in, else not part of the bundle
    assert ("model.fp16.onnx" in again.manifest["files"]) == renamed == again.has("model.fp16.onnx")
    assert json.loads(again.file("quant_report.json").read_text())["candidates"]["tensorrt-fp16"]["passed"] is False


def test_a_change_refuses_a_cut_change_whose_file_is_neither_old_nor_new(tmp_path):
    """The leftover 'replacing' of a file that is now neither version is refused, naming it, before anything
    is written; a change that replaces that very file repairs it."""
    from edge_ad.compile import guard as guard_mod
    from fixtures_bundle import cut_replace

    b = cut_replace(_graphs_bundle(tmp_path / "b"), {"model.onnx": b"new fp32"})
    b.file("model.onnx").write_bytes(b"torn")
    before = (b.path / "manifest.json").read_bytes()
    with pytest.raises(InputError, match=r"model.onnx: sha256 .* does not match manifest.json \(.*… or .*…\); "
                                         "the file is corrupt or was changed; nothing was changed"):
        guard_mod.write_report(b, [{"candidate": "tensorrt-fp16", "passed": False}])
    assert (b.path / "manifest.json").read_bytes() == before and not list(b.path.glob(".new-*"))
    assert b.file("quant_report.json").read_bytes() == b"{}"
    b.replace_files({"model.onnx": b"again"})
    assert Bundle.open(b.path, verify=True).file("model.onnx").read_bytes() == b"again"


def test_create_refuses_a_folder_that_is_not_empty(tmp_path):
    """A new bundle over an old one would leave the old graphs, calibration history and statistics beside
    the new manifest."""
    old = _graphs_bundle(tmp_path / "b")
    with pytest.raises(InputError, match=r"b: not empty \(manifest.json, model.int8-u8.onnx, .*a new bundle is "
                                         "made in a new or empty folder"):
        Bundle.create(old.path, {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    assert Bundle.open(old.path, verify=True).manifest == old.manifest
    (tmp_path / "empty").mkdir()
    assert Bundle.create(tmp_path / "empty", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})


def test_a_graph_the_manifest_does_not_record_is_never_run(tiny_bundle, tmp_path):
    """A graph file left from another model (an earlier training into the same folder) is refused by the
    ONNX Runtime backend, not run with this bundle's calibration; the CPU never picks an unrecorded u8 form."""
    from edge_ad.runtime.backends.base import graph_file
    from edge_ad.runtime.backends.onnxruntime import OnnxRuntimeBackend

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    OnnxRuntimeBackend(b).close()
    b.manifest["files"].pop("model.onnx")
    b.save_manifest()
    b = Bundle.open(b.path, verify=True)
    for verify in (True, False):
        with pytest.raises(InputError, match=r"b/model.onnx: not recorded in .*manifest.json, so it is not this "
                                             r"bundle's model .*run 'edge-ad export'"):
            OnnxRuntimeBackend(b, verify=verify)
    b.add_file("model.onnx")
    b.add_file("model.int8.onnx", src=b.file("model.onnx"))
    b.file("model.int8-u8.onnx").write_bytes(b.file("model.onnx").read_bytes())   # on disk, not recorded
    assert graph_file(b, "int8", "cpu") == "model.int8.onnx"
    b.add_file("model.int8-u8.onnx")
    assert graph_file(b, "int8", "cpu") == "model.int8-u8.onnx"


def test_folder_lock_is_reentrant_in_one_thread_and_refuses_another_thread(tmp_path):
    """Another thread of the same process is refused as another process is, instead of sharing the lock."""
    import threading

    from edge_ad import atomic
    from edge_ad.errors import RuntimeFailure

    def other_thread() -> str:
        out = []

        def enter():
            try:
                with atomic.folder_lock(tmp_path, "busy: held elsewhere"):
                    out.append("entered")
            except RuntimeFailure as exc:
                out.append(str(exc))

        t = threading.Thread(target=enter)
        t.start()
        t.join()
        return out[0]

    with atomic.folder_lock(tmp_path, "busy"):
        with atomic.folder_lock(tmp_path, "busy"):      # re-entrant in this thread
            assert other_thread() == "busy: held elsewhere"
        assert other_thread() == "busy: held elsewhere"  # still held by the outer one
    assert other_thread() == "entered"                    # released


def _gaussian_service(bundle, tmp_path):
    """A Service running ``bundle`` on onnxruntime, and a folder of 30 normal grain frames (its source)."""
    import cv2

    from edge_ad.config import load_settings
    from edge_ad.data.synthetic import make_part
    from edge_ad.runtime.service import Service

    folder = tmp_path / "normal"
    folder.mkdir()
    for i in range(30):
        cv2.imwrite(str(folder / f"n{i:02d}.png"), make_part("grain", 64, None, seed=7, index=i).image[..., ::-1])
    ov = [(["model", "bundle"], str(bundle.path), "test"), (["model", "backend"], "onnxruntime", "test"),
          (["model", "device"], "cpu", "test"), (["source", "uri"], f"dir://{folder}", "test"),
          (["output", "jsonl"], str(tmp_path / "results.jsonl"), "test"), (["telemetry", "tegrastats"], False, "test")]
    return Service(load_settings(None, ov, environ={}), install_signals=False), folder


def test_model_hash_of_a_gaussian_bundle_covers_its_statistics_in_force(gaussian_bundle, tiny_bundle, tmp_path):
    """A Gaussian bundle's graph is the pretrained feature extractor, the same for every one of an input size:
    model_hash (the sha256 of that graph alone) was the same for every Gaussian model on a fleet, and a live
    refit did not change it. It now covers the statistics the calibration in force names; other kinds keep
    the graph's sha256, which a recalibration does not change."""
    import hashlib

    from edge_ad.calibration import recalibrate
    from edge_ad.inspector import Inspector
    from edge_ad.runtime.backends import open_backend
    from fixtures_bundle import make_gaussian_bundle, part_frame

    grain = copy_bundle(gaussian_bundle, tmp_path / "grain")
    disc = make_gaussian_bundle(tmp_path / "disc", kind="disc", n_train=16)
    assert grain.graph_hash() == disc.graph_hash() != ""          # one feature extractor ...
    assert grain.model_hash() != disc.model_hash()                 # ... two models
    stats = grain.calibration().extra["gaussian"]
    text = f"{grain.graph_hash()}\n{grain.manifest['files'][stats]['sha256']}\n"
    assert grain.model_hash() == hashlib.sha256(text.encode()).hexdigest()   # as documented

    svc, folder = _gaussian_service(grain, tmp_path)
    births = []
    svc.update_birth = lambda **fields: births.append(fields)
    try:
        before = svc.inspector.model_hash
        assert before == grain.model_hash() == svc._birth()["model_hash"]
        r = svc.commands.calibrate({"frames": 30, "source": f"dir://{folder}", "policy": "max"})   # a live refit
        assert r["version"] == 2 and r["gaussian_file"] != stats
        after = svc.inspector.model_hash
        assert after != before and after == Bundle.open(grain.path).model_hash()
        assert births and births[-1] == {"model_hash": after}     # the retained birth says it
        assert svc._reload_bundle()["model"] == "unchanged"        # the same model as on disk: no swap
    finally:
        svc.inspector.backend.close()

    tiny = copy_bundle(tiny_bundle, tmp_path / "tiny")            # any other kind: the graph's sha256
    before = tiny.model_hash()
    assert before == tiny.graph_hash() == hashlib.sha256(tiny.file("model.onnx").read_bytes()).hexdigest()
    insp = Inspector(tiny, open_backend(tiny, "onnxruntime", device="cpu"))
    res = recalibrate(tiny, insp, [part_frame(2000 + i, 64) for i in range(30)], policy="max", progress=False)
    insp.set_calibration(res.calibration)
    assert res.calibration.version == 2 and tiny.model_hash() == insp.model_hash == before


def test_a_reload_after_a_refit_beside_the_line_is_a_calibration_as_the_live_refit_is(gaussian_bundle, tmp_path):
    """Since a Gaussian model_hash covers its statistics, a reload (SIGHUP, the MQTT reload) after an 'edge-ad
    calibrate' refit or rollback of the running bundle took it for another model: a second inspector, a 'model'
    event, the model-swap reply, where the live MQTT calibrate gives a 'calibration' event. The same operation
    gives one event type: a new calibration of the same bundle and graph is a calibration, the inspector kept
    and scoring with the new statistics; a bundle retrained in the same folder is still another model. The
    reload's reply then said "model": "unchanged" while the model_hash (the birth's) had changed: it says
    "refit", with model_hash and previous_model_hash ("unchanged" only when the hash is)."""
    from edge_ad.runtime.service import reload_text
    import shutil

    from edge_ad.calibration import recalibrate, rollback
    from edge_ad.inspector import Inspector
    from edge_ad.runtime.backends import open_backend
    from fixtures_bundle import make_gaussian_bundle, part_frame

    grain = copy_bundle(gaussian_bundle, tmp_path / "grain")
    svc, folder = _gaussian_service(grain, tmp_path)
    events, births = [], []
    svc.reporter.event = lambda payload, jpeg=None: events.append(payload)
    svc.update_birth = lambda **fields: births.append(fields)
    frame = part_frame(4000, 64)

    def beside(change):
        """``change(bundle, inspector)`` as another process (edge-ad calibrate) makes it; the reload's reply."""
        other = Bundle.open(grain.path)
        insp = Inspector(other, open_backend(other, "onnxruntime", device="cpu"))
        try:
            change(other, insp)
        finally:
            insp.backend.close()
        return svc.commands.reload({"what": "bundle"})["bundle"]      # the MQTT reload's reply (SIGHUP's too)

    def scores_as_on_disk():
        on_disk = Bundle.open(grain.path)
        insp = Inspector(on_disk, open_backend(on_disk, "onnxruntime", device="cpu"))
        try:
            assert svc.inspector.model_hash == on_disk.model_hash()
            return svc.inspector.inspect([frame]).scores[0] == insp.inspect([frame]).scores[0]
        finally:
            insp.backend.close()

    inspector = svc.inspector
    try:
        svc.commands.calibrate({"frames": 30, "source": f"dir://{folder}", "policy": "max"})    # live: v2
        assert [e["type"] for e in events] == ["calibration"] and events[-1]["version"] == 2
        v2_hash = svc.inspector.model_hash
        refit = [part_frame(5000 + i, 64, brightness=0.05) for i in range(30)]
        out = beside(lambda b, insp: recalibrate(b, insp, refit, policy="max", progress=False))   # v3 beside
        assert out == {"model": "refit", "model_hash": svc.inspector.model_hash, "previous_model_hash": v2_hash,
                       "calibration_version": 3} and v2_hash != svc.inspector.model_hash
        assert reload_text(out) == (f"model refit {v2_hash} -> {svc.inspector.model_hash} (the Gaussian statistics "
                                    "of calibration v3), calibration v3 in force")
        assert events[-1]["type"] == "calibration" and events[-1]["version"] == 3 and events[-1]["reason"] == "reload"
        assert events[-1]["previous_version"] == 2 and "threshold_in_force" in events[-1]
        assert svc.inspector is inspector and scores_as_on_disk()            # the new statistics score
        assert births[-1] == {"model_hash": svc.inspector.model_hash}        # the birth says the new hash
        v3_hash = svc.inspector.model_hash

        out = beside(lambda b, insp: rollback(b, 2, by="cli"))               # edge-ad calibrate --rollback
        assert out == {"model": "refit", "model_hash": v2_hash, "previous_model_hash": v3_hash,
                       "calibration_version": 2} and events[-1]["type"] == "calibration"
        assert svc.inspector is inspector and svc.inspector.model_hash == v2_hash and scores_as_on_disk()
        assert [e["type"] for e in events] == ["calibration"] * 3
        assert beside(lambda b, insp: None) == {"model": "unchanged", "calibration": "unchanged",
                                                "calibration_version": 2}

        disc = make_gaussian_bundle(tmp_path / "disc", kind="disc", n_train=16)
        shutil.rmtree(grain.path)                                           # retrained in place: another model
        shutil.copytree(disc.path, grain.path)
        out = svc.reload("bundle")["bundle"]
        assert out["model_hash"] == disc.model_hash() and events[-1]["type"] == "model"
        assert svc.inspector is not inspector and scores_as_on_disk()
    finally:
        svc.inspector.backend.close()
