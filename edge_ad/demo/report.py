"""The report of ``edge-ad demo``: counts per phase, pictures, and ``report.html`` (see :mod:`edge_ad.demo`).

Phases of the conveyor run: ``before`` (the light the model was trained under), ``lit`` (after the
lighting change, still with the old calibration; this includes the frames the recalibration collects),
``after`` (decided with the new calibration). A frame's truth comes from the ``synthetic://`` source
(``truth.label`` / ``truth.defect_type`` in each result).

Pictures (PNG, next to ``report.html``): a score histogram per phase with the threshold in force, and
grids of anomaly maps of NG parts (found defects, false alarms) and missed defects, re-inspected from
the same conveyor frames with the calibration version that decided them, so the map shows what the
loop saw. The loop's own NG snapshots (JPEG with heat map) are shown beside them.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

PHASES = {"before": "before the lighting change", "lit": "new light, old calibration",
          "after": "after recalibration"}
MAX_ROWS = 6


def _phase(r: dict, lighting_from: int, before_version: int) -> str:
    if int(r.get("calibration_version", before_version)) != before_version:
        return "after"
    return "lit" if int(r.get("source_index", 0)) >= lighting_from else "before"


def _label(r: dict) -> int:
    return int((r.get("truth") or {}).get("label", 0))


def counts(records: Sequence[dict], plan) -> dict[str, dict]:
    """Frames, NG, planted defects found / missed and false alarms: per phase and for the whole run."""
    out = {k: {"frames": 0, "ng": 0, "defects": 0, "found": 0, "missed": 0, "false_alarms": 0, "ok_normal": 0,
               "calibration_versions": []} for k in (*PHASES, "all")}
    if not records:
        return out
    v0 = int(records[0].get("calibration_version", 0))
    for r in records:
        for key in (_phase(r, plan.lighting_from, v0), "all"):
            c = out[key]
            c["frames"] += 1
            ng, lab = bool(r.get("ng")), _label(r)
            c["ng"] += ng
            c["defects"] += lab
            c["found"] += ng and lab == 1
            c["missed"] += (not ng) and lab == 1
            c["false_alarms"] += ng and lab == 0
            c["ok_normal"] += (not ng) and lab == 0
            v = int(r.get("calibration_version", 0))
            if v not in c["calibration_versions"]:
                c["calibration_versions"].append(v)
    return out


# ----------------------------------------------------------------------------- pictures
def write_histograms(out: Path, records: Sequence[dict], plan) -> list[str]:
    from .. import viz

    names = []
    if not records:
        return names
    v0 = int(records[0].get("calibration_version", 0))
    for key, title in PHASES.items():
        rs = [r for r in records if _phase(r, plan.lighting_from, v0) == key]
        if not rs:
            continue
        s = np.array([float(r["score"]) for r in rs])
        lab = np.array([_label(r) for r in rs])
        thr = float(rs[-1]["threshold"])
        vers = sorted({int(r["calibration_version"]) for r in rs})
        name = f"histogram_{key}.png"
        viz.write_histogram(out / name, s[lab == 0], s[lab == 1], thr,
                            title=f"conveyor scores, {title} (calibration v{'/'.join(map(str, vers))})")
        names.append(name)
    return names


def _pick(records: Sequence[dict], max_rows: int = MAX_ROWS) -> list[tuple[dict, str]]:
    """Rows for one grid: found defects, then false alarms, then missed defects (spread over the run)."""
    found = [(r, "found") for r in records if r["ng"] and _label(r) == 1]
    false = [(r, "false alarm") for r in records if r["ng"] and _label(r) == 0]
    missed = [(r, "missed") for r in records if not r["ng"] and _label(r) == 1]

    def spread(xs, k):
        if len(xs) <= k:
            return xs
        idx = np.unique(np.round(np.linspace(0, len(xs) - 1, k)).astype(int))
        return [xs[i] for i in idx]

    n_missed = min(len(missed), 2, max_rows // 3)
    n_false = min(len(false), 2, max_rows // 3)
    n_found = min(len(found), max_rows - n_missed - n_false)
    rows = spread(found, n_found) + spread(false, n_false) + spread(missed, n_missed)
    if len(rows) < max_rows:  # fill with more of whatever there is
        rest = [x for x in found + false + missed if x not in rows]
        rows += rest[:max_rows - len(rows)]
    return rows


def write_ng_maps(out: Path, records: Sequence[dict], plan) -> tuple[list[str], dict]:
    """Grids of re-inspected anomaly maps, one per phase; returns (names, re-inspection check)."""
    from .. import viz
    from ..bundle import Bundle
    from .plan import conveyor
    from ..inspector import Inspector
    from ..runtime.backends import open_backend
    from ..scoring import Calibration

    names: list[str] = []
    check = {"frames": 0, "max_score_diff": 0.0}
    interesting = [r for r in records if r.get("ng") or _label(r) == 1]
    if not interesting:
        return names, check
    v0 = int(records[0].get("calibration_version", 0))
    bundle = Bundle.open(out / "bundle")
    stream = conveyor(plan)
    precision = records[0].get("precision") or None
    backend = open_backend(bundle, "onnxruntime", precision if precision in ("fp32", "fp16", "int8") else None, "cpu")
    inspectors: dict[int, Inspector] = {}

    def inspector(v: int) -> Inspector:
        if v not in inspectors:
            p = bundle.calibration_version_file(v)
            try:
                cal = Calibration.from_dict(json.loads(p.read_text("utf-8")), where=str(p))
                inspectors[v] = Inspector(bundle, backend, calibration=cal)
            except (OSError, ValueError, InputError) as exc:
                raise InputError(f"re-inspection with calibration v{v}: {exc}") from exc
        return inspectors[v]

    try:
        for key, title in PHASES.items():
            chosen = _pick([r for r in interesting if _phase(r, plan.lighting_from, v0) == key],
                           3 if key == "lit" else MAX_ROWS)
            if not chosen:
                continue
            rows, thresholds = [], set()
            for r, what in chosen:
                insp = inspector(int(r["calibration_version"]))
                f = stream.frame(int(r["source_index"]))
                sc = insp.inspect([f.image])
                amap = insp.full_maps(sc, f.image.shape[:2])[0]
                check["frames"] += 1
                check["max_score_diff"] = max(check["max_score_diff"], abs(float(sc.scores[0]) - float(r["score"])))
                thresholds.add(float(insp.calibration.threshold))
                kind = f.defect_type if f.label else "good part"
                rows.append(viz.GridRow(f.image, f.mask if f.label else None, amap,
                                        f"#{r['source_index']} {kind}: {r['decision']} {r['score']:.3f} ({what})"))
            thr = thresholds.pop() if len(thresholds) == 1 else None
            name = f"ng_maps_{key}.png"
            viz.write_grid(out / name, rows, cell=192, threshold=thr,
                           title=f"{title}: NG parts, missed defects" + (f" (thr {thr:.3g})" if thr else ""))
            names.append(name)
    finally:
        backend.close()
    return names, check


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3} td.n{text-align:right} .warning{color:#a60} .failed{color:#b00;font-weight:bold}
.ok{color:#070} img{max-width:100%;border:1px solid #ccc;margin:4px 0} .snaps img{width:200px;margin-right:6px}
code{background:#f5f5f5;padding:0 3px} pre{background:#f7f7f7;padding:8px;overflow:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="n"' if isinstance(c, (int, float)) and not isinstance(c, bool) else ""
            cells.append(f"<td{cls}>{_e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{_e(name)}" alt="{_e(alt)}"></p>'


def _rel(out: Path, p: str | os.PathLike) -> str:
    try:
        return os.path.relpath(Path(p).resolve(), out.resolve())
    except ValueError:
        return str(p)


def write_report(out: Path, plan, summary: dict, records: Sequence[dict], steps: Sequence,
                 failure: str | None = None) -> list[str]:
    """Pictures + ``report.html``; returns the picture names written."""
    from .. import atomic

    pictures = write_histograms(out, records, plan)
    maps, check = write_ng_maps(out, records, plan)
    pictures += maps
    summary["reinspection"] = check
    c = counts(records, plan)
    loop = summary.get("loop") or {}
    cal = loop.get("calibration") or {}
    mq = summary.get("mqtt") or {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edge-ad demo report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>edge-ad demo report</h1>",
             f"<p>{_e(_dt.datetime.now().astimezone().isoformat(timespec='seconds'))} &middot; edge_ad "
             f"{_e(summary.get('version'))} &middot; {_e(platform.platform())}, {os.cpu_count()} CPU cores &middot; "
             f"{'quick' if summary.get('quick') else 'full'} run, model <b>{_e(summary.get('model'))}</b> at "
             f"{plan.image_size} px, synthetic '{_e(plan.kind)}' parts</p>"]
    if failure:
        parts.append(f"<p class='failed'>The demo FAILED: {_e(failure)}</p>")

    parts.append("<h2>Steps</h2>")
    parts.append(_table(["#", "step", "status", "seconds", "what it did"],
                        [(s.index, s.name, s.status, round(s.seconds, 1), s.summary) for s in steps
                         if s.name != "report"]))

    parts.append("<h2>Inspection loop: counts</h2>")
    parts.append(f"<p>Source <code>{_e(loop.get('source', ''))}</code> (stream mode; the light changes at conveyor "
                 f"frame {plan.lighting_from}: brightness {plan.brightness:+g}, contrast x{plan.contrast:g}). "
                 f"Command: <code>{_e(' '.join(map(str, loop.get('command', []))))}</code> (started through this "
                 f"Python with <code>torch</code> made unimportable: the loop never needs it).</p>")
    rows = []
    for key, title in (*PHASES.items(), ("all", "whole run")):
        x = c[key]
        rows.append((title, x["frames"], x["ng"], x["defects"], x["found"], x["missed"], x["false_alarms"],
                     ", ".join(f"v{v}" for v in x["calibration_versions"]) or "-"))
    parts.append(_table(["phase", "frames", "NG", "planted defects", "found", "missed", "false alarms",
                         "calibration"], rows))
    rs = loop.get("run_summary") or {}
    if rs:
        parts.append(f"<p>edge-ad run summary: {rs.get('frames')} frames inspected, {rs.get('dropped')} dropped "
                     f"(stream mode keeps the newest frame), {rs.get('fps')} frames/s, stopped by "
                     f"{_e(rs.get('reason'))}, queues drained: {rs.get('drained')}, outbox left: "
                     f"{rs.get('outbox_left')}.</p>")

    parts.append("<h2>Calibration</h2>")
    res = cal.get("result") or {}
    if res:
        via = "the MQTT <code>calibrate</code> command" if cal.get("via") == "mqtt" else \
            "edge_ad.calibration.recalibrate + SIGHUP (no MQTT)"
        rows = []
        for when, v in (("before", res.get("previous_version")), ("after", res.get("version"))):
            cv = _calibration(out, v)
            rows.append((when, f"v{v}", _fmt(cv.get("threshold")), cv.get("policy", "?"), cv.get("n_frames", "?"),
                         cv.get("source", "?"), cv.get("created", "?")))
        parts.append(_table(["", "version", "threshold", "policy", "frames", "fitted on", "created"], rows))
        excl = res.get("excluded") or []
        parts.append(f"<p>Recalibrated through {via} in {cal.get('seconds')} s; {len(excl)} frames left out as "
                     f"likely defects{': ' + _e(', '.join(str(e.get('index')) for e in excl)) if excl else ''}.</p>")
    else:
        parts.append(f"<p>No recalibration happened (calibration in force: v{_e(cal.get('before', '?'))}).</p>")

    parts.append("<h2>MQTT</h2>")
    if mq.get("enabled"):
        per = mq.get("per_topic") or {}
        parts.append(f"<p>Broker {_e(mq.get('url'))}; messages received by the demo's subscriber on "
                     f"<code>edge-ad/v1/{_e(summary.get('site'))}/{_e(summary.get('device'))}/...</code>, per "
                     f"topic; results: {mq.get('results_received')} unique of {c['all']['frames']} inspected.</p>")
        parts.append(_table(["topic", "messages"], sorted(per.items())))
        row = mq.get("final_row")
        if row:
            parts.append("<p>Last fleet-monitor row:</p><pre>" + _e(json.dumps(row, indent=1, default=str)) + "</pre>")
    else:
        parts.append(f"<p class='warning'>MQTT was off: {_e(mq.get('why_off'))}.</p>")

    parts.append("<h2>Score histograms (threshold in force)</h2>")
    parts += [_img(n, n) for n in pictures if n.startswith("histogram_")]
    parts.append("<h2>Anomaly maps of NG parts</h2>")
    parts.append(f"<p>Conveyor frames re-inspected with the calibration that decided them ({check['frames']} frames; "
                 f"largest score difference from the loop's {check['max_score_diff']:.2g}).</p>")
    parts += [_img(n, n) for n in maps]
    snaps = [r["snapshot"] for r in records if r.get("snapshot")]
    if snaps:
        idx = np.unique(np.round(np.linspace(0, len(snaps) - 1, min(6, len(snaps)))).astype(int))
        parts.append(f"<p>The loop's own NG snapshots ({len(snaps)} in "
                     f"<code>{_e(_rel(out, Path(snaps[0]).parent))}</code>), a few of them:</p><p class='snaps'>")
        parts += [f'<img src="{_e(_rel(out, snaps[i]))}" alt="snapshot">' for i in idx]
        parts.append("</p>")

    ev = summary.get("eval") or {}
    q = summary.get("quantize") or {}
    parts.append("<h2>Offline evaluation and quantization</h2>")
    if ev:
        parts.append(_table(["images", "image AUROC", "pixel AUROC", "AUPRO", "F1 at threshold", "threshold"],
                            [tuple(_fmt(ev.get(k)) for k in ("n", "image_auroc", "pixel_auroc", "aupro", "f1",
                                                              "threshold"))]))
        parts += [_img("eval/grid.png", "eval grid"), _img("eval/histogram.png", "eval histogram")]
    if q:
        parts.append(f"<p>{_e(quantize_verdict(q))}.</p>")
        grows = []
        for g in q.get("guard") or []:
            auc = "; ".join(f"{k} {v['fp32']:.3f}->{v['candidate']:.3f}" for k, v in (g.get("auroc") or {}).items())
            grows.append((g.get("candidate"), "pass" if g.get("passed") else "FAIL", _fmt(g.get("rank_corr")),
                          _fmt(g.get("agreement")), auc, "; ".join(g.get("failures") or [])))
        if grows:
            parts.append(_table(["graph", "guard", "rank corr", "agreement", "AUROC fp32->int8", "why"], grows))

    parts.append("<h2>Files</h2><ul>")
    for name in ("edge-ad.toml", "rerun.toml", "loop/results.jsonl", "loop/run.log", "loop/telemetry.jsonl", "eval/report.json",
                 "bundle/quant_report.json", "bundle/calibration.d", "summary.json"):
        if (out / name).exists() or name == "summary.json":
            parts.append(f"<li><a href='{_e(name)}'>{_e(name)}</a></li>")
    parts.append("</ul></body></html>")
    atomic.write_text(out / "report.html", "\n".join(parts) + "\n")
    return pictures


def quantize_verdict(q: dict) -> str:
    """The report's sentence on the quantize step (its ``summary.json`` entry): what passed, what runs."""
    if q.get("passed"):
        return "INT8 passed the guard and runs"
    if q.get("files"):   # one INT8 form went in, the other was refused
        return (f"INT8 {', '.join(q['files'])} passed the guard, the other form was refused ({q.get('refused')}); "
                f"{str(q.get('precision') or 'fp32').upper()} runs")
    return "INT8 refused by the guard; FP32 runs"


def _calibration(out: Path, version) -> dict:
    """A calibration version as recorded in the bundle's history (empty when unreadable)."""
    try:
        return json.loads((out / "bundle" / "calibration.d" / f"{int(version):04d}.json").read_text("utf-8"))
    except (OSError, ValueError, TypeError):
        return {}


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    return "n/a" if v is None else v
