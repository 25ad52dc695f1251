"""Demo steps 1-5: the work folder, synthetic data, training, evaluation, INT8 with the guard, the broker."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import GuardFailure, InputError
from .plan import DemoPlan

MARKER = ".edge-ad-demo"


LOCK = ".edge-ad-demo.lock"   # held (flock) by the demo using the folder, for its whole run
_held: dict[Path, int] = {}     # folder -> its lock's file descriptor, open until this process ends


def prepare_out(out: Path) -> Path:
    """Create ``out`` (or empty a previous demo's folder, recognized by its marker file) and hold its lock: a
    second demo into the same folder while this one runs is refused instead of emptying it under it."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        if any(p.name != LOCK for p in out.iterdir()) and not (out / MARKER).is_file():
            raise InputError(f"--out {out}: the folder exists, is not empty and was not made by 'edge-ad "
                             f"demo' (no {MARKER} file in it); choose another folder or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror})") from exc

    def refuse(where, exc: OSError):
        raise InputError(f"--out {out}: cannot empty this previous demo folder: {where}: "
                         f"{exc.strerror or exc}; remove it or choose another --out") from exc

    def rmtree_error(_func, path, exc):   # the full path (the exception may hold a relative one)
        refuse(path, exc if isinstance(exc, BaseException) else exc[1])

    hook = {"onexc" if sys.version_info >= (3, 12) else "onerror": rmtree_error}
    # the marker goes last: a folder that could not be emptied is still recognized next time
    for p in sorted((q for q in out.iterdir() if q.name != LOCK), key=lambda q: q.name == MARKER):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, **hook)
            else:
                p.unlink()
        except OSError as exc:
            refuse(exc.filename or p, exc)
    try:
        (out / MARKER).write_text("made by 'edge-ad demo'; the next demo run with this --out empties this folder\n")
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror})") from exc
    return out


def _lock(out: Path) -> None:
    """Take ``out``'s demo lock (kept until this process ends) or refuse: another demo is running there."""
    import fcntl
    import os

    if out.resolve() in _held:   # this process holds it already (a library caller preparing it again)
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise InputError(f"--out {out}: another edge-ad demo{f' (pid {pid})' if pid else ''} is using this "
                         "folder; wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[out.resolve()] = fd


# ----------------------------------------------------------------------------- steps 1-4
def step_data(out: Path, plan: DemoPlan) -> tuple[str, str]:
    from ..data.synthetic import DEFECTS, write_category

    data = write_category(out / "data", n_train=plan.n_train, n_test_good=plan.n_test_good,
                          n_test_defect=plan.n_test_defect, size=plan.frame_size, kind=plan.kind, seed=plan.seed)
    n_def = plan.n_test_defect * len(DEFECTS)
    return "ok", (f"{plan.n_train} normal training images, test set {plan.n_test_good} good + {n_def} with planted "
                  f"defects ({', '.join(DEFECTS)}); '{plan.kind}' parts {plan.frame_size} px -> {data}")


def step_train(out: Path, plan: DemoPlan, model: str) -> tuple[str, str]:
    import logging

    from ..compile.export import export_bundle
    from ..train.pipeline import train_bundle

    quiet = logging.getLogger("edge_ad.train.pipeline")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the EfficientAD penalty-term warning: the demo has no ImageNet images
    try:
        b = train_bundle(model, out / "data", out / "bundle", image_size=plan.image_size,
                         steps=None if model == "gaussian" else plan.steps, seed=plan.seed, policy=plan.policy,
                         val_fraction=0.25, export=False, checkpoint_every=10 ** 9)
    finally:
        quiet.setLevel(level)
    export_bundle(b, progress=False)
    cal = b.calibration()
    t = b.manifest["training"]
    what = f"fitted on {t.get('fitted_on', t['n_train'])} images" if model == "gaussian" else f"{t['steps']} steps"
    return "ok", (f"{model} {plan.image_size}x{plan.image_size} ({what}), exported to ONNX; calibration "
                  f"v{cal.version}, threshold {cal.threshold:.4g} (policy {cal.policy} on {cal.n_frames} held-out "
                  f"normals) -> {b.path}")


def step_evaluate(out: Path) -> tuple[dict, tuple[str, str]]:
    from ..evaluate import evaluate

    rep = evaluate(out / "bundle", out / "data", backend="onnxruntime", out_dir=out / "eval", progress=False)
    o = rep["overall"]

    def f(k):
        v = o.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    return rep, ("ok", f"image AUROC {f('image_auroc')}, pixel AUROC {f('pixel_auroc')}, AUPRO {f('aupro')}, "
                       f"F1 {f('f1')} at the threshold ({o['n']} images, {rep['images_per_second']:.0f} img/s) "
                       f"-> {out / 'eval'}/report.json, grid.png, histogram.png")


def step_quantize(out: Path, plan: DemoPlan) -> tuple[dict, tuple[str, str]]:
    from ..bundle import Bundle
    from ..compile.quantize import quantize_bundle

    from ..data.synthetic import write_category

    b = Bundle.open(out / "bundle")
    # normal images for INT8 calibration and the guard's held-out normals (the last quarter), apart from the
    # training split (whose 10 % validation split is too small a guard set for the quick run)
    calib = write_category(out / "quant-normals", n_train=plan.quant_normals, n_test_good=0, n_test_defect=0,
                           size=plan.frame_size, kind=plan.kind, seed=plan.seed + 1)
    info: dict[str, Any] = {"precision": "fp32", "passed": False, "entries": []}
    try:
        res = quantize_bundle(b, "int8", calib_dir=calib, samples=64, guard_normals=plan.quant_normals,
                              progress=False)
    except GuardFailure as exc:
        entries = _guard_entries(b)
        info.update(entries=entries, refused=str(exc))
        failed = [e for e in entries if not e.get("passed")]
        why = "; ".join(f"{e['candidate']}: {', '.join(e.get('failures') or ['failed'])}" for e in failed) or str(exc)
        return info, ("warning", f"INT8 REFUSED by the accuracy guard ({why}); nothing switched in, the "
                                 f"loop runs the FP32 graph")
    b = Bundle.open(out / "bundle")
    info.update(precision=b.active_precision, passed=not res.refused, entries=res.entries, files=res.files)
    if res.refused:   # each INT8 form goes in on its own verdict: one passed, the other did not
        info["refused"] = "; ".join(f"{name}: {r['why']}" for name, r in res.refused.items())
        return info, ("warning", f"INT8 {', '.join(res.files)} passed the accuracy guard, "
                                 f"{', '.join(res.refused)} REFUSED ({info['refused']}); the loop runs "
                                 f"{b.active_graph}")
    e = res.entries[0]
    auc = "; ".join(f"{g} AUROC {v['fp32']:.3f} -> {v['candidate']:.3f}" for g, v in e["auroc"].items())
    return info, ("ok", f"INT8 passed the accuracy guard (rank corr {e['rank_corr']:.4f}, {auc}); the loop runs "
                        f"{b.active_graph}")


def _guard_entries(bundle) -> list[dict]:
    p = bundle.file("quant_report.json")
    try:
        return list(json.loads(p.read_text("utf-8")).get("candidates", {}).values())
    except (OSError, ValueError, AttributeError):
        return []


# ----------------------------------------------------------------------------- step 5: broker
def step_broker(out: Path, want_mqtt: bool):
    """(broker or None, why none, (status, summary))."""
    from ..mqtt import broker as broker_mod

    if not want_mqtt:
        return None, "--no-mqtt", ("skipped", "MQTT off (--no-mqtt): the loop runs without a broker; "
                                              "recalibration goes through the bundle and SIGHUP")
    binary = broker_mod.find_mosquitto()
    if binary is not None:
        b = broker_mod.Mosquitto(out / "broker", binary=binary, persistence=False)
        b.start()
        return b, "", ("ok", f"mosquitto ({binary}) on {b.url}, log {b.log_path}")
    why = ("no broker: mosquitto is not installed (apt-get install -y mosquitto) and neither is amqtt for "
           "the embedded one (pip install 'edge-ad[broker]')")
    if broker_mod.embedded_available():
        try:
            b = broker_mod.EmbeddedBroker().start()
        except Exception as exc:   # installed but broken (a version that does not import, a failed start)
            why = (f"no broker: mosquitto is not installed (apt-get install -y mosquitto) and the embedded amqtt "
                   f"broker could not start ({type(exc).__name__}: {exc})")
        else:
            return b, "", ("ok", f"mosquitto is not installed: embedded amqtt broker in this process on {b.url} "
                                 "(MQTT 3.1.1: commands carry their reply topic in the payload)")
    return None, why, ("warning", f"NO BROKER: {why}; running the loop without MQTT (no monitor, "
                                  "recalibration through the bundle and SIGHUP)")
