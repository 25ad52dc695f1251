"""edge-ad doctor: each check against the real thing (files, sockets, Mosquitto, OpenSSL), and the CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_ad import doctor as d
from edge_ad.bundle import Bundle
from edge_ad.cli import main
from edge_ad.mqtt.broker import TlsFiles, free_port
from edge_ad.mqtt.settings import BrokerSettings
from edge_ad.scoring import Calibration, MapNorm
from fixtures_bundle import copy_bundle, make_tiny_bundle, part_frame, write_video


def _bundle(path: Path) -> Bundle:
    """A bundle that verifies but whose graph is no ONNX graph: the bundle check passes, run cannot open it."""
    b = Bundle.create(path, {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.add_file("model.onnx", data=b"an onnx graph stands here")
    b.write_calibration(Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=0.5))
    return b


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A bundle run can open (fixtures_bundle's tiny ONNX graph, calibrated); copy it before changing it."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


def _by(checks, name):
    return [c for c in checks if c.name == name]


# ---------------------------------------------------------------------------- pure helpers
def test_l4t_parsing_and_jetpack_table():
    line = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8\n"
    assert d.parse_nv_tegra_release(line) == "36.4.3"
    assert d.parse_nv_tegra_release("# R35 (release), REVISION: 2.1, GCID: 32413640, BOARD: t186ref") == "35.2.1"
    assert d.parse_nv_tegra_release("garbage") is None
    assert d.jetpack_for_l4t("35.2.1") == "5.1"
    assert d.jetpack_for_l4t("35.4.1") == "5.1.2"
    assert d.jetpack_for_l4t("36.3.0") == "6.0"
    assert d.jetpack_for_l4t("36.4.0") == "6.1"
    assert d.jetpack_for_l4t("36.4.3") == "6.2"
    assert d.jetpack_for_l4t("38.2.1") == "7.0"
    assert d.jetpack_for_l4t("38.9.0") == "7.x"
    assert d.jetpack_for_l4t("32.7.1") is None


def test_opencv_build_info_parsing():
    info = """
  Video I/O:
    DC1394:                      NO
    FFMPEG:                      YES
      avcodec:                   YES (58.54.100)
    GStreamer:                   YES (1.16.3)
    v4l/v4l2:                    YES (linux/videodev2.h)
"""
    assert d.parse_opencv_build(info) == {"gstreamer": True, "ffmpeg": True, "v4l2": True}
    assert d.parse_opencv_build("    GStreamer:   NO\n    FFMPEG: NO\n") == {"gstreamer": False, "ffmpeg": False,
                                                                             "v4l2": False}


def test_exit_code_and_summary():
    ok = d.Check("a", d.Status.OK, "fine")
    warn = d.Check("b", d.Status.WARN, "meh", fix="do x")
    opt_fail = d.Check("c", d.Status.FAIL, "broken but optional")
    req_fail = d.Check("e", d.Status.FAIL, "broken", required=True, fix="do y")
    assert d.exit_code([ok, warn, opt_fail]) == 0
    assert d.exit_code([ok, warn], strict=True) == 1
    assert d.exit_code([ok, req_fail]) == 1
    assert "cannot start: e" in d.summary([ok, req_fail])
    text = d.format_report([ok, warn, req_fail])
    assert "[FAIL] e" in text and "fix: do y" in text and "fix: do x" in text
    rep = d.report_dict([ok, warn])
    assert rep["ok"] and rep["exit_code"] == 0 and rep["checks"][1]["status"] == "warn"


# ---------------------------------------------------------------------------- software on this machine
def test_software_checks_here():
    assert d.check_python().status == d.Status.OK
    assert d.check_numpy().status == d.Status.OK
    cv = d.check_opencv()
    assert cv[0].name == "opencv" and cv[0].status == d.Status.OK
    assert cv[1].name == "gstreamer" and cv[1].status in (d.Status.OK, d.Status.WARN) and not cv[1].required
    ort = d.check_onnxruntime()
    assert ort.status == d.Status.OK and "CPUExecutionProvider" in ort.data["providers"]
    trt = d.check_tensorrt()
    assert trt.status in (d.Status.OK, d.Status.WARN) and not trt.required
    if trt.status == d.Status.WARN:
        assert d.check_tensorrt(required=True).status == d.Status.FAIL
    assert all(c.status in (d.Status.OK, d.Status.WARN) for c in d.check_cuda())
    assert d.check_platform().status in (d.Status.OK, d.Status.SKIP, d.Status.WARN)


def test_gstreamer_required_for_csi():
    cv = d.check_opencv("csi")
    gst = _by(cv, "gstreamer")[0]
    if not cv[0].data["gstreamer"]:
        assert gst.status == d.Status.FAIL and gst.required


def test_ffmpeg_required_for_rtsp_and_videos_not_for_a_still_image(tmp_path, monkeypatch):
    """A file:// still image is read by the image reader (as dir:// images are), not by FFmpeg: doctor said
    run cannot start with an OpenCV built without FFmpeg, for a source that does not need it."""
    import cv2

    real = d.parse_opencv_build
    monkeypatch.setattr(d, "parse_opencv_build", lambda info: {**real(info), "ffmpeg": False})
    image = tmp_path / "part.PNG"
    cv2.imwrite(str(tmp_path / "part.png"), part_frame(0, 32))
    (tmp_path / "part.png").rename(image)
    checks = d.run_checks(source=f"file://{image}", data_dirs=[tmp_path], min_free_mb=1, service=False)
    assert not _by(checks, "ffmpeg") and _by(checks, "source")[0].status == d.Status.OK
    assert d.exit_code(checks) == 0, d.format_report(checks)
    video = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(2)])
    checks = d.run_checks(source=f"file://{video}", data_dirs=[tmp_path], min_free_mb=1, service=False)
    assert _by(checks, "ffmpeg")[0].status == d.Status.FAIL and d.exit_code(checks) == 1
    for source in (f"file://{image}", f"file://{tmp_path}/other.jpg", "dir:///frames", "synthetic://", None):
        assert not _by(d.check_opencv(source), "ffmpeg"), source
    for source in (f"file://{video}", "file:///clip.mp4", "rtsp://cam/stream", "file"):
        ff = _by(d.check_opencv(source), "ffmpeg")
        assert ff and ff[0].status == d.Status.FAIL and ff[0].required, source
        assert "file:// videos" in ff[0].detail and "still image" in ff[0].fix
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    broken = d.check_source(f"file://{tmp_path}/broken.jpg")
    assert broken.status == d.Status.FAIL and "image reader" in broken.fix and "FFmpeg" not in broken.fix


# ---------------------------------------------------------------------------- sources
def test_source_checks(tmp_path):
    assert d.check_source("synthetic://disc").status == d.Status.OK
    # a camera not plugged in yet: run starts and waits for it, so doctor warns (it said run cannot start)
    missing = d.check_source("v4l2:///dev/video97")
    assert missing.status == d.Status.WARN and not missing.required and "/dev/video97" in missing.detail
    assert "run starts and waits for it" in missing.detail and "plug the camera in" in missing.fix
    assert d.check_source("v4l2://96").status == d.Status.WARN
    bad = d.check_source("ftp://camera")
    assert bad.status == d.Status.FAIL and "scheme" in bad.detail
    assert d.check_source(f"file://{tmp_path}/clip.mp4").status == d.Status.FAIL
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 10)  # there, but not a video: run would refuse it, so doctor does too
    junk = d.check_source(f"file://{clip}")
    assert junk.status == d.Status.FAIL and junk.required and "not a video" in junk.detail
    video = write_video(tmp_path / "v.avi", [part_frame(i, 32) for i in range(2)])
    assert d.check_source(f"file://{video}").status == d.Status.OK
    folder = tmp_path / "frames"
    folder.mkdir()
    empty = d.check_source(f"dir://{folder}")
    assert empty.status == d.Status.FAIL and "no images" in empty.detail
    (folder / "a.png").write_bytes(b"x")
    assert "none of the 1 images" in d.check_source(f"dir://{folder}").detail
    import cv2
    cv2.imwrite(str(folder / "b.png"), part_frame(0, 32))
    assert d.check_source(f"dir://{folder}").status == d.Status.OK
    # an RTSP camera that does not answer is a warning: run reconnects with back-off
    port = free_port()
    rtsp = d.check_source(f"rtsp://user:secret@127.0.0.1:{port}/stream")
    assert rtsp.status == d.Status.WARN and "refused" in rtsp.detail and "secret" not in rtsp.detail
    cams = d.check_cameras("synthetic://disc")
    assert _by(cams, "source")[0].status == d.Status.OK


# ---------------------------------------------------------------------------- disk
def test_disk_checks(tmp_path):
    ok = d.check_disk([tmp_path, tmp_path / "new" / "outbox"], min_free_mb=1)
    assert [c.status for c in ok] == [d.Status.OK, d.Status.OK]
    assert "to be created" in ok[1].detail
    full = d.check_disk([tmp_path], min_free_mb=10**9)
    assert full[0].status == d.Status.FAIL and full[0].required and "below" in full[0].detail
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    under_file = d.check_disk([blocker / "sub"], min_free_mb=1)
    assert under_file[0].status == d.Status.FAIL and "not a folder" in under_file[0].detail


# ---------------------------------------------------------------------------- bundle and engine
def test_bundle_checks(tmp_path):
    b = _bundle(tmp_path / "b")
    checks, opened = d.check_bundle(b.path)
    assert checks[0].status == d.Status.OK and opened is not None
    assert "calibration v1" in checks[0].detail and "files verified" in checks[0].detail
    eng = d.check_engine(opened)
    assert eng.status in (d.Status.SKIP, d.Status.WARN, d.Status.OK) and not eng.required
    if eng.status == d.Status.SKIP:
        assert d.check_engine(opened, required=True).status == d.Status.FAIL
    # a corrupt file is refused, naming it
    (b.path / "model.onnx").write_bytes(b"tampered")
    checks, opened = d.check_bundle(b.path)
    assert checks[0].status == d.Status.FAIL and checks[0].required and "model.onnx" in checks[0].detail
    assert opened is None
    missing, _ = d.check_bundle(tmp_path / "nope")
    assert missing[0].status == d.Status.FAIL and "not found" in missing[0].detail


def test_bundle_without_calibration_fails(tmp_path):
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [64, 64], "outputs": ["feat"]})
    b.add_file("model.onnx", data=b"graph")
    checks, _ = d.check_bundle(b.path)
    assert checks[0].status == d.Status.FAIL and "calibration" in checks[0].detail


# ---------------------------------------------------------------------------- broker
def test_broker_unreachable_is_a_warning():
    port = free_port()
    checks = d.check_broker(BrokerSettings(url=f"mqtt://127.0.0.1:{port}"), timeout=1.0)
    assert checks[0].status == d.Status.WARN and "refused" in checks[0].detail and not checks[0].required


def test_broker_not_mqtt(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        checks = d.check_broker(BrokerSettings(url=f"mqtt://127.0.0.1:{port}"), timeout=0.5)
    finally:
        srv.close()
    assert checks[-1].name == "broker" and checks[-1].status == d.Status.FAIL
    assert "CONNACK" in checks[-1].detail


def test_broker_mosquitto(mosquitto):
    checks = d.check_broker(BrokerSettings(url=mosquitto.url), timeout=3.0)
    assert [c.status for c in checks] == [d.Status.OK], checks
    assert "CONNECT accepted" in checks[0].detail


def test_broker_check_probes_whether_the_device_may_publish_to_its_topics(mosquitto_factory, tmp_path, tiny):
    """An ACL that denies the device its result topic: the broker accepted the login, doctor said ok, and run then
    dropped every result (MQTT v5: PUBACK 0x87 Not authorized, 'rejected'). doctor now publishes an empty QoS 1
    message to each of the device's outbox topics (a config names them) and fails naming each topic the broker
    refused and its ACL; under MQTT 3.1.1 (no reason code in a PUBACK) it says that cannot be checked."""
    acl = tmp_path / "acl"
    acl.write_text("user dev\ntopic write edge-ad/v1/s1/d1/status\ntopic write edge-ad/v1/s1/d1/event\n\n"
                   "user good\ntopic write edge-ad/v1/s1/d1/#\n")
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    topics = ["edge-ad/v1/s1/d1/result", "edge-ad/v1/s1/d1/event", "edge-ad/v1/s1/d1/event/image"]
    denied = d.check_broker(BrokerSettings(url=broker.url, username="dev"), timeout=3.0, publish=topics)
    assert [(c.name, c.status) for c in denied] == [("broker", d.Status.OK), ("broker-acl", d.Status.FAIL)], denied
    acl_check = denied[1]
    assert ("refused login 'dev' a publish to 2 of the device's topics (edge-ad/v1/s1/d1/result: Not authorized "
            "(reason code 0x87); edge-ad/v1/s1/d1/event/image: Not authorized (reason code 0x87)): the broker's ACL "
            "does not let it write there") in acl_check.detail, acl_check.detail
    assert "'topic write edge-ad/v1/s1/d1/#'" in acl_check.fix and not acl_check.required
    allowed = d.check_broker(BrokerSettings(url=broker.url, username="good"), timeout=3.0, publish=topics)
    assert [(c.name, c.status) for c in allowed] == [("broker", d.Status.OK), ("broker-acl", d.Status.OK)], allowed
    assert "login 'good' may publish to edge-ad/v1/s1/d1/result" in allowed[1].detail
    old = d.check_broker(BrokerSettings(url=broker.url, username="dev", protocol="3.1.1"), timeout=3.0,
                         publish=topics)
    assert [(c.name, c.status) for c in old] == [("broker", d.Status.OK), ("broker-acl", d.Status.SKIP)], old
    assert "MQTT 3.1.1: whether the broker lets the device publish to its topics cannot be checked" in old[1].detail

    # the CLI probes the topics the config's site and device name, also at a URL --mqtt gives
    b = copy_bundle(tiny, tmp_path / "b")
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\n\n[source]\nuri = "synthetic://disc"\n\n'
                   f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\nsite = "s1"\ndevice = "d1"\nusername = "dev"\n'
                   f'image_topic_event_id = true\noutbox_path = "{tmp_path / "outbox.sqlite"}"\n')
    args = ["doctor", "--config", str(cfg), "--mqtt", broker.url, "--min-free-mb", "1", "--data-dir", str(tmp_path)]
    res = CliRunner().invoke(main, args)                      # not asked: nothing is published
    assert res.exit_code == 0 and "broker-acl" in res.output and "is not checked" in res.output, res.output
    assert "--probe-publish" in res.output and "[FAIL] broker-acl" not in res.output, res.output
    res = CliRunner().invoke(main, args + ["--probe-publish"])
    assert res.exit_code == 0, res.output                     # optional: run starts, and drops what is refused
    assert "[FAIL] broker-acl" in res.output and "edge-ad/v1/s1/d1/event/image/doctor-probe: Not authorized" in \
        res.output and "failed (not needed to start): broker-acl" in res.output, res.output
    res = CliRunner().invoke(main, ["doctor", "--mqtt", broker.url, "--min-free-mb", "1", "--data-dir", str(tmp_path)])
    assert "broker-acl" in res.output and "is not checked" in res.output and "--config" in res.output, res.output
    res = CliRunner().invoke(main, ["doctor", "--mqtt", broker.url, "--probe-publish"])
    assert res.exit_code == 2 and "--probe-publish needs --config" in res.output, res.output


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _server_pki(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=doctor test ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    (folder / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                       "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=folder)
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test CA")
def test_broker_tls(mosquitto_factory, tmp_path):
    pki = _server_pki(tmp_path / "pki")
    broker = mosquitto_factory(tls=TlsFiles(pki / "ca.pem", pki / "server.pem", pki / "server.key",
                                            require_certificate=False))
    good = d.check_broker(BrokerSettings(url=broker.url, ca_file=pki / "ca.pem"), timeout=3.0)
    assert [(c.name, c.status) for c in good] == [("broker-tls", d.Status.OK), ("broker", d.Status.OK)], good
    assert "TLSv1" in good[0].detail and "localhost" in good[0].detail
    untrusted = d.check_broker(BrokerSettings(url=broker.url), timeout=3.0)
    assert untrusted[0].name == "broker-tls" and untrusted[0].status == d.Status.FAIL
    assert "not trusted" in untrusted[0].detail and "ca_file" in untrusted[0].fix


# ---------------------------------------------------------------------------- everything, and the CLI
def test_run_checks_and_cli(tmp_path, mosquitto, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    checks = d.run_checks(bundle=b.path, mqtt=BrokerSettings(url=mosquitto.url), data_dirs=[tmp_path],
                          source="synthetic://disc", min_free_mb=1, service=False)
    names = [c.name for c in checks]
    for name in ("python", "numpy", "opencv", "onnxruntime", "tensorrt", "cuda", "platform", "cameras",
                 "source", "broker", "disk", "bundle", "engine", "backend"):
        assert name in names, name
    assert d.exit_code(checks) == 0, d.format_report(checks)

    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--json", "--bundle", str(b.path), "--mqtt", mosquitto.url,
                               "--data-dir", str(tmp_path), "--min-free-mb", "1", "--source", "synthetic://"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and rep["exit_code"] == 0
    assert {c["name"]: c["status"] for c in rep["checks"]}["broker"] == "ok"

    res = runner.invoke(main, ["doctor", "--bundle", str(tmp_path / "missing"), "--data-dir", str(tmp_path),
                               "--min-free-mb", "1"])
    assert res.exit_code == 1 and "[FAIL] bundle" in res.output and "cannot start" in res.output

    res = runner.invoke(main, ["doctor", "--mqtt", "ftp://broker", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "scheme" in res.output
    res = runner.invoke(main, ["doctor", "--no-such-flag"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["doctor", "--ca-file", str(b.path / "manifest.json"), "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--ca-file needs --mqtt" in res.output


def test_a_bare_doctor_checks_the_machine_and_does_not_claim_run_can_start(tmp_path, tiny, monkeypatch):
    """'edge-ad doctor' with no bundle and no config ended 'edge-ad run can start', exit 0, though run cannot
    start without a bundle. It now says what it checked, that no bundle or config was given and what to pass;
    exit 0 when this machine has what run needs (run_can_start null in --json), 1 when it lacks something."""
    monkeypatch.delenv("EDGE_AD_CONFIG", raising=False)
    runner = CliRunner()
    base = ["doctor", "--data-dir", str(tmp_path), "--min-free-mb", "1"]
    res = runner.invoke(main, base)
    assert res.exit_code == 0, res.output
    assert "\nedge-ad run can start" not in res.output, res.output
    assert "[  - ] bundle" in res.output and "no bundle or config given" in res.output
    assert re.search(r"\nthis machine has what edge-ad run needs \(python, numpy, .*disk checked\), but no bundle "
                     r"or config was given, so whether edge-ad run can start is not known: give --config LINE\.toml "
                     r"\(the service's\) or --bundle DIR", res.output), res.output
    rep = json.loads(runner.invoke(main, [*base, "--json"]).output)
    assert (rep["ok"], rep["exit_code"], rep["run_can_start"]) == (True, 0, None) and "not known" in rep["summary"]
    res = runner.invoke(main, [*base, "--bundle", str(tiny.path), "--json"])   # a bundle: run itself is checked
    rep = json.loads(res.output)
    assert (rep["exit_code"], rep["run_can_start"], rep["summary"].split(" (")[0]) == (0, True,
                                                                                    "edge-ad run can start")
    # the machine lacks something run needs: cannot start, whatever the bundle
    res = runner.invoke(main, ["doctor", "--data-dir", str(tmp_path), "--min-free-mb", str(2**40), "--json"])
    rep = json.loads(res.output)
    assert (res.exit_code, rep["run_can_start"]) == (1, False) and rep["summary"].startswith(
        "edge-ad run cannot start: disk")


def test_cli_with_config(tmp_path, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\nbackend = "auto"\n\n[source]\nuri = "synthetic://disc"\n\n'
                   f'[output]\njsonl = "{tmp_path / "log" / "results.jsonl"}"\n')
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    by = {c["name"]: c for c in rep["checks"]}
    assert by["config"]["status"] == "ok" and by["bundle"]["status"] == "ok" and by["source"]["status"] == "ok"
    assert by["backend"]["status"] == "ok" and by["backend"]["data"]["backend"] == "onnxruntime"
    assert any(str(tmp_path / "log") in c["detail"] for c in rep["checks"] if c["name"] == "disk")
    cfg.write_text('[model]\nbundle = "x"\nbackend = "warp-drive"\n\n[source]\nuri = "synthetic://"\n')
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1 and "model.backend" in res.output
    res = runner.invoke(main, ["doctor", "--config", str(tmp_path / "absent.toml")])
    assert res.exit_code == 2
    res = runner.invoke(main, ["doctor", "--backend", "foo"])  # the list run accepts, not "can start"
    assert res.exit_code == 2 and "--backend" in res.output and "onnxruntime" in res.output
    res = runner.invoke(main, ["doctor", "--timeout", "nan"])
    assert res.exit_code == 2 and "--timeout" in res.output


def test_cli_with_an_invalid_config_says_what_it_did_not_check_and_why(tmp_path, tiny):
    """'doctor --config C' with an invalid C printed '[FAIL] config ...' and then 'no bundle or config given' and
    'no broker given (--mqtt URL or a config with [mqtt])', as if no config had been given. Those lines now say
    they were not checked because the config is invalid (a --bundle or --mqtt given is still checked)."""
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text('[model]\nbundle = "b"\n\n[source]\nuri = "synthetic://disc"\nmode = "strem"\n\n'
                   '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.output)
    by = {c["name"]: c for c in rep["checks"]}
    assert by["config"]["status"] == "fail" and "source.mode" in by["config"]["detail"]
    unread = f"not checked: the config {cfg} is invalid (above): "
    assert by["broker"]["status"] == "skip" and by["broker"]["detail"] == (
        unread + "its [mqtt] broker is not known until it is fixed (or give --mqtt URL)")
    assert by["bundle"]["status"] == "skip" and by["bundle"]["detail"] == (
        unread + "the model run opens, its backend and engine are not known until it is fixed (or give --bundle DIR)")
    assert rep["run_can_start"] is False and rep["summary"].startswith("edge-ad run cannot start: config")
    b = copy_bundle(tiny, tmp_path / "b")
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--bundle", str(b.path), "--min-free-mb", "1",
                                    "--json"])
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["bundle"]["status"] == "ok", by["bundle"]


def test_doctor_reads_the_update_key_as_an_update_would(tmp_path, tiny):
    """model.update_key was not looked at: an empty or short key passed doctor and made every update_model and
    bundle install refused, found at the first one. Doctor now reads it (a failure that does not stop run)."""
    b = copy_bundle(tiny, tmp_path / "b")
    key = tmp_path / "update.key"
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\nbackend = "auto"\nupdate_key = "{key}"\n\n'
                   '[source]\nuri = "synthetic://disc"\n')

    def update_key():
        res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
        assert res.exit_code == 0, res.output          # run starts all the same
        return {c["name"]: c for c in json.loads(res.output)["checks"]}["update key"]

    key.write_bytes(b"")
    c = update_key()
    assert c["status"] == "fail" and c["detail"] == (f"model.update_key: {key}: an HMAC secret of 0 bytes; expected at "
                                                      "least 16: every update_model and bundle install will be refused")
    key.unlink()
    assert update_key()["detail"].startswith(f"model.update_key: {key}: key file not found")
    key.write_bytes(b"0123456789abcdef0123\n")
    c = update_key()
    assert c["status"] == "ok" and c["data"]["alg"] == "hmac-sha256" and "must be signed with it" in c["detail"]
    assert "0123456789abcdef" not in json.dumps(c)     # the secret itself is never shown


# ---------------------------------------------------------------------------- GPU probes without a GPU
def test_cuda_via_fake_nvidia_smi(tmp_path, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("cuda-python is installed: it is asked first")
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15, 9.0'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")
    cuda = d.check_cuda()[0]
    assert cuda.status == d.Status.OK and "H100" in cuda.detail and "sm_90" in cuda.detail
    assert "550.54.15" in cuda.detail and cuda.data["via"] == "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                    "exit 9\n")
    broken = d.check_cuda()[0]
    assert broken.status == d.Status.WARN and "could not communicate" in broken.detail


def test_cuda_via_fake_cuda_python(monkeypatch):
    """The cuda-python driver-API probe, against a stand-in with the binding's call shapes."""
    import enum
    import importlib.machinery
    import sys
    import types

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0

    class CUdevice_attribute(enum.IntEnum):
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76

    ok = CUresult.CUDA_SUCCESS
    drv = types.ModuleType("cuda.bindings.driver")
    drv.CUdevice_attribute = CUdevice_attribute
    drv.cuInit = lambda flags: (ok,)
    drv.cuDriverGetVersion = lambda: (ok, 12060)
    drv.cuDeviceGetCount = lambda: (ok, 1)
    drv.cuDeviceGet = lambda i: (ok, i)
    drv.cuDeviceGetName = lambda n, dev: (ok, b"Orin\0\0\0")
    drv.cuDeviceGetAttribute = lambda a, dev: (ok, 8 if a == CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
                                               else 7)
    pkg = types.ModuleType("cuda")
    pkg.__spec__ = importlib.machinery.ModuleSpec("cuda", None, is_package=True)
    pkg.__path__ = []
    bindings = types.ModuleType("cuda.bindings")
    bindings.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings", None, is_package=True)
    bindings.__path__ = []
    bindings.driver = drv
    pkg.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", drv)
    cuda = d.check_cuda()[0]
    assert cuda.status == d.Status.OK, cuda
    assert "CUDA driver API 12.6" in cuda.detail and "Orin (sm_87)" in cuda.detail
    assert cuda.data["via"] == "cuda-python"


def test_cli_with_config_and_mqtt(tmp_path, mosquitto, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\n\n[source]\nuri = "synthetic://disc"\n\n'
                   f'[output]\njsonl = "{tmp_path / "log" / "results.jsonl"}"\n\n'
                   f'[mqtt]\nurl = "{mosquitto.url}"\nsite = "s1"\ndevice = "d1"\n'
                   f'outbox_path = "{tmp_path / "state" / "outbox.sqlite"}"\n')
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    by = {c["name"]: c for c in rep["checks"]}
    assert by["broker"]["status"] == "ok"
    disks = [c["detail"] for c in rep["checks"] if c["name"] == "disk"]
    assert any(str(tmp_path / "state") in t for t in disks) and any(str(tmp_path / "log") in t for t in disks)
    # --mqtt overrides the config's URL, keeping the rest
    port = free_port()
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json",
                                    "--mqtt", f"mqtt://127.0.0.1:{port}"])
    assert res.exit_code == 0, res.output
    assert {c["name"]: c for c in json.loads(res.output)["checks"]}["broker"]["status"] == "warn"
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--strict",
                                    "--mqtt", f"mqtt://127.0.0.1:{port}"])
    assert res.exit_code == 1 and "--strict" in res.output


def test_engine_check_with_a_stand_in_gpu(tmp_path, monkeypatch):
    """The engine check against the real engine cache, with TensorRT and the GPU replaced by stand-ins."""
    import hashlib

    from edge_ad import atomic
    from edge_ad.runtime import backends
    from edge_ad.runtime.backends import cuda as cuda_mod
    from edge_ad.runtime.backends import engine_cache
    from edge_ad.runtime.backends import tensorrt as trt_mod

    target = engine_cache.Target("8.7", "10.3.0", "Orin")
    monkeypatch.setattr(backends, "tensorrt_usable", lambda: (True, ""))
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: object())
    monkeypatch.setattr(cuda_mod, "cuda_api", lambda: object())
    monkeypatch.setattr(trt_mod, "current_target", lambda trt, api, index=0: target)
    b = _bundle(tmp_path / "b")
    b.set_active("model.onnx", "fp16")
    missing = d.check_engine(b)
    assert missing.status == d.Status.WARN and "no usable engine for Orin sm87, TensorRT 10.3.0" in missing.detail
    assert f"edge-ad compile --bundle {b.path} --precision best" in missing.fix
    assert d.check_engine(b, required=True).status == d.Status.FAIL

    key = engine_cache.engine_key(engine_cache.model_sha(b), "fp16", target)
    eng, side = engine_cache.paths(b, key)
    data = b"serialized engine"
    atomic.write_bytes(eng, data)
    meta = engine_cache.make_sidecar(b, "fp16", target, hashlib.sha256(data).hexdigest(), "model.onnx", 8,
                                     "weak", 1024, 1.0)
    atomic.write_json(side, meta)
    unguarded = d.check_engine(b)
    assert unguarded.status == d.Status.WARN and "guard" in unguarded.detail
    meta["guard"] = {"passed": True}
    atomic.write_json(side, meta)
    ok = d.check_engine(b)
    assert ok.status == d.Status.OK and "fp16 engine for Orin sm87" in ok.detail, ok
    # the bundle's active ONNX graph fp32 (compile built the fp16 engine from model.onnx): run opens the
    # fp16 engine (engine_cache.best), so with backend tensorrt doctor says run can start
    b.set_active("model.onnx", "fp32")
    picked = d.check_engine(b, required=True)
    assert picked.status == d.Status.OK and picked.data["runs"] == "fp16", picked
    assert "active precision fp32 has no usable engine" in picked.detail
    assert d.check_engine(b, required=True, precision="fp32").status == d.Status.FAIL  # asked for fp32 only
    b.set_active("model.onnx", "fp16")
    # another TensorRT on the device (a JetPack upgrade) makes it stale
    monkeypatch.setattr(trt_mod, "current_target", lambda trt, api, index=0: engine_cache.Target("8.7", "10.4.0", "Orin"))
    stale = d.check_engine(b)
    assert stale.status == d.Status.WARN, stale
    assert "the fp16 engine built by TensorRT 10.3.0 is stale (this device has 10.4.0)" in stale.detail
    assert f"edge-ad compile --bundle {b.path} --precision fp16 " in stale.fix


# ---------------------------------------------------------------------------- the engine run would open
def _engine_bundle(tmp_path, active=("model.int8.onnx", "int8")) -> Bundle:
    """Graph bytes and engine bytes are placeholders, as in test_tensorrt.py: the engine cache's checks
    (keys, sidecars, sha256, guard records) never deserialize anything, and neither does this check."""
    b = Bundle.create(tmp_path / "eb", {"kind": "efficientad-s", "image_size": [64, 64],
                                        "outputs": ["map_st", "map_ae"]})
    b.add_file("model.onnx", data=b"fp32 graph bytes")
    b.add_file("model.int8.onnx", data=b"int8 graph bytes")
    b.set_active(*active)
    return b


def _put_engine(b, precision, target, source="model.onnx", guard=True) -> None:
    """An engine + sidecar written the way `edge-ad compile` writes them (engine_cache.write)."""
    from edge_ad.runtime.backends import engine_cache

    key = engine_cache.engine_key(engine_cache.model_sha(b), precision, target)
    side = engine_cache.make_sidecar(b, precision, target, "", source, 8, "weak", 1024, 12.0)
    if guard:
        side["guard"] = {"passed": True}
    engine_cache.write(b, key, b"serialized engine " + precision.encode(), side)



def _orin():
    from edge_ad.runtime.backends.engine_cache import Target

    return Target("8.7", "10.3.0", "Orin")


def test_engine_fp16_built_from_model_onnx_on_an_int8_bundle_passes(tmp_path):
    """compile --precision fp16 on a quantized bundle leaves the active ONNX graph int8 (there is no
    model.fp16.onnx to switch to); run (backend tensorrt or auto, no precision) opens the fp16 engine
    through engine_cache.best, so doctor must not say run cannot start."""
    from edge_ad.runtime.backends import engine_cache

    b = _engine_bundle(tmp_path)
    _put_engine(b, "fp16", _orin())
    assert b.active_precision == "int8"
    run_picks = engine_cache.best(b, _orin(), prefer=b.active_precision)  # what TensorRTBackend opens
    assert run_picks is not None and run_picks.meta["precision"] == "fp16"
    c = d.engine_verdict(b, _orin(), required=True, precision=None)
    assert c.status == d.Status.OK and c.required is False, c
    assert d.exit_code([c]) == 0
    assert c.data["runs"] == "fp16" and c.data["usable"] == ["fp16"]
    assert "fp16 engine for Orin sm87, TensorRT 10.3.0 present and verified" in c.detail
    assert "active precision int8 has no usable engine" in c.detail


def test_engine_fp16_on_an_fp32_bundle_passes(tmp_path):
    """The usual flow without quantize: compile --precision best builds fp16 from model.onnx and the
    bundle's active precision stays fp32."""
    b = _engine_bundle(tmp_path, active=("model.onnx", "fp32"))
    _put_engine(b, "fp16", _orin())
    c = d.engine_verdict(b, _orin(), required=True)
    assert c.status == d.Status.OK and c.data["runs"] == "fp16", c


def test_engine_of_the_active_precision_refused_is_a_warning(tmp_path):
    """An int8 engine is there but never passed the guard (an interrupted compile): run falls back to the
    fp16 engine, so run can start, with a warning that says why int8 is not used and how to get it."""
    b = _engine_bundle(tmp_path)
    _put_engine(b, "fp16", _orin())
    _put_engine(b, "int8", _orin(), source="model.int8.onnx", guard=False)
    c = d.engine_verdict(b, _orin(), required=True)
    assert c.status == d.Status.WARN and c.data["runs"] == "fp16", c
    assert "never passed the accuracy guard" in c.detail and "--precision int8" in c.fix
    assert d.exit_code([c]) == 0 and d.exit_code([c], strict=True) == 1
    # with a guarded int8 engine too, int8 (the active precision) is the one run opens
    _put_engine(b, "int8", _orin(), source="model.int8.onnx")
    c = d.engine_verdict(b, _orin(), required=True)
    assert c.status == d.Status.OK and c.data["runs"] == "int8" and "int8 engine for Orin" in c.detail


def test_engine_asked_precision_only_and_none_usable(tmp_path):
    b = _engine_bundle(tmp_path)
    _put_engine(b, "fp16", _orin())
    # model.precision = "int8": run opens an int8 engine or none
    c = d.engine_verdict(b, _orin(), required=True, precision="int8")
    assert c.status == d.Status.FAIL and c.required and "no usable int8 engine" in c.detail, c
    assert "usable: fp16" in c.detail and "--precision int8" in c.fix and "model.precision empty" in c.fix
    assert d.engine_verdict(b, _orin(), precision="int8").status == d.Status.WARN  # backend auto: ONNX Runtime
    # no engine at all: run (tensorrt) cannot start
    empty = _engine_bundle(tmp_path / "2")
    c = d.engine_verdict(empty, _orin(), required=True)
    assert c.status == d.Status.FAIL and "no usable engine for Orin sm87" in c.detail
    assert "no engine of this model in" in c.detail and c.fix.startswith(f"edge-ad compile --bundle {empty.path} "
                                                                          "--precision best ")
    # an engine for another TensorRT (a JetPack upgrade) does not count
    other = _engine_bundle(tmp_path / "3")
    from edge_ad.runtime.backends.engine_cache import Target
    _put_engine(other, "fp16", Target("8.7", "10.4.0", "Orin"))
    assert d.engine_verdict(other, _orin(), required=True).status == d.Status.FAIL


@pytest.mark.parametrize("case", ["stale", "stale, precision asked", "unguarded", "none"])
def test_run_and_doctor_say_the_same_of_a_missing_engine(tmp_path, monkeypatch, case):
    """After a TensorRT upgrade (engine built by 10.3.0, the device now has 10.3.1) run said "no fp32 engine ...
    compile --precision fp32" (the active ONNX precision) and doctor "... --precision fp16": neither said the
    engine there was stale. Both now take engine_cache.no_engine: the same reason, and the same command,
    rebuilding the precision that was there (else the one asked, else best)."""
    from edge_ad.errors import InputError
    from edge_ad.runtime.backends import tensorrt as trt_mod
    from edge_ad.runtime.backends.engine_cache import Target

    class Cuda:
        @contextlib.contextmanager
        def activate(self, index):
            yield

        def close(self):
            pass

    now = Target("8.7", "10.3.1", "Orin")
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: object())
    monkeypatch.setattr(trt_mod, "cuda_api", lambda: Cuda())
    monkeypatch.setattr(trt_mod, "current_target", lambda trt, api, index=0: now)
    b = _engine_bundle(tmp_path, active=("model.onnx", "fp32"))
    precision = "int8" if case == "stale, precision asked" else None
    if case.startswith("stale"):
        _put_engine(b, "fp16", Target("8.7", "10.3.0", "Orin"))
        why, build_as = "the fp16 engine built by TensorRT 10.3.0 is stale (this device has 10.3.1)", precision or "fp16"
    elif case == "unguarded":   # a compile cut before its guard was recorded
        _put_engine(b, "int8", now, source="model.int8.onnx", guard=False)
        why, build_as = "never passed the accuracy guard", "int8"
    else:
        why, build_as = "no engine of this model in the bundle's engines/", "best"
    if precision:
        why = "no int8 engine for this model on sm87 with TensorRT 10.3.1"
    hint = f"edge-ad compile --bundle {b.path} --precision {build_as}"
    with pytest.raises(InputError) as run_says:
        trt_mod.TensorRTBackend(b, precision=precision, device="cuda:0")
    assert why in str(run_says.value) and str(run_says.value).endswith(f"Build one on this device: {hint}"), run_says.value
    doctor_says = d.engine_verdict(b, now, required=True, precision=precision)
    assert doctor_says.status == d.Status.FAIL and why in doctor_says.detail, doctor_says
    assert doctor_says.fix.startswith(f"{hint} (on this device"), doctor_says.fix


# ---------------------------------------------------------------------------- the model opens as run opens it
def test_backend_opens_the_model_as_run_does(tmp_path, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    ok = d.check_backend(b, "onnxruntime", None, "cpu")
    assert ok.status == d.Status.OK and "onnxruntime fp32 on cpu (model.onnx)" in ok.detail, ok
    # the precision asked has no graph: run refuses it (exit 2), so doctor fails it
    int8 = d.check_backend(b, "onnxruntime", "int8", "cpu")
    assert int8.status == d.Status.FAIL and int8.required, int8
    assert "model.int8.onnx: not found" in int8.detail
    assert f"edge-ad quantize --bundle {b.path} --precision int8" in int8.fix and "model.precision empty" in int8.fix
    # torch on a bundle without checkpoint.pt (or without torch)
    torch_be = d.check_backend(b, "torch", None, "cpu")
    assert torch_be.status == d.Status.FAIL and torch_be.required, torch_be
    assert "checkpoint.pt" in torch_be.detail or "PyTorch" in torch_be.detail
    assert 'model.backend = "onnxruntime"' in torch_be.fix
    # a graph that is no ONNX graph: the bundle verifies, the model does not open
    junk = d.check_backend(_bundle(tmp_path / "junk"), "auto")
    assert junk.status == d.Status.FAIL and "could not load" in junk.detail


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None, reason="OpenVINO is installed here")
def test_backend_openvino_not_installed(tmp_path, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    checks = d.run_checks(bundle=b.path, data_dirs=[tmp_path], backend="openvino", min_free_mb=1, service=False)
    be = _by(checks, "backend")[0]
    assert be.status == d.Status.FAIL and be.required and "pip install openvino" in be.detail, be
    assert "pip install openvino" in be.fix
    assert d.exit_code(checks) == 1 and "cannot start: backend" in d.summary(checks)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_backend_tensorrt_without_tensorrt_is_not_a_second_failure(tmp_path, tiny):
    """backend auto without TensorRT: run falls back to ONNX Runtime, so the model opens and tensorrt stays a
    warning; backend tensorrt: the tensorrt / engine checks say why (as before) and the model is not opened."""
    b = copy_bundle(tiny, tmp_path / "b")
    auto = d.run_checks(bundle=b.path, data_dirs=[tmp_path], backend="auto", min_free_mb=1, service=False)
    assert _by(auto, "tensorrt")[0].status == d.Status.WARN and not _by(auto, "tensorrt")[0].required
    assert _by(auto, "backend")[0].status == d.Status.OK and d.exit_code(auto) == 0
    trt = d.run_checks(bundle=b.path, data_dirs=[tmp_path], backend="tensorrt", min_free_mb=1, service=False)
    assert _by(trt, "tensorrt")[0].status == d.Status.FAIL and _by(trt, "engine")[0].status == d.Status.FAIL
    assert _by(trt, "backend")[0].status == d.Status.SKIP and d.exit_code(trt) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_required_and_missing_says_run_cannot_start(tmp_path, tiny):
    """backend tensorrt without TensorRT: run refuses to start (no fallback), so the tensorrt and engine lines
    say that, not "inference runs on ONNX Runtime", and offer model.backend = "onnxruntime"."""
    b = copy_bundle(tiny, tmp_path / "b")
    trt = d.run_checks(bundle=b.path, data_dirs=[tmp_path], backend="tensorrt", min_free_mb=1, service=False)
    for c in _by(trt, "tensorrt") + _by(trt, "engine"):
        assert 'edge-ad run cannot start with model.backend = "tensorrt"' in c.detail, c
        assert "ONNX Runtime runs" not in c.detail and "inference runs on ONNX" not in c.detail, c
        assert 'model.backend = "onnxruntime"' in c.fix, c
    auto = d.run_checks(bundle=b.path, data_dirs=[tmp_path], backend="auto", min_free_mb=1, service=False)
    assert "inference runs on ONNX Runtime" in _by(auto, "tensorrt")[0].detail   # true with auto
    jp6 = d.check_tensorrt(required=True, l4t="36.4.3")
    assert "python3-libnvinfer" in jp6.fix and 'model.backend = "onnxruntime"' in jp6.fix
    # JetPack 5: its TensorRT 8.5 is too old for edge-ad, and jetson/install.sh installs no bindings there
    for required in (True, False):
        jp5 = d.check_tensorrt(required=required, l4t="35.4.1")
        assert "python3-libnvinfer" not in jp5.fix and 'set model.backend = "onnxruntime"' in jp5.fix, jp5
        assert jp5.required == required and "8.5" in jp5.fix


def test_cli_backend_and_precision_run_refuses(tmp_path, tiny):
    b = copy_bundle(tiny, tmp_path / "b")
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\nbackend = "onnxruntime"\nprecision = "int8"\ndevice = "cpu"\n\n'
                   f'[source]\nuri = "synthetic://disc"\n\n[output]\njsonl = "{tmp_path / "results.jsonl"}"\n')
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1"])
    assert res.exit_code == 1, res.output
    assert "[FAIL] backend" in res.output and "model.int8.onnx: not found" in res.output
    assert "cannot start: backend" in res.output
    # run refuses it too, with the same reason
    run = runner.invoke(main, ["run", "--config", str(cfg), "--max-frames", "1"])
    assert run.exit_code == 2 and "model.int8.onnx: not found" in run.output, run.output
    # --backend overrides the config's backend as run's --backend does
    cfg.write_text(cfg.read_text().replace('precision = "int8"\n', ""))
    assert runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1"]).exit_code == 0
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--backend", "torch", "--json"])
    assert res.exit_code == 1, res.output
    be = {c["name"]: c for c in json.loads(res.output)["checks"]}["backend"]
    assert be["status"] == "fail" and be["detail"].startswith("backend torch, device cpu: run cannot open")



@pytest.mark.parametrize("active, words", [
    ({"graph": "model.int8.onnx", "precision": "fp32"}, "active: graph 'model.int8.onnx' is not a graph of "
                                                        "precision 'fp32' (expected model.onnx)"),
    ({"graph": "model.onnx", "precision": "fp64"}, "active.precision: 'fp64' is not one of ['fp32', 'fp16', 'int8']"),
])
def test_doctor_and_run_refuse_an_active_record_alike(tmp_path, tiny, active, words):
    """A manifest whose active.graph (model.int8.onnx, not there) is not the graph of its active.precision
    (fp32): doctor said run cannot start and to run 'edge-ad quantize --precision None', while run, eval and
    calibrate ran model.onnx (the backends open the graph of the precision). The record is inconsistent, so
    every command that opens the bundle refuses it the same way (exit 2 naming the fields), doctor too."""
    from edge_ad.errors import InputError

    b = copy_bundle(tiny, tmp_path / "b")
    manifest = json.loads(b.file("manifest.json").read_text())
    manifest["active"] = active
    b.file("manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError) as opened:
        Bundle.open(b.path)
    assert words in str(opened.value)
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\nbackend = "onnxruntime"\ndevice = "cpu"\n\n'
                   f'[source]\nuri = "synthetic://disc"\n\n[output]\njsonl = "{tmp_path / "results.jsonl"}"\n')
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1"])
    assert res.exit_code == 1 and "[FAIL] bundle" in res.output and str(opened.value) in res.output, res.output
    assert "None" not in res.output
    run = runner.invoke(main, ["run", "--config", str(cfg), "--max-frames", "1"])
    assert run.exit_code == 2 and f"error: {opened.value}" in run.output, run.output


def test_a_missing_active_graph_is_named_with_the_command_that_makes_it(tmp_path, tiny):
    """An INT8 active graph that is not there: doctor's fix said 'edge-ad quantize --precision None'."""
    b = copy_bundle(tiny, tmp_path / "b")
    b.set_active("model.int8.onnx", "int8")
    checks, _ = d.check_bundle(b.path)
    assert checks[0].status == d.Status.FAIL, checks[0]
    assert "model.int8.onnx: not found; run 'edge-ad quantize --precision int8'" in checks[0].detail, checks[0]


# ---------------------------------------------------------------------------- the bundle found as run finds it
def test_cli_config_with_deploy_dir(tmp_path, tiny):
    from edge_ad.calibration.deploy import CURRENT, RELEASES

    deploy = tmp_path / "deploy"
    deploy.mkdir()
    cfg = tmp_path / "edge-ad.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\nbackend = "onnxruntime"\ndevice = "cpu"\n\n'
                   f'[source]\nuri = "synthetic://disc"\n\n[output]\njsonl = "{tmp_path / "results.jsonl"}"\n')
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 1, res.output
    bundle = {c["name"]: c for c in json.loads(res.output)["checks"]}["bundle"]
    assert bundle["status"] == "fail" and bundle["required"] and "no 'current' link" in bundle["detail"], bundle
    assert "edge-ad bundle install" in bundle["fix"]
    # an installed release: doctor checks the bundle the 'current' link names, and opens it
    copy_bundle(tiny, deploy / RELEASES / "r1")
    (deploy / CURRENT).symlink_to(f"{RELEASES}/r1")
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 0, res.output
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["bundle"]["status"] == "ok" and str(deploy / RELEASES / "r1") in by["bundle"]["detail"]
    assert by["backend"]["status"] == "ok"
    # --bundle still overrides the config
    res = runner.invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--bundle", str(tmp_path / "x")])
    assert res.exit_code == 1 and "[FAIL] bundle" in res.output and "not found" in res.output


# ---------------------------------------------------------------------------- the systemd unit
def _fake_systemctl(tmp_path, monkeypatch, props: str) -> None:
    tool = tmp_path / "bin" / "systemctl"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text(f"#!/bin/sh\nprintf '{props}'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")


def test_service_crash_loop_and_failed_are_warnings(tmp_path, monkeypatch):
    _fake_systemctl(tmp_path, monkeypatch, "LoadState=loaded\\nActiveState=activating\\nSubState=auto-restart\\n"
                                           "UnitFileState=enabled\\nNRestarts=17\\n")
    c = d.check_service()
    assert c.status == d.Status.WARN and "auto-restart" in c.detail and "restarted 17 time(s)" in c.detail, c
    assert "journalctl -u edge-ad.service" in c.fix
    _fake_systemctl(tmp_path, monkeypatch, "LoadState=loaded\\nActiveState=failed\\nSubState=failed\\n"
                                           "UnitFileState=enabled\\n")
    c = d.check_service()
    assert c.status == d.Status.WARN and "failed" in c.detail and "journalctl -u edge-ad.service" in c.fix, c
    _fake_systemctl(tmp_path, monkeypatch, "LoadState=loaded\\nActiveState=active\\nSubState=running\\n"
                                           "UnitFileState=enabled\\nNRestarts=0\\n")
    c = d.check_service()
    assert c.status == d.Status.OK and c.detail == "edge-ad.service: active (running), enabled at boot", c
    _fake_systemctl(tmp_path, monkeypatch, "LoadState=not-found\\nActiveState=inactive\\nSubState=dead\\n")
    assert d.check_service().status == d.Status.SKIP


# ---------------------------------------------------------------------------- the service's environment file
def test_env_file_syntax(tmp_path):
    from edge_ad.config import read_env_file
    from edge_ad.errors import InputError

    f = tmp_path / "edge-ad.env"
    f.write_text("# secrets\n; also a comment\n\nA=1\n  B = two words  \nC=\"say \\\"hi\\\" \\\\ $x\"\n"
                 "D='a\\b \"c\"'\nE=a\\ b\nF=\n")
    assert read_env_file(f) == {"A": "1", "B": "two words", "C": 'say "hi" \\ $x', "D": 'a\\b "c"', "E": "a b",
                                "F": ""}
    for line, message in (("EDGE_AD_MQTT_PASSWORD s3cret", "no '='"), ("1X=1", "'1X' is not a variable name"),
                          ("P='s3cret", "quote that does not close")):
        f.write_text(f"# first\n{line}\n")
        with pytest.raises(InputError, match=f"{f}:2: .*{message}") as exc:
            read_env_file(f)
        assert "s3cret" not in str(exc.value)


def test_cli_config_reads_the_env_file_next_to_it(tmp_path, mosquitto_factory, tiny):
    """doctor --config checks with edge-ad.env applied as systemd's EnvironmentFile= applies it to the service:
    its broker credentials and its overrides, over the shell's values."""
    from edge_ad.mqtt.broker import make_password_file

    broker = mosquitto_factory(password_file=make_password_file(tmp_path / "passwd", {"line3-cam1": "s3cret"}))
    b = copy_bundle(tiny, tmp_path / "b")
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "config.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\nbackend = "onnxruntime"\ndevice = "cpu"\n\n'
                   f'[source]\nuri = "synthetic://disc"\n\n[output]\njsonl = "{tmp_path / "results.jsonl"}"\n\n'
                   f'[mqtt]\nurl = "{broker.url}"\noutbox_path = "{tmp_path / "outbox.sqlite"}"\n')
    args = ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"]
    runner = CliRunner()
    res = runner.invoke(main, args)
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["broker"]["status"] == "fail" and "env-file" not in by   # no file: the shell's environment only

    env = etc / "edge-ad.env"
    env.write_text("# as jetson/edge-ad.env\nEDGE_AD_MQTT_USERNAME=line3-cam1\nEDGE_AD_MQTT_PASSWORD='s3cret'\n"
                   f"EDGE_AD_SOURCE__URI=dir://{tmp_path / 'absent'}\n")
    res = runner.invoke(main, args, env={"EDGE_AD_MQTT_PASSWORD": "the-shell-s", "EDGE_AD_SOURCE__URI": None})
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["env-file"]["status"] == "ok" and str(env) in by["env-file"]["detail"], by["env-file"]
    assert "s3cret" not in res.output
    assert by["broker"]["status"] == "ok", by["broker"]            # the file's password, not the shell's
    assert by["source"]["status"] == "fail" and "absent" in by["source"]["detail"]   # the file's override
    import os
    assert "EDGE_AD_SOURCE__URI" not in os.environ                 # applied for the command only

    other = tmp_path / "other.env"                                 # --env-file names another file
    other.write_text("EDGE_AD_MQTT_USERNAME=line3-cam1\nEDGE_AD_MQTT_PASSWORD=s3cret\n")
    res = runner.invoke(main, args + ["--env-file", str(other)])
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["broker"]["status"] == "ok" and by["source"]["status"] == "ok" and str(other) in by["env-file"]["detail"]

    env.write_text("EDGE_AD_MQTT_PASSWORD s3cret\n")               # a malformed line: file:line, nothing applied
    res = runner.invoke(main, args[:-1])
    assert re.search(rf"\[FAIL\] env-file +{re.escape(str(env))}:1: no '='.*expected NAME=value", res.output), \
        res.output
    assert "s3cret" not in res.output
    assert res.exit_code == 1, res.output                          # the service could not get its values either
    env.write_text("# ok\n=s3cret\n")
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "s3cret" not in res.output, res.output
    by = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert by["env-file"]["status"] == "fail" and by["env-file"]["required"], by["env-file"]
    assert f"{env}:2: '' is not a variable name; expected NAME=value" in by["env-file"]["detail"], by["env-file"]
    res = runner.invoke(main, args + ["--env-file", str(tmp_path / "nope.env")])
    assert res.exit_code == 2 and "--env-file" in res.output


def test_an_outbox_an_older_edge_ad_kept_in_the_working_directory_fails_or_warns(tmp_path, tiny, monkeypatch):
    """A relative mqtt.outbox_path, whose outbox an edge-ad before 53e6b29 kept in the working directory (this one
    reads it from the config's folder): doctor fails as run refuses (exit 1, both files and the fix named) while the
    config folder has none and the old one holds messages, warns once it has one, and says nothing when the working
    directory is the config's folder."""
    from edge_ad.mqtt import Outbox

    b = copy_bundle(tiny, tmp_path / "b")
    var, etc = tmp_path / "var", tmp_path / "etc"
    var.mkdir()
    etc.mkdir()
    with Outbox(var / "outbox.sqlite") as ob:
        for _ in range(4):
            ob.put("result", "edge-ad/v1/s/d/result", b"{}")
    cfg = etc / "config.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\n\n[source]\nuri = "synthetic://disc"\n\n'
                   '[mqtt]\nurl = "mqtt://127.0.0.1:1"\noutbox_path = "outbox.sqlite"\n')
    monkeypatch.chdir(var)

    def outbox_checks():
        res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
        return res.exit_code, [c for c in json.loads(res.output)["checks"] if c["name"] == "outbox"]

    code, (check,) = outbox_checks()
    assert code == 1 and check["status"] == "fail" and check["required"], check
    assert check["detail"].startswith(f"{cfg}: mqtt.outbox_path = 'outbox.sqlite' is read from the config file's "
                                      "folder")
    assert f"{var / 'outbox.sqlite'}, holds 4 message(s) not delivered yet: starting would begin" in check["detail"]
    assert check["fix"].startswith(f'set mqtt.outbox_path = "{var / "outbox.sqlite"}" in {cfg}')
    assert check["data"] == {"old": str(var / "outbox.sqlite"), "new": str(etc / "outbox.sqlite"), "messages": 4}
    assert not (etc / "outbox.sqlite").exists()

    Outbox(etc / "outbox.sqlite").close()
    code, (check,) = outbox_checks()
    assert code == 0 and check["status"] == "warn", check
    assert check["detail"].endswith(f"and the line uses the one at {etc / 'outbox.sqlite'}: the older one's "
                                    "messages are not sent from there")
    monkeypatch.chdir(etc)
    assert outbox_checks()[1] == []


def test_an_empty_command_secret_in_the_env_file_fails_the_config_check(tmp_path, tiny):
    """``EDGE_AD_MQTT_COMMAND_SECRET=`` in the service's env file (a template left unfilled) would turn command
    signing off, or sign with an empty key: doctor says so, naming the variable, as run refuses to start."""
    b = copy_bundle(tiny, tmp_path / "b")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nbundle = "{b.path}"\n\n[source]\nuri = "synthetic://disc"\n\n'
                   f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\noutbox_path = "{tmp_path / "outbox.sqlite"}"\n')
    (tmp_path / "edge-ad.env").write_text("EDGE_AD_MQTT_COMMAND_SECRET=\n")
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"],
                             env={"EDGE_AD_MQTT_COMMAND_SECRET": None})
    assert res.exit_code == 1, res.output
    fails = [c for c in json.loads(res.output)["checks"] if c["name"] == "config" and c["status"] == "fail"]
    assert fails and fails[0]["required"], res.output
    assert "$EDGE_AD_MQTT_COMMAND_SECRET is set but empty" in fails[0]["detail"]
    assert "[from environment variable EDGE_AD_MQTT_COMMAND_SECRET" in fails[0]["detail"]


def test_fp16_on_an_x86_cpu_is_warned_of_at_run_and_by_doctor(tiny, tmp_path, monkeypatch, caplog):
    """ONNX Runtime runs FP16 slower than FP32 on an x86 CPU. A line asked to (model.precision = "fp16", or a
    bundle whose active graph is FP16 from an earlier quantize) ran it without a word; run now logs a warning
    and doctor gives one, each with the fix. Not on FP32, nor on an ARM CPU (not measured there)."""
    import edge_ad.runtime.backends.base as base
    from edge_ad.config import load_settings, parse_set_option
    from edge_ad.runtime.service import open_inspector
    from fixtures_bundle import add_stand_in_graph

    b = add_stand_in_graph(copy_bundle(tiny, tmp_path / "b"), "fp16")
    monkeypatch.setattr(base, "is_x86", lambda: True)

    def settings(precision):
        return load_settings(None, [parse_set_option("source.uri=synthetic://"),
                                    parse_set_option(f"model.bundle={b.path}"),
                                    parse_set_option("model.backend=onnxruntime"), parse_set_option("model.device=cpu"),
                                    parse_set_option(f"model.precision={precision}")])

    for precision, warned in (("fp16", True), ("fp32", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="edge_ad.runtime.service"):
            insp = open_inspector(b, settings(precision))
        insp.backend.close()
        said = "ONNX Runtime runs FP16 (model.fp16.onnx) slower than FP32 on an x86 CPU" in caplog.text
        assert said == warned and ('model.precision = "fp32"' in caplog.text) == warned, caplog.text
        c = d.check_backend(b, settings=settings(precision))
        assert c.status == (d.Status.WARN if warned else d.Status.OK), c
    c = d.check_backend(b, settings=settings("fp16"))
    assert "slower than FP32" in c.detail and 'model.precision = "fp32"' in c.fix and not c.required
    caplog.clear()
    with caplog.at_level("WARNING", logger="edge_ad.runtime.service"):
        open_inspector(b, settings("fp16"), warn=False).backend.close()   # doctor's: said as its check
    assert "slower" not in caplog.text
    monkeypatch.setattr(base, "is_x86", lambda: False)
    assert d.check_backend(b, settings=settings("fp16")).status == d.Status.OK


def test_probe_publish_with_an_invalid_config_reports_the_config(tmp_path):
    """doctor --config BAD --probe-publish gave the usage error '--probe-publish needs --config LINE.toml with an
    [mqtt] url' (exit 2) for a config that was given: the report, with its failing config line, never printed."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[source]\nuri = 'synthetic://disc'\n")
    res = CliRunner().invoke(main, ["doctor", "--config", str(bad), "--probe-publish", "--min-free-mb", "1"])
    assert res.exit_code == 1 and "[FAIL] config" in res.output and "needs --config" not in res.output, res.output
