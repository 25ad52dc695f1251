import json

import pytest

from edge_ad.bundle import Bundle
from edge_ad.errors import InputError
from edge_ad.scoring import Calibration, MapNorm


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
