"""What one demo run does: sizes, frame counts, the conveyor, the loop's config and environment."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError, RuntimeFailure

SITE, DEVICE = "demo", "conveyor-1"
MODELS = ("gaussian", "efficientad-s", "efficientad-m", "fader")


class DemoFailure(RuntimeFailure):
    """A demo step failed; the message names the step and what to look at."""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and frame counts of one demo run (``quick``: for CI, well under a minute of work)."""

    image_size: int           # model input (square)
    frame_size: int           # synthetic images and conveyor frames (the model resizes them)
    n_train: int
    n_test_good: int
    n_test_defect: int        # per defect type
    fps: float                # conveyor pace
    lighting_from: int        # conveyor frame at which the light changes
    settle: int               # frames inspected under the new light before the calibrate command
    calib_frames: int         # frames the calibrate command collects
    after: int                # frames inspected under the new calibration before SIGTERM
    steps: int                # training steps of the gradient models (the Gaussian has none)
    quant_normals: int        # normal images for INT8 calibration (3/4) and the guard (1/4)
    defect_rate: float = 0.12
    brightness: float = 45.0
    contrast: float = 0.75
    kind: str = "disc"
    seed: int = 0
    stream_seed: int = 7
    policy: str = "max"
    telemetry_s: float = 2.0

    @property
    def expected_frames(self) -> int:
        return self.lighting_from + self.settle + self.calib_frames + self.after


FULL = DemoPlan(image_size=128, frame_size=256, n_train=60, n_test_good=20, n_test_defect=5, fps=10.0,
                lighting_from=60, settle=10, calib_frames=48, after=80, steps=200, quant_normals=64)
QUICK = DemoPlan(image_size=64, frame_size=128, n_train=24, n_test_good=6, n_test_defect=2, fps=20.0,
                 lighting_from=16, settle=4, calib_frames=30, after=30, steps=20, quant_normals=32,
                 telemetry_s=1.0)


def make_plan(quick: bool, model: str, image_size: int | None = None, steps: int | None = None,
              fps: float | None = None, kind: str = "disc", seed: int = 0) -> DemoPlan:
    from ..data.synthetic import KINDS

    if model not in MODELS:
        raise InputError(f"--model '{model}': expected one of {', '.join(MODELS)}")
    if kind not in KINDS:
        raise InputError(f"--kind '{kind}': expected one of {', '.join(KINDS)}")
    plan = QUICK if quick else FULL
    size = image_size
    if size is None:
        size = plan.image_size if model == "gaussian" else max(plan.image_size, 128)
    if size % 32 or size < 64 or size > 512:
        raise InputError(f"--image-size {size}: expected a multiple of 32 from 64 to 512")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: expected >= 1")
    if fps is not None and not 0.5 <= fps <= 200:
        raise InputError(f"--fps {fps}: expected 0.5 to 200 frames per second")
    if seed < 0:
        raise InputError(f"--seed {seed}: expected >= 0")
    if fps is None:  # the Gaussian keeps up with 10-20 frames/s on two cores; the networks with about 3
        fps = plan.fps if model == "gaussian" else 3.0
    return replace(plan, image_size=size, frame_size=2 * size, steps=steps or plan.steps, fps=fps,
                   kind=kind, seed=seed, stream_seed=seed + 7)



# ----------------------------------------------------------------------------- the loop's inputs
def source_uri(plan: DemoPlan) -> str:
    return (f"synthetic://{plan.kind}?size={plan.frame_size}&defect_rate={plan.defect_rate:g}&seed={plan.stream_seed}"
            f"&fps={plan.fps:g}&brightness={plan.brightness:g}&contrast={plan.contrast:g}"
            f"&lighting_from={plan.lighting_from}")


def conveyor(plan: DemoPlan):
    """The same :class:`ConveyorStream` the loop's ``synthetic://`` source runs (same pixels per index)."""
    from ..data.synthetic import DEFECTS, ConveyorStream

    return ConveyorStream(kind=plan.kind, size=plan.frame_size, defect_rate=plan.defect_rate, defects=DEFECTS,
                          seed=plan.stream_seed, brightness=plan.brightness, contrast=plan.contrast,
                          lighting_from=plan.lighting_from)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _sections(plan: DemoPlan, folder: str) -> dict[str, dict[str, Any]]:
    """The loop's settings, its outputs in ``folder`` (relative to the config)."""
    return {
        "model": {"bundle": "bundle", "backend": "auto"},
        "source": {"uri": source_uri(plan), "mode": "stream", "watchdog_s": 20.0},
        "pipeline": {"queue_size": 2, "max_batch": 4, "drain_timeout_s": 30.0},
        "output": {"jsonl": f"{folder}/results.jsonl", "snapshots_dir": f"{folder}/snapshots",
                   "snapshots_max_count": 200, "heatmap": True, "event_image": True, "jpeg_quality": 85},
        "telemetry": {"interval_s": plan.telemetry_s, "path": f"{folder}/telemetry.jsonl", "tegrastats": False,
                      "nvml": False},
        "calibration": {"policy": plan.policy, "frames": plan.calib_frames, "timeout_s": 120.0},
        "drift": {"enabled": True, "window": 20, "limit": 3.0},
    }


def _write_toml(path: Path, header: list[str], sections: dict[str, dict[str, Any]]) -> Path:
    lines = [*header, ""]
    for name, fields in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_config(out: Path, plan: DemoPlan, broker_url: str | None, protocol: str = "5") -> Path:
    """The loop's TOML config (paths relative to it, as a user would write it)."""
    sections = _sections(plan, "loop")
    if broker_url is not None:
        sections["mqtt"] = {"url": broker_url, "protocol": protocol, "site": SITE, "device": DEVICE,
                            "outbox_path": "loop/outbox.sqlite",
                            "outbox_sync": "normal", "image_min_interval_s": 0.5}
    header = ["# written by 'edge-ad demo': the config its loop ran (the broker's port was this demo run's, and",
              f"# the light changes at frame {plan.lighting_from}). To run the loop again after the demo:",
              f"#   edge-ad run --config {shlex.quote(str(out / RERUN_CONFIG))} --duration 30"]
    return _write_toml(out / "edge-ad.toml", header, sections)


RERUN_CONFIG = "rerun.toml"


def write_rerun_config(out: Path, plan: DemoPlan) -> Path:
    """The loop again after the demo, on the line as the demo left it: the changed light from the first
    frame (the calibration in force was fitted on it), outputs in ``rerun/`` (the demo's ``loop/`` kept),
    no MQTT (the demo's broker is gone)."""
    import dataclasses

    header = ["# written by 'edge-ad demo': its loop again, on the line as the demo left it: the changed light from",
              "# the first frame (the recalibration fitted on it is in force), outputs in rerun/, no MQTT (the",
              "# demo's broker is gone; add an [mqtt] section with url, site and device to report to yours).",
              f"#   edge-ad run --config {shlex.quote(str(out / RERUN_CONFIG))} --duration 30"]
    return _write_toml(out / RERUN_CONFIG, header, _sections(dataclasses.replace(plan, lighting_from=0), "rerun"))


def child_env() -> dict[str, str]:
    """The environment of the loop: the user's, without EDGE_AD_* overrides that would change the
    demo's config (EDGE_AD_SOURCE__URI, EDGE_AD_CONFIG, broker credentials, a command secret)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("EDGE_AD_") and ("__" in k or k in ("EDGE_AD_CONFIG", "EDGE_AD_MQTT_USERNAME",
                                                                      "EDGE_AD_MQTT_PASSWORD",
                                                                      "EDGE_AD_MQTT_COMMAND_SECRET")))}
    env["PYTHONUNBUFFERED"] = "1"
    return env
