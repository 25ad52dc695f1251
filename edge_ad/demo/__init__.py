"""``edge-ad demo``: the whole product end to end on one machine, with no camera and no GPU.

Steps (each prints one line with its timing; a failed step stops the demo with a clear message):

1. **data**      synthetic parts in the MVTec layout (:func:`edge_ad.data.synthetic.write_category`);
2. **train**     a quick model (Gaussian by default: seconds; EfficientAD / FADeR with a small step count);
3. **evaluate**  AUROC / AUPRO / F1 through the deployed graph, with the grid and histogram pictures;
4. **quantize**  INT8 with the accuracy guard, each form on its own verdict; a refusal is reported, and the
                 loop runs INT8 when the CPU form passed, else FP32;
5. **broker**    Mosquitto on a free loopback port (:mod:`edge_ad.mqtt.broker`); when it is not installed, the
                 embedded amqtt broker (MQTT 3.1.1) in this process; with neither, the loop runs without MQTT;
6. **inspect**   ``edge-ad run`` as a subprocess on a ``synthetic://`` conveyor with planted defects and a
                 scheduled lighting change, with the live fleet table (:mod:`edge_ad.mqtt.monitor`) fed
                 by an in-process subscriber; after the lighting changed, one recalibration through the
                 MQTT ``calibrate`` command (:class:`edge_ad.mqtt.requester.CommandClient`), or, without
                 MQTT, through :func:`edge_ad.calibration.recalibrate` and SIGHUP (reload the bundle);
7. **stop**      SIGTERM (the loop drains, flushes its outbox, publishes ``offline``), then the broker;
8. **report**    ``report.html`` + PNGs: anomaly maps of NG parts (re-inspected with the calibration that
                 decided them), score histograms with the threshold, counts (frames, NG, planted defects
                 found / missed, false alarms), calibration versions, MQTT messages per topic.

The loop process never imports torch (it is ``edge-ad run``); this process does, for training.

Modules: :mod:`.plan` (sizes, frame counts, the loop's config), :mod:`.console` (step lines, live table),
:mod:`.steps` (steps 1-5), :mod:`.loop` (steps 6-7), :mod:`.report` (step 8); :func:`run_demo` runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeADError
from .console import Console, Steps
from .loop import LoopRun, MqttWatch
from .plan import (DEVICE, FULL, QUICK, RERUN_CONFIG, SITE, DemoFailure, DemoPlan, make_plan, source_uri,
                   write_config, write_rerun_config)
from .steps import prepare_out, step_broker, step_data, step_evaluate, step_quantize, step_train

__all__ = ["run_demo", "DemoResult", "DemoFailure", "DemoPlan", "make_plan", "FULL", "QUICK", "Console"]


@dataclass
class DemoResult:
    out: Path
    report: Path
    summary: dict


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during the demo (a CI timeout, a closed terminal): unwinds like Ctrl-C, so the loop and
    the broker are stopped; the command exits 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM / SIGHUP raise :class:`Terminated` in the main thread while the demo runs (their default
    would end the process at once and leave the loop and the broker running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        for sig in old:   # once: a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_demo(out: str | os.PathLike = "demo-out", *, quick: bool = False, model: str = "gaussian",
             image_size: int | None = None, steps: int | None = None, fps: float | None = None,
             kind: str = "disc", seed: int = 0, mqtt: bool = True, console: Console | None = None) -> DemoResult:
    """Run every step; returns where the report is. Raises DemoFailure (exit 1) naming the failed step,
    InputError (exit 2) for bad options. Whatever happens, the loop and the broker are stopped."""
    from .. import __version__

    plan = make_plan(quick, model, image_size, steps, fps, kind, seed)
    console = console or Console()
    t_start = time.monotonic()
    out = prepare_out(Path(out))
    steps_ = Steps(console)
    console.line(f"edge-ad demo {__version__}: {'quick' if quick else 'full'} run, {model} model at "
                 f"{plan.image_size} px on synthetic '{plan.kind}' parts, work folder {out}/ "
                 f"({os.cpu_count()} CPU cores)")
    summary: dict[str, Any] = {"version": __version__, "quick": quick, "model": model, "plan": asdict(plan),
                               "out": str(out), "site": SITE, "device": DEVICE}
    broker = watch = loop = None
    failure: DemoFailure | None = None
    unwind = _signals_unwind()
    unwind.__enter__()
    try:
        steps_.run("data", lambda: step_data(out, plan))
        steps_.run("train", lambda: step_train(out, plan, model))
        holder: dict[str, Any] = {}

        def _eval():
            holder["eval"], line = step_evaluate(out)
            return line

        steps_.run("evaluate", _eval)
        summary["eval"] = {k: holder["eval"]["overall"].get(k) for k in
                           ("n", "image_auroc", "pixel_auroc", "aupro", "f1", "threshold")}

        def _quant():
            holder["quant"], line = step_quantize(out, plan)
            return line

        steps_.run("quantize", _quant)
        summary["quantize"] = {k: v for k, v in holder["quant"].items() if k != "entries"}
        summary["quantize"]["guard"] = [{k: e.get(k) for k in ("candidate", "passed", "rank_corr", "agreement",
                                                                 "auroc", "failures")}
                                        for e in holder["quant"].get("entries", [])]

        def _broker():
            nonlocal broker
            broker, holder["no_mqtt"], line = step_broker(out, mqtt)
            return line

        steps_.run("broker", _broker)
        summary["mqtt"] = {"enabled": broker is not None, "url": broker.url if broker else None,
                           "why_off": holder["no_mqtt"] or None}

        def _inspect():
            nonlocal watch, loop
            protocol = str(getattr(broker, "protocol", "5"))
            config = write_config(out, plan, broker.url if broker else None, protocol)
            if broker is not None:
                watch = MqttWatch(broker.url, protocol).start()
            loop = LoopRun(out, plan, config, watch, console, steps_)
            loop.start()
            loop.drive()
            c = loop.calibration
            return "ok", (f"{loop.progress.frames} frames inspected so far; calibration v{c['before']} -> "
                          f"v{c['after']} in force")

        steps_.run("inspect", _inspect)

        def _stop():
            t0 = time.monotonic()
            s = loop.stop()
            parts = [f"edge-ad run stopped by SIGTERM in {time.monotonic() - t0:.1f} s (exit 0): {s['frames']} "
                     f"frames, {s['ng']} NG, {s['dropped']} dropped, {s['fps']:.1f} frames/s, drained "
                     f"{'yes' if s.get('drained') else 'NO'}"]
            if watch is not None:
                watch_deadline = time.monotonic() + 10
                while watch.results_received() < s["frames"] and time.monotonic() < watch_deadline:
                    time.sleep(0.1)
                time.sleep(0.3)  # the offline status follows the last results
                watch.stop()
                parts.append(f"MQTT: {watch.results_received()} of {s['frames']} results received"
                             f" (outbox left {s.get('outbox_left')})")
            if broker is not None:
                broker.stop()
                parts.append("broker stopped")
            return "ok", "; ".join(parts)

        steps_.run("stop", _stop)
        write_rerun_config(out, plan)
    except DemoFailure as exc:
        failure = exc
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)   # Terminated; a training step stopped by SIGTERM (Interrupted)
        if signum is not None and signum != signal.SIGINT:   # the CLI exits 128 + the signal
            term = exc if isinstance(exc, Terminated) else Terminated(signum)
            console.line(f"{term}: stopping the loop and the broker")
            raise term from None
        console.line("interrupted: stopping the loop and the broker")
        raise KeyboardInterrupt from None  # plain: a training step's "rerun with --resume" is not the demo's
    finally:
        try:
            if loop is not None:
                loop.kill()
            if watch is not None:
                try:
                    watch.stop()
                except Exception:
                    pass
            if broker is not None:
                broker.close()
        finally:
            unwind.__exit__(None, None, None)

    # the report is written even after a failed step (what ran, and why it stopped)
    summary["loop"] = _loop_summary(loop)
    if watch is not None:
        summary["mqtt"].update(per_topic=watch.counts(), results_received=watch.results_received(),
                               final_row=_row_dict(watch.row()))
    report_path = out / "report.html"
    rec = steps_.get("report")
    try:
        from .report import write_report

        t0 = time.monotonic()
        pictures = write_report(out, plan, summary, loop.progress.records if loop else [], steps_.records,
                                failure=str(failure) if failure else None)
        rec.seconds, rec.status = time.monotonic() - t0, "ok"
        rec.summary = f"{report_path} ({', '.join(pictures)})"
        console.line(f"{steps_.prefix('report')} {rec.seconds:6.1f} s  {rec.summary}")
    except Exception as exc:  # the report never hides the first failure, and never ends in a traceback
        why = str(exc) if isinstance(exc, EdgeADError) else f"{type(exc).__name__}: {exc}"
        rec.status, rec.summary = "failed", why
        if failure is None:
            failure = DemoFailure(f"demo step 8 (report) failed: {why}")
        console.line(f"{steps_.prefix('report')}   FAILED: {why}")
    summary["steps"] = [asdict(r) for r in steps_.records]
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    if failure is not None:
        raise failure
    console.line(_final_lines(summary, report_path))
    return DemoResult(out, report_path, summary)


def _row_dict(row) -> dict | None:
    return None if row is None else row.to_dict()


def _loop_summary(loop: LoopRun | None) -> dict:
    if loop is None:
        return {}
    from .report import counts

    recs = loop.progress.records
    return {"command": ["edge-ad", *loop.args], "run_summary": loop.summary, "returncode": loop.returncode,
            "frames": len(recs), "calibration": loop.calibration, "counts": counts(recs, loop.plan),
            "source": source_uri(loop.plan)}


def _final_lines(summary: dict, report: Path) -> str:
    cs = summary["loop"]["counts"]
    cal = summary["loop"]["calibration"]
    mq = summary["mqtt"]
    from .report import PHASES

    lines = [f"done in {summary['seconds']:.0f} s: {cs['all']['frames']} frames inspected, {cs['all']['ng']} NG"]
    for key, title in PHASES.items():
        c = cs[key]
        if c["frames"]:
            lines.append(f"  {title + ':':<28} {c['frames']:4d} frames, {c['ng']:4d} NG; planted defects "
                         f"{c['found']}/{c['defects']} found, {c['missed']} missed; {c['false_alarms']} false alarms "
                         f"of {c['false_alarms'] + c['ok_normal']} good parts")
    lines.append(f"  calibration v{cal.get('before')} -> v{cal.get('after')} "
                 f"({'MQTT calibrate command' if cal.get('via') == 'mqtt' else 'recalibrate + SIGHUP'})")
    if mq["enabled"]:
        lines.append("  MQTT messages per topic: " + ", ".join(f"{k} {v}" for k, v in mq.get("per_topic", {}).items()))
    else:
        lines.append(f"  MQTT off: {mq['why_off']}")
    lines.append(f"report: {report}")
    if (report.parent / RERUN_CONFIG).is_file():
        lines.append(f"run the loop again: edge-ad run --config {shlex.quote(str(report.parent / RERUN_CONFIG))} "
                     "--duration 30")
    return "\n".join(lines)
