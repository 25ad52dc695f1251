"""The real loop on real video files: decisions, stream drops, trigger mode, batching, bounds, ROI,
SIGTERM without losing a result, MQTT commands, systemd notifications, local outputs."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_ad.config import load_settings
from edge_ad.runtime.decision import find_regions
from edge_ad.runtime.outputs import JsonlLog, SnapshotStore, read_jsonl
from edge_ad.runtime.service import Service
from edge_ad.runtime.systemd import Notifier
from fixtures_bundle import (copy_bundle, defect_box, defect_video, gaussian_bundle, make_tiny_bundle,  # noqa: F401
                             part_frame, tiny_bundle, write_video)

EDGE_AD = [sys.executable, "-c", "from edge_ad.cli import main; main()"]


def _settings(tmp_path: Path, bundle, uri: str, **fields):
    """Settings from (section.key -> value) overrides, like --set flags."""
    ov = [(["model", "bundle"], str(bundle.path) if bundle is not None else "", "test"),
          (["model", "backend"], "onnxruntime", "test"),
          (["model", "device"], "cpu", "test"), (["source", "uri"], uri, "test"),
          (["output", "jsonl"], str(tmp_path / "results.jsonl"), "test"),
          (["telemetry", "interval_s"], 0.5, "test"), (["telemetry", "tegrastats"], False, "test")]
    for key, value in fields.items():
        ov.append((key.split("__"), value, "test"))
    return load_settings(None, ov, environ={})


def _run(settings, **kw) -> dict:
    return Service(settings, install_signals=False, **kw).run()


# ----------------------------------------------------------------------------- decisions on a video
def test_trigger_mode_inspects_every_frame_and_finds_the_planted_defects(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "parts.avi", n=40, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  output__snapshots_dir=str(tmp_path / "snaps"), telemetry__path=str(tmp_path / "tel.jsonl"))
    summary = _run(s)
    assert summary["frames"] == 40 and summary["dropped"] == 0 and summary["reason"] == "end of stream"
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert [r["source_index"] for r in recs] == list(range(40))
    assert [r["ng"] for r in recs] == labels
    # ids are UUIDs in their canonical form, as event ids are (they were 32 hex digits)
    assert all(str(uuid.UUID(r["id"])) == r["id"] for r in recs) and len({r["id"] for r in recs}) == 40
    cal = tiny_bundle.calibration()
    for r in recs:
        assert r["threshold"] == pytest.approx(cal.threshold, abs=1e-6)
        assert r["calibration_version"] == cal.version and r["model_hash"] == tiny_bundle.model_hash()
        assert r["decision"] == ("NG" if r["ng"] else "OK") and r["image_size"] == [96, 96]
        assert set(r["stages_ms"]) == {"capture", "queue", "preprocess", "infer", "score"}
        assert r["latency_ms"] >= r["stages_ms"]["infer"] >= 0
        if not r["ng"]:
            assert r["regions"] == [] and "snapshot" not in r
            continue
        # the defect region covers the planted blob
        x, y, w, h = defect_box(r["source_index"], 96)
        cx, cy = x + w / 2, y + h / 2
        reg = r["regions"][0]
        assert reg["x"] <= cx <= reg["x"] + reg["w"] and reg["y"] <= cy <= reg["y"] + reg["h"], (r, (x, y, w, h))
        assert reg["area"] > 0 and reg["score"] >= r["threshold"]
        assert len(r["regions"]) == 1
        snap = cv2.imread(r["snapshot"])
        assert snap is not None and snap.shape[:2] == (96, 96)
    assert len(list((tmp_path / "snaps").glob("*.jpg"))) == sum(labels)
    tel = read_jsonl(tmp_path / "tel.jsonl")
    assert tel and tel[-1]["frames"] == 40 and tel[-1]["ng"] == sum(labels)


def test_a_trained_model_through_the_loop_ranks_planted_defects_first(tmp_path, gaussian_bundle):
    """The real thing end to end: a Gaussian model trained on synthetic normal parts, the synthetic camera
    with planted defects (ground truth in every decision), ONNX Runtime, the loop."""
    from edge_ad.metrics import image_auroc

    s = _settings(tmp_path, gaussian_bundle, "synthetic://grain?size=64&defect_rate=0.3&count=60&seed=5",
                  source__mode="trigger", output__snapshots_dir=str(tmp_path / "snaps"))
    summary = _run(s)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert summary["frames"] == len(recs) == 60
    labels = [r["truth"]["label"] for r in recs]
    assert 10 <= sum(labels) <= 30
    assert image_auroc([r["score"] for r in recs], labels) >= 0.95
    assert all(r["ng"] for r in recs if r["truth"]["label"])            # every planted defect is caught
    assert all(r["regions"] for r in recs if r["ng"])
    assert len(list((tmp_path / "snaps").glob("*.jpg"))) == sum(r["ng"] for r in recs)


def test_a_result_names_the_model_hash_of_the_calibration_that_scored_it(tmp_path, gaussian_bundle):
    """Pipeline._infer read the calibration before scoring and the inspector's model_hash after: a Gaussian refit
    swapped in between (the MQTT calibrate's thread) gave a batch calibration v1 with the hash of v2's statistics,
    a pair no model has. The hash now comes from the calibration the batch was scored with; here the swap is
    made at that very point (in the head), deterministically."""
    from edge_ad.calibration import recalibrate, rollback
    from edge_ad.runtime.backends import open_backend
    from edge_ad.inspector import Inspector

    grain = copy_bundle(gaussian_bundle, tmp_path / "grain")
    insp = Inspector(grain, open_backend(grain, "onnxruntime", device="cpu"))
    try:
        recalibrate(grain, insp, [part_frame(6000 + i, 64, brightness=0.05) for i in range(30)], policy="max",
                    progress=False)
    finally:
        insp.backend.close()
    v2 = grain.calibration()
    v1 = rollback(grain, 1, by="test")
    assert (v1.version, v2.version) == (1, 2) and grain.model_hash(calibration=v1) != grain.model_hash(calibration=v2)
    s = _settings(tmp_path, grain, "synthetic://grain?size=64&count=3&seed=5", source__mode="trigger",
                  pipeline__max_batch=1)
    svc = Service(s, install_signals=False)
    real_head = svc.inspector.head

    def head(outputs, cal=None):            # the refit lands while the first batch is scored with v1
        maps = real_head(outputs, cal)
        if svc.inspector.calibration.version == 1:
            svc.inspector.set_calibration(v2)
        return maps

    svc.inspector.head = head
    svc.run()
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert [r["calibration_version"] for r in recs] == [1, 2, 2]
    assert {r["calibration_version"]: r["model_hash"] for r in recs} == {
        1: grain.model_hash(calibration=v1), 2: grain.model_hash(calibration=v2)}


def test_stream_mode_infers_the_newest_frame_and_counts_drops(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "long.avi", n=240, defect_every=5, size=160)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="stream", pipeline__queue_size=1,
                  pipeline__max_batch=1)
    summary = _run(s)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert summary["captured"] == 240
    assert summary["dropped"] > 0
    assert summary["frames"] + summary["dropped"] + summary["discarded_at_stop"] == 240
    assert len(recs) == summary["frames"]
    idx = [r["source_index"] for r in recs]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)      # newest-first never reorders
    assert all(r["ng"] == labels[r["source_index"]] for r in recs)


def test_trigger_mode_drops_nothing(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "long.avi", n=240, defect_every=5, size=160)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", pipeline__queue_size=1)
    summary = _run(s)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert summary["frames"] == 240 and summary["dropped"] == 0 and summary["discarded_at_stop"] == 0
    assert [r["source_index"] for r in recs] == list(range(240))
    assert [r["ng"] for r in recs] == labels


def test_a_nan_score_is_an_inference_error_never_ok_and_a_run_that_inspects_nothing_fails(tmp_path, tiny_bundle,
                                                                                           monkeypatch):
    from edge_ad import scoring
    from edge_ad.errors import RuntimeFailure

    video, _ = defect_video(tmp_path / "v.avi", n=3, size=96)     # fewer batches than MAX_CONSECUTIVE_ERRORS
    monkeypatch.setattr(scoring, "image_scores", lambda comb: np.full(comb.shape[0], np.nan, np.float32))
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger")
    with pytest.raises(RuntimeFailure, match=r"no frame was inspected: inference failed on all \d+ batches .*"
                                             r"image score nan of frame 0 .*expected a finite number") as err:
        _run(s)
    assert err.value.exit_code == 1
    assert not (tmp_path / "results.jsonl").exists() or read_jsonl(tmp_path / "results.jsonl") == []


def test_a_nan_score_costs_only_its_own_frame_in_a_batch(tmp_path, tiny_bundle, monkeypatch):
    from edge_ad import scoring

    real = scoring.image_scores
    video, labels = defect_video(tmp_path / "v.avi", n=24, defect_every=3, size=96)
    thr = tiny_bundle.calibration().threshold
    # every frame that would be NG scores NaN instead: its batch mates must still be decided
    monkeypatch.setattr(scoring, "image_scores", lambda comb: np.where(real(comb) > thr, np.nan, real(comb)))
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", pipeline__queue_size=24,
                  pipeline__max_batch=4)
    events = []
    svc = Service(s, install_signals=False)
    svc.pipeline.on_event = events.append
    summary = svc.run()
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert [r["source_index"] for r in recs] == [i for i, bad in enumerate(labels) if not bad]
    assert not any(r["ng"] for r in recs)
    lost = sum(e["frames"] for e in events if e["type"] == "inference_error")
    assert lost == sum(labels) and summary["inference_errors"] >= 1
    assert all("expected a finite number" in e["error"] for e in events if e["type"] == "inference_error")


def test_batches_form_when_frames_wait(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "v.avi", n=32, defect_every=4, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", pipeline__queue_size=8,
                  pipeline__max_batch=4)
    svc = Service(s, install_signals=False)
    real = svc.inspector.backend._backend

    class Slow:                      # a model that takes 30 ms per call, whatever the batch
        def __getattr__(self, name):
            return getattr(real, name)

        def infer(self, batch):
            time.sleep(0.03)
            return real.infer(batch)

    svc.inspector.backend._backend = Slow()
    summary = svc.run()
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert summary["frames"] == 32 and [r["ng"] for r in recs] == labels
    assert max(r["batch"] for r in recs) == 4 and summary["fps"] > 0


def test_bounds_max_frames_and_duration(tmp_path, tiny_bundle):
    video, _ = defect_video(tmp_path / "v.avi", n=20, size=64)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?loop=1", source__mode="trigger")
    summary = _run(s, max_frames=7)
    assert summary["frames"] == 7 and len(read_jsonl(tmp_path / "results.jsonl")) == 7
    assert summary["reason"] == "max frames reached"
    s = _settings(tmp_path / "d", tiny_bundle, f"file://{video}?loop=1&fps=50", source__mode="stream")
    t0 = time.monotonic()
    summary = _run(s, duration=1.0)
    assert summary["reason"] == "duration reached" and 0.9 <= time.monotonic() - t0 < 10
    assert 5 <= summary["frames"] <= 70          # paced at 50 fps for 1 s (a loaded machine may lag)


def test_roi_and_rotation_are_applied_before_inference(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "v.avi", n=10, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", source__roi=[8, 16, 80, 64],
                  source__rotate=90)
    _run(s)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert all(r["image_size"] == [80, 64] for r in recs)
    assert [r["ng"] for r in recs] == labels
    s = _settings(tmp_path / "bad", tiny_bundle, f"file://{video}", source__roi=[50, 50, 80, 80])
    with pytest.raises(Exception) as ei:
        _run(s)
    assert "source.roi" in str(ei.value) and "96x96" in str(ei.value) and "frame 0" in str(ei.value)


def test_a_folder_image_the_roi_does_not_fit_is_skipped_and_named(tmp_path, tiny_bundle, caplog):
    """dir:// with source.roi: one smaller image in the folder stopped the whole run (exit 2) with a message
    naming no file, and a restarted service replayed the folder up to it. It is now skipped with a warning
    naming it and counted (skipped_images), as an unreadable image is; a folder the ROI fits no image of
    is still an input error."""
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(5):
        size = 32 if i == 2 else 96
        cv2.imwrite(str(folder / f"{i:03d}.png"), part_frame(i, size, defect=(i == 3)))
    (folder / "004.png").write_text("truncated")                  # an unreadable one: counted too
    s = _settings(tmp_path, tiny_bundle, f"dir://{folder}", source__mode="trigger", source__roi=[8, 8, 64, 64],
                  telemetry__path=str(tmp_path / "tel.jsonl"))
    caplog.set_level("WARNING")
    svc = Service(s, install_signals=False)
    summary = svc.run()
    assert summary["frames"] == 3 and summary["reason"] == "end of stream"
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert [r["truth"]["file"] for r in recs] == ["000.png", "001.png", "003.png"]
    assert [r["ng"] for r in recs] == [False, False, True] and all(r["image_size"] == [64, 64] for r in recs)
    assert (f"skipped dir://{folder} 002.png: source.roi [8, 8, 64, 64] reaches outside the 32x32 frame"
            in caplog.text)
    assert svc.pipeline.stats()["skipped_images"] == 2
    assert read_jsonl(tmp_path / "tel.jsonl")[-1]["skipped_images"] == 2
    # a looping folder: the misfit is said once for the file, not at every pass; every skip is counted
    caplog.clear()
    s = _settings(tmp_path / "loop", tiny_bundle, f"dir://{folder}?loop=1", source__mode="trigger",
                  source__roi=[8, 8, 64, 64])
    svc = Service(s, install_signals=False, max_frames=12)        # 4 passes of 3 fitting images
    assert svc.run()["frames"] == 12
    said = [r.getMessage() for r in caplog.records if "002.png" in r.getMessage()]
    assert len(said) == 1 and "once per file" in said[0], said
    assert svc.pipeline.stats()["skipped_images"] >= 3
    # looping over a folder the ROI fits no image of: an input error, not an endless skip
    s = _settings(tmp_path / "none", tiny_bundle, f"dir://{folder}?loop=1", source__mode="trigger",
                  source__roi=[0, 0, 100, 100])
    with pytest.raises(Exception) as ei:
        _run(s)
    assert "source.roi [0, 0, 100, 100] fits none of the 5 images of dir://" in str(ei.value)
    s = _settings(tmp_path / "none2", tiny_bundle, f"dir://{folder}", source__mode="trigger",
                  source__roi=[0, 0, 100, 100])
    with pytest.raises(Exception) as ei:
        _run(s)
    assert "source.roi [0, 0, 100, 100] fits none of the 4 images dir://" in str(ei.value)


def test_a_folder_image_whose_name_is_not_utf8_is_reported_as_every_other(tmp_path, tiny_bundle, mosquitto):
    """dir:// on a folder holding an image named b'\\xff.png' (Python reads the byte as the lone surrogate
    '\\udcff'): its decision was lost, in results.jsonl and in the outbox alike ('a string is not valid Unicode'),
    and the run still ended as if nothing had happened. Every decision is reported: the name written with its byte
    as the 4 characters \\xff, as every record writes such a name; the folder's own name too, in 'source'."""
    from edge_ad.mqtt import BrokerSettings
    from edge_ad.mqtt.collector import Collector

    folder = Path(os.fsdecode(bytes(tmp_path) + b"/lot\xfe"))
    folder.mkdir()
    names = ["000.png", os.fsdecode(b"\xff.png"), "zz.png"]
    for i, name in enumerate(names):             # (OpenCV cannot write to such a path: encoded here)
        (folder / name).write_bytes(cv2.imencode(".png", part_frame(i, 96, defect=(i == 1)))[1].tobytes())
    s = _settings(tmp_path, tiny_bundle, f"dir://{folder}", source__mode="trigger",
                  output__snapshots_dir=str(folder / "snaps"), mqtt__url=mosquitto.url, mqtt__site="t",
                  mqtt__device="cam1", mqtt__outbox_path=str(tmp_path / "outbox.sqlite"), mqtt__validate_payloads=True)
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/#") as col:
        svc = Service(s, install_signals=False)
        summary = svc.run()
        recs = read_jsonl(tmp_path / "results.jsonl")
        files = ["000.png", "zz.png", "\\xff.png"]                # (in name order: the byte's surrogate sorts last)
        assert summary["frames"] == 3 and [r["truth"]["file"] for r in recs] == files
        assert [r["ng"] for r in recs] == [False, False, True] and svc.reporter.output_errors["outbox"] == 0
        assert {r["source"] for r in recs} == {f"dir://{tmp_path}/lot\\xfe"}
        assert recs[2]["snapshot"].startswith(f"{tmp_path}/lot\\xfe/snaps/")
        ids = {r["id"] for r in recs}
        assert col.wait_for(lambda c: ids <= c.unique_ids(), timeout=10), ids - col.unique_ids()
        sent = {m.json()["id"]: m.json() for m in col.of_kind("result")}
        assert [sent[r["id"]]["truth"]["file"] for r in recs] == files
        ng = [m.json() for m in col.of_kind("event") if m.json().get("type") == "ng"]
        assert [e["result_id"] for e in ng] == [recs[2]["id"]]


# ----------------------------------------------------------------------------- stopping
def _config_file(tmp_path: Path, bundle, uri: str, extra: str = "") -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\nbundle = "{bundle.path}"\nbackend = "onnxruntime"\ndevice = "cpu"\n\n'
                   f'[source]\nuri = "{uri}"\nmode = "trigger"\n\n[output]\njsonl = "results.jsonl"\n\n'
                   f'[telemetry]\ninterval_s = 0.5\ntegrastats = false\n{extra}')
    return cfg


def _wait_lines(path: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(read_jsonl(path)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} results after {timeout} s")


def _sigterm_run(tmp_path: Path, cfg: Path) -> tuple[dict, list]:
    proc = subprocess.Popen([*EDGE_AD, "run", "--config", str(cfg), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _wait_lines(tmp_path / "results.jsonl", 25)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    return summary, read_jsonl(tmp_path / "results.jsonl")


def test_sigterm_mid_run_drains_and_loses_no_result(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "v.avi", n=30, defect_every=5, size=96)
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}?loop=1",
                       "\n[pipeline]\nqueue_size = 8\nresult_queue_size = 64\n")
    summary, recs = _sigterm_run(tmp_path, cfg)
    assert summary["reason"] == "SIGTERM" and summary["drained"]
    # every frame accepted into the pipeline was inspected and written
    assert summary["captured"] == summary["frames"] == len(recs) and summary["discarded_at_stop"] == 0
    assert [r["frame"] for r in recs] == list(range(len(recs)))
    assert all(r["ng"] == labels[r["source_index"]] for r in recs)


def test_sigterm_with_mqtt_every_result_reaches_the_broker_or_the_outbox(tmp_path, tiny_bundle, mosquitto):
    from edge_ad.mqtt import BrokerSettings, Outbox, schema
    from edge_ad.mqtt.collector import Collector

    video, labels = defect_video(tmp_path / "v.avi", n=30, defect_every=5, size=96)
    outbox = tmp_path / "outbox.sqlite"
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}?loop=1",
                       f'path = "tel.jsonl"\n\n[mqtt]\nurl = "{mosquitto.url}"\nsite = "t"\ndevice = "cam1"\n'
                       f'outbox_path = "{outbox}"\nvalidate_payloads = true\n')
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/#") as col:
        summary, recs = _sigterm_run(tmp_path, cfg)
        ids = {r["id"] for r in recs}
        col.wait_for(lambda c: ids <= c.unique_ids(), timeout=10)
        got = col.unique_ids()
        left = Outbox(outbox)
        try:
            pending = {row.msg_id for row in left.fetch_after(0, 1_000_000)}
        finally:
            left.close()
        assert ids <= got | pending, f"{len(ids - got - pending)} results neither delivered nor in the outbox"
        assert len(pending) == 0                              # the broker was up: all flushed
        results = [m.json() for m in col.of_kind("result")]
        assert all(schema.errors("result", r) == [] for r in results)
        ng_events = [m.json() for m in col.of_kind("event") if m.json().get("type") == "ng"]
        assert {e["result_id"] for e in ng_events} == {r["id"] for r in recs if r["ng"]}
        status = [m.json() for m in col.of_kind("status")]
        assert status[-1]["state"] == "offline" and status[-1]["reason"] == "stopped"
        assert any(m.json().get("fps") is not None for m in col.of_kind("telemetry"))
        # telemetry.path holds the very payloads MQTT carried (was: a unix-float ts, no site, device, outbox)
        in_file = read_jsonl(tmp_path / "tel.jsonl")
        assert all(m.json() in in_file for m in col.of_kind("telemetry"))
        assert in_file[-1]["site"] == "t" and in_file[-1]["device"] == "cam1" and "inflight" in in_file[-1]["outbox"]
        assert schema.errors("telemetry", in_file[-1]) == []


class _SlowBackend:
    """A model that takes ``delay`` s per call; records calls made after close() (a backend closed under
    the loop)."""

    def __init__(self, real, delay: float):
        self._real, self.delay, self.closed, self.calls_after_close = real, delay, False, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def infer(self, batch):
        if self.closed:
            self.calls_after_close += 1
            raise RuntimeError("infer on a closed backend")
        time.sleep(self.delay)
        return self._real.infer(batch)

    def close(self):
        self.closed = True
        self._real.close()


def test_stop_past_the_drain_deadline_is_bounded_once_and_accounts_for_every_frame(tmp_path, tiny_bundle):
    """SIGTERM while many frames wait for a slow model: the drain deadline bounds the whole stop (not one
    wait in the supervisor and another in the shutdown), frames not inferred by then are counted in
    discarded_at_stop, every decision made is reported, and the backend is never used after it is closed."""
    limit = 4.0
    video, _ = defect_video(tmp_path / "v.avi", n=30, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?loop=1", source__mode="trigger", pipeline__queue_size=24,
                  pipeline__max_batch=1, pipeline__drain_timeout_s=limit)
    svc = Service(s, install_signals=False)
    slow = _SlowBackend(svc.inspector.backend._backend, 0.5)   # 24 queued frames: 12 s to drain
    svc.inspector.backend._backend = slow
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(summary=svc.run()), daemon=True)
    th.start()
    p = svc.pipeline
    deadline = time.monotonic() + 60
    while len(p.frames) < 24 and time.monotonic() < deadline:     # the frame queue is full
        time.sleep(0.05)
    t_stop = time.monotonic()
    svc.stop("test stop")
    th.join(60)
    assert not th.is_alive()
    stop_s = time.monotonic() - t_stop
    summary = out["summary"]
    # one deadline: the old code waited limit in the supervisor, then limit again in join() (>= 2 * limit)
    assert limit - 0.5 < stop_s < 2 * limit - 0.5, stop_s
    assert summary["drained"] is False and summary["discarded_at_stop"] > 0
    assert summary["captured"] == summary["frames"] + summary["discarded_at_stop"]
    assert summary["inference_errors"] == 0 and slow.calls_after_close == 0
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert len(recs) == summary["ok"] + summary["ng"] == summary["frames"] - summary["unreported"]
    # a batch still in the backend at the deadline finishes alone and changes no count
    for t in p._threads:
        t.join(10)
    assert summary["frames"] == p.inspected and summary["discarded_at_stop"] == p.discarded_at_stop
    assert slow.calls_after_close == 0 and p.inference_errors == 0


def test_decisions_the_reporting_never_got_are_counted_as_unreported(tmp_path, tiny_bundle):
    """A reporting thread that crashes (a bug) stops the loop; every decision made after it died, or
    waiting in the result queue, is counted in ``unreported``, not counted as reported and lost."""
    from edge_ad.errors import RuntimeFailure

    video, _ = defect_video(tmp_path / "v.avi", n=30, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", pipeline__queue_size=8,
                  pipeline__result_queue_size=2, pipeline__max_batch=4)
    svc = Service(s, install_signals=False)
    real = svc.reporter._update_drift
    calls = []

    def update_drift(score, ng, ts=None):
        calls.append(score)
        if len(calls) == 3:
            raise ValueError("a bug in the reporting")
        return real(score, ng, ts)

    svc.reporter._update_drift = update_drift
    with pytest.raises(RuntimeFailure, match="reporting: ValueError: a bug in the reporting"):
        svc.run()
    p = svc.pipeline
    assert p.unreported >= 1
    assert p.inspected == svc.reporter.reported + p.unreported
    assert p.captured == p.inspected + p.discarded_at_stop


def _with_a_stalled_reporting(svc, n: int):
    """Hold the reporting (a stalled disk) until ``n`` results wait in the result queue; return them."""
    gate, seen = threading.Event(), []
    orig = svc.reporter.report

    def slow(item):
        gate.wait(60)
        return orig(item)

    svc.reporter.report = slow

    def watch():
        t0 = time.monotonic()
        while len(svc.pipeline.results) < n - 1 and time.monotonic() - t0 < 60:   # one is in report()
            time.sleep(0.02)
        with svc.pipeline.results._cv:
            seen.extend(svc.pipeline.results._items)
        gate.set()

    threading.Thread(target=watch, daemon=True).start()
    return seen


def test_queued_results_hold_no_full_resolution_map_and_bounded_image_bytes(tmp_path, tiny_bundle):
    """A slow disk fills the result queue with NG parts: each queued item holds the map at map resolution
    (the reporting upsamples it), and the images held for snapshots stay within pipeline.result_queue_image_mb;
    past it a snapshot is skipped and counted, and the decision (regions included) is still reported."""
    size = 160
    video, labels = defect_video(tmp_path / "parts.avi", n=24, defect_every=2, size=size)
    frame_bytes = size * size * 3
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  output__snapshots_dir=str(tmp_path / "snaps"),
                  pipeline__result_queue_image_mb=4.5 * frame_bytes / 2**20)     # room for 4 images
    svc = Service(s, install_signals=False)
    seen = _with_a_stalled_reporting(svc, 24)
    summary = svc.run()
    assert summary["frames"] == 24 and summary["ng"] == sum(labels) == 12
    assert len(seen) >= 22
    held = 0
    for it in seen:
        arrays = [v for v in vars(it).values() if isinstance(v, np.ndarray)]
        assert all(a.shape[:2] != (size, size) or a.dtype == np.uint8 for a in arrays)   # no full-res float map
        if it.combined is not None:
            assert it.combined.size * 16 <= size * size                  # the map at map resolution
        extra = sum(a.nbytes for a in arrays) - (it.image.nbytes if it.image is not None else 0)
        assert extra <= 64 * 1024                                        # beside the image: small
        if it.image is not None:
            assert it.decision.ng and it.image_bytes == it.image.nbytes == frame_bytes
            held += it.image.nbytes
        else:
            assert it.image_bytes == 0
    assert 0 < held <= 4.5 * frame_bytes
    recs = read_jsonl(tmp_path / "results.jsonl")
    ng = [r for r in recs if r["ng"]]
    assert [r["ng"] for r in recs] == labels
    assert all(r["regions"] for r in ng)                                 # regions found by the reporting
    snaps = [r for r in ng if "snapshot" in r]
    assert summary["snapshots_skipped"] == len(ng) - len(snaps) > 0
    assert len(list((tmp_path / "snaps").glob("*.jpg"))) == len(snaps) >= 4
    assert svc.pipeline.queued_image_bytes == 0                          # every image released


def test_no_image_is_queued_when_no_snapshot_is_made(tmp_path, tiny_bundle):
    video, labels = defect_video(tmp_path / "parts.avi", n=10, defect_every=2, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger")   # no snapshots, no MQTT
    svc = Service(s, install_signals=False)
    seen = _with_a_stalled_reporting(svc, 10)
    summary = svc.run()
    assert len(seen) >= 8
    for it in seen:   # no full-resolution float map, no image: only the small map of NG frames
        assert [a.shape for a in vars(it).values() if isinstance(a, np.ndarray) and a.shape[:2] == (96, 96)] == []
    assert summary["ng"] == 5 and summary["snapshots_skipped"] == 0
    assert all(it.image is None for it in seen)
    assert any(it.combined is not None for it in seen)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert [r["ng"] for r in recs] == labels and all(r["regions"] for r in recs if r["ng"])


# ----------------------------------------------------------------------------- commands over MQTT
START_S = 120   # how long a line may take to start and take commands (a loaded machine, not a slow line)


def _start(tmp_path: Path, bundle, mosquitto, trigger: str = "command", **fields) -> Service:
    """A running service in trigger mode whose frames are released by the MQTT inspect command (or a
    plug-in ``trigger``); one defective part (a dark blob) in every 8, on a looping video. Returned once it
    takes commands: its retained ``online`` status, which its link publishes after subscribing to the command
    topics on the same connection, has reached the broker, and its pipeline has started. (It waited for the
    link's ``connected``, set a moment before that subscription, for at most 10 s and then went on anyway: on a
    loaded machine a command sent then was dropped by the broker, and its requester waited for a reply that
    never came.)"""
    frames = [part_frame(i, 96, defect=(i % 8 == 7)) for i in range(16)]
    video = write_video(tmp_path / "v.avi", frames)
    s = _settings(tmp_path, bundle, f"file://{video}?loop=1", source__mode="trigger", source__trigger=trigger,
                  output__snapshots_dir=str(tmp_path / "snaps"),
                  mqtt__url=mosquitto.url, mqtt__site="t", mqtt__device="cam1",
                  mqtt__outbox_path=str(tmp_path / "outbox.sqlite"), mqtt__validate_payloads=True, **fields)
    return _launch(Service(s, install_signals=False))


def _launch(svc: Service) -> Service:
    """Run ``svc`` (MQTT on) in a thread (``svc.thread``; its summary lands in ``svc.out``) and return once it
    takes commands, as ``_start`` says."""
    from edge_ad.mqtt import BrokerSettings
    from edge_ad.mqtt.collector import Collector

    out: dict = {}
    th = threading.Thread(target=lambda: out.update(summary=svc.run()), daemon=True)
    svc.thread, svc.out = th, out

    def online(c) -> bool:
        return any(m.json().get("state") == "online" for m in c.messages)

    with Collector(BrokerSettings(url=svc.link.settings.url), svc.link.topics.status, persistent=False) as col:
        th.start()
        col.wait_for(lambda c: online(c) or not th.is_alive(), START_S)   # a run that fails is not waited for
    deadline = time.monotonic() + START_S
    while not svc.pipeline.started_at and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert online(col) and svc.pipeline.started_at, (f"the line did not start and take commands within {START_S} s "
                                                     f"(running: {th.is_alive()})")
    return svc


@pytest.fixture
def running(tmp_path, tiny_bundle, mosquitto):
    svc = _start(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), mosquitto)
    yield svc
    svc.stop("test over")
    svc.thread.join(30)


@pytest.fixture
def caller(mosquitto):
    """call(name, args, ok=True) -> the reply's result (or error), checked against the reply schema."""
    from edge_ad.mqtt import BrokerSettings, schema
    from edge_ad.mqtt.requester import CommandClient

    with CommandClient(BrokerSettings(url=mosquitto.url)) as cc:
        def call(name, args=None, ok=True, timeout=30):
            r = cc.call("t", "cam1", name, args, timeout=timeout)
            assert schema.errors("reply", r) == [], r
            assert r["ok"] is ok, r
            return r.get("result") or r.get("error")

        yield call


def test_commands_drive_the_running_loop(running, caller, tmp_path):
    svc, call = running, caller
    st = call("status")
    assert st["state"] == "running" and st["pipeline"]["mode"] == "trigger" and st["calibration"]["version"] == 1
    assert st["birth"]["state"] == "online" and st["link"]["connected"] is True      # as docs/mqtt.md says
    assert st["pipeline"]["inspected"] == 0          # nothing released yet: trigger = command
    err = call("calibrate", {"frames": 20}, ok=False)   # live: no parts but those inspect releases
    assert err["code"] == "failed" and 'trigger = "command"' in err["message"] and "dir://" in err["message"]
    assert svc.pipeline.inspected == 0 and svc.pipeline.gate.pending == 0
    r = call("inspect", {"count": 8, "part_id": "P-17"})
    assert r["count"] == 8 and [x["part_id"] for x in r["results"]] == ["P-17"] * 8
    assert [x["ng"] for x in r["results"]] == [False] * 7 + [True]
    # threshold: runtime-only, then persisted as a new calibration version
    r = call("set_threshold", {"threshold": 1e6, "persist": False})
    assert r["persisted"] is False
    assert not any(x["ng"] for x in call("inspect", {"count": 8})["results"])
    # ... and it goes with the calibration it was set on: after a swap, what is announced decides
    r = call("rollback_calibration", {"version": 1})
    assert svc.effective_threshold() == r["threshold"] == call("inspect")["results"][0]["threshold"]
    assert [e for e in svc.events if e["type"] == "calibration"][-1]["threshold_in_force"] == r["threshold"]
    r = call("set_threshold", {"threshold": 0.5})
    assert r["calibration_version"] == 2 and svc.bundle.calibration().threshold == 0.5
    res = call("inspect", {"count": 2})["results"]
    assert all(x["calibration_version"] == 2 and x["threshold"] == 0.5 for x in res)
    r = call("rollback_calibration")
    assert r["version"] == 1 and r["previous_version"] == 2
    assert call("inspect")["results"][0]["calibration_version"] == 1
    # the history names the command and its requester (CommandClient sends its client id) of every change
    assert re.fullmatch(r"MQTT set_threshold \(client edge-ad-cli-\w+\): was [\d.e+-]+",
                        svc.bundle.calibration_at(2).source), svc.bundle.calibration_at(2).source
    rbs = svc.bundle.calibration_rollbacks()
    assert [(x["version"], x["previous_version"]) for x in rbs] == [(1, 1), (1, 2)]
    assert all(re.fullmatch(r"MQTT rollback_calibration \(client edge-ad-cli-\w+\)", x["by"]) for x in rbs), rbs
    # (snapshot: test_a_snapshot_says_whether_its_image_was_published)
    # pause: inspect is refused until resume
    assert call("pause", {"reason": "maintenance"})["paused"] is True
    assert call("status")["state"] == "paused"
    err = call("inspect", ok=False)
    assert err["code"] == "failed" and "paused" in err["message"]
    call("resume")
    assert call("inspect")["count"] == 1
    r = call("reload", {"what": "bundle"})
    assert r["bundle"]["model"] == "unchanged"
    # no model.deploy_dir: the birth listed update_model, then answered it 'failed'; it is not_available,
    # saying why (docs/mqtt.md: no handler on this device), and the birth lists what the line can run
    r = call("update_model", {"url": "file:///nonexistent.tar", "sha256": "0" * 64}, ok=False)
    assert r == {"code": "not_available", "message": "update_model needs model.deploy_dir in the config (a folder of "
                 "installed bundles whose 'current' release runs; see docs/runtime.md)"}, r
    assert "update_model" not in st["birth"]["commands"] and "update_model" not in svc.link.birth()["commands"]
    from edge_ad.runtime.commands import COMMAND_NAMES

    assert set(st["birth"]["commands"]) == set(COMMAND_NAMES) - {"update_model"}
    assert call("set_threshold", {"threshold": 2.0})["persisted"]
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert len(recs) == svc.pipeline.inspected


def test_a_snapshot_says_whether_its_image_was_published(tmp_path, tiny_bundle, mosquitto, caller):
    """A snapshot of the next frame, with its heat map, sent as an event: the reply says whether its image was
    published; one within image_min_interval_s of the last image sent is rate_limited (it said True before).
    The interval is an hour here, so that the second snapshot is within it however long the first reply takes
    (with the default 1 s, a loaded machine took longer than that between the two, and the second image was
    sent); the first is the line's first image (no NG part inspected before it), so it is sent."""
    svc = _start(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), mosquitto,
                 mqtt__image_min_interval_s=3600)
    try:
        r = caller("snapshot", {"publish": True, "note": "operator check"})
        assert Path(r["snapshot"]).is_file() and r["result"]["note"] == "operator check"
        r2 = caller("snapshot", {"publish": True})  # within image_min_interval_s of the last image sent
        for x in (r, r2):
            assert x["published"] is ("image_skipped" not in x)
        assert r["published"] is True
        assert r2["published"] is False and r2["image_skipped"] == "rate_limited"     # it said True before
        assert caller("snapshot")["published"] is False
    finally:
        svc.stop("test over")
        svc.thread.join(30)


def test_a_calibration_change_is_refused_while_another_process_wrote_one_not_reloaded_yet(running, caller):
    """A CLI calibrate / --rollback writes the bundle's calibration; until the run reloads it, an MQTT
    rollback_calibration, set_threshold or calibrate built on the run's older one would silently replace it
    (or roll back from the wrong version): refused, naming both versions and 'reload'."""
    svc, call = running, caller
    assert call("set_threshold", {"threshold": 0.5})["calibration_version"] == 2
    assert call("set_threshold", {"threshold": 0.7})["calibration_version"] == 3     # in force: v3, replaced v2
    svc.bundle.rollback_calibration(2)           # the CLI's --rollback on disk, not applied yet (no SIGHUP)
    for name, args in (("rollback_calibration", {}), ("set_threshold", {"threshold": 0.6})):
        r = call(name, args, ok=False)
        assert "this run still uses v3: send 'reload' first; nothing changed" in r["message"], r
    assert svc.inspector.calibration.version == 3
    call("reload", {"what": "bundle"})
    assert svc.inspector.calibration.version == svc.bundle.calibration().version
    assert call("set_threshold", {"threshold": 0.6})["persisted"] is True


def _gate_plugin(tmp_path, monkeypatch, module: str, cls: str, name: str | None = None):
    """A trigger plug-in module MODULE:CLS that keeps the gates it is given in MODULE.GATES (imported)."""
    import importlib

    (tmp_path / f"{module}.py").write_text(
        f"GATES = []\nclass {cls}:\n" + (f"    name = {name!r}\n" if name else "") +
        "    def __init__(self, gate):\n        GATES.append(gate)\n"
        "    def start(self):\n        pass\n    def stop(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(module)


@pytest.fixture
def plc_line(tmp_path, tiny_bundle, mosquitto, monkeypatch):
    """A running service on a trigger line whose parts a plug-in light barrier announces: (service, gate)."""
    line_plc3 = _gate_plugin(tmp_path, monkeypatch, "line_plc3", "Barrier")

    svc = _start(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), mosquitto, trigger="line_plc3:Barrier")
    yield svc, line_plc3.GATES[-1]
    svc.stop("test over")
    svc.thread.join(30)


def test_calibrate_over_mqtt_swaps_between_frames_and_leaves_defects_out(plc_line, caller, tmp_path):
    (svc, barrier), call = plc_line, caller
    before = call("inspect", {"count": 8})["results"]
    assert before[-1]["ng"] and before[0]["calibration_version"] == 1
    # live on a trigger line: the frames of the next parts; no part passes, no frame (none fired, published)
    r = call("calibrate", {"frames": 24, "timeout_s": 0.5}, ok=False)
    assert r["code"] == "failed" and "collected 0 of 24" in r["message"]
    assert svc.pipeline.inspected == 8 and svc.pipeline.gate.pending == 0
    # the next 24 parts (three of them defective) are collected while inspection goes on
    out = {}
    t = threading.Thread(target=lambda: out.update(r=call("calibrate", {"frames": 24, "policy": "max"}, timeout=120)))
    t.start()
    deadline = time.monotonic() + 10
    while not svc.pipeline._collectors and time.monotonic() < deadline:
        time.sleep(0.02)
    barrier.fire(24, "light barrier")
    t.join(120)
    r = out["r"]
    assert r["version"] == 2 and r["previous_version"] == 1 and r["frames"] == 24
    assert svc.pipeline.inspected == 32                      # the parts, reported as parts
    assert r["n_used"] == 21 and len(r["excluded"]) == 3
    assert svc.inspector.calibration.version == 2 == svc.bundle.calibration().version
    after = call("inspect", {"count": 8})["results"]
    assert all(x["calibration_version"] == 2 for x in after)
    assert [x["ng"] for x in after][-1] is True              # the planted defect is still found
    # from a folder of normal images
    folder = tmp_path / "normals"
    folder.mkdir()
    for i in range(24):
        cv2.imwrite(str(folder / f"n{i:02d}.png"), part_frame(500 + i, 96))
    r = call("calibrate", {"frames": 24, "source": f"dir://{folder}"}, timeout=120)
    assert r["version"] == 3 and r["n_used"] == 24
    # too few frames: refused before any is collected (a refit needs 20), the calibration in force stays
    r = call("calibrate", {"frames": 10, "source": f"dir://{folder}", "policy": "fpr:0.01"}, ok=False)
    assert r["code"] == "invalid_args" and "minimum of 20" in r["message"]
    assert svc.inspector.calibration.version == 3
    st = call("status")
    assert st["calibration"]["versions"] == [1, 2, 3] and st["calibration"]["versions_kept"] == 3
    assert st["calibration"]["version"] == 3 and st["calibration"]["rollback_to"] == 2
    events = [e["type"] for e in st["events"]]
    assert events.count("calibration") == 2
    # rollback without a version: the one the calibration in force replaced, not the next lower number
    assert call("rollback_calibration")["version"] == 2                          # v3 replaced v2
    assert call("set_threshold", {"threshold": 0.5})["calibration_version"] == 4  # v4 replaces v2
    r = call("rollback_calibration")
    assert r["version"] == 2 and r["previous_version"] == 4                      # not v3, rolled back from
    assert svc.inspector.calibration.version == 2 == svc.bundle.calibration().version
    # an 'edge-ad calibrate' of the same bundle is running (it holds the bundle's lock): refused at once
    fd = os.open(svc.bundle.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for name, args in (("calibrate", {"frames": 24, "source": f"dir://{folder}"}), ("rollback_calibration", {}),
                           ("set_threshold", {"threshold": 0.4})):
            r = call(name, args, ok=False)
            assert r["code"] == "failed" and "another calibration of this bundle is running" in r["message"]
    finally:
        os.close(fd)
    assert svc.inspector.calibration.version == 2 == svc.bundle.calibration().version
    assert svc.bundle.calibration_versions() == [1, 2, 3, 4]


def test_status_lists_the_newest_calibration_versions_whatever_the_history(tmp_path, tiny_bundle):
    """The status's calibration.versions listed every version kept: a line tuned 30 times a day keeps thousands
    (until a prune), and the reply grew by each. It now gives the newest 20, how many are kept, the version the
    run decides with and the one a rollback_calibration without a version goes back to (null when not kept)."""
    from edge_ad.runtime.service import STATUS_VERSIONS

    b = copy_bundle(tiny_bundle, tmp_path / "bundle")
    cal = b.calibration()
    for i in range(44):                                        # v2 ... v45
        b.write_calibration(cal.replace(version=0, created="", threshold=1.0 + i, policy="manual"))
    video = write_video(tmp_path / "v.avi", [part_frame(i, 96) for i in range(4)])
    svc = Service(_settings(tmp_path, b, f"file://{video}"), install_signals=False)
    try:
        st = svc.status()["calibration"]
        assert st == {"version": 45, "threshold": 44.0, "policy": "manual", "versions": list(range(26, 46)),
                      "versions_kept": 45, "rollback_to": 44}
        assert STATUS_VERSIONS == 20 and len(json.dumps(st)) < 300
        for v in range(2, 45):                                 # pruned: v1 and the one in force are left
            b.calibration_version_file(v).unlink()
        st = svc.status()["calibration"]
        assert (st["versions"], st["versions_kept"], st["rollback_to"]) == ([1, 45], 2, None)   # v44 is gone
    finally:
        svc.inspector.backend.close()


def test_a_stop_cancels_a_live_calibrate_which_is_answered_and_changes_nothing(tmp_path, tiny_bundle, mosquitto,
                                                                              caller):
    """SIGTERM while an MQTT calibrate collects live frames: the collection ends at once (it waited out its
    timeout, the stop waited for it, and the requester got no reply), the calibration in force is unchanged
    and the reply goes out before the link disconnects."""
    svc = _start(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), mosquitto, trigger="frame")
    out = {}

    def ask():   # what went wrong in here is kept, not only printed by the thread
        try:
            out["r"] = caller("calibrate", {"frames": 100000, "timeout_s": 600}, ok=False, timeout=START_S)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + START_S
    while not any(c.frames for c in list(svc.pipeline._collectors)):   # collecting live frames
        assert time.monotonic() < deadline and t.is_alive(), f"no frame collected within {START_S} s: {out}"
        time.sleep(0.02)
    svc.stop("SIGTERM")
    svc.thread.join(START_S)
    t.join(START_S)
    assert not svc.thread.is_alive() and svc.out["summary"]["reason"] == "SIGTERM"
    assert not t.is_alive() and "r" in out, out
    r = out["r"]
    assert r["code"] == "failed" and "cancelled after" in r["message"], r
    assert "the run is stopping (SIGTERM); the calibration in force is unchanged" in r["message"]
    assert svc.bundle.calibration_versions() == [1] and svc.bundle.calibration().version == 1
    # a calibrate that comes while the run stops is cancelled at once too
    col = svc.pipeline.collect_frames(5)
    assert col.done.is_set() and col.cancelled == "SIGTERM"


def test_commands_running_or_waiting_at_a_stop_are_answered_and_do_not_hold_it(tmp_path, tiny_bundle, mosquitto):
    """An inspect waiting for 20 frames at 2 fps, then set_threshold and pause queued behind it, then SIGTERM:
    none was answered (the queued ones were acknowledged to the broker, so they were simply gone) and the stop
    waited 10 s for the blocked inspect. The inspect is cancelled by the stop, the queued commands are not run,
    each of the three gets a 'failed' reply before the link disconnects, and the stop is quick."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_ad.mqtt import BrokerSettings, schema
    from edge_ad.mqtt.collector import Collector

    video = write_video(tmp_path / "v.avi", [part_frame(i, 96) for i in range(16)])
    s = _settings(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), f"file://{video}?loop=1&fps=2",
                  mqtt__url=mosquitto.url, mqtt__site="t", mqtt__device="cam1",
                  mqtt__outbox_path=str(tmp_path / "outbox.sqlite"), mqtt__validate_payloads=True)
    svc = _launch(Service(s, install_signals=False))      # takes commands: none sent below is lost
    th, out = svc.thread, svc.out
    requester = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def send(name, args, corr):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "fleet/replies", corr.encode()
        requester.publish(f"edge-ad/v1/t/cam1/cmd/{name}", json.dumps(args), qos=1,
                          properties=props).wait_for_publish(5)

    try:
        with Collector(BrokerSettings(url=mosquitto.url), "fleet/replies") as col:
            requester.connect(mosquitto.host, mosquitto.port)
            requester.loop_start()
            send("inspect", {"count": 20}, "inspect")
            deadline = time.monotonic() + 10
            while not svc.pipeline._requests and time.monotonic() < deadline:
                time.sleep(0.02)
            send("set_threshold", {"threshold": 0.25, "persist": False}, "set_threshold")
            send("pause", {"reason": "queued"}, "pause")
            deadline = time.monotonic() + 10
            while svc.link._commands._q.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            t0 = time.monotonic()
            svc.stop("SIGTERM")
            th.join(30)
            stop_took = time.monotonic() - t0
            assert col.wait_for(lambda c: len(c.messages) >= 3, 10)
            replies = {bytes(m.properties.CorrelationData).decode(): m.json() for m in col.messages}
    finally:
        requester.loop_stop()
        svc.stop("test over")
        th.join(30)
    assert not th.is_alive() and out["summary"]["reason"] == "SIGTERM"
    assert stop_took < 8 and out["summary"]["stop_s"] < 5, (stop_took, out["summary"])
    assert sorted(replies) == ["inspect", "pause", "set_threshold"] and len(col.messages) == 3
    for corr, r in replies.items():
        assert schema.errors("reply", r) == [] and r["ok"] is False and r["error"]["code"] == "failed", r
    msg = replies["inspect"]["error"]["message"]
    assert re.fullmatch(r"inspect: cancelled after \d+ of 20 frames: the run is stopping \(SIGTERM\)", msg), msg
    for name in ("set_threshold", "pause"):
        assert replies[name]["error"]["message"] == (f"{name}: not run: the device is stopping (SIGTERM); send it "
                                                      "again when it is back online")
    assert svc.pipeline.threshold_override is None and not svc.pipeline.paused.is_set()     # neither ran


def test_the_retained_calibration_says_which_threshold_decides(tmp_path, tiny_bundle, mosquitto, caller):
    """A dashboard reading the retained calibration showed the calibration's threshold while the config's
    [decision] threshold or a set_threshold without persist decided: it carries threshold_in_force, published
    again when that changes."""
    from edge_ad.mqtt import BrokerSettings
    from edge_ad.mqtt.collector import Collector

    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/calibration") as col:
        svc = _start(tmp_path, copy_bundle(tiny_bundle, tmp_path / "bundle"), mosquitto, decision__threshold=0.5)
        try:
            def seen(**want):
                ok = col.wait_for(lambda c: any(all(m.json().get(k) == v for k, v in want.items())
                                                for m in c.of_kind("calibration")), timeout=10)
                assert ok, [m.json() for m in col.of_kind("calibration")]

            cal_thr = svc.inspector.calibration.threshold
            assert cal_thr != 0.5
            seen(version=1, threshold=cal_thr, threshold_in_force=0.5)       # the config's decides
            caller("set_threshold", {"threshold": 0.9, "persist": False})
            seen(version=1, threshold=cal_thr, threshold_in_force=0.9)
            caller("set_threshold", {"threshold": 0.7})                       # persisted: the calibration's decides
            seen(version=2, threshold=0.7, threshold_in_force=0.7)
            assert svc.effective_threshold() == 0.7
            assert [e for e in svc.events if e["type"] == "calibration"][-1]["threshold_in_force"] == 0.7
        finally:
            svc.stop("test over")
            svc.thread.join(30)


def test_a_file_name_that_is_not_utf8_neither_stops_the_line_nor_fails_a_calibrate_that_took(tmp_path, tiny_bundle,
                                                                                              mosquitto, caller):
    """A calibration.json an earlier edge-ad wrote with a file name that is not UTF-8 (a lone surrogate, as
    '"\\udcfe"' in JSON) stopped 'run' with MQTT (its retained calibration could not be encoded), though doctor
    said it could start; the MQTT calibrate on a folder holding such an image put the new calibration in force
    and then replied 'failed', the retained calibration not updated. Such a name is read, stored and sent as
    '\\xfe' now: the line starts, and the calibrate is answered ok, its calibration retained."""
    from edge_ad.mqtt import BrokerSettings
    from edge_ad.mqtt.collector import Collector

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    old = {**bundle.calibration().to_dict(), "version": 2,
           "extra": {"recalibration": {"excluded_labels": ["/data/\udcfeold.png"]}}}
    data = (json.dumps(old, indent=2, sort_keys=True) + "\n").encode("utf-8")   # as such an edge-ad wrote it
    (bundle.calibration_version_file(2)).write_bytes(data)
    (bundle.path / "calibration.json").write_bytes(data)
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/cal"))
    folder.mkdir()
    for i in range(24):
        (folder / f"{i:02d}.png").write_bytes(cv2.imencode(".png", part_frame(300 + i, 96))[1].tobytes())
    (folder / os.fsdecode(b"\xfedefect.png")).write_bytes(cv2.imencode(".png", part_frame(9, 96, defect=True))[1]
                                                          .tobytes())
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/calibration") as col:
        svc = _start(tmp_path, bundle, mosquitto)
        try:
            def retained(version):
                ok = col.wait_for(lambda c: any(m.json().get("version") == version for m in c.of_kind("calibration")),
                                  timeout=10)
                assert ok, [m.json() for m in col.of_kind("calibration")]
                return [m.json() for m in col.of_kind("calibration") if m.json()["version"] == version][-1]

            assert retained(2)["calibration"]["extra"]["recalibration"]["excluded_labels"] == ["/data/\\xfeold.png"]
            r = caller("calibrate", {"frames": 30, "source": str(folder), "policy": "max"}, timeout=120)
            label = f"{folder.parent}/cal/\\xfedefect.png"
            assert r["version"] == 3 and [e["label"] for e in r["excluded"]] == [label], r
            assert svc.inspector.calibration.version == 3
            assert retained(3)["calibration"]["extra"]["recalibration"]["excluded_labels"] == [label]
        finally:
            svc.stop("test over")
            svc.thread.join(30)


def test_update_model_installs_checks_swaps_and_watches_health(tmp_path, mosquitto, caller):
    from edge_ad.atomic import sha256_file
    from edge_ad.calibration import deployment, install_bundle, pack_bundle
    from fixtures_bundle import make_tiny_bundle

    deploy = tmp_path / "deploy"
    first = make_tiny_bundle(tmp_path / "first")
    install_bundle(pack_bundle(first.path, tmp_path / "first.tar"), deploy, require_golden=False)
    golden = deploy / "golden"
    (golden / "good").mkdir(parents=True)
    (golden / "blob").mkdir()
    for i in range(6):
        cv2.imwrite(str(golden / "good" / f"{i}.png"), part_frame(700 + i, 96))
        cv2.imwrite(str(golden / "blob" / f"{i}.png"), part_frame(700 + i, 96, defect=True))
    second = make_tiny_bundle(tmp_path / "second", pool=4)        # another model (another hash)
    archive = pack_bundle(second.path, tmp_path / "second.tar")
    digest = sha256_file(archive)
    svc = _start(tmp_path, None, mosquitto, model__deploy_dir=str(deploy))
    try:
        call = caller
        assert svc.inspector.model_hash == first.model_hash()
        r = call("update_model", {"url": f"file://{archive}", "sha256": "f" * 64}, ok=False)
        assert "its sha256 does not match the command's" in r["message"] and digest[:8] not in r["message"]
        assert svc.inspector.model_hash == first.model_hash()   # (the file's sha256 is in the log, not the reply)
        r = call("update_model", {"url": f"file://{archive}", "sha256": digest, "activate": False}, timeout=120)
        assert r["activated"] is False and r["golden"]["passed"] and svc.inspector.model_hash == first.model_hash()
        assert r["golden_checked"] is True and "warnings" not in r
        assert r["signed"] is False and r["signature_verified"] is False   # a line without update_key checks none
        r = call("update_model", {"url": str(archive), "sha256": digest}, timeout=120)
        assert r["activated"] and r["model_hash"] == second.model_hash() and r["health"] == "pending"
        assert r["golden_checked"] is True and "warnings" not in r
        res = call("inspect", {"count": 24})["results"]
        assert {x["model_hash"] for x in res} == {second.model_hash()}
        assert [x["ng"] for x in res] == [i % 8 == 7 for i in range(res[0]["source_index"],
                                                                     res[0]["source_index"] + 24)]
        deadline = time.monotonic() + 30
        while deployment(deploy).health != "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deployment(deploy).health == "ok"
        health = [e for e in call("status")["events"] if e["type"] == "model_health"]
        assert [(e["status"], e["release"], e["golden_checked"]) for e in health] == [
            ("ok", r["install"]["release"], True)]
    finally:
        svc.stop("test over")
        svc.thread.join(30)


@pytest.mark.parametrize("rollback", ["done", "impossible", "failed"])
def test_update_models_rollback_after_a_failed_swap_sends_model_health(tmp_path, mosquitto, caller, monkeypatch,
                                                                      rollback):
    """update_model installed a release the loop then could not swap in, and rolled it back: the fleet got the
    command's failed reply only, no model_health event naming the release and the one rolled back to, as a
    health-check rollback sends. Nor any when that rollback could not be made ('previous' removed meanwhile:
    "impossible", as the health check's says it) or written (a full disk before 'current' moved back:
    "failed"): the event says so (rolled_back false), with the reply's words."""
    import errno

    from edge_ad.atomic import sha256_file
    from edge_ad.bundle import Bundle
    from edge_ad.calibration import deployment, install_bundle, pack_bundle
    from edge_ad.errors import RuntimeFailure
    from edge_ad.mqtt import BrokerSettings, schema
    from edge_ad.mqtt.collector import Collector
    from fixtures_bundle import make_tiny_bundle

    deploy = tmp_path / "deploy"
    first = install_bundle(pack_bundle(make_tiny_bundle(tmp_path / "first").path, tmp_path / "first.tar"), deploy,
                           require_golden=False)
    archive = pack_bundle(make_tiny_bundle(tmp_path / "second", pool=4).path, tmp_path / "second.tar")
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/event") as col:
        svc = _start(tmp_path, None, mosquitto, model__deploy_dir=str(deploy))
        try:
            real_replace = os.replace

            def full(src, dst, *args, **kw):                            # the 'current' link cannot be written
                if Path(dst).name == "current":
                    raise OSError(errno.ENOSPC, "No space left on device", str(dst))
                return real_replace(src, dst, *args, **kw)

            def fail(bundle, reason):
                if rollback == "impossible":
                    os.unlink(deploy / "previous")                      # removed by hand meanwhile
                elif rollback == "failed":
                    monkeypatch.setattr(os, "replace", full)            # the disk fills up after the install
                raise RuntimeFailure("out of device memory")

            monkeypatch.setattr(svc, "_swap_model", fail)
            err = caller("update_model", {"url": str(archive), "sha256": sha256_file(archive)}, ok=False, timeout=120)
            monkeypatch.setattr(os, "replace", real_replace)
            new = max(p.name for p in (deploy / "releases").iterdir())
            assert deployment(deploy).current == (first.release if rollback == "done" else new)
            said = f"update_model: {new} was installed but could not be swapped in (out of device memory)"
            if rollback == "done":
                assert err["message"].startswith(said) and f"'current' is back on {first.release}" in err["message"]
            else:
                assert err["message"] == said + (
                    f"; and it cannot be rolled back ({deploy}: no previous release to roll back to)"
                    if rollback == "impossible" else
                    f"; and it cannot be rolled back now ({deploy / 'current'}: no space left on device; 'current' "
                    f"is still {new}): free disk space, then reload or restart") + "; the running model is unchanged"

            def health(c):
                return [m.json() for m in c.of_kind("event") if m.json().get("type") == "model_health"]

            assert col.wait_for(lambda c: health(c), timeout=30)
            [ev] = health(col)
            assert schema.errors("event", ev) == [], ev
            if rollback == "done":
                assert (ev["status"], ev["rolled_back"], ev["rollback"], ev["release"], ev["rolled_back_to"],
                        ev["restored"]) == ("failed", True, "done", new, first.release, str(first.path))
                assert ev["reason"] == f"{said}; no golden check was done before it was switched in"
            else:
                assert (ev["status"], ev["rolled_back"], ev["rollback"], ev["release"]) == (
                    "failed", False, rollback, new)
                assert ev["reason"] == f"{err['message']}; no golden check was done before it was switched in"
            assert svc.inspector.model_hash == Bundle.open(first.path).model_hash()
        finally:
            svc.stop("test over")
            svc.thread.join(30)


def test_pacing_wait_is_not_capture_time_nor_latency(tmp_path, tiny_bundle):
    """A source paced at fps=4 waits 250 ms before each read after the first: the capture stage (and the
    latency, which starts with it) is the read, not that wait (it was 250 ms per frame)."""
    s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&count=4&fps=4", source__mode="trigger")
    assert _run(s)["frames"] == 4
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert len(recs) == 4
    for r in recs:
        assert r["stages_ms"]["capture"] < 125, r["stages_ms"]
        assert r["latency_ms"] >= r["stages_ms"]["capture"]


def test_drift_flag_and_event_from_ok_scores(tiny_bundle):
    from edge_ad.calibration import DriftMonitor
    from edge_ad.runtime.records import Decision, ResultItem
    from edge_ad.runtime.reporting import Reporter

    cal = tiny_bundle.calibration()
    events = []
    rep = Reporter(source_name="test", drift_factory=lambda c: DriftMonitor(c, window=50, limit=3.0),
                   calibration=cal, on_event=events.append)

    def decide(score):
        d = Decision(id="x", seq=0, source_index=0, ts=time.time(), score=score, threshold=cal.threshold,
                     ng=score > cal.threshold, calibration_version=cal.version, model_hash="h", backend="b",
                     precision="fp32", image_size=(8, 8), stages_ms={}, latency_ms=1.0, batch=1, trigger="t")
        rep.report(ResultItem(d))

    rng = np.random.default_rng(0)
    mean, std = cal.normal["mean"], cal.normal["std"]
    for s in rng.normal(mean, std, 60):
        decide(float(s))
    assert rep.drift_summary()["drift"] is False and rep.drift_summary()["judged"] is True
    for s in rng.normal(mean + 3 * std, std, 60):                 # brighter light: OK scores creep up
        decide(float(min(s, cal.threshold * 0.99)))
    summ = rep.drift_summary()
    assert summ["drift"] is True and summ["z"] > 3 and summ["direction"] == "up"
    assert [e["type"] for e in events] == ["drift"] and "recalibrate" in events[0]["message"]
    rep.reset_drift(cal, "rollback to v1")                        # a new calibration: measured afresh
    assert rep.drift_summary()["drift"] is False
    # the alarm raised by 'drift' ends with a 'drift_cleared' that says why
    assert [e["type"] for e in events] == ["drift", "drift_cleared"]
    assert events[1]["reason"] == "rollback to v1" and events[1]["drift"] is False
    assert events[1]["since"] == events[0]["since"] and events[1]["duration_s"] >= 0
    assert events[1]["parts_in_drift"] == summ["parts_in_drift"] >= 1
    rep.reset_drift(cal, "calibrate")                             # not flagged: nothing to clear
    assert len(events) == 2
    rep._drift_factory = None                                     # drift disabled (reload config)
    rep.reset_drift(cal, "reload config")
    assert rep.drift is None and rep.drift_summary() == {"drift": False, "enabled": False}


def test_a_drift_on_all_parts_says_so_not_ok_scores(tiny_bundle, caplog):
    """With most parts NG the drift monitor compares the median of all parts (basis 'all'), yet the WARNING and the
    event said 'OK scores drifted away ...' on a line where every part was NG. The subject is worded by the
    basis: the scores of all parts, with the NG share of the window."""
    from edge_ad.calibration import DriftMonitor
    from edge_ad.runtime.records import Decision, ResultItem
    from edge_ad.runtime.reporting import Reporter

    cal = tiny_bundle.calibration()
    caplog.set_level("WARNING", logger="edge_ad.runtime.reporting")

    def reporter_fed(scores):
        events = []
        rep = Reporter(source_name="test", drift_factory=lambda c: DriftMonitor(c, window=40, limit=3.0),
                       calibration=cal, on_event=events.append)
        for i, score in enumerate(scores):
            d = Decision(id=f"r{i}", seq=i, source_index=i, ts=1000.0 + i, score=score, threshold=cal.threshold,
                         ng=score > cal.threshold, calibration_version=cal.version, model_hash="h", backend="b",
                         precision="fp32", image_size=(8, 8), stages_ms={}, latency_ms=1.0, batch=1, trigger="t")
            rep.report(ResultItem(d))
        return events

    high = cal.threshold + 20 * cal.normal["std"]
    events = reporter_fed([high] * 40)                          # a line gone all NG (a lens cover, a new part)
    assert [e["type"] for e in events] == ["drift"] and events[0]["basis"] == "all", events
    assert events[0]["message"].startswith(
        "scores of all parts (every part NG in the window, too few OK ones to judge alone) drifted away from the "
        "calibration's normal distribution (z +"), events[0]["message"]
    assert events[0]["message"].endswith("look before recalibrating")
    assert caplog.records[-1].getMessage() == events[0]["message"]
    events = reporter_fed([cal.normal["p50"]] * 30 + [high] * 40)   # the NG parts become the majority
    assert [e["type"] for e in events] == ["drift"] and events[0]["message"].startswith(
        f"scores of all parts ({events[0]['ng_rate']:.0%} of the parts NG in the window, "), events[0]
    assert not any("OK scores" in r.getMessage() for r in caplog.records)


class _EventLink:
    """A stand-in MQTT link for a Reporter: records the events it would publish."""

    def __init__(self):
        self.events: list[dict] = []

    def publish_result(self, rec):
        pass

    def publish_event(self, payload, jpeg=None, **kw):
        self.events.append(dict(payload))

    def image_due(self):
        return False


def test_a_flapping_drift_statistic_sends_one_drift_and_one_drift_cleared(tiny_bundle, caplog):
    """Parts repeating a few scores (a looping clip): the window's median jumped across the limit and back inside
    the band every few parts, and each jump was a WARNING and an MQTT event. Now one event (and one WARNING) when
    drift is raised, one when it clears, with the statistic, the limits and how long it lasted."""
    from edge_ad.calibration import DriftMonitor
    from edge_ad.mqtt import schema
    from edge_ad.mqtt.payloads import iso_from_unix
    from edge_ad.runtime.records import Decision, ResultItem
    from edge_ad.runtime.reporting import Reporter

    cal = tiny_bundle.calibration()
    link = _EventLink()
    rep = Reporter(source_name="test", link=link, calibration=cal,
                   drift_factory=lambda c: DriftMonitor(c, window=50, limit=3.0, clear_after=50))
    caplog.set_level("WARNING", logger="edge_ad.runtime.reporting")
    p50, std = cal.normal["p50"], cal.normal["std"]
    cycle = [p50 + k * std for k in (-2.5, -1.0, -0.25, 1.5)]
    zs, flags = [], []
    for i in range(2000):
        score = cycle[i % 4] if i < 1600 else p50                 # then the parts score like the normals again
        d = Decision(id=f"r{i}", seq=i, source_index=i, ts=1000.0 + 0.1 * i, score=score, threshold=cal.threshold,
                     ng=False, calibration_version=cal.version, model_hash="h", backend="b", precision="fp32",
                     image_size=(8, 8), stages_ms={}, latency_ms=1.0, batch=1, trigger="t")
        rep.report(ResultItem(d))
        zs.append(abs(rep.drift_state.z))
        flags.append(rep.drift_state.drift)
    assert max(zs[100:1600]) > 3.0 and min(zs[100:1600]) <= 0.8 * 3.0   # it flapped across both limits
    assert [e["type"] for e in link.events] == ["drift", "drift_cleared"]
    warned = [r for r in caplog.records if "normal distribution" in r.getMessage()]
    assert len(warned) == 2 and "z -" in warned[0].getMessage() and "50 parts in a row" in warned[1].getMessage()
    start = flags.index(True)
    end = flags.index(False, start)                                # one episode: raised at start, cleared at end
    assert not any(flags[end:]) and 1600 < end
    raised, cleared = link.events
    assert raised["drift"] is True and raised["z"] < -3.0 and raised["limit"] == 3.0 and raised["parts_in_drift"] == 1
    assert raised["since"] == iso_from_unix(1000.0 + 0.1 * start)
    assert cleared["drift"] is False and cleared["since"] == raised["since"] and cleared["in_band"] == 50
    assert cleared["parts_in_drift"] == end - start + 1 and cleared["duration_s"] == pytest.approx(0.1 * (end - start))
    assert abs(cleared["z"]) <= 0.8 * 3.0 and cleared["limit"] == 3.0
    for ev in link.events:                                        # valid MQTT events
        assert schema.errors("event", {"schema_version": 1, "id": "e", "seq": 1, "ts": raised["since"],
                                       "site": "s", "device": "d", **ev}) == []
    assert rep.drift_summary()["drift"] is False and "since" not in rep.drift_summary()


def test_a_looping_clip_raises_drift_once_not_on_every_part(tmp_path, tiny_bundle, caplog):
    """4 parts in a loop, each inspected (trigger mode), default drift settings: until the window filled its
    median jumped between two of their scores, across the limit and back, and 400 parts raised and cleared drift
    74 times. Now once each."""
    video = write_video(tmp_path / "loop.avi", (part_frame(i, 96, seed=2) for i in range(4)))
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?loop=1", source__mode="trigger")
    caplog.set_level("WARNING", logger="edge_ad.runtime.reporting")
    svc = Service(s, install_signals=False, max_frames=400)
    assert svc.run()["frames"] == 400
    assert [e["type"] for e in svc.events if e["type"].startswith("drift")] == ["drift", "drift_cleared"]
    assert len([r for r in caplog.records if "normal distribution" in r.getMessage()]) == 2


def test_a_stop_while_drift_is_flagged_ends_it_with_a_drift_cleared_before_the_stopped_status(tmp_path, tiny_bundle,
                                                                                              mosquitto):
    """A clean stop with drift flagged sent no drift_cleared: the episode stayed open for the fleet, and the next
    run, measuring afresh, sent a second drift, while the docs say every drift is ended by a drift_cleared. The stop
    now sends one (reason "stopped", how long the drift lasted) before the 'stopped' status; each run's drift is
    ended by its own."""
    from edge_ad.mqtt import BrokerSettings, schema
    from edge_ad.mqtt.collector import Collector

    video = write_video(tmp_path / "bright.avi", (part_frame(i, 96, brightness=5.0) for i in range(8)))
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?loop=1", source__mode="trigger", drift__window=20,
                  mqtt__url=mosquitto.url, mqtt__site="t", mqtt__device="cam1",
                  mqtt__outbox_path=str(tmp_path / "outbox.sqlite"), mqtt__validate_payloads=True)
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/#") as col:
        for run in (1, 2):   # OK parts, brighter than the calibration's: drift is raised and still flagged at the end
            assert _run(s, max_frames=60)["ng"] == 0

            def drift_events(c):
                return [(m, m.json()) for m in c.messages if m.topic.endswith("/event")
                        and m.json().get("type", "").startswith("drift")]
            assert col.wait_for(lambda c: len(drift_events(c)) == 2 * run, timeout=10)
        events = [e for _, e in drift_events(col)]
        for raised, cleared in zip(events[::2], events[1::2]):
            assert (raised["type"], cleared["type"]) == ("drift", "drift_cleared")
            assert (cleared["reason"], cleared["drift"], cleared["since"]) == ("stopped", False, raised["since"])
            assert cleared["parts_in_drift"] >= 1 and cleared["duration_s"] >= 0
            assert cleared["calibration_version"] == tiny_bundle.calibration().version
            assert schema.errors("event", cleared) == []
        # each run's drift_cleared came before its 'stopped' status (a birth is sent again after a change: left out)
        said = [m.json().get("type") if m.topic.endswith("/event") else f"{m.json()['state']} {m.json().get('reason')}"
                for m in col.messages if m.topic.endswith(("/status", "/event"))]
        assert [x for x in said if x != "online connected"] == ["drift", "drift_cleared", "offline stopped"] * 2, said

def _ng_item(seq: int):
    """An NG decision of a 32x32 frame with its map, as the pipeline hands it to the reporting."""
    from edge_ad.runtime.records import Decision, ResultItem

    d = Decision(id=f"r{seq}", seq=seq, source_index=seq, ts=time.time(), score=0.9, threshold=0.5, ng=True,
                 calibration_version=1, model_hash="h", backend="b", precision="fp32", image_size=(32, 32),
                 stages_ms={}, latency_ms=1.0, batch=1, trigger="t")
    amap = np.zeros((8, 8), np.float32)
    amap[2:4, 2:4] = 0.9
    return ResultItem(d, image=np.full((32, 32, 3), 128, np.uint8), combined=amap)


@pytest.mark.parametrize("snapshots", [False, True])
def test_an_event_image_the_rate_limit_skips_is_never_encoded(tmp_path, monkeypatch, snapshots):
    """The reporting made the heat-map JPEG of every NG frame, and the link then skipped nearly all of them
    (image_skipped: rate_limited): on an all-NG line, CPU spent on every frame for nothing. The JPEG made for
    the event alone is made only when the link says an image is due; the events still say rate_limited, and
    images_skipped counts them. A snapshot file is made of every NG frame, as before."""
    from edge_ad import viz
    from edge_ad.mqtt import MqttLink, MqttSettings
    from edge_ad.mqtt.broker import free_port
    from edge_ad.runtime.reporting import Reporter

    encoded = []
    real = viz.encode_jpeg          # every JPEG ends there (the heat-map overlay's too)
    monkeypatch.setattr(viz, "encode_jpeg", lambda *a, **kw: encoded.append(1) or real(*a, **kw))
    link = MqttLink(MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", site="t", device="d",
                                 outbox_path=tmp_path / "outbox.sqlite", image_min_interval_s=3600))
    store = SnapshotStore(tmp_path / "snaps", 100, 10**9, 80) if snapshots else None
    rep = Reporter(source_name="test", link=link, snapshots=store)
    try:
        for seq in range(6):
            rep.report(_ng_item(seq))
        rows = link.outbox.fetch_after(0, 100)
        events = [json.loads(r.payload) for r in rows if r.kind == "event"]
        assert [e["result_id"] for e in events] == [f"r{i}" for i in range(6)]
        assert events[0]["image"]["bytes"] > 0 and [r.kind for r in rows].count("image") == 1
        assert all(e["image"] is None and e["image_skipped"] == "rate_limited" for e in events[1:])
        assert link.stats()["images_skipped"] == 5
        assert len(encoded) == (6 if snapshots else 1)
        if snapshots:
            assert len(list((tmp_path / "snaps").glob("*.jpg"))) == 6 and all("snapshot" in e for e in events)
        rep.event_image = False            # no event images: nothing encoded for the events
        rep.report(_ng_item(6))
        assert len(encoded) == (7 if snapshots else 1)
        last = json.loads(link.outbox.fetch_after(rows[-1].id, 100)[-1].payload)
        assert last["result_id"] == "r6" and "image" not in last and "image_skipped" not in last
    finally:
        link.stop(timeout=0)


def test_reload_config_and_bundle(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    video, _ = defect_video(tmp_path / "v.avi", n=4, size=96)
    s = _settings(tmp_path, bundle, f"file://{video}")
    s2 = _settings(tmp_path, bundle, f"file://{video}?loop=1", decision__threshold=5.0, drift__window=50,
                   telemetry__interval_s=2.0, telemetry__nvml=not s.telemetry.nvml)
    svc = Service(s, install_signals=False, reload_settings=lambda: s2)
    births = []
    svc.update_birth = lambda **fields: births.append(fields)
    try:
        assert svc._birth()["telemetry_interval_s"] == 0.5   # how long a device said online may be silent
        r = svc.reload("config")["config"]
        assert set(r["applied"]) == {"decision", "drift", "telemetry.interval_s"}
        assert {"telemetry_interval_s": 2.0} in births and svc._birth()["telemetry_interval_s"] == 2.0
        assert r["restart_required"] == ["source", "telemetry"]     # the NVML reader is made at start
        assert svc.pipeline.threshold_override == 5.0 and svc.effective_threshold() == 5.0
        assert svc.settings.source.uri == f"file://{video}"          # kept until a restart
        assert svc.settings.telemetry.nvml == s.telemetry.nvml and svc.settings.telemetry.interval_s == 2.0
        assert svc.reload("bundle")["bundle"]["calibration"] == "unchanged"
        cal = bundle.calibration()
        for _ in range(50):                      # OK scores far above the normal ones: drift is flagged
            svc.reporter._update_drift(cal.normal["mean"] + 4 * cal.normal["std"], False)
        assert svc.reporter.drift_summary()["drift"] is True
        # another process (edge-ad calibrate) writes a new calibration: reload puts it in force
        bundle.write_calibration(cal.replace(version=0, threshold=2.5, created=""))
        r = svc.reload("bundle")["bundle"]
        assert r["calibration_version"] == 2 and svc.inspector.calibration.threshold == 2.5
        # ... and ends the drift alarm, saying why
        cleared = [e for e in svc.events if e["type"] == "drift_cleared"]
        assert len(cleared) == 1 and cleared[0]["reason"] == "reload" and cleared[0]["calibration_version"] == 2
        assert svc.reporter.drift_summary()["drift"] is False
    finally:
        svc.inspector.backend.close()


def test_one_rule_for_the_threshold_in_force_after_a_calibration_and_the_replies_name_it(tmp_path, tiny_bundle):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    video, _ = defect_video(tmp_path / "v.avi", n=4, size=96)
    folder = tmp_path / "normals"
    folder.mkdir()
    for i in range(24):
        cv2.imwrite(str(folder / f"n{i:02d}.png"), part_frame(500 + i, 96))
    svc = Service(_settings(tmp_path, bundle, f"file://{video}", decision__threshold=0.5), install_signals=False)
    cmd = svc.commands
    calibrate = {"frames": 24, "source": f"dir://{folder}", "policy": "max"}
    try:
        r = cmd.calibrate(calibrate)                       # the config's threshold overrides the new one
        assert r["threshold"] != 0.5 and r["threshold_in_force"] == 0.5 == svc.effective_threshold()
        cmd.set_threshold({"threshold": 0.25, "persist": False})
        r = cmd.rollback_calibration({})                   # the this-run-only threshold goes: as before it
        assert r["version"] == 1 and r["threshold_in_force"] == 0.5 == svc.effective_threshold()
        cmd.set_threshold({"threshold": 0.3})              # persisted: the calibration holds it, not the config
        cmd.set_threshold({"threshold": 0.25, "persist": False})
        r = cmd.calibrate(calibrate)                       # ... so the new calibration's threshold decides
        assert r["threshold_in_force"] == r["threshold"] == svc.effective_threshold() != 0.5
        assert [e for e in svc.events if e["type"] == "calibration"][-1]["threshold_in_force"] == r["threshold"]
        # a model swap (update_model, reload of a new release) drops a this-run-only threshold too: it kept
        # deciding on the new model, whose defects then passed as OK
        cmd.set_threshold({"threshold": 1000.0, "persist": False})
        assert svc.effective_threshold() == 1000.0
        svc._swap_model(copy_bundle(tiny_bundle, tmp_path / "bundle2"), reason="test")
        assert svc.effective_threshold() == svc.inspector.calibration.threshold != 1000.0
    finally:
        svc.inspector.backend.close()


def test_run_warns_once_about_frames_of_another_bit_depth_than_the_training_images(tmp_path, tiny_bundle, caplog):
    """A model trained on 12-bit grey data in 16-bit images (manifest 'data') run on 8-bit colour frames:
    their scores do not match the training's; the run warns once, naming both bit depths, and puts the
    expectation back when it ends."""
    from edge_ad.data import image

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    bundle.manifest["data"] = {"bit_depth": 16, "channels": 1, "low_bits": 12}
    bundle.save_manifest()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), part_frame(i, 96))
    caplog.set_level("WARNING")
    summary = _run(_settings(tmp_path, bundle, f"dir://{folder}", source__mode="trigger"))
    assert summary["frames"] == 6
    warned = [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"{folder / '00.png'}: an 8-bit colour image, and {bundle.path} was trained on "
                                "16-bit (values within 12 bits) grey images (manifest.json 'data')"), warned
    assert image._expected is None


def test_mqtt_calibrate_leaves_out_or_refuses_the_bundles_training_images(tmp_path, tiny_bundle):
    """The MQTT calibrate command: a source folder's images that are the bundle's training images (by file
    or by content; the recorded training data on this machine, but its validation split) are left out with
    a warning in the reply, and refused when fewer than 20 others remain; a live calibration on a line
    that replays a folder holding training images is refused (some frames would be those)."""
    from edge_ad.errors import InputError

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(30):
        cv2.imwrite(str(good / f"t{i:02d}.png"), part_frame(700 + i, 96))
    val = sorted(good.iterdir())[:2]
    bundle.manifest["training"] = {"data": str(tmp_path / "data"), "n_train": 28,
                                   "val_images": [str(v) for v in val]}
    bundle.save_manifest()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(24):
        cv2.imwrite(str(mixed / f"n{i:02d}.png"), part_frame(500 + i, 96))
    for f in sorted(good.iterdir())[2:8]:          # six training images, copied under other names
        (mixed / f"old-{f.name}").write_bytes(f.read_bytes())
    video, _ = defect_video(tmp_path / "v.avi", n=4, size=96)
    svc = Service(_settings(tmp_path, bundle, f"file://{video}"), install_signals=False)
    try:
        with pytest.raises(InputError, match=re.escape(
                f"28 of the 30 images of {good} are images {bundle.path} was trained on (the recorded training "
                f"data {good}, the same files or the same bytes)")) as err:
            svc.commands.calibrate({"frames": 30, "source": f"dir://{good}", "policy": "max"})
        assert "the 2 other images are fewer than the 20 a calibration needs" in str(err.value)
        assert svc.bundle.calibration_versions() == [1] and svc.inspector.calibration.version == 1
        r = svc.commands.calibrate({"frames": 30, "source": f"dir://{mixed}", "policy": "max"})
        assert r["version"] == 2 and r["frames"] == 24
        assert r["warnings"][0].startswith(f"6 of the 30 images of {mixed} are images {bundle.path} was trained on")
    finally:
        svc.inspector.backend.close()
    svc = Service(_settings(tmp_path, bundle, f"dir://{good}"), install_signals=False)
    try:
        with pytest.raises(InputError, match=re.escape(
                f"live calibration: 28 of the 30 images of the line's source folder {good} are images "
                f"{bundle.path} was trained on")):
            svc.commands.calibrate({"frames": 20, "policy": "max"})
        assert svc.bundle.calibration_versions() == [1, 2]
    finally:
        svc.inspector.backend.close()


def test_plugin_trigger_releases_frames(tmp_path, tiny_bundle, monkeypatch):
    (tmp_path / "line_plc.py").write_text(
        "import threading\n"
        "class PlcTrigger:\n"
        "    name = 'plc'\n"
        "    def __init__(self, gate):\n"
        "        self.gate = gate\n"
        "    def start(self):\n"
        "        threading.Timer(0.2, lambda: [self.gate.fire(1, 'plc') for _ in range(3)]).start()\n"
        "    def stop(self):\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    video, labels = defect_video(tmp_path / "v.avi", n=20, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger", source__trigger="line_plc:PlcTrigger",
                  source__frames_per_trigger=2)
    summary = _run(s, max_frames=6)
    recs = read_jsonl(tmp_path / "results.jsonl")
    assert summary["frames"] == 6 and [r["source_index"] for r in recs] == list(range(6))
    assert {r["trigger"] for r in recs} == {"line_plc:PlcTrigger"}
    assert [r["ng"] for r in recs] == labels[:6]


def test_triggers_that_fire_while_paused_are_dropped_not_replayed():
    from edge_ad.runtime.triggers import TriggerGate

    gate = TriggerGate(frames_per_trigger=2)
    for bad in (0, -2, 1.5, True):          # a negative count used to cancel later real triggers
        with pytest.raises(ValueError, match="expected a whole number >= 1"):
            gate.fire(bad, "plc")
        with pytest.raises(ValueError):
            gate.fire_frames(bad, "cmd")
    gate.fire(3, "plc")
    assert gate.clear() == 6 and gate.pending == 0 and not gate.take()


def test_pause_in_a_gated_trigger_mode_drops_the_parts_that_passed(tmp_path, tiny_bundle, monkeypatch):
    line_plc2 = _gate_plugin(tmp_path, monkeypatch, "line_plc2", "Keep", name="plc")

    s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&fps=50", source__mode="trigger",
                  source__trigger="line_plc2:Keep", source__frames_per_trigger=2)
    svc = Service(s, install_signals=False, duration=2.5)
    svc.camera.source.live = True          # a camera: frames keep coming whether triggered or not

    def driver():
        time.sleep(0.5)
        svc.pipeline.pause()
        for _ in range(10):                # ten parts pass the light barrier while inspection is paused
            line_plc2.GATES[-1].fire(1, "plc")
            time.sleep(0.03)
        time.sleep(0.2)
        svc.pipeline.resume()              # and none after

    threading.Thread(target=driver, daemon=True).start()
    summary = svc.run()
    assert summary["frames"] == 0          # was 20: stale triggers inspected frames of no part
    assert svc.pipeline.triggers_dropped_paused == 20 and svc.pipeline.skipped_paused > 0


def test_a_failing_plugin_trigger_is_named_and_a_failing_stop_costs_nothing_else(tmp_path, tiny_bundle,
                                                                                 monkeypatch):
    from edge_ad.errors import InputError

    (tmp_path / "bad_plc.py").write_text(
        "class Boom:\n"
        "    name = 'boom'\n"
        "    def __init__(self, gate):\n"
        "        raise OSError('no PLC at 10.0.0.9')\n"
        "class StartFails:\n"
        "    def __init__(self, gate):\n"
        "        pass\n"
        "    def start(self):\n"
        "        raise RuntimeError('port busy')\n"
        "    def stop(self):\n"
        "        pass\n"
        "class StopFails:\n"
        "    def __init__(self, gate):\n"
        "        self.gate = gate\n"
        "    def start(self):\n"
        "        self.gate.fire(2, 'plc')\n"
        "    def stop(self):\n"
        "        raise RuntimeError('socket already closed')\n")
    (tmp_path / "broken_import.py").write_text("raise KeyError('missing setting')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, words in (("bad_plc:Boom", "Boom(gate) failed: OSError: no PLC"),
                        ("broken_import:make", "importing module 'broken_import' failed: KeyError"),
                        ("bad_plc:StartFails", "start() failed: RuntimeError: port busy")):
        s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&count=4", source__mode="trigger",
                      source__trigger=spec)
        with pytest.raises(InputError, match=re.escape(words)):
            _run(s, max_frames=2)
    s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&count=4", source__mode="trigger",
                  source__trigger="bad_plc:StopFails")
    summary = _run(s, max_frames=2)          # stop() raised after the drain: the rest still shuts down
    assert summary["frames"] == 2 and len(read_jsonl(tmp_path / "results.jsonl")) == 2


def test_command_trigger_without_mqtt_is_refused(tmp_path, tiny_bundle):
    from edge_ad.config import Settings
    from edge_ad.errors import InputError

    # it idled forever, inspecting nothing; run and doctor refuse it with the config (tests/test_config.py), and
    # settings made otherwise (load_settings without for_run, as here) are refused by the service all the same,
    # before the model opens or the result log is made
    jsonl = tmp_path / "results.jsonl"
    s = Settings.model_validate({"model": {"bundle": str(tiny_bundle.path)}, "output": {"jsonl": str(jsonl)},
                                 "source": {"uri": "synthetic://disc?size=64", "mode": "trigger", "trigger": "command"}})
    with pytest.raises(InputError, match=r"^source.trigger = 'command' \(with source.mode = 'trigger'\) releases "
                                         r"frames only on the MQTT inspect command, and MQTT is off \(no \[mqtt\]"):
        Service(s, install_signals=False)
    assert not jsonl.exists()


def test_gpio_trigger_with_a_stand_in_jetson_gpio(monkeypatch):
    import types

    from edge_ad.config import GpioSettings
    from edge_ad.errors import InputError
    from edge_ad.runtime.triggers import TriggerGate, load_trigger

    calls = {}
    gpio = types.ModuleType("Jetson.GPIO")
    gpio.BOARD, gpio.IN, gpio.RISING, gpio.FALLING, gpio.BOTH = "BOARD", "IN", "RISING", "FALLING", "BOTH"
    gpio.setmode = lambda mode: calls.setdefault("mode", mode)
    gpio.setup = lambda pin, d: calls.setdefault("setup", (pin, d))
    gpio.add_event_detect = lambda pin, edge, callback, bouncetime: calls.update(cb=callback, edge=edge,
                                                                              bounce=bouncetime)
    gpio.remove_event_detect = lambda pin: calls.setdefault("removed", pin)
    gpio.cleanup = lambda pin: calls.setdefault("cleanup", pin)
    jetson = types.ModuleType("Jetson")
    jetson.GPIO = gpio
    monkeypatch.setitem(sys.modules, "Jetson", jetson)
    monkeypatch.setitem(sys.modules, "Jetson.GPIO", gpio)
    gate = TriggerGate(frames_per_trigger=3)
    trig = load_trigger("gpio", gate, GpioSettings(pin=12, edge="falling", debounce_ms=5))
    trig.start()
    assert calls["setup"] == (12, "IN") and calls["edge"] == "FALLING" and calls["bounce"] == 5
    calls["cb"](12)
    calls["cb"](12)
    assert gate.pending == 6 and gate.take() and gate.pending == 5
    trig.stop()
    assert calls["removed"] == 12 and calls["cleanup"] == 12
    monkeypatch.setitem(sys.modules, "Jetson.GPIO", None)
    with pytest.raises(InputError, match="Jetson.GPIO"):
        load_trigger("gpio", gate, GpioSettings())
    with pytest.raises(InputError, match="cannot import module"):
        load_trigger("no_such_module_x:make", gate)


# ----------------------------------------------------------------------------- systemd
class _NotifySocket:
    """What systemd does with $NOTIFY_SOCKET: read every notification as it comes (``got``), on a thread."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.got: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self):
        while not self._done.is_set():
            try:
                self.got.append(self._sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                continue

    def notifier(self, watchdog_s: float) -> Notifier:
        return Notifier({"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
                         "WATCHDOG_PID": str(os.getpid())})

    def count(self, message: str) -> int:
        return sum(m == message for m in list(self.got))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(2)
        self._sock.close()


def test_systemd_ready_watchdog_and_stopping(tmp_path, tiny_bundle):
    video, _ = defect_video(tmp_path / "v.avi", n=10, size=64)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?loop=1&fps=100", source__mode="trigger")
    with _NotifySocket(tmp_path / "notify.sock") as systemd:
        n = systemd.notifier(0.1)
        assert n.enabled and n.watchdog_s == 0.1
        svc = Service(s, install_signals=False, notifier=n)
        th = threading.Thread(target=svc.run, daemon=True)
        th.start()
        time.sleep(0.8)
        t0 = time.monotonic()
        svc.stop("test")
        th.join(20)
        assert time.monotonic() - t0 < 5
        time.sleep(0.3)
    got = systemd.got
    assert got[0].startswith("READY=1")
    assert sum(m == "WATCHDOG=1" for m in got) >= 3
    assert any(m.startswith("STOPPING=1") for m in got)
    assert any(m.startswith("STATUS=") for m in got)


class _HeldReload:
    """A Service running in a thread whose model swaps (a SIGHUP reload: the bundle on disk counts as another
    model; a health rollback) wait, as for a batch still in the old backend, until ``let_go`` is set.
    ``fields``: more settings (``model__deploy_dir``)."""

    def __init__(self, tmp_path, bundle, monkeypatch, notifier=None, **fields):
        video, _ = defect_video(tmp_path / "v.avi", n=10, size=64)
        self.svc = Service(_settings(tmp_path, bundle, f"file://{video}?loop=1&fps=100", **fields),
                           install_signals=False, notifier=notifier)
        self.running = self.svc.inspector
        self.in_swap, self.let_go = threading.Event(), threading.Event()
        wait_idle = self.svc.pipeline.wait_idle

        def held(inspector, timeout):
            self.in_swap.set()
            self.let_go.wait(60)
            return wait_idle(inspector, timeout)

        monkeypatch.setattr(self.svc.pipeline, "wait_idle", held)
        monkeypatch.setattr(self.svc, "_another_model", lambda fresh: True)
        self.thread = threading.Thread(target=self.svc.run, daemon=True)

    def start_and_hup(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.svc.pipeline.inspected == 0 and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.svc._on_signal(signal.SIGHUP, None)
        assert self.in_swap.wait(30), "the reload did not reach the swap"

    def fed_while_held_then_swapped(self, systemd) -> None:
        """While the swap is held, WATCHDOG=1 keeps going out; let go, the swap completes; then the run stops."""
        try:
            before = systemd.count("WATCHDOG=1")
            deadline = time.monotonic() + 10
            while systemd.count("WATCHDOG=1") < before + 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert systemd.count("WATCHDOG=1") >= before + 5, systemd.got[-10:]
            assert not self.let_go.is_set() and self.thread.is_alive()
        finally:
            self.let_go.set()
        deadline = time.monotonic() + 30
        while self.svc.inspector is self.running and time.monotonic() < deadline:
            time.sleep(0.01)
        self.svc.stop("test")
        self.thread.join(30)
        assert not self.thread.is_alive() and self.svc.inspector is not self.running


def test_a_slow_sighup_reload_keeps_the_watchdog_fed(tmp_path, tiny_bundle, monkeypatch):
    """SIGHUP's reload ran on the supervisor thread, and a model swap may wait up to SWAP_WAIT_S (60 s) for a
    batch still in the old backend: no WATCHDOG=1 went out meanwhile, and systemd (WatchdogSec=30 in
    jetson/edge-ad.service) killed the line in the middle of the reload. The reload runs beside the supervisor
    now: the pings go on while the test holds the swap, which completes once let go."""
    with _NotifySocket(tmp_path / "notify.sock") as systemd:
        line = _HeldReload(tmp_path, tiny_bundle, monkeypatch, notifier=systemd.notifier(0.1))
        line.start_and_hup()
        line.fed_while_held_then_swapped(systemd)
    assert [e["reason"] for e in line.svc.events if e.get("type") == "model"] == ["reload"]


def test_a_slow_health_rollback_keeps_the_watchdog_fed(tmp_path, tiny_bundle, monkeypatch):
    """The health check's rollback swapped the restored model in on the supervisor thread too: no WATCHDOG=1
    while the swap waited (up to SWAP_WAIT_S) for a batch still in the failed model's backend. It swaps on a
    thread of its own now, as a SIGHUP reload does. A release that fails every other inference is rolled back
    while the line runs; the pings go on while the test holds the swap, which completes once let go."""
    from edge_ad.calibration import install_bundle, pack_bundle

    deploy = tmp_path / "deploy"
    good = install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    other = make_tiny_bundle(tmp_path / "B", image_size=(96, 96))
    install_bundle(pack_bundle(other.path, tmp_path / "b.tar"), deploy, require_golden=False)   # pending: watched
    with _NotifySocket(tmp_path / "notify.sock") as systemd:
        line = _HeldReload(tmp_path, None, monkeypatch, notifier=systemd.notifier(0.1),
                           model__deploy_dir=str(deploy))

        infer, calls = line.svc.inspector.backend.infer, []

        def broken(batch):   # every other batch (five in a row would stop the line)
            calls.append(1)
            if len(calls) % 2:
                raise RuntimeError("the new model fails")
            return infer(batch)

        monkeypatch.setattr(line.svc.inspector.backend, "infer", broken)
        line.thread.start()
        assert line.in_swap.wait(30), "the health check did not roll back to the swap"
        line.fed_while_held_then_swapped(systemd)
    assert line.svc.inspector.model_hash == tiny_bundle.model_hash()
    assert Path(line.svc.bundle.path).name == good.release
    [model] = [e for e in line.svc.events if e.get("type") == "model"]
    assert model["reason"].startswith("rollback after health check: error rate")


def test_a_stop_during_a_slow_sighup_reload_is_not_held_up_by_it(tmp_path, tiny_bundle, monkeypatch, caplog):
    """A SIGTERM during the reload waited for all of it (the supervisor was in it); now the stop drains and
    ends, waiting RELOAD_STOP_WAIT_S for the reload, and leaves the backend open when it still runs (never
    closed under a swap). An error of the reload other than an EdgeADError still ends the run, as before."""
    import edge_ad.runtime.service as service

    monkeypatch.setattr(service, "RELOAD_STOP_WAIT_S", 0.2)
    caplog.set_level("WARNING", logger="edge_ad.runtime.service")
    line = _HeldReload(tmp_path, tiny_bundle, monkeypatch)
    try:
        line.start_and_hup()
        line.svc.stop("test")
        line.thread.join(30)
        assert not line.thread.is_alive() and line.svc.finished and not line.let_go.is_set()
        assert "the backend is left open: the SIGHUP reload is still running past the stop" in caplog.text
    finally:
        line.let_go.set()
        line.svc._change_thread.join(30)
        line.svc.inspector.backend.close()

    video, _ = defect_video(tmp_path / "v2.avi", n=10, size=64)
    svc = Service(_settings(tmp_path, tiny_bundle, f"file://{video}?loop=1&fps=100"), install_signals=False)

    def broken(fresh):
        raise ZeroDivisionError("a bug in the reload")

    monkeypatch.setattr(svc, "_another_model", broken)
    svc._on_signal(signal.SIGHUP, None)
    with pytest.raises(ZeroDivisionError, match="a bug in the reload"):
        svc.run()


# ----------------------------------------------------------------------------- local outputs
# ----------------------------------------------------------------------------- local outputs
def test_find_regions_boxes_areas_peaks():
    m = np.zeros((40, 60), np.float32)
    m[5:10, 5:15] = 2.0
    m[7, 8] = 5.0
    m[30:33, 40:42] = 3.0
    m[20, 20] = 9.0           # one pixel: below min_area
    regs = find_regions(m, 1.0, min_area=2)
    assert [r.box for r in regs] == [(5, 5, 10, 5), (40, 30, 2, 3)]
    assert [r.area for r in regs] == [50, 6] and [r.peak for r in regs] == [5.0, 3.0]
    assert find_regions(m, 10.0) == () and len(find_regions(m, 1.0, max_regions=1)) == 1
    # an isolated map peak just above the threshold: bilinear upsampling lowers it below the threshold,
    # and the region comes from the map cell instead (scaled to image pixels)
    from edge_ad.runtime.decision import regions_for, upsample_one

    comb = np.zeros((8, 8), np.float32)
    comb[3, 5] = 1.05
    full = upsample_one(comb, (64, 64))
    assert full.max() < 1.0 and find_regions(full, 1.0) == ()
    (reg,) = regions_for(comb, full, 1.0)
    assert reg.box == (40, 24, 8, 8) and reg.area == 64 and reg.peak == pytest.approx(1.05)
    # pixels above the threshold, all in regions smaller than min_area: the strongest region at its true
    # size (the cell fallback is only for a map whose peak the upsampling lowered; it reported 64 px here)
    comb[3, 5] = 3.0
    full = upsample_one(comb, (64, 64))
    above = int((full > 1.0).sum())
    assert 0 < above < 500
    (reg,) = regions_for(comb, full, 1.0, min_area=500)
    assert reg.area == above and reg.peak == pytest.approx(float(full.max()))


def test_jsonl_rotation_keeps_every_line(tmp_path):
    log = JsonlLog(tmp_path / "r.jsonl", max_bytes=2048, backups=50)
    for i in range(200):
        log.write({"i": i, "pad": "x" * 40})
    log.close()
    files = sorted(tmp_path.glob("r.jsonl*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                   reverse=True)
    lines = [r["i"] for f in files for r in read_jsonl(f)]
    assert lines == list(range(200)) and log.rotations >= 5
    assert all(f.stat().st_size <= 2048 for f in files)
    log = JsonlLog(tmp_path / "s.jsonl", max_bytes=1024, backups=2)
    for i in range(200):
        log.write({"i": i, "pad": "x" * 40})
    log.close()
    assert sorted(p.name for p in tmp_path.glob("s.jsonl*")) == ["s.jsonl", "s.jsonl.1", "s.jsonl.2"]


def test_jsonl_never_writes_bare_nan(tmp_path):
    log = JsonlLog(tmp_path / "r.jsonl")
    log.write({"score": float("nan"), "ng": True, "stages_ms": {"x": float("inf")}, "ok": [1.0, float("-inf")]})
    log.close()
    line = (tmp_path / "r.jsonl").read_text()
    assert json.loads(line) == {"score": None, "ng": True, "stages_ms": {"x": None}, "ok": [1.0, None]}
    assert "NaN" not in line and "Infinity" not in line


def test_jsonl_writes_a_file_name_that_is_not_utf8_escaped_instead_of_losing_the_line(tmp_path):
    """A record holding a lone surrogate (a file name with a byte that is not UTF-8) raised UnicodeEncodeError: the
    line, a decision, was lost. It is written with the byte as \\xff, as every record writes such a name."""
    log = JsonlLog(tmp_path / "r.jsonl")
    log.write({"truth": {"file": "b\udcff.png"}, "score": float("nan"), "ng": True})
    log.close()
    assert json.loads((tmp_path / "r.jsonl").read_text("utf-8")) == {"truth": {"file": "b\\xff.png"}, "score": None,
                                                                    "ng": True}


def test_jsonl_torn_by_a_power_cut_next_run_starts_a_new_line(tmp_path):
    """A power cut tore the last line: the next run's first record must not be glued onto the fragment."""
    path = tmp_path / "r.jsonl"
    log = JsonlLog(path)
    for i in range(3):
        log.write({"id": f"a{i}"})
    log.close()
    path.write_bytes(path.read_bytes()[:-5])
    log = JsonlLog(path)
    log.write({"id": "NEW0"})
    log.write({"id": "NEW1"})
    log.close()
    assert [r["id"] for r in read_jsonl(path)] == ["a0", "a1", "NEW0", "NEW1"]
    log = JsonlLog(path)                 # a whole last line: no blank line added
    log.write({"id": "NEW2"})
    log.close()
    assert path.read_bytes().endswith(b'"NEW1"}\n{"id":"NEW2"}\n')


def test_jsonl_last_record_skips_a_torn_line_reads_back_across_blocks_and_into_the_rotated_file(tmp_path,
                                                                                                monkeypatch):
    """last_record (what the start compares with the outbox's last result): the last whole line, past a torn one
    and across the blocks it reads from the end; in ``.1`` when the file holds none; None for a pipe."""
    monkeypatch.setattr(JsonlLog, "TAIL_BLOCK", 16)
    path = tmp_path / "r.jsonl"
    log = JsonlLog(path, max_bytes=400)
    assert log.last_record() is None
    for i in range(3):
        log.write({"id": f"a{i}", "pad": "x" * 50})
    assert log.last_record() == {"id": "a2", "pad": "x" * 50}
    log.close()
    path.write_bytes(path.read_bytes()[:-5])      # a power cut tore the last line
    log = JsonlLog(path, max_bytes=400)
    assert log.last_record()["id"] == "a1"
    path.write_bytes(b"")                         # a rotation made it, and the first line was not written yet
    (tmp_path / "r.jsonl.1").write_bytes(b'{"id": "b0"}\n{"id": "b1"}\n')
    assert log.last_record() == {"id": "b1"}
    log.close()
    r, w = os.pipe()
    try:
        piped = JsonlLog(f"/dev/fd/{w}")
        assert piped.last_record() is None
        piped.close()
    finally:
        os.close(r)
        os.close(w)


def test_jsonl_to_a_pipe_writes_and_never_rotates():
    """``--jsonl /dev/stdout | jq``: a pipe has no size to ask and nothing to rename."""
    import os

    r, w = os.pipe()
    try:
        log = JsonlLog(f"/dev/fd/{w}", max_bytes=64)
        for i in range(3):
            log.write({"i": i, "pad": "x" * 40})
        log.close()
        os.close(w)
        w = None
        with os.fdopen(r, "rb") as fh:
            r = None
            lines = [json.loads(line)["i"] for line in fh.read().splitlines()]
        assert lines == [0, 1, 2] and log.rotations == 0
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)


def test_a_failed_snapshot_write_leaves_no_temp_file(tmp_path):
    st = SnapshotStore(tmp_path / "snaps")
    with pytest.raises(TypeError):
        st.save("20250101T000000_000_00000001_NG.jpg", "not bytes")    # fails after the temp file is made
    assert list((tmp_path / "snaps").iterdir()) == [] and st.count == 0
    (tmp_path / "snaps" / ".20250101T000001_000_00000002_NG.jpg.tmp").write_bytes(b"torn")  # a killed write
    (tmp_path / "snaps" / ".20250101T000002_000_00000003_NG.jpg.k2x9q_ab.tmp").write_bytes(b"torn")  # mkstemp's
    SnapshotStore(tmp_path / "snaps")
    assert list((tmp_path / "snaps").iterdir()) == []


def test_no_writer_follows_a_link_planted_at_its_temp_name(tmp_path, gaussian_bundle):
    """bundle pack, capture and the NG snapshots wrote through a fixed '.NAME.tmp' beside their output and moved it
    in: in a folder others may write, a link planted at that name made them overwrite the file it pointed at (as
    root, any file), and the output became that link. They now write through a temp file nobody can guess
    (atomic.writing: mkstemp); the planted link and its target are left alone."""
    from click.testing import CliRunner

    from edge_ad.calibration.package import pack_bundle, read_index
    from edge_ad.cli import main

    shared = tmp_path / "shared"
    shared.mkdir()
    victims = {}
    for name in ("b.tar", "frame_00000.png", "20250101T000000_000_00000001_NG.jpg"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("the victim's own content")
        (shared / f".{name}.tmp").symlink_to(victims[name])
    pack_bundle(gaussian_bundle.path, shared / "b.tar")
    res = CliRunner().invoke(main, ["capture", "--source", "synthetic://disc?size=64", "--out", str(shared),
                                    "--frames", "1"])
    assert res.exit_code == 0, res.output
    SnapshotStore(shared).save("20250101T000000_000_00000001_NG.jpg", b"jpeg bytes")
    for name, victim in victims.items():
        assert victim.read_text() == "the victim's own content", name
        assert not (shared / name).is_symlink() and (shared / name).is_file(), name
    assert read_index(shared / "b.tar").index["bundle"]["model_hash"] == gaussian_bundle.model_hash()
    assert (shared / "20250101T000000_000_00000001_NG.jpg").read_bytes() == b"jpeg bytes"


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder that exists and cannot be written in: a read-only one, or for root (whom mode bits do not
    stop) a sysfs folder, where no file can be created."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/kernel")


def test_an_unwritable_snapshot_folder_stops_run_at_start_as_doctor_says(tmp_path, tiny_bundle):
    """output.snapshots_dir that exists but cannot be written (the service user does not own it): run
    started, exited 0 and lost every NG snapshot, while doctor said 'run cannot start'. It is refused at
    start (InputError: exit 2) naming the folder, like an unwritable output.jsonl or telemetry.path, and
    before the result log is created."""
    from edge_ad import doctor
    from edge_ad.errors import InputError

    folder = _unwritable_folder(tmp_path)
    check = doctor.check_disk([folder], min_free_mb=0)[0]
    assert check.status == doctor.Status.FAIL and check.required
    with pytest.raises(InputError, match=rf"{re.escape(str(folder))}: cannot write in the snapshot folder"):
        SnapshotStore(folder)
    video, _ = defect_video(tmp_path / "v.avi", n=4, defect_every=2, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", output__snapshots_dir=str(folder))
    with pytest.raises(InputError, match="cannot write in the snapshot folder"):
        Service(s, install_signals=False)
    assert not (tmp_path / "results.jsonl").exists()
    st = SnapshotStore(tmp_path / "snaps")                  # a writable one: the probe leaves nothing behind
    assert list((tmp_path / "snaps").iterdir()) == [] and st.count == 0


class _FullDisk:
    """The JSONL log's file on a disk that fills up: write calls ``first`` .. ``first + calls - 1`` fail with
    ENOSPC, and the one before them takes only part of the line (as write(2) does on a nearly full disk)."""

    def __init__(self, fh, first: int, calls: int):
        self.fh, self.first, self.calls, self.n = fh, first, calls, 0

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def write(self, data):
        self.n += 1
        if self.n == self.first - 1:
            return self.fh.write(bytes(data[:10]))
        if self.first <= self.n < self.first + self.calls:
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)


def test_a_full_disk_under_the_jsonl_log_is_counted_and_inspection_goes_on(tmp_path, tiny_bundle, monkeypatch,
                                                                           caplog):
    from edge_ad import ratelimit

    monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 3600.0)   # one report per failure streak
    video, labels = defect_video(tmp_path / "v.avi", n=30, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger")
    svc = Service(s, install_signals=False)
    # frames 0-3 written; frame 4 torn half-way, 4-13 fail (10 writes); the disk has room again from frame 14
    svc.reporter.jsonl._fh = _FullDisk(svc.reporter.jsonl._fh, first=6, calls=10)
    with caplog.at_level("WARNING", logger="edge_ad.runtime.reporting"):
        summary = svc.run()
    assert summary["frames"] == 30 and summary["reason"] == "end of stream"
    assert summary["output_errors"] == {"jsonl": 10, "outbox": 0, "snapshots": 0, "telemetry": 0}
    assert svc.last_telemetry["output_errors"]["jsonl"] == 10
    recs = read_jsonl(tmp_path / "results.jsonl")              # the torn line does not spoil the next one
    assert [r["frame"] for r in recs] == [0, 1, 2, 3] + list(range(14, 30))
    assert [r["ng"] for r in recs] == [labels[r["source_index"]] for r in recs]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()   # not one line per frame
    assert sum("writing again" in r.getMessage() for r in caplog.records) == 1
    kinds = [(e["type"], e.get("output")) for e in svc.events]
    assert kinds.count(("output_error", "jsonl")) == 1 and kinds.count(("output_restored", "jsonl")) == 1


def test_failed_writes_held_back_from_the_report_are_told_at_the_stop(tmp_path, tiny_bundle, monkeypatch, caplog):
    """A failed write is logged (with an output_error event) at most once a minute per output: when the disk stayed
    full until the run stopped, the failures after the first report were in output_errors but in no log line and
    no event. The stop reports them: one ERROR and one output_error event with how many."""
    from edge_ad import ratelimit

    monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 3600.0)
    video, _ = defect_video(tmp_path / "v.avi", n=10, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger")
    svc = Service(s, install_signals=False)
    svc.reporter.jsonl._fh = _FullDisk(svc.reporter.jsonl._fh, first=4, calls=1000)   # frames 2-9 fail: 8
    with caplog.at_level("WARNING", logger="edge_ad.runtime.reporting"):
        summary = svc.run()
    assert summary["output_errors"]["jsonl"] == 8
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "No space left on device" in errors[0], errors
    assert errors[1].startswith("jsonl: 7 more failed write(s) since the last report (the last: OSError: [Errno 28]")
    assert errors[1].endswith("8 in all")
    reports = [e for e in svc.events if e["type"] == "output_error" and e["output"] == "jsonl"]
    assert [(e["failed"], e["failed_total"]) for e in reports] == [(1, 1), (7, 8)]
    assert "No space left on device" in reports[1]["error"]


def test_a_full_disk_under_the_telemetry_file_is_counted_like_the_other_outputs(tmp_path, tiny_bundle, monkeypatch,
                                                                              caplog):
    """It was a WARNING every interval, not in output_errors, with no output_error / output_restored event."""
    from edge_ad import ratelimit

    monkeypatch.setattr(ratelimit, "REPORT_EVERY_S", 3600.0)
    video, _ = defect_video(tmp_path / "v.avi", n=40, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?fps=40", source__mode="trigger",   # ~10 intervals
                  telemetry__path=str(tmp_path / "tel.jsonl"), telemetry__interval_s=0.01)
    svc = Service(s, install_signals=False)
    svc.telemetry_log._fh = _FullDisk(svc.telemetry_log._fh, first=3, calls=3)   # telemetry 2-4 fail
    with caplog.at_level("WARNING", logger="edge_ad"):
        summary = svc.run()
    assert summary["output_errors"] == {"jsonl": 0, "outbox": 0, "snapshots": 0, "telemetry": 3}
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("telemetry: writing failed (OSError: [Errno 28]")
    assert not any("telemetry file" in r.getMessage() for r in caplog.records)
    kinds = [(e["type"], e.get("output")) for e in svc.events]
    assert kinds.count(("output_error", "telemetry")) == 1 and kinds.count(("output_restored", "telemetry")) == 1
    assert read_jsonl(tmp_path / "tel.jsonl")[-1]["frames"] == 40


def test_the_run_summary_counts_the_messages_the_full_outbox_dropped(tmp_path, tiny_bundle):
    """With the broker down the full outbox dropped messages; the summary said output_errors.outbox 0 and
    outbox_left N, nothing of the drops. outbox_dropped counts those of this run (not the file's total)."""
    from edge_ad.mqtt import Outbox

    path = tmp_path / "outbox.sqlite"
    with Outbox(path, max_messages=1) as ob:   # an earlier run dropped 2
        for _ in range(3):
            ob.put("result", "t", b"{}")
    video, _ = defect_video(tmp_path / "v.avi", n=20, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1", mqtt__outbox_path=str(path),
                  mqtt__outbox_max_messages=5)
    summary = Service(s, install_signals=False).run()
    with Outbox(path) as ob:
        total = ob.dropped
    assert summary["outbox_left"] == 5 and summary["output_errors"]["outbox"] == 0
    assert summary["outbox_dropped"] == total - 2 >= 20 - 4
    assert summary["outbox_dropped_by"] == {"full": total - 2, "too_large": 0, "rejected": 0}


_KILLED_BETWEEN_OUTBOX_AND_LOG = """
import os, signal, sys, time
from edge_ad.mqtt import MqttLink, MqttSettings
from edge_ad.runtime.outputs import JsonlLog
from edge_ad.runtime.records import Decision, ResultItem
from edge_ad.runtime.reporting import Reporter

outbox, jsonl = sys.argv[1:3]
link = MqttLink(MqttSettings(url="mqtt://127.0.0.1:1", site="t", device="cam1", outbox_path=outbox))
log = JsonlLog(jsonl)
write = log.write
log.write = lambda rec: os.kill(os.getpid(), signal.SIGKILL) if log.lines == 2 else write(rec)
rep = Reporter(source_name="test", jsonl=log, link=link)
for i in range(3):   # killed at the third result: stored in the outbox, its line not written
    rep.report(ResultItem(Decision(id=f"r{i}", seq=i, source_index=i, ts=time.time(), score=0.1, threshold=0.5,
                                   ng=False, calibration_version=1, model_hash="h", backend="b", precision="fp32",
                                   image_size=(8, 8), stages_ms={}, latency_ms=1.0, batch=1, trigger="t")))
"""


def test_a_result_a_kill_kept_from_the_result_log_is_appended_at_the_next_start(tmp_path, tiny_bundle, caplog):
    """A result is stored in the MQTT outbox (fsync'd) before its JSONL line is written: after a kill -9
    between the two, MQTT had a result that results.jsonl, the line's audit trail, lacked for good. The outbox
    keeps its last result and the id of the one before; the next start appends that result to the log when the
    log ends with the one before, then goes on: the log and MQTT hold the same results, in the same order."""
    from edge_ad.mqtt import Outbox

    outbox, jsonl = tmp_path / "outbox.sqlite", tmp_path / "results.jsonl"
    p = subprocess.run([sys.executable, "-c", _KILLED_BETWEEN_OUTBOX_AND_LOG, str(outbox), str(jsonl)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [r["id"] for r in read_jsonl(jsonl)] == ["r0", "r1"]
    with Outbox(outbox) as ob:
        assert ob.last_result()[0] == "r1"
    caplog.set_level("WARNING", logger="edge_ad.runtime.reporting")
    s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&count=2&fps=100", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1", mqtt__outbox_path=str(outbox))
    assert Service(s, install_signals=False).run()["frames"] == 2
    logged = read_jsonl(jsonl)
    with Outbox(outbox) as ob:                      # the broker was never reached: every result is still there
        sent = [json.loads(r.payload) for r in ob.fetch_after(0, 100) if r.kind == "result"]
    assert [r["id"] for r in logged] == [r["id"] for r in sent] and [r["id"] for r in logged][:3] == ["r0", "r1", "r2"]
    restored = logged[2]
    assert {k: v for k, v in sent[2].items() if k not in ("schema_version", "seq", "site", "device")} == restored
    assert [r.getMessage() for r in caplog.records if "appended result" in r.getMessage()] == [
        f"{jsonl}: appended result r2 (frame 2, {restored['ts']}), which the MQTT outbox stored before the last stop "
        "but whose line was not written (the run was killed between the two)"]
    s = _settings(tmp_path, tiny_bundle, "synthetic://disc?size=64&count=1&fps=100", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1", mqtt__outbox_path=str(outbox),
                  output__jsonl=str(tmp_path / "other.jsonl"))
    Service(s, install_signals=False).run()         # another log, empty: not the place for the outbox's last
    assert len(read_jsonl(tmp_path / "other.jsonl")) == 1 and len(read_jsonl(jsonl)) == 5


def test_the_summary_fps_is_over_the_inspection_not_the_stop(tmp_path, tiny_bundle):
    """The summary's fps and duration_s counted the whole stop too: the outbox flush against a hung or
    unreachable broker (up to 10 s) made a 20 fps line read 1.8 fps. duration_s now ends when the queues
    are drained, fps is frames over it, and stop_s is the rest (closing outputs, the outbox flush)."""
    video, _ = defect_video(tmp_path / "v.avi", n=20, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1",
                  mqtt__outbox_path=str(tmp_path / "outbox.sqlite"))
    svc = Service(s, install_signals=False)
    t0 = time.monotonic()
    summary = svc.run()
    wall = time.monotonic() - t0
    assert summary["frames"] == 20 and summary["outbox_left"] >= 20
    assert summary["stop_s"] >= 1.9                     # the link waits 2 s for the unreachable broker
    assert summary["duration_s"] + summary["stop_s"] <= wall + 0.01 and summary["duration_s"] < wall - 1.8
    assert summary["fps"] == pytest.approx(20 / summary["duration_s"], rel=0.01)


def test_a_damaged_outbox_file_does_not_stop_the_line(tmp_path, tiny_bundle):
    """A damaged outbox file stopped every start with exit 1 (no frame inspected, the unit restarting every
    5 s). The run inspects, with a fresh outbox, and its summary names the moved file."""
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"\x13\x37" * 3000)
    video, _ = defect_video(tmp_path / "v.avi", n=10, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1", mqtt__outbox_path=str(path))
    summary = Service(s, install_signals=False).run()
    assert summary["frames"] == 10 and len(read_jsonl(tmp_path / "results.jsonl")) == 10
    assert summary["outbox_reset"].startswith(f"{path}.corrupt-")
    assert summary["outbox_left"] >= 10 + 1            # the results, and the outbox_reset event first
    from edge_ad.mqtt import Outbox

    with Outbox(path) as ob:
        first = json.loads(ob.fetch_after(0, 1)[0].payload)
    assert first["type"] == "outbox_reset" and first["moved_to"] == summary["outbox_reset"]


def _outbox_left_behind(tmp_path: Path, bundle, broker_url: str, messages: int) -> tuple[Path, Path, Path]:
    """A line as an edge-ad before 53e6b29 left it: the config in etc/ with a relative mqtt.outbox_path, which that
    revision read from the working directory, var/ (the unit's WorkingDirectory), where its outbox holds
    ``messages`` results (seq 1..) not sent yet. Returns (config, the old outbox, the config folder's reading)."""
    from edge_ad.mqtt import Outbox

    var, etc = tmp_path / "var", tmp_path / "etc"
    var.mkdir()
    etc.mkdir()
    old = var / "outbox.sqlite"
    with Outbox(old) as ob:
        for _ in range(messages):
            ob.put("result", "edge-ad/v1/t/cam1/result",
                   lambda seq: json.dumps({"id": f"old-{seq}", "seq": seq}).encode())
    video, _ = defect_video(tmp_path / "v.avi", n=5, defect_every=5, size=96)
    cfg = _config_file(etc, bundle, f"file://{video}", f'\n[mqtt]\nurl = "{broker_url}"\nsite = "t"\ndevice = "cam1"\n'
                       'outbox_path = "outbox.sqlite"\n')
    return cfg, old, etc / "outbox.sqlite"


def test_an_outbox_an_older_edge_ad_kept_in_the_working_directory_is_not_left_behind(tmp_path, tiny_bundle, mosquitto,
                                                                                      monkeypatch):
    """edge-ad before 53e6b29 read a relative mqtt.outbox_path from the working directory (the unit's
    /var/lib/edge-ad), this one reads it from the config's folder (/etc/edge-ad): an upgraded line began an empty
    outbox there without a word and never sent the old one's backlog (seq starting again at 1). run now refuses to
    start, naming both files and the fix, and changes nothing; with the fix (the outbox's absolute path) the
    backlog is delivered and seq goes on."""
    from edge_ad.errors import InputError
    from edge_ad.mqtt import BrokerSettings
    from edge_ad.mqtt.collector import Collector
    from edge_ad.mqtt.outbox import waiting_in

    cfg, old, new = _outbox_left_behind(tmp_path, tiny_bundle, mosquitto.url, 3)
    monkeypatch.chdir(old.parent)
    with pytest.raises(InputError) as exc:
        Service(load_settings(cfg, environ={}), install_signals=False)
    assert str(exc.value) == (
        f"{cfg}: mqtt.outbox_path = 'outbox.sqlite' is read from the config file's folder since edge-ad 53e6b29 "
        f"(2026-12-05), {new}, but the outbox an earlier edge-ad kept at the working directory's reading of it, {old}, "
        f"holds 3 message(s) not delivered yet: starting would begin an empty outbox at {new} and never send them (seq "
        f'would start again at 1); set mqtt.outbox_path = "{old}" in {cfg} (its absolute path: the outbox stays where '
        f"it is), or, with the line stopped, move {old} (and its -wal and -shm, if there are any) to {new}; delete it "
        "only if its messages are not wanted")
    assert exc.value.exit_code == 2
    assert not new.exists() and not (cfg.parent / "results.jsonl").exists() and waiting_in(old) == 3

    fixed = load_settings(cfg, [(["mqtt", "outbox_path"], str(old), "test")], environ={})
    with Collector(BrokerSettings(url=mosquitto.url), "edge-ad/v1/t/cam1/#") as col:
        summary = _run(fixed)
        assert col.wait_for(lambda c: {"old-1", "old-2", "old-3"} <= c.unique_ids(), timeout=30), col.unique_ids()
    assert summary["frames"] == 5 and summary["outbox"] == str(old) and not new.exists()
    seqs = sorted(m.json()["seq"] for m in col.of_kind("result"))
    assert seqs == list(range(1, 3 + 5 + 1))          # the old backlog's 1..3, then this run's 4..8


def test_an_outbox_left_behind_beside_the_one_in_use_or_empty_is_warned_of(tmp_path, tiny_bundle, monkeypatch, caplog):
    """Once the config folder's outbox exists (the line already started on it) run does not refuse (that would
    stop a running line and strand that one's messages instead): a WARNING at every start names both files and how
    to send the old one's messages. An old outbox that holds nothing is not worth a refusal either; nor is there any
    when the working directory is the config's folder (both readings are the same file)."""
    from edge_ad.mqtt import Outbox

    cfg, old, new = _outbox_left_behind(tmp_path, tiny_bundle, "mqtt://127.0.0.1:1", 2)
    Outbox(new).close()
    monkeypatch.chdir(old.parent)
    with caplog.at_level("WARNING", logger="edge_ad.runtime.service"):
        svc = Service(load_settings(cfg, environ={}), install_signals=False)
    svc.link.stop(timeout=1.0)
    svc.inspector.backend.close()
    warned = [r.getMessage() for r in caplog.records if "outbox_path" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{cfg}: mqtt.outbox_path = 'outbox.sqlite'"), warned
    assert (f"{old}, holds 2 message(s) not delivered yet, and the line uses the one at {new}: the older one's "
            f'messages are not sent from there; to send them, stop the line and run it with mqtt.outbox_path = "{old}" '
            "until they are out") in warned[0]

    new.unlink()
    (new.parent / "outbox.sqlite.lock").unlink()
    with Outbox(old) as ob:
        ob.delete([r.id for r in ob.fetch_after(0, 10)])
    left = load_settings(cfg, environ={}).outbox_left_behind()
    assert not left.blocks and left.what.endswith(f"holds no message: run starts an empty outbox at {new} (seq starts "
                                                  "again at 1)")
    assert left.fix == f'delete {old} (nothing is lost), or set mqtt.outbox_path = "{old}" in {cfg} to go on with it ' \
                       "and its seq"
    monkeypatch.chdir(cfg.parent)
    assert load_settings(cfg, environ={}).outbox_left_behind() is None


def test_a_failing_outbox_is_counted_and_the_jsonl_log_still_gets_every_decision(tmp_path, tiny_bundle):
    """The disk under the SQLite outbox is full (the broker is down, so it only grows): results the outbox
    refuses are counted, every decision still reaches the JSONL log, and the outbox takes results again
    once it can."""
    from edge_ad.errors import RuntimeFailure
    from edge_ad.mqtt import Outbox

    video, labels = defect_video(tmp_path / "v.avi", n=30, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1",
                  mqtt__outbox_path=str(tmp_path / "outbox.sqlite"))
    svc = Service(s, install_signals=False)
    real = svc.link.outbox.put
    results = []

    def put(kind, *a, **kw):
        if kind == "result":
            results.append(1)
        if 5 <= len(results) < 15:          # results 5-14 (and whatever else comes meanwhile) fail
            raise RuntimeFailure(f"outbox {tmp_path}: write failed (database or disk is full)")
        return real(kind, *a, **kw)

    svc.link.outbox.put = put
    summary = svc.run()
    assert summary["frames"] == 30 and summary["output_errors"]["outbox"] >= 10
    assert summary["output_errors"]["jsonl"] == 0
    assert [r["frame"] for r in read_jsonl(tmp_path / "results.jsonl")] == list(range(30))
    left = Outbox(tmp_path / "outbox.sqlite")
    try:
        rows = left.fetch_after(0, 1_000_000)
    finally:
        left.close()
    stored = [json.loads(r.payload) for r in rows if r.kind == "result"]
    assert [m["frame"] for m in stored] == list(range(4)) + list(range(14, 30))
    events = [json.loads(r.payload) for r in rows if r.kind == "event"]
    assert any(e["type"] == "output_restored" and e["output"] == "outbox" for e in events)
    assert {e["result_id"] for e in events if e["type"] == "ng"} == {m["id"] for m in stored if m["ng"]}


def test_an_outbox_another_program_locks_stops_the_start_and_a_lock_taken_later_does_not_stall_the_line(
        tmp_path, tiny_bundle, monkeypatch):
    """A sqlite3 shell in a write transaction on the outbox: the start went through (WAL reads pass) and each
    write then waited 60 s for the lock on the reporting thread (3 frames took 89 s, exit 0, the JSONL log
    starved too). Now a lock held at start refuses the run (exit 1, naming the file); one taken while the line
    runs costs one short wait, the writes it blocks are counted, and every decision reaches the JSONL log."""
    from edge_ad.errors import RuntimeFailure
    from edge_ad.mqtt import Outbox

    path = tmp_path / "outbox.sqlite"
    Outbox(path).close()
    video, _ = defect_video(tmp_path / "v.avi", n=30, defect_every=5, size=96)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", source__mode="trigger",
                  mqtt__url="mqtt://127.0.0.1:1", mqtt__site="t", mqtt__device="cam1", mqtt__outbox_path=str(path))
    code = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline()")

    def hold():
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    monkeypatch.setattr(Outbox, "OPEN_BUSY_TIMEOUT_S", 0.2)
    proc = hold()
    try:
        with pytest.raises(RuntimeFailure, match=rf"outbox {re.escape(str(path))}: cannot open \(database is locked"):
            Service(s, install_signals=False)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    svc = Service(s, install_signals=False)         # opened; the lock comes while the line runs
    proc = hold()
    try:
        t0 = time.monotonic()
        summary = svc.run()
        took = time.monotonic() - t0
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert summary["frames"] == 30 and summary["reason"] == "end of stream"
    assert [r["frame"] for r in read_jsonl(tmp_path / "results.jsonl")] == list(range(30))
    assert summary["output_errors"]["outbox"] >= 30 and summary["output_errors"]["jsonl"] == 0
    assert summary["duration_s"] < 8 and took < 15, (summary, took)    # was a minute per write


def test_snapshot_retention_by_count_and_bytes(tmp_path):
    st = SnapshotStore(tmp_path / "snaps", max_count=5, max_bytes=10_000)
    for i in range(8):
        st.save(f"20250101T0000{i:02d}_000_{i:08d}_NG.jpg", b"x" * 1000)
    names = sorted(p.name for p in (tmp_path / "snaps").glob("*.jpg"))
    assert len(names) == 5 and names[0].endswith("00000003_NG.jpg") and st.deleted == 3
    st = SnapshotStore(tmp_path / "snaps", max_count=100, max_bytes=2500)   # a restart applies new limits
    assert st.count == 2 and st.bytes == 2000
    st.save("20250101T000100_000_00000100_NG.jpg", b"y" * 1000)
    assert st.count == 2 and (tmp_path / "snaps" / "20250101T000100_000_00000100_NG.jpg").is_file()


def test_update_archives_are_fetched_over_http_and_checked(tmp_path):
    import functools
    import hashlib
    import http.server

    from edge_ad.errors import InputError
    from edge_ad.runtime.service import _fetch_archive

    data = os.urandom(50_000)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "b.tar").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/b.tar"
        got = _fetch_archive(url, tmp_path / "dl", digest)
        assert got.read_bytes() == data
        with pytest.raises(InputError, match="refusing it"):
            _fetch_archive(url, tmp_path / "dl2", "0" * 64)
        with pytest.raises(Exception, match="cannot download"):
            _fetch_archive(url.replace("b.tar", "missing.tar"), tmp_path / "dl3", digest)
        assert _fetch_archive(f"file://{tmp_path / 'srv' / 'b.tar'}", tmp_path, digest).name == "b.tar"
        with pytest.raises(InputError, match="not found"):
            _fetch_archive(str(tmp_path / "nope.tar"), tmp_path, digest)
    finally:
        srv.shutdown()


def test_run_says_how_many_messages_wait_in_the_outbox_when_the_broker_was_unreachable(tmp_path, tiny_bundle,
                                                                                     monkeypatch):
    """A broker that cannot be reached must not look like a clean run: the summary line counts the results
    that stayed in the outbox and names its file."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.mqtt.broker import free_port

    video, _ = defect_video(tmp_path / "v.avi", n=4, defect_every=2, size=96)
    outbox = tmp_path / "outbox.sqlite"
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}",
                       f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\nsite = "s"\ndevice = "d"\n'
                       f'outbox_path = "{outbox}"\n')
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    m = re.search(r"(\d+) MQTT messages not delivered yet: they wait in the outbox \((.+)\)", res.output)
    assert m and int(m.group(1)) >= 4 and m.group(2) == str(outbox), res.output


def _run_cli_summarising(monkeypatch, tmp_path, summary: dict):
    """``run(config)``: ``edge-ad run --config config`` (a CliRunner result) whose service returns ``summary``:
    the text summary's lines without a real run."""
    import types

    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.runtime import service

    class Fake:
        finished = True
        pipeline = types.SimpleNamespace(busy=lambda: False)

        def __init__(self, *a, **kw):
            pass

        def describe(self):
            return "fake"

        def run(self):
            return summary

    monkeypatch.setattr(service, "Service", Fake)
    monkeypatch.chdir(tmp_path)
    return lambda config: CliRunner().invoke(main, ["run", "--config", str(config)])


def test_run_names_the_messages_dropped_as_too_large_for_the_broker(tmp_path, tiny_bundle, monkeypatch):
    """The summary line counted 'too_large' and 'disconnects' together as messages the broker does not take;
    a lost connection no longer drops anything, so only messages over the limit the broker announced are
    counted there, apart from those the full outbox dropped, and those the broker refused for good (a PUBACK
    reason code such as Not authorized), which were not counted anywhere."""
    summary = {"frames": 4, "ng": 0, "dropped": 0, "duration_s": 1.0, "fps": 4.0, "reason": "finished",
               "stop_s": 0.1, "outbox_left": 0, "outbox": "o.sqlite", "outbox_reset": None, "outbox_dropped": 7,
               "outbox_dropped_by": {"full": 1, "too_large": 2, "rejected": 4}}

    run = _run_cli_summarising(monkeypatch, tmp_path, summary)
    res = run(_config_file(tmp_path, tiny_bundle, "synthetic://"))
    assert res.exit_code == 0, res.output
    assert "1 MQTT messages dropped by the full outbox" in res.output
    assert ("2 MQTT messages dropped because they are larger than the maximum packet size the broker announced "
            "(max_packet_size in Mosquitto)") in res.output
    assert ("4 MQTT messages dropped because the broker refused them for good (a PUBACK reason code such as Not "
            "authorized: check the broker's ACL for the device's topics)") in res.output
    summary["outbox_dropped_by"] = {"full": 0, "too_large": 0, "rejected": 0}
    res = run(tmp_path / "run.toml")
    assert res.exit_code == 0 and "MQTT messages dropped" not in res.output, res.output


def test_run_names_the_outputs_whose_writes_failed(tmp_path, tiny_bundle, monkeypatch):
    """The text summary said nothing of failed writes (35 results never stored for MQTT while another program
    held the outbox locked, decisions missing from a full disk's result log): only --json had output_errors.
    It names each output with failed writes and how many."""
    summary = {"frames": 190, "ng": 190, "dropped": 10, "duration_s": 20.0, "fps": 9.5, "reason": "finished",
               "stop_s": 0.1, "outbox_left": 0, "outbox": "o.sqlite", "outbox_reset": None, "outbox_dropped": 0,
               "outbox_dropped_by": {"full": 0, "too_large": 0, "rejected": 0},
               "output_errors": {"jsonl": 2, "outbox": 35, "snapshots": 0, "telemetry": 1}}

    run = _run_cli_summarising(monkeypatch, tmp_path, summary)
    res = run(_config_file(tmp_path, tiny_bundle, "synthetic://"))
    assert res.exit_code == 0, res.output
    assert ("35 results and events were not stored for MQTT (never sent): their outbox writes failed (see the log "
            "for why)") in res.output
    assert "2 decisions are missing from the result log (output.jsonl)" in res.output
    assert "1 lines are missing from the telemetry file (telemetry.path)" in res.output
    assert "snapshots" not in res.output
    summary["output_errors"] = {"jsonl": 0, "outbox": 0, "snapshots": 0, "telemetry": 0}
    res = run(tmp_path / "run.toml")
    assert res.exit_code == 0 and "failed (see the log" not in res.output, res.output


def test_a_sigterm_after_the_run_stopped_does_not_kill_edge_ad_run(tmp_path, tiny_bundle):
    """A supervisor's SIGTERM can land just after the run ended on its own bound (the loop's handlers already
    restored): the summary is still printed and the exit is 0, not death by signal (-15)."""
    video, _ = defect_video(tmp_path / "v.avi", n=4, defect_every=2, size=96)
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}")
    code = ("import os, signal, sys\n"
            "from edge_ad.runtime.service import Service\n"
            "run = Service.run\n"
            "def late(self):\n"
            "    summary = run(self)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    return summary\n"
            "Service.run = late\n"
            "from edge_ad.cli import main\n"
            "sys.exit(main(prog_name='edge-ad'))\n")
    r = subprocess.run([sys.executable, "-c", code, "run", "--config", str(cfg), "--json"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 4


def test_edge_ad_run_logs_its_routine_lifecycle_at_info_shown_by_default(tmp_path, tiny_bundle):
    """The SIGHUP line printed the reload's Python dict ({'bundle': {...}}), and routine events (the stop on
    SIGTERM, a calibration put in force) were WARNINGs, which `edge-ad run` showed because nothing below WARNING
    was shown. They are INFO now, the SIGHUP line in words, and `edge-ad run` shows INFO by default."""
    video, _ = defect_video(tmp_path / "v.avi", n=4, defect_every=2, size=96)
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}?loop=1")
    code = ("import os, signal, sys\n"        # SIGHUP once the loop runs; SIGTERM once it is reloaded
            "from edge_ad.runtime.service import Service\n"
            "supervise, reload = Service._supervise, Service.reload\n"
            "def hup(self, t):\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    return supervise(self, t)\n"
            "def then_term(self, what):\n"
            "    done = reload(self, what)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return done\n"
            "Service._supervise, Service.reload = hup, then_term\n"
            "from edge_ad.cli import main\n"
            "sys.exit(main(prog_name='edge-ad'))\n")
    r = subprocess.run([sys.executable, "-c", code, "run", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    version = tiny_bundle.calibration().version
    assert (f" INFO edge_ad.runtime.service: SIGHUP: bundle reloaded: model and calibration v{version} unchanged\n"
            in r.stderr), r.stderr
    assert " INFO edge_ad.runtime.service: SIGTERM: stopping; draining " in r.stderr, r.stderr
    assert not re.search(r"WARNING .*(SIGHUP|stopping|in force)", r.stderr) and "{'" not in r.stderr, r.stderr
    assert "telemetry: " not in r.stderr            # a line per interval: -v (DEBUG)


def test_the_telemetry_file_rotates_and_a_bad_path_stops_run_at_start(tmp_path, tiny_bundle):
    """A line runs for months: telemetry.path rotates past telemetry.max_bytes like the result log (it grew
    without a limit, ~16 MB a day); a path that cannot be opened is refused at start like output.jsonl."""
    from edge_ad.errors import InputError

    video, _ = defect_video(tmp_path / "parts.avi", n=40, defect_every=5, size=96)
    # 0.8 s of frames at 50 fps: dozens of telemetry lines at 0.01 s, rotated past 1 KiB even on a loaded
    # machine (at 200 fps, 0.2 s, a busy run once wrote too few lines to rotate)
    s = _settings(tmp_path, tiny_bundle, f"file://{video}?fps=50", source__mode="trigger",
                  telemetry__path=str(tmp_path / "tel.jsonl"), telemetry__interval_s=0.01,
                  telemetry__max_bytes=1024, telemetry__backups=1)
    _run(s)
    assert (tmp_path / "tel.jsonl.1").is_file() and not (tmp_path / "tel.jsonl.2").exists()
    last = read_jsonl(tmp_path / "tel.jsonl")
    assert len(last) == 1 and last[0]["frames"] == 40   # the final telemetry, alone after the last rotation
    (tmp_path / "adir").mkdir()
    s = _settings(tmp_path, tiny_bundle, f"file://{video}", telemetry__path=str(tmp_path / "adir"))
    with pytest.raises(InputError, match="adir: cannot open the telemetry file for writing"):
        _run(s)


def test_the_telemetry_ng_rate_never_passes_1_while_a_result_is_being_reported(tmp_path, tiny_bundle):
    """The reporter counts an NG before its event is written and 'reported' after: telemetry read in
    between showed ng_rate 1.07 (a schema violation). The rate is NG over OK + NG of the interval."""
    from edge_ad.runtime.telemetry import RateCounter

    video, _ = defect_video(tmp_path / "v.avi", n=4, size=96)
    svc = Service(_settings(tmp_path, tiny_bundle, f"file://{video}"), install_signals=False)
    try:
        svc._rate, svc._cap_rate = RateCounter(), RateCounter()
        svc._last_ng = svc._last_drop = svc._last_ok = 0
        svc.reporter.ng, svc.reporter.ok, svc.reporter.reported = 5, 0, 4   # the fifth NG's event being written
        assert svc.telemetry_payload()["ng_rate"] == 1.0
        svc.reporter.ng, svc.reporter.ok, svc.reporter.reported = 6, 3, 9
        assert svc.telemetry_payload()["ng_rate"] == 0.25                  # 1 NG, 3 OK in this interval
    finally:
        svc.inspector.backend.close()


def test_a_new_models_health_baseline_is_the_recent_ng_rate_of_the_model_in_force(tmp_path, tiny_bundle):
    """update_model compares the new model's NG rate with the old model's: the latest decisions under the
    model and calibration in force, not the whole run's (a badly calibrated start, all NG, made a new model
    that calls every part NG look no worse, and it was kept)."""
    video, _ = defect_video(tmp_path / "v.avi", n=4, size=96)
    svc = Service(_settings(tmp_path, tiny_bundle, f"file://{video}"), install_signals=False)
    try:
        rep = svc.reporter
        for ng in [True] * 300:                      # the start: a calibration that did not fit
            rep.recent_ng.append(ng)
        rep.ng, rep.ok = 300, 0
        assert svc._ng_rate() is None                # no OK among them: no baseline
        svc.swap_calibration(svc.inspector.calibration, reason="recalibrated")   # a new one in force
        for i in range(50):
            rep.recent_ng.append(i % 25 == 0)
        rep.ok += 48
        assert svc._ng_rate() == pytest.approx(0.04)   # the whole run's would be 302 / 350 = 0.86
    finally:
        svc.inspector.backend.close()


def test_results_on_stdout_keep_the_summary_out_and_a_closed_pipe_stops_the_run(tmp_path, tiny_bundle):
    """`--jsonl /dev/stdout`: the run summary went into the result stream; a reader that closed the pipe
    (`| head -2`) left the loop inspecting with every line lost, then an exit 1 with no error line."""
    video, _ = defect_video(tmp_path / "v.avi", n=6, defect_every=2, size=96)
    cfg = _config_file(tmp_path, tiny_bundle, f"file://{video}?loop=1")
    run = EDGE_AD + ["run", "--config", str(cfg), "--jsonl", "/dev/stdout", "--json"]
    r = subprocess.run(run + ["--max-frames", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["frame"] for line in r.stdout.splitlines()] == [0, 1, 2]     # results only
    assert json.loads(r.stderr.strip().splitlines()[-1])["frames"] == 3
    p = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline())["frame"] == 0
    p.stdout.close()                     # the consumer is gone
    _, err = p.communicate(timeout=120)  # (no --max-frames: only the closed pipe ends this run)
    assert p.returncode == 0, err[-2000:]
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["reason"] == "the reader of the result log /dev/stdout closed the pipe"
    assert summary["output_errors"]["jsonl"] >= 1 and "Traceback" not in err
    p = subprocess.Popen(EDGE_AD + ["run", "--config", str(cfg), "--max-frames", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    p.stdout.close()                     # `edge-ad run | head -0`: the summary meets a closed pipe
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Error" not in err, err[-2000:]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10 ** 400],
                         ids=["nan", "inf", "-inf", "10**400"])
def test_set_threshold_handler_refuses_what_is_not_a_finite_number(value):
    """The link refuses these at parse; a handler called otherwise (a plug-in, a test) refuses them too, as an
    input error naming the value: 10**400 was an OverflowError in float(), an 'internal' reply."""
    from edge_ad.errors import InputError
    from edge_ad.runtime.commands import Commands

    with pytest.raises(InputError, match=r"threshold .*: expected a finite number"):
        Commands(None).set_threshold({"threshold": value, "persist": False})


def test_a_model_swap_closes_the_old_backend_only_once_its_batch_is_done(tmp_path, tiny_bundle, monkeypatch):
    """The swap closed the old backend as soon as no inference ran on it, while a batch that had taken the old
    inspector was still being prepared: its inference then ran on a closed backend and the frames became an
    inference_error (a reload, update_model or health rollback on a Jetson). The swap now waits for that batch."""
    from edge_ad.bundle import Bundle
    from edge_ad.runtime import pipeline as pipeline_mod
    from edge_ad.runtime.records import Frame

    svc = Service(_settings(tmp_path, tiny_bundle, "synthetic://disc?size=64"), install_signals=False)
    old = svc.inspector
    entered, go, closed = threading.Event(), threading.Event(), threading.Event()

    class Closing(_SlowBackend):
        def close(self):
            closed.set()
            super().close()

    backend = Closing(old.backend._backend, 0.0)
    old.backend._backend = backend
    to_batch = pipeline_mod.to_batch

    def preparing(images, size):   # the batch has taken the old inspector and is being prepared
        entered.set()
        go.wait(30)
        return to_batch(images, size)

    monkeypatch.setattr(pipeline_mod, "to_batch", preparing)
    frame = Frame(seq=0, image=part_frame(0, 64), source_index=0, t_wall=time.time(), t_captured=time.perf_counter(),
                  capture_ms=0.0)
    out: dict = {}
    infer = threading.Thread(target=lambda: out.update(items=svc.pipeline._infer([frame])), daemon=True)
    swap = threading.Thread(target=lambda: out.update(swap=svc._swap_model(Bundle.open(tiny_bundle.path), "test")),
                            daemon=True)
    try:
        infer.start()
        assert entered.wait(30)
        swap.start()
        deadline = time.monotonic() + 30
        while svc.pipeline.inspector is old and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.pipeline.inspector is not old                  # swapped: the next batch runs on the new model
        assert not closed.wait(0.3)                               # but the old backend stays open for this one
        go.set()
        infer.join(30)
        swap.join(30)
        assert closed.is_set() and "swap" in out
        assert len(out["items"]) == 1 and backend.calls_after_close == 0
    finally:
        go.set()
        svc.inspector.backend.close()


def test_the_result_log_is_not_restored_into_a_pipe(tmp_path):
    """restore_result_log appended the outbox's last result when the log's last line was the one before it; a
    pipe (or /dev/stdout) has no last line to read back, and an outbox whose last result was its first has none
    before it either, so the two 'matched' and the result went down the pipe at every start."""
    import types

    from edge_ad.runtime.outputs import JsonlLog
    from edge_ad.runtime.reporting import Reporter

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        log = JsonlLog(fifo)
        outbox = types.SimpleNamespace(last_result=lambda: (None, json.dumps({"id": "r1", "seq": 1})))
        fake = types.SimpleNamespace(jsonl=log, link=types.SimpleNamespace(outbox=outbox),
                                     _write=lambda *a: pytest.fail("written to a pipe"))
        assert not log.regular and Reporter.restore_result_log(fake) is None
        log.close()
    finally:
        os.close(reader)
