"""``edge-ad run`` (the inspection loop) and ``edge-ad capture`` (collect normal frames)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import click

from ..errors import EdgeADError
from . import drop_stdout, main
from .types import Seconds, env_file_option


def _settings_loader(config: str | None, overrides: list):
    from ..config import load_settings

    return lambda: load_settings(config, overrides, for_run=True)


@main.command("run")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
              help="TOML config file (default: $EDGE_AD_CONFIG). See examples/edge-ad.toml.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="Stop after inspecting N frames.")
@click.option("--duration", type=Seconds(min=0, min_open=True), default=None,
              help="Stop after S seconds.")
@click.option("--bundle", default=None, help="Override model.bundle (refused beside the config's model.deploy_dir: "
                                             "add --set model.deploy_dir= to run another bundle there).")
@click.option("--source", default=None, help="Override source.uri (e.g. file://clip.mp4?loop=1).")
@click.option("--mode", type=click.Choice(["stream", "trigger"]), default=None, help="Override source.mode.")
@click.option("--backend", default=None, help="Override model.backend (auto | onnxruntime | tensorrt | torch | openvino).")
@click.option("--precision", default=None, help="Override model.precision (fp32 | fp16 | int8).")
@click.option("--device", default=None, help="Override model.device (cpu | cuda[:N] | tensorrt[:N]).")
@click.option("--mqtt-url", default=None, help="Override mqtt.url (mqtt://host:1883); turns MQTT on where the config has no [mqtt] "
              "section (with enabled = false in it: an error unless --set mqtt.enabled=true).")
@click.option("--jsonl", default=None, help="Override output.jsonl (the result log; '' turns it off; /dev/stdout: "
              "results on stdout, the summary then on stderr, and the run stops when the reader closes the pipe).")
@click.option("--snapshots", default=None, help="Override output.snapshots_dir ('' turns snapshots off).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any field, e.g. --set pipeline.max_batch=8 (repeatable).")
@click.option("--print-config", is_flag=True, help="Print the validated settings (secrets hidden) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON line.")
def run_cmd(config, max_frames, duration, bundle, source, mode, backend, precision, device, mqtt_url, jsonl,
            snapshots, sets, print_config, as_json):
    """Run the inspection loop: camera -> model -> OK/NG -> JSONL, snapshots, MQTT.

    Settings come from the TOML file, then EDGE_AD_<SECTION>__<KEY> environment variables, then these
    flags. An invalid config stops here, naming the field, before any camera is opened. SIGTERM / Ctrl-C
    drain the queues, flush the outbox and publish the offline status. Exit codes: 0 ok, 2 bad input,
    1 runtime failure (e.g. the camera was lost for good, or no frame could be inspected).
    """
    from ..config import ENV_CONFIG, load_settings, parse_set_option

    _run_log_level()
    config = config or os.environ.get(ENV_CONFIG) or None
    overrides = []
    for flag, path, value in (("--bundle", ["model", "bundle"], bundle), ("--source", ["source", "uri"], source),
                              ("--mode", ["source", "mode"], mode), ("--backend", ["model", "backend"], backend),
                              ("--precision", ["model", "precision"], precision),
                              ("--device", ["model", "device"], device), ("--mqtt-url", ["mqtt", "url"], mqtt_url),
                              ("--jsonl", ["output", "jsonl"], jsonl),
                              ("--snapshots", ["output", "snapshots_dir"], snapshots)):
        if value is not None:
            overrides.append((path, value, flag))
    overrides += [parse_set_option(s) for s in sets]
    hint = "" if config else (f"no config file was given: name one with --config FILE or ${ENV_CONFIG} "
                              "(examples/edge-ad.toml is a documented example), or give the model and the "
                              "source as flags: --bundle DIR --source URI")
    settings = load_settings(config, overrides, missing_hint=hint, for_run=True)
    if print_config:
        click.echo(json.dumps(settings.redacted(), indent=2))
        return
    from ..runtime.service import Service

    svc = None

    def outside_the_loop(signum, _frame):
        # Service.run handles these while it runs; before it (opening the model) SIGTERM stops the command,
        # after it (the run has stopped and its summary is being written) a late one has nothing left to stop
        if signum == signal.SIGTERM and not getattr(svc, "finished", False):
            click.echo("terminated by SIGTERM before the loop started", err=True)
            raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, outside_the_loop)
    svc = Service(settings, max_frames=max_frames, duration=duration,
                  reload_settings=_settings_loader(config, overrides) if config else None)
    click.echo(f"edge-ad run: {svc.describe()}", err=True)
    try:
        summary = svc.run()
    except EdgeADError as exc:
        _exit_past_busy_threads(svc, exc.exit_code, f"error: {exc}")
        raise
    err = _is_stdout(settings.output.jsonl)   # the results go to stdout: the summary must not join them
    try:
        if as_json:
            click.echo(json.dumps(summary), err=err)
        else:
            stop = summary.get("stop_s") or 0.0
            click.echo(f"{summary['frames']} frames inspected ({summary['ng']} NG, {summary['dropped']} dropped) "
                       f"in {summary['duration_s']:.1f} s, {summary['fps']:.1f} frames/s; stopped: "
                       f"{summary['reason']}" + (f" (the stop took {stop:.1f} s more)" if stop >= 1.0 else ""),
                       err=err)
            for output, n in (summary.get("output_errors") or {}).items():
                if n:    # a full disk, a locked outbox: inspection went on; the log has the error
                    click.echo(f"{n} {_FAILED_WRITES.get(output, f'writes to {output}')} failed (see the log for "
                               "why)", err=err)
            if summary.get("outbox_left"):
                click.echo(f"{summary['outbox_left']} MQTT messages not delivered yet: they wait in the outbox "
                           f"({summary['outbox']}) and go out on the next run that reaches the broker", err=err)
            if summary.get("outbox_reset"):
                click.echo(f"the MQTT outbox file was not a readable SQLite database: moved aside to "
                           f"{summary['outbox_reset']}; this run started an empty one (what it held is lost)", err=err)
            by = summary.get("outbox_dropped_by") or {"full": summary.get("outbox_dropped") or 0}
            if by.get("full"):
                click.echo(f"{by['full']} MQTT messages dropped by the full outbox (oldest first, "
                           "event images before results): mqtt.outbox_max_messages / outbox_max_bytes", err=err)
            if by.get("too_large"):
                click.echo(f"{by['too_large']} MQTT messages dropped because they are larger than the maximum packet "
                           "size the broker announced (max_packet_size in Mosquitto): raise that limit above "
                           "mqtt.image_max_bytes + 1 KiB, or lower image_max_bytes", err=err)
            if by.get("rejected"):
                click.echo(f"{by['rejected']} MQTT messages dropped because the broker refused them for good (a PUBACK "
                           "reason code such as Not authorized: check the broker's ACL for the device's topics); "
                           "each is named in an output_error event and in the log", err=err)
        sys.stdout.flush()
    except BrokenPipeError:   # `edge-ad run | head`: the reader left; the run itself went well
        drop_stdout()   # no second error at exit
    _exit_past_busy_threads(svc, 0)


# what a failed write of each output (the summary's output_errors) lost, for the text summary
_FAILED_WRITES = {"jsonl": "decisions are missing from the result log (output.jsonl): their writes",
                  "outbox": "results and events were not stored for MQTT (never sent): their outbox writes",
                  "snapshots": "snapshots were not saved: their writes",
                  "telemetry": "lines are missing from the telemetry file (telemetry.path): their writes"}


def _is_stdout(path) -> bool:
    """Is ``path`` (output.jsonl) this process's stdout: /dev/stdout, /proc/self/fd/1, or the file stdout
    was redirected to?"""
    if not path:
        return False
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):   # no such file; stdout closed or not a real file
        return False


def _run_log_level() -> None:
    """``edge-ad run`` logs what an operator reads in the journal at INFO, shown by default (the other commands
    show WARNING and above): the MQTT connection, each command, a calibration put in force, a reload, a release
    watched, the stop. ``-v`` adds DEBUG (a line per telemetry interval); ``-vv`` the libraries' DEBUG too.
    Set on the ``edge_ad`` loggers for this command only, and put back when it ends (tests run many commands)."""
    import logging

    ctx = click.get_current_context()
    logger = logging.getLogger("edge_ad")
    before = logger.level
    logger.setLevel(logging.DEBUG if ctx.find_root().params.get("verbose") else logging.INFO)
    ctx.call_on_close(lambda: logger.setLevel(before))


def _exit_past_busy_threads(svc, code: int, message: str = "") -> None:
    """Exit now when a pipeline thread was left behind at the stop deadline (see Pipeline.abandon): the
    interpreter's own shutdown would stop that thread inside the backend's native code and abort
    ('terminate called without an active exception'). Everything that goes out was written by now."""
    if not svc.pipeline.busy():
        return
    import logging

    if message:
        click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


@main.command("capture")
@click.option("--source", "source", help="Source URI (v4l2:///dev/video0, csi://0, rtsp://..., file://..., dir://..., "
                                         "synthetic://...). Default: --config's source.uri (after its edge-ad.env), "
                                         "the line's camera.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for the frames.")
@click.option("--frames", "count", required=True, type=click.IntRange(min=1), help="How many frames to save.")
@click.option("--every", type=Seconds(min=0), default=0.0,
              help="Seconds between saved frames (live cameras: frames in between are read and discarded).")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
              help="Take the source (unless --source), ROI and rotation (and reconnect settings) from this run "
                   "config, so the frames match what the loop inspects.")
@env_file_option
@click.option("--format", "fmt", type=click.Choice(["png", "jpg"]), default="png", help="Image format.")
@click.option("--prefix", default="frame_", show_default=True,
              help="File name prefix (a plain name: no '/', '\\', or leading '.').")
def capture_cmd(source, out, count, every, config, env_file, fmt, prefix):
    """Save N frames of a camera (or file) to a folder, e.g. normal parts to train or calibrate on.

    A source that cannot be opened at the start stops it (exit 2, naming what to check); with --config it is
    waited for as the config's [source] reconnect settings say (Ctrl-C to stop).
    """
    import cv2
    from tqdm import tqdm

    from .. import atomic
    from ..errors import InputError
    from ..runtime.capture import Camera
    from ..runtime.pipeline import RoiFilter, apply_roi_rotate
    from ..runtime.sources import check_startup, open_source, parse_uri, redact_uri
    from .calibrate import line_config, setting_origin

    _check_prefix(prefix)
    # as the service runs the line: its edge-ad.env (and this shell's EDGE_AD_*) over the file
    given = [(["source", "uri"], source, "--source")] if source is not None else []
    s, env = line_config(config, env_file, given)   # --env-file without --config: refused here, first
    roi, rotate = None, 0
    src_settings = None
    if s is not None:
        roi, rotate, src_settings = s.source.roi, s.source.rotate, s.source
        if source is None:   # the line's camera, named: a capture of the wrong one trains the wrong part
            if s.source.uri is None:
                raise InputError(f"--source is required: {config} has no source.uri (nor does an "
                                 "EDGE_AD_SOURCE__URI set one) to take it from")
            source = s.source.uri
            click.echo(f"note: no --source: source {redact_uri(source)}, the "
                       f"{setting_origin(config, env, 'source', 'uri')}", err=True)
    elif source is None:
        raise InputError("--source is required (a source URI), or --config LINE.toml whose source.uri names it")
    spec = parse_uri(source)
    check_startup(spec)
    stop = threading.Event()
    kw = {}
    if src_settings is not None:
        kw = dict(reconnect=src_settings.reconnect, reconnect_attempts=src_settings.reconnect_attempts,
                  backoff_initial_s=src_settings.backoff_initial_s, backoff_max_s=src_settings.backoff_max_s,
                  watchdog_s=src_settings.watchdog_s)
    src = open_source(spec, src_settings.open_timeout_s if src_settings else 10.0,
                      src_settings.rtsp_transport if src_settings else "tcp")
    cam = Camera(src, stop, on_event=_capture_event_printer(config, src_settings), **kw)
    if src_settings is None:
        _open_at_start(cam, spec)   # before --out is made: a source that is not there leaves nothing behind
    folder = Path(out)
    # the folders this capture makes: removed again when no frame was saved (a bad ROI, a dead source)
    made = [q for q in (folder, *folder.parents) if not q.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cam.close()
        raise InputError(f"{folder}: cannot create the output folder ({exc.strerror})") from exc
    stopped_by = []   # the signals that stopped the capture (Ctrl-C, SIGTERM), as they came

    def on_signal(signum, frame):
        stopped_by.append(signum)
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved = 0
    # a second session into the same folder continues the numbering: earlier frames are never overwritten
    numbered = re.compile(re.escape(prefix) + r"(\d+)\.(png|jpg)$")
    first = 1 + max((int(m.group(1)) for m in map(numbered.match, os.listdir(folder)) if m), default=-1)
    if first:
        click.echo(f"{folder}: already holds frames up to {prefix}{first - 1:05d}; numbering goes on from "
                   f"{prefix}{first:05d}", err=True)
    last = 0.0
    # as run decides: a folder's image the ROI does not fit is skipped and named, a camera frame is an error
    roi_filter = RoiFilter(roi)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else []
    try:
        with tqdm(total=count, unit="frame", disable=None, desc="capture") as bar:
            while saved < count and not stop.is_set():
                if every and not src.live:
                    wait = last + every - time.monotonic()
                    if wait > 0 and stop.wait(wait):
                        break
                raw = cam.read()
                if raw is None:
                    roi_filter.at_end(cam)
                    break
                if not roi_filter.fits(raw, cam):
                    continue
                now = time.monotonic()
                if every and src.live and saved and now - last < every:
                    continue
                img = apply_roi_rotate(raw.image, roi, rotate)
                ok, buf = cv2.imencode(f".{fmt}", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
                if not ok:
                    raise InputError(f"could not encode frame {raw.index} as {fmt}")
                p = folder / f"{prefix}{first + saved:05d}.{fmt}"
                atomic.write_bytes(p, buf.tobytes(), sync=False)   # no fixed temp name a planted link could take
                saved += 1
                last = now
                bar.update(1)
    finally:
        cam.close()
        for sig, h in old.items():
            signal.signal(sig, h)
        if saved == 0:
            for q in made:   # deepest first; only while empty
                try:
                    q.rmdir()
                except OSError:
                    break
    interrupted = bool(stopped_by) and saved < count
    if not interrupted:
        why = "the source ended"
    else:
        why = "interrupted" if stopped_by[0] == signal.SIGINT else f"stopped by {signal.Signals(stopped_by[0]).name}"
    click.echo(f"saved {saved} frames to {folder}" + ("" if saved == count else f" (asked for {count}; {why})"))
    skipped = roi_filter.skipped + int(getattr(src, "skipped", 0) or 0)    # (run's skipped_images)
    if skipped:
        why = f"unreadable, or smaller than source.roi {roi}" if roi else "unreadable"
        click.echo(f"{skipped} images of {src.name} skipped (each named in a warning above): {why}", err=True)
    if interrupted:   # as the shell reports a command a signal stopped: 130 for Ctrl-C, 143 for SIGTERM
        sys.exit(128 + stopped_by[0])
    if saved == 0:
        sys.exit(1)


# what to check when a camera cannot be opened, per URI scheme (capture without --config stops on it)
_SOURCE_CHECKS = {
    "v4l2": "that the camera is plugged in and that this is its device (ls /dev/video*; v4l2-ctl --list-devices; "
            "jetson/camera-check.sh list), and that this user is in the 'video' group",
    "csi": "the sensor's cable and that nvargus-daemon runs (sudo systemctl restart nvargus-daemon; "
           "jetson/camera-check.sh csi)",
    "rtsp": "the camera's address, port, stream path and credentials, and that it answers on the network",
}


def _open_at_start(cam, spec) -> None:
    """``edge-ad capture`` without ``--config``: open the source now; one that cannot be opened is an input
    error (exit 2) naming it and what to check, not an outage waited out for ever (a one-shot command run by
    hand; the loop and ``capture --config`` wait for a camera with the config's reconnect settings)."""
    from ..errors import InputError
    from ..runtime.sources import SourceLost

    try:
        cam.open()
    except SourceLost as exc:
        what = _SOURCE_CHECKS.get("rtsp" if spec.scheme == "rtsps" else spec.scheme, "the source URI")
        raise InputError(f"{exc}: cannot capture from it; check {what}. Without --config, capture stops when its "
                         "source cannot be opened at the start; with --config LINE.toml it waits for it as that "
                         "config's [source] reconnect settings say") from None


def _capture_event_printer(config: str | None, src):
    """capture's outage events on stderr, each outage saying that it is retrying, for how long (by --config's
    [source] reconnect settings; without --config, until the source answers) and how to stop."""
    def on_event(e: dict) -> None:
        line = f"{e['type']}: {e.get('reason', '')}"
        if e["type"] == "source_lost" and (src is None or src.reconnect):
            if src is None:
                bound = "until it answers"
            elif src.reconnect_attempts:
                bound = f"up to {src.reconnect_attempts} attempts, source.reconnect_attempts of {config}"
            else:
                bound = f"until it answers: source.reconnect_attempts = 0 in {config}"
            line += f"; retrying with back-off ({bound}); Ctrl-C to stop"
        click.echo(line, err=True)

    return on_event


def _check_prefix(prefix: str) -> None:
    """A file-name prefix: frames go to OUT/<prefix>00000.png, never elsewhere (a '/' or '..' in it wrote
    outside --out or failed after OUT was made)."""
    from ..errors import InputError

    bad = next((c for c in ("/", "\\", "\0") if c in prefix), None)
    if bad is not None:
        raise InputError(f"--prefix {prefix!r}: contains {bad!r}; expected a plain file-name prefix such as "
                         "'frame_' (the frames go into --out)")
    if prefix.startswith("."):
        raise InputError(f"--prefix {prefix!r}: starts with '.'; expected a plain file-name prefix such as "
                         "'frame_' (no hidden files, no '..')")
    if len(prefix.encode("utf-8", "surrogateescape")) > 200:
        raise InputError(f"--prefix: {len(prefix)} characters; expected a file-name prefix of at most 200 bytes")
