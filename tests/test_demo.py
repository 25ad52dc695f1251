"""``edge-ad demo --quick`` end to end, as a user runs it: a subprocess, a real Mosquitto when installed, a
real ``edge-ad run`` subprocess (with torch blocked), real ONNX Runtime; then the report it leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _demo(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AD_") or k == "EDGE_AD_MOSQUITTO"}
    return subprocess.run([sys.executable, "-m", "edge_ad", "demo", "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _check_report(out: Path, p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, f"demo failed:\n{p.stdout}\n{p.stderr}"
    for k in range(1, 9):
        assert f"[{k}/8]" in p.stdout, f"no line for step {k}:\n{p.stdout}"
    assert "FAILED" not in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    html = (out / "report.html").read_text("utf-8")
    for text in ("edge-ad demo report", "after recalibration", "planted defects", "false alarms"):
        assert text in html
    pngs = ["histogram_before.png", "histogram_lit.png", "histogram_after.png", "ng_maps_before.png",
            "ng_maps_lit.png", "eval/grid.png", "eval/histogram.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert name in html, f"{name} not shown in report.html"
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    loop = summary["loop"]
    assert loop["returncode"] == 0
    run = loop["run_summary"]
    assert run["frames"] > 0 and run["frames"] == loop["frames"]
    assert run["reason"] == "SIGTERM" and run["drained"]
    counts = loop["counts"]
    assert counts["all"]["frames"] == run["frames"]
    assert counts["before"]["frames"] > 0 and counts["lit"]["frames"] > 0 and counts["after"]["frames"] > 0
    assert counts["all"]["defects"] == counts["all"]["found"] + counts["all"]["missed"]
    # the recalibration produced a new calibration version, and the loop inspected with it
    cal = loop["calibration"]
    assert cal["after"] > cal["before"]
    assert counts["after"]["calibration_versions"] == [cal["after"]]
    from edge_ad.bundle import Bundle

    b = Bundle.open(out / "bundle")
    assert b.calibration().version == cal["after"]
    assert cal["before"] in b.calibration_versions()
    # re-inspection in the report reproduces the loop's scores
    assert summary["reinspection"]["frames"] > 0
    assert summary["reinspection"]["max_score_diff"] < 1e-3
    assert summary["quantize"]["precision"] in ("fp32", "int8")
    assert "INT8" in p.stdout
    return summary


def test_quick_demo(tmp_path):
    from edge_ad.mqtt.broker import find_mosquitto

    out = tmp_path / "demo-out"
    p = _demo(out)
    summary = _check_report(out, p)
    mq = summary["mqtt"]
    if find_mosquitto() is None:
        assert not mq["enabled"] and "mosquitto" in mq["why_off"]
        assert "NO BROKER" in p.stdout
        return
    frames = summary["loop"]["frames"]
    assert mq["enabled"]
    assert mq["results_received"] == frames            # every result arrived over MQTT
    per = mq["per_topic"]
    assert per["result"] == frames
    assert per["cmd/calibrate"] == 1
    assert per["calibration"] >= 2                      # the one in force at start, then the new one
    assert per["status"] >= 2 and per["telemetry"] >= 1
    assert summary["loop"]["calibration"]["via"] == "mqtt"
    assert '"ok": true' in p.stdout and "calibrate reply" in p.stdout
    assert f"calibration v1 -> v{summary['loop']['calibration']['after']}" in p.stdout
    assert "monitor  demo/conveyor-1 online" in p.stdout  # the fleet view, as plain lines (not a terminal)
    assert mq["final_row"]["state"] == "offline"        # the loop said goodbye on SIGTERM


def test_quick_demo_without_mqtt(tmp_path):
    """No broker: the loop runs without MQTT and the recalibration goes through the bundle and SIGHUP."""
    out = tmp_path / "demo-out"
    p = _demo(out, "--no-mqtt")
    summary = _check_report(out, p)
    assert not summary["mqtt"]["enabled"]
    assert summary["loop"]["calibration"]["via"] == "sighup"
    assert "MQTT off" in p.stdout
    # the loop again, as the demo says at the end: the line as the demo left it (new light, its calibration)
    assert f"run the loop again: edge-ad run --config {out / 'rerun.toml'}" in p.stdout
    demo_results = (out / "loop" / "results.jsonl").read_bytes()
    r = subprocess.run([sys.executable, "-m", "edge_ad", "run", "--config", str(out / "rerun.toml"), "--max-frames",
                        "60"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (out / "rerun" / "results.jsonl").read_text().splitlines()]
    good = [x for x in recs if not x["truth"]["label"]]
    assert len(recs) == 60 and good
    assert sum(x["ng"] for x in good) <= 0.2 * len(good), "the rerun calls good parts NG"   # was every one
    assert (out / "loop" / "results.jsonl").read_bytes() == demo_results   # the demo's own log is kept


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    p = _demo(out, timeout=60)
    assert p.returncode == 2
    assert "not made by 'edge-ad demo'" in p.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_previous_demo_folder_that_cannot_be_emptied(tmp_path, monkeypatch):
    """A file of the previous run that cannot be removed: a named input error, and the folder is still
    recognized as a demo folder (its marker is removed last), so the next run can empty it."""
    import shutil

    from edge_ad.demo import steps
    from edge_ad.errors import InputError

    out = tmp_path / "prev"
    (out / "loop").mkdir(parents=True)
    (out / "loop" / "run.log").write_text("x")
    (out / "zz.txt").write_text("x")
    (out / steps.MARKER).write_text("made by 'edge-ad demo'\n")
    stuck = out / "loop" / "run.log"

    def rmtree(path, *a, **kw):
        raise PermissionError(1, "Operation not permitted", str(stuck))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(InputError) as ei:
        steps.prepare_out(out)
    assert f"--out {out}" in str(ei.value) and str(stuck) in str(ei.value)
    assert (out / steps.MARKER).is_file()
    monkeypatch.undo()
    assert steps.prepare_out(out) == out
    assert sorted(p.name for p in out.iterdir()) == [steps.MARKER, steps.LOCK]


def test_a_second_demo_into_a_running_demos_folder_is_refused(tmp_path):
    """Two demos into one --out (two terminals, two CI jobs on one checkout): the second is refused with
    exit 2 and the running one's files are untouched (it emptied them under the first one)."""
    from edge_ad.demo import steps
    from edge_ad.errors import InputError

    out = tmp_path / "demo-out"
    first = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; from edge_ad.demo import "
                              "steps; steps.prepare_out(Path(sys.argv[1])); print('ready', flush=True); "
                              "sys.stdin.read()", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"
        (out / "bundle").mkdir()
        with pytest.raises(InputError, match=rf"another edge-ad demo \(pid {first.pid}\) is using this folder"):
            steps.prepare_out(out)
        assert (out / "bundle").is_dir() and (out / steps.MARKER).is_file()
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    assert steps.prepare_out(out) == out and not (out / "bundle").exists()   # its lock went with it


def test_demo_rejects_bad_options(tmp_path):
    p = _demo(tmp_path / "x", "--image-size", "100", timeout=60)
    assert p.returncode == 2 and "--image-size 100" in p.stderr
    assert not (tmp_path / "x").exists()


def test_quick_demo_with_the_embedded_broker(tmp_path):
    """Mosquitto absent: the demo starts the embedded amqtt broker (MQTT 3.1.1) and everything still flows."""
    pytest.importorskip("amqtt", reason="the embedded broker needs amqtt (pip install 'edge-ad[broker]')")
    out = tmp_path / "demo-out"
    code = ("import sys, edge_ad.mqtt.broker as b; b.find_mosquitto = lambda: None\n"
            "from edge_ad.cli import main; main(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AD_")}
    p = subprocess.run([sys.executable, "-c", code, "demo", "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=300, env=env)
    summary = _check_report(out, p)
    assert "embedded amqtt broker" in p.stdout
    mq = summary["mqtt"]
    assert mq["enabled"] and mq["results_received"] == summary["loop"]["frames"]
    assert summary["loop"]["calibration"]["via"] == "mqtt"


def test_the_quantize_step_names_the_refused_int8_form_and_what_the_loop_runs(tmp_path, monkeypatch):
    """Each INT8 form goes in on its own verdict. One passing and the other refused (the CPU form on an x86 CPU
    without VNNI): the line says which passed, names the refused one with why, and says the loop runs FP32 (the
    summary too); it said 'INT8 is switched in only when every form passes' and nothing went in. Both refused:
    the line names each failure."""
    from types import SimpleNamespace

    import edge_ad.compile.quantize as quantize
    from edge_ad.demo import steps
    from edge_ad.demo.plan import make_plan
    from edge_ad.demo.report import quantize_verdict
    from edge_ad.errors import GuardFailure

    why = "the CPU form of INT8 failed the accuracy guard (x86_64 without VNNI: synthetic AUROC fell 0.0059)"
    entries = [{"candidate": "onnxruntime-int8", "passed": True, "failures": [], "rank_corr": 0.9984, "auroc": {}},
               {"candidate": "onnxruntime-int8-u8", "passed": False, "failures": ["synthetic AUROC fell 0.0059"],
                "rank_corr": 0.9958, "auroc": {}}]
    monkeypatch.setattr("edge_ad.bundle.Bundle.open", staticmethod(
        lambda *a, **k: SimpleNamespace(active_precision="fp32", active_graph="model.onnx")))
    monkeypatch.setattr("edge_ad.data.synthetic.write_category", lambda *a, **k: tmp_path / "q")
    monkeypatch.setattr(quantize, "quantize_bundle", lambda *a, **k: SimpleNamespace(
        files=["model.int8.onnx"], refused={"model.int8-u8.onnx": {"why": why, "fix": "quantize on the device"}},
        entries=entries))
    info, (level, line) = steps.step_quantize(tmp_path, make_plan(True, "gaussian"))
    assert level == "warning" and not info["passed"] and info["files"] == ["model.int8.onnx"]
    assert line == (f"INT8 model.int8.onnx passed the accuracy guard, model.int8-u8.onnx REFUSED (model.int8-u8.onnx: "
                    f"{why}); the loop runs model.onnx")
    assert info["precision"] == "fp32" and why in info["refused"]
    assert quantize_verdict(info) == f"INT8 model.int8.onnx passed the guard, the other form was refused " \
                                     f"({info['refused']}); FP32 runs"   # report.html

    def refuse(*a, **k):
        raise GuardFailure("onnxruntime-int8: score rank correlation 0.9882 < 0.99")

    monkeypatch.setattr(quantize, "quantize_bundle", refuse)
    monkeypatch.setattr(steps, "_guard_entries", lambda b: [
        {"candidate": "onnxruntime-int8", "passed": False, "failures": ["score rank correlation 0.9882 < 0.99"]},
        {"candidate": "onnxruntime-int8-u8", "passed": False, "failures": ["synthetic AUROC fell 0.0059"]}])
    info, (level, line) = steps.step_quantize(tmp_path, make_plan(True, "gaussian"))
    assert level == "warning" and not info["passed"]
    assert ("INT8 REFUSED by the accuracy guard (onnxruntime-int8: score rank correlation 0.9882 < 0.99; "
            "onnxruntime-int8-u8: synthetic AUROC fell 0.0059); nothing switched in") in line


def test_the_demo_monitor_line_gives_each_ng_rate_with_its_base():
    """Telemetry's ng_rate covers its last interval, the counts beside it every result since the start. The line
    showed 'NG 5% last interval (47 of 87 results since start)', and before the first telemetry the rate shown
    as the last interval's was the one counted from the results. Now the counts carry their own share, and the
    interval's rate is telemetry's only ('-' before any)."""
    from edge_ad.demo.loop import monitor_line
    from edge_ad.mqtt.monitor import FleetView

    view = FleetView(clock=lambda: 1000.0)
    topic = "edge-ad/v1/demo/conveyor-1/"
    for i in range(4):
        row = view.consume(topic + "result", json.dumps({"seq": i + 1, "score": 0.5, "ng": i < 3}))
    assert "NG 3 of 4 results since start (75%), - in the last telemetry interval, last OK 0.500" in \
        monitor_line(row, 4)
    row = view.consume(topic + "telemetry", json.dumps({"fps": 19.9, "ng_rate": 0.05}))
    assert "19.9 fps, NG 3 of 4 results since start (75%), 5% in the last telemetry interval" in monitor_line(row, 5)


def test_the_demo_prints_the_calibrate_reply_in_the_devices_shape():
    """The reply the demo prints showed each excluded frame as a string ('0 (z 48.5)') where the device sends
    (and docs/mqtt.md, the README show) an object: index, label, score, z, reason. It is printed as sent now,
    its floats rounded, the normal-score statistics left out."""
    from edge_ad.calibration.refit import Excluded
    from edge_ad.demo.loop import compact_reply

    out = Excluded(index=9, score=3.5712345, z=55.91234, reason="robust z > 6 under calibration v1",
                   label="frame 1210 (2026-11-23T04:30:21.967Z)").to_dict()
    reply = {"schema_version": 1, "ts": "2026-11-23T04:31:08.389Z", "site": "demo", "device": "conveyor-1",
             "command": "calibrate", "ok": True,
             "result": {"version": 2, "threshold": 0.29931234, "excluded": [out], "normal": {"p50": 0.1}}}
    shown = json.loads(compact_reply(reply))
    assert shown == {"ts": "2026-11-23T04:31:08.389Z", "command": "calibrate", "ok": True,
                     "result": {"version": 2, "threshold": 0.2993,
                                "excluded": [{"index": 9, "label": "frame 1210 (2026-11-23T04:30:21.967Z)",
                                              "score": 3.571, "z": 55.91,
                                              "reason": "robust z > 6 under calibration v1"}]}}


def test_the_rerun_command_the_demo_prints_can_be_pasted_into_a_shell(tmp_path):
    """--out with a space, a quote and a '#': the command in rerun.toml (and the demo's last line, built the
    same way) is shell-quoted, so pasting it runs edge-ad with that one path."""
    import shlex

    from edge_ad.demo.plan import make_plan, write_config, write_rerun_config

    out = tmp_path / "my demo's #1"
    out.mkdir()
    plan = make_plan(True, "gaussian")
    for path in (write_rerun_config(out, plan), write_config(out, plan, None)):
        line = next(x for x in path.read_text().splitlines() if x.startswith("#   edge-ad run"))
        assert shlex.split(line[1:]) == ["edge-ad", "run", "--config", str(out / "rerun.toml"), "--duration", "30"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and text in cmd:
            found.append(f"{proc.name}: {cmd}")
    return found


def test_sigterm_to_the_demo_stops_its_loop_and_broker(tmp_path):
    """A CI timeout or a cancelled job sends SIGTERM: the demo unwinds as on Ctrl-C (the loop and the broker
    stop with it) and exits 143, instead of dying at once and leaving both running."""
    import signal
    import time

    out = tmp_path / "term-out"
    p = subprocess.Popen([sys.executable, "-m", "edge_ad", "demo", "--quick", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if "first result after" in line or line.startswith("[6/8] inspect "):
                break
        assert _processes_mentioning(str(out)), "the loop is not running"
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = p.stderr.read()
    assert rc == 143 and "terminated by SIGTERM: the loop and the broker were stopped" in stderr, stderr
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_mentioning(str(out))


def test_a_broken_embedded_broker_falls_back_to_a_run_without_mqtt(tmp_path, monkeypatch):
    """amqtt installed but failing (an incompatible version): the demo goes on without MQTT and says why,
    instead of failing step 5."""
    from edge_ad.demo import steps
    from edge_ad.mqtt import broker

    class Broken:
        def start(self):
            raise ImportError("cannot import name 'Broker' from 'amqtt.broker'")

    monkeypatch.setattr(broker, "find_mosquitto", lambda: None)
    monkeypatch.setattr(broker, "embedded_available", lambda: True)
    monkeypatch.setattr(broker, "EmbeddedBroker", Broken)
    b, why, (status, line) = steps.step_broker(tmp_path, True)
    assert b is None and status == "warning" and "NO BROKER" in line
    assert "embedded amqtt broker could not start (ImportError: cannot import name 'Broker'" in why


def test_sigterm_during_the_demos_training_exits_as_sigterm(tmp_path, monkeypatch):
    """The training loop turns SIGTERM into a stop after the step (Interrupted, a KeyboardInterrupt): inside
    the demo that is still SIGTERM (exit 143 from the CLI), not a Ctrl-C (130)."""
    import signal

    import edge_ad.demo as demo
    from edge_ad.train.loops import Interrupted

    def train(out, plan, model):
        raise Interrupted("interrupted at step 3 of 2000; ...", signum=signal.SIGTERM)

    monkeypatch.setattr(demo, "step_train", train)
    with pytest.raises(demo.Terminated) as ei:
        demo.run_demo(tmp_path / "d", quick=True, mqtt=False)
    assert ei.value.signum == signal.SIGTERM
    monkeypatch.setattr(demo, "step_train", lambda *a: (_ for _ in ()).throw(Interrupted("x", signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt) as ei:
        demo.run_demo(tmp_path / "e", quick=True, mqtt=False)
    assert type(ei.value) is KeyboardInterrupt   # Ctrl-C: plain, no '--resume' advice the demo has no use for
