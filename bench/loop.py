"""End-to-end throughput and memory of ``edge-ad run`` against the bare backend, on the same model and machine.

What it does:

1. builds a bundle (default: EfficientAD-S at 256x256, untrained weights: speed and memory do not depend
   on the weights) exported to ONNX, calibrated on synthetic normal parts; or uses ``--bundle``;
2. writes an MJPG video of synthetic conveyor frames (320x320 by default, so decoding and resizing are
   part of the loop's work, as with a camera);
3. **bare backend**: decodes and resizes the frames beforehand and times the model alone on batches of
   ``--batch`` frames: ``backend.infer`` (ONNX Runtime, the same session options the loop uses) plus the
   model's own numpy head where it has one (the Gaussian model's distance map), after a warm-up;
4. **loop**: runs ``edge-ad run`` in a fresh process, in trigger mode (no frame dropped) on the video
   (``loop=1``) for ``--frames`` frames with ``pipeline.max_batch = --batch``, JSONL log and telemetry on;
   frames/s is measured between the decisions of frame ``--warmup`` and the last frame (the JSONL
   capture timestamps), and over the whole run;
5. prints the ratio (target >= 0.90), the loop process's RSS at the first and last telemetry report
   and its peak, and whether ``torch`` was imported in the loop process (it must not be with ONNX
   Runtime).

Examples::

    python bench/loop.py                                    # EfficientAD-S 256, 100 frames (~2 min, 2 cores)
    python bench/loop.py --frames 10000 --model gaussian --image-size 128    # long run: memory growth
    python bench/loop.py --bundle path/to/bundle --frames 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_bundle(path: Path, kind: str, size: int) -> "object":
    """A freshly initialised model of ``kind`` exported to ONNX and calibrated on synthetic normals."""
    import onnxruntime as ort

    from edge_ad import gaussian, scoring
    from edge_ad.bundle import Bundle
    from edge_ad.compile.export import export_bundle
    from edge_ad.data.image import to_batch
    from edge_ad.data.synthetic import make_part
    from edge_ad.models import build, default_config, describe

    cfg = default_config(kind)
    model = build(kind, size, cfg).eval()
    b = Bundle.create(path, describe(model, kind, size, cfg))
    export_bundle(b, module=model, progress=False)
    normals = [make_part("disc", size, None, seed=7, index=i).image for i in range(16)]
    sess = ort.InferenceSession(str(b.file("model.onnx")), providers=["CPUExecutionProvider"])
    outs = dict(zip(b.outputs, sess.run(b.outputs, {"image": to_batch(normals, (size, size))})))
    extra = {}
    if kind == "gaussian":
        stats = gaussian.fit(outs["feat"], "patch")
        extra["gaussian"] = "gaussian.d/0001.npz"
        stats.save(b.file(extra["gaussian"]))
        b.add_file(extra["gaussian"])
        outs = {"map": gaussian.distance_map(outs["feat"], stats)}
    cal = scoring.Calibration(maps=scoring.fit_map_norms(outs), threshold=0.0, policy="max",
                              map_pad=int(b.model.get("map_pad", 0)), extra=extra, source="bench/loop.py")
    s = scoring.score(outs, cal).scores
    b.write_calibration(cal.replace(threshold=scoring.threshold_from_policy(s, "max"),
                                    normal=scoring.normal_stats(s)))
    return Bundle.open(path)


def write_video(path: Path, n: int, size: int) -> list[np.ndarray]:
    """``n`` conveyor frames (a few hundred distinct ones, looped by the source) as MJPG AVI."""
    import cv2

    from edge_ad.data.synthetic import ConveyorStream

    stream = ConveyorStream("disc", size, defect_rate=0.1, seed=3)
    frames = [f.image for f in stream.frames(0, n)]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (size, size))
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    return frames


def bare_fps(bundle, frames: list[np.ndarray], batch: int, n: int, threads: int, warmup: int = 3) -> dict:
    """Frames/s of the model alone: the backend's inference plus the model's numpy head (the Gaussian
    model's Mahalanobis distance; nothing for the others), on inputs decoded and resized beforehand."""
    from edge_ad.data.image import to_batch
    from edge_ad.inspector import Inspector
    from edge_ad.runtime.backends import open_backend

    opts = {"max_batch": batch}
    if threads:
        opts["threads"] = threads
    be = open_backend(bundle, "onnxruntime", None, "cpu", **opts)
    insp = Inspector(bundle, be)
    size = bundle.image_size
    batches = [to_batch([frames[(i + j) % len(frames)] for j in range(batch)], size)
               for i in range(0, max(len(frames), batch), batch)]
    for i in range(warmup):
        insp.raw_maps(batches[i % len(batches)])
    done = 0
    t0 = time.perf_counter()
    i = 0
    while done < n:
        insp.raw_maps(batches[i % len(batches)])
        done += batch
        i += 1
    dt = time.perf_counter() - t0
    be.close()
    return {"fps": done / dt, "frames": done, "seconds": dt}


def loop_run(bundle_path: Path, video: Path, work: Path, frames: int, batch: int, threads: int,
             telemetry_s: float) -> dict:
    """``edge-ad run`` in a fresh process; returns its summary plus torch / RSS facts."""
    cfg = work / "run.toml"
    cfg.write_text(
        f'[model]\nbundle = "{bundle_path}"\nbackend = "onnxruntime"\ndevice = "cpu"\nthreads = {threads}\n\n'
        f'[source]\nuri = "file://{video}?loop=1"\nmode = "trigger"\n\n'
        f"[pipeline]\nqueue_size = {max(2, 2 * batch)}\nmax_batch = {batch}\n\n"
        f'[output]\njsonl = "{work / "results.jsonl"}"\n\n'
        f'[telemetry]\ninterval_s = {telemetry_s}\npath = "{work / "telemetry.jsonl"}"\n')
    probe = work / "modules.json"
    code = ("import atexit, json, sys\n"
            f"atexit.register(lambda: open({str(probe)!r}, 'w').write(json.dumps("
            "{'torch': 'torch' in sys.modules, 'modules': len(sys.modules)})))\n"
            "from edge_ad.cli import main\nmain()\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "run", "--config", str(cfg), "--max-frames", str(frames),
                        "--json"], capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"edge-ad run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    summary["process_wall_s"] = wall
    summary.update(json.loads(probe.read_text()))
    tel = [json.loads(line) for line in (work / "telemetry.jsonl").read_text().splitlines() if line.strip()]
    rss = [t["memory_mb"] for t in tel]
    summary["rss_start_mb"], summary["rss_end_mb"], summary["rss_peak_mb"] = rss[0], rss[-1], max(rss)
    summary["telemetry_reports"] = len(tel)
    summary["latency_ms"] = tel[-1].get("latency_ms")
    return summary


def steady_fps(results: Path, skip: int) -> float:
    """Frames/s between the decision of frame ``skip`` and the last one (capture timestamps)."""
    import datetime as dt

    def t(rec):
        return dt.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()

    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if len(recs) <= skip + 1:
        return float("nan")
    span = t(recs[-1]) - t(recs[skip])
    return (len(recs) - 1 - skip) / span if span > 0 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientad-s", choices=("efficientad-s", "efficientad-m", "fader",
                                                                 "gaussian"))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--bundle", type=Path, default=None, help="Use this bundle instead of building one.")
    ap.add_argument("--frames", type=int, default=100, help="Frames the loop inspects (10000 for the memory run).")
    ap.add_argument("--bare-frames", type=int, default=None, help="Frames timed on the bare backend "
                                                                   "(default: min(frames, 100)).")
    ap.add_argument("--batch", type=int, default=1, help="Batch of the bare backend = the loop's max_batch.")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default).")
    ap.add_argument("--video-size", type=int, default=None, help="Side of the video frames (default 1.25x model).")
    ap.add_argument("--warmup", type=int, default=5, help="Loop frames left out of the steady-state rate.")
    ap.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="edge-ad-bench-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    from edge_ad.bundle import Bundle

    t0 = time.perf_counter()
    if args.bundle is not None:
        bundle = Bundle.open(args.bundle)
    else:
        bundle = build_bundle(work / "bundle", args.model, args.image_size)
    size = args.video_size or int(round(bundle.image_size[0] * 1.25))
    video = work / "frames.avi"
    frames = write_video(video, 120, size)
    print(f"bundle {bundle.path} ({bundle.kind} {bundle.image_size[0]}x{bundle.image_size[1]}), video "
          f"{size}x{size} MJPG; setup {time.perf_counter() - t0:.1f} s", flush=True)

    # the bare model is timed before and after the loop, and the two averaged: on a shared machine the
    # load changes over minutes, and bracketing the loop run cancels a drift in either direction
    n_bare = args.bare_frames or min(args.frames, 100)
    before = bare_fps(bundle, frames, args.batch, n_bare, args.threads)
    print(f"bare model (before): {before['fps']:.2f} frames/s ({before['frames']} frames, batch {args.batch})",
          flush=True)
    tel_s = 2.0 if args.frames <= 2000 else 10.0
    loop = loop_run(bundle.path, video, work, args.frames, args.batch, args.threads, tel_s)
    steady = steady_fps(work / "results.jsonl", args.warmup)
    print(f"edge-ad run: {steady:.2f} frames/s", flush=True)
    after = bare_fps(bundle, frames, args.batch, n_bare, args.threads)
    print(f"bare model (after): {after['fps']:.2f} frames/s", flush=True)
    bare = {"fps": (before["fps"] + after["fps"]) / 2.0, "before": before, "after": after,
            "frames": before["frames"]}
    ratio = steady / bare["fps"]
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"),
        ("model", f"{bundle.kind} {bundle.image_size[0]}x{bundle.image_size[1]}, onnxruntime "
                  f"{bundle.active_precision} cpu, batch {args.batch}"),
        ("bare model frames/s", f"{bare['fps']:.2f}  (before {before['fps']:.2f}, after {after['fps']:.2f})"),
        ("edge-ad run frames/s (steady)", f"{steady:.2f}  (frames {args.warmup}..{loop['frames'] - 1})"),
        ("edge-ad run frames/s (whole run)", f"{loop['fps']:.2f}  ({loop['frames']} frames in {loop['duration_s']:.1f} s)"),
        ("loop / bare", f"{ratio:.3f}  (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"),
        ("dropped / discarded", f"{loop['dropped']} / {loop['discarded_at_stop']}"),
        ("loop latency ms (last report)", json.dumps(loop.get("latency_ms"))),
        ("RSS start / end / peak MB", f"{loop['rss_start_mb']:.1f} / {loop['rss_end_mb']:.1f} / "
                                      f"{loop['rss_peak_mb']:.1f}  ({loop['telemetry_reports']} reports)"),
        ("torch imported in the loop", f"{loop['torch']}  ({loop['modules']} modules loaded)"),
    ]
    rows.append(("load average (1, 5, 15 min)", " ".join(f"{v:.2f}" for v in os.getloadavg())))
    w = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    out = {"bare": bare, "loop": loop, "steady_fps": steady, "ratio": ratio, "model": bundle.kind,
           "image_size": list(bundle.image_size), "batch": args.batch, "frames": args.frames,
           "machine": rows[0][1]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if not loop["torch"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
