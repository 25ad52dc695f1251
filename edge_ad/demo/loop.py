"""Demo steps 6-7: ``edge-ad run`` as a subprocess, watched over MQTT (or its JSONL log), driven through a
lighting change and one recalibration, then stopped with SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeADError
from .console import Console, Steps
from .plan import DEVICE, SITE, DemoFailure, DemoPlan, child_env, conveyor, source_uri


# ``edge-ad run`` with torch blocked: what the console script does, after making 'import torch' fail
BOOT = ("import sys; sys.modules['torch'] = None; from edge_ad.cli import main; "
        "sys.exit(main(prog_name='edge-ad'))")


class JsonlTail:
    """New records of a JSON-lines file as it grows (a partial last line waits for its end)."""

    def __init__(self, path: Path):
        self.path = path
        self._pos = 0
        self._rest = b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


@dataclass
class LoopProgress:
    records: list[dict] = field(default_factory=list)
    max_source_index: int = -1

    def add(self, recs: list[dict]) -> None:
        for r in recs:
            self.records.append(r)
            self.max_source_index = max(self.max_source_index, int(r.get("source_index", -1)))

    @property
    def frames(self) -> int:
        return len(self.records)

    def count_version(self, version: int) -> int:
        return sum(1 for r in self.records if r.get("calibration_version") == version)


class MqttWatch:
    """The in-process subscriber: every message under the demo's site feeds the fleet view
    (:class:`edge_ad.mqtt.monitor.FleetView`) and a count per topic."""

    def __init__(self, url: str, protocol: str = "5"):
        from ..mqtt.collector import Collector
        from ..mqtt.monitor import FleetView
        from ..mqtt.settings import BrokerSettings
        from ..mqtt.topics import fleet_filter

        self.broker = BrokerSettings(url=url, protocol=protocol, username=None, password=None, reconnect_min_s=0.5,
                                     reconnect_max_s=5.0)
        self.view = FleetView(stale_after_s=30.0)
        self.lock = threading.Lock()
        self.per_topic: dict[str, int] = {}
        self.result_ids: set[str] = set()
        self.collector = Collector(self.broker, fleet_filter(SITE), persistent=False, on_message=self._on_message)

    def _on_message(self, rec) -> None:
        from ..mqtt.topics import parse

        parsed = parse(rec.topic)
        kind = parsed[2] if parsed else rec.topic
        with self.lock:
            self.per_topic[kind] = self.per_topic.get(kind, 0) + 1
            if kind == "result":
                try:
                    self.result_ids.add(json.loads(rec.payload)["id"])
                except (ValueError, KeyError, TypeError):
                    pass
            self.view.consume(rec.topic, rec.payload)

    def start(self) -> "MqttWatch":
        self.collector.start(timeout=10.0)
        return self

    def stop(self) -> None:
        self.collector.stop()

    def row(self):
        with self.lock:
            return self.view.devices.get((SITE, DEVICE))

    def table(self) -> str:
        with self.lock:
            return self.view.table()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(sorted(self.per_topic.items()))

    def results_received(self) -> int:
        with self.lock:
            return len(self.result_ids)


def compact_reply(reply: dict) -> str:
    """The calibrate command's reply as one JSON line, in the device's shape (docs/mqtt.md): floats rounded to 4
    significant digits; the envelope's schema_version, site and device and the result's normal-score statistics
    left out. The frames left out as likely defects (``excluded``) stay objects (index, label, score, z,
    reason), as the device sends them."""
    def rnd(x):
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: rnd(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rnd(v) for v in x]
        return x

    body = {k: v for k, v in reply.items() if k not in ("schema_version", "site", "device")}
    if isinstance(body.get("result"), dict):
        body["result"] = {k: v for k, v in body["result"].items() if k != "normal"}
    return json.dumps(rnd(body), sort_keys=True)


def monitor_line(row, msgs: int) -> str:
    """One plain line of the fleet view for logs (stdout not a terminal). Its two NG rates are on different
    bases and say so: the count and share of the results the monitor received since it started, and the rate of
    the device's last telemetry interval (``-`` before its first telemetry)."""
    if row is None:
        return ""
    last = "-"
    if row.last_result is not None:
        s = row.last_result.get("score")
        last = f"{'NG' if row.last_result['ng'] else 'OK'} {s:.3f}" if s is not None else "?"
    fps = "-" if row.fps is None else f"{row.fps:.1f}"
    since = f" ({100 * row.ng / row.results:.0f}%)" if row.results else ""
    interval = "-" if row.telemetry_ng_rate is None else f"{100 * row.telemetry_ng_rate:.0f}%"
    cal = "-" if row.calibration_version is None else f"v{row.calibration_version}"
    box = "-" if row.outbox_depth is None else str(row.outbox_depth)
    drift = {True: "DRIFT", False: "ok", None: "-"}[row.drift]
    return (f"      monitor  {row.site}/{row.device} {row.state}: {fps} fps, NG {row.ng} of {row.results} results "
            f"since start{since}, {interval} in the last telemetry interval, last {last}, calibration {cal}, "
            f"outbox {box}, drift {drift}, {msgs} MQTT messages")


class LoopRun:
    """``edge-ad run`` as a subprocess, driven through the lighting change and one recalibration."""

    def __init__(self, out: Path, plan: DemoPlan, config: Path, watch: MqttWatch | None, console: Console,
                 steps: Steps):
        self.out, self.plan, self.config, self.watch, self.console, self.steps = out, plan, config, watch, console, steps
        self.loop_dir = out / "loop"
        self.loop_dir.mkdir(parents=True, exist_ok=True)
        self.progress = LoopProgress()
        self.tail = JsonlTail(self.loop_dir / "results.jsonl")
        self.proc: subprocess.Popen | None = None
        self.calibration: dict[str, Any] = {}
        self.lighting_seen_at: int | None = None
        self.summary: dict | None = None
        self.returncode: int | None = None
        self.max_frames = 3 * plan.expected_frames + 100
        self.duration = 4.0 * plan.expected_frames / plan.fps + 120.0

    @property
    def args(self) -> list[str]:
        """The ``edge-ad`` arguments of the loop."""
        return ["run", "--config", str(self.config.resolve()), "--max-frames", str(self.max_frames),
                "--duration", f"{self.duration:.0f}", "--json"]

    @property
    def command(self) -> list[str]:
        """``edge-ad run ...`` through this interpreter, with torch made unimportable in that process: the
        loop must never need it (an ``import torch`` there fails the demo instead of passing unnoticed)."""
        return [sys.executable, "-c", BOOT, *self.args]

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = (self.loop_dir / "run.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("        " + ln for ln in lines[-n:])

    def _say(self, text: str) -> None:
        self.console.line(f"      {text}")

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        self._stdout = open(self.loop_dir / "run.out", "wb")
        self._stderr = open(self.loop_dir / "run.log", "wb")
        self.proc = subprocess.Popen(self.command, cwd=str(self.out), env=child_env(), stdin=subprocess.DEVNULL,
                                     stdout=self._stdout, stderr=self._stderr, start_new_session=True)
        self.console.line(f"{self.steps.prefix('inspect')}  edge-ad run --config {self.config} (pid {self.proc.pid}, "
                          f"torch blocked); source {source_uri(self.plan)}; stream mode; log "
                          f"{self.loop_dir / 'run.log'}")

    def _check_alive(self, what: str) -> None:
        rc = self.proc.poll()
        if rc == 0:
            self.returncode = rc
            raise DemoFailure(f"edge-ad run stopped on its own (its --max-frames {self.max_frames} / --duration "
                              f"{self.duration:.0f} bound) {what}: this machine is too slow or too busy for the "
                              f"demo's pace; try --fps lower than {self.plan.fps:g}")
        if rc is not None:
            self.returncode = rc
            raise DemoFailure(f"edge-ad run exited with code {rc} {what}; its log ({self.loop_dir / 'run.log'}) "
                              f"ends with:\n{self.log_tail()}")

    # ------------------------------------------------------------------ drive
    def drive(self) -> None:
        """Wait for frames, watch the lighting change, recalibrate once, collect frames after it."""
        p = self.plan
        deadline = time.monotonic() + self.duration - 10  # before the loop's own --duration bound ends it
        last_draw = 0.0
        interval = 0.5 if self.console.live else max(3.0, p.telemetry_s)
        state = "starting"
        t_state = time.monotonic()
        worker: threading.Thread | None = None
        box: dict[str, Any] = {}
        before_version = None
        while True:
            now = time.monotonic()
            self._check_alive("before the demo was done with it")
            self.progress.add(self.tail.poll())
            recs = self.progress.records
            if state == "starting":
                if recs:
                    before_version = int(recs[0]["calibration_version"])
                    self.calibration["before"] = before_version
                    self._say(f"first result after {now - t_state:.1f} s: frame {recs[0]['frame']} "
                              f"{recs[0]['decision']} score {recs[0]['score']:.3f}, calibration v{before_version}, "
                              f"{recs[0]['backend']} {recs[0]['precision']}")
                    state = "before"
                elif now - t_state > 90:
                    raise DemoFailure(f"edge-ad run produced no result within 90 s; its log ends with:\n"
                                      f"{self.log_tail()}")
            if state == "before" and self.progress.max_source_index >= p.lighting_from:
                self.lighting_seen_at = self.progress.frames
                pre = [r for r in recs if r["source_index"] < p.lighting_from]
                self._say(f"conveyor frame {p.lighting_from}: the LIGHTING CHANGES (brightness {p.brightness:+g}, "
                          f"contrast x{p.contrast:g}; synthetic:// lighting_from); so far {len(pre)} frames, "
                          f"{sum(r['ng'] for r in pre)} NG")
                state = "lit"
            if state == "lit" and self.progress.frames - self.lighting_seen_at >= p.settle:
                lit = [r for r in recs if r["source_index"] >= p.lighting_from]
                self._say(f"under the new light with calibration v{before_version}: {sum(r['ng'] for r in lit)} of "
                          f"{len(lit)} frames NG -> recalibrate on {p.calib_frames} live frames "
                          + ("(MQTT calibrate command)" if self.watch else "(no MQTT: edge_ad.calibration.recalibrate "
                                                                          "+ SIGHUP)"))
                worker = threading.Thread(target=self._calibrate_worker, args=(box,), daemon=True)
                worker.start()
                state = "calibrating"
                t_state = now
            if state == "calibrating" and not worker.is_alive():
                if "error" in box:
                    raise box["error"]
                self._report_calibration(box["reply"], time.monotonic() - t_state)
                state = "after"
            if state == "after":
                new_v = self.calibration["after"]
                if self.progress.count_version(new_v) >= p.after:
                    break
            if now - last_draw >= interval:
                last_draw = now
                self._draw()
            if now > deadline:
                raise DemoFailure(f"the demo did not reach its end within {self.duration:.0f} s (state {state}, "
                                  f"{self.progress.frames} frames inspected); the machine may be overloaded")
            time.sleep(0.1)
        self._draw()
        self.console.release()

    def _draw(self) -> None:
        if self.watch is None:
            recs = self.progress.records
            if recs:
                r = recs[-1]
                ng = sum(x["ng"] for x in recs)
                self.console.line(f"      progress  {len(recs)} frames, {ng} NG, last {r['decision']} "
                                  f"{r['score']:.3f}, calibration v{r['calibration_version']} (no MQTT: from "
                                  f"{self.loop_dir / 'results.jsonl'})")
            return
        if self.console.live:
            self.console.table("\n".join("      " + ln for ln in self.watch.table().splitlines()))
        else:
            text = monitor_line(self.watch.row(), sum(self.watch.counts().values()))
            if text:
                self.console.line(text)

    # ------------------------------------------------------------------ recalibration
    def _calibrate_worker(self, box: dict) -> None:
        try:
            box["reply"] = self._calibrate_mqtt() if self.watch is not None else self._calibrate_sighup()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc if isinstance(exc, EdgeADError) else DemoFailure(f"recalibration: {exc}")

    def _calibrate_mqtt(self) -> dict:
        from ..mqtt.requester import CommandClient

        p = self.plan
        timeout = 120.0
        client = CommandClient(self.watch.broker, client_id="edge-ad-demo-operator").start(timeout=10.0)
        try:
            reply = client.call(SITE, DEVICE, "calibrate",
                                {"frames": p.calib_frames, "policy": p.policy, "timeout_s": timeout},
                                timeout=timeout + 30.0)
        finally:
            client.stop()
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise DemoFailure(f"the calibrate command was refused by the device: {err.get('code', '?')}: "
                              f"{err.get('message', reply)}")
        return {"via": "mqtt", "reply": reply, "result": reply.get("result") or {}}

    def _calibrate_sighup(self) -> dict:
        """Without a broker: the same recalibration (edge_ad.calibration.recalibrate on the same frames the
        loop sees), written into the bundle, then SIGHUP makes the loop reload it."""
        from ..bundle import Bundle
        from ..calibration import recalibrate
        from ..inspector import Inspector
        from ..runtime.backends import open_backend

        p = self.plan
        start = self.progress.max_source_index + 1
        stream = conveyor(p)
        frames = [f.image for f in stream.frames(start, p.calib_frames)]
        bundle = Bundle.open(self.out / "bundle")
        rec0 = self.progress.records[0]
        be = open_backend(bundle, rec0.get("backend", "onnxruntime"), rec0.get("precision"), "cpu")
        refit_log = logging.getLogger("edge_ad.calibration.refit")
        level = refit_log.level
        refit_log.setLevel(logging.ERROR)  # the frames it leaves out are in the summary line
        try:
            res = recalibrate(bundle, Inspector(bundle, be), frames, policy=p.policy, progress=False,
                              source=f"edge-ad demo: conveyor frames {start}..{start + len(frames) - 1} (no MQTT)")
        finally:
            refit_log.setLevel(level)
            be.close()
        self.proc.send_signal(signal.SIGHUP)
        v = res.calibration.version
        deadline = time.monotonic() + 60
        while self.progress.count_version(v) == 0:  # the main thread reads the results
            if time.monotonic() > deadline:
                raise DemoFailure(f"the loop did not put calibration v{v} in force within 60 s of SIGHUP")
            time.sleep(0.1)
        return {"via": "sighup", "result": json.loads(json.dumps(res.summary(), default=float))}

    def _report_calibration(self, reply: dict, seconds: float) -> None:
        r = reply["result"]
        self.calibration.update(after=int(r["version"]), via=reply["via"], seconds=round(seconds, 2), result=r)
        if reply["via"] == "mqtt":
            self._say("calibrate reply (normal-score statistics left out): " + compact_reply(reply["reply"]))
        excl = r.get("excluded") or []
        self._say(f"recalibrated in {seconds:.1f} s via {'MQTT calibrate' if reply['via'] == 'mqtt' else 'SIGHUP'}: "
                  f"calibration v{r['previous_version']} -> v{r['version']}, threshold "
                  f"{r['previous_threshold']:.4g} -> {r['threshold']:.4g}, {r['n_used']} of {r['frames']} frames "
                  f"used ({len(excl)} left out as likely defects)")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 60.0) -> dict:
        """SIGTERM, wait for the drain, read the run summary (``--json``)."""
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DemoFailure(f"edge-ad run did not stop within {timeout:.0f} s of SIGTERM (killed); log: "
                              f"{self.loop_dir / 'run.log'}")
        finally:
            self._close_files()
        self.progress.add(self.tail.poll())
        text = (self.loop_dir / "run.out").read_text(errors="replace").strip().splitlines()
        try:
            self.summary = json.loads(text[-1]) if text else None
        except ValueError:
            self.summary = None
        if self.returncode != 0:
            raise DemoFailure(f"edge-ad run exited with code {self.returncode} after SIGTERM; its log ends with:\n"
                              f"{self.log_tail()}")
        if self.summary is None:
            raise DemoFailure(f"edge-ad run printed no summary; see {self.loop_dir / 'run.out'}")
        return self.summary

    def kill(self) -> None:
        """Last resort on the way out (an error or Ctrl-C in the demo): SIGTERM, then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._close_files()

    def _close_files(self) -> None:
        for fh in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if fh is not None and not fh.closed:
                fh.close()
