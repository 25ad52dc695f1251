"""ONNX export: the graph contract (one dynamic-batch input, the bundle's outputs), checker, parity."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge_ad import models  # noqa: E402
from edge_ad.bundle import Bundle  # noqa: E402
from edge_ad.compile.export import export_bundle  # noqa: E402
from edge_ad.errors import InputError, RuntimeFailure  # noqa: E402
from edge_ad.runtime.backends import open_backend  # noqa: E402

from test_backends import make_bundle  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("export") / "b")


def test_graph_contract_and_manifest(exported):
    b, _ = exported
    m = onnx.load(str(b.file("model.onnx")))
    assert [i.name for i in m.graph.input] == ["image"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert [o.name for o in m.graph.output] == ["map_st", "map_ae"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in m.graph.output)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17
    mf = json.loads(b.file("manifest.json").read_text())
    assert mf["export"]["opset"] == 17 and mf["export"]["outputs"] == ["map_st", "map_ae"]
    assert mf["files"]["model.onnx"]["sha256"] == b.graph_hash("model.onnx")
    assert mf["active"] == {"graph": "model.onnx", "precision": "fp32"}
    b.verify(["model.onnx"])


def test_dynamic_batch_matches_torch_with_normalization_inside(exported):
    b, m = exported
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x = (rng.random((n, 3, 64, 64)) * 255).astype(np.float32)   # raw 0..255 pixels in
        with torch.inference_mode():
            ref = [t.numpy() for t in m(torch.from_numpy(x))]
        with open_backend(b, "onnxruntime", "fp32", "cpu") as be:
            out = be.infer(x)
        for name, r in zip(m.output_names, ref):
            assert out[name].shape == (n, 1, 8, 8) == r.shape  # PDN map at 64x64
            assert np.max(np.abs(out[name] - r)) / np.max(np.abs(r)) <= 1e-4


def test_reexport_drops_derived_graphs_and_resets_active(exported, tmp_path):
    import shutil

    shutil.copytree(exported[0].path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    b.add_file("model.int8.onnx", data=b.file("model.onnx").read_bytes())
    b.add_file("quant_report.json", data=b"{}")
    b.set_active("model.int8.onnx", "int8")
    b.manifest["quantized"] = {"int8": {"files": ["model.int8.onnx"], "source_sha256": "old"}}
    b.save_manifest()
    export_bundle(b, exported[1], progress=False)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert not b.has("model.int8.onnx") and not b.has("quant_report.json")
    assert "model.int8.onnx" not in b.manifest["files"]
    assert b.active_graph == "model.onnx" and b.active_precision == "fp32"
    assert b.manifest.get("quantized", {}) == {}          # no record of graphs that are gone


def test_a_reexport_that_fails_writing_model_onnx_leaves_the_old_bundle_whole(exported, tmp_path, monkeypatch):
    """Disk full while model.onnx is written: the quantized graphs were deleted first and the manifest still
    named model.int8.onnx active, so the bundle could no longer run. Now nothing changes."""
    import shutil

    from edge_ad import atomic
    from fixtures_bundle import disk_full_for

    shutil.copytree(exported[0].path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    fp32 = b.file("model.onnx").read_bytes()
    b.add_file("model.int8.onnx", data=fp32)
    b.add_file("model.int8-u8.onnx", data=fp32)
    b.add_file("quant_report.json", data=b"{}")
    b.set_active("model.int8.onnx", "int8")
    before = b.file("manifest.json").read_text()
    real = disk_full_for(monkeypatch, "model.onnx")
    with pytest.raises(OSError, match="No space left"):
        export_bundle(b, exported[1], progress=False)
    monkeypatch.setattr(atomic, "write_bytes", real)
    assert b.file("manifest.json").read_text() == before
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.active_graph == "model.int8.onnx" and b.active_precision == "int8"
    assert b.has("model.int8.onnx") and b.has("model.int8-u8.onnx") and b.has("quant_report.json")
    assert b.file("model.onnx").read_bytes() == fp32 and not list(b.path.glob(".new-*"))
    with open_backend(b, "onnxruntime", None, "cpu") as be:
        assert set(be.infer(np.full((1, 3, 64, 64), 128, np.float32))) == {"map_st", "map_ae"}


def test_export_refuses_a_bundle_it_cannot_write_before_exporting(exported, tmp_path, monkeypatch):
    """export --bundle B on a bundle folder it could not write ran the whole export (torch, checker, ONNX
    Runtime parity) and then failed naming a hidden temp file. The folder is checked first: exit 2 naming
    it, nothing done. A write that still fails names model.onnx, not '.new-model.onnx' or its temp file."""
    import errno
    import shutil
    import tempfile

    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.errors import os_error_text
    from fixtures_bundle import unwritable

    shutil.copytree(exported[0].path, tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.path.iterdir() if p.is_file()}
    unwritable(monkeypatch, b.path)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: pytest.fail("the export ran"))
    with pytest.raises(InputError, match=f"export {b.path}: the folder {b.path.absolute()} is not writable; "
                                         "nothing was changed"):
        export_bundle(b, exported[1], progress=False)
    res = CliRunner().invoke(main, ["export", "--bundle", str(b.path)])
    assert res.exit_code == 2 and f"the folder {b.path.absolute()} is not writable" in res.output, res.output
    monkeypatch.undo()
    real_mkstemp = tempfile.mkstemp

    def refused(*a, prefix="", dir=None, **kw):
        if prefix == "..new-model.onnx.":   # the temp file of the staged .new-model.onnx
            raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x1y2z3.tmp")
        return real_mkstemp(*a, prefix=prefix, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as exc:
        export_bundle(b, exported[1], progress=False)
    assert os_error_text(exc.value) == f"{b.file('model.onnx')}: permission denied"
    assert {p.name: p.read_bytes() for p in b.path.iterdir() if p.is_file()} == before


def test_output_name_mismatch_is_refused(tmp_path):
    m = models.build("efficientad-s", 64, pretrained=False)
    b = Bundle.create(tmp_path / "b", {"kind": "efficientad-s", "image_size": [64, 64], "outputs": ["map"]})
    with pytest.raises(InputError, match=r"output_names \['map_st', 'map_ae'\] differ"):
        export_bundle(b, m, progress=False)
    assert not b.has("model.onnx")


def test_gaussian_exports_features(tmp_path):
    m = models.build("gaussian", 64, pretrained=False)
    b = Bundle.create(tmp_path / "g", models.describe(m, "gaussian", 64, models.default_config("gaussian")))
    export_bundle(b, m, progress=False)
    with open_backend(b, "onnxruntime", "fp32", "cpu") as be:
        out = be.infer(np.full((2, 3, 64, 64), 128, np.float32))
    assert list(out) == ["feat"] and out["feat"].ndim == 4 and out["feat"].shape[0] == 2


def test_checker_failures_are_reported(tmp_path):
    from edge_ad.compile.export import check_graph

    with pytest.raises(RuntimeFailure, match="the ONNX checker refused it"):
        check_graph(b"not an onnx file", ["map"], (64, 64), where="x")


def test_opset_outside_what_the_models_export_at_is_refused_before_torch_runs(tmp_path):
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.compile import MAX_OPSET, MIN_OPSET

    for bad in ("0", "-5", "7", "12", "24", "999"):
        res = CliRunner().invoke(main, ["export", "--bundle", str(tmp_path), "--opset", bad])
        assert res.exit_code == 2 and "--opset" in res.output and f"{MIN_OPSET}<=x<={MAX_OPSET}" in res.output
        assert "graph(" not in res.output  # was ~345 lines of Torch IR, then exit 1
    m = models.build("gaussian", 64, pretrained=False)
    b = Bundle.create(tmp_path / "g", models.describe(m, "gaussian", 64, models.default_config("gaussian")))
    with pytest.raises(InputError, match="opset 7: expected a whole number 13..23"):
        export_bundle(b, m, opset=7, progress=False)
    export_bundle(b, m, opset=MAX_OPSET, progress=False)  # both ends of the range do export
    export_bundle(b, m, opset=MIN_OPSET, progress=False)
