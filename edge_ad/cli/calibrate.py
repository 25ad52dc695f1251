"""Calibration and model-update commands: ``edge-ad calibrate`` and ``edge-ad bundle pack|install|...``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import click

from ..runtime.backends import BACKENDS, summary_text  # the one list open_backend accepts; a Backend.summary in words
from . import main
from .types import env_file_option


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def _golden_json(as_json: bool):
    """With --json, a failed golden check prints its report (``golden``: the images misjudged among it) and the
    error on stdout before the error ends the command (exit 1)."""
    from ..calibration.deploy import GoldenFailure

    try:
        yield
    except GoldenFailure as exc:
        if as_json:
            _echo_json({"error": str(exc), "golden": exc.report})
        raise


_LINE_DEPLOY = "\0line"   # a bare --deploy: the line config's deploy folder (no argument holds a NUL)


def _deploy_option(ctx, param, value):
    """``--deploy [DIR]``: a folder is checked as a ``click.Path`` (not a file); bare, it stays :data:`_LINE_DEPLOY`."""
    if value is None or value == _LINE_DEPLOY:
        return value
    return click.Path(file_okay=False, path_type=Path).convert(value, param, ctx)


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle folder. Default: --config's model.bundle (or the release in force of its "
                   "model.deploy_dir), the one the line runs.")
@click.option("--source", metavar="URI|DIR",
              help="Normal frames: a folder of images, dir://, or a camera / video URI (v4l2://, csi://, "
                   "rtsp://, file://, synthetic://). Default: --config's source.uri. A folder's images are taken "
                   "as the loop inspects them (cropped and rotated already, as 'edge-ad capture --config' saves "
                   "them), unless it is the line's own dir:// source.")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False, path_type=Path),
              help="The line's run config (the file 'edge-ad run --config' takes; only [source], [decision] "
                   "threshold and [model] bundle or deploy_dir, backend, precision and device are read: the "
                   "bundle is the default of --bundle, the model's backend, precision and device those of "
                   "--backend, --precision and --device, so the frames are scored as the line scores them, "
                   "the threshold in force is reported, a [decision] threshold overriding "
                   "the calibration's): its source.roi and rotate are applied to the frames of a camera, video "
                   "or synthetic source and of the line's own dir:// folder, as the loop applies them, so the "
                   "refit sees what the line inspects; another folder's images must have the ROI's size; a "
                   "network camera is opened with its source.open_timeout_s and rtsp_transport. "
                   "Without it frames are taken whole: give it on a line with source.roi or rotate.")
@env_file_option
@click.option("--frames", default=200, show_default=True, type=click.IntRange(1), help="Frames to collect.")
@click.option("--policy", default="fpr:0.001", show_default=True,
              help="Threshold policy: fpr:P (target false-positive rate), max (largest normal score + margin), "
                   "sigma:K (mean + K std).")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="Run the model as it inspects (same backend and precision as 'edge-ad run'). Default: "
                   "--config's model.backend, else auto.")
@click.option("--precision", default=None,
              help="fp32 | fp16 | int8 (default: --config's model.precision, else the bundle's active graph).")
@click.option("--device", default=None,
              help="Backend device (cpu, cuda, cuda:N; default: --config's model.device, else the best this "
                   "machine has).")
@click.option("--every", default=1, show_default=True, type=click.IntRange(1),
              help="Camera, video and synthetic sources: keep one frame in N (refused with a folder, which is "
                   "sampled evenly).")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=click.FloatRange(min=1),
              help="Camera sources: give up after this many seconds.")
@click.option("--screen-z", default=6.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Leave out frames whose score is this many robust standard deviations above the set's median.")
@click.option("--min-frames", default=20, show_default=True, type=click.IntRange(3),
              help="Refuse with fewer usable frames.")
@click.option("--prior-weight", default=None, type=click.FloatRange(min=0),
              help="Gaussian model only (refused for others): frames the covariance in force counts for "
                   "(default: as many as the new frames; 0: fit from the new frames alone; at most 1e9).")
@click.option("--adapt", is_flag=True,
              help="EfficientAD / FADeR-style: screen the frames as a refit does, fine-tune on them for "
                   "--adapt-steps, calibrate on one in 10 (needs --frames 200 or more), re-export, re-quantize "
                   "and rebuild with the accuracy guard, check on --golden, switch in with --deploy (needs the "
                   "train extra).")
@click.option("--adapt-steps", default=200, show_default=True, type=click.IntRange(1), help="Fine-tuning steps.")
@click.option("--adapt-out", type=click.Path(file_okay=False, path_type=Path),
              help="--adapt: write the adapted bundle here (default: BUNDLE.adapted-<time>, or "
                   "DEPLOY/candidates/<release>.adapted-<time> for a release of a deploy folder; removed once "
                   "installed through --deploy).")
@click.option("--train-device", default="cpu", show_default=True, help="--adapt: torch device for fine-tuning.")
@click.option("--golden", "golden_dir", type=click.Path(file_okay=False, path_type=Path),
              help="--adapt: golden images the adapted model must judge no worse than the running one.")
@click.option("--deploy", "deploy_dir", is_flag=False, flag_value=_LINE_DEPLOY, default=None, metavar="[DIR]",
              callback=_deploy_option,
              help="--adapt: deploy folder to switch the adapted model into (see 'edge-ad bundle install'; the "
                   "golden set is --golden, else --config's model.golden_dir, else DEPLOY/golden, else refused "
                   "unless --no-golden). --deploy without DIR: --config's model.deploy_dir, the line's.")
@click.option("--no-golden", is_flag=True, help="--adapt --deploy: switch in without the golden-set check.")
@click.option("--rollback", "rollback_to", is_flag=False, flag_value="previous", default=None, metavar="[VERSION]",
              help="Put an earlier calibration version back in force (default: the one the calibration in force "
                   "replaced) and exit.")
@click.option("--list", "list_versions", is_flag=True, help="List the calibration versions kept and exit.")
@click.option("--prune", "prune_keep", type=click.IntRange(1), metavar="KEEP",
              help="Delete old calibration versions, keeping the KEEP newest, the one in force, the one a plain "
                   "--rollback goes back to, the one a running 'edge-ad run' decides with until it reloads and v1 "
                   "(the trained calibration), and the Gaussian statistics only the removed ones used and the "
                   "records of rollbacks to them; print what was removed and exit.")
@click.option("--dry-run", is_flag=True, help="With --prune: say what would be removed, remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def calibrate(bundle_dir, source, config, env_file, frames, policy, backend, precision, device, every, timeout_s,
              screen_z, min_frames, prior_weight, adapt, adapt_steps, adapt_out, train_device, golden_dir, deploy_dir,
              no_golden, rollback_to, list_versions, prune_keep, dry_run, as_json):
    """Refit normalization and threshold (and a Gaussian model's statistics) on new normal frames.

    Writes a new calibration version (atomic; the old ones are kept until --prune deletes them), or with
    --rollback puts an older one back. A running 'edge-ad run' picks it up on SIGHUP or the MQTT 'reload'
    command: until then the summary says 'written', not 'in force', and which run still decides with which
    version (not_reloaded in --json). One calibration change of a bundle at a time: a refit, --rollback or --prune is refused (exit 1)
    while another runs (an 'edge-ad calibrate', or an MQTT calibrate).
    """
    from ..bundle import Bundle
    from ..calibration import recalibrate, rollback
    from ..errors import InputError

    settings, env = line_config(config, env_file)   # first, as every other check: a bad config fails at once
    b = Bundle.open(_bundle_dir(bundle_dir, settings, config, env))
    modes = [name for name, on in (("--list", list_versions), ("--rollback", rollback_to is not None),
                                   ("--prune", prune_keep is not None)) if on]
    if len(modes) > 1:
        raise InputError(f"{', '.join(modes[:-1])} and {modes[-1]} exclude each other: give one, then the other")
    if dry_run and prune_keep is None:
        raise InputError("--dry-run goes with --prune (it shows what a prune would remove)")
    if list_versions:
        _list_calibrations(b, as_json)
        return
    if prune_keep is not None:
        _prune(b, prune_keep, dry_run, as_json)
        return
    if rollback_to is not None:
        version = None
        if rollback_to != "previous":
            try:
                version = int(rollback_to)
            except ValueError:
                raise InputError(f"--rollback {rollback_to}: expected a version number") from None
        with b.calibration_lock():
            try:
                before = b.calibration().version
            except InputError:
                if version is None:
                    raise
                before = None   # unreadable: an explicit version puts a good one back
            cal = rollback(b, version, by="cli")
        waiting = _not_reloaded(b, cal.version)
        out = {"version": cal.version, "previous_version": before, "threshold": cal.threshold, "policy": cal.policy,
               "not_reloaded": waiting}
        if as_json:
            _echo_json(out)
        else:
            was = f"v{before}" if before is not None else "unreadable"
            click.echo(f"calibration v{cal.version} {_taken(waiting)} (was {was}), threshold {cal.threshold:.6g}")
            _reload_note(waiting, written=b)
        return
    line = settings.source if settings is not None else None
    source = source or (line.uri if line is not None else None)
    if not source:
        raise InputError(f"--source is required: {config} has no source.uri (nor does an EDGE_AD_SOURCE__URI set "
                         "one) to take it from" if config is not None else "--source is required (a folder of "
                         "normal images or a source URI, or --config LINE.toml whose source.uri names it), unless "
                         "--rollback, --list or --prune")
    from ..inspector import Inspector
    from ..runtime.backends import open_backend
    from ..scoring import check_policy

    if (golden_dir or deploy_dir or adapt_out or no_golden) and not adapt:
        raise InputError("--golden, --deploy, --no-golden and --adapt-out go with --adapt")
    if no_golden and (golden_dir or not deploy_dir):
        raise InputError("--no-golden goes with --deploy (switching in unchecked), and not with --golden")
    if deploy_dir is not None:
        deploy_dir, golden_dir = _deploy_into(deploy_dir, golden_dir, no_golden, settings, config, env)
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("min_frames", "screen_z", "precision", "prior_weight")
             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if adapt and given:
        raise InputError(f"--adapt does not use {', '.join(given)}: the adapted model is calibrated on a "
                         "validation split of the frames and quantized like the running one; leave "
                         f"{'it' if len(given) == 1 else 'them'} out")
    check_policy(policy)
    # what scores the frames: the line's [model] backend, precision and device unless given
    backend, precision, device = _scored_as_line(settings, config, env, backend, precision, device,
                                                 b.active_precision)
    if adapt:
        from ..calibration.adapt import check_adapt_frames

        check_adapt_frames(frames)
    if not adapt and min_frames > frames:
        raise InputError(f"--min-frames {min_frames} is more than --frames {frames}: the refit would refuse the "
                         "set; collect more frames or lower --min-frames")
    if prior_weight is not None:
        from ..calibration.gaussfit import check_prior_weight

        try:
            check_prior_weight(prior_weight)
        except InputError as exc:
            raise InputError(f"--prior-weight: {exc}") from None
        if b.kind != "gaussian":
            raise InputError(f"--prior-weight {prior_weight:g}: only the Gaussian model has trained statistics "
                             f"to pool with; {b.path} is a {b.kind} bundle: leave it out")
    if adapt:
        from ..calibration.adapt import adapt as run_adapt, check_adapt

        check_adapt(b, adapt_out, golden_dir, train_device)   # before the frames: collecting them takes minutes
        if deploy_dir is not None:
            from ..calibration.deploy import golden_for

            golden_for(deploy_dir, golden_dir, not no_golden)
        from ..calibration.adapt import MIN_KEPT_FRAMES

        notes: list[str] = []
        images = _collect(source, frames, every, timeout_s, line, tuple(b.image_size), b, MIN_KEPT_FRAMES, notes)
        with _golden_json(as_json):
            res = run_adapt(b.path, images, steps=adapt_steps, policy=policy, device=train_device,
                            out_dir=adapt_out, golden_dir=golden_dir, deploy_dir=deploy_dir, backend=backend,
                            precision=precision, run_device=device, require_golden=not no_golden,
                            labels=images.labels)
        res = dataclasses.replace(res, warnings=(*notes, *res.warnings))
        # with --config: the threshold the line decides with once the adapted model runs, as for a refit
        override, in_force = _decides_with(settings, res.threshold)
        installed = res.install is not None
        # installed: a running line still runs the model it replaces (b) until it reloads
        waiting = _not_reloaded(b) if installed else []
        if as_json:
            out = res.summary()
            if in_force is not None:
                out["threshold_in_force"] = in_force
            if installed:
                out["not_reloaded"] = waiting
            _echo_json(out)
            return
        _screened(res)
        screened = f", frames screened on {summary_text(res.scored_on)}" if res.scored_on else ""
        # a quantized candidate's threshold is fitted on its own scores: the FP32 model's is said beside it
        fitted = "" if res.fp32_threshold is None else (
            f" (fitted on its scores on {summary_text(res.calibrated_on)}; {res.fp32_threshold:.6g} on the FP32 "
            "model's)")
        if in_force is not None:
            thr = f"; threshold {res.threshold:.6g}{fitted}, threshold in force {in_force:.6g}" + (
                "" if installed else " once installed")
        else:   # without the config: what the candidate's calibration sets, nothing more known
            thr = "" if res.threshold is None else f"; threshold {res.threshold:.6g}{fitted} set by its calibration"
        if installed:
            g = res.install.golden
            golden = "golden check skipped" if g is None else f"golden check passed on {g['n_images']} images"
            click.echo(f"adapted model installed as {res.install.release} ({golden}; {res.precision}, "
                       f"{res.steps} steps, {res.seconds:.0f} s{screened}{thr})")
            _switch_notes("install", res.install)
            _reload_note(waiting, f"the model it replaces ({b.path.name})", restart=True)
        else:
            click.echo(f"adapted model written to {res.candidate} ({res.precision}, {res.steps} steps, "
                       f"{res.seconds:.0f} s{screened}{thr}; the running bundle is unchanged)")
        _override_note(override, config, env, "the adapted model", res.threshold)
        return
    from ..calibration.adapt import remove_stale_work
    from ..calibration.refit import GAUSSIAN_DIR

    # what the refit writes, known now and not after minutes of frames: calibration.json (and manifest.json),
    # calibration.d/, and a Gaussian model's refitted statistics in gaussian.d/
    b.check_writable("calibrate", b.calibration_dir.name, GAUSSIAN_DIR if b.kind == "gaussian" else None)
    remove_stale_work(b.path)   # the frames a killed --adapt left beside the bundle (--adapt itself does it too)
    with b.calibration_lock():   # from before the frames to the switch: a second calibration is refused
        be = open_backend(b, backend, precision, device)   # before the frames: a bad backend fails at once
        try:
            scored_on = be.summary()
            notes: list[str] = []
            images = _collect(source, frames, every, timeout_s, line, tuple(b.image_size), b, min_frames, notes)
            insp = Inspector(b, be)
            res = recalibrate(b, insp, images, policy=policy, screen_z=screen_z, min_frames=min_frames,
                              prior_weight=prior_weight, source=f"edge-ad calibrate: {_shown(source)}",
                              labels=images.labels)
        finally:
            be.close()
    res = dataclasses.replace(res, warnings=(*notes, *res.warnings))   # the training images left out, first
    c = res.calibration
    override, in_force = _decides_with(settings, c.threshold)
    waiting = _not_reloaded(b, c.version)
    if as_json:
        out = {**res.summary(), "scored_on": scored_on, "not_reloaded": waiting}
        if in_force is not None:
            out["threshold_in_force"] = in_force
        _echo_json(out)
        return
    _screened(res)
    thr = (f"threshold {c.threshold:.6g} (was {res.previous.threshold:.6g}), threshold in force {in_force:.6g}"
           if in_force is not None else     # without the config: what the calibration sets, nothing more known
           f"threshold {c.threshold:.6g} set by this calibration (was {res.previous.threshold:.6g})")
    click.echo(f"calibration v{c.version} {_taken(waiting)} (was v{res.previous.version}): policy {c.policy}, {thr}, "
               f"{res.n_used} of {res.n_frames} frames used, {len(res.excluded)} left out, scored on "
               f"{summary_text(scored_on)}, {res.timings['total']:.1f} s")
    _reload_note(waiting, written=b)
    _override_note(override, config, env, "this calibration", c.threshold)


def _not_reloaded(b, version: int | None = None) -> list[dict]:
    """The running processes (``edge-ad run``) that decide with ``b`` and another calibration version than
    ``version`` until they reload (None: any version: a model installed in its place, which they do not run
    yet), as they record it (:meth:`edge_ad.bundle.Bundle.calibration_holders`): ``pid``, ``by``, ``since`` and
    the ``version`` each decides with; and, ``b`` being the release in force of a deploy folder, those that still
    run another release of it (an install or a rollback by hand they have not reloaded since), with its
    ``release`` (:func:`edge_ad.calibration.deploy.other_release_holders`). ``not_reloaded`` in ``--json``."""
    from ..calibration.deploy import other_release_holders

    return [{**r, "version": v} for v, recs in sorted(b.calibration_holders().items()) if v != version
            for r in recs] + other_release_holders(b.path)


def _taken(waiting: list[dict]) -> str:
    """How a calibration written stands: "in force", or only "written" while a running line decides with
    another version (``waiting``, :func:`_not_reloaded`)."""
    return "written" if waiting else "in force"


def _reload_note(waiting: list[dict], what: str | None = None, restart: bool = False, written=None) -> None:
    """Say when the running lines (``waiting``, :func:`_not_reloaded`) take what was written: ``note: edge-ad run
    (pid 812) still decides with v2 until it reloads (SIGHUP or the MQTT reload command)``; ``what``: what they
    decide with (default: each one's calibration version); those that run another release of the deploy folder:
    ``still decides with release r0004-... (its calibration v2)``, and with ``written`` (the bundle calibrated,
    the release in force) the note adds that the calibration is for that release, which the line runs once it
    reloads. ``restart`` (a model installed in a deploy folder): a restart takes it too, and its health check
    judges it; said also when no line is known to run."""
    from ..calibration.refit import holders_text

    how = "SIGHUP or the MQTT reload command" + (", or a restart; its health check then confirms the new model or "
                                                 "rolls it back" if restart else "")
    if not waiting:
        if restart:
            click.echo(f"note: a running 'edge-ad run' takes it on {how}")
        return
    own = [r for r in waiting if "release" not in r]
    other = [r for r in waiting if "release" in r]
    groups = ([(what, own)] if what and own else [
        (f"v{v}", [r for r in own if r["version"] == v]) for v in sorted({r["version"] for r in own})])
    groups += [(f"release {rel} (its calibration v{v})", [r for r in other if (r["release"], r["version"]) == (rel, v)])
               for rel, v in dict.fromkeys((r["release"], r["version"]) for r in other)]
    note = "note: " + "; ".join(holders_text(recs, said, still=True) for said, recs in groups) + f" ({how})"
    if other and written is not None:
        note += (f": this calibration is for release {written.path.resolve().name}, the release in force, and decides "
                 "on the line once it reloads")
    click.echo(note)


def _decides_with(settings, threshold: float | None) -> tuple[float | None, float | None]:
    """With --config (``settings``): the config's ``[decision] threshold`` (None: none) and the threshold the line
    decides with, by the service's rule (its MQTT calibrate reply's ``threshold_in_force``,
    :func:`edge_ad.scoring.threshold_in_force`): the override when there is one, else ``threshold``. Without
    the config: (None, None), nothing known of the line."""
    from ..scoring import threshold_in_force

    if settings is None or threshold is None:
        return None, None
    override = settings.decision.threshold
    return override, threshold_in_force(threshold, override)


def _override_note(override, config, env, what: str, threshold: float) -> None:
    """The ``note:`` that the config's ``[decision] threshold`` (``override``), and not ``what``'s ``threshold``,
    decides on the line."""
    if override is not None:
        click.echo(f"note: the line decides with threshold {override:.6g}, the {setting_origin(config, env)}, "
                   f"which overrides {what}'s {threshold:.6g} (after a reload or restart too): "
                   f"remove it for {what}'s threshold to decide")


def setting_origin(config, env, section: str = "decision", key: str = "threshold") -> str:
    """Where the config's ``[section] key`` (default: ``[decision] threshold``) came from: the env file, this
    shell, or the file."""
    name = f"EDGE_AD_{section.upper()}__{key.upper()}"
    if name in env.names:
        return f"{name} of {env.env_file}"
    if name in env.environ:
        return f"environment variable {name}"
    return f"[{section}] {key} of {config}"


def _bundle_dir(bundle_dir, settings, config, env) -> Path:
    """The bundle to calibrate: ``--bundle``, else the one the line config runs (its ``[model] bundle``, or the
    release in force of its ``deploy_dir``), said on stderr. A ``--bundle`` other than the config's is taken,
    with a warning: the line does not inspect with what is calibrated then."""
    from ..errors import InputError

    model = settings.model if settings is not None else None
    if model is None:
        if bundle_dir is None:
            raise InputError(f"--bundle is required: {config} has no [model] bundle or deploy_dir to take it "
                             "from" if config is not None else "--bundle is required (or --config LINE.toml, whose "
                             "[model] bundle or deploy_dir names it)")
        return bundle_dir
    key = "bundle" if model.bundle is not None else "deploy_dir"
    origin = setting_origin(config, env, "model", key)
    try:
        named = model.bundle_path()
    except InputError as exc:   # a deploy folder without a release in force
        if bundle_dir is None:
            raise InputError(f"{exc} (the {origin}); give --bundle") from None
        click.echo(f"warning: the line's bundle cannot be told ({exc}, the {origin}): calibrating --bundle "
                   f"{bundle_dir}", err=True)
        return bundle_dir
    what = f"the {origin}" if key == "bundle" else f"the release in force of the {origin}"
    if bundle_dir is None:
        click.echo(f"note: no --bundle: bundle {named}, {what}", err=True)
        return named
    if Path(bundle_dir).resolve() != Path(named).resolve():
        click.echo(f"warning: --bundle {bundle_dir} is not the bundle the line runs ({named}, {what}): calibrating "
                   f"{bundle_dir} as asked; the line does not decide with it", err=True)
    return bundle_dir


@dataclasses.dataclass(frozen=True)
class _LineUse:
    """How a command that takes the line config's ``[model]`` defaults (:func:`_deploy_into`,
    :func:`_scored_as_line`) words its notes and warnings: ``calibrate`` scores frames as the line does,
    ``bundle install`` checks a new model as the line will run it."""

    doing: str         # the note: "note: <doing>: backend ... (the [model] backend of LINE.toml), ..."
    asked: str         # an option that is not the line's: "... (<the line's>): <asked, {value}>"
    bare: str          # no deploy folder given: "<bare> is the line's deploy folder: ..."
    bare_note: str     # "note: <bare_note>: deploy folder DIR, the [model] deploy_dir of LINE.toml"
    other: str         # what is done to a deploy folder given that is not the line's ({deploy}: that folder)


_CALIBRATE_USE = _LineUse("scoring as the line does", "scoring on {value} as asked; the line scores otherwise, and a "
                          "threshold fitted here may not fit its scores", "--deploy without a folder", "--deploy",
                          "switching the adapted model into {deploy} as asked; the line does not run it")
_INSTALL_USE = _LineUse("checking the new model as the line will run it", "opening and checking the new model on "
                        "{value} as asked; the line runs it otherwise", "without --deploy, the folder",
                        "no --deploy", "switching the new model into {deploy} as asked; the line does not run it")
# bundle status and rollback take only the deploy folder (doing and asked: unused)
_STATUS_USE = _LineUse("", "", "without --deploy, the folder", "no --deploy", "showing {deploy} as asked")
_ROLLBACK_USE = _LineUse("", "", "without --deploy, the folder", "no --deploy",
                         "rolling {deploy} back as asked; the line does not run it")
_LINE_UNSET = {"backend": "auto", "precision": None, "device": None}   # ModelSettings' defaults


def _deploy_into(deploy_dir, golden_dir, no_golden, settings, config, env,
                 use: _LineUse = _CALIBRATE_USE) -> tuple[Path, Path | None]:
    """The deploy folder and golden set of a command that switches a model into the line's deploy folder
    (``calibrate --adapt --deploy``, ``bundle install``; ``use`` words its notes): a folder given, else
    (:data:`_LINE_DEPLOY`) the line config's ``[model] deploy_dir`` (after its edge-ad.env), named on stderr; the
    golden set ``golden_dir``, else the config's ``model.golden_dir`` unless ``no_golden`` (None: DEPLOY/golden).
    A folder given that is not the line's is taken, with a warning: the line does not run what is installed
    there."""
    from ..errors import InputError

    m = settings.model if settings is not None else None
    line = m.deploy_dir if m is not None else None
    origin = setting_origin(config, env, "model", "deploy_dir") if m is not None else None
    if deploy_dir == _LINE_DEPLOY:
        if line is None:
            raise InputError(f"{use.bare} is the line's deploy folder: "
                             + ("give --config LINE.toml (its [model] deploy_dir) or --deploy DIR" if config is None
                                else f"{config} has no [model] deploy_dir to take it from"
                                + (f" (the line runs the bundle {m.bundle}, which takes no model update)"
                                   if m is not None else "") + "; give --deploy DIR"))
        deploy_dir = Path(line)
        click.echo(f"note: {use.bare_note}: deploy folder {deploy_dir}, the {origin}", err=True)
    elif m is not None and (line is None or Path(line).resolve() != Path(deploy_dir).resolve()):
        runs = (f"release in force of {line}, the {origin}" if line is not None else
                f"the bundle {m.bundle}, the {setting_origin(config, env, 'model', 'bundle')}")
        click.echo(f"warning: --deploy {deploy_dir} is not the line's deploy folder (it runs the {runs}): "
                   f"{use.other.format(deploy=deploy_dir)}", err=True)
    if golden_dir is None and not no_golden and m is not None:
        golden_dir = m.golden_dir
    return deploy_dir, golden_dir


def _scored_as_line(settings, config, env, backend, precision, device, active: str | None,
                    use: _LineUse = _CALIBRATE_USE) -> tuple[str, str | None, str | None]:
    """The backend, precision and device a command runs the model on as the line does (a refit's frames, and
    --adapt's screen and checks; an install's open and golden checks; ``use`` words its notes): ``--backend``,
    ``--precision`` and ``--device`` when given, else the line config's ``[model]`` ones (after its edge-ad.env),
    so a threshold is fitted on the scores the line produces and an install checks what the line will run;
    without the config: auto, the bundle's active graph (``active``: its precision; None: each bundle's, as for
    an install), the best device. The line's settings taken are named in a ``note:`` on stderr; a given option
    that is not the line's, in a ``warning:`` (taken as asked, the line otherwise)."""
    given = {"backend": backend, "precision": precision, "device": device}
    m = settings.model if settings is not None else None
    if m is None:
        return backend or "auto", precision, device
    taken = []
    for key, value in given.items():
        line = getattr(m, key)
        if value is None:
            given[key] = line
            if line != _LINE_UNSET[key]:
                taken.append(f"{key} {line} (the {setting_origin(config, env, 'model', key)})")
            continue
        if key == "precision":   # unset: the bundle's active graph; int8-u8 is the CPU form of int8
            same = value.removesuffix("-u8") == (line or active)
            said = line or ("unset: each bundle's active graph" if active is None else
                            f"unset: the bundle's active graph, {active}")
        else:
            same = value.lower() == (line or "").lower()
            said = line or "unset: the best this machine has"
        if not same:
            click.echo(f"warning: --{key} {value} is not the line's {key} ({said}, the "
                       f"{setting_origin(config, env, 'model', key)}): {use.asked.format(value=value)}", err=True)
    if taken:
        click.echo(f"note: {use.doing}: " + ", ".join(taken), err=True)
    return given["backend"], given["precision"], given["device"]


def _screened(res) -> None:
    """The frames the screen left out and the warnings (a refit's or --adapt's result), on stderr."""
    for e in res.excluded:
        click.echo(f"left out {e.name}: score {e.score:.4g}, robust z {e.z:.1f} ({e.reason})", err=True)
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)


def line_config(config, env_file, given=()):
    """The line's run config and its :class:`edge_ad.config.ServiceEnviron` (None, None without one), as
    the service runs it (``capture``, ``calibrate``, ``bundle status`` and ``rollback`` read it so): with the
    ``edge-ad.env`` next to it (or ``env_file``) and this process's EDGE_AD_* variables applied
    (:func:`edge_ad.config.service_environ`; the file applied is named on stderr), then ``given``
    (:func:`edge_ad.config.load_settings` overrides, e.g. capture's ``--source``). An ``env_file`` without
    ``config`` is refused here (exit 2), so a command calling this first refuses it before any other check.
    Only its ``[source]``, ``[decision] threshold`` and ``[model]`` bundle or deploy_dir, backend, precision and
    device are used."""
    from ..config import CaptureSettings, load_settings, service_environ

    env = service_environ(config, env_file)   # --env-file without --config: refused before anything is read
    if config is None:
        return None, None
    s = load_settings(config, given, environ=env.environ, schema=CaptureSettings)
    env_file_note(env)
    return s, env


def env_file_note(env) -> None:
    """Say on stderr which environment file (a :class:`edge_ad.config.ServiceEnviron`) was applied over
    --config, naming its variables (never the values: it holds the service's secrets)."""
    if env.env_file is not None:
        click.echo(f"note: {env.env_file} applied over --config as the service gets it"
                   + (f" ({', '.join(env.names)})" if env.names else " (no variables)"), err=True)


def _collect(source, frames: int, every: int, timeout_s: float, line, size_hw: tuple[int, int], bundle,
             min_frames: int, notes: list):
    """The frames, as the line inspects them (``line``: its ``[source]``; see ``--config``), each kept at the
    model's input size ``size_hw``; a folder's images that are ``bundle``'s training images are left out
    (the warning goes to ``notes``), and a folder with fewer than ``min_frames`` others is refused (exit 2).
    Frames of another bit depth than the training images' are warned about (logged, once)."""
    from ..calibration import collect_frames
    from ..calibration.collect import is_line_folder
    from ..data.image import trained_format

    if line is None and "://" in str(source) and not str(source).startswith("dir://"):
        click.echo(f"note: no --config: the frames of {_shown(source)} are calibrated on whole and unrotated; "
                   "on a line with source.roi or rotate give --config LINE.toml, else the refit fits other pictures "
                   "than the line inspects", err=True)
    with trained_format(bundle):   # frames of another bit depth than the training images': warned
        images = collect_frames(source, frames, every=every, timeout_s=timeout_s, size_hw=size_hw,
                                roi=line.roi if line is not None else None,
                                rotate=line.rotate if line is not None else 0,
                                folder_roi=line is not None and is_line_folder(source, line.uri),
                                bundle=bundle, min_frames=min_frames, notes=notes,
                                open_timeout_s=line.open_timeout_s if line is not None else 10.0,
                                rtsp_transport=line.rtsp_transport if line is not None else "tcp")
    if len(images) < frames:
        click.echo(f"note: {_shown(source)} gave {len(images)} frames (asked for {frames})", err=True)
    return images


def _shown(source) -> str:
    """``--source`` (or the config's source.uri) as it may be printed and recorded: a URI without its
    credentials (``rtsp://***@cam/1``, as every log line says it), a folder as given, a byte of its name that is
    not UTF-8 as ``\\xfe`` (:func:`~edge_ad.errors.name_text`)."""
    from ..errors import name_text
    from ..runtime.sources import redact_uri

    text = str(source)
    return name_text(redact_uri(text) if "://" in text else text)


def _calibration_rows(b) -> tuple[list[dict], list[str]]:
    """One row per calibration version kept (or the one in force, when no history is), and what was
    unreadable, each history file checked as --rollback checks it."""
    from ..errors import InputError

    try:
        cur = b.calibration() if b.has("calibration.json") else None
    except InputError as exc:
        cur, bad = None, [str(exc)]
    else:
        bad = []
    rows = []
    rollbacks: dict = {}
    for r in b.calibration_rollbacks():
        rollbacks.setdefault(r.get("version"), []).append(r)
    for v in b.calibration_versions():
        try:
            c = b.calibration_at(v)
        except InputError as exc:
            bad.append(str(exc))
            rows.append({"version": v, "in_force": False, "error": str(exc)})
            continue
        rows.append(_row(b, c, v, in_force=cur is not None and v == cur.version))
        rows[-1]["rolled_back_to"] = rollbacks.get(v, [])
    if not rows and cur is not None:
        rows.append(_row(b, cur, cur.version, in_force=True))
    return rows, bad


def _row(b, c, version: int, in_force: bool) -> dict:
    from ..calibration.refit import statistics_kept
    from ..runtime.sources import redact_text

    return {"version": version, "in_force": in_force, "created": c.created, "policy": c.policy,
            "threshold": c.threshold, "n_frames": c.n_frames, "source": redact_text(c.source),   # older records
            "rollback": statistics_kept(b, c)}


def _list_calibrations(b, as_json: bool) -> None:
    """``calibrate --list``: the versions kept; an unreadable history file is listed, then exit 2."""
    from ..errors import InputError

    rows, bad = _calibration_rows(b)
    if as_json:
        _echo_json(rows)
    elif not b.calibration_versions():
        click.echo(f"{b.calibration_dir}: no calibration history; " + (
            f"in force: v{rows[0]['version']}, threshold {rows[0]['threshold']:.6g}" if rows else
            "the bundle has no calibration in force either (train or calibrate it first)"))
    else:
        for r in rows:
            mark = "*" if r["in_force"] else " "
            if "error" in r:
                click.echo(f"{mark} v{r['version']:<4} unreadable: {r['error']}")
            else:
                click.echo(f"{mark} v{r['version']:<4} {r['created']:<26} {r['policy']:<11} "
                           f"threshold {r['threshold']:.6g}  {r['n_frames']} frames  {r['source']}"
                           + ("" if r["rollback"] else "  (statistics pruned: no rollback to it)"))
                for rb in r.get("rolled_back_to", []):
                    was = rb.get("previous_version")
                    click.echo(f"        rolled back to at {rb.get('ts')} by {rb.get('by')}"
                               + (f" (from v{was})" if was is not None else ""))
    if bad:
        raise InputError(f"{len(bad)} calibration file(s) unreadable: " + "; ".join(bad))


def _prune(b, keep: int, dry_run: bool, as_json: bool) -> None:
    """``calibrate --prune KEEP [--dry-run]``: delete old versions (:func:`edge_ad.calibration.prune_history`) and
    say which went and which were kept besides the KEEP newest."""
    from ..bundle import version_runs
    from ..calibration import prune_history

    res = prune_history(b, keep, dry_run=dry_run)
    if as_json:
        _echo_json(res.summary())
        return
    verb = "would remove" if dry_run else "removed"
    kept = f"{len(res.kept)} kept: {version_runs(res.kept)}"
    if res.protected:
        kept += " (" + ", ".join(f"v{v} {why}" for v, why in sorted(res.protected.items())) + ")"
    if not res.removed:
        click.echo(f"{b.calibration_dir}: nothing to prune, {kept}")
    else:
        click.echo(f"{b.calibration_dir}: {verb} {len(res.removed)} calibration version"
                   f"{'s' if len(res.removed) != 1 else ''} ({version_runs(res.removed)}); {kept}")
    if res.gaussian_removed:
        click.echo(f"{verb} Gaussian statistics no kept version uses: {', '.join(res.gaussian_removed)}")
    if res.rollbacks_dropped:
        n = res.rollbacks_dropped
        click.echo(f"{'would drop' if dry_run else 'dropped'} {n} record{'s' if n != 1 else ''} of "
                   f"{b.rollback_log.name} that put back a version not kept")
    if dry_run:
        click.echo("nothing removed (--dry-run)", err=True)


# ----------------------------------------------------------------------------- bundle archives
@main.group("bundle")
def bundle_group():
    """Bundle archives for model updates: pack, install (verify, golden check, switch), rollback."""


@bundle_group.command("pack")
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Sign with an HMAC secret file or an Ed25519 private key (PEM).")
def pack_cmd(bundle_dir, out, sign_key):
    """Write OUT (.tar, or .tar.gz) from BUNDLE_DIR with the sha256 of every file (engines left out)."""
    from ..calibration import pack_bundle, read_index

    path = pack_bundle(bundle_dir, out, sign_key=sign_key)
    info = read_index(path)
    click.echo(f"wrote {path} ({len(info.index['files'])} files, model {info.index['bundle']['model_hash'][:12]}, "
               f"{'signed ' + str(info.alg) if info.signed else 'unsigned'})")


@bundle_group.command("install")
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              help="The line's run config: its [model] deploy_dir, golden_dir, update_key, backend, precision and "
                   "device are the defaults of the options below, so the install checks what the line will run "
                   "(named on stderr, as by 'calibrate --config'; an option given that is not the line's is warned "
                   "of).")
@env_file_option
@click.option("--deploy", "deploy_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Deploy folder (releases/, current and previous links); default: the config's "
                   "model.deploy_dir.")
@click.option("--golden", "golden_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Golden images: good/ must be OK, other folders NG, loose images must agree with the "
                   "running model (default: the config's model.golden_dir, else DEPLOY/golden).")
@click.option("--no-golden", is_flag=True,
              help="Install without the golden-set check (DEPLOY/golden is not used either).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="HMAC secret file or Ed25519 public key (PEM); unsigned archives are then refused "
                   "(default: the config's model.update_key).")
@click.option("--require-signature", is_flag=True,
              help="Refuse unsigned archives (implied by --key, and needs it: the key checks the signature).")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="Backend the line runs (model.backend): the new model is opened on it, and the golden check "
                   "runs on it, before the switch. Default: the config's, else auto.")
@click.option("--precision", default=None,
              help="Precision the line runs (model.precision), for the open and golden checks (and, on a "
                   "TensorRT line, the new release's engine; without one, 'compile --precision best'). Default: "
                   "the config's, else each bundle's active graph.")
@click.option("--device", default=None, help="Device the line runs on (model.device), for the open and golden "
                                             "checks. Default: the config's, else the best this machine has.")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path),
              help="TensorRT lines: normal images of the part (or DIR/train/good) to build and guard the new "
                   "release's engine on. Default: the golden set's good/ images, else the bundle's recorded "
                   "training data when it is on this machine.")
@click.option("--keep", default=3, show_default=True, type=click.IntRange(2), help="Releases kept.")
@click.option("--json", "as_json", is_flag=True)
def install_cmd(archive, config, env_file, deploy_dir, golden_dir, no_golden, key, require_signature, backend,
                precision, device, calib_dir, keep, as_json):
    """Verify ARCHIVE (a 'bundle pack' archive, or a bundle folder made on this device), open it as the line
    will, check it on the golden set, and switch it in atomically (the old one is kept).

    On a TensorRT line (backend tensorrt; or auto on a GPU when TensorRT is here and the running release has
    engines) the new release's engine is first built and guarded on this device (archives carry none; see
    --calib), in the line's precision, else the bundle's active one: minutes on a Jetson. A failed build or
    guard refuses the update, nothing switched."""
    from ..calibration import install_bundle
    from ..calibration.deploy import open_probe
    from ..errors import InputError

    from ..config import load_settings, service_environ

    env = service_environ(config, env_file)
    settings = None
    if config is not None:   # the line's [model] (after its edge-ad.env): the defaults of the options below
        settings = load_settings(config, environ=env.environ)
        env_file_note(env)
        key = key or settings.model.update_key
    elif deploy_dir is None:
        raise InputError("--deploy DIR (or --config with a model.deploy_dir) is required: where to install")
    # as calibrate --config takes them: named in notes, a given option that is not the line's in a warning
    deploy_dir, golden_dir = _deploy_into(deploy_dir or _LINE_DEPLOY, golden_dir, no_golden, settings, config, env,
                                          _INSTALL_USE)
    backend, precision, device = _scored_as_line(settings, config, env, backend, precision, device, None,
                                                 _INSTALL_USE)
    if no_golden and golden_dir:
        raise InputError("--golden and --no-golden exclude each other")
    if require_signature and key is None:
        raise InputError("--require-signature needs --key to check the signature with")
    with _golden_json(as_json):
        res = install_bundle(archive, deploy_dir, golden_dir, key, require_signature=True if key else None,
                             require_golden=not no_golden, backend=backend, precision=precision, device=device,
                             keep=keep, probe=open_probe(backend, precision, device), calib_dir=calib_dir,
                             progress=True)
    if as_json:
        _echo_json(res.summary())
        return
    if res.already_installed:
        click.echo(f"already installed: {deploy_dir}/current -> releases/{res.release} was installed from the "
                   "same files; nothing changed")
        return
    g = res.golden
    golden = "golden check skipped" if g is None else f"golden check passed on {g['n_images']} images"
    click.echo(f"installed {res.release} ({golden}; previous: {res.previous or 'none'}); "
               f"{deploy_dir}/current -> releases/{res.release}")
    _switch_notes("install", res)
    click.echo("'edge-ad run' with model.deploy_dir watches its first frames and rolls back when they look wrong "
               "(started, restarted or reloaded after this install: SIGHUP or the MQTT reload command); "
               "'edge-ad bundle status' shows the verdict", err=True)


_DEPLOY_CONFIG_HELP = ("The line's run config: its [model] deploy_dir (after its edge-ad.env) is the deploy folder "
                       "when --deploy is not given (named on stderr; a --deploy that is not the line's is warned of).")


@bundle_group.command("rollback")
@click.option("--deploy", "deploy_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Deploy folder; default: --config's model.deploy_dir.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), help=_DEPLOY_CONFIG_HELP)
@env_file_option
@click.option("--to", "to", metavar="RELEASE_ID",
              help="Switch to this kept release (ids: 'edge-ad bundle status') instead of the previous one.")
@click.option("--force", is_flag=True,
              help="Switch to the release even when it failed its health check (or the line could not open it): "
                   "refused without it. The line then inspects with it, with a WARNING at each start and reload.")
def rollback_cmd(deploy_dir, config, env_file, to, force):
    """Switch the deploy folder back to the previous release, or to any kept one with --to.

    The release left becomes 'previous', so a second plain rollback undoes the first; to go two or more
    releases back, give --to RELEASE_ID. A release that failed its health check ('health failed' in 'edge-ad
    bundle status') is not switched to without --force. A running 'edge-ad run' switches on its next reload
    (SIGHUP or the MQTT reload command) or restart. deploy.json records it as a rollback by hand, with the user
    who made it: no verdict on the release left, whose health stays its own ('edge-ad bundle status')."""
    from ..calibration import deployment, rollback_model
    from ..calibration.deploy import failed_verdict

    deploy_dir = _line_deploy(deploy_dir, config, env_file, _ROLLBACK_USE)
    deployment(deploy_dir, must_exist=True)
    # by hand: no verdict on the release left (its health stays its own), recorded with who asked for it
    dep = rollback_model(deploy_dir, reason="edge-ad bundle rollback" + (f" --to {to}" if to else "")
                         + (" --force" if force else ""), to=to, by=f"edge-ad bundle rollback ({_who()})", force=force)
    click.echo(f"{deploy_dir}/current -> releases/{dep.current} (previous: {dep.previous})")
    verdict = failed_verdict(deploy_dir, dep.current)
    if verdict is not None:   # put back with --force
        click.echo(f"warning: releases/{dep.current} {verdict}: the line inspects with it (--force)", err=True)
    _switch_notes("rollback", dep)
    click.echo("'edge-ad run' with model.deploy_dir switches on its next reload (SIGHUP or the MQTT reload "
               "command) or restart", err=True)


def _switch_notes(what: str, res) -> None:
    """Say on stderr what an install or rollback (``what``) that holds did beside the switch: a damaged 'previous'
    link it replaced (``replaced_previous`` of :class:`edge_ad.calibration.deploy.InstallResult` or
    :class:`edge_ad.calibration.deploy.Deployment`), a record left incomplete."""
    if res.replaced_previous is not None:
        click.echo(f"warning: {res.replaced_previous}", err=True)
    _unrecorded_note(what, res.unrecorded)


def _line_deploy(deploy_dir, config, env_file, use: _LineUse) -> Path:
    """The deploy folder of ``bundle status`` / ``rollback``: ``--deploy``, else ``--config``'s
    ``[model] deploy_dir`` (after its edge-ad.env), as :func:`_deploy_into` takes it for an install."""
    settings, env = line_config(config, env_file)
    return _deploy_into(deploy_dir or _LINE_DEPLOY, None, True, settings, config, env, use)[0]


def _who() -> str:
    """``user NAME`` (``user NAME, sudo from NAME2`` under sudo) of this process, for a record of who did something
    by hand."""
    import getpass
    import os

    try:
        user = getpass.getuser()
    except (KeyError, OSError):   # no passwd entry (a container's uid)
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"user {user}" + (f", sudo from {sudo}" if sudo and sudo != user else "")


def _unrecorded_note(what: str, why: str | None) -> None:
    """Say on stderr that an install's or rollback's switch holds with its record incomplete (a full disk after
    'current' moved: :func:`edge_ad.calibration.deploy._switch_recorded`); the exit code stays 0."""
    if why is not None:
        click.echo(f"warning: the {what} holds, but its record is incomplete: {why}", err=True)


@bundle_group.command("status")
@click.option("--deploy", "deploy_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Deploy folder; default: --config's model.deploy_dir.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), help=_DEPLOY_CONFIG_HELP)
@env_file_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(deploy_dir, config, env_file, as_json):
    """The release in force, the previous one, and every kept release (newest first: id, install time, its own
    health: pending, ok, failed or unchecked) that 'edge-ad bundle rollback --to ID' can switch to; when a
    rollback switched the release in force in, from which release, by hand (by whom) or because it failed.

    A release that cannot be run or rolled back to (its folder deleted by hand, a corrupt manifest.json)
    is named with what is wrong; exit 1 when it is the release in force, after the listing. A damaged
    'previous' link is a warning with its repair (a damaged 'current' one an error, exit 2)."""
    from ..calibration import deployment
    from ..calibration.deploy import last_rollback, not_switched_in, previous_blocks, release_problem, releases
    from ..errors import RuntimeFailure

    deploy_dir = _line_deploy(deploy_dir, config, env_file, _STATUS_USE)
    dep = deployment(deploy_dir, must_exist=True)
    kept = releases(deploy_dir)
    # the release in force's own health as listed (a failed verdict kept in it included), else the record's
    health = next((r["health"] for r in kept if r["id"] == dep.current), dep.health)
    back = last_rollback(dep)
    problems = {role: release_problem(deploy_dir, rid) if rid else None
                for role, rid in (("current", dep.current), ("previous", dep.previous))}
    others = [r["id"] for r in kept if r["id"] != dep.current and not r["problem"]]
    # the links say current and previous, deployment() the health: deploy.json's own record of them lags behind
    # a switch cut short (a power cut, a full disk: its pending record)
    recorded = {k: v for k, v in dep.detail.items() if k not in ("current", "previous", "health")}
    damaged = dep.previous_damaged   # the line runs 'current'; no rollback (nor install, over a folder) until repaired
    out = {"current": dep.current, "previous": dep.previous, "health": health, "rollback": back,
           "current_path": str(dep.current_path) if dep.current_path else None, **recorded,
           "current_problem": problems["current"], "previous_problem": problems["previous"],
           "previous_damaged": str(damaged) if damaged else None, "releases": kept,
           "not_switched_in": not_switched_in(Path(deploy_dir))}
    if as_json:
        _echo_json(out)
    else:
        click.echo(f"current: {dep.current or '-'}  previous: {dep.previous or ('DAMAGED' if damaged else '-')}  "
                   f"health: {health}")
        if back is not None:
            when = f" at {back['time']}" if back["time"] else ""
            click.echo(f"rolled back from {back['from']}{when}: " + (
                f"it failed ({back['reason']})" if back["failed"] else
                f"by hand, {back['by'] or back['reason']} (no verdict on {back['from']})"))
        if damaged:   # what it blocks, as the line's and doctor's warnings say it
            click.echo(f"warning: {damaged.what}: the line runs its release in force, but {previous_blocks(dep)}: "
                       f"{damaged.fix}", err=True)
        if problems["previous"] and dep.previous != dep.current:
            click.echo(f"warning: the previous release, {dep.previous}, is {problems['previous']}: "
                       f"{previous_blocks(dep)}" + (f"; 'rollback --to ID' takes a kept one: {', '.join(others)}"
                                             if others else ""), err=True)
        for rid in out["not_switched_in"]:
            click.echo(f"warning: releases/{rid} was never switched in (its install was cut off before the switch: "
                       "killed, a power cut); it is no release and the next install removes it", err=True)
        click.echo("kept releases, newest first ('edge-ad bundle rollback --to ID' switches to one):")
        for r in kept:
            click.echo(f"  {r['id']}  installed {r['installed'] or '?'}  health {r['health']}"
                       + (f"  ({r['role']})" if r["role"] else "")
                       + (f"  PROBLEM: {r['problem']}" if r["problem"] else ""))
    if problems["current"]:
        raise RuntimeFailure(f"the release in force, releases/{dep.current}, is {problems['current']}; "
                             "'edge-ad run' cannot run it: "
                             + (f"roll back to a kept release ('edge-ad bundle rollback', or --to ID: "
                                f"{', '.join(others)})" if others else "install a release ('edge-ad bundle install')"))


@bundle_group.command("keygen")
@click.option("--private", "private_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", "public_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(private_path, public_path):
    """Make an Ed25519 key pair: sign with the private key, give devices the public one."""
    from ..calibration import generate_ed25519
    from ..errors import InputError

    for p in (private_path, public_path):
        if p.exists():
            raise InputError(f"{p}: exists; not overwriting a key")
    kid = generate_ed25519(private_path, public_path)
    click.echo(f"wrote {private_path} (keep it secret) and {public_path}; key id {kid}")
