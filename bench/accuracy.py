"""Accuracy benchmark on the shared Magnetic Tile split (MVTec layout), or the dataset of --data (the table
names it from its README title, else its folder name).

Trains each requested model with its preset, evaluates the exported ONNX graph with ONNX Runtime
(the artefact that runs on the device), and prints one table: model, preset, training time, image
AUROC, pixel AUROC, AUPRO. Each row is merged into --out (default bench/out/accuracy.json; the README's
figures: bench/results/accuracy.json) as soon as its model is evaluated, one key per model, preset and
--tag, with the command line that made it; a later model failing keeps the earlier rows. The bundles go to
--work as MODEL-PRESET[-TAG].

    python bench/accuracy.py --models gaussian,efficientad-s,fader --preset quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchlib import (DATA_HELP, at_least, check_out, check_work, command, dataset, dataset_name, input_errors_exit_2,
                      merge_json, model_list, out_default, positive_float)

HERE = Path(__file__).resolve().parent


def model_config(ap, pairs, models, image_size) -> dict:
    """--config KEY=VALUE pairs as a model config (digits: a number), checked as edge-ad train checks its
    model config, for each of --models: a usage error (exit 2) naming the key and what was expected."""
    from edge_ad.errors import InputError
    from edge_ad.models import check_model_config

    cfg = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            ap.error(f"--config {kv!r}: expected KEY=VALUE")
        cfg[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    for m in models:
        try:
            check_model_config(m, cfg, image_size)
        except InputError as exc:
            ap.error(f"--config: {exc}" + (" (--config applies to every model of --models: run them "
                                            "separately)" if len(models) > 1 else ""))
    return cfg


@input_errors_exit_2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help=DATA_HELP)
    ap.add_argument("--models", type=model_list, default="gaussian,efficientad-s,fader",
                    help="comma-separated, trained in this order (default: %(default)s)")
    ap.add_argument("--preset", default="quick", choices=["quick", "paper"])
    ap.add_argument("--steps", type=at_least(1), default=None, help="override the preset's steps")
    ap.add_argument("--lr", type=positive_float, default=None, help="override the preset's learning rate")
    ap.add_argument("--batch-size", type=at_least(1), default=None, help="override the preset's batch size")
    ap.add_argument("--max-minutes", type=positive_float, default=None, help="time budget of each training (edge-ad train)")
    ap.add_argument("--checkpoint-every", type=at_least(1), default=500, help="steps between training checkpoints")
    ap.add_argument("--image-size", type=at_least(32), default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=str(HERE / "results" / "accuracy_bundles"),
                    help="folder of the trained bundles, MODEL-PRESET[-TAG] (default: %(default)s)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--eval-device", default="cpu", help="device of the evaluation backend (torch: cuda)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override (repeatable), checked for each of --models before any work: "
                         "gaussian layout=patch|shared|image, dims=N, seed=N; fader width=N, cell=N, hint=N "
                         "(cell and hint divide --image-size); EfficientAD takes none (--teacher)")
    ap.add_argument("--teacher", default=None, help="EfficientAD teacher: lite0 (default) or a PDN weights file")
    ap.add_argument("--distill-steps", type=at_least(0), default=0,
                    help="first distill a PDN teacher from Lite0 on the training images for this many steps "
                         "(edge-ad distill-teacher) and train EfficientAD with it; its time is reported")
    ap.add_argument("--distill-batch", type=at_least(1), default=8)
    ap.add_argument("--distill-data", action="append", default=[],
                    help="image folder to distill on (repeatable; default: the training images)")
    ap.add_argument("--distill-minutes", type=positive_float, default=None, help="time budget of the distillation")
    ap.add_argument("--penalty-dir", default=None, help="generic images for EfficientAD's penalty term")
    ap.add_argument("--out", "--results", dest="out", default=out_default("accuracy.json"),
                    help="JSON file the rows are merged into (default: %(default)s; concurrent runs may share "
                         "one; the README's figures: bench/results/accuracy.json)")
    ap.add_argument("--tag", default="", help="suffix of the result rows and bundle folders (e.g. pdn-teacher)")
    args = ap.parse_args(argv)
    cfg = model_config(ap, args.config, args.models, args.image_size)
    out_json = check_out(ap, args.out)
    data = dataset(ap, args.data, ("train/good", "test"))
    if data is None:
        return 0
    from edge_ad.evaluate import evaluate
    from edge_ad.train.common import check_run
    from edge_ad.train.pipeline import train_bundle

    check_run(args.device, args.max_minutes, args.steps, args.batch_size, args.checkpoint_every, 0, args.image_size)
    check_work(ap, args.work)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()} ({args.device})"
    if args.device.startswith("cuda"):
        import torch

        machine += f", {torch.cuda.get_device_name()}, torch {torch.__version__}"
    cmd = command("accuracy", argv)

    rows = []
    suffix = f"-{args.tag}" if args.tag else ""
    teacher, distill_s = args.teacher, 0.0
    if args.distill_steps:
        from edge_ad.train.distill import distill

        teacher = str(Path(args.work) / f"teacher-pdn-s-{args.distill_steps}{suffix}.pth")
        t0 = time.time()
        dinfo = distill(args.distill_data or [data / "train" / "good"], teacher, "s", args.image_size,
                        args.distill_steps, batch_size=args.distill_batch, device=args.device,
                        max_minutes=args.distill_minutes)
        distill_s = time.time() - t0
        print(f"distilled {teacher} in {distill_s / 60:.1f} min: {dinfo}", flush=True)
    for m in args.models:
        out = Path(args.work) / f"{m}-{args.preset}{suffix}"
        t0 = time.time()
        b = train_bundle(m, data, out, image_size=args.image_size, steps=args.steps, preset=args.preset,
                         device=args.device, config=cfg or None, lr=args.lr, batch_size=args.batch_size,
                         max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every,
                         teacher=teacher if m.startswith("efficientad") else None,
                         penalty_dir=args.penalty_dir if m.startswith("efficientad") else None)
        train_s = time.time() - t0
        rep = evaluate(out, data, backend=args.backend, device=args.eval_device)
        o = rep["overall"]
        rows.append({"model": m, "preset": args.preset, "steps": b.manifest["training"].get("steps", 0),
                     "train_s": round(train_s, 1), "image_auroc": o["image_auroc"],
                     "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"], "f1": o.get("f1"),
                     "backend": rep["backend"], "eval_img_s": rep["images_per_second"], "tag": args.tag,
                     "lr": b.manifest["training"].get("lr"), "batch_size": b.manifest["training"].get("batch_size"),
                     "train_loop_s": round(b.manifest["training"].get("train_seconds", 0.0), 1),
                     "device": args.device, "per_type": rep.get("per_type"),
                     "planned_steps": b.manifest["training"].get("planned_steps"),
                     "teacher": b.manifest["model"]["config"].get("teacher"), "distill_s": round(distill_s, 1),
                     "distill": (f"{dinfo['steps']} steps x {args.distill_batch} on {dinfo['images']} images "
                                 f"({', '.join(Path(d).name for d in args.distill_data) or 'train/good'})")
                     if args.distill_steps else None,
                     "penalty": b.manifest["training"].get("penalty")})
        print(json.dumps(rows[-1]), flush=True)
        merge_json(out_json, {f"{m}-{args.preset}{suffix}": {**rows[-1], "machine": machine, "command": cmd}})
    print(f"\n{dataset_name(data)} ({data}), {args.image_size}x{args.image_size}, evaluated with {args.backend}; {machine}")
    print_table(("model", "preset", "steps", "train time", "image AUROC", "pixel AUROC", "AUPRO"),
                [(r["model"], r["preset"], str(r["steps"]), f"{r['train_s'] / 60:.1f} min", _f(r["image_auroc"]),
                  _f(r["pixel_auroc"]), _f(r["aupro"])) for r in rows])
    # pooled pixel AUROC is dominated by the large 'uneven' masks: the same per defect type
    types = sorted({t for r in rows for t in (r["per_type"] or {}) if t != "good"})
    if types:
        print("\nper defect type: image AUROC / pixel AUROC")
        print_table(("model",) + tuple(types),
                    [(r["model"],) + tuple(f"{_f(pt.get('image_auroc'))} / {_f(pt.get('pixel_auroc'))}"
                                           for pt in ((r["per_type"] or {}).get(t, {}) for t in types))
                     for r in rows])
    print(f"wrote {out_json}")
    return 0


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_table(hdr: tuple, rows: list) -> None:
    """A Markdown table, columns padded to their widest cell."""
    lines = [hdr] + rows
    w = [max(len(l[i]) for l in lines) for i in range(len(hdr))]
    lines.insert(1, tuple("-" * n for n in w))
    for l in lines:
        print("| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(l)) + " |")


if __name__ == "__main__":
    sys.exit(main())
