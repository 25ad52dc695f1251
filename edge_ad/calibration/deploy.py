"""Safe model updates on the device: verify, validate on a golden set, switch atomically, roll back.

A deploy folder holds the releases and two symlinks; the ``current`` link is the one truth about which
bundle runs::

    <deploy>/releases/r<seq>-<UTC time>-<sha[:12]>/  one bundle folder per installed archive
    <deploy>/current  -> releases/<id>               the bundle in force
    <deploy>/previous -> releases/<id>               the one before (kept for rollback)
    <deploy>/golden/                                 default golden set (good/ and defect folders)
    <deploy>/deploy.json                             health of the last switch and a short history

:func:`install_bundle` (``edge-ad bundle install``, the MQTT ``update_model`` command):

1. extracts the archive into ``releases/.incoming-*`` and verifies it (signature when a key is given,
   every file's sha256, the bundle's own manifest): a bad archive is refused and nothing else changes;
   on a TensorRT line (:func:`engine_needed`) it then builds and guards the candidate's engine there
   (:func:`build_line_engine`; archives carry no engines), so that it travels with the release;
2. runs the candidate on the golden set (:func:`check_golden`): labelled images (``good/`` must be OK,
   every other folder NG) must be judged no worse than by the running bundle (or at least
   ``min_accuracy`` right when there is none) with AUROC no lower than ``max_auroc_drop`` below it;
   unlabelled images (directly in the folder) must get the running bundle's decision
   (``min_agreement``). A failing candidate is deleted and nothing else changes;
3. renames the staging folder into ``releases/`` (marked :data:`NOT_SWITCHED` until ``current`` points at it: cut
   off before, it is no release, and the next install removes it: :func:`not_switched_in`), records the switch as
   pending in ``deploy.json``, swaps ``current`` (a new symlink renamed over the old one with ``os.replace``:
   atomic; a power cut leaves the old or the new link, never none), then points ``previous`` at the release
   replaced (:func:`_switch`); once ``current`` has moved the install holds even when ``previous`` or the final
   record cannot be written (:func:`_switch_recorded`: ``InstallResult.unrecorded`` says why);
4. keeps the ``keep`` newest releases (never ``current`` or ``previous``), each older one renamed to
   ``releases/.trash-<id>`` before it is deleted.

After the switch the runtime opens :func:`current_path` (the resolved release folder, never the
``current`` link itself, so the running inspector keeps writing to its own bundle), and feeds a
:class:`HealthWatch` every result; when the new model leaves the frames handed to it unprocessed for
``window_s`` (see :func:`judge_health`), its error rate passes ``max_error_rate``, or its NG rate jumps by
more than ``max_ng_rate_jump`` over the old model's, the watch calls :func:`rollback_model` and says which
bundle to reopen; while another install or rollback holds the deploy folder it tries again at its next
polls (and while a full disk keeps the rollback from being written, backing off), and never rolls back a
release someone else switched in meanwhile.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shlex
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import atomic
from ..bundle import GRAPH_HINTS, Bundle, now_iso
from ..data.image import IMAGE_EXTS, list_images, load_image
from ..errors import Busy, EdgeADError, GuardFailure, InputError, RuntimeFailure, os_error_text
from .package import PREFIX, PackageInfo, extract_archive, load_key, read_index

log = logging.getLogger(__name__)

RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
STATE = "deploy.json"
GOLDEN = "golden"
CANDIDATES = "candidates"   # <deploy>/candidates/: 'calibrate --adapt' candidates of a release, never a release
NORMAL_DIRS = ("good", "ok")
HISTORY = 50
INSTALLED_FROM = ".installed-from.json"   # in each release: {"archive": .., "release": .., "model": ..} at install
# in a release whose health check failed: {"time": .., "reason": ..}, written (no deploy lock needed) when the verdict
# is reached, so that a restart before its rollback is done rolls it back instead of judging it again
HEALTH_FAILED = ".health-failed.json"
# in a new release from its rename into releases/ until its install's switch has moved 'current' to it: {"time": ..,
# "previous": ..}. A release holding it that neither link names was never switched in (the install was killed, or the
# power cut, between the two): no release, never listed or counted, removed by the next install (_clean_stale)
NOT_SWITCHED = ".not-switched-in.json"
DEVICE_WRITTEN = ("calibration.json", "calibration.d/", "gaussian.d/")   # what calibrating on the device writes


# ----------------------------------------------------------------------------- the deploy folder
@dataclass(frozen=True)
class Deployment:
    deploy_dir: Path
    current: str | None          # release id the ``current`` link points at
    previous: str | None
    # the release in force's own health: "pending" (switched in by an install, its health check not done: the
    # runtime watches it), "ok" (its health check passed), "failed" (its health check failed, or the line could
    # not open it, and a rollback by hand switched it in again), "unchecked" (switched in by a rollback before any
    # verdict on it: never watched) or "none" (no release). A rollback leaves it the release's own, never
    # "pending" (see release_health). It is deploy.json's record only: a failed verdict kept in the release
    # (HEALTH_FAILED, its rollback owed or given up when the line stopped) leaves it "pending", on purpose. The
    # runtime acts on that pair: a pending release holding one is rolled back at start (Service._roll_back_failed,
    # failed_before) and a HealthWatch on it fails at its first poll, so reading it here as "failed" would make
    # the start run it. What shows a health reads it over this one: the listing (releases(), which 'bundle
    # status' takes the release in force's health from); no other caller (doctor, update_model, install_bundle,
    # rollback_model) shows or acts on this field
    health: str
    detail: dict = field(default_factory=dict)
    # rollback_model: why its record is incomplete (deploy.json or the 'previous' link not written after 'current'
    # moved: a full disk); the rollback holds, deployment() reads it from the pending record (_switch_recorded)
    unrecorded: str | None = None
    # the 'previous' link is damaged (not a symlink, or not to releases/<id>): the line runs 'current', and every
    # plain rollback, which rewrites 'previous' and cannot tell where it goes, is refused with this error until it is
    # repaired; so is every install and rollback --to when a folder or file is in its place (a damaged symlink they
    # replace: DeployDamaged.link)
    previous_damaged: DeployDamaged | None = field(default=None, compare=False)
    # rollback_model with ``to``: the damaged 'previous' symlink it replaced, in words (as
    # InstallResult.replaced_previous); None when there was none
    replaced_previous: str | None = None

    @property
    def current_path(self) -> Path | None:
        return self.deploy_dir / RELEASES / self.current if self.current else None

    @property
    def previous_path(self) -> Path | None:
        return self.deploy_dir / RELEASES / self.previous if self.previous else None


class DeployDamaged(InputError):
    """The deploy folder's ``current`` or ``previous`` is not a symlink to ``releases/<id>`` (a release copied over
    the link, a link to elsewhere). ``current``: nothing can say which release is in force, so nothing runs and no
    install, rollback or health record is made until someone repairs it. ``previous``: the line runs ``current``
    (:attr:`Deployment.previous_damaged`), and health records are made, but no rollback, which points ``previous``
    at the release it leaves, nor an install over a folder or file there. ``what``: the damage; ``fix``: how to
    repair it (the message says both); ``link``: what a damaged symlink points at (None: a folder or a file is in
    its place), which an install replaces as it points ``previous`` at the release it replaces
    (:func:`install_bundle`): a link holds no data."""

    def __init__(self, what: str, fix: str, link: str | None = None):
        super().__init__(f"{what}; {fix}")
        self.what, self.fix, self.link = what, fix, link


def _link_target(deploy_dir: Path, name: str) -> str | None:
    p = deploy_dir / name
    if not p.is_symlink():
        if p.exists():
            kind = "a folder" if p.is_dir() else "a file"
            raise DeployDamaged(f"{p}: {kind}, not a symlink (a release copied over the link?); the deploy folder "
                                f"layout is {RELEASES}/<id> plus '{CURRENT}' and '{PREVIOUS}' symlinks",
                                "move it away and link a kept release in its place: "
                                f"mv {shlex.quote(str(p))} {shlex.quote(f'{p}.damaged')} && ln -s "
                                f"{_relink(deploy_dir, name)}")
        return None
    target = Path(os.readlink(p))
    if target.is_absolute() or len(target.parts) != 2 or target.parts[0] != RELEASES:
        raise DeployDamaged(f"{p}: points at {target}; expected {RELEASES}/<id>",
                            f"point it at a kept release: ln -sfn {_relink(deploy_dir, name)}", link=str(target))
    return target.parts[1]


def _relink(deploy_dir: Path, name: str) -> str:
    """``releases/<id> <deploy>/<name>`` and what <id> is, for the ``ln`` that repairs the damaged link ``name``:
    the release deploy.json records there when it is kept, else any kept one."""
    rid = _read_state(deploy_dir).get(name)
    if isinstance(rid, str) and "/" not in rid and (deploy_dir / RELEASES / rid / "manifest.json").is_file():
        return (f"{RELEASES}/{shlex.quote(rid)} {shlex.quote(str(deploy_dir / name))} ({rid}: the release "
                f"deploy.json records as '{name}')")
    return (f"{RELEASES}/<id> {shlex.quote(str(deploy_dir / name))} (<id>: a kept release, ls "
            f"{shlex.quote(str(deploy_dir / RELEASES))})")


def _point(deploy_dir: Path, name: str, release: str) -> None:
    """Point ``deploy_dir/name`` at ``releases/<release>`` atomically (symlink + rename)."""
    tmp = deploy_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.symlink(f"{RELEASES}/{release}", tmp)
        os.replace(tmp, deploy_dir / name)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):   # named as the link it was to update, not its temporary name
            raise OSError(exc.errno, exc.strerror, str(deploy_dir / name)) from exc
        raise
    atomic._fsync_dir(deploy_dir)


def _read_state(deploy_dir: Path) -> dict:
    p = deploy_dir / STATE
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text("utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        log.warning("%s: unreadable; treating the deployment's health as pending", p)
        return {}


def _write_state(deploy_dir: Path, state: dict, event: str, **detail) -> None:
    hist = list(state.get("history", []))[-(HISTORY - 1):]
    hist.append({"time": now_iso(), "event": event, **detail})
    state = {**state, "schema_version": 1, "history": hist}
    atomic.write_json(deploy_dir / STATE, state)


def deployment(deploy_dir: str | os.PathLike, must_exist: bool = False) -> Deployment:
    """What the deploy folder holds now. The links are the truth; ``deploy.json`` adds the health (a
    switch whose record was cut by a power loss reads as "pending") and, for a switch a power cut
    interrupted after ``current`` moved, its ``previous`` (:func:`_switch`). ``must_exist``: a missing folder is
    an InputError (for ``bundle status``), not an empty deployment. A damaged ``current`` link raises
    :class:`DeployDamaged`; a damaged ``previous`` one does not: it is kept in ``previous_damaged``, ``previous``
    None."""
    d = Path(deploy_dir)
    if must_exist and not d.is_dir():
        raise InputError(f"--deploy {d}: {'not a folder' if d.exists() else 'no such folder'}; expected a "
                         f"deploy folder ({RELEASES}/, '{CURRENT}' and '{PREVIOUS}' links; made by 'edge-ad "
                         "bundle install')")
    if must_exist and not (d / RELEASES).is_dir() and not (d / CURRENT).is_symlink():
        what = "a bundle folder (use it as model.bundle, or install it into a deploy folder with 'edge-ad bundle " \
               "install')" if (d / "manifest.json").is_file() else "no releases/ and no 'current' link in it"
        raise InputError(f"--deploy {d}: not a deploy folder: {what}; a deploy folder is made by 'edge-ad bundle "
                         "install'")
    cur = _link_target(d, CURRENT)
    try:
        prev, prev_damaged = _link_target(d, PREVIOUS), None
    except DeployDamaged as exc:   # the line can run 'current'; what rewrites 'previous' refuses (Deployment)
        prev, prev_damaged = None, exc
    st = _read_state(d)
    pending = st.get("pending")
    if cur is not None and isinstance(pending, dict) and pending.get("release") == cur:
        # a switch a power cut interrupted after 'current' moved: 'previous' may not have followed yet
        was = pending.get("previous")
        prev = was if was is None or isinstance(was, str) and "/" not in was else prev
        if prev is not None and prev_damaged is not None and prev_damaged.link is not None:
            prev_damaged = None   # a damaged link an install was replacing (_install): the record says what it is now
    health = st.get("health", "none") if st.get("current") == cur else ("pending" if cur else "none")
    if health == ROLLED_BACK or _cut_short(st, cur) is not None and pending.get("health") == ROLLED_BACK:
        # switched in by a rollback (its record cut short, or written by an older edge-ad, which recorded
        # "rolled_back"): the release's own health, never a new release to watch
        health = release_health(_history(st, cur), cur)
    return Deployment(d, cur, prev, health, {k: v for k, v in st.items() if k != "history"},
                      previous_damaged=prev_damaged)


def previous_problem(dep: Deployment) -> DeployDamaged | None:
    """Why ``dep``'s ``previous`` cannot be rolled back to though the line runs ``current`` (``what``) and its
    repair (``fix``), for a WARNING: the link damaged (:attr:`Deployment.previous_damaged`) or the release it points
    at gone (deleted by hand). None when there is nothing to say (no previous release is one)."""
    d = dep.deploy_dir
    if dep.previous_damaged is not None:
        return dep.previous_damaged
    if dep.previous is None or dep.previous == dep.current or (d / RELEASES / dep.previous).is_dir():
        return None
    return DeployDamaged(f"{d / PREVIOUS}: points at {RELEASES}/{dep.previous}, which is "
                         f"{release_problem(d, dep.previous)}", f"point it at a kept release: ln -sfn "
                                                                f"{_relink(d, PREVIOUS)}")


def previous_blocks(dep: Deployment) -> str:
    """What a damaged ``previous`` of ``dep`` keeps from being made, for its warning (the line's, doctor's and
    ``bundle status``'s, which all say it so): every rollback and every install (they point ``previous`` at the
    release they replace) when a folder or file is in its place; else (a damaged symlink, one pointing at a release
    gone, as :func:`previous_problem` finds, or at one that cannot be opened) only the rollbacks to ``previous``: a
    plain ``bundle rollback``, the health check's and update_model's after a failed swap; a ``rollback --to`` and an
    install replace the link."""
    which = "(edge-ad bundle rollback, the health check's, update_model's after a failed swap)"
    if dep.previous_damaged is not None and dep.previous_damaged.link is None:
        return (f"no rollback {which} and no install (they point 'previous' at the release they replace) can be made "
                "until it is repaired")
    return (f"no rollback to 'previous' {which} can be made until it is repaired; 'edge-ad bundle rollback --to "
            "ID' can, and it or the next install repairs it (they point 'previous' at the release they replace)")


ROLLED_BACK = "rolled_back"   # the health a rollback's pending record gives the release it switches in (_switch)


def _by_hand(ev: dict) -> bool:
    """A ``rolled_back`` record of deploy.json's history made by hand (``edge-ad bundle rollback``): it says
    nothing of the release left. One by an older edge-ad named that release ``failed`` too, with the command in
    its reason."""
    return "by" in ev or str(ev.get("reason", "")).startswith("edge-ad bundle rollback")


def release_health(history, release: str | None) -> str:
    """The health of ``release`` by the last verdict on it in deploy.json's ``history``: "ok" (its health check
    passed), "failed" (rolled back from because it failed its health check or the line could not open it) or
    "unchecked" (no verdict recorded: never watched, rolled back from by hand before its verdict, or older than
    the history kept). A rollback by hand is no verdict on the release it leaves."""
    ev = _last_verdict(history, release)
    return "unchecked" if ev is None else "ok" if ev["event"] == "health_ok" else "failed"


def _last_verdict(history, release: str | None) -> dict | None:
    """The record of the last verdict on ``release`` in deploy.json's ``history`` (:func:`release_health`): its
    ``health_ok``, or the rollback made because it failed; None when there is none."""
    for ev in reversed(history if isinstance(history, list) else []):
        if not isinstance(ev, dict):
            continue
        if ev.get("event") == "health_ok" and ev.get("release") == release:
            return ev
        if ev.get("event") == ROLLED_BACK and ev.get("failed") == release and not _by_hand(ev):
            return ev
    return None


def failed_verdict(deploy_dir: str | os.PathLike, release: str | None) -> str | None:
    """Why ``release`` was judged wrong, in words, when it was: ``failed its health check (REASON, judged at TIME)``
    for the verdict kept in it (:data:`HEALTH_FAILED`, as :func:`releases` reads it), else ``failed (REASON; rolled
    back from at TIME)`` when the last verdict deploy.json's history records on it is a rollback because it failed
    (its health check, or the line could not open it). None when neither: the line may inspect with it. A plain
    ``edge-ad bundle rollback`` (or ``--to``) refuses to put such a release back without ``force``
    (:func:`rollback_model`), and ``edge-ad run`` warns when it starts or reloads on one."""
    d = Path(deploy_dir)
    m = failed_marker(d, release)
    if m is not None and m.is_file():
        try:
            was = json.loads(m.read_text("utf-8"))
            return f"failed its health check ({was['reason']}, judged at {was['time']})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"failed its health check ({m}: an unreadable record)"
    try:
        current = deployment(d).current   # a rollback cut short: its pending record is the last verdict
    except DeployDamaged:
        current = None
    ev = _last_verdict(_history(_read_state(d), current), release)
    if ev is None or ev["event"] == "health_ok":
        return None
    return f"failed ({ev.get('reason', 'no reason recorded')}; rolled back from at {ev.get('time', 'an unknown time')})"


def last_rollback(dep: Deployment) -> dict | None:
    """How the release in force came back, when a rollback switched it in (deploy.json's record of it, also one
    cut short): ``from`` (the release left), ``failed`` (whether that one failed: a health check, or the line
    could not open it; else it was a rollback by hand), ``by`` (who made one by hand), ``reason`` and ``time``
    (None when its record was cut short). None when an install switched it in.

    ``time`` is the rollback's history record's: an older edge-ad's rollback left ``switched_at`` at the install
    before it (and when the history no longer holds it, such a record's time is not known: None). The switch
    the history last records for the release in force also tells an install that an older edge-ad made after a
    rollback (it kept the rollback's ``rolled_back_from`` in deploy.json) from the rollback itself."""
    st = dep.detail
    rec = _cut_short(st, dep.current)
    if rec is not None:
        if rec.get("health") != ROLLED_BACK:
            return None
        time = None
    elif st.get("current") == dep.current and "rolled_back_from" in st:
        rec = st
        switch = next((ev for ev in reversed(_read_state(dep.deploy_dir).get("history") or [])
                       if isinstance(ev, dict) and ev.get("release") == dep.current
                       and ev.get("event") in ("switched", ROLLED_BACK)), None)
        if switch is None:      # older than the history kept
            time = None if st.get("health") == ROLLED_BACK else st.get("switched_at")
        elif switch["event"] != ROLLED_BACK:
            return None
        else:
            time = switch.get("time")
    else:
        return None
    return {"from": rec.get("rolled_back_from", rec.get("previous")), "failed": not _by_hand(rec),
            "by": rec.get("by"), "reason": rec.get("reason"), "time": time}


def _history(state: dict, current: str | None) -> list:
    """deploy.json's history, with the record of the switch to ``current`` when it was cut short (its pending
    record, :func:`_cut_event`)."""
    hist = state.get("history")
    hist = hist if isinstance(hist, list) else []
    cut = _cut_short(state, current)
    return hist if cut is None else [*hist, _cut_event(cut)]


def _cut_event(cut: dict) -> dict:
    """The history record of a switch whose own was cut short, from its pending record (:func:`_switch`)."""
    return {"event": ROLLED_BACK if cut.get("health") == ROLLED_BACK else "switched", "cut_short": True,
            **{k: v for k, v in cut.items() if k != "health"}}


def _cut_short(state: dict, current: str | None) -> dict | None:
    """The pending record of a switch to ``current`` whose final record in deploy.json was never written (a
    power cut or a full disk after 'current' moved: :func:`_switch`); None when there is none."""
    pending = state.get("pending")
    if current is None or not isinstance(pending, dict) or pending.get("release") != current:
        return None
    return pending if state.get("current") != current else None


def current_path(deploy_dir: str | os.PathLike) -> Path:
    """The resolved bundle folder in force (open this, not the ``current`` link)."""
    if Path(deploy_dir).exists() and not Path(deploy_dir).is_dir():
        raise InputError(f"{deploy_dir}: not a folder; expected a deploy folder ({RELEASES}/, '{CURRENT}' and "
                         f"'{PREVIOUS}' links; made by 'edge-ad bundle install')")
    dep = deployment(deploy_dir)
    if dep.current_path is None:
        raise InputError(f"{deploy_dir}: no '{CURRENT}' link; install a bundle first ('edge-ad bundle install')")
    return dep.current_path


# ----------------------------------------------------------------------------- golden set
@dataclass(frozen=True)
class GoldenLimits:
    min_accuracy: float = 0.9        # labelled images, when there is no running bundle to compare with
    max_extra_errors: int = 0        # labelled: candidate errors <= running bundle's errors + this
    max_auroc_drop: float = 0.02     # labelled, both classes: AUROC >= running bundle's - this
    min_agreement: float = 0.95      # unlabelled: share of decisions equal to the running bundle's


def _golden_root(folder: Path) -> Path:
    """Where a golden set's labelled folders are: ``test/`` when present (an MVTec category), else itself."""
    return folder / "test" if (folder / "test").is_dir() else folder


def golden_images(golden_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """(image, label) pairs: ``good/`` or ``ok/`` -> 0, any other folder -> 1, images directly in the
    folder -> -1 (unlabelled: compared with the running bundle). ``test/`` is entered when present."""
    root = Path(golden_dir)
    if not root.is_dir():
        raise InputError(f"{root}: golden folder not found")
    root = _golden_root(root)
    items = [(p, -1) for p in list_images(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = 0 if sub.name.lower() in NORMAL_DIRS else 1
        items += [(p, label) for p in list_images(sub)]
    if not items:
        raise InputError(f"{root}: no golden images ({', '.join(IMAGE_EXTS)}) in it or in its sub-folders")
    return items


def _decide(bundle: Bundle, frames: list[np.ndarray], backend: str, precision: str | None,
            device: str | None = None, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from ..inspector import Inspector
    from ..runtime.backends import open_backend

    be = open_backend(bundle, backend, precision, device)
    try:
        insp = Inspector(bundle, be)
        scores, ng = [], []
        for i in range(0, len(frames), chunk):
            s = insp.inspect(frames[i:i + chunk])
            scores.append(s.scores)
            ng.append(s.ng)
    finally:
        be.close()
    return np.concatenate(scores).astype(np.float64), np.concatenate(ng).astype(bool)


def run_as(backend: str, precision: str | None, device: str | None) -> str:
    """``backend B, precision P, device D`` for messages (empty settings said as what they mean)."""
    return f"backend {backend}, precision {precision or 'its active graph'}, device {device or 'auto'}"


def open_probe(backend: str = "auto", precision: str | None = None, device: str | None = None,
               opener: Callable[[Bundle], object] | None = None, line: bool = True) -> Callable[[Bundle], None]:
    """A ``probe`` for :func:`install_bundle`: open the candidate as a line with these model settings opens
    it, then close it; what cannot be opened so is refused before ``current`` moves. ``opener``: how the
    line opens a bundle (the runtime's, with its thread options); it returns an Inspector. ``line`` false:
    ``precision`` is not the line's but one a check asks for (:func:`check_archive`), and the refusal says so."""
    def probe(bundle: Bundle) -> None:
        from ..inspector import Inspector

        try:
            if opener is not None:
                opener(bundle).backend.close()
            else:
                Inspector.open(bundle, backend, precision, device).backend.close()
        except EdgeADError as exc:
            how = "as the line runs it" if line else "as the check asks"
            raise InputError(f"the new model cannot be opened {how} ({run_as(backend, precision, device)}): "
                             f"{exc}; update refused") from exc
    return probe


def _has_engines(bundle: Bundle) -> bool:
    d = bundle.engines_dir
    return d.is_dir() and any(p.suffix == ".engine" for p in d.iterdir())


def _tensorrt_here() -> bool:
    try:
        from ..runtime.backends.tensorrt import import_tensorrt

        import_tensorrt()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no TensorRT here"
        return False


def engine_needed(backend: str, device: str | None, running: Bundle | None) -> bool:
    """Whether a new release must get a TensorRT engine built on this device before the line can run it:
    ``backend`` tensorrt, or auto on a GPU (``device`` empty or cuda) when TensorRT is here and the
    running release has engines (auto would otherwise fall back to ONNX Runtime)."""
    if backend == "tensorrt":
        return True
    return _auto_on_gpu(backend, device) and running is not None and _has_engines(running) and _tensorrt_here()


def _auto_on_gpu(backend: str, device: str | None) -> bool:
    """``backend`` auto with ``device`` empty or cuda: such a line runs TensorRT where it is installed."""
    return backend == "auto" and (device is None or device.startswith("cuda"))


def engine_images(calib_dir: str | os.PathLike | None, golden_dir: str | os.PathLike | None) -> Path | None:
    """The normal images a new release's engine is calibrated and guarded on: ``calib_dir`` (``--calib``),
    else the golden set's ``good/`` (or ``ok/``) folder; None when neither (the candidate's recorded
    training data is then the last resort, see :func:`build_line_engine`)."""
    if calib_dir is not None:   # checked by _install on every line
        return Path(calib_dir)
    if golden_dir is None or not Path(golden_dir).is_dir():
        return None
    root = _golden_root(Path(golden_dir))
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in NORMAL_DIRS):
        if list_images(sub):
            return sub
    return None


def build_line_engine(candidate: Bundle, images: Path | None, precision: str | None, device: str | None,
                      progress: bool = False, limits=None) -> dict:
    """Build and guard the TensorRT engine of ``candidate`` (in its folder: ``engines/``) with
    :func:`edge_ad.compile.tensorrt.compile_bundle`, in ``precision`` (the line's ``model.precision``; when it
    is empty, ``best``, as ``edge-ad compile --precision best`` on the device: INT8 when the candidate has an
    INT8 graph and its engine passes the guard, else FP16, else FP32; the candidate's active ONNX precision,
    FP32 on a bundle never quantized, would make a slow FP32 engine), on the line's ``device`` (``cuda:N``;
    empty: device 0), calibrated and guarded on ``images`` (else the candidate's recorded training data, when it
    is on this machine), within the guard's ``limits`` (None: its defaults). Raises InputError / GuardFailure /
    RuntimeFailure naming what failed; the caller switches nothing in then. ``bundle install``, ``update_model``
    and ``calibrate --adapt`` build with it, when :func:`engine_needed` says so."""
    from ..compile.tensorrt import _say, compile_bundle
    from ..runtime.backends.tensorrt import parse_device

    if images is None:
        data = (candidate.manifest.get("training") or {}).get("data")
        if not data or not Path(data).is_dir():
            raise InputError("the line runs TensorRT, so the new release needs an engine built and guarded on this "
                             "device from normal images of the part, and none were found: give them with --calib "
                             "DIR ('edge-ad bundle install'), or put them in the golden set's good/ folder; "
                             "update refused")
    precision = precision or "best"   # what step 6 of jetson/README.md builds: the precision run then picks
    said = "engine (best: INT8, else FP16, else FP32, the first to pass its guard)" if precision == "best" else \
        f"{precision} engine"
    _say(progress, f"the line runs TensorRT: building and guarding the new release's {said} on this "
                   f"device ({'normal images: ' + str(images) if images else 'its recorded training data'})")
    what = f"the new release's {'' if precision == 'best' else precision + ' '}TensorRT engine"
    try:
        return compile_bundle(candidate, precision, device=parse_device(device), calib_dir=images, limits=limits,
                              progress=progress)
    except GuardFailure as exc:
        raise GuardFailure(f"{what} failed its accuracy guard, the running model is unchanged: {exc}") from exc
    except (InputError, RuntimeFailure) as exc:
        raise type(exc)(f"{what} could not be built on this device: {exc}; update refused") from exc


MISJUDGED_KEPT = 100   # misjudged golden images a report lists (n_misjudged counts them all)
MISJUDGED_SAID = 5     # ... and a failure's message names
MISJUDGED_REPLIED = 20   # ... and a failed MQTT reply's error.golden lists (GoldenFailure.reply_fields)


class GoldenFailure(GuardFailure):
    """A candidate failed the golden-set check: the message says why and names the images it misjudged
    (:func:`golden_failure`); ``report`` is :func:`check_golden`'s."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report

    def reply_fields(self) -> dict:
        """``golden`` for a failed command's reply (update_model): the report's ``failures``, ``n_images``,
        ``n_misjudged`` and its first :data:`MISJUDGED_REPLIED` ``misjudged`` entries, which the message names
        in words (the first :data:`MISJUDGED_SAID`)."""
        r = self.report
        bad = r.get("misjudged") or []
        return {"golden": {"failures": list(r["failures"]), "n_images": r["n_images"],
                           "n_misjudged": r.get("n_misjudged", len(bad)), "misjudged": bad[:MISJUDGED_REPLIED]}}


def golden_failure(report: dict, what: str = "golden-set check failed") -> GoldenFailure:
    """The error for a failed :func:`check_golden` ``report``: ``WHAT, the running model is unchanged: FAILURES;
    misjudged N of M golden images: IMAGE: NG expected, judged OK (score S <= threshold T); ...`` (the first
    :data:`MISJUDGED_SAID`, then how many more)."""
    bad = report.get("misjudged") or []
    n = report.get("n_misjudged", len(bad))
    said = ""
    if n:
        more = n - min(n, MISJUDGED_SAID)
        said = (f"; misjudged {n} of {report['n_images']} golden images: "
                + "; ".join(_misjudged_text(m) for m in bad[:MISJUDGED_SAID]) + (f"; and {more} more" if more else ""))
    return GoldenFailure(f"{what}, the running model is unchanged: " + "; ".join(report["failures"]) + said, report)


def _misjudged_text(m: dict) -> str:
    """``IMAGE: NG expected, judged OK (score S <= threshold T)`` for an entry of a report's ``misjudged``."""
    by = "" if m["expected_from"] == "label" else " (the running model's decision: an unlabelled image)"
    score = m["score"]
    rel = "not a number, never OK:" if score is None else ">" if m["judged"] == "NG" else "<="
    return (f"{m['image']}: {m['expected']} expected{by}, judged {m['judged']} (score "
            f"{'' if score is None else f'{score:.6g} '}{rel} threshold {m['threshold']:.6g})")


def check_golden(candidate: Bundle, golden_dir: str | os.PathLike, running: Bundle | None = None,
                 backend: str = "auto", precision: str | None = None,
                 limits: GoldenLimits | None = None, device: str | None = None) -> dict:
    """Judge ``candidate`` on the golden set (against ``running`` when given); a report with
    ``passed`` and ``failures``, and ``misjudged``: the images the candidate decides otherwise than their
    label (``good/`` OK, other folders NG) or, unlabelled, than the running model (``image``, ``expected``,
    ``expected_from`` "label" or "running model", ``judged``, ``score``: None when not a number, ``threshold``:
    the candidate's calibration's), the first :data:`MISJUDGED_KEPT`, ``n_misjudged`` counting them all. Both run
    on ``backend`` / ``precision`` / ``device``: give the line's (``model.*``), so that the check runs what will
    run."""
    from ..compile.guard import auroc

    limits = limits or GoldenLimits()
    items = golden_images(golden_dir)
    labels = np.array([lab for _, lab in items])
    frames = [load_image(p) for p, _ in items]
    running_error = None
    if running is not None:
        try:
            r_s, r_ng = _decide(running, frames, backend, precision, device)
        except EdgeADError as exc:   # a damaged running release must not block the update that replaces it
            running_error = f"{running.path}: {exc}"
            log.warning("the running release cannot be judged on the golden set (%s); the candidate is judged "
                        "on its own", running_error)
            running = None
    if running is None and not (labels >= 0).any():
        raise InputError(f"{golden_dir}: only unlabelled golden images, and no running bundle to compare the "
                         "candidate with; put normal images in good/ and defective ones in other folders")
    try:
        c_s, c_ng = _decide(candidate, frames, backend, precision, device)
    except InputError as exc:   # e.g. the line runs int8 and the candidate has no int8 graph
        raise InputError(f"the candidate cannot run as the line runs it ({run_as(backend, precision, device)}): "
                         f"{exc}; update refused") from exc
    report: dict = {"golden_dir": str(golden_dir), "n_images": len(items),
                    "n_labelled": int((labels >= 0).sum()), "limits": asdict(limits)}
    if running_error:
        report["running_error"] = running_error
    failures = []
    bad = ~np.isfinite(c_s)
    if bad.any():   # at run time such a frame gets no decision: never a model to switch in
        report["non_finite"] = int(bad.sum())
        failures.append(f"the candidate's score is not a finite number (NaN or inf) on {int(bad.sum())} of "
                        f"{len(items)} golden images, e.g. {items[int(np.argmax(bad))][0]}")
    lab = labels >= 0
    threshold = float(candidate.calibration().threshold)
    expected = np.where(lab, labels == 1, r_ng if running is not None else c_ng)   # unlabelled: the running model's
    wrong = [i for i in range(len(items)) if c_ng[i] != expected[i] and (lab[i] or running is not None)]
    report["n_misjudged"] = len(wrong)
    report["misjudged"] = [
        {"image": str(items[i][0]), "expected": "NG" if expected[i] else "OK",
         "expected_from": "label" if lab[i] else "running model", "judged": "NG" if c_ng[i] else "OK",
         "score": float(c_s[i]) if np.isfinite(c_s[i]) else None, "threshold": threshold}
        for i in wrong[:MISJUDGED_KEPT]]
    if lab.any():
        y = labels[lab] == 1
        c_err = int((c_ng[lab] != y).sum())
        report["candidate"] = {"errors": c_err, "accuracy": 1 - c_err / int(lab.sum()),
                               "missed": int((~c_ng[lab] & y).sum()), "false_alarms": int((c_ng[lab] & ~y).sum())}
        both = y.any() and (~y).any()
        if both:
            report["candidate"]["auroc"] = auroc(c_s[lab], y.astype(int))
        if running is not None:
            r_err = int((r_ng[lab] != y).sum())
            report["running"] = {"errors": r_err, "accuracy": 1 - r_err / int(lab.sum()),
                                 "missed": int((~r_ng[lab] & y).sum()), "false_alarms": int((r_ng[lab] & ~y).sum())}
            if c_err > r_err + limits.max_extra_errors:
                failures.append(f"{c_err} wrong decisions on {int(lab.sum())} labelled golden images, the running "
                                f"model makes {r_err} (allowed extra: {limits.max_extra_errors})")
            if both:
                report["running"]["auroc"] = auroc(r_s[lab], y.astype(int))
                drop = report["running"]["auroc"] - report["candidate"]["auroc"]
                if drop > limits.max_auroc_drop:
                    failures.append(f"golden AUROC {report['candidate']['auroc']:.4f} is {drop:.4f} below the "
                                    f"running model's {report['running']['auroc']:.4f} (limit {limits.max_auroc_drop})")
        elif report["candidate"]["accuracy"] < limits.min_accuracy:
            failures.append(f"accuracy {report['candidate']['accuracy']:.3f} on {int(lab.sum())} labelled golden "
                            f"images < {limits.min_accuracy}")
    unl = ~lab
    if unl.any() and running is not None:
        agree = float(np.mean(c_ng[unl] == r_ng[unl]))
        report["agreement"] = {"n": int(unl.sum()), "value": agree}
        if agree < limits.min_agreement:
            failures.append(f"decisions agree with the running model's on {agree:.3f} of {int(unl.sum())} "
                            f"unlabelled golden images < {limits.min_agreement}")
    report["passed"] = not failures
    report["failures"] = failures
    return report


# ----------------------------------------------------------------------------- install
@dataclass(frozen=True)
class InstallResult:
    path: Path                   # the new release folder (open this)
    release: str
    previous: str | None
    previous_path: Path | None
    package: PackageInfo
    golden: dict | None          # check_golden's report (None when the check was skipped)
    pruned: tuple[str, ...] = ()
    already_installed: bool = False   # the release in force was installed from the same files: nothing changed
    # why the install's record is incomplete ('previous' or deploy.json not written after 'current' moved: a full
    # disk); the install holds, deployment() reads it from the pending record (_switch_recorded)
    unrecorded: str | None = None
    # the 'previous' symlink was damaged (pointing outside releases/) and this install replaced it: what it pointed
    # at and what it points at now (also a WARNING in the log); None when it was not damaged
    replaced_previous: str | None = None

    def summary(self) -> dict:
        model_hash = self.package.index.get("bundle", {}).get("model_hash")
        if model_hash is None:   # a bundle folder (no archive index): the release's own manifest says it
            try:
                model_hash = Bundle.open(self.path).model_hash() or None
            except EdgeADError:
                pass
        return {"path": str(self.path), "release": self.release, "previous": self.previous,
                "model_hash": model_hash,
                "signed": self.package.signed, "signature_verified": self.package.verified,
                "golden": self.golden, "pruned": list(self.pruned), "already_installed": self.already_installed,
                "unrecorded": self.unrecorded, "replaced_previous": self.replaced_previous}


def _release_seq(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head[1:]) if head.startswith("r") and head[1:].isdigit() else -1


def _release_id(deploy_dir: Path, model_hash: str) -> str:
    """``r<seq>-<UTC time>-<model sha[:12]>``; the sequence number orders releases."""
    rel = deploy_dir / RELEASES
    seq = max((_release_seq(p.name) for p in rel.iterdir()), default=0) + 1 if rel.is_dir() else 1
    return f"r{max(seq, 1):04d}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{(model_hash or 'nohash')[:12]}"


def install_bundle(archive: str | os.PathLike, deploy_dir: str | os.PathLike,
                   golden_dir: str | os.PathLike | None = None, key=None, *,
                   require_signature: bool | None = None, require_golden: bool = True, backend: str = "auto",
                   precision: str | None = None, limits: GoldenLimits | None = None,
                   keep: int = 3, device: str | None = None,
                   probe: Callable[[Bundle], None] | None = None, calib_dir: str | os.PathLike | None = None,
                   progress: bool = False, baseline: dict | None = None) -> InstallResult:
    """Verify, validate and switch in a bundle archive (see the module doc). Raises InputError when the
    archive is refused and :class:`edge_ad.errors.GuardFailure` when the golden check fails; in both
    cases the running bundle and the links are untouched, as they are when an OSError (a full disk) is raised
    before ``current`` moved. Once it has moved the install holds: an OSError writing ``previous`` or the final record
    is one ERROR log, and :attr:`InstallResult.unrecorded` says why (:func:`_switch_recorded`). A damaged
    ``previous`` symlink is replaced by the switch, with a WARNING (:attr:`InstallResult.replaced_previous`); a
    folder or file in its place refuses the install (:class:`DeployDamaged`), nothing changed. ``archive`` may
    also be a bundle folder made on this device (an ``--adapt`` candidate): copied, verified against its
    manifest, no signature.

    ``key``: HMAC secret (bytes or file) or Ed25519 public key file; with a key an unsigned archive is
    refused (``require_signature`` overrides). ``golden_dir`` defaults to ``<deploy>/golden``; with no
    golden set the install is refused unless ``require_golden=False``. A failed install into a new deploy
    folder removes the folders it made. ``backend`` / ``precision`` / ``device``: what the golden check
    runs on (the line's). ``probe``: called with the verified candidate before the switch (the runtime
    opens it as the line will); what it raises refuses the update, nothing switched. On a TensorRT line
    (:func:`engine_needed`) the candidate's engine is built and guarded before the golden check and the
    probe (:func:`build_line_engine`, ``progress`` shown), on ``calib_dir`` else the golden set's normal
    images (:func:`engine_images`); a failed build or guard refuses the update. ``baseline``: the NG rate of the
    model the line runs now, ``{"ng_rate": R, "frames": N}`` (the runtime's update_model gives it), recorded in
    deploy.json with the switch, its pending record included, so that the health check after a restart judges the
    new release against it (:func:`recorded_baseline`).
    """
    d = Path(deploy_dir)
    made = []  # folders this install creates, deepest first: removed again when it fails
    p = d / RELEASES
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    d.mkdir(parents=True, exist_ok=True)
    (d / RELEASES).mkdir(exist_ok=True)
    try:
        with deploy_lock(d):
            return _install(archive, d, golden_dir, key, require_signature, require_golden, backend, precision,
                            limits, keep, device, probe, calib_dir, progress, baseline)
    except BaseException:
        for p in made:
            try:
                p.rmdir()  # only while empty: a folder something else wrote into stays
            except OSError:
                break
        raise


def golden_for(deploy_dir: str | os.PathLike, golden_dir, require_golden: bool = True) -> Path | None:
    """The golden set an install into ``deploy_dir`` checks on: ``golden_dir``, else ``<deploy>/golden``
    when it exists; none is refused unless ``require_golden`` is false: the check skipped on purpose
    (``--no-golden``), so ``<deploy>/golden`` is not taken then either, only a ``golden_dir`` given."""
    d = Path(deploy_dir)
    if golden_dir is None and require_golden and (d / GOLDEN).is_dir():
        golden_dir = d / GOLDEN
    if golden_dir is None and require_golden:
        raise InputError(f"no golden set: give --golden DIR or put images in {d / GOLDEN} (good/ and defect "
                         "folders); skip the check only on purpose (--no-golden)")
    return Path(golden_dir) if golden_dir is not None else None


def _install(archive, d: Path, golden_dir, key, require_signature, require_golden, backend, precision, limits,
             keep, device, probe, calib_dir, progress, baseline) -> InstallResult:
    dep = deployment(d)
    key_obj = load_key(key) if key is not None else None
    golden_dir = golden_for(d, golden_dir, require_golden)
    if calib_dir is not None and not Path(calib_dir).is_dir():   # on every line: a typo is not kept quiet
        raise InputError(f"--calib {calib_dir}: no such folder; expected a folder of normal images of the part "
                         "(or DIR/train/good) to build and guard the new release's TensorRT engine on")
    _clean_stale(d, dep)
    running = None
    if dep.current_path is not None and dep.current_path.is_dir():
        try:
            running = Bundle.open(dep.current_path)
        except EdgeADError as exc:   # damaged: the candidate is judged on its own (check_golden)
            log.warning("the running release %s cannot be opened (%s); the candidate is judged on its own",
                        dep.current_path, exc)
    build = engine_needed(backend, device, running)
    # --no-golden skips the check, not the normal images of <deploy>/golden an engine is built on
    images = engine_images(calib_dir, golden_dir if golden_dir is not None else d / GOLDEN) if build else None
    if Path(archive).is_dir():
        content = _content(Bundle.open(archive, verify=True))
        need = sum(Path(archive, rel).stat().st_size for rel in content)
    else:
        info = read_index(archive, key=key_obj, require_signature=require_signature)
        files = info.index["files"]
        content = {n[len(PREFIX) + 1:]: rec["sha256"] for n, rec in files.items()}
        need = sum(rec["bytes"] for rec in files.values())
    marker = dep.current_path / INSTALLED_FROM if dep.current_path is not None else None
    if marker is not None and _same_content(dep.current_path, content):
        older = not marker.is_file()   # installed by an older edge-ad: its manifest must be the archive's too
        same = not older or Path(archive).is_dir() and _same_model(Path(archive), dep.current_path)
        if not Path(archive).is_dir():   # the index matches: its files must too, or the archive is refused
            check = d / RELEASES / f".incoming-{uuid.uuid4().hex[:12]}"
            try:
                extract_archive(archive, check, key=key_obj, require_signature=require_signature)
                same = same or _same_model(check, dep.current_path)
            except InputError as exc:
                raise _named_in_archive(exc, check, Path(archive)) from exc.__cause__
            finally:
                shutil.rmtree(check, ignore_errors=True)
        if same:
            if older:   # recorded now, as an install records it
                b = Bundle.open(dep.current_path)
                atomic.write_json(marker, {"archive": content, "release": _content(b), "model": _model_content(b)})
            log.warning("%s: the release in force, %s, was installed from the same files; nothing installed",
                        archive, dep.current)
            return InstallResult(dep.current_path, dep.current, dep.previous, dep.previous_path,
                                 info if not Path(archive).is_dir() else PackageInfo({}, False, None, None, False),
                                 None, already_installed=True)
    damaged = dep.previous_damaged
    if damaged is not None and (damaged.link is None or dep.current is None):
        raise damaged   # a folder or file in its place (data?), or no release to point it at: the repair first
    free = shutil.disk_usage(d / RELEASES).free
    if need + SPACE_MARGIN > free:
        raise RuntimeFailure(f"{d / RELEASES}: {free / 2**20:.1f} MiB free, the bundle needs {need / 2**20:.1f} MiB "
                             f"(+{SPACE_MARGIN >> 20} MiB margin); free disk space; update not installed")
    staging = d / RELEASES / f".incoming-{uuid.uuid4().hex[:12]}"
    try:
        if Path(archive).is_dir():
            info = _stage_folder(Path(archive), staging, key_obj is not None or bool(require_signature))
        else:
            info = extract_archive(archive, staging, key=key_obj, require_signature=require_signature)
        candidate = Bundle.open(staging, verify=True)
        report = _judge(candidate, Path(archive), running, golden_dir, backend, precision, device, limits, build,
                        images, probe, progress)
        atomic.write_json(staging / INSTALLED_FROM, {"archive": content, "release": _content(candidate),
                                                     "model": _model_content(candidate)})
        # renamed in with it: until 'current' moves to it, it is no release (a kill in between: _clean_stale)
        atomic.write_json(staging / NOT_SWITCHED, {"time": now_iso(), "previous": dep.current})
        rid = _release_id(d, candidate.model_hash())
        final = d / RELEASES / rid
        os.rename(staging, final)
        atomic._fsync_dir(d / RELEASES)
    except InputError as exc:   # about the archive's content: named as in the archive, not the deleted staging
        shutil.rmtree(staging, ignore_errors=True)
        raise _named_in_archive(exc, staging, Path(archive)) from exc.__cause__
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    said = {BASELINE: baseline} if baseline else {}   # the old model's NG rate, for a restart before the verdict
    try:
        unrecorded = _switch_recorded(d, rid, dep.current, "pending", f"installed {rid} (previous {dep.current})",
                                      "switched", {"switched_at": now_iso(), **said},
                                      {"previous": dep.current,
                                       "golden_passed": None if report is None else report["passed"], **said})
    except OSError:   # before 'current' moved (a full disk): nothing switched, and the new release is not kept
        shutil.rmtree(final, ignore_errors=True)
        raise
    replaced = _replaced_damaged(d, damaged, dep.current, "install", "replaced") if damaged is not None else None
    try:
        pruned = prune_releases(d, keep)
    except OSError as exc:   # the install holds: the next one prunes them
        log.warning("%s: old releases not pruned (%s); the next install prunes them", d, os_error_text(exc))
        pruned = []
    if unrecorded is None:
        log.info("installed %s (previous %s)", rid, dep.current)
    return InstallResult(final, rid, dep.current, dep.current_path, info, report, tuple(pruned),
                         unrecorded=unrecorded, replaced_previous=replaced)


def _judge(candidate: Bundle, archive: Path, running: Bundle | None, golden_dir: Path | None, backend: str,
           precision: str | None, device: str | None, limits: GoldenLimits | None, build: bool,
           images: Path | None, probe: Callable[[Bundle], None] | None, progress: bool,
           line: bool = True, check_only: bool = False) -> dict | None:
    """What an install checks of the verified ``candidate`` before the switch (and :func:`check_archive` of one
    it only checks): its active graph and the graph of ``precision``, its TensorRT engine when ``build`` (built and
    guarded on ``images``: :func:`build_line_engine`), the golden set (a failed check raises, unless
    ``check_only``: the report says it), then ``probe``. ``line``: ``precision`` is the line's."""
    try:  # an archive of a bundle without its graph (packed by an older edge-ad) cannot inspect
        candidate.check_graph(verify=False)
    except InputError:
        raise InputError(f"{archive}: the bundle has no active graph {candidate.active_graph} (missing, or "
                         "not recorded in its manifest.json), so it cannot inspect; run 'edge-ad export' on "
                         "it and pack it again; update refused") from None
    require_precision(candidate, precision, backend, device, line)
    if build:   # before the golden check and the probe, which run the line's backend
        build_line_engine(candidate, images, precision, device, progress)
    report = None
    if golden_dir is not None:
        report = check_golden(candidate, golden_dir, running, backend=backend, precision=precision,
                              limits=limits, device=device)
        if not check_only and not report["passed"]:
            raise golden_failure(report)
    if probe is not None:
        probe(candidate)
    return report


def require_precision(candidate: Bundle, precision: str | None, backend: str = "auto", device: str | None = None,
                      line: bool = True) -> None:
    """Refuse, before anything runs it, a ``candidate`` that has no graph ``precision`` could run from (an int8
    check of a bundle never quantized said the new model cannot be opened "as the line runs it", naming a file
    in a folder deleted since): INT8 needs ``model.int8.onnx`` (or the CPU form ``model.int8-u8.onnx``), FP16
    ``model.fp16.onnx`` (or, where TensorRT builds the engine, ``model.onnx``), FP32 ``model.onnx``; recorded in
    the manifest. ``line``: ``precision`` is the one the line runs, else one a check asked for."""
    from ..runtime.backends import CPU_INT8_FILE, GRAPH_FILES, PRECISIONS

    if precision not in PRECISIONS:   # None: the active graph (checked apart); an unknown name: open_backend's
        return
    recorded = candidate.manifest.get("files", {})
    can = {GRAPH_FILES[precision]}
    if precision == "int8":
        can.add(CPU_INT8_FILE)
    elif precision == "fp16" and (backend == "tensorrt" or _auto_on_gpu(backend, device) and _tensorrt_here()):
        can.add(GRAPH_FILES["fp32"])   # a weakly typed FP16 engine
    if any(name in recorded for name in can):
        return
    has = ", ".join(p for p in PRECISIONS if GRAPH_FILES[p] in recorded or p == "int8" and CPU_INT8_FILE in recorded)
    make = f"{GRAPH_HINTS[GRAPH_FILES[precision]]} on the bundle before packing it"
    what = (f"and the line runs {precision} (model.precision): {make} (it has {has or 'none'})" if line else
            f"to check: {make}, or ask for a precision it has: {has or 'none'}")
    raise InputError(f"{candidate.path} has no {precision} graph ({GRAPH_FILES[precision]}) {what}; update refused")


def check_archive(archive: str | os.PathLike, work_dir: str | os.PathLike, golden_dir: Path | None,
                  running: Bundle | None, key=None, *, backend: str = "auto", precision: str | None = None,
                  device: str | None = None, build: bool = False, probe: Callable[[Bundle], None] | None = None,
                  line: bool = True) -> tuple[PackageInfo, str, dict | None]:
    """Check a bundle archive without installing it (the MQTT ``update_model`` with ``activate`` false): extract
    and verify it in a temporary folder under ``work_dir``, then judge it as an install does (:func:`_judge`: the
    TensorRT engine when ``build``, the golden set, whose report says a failure instead of raising, then
    ``probe``); ``line``: ``precision`` is the line's, else one the check asks for. Returns the archive's
    signature info, its model hash (taken while the folder is there: a Gaussian bundle's covers the statistics
    its calibration names) and the golden report (None without a golden set). An error about the archive's
    content names it (``ARCHIVE: bundle/FILE``), not the temporary folder, which is always removed."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".check-", dir=work_dir))
    staging = tmp / PREFIX
    try:
        info = extract_archive(archive, staging, key=key)
        candidate = Bundle.open(staging, verify=True)
        model_hash = candidate.model_hash()
        images = engine_images(None, golden_dir) if build else None
        report = _judge(candidate, Path(archive), running, golden_dir, backend, precision, device, None, build,
                        images, probe, False, line=line, check_only=True)
    except InputError as exc:
        raise _named_in_archive(exc, staging, Path(archive)) from exc.__cause__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, model_hash, report


def _replaced_damaged(d: Path, damaged: DeployDamaged, previous: str, by: str, left: str) -> str | None:
    """After the switch of an install or a rollback --to (``by``) over a damaged ``previous`` symlink
    (``damaged``): what to say (a WARNING, logged here) when the link now points at ``previous``, the release
    ``left`` (replaced, or left); None when it does not (not written: a full disk, the ``unrecorded`` of the
    result says so, and deploy.json's pending record names ``previous``)."""
    try:
        now = _link_target(d, PREVIOUS)
    except DeployDamaged:
        return None
    if now != previous:
        return None
    said = (f"{d / PREVIOUS} was damaged (it pointed at {damaged.link}, not {RELEASES}/<id>); the {by} replaced "
            f"it: it points at {RELEASES}/{previous}, the release {left}")
    log.warning("%s", said)
    return said


SPACE_MARGIN = 1 << 20


def _switch(d: Path, to: str, previous: str | None, health: str = "pending", detail: dict | None = None) -> None:
    """Point ``current`` at ``to``, then ``previous`` at ``previous``, after recording both as ``pending`` in
    deploy.json, with the ``health`` the switch gives ``to`` ("pending" for an install, :data:`ROLLED_BACK` for a
    rollback) and the ``detail`` of its history record: a power cut (or a full disk) between the two link
    updates, or before the caller's state write, leaves ``current`` moved and ``previous`` or the record not,
    and :func:`deployment` takes ``previous`` and the health from that record (``bundle status`` the detail).
    The caller's next state write drops it."""
    state = _read_state(d)
    cut = _cut_short(state, _link_target(d, CURRENT))
    if cut is not None:   # the last switch's record was cut short: its history record is kept now
        state["history"] = [*(state.get("history") if isinstance(state.get("history"), list) else []),
                            {"time": now_iso(), **_cut_event(cut)}]
    state["pending"] = {**(detail or {}), "release": to, "previous": previous, "health": health}
    _write_state(d, state, "switch_started", release=to, previous=previous)
    _point(d, CURRENT, to)
    # an install's new release is one now (NOT_SWITCHED), and so is the one a link named before (a switch cut
    # short after 'current' moved left its mark: a rollback that keeps it as 'previous' must not leave it marked)
    for rid in (to, previous):
        if rid is not None:
            try:
                (d / RELEASES / rid / NOT_SWITCHED).unlink(missing_ok=True)
            except OSError:
                pass
    if previous is not None:
        _point(d, PREVIOUS, previous)


def _switch_recorded(d: Path, to: str, previous: str | None, health: str, done: str, event: str, fields: dict,
                     detail: dict) -> str | None:
    """:func:`_switch` to ``to``, then its final record in deploy.json (``health``, ``fields``; the history
    ``event`` with ``detail``): an install's or a rollback's switch. An OSError (a full disk) before ``current``
    moved is raised: nothing changed, but for a pending record :func:`deployment` ignores. One after it (the
    ``previous`` link or the final record not written) is one ERROR log (``done``: what happened) and the
    switch holds: :func:`deployment` reads it from the pending record until the next install or rollback
    completes the record. Returns why the record is incomplete (:attr:`Deployment.unrecorded`), or None. A
    ``health`` in ``fields`` is the one recorded at the end (a rollback's: the release's own, :func:`release_health`).
    """
    try:
        _switch(d, to, previous, health=health, detail=detail)
        # this switch's fields only: an earlier rollback's reason or rolled_back_from must not stay beside it
        kept = {k: v for k, v in _read_state(d).items() if k in ("schema_version", "history")}
        state = {**kept, "current": to, "previous": previous, "health": health, **fields}
        _write_state(d, state, event, release=to, **detail)
    except OSError as exc:
        if _link_target(d, CURRENT) != to:
            raise
        said = "rolled back" if health == ROLLED_BACK else "installed, pending its health check"
        why = (f"{os_error_text(exc)}; '{CURRENT}' and deploy.json's pending record say {said} (as 'edge-ad run' "
               "and 'bundle status' read it), the next install or rollback completes the record")
        what = "rollback" if health == ROLLED_BACK else "install"
        log.error("%s, but the record of the %s is incomplete: %s", done, what, why)
        return why
    return None


def deploy_lock(deploy_dir: str | os.PathLike):
    """One install or rollback at a time per deploy folder (a CLI install beside the runtime's update_model
    or its health check's rollback): the
    kernel's lock on ``releases/`` (:func:`atomic.folder_lock`), so a killed install leaves none behind.
    Re-entrant in one thread; another thread or process gets a :class:`~edge_ad.errors.Busy` (a
    RuntimeFailure) at once."""
    return atomic.folder_lock(Path(deploy_dir) / RELEASES,
                              f"{deploy_dir}: another install or rollback in this deploy folder is running; try "
                              "again when it has finished")


def _clean_stale(d: Path, dep: Deployment) -> None:
    """What a killed install, prune, check or download left (under the lock, so none of it is in use; ``dep``: the
    deploy folder's state), a release never switched in (:func:`not_switched_in`) included: renamed to
    ``.trash-<id>`` before it is deleted, as a prune deletes one. A release a link names that still holds the mark
    (the switch cut short after 'current' moved) loses it."""
    unswitched = not_switched_in(d)
    for rid in unswitched:
        os.rename(d / RELEASES / rid, d / RELEASES / f".trash-{rid}")
    if unswitched:
        atomic._fsync_dir(d / RELEASES)
    for rid in (dep.current, dep.previous):
        if rid is not None:
            (d / RELEASES / rid / NOT_SWITCHED).unlink(missing_ok=True)
    stale = [*(d / RELEASES).glob(".incoming-*"), *(d / RELEASES).glob(".trash-*"), *d.glob(".check-*"), *(d / "downloads").glob(".*.part"),
             *d.glob(f".{CURRENT}.*.tmp"), *d.glob(f".{PREVIOUS}.*.tmp"), *d.glob(f".{STATE}.*.tmp")]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log.warning("%s: removed what an interrupted install left: %s", d, ", ".join(
            f"{RELEASES}/{p.name[len('.trash-'):]} (a release never switched in: its install was cut off before "
            "the switch)" if p.name.startswith(".trash-") and p.name[len(".trash-"):] in unswitched else p.name
            for p in stale))


def not_switched_in(d: Path) -> list[str]:
    """The release folders an install renamed into ``releases/`` whose switch never moved ``current`` to them (killed,
    or a power cut, in between; :data:`NOT_SWITCHED`): no release, neither listed nor counted as kept
    (:func:`_release_ids`), nor rolled back to; the next install removes them (:func:`_clean_stale`). One that a
    link names (``current``, or ``previous`` after a rollback, also as a switch cut short records them) is a
    release: the switch moved ``current`` before it could drop the mark. None while ``current`` is damaged
    (what is in force is unknown)."""
    rel = d / RELEASES
    if not rel.is_dir():
        return []
    marked = [p.name for p in rel.iterdir() if _is_release_id(p.name) and (p / NOT_SWITCHED).is_file()]
    if not marked:
        return []
    try:
        dep = deployment(d)
    except DeployDamaged:
        return []
    return sorted(rid for rid in marked if rid not in _linked(d, dep))


def _linked(d: Path, dep: Deployment) -> set:
    """The releases the links name: ``current``, ``previous``, and with a damaged ``previous`` link the one
    deploy.json records for it."""
    return {dep.current, dep.previous, _read_state(d).get(PREVIOUS) if dep.previous_damaged else None}


def _content(b: Bundle) -> dict[str, str]:
    """{file: sha256} of what a bundle consists of (what 'bundle pack' would pack)."""
    from .package import _bundle_files

    return {rel: atomic.sha256_file(b.path / rel) for rel in _bundle_files(b)}


def _model_content(b: Bundle) -> dict[str, str]:
    """:func:`_content` less what calibrating on the device writes (:data:`DEVICE_WRITTEN`, and its records
    in manifest.json): unchanged by a recalibration of the line, changed by anything else."""
    out = {rel: h for rel, h in _content(b).items() if not rel.startswith(DEVICE_WRITTEN)}
    manifest = {**b.manifest, "files": {k: v for k, v in b.manifest["files"].items()
                                        if not k.startswith(DEVICE_WRITTEN)}}
    out["manifest.json"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()
    return out


def _same_content(release: Path, content: dict[str, str]) -> bool:
    """Installing these files again would change nothing: ``release`` was installed from exactly these
    files and is as it was then (:data:`INSTALLED_FROM`; an engine built at install is recorded in
    manifest.json and quant_report.json), but for calibrations written on the device since, which a retried
    update must not undo. A release without that record (installed by an older version): holds the same
    files but for what calibrating on the device changed since (calibration.json replaced, calibration.d/
    and gaussian.d/ versions added, old gaussian.d/ ones pruned; the archive's calibration history must be
    in the release as it is in the archive), and for manifest.json, which :func:`_same_model` compares
    once the archive is extracted."""
    try:
        b = Bundle.open(release)
        if (release / INSTALLED_FROM).is_file():
            was = json.loads((release / INSTALLED_FROM).read_text("utf-8"))
            return was.get("archive") == content and (was.get("release") == _content(b)
                                                      or was.get("model") == _model_content(b))
        now = _content(b)
        if any(now.get(rel) != h for rel, h in content.items()
               if rel not in ("manifest.json", "calibration.json") and not (rel.startswith("gaussian.d/")
                                                                           and rel not in now)):
            return False
        return all(rel in content for rel in now if rel != "manifest.json" and not rel.startswith(DEVICE_WRITTEN))
    except (EdgeADError, OSError, ValueError, AttributeError):
        return False


def _same_model(bundle: Path, release: Path) -> bool:
    """The two bundle folders are one model (:func:`_model_content`: their manifests too), whatever
    calibration each holds."""
    try:
        return _model_content(Bundle.open(bundle)) == _model_content(Bundle.open(release))
    except (EdgeADError, OSError, ValueError):
        return False


def _named_in_archive(exc: InputError, staging: Path, archive: Path) -> InputError:
    """``exc`` with the staging folder (deleted by then) in its message replaced by what the user gave:
    ``ARCHIVE: bundle/FILE`` (or the bundle folder installed). A command to run on the bundle (the TensorRT
    backend's "edge-ad compile --bundle ...") names "the new release" instead: no such path exists."""
    msg = str(exc)
    if str(staging) not in msg:
        return exc
    msg = msg.replace(f"--bundle {staging} ", "--bundle <the new release> ")
    shown = str(archive) if archive.is_dir() else f"{archive}: {PREFIX}"
    new = type(exc)(msg.replace(str(staging), shown))
    new.__traceback__ = exc.__traceback__
    return new


def _stage_folder(src: Path, staging: Path, signed_required: bool) -> PackageInfo:
    """A bundle folder made on this device (``calibrate --adapt``): copied as it is, engines included."""
    if signed_required:
        raise InputError(f"{src}: a bundle folder carries no signature; install a signed archive "
                         "('edge-ad bundle pack --sign-key')")
    b = Bundle.open(src, verify=True)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns(".*"))
    return PackageInfo(index={"bundle": {"kind": b.kind, "model_hash": b.model_hash(), "source": str(src)},
                              "files": {}}, signed=False, alg=None, key_id=None, verified=False)


def prune_releases(deploy_dir: str | os.PathLike, keep: int = 3) -> list[str]:
    """Delete all but the ``keep`` newest releases; ``current`` and ``previous`` are always kept. Each goes
    by a rename to ``.trash-<id>`` first, so a power cut in the middle of deleting it leaves no half
    release behind (the next install deletes the rest); a folder without a manifest.json (left half
    deleted by an older edge-ad) goes too."""
    d = Path(deploy_dir)
    dep = deployment(d)
    protect = _linked(d, dep) | set(_release_ids(d)[:max(keep, 2)])
    removed = []
    for rid in _release_ids(d, complete=False):
        if rid not in protect:
            trash = d / RELEASES / f".trash-{rid}"
            os.rename(d / RELEASES / rid, trash)
            atomic._fsync_dir(d / RELEASES)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(rid)
    return removed


def _is_release_id(name: str) -> bool:
    """``name`` is named as an install names a release (``r<seq>-...``, no dot): not a folder put there by hand,
    such as an ``--adapt`` candidate (``<id>.adapted-<time>``) written there by an older edge-ad."""
    return _release_seq(name) >= 0 and "." not in name


def _release_ids(d: Path, complete: bool = True) -> list[str]:
    """The release folders kept in ``d/releases`` (named as an install names them, :func:`_is_release_id`;
    ``complete``: only those holding a manifest.json, so a bundle), newest (highest sequence number) first; not those
    never switched in (:func:`not_switched_in`)."""
    rel = d / RELEASES
    if not rel.is_dir():
        return []
    unswitched = set(not_switched_in(d))
    return sorted((p.name for p in rel.iterdir() if p.is_dir() and _is_release_id(p.name) and p.name not in unswitched
                   and (not complete or (p / "manifest.json").is_file())),
                  key=lambda n: (_release_seq(n), n), reverse=True)


def release_deploy_dir(bundle_dir: str | os.PathLike) -> Path | None:
    """The deploy folder whose release ``bundle_dir`` is (``<deploy>/releases/<id>``), else None."""
    p = Path(bundle_dir).resolve()
    d = p.parent.parent
    if p.parent.name == RELEASES and _is_release_id(p.name) and (
            (p / INSTALLED_FROM).is_file() or (d / CURRENT).is_symlink() or (d / STATE).is_file()):
        return d
    return None


def other_release_holders(bundle_dir: str | os.PathLike) -> list[dict]:
    """The running processes (``edge-ad run``) that decide with another release of the deploy folder whose
    release ``bundle_dir`` is (none when it is no release): a line that has not reloaded since an install or a
    rollback by hand made ``bundle_dir`` the release in force. Each is its
    :meth:`~edge_ad.bundle.Bundle.calibration_holders` record (``pid``, ``by``, ``since``), with the ``version``
    of that release's calibration it decides with and the ``release``, oldest release first."""
    d = release_deploy_dir(bundle_dir)
    if d is None:
        return []
    own = Path(bundle_dir).resolve().name
    return [{**rec, "version": v, "release": rid} for rid in reversed(_release_ids(d, complete=False)) if rid != own
            for v, recs in sorted(Bundle.holders_of(d / RELEASES / rid).items()) for rec in recs]


def release_problem(deploy_dir: str | os.PathLike, release: str, full: bool = False) -> str | None:
    """What keeps ``release`` from being run or rolled back to, worded to follow "is": "gone (no such
    folder...)", "not a folder", or "not openable: why". None when it opens. The one check of a release:
    ``bundle status`` names broken releases with it, and :func:`rollback_model` refuses to switch to one with
    its words. Checked: its manifest, its active graph there, recorded and its sha256 as recorded, its
    calibration in force the same as its history file and, for a Gaussian bundle, the sha256 of the
    statistics it names (what the line runs: a corrupt graph made 'edge-ad run' exit 2 at every start);
    ``full`` (a rollback: one release) also every other recorded file's sha256, as 'edge-ad run' checks at
    its start. Without it the listing stays fast on a device (no sha256 of a checkpoint or of other graphs)."""
    p = Path(deploy_dir) / RELEASES / release
    if not p.is_dir():
        return ("not a folder" if p.exists() or p.is_symlink()
                else "gone (no such folder: deleted by hand, or by an older edge-ad's prune)")
    try:
        b = Bundle.open(p)
        b.check_graph(verify=True)
        if full:
            b.verify()
        elif (p / "calibration.json").is_file():
            b._verify_calibration()   # the calibration in force against its history file
            stats = str(b.calibration().extra.get("gaussian") or "")
            if stats and (stats in b.manifest["files"] or stats in b.replacing):
                b.verify([stats])
    except (EdgeADError, OSError, ValueError) as exc:
        return f"not openable: {exc}"
    return None


def releases(deploy_dir: str | os.PathLike) -> list[dict]:
    """The kept releases, newest first: ``id``, ``installed`` (UTC, from the id), ``role`` ("current",
    "previous" or None) and ``health``, each release's own: the release in force's is :attr:`Deployment.health`
    ("pending" until its health check is done); another's the last verdict on it in ``deploy.json``'s history
    (:func:`release_health`: "ok", "failed" or "unchecked"); a failed verdict kept in the release
    (:data:`HEALTH_FAILED`, its rollback owed or given up) is "failed". ``problem``: None, or why it cannot be run
    or rolled back to (:func:`release_problem`: a corrupt manifest.json, a missing graph)."""
    d = Path(deploy_dir)
    dep = deployment(d)
    hist = _history(_read_state(d), dep.current)
    out = []
    for rid in _release_ids(d):
        health = dep.health if rid == dep.current else release_health(hist, rid)
        marker = failed_marker(d, rid)
        if marker is not None and marker.is_file():   # whether failed_before() would say so, without reading it
            health = "failed"
        parts = rid.split("-")
        try:
            installed = _dt.datetime.strptime(parts[1], "%Y%m%dT%H%M%SZ").strftime("%Y-%m-%dT%H:%M:%SZ")
        except (IndexError, ValueError):
            installed = None
        role = "current" if rid == dep.current else "previous" if rid == dep.previous else None
        out.append({"id": rid, "installed": installed, "role": role, "health": health,
                    "problem": release_problem(d, rid)})
    return out


def rollback_model(deploy_dir: str | os.PathLike, reason: str = "manual", to: str | None = None, *,
                   failed: bool = False, by: str | None = None, force: bool = False) -> Deployment:
    """Point ``current`` at ``previous``, or at the kept release ``to``; the release left becomes
    ``previous`` (so a second plain rollback undoes the first). ``failed``: the release left failed (its health
    check, or the line cannot open it): recorded as its verdict, ``failed`` in deploy.json's history. Else the
    rollback is one by hand, ``by`` whom (default "api"), and says nothing of the release left: its health stays
    its own. The release switched in gets its own health (:func:`release_health`: "ok", "failed" or
    "unchecked"; never "pending", so it is not watched). A rollback by hand to a release judged wrong
    (:func:`failed_verdict`), to ``previous`` or ``to``, is refused (InputError naming the verdict, nothing changed)
    unless ``force``: the line would inspect with it. Returns the new state. Raises
    RuntimeFailure when there is no previous release (none, or the release in force) or it cannot be
    opened, or another install or rollback holds the deploy folder (:class:`~edge_ad.errors.Busy`, from
    :func:`deploy_lock`: nothing changed, try again later); InputError when
    ``to`` is not a kept release, is the one in force, or cannot be opened (named as ``bundle status`` names
    it: :func:`release_problem`); :class:`DeployDamaged` (an InputError) when ``current`` is damaged, or
    ``previous`` is: without ``to`` (which release it would go back to is unknown), or with ``to`` when a folder or
    file is in its place (it could hold data). A damaged ``previous`` symlink is replaced by the switch of a rollback
    with ``to``, as an install replaces it, with a WARNING (:attr:`Deployment.replaced_previous`). An OSError (a full
    disk) before ``current`` moved is raised, nothing changed
    but for a pending record that :func:`deployment` ignores; one after it (the ``previous`` link or the final
    record not written) is logged as an ERROR and the rollback holds: the state returned says why in
    ``unrecorded``, and :func:`deployment` reads the switch from its pending record (:func:`_switch`)."""
    d = Path(deploy_dir)
    if not (d / RELEASES).is_dir():
        if to is not None:
            raise InputError(f"--to {to}: no such release: {d} has no {RELEASES}/ folder (deleted?); install a "
                             "release ('edge-ad bundle install')")
        raise RuntimeFailure(f"{d}: no previous release to roll back to (no {RELEASES}/ folder)")
    with deploy_lock(d):
        dep = deployment(d)
        damaged = dep.previous_damaged
        if damaged is not None and (to is None or damaged.link is None or dep.current is None):
            # no release to go back to, a folder or file in its place (data?), or no release to point it at
            raise damaged
        if to is None:
            refusal = rollback_refusal(dep)
            if refusal is not None:
                raise refusal
            to = dep.previous
        else:
            kept = _release_ids(d)
            if to not in kept:
                raise InputError(f"--to {to}: no such release in {d / RELEASES} (never installed, pruned, or "
                                 f"without a manifest.json); kept: {', '.join(kept) or 'none'}")
            if to == dep.current:
                raise InputError(f"--to {to}: already the release in force; kept: {', '.join(kept)}")
            problem = release_problem(d, to, full=True)   # as 'bundle status' names it, every file checked as run does
            if problem is not None:
                raise InputError(f"release {to} is {problem}; not rolled back, '{CURRENT}' is still {dep.current}")
        verdict = None if failed or force else failed_verdict(d, to)
        if verdict is not None:   # by hand: the line never inspects with a release judged wrong unless told to
            others = [r for r in _release_ids(d) if r not in (to, dep.current) and failed_verdict(d, r) is None
                      and release_problem(d, r) is None]
            raise InputError(f"release {to} {verdict}; not rolled back, '{CURRENT}' is still {dep.current}: "
                             + (f"roll back to another kept release with --to ID ({', '.join(others)}), or " if others
                                else "")
                             + "give --force to put it back all the same (the line then inspects with it, with a "
                               "WARNING at each start and reload)")
        left = dep.current
        # a failed release is named as such; a rollback by hand names who made it, and judges no release
        who = {"failed": left} if failed else {"by": by or "api"}
        health = release_health(_history(_read_state(d), dep.current), to)
        unrecorded = _switch_recorded(d, to, left, ROLLED_BACK, f"rolled back from {left} to {to} ({reason})",
                                      ROLLED_BACK, {"health": health, "rolled_back_from": left, "reason": reason,
                                                    "switched_at": now_iso(), **who},
                                      {"rolled_back_from": left, "reason": reason, **who})
        replaced = _replaced_damaged(d, damaged, left, "rollback", "left") if damaged is not None else None
        if unrecorded is not None:
            return replace(deployment(d), unrecorded=unrecorded, replaced_previous=replaced)
        log.warning("rolled back from %s to %s%s: %s", left, to, "" if failed else f" by hand ({who['by']})", reason)
        return replace(deployment(d), replaced_previous=replaced)


def rollback_refusal(dep: Deployment) -> EdgeADError | None:
    """Why a plain rollback of ``dep`` (to ``previous``: ``edge-ad bundle rollback``, the health check's, the start's
    of a release that failed before) would be refused, without making it: the error :func:`rollback_model` raises
    then (a damaged ``previous`` link: :class:`DeployDamaged`; no previous release, its folder gone, or it cannot be
    opened, every file checked as ``edge-ad run`` checks them: RuntimeFailure); None when it can be made (the deploy
    lock and the disk aside). ``doctor`` tells with it whether ``run`` can roll back a release at its start."""
    d = dep.deploy_dir
    if dep.previous_damaged is not None:
        return dep.previous_damaged
    if dep.previous is not None and dep.previous != dep.current and not (d / RELEASES / dep.previous).is_dir():
        # only those a --to would take (as 'bundle status' offers them): not one that cannot be opened
        others = [r for r in _release_ids(d) if r != dep.current]
        kept = [r for r in others if release_problem(d, r) is None]
        return RuntimeFailure(f"{d}: no previous release to roll back to: '{PREVIOUS}' points at "
                              f"{RELEASES}/{dep.previous}, which is {release_problem(d, dep.previous)}; "
                              + (f"roll back to a kept release with --to ID: {', '.join(kept)}" if kept
                                 else (f"no other kept release can be rolled back to ({len(others)} cannot "
                                       "be opened: see 'edge-ad bundle status')" if others
                                       else "no other release is kept")
                                 + "; install a release ('edge-ad bundle install')"))
    if dep.previous is None or dep.previous == dep.current:
        return RuntimeFailure(f"{d}: no previous release to roll back to"
                              + (f" ('{PREVIOUS}' is the release in force, {dep.current})"
                                 if dep.previous is not None and dep.previous == dep.current else ""))
    problem = release_problem(d, dep.previous, full=True)   # as 'bundle status' names it, every file checked as run does
    if problem is not None:
        return RuntimeFailure(f"release {dep.previous} is {problem}; not rolled back, '{CURRENT}' is still "
                              f"{dep.current}")
    return None


@dataclass(frozen=True)
class StartPlan:
    """What ``edge-ad run`` does at its start with the release in force of its deploy folder (:func:`start_plan`).
    ``action``: "run" (nothing to say), "watch" (pending: its health check watches its first frames), "unwatched"
    (pending, ``[health] enabled = false``: neither judged nor rolled back), "roll back" (pending, and it failed its
    health check before this start: rolled back to ``previous`` before a frame is inspected; the start fails when
    that rollback cannot be made) or "inspect failed" (judged wrong, yet it inspects: ``why``, with a WARNING).
    ``verdict``: the failed verdict in words (:func:`failed_before`, :func:`failed_verdict`), else None."""
    dep: Deployment
    action: str
    verdict: str | None = None
    why: str | None = None

    def fix(self) -> str:
        """How to go on when a release that failed cannot be rolled back at the start (``run``'s error, doctor's fix)."""
        return ("switch to a kept release ('edge-ad bundle rollback --to ID'; ids: 'edge-ad bundle status') or install "
                f"another, or, to run this one anyway, delete {failed_marker(self.dep.deploy_dir, self.dep.current)}")


def start_plan(deploy_dir: str | os.PathLike, health_enabled: bool = True) -> StartPlan:
    """What ``edge-ad run`` does with the release in force of ``deploy_dir`` at its start (and, for "inspect failed",
    at a reload onto it), with ``[health] enabled`` ``health_enabled``: :class:`StartPlan`. ``run`` acts on it
    (:meth:`edge_ad.runtime.service.Service._roll_back_failed`) and ``doctor --config`` says it (with
    :func:`rollback_refusal` for whether the rollback can be made)."""
    dep = deployment(deploy_dir)
    if dep.current is None:
        return StartPlan(dep, "run")
    if dep.health == "pending":   # deploy.json's record: what the start acts on (Deployment.health)
        before = failed_before(dep.deploy_dir, dep.current)
        if before is None:
            return StartPlan(dep, "watch" if health_enabled else "unwatched")
        if health_enabled:
            return StartPlan(dep, "roll back", before)
        return StartPlan(dep, "inspect failed", before,
                         "[health] enabled = false: not rolled back, it inspects (roll back with 'edge-ad bundle "
                         "rollback')")
    verdict = failed_verdict(dep.deploy_dir, dep.current)
    if verdict is None:
        return StartPlan(dep, "run")
    return StartPlan(dep, "inspect failed", verdict,
                     "it was switched in again by hand since ('edge-ad bundle rollback --force'), so it inspects: roll "
                     "back to another kept release ('edge-ad bundle rollback --to ID'; ids: 'edge-ad bundle status') "
                     "or install another")


def confirm(deploy_dir: str | os.PathLike, release: str | None = None) -> Deployment:
    """Mark the release in force healthy; with ``release``, only while it is that one (RuntimeFailure
    otherwise: a verdict on frames of ``release`` must not land on a release switched in since). Under the
    deploy lock, as a switch is (:class:`~edge_ad.errors.Busy` while another install or rollback holds it):
    checked and written unlocked, a rollback landing in between got its release marked healthy, and the
    state write could overwrite an install's."""
    d = Path(deploy_dir)
    with deploy_lock(d):
        dep = deployment(d)
        if release is not None and dep.current != release:
            raise RuntimeFailure(f"{d}: '{CURRENT}' is {dep.current or 'gone'} now, not {release}; not recorded as "
                                 "healthy")
        state = {**_read_state(d), "current": dep.current, "health": "ok"}
        if dep.previous_damaged is None:   # else deploy.json's record stays, for the repair (_relink) to name
            state["previous"] = dep.previous
        _write_state(d, state, "health_ok", release=dep.current)
        return deployment(d)


# ----------------------------------------------------------------------------- health after a switch
@dataclass(frozen=True)
class HealthLimits:
    """The health check's limits; the runtime takes them from the config's ``[health]`` section
    (:class:`edge_ad.config.HealthSettings`, whose defaults are these)."""

    window_s: float = 120.0          # the new model must process min_frames within this time
    min_frames: int = 20
    max_error_rate: float = 0.05     # failed inferences / attempts
    max_ng_rate_jump: float = 0.2    # NG rate may rise at most this much (absolute) over the baseline
    rollback_wait_s: float = 600.0   # a failed model's rollback is tried this long: at every poll while a deploy
                                     # lock is held elsewhere, at RETRY_S intervals while it cannot be written
    record_wait_s: float = 600.0     # a healthy verdict's record in deploy.json is tried this long (lock held, disk
                                     # full), at RETRY_S intervals


RETRY_S = (1.0, 60.0)                # an "ok" record or a rollback not written: tried again after 1 s, then twice
                                     # as long each time, at most 60 s apart


@dataclass(frozen=True)
class HealthVerdict:
    status: str                      # "pending" | "ok" | "failed" (an "ok" not recorded yet, the deploy lock held
                                     # elsewhere or deploy.json not writable, is returned as "pending": see
                                     # HealthWatch)
    reason: str
    frames: int
    errors: int
    ng_rate: float | None
    elapsed_s: float
    rolled_back: bool = False
    restored: Path | None = None     # the bundle folder to reopen after a rollback
    release: str | None = None       # the release judged (HealthWatch.release)
    rolled_back_to: str | None = None   # after a rollback: the release in force now (restored's id)
    # a failed verdict's rollback: "done" | "waiting" (another install or rollback holds the deploy lock: retried
    # at the next polls; or it could not be written, a full disk: retried after a back-off) | "given_up" (not done
    # within rollback_wait_s) | "dropped" ('current' is no longer the release judged) | "impossible" (no previous
    # release, or it cannot be opened, or the deploy folder is damaged: DeployDamaged); None: none was due
    rollback: str | None = None
    # an "ok" verdict's record in deploy.json: "done" | "given_up" (not written within record_wait_s: the lock held
    # elsewhere, or deploy.json not writable) | "dropped" ('current' is no longer the release judged) | "impossible"
    # (the deploy folder is damaged, DeployDamaged: 'current' is not a symlink); None: none was due (no deploy
    # folder)
    record: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["restored"] = str(self.restored) if self.restored else None
        return d


def judge_health(frames: int, errors: int, ng: int, elapsed_s: float, baseline_ng_rate: float | None,
                 limits: HealthLimits, offered: int | None = None) -> tuple[str, str]:
    """(status, reason) from counts since the switch. Pure; :class:`HealthWatch` calls it.

    ``offered``: frames the line handed to the model since the switch (captured and triggered, not
    paused), with ``elapsed_s`` then counted from the first of them. With it, the time rule judges the
    model, not the line: an idle or paused line stays pending, and a slow one (a part every 30 s in
    trigger mode) waits for ``min_frames``; the model fails on time only when frames were offered and it
    processed none, or left ``min_frames`` or more unprocessed. Without it (``None``), the window runs
    from the switch and the model must process ``min_frames`` within it.
    """
    attempts = frames + errors
    if attempts >= limits.min_frames and errors / attempts > limits.max_error_rate:
        return "failed", f"error rate {errors}/{attempts} > {limits.max_error_rate:g}"
    if frames >= limits.min_frames:
        rate = ng / frames
        if baseline_ng_rate is not None and rate - baseline_ng_rate > limits.max_ng_rate_jump:
            return "failed", (f"NG rate jumped to {rate:.3f} from {baseline_ng_rate:.3f} "
                              f"(limit +{limits.max_ng_rate_jump:g})")
        return "ok", f"{frames} frames, NG rate {rate:.3f}, {errors} errors"
    if offered is not None:
        if offered == 0:
            return "pending", "no frames offered yet (the line is idle or paused)"
        if elapsed_s >= limits.window_s and (attempts == 0 or offered - attempts >= limits.min_frames):
            return "failed", (f"only {attempts} of {offered} frames offered were processed within "
                              f"{limits.window_s:g} s of the first")
        return "pending", f"{frames} of {limits.min_frames} frames ({offered} offered)"
    if elapsed_s >= limits.window_s:
        what = "no frames processed" if frames == 0 else f"only {frames} frames processed"
        return "failed", f"{what} within {limits.window_s:g} s of the switch"
    return "pending", f"{frames} of {limits.min_frames} frames"


BASELINE = "baseline"   # deploy.json (and the switch's pending and history records): the old model's NG rate


def recorded_baseline(deploy_dir: str | os.PathLike, release: str | None) -> dict | None:
    """The NG rate of the model ``release`` replaced, as the runtime's update_model recorded it with the switch
    (:func:`install_bundle` ``baseline``: ``{"ng_rate": R, "frames": N}``, N the decisions behind it): from
    deploy.json's record of the switch, or from its pending record when the final one was cut short (a power cut,
    a full disk). None when ``release`` is not the release that switch put in force, or none was recorded (an
    install from a shell: no line's decisions known). A :class:`HealthWatch` without a baseline takes it, so the
    check after a restart still compares the new model's NG rate with the old one's."""
    st = _read_state(Path(deploy_dir))
    rec = st if st.get("current") == release else _cut_short(st, release)
    b = (rec or {}).get(BASELINE)
    if not isinstance(b, dict) or not isinstance(b.get("ng_rate"), (int, float)) or isinstance(b["ng_rate"], bool):
        return None
    return b


def golden_checked(deploy_dir: str | os.PathLike, release: str | None) -> bool | None:
    """Whether ``release`` passed a golden check before its install switched it in, from deploy.json's record of
    that switch (``golden_passed``): False for an install without one (``--no-golden``, or an MQTT
    ``update_model`` on a device without a golden set); None when no record of its switch is kept (one cut short,
    or older than the history)."""
    hist = _read_state(Path(deploy_dir)).get("history")
    for ev in reversed(hist if isinstance(hist, list) else []):
        if isinstance(ev, dict) and ev.get("event") == "switched" and ev.get("release") == release:
            return ev["golden_passed"] is not None if "golden_passed" in ev else None
    return None


def failed_marker(deploy_dir: str | os.PathLike, release: str | None) -> Path | None:
    """Where a failed health verdict on ``release`` is kept (:data:`HEALTH_FAILED`); None for no release."""
    if release is None or "/" in release:
        return None
    return Path(deploy_dir) / RELEASES / release / HEALTH_FAILED


def failed_before(deploy_dir: str | os.PathLike, release: str | None) -> str | None:
    """``failed its health check before this start (MARKER: REASON (judged at TIME))`` when ``release`` holds
    a failed verdict (:data:`HEALTH_FAILED`: its rollback was still owed, or given up, when the line stopped),
    else None. :class:`HealthWatch` fails such a release at its first poll; ``edge-ad run`` rolls it back
    before it inspects a frame (:meth:`edge_ad.runtime.service.Service._open_model`)."""
    m = failed_marker(deploy_dir, release)
    if m is None or not m.is_file():
        return None
    try:
        was = json.loads(m.read_text("utf-8"))
        why = f"{was['reason']} (judged at {was['time']})"
    except (OSError, ValueError, KeyError, TypeError):
        why = "an unreadable record"
    return f"failed its health check before this start ({m}: {why})"


class HealthWatch:
    """Watches the first frames after a model switch; rolls back when they look wrong.

    The runtime calls ``record(ng=..., error=...)`` for every frame (or failed inference) of the new
    model and ``poll()`` now and then (e.g. with telemetry). On "failed", ``poll`` calls
    :func:`rollback_model` (when ``deploy_dir`` is given) and returns ``rolled_back=True`` and the folder
    to reopen; on "ok" it marks the release healthy. The verdict is final once not "pending", but for a
    rollback another install or rollback keeps waiting (:func:`deploy_lock` held elsewhere, e.g. an
    ``edge-ad bundle install`` from a shell): the verdict stays "failed" with ``rollback`` "waiting" and
    each later ``poll`` tries again, for up to ``limits.rollback_wait_s`` ("given_up" after that); so does a
    rollback that could not be written (a full disk before ``current`` moved: nothing changed), tried again
    backing off as an "ok" record is (:meth:`_owe`). No OSError leaves ``poll``, nor a :class:`DeployDamaged`
    (``current`` not a symlink: the verdict is final, its rollback or record "impossible", logged once).

    ``release``: the release judged (default: the one ``current`` points at now). Both the rollback and
    the "ok" record apply to it only: when ``current`` has moved on since (someone else installed or
    rolled back), the rollback is dropped (``rollback`` "dropped") and nothing is confirmed, so that their
    release is never rolled back or called healthy on frames of another model. Both are checked and done
    under the deploy lock, so no switch lands in between; an "ok" while another install or rollback holds
    the lock (or deploy.json cannot be written) is returned as "pending" (not recorded yet: the frames are
    judged, later ones do not count) and recorded at a later ``poll`` (backing off, for up to
    ``limits.record_wait_s``: :meth:`_confirm`), or not at all if their command switched ``current``.
    """

    def __init__(self, deploy_dir: str | os.PathLike | None = None, baseline_ng_rate: float | None = None,
                 limits: HealthLimits | None = None, clock: Callable[[], float] = time.monotonic,
                 offered: Callable[[], int] | None = None, release: str | None = None):
        self.deploy_dir = Path(deploy_dir) if deploy_dir is not None else None
        self.release = release if release is not None or self.deploy_dir is None else deployment(deploy_dir).current
        if baseline_ng_rate is None and self.deploy_dir is not None:   # a restart since the switch: as recorded there
            recorded = recorded_baseline(self.deploy_dir, self.release)
            if recorded is not None:
                baseline_ng_rate = float(recorded["ng_rate"])
                log.info("release %s is judged against the NG rate recorded at its switch: %.3f over the last %s "
                         "decisions of the model it replaced", self.release, baseline_ng_rate, recorded.get("frames"))
        self.baseline_ng_rate = baseline_ng_rate
        self.limits = limits or HealthLimits()
        self._clock = clock
        self._t0 = clock()
        # offered(): the line's running count of frames handed to the model (see judge_health)
        self._offered = offered
        self._offered0 = offered() if offered is not None else 0
        self._t_first_offer: float | None = None
        self._lock = threading.Lock()
        self.frames = self.errors = self.ng = 0
        self._final: HealthVerdict | None = None
        self._owed: HealthVerdict | None = None    # a verdict whose rollback or record waits (see _roll_back, _confirm)
        self._owed_since = 0.0
        self._retry_at = 0.0                       # when the owed rollback or record is tried again (_owe)
        self._retry_delay = RETRY_S[0]
        self._meanwhile: HealthVerdict | None = None   # what poll returns until then
        self._waited_for = ""                      # what an owed rollback waited for last (for its final reason)
        # the reason of a failed verdict on this release recorded before (HEALTH_FAILED: a restart while its
        # rollback waited, or after it was given up): the first poll fails it again and rolls it back
        self._failed_before = self._read_failed()

    def _marker(self) -> Path | None:
        return None if self.deploy_dir is None else failed_marker(self.deploy_dir, self.release)

    def _read_failed(self) -> str | None:
        return None if self.deploy_dir is None else failed_before(self.deploy_dir, self.release)

    def _keep_failed(self, reason: str) -> None:
        """Record the failed verdict in the release (atomic; no deploy lock needed): a restart before the rollback
        is done rolls it back instead of judging it again (with no NG rate to compare with it could pass)."""
        m = self._marker()
        if m is None or not m.parent.is_dir():
            return
        try:
            atomic.write_json(m, {"time": now_iso(), "reason": reason})
        except OSError as exc:
            log.error("the failed verdict on %s cannot be recorded in %s (%s): a restart before its rollback is "
                      "done judges it again", self.release, m, os_error_text(exc))

    def record(self, ng: bool | None = None, error: bool = False) -> None:
        with self._lock:
            if self._final is not None or self._owed is not None:
                return
            if error:
                self.errors += 1
            else:
                self.frames += 1
                self.ng += int(bool(ng))

    def poll(self) -> HealthVerdict:
        with self._lock:
            if self._final is not None:
                return self._final
            now = self._clock()
            if self._owed is not None:
                if now < self._retry_at:
                    return self._meanwhile
                return (self._roll_back(self._owed, now) if self._owed.status == "failed"
                        else self._confirm(self._owed, now))
            offered = None
            elapsed = now - self._t0
            if self._offered is not None:
                offered = max(self._offered() - self._offered0, self.frames + self.errors)
                if offered and self._t_first_offer is None:
                    self._t_first_offer = now
                elapsed = now - self._t_first_offer if self._t_first_offer is not None else 0.0
            status, reason = judge_health(self.frames, self.errors, self.ng, elapsed, self.baseline_ng_rate,
                                          self.limits, offered)
            if self._failed_before is not None:   # judged failed before a restart: not judged again
                status, reason = "failed", self._failed_before
            v = HealthVerdict(status, reason, self.frames, self.errors,
                              self.ng / self.frames if self.frames else None, elapsed, release=self.release)
            if status == "pending":
                return v
            if self.deploy_dir is not None:
                self._owed_since = now
                if status == "failed" and self._failed_before is None:
                    self._keep_failed(reason)
                return self._roll_back(v, now) if status == "failed" else self._confirm(v, now)
            self._final = v
            return v

    def supersede(self, release: str | None, by: str) -> HealthVerdict | None:
        """This runtime switched ``release`` in (``by``: update_model, reload) and watches it instead: this
        watch ends here. An owed rollback (failed, "waiting" for the deploy lock) is dropped, as it would be
        at its next poll now that ``current`` has moved on, and an owed healthy record is not made; the final
        verdict is returned (and by later polls). None when nothing was owed: the watch was still judging,
        or it had ended."""
        with self._lock:
            if self._final is not None or self._owed is None:
                return None
            owed = self._owed
            why = f"superseded by {release or 'another release'}, which {by} switched in"
            if owed.status == "failed":
                return self._finish(replace(owed, reason=f"{owed.reason}; rollback dropped: {why}",
                                            rollback="dropped"))
            return self._finish(replace(owed, reason=f"{owed.reason}; not recorded as healthy: {why}",
                                        record="dropped"))

    def _confirm(self, v: HealthVerdict, now: float) -> HealthVerdict:
        """Record an "ok" verdict on the release judged (under the deploy lock, only while it is still
        ``current``); the verdict to return: final, or "pending" while it cannot be recorded (another install
        or rollback holds the lock, or deploy.json cannot be written: a full disk). Such a record is tried
        again at a later poll, backing off (:meth:`_owe`: after 1 s, 2 s, 4 s ..., at most 60 s apart; not at
        every poll, ten times a second), and given up after ``limits.record_wait_s`` with an ERROR: the verdict
        "ok" with ``record`` "given_up"; the release stays pending in deploy.json (a restart watches it
        again)."""
        try:
            with deploy_lock(self.deploy_dir):
                moved = self._moved_on()
                if moved is None:
                    confirm(self.deploy_dir, release=self.release)
        except DeployDamaged as exc:   # nothing says which release is in force: final, said once
            log.error("the healthy verdict on %s cannot be recorded: %s", self.release, exc)
            return self._finish(replace(v, reason=f"{v.reason}; not recorded as healthy: {exc}", record="impossible"))
        except (Busy, OSError) as exc:
            why = (f"another install or rollback holds the deploy folder ({exc})" if isinstance(exc, Busy)
                   else f"deploy.json cannot be written ({os_error_text(exc)})")
            if self._owed is None:
                log.warning("the healthy verdict on %s is not recorded yet: %s; tried again for up to %g s",
                            self.release, why, self.limits.record_wait_s)
            waited = now - self._owed_since
            if waited >= self.limits.record_wait_s:
                log.error("the healthy verdict on %s is given up after %.0f s: %s; deploy.json still says pending "
                          "(a restart watches the release again)", self.release, waited, why)
                return self._finish(replace(v, reason=(
                    f"{v.reason}; not recorded as healthy, given up after {waited:.0f} s: {why}; deploy.json still "
                    "says pending (a restart watches the release again)"), record="given_up"))
            again = self._owe(v, now, self.limits.record_wait_s)
            return self._owe_meanwhile(replace(v, status="pending", reason=(
                f"{v.reason}; healthy, not recorded yet: {why}; tried again in {again:g} s (given up after "
                f"{self.limits.record_wait_s:g} s)")))
        if moved is not None:
            return self._finish(replace(v, reason=f"{v.reason}; not recorded as healthy: {moved}", record="dropped"))
        return self._finish(replace(v, record="done"))

    def _owe(self, v: HealthVerdict, now: float, wait_s: float | None) -> float:
        """``v``'s rollback or record could not be done now: owe it, to be tried again at a later poll, after a
        back-off (:data:`RETRY_S`: 1 s, 2 s, 4 s ... at most 60 s apart, the last try at ``wait_s`` after the
        first) or, with ``wait_s`` None, at the next poll (a deploy lock held elsewhere: cheap to try). The
        seconds until the next try."""
        if self._owed is None:
            self._retry_delay = RETRY_S[0]
        self._owed = v
        if wait_s is None:
            self._retry_at = now
            return 0.0
        self._retry_at = min(now + self._retry_delay, self._owed_since + wait_s)
        self._retry_delay = min(2 * self._retry_delay, RETRY_S[1])
        return self._retry_at - now

    def _owe_meanwhile(self, v: HealthVerdict) -> HealthVerdict:
        """``v``, returned by polls until the owed rollback or record is tried again."""
        self._meanwhile = v
        return v

    def _moved_on(self) -> str | None:
        """Why the deploy folder's release in force is no longer the one judged; None while it is."""
        cur = deployment(self.deploy_dir).current
        if self.release is None or cur == self.release:
            return None
        return (f"'{CURRENT}' is {cur or 'gone'} now, not the release judged, {self.release} (switched by another "
                "install or rollback)")

    def _roll_back(self, v: HealthVerdict, now: float) -> HealthVerdict:
        """Roll the failed release back (under the deploy lock, only while it is still ``current``); the
        verdict to return: final, or "waiting" while another install or rollback holds the lock (tried again
        at the next poll) or the rollback cannot be written before ``current`` moves (a full disk: nothing
        changed; tried again backing off, :meth:`_owe`). Given up after ``limits.rollback_wait_s``. A rollback
        whose record could not be completed after ``current`` moved holds (:func:`rollback_model`): "done",
        its reason saying so."""
        wait_s = self.limits.rollback_wait_s
        try:
            with deploy_lock(self.deploy_dir):
                moved = self._moved_on()
                if moved is not None:
                    return self._finish(replace(v, reason=f"{v.reason}; rollback dropped: {moved}",
                                                rollback="dropped"))
                dep = rollback_model(self.deploy_dir, reason=f"health check: {v.reason}", failed=True)
        except Busy as exc:
            waited = now - self._owed_since
            if waited >= wait_s:
                return self._give_up_rollback(v, waited, f"another install or rollback held the deploy folder for "
                                                         f"{waited:.0f} s ({exc})")
            if self._owed is None:
                log.warning("the rollback of %s waits for the deploy lock: %s", self.release, exc)
            self._owe(v, now, None)
            self._waited_for = "the deploy lock"
            return self._owe_meanwhile(replace(v, reason=(
                f"{v.reason}; the rollback waits for the deploy folder, which another install or rollback holds "
                f"({exc}): tried again at every check for up to {wait_s:g} s"), rollback="waiting"))
        except (RuntimeFailure, DeployDamaged) as exc:   # no previous release, or the links are damaged
            return self._finish(replace(v, reason=f"{v.reason}; rollback impossible: {exc}", rollback="impossible"))
        except OSError as exc:   # a full disk before 'current' moved: nothing changed
            why = f"the deploy folder cannot be written ({os_error_text(exc)}); '{CURRENT}' is still {self.release}"
            waited = now - self._owed_since
            if waited >= wait_s:
                return self._give_up_rollback(v, waited, f"not done within {waited:.0f} s: {why}")
            if self._owed is None:
                log.warning("the rollback of %s is not done yet: %s; tried again for up to %g s", self.release,
                            why, wait_s)
            again = self._owe(v, now, wait_s)
            self._waited_for = "the deploy folder to be writable"
            return self._owe_meanwhile(replace(v, reason=(
                f"{v.reason}; the rollback is not done yet: {why}; tried again in {again:g} s (given up after "
                f"{wait_s:g} s)"), rollback="waiting"))
        waited = "" if self._owed is None else f" (after waiting {now - self._owed_since:.0f} s for {self._waited_for})"
        unrecorded = "" if dep.unrecorded is None else f"; rolled back, but its record is incomplete: {dep.unrecorded}"
        return self._finish(replace(v, reason=v.reason + waited + unrecorded, rolled_back=True,
                                    restored=dep.current_path, rolled_back_to=dep.current, rollback="done"))

    def _give_up_rollback(self, v: HealthVerdict, waited: float, why: str) -> HealthVerdict:
        log.error("the rollback of %s is given up after %.0f s: %s", self.release, waited, why)
        return self._finish(replace(v, reason=(
            f"{v.reason}; rollback given up: {why}; the failing model keeps inspecting until 'edge-ad bundle "
            f"rollback' or a restart (which rolls it back: the failed verdict is kept in {self._marker()})"),
            rollback="given_up"))

    def _finish(self, v: HealthVerdict) -> HealthVerdict:
        self._owed = None
        self._final = v
        return v
