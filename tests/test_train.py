"""Training, bundles and evaluation on tiny synthetic data (64x64, a few steps)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad import atomic
from edge_ad.bundle import Bundle
from edge_ad.data.mvtec import MVTecCategory
from edge_ad.data.synthetic import write_category
from edge_ad.errors import InputError
from edge_ad.models import build, load_from_bundle
from edge_ad.models.pdn import pdn_small
from edge_ad.train.pipeline import train_bundle

SIZE = 64


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return write_category(tmp_path_factory.mktemp("data") / "disc", n_train=16, n_test_good=6, n_test_defect=2,
                          size=SIZE, kind="disc", seed=1)


def test_paper_sizes_of_efficientad_s():
    m = build("efficientad-s", 256, {"teacher": "pdn", "teacher_channels": 384}, pretrained=False)
    count = lambda mod: sum(p.numel() for p in mod.parameters()) / 1e6  # noqa: E731
    assert count(m.teacher) == pytest.approx(2.69, abs=0.01)
    assert count(m.student) == pytest.approx(4.27, abs=0.01)
    assert count(m.autoencoder) == pytest.approx(1.10, abs=0.01)
    out = m(torch.zeros(1, 3, 256, 256))
    assert [tuple(o.shape) for o in out] == [(1, 1, 56, 56), (1, 1, 56, 56)]
    assert m.map_pad == 4


@pytest.mark.parametrize("kind,names", [("gaussian", ["feat"]), ("efficientad-s", ["map_st", "map_ae"]),
                                        ("fader", ["map_pix", "map_feat"])])
def test_train_writes_a_complete_bundle(category, tmp_path, kind, names):
    b = train_bundle(kind, category, tmp_path / "b", image_size=SIZE, steps=2, batch_size=2)
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.has("model.onnx")  # exported, and checked against torch by the exporter
    assert b.outputs == names
    cal = b.calibration()
    assert cal.version == 1 and np.isfinite(cal.threshold)
    assert cal.normal["n"] >= 2
    assert b.manifest["training"]["val_images"]
    # the fingerprints of the training and validation files: (bytes, the first 16 hex digits of their sha256)
    val = {Path(v) for v in b.manifest["training"]["val_images"]}
    train = [p for p in sorted((category / "train" / "good").iterdir()) if p not in val]
    prints = b.training_fingerprints()
    assert prints == {split: {(p.stat().st_size, atomic.sha256_file(p)[:16]) for p in paths}
                      for split, paths in (("train", train), ("val", val))}
    assert len(prints["train"]) == b.manifest["training"]["n_train"] == 14
    assert b.manifest["data"] == {"bit_depth": 8, "channels": 3}       # what the training images were
    m = load_from_bundle(b)
    outs = m(torch.zeros(1, 3, SIZE, SIZE))
    assert len(outs) == len(names)


def test_training_is_deterministic_and_resume_matches(category, tmp_path, monkeypatch):
    import edge_ad.train.loops as loops

    kw = dict(image_size=SIZE, steps=4, batch_size=2, export=False, seed=3)
    a = train_bundle("efficientad-s", category, tmp_path / "a", **kw)
    a2 = train_bundle("efficientad-s", category, tmp_path / "a2", **kw)
    assert a.manifest["training"]["teacher"] == "lite0" and a.manifest["training"]["penalty_dir"] is None
    real_save = loops.save_checkpoint

    def crash_after_first_checkpoint(path, model, opt, step, gen, *rest, **kw):
        real_save(path, model, opt, step, gen, *rest, **kw)
        if step == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(loops, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_bundle("efficientad-s", category, tmp_path / "b", checkpoint_every=2, **kw)
    monkeypatch.setattr(loops, "save_checkpoint", real_save)
    b = train_bundle("efficientad-s", category, tmp_path / "b", resume=True, **kw)
    assert b.manifest["training"]["resumed_at"] == 2
    sa, sa2, sb = (torch.load(x.file("checkpoint.pt"), weights_only=True) for x in (a, a2, b))
    for k in sa:
        assert torch.equal(sa[k], sa2[k]), f"not deterministic: {k}"
        assert torch.equal(sa[k], sb[k]), f"resume differs: {k}"


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_retraining_into_a_bundle_folder_replaces_the_whole_bundle(category, tmp_path, monkeypatch):
    """No file of the old model survives a new training into its folder (graphs, quantized graphs, quant
    report, calibration history, Gaussian statistics, engines, eval report, an older run's training state),
    so nothing runs the old graph with the new calibration, nor rolls back to the old model's calibration;
    and a training that fails at the end leaves the old bundle whole."""
    import edge_ad.compile.export as export_mod
    from edge_ad.errors import RuntimeFailure
    from edge_ad.runtime.backends.onnxruntime import OnnxRuntimeBackend

    out = tmp_path / "b"
    old = train_bundle("gaussian", category, out, image_size=SIZE)
    old.write_calibration(old.calibration().replace(version=0, created=""))   # a recalibration: v2
    old.add_file("model.int8.onnx", src=old.file("model.onnx"))                # as if quantized
    old.add_file("quant_report.json", data=b"{}")
    old.set_active("model.int8.onnx", "int8")
    for name in ("eval/report.json", "engines/x.engine", "train_state.pt"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"the old model's")
    before = _files(out)

    def broken_export(bundle, module=None, **kw):
        raise RuntimeFailure("export failed (simulated)")

    with monkeypatch.context() as m:
        m.setattr(export_mod, "export_bundle", broken_export)
        with pytest.raises(RuntimeFailure, match="simulated"):
            train_bundle("gaussian", category, out, image_size=SIZE, seed=1)
    assert _files(out) == before and Bundle.open(out, verify=True).active_graph == "model.int8.onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]   # no half-built bundle left beside it

    new = train_bundle("gaussian", category, out, image_size=SIZE, seed=1, export=False)
    assert sorted(_files(out)) == ["calibration.d/0001.json", "calibration.json", "checkpoint.pt",
                                   "gaussian.d/0001.npz", "manifest.json", "training_images.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]   # the old bundle is gone, not kept beside it
    assert new.manifest["training"]["seed"] == 1 and new.active_graph == "model.onnx"
    cal = new.calibration()
    assert cal.version == 1 and "previous_version" not in cal.extra
    with pytest.raises(InputError, match="nothing to roll back to"):
        new.rollback_calibration()
    with pytest.raises(InputError, match="b/model.onnx: not found; run 'edge-ad export'"):
        OnnxRuntimeBackend(new)


def test_retraining_keeps_this_runs_training_state_for_resume(category, tmp_path):
    kw = dict(image_size=SIZE, batch_size=1, export=False)
    out = tmp_path / "b"
    train_bundle("gaussian", category, out, **kw)
    train_bundle("efficientad-s", category, out, steps=2, **kw)
    st = torch.load(out / "train_state.pt", weights_only=True)
    assert st["step"] == 2 and 0 < st["seconds"] < 1000
    torch.save({**st, "seconds": 1000.0}, out / "train_state.pt")  # as if the first part had taken 1000 s
    b = train_bundle("efficientad-s", category, out, steps=3, resume=True, **kw)
    assert b.manifest["training"]["resumed_at"] == 2 and b.manifest["training"]["steps"] == 3
    assert b.manifest["training"]["seconds"] > 1000  # the first part's time counts
    st = torch.load(out / "train_state.pt", weights_only=True)
    assert st["step"] == 3 and st["seconds"] > 1000 and "earlier_seconds" not in b.manifest["training"]
    train_bundle("gaussian", category, out, **kw)
    assert not (out / "train_state.pt").exists()   # the efficientad run's state went with its bundle


def test_training_never_deletes_what_is_not_a_bundle(category, tmp_path):
    from click.testing import CliRunner
    from edge_ad.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    (mine / "manifest.json").write_text('{"name": "a web app"}')
    with pytest.raises(InputError, match=r"--out .*mine: not empty and holds no bundle \(no edge-ad manifest.json; "
                                         r"it holds manifest.json, todo.txt\); expected a new or empty folder"):
        train_bundle("gaussian", category, mine, image_size=SIZE)
    r = CliRunner().invoke(main, ["train", "--model", "gaussian", "--data", str(category), "--out", str(mine),
                                  "--image-size", str(SIZE)])
    assert r.exit_code == 2 and f"--out {mine}: not empty and holds no bundle" in r.output, r.output
    b = Bundle.create(tmp_path / "b", {"kind": "gaussian", "image_size": [SIZE, SIZE], "outputs": ["feat"]})
    (b.path / "images").mkdir()
    (b.path / "images" / "0.png").write_bytes(b"mine")
    with pytest.raises(InputError, match=r"--out .*b: holds images, which no bundle holds; training replaces the "
                                         "bundle folder as a whole"):
        train_bundle("gaussian", category, b.path, image_size=SIZE)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match="file: exists and is not a folder"):
        train_bundle("gaussian", category, tmp_path / "file", image_size=SIZE)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b", "b/images", "b/images/0.png", "b/manifest.json", "file", "mine", "mine/manifest.json", "mine/todo.txt"]


def test_a_checkpoint_cut_off_while_written_still_resumes(category, tmp_path):
    """A power cut while train_state.pt is replaced leaves its temp file in --out: --resume refused the folder
    as 'not empty and holds no bundle', pushing the user to empty it and lose the checkpoint. The temp file is
    edge-ad's own: removed, and the training resumes."""
    import shutil

    kw = dict(image_size=SIZE, batch_size=2, export=False)
    train_bundle("fader", category, tmp_path / "src", steps=2, **kw)
    out = tmp_path / "b"   # a training into a new folder, cut off: its checkpoint only, and the next one's temp file
    out.mkdir()
    shutil.copy(tmp_path / "src" / "train_state.pt", out)
    (out / ".train_state.pt.omt3h7rh.tmp").write_bytes(b"half a checkpoint")
    b = train_bundle("fader", category, out, steps=3, resume=True, **kw)
    assert b.manifest["training"]["resumed_at"] == 2
    assert not list(out.glob(".*"))


def test_a_training_cut_off_between_its_two_renames_is_finished_by_the_next(category, tmp_path):
    """A power cut between the renames that switch a new bundle in leaves the folder missing, the new bundle
    (with the training state) in .NAME.new-* and the old one in .NAME.old-*: opening the folder said only
    'bundle folder not found' and --resume found no checkpoint. Now the error names the new bundle and the
    command that puts it in place, and the next training does it."""
    import shutil
    from click.testing import CliRunner
    from edge_ad.cli import main

    kw = dict(image_size=SIZE, batch_size=2, export=False)
    train_bundle("fader", category, tmp_path / "src", steps=2, **kw)
    out = tmp_path / "b"
    shutil.copytree(tmp_path / "src", tmp_path / ".b.old-0123abcd")
    shutil.copytree(tmp_path / "src", tmp_path / ".b.new-4567cdef")
    with pytest.raises(InputError, match=rf"b: bundle folder not found; a training into it was cut off while "
                                         rf"switching bundles and left the new one beside it, in .b.new-4567cdef: "
                                         rf"put it in place with: mv {tmp_path / '.b.new-4567cdef'} {out}$"):
        Bundle.open(out)
    r = CliRunner().invoke(main, ["calibrate", "--bundle", str(out), "--list"])
    assert r.exit_code == 2 and "mv " in r.output, r.output
    b = train_bundle("fader", category, out, steps=3, resume=True, **kw)
    assert b.manifest["training"]["resumed_at"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "src"]


def test_training_removes_what_killed_trainings_left_beside_out(category, tmp_path, monkeypatch):
    """A training killed while building its new bundle leaves .NAME.new-* (tens of MB) beside --out, one cut
    off while deleting the bundle it replaced .NAME.old-*: the next training removes them, never a staging
    folder another training holds (each holds its own)."""
    import fcntl
    import os
    import threading
    import edge_ad.train.pipeline as pipeline

    out = tmp_path / "b"
    train_bundle("gaussian", category, out, image_size=SIZE, export=False)
    for name in (".b.new-0123abcd", ".b.old-4567cdef", ".b.new-89abcdef", ".b.new-mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"x" * 1000)
    fd = os.open(tmp_path / ".b.new-89abcdef", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as another training at work holds it
    held = []
    real_switch = pipeline._switch_in

    def switch(stage, out, state):   # another training starting now leaves this one's staging folder alone
        t = threading.Thread(target=lambda: held.append(not atomic.remove_unheld(stage)))
        t.start()
        t.join()
        real_switch(stage, out, state)

    monkeypatch.setattr(pipeline, "_switch_in", switch)
    train_bundle("gaussian", category, out, image_size=SIZE, export=False, seed=1)
    os.close(fd)
    assert held == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.new-89abcdef", ".b.new-mine", "b"]


def test_time_budget_stops_training_and_still_writes_the_bundle(category, tmp_path):
    import edge_ad.train.loops as loops

    b = train_bundle("efficientad-s", category, tmp_path / "b", image_size=SIZE, steps=100000, batch_size=1,
                     export=False, max_minutes=0.05)
    t = b.manifest["training"]
    assert t["stopped_by_time_budget"] and t["planned_steps"] == 100000 and 0 < t["steps"] < 100000
    assert Bundle.open(tmp_path / "b").calibration().version == 1
    cfg = loops.LoopConfig(steps=1000, lr=1.0, max_seconds=10.0)
    assert loops.lr_at(10, cfg, elapsed=1.0) == 1.0
    assert loops.lr_at(10, cfg, elapsed=9.6) == pytest.approx(0.1)   # the clock brings the low-rate phase
    assert loops.lr_at(950, cfg, elapsed=1.0) == pytest.approx(0.1)  # so do the steps
    with pytest.raises(InputError, match="--max-minutes"):
        train_bundle("efficientad-s", category, tmp_path / "c", image_size=SIZE, max_minutes=0)


def test_teacher_file_in_public_format(category, tmp_path):
    t = pdn_small(384)
    torch.save(t.state_dict(), tmp_path / "teacher_small.pth")
    b = train_bundle("efficientad-s", category, tmp_path / "b", image_size=SIZE, steps=1, batch_size=1,
                     export=False, teacher=str(tmp_path / "teacher_small.pth"))
    assert b.model["config"]["teacher"] == "pdn" and b.model["config"]["teacher_channels"] == 384
    # the training record names the teacher file and the penalty folder that trained it
    assert b.manifest["training"]["teacher"] == {"file": str((tmp_path / "teacher_small.pth").resolve()),
                                                 "sha256": atomic.sha256_file(tmp_path / "teacher_small.pth")}
    assert b.manifest["training"]["penalty_dir"] is None and b.manifest["training"]["penalty"] is False
    m = load_from_bundle(b)
    assert torch.equal(m.teacher[0].weight, t[0].weight)
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="neither PDN-S"):
        train_bundle("efficientad-s", category, tmp_path / "c", image_size=SIZE, steps=1, export=False,
                     teacher=str(tmp_path / "bad.pth"))


def test_teacher_file_of_wrong_shapes_or_missing_keys_is_refused_when_read(tmp_path):
    """Right layer indices but a wrong shape or a missing key failed in load_state_dict (a traceback) after
    the images were loaded; now every key and shape is checked when the file is read, before --data."""
    from edge_ad.models.pdn import pdn_medium

    def refused(sd, match, model="efficientad-s"):
        torch.save(sd, tmp_path / "t.pth")
        with pytest.raises(InputError, match=match):
            train_bundle(model, tmp_path / "no data", tmp_path / "b", image_size=SIZE, steps=1,
                         export=False, teacher=str(tmp_path / "t.pth"))
        assert not (tmp_path / "b").exists()

    good = pdn_small(8).state_dict()
    refused({**good, "0.weight": torch.zeros(128, 3, 3, 3)},
            r"t\.pth: layer 0\.weight has shape 128x3x3x3, expected 128x3x4x4 \(PDN-S\)$")
    refused({**good, "3.weight": torch.zeros(256, 64, 4, 4)}, r"layer 3\.weight has shape 256x64x4x4, expected "
            r"256x128x4x4")
    refused({**good, "8.bias": torch.zeros(9)}, r"layer 8\.bias has shape 9, expected 8 \(PDN-S\)")  # channels
    refused({k: v for k, v in good.items() if k != "8.bias"},
            r"not a complete teacher \(PDN-S, 8 output channels\): missing 8\.bias \(expected the keys 0\.weight")
    refused({**good, "6.running_mean": torch.zeros(256)}, r"unexpected 6\.running_mean")
    # a key that is not a layer's: named (the message listed the first four keys, all of them right)
    refused({**good, "extra.weight": torch.zeros(1)}, r"t\.pth: keys \['extra\.weight'\] are not a PDN state_dict")
    refused({**good, "6.bias": torch.zeros(256, dtype=torch.int64)}, r"layer 6\.bias is a tensor of torch\.int64")
    medium = pdn_medium(4).state_dict()
    refused({**medium, "12.weight": torch.zeros(4, 4, 3, 3)},
            r"layer 12\.weight has shape 4x4x3x3, expected 4x4x1x1 \(PDN-M\)", "efficientad-m")


def test_penalty_dir_takes_an_mvtec_category_as_distill_teacher_does(category, tmp_path, caplog):
    """--penalty-dir CATEGORY found no images (it looked in CATEGORY only); now its train/good's, as
    distill-teacher's --data; a folder with none at all is refused naming it, before any image is loaded."""
    from edge_ad.train.common import penalty_images

    with caplog.at_level("WARNING"):
        pen = penalty_images(category, SIZE)
    assert pen.shape == (16, 3, SIZE, SIZE)            # the category's 16 train/good images
    assert f"--penalty-dir {category} holds no images itself: using its train/good (16 images)" in caplog.text
    assert penalty_images(category / "train" / "good", SIZE).shape[0] == 16
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(InputError, match=f"--penalty-dir {empty}: no images .* in it nor in its train/good"):
        train_bundle("efficientad-s", category, tmp_path / "b", image_size=SIZE, steps=1, export=False,
                     penalty_dir=str(empty))
    assert not (tmp_path / "b").exists()


def test_distill_teacher_cli_resumes_and_the_teacher_trains_efficientad(category, tmp_path):
    gen = tmp_path / "generic"
    r = subprocess.run([sys.executable, "-m", "edge_ad", "generic-images", "--out", str(gen), "--count", "6",
                        "--image-size", str(SIZE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "teacher.pth"
    cmd = [sys.executable, "-m", "edge_ad", "distill-teacher", "--data", str(gen), "--data",
           str(category / "train" / "good"), "--out", str(out), "--image-size", str(SIZE), "--batch-size", "2",
           "--checkpoint-every", "2"]
    r = subprocess.run(cmd + ["--steps", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "after 3 of 3 steps on 22 images" in r.stdout  # 6 generic + 16 normal images
    first = torch.load(out, weights_only=True)
    state = torch.load(out.with_name("teacher.pth.state.pt"), weights_only=True)
    assert state["step"] == 3 and torch.equal(state["model"]["0.weight"], first["0.weight"])
    r = subprocess.run(cmd + ["--steps", "5", "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "after 5 of 5 steps" in r.stdout
    assert not torch.equal(torch.load(out, weights_only=True)["0.weight"], first["0.weight"])
    b = train_bundle("efficientad-s", category, tmp_path / "b", image_size=SIZE, steps=1, export=False,
                     teacher=str(out), penalty_dir=str(gen))
    assert b.model["config"]["teacher"] == "pdn" and b.model["config"]["teacher_channels"] == 152
    assert b.manifest["training"]["penalty"] is True
    assert b.manifest["training"]["penalty_dir"] == {"path": str(gen.resolve()), "images": 6}
    assert b.manifest["training"]["teacher"]["file"] == str(out.resolve())
    r = subprocess.run([sys.executable, "-m", "edge_ad", "distill-teacher", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "t2.pth")], capture_output=True, text=True)
    assert r.returncode == 2 and "none: folder not found" in r.stderr and not (tmp_path / "t2.pth").exists()


def test_resume_refuses_a_run_that_differs_from_the_checkpoint(category, tmp_path):
    """train_state.pt records what defines its run: a --resume with another seed (another validation
    split), image size, model, preset, val fraction, data folder or batch size is refused before any step,
    each difference named with both values; the steps, time budget, checkpoint interval and policy may change."""
    from click.testing import CliRunner
    from edge_ad.cli import main

    other = write_category(tmp_path / "other", n_train=16, n_test_good=0, n_test_defect=0, size=SIZE, seed=2)
    out = tmp_path / "b"
    opts = {"--model": "fader", "--data": str(category), "--out": str(out), "--image-size": str(SIZE),
            "--steps": "2", "--batch-size": "2", "--seed": "3"}

    def train(changed=None, *flags):
        args = [x for kv in {**opts, **(changed or {})}.items() for x in kv]
        return CliRunner().invoke(main, ["train", *args, "--no-export", *flags])

    r = train()
    assert r.exit_code == 0, r.output
    state, manifest = (out / "train_state.pt").read_bytes(), (out / "manifest.json").read_bytes()
    for changed, named in (
            ({"--seed": "5"}, ["--seed: checkpoint 3; this run 5", "validation split: checkpoint 2 files"]),
            ({"--image-size": "96"}, ["--image-size: checkpoint 64; this run 96"]),
            ({"--model": "efficientad-s"}, ["--model: checkpoint fader; this run efficientad-s"]),
            ({"--preset": "paper"}, ["--preset: checkpoint quick; this run paper"]),
            ({"--val-fraction": "0.3"}, ["--val-fraction: checkpoint 0.1; this run 0.3",
                                         "validation split: checkpoint 2 files"]),
            ({"--data": str(other)}, [f"--data: checkpoint {category.resolve()}; this run {other.resolve()}"]),
            ({"--batch-size": "4"}, ["--batch-size: checkpoint 2; this run 4"])):
        r = train({**changed, "--steps": "4"}, "--resume")
        assert r.exit_code == 2, (changed, r.output)
        assert "train_state.pt: --resume refused" in r.output and "Rerun with the checkpoint's options" in r.output
        assert "--device and --policy may change" in " ".join(r.output.split())
        assert "without --resume" in r.output and "--steps:" not in r.output
        assert all(n in r.output for n in named), (changed, r.output)
        assert (out / "train_state.pt").read_bytes() == state, changed  # no step was taken
        assert (out / "manifest.json").read_bytes() == manifest, changed
    r = train({"--steps": "4", "--checkpoint-every": "1", "--max-minutes": "5", "--policy": "sigma:3"}, "--resume")
    assert r.exit_code == 0, r.output
    t = Bundle.open(out).manifest["training"]
    assert t["resumed_at"] == 2 and t["steps"] == 4 and t["seed"] == 3 and t["policy"] == "sigma:3"


def test_resume_refuses_another_teacher_file(category, tmp_path):
    teacher = tmp_path / "teacher_small.pth"
    torch.save(pdn_small(384).state_dict(), teacher)
    kw = dict(image_size=SIZE, steps=1, batch_size=1, export=False)
    train_bundle("efficientad-s", category, tmp_path / "b", teacher=str(teacher), **kw)
    kw["steps"] = 2
    torch.save(pdn_small(384).state_dict(), teacher)  # the same file name, other weights
    with pytest.raises(InputError, match=r"--teacher: checkpoint a PDN file with sha256 [0-9a-f]{16}; "
                                         r"this run a PDN file with sha256 [0-9a-f]{16}\n"):
        train_bundle("efficientad-s", category, tmp_path / "b", teacher=str(teacher), resume=True, **kw)
    with pytest.raises(InputError, match=r"--teacher: checkpoint a PDN file with sha256 [0-9a-f]{16}; this run lite0"):
        train_bundle("efficientad-s", category, tmp_path / "b", resume=True, **kw)


def test_resume_without_a_checkpoint_or_from_an_older_one_is_refused(category, tmp_path):
    from click.testing import CliRunner
    from edge_ad.cli import main

    good = category / "train" / "good"
    fader = ["train", "--model", "fader", "--data", str(category), "--image-size", str(SIZE), "--steps", "2",
             "--batch-size", "2", "--no-export"]
    r = CliRunner().invoke(main, fader + ["--out", str(tmp_path / "n"), "--resume"])
    assert r.exit_code == 2 and f"{tmp_path / 'n' / 'train_state.pt'}: no checkpoint to resume from" in r.output
    assert not (tmp_path / "n").exists()
    r = CliRunner().invoke(main, ["distill-teacher", "--data", str(good), "--out", str(tmp_path / "t.pth"),
                                  "--image-size", str(SIZE), "--steps", "2", "--resume"])
    assert r.exit_code == 2 and "t.pth.state.pt: no checkpoint to resume from" in r.output
    assert not (tmp_path / "t.pth").exists()
    r = CliRunner().invoke(main, ["train", "--model", "gaussian", "--data", str(category), "--out",
                                  str(tmp_path / "g"), "--image-size", str(SIZE), "--resume"])
    assert r.exit_code == 2 and "gaussian model is fitted in one pass" in r.output
    assert not (tmp_path / "g").exists()
    # a state file from an earlier edge-ad (weights, optimizer and RNG only): refused, not trusted
    r = CliRunner().invoke(main, fader + ["--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    st = torch.load(tmp_path / "o" / "train_state.pt", weights_only=True)
    torch.save({k: st[k] for k in ("step", "model", "optimizer", "rng")}, tmp_path / "o" / "train_state.pt")
    r = CliRunner().invoke(main, fader + ["--out", str(tmp_path / "o"), "--resume", "--steps", "3"])
    assert r.exit_code == 2 and "does not record the options of the run that wrote it" in r.output
    assert "run without --resume" in r.output


def _tiny_loop(state, on_step, steps=50, checkpoint_every=1000, **kw):
    """run_loop on a 3-weight model; ``on_step(i)`` runs inside step i, before its loss."""
    from edge_ad.train.loops import LoopConfig, run_loop

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    calls = []

    def step(gen):
        on_step(len(calls))
        calls.append(1)
        return {"loss": model(torch.ones(4, 2)).pow(2).mean()}

    cfg = LoopConfig(steps=steps, state_path=state, checkpoint_every=checkpoint_every, run={"command": "test"}, **kw)
    return model, lambda: run_loop(step, model, list(model.parameters()), cfg, "test")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_loop_after_the_step_and_saves_its_state(tmp_path, sig):
    import signal
    from edge_ad.train.loops import Interrupted

    sig = getattr(signal, sig)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    state = tmp_path / "train_state.pt"
    model, run = _tiny_loop(state, lambda i: i == 2 and signal.raise_signal(sig))
    with pytest.raises(Interrupted) as exc:
        run()
    assert str(exc.value) == (f"interrupted at step 3 of 50; the training state is in {state}: rerun the same "
                              "command with --resume to continue")
    st = torch.load(state, weights_only=True)
    assert st["step"] == 3 and torch.equal(st["model"]["weight"], model.weight)  # the step was finished
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    model, run = _tiny_loop(state, lambda i: None, resume=True)
    assert run()["resumed_at"] == 3


def test_a_non_finite_loss_stops_the_loop_and_no_nan_state_is_saved(tmp_path):
    """A NaN loss trained every step on loss=nan and saved its NaN weights for --resume; now the loop stops
    at it (read every 10 steps and before each save) naming the step, and keeps only a finite checkpoint."""
    state = tmp_path / "train_state.pt"
    held = {}

    def poison_at(n):
        return lambda i: i == n and held["model"].weight.data.fill_(float("nan"))

    held["model"], run = _tiny_loop(state, poison_at(5), checkpoint_every=3)
    with pytest.raises(InputError, match=rf"^test: the loss is not finite \(NaN or inf\) at step 6 of 50 \(loss\): "
                       rf"training stopped there, .*\({re.escape(str(state))} keeps the last checkpoint saved "
                       r"before it\)\. Likely causes: a learning rate too high \(learning rate 0\.0001\), images"):
        run()
    st = torch.load(state, weights_only=True)
    assert st["step"] == 3 and all(torch.isfinite(v).all() for v in st["model"].values())
    state.unlink()
    held["model"], run = _tiny_loop(state, poison_at(12), steps=15)  # between two reads: found at the end
    with pytest.raises(InputError, match=r"at step 13 of 15 .*\(no training state was saved\)") as exc:
        run()
    assert not state.exists()
    assert str(exc.value).endswith("not finite") and "--lr" not in str(exc.value)  # no option to name (--adapt)


def test_a_non_finite_loss_says_to_train_again_with_a_lower_lr_which_works(category, tmp_path, monkeypatch):
    """The error named a learning rate too high as the likely cause and kept the checkpoint before it, but
    --resume refuses another learning rate (it is part of the run) and with the same one it takes the same steps
    again to the same NaN; and the command had no option to lower it. It now says to train again from step 0
    with a lower --lr (train and distill-teacher have one), and that works."""
    from click.testing import CliRunner
    from edge_ad.cli import main
    from edge_ad.train import loops

    real = loops.lr_at
    too_high = []   # the command's default learning rate blows the weights up (a NaN) from the third step on
    monkeypatch.setattr(loops, "lr_at", lambda step, cfg, *a: float("nan") if step >= 2 and cfg.lr in too_high
                        else real(step, cfg, *a))
    out = tmp_path / "b"
    train = ["train", "--model", "fader", "--data", str(category), "--out", str(out), "--image-size", str(SIZE),
             "--steps", "4", "--batch-size", "2", "--checkpoint-every", "1", "--no-export"]
    distill = ["distill-teacher", "--data", str(category / "train" / "good"), "--out", str(tmp_path / "t.pth"),
               "--image-size", str(SIZE), "--steps", "4", "--batch-size", "2", "--checkpoint-every", "1"]
    for cmd, lr, lower, state in ((train, "0.001", "0.0001", out / "train_state.pt"),
                                  (distill, "0.0001", "1e-05", tmp_path / "t.pth.state.pt")):
        too_high[:] = [float(lr)]
        for flags in ([], ["--resume"]):   # the same steps again from the checkpoint: the same stop
            r = CliRunner().invoke(main, cmd + flags)
            assert r.exit_code == 2 and "not finite (NaN or inf) at" in r.output, r.output
            assert f"(learning rate {float(lr):g})" in r.output, r.output
            assert (f"for the learning rate, train again from step 0 (without --resume) with a lower --lr, e.g. "
                    f"--lr {lower}: --resume refuses another learning rate") in " ".join(r.output.split()), r.output
            assert torch.load(state, weights_only=True)["step"] == 2
        r = CliRunner().invoke(main, cmd + ["--resume", "--lr", lower])
        assert r.exit_code == 2 and f"learning rate: checkpoint {lr}; this run {lower}" in r.output, r.output
        r = CliRunner().invoke(main, cmd + ["--lr", lower])   # the way out the error gives
        assert r.exit_code == 0, r.output
    assert Bundle.open(out).manifest["training"]["lr"] == 1e-4 and (tmp_path / "t.pth").is_file()


def test_a_fresh_training_that_fails_before_a_checkpoint_leaves_no_out_folder(category, tmp_path, monkeypatch):
    """A fresh run made --out for its checkpoints and, failing before the first (a non-finite loss, a crash in the
    first steps), left it empty (and the folders above it it made). It leaves nothing it made now; an --out that
    was there before stays, and one failed after a checkpoint keeps it for --resume."""
    from edge_ad.train import loops

    real_lr_at = loops.lr_at
    monkeypatch.setattr(loops, "lr_at", lambda *a, **k: float("nan"))   # NaN weights: the loss is not finite
    kw = dict(image_size=SIZE, batch_size=1, steps=3, export=False)
    out = tmp_path / "new" / "bundles" / "b"
    with pytest.raises(InputError, match="the loss is not finite"):
        train_bundle("efficientad-s", category, out, **kw)
    assert list(tmp_path.iterdir()) == []                         # neither b nor the folders made above it
    out.mkdir(parents=True)                                       # an empty --out that was there before
    with pytest.raises(InputError, match="the loss is not finite"):
        train_bundle("efficientad-s", category, out, **kw)
    assert out.is_dir() and list(out.iterdir()) == []
    out.rmdir()

    def crash(*a, **k):                                           # a crash after the first checkpoint
        if not (out / "train_state.pt").exists():
            return real_lr_at(*a, **k)
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(loops, "lr_at", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train_bundle("fader", category, out, checkpoint_every=1, **kw)
    assert [p.name for p in out.iterdir()] == ["train_state.pt"]  # kept for --resume


def test_weights_made_non_finite_by_a_finite_loss_stop_the_loop_with_the_same_error(category, tmp_path,
                                                                                     monkeypatch):
    """A NaN step size leaves the loss of its step finite and the weights NaN. FADeR's next step then failed inside
    its binary cross-entropy ('all elements of input should be between 0 and 1'), a traceback; and a checkpoint or
    a bundle could be written from those weights. The weights are now read before a save, when a step fails and at
    the end: the same InputError as a non-finite loss, and no state of them is saved."""
    from edge_ad.train import loops

    monkeypatch.setattr(loops, "lr_at", lambda *a, **k: float("nan"))
    kw = dict(image_size=SIZE, batch_size=1, export=False)
    with pytest.raises(InputError, match=r"the weights are not finite \(NaN or inf\) at step 2 of 3, where the "
                                         r"step failed, though the losses were"):
        train_bundle("fader", category, tmp_path / "f", steps=3, **kw)
    with pytest.raises(InputError, match=r"the weights are not finite \(NaN or inf\) at the checkpoint of step 1"):
        train_bundle("efficientad-s", category, tmp_path / "e", steps=3, checkpoint_every=1, **kw)
    assert not (tmp_path / "f").exists() and not (tmp_path / "e").exists()    # nothing saved from NaN weights


def test_a_teacher_file_with_a_nan_is_refused_when_read(tmp_path):
    sd = pdn_small(8).state_dict()
    sd["6.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(InputError, match=r"t\.pth: layer 6\.weight holds 1 non-finite value \(NaN or inf\) of "
                       r"589824; the teacher file is damaged"):
        train_bundle("efficientad-s", tmp_path / "no data", tmp_path / "b", image_size=SIZE, steps=1,
                     teacher=str(tmp_path / "t.pth"))
    assert not (tmp_path / "b").exists()


def test_off_a_terminal_the_loss_postfix_prints_no_line_of_its_own(tmp_path, capsys):
    """The loss shown every 10 steps refreshed the bar: a line every 10 steps in a log, not one every 30 s.
    A fast loop of 200 steps now prints its first and last line only."""
    _, run = _tiny_loop(tmp_path / "train_state.pt", lambda i: None, steps=200)
    run()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("test:")]
    assert len(lines) == 2 and "0/200" in lines[0] and "200/200" in lines[1] and "loss=" in lines[1], err


def test_off_a_terminal_the_end_of_a_bar_is_one_line(capsys):
    """A training whose last step came 30 s after the bar's previous line printed its 100% line twice in a log:
    the last update printed it, and tqdm's close printed it again. The end is one line now; close still prints
    it when the last update did not, or when the loss shown changed since."""
    from edge_ad.train.common import progress_bar

    def bar(desc, total):
        b = progress_bar(total, desc, "step")
        b.mininterval, b.miniters, b.dynamic_miniters = 0, 1, False   # every update prints, as after 30 s
        return b

    b = bar("every", 3)
    for _ in range(3):
        b.update(1)
    b.close()
    b = bar("postfix", 2)
    b.update(2)
    b.set_postfix(loss="0.5", refresh=False)
    b.close()
    with progress_bar(2, "quiet", "step") as b:      # the usual: the last update prints no line
        b.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert [x.split(":")[0] + " " + x.split("|")[2].split()[0] for x in lines if " 0%" not in x] == [
        "every 1/3", "every 2/3", "every 3/3", "postfix 2/2", "postfix 2/2", "quiet 2/2"], lines
    assert "loss=0.5" in [x for x in lines if x.startswith("postfix")][-1]


def test_efficientads_teacher_normalization_shows_progress_off_a_terminal(capsys):
    """Its pass over every training image printed nothing in a log (CI, journald); it is a progress bar now, each
    state a line of its own off a terminal."""
    from edge_ad.train.loops import fit_teacher_normalization

    class Teacher(torch.nn.Module):            # EfficientAD's interface, the teacher's features: two channels
        def __init__(self):
            super().__init__()
            self.register_buffer("t_mean", torch.zeros(1, 2, 1, 1))
            self.register_buffer("t_std", torch.ones(1, 2, 1, 1))

        def teacher_features(self, x):
            return x[:, :2]

    model = Teacher()
    fit_teacher_normalization(model, torch.arange(10 * 3 * 4 * 4, dtype=torch.float32).view(10, 3, 4, 4), "cpu",
                              batch=4)
    err = capsys.readouterr().err
    states = [x for x in err.splitlines() if x.startswith("teacher normalization: ")]
    assert "0%" in states[0] and " 10/10 " in states[-1] and "\r" not in err, err
    assert model.t_std.flatten().tolist()[0] > 1                       # and it still fits


def test_a_closed_stderr_drops_the_progress_bar_not_the_training(tmp_path, monkeypatch, caplog):
    """`edge-ad train ... 2>&1 | head -1`: once the pipe's reader is gone the bar's write raised BrokenPipeError
    and the training died, nothing saved; now the bar goes quiet and the loop ends and saves as usual."""
    class ClosedPipe:
        writes = 0

        def write(self, text):
            ClosedPipe.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    state = tmp_path / "train_state.pt"
    _, run = _tiny_loop(state, lambda i: None, steps=5)
    with caplog.at_level("WARNING", logger="edge_ad.train.loops"):
        assert run()["steps"] == 5
    assert torch.load(state, weights_only=True)["step"] == 5
    assert ClosedPipe.writes == 1 and "progress output dropped, training goes on" in caplog.text


def test_a_second_ctrl_c_aborts_at_once_and_threads_keep_the_old_behaviour(tmp_path):
    import signal
    import threading

    def twice(i):
        if i == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the default handler raises here, in the middle of the step

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _, run = _tiny_loop(tmp_path / "s.pt", twice)
    with pytest.raises(KeyboardInterrupt) as exc:
        run()
    assert type(exc.value) is KeyboardInterrupt and not (tmp_path / "s.pt").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    # outside the main thread no handler can be installed: the loop runs as before
    _, run = _tiny_loop(tmp_path / "t.pt", lambda i: None, steps=3)
    res = []
    t = threading.Thread(target=lambda: res.append(run()))
    t.start()
    t.join()
    assert res and res[0]["steps"] == 3


HOOK = """import sys
import edge_ad.train.loops as loops
real = loops.lr_at
def lr_at(step, *a):
    print("step", step, flush=True)
    return real(step, *a)
loops.lr_at = lr_at
from edge_ad.cli import main
main(sys.argv[1:], prog_name="edge-ad")
"""


def test_ctrl_c_during_train_saves_the_state_for_resume_and_keeps_the_bundle(category, tmp_path):
    """Ctrl-C (SIGINT from outside, as a terminal sends it) finishes the step, saves train_state.pt at the step
    reached, exits 130 naming it; the bundle already in --out is left whole; --resume goes on from there."""
    import re
    import signal

    out = tmp_path / "b"
    train_bundle("efficientad-s", category, out, image_size=SIZE, steps=1, export=False)
    before = {k: v for k, v in _files(out).items() if k != "train_state.pt"}
    args = ["train", "--model", "efficientad-s", "--data", str(category), "--out", str(out), "--image-size",
            str(SIZE), "--no-export"]
    p = subprocess.Popen([sys.executable, "-c", HOOK, *args, "--steps", "1000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # the hook's line at the start of each step
        if line.strip() == "step 2":
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    m = re.search(r"interrupted at step (\d+) of 1000; the training state is in (.+): rerun the same command "
                  r"with --resume to continue", err)
    assert m and m.group(2) == str(out / "train_state.pt"), err
    n = int(m.group(1))
    assert n >= 3 and torch.load(out / "train_state.pt", weights_only=True)["step"] == n
    assert {k: v for k, v in _files(out).items() if k != "train_state.pt"} == before  # no bundle written
    Bundle.open(out, verify=True)
    r = subprocess.run([sys.executable, "-m", "edge_ad", *args, "--steps", str(n + 2), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"at step {n}" in r.stderr
    t = Bundle.open(out).manifest["training"]
    assert t["resumed_at"] == n and t["steps"] == n + 2


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_during_distill_saves_its_state_for_resume(category, tmp_path, monkeypatch, sig, code):
    """Ctrl-C or SIGTERM: the state saved, exit 128 + the signal (SIGTERM exited 130, SIGINT's code)."""
    import signal

    from click.testing import CliRunner
    import edge_ad.train.loops as loops
    from edge_ad.cli import main

    real = loops.lr_at
    monkeypatch.setattr(loops, "lr_at", lambda step, *a: (step == 1 and signal.raise_signal(getattr(signal, sig)))
                        or real(step, *a))
    out = tmp_path / "t.pth"
    cmd = ["distill-teacher", "--data", str(category / "train" / "good"), "--out", str(out), "--image-size",
           str(SIZE), "--batch-size", "2", "--steps", "5"]
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == code and (f"interrupted at step 2 of 5; the training state is in {out}.state.pt: rerun "
                                   "the same command with --resume to continue") in r.output
    assert not out.exists() and torch.load(f"{out}.state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(loops, "lr_at", real)
    r = CliRunner().invoke(main, cmd + ["--resume"])
    assert r.exit_code == 0 and "after 5 of 5 steps" in r.output and out.is_file()


def test_distill_resume_refuses_another_image_size_or_folder(category, tmp_path):
    from edge_ad.train.distill import distill

    good, other, out = category / "train" / "good", category / "test" / "good", tmp_path / "t.pth"
    kw = dict(image_size=SIZE, batch_size=2, checkpoint_every=1)
    distill(good, out, steps=2, **kw)
    state = out.with_name("t.pth.state.pt")
    before = state.read_bytes()
    with pytest.raises(InputError, match="--image-size: checkpoint 64; this run 96"):
        distill(good, out, steps=3, resume=True, **{**kw, "image_size": 96})
    with pytest.raises(InputError, match="--size: checkpoint s; this run m"):
        distill(good, out, size="m", steps=3, resume=True, **kw)
    with pytest.raises(InputError) as exc:
        distill(other, out, steps=3, resume=True, **kw)
    assert f"--data: checkpoint [{good.resolve()}]; this run [{other.resolve()}]" in str(exc.value)
    assert "images: checkpoint 16 files" in str(exc.value) and "this run 6 files" in str(exc.value)
    assert state.read_bytes() == before
    stats = torch.load(state, weights_only=True)["extra"]  # the targets' normalization, taken back at resume
    info = distill(good, out, steps=3, resume=True, **{**kw, "checkpoint_every": 5})  # more steps: allowed
    assert info["resumed_at"] == 2 and info["steps"] == 3
    assert torch.equal(torch.load(state, weights_only=True)["extra"]["f_std"], stats["f_std"])


def test_distill_takes_an_mvtec_categorys_train_good(category, tmp_path, caplog):
    from edge_ad.train.distill import distill

    info = distill(category, tmp_path / "t.pth", image_size=SIZE, steps=1, batch_size=1)
    assert info["images"] == 16 and (tmp_path / "t.pth").is_file()
    assert f"--data {category} holds no images itself: using its train/good (16 images)" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: need at least 2 images \(.png, .jpg.*found 0 \(an MVTec "
                                         r"category's are taken from its train/good\)"):
        distill(tmp_path / "empty", tmp_path / "u.pth", image_size=SIZE, steps=1)


def test_distill_time_budget_stops_and_writes_the_teacher(category, tmp_path):
    from edge_ad.train.distill import distill

    info = distill(category / "train" / "good", tmp_path / "t.pth", image_size=SIZE, steps=100000, batch_size=1,
                   max_minutes=0.03)
    assert info["stopped_by_time_budget"] and 0 < info["steps"] < 100000 and (tmp_path / "t.pth").is_file()
    with pytest.raises(InputError, match="--max-minutes"):
        distill(category / "train" / "good", tmp_path / "u.pth", image_size=SIZE, max_minutes=-1)


def test_bad_data_folder_is_named(tmp_path):
    with pytest.raises(InputError, match="train/good"):
        train_bundle("gaussian", tmp_path, tmp_path / "b", image_size=SIZE)


def test_too_few_normal_images_says_how_many_are_needed(tmp_path):
    from click.testing import CliRunner
    from edge_ad.cli import main

    data = write_category(tmp_path / "few", n_train=6, n_test_good=0, n_test_defect=0, size=SIZE, kind="grain")
    cmd = ["train", "--model", "gaussian", "--data", str(data), "--image-size", str(SIZE)]
    r = CliRunner().invoke(main, cmd + ["--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "6 normal training images are too few" in r.output
    assert "keeps 1 and training 5" in r.output and "at least 15 images" in r.output
    assert not (tmp_path / "b").exists()
    # a larger held-out share makes the same six images enough
    r = CliRunner().invoke(main, cmd + ["--out", str(tmp_path / "c"), "--val-fraction", "0.4", "--no-export"])
    assert r.exit_code == 0, r.output
    assert Bundle.open(tmp_path / "c").calibration().normal["n"] == 2


def test_val_fraction_advice_is_quick_and_points_the_right_way(tmp_path):
    from edge_ad.data.mvtec import smallest_split, split_train_val

    for f in (0.1, 0.4, 0.95, 1e-5):   # computed, not searched by splitting n = 4, 5, ... (1e-5 hung)
        n = smallest_split(f)
        assert all(len(part) >= 2 for part in split_train_val(range(n), f))
        assert any(len(part) < 2 for part in split_train_val(range(n - 1), f)), f
    assert smallest_split(0.1) == 15 and smallest_split(1e-7) == 15_000_000
    data = write_category(tmp_path / "few", n_train=6, n_test_good=0, n_test_defect=0, size=SIZE, kind="grain")
    with pytest.raises(InputError, match="keeps 5 and training 1.*or a smaller --val-fraction"):
        train_bundle("gaussian", data, tmp_path / "b", image_size=SIZE, val_fraction=0.95)
    with pytest.raises(InputError, match="sigma:inf"):          # was found only after training
        train_bundle("gaussian", data, tmp_path / "b", image_size=SIZE, policy="sigma:inf")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, named", [
    (["--steps", "0"], "--steps 0: expected a positive whole number"),
    (["--steps", "-1"], "--steps -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--seed", "-1"], "--seed -1: expected a whole number from 0 to 2**64"),
    (["--image-size", "0"], "image size 0: expected a multiple of 32 from 64 to 4096"),   # was a cv2 traceback
    (["--image-size", "4128"], "image size 4128"),             # was refused by the manifest after training
    (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),                  # was a torch traceback
    (["--lr", "0"], "--lr 0.0: expected a positive finite number"),
    (["--lr", "nan"], "--lr nan: expected a positive finite number"),
])
def test_bad_run_options_are_named_before_anything_is_written(category, tmp_path, args, named):
    from edge_ad.cli import main
    from click.testing import CliRunner

    for cmd in (["train", "--model", "efficientad-s", "--data", str(category), "--out", str(tmp_path / "b")],
                ["distill-teacher", "--data", str(category / "train" / "good"), "--out", str(tmp_path / "t.pth")]):
        r = CliRunner().invoke(main, cmd + ["--image-size", str(SIZE)] + args)
        assert r.exit_code == 2 and named in r.output, (cmd[0], r.output)
        assert not r.exception or isinstance(r.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []


def test_distill_checks_its_output_and_size_before_training(category, tmp_path):
    from edge_ad.train.distill import distill

    good = category / "train" / "good"
    with pytest.raises(InputError, match="is a folder; expected a file name"):
        distill(good, tmp_path, image_size=SIZE, steps=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; a folder was expected there"):
        distill(good, tmp_path / "file" / "t.pth", image_size=SIZE, steps=1)
    with pytest.raises(InputError, match="image size 63: expected a multiple of 32"):
        distill(good, tmp_path / "t.pth", image_size=63, steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no checkpoint, no teacher


def test_corrupt_weight_files_are_named(category, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    for name, match in (("junk.pth", "unreadable teacher file: not a complete PyTorch weights file"),
                        ("cut.pth", "unreadable teacher file"),
                        ("tensor.pth", "holds a Tensor, expected a dict of tensors")):
        with pytest.raises(InputError, match=match) as exc:
            train_bundle("efficientad-s", category, tmp_path / "b", image_size=SIZE, steps=1, export=False,
                         teacher=str(tmp_path / name))
        assert name in str(exc.value)
    assert not (tmp_path / "b").exists()
    # a corrupt training state on --resume, and a corrupt bundle checkpoint for the torch backend
    b = train_bundle("efficientad-s", category, tmp_path / "e", image_size=SIZE, steps=2, batch_size=1,
                     checkpoint_every=1, export=False)
    (tmp_path / "e" / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="train_state.pt: unreadable training checkpoint"):
        train_bundle("efficientad-s", category, tmp_path / "e", image_size=SIZE, steps=3, batch_size=1,
                     export=False, resume=True)
    (tmp_path / "e" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="checkpoint.pt: unreadable checkpoint"):
        load_from_bundle(Bundle.open(b.path))


def test_cli_names_a_file_where_a_folder_must_be(tmp_path):
    (tmp_path / "taken").write_text("x")
    r = subprocess.run([sys.executable, "-m", "edge_ad", "generic-images", "--out", str(tmp_path / "taken"),
                        "--count", "2", "--image-size", "32"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "taken: is a file; expected a folder" in r.stderr and "Traceback" not in r.stderr


def test_cli_train_then_eval_reports_and_pictures(category, tmp_path):
    """Also: the loading of the images and the Gaussian's feature extraction, fit and validation pass show progress
    off a terminal (nothing was printed for minutes on a real category), each state a line of its own; no "0 steps"
    for its one pass."""
    out = tmp_path / "g"
    r = subprocess.run([sys.executable, "-m", "edge_ad", "train", "--model", "gaussian", "--data", str(category),
                        "--out", str(out), "--image-size", str(SIZE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    for stage, total in (("loading train images", 14), ("loading validation images", 2),
                         ("features of the train images", 14), ("fitting the Gaussians", 64),
                         ("scoring the validation images", 2)):
        states = [x for x in lines if x.startswith(f"{stage}: ")]
        assert "0%" in states[0] and f" {total}/{total} " in states[-1], r.stderr
    assert "\r" not in r.stderr and ", fitted on 14 images in " in r.stdout and "steps" not in r.stdout
    assert (out / "model.onnx").is_file()
    assert f"wrote {out / 'model.onnx'} (" in r.stderr and ".new-" not in r.stderr   # not the staging folder
    r = subprocess.run([sys.executable, "-m", "edge_ad", "eval", "--bundle", str(out), "--data", str(category),
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["backend"] == "onnxruntime" and rep["graph"] == "model.onnx"   # the graph file that ran
    assert set(rep["per_type"]) >= {"good", "scratch"}
    assert rep["overall"]["image_auroc"] > 0.7
    # every test image by its path under --data, sorted by type then path, decided as the loop decides
    samples = rep["samples"]
    assert len(samples) == rep["overall"]["n"] and {s["type"] for s in samples} == set(rep["per_type"])
    assert samples == sorted(samples, key=lambda s: (s["type"], s["path"]))
    assert all((category / s["path"]).is_file() and s["path"].startswith(f"test/{s['type']}/") for s in samples)
    thr = rep["overall"]["threshold"]
    assert all(s["decision"] == ("NG" if s["score"] > thr else "OK") for s in samples)
    good = [s for s in samples if s["type"] == "good"]
    assert sum(s["decision"] == "NG" for s in good) / len(good) == pytest.approx(rep["per_type"]["good"]["fpr"])
    assert json.loads((out / "eval" / "report.json").read_text())["samples"] == samples
    assert (out / "eval" / "grid.png").stat().st_size > 1000
    assert (out / "eval" / "histogram.png").is_file()
    r = subprocess.run([sys.executable, "-m", "edge_ad", "eval", "--bundle", str(out), "--data", str(category),
                        "--out", str(tmp_path / "e2")], capture_output=True, text=True)
    assert r.returncode == 0 and "gaussian (onnxruntime fp32 model.onnx, calibration v1)" in r.stdout, r.stdout
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, "-m", "edge_ad", "eval", "--bundle", str(out), "--data", str(category),
                        "--out", str(tmp_path / "afile")], capture_output=True, text=True)
    assert r.returncode == 2 and "afile: is a file; expected a folder" in r.stderr
    assert "eval (" not in r.stderr                   # refused before any batch was inferred
    r = subprocess.run([sys.executable, "-m", "edge_ad", "eval", "--bundle", str(tmp_path / "missing"),
                        "--data", str(category)], capture_output=True, text=True)
    assert r.returncode == 2 and "bundle folder not found" in r.stderr


def test_eval_says_where_it_wrote_the_report_and_pictures(category, tmp_path):
    """'edge-ad eval' wrote BUNDLE/eval/report.json, grid.png and histogram.png without a word about where (the
    demo names them). The text report ends with the paths written; --json (and report.json) has them in
    'files'."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from fixtures_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "tiny")
    r = CliRunner()
    res = r.invoke(main, ["eval", "--bundle", str(b.path), "--data", str(category)])
    assert res.exit_code == 0, res.output
    out = b.path / "eval"
    assert res.stdout.rstrip().splitlines()[-1] == (f"wrote {out / 'report.json'}, {out / 'grid.png'}, "
                                                    f"{out / 'histogram.png'}"), res.stdout
    res = r.invoke(main, ["eval", "--bundle", str(b.path), "--data", str(category), "--out", str(tmp_path / "e"),
                          "--json"])
    files = json.loads(res.stdout)["files"]
    assert files == {"report": str(tmp_path / "e" / "report.json"), "grid": str(tmp_path / "e" / "grid.png"),
                     "histogram": str(tmp_path / "e" / "histogram.png")}
    assert all(Path(f).is_file() for f in files.values())
    assert json.loads((tmp_path / "e" / "report.json").read_text())["files"] == files
    # a refused input makes no --out folder (it was made before --data was read: an empty one each time)
    for args in (["--data", str(tmp_path / "no data")], ["--data", str(category), "--backend", "nope"]):
        res = r.invoke(main, ["eval", "--bundle", str(b.path), *args, "--out", str(tmp_path / "new" / "e")])
        assert res.exit_code == 2 and not (tmp_path / "new").exists(), res.output


def test_the_training_images_bit_depth_is_recorded_and_eval_warns_about_images_of_another(category, tmp_path,
                                                                                           caplog):
    """12-bit grey camera data in 16-bit PNGs trains a model on 0..15 of 255; the same parts as 8-bit colour
    images read 0..255, and their scores do not match. The manifest records the bit depth, channels and low
    bits of the training images ('data'), and eval warns once, naming both, about test images of another
    bit depth; images like the training ones, or a bundle without the record (an older one), get none."""
    import shutil

    import cv2

    from edge_ad.evaluate import evaluate

    deep = tmp_path / "mono12"
    for p in sorted(category.rglob("*.png")):
        q = deep / p.relative_to(category)
        q.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in p.parts:
            shutil.copyfile(p, q)
        else:                                   # 12-bit data stored in 16 bits, as camera SDKs save Mono12
            assert cv2.imwrite(str(q), cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16)
    b = train_bundle("gaussian", deep, tmp_path / "b", image_size=SIZE)
    assert Bundle.open(b.path).manifest["data"] == {"bit_depth": 16, "channels": 1, "low_bits": 12}

    def warned():
        return [r.getMessage() for r in caplog.records if "was trained on" in r.getMessage()]

    caplog.set_level("WARNING")
    caplog.clear()
    evaluate(b.path, category, out_dir=tmp_path / "e1", progress=False, pictures=False)
    assert len(warned()) == 1, warned()        # once, for the first image of another bit depth
    first = MVTecCategory(category).test_samples()[0].path
    assert warned()[0].startswith(f"{first}: an 8-bit colour image, and {b.path} was trained on 16-bit (values "
                                  "within 12 bits) grey images (manifest.json 'data'): its pixels do not come out "
                                  "as the training images' did, so its scores may not match"), warned()
    caplog.clear()
    evaluate(b.path, deep, out_dir=tmp_path / "e2", progress=False, pictures=False)
    assert warned() == []                      # the bit depth it was trained on
    old = Bundle.open(b.path)
    del old.manifest["data"]                   # a bundle trained before the record was written
    old.save_manifest()
    caplog.clear()
    evaluate(b.path, category, out_dir=tmp_path / "e3", progress=False, pictures=False)
    assert warned() == []


def test_planted_anomalies_mark_what_they_change():
    from edge_ad.train.common import planted_anomalies

    x = torch.full((64, 3, 128, 128), 128.0)
    x += torch.linspace(-20, 20, 128).view(1, 1, 1, -1)  # a gradient, so pasted patches differ
    out, mask = planted_anomalies(x, torch.Generator().manual_seed(3), x.flip(-1), p=1.0)
    changed = (out - x).abs().amax(dim=1, keepdim=True) > 0
    assert not (changed & (mask == 0)).any(), "pixels changed outside the returned mask"
    assert (mask.flatten(1).amax(1) > 0).all(), "p=1.0 must plant into every image"
    assert (out >= 0).all() and (out <= 255).all()
    again, mask2 = planted_anomalies(x, torch.Generator().manual_seed(3), x.flip(-1), p=1.0)
    assert torch.equal(again, out) and torch.equal(mask2, mask)
    _, none = planted_anomalies(x, torch.Generator().manual_seed(3), x.flip(-1), p=0.0)
    assert not none.any()


def test_efficientad_jitter_changes_one_property_per_image():
    """EfficientAD's I' applies ONE of brightness / contrast / saturation per image (Algorithm 1)."""
    from edge_ad.train.common import color_jitter

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(40, 200, size=(64, 3, 16, 16)).astype(np.float32))
    out = color_jitter(x, 0.2, torch.Generator().manual_seed(1), one_of=True)

    def grey(v):
        return 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]

    kinds = set()
    for a, b in zip(x, out):
        ratio = (b / a).flatten()
        if torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4):  # brightness: one scale factor
            kinds.add("brightness")
            continue
        ga, gb = grey(a[None])[0], grey(b[None])[0]
        if torch.allclose(ga, gb, atol=1e-3):  # saturation keeps the grey image
            kinds.add("saturation")
            continue
        # contrast keeps the grey mean and scales every deviation from it by one factor
        m = ga.mean()
        dev_a, dev_b = (a - m).flatten(), (b - m).flatten()
        f = (dev_a @ dev_b) / (dev_a @ dev_a)
        assert torch.allclose(dev_b, f * dev_a, atol=1e-2), "not one of the three single jitters"
        kinds.add("contrast")
    assert kinds == {"brightness", "contrast", "saturation"}
    both = color_jitter(x, 0.2, torch.Generator().manual_seed(1))  # distillation: all three in turn
    assert not torch.equal(both, out)


def test_hard_feature_threshold_keeps_what_the_papers_quantile_keeps():
    from edge_ad.train.loops import quantile_rank

    for n in (1, 2, 7, 1000, 1001, 56 * 56 * 8):
        x = torch.rand(n, generator=torch.Generator().manual_seed(n))
        for q in (0.0, 0.5, 0.9, 0.999, 1.0):
            kept = (x >= x.kthvalue(quantile_rank(n, q)).values).sum()
            assert kept == (x >= torch.quantile(x, q)).sum(), (n, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device")
@pytest.mark.parametrize("kind", ["efficientad-s", "fader"])
def test_training_on_cuda_writes_a_bundle_that_scores_like_cpu(category, tmp_path, kind):
    """`--device cuda`: the images live on the GPU, random draws stay on the CPU generator; the bundle's
    ONNX graph (exported on the CPU) gives the trained module's maps."""
    from edge_ad.runtime.backends import open_backend

    b = train_bundle(kind, category, tmp_path / "b", image_size=SIZE, steps=20, batch_size=2, device="cuda")
    assert b.manifest["training"]["device"] == "cuda" and b.manifest["training"]["steps"] == 20
    assert all(np.isfinite(v) for v in b.manifest["training"]["final_losses"].values())
    m = load_from_bundle(b).eval()
    x = np.random.default_rng(0).uniform(0, 255, (3, 3, SIZE, SIZE)).astype(np.float32)
    with torch.inference_mode():
        ref = [t.numpy() for t in m(torch.from_numpy(x))]
        gpu = [t.cpu().numpy() for t in m.cuda()(torch.from_numpy(x).cuda())]
    with open_backend(b, "onnxruntime", "fp32", "cpu") as be:
        out = be.infer(x)
    for name, r, g in zip(m.output_names, ref, gpu):
        assert np.max(np.abs(out[name] - r)) / np.max(np.abs(r)) <= 1e-4
        assert np.max(np.abs(g - r)) / np.max(np.abs(r)) <= 1e-2  # TF32 convolutions on the GPU


@pytest.mark.parametrize("kind", ["efficientad-s", "fader", "gaussian"])
def test_every_model_runs_in_half_precision(kind):
    """The torch backend's fp16 (CUDA) calls module.half(): no tensor made inside forward may stay fp32
    (FADeR's mask did, and its fp16 run failed on the GPU). Checked on the CPU, which runs fp16 convs."""
    m = build(kind, SIZE, None, pretrained=False).eval().half()
    with torch.inference_mode():
        out = m(torch.rand(1, 3, SIZE, SIZE).half() * 255)
    assert all(o.dtype == torch.float16 and torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("model, extra, named", [
    ("fader", ["--teacher", "lite0", "--penalty-dir", "g"], ["--teacher applies to efficientad-s, efficientad-m",
                                                             "--penalty-dir applies to"]),
    ("gaussian", ["--steps", "5", "--checkpoint-every", "2", "--lr", "1e-3"],
     ["--steps applies to", "--checkpoint-every applies to", "--lr applies to", "fitted in one pass"]),
    ("efficientad-s", ["--gaussian-layout", "image"], ["--gaussian-layout applies to gaussian only"]),
])
def test_train_refuses_options_the_model_does_not_use(tmp_path, model, extra, named):
    """An engineer comparing 'fader with my teacher' against EfficientAD must not get a silent no-op."""
    from click.testing import CliRunner
    from edge_ad.cli import main

    r = CliRunner().invoke(main, ["train", "--model", model, "--data", str(tmp_path / "nodata"), "--out",
                                  str(tmp_path / "b"), *extra])
    assert r.exit_code == 2 and f"--model {model} does not use" in r.output, r.output
    assert all(n in r.output for n in named), r.output
    assert not (tmp_path / "b").exists()


_HOLD = ("import sys, time\nfrom edge_ad import atomic\n"
         "with atomic.output_lock(sys.argv[1], 'busy (pid {pid})'):\n"
         "    print('held', flush=True)\n    time.sleep(120)\n")


def _holder(path):
    """Another process holding ``path``'s output lock, as a training into it would."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_training_into_the_same_out_is_refused_naming_the_first(category, tmp_path):
    """Two `edge-ad train --out B` at once both wrote checkpoints into B and switched their bundles in; the
    second is refused at once (exit 2) naming the folder and the first's pid, with nothing changed."""
    from click.testing import CliRunner
    from edge_ad.cli import main

    out = tmp_path / "bundles" / "b"
    train_bundle("gaussian", category, out, image_size=SIZE, export=False)
    assert not (out.parent / ".b.lock").exists()                 # released: the lock file goes with it
    before = sorted(p.name for p in out.iterdir())
    holder = _holder(out)
    try:
        r = CliRunner().invoke(main, ["train", "--model", "gaussian", "--data", str(category), "--out", str(out),
                                      "--image-size", str(SIZE), "--no-export"])
        assert r.exit_code == 2, r.output
        assert f"--out {out}: another edge-ad train into this folder is running (pid {holder.pid})" in r.output
        assert sorted(p.name for p in out.iterdir()) == before
        assert sorted(p.name for p in out.parent.iterdir()) == [".b.lock", "b"]   # no staging folder
        with pytest.raises(InputError, match=rf"pid {holder.pid}"):  # --resume as well (efficientad)
            train_bundle("efficientad-s", category, out, image_size=SIZE, steps=1, resume=True)
        teacher = tmp_path / "teacher.pth"
        t_holder = _holder(teacher)
        try:
            r = CliRunner().invoke(main, ["distill-teacher", "--data", str(category / "train" / "good"),
                                          "--out", str(teacher), "--steps", "1"])
            assert r.exit_code == 2, r.output
            assert f"--out {teacher}: another edge-ad distill-teacher" in r.output and f"pid {t_holder.pid}" in r.output
            assert not teacher.exists() and not teacher.with_name("teacher.pth.state.pt").exists()
        finally:
            t_holder.kill()
            t_holder.wait()
    finally:
        holder.kill()   # killed: its lock is the kernel's and goes with it; its lock file stays, unlocked
        holder.wait()
    assert (out.parent / ".b.lock").read_text().strip() == str(holder.pid)
    b = train_bundle("gaussian", category, out, image_size=SIZE, seed=1, export=False)
    assert b.manifest["training"]["seed"] == 1 and not (out.parent / ".b.lock").exists()


def test_a_refused_training_leaves_no_folder_made_for_its_lock(category, tmp_path):
    with pytest.raises(InputError, match="--model 'nope'"):
        train_bundle("nope", category, tmp_path / "new" / "deeper" / "b", image_size=SIZE)
    assert list(tmp_path.iterdir()) == []
