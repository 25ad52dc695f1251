"""Model updates: archives with sha256 and signatures, golden-set check, atomic switch, health and rollback."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_ad.bundle import Bundle
from edge_ad.calibration import (HealthLimits, HealthWatch, current_path, deployment, install_bundle,
                                 judge_health, pack_bundle, read_index, rollback_model)
from edge_ad.calibration import deploy as deploy_mod
from edge_ad.calibration import package as package_mod
from edge_ad.errors import GuardFailure, InputError, RuntimeFailure

from fixtures_bundle import (add_stand_in_graph, copy_bundle, gaussian_bundle, make_tiny_bundle, part_frame,  # noqa: F401
                             tiny_bundle)


# ----------------------------------------------------------------------------- helpers
def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@pytest.fixture
def golden(tmp_path) -> Path:
    """Labelled golden set: normal parts in good/, parts with a blob in ng/."""
    g = tmp_path / "golden"
    for i in range(8):
        _write(g / "good" / f"{i}.png", part_frame(5000 + i))
        _write(g / "ng" / f"{i}.png", part_frame(6000 + i, defect=True))
    return g


@pytest.fixture
def bundles(tiny_bundle, tmp_path):
    """(running A, candidate B with another graph, bad candidate C that never says NG)."""
    a = copy_bundle(tiny_bundle, tmp_path / "A")
    b = make_tiny_bundle(tmp_path / "B", image_size=(96, 96))
    c = copy_bundle(tiny_bundle, tmp_path / "C")
    c.write_calibration(c.calibration().replace(version=0, created="", threshold=1e9, policy="manual"))
    return a, b, c


def test_golden_check_refuses_a_candidate_that_scores_nan(bundles, golden, monkeypatch):
    """A NaN score is NG (never OK) and ranks top in an AUROC, so a model that gives NaN on every defect
    would look perfect; at run time such frames get no decision at all."""
    a, b, _ = bundles
    real = deploy_mod._decide

    def nan_on_defects(bundle, frames, *args, **kw):
        s, ng = real(bundle, frames, *args, **kw)
        if bundle.path == b.path:
            s[ng] = np.nan
        return s, ng

    monkeypatch.setattr(deploy_mod, "_decide", nan_on_defects)
    rep = deploy_mod.check_golden(b, golden, a, backend="onnxruntime")
    assert not rep["passed"] and rep["non_finite"] >= 1
    assert "not a finite number" in rep["failures"][0]


def _release_files(deploy: Path) -> dict:
    return {p.relative_to(deploy).as_posix(): p.read_bytes()
            for p in sorted((deploy / "releases").rglob("*")) if p.is_file()}


def _flip_byte(archive: Path, member: str) -> None:
    with tarfile.open(archive) as tar:
        m = tar.getmember(member)
        off = m.offset_data + m.size // 2
    data = bytearray(archive.read_bytes())
    data[off] ^= 0xFF
    archive.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- pack and install
def test_pack_and_install_switch_atomically_and_keep_the_previous(bundles, golden, tmp_path):
    a, b, _ = bundles
    a.engines_dir.mkdir()
    (a.engines_dir / "x.engine").write_bytes(b"device specific")
    arch_a = pack_bundle(a.path, tmp_path / "a.tar")
    info = read_index(arch_a)
    assert "bundle/manifest.json" in info.index["files"] and "bundle/calibration.d/0001.json" in info.index["files"]
    assert not any("engines" in f for f in info.index["files"]) and not info.signed
    assert info.index["bundle"]["model_hash"] == a.model_hash()

    deploy = tmp_path / "deploy"
    r1 = install_bundle(arch_a, deploy, golden)
    assert r1.previous is None and r1.golden["passed"] and r1.golden["candidate"]["errors"] == 0
    dep = deployment(deploy)
    assert dep.current == r1.release and dep.previous is None and dep.health == "pending"
    assert current_path(deploy) == r1.path and (deploy / "current").is_symlink()
    assert Bundle.open(r1.path, verify=True).model_hash() == a.model_hash()

    r2 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar.gz"), deploy, golden)
    dep = deployment(deploy)
    assert (dep.current, dep.previous) == (r2.release, r1.release)
    assert r2.previous_path == r1.path and r2.golden["running"]["errors"] == 0
    assert Bundle.open(current_path(deploy)).image_size == (96, 96)
    assert not [p for p in (deploy / "releases").iterdir() if p.name.startswith(".")]   # no staging left
    assert json.loads((deploy / "deploy.json").read_text())["history"][-1]["event"] == "switched"


def test_pack_ships_the_bundle_only(tiny_bundle, tmp_path):
    """Not the training state (optimizer state for --resume, tens of MB), eval reports, engines, temp files,
    nor a graph the manifest does not record (left from an earlier model)."""
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    b.write_calibration(b.calibration().replace(version=0, created=""))   # history: v1 and v2
    for name in ("train_state.pt", "eval/report.json", "engines/x.engine", "model.int8.onnx",
                 "gaussian.d/0001.npz", ".new-model.onnx", "notes.txt"):
        (b.path / name).parent.mkdir(exist_ok=True)
        (b.path / name).write_bytes(b"not part of the bundle")
    info = read_index(pack_bundle(b.path, tmp_path / "b.tar"))
    assert sorted(info.index["files"]) == ["bundle/calibration.d/0001.json", "bundle/calibration.d/0002.json",
                                           "bundle/calibration.json", "bundle/manifest.json", "bundle/model.onnx"]
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert sorted(tar.getnames()) == sorted(info.index["files"]) + ["edge-ad-package.json"]
    r = install_bundle(tmp_path / "b.tar", tmp_path / "deploy", require_golden=False)
    assert Bundle.open(r.path, verify=True).calibration().version == 2


def test_a_bundle_without_its_graph_is_neither_packed_nor_installed(tiny_bundle, tmp_path, monkeypatch):
    """A bundle trained with --no-export (or whose export failed) has no graph to inspect with."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    b.remove_file("model.onnx")
    with pytest.raises(InputError, match=r"b/model.onnx: not found; run 'edge-ad export'.*must be there and "
                                         r"recorded in manifest.json to pack it"):
        pack_bundle(b.path, tmp_path / "b.tar")
    res = CliRunner().invoke(main, ["bundle", "pack", str(b.path), str(tmp_path / "b.tar")])
    assert res.exit_code == 2 and "model.onnx: not found; run 'edge-ad export'" in res.output, res.output
    (b.path / "model.onnx").write_bytes((tiny_bundle.path / "model.onnx").read_bytes())  # there, unrecorded
    with pytest.raises(InputError, match=r"b/model.onnx: not recorded in .*manifest.json"):
        pack_bundle(b.path, tmp_path / "b.tar")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*"))
    (b.path / "model.onnx").unlink()
    with monkeypatch.context() as m:          # an archive made by an older packer
        m.setattr(Bundle, "check_graph", lambda self, name=None, verify=True: None)
        m.setattr(package_mod, "_check_opens", lambda b, graph: None)
        archive = pack_bundle(b.path, tmp_path / "b.tar")
    with pytest.raises(InputError, match="b.tar: the bundle has no active graph model.onnx"):
        install_bundle(archive, tmp_path / "deploy", require_golden=False)
    res = CliRunner().invoke(main, ["bundle", "install", str(archive), "--deploy", str(tmp_path / "deploy"),
                                    "--no-golden"])
    assert res.exit_code == 2 and "the bundle has no active graph model.onnx" in res.output, res.output
    assert "run 'edge-ad export' on it and pack it again; update refused" in res.output
    assert not (tmp_path / "deploy").exists()


def test_pack_refuses_a_bundle_that_run_and_install_refuse(tiny_bundle, tmp_path):
    """pack wrote an archive of a bundle without calibration.json (install then refused it: the new model
    cannot be opened) and of one whose manifest names outputs its graph lacks (eval, run and calibrate refuse
    it). pack now opens the bundle as run and install's probe do (Inspector.open: the graph on a backend,
    under the calibration in force), and refuses it with their message: exit 2, nothing written."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.inspector import Inspector

    nocal = copy_bundle(tiny_bundle, tmp_path / "nocal")
    nocal.file("calibration.json").unlink()
    outputs = copy_bundle(tiny_bundle, tmp_path / "outputs")
    outputs.manifest["model"]["outputs"] = ["nope"]
    outputs.save_manifest()
    for b, words in ((nocal, "calibration.json: not found"), (outputs, "outputs ['map'] lack ['nope']")):
        with pytest.raises(InputError) as as_run:
            Inspector.open(b, "onnxruntime", None, "cpu")
        assert words in str(as_run.value)
        with pytest.raises(InputError) as packed:
            pack_bundle(b.path, tmp_path / "b.tar")
        assert str(packed.value) == f"{as_run.value}; edge-ad run and bundle install refuse such a bundle " \
                                    "(nothing packed)"
        res = CliRunner().invoke(main, ["bundle", "pack", str(b.path), str(tmp_path / "b.tar")])
        assert res.exit_code == 2 and f"error: {packed.value}" in res.output, res.output
        with pytest.raises(InputError, match=re.escape(words)):   # what install says of such a bundle
            deploy_mod.open_probe("onnxruntime", None, "cpu")(b)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*"))


def test_corrupt_or_truncated_archive_is_refused_and_the_running_model_untouched(bundles, golden, tmp_path):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    before, dep_before = _release_files(deploy), deployment(deploy)

    bad = pack_bundle(b.path, tmp_path / "b.tar")
    _flip_byte(bad, "bundle/model.onnx")
    with pytest.raises(InputError, match="model.onnx' has sha256 .*corrupt or altered"):
        install_bundle(bad, deploy, golden)
    short = tmp_path / "short.tar"
    whole = pack_bundle(b.path, tmp_path / "b2.tar").read_bytes()
    short.write_bytes(whole[:len(whole) // 2])
    # one sentence: the staging folder's name in it was replaced by the archive's ("corrupt archive, or
    # extracting to short.tar: bundle failed (...)"); where it ends is named
    with pytest.raises(InputError, match=r"short.tar: corrupt or cut-short archive \([^()]+, (in|after) "
                                         r"'bundle/[^']+'\); update refused$"):
        install_bundle(short, deploy, golden)
    # not a tar: one line saying so, not tarfile's five listing each decompression it tried
    refused = {b"not a tar at all" * 100: "not a tar archive", b"": "an empty file",
               b"text\n": r"not a tar archive \(5 bytes, shorter than a tar header\)",
               b"\x1f\x8b\x08" + bytes(40): r"a gzip file holding no readable tar archive \(corrupt or cut short\)"}
    for data, what in refused.items():
        (tmp_path / "junk.tar").write_bytes(data)
        with pytest.raises(InputError, match=rf"junk.tar: {what}; expected a tar or tar.gz archive made by 'edge-ad "
                                             r"bundle pack'; update refused$"):
            install_bundle(tmp_path / "junk.tar", deploy, golden)

    assert _release_files(deploy) == before
    assert deployment(deploy) == dep_before
    Bundle.open(current_path(deploy), verify=True)


def test_unsigned_or_wrongly_signed_archive_is_refused_when_a_key_is_required(bundles, golden, tmp_path):
    a, b, _ = bundles
    secret, other = tmp_path / "secret", tmp_path / "other"
    secret.write_bytes(b"0123456789abcdef-line-7-secret\n")
    other.write_bytes(b"another secret that is long enough")
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    before = _release_files(deploy)

    with pytest.raises(InputError, match="unsigned, and a signed archive is required"):
        install_bundle(pack_bundle(b.path, tmp_path / "u.tar"), deploy, golden, key=secret)
    with pytest.raises(InputError, match="HMAC signature does not match"):
        install_bundle(pack_bundle(b.path, tmp_path / "o.tar", sign_key=other), deploy, golden, key=secret)
    signed = pack_bundle(b.path, tmp_path / "s.tar", sign_key=secret)
    tampered = tmp_path / "t.tar"                                       # the index re-written, old signature
    with tarfile.open(signed) as src, tarfile.open(tampered, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "edge-ad-package.json":
                data = data.replace(b'"created"', b'"created" ', 1)
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(InputError, match="HMAC signature does not match"):
        install_bundle(tampered, deploy, golden, key=secret)
    with pytest.raises(InputError, match="at least 16"):
        install_bundle(signed, deploy, golden, key=b"short")
    assert _release_files(deploy) == before

    res = install_bundle(signed, deploy, golden, key=secret)
    assert res.package.signed and res.package.verified and res.package.alg == "hmac-sha256"


def test_ed25519_signatures(bundles, golden, tmp_path):
    pytest.importorskip("cryptography")
    from edge_ad.calibration import generate_ed25519

    a, b, _ = bundles
    kid = generate_ed25519(tmp_path / "k.pem", tmp_path / "k.pub")
    generate_ed25519(tmp_path / "x.pem", tmp_path / "x.pub")
    assert len(kid) == 16 and (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    deploy = tmp_path / "deploy"
    signed = pack_bundle(a.path, tmp_path / "a.tar", sign_key=tmp_path / "k.pem")
    assert read_index(signed).alg == "ed25519" and read_index(signed).key_id == kid
    with pytest.raises(InputError, match="Ed25519 signature does not verify"):
        install_bundle(signed, deploy, golden, key=tmp_path / "x.pub")
    with pytest.raises(InputError, match="signed with 'ed25519', but the key given is hmac-sha256"):
        install_bundle(signed, deploy, golden, key=b"an hmac secret of some length")
    with pytest.raises(InputError, match="cannot sign"):
        pack_bundle(b.path, tmp_path / "b.tar", sign_key=tmp_path / "k.pub")
    res = install_bundle(signed, deploy, golden, key=tmp_path / "k.pub")
    assert res.package.verified and deployment(deploy).current == res.release


def test_unsafe_members_are_refused(bundles, golden, tmp_path):
    a, _, _ = bundles
    good = pack_bundle(a.path, tmp_path / "a.tar")
    deploy = tmp_path / "deploy"

    def rewrite(name, extra):
        out = tmp_path / name
        with tarfile.open(good) as src, tarfile.open(out, "w") as dst:
            for m in src:
                dst.addfile(m, src.extractfile(m))
            extra(dst)
        return out

    def traversal(dst):
        data = b"owned"
        info = tarfile.TarInfo("bundle/../../evil.txt")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))

    def link(dst):
        info = tarfile.TarInfo("bundle/model2.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        dst.addfile(info)

    def stray(dst):
        data = b"not in the index"
        info = tarfile.TarInfo("bundle/extra.bin")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))

    def late_signature(dst):   # read_index stops before it: never checked, so never ignored either
        data = b'{"alg": "hmac-sha256", "key_id": "x", "signature": "00"}'
        info = tarfile.TarInfo("edge-ad-package.sig")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))

    for name, extra, msg in (("trav.tar", traversal, "outside bundle/"), ("link.tar", link, "link or special"),
                             ("stray.tar", stray, "not in the index"),
                             ("late.tar", late_signature, "'edge-ad-package.sig' after the bundle's files")):
        with pytest.raises(InputError, match=msg):
            install_bundle(rewrite(name, extra), deploy, golden)
    assert not (tmp_path / "evil.txt").exists() and deployment(deploy).current is None
    assert not deploy.exists()  # a refused first install leaves no deploy folder (not even an empty releases/)


def _forged(good: Path, out: Path, add: dict[str, bytes] = {}, before: dict[str, bytes] = {},  # noqa: B006
            key=None) -> Path:
    """``good`` (made by pack) with files the index lists as well: ``add`` after the bundle's files, ``before``
    ahead of them (right after the index and signature); re-signed with ``key`` (a signed index can list them
    too)."""
    from edge_ad.calibration.package import _sign, load_key

    with tarfile.open(good) as src:
        members = [(m, src.extractfile(m).read()) for m in src]
    index = json.loads(members[0][1])
    assert members[0][0].name == "edge-ad-package.json"
    for name, data in {**before, **add}.items():
        index["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    head = {"edge-ad-package.json": json.dumps(index).encode()}
    if key is not None:
        k = load_key(key)
        head["edge-ad-package.sig"] = json.dumps({"alg": k.alg, "key_id": k.key_id,
                                                  "signature": _sign(k, head["edge-ad-package.json"])}).encode()
    body = {m.name: data for m, data in members if not m.name.startswith("edge-ad-package.")}
    with tarfile.open(out, "w") as dst:
        for name, data in {**head, **before, **body, **add}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_only_the_index_and_signature_are_read_before_the_signature_is_checked(tiny_bundle, tmp_path):
    """pack writes the index, then the signature, as the first members: reading stops at the first other one,
    so an archive of a million members is refused at once (it was read through, 24 s and 566 MiB, every member
    kept in memory), and nothing after that member is read, nor decompressed, before the signature is
    checked."""
    good = pack_bundle(tiny_bundle.path, tmp_path / "good.tar")
    with tarfile.open(good) as src:
        index = src.extractfile("edge-ad-package.json").read()
    info = tarfile.TarInfo("edge-ad-package.json")
    info.size = len(index)
    many = tmp_path / "many.tar.gz"        # 100,000 empty members, then the index
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(many, "wb") as fh:
        for _ in range(100):
            fh.write(gz.compress(tarfile.TarInfo("bundle/x").tobuf() * 1000))
        pad = -len(index) % 512
        fh.write(gz.compress(info.tobuf() + index + b"\0" * (pad + 1024)) + gz.flush())
    with pytest.raises(InputError, match=r"many.tar.gz: no 'edge-ad-package.json' among its first two members "
                                         r"\(it starts with 'bundle/x'\); an archive made by 'edge-ad bundle pack' "
                                         r"starts with its index, then its signature; update refused"):
        read_index(many)
    with pytest.raises(InputError, match="no 'edge-ad-package.json' among its first two members"):
        install_bundle(many, tmp_path / "deploy", require_golden=False)
    assert not (tmp_path / "deploy").exists()
    sig_first = tmp_path / "sig-first.tar"   # a signature, then neither the index nor a signature
    with tarfile.open(sig_first, "w") as dst:
        for name, data in (("edge-ad-package.sig", b"{}"), ("bundle/x", b""), ("edge-ad-package.json", index)):
            m = tarfile.TarInfo(name)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(InputError, match=r"first two members \(it starts with 'edge-ad-package.sig', 'bundle/x'\)"):
        read_index(sig_first)

    # a .tar.gz cut short in its third member: read_index never gets there; an install reads it all
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    b.add_file("checkpoint.pt", data=np.random.default_rng(0).bytes(1 << 18))   # incompressible
    whole = pack_bundle(b.path, tmp_path / "b.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    assert read_index(cut).index == read_index(tmp_path / "b.tar.gz").index
    with pytest.raises(InputError, match=r"cut.tar.gz: corrupt or cut-short archive \(Compressed file ended before "
                                         r"the end-of-stream marker was reached, in 'bundle/checkpoint.pt'\)"):
        install_bundle(cut, tmp_path / "deploy", require_golden=False)
    assert not (tmp_path / "deploy").exists()


def test_an_index_or_archive_of_more_entries_than_a_bundle_has_is_refused(tiny_bundle, tmp_path, monkeypatch):
    """An index listing more than MAX_FILES is refused, so no index, signed or not, can make an extraction keep a
    list of a million members; neither can directory members, which no index lists. (MAX_FILES made small:
    the rule, not 50,000 files.)"""
    from edge_ad.calibration import package

    monkeypatch.setattr(package, "MAX_FILES", 20)
    good = pack_bundle(tiny_bundle.path, tmp_path / "good.tar")
    big = _forged(good, tmp_path / "big.tar", add={f"bundle/calibration.d/{i:04d}.json": b"" for i in range(2, 20)})
    with pytest.raises(InputError, match=r"big.tar: invalid 'edge-ad-package.json' \('files' lists 22 entries; "
                                         r"at most 20 are accepted \(a bundle's files and its calibration history\)\)"):
        read_index(big)
    dirs = tmp_path / "dirs.tar"
    with tarfile.open(good) as src, tarfile.open(dirs, "w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        folder = tarfile.TarInfo("bundle/calibration.d")
        folder.type = tarfile.DIRTYPE
        for _ in range(20):
            dst.addfile(folder)
    read_index(dirs)   # the index is fine
    with pytest.raises(InputError, match="dirs.tar: more than 20 members besides its index and signature"):
        install_bundle(dirs, tmp_path / "deploy", require_golden=False)
    assert not (tmp_path / "deploy").exists()


def _long_history(tiny_bundle, path, versions):
    """A bundle with ``versions`` calibration versions (each calibrate or persisted set_threshold adds one)."""
    b = copy_bundle(tiny_bundle, path)
    have = len(b.calibration_versions())
    cal = b.calibration()
    for _ in range(versions - have):
        b.write_calibration(cal.replace(version=0, created=""))
    assert len(b.calibration_versions()) == versions
    return b


def test_a_long_calibration_history_packs_and_installs(tiny_bundle, tmp_path, monkeypatch):
    """Calibration versions are kept until 'calibrate --prune' deletes them: a line tuned ~30 times a day had
    more than 10,000 (the cap before) within a year, and such a bundle was refused. The cap is now years of that; a bundle of exactly
    MAX_FILES files (MAX_FILES made small here) packs and installs."""
    from edge_ad.calibration import package

    assert package.MAX_FILES >= 2 * 365 * 30
    monkeypatch.setattr(package, "MAX_FILES", 40)
    b = _long_history(tiny_bundle, tmp_path / "b", 37)   # + manifest.json, calibration.json, model.onnx
    info = read_index(pack_bundle(b.path, tmp_path / "b.tar"))
    assert len(info.index["files"]) == 40
    r = install_bundle(tmp_path / "b.tar", tmp_path / "deploy", require_golden=False)
    assert len(Bundle.open(r.path, verify=True).calibration_versions()) == 37


def test_pack_refuses_more_files_than_an_install_accepts_before_writing(tiny_bundle, tmp_path, monkeypatch):
    """Pack wrote the archive, then its own check refused it with the install wording ('update refused') and
    left the unusable archive (35 MB for 10,001 calibration versions). Now it counts first: exit 2, nothing
    written, naming the command that shortens the history ('calibrate --prune', which said to delete files by
    hand before there was one) and the most versions it may keep."""
    from click.testing import CliRunner

    from edge_ad.calibration import package
    from edge_ad.cli import main

    monkeypatch.setattr(package, "MAX_FILES", 40)
    b = _long_history(tiny_bundle, tmp_path / "b", 38)
    out = tmp_path / "out" / "b.tar"
    msg = (f"{b.path}: 41 files to pack (38 of them calibration versions in calibration.d/), and an install accepts "
           f"at most 40: delete old calibration versions with 'edge-ad calibrate --bundle {b.path} --prune KEEP' "
           "(KEEP: the newest versions to keep, at most 34 here; the one in force and the one a rollback goes back "
           "to are always kept; --dry-run shows what would go), then pack again (nothing packed)")
    with pytest.raises(InputError, match=re.escape(msg)):
        pack_bundle(b.path, out)
    res = CliRunner().invoke(main, ["bundle", "pack", str(b.path), str(out)])
    assert res.exit_code == 2 and msg in res.output and "update refused" not in res.output, res.output
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--prune", "34"])   # as the message says
    assert res.exit_code == 0 and "removed 3 calibration versions (v2-v4)" in res.output, res.output
    assert len(read_index(pack_bundle(b.path, out)).index["files"]) == 38


@pytest.mark.parametrize("file,under", [("bundle/manifest.json", "bundle/manifest.json/x"),
                                        ("bundle/model.onnx", "bundle/model.onnx/x/y"),
                                        ("bundle/calibration.d/0001.json", "bundle/calibration.d/0001.json/z")])
def test_an_index_listing_a_file_and_a_file_under_it_is_refused_as_the_archives_fault(tiny_bundle, tmp_path,
                                                                                       file, under):
    """'bundle/a' and 'bundle/a/b' cannot both be files: extracting them failed on the disk ("is a directory"),
    reported as a write failure (exit 1, "update not installed") as if the disk were at fault."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    good = pack_bundle(tiny_bundle.path, tmp_path / "good.tar")
    bad = _forged(good, tmp_path / "bad.tar", before={under: b"x"})    # extracted before the file itself
    msg = f"bad.tar: the index lists both '{file}' and '{under}'"
    with pytest.raises(InputError, match=re.escape(msg)):
        read_index(bad)
    res = CliRunner().invoke(main, ["bundle", "install", str(bad), "--deploy", str(tmp_path / "deploy"), "--no-golden"])
    assert res.exit_code == 2 and msg in res.output and "would be a file and a folder at once" in res.output, res.output
    assert not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("name", ["bundle/manifest.json/", "./bundle/manifest.json", "bundle/./manifest.json",
                                  "bundle//manifest.json"])
def test_an_index_entry_that_names_a_file_twice_is_refused(tiny_bundle, tmp_path, name):
    """Another spelling of a listed name (trailing slash, './', '//') is no plain relative path."""
    good = pack_bundle(tiny_bundle.path, tmp_path / "good.tar")
    with pytest.raises(InputError, match=f"member '{re.escape(name)}' is outside bundle/ or not a plain relative"):
        read_index(_forged(good, tmp_path / "bad.tar", add={name: b"x"}))


@pytest.mark.parametrize("name,why", [("bundle/engines/x.engine", "is never part of a bundle archive"),
                                      ("bundle/train_state.pt", "is never part of a bundle archive"),
                                      ("bundle/eval/report.json", "is never part of a bundle archive"),
                                      ("bundle/notes.txt", "is not part of the bundle, its manifest.json does not"),
                                      ("bundle/model.int8.onnx", "is not part of the bundle"),   # not recorded
                                      ("bundle/gaussian.d/0001.npz", "is not part of the bundle"),
                                      ("bundle/calibration.d/rollbacks.json", "is not part of the bundle"),
                                      ("bundle/calibration.d/00001.json", "is not part of the bundle")])
def test_install_refuses_files_a_bundle_never_ships(bundles, golden, tmp_path, name, why):
    """An archive holds what pack ships (manifest.json, calibration.json, calibration.d/NNNN.json and the files
    the manifest records); anything else in a signed index was installed with the bundle: an engine built
    for another GPU, training state, a file the manifest does not record."""
    a, b, _ = bundles
    key = tmp_path / "secret"
    key.write_bytes(b"0123456789abcdef-line-7-secret\n")
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    before, dep_before = _release_files(deploy), deployment(deploy)
    bad = _forged(pack_bundle(b.path, tmp_path / "b.tar"), tmp_path / "bad.tar", add={name: b"not shipped"}, key=key)
    with pytest.raises(InputError, match=f"bad.tar: '{re.escape(name)}' {why}.*update refused"):
        install_bundle(bad, deploy, golden, key=key)
    assert _release_files(deploy) == before and deployment(deploy) == dep_before
    assert not [p for p in (deploy / "releases").iterdir() if p.name.startswith(".")]   # no staging left
    res = install_bundle(pack_bundle(b.path, tmp_path / "b2.tar", sign_key=key), deploy, golden, key=key)
    assert deployment(deploy).current == res.release


def test_an_archive_an_older_edge_ad_packed_with_its_training_state_is_refused_saying_to_pack_it_again(tiny_bundle,
                                                                                                       tmp_path):
    """An edge-ad before 706432c packed all of the bundle folder but engines/, train_state.pt included: 'bundle
    install' refused such an archive saying only that the file is never part of one. It now says what to do."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    old = _forged(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), tmp_path / "old.tar",
                  add={"bundle/train_state.pt": b"the training state"})
    deploy = tmp_path / "deploy"
    res = CliRunner().invoke(main, ["bundle", "install", str(old), "--deploy", str(deploy), "--no-golden"])
    assert res.exit_code == 2, res.output
    assert (f"error: {old}: 'bundle/train_state.pt' is never part of a bundle archive (it holds manifest.json, "
            "calibration.json, calibration.d/NNNN.json and the files its manifest.json records; never train_state.pt, "
            "engines/, eval/ or timing.cache: pack the bundle again with 'edge-ad bundle pack BUNDLE_DIR OUT', which "
            "ships only those; an edge-ad before 706432c (2026-12-05) packed all of the folder but engines/); update "
            "refused") in res.output, res.output
    assert not deploy.exists()


@pytest.mark.parametrize("edit", ['"format_version": 1e999', '"bytes": 1e999', '"bytes": "12"'])
def test_an_index_with_numbers_that_are_not_whole_is_refused(tiny_bundle, tmp_path, edit):
    good = pack_bundle(tiny_bundle.path, tmp_path / "a.tar")
    with tarfile.open(good) as src:
        index = src.extractfile("edge-ad-package.json").read().decode()
    field = edit.split(":")[0]
    index = re.sub(field + r": [0-9]+", edit, index, count=1).encode()
    out = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(out, "w") as dst:
        for m in src:
            if m.name == "edge-ad-package.json":
                m.size = len(index)
                dst.addfile(m, io.BytesIO(index))
            else:
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(InputError, match=f"invalid 'edge-ad-package.json'.*{field.strip(chr(34))}.*whole number"):
        install_bundle(out, tmp_path / "deploy", require_golden=False)
    assert not (tmp_path / "deploy").exists()


# ----------------------------------------------------------------------------- golden set
def test_failing_golden_check_keeps_the_running_model(bundles, golden, tmp_path):
    a, _, c = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    before, dep_before = _release_files(deploy), deployment(deploy)
    with pytest.raises(GuardFailure, match="golden-set check failed, the running model is unchanged: 8 wrong"):
        install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, golden)
    assert _release_files(deploy) == before and deployment(deploy) == dep_before
    # with no running model, the labelled images must be judged right on their own
    with pytest.raises(GuardFailure, match="accuracy 0.500"):
        install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), tmp_path / "fresh", golden)


def test_a_failed_golden_check_names_the_images_it_misjudged(bundles, golden, tmp_path):
    """'golden-set check failed ...: accuracy 0.889 on 9 labelled golden images < 0.9' named no image (the
    engineer looked the culprit up in eval/report.json), and 'bundle install --json' printed nothing. The error
    (CLI, update_model's reply) names the misjudged images, what each should have been, its score and the
    threshold, the first five and how many more; --json prints the report, which lists them."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, _, c = bundles                                                  # C never says NG
    r = CliRunner()
    arch_c = pack_bundle(c.path, tmp_path / "c.tar")
    fresh = tmp_path / "fresh"
    res = r.invoke(main, ["bundle", "install", str(arch_c), "--deploy", str(fresh), "--golden", str(golden)])
    assert res.exit_code == 1 and "accuracy 0.500 on 16 labelled golden images < 0.9; misjudged 8 of 16 golden " \
        "images: " in res.stderr, res.output
    for i in range(5):
        assert re.search(rf"{golden / 'ng' / f'{i}.png'}: NG expected, judged OK \(score \S+ <= threshold 1e\+09\)",
                         res.stderr), res.stderr
    assert f"{golden / 'ng' / '5.png'}" not in res.stderr and res.stderr.rstrip().endswith("; and 3 more")
    assert res.stdout == "" and not fresh.exists()
    res = r.invoke(main, ["bundle", "install", str(arch_c), "--deploy", str(fresh), "--golden", str(golden),
                          "--json"])
    assert res.exit_code == 1 and "misjudged 8 of 16" in res.stderr
    out = json.loads(res.stdout)
    assert "misjudged 8 of 16" in out["error"] and not out["golden"]["passed"] and out["golden"]["n_misjudged"] == 8
    assert [m["image"] for m in out["golden"]["misjudged"]] == [str(golden / "ng" / f"{i}.png") for i in range(8)]
    assert {(m["expected"], m["expected_from"], m["judged"], m["threshold"]) for m in out["golden"]["misjudged"]} \
        == {("NG", "label", "OK", 1e9)} and all(isinstance(m["score"], float) for m in out["golden"]["misjudged"])

    # an unlabelled image is judged against the running model's decision; update_model's reply names it too
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    loose = tmp_path / "loose"
    shutil.copytree(golden / "good", loose / "good")
    _write(loose / "odd.png", part_frame(7000, defect=True))           # A says NG, C says OK
    svc = _line(tmp_path, deploy, golden_dir=str(loose))
    try:
        body = _mqtt_update_model(svc)({"url": str(arch_c), "sha256": _sha(arch_c)})
        assert not body["ok"] and body["error"]["code"] == "failed", body
        assert re.search(rf"misjudged 1 of 9 golden images: {loose / 'odd.png'}: NG expected \(the running model's "
                         r"decision: an unlabelled image\), judged OK \(score \S+ <= threshold 1e\+09\)",
                         body["error"]["message"]), body
        body = _mqtt_update_model(svc)({"url": str(arch_c), "sha256": _sha(arch_c), "activate": False})
        [m] = body["result"]["golden"]["misjudged"]
        assert (m["image"], m["expected_from"], body["result"]["golden"]["passed"]) == (str(loose / "odd.png"),
                                                                                      "running model", False)
    finally:
        svc.inspector.backend.close()


def test_a_failed_update_models_reply_lists_the_misjudged_golden_images_in_its_error(bundles, tmp_path):
    """update_model refused by the golden check named the images it misjudged only in its error message (the first
    five, in words): the reply schema's error object took no other field. Its error.golden now lists them, as the
    report does: the check's failures, n_images, n_misjudged and the first 20 misjudged entries (image, expected,
    expected_from, judged, score, threshold); a file name that is not valid UTF-8 is escaped there too, so the
    reply can still be sent."""
    import os

    from edge_ad.mqtt import payloads

    a, _, c = bundles                                                  # C never says NG
    golden = tmp_path / "golden"
    for i in range(3):
        _write(golden / "good" / f"{i}.png", part_frame(5000 + i))
    for i in range(24):
        _write(golden / "ng" / f"{i:02d}.png", part_frame(6000 + i, defect=True))
    odd = os.fsdecode(str(golden / "ng").encode() + b"/0\xff.png")    # after 09.png: among the first 20
    os.rename(golden / "ng" / "23.png", odd)
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    before = deployment(deploy)
    arch_c = pack_bundle(c.path, tmp_path / "c.tar")
    svc = _line(tmp_path, deploy, golden_dir=str(golden))
    try:
        body = _mqtt_update_model(svc)({"url": str(arch_c), "sha256": _sha(arch_c)})   # schema-checked
    finally:
        svc.inspector.backend.close()
    assert not body["ok"] and body["error"]["code"] == "failed" and deployment(deploy) == before, body
    assert "misjudged 24 of 27 golden images: " in body["error"]["message"] and \
        body["error"]["message"].endswith("; and 19 more"), body["error"]["message"]
    g = body["error"]["golden"]
    assert (g["n_images"], g["n_misjudged"], len(g["misjudged"])) == (27, 24, 20)
    assert g["failures"] == ["24 wrong decisions on 27 labelled golden images, the running model makes 0 (allowed "
                             "extra: 0)"], g["failures"]
    shown = os.fsencode(odd).decode("utf-8", "backslashreplace")      # ...ng/0\xff.png, as the message has it
    assert [m["image"] for m in g["misjudged"]] == [str(golden / "ng" / f"{i:02d}.png") for i in range(10)] + [
        shown] + [str(golden / "ng" / f"{i:02d}.png") for i in range(10, 19)]
    assert {(m["expected"], m["expected_from"], m["judged"], m["threshold"]) for m in g["misjudged"]} == {
        ("NG", "label", "OK", 1e9)} and all(isinstance(m["score"], float) for m in g["misjudged"])
    payloads.encode(body, "reply")                                     # it can be sent


def _sha(path: Path) -> str:
    from edge_ad.atomic import sha256_file

    return sha256_file(path)


def test_a_damaged_running_release_does_not_block_the_update_that_replaces_it(bundles, golden, tmp_path):
    a, b, c = bundles
    deploy = tmp_path / "deploy"
    first = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    graph = first.path / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"x" * 10)         # the running graph no longer verifies
    res = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, golden)
    assert deployment(deploy).current == res.release and "does not match" in res.golden["running_error"]
    assert res.golden["candidate"]["accuracy"] >= 0.9 and "running" not in res.golden
    # judged on its own, a bad candidate is still refused
    (res.path / "manifest.json").write_text("{")                    # now the running one cannot even open
    with pytest.raises(GuardFailure, match="accuracy 0.500"):
        install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, golden)
    assert deployment(deploy).current == res.release


def test_unlabelled_golden_images_are_compared_with_the_running_model(bundles, golden, tmp_path):
    a, b, c = bundles
    loose = tmp_path / "loose"
    for i in range(6):
        _write(loose / f"n{i}.png", part_frame(7000 + i))
        _write(loose / f"d{i}.png", part_frame(7100 + i, defect=True))
    with pytest.raises(InputError, match="only unlabelled golden images"):
        install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), tmp_path / "deploy", loose)
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), tmp_path / "deploy", golden)
    res = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), tmp_path / "deploy", loose)
    assert res.golden["agreement"] == {"n": 12, "value": 1.0}
    with pytest.raises(GuardFailure, match="agree with the running model's on 0.500"):
        install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), tmp_path / "deploy", loose)


def test_a_golden_set_is_required_unless_skipped_on_purpose(bundles, golden, tmp_path):
    a, _, _ = bundles
    arch = pack_bundle(a.path, tmp_path / "a.tar")
    with pytest.raises(InputError, match="no golden set"):
        install_bundle(arch, tmp_path / "d1")
    assert install_bundle(arch, tmp_path / "d1", require_golden=False).golden is None
    shutil.copytree(golden, tmp_path / "d2" / "golden")                # the device's own golden folder
    assert install_bundle(arch, tmp_path / "d2").golden["passed"]


# ----------------------------------------------------------------------------- switch, health, rollback
def test_power_cut_during_the_switch_leaves_the_old_model_in_force(bundles, golden, tmp_path, monkeypatch):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    deploy_mod.confirm(deploy)
    real = deploy_mod._point

    def cut(d, name, release):
        if name == "current":
            raise KeyboardInterrupt("power cut")
        real(d, name, release)

    monkeypatch.setattr(deploy_mod, "_point", cut)
    with pytest.raises(KeyboardInterrupt):
        install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, golden)
    monkeypatch.setattr(deploy_mod, "_point", real)
    dep = deployment(deploy)
    assert dep.current == r1.release and dep.health == "ok"       # the old model, healthy, in force
    Bundle.open(current_path(deploy), verify=True)
    r3 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, golden)   # and the next try works
    assert deployment(deploy).current == r3.release


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _two_releases(bundles, golden, tmp_path):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    r2 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, golden)
    return deploy, r1, r2


def test_health_watch_rolls_back_when_no_frames_are_processed(bundles, golden, tmp_path):
    deploy, r1, r2 = _two_releases(bundles, golden, tmp_path)
    clock = Clock()
    watch = HealthWatch(deploy, baseline_ng_rate=0.02, limits=HealthLimits(window_s=60, min_frames=10), clock=clock)
    clock.t += 30
    assert watch.poll().status == "pending"
    clock.t += 31
    v = watch.poll()
    assert v.status == "failed" and "no frames processed within 60 s" in v.reason
    assert v.rolled_back and v.restored == r1.path
    dep = deployment(deploy)
    assert (dep.current, dep.previous, dep.health) == (r1.release, r2.release, "unchecked")
    assert dep.detail["rolled_back_from"] == r2.release
    watch.record(ng=False)
    assert watch.poll() is v                                       # the verdict is final


def test_health_watch_rolls_back_on_an_ng_rate_jump_and_confirms_a_healthy_model(bundles, golden, tmp_path):
    deploy, r1, r2 = _two_releases(bundles, golden, tmp_path)
    watch = HealthWatch(deploy, baseline_ng_rate=0.05, limits=HealthLimits(min_frames=20, max_ng_rate_jump=0.2))
    for i in range(20):
        watch.record(ng=i % 2 == 0)                                # 50 % NG after the switch
    v = watch.poll()
    assert v.status == "failed" and "NG rate jumped to 0.500 from 0.050" in v.reason and v.rolled_back
    assert deployment(deploy).current == r1.release

    r3 = install_bundle(pack_bundle(bundles[1].path, tmp_path / "b3.tar"), deploy, golden)
    watch = HealthWatch(deploy, baseline_ng_rate=0.05, limits=HealthLimits(min_frames=20))
    for i in range(19):
        watch.record(ng=i == 3)
    assert watch.poll().status == "pending"
    watch.record(ng=False)
    v = watch.poll()
    assert v.status == "ok" and not v.rolled_back
    assert deployment(deploy).health == "ok" and deployment(deploy).current == r3.release


def test_judge_health_rules():
    lim = HealthLimits(window_s=10, min_frames=10, max_error_rate=0.1, max_ng_rate_jump=0.2)
    assert judge_health(0, 0, 0, 5, None, lim)[0] == "pending"
    assert judge_health(3, 0, 0, 11, None, lim) == ("failed", "only 3 frames processed within 10 s of the switch")
    assert judge_health(10, 2, 0, 1, None, lim)[0] == "failed"                # 2/12 errors
    assert judge_health(10, 1, 0, 1, None, lim)[0] == "ok"                    # 1/11 errors
    assert judge_health(10, 0, 3, 1, 0.1, lim)[0] == "ok"                     # +0.2 is allowed
    assert judge_health(10, 0, 4, 1, 0.1, lim)[0] == "failed"
    assert judge_health(10, 0, 10, 1, None, lim)[0] == "ok"                   # no baseline: no NG check


def test_judge_health_with_offered_frames_judges_the_model_not_the_line():
    lim = HealthLimits(window_s=10, min_frames=10, max_error_rate=0.1, max_ng_rate_jump=0.2)
    assert judge_health(0, 0, 0, 1e6, None, lim, offered=0)[0] == "pending"        # idle or paused line
    assert judge_health(4, 0, 0, 1e6, None, lim, offered=5)[0] == "pending"        # a slow trigger line
    assert judge_health(0, 0, 0, 11, None, lim, offered=1) == (
        "failed", "only 0 of 1 frames offered were processed within 10 s of the first")  # a hung model
    assert judge_health(3, 0, 0, 11, None, lim, offered=13)[0] == "failed"         # 10 left unprocessed
    assert judge_health(3, 0, 0, 9, None, lim, offered=13)[0] == "pending"         # not yet past the window
    assert judge_health(10, 0, 0, 0, None, lim, offered=10)[0] == "ok"


def test_health_watch_window_starts_at_the_first_offered_frame(bundles, golden, tmp_path):
    deploy, r1, r2 = _two_releases(bundles, golden, tmp_path)
    clock, captured = Clock(), [100]
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=60, min_frames=10), clock=clock,
                        offered=lambda: captured[0])
    clock.t += 3600                                                 # an hour with the line stopped
    assert watch.poll().status == "pending"
    captured[0] += 2                                                # two parts in trigger mode
    watch.record(ng=False)
    assert watch.poll().status == "pending"
    clock.t += 59
    assert watch.poll().status == "pending"
    clock.t += 2                                                    # one frame offered and never processed
    assert watch.poll().status == "pending"                         # ... but one is still in flight, not a hang
    for _ in range(8):
        captured[0] += 1
        clock.t += 30
        watch.record(ng=False)
    watch.record(ng=False)
    v = watch.poll()
    assert v.status == "ok" and deployment(deploy).health == "ok" and deployment(deploy).current == r2.release


def test_a_deploy_dir_that_is_a_file_is_named_as_such(tmp_path):
    f = tmp_path / "deploy"
    f.write_text("not a folder")
    with pytest.raises(InputError, match="deploy: not a folder; expected a deploy folder"):
        current_path(f)


def test_rollback_needs_a_previous_release(bundles, golden, tmp_path):
    a, _, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    with pytest.raises(RuntimeFailure, match="no previous release"):
        rollback_model(deploy)
    v = HealthWatch(deploy, limits=HealthLimits(window_s=0)).poll()
    assert v.status == "failed" and not v.rolled_back and "rollback impossible" in v.reason


def test_old_releases_are_pruned_but_current_and_previous_kept(bundles, golden, tmp_path):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    ids = [install_bundle(pack_bundle((a, b)[i % 2].path, tmp_path / f"{i}.tar"), deploy, golden, keep=2).release
           for i in range(4)]
    left = sorted(p.name for p in (deploy / "releases").iterdir())
    assert left == sorted(ids[-2:]) and ids[0].startswith("r0001-") and ids[-1].startswith("r0004-")
    rollback_model(deploy)
    assert deployment(deploy).current == ids[-2]


def test_a_power_cut_in_a_prune_leaves_no_half_release_to_roll_back_to(bundles, tmp_path, monkeypatch):
    """A power cut while an install deletes an old release: no half-deleted release is listed or taken by
    'rollback --to' (it was, and the next run failed: current/manifest.json not found); the next install
    deletes what is left."""
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    arch = [pack_bundle(a.path, tmp_path / "a.tar"), pack_bundle(b.path, tmp_path / "b.tar")]
    ids = [install_bundle(arch[i], deploy, require_golden=False, keep=2).release for i in range(2)]
    real = deploy_mod.shutil.rmtree

    def cut(path, *args, **kw):   # the power goes after the first file of a release is deleted
        if Path(path).parent.name == "releases" and not Path(path).name.startswith(".incoming"):
            next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            raise SystemExit("power cut")
        return real(path, *args, **kw)

    monkeypatch.setattr(deploy_mod.shutil, "rmtree", cut)
    with pytest.raises(SystemExit):
        install_bundle(arch[0], deploy, require_golden=False, keep=2)   # prunes ids[0]
    monkeypatch.undo()
    current = deployment(deploy).current
    assert [r["id"] for r in deploy_mod.releases(deploy)] == [current, ids[1]]
    with pytest.raises(InputError, match=f"--to {ids[0]}: no such release"):
        rollback_model(deploy, to=ids[0])
    install_bundle(arch[1], deploy, require_golden=False, keep=2)
    assert not [p.name for p in (deploy / "releases").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("cut_at", ["before its record", "before 'current' moves"])
def test_an_install_killed_before_its_switch_leaves_no_release_and_never_costs_a_kept_one(bundles, tmp_path,
                                                                                        monkeypatch, caplog, cut_at):
    """A kill -9 (a power cut) of an install after its folder is renamed into releases/ and before 'current' moves
    to it: that folder is no release. It was listed as one ('health unchecked'), 'rollback --to' took it, and the
    next installs counted it among the 3 newest kept and deleted the release still needed (the one the line ran,
    with its calibrations fitted on the device). It is not listed (a warning names it), not taken, not counted,
    and the next install removes it."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, c = bundles
    deploy = tmp_path / "deploy"
    arch = {n: pack_bundle(x.path, tmp_path / f"{n}.tar") for n, x in (("a", a), ("b", b), ("c", c))}
    r1 = install_bundle(arch["a"], deploy, require_golden=False)
    if cut_at == "before its record":
        monkeypatch.setattr(deploy_mod, "_switch_recorded", lambda *a, **k: (_ for _ in ()).throw(SystemExit(9)))
    else:
        real = deploy_mod._point
        monkeypatch.setattr(deploy_mod, "_point", lambda d, name, rid: (_ for _ in ()).throw(SystemExit(9))
                            if name == "current" else real(d, name, rid))
    with pytest.raises(SystemExit):
        install_bundle(arch["b"], deploy, require_golden=False)
    monkeypatch.undo()
    orphan = next(p.name for p in (deploy / "releases").iterdir() if p.name.startswith("r0002-"))
    assert deployment(deploy).current == r1.release
    assert [r["id"] for r in deploy_mod.releases(deploy)] == [r1.release]
    res = CliRunner().invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert res.exit_code == 0 and "r0002" not in res.stdout, res.output
    assert f"warning: releases/{orphan} was never switched in" in res.stderr
    res = CliRunner().invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
    assert json.loads(res.stdout)["not_switched_in"] == [orphan]
    with pytest.raises(InputError, match=f"--to {orphan}: no such release"):
        rollback_model(deploy, to=orphan)
    with caplog.at_level("WARNING", logger="edge_ad.calibration.deploy"):
        r2 = install_bundle(arch["b"], deploy, require_golden=False)
    assert f"releases/{orphan} (a release never switched in" in caplog.text
    r3 = install_bundle(arch["c"], deploy, require_golden=False)   # keep 3: the first release is still kept
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == [r1.release, r2.release, r3.release]
    assert not r3.pruned and [r["id"] for r in deploy_mod.releases(deploy)] == [r3.release, r2.release, r1.release]
    assert not list((deploy / "releases").glob(f"*/{deploy_mod.NOT_SWITCHED}"))


def _installed_then_cut_after_current_moved(bundles, tmp_path, monkeypatch):
    """A deploy folder with bundles[0] installed, then bundles[1]'s install cut after 'current' moved to it and
    before its not-switched-in mark was dropped. Returns (deploy folder, the first install)."""
    a, b = bundles[0], bundles[1]
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    real = deploy_mod._point

    def cut(d, name, rid):
        real(d, name, rid)
        if name == "current":
            (d / "releases" / rid / deploy_mod.NOT_SWITCHED).write_text("{}")   # as if cut before its unlink
            raise SystemExit(9)

    monkeypatch.setattr(deploy_mod, "_point", cut)
    with pytest.raises(SystemExit):
        install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False)
    monkeypatch.undo()
    return deploy, r1


def test_a_release_whose_switch_was_cut_after_current_moved_stays_the_release_in_force(bundles, tmp_path,
                                                                                      monkeypatch):
    """Cut after 'current' moved to the new release but before its mark was dropped: it is the release in force,
    listed, kept by the next install (which drops the mark), never taken for one never switched in."""
    c = bundles[2]
    deploy, r1 = _installed_then_cut_after_current_moved(bundles, tmp_path, monkeypatch)
    dep = deployment(deploy)
    assert dep.current.startswith("r0002-") and dep.previous == r1.release and dep.health == "pending"
    assert [r["id"] for r in deploy_mod.releases(deploy)] == [dep.current, r1.release]
    r3 = install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, require_golden=False)
    assert r3.previous == dep.current and not r3.pruned
    assert not list((deploy / "releases").glob(f"*/{deploy_mod.NOT_SWITCHED}"))


def test_a_release_cut_short_keeps_no_mark_once_a_rollback_makes_it_previous(bundles, tmp_path, monkeypatch):
    """A release whose switch was cut after 'current' moved kept its mark; a rollback then made it 'previous' and
    left the mark, and once another switch moved 'previous' on, the next install took it for one never switched
    in and deleted it (a release the line had run). A switch now drops the mark of both releases it links."""
    c = bundles[2]
    deploy, r1 = _installed_then_cut_after_current_moved(bundles, tmp_path, monkeypatch)
    r2 = deployment(deploy).current
    rollback_model(deploy)                                    # r1 in force, r2 previous
    assert deployment(deploy).previous == r2
    assert not (deploy / "releases" / r2 / deploy_mod.NOT_SWITCHED).exists()
    r3 = install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, require_golden=False)
    assert r3.previous == r1.release and (deploy / "releases" / r2).is_dir()     # kept: one of the 3 newest
    assert r2 in [r["id"] for r in deploy_mod.releases(deploy)]


def test_rollback_refuses_a_release_that_cannot_be_opened(bundles, tmp_path):
    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    (r1.path / "model.onnx").unlink()                  # half deleted (by hand, or an older edge-ad's prune)
    with pytest.raises(RuntimeFailure, match=f"release {r1.release} is not openable: .*model.onnx: not found.*; "
                                             f"not rolled back, 'current' is still {before.current}"):
        rollback_model(deploy)
    with pytest.raises(InputError, match=f"release {r1.release} is not openable"):
        rollback_model(deploy, to=r1.release)
    v = HealthWatch(deploy, limits=HealthLimits(window_s=0)).poll()
    assert not v.rolled_back and "rollback impossible" in v.reason and deployment(deploy) == before
    shutil.rmtree(r1.path / "calibration.d")
    (r1.path / "manifest.json").unlink()               # no manifest: not a release any more
    assert [r["id"] for r in deploy_mod.releases(deploy)] == [before.current]


@pytest.mark.parametrize("damage", ["graph deleted", "manifest corrupt", "graph not recorded"])
def test_rollback_refuses_an_unopenable_release_in_the_words_of_bundle_status(bundles, tmp_path, damage):
    """rollback_model had its own copy of release_problem's check, with its own words ('cannot be opened (...)'
    where 'bundle status' said 'not openable: ...'); one check now names the release alike in both."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    if damage == "graph deleted":
        (r1.path / "model.onnx").unlink()
    elif damage == "manifest corrupt":
        (r1.path / "manifest.json").write_text("{not json")
    else:                                              # on disk, but not this bundle's model
        manifest = json.loads((r1.path / "manifest.json").read_text())
        del manifest["files"]["model.onnx"]
        (r1.path / "manifest.json").write_text(json.dumps(manifest))
    problem = deploy_mod.release_problem(deploy, r1.release)
    why = {"graph deleted": "model.onnx: not found", "manifest corrupt": "unreadable manifest",
           "graph not recorded": "model.onnx: not recorded in"}[damage]
    assert problem.startswith("not openable: ") and why in problem
    assert [r["problem"] for r in deploy_mod.releases(deploy) if r["id"] == r1.release] == [problem]
    for to, error in ((None, RuntimeFailure), (r1.release, InputError)):
        with pytest.raises(error) as err:
            rollback_model(deploy, to=to)
        assert str(err.value) == (f"release {r1.release} is {problem}; not rolled back, 'current' is still "
                                  f"{before.current}")
    assert deployment(deploy) == before


def test_a_power_cut_between_the_two_link_updates_never_leaves_previous_on_current(bundles, tmp_path,
                                                                                   monkeypatch):
    """It left previous == current: a rollback then 'succeeded' onto the release in force, changing nothing."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    r2 = deployment(deploy).current
    real, calls = deploy_mod._point, []

    def cut_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise SystemExit("power cut")
        return real(*args)

    monkeypatch.setattr(deploy_mod, "_point", cut_second)
    with pytest.raises(SystemExit):
        install_bundle(tmp_path / "a.tar", deploy, require_golden=False)   # A again: a new release
    dep = deployment(deploy)
    assert dep.current not in (r1.release, r2) and dep.previous == r2 and dep.health == "pending"
    calls.clear()
    with pytest.raises(SystemExit):
        rollback_model(deploy)
    monkeypatch.undo()
    back = deployment(deploy)
    assert (back.current, back.previous) == (r2, dep.current)
    assert (rollback_model(deploy).current, deployment(deploy).previous) == (dep.current, r2)
    deploy_mod._point(deploy, "previous", dep.current)   # left so by an older edge-ad
    with pytest.raises(RuntimeFailure, match=f"no previous release to roll back to \\('previous' is the release "
                                             f"in force, {dep.current}\\)"):
        rollback_model(deploy)


def test_a_rollback_waits_for_no_install(bundles, tmp_path):
    """A rollback (CLI, health check) takes the deploy lock an install holds: refused while another process
    or thread installs; the thread that holds it (update_model rolling back a failed swap) may."""
    import fcntl
    import os

    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    fd = os.open(deploy / "releases", os.O_RDONLY)   # another process installing holds this lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RuntimeFailure, match="another install or rollback in this deploy folder is running"):
            rollback_model(deploy)
        v = HealthWatch(deploy, limits=HealthLimits(window_s=0)).poll()
        assert not v.rolled_back and "another install or rollback" in v.reason
    finally:
        os.close(fd)
    assert deployment(deploy) == before
    with deploy_mod.deploy_lock(deploy):
        assert rollback_model(deploy).current == r1.release


class _HeldElsewhere:
    """The deploy lock as another process holds it (an 'edge-ad bundle install' from a shell): flock on
    another open of releases/, which no thread of this process may take either."""

    def __init__(self, deploy: Path):
        import fcntl
        import os

        self._os = os
        self.fd = os.open(deploy / "releases", os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self):
        if self.fd is not None:
            self._os.close(self.fd)
            self.fd = None


def test_a_health_rollback_waits_for_the_deploy_lock_and_lands_when_it_is_free(bundles, tmp_path):
    """It gave up for good: 'rollback impossible', and the failing model kept inspecting until a restart."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=60, min_frames=10, rollback_wait_s=300), clock=clock)
    held = _HeldElsewhere(deploy)
    try:
        clock.t += 61
        v = watch.poll()
        assert v.status == "failed" and v.rollback == "waiting" and not v.rolled_back
        assert "no frames processed within 60 s" in v.reason and "the rollback waits for the deploy folder" in v.reason
        assert "another install or rollback in this deploy folder is running" in v.reason
        watch.record(ng=False)                                          # frames after the verdict do not count
        clock.t += 100
        assert watch.poll().rollback == "waiting" and watch.frames == 0
        assert deployment(deploy).current == failing
    finally:
        held.release()
    clock.t += 1
    v = watch.poll()
    assert v.status == "failed" and v.rollback == "done" and v.rolled_back and v.restored == r1.path
    assert "after waiting 101 s for the deploy lock" in v.reason
    dep = deployment(deploy)
    assert (dep.current, dep.previous, dep.health) == (r1.release, failing, "unchecked")
    assert watch.poll() is v                                            # final now


def test_a_health_rollback_held_off_too_long_is_given_up_saying_so(bundles, tmp_path):
    deploy, _ = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0, rollback_wait_s=300), clock=clock)
    held = _HeldElsewhere(deploy)
    try:
        assert watch.poll().rollback == "waiting"
        clock.t += 299
        assert watch.poll().rollback == "waiting"
        clock.t += 1
        v = watch.poll()
    finally:
        held.release()
    assert v.status == "failed" and v.rollback == "given_up" and not v.rolled_back
    assert "rollback given up: another install or rollback held the deploy folder for 300 s" in v.reason
    assert watch.poll() is v and deployment(deploy) == before          # final: not retried once the lock is free


@pytest.mark.parametrize("meanwhile", ["install", "rollback"])
def test_an_owed_health_rollback_never_undoes_someone_elses_switch(bundles, tmp_path, meanwhile):
    """The lock was held by an install (or a rollback by hand) that switched 'current': rolling back then
    would have rolled back THEIR release. The owed rollback is dropped, and says why."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0))
    held = _HeldElsewhere(deploy)
    try:
        assert watch.poll().rollback == "waiting"
    finally:
        held.release()                                                  # their command ends with a switch:
    if meanwhile == "install":
        theirs = install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy,
                                require_golden=False).release
    else:
        theirs = rollback_model(deploy, reason="edge-ad bundle rollback").current
    assert theirs != failing
    v = watch.poll()
    assert v.status == "failed" and v.rollback == "dropped" and not v.rolled_back
    assert f"rollback dropped: 'current' is {theirs} now, not the release judged, {failing}" in v.reason
    assert deployment(deploy).current == theirs and watch.poll() is v


def test_a_health_watch_judges_only_its_release(bundles, tmp_path):
    """A release switched in by someone else while the watch ran is neither rolled back nor called healthy
    on the frames of the model the watch judged."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    bad = HealthWatch(deploy, limits=HealthLimits(window_s=0))
    good = HealthWatch(deploy, limits=HealthLimits(min_frames=1))
    theirs = install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy, require_golden=False).release
    v = bad.poll()
    assert v.rollback == "dropped" and f"not the release judged, {judged}" in v.reason
    good.record(ng=False)
    v = good.poll()
    assert v.status == "ok" and "not recorded as healthy" in v.reason
    dep = deployment(deploy)
    assert (dep.current, dep.health) == (theirs, "pending")


def test_a_healthy_verdict_is_recorded_under_the_deploy_lock_on_the_judged_release_only(bundles, tmp_path):
    """poll()'s "ok" checked that 'current' had not moved, then confirmed whatever 'current' was, without the
    deploy lock: a rollback by hand landing between the two got its release (which a rollback leaves
    'rolled_back', unjudged) recorded healthy on frames of the release judged. The check and the record now
    happen under the lock: a switch tried in between is refused (Busy) and lands after."""
    import threading

    from edge_ad.errors import Busy

    deploy, r1 = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    watch = HealthWatch(deploy, limits=HealthLimits(min_frames=5, window_s=10), clock=Clock())
    real_moved_on, outcome = watch._moved_on, []

    def moved_on_then_a_rollback_by_hand():
        moved = real_moved_on()

        def by_hand():   # another thread, as another process: the deploy lock is not shared with it
            try:
                outcome.append(rollback_model(deploy, reason="edge-ad bundle rollback", to=r1.release).current)
            except Busy as exc:
                outcome.append(exc)
        t = threading.Thread(target=by_hand)
        t.start()
        t.join()
        return moved

    watch._moved_on = moved_on_then_a_rollback_by_hand
    for _ in range(10):
        watch.record(ng=False)
    v = watch.poll()
    assert v.status == "ok" and "not recorded" not in v.reason
    assert len(outcome) == 1 and isinstance(outcome[0], Busy), outcome
    dep = deployment(deploy)
    assert (dep.current, dep.health) == (judged, "ok")
    assert rollback_model(deploy, reason="edge-ad bundle rollback", to=r1.release).current == r1.release  # now
    dep = deployment(deploy)
    assert (dep.current, dep.health) == (r1.release, "unchecked") and watch.poll() is v
    with pytest.raises(RuntimeFailure, match=f"'current' is {r1.release} now, not {judged}; not recorded as healthy"):
        deploy_mod.confirm(deploy, release=judged)
    assert deployment(deploy).health == "unchecked"


@pytest.mark.parametrize("meanwhile", ["nothing", "install"])
def test_a_healthy_verdict_waits_for_the_deploy_lock(bundles, tmp_path, meanwhile):
    """While another install or rollback holds the deploy folder the "ok" is not recorded yet (pending, its
    frames judged): recorded at a later poll, or not at all when their command switched 'current'."""
    deploy, _ = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(min_frames=5, window_s=10), clock=clock)
    for _ in range(10):
        watch.record(ng=False)
    held = _HeldElsewhere(deploy)
    try:
        v = watch.poll()
        assert v.status == "pending" and v.frames == 10 and "healthy, not recorded yet: another install" in v.reason
        watch.record(ng=True)                                           # judged already: later frames do not count
        assert watch.poll().status == "pending" and watch.frames == 10
        assert deployment(deploy).health == "pending"
    finally:
        held.release()
    if meanwhile == "install":
        theirs = install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy,
                                require_golden=False).release
    assert watch.poll().status == "pending"                             # tried again after 1 s, not at every poll
    clock.t += 1
    v = watch.poll()
    assert v.status == "ok" and v.frames == 10 and watch.poll() is v
    dep = deployment(deploy)
    assert v.record == ("done" if meanwhile == "nothing" else "dropped")
    if meanwhile == "nothing":
        assert (dep.current, dep.health) == (judged, "ok") and "not recorded" not in v.reason
    else:
        assert (dep.current, dep.health) == (theirs, "pending")
        assert f"not recorded as healthy: 'current' is {theirs} now, not the release judged, {judged}" in v.reason


@pytest.mark.parametrize("cause", ["disk full", "lock held"])
def test_a_healthy_record_that_cannot_be_written_backs_off_and_is_given_up(bundles, tmp_path, monkeypatch, caplog,
                                                                          cause):
    """The "ok" record was tried again at every poll (ten times a second) for ever while the deploy lock stayed
    held, and a deploy.json that could not be written (a full disk) raised out of poll(), stopping the line.
    It is now tried again after 1, 2, 4 ... s (at most 60 s apart), and given up after record_wait_s with an
    ERROR: the verdict is "ok" with record "given_up", and the release stays pending in deploy.json."""
    import errno
    import logging

    deploy, _ = _installed_twice(bundles, tmp_path)
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(min_frames=5, window_s=10, record_wait_s=300), clock=clock)
    for _ in range(5):
        watch.record(ng=False)
    tries, real = [], deploy_mod.confirm

    def confirm(*args, **kw):
        tries.append(clock.t - 1000.0)
        if cause == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device", str(deploy / "deploy.json"))
        return real(*args, **kw)

    monkeypatch.setattr(deploy_mod, "confirm", confirm)
    held = _HeldElsewhere(deploy) if cause == "lock held" else None
    caplog.set_level(logging.WARNING, logger="edge_ad.calibration.deploy")
    try:
        v = watch.poll()
        assert v.status == "pending" and "healthy, not recorded yet" in v.reason
        why = "deploy.json: no space left on device" if cause == "disk full" else "another install or rollback"
        assert why in v.reason
        for tenth in range(1, 3000):                                    # polled ten times a second
            clock.t = 1000.0 + tenth / 10
            v = watch.poll()
            assert v.status == "pending", v
        clock.t = 1300.0
        v = watch.poll()
    finally:
        if held is not None:
            held.release()
    if cause == "disk full":
        assert [round(t, 1) for t in tries] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 123.0, 183.0, 243.0, 300.0]
    assert v.status == "ok" and v.record == "given_up" and not v.rolled_back
    assert "not recorded as healthy" in v.reason and "given up after 300 s" in v.reason
    assert watch.poll() is v and deployment(deploy).health == "pending"    # the next start watches it again
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "given up" in errors[0].getMessage()


SWITCH_WRITES = ["deploy.json before the switch", "current", "previous", "deploy.json after the switch"]
MOVED = ("previous", "deploy.json after the switch")   # the writes after 'current' moved


class _DiskFullAt:
    """A full disk at one write of a switch, a rollback's or an install's (the rename that puts it in place fails
    with ENOSPC): deploy.json's pending record before the switch, the 'current' or 'previous' link, or
    deploy.json's final record."""

    def __init__(self, monkeypatch, point: str):
        import errno
        import os

        self.point, self.state_writes, self.on = point, 0, True
        real = os.replace

        def replace(src, dst, *args, **kw):
            name = Path(dst).name
            if self.on and name == "deploy.json":
                self.state_writes += 1
                if point == "deploy.json before the switch" or point.endswith("after the switch") and \
                        self.state_writes > 1:
                    raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            elif self.on and name == point:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return real(src, dst, *args, **kw)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("point", SWITCH_WRITES)
def test_a_health_rollback_that_cannot_be_written_never_raises_and_leaves_a_state_that_opens(bundles, tmp_path,
                                                                                            monkeypatch, caplog,
                                                                                            point):
    """A full disk in a health-check rollback raised OSError out of poll(), stopping the line, and one after
    'current' moved left the release rolled back to 'pending' (a restart watched it as a new release, and rolled
    back to the failing one when it failed). Before 'current' moves nothing changes and the rollback is tried
    again (backing off); after, the rollback holds ("done", its reason naming the incomplete record, one
    ERROR), and deployment(), releases() and the next rollback read it from deploy.json's pending record."""
    import logging

    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0, rollback_wait_s=300), clock=clock)
    full = _DiskFullAt(monkeypatch, point)
    caplog.set_level(logging.WARNING, logger="edge_ad.calibration.deploy")
    v = watch.poll()                                                    # no OSError out of it
    dep = deployment(deploy)
    Bundle.open(current_path(deploy), verify=True)                      # the state opens
    assert not list(deploy.glob(".*.tmp")) and "no space left on device" in v.reason
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if point in MOVED:                                                  # 'current' moved: rolled back
        assert (v.status, v.rollback, v.rolled_back, v.restored, v.rolled_back_to) == (
            "failed", "done", True, r1.path, r1.release)
        assert "rolled back, but its record is incomplete" in v.reason and watch.poll() is v
        assert (dep.current, dep.previous, dep.health) == (r1.release, failing, "unchecked")
        assert {r["id"]: r["health"] for r in deploy_mod.releases(deploy)}[failing] == "failed"
        assert len(errors) == 1 and "the record of the rollback is incomplete" in errors[0].getMessage()
        full.on = False                                                 # the next rollback completes the record
        back = rollback_model(deploy, reason="edge-ad bundle rollback", force=True)
        assert (back.current, back.previous, back.health) == (failing, r1.release, "failed")
        assert "pending" not in back.detail and back.unrecorded is None
        return
    assert (v.status, v.rollback, v.rolled_back) == ("failed", "waiting", False)
    assert f"the rollback is not done yet: the deploy folder cannot be written ({deploy}" in v.reason
    assert (dep.current, dep.previous, dep.health) == (failing, r1.release, "pending") and not errors
    clock.t += 0.5
    assert watch.poll() is v                                            # tried again after 1 s, not at every poll
    full.on = False
    clock.t += 0.5
    v = watch.poll()
    assert (v.rollback, v.rolled_back, v.rolled_back_to) == ("done", True, r1.release)
    assert "after waiting 1 s for the deploy folder to be writable" in v.reason
    dep = deployment(deploy)
    assert (dep.current, dep.previous, dep.health) == (r1.release, failing, "unchecked")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_health_rollback_that_stays_unwritable_backs_off_and_is_given_up(bundles, tmp_path, monkeypatch, caplog):
    import logging

    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    clock = Clock()
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0, rollback_wait_s=300), clock=clock)
    tries, real = [], deploy_mod.rollback_model

    def rollback(*args, **kw):
        tries.append(clock.t - 1000.0)
        return real(*args, **kw)

    monkeypatch.setattr(deploy_mod, "rollback_model", rollback)
    _DiskFullAt(monkeypatch, "deploy.json before the switch")          # at every try
    caplog.set_level(logging.WARNING, logger="edge_ad.calibration.deploy")
    for tenth in range(0, 3000):                                        # polled ten times a second
        clock.t = 1000.0 + tenth / 10
        v = watch.poll()
        assert (v.status, v.rollback) == ("failed", "waiting"), v
    clock.t = 1300.0
    v = watch.poll()
    assert [round(t, 1) for t in tries] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 123.0, 183.0, 243.0, 300.0]
    assert (v.status, v.rollback, v.rolled_back) == ("failed", "given_up", False)
    assert "rollback given up: not done within 300 s: the deploy folder cannot be written" in v.reason
    assert watch.poll() is v
    dep = deployment(deploy)
    assert (dep.current, dep.previous, dep.health) == (before.current, before.previous, "pending")   # watched again
    Bundle.open(current_path(deploy), verify=True)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "given up" in errors[0].getMessage()


def test_the_runtime_says_when_a_healthy_record_is_given_up(bundles, tmp_path):
    deploy, _ = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    held = _HeldElsewhere(deploy)
    try:
        svc.reporter.health.limits = HealthLimits(record_wait_s=0)
        for _ in range(HealthLimits().min_frames):
            svc.reporter.health.record(ng=False)
        _check_health(svc)                                               # no exception out of the supervisor's call
        [ev] = _health_events(svc)
        assert (ev["status"], ev["record"], ev["release"]) == ("ok", "given_up", judged)
        assert svc.reporter.health is None and deployment(deploy).health == "pending"
    finally:
        held.release()
        svc.inspector.backend.close()


@pytest.mark.parametrize("point", ["deploy.json before the switch", "previous"])
def test_a_health_rollback_on_a_full_disk_keeps_the_line_running_and_says_how_it_went(bundles, tmp_path, monkeypatch,
                                                                                      point):
    """The supervisor's call raised OSError (it catches EdgeADError only) and the line stopped. Now the line
    keeps inspecting: before 'current' moved, one model_health event says the rollback waits (naming the
    error) and the next how it ended once the disk has room; after, the rollback holds, the restored model is
    swapped in, and a restart runs it without watching it as a new release."""
    a, b, _ = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    clock = Clock()
    try:
        svc.reporter.health._clock = clock
        full = _DiskFullAt(monkeypatch, point)
        _failing_frames(svc)                                            # no exception out of the supervisor's call
        _check_health(svc)
        health = _health_events(svc)
        assert len(health) == 1 and health[0]["release"] == failing
        assert "no space left on device" in health[0]["reason"]
        if point == "previous":
            assert (health[0]["rollback"], health[0]["rolled_back_to"]) == ("done", r1.release)
            assert "rolled back, but its record is incomplete" in health[0]["reason"]
        else:
            assert [health[0][k] for k in ("status", "rollback", "rolled_back")] == ["failed", "waiting", False]
            assert svc.inspector.model_hash == b.model_hash() and deployment(deploy).current == failing
            full.on = False
            clock.t += 1
            _check_health(svc)
            health = _health_events(svc)
            assert [e["rollback"] for e in health] == ["waiting", "done"] and health[1]["rolled_back_to"] == r1.release
        assert svc.inspector.model_hash == a.model_hash() and svc.reporter.health is None
        assert (deployment(deploy).current, deployment(deploy).health) == (r1.release, "unchecked")
    finally:
        svc.inspector.backend.close()
    monkeypatch.undo()
    svc = _line(tmp_path, deploy)                                       # a restart: runs A, watches nothing
    try:
        assert svc.inspector.model_hash == a.model_hash() and svc.reporter.health is None
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("meanwhile", ["nothing", "install"])
def test_the_runtime_says_once_that_its_rollback_waits_and_then_how_it_ended(bundles, tmp_path, meanwhile):
    """update_model's health check fails while 'edge-ad bundle install' holds the deploy folder: one
    model_health event says the rollback waits, the next says how it ended; the restored model is swapped
    in once the rollback lands, and someone else's new release is left alone."""
    a, b, _ = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    held = _HeldElsewhere(deploy)
    try:
        _failing_frames(svc)
        for _ in range(3):
            _check_health(svc)
        health = _health_events(svc)
        assert [e["rollback"] for e in health] == ["waiting"] and health[0]["status"] == "failed"
        assert "the rollback waits for the deploy folder" in health[0]["reason"] and not health[0]["rolled_back"]
        assert (health[0]["release"], health[0]["rolled_back_to"]) == (failing, None)
        assert svc.inspector.model_hash == b.model_hash()
        held.release()
        theirs = None
        if meanwhile == "install":
            theirs = install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy,
                                    require_golden=False).release
        _check_health(svc)
        _check_health(svc)
        health = _health_events(svc)
        assert len(health) == 2 and svc.reporter.health is None and health[1]["release"] == failing
        if meanwhile == "nothing":
            assert health[1]["rollback"] == "done" and health[1]["rolled_back"] is True
            assert health[1]["rolled_back_to"] == r1.release
            assert deployment(deploy).current == r1.release and svc.inspector.model_hash == a.model_hash()
        else:
            assert health[1]["rollback"] == "dropped" and f"'current' is {theirs} now" in health[1]["reason"]
            assert deployment(deploy).current == theirs and svc.inspector.model_hash == b.model_hash()
    finally:
        held.release()
        svc.inspector.backend.close()


def test_a_health_rollback_swap_leaves_a_model_switched_in_before_it_running(bundles, tmp_path, monkeypatch, caplog):
    """The restored model is swapped in on a thread of its own (_in_background, so that the supervisor feeds the
    watchdog meanwhile), after the verdict rolled 'current' back: a reload that switches another release in
    before that swap runs stands; the rollback's swap does not undo it."""
    a, b, c = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    svc = _line(tmp_path, deploy)
    swaps = []
    monkeypatch.setattr(svc, "_in_background", lambda what, change: swaps.append((what, change)))
    try:
        _failing_frames(svc)
        [ev] = _health_events(svc)
        assert (ev["rollback"], deployment(deploy).current) == ("done", r1.release)
        assert [what for what, _ in swaps] == ["health rollback"] and svc.inspector.model_hash == b.model_hash()
        theirs = install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, require_golden=False).release
        svc._reload_bundle()                                            # SIGHUP / MQTT reload: C runs
        swaps[0][1]()
        assert Path(svc.bundle.path).name == theirs and svc.reporter.health.release == theirs
        assert [e["reason"] for e in svc.events if e.get("type") == "model"] == ["reload"]
        assert f"rolled back to {deploy / 'releases' / r1.release}, but" in caplog.text
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("by", ["update_model", "reload"])
def test_an_update_that_supersedes_a_waiting_rollback_sends_its_final_model_health(bundles, tmp_path, by):
    """A failed health check's rollback waited for the deploy lock (one model_health event: rollback
    "waiting"); an MQTT update_model (or a reload onto a release 'edge-ad bundle install' put in) then
    switched another release in and replaced the watch, and no event ever said how the waiting one ended: a
    fleet dashboard waited for ever (or took the new release's verdict for it). It now gets its final event:
    failed, rollback dropped, superseded by the new release; the new release is not rolled back over, and is
    watched on its own."""
    a, b, c = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    held = _HeldElsewhere(deploy)
    try:
        _failing_frames(svc)
        health = [e for e in svc.events if e.get("type") == "model_health"]
        assert [e["rollback"] for e in health] == ["waiting"]
        held.release()                                # the lock is free; a switch comes before the next check
        if by == "update_model":
            out = _update(svc, pack_bundle(c.path, tmp_path / "c.tar"))
            new = out["install"]["release"]
            assert out["health"] == "pending"
        else:                                         # 'edge-ad bundle install' from a shell, then SIGHUP
            new = install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, require_golden=False).release
            svc.reload("bundle")
        assert deployment(deploy).current == new != failing
        health = _health_events(svc)
        assert len(health) == 2, health
        final = health[1]
        assert final["status"] == "failed" and final["rollback"] == "dropped" and not final["rolled_back"]
        assert (final["release"], final["superseded_by"]) == (failing, new)
        assert f"rollback dropped: superseded by {new}, which {by} switched in" in final["reason"]
        assert svc.reporter.health is not None and svc.reporter.health.release == new
        _check_health(svc)                                              # the new watch: no verdict yet
        assert len([e for e in svc.events if e.get("type") == "model_health"]) == 2
        assert deployment(deploy).current == new and svc.inspector.model_hash == c.model_hash()
    finally:
        held.release()
        svc.inspector.backend.close()


# ----------------------------------------------------------------------------- CLI
def test_cli_bundle_pack_install_status_rollback(bundles, golden, tmp_path):
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, c = bundles
    r = CliRunner()
    deploy = tmp_path / "deploy"
    for name, bundle in (("a", a), ("b", b), ("c", c)):
        res = r.invoke(main, ["bundle", "pack", str(bundle.path), str(tmp_path / f"{name}.tar")])
        assert res.exit_code == 0 and "unsigned" in res.output, res.output
    res = r.invoke(main, ["bundle", "install", str(tmp_path / "a.tar"), "--deploy", str(deploy),
                          "--golden", str(golden), "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)["release"]
    res = r.invoke(main, ["bundle", "install", str(tmp_path / "b.tar"), "--deploy", str(deploy), "--golden",
                          str(golden)])
    assert res.exit_code == 0 and "golden check passed on 16 images" in res.output
    res = r.invoke(main, ["bundle", "install", str(tmp_path / "c.tar"), "--deploy", str(deploy), "--golden",
                          str(golden)])
    assert res.exit_code == 1 and "golden-set check failed" in res.output
    _flip_byte(tmp_path / "c.tar", "bundle/model.onnx")
    res = r.invoke(main, ["bundle", "install", str(tmp_path / "c.tar"), "--deploy", str(deploy), "--no-golden"])
    assert res.exit_code == 2 and "update refused" in res.output
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["health"] == "pending"
    res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy)])
    assert res.exit_code == 0 and deployment(deploy).current == first


@pytest.mark.parametrize("point", MOVED)
def test_cli_install_and_rollback_that_switched_with_an_incomplete_record_say_so(bundles, tmp_path, monkeypatch,
                                                                              point):
    """A full disk after 'current' moved: the install (and the rollback) holds, exit 0, and stderr says that its
    record is incomplete and why; --json gives it as unrecorded. 'bundle status' reads the switch."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    archive = pack_bundle(b.path, tmp_path / "b.tar")
    r = CliRunner()
    full = _DiskFullAt(monkeypatch, point)
    res = r.invoke(main, ["bundle", "install", str(archive), "--deploy", str(deploy), "--no-golden"])
    new = deployment(deploy).current
    assert res.exit_code == 0 and f"installed {new} (golden check skipped; previous: {r1.release})" in res.stdout
    assert (f"warning: the install holds, but its record is incomplete: {deploy / point.split()[0]}: no space left "
            "on device; 'current' and deploy.json's pending record say installed") in res.stderr, res.stderr
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
    assert res.exit_code == 0
    assert [json.loads(res.stdout)[k] for k in ("current", "previous", "health")] == [new, r1.release, "pending"]
    full.state_writes = 0
    res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy)])
    assert res.exit_code == 0 and f"current -> releases/{r1.release} (previous: {new})" in res.stdout
    assert "warning: the rollback holds, but its record is incomplete: " in res.stderr, res.stderr
    full.on = False
    res = r.invoke(main, ["bundle", "install", str(archive), "--deploy", str(deploy), "--no-golden", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["unrecorded"] is None


def test_cli_rollback_to_any_kept_release_and_status_lists_them(bundles, tmp_path):
    """A plain rollback swaps current and previous (twice: back where it was); --to goes further back, the
    running loop switches to it on a reload as after a plain rollback; an unknown or pruned id is refused
    naming the kept ones."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    ids = []
    for i, (src, threshold) in enumerate(((b, None), (a, None), (b, 2.0), (b, 2.5))):  # another calibration: a release
        if threshold is not None:
            src.write_calibration(src.calibration().replace(version=0, created="", threshold=threshold,
                                                            policy="manual"))
        ids.append(install_bundle(pack_bundle(src.path, tmp_path / f"{i}.tar"), deploy,
                                  require_golden=False).release)
    pruned, (r1, r2, r3) = ids[0], ids[1:]                  # keep=3: the first is gone
    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
    kept = json.loads(res.stdout)["releases"]
    assert [k["id"] for k in kept] == [r3, r2, r1] and [k["role"] for k in kept] == ["current", "previous", None]
    assert kept[0]["health"] == "pending" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", kept[1]["installed"])
    for _ in range(2):                                       # a second plain rollback undoes the first
        assert r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy)]).exit_code == 0
    assert (deployment(deploy).current, deployment(deploy).previous) == (r3, r2)

    svc = _line(tmp_path, deploy)
    try:
        assert svc.inspector.model_hash == b.model_hash()
        for bad in (pruned, "r0099-nope", r3):
            res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy), "--to", bad])
            assert res.exit_code == 2 and f"--to {bad}: " in res.output and f"kept: {r3}, {r2}, {r1}" in res.output
        assert deployment(deploy).current == r3
        res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy), "--to", r1])
        assert res.exit_code == 0 and f"current -> releases/{r1} (previous: {r3})" in res.stdout, res.output
        assert "SIGHUP" in res.stderr
        assert svc._reload_bundle()["model_hash"] == a.model_hash()      # what SIGHUP / MQTT reload call
        assert svc.inspector.model_hash == a.model_hash() and svc.reporter.health is None
        dep = deployment(deploy)
        assert (dep.current, dep.previous, dep.health) == (r1, r3, "unchecked")   # never judged, never watched
    finally:
        svc.inspector.backend.close()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert res.exit_code == 0 and re.search(rf"{r3}  installed \S+  health unchecked  \(previous\)", res.output)
    assert re.search(rf"{r1}  installed \S+  health unchecked  \(current\)", res.output), res.output


def test_status_gives_each_release_its_own_health_and_a_rollback_by_hand_judges_none(bundles, tmp_path,
                                                                                     monkeypatch):
    """Two releases each judged healthy, then 'edge-ad bundle rollback': status called both 'rolled_back' (the
    one in force took the last switch's state) and deploy.json recorded the healthy release left as 'failed'.
    Each release now has its own health, the rollback by hand names who made it and judges nothing, status says
    how the release in force came back; a release that failed its health check reads 'failed'. An older
    edge-ad's records (health 'rolled_back', a rollback by hand naming the release left 'failed') read so too."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r = CliRunner()

    def status():
        res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        return out, {x["id"]: x["health"] for x in out["releases"]}

    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False).release
    deploy_mod.confirm(deploy)                                       # what the health check records
    r2 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False).release
    assert status()[1] == {r1: "ok", r2: "pending"}
    deploy_mod.confirm(deploy)
    monkeypatch.setenv("SUDO_USER", "alice")
    res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy)])
    assert res.exit_code == 0 and f"current -> releases/{r1} (previous: {r2})" in res.stdout, res.output
    out, health = status()
    assert (out["current"], out["health"], health) == (r1, "ok", {r1: "ok", r2: "ok"})
    assert out["rollback"]["from"] == r2 and not out["rollback"]["failed"], out["rollback"]
    assert re.fullmatch(r"edge-ad bundle rollback \(user .+, sudo from alice\)", out["rollback"]["by"])
    state = json.loads((deploy / "deploy.json").read_text())
    last = state["history"][-1]
    assert (last["event"], last["release"], last["rolled_back_from"], "failed" in last) == ("rolled_back", r1, r2,
                                                                                            False)
    assert last["by"] == out["rollback"]["by"] and state["health"] == "ok"
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert f"current: {r1}  previous: {r2}  health: ok\n" in res.stdout, res.stdout
    assert re.search(rf"rolled back from {r2} at \S+: by hand, edge-ad bundle rollback \(user .+, sudo from alice\) "
                     rf"\(no verdict on {r2}\)", res.stdout), res.stdout
    assert re.search(rf"{r2}  installed \S+  health ok  \(previous\)\n  {r1}  installed \S+  health ok  \(current\)",
                     res.stdout), res.stdout

    assert rollback_model(deploy, by="test").current == r2           # the second plain rollback: r2 again, healthy
    assert deployment(deploy).health == "ok" and status()[1] == {r1: "ok", r2: "ok"}
    r3 = install_bundle(pack_bundle(a.path, tmp_path / "a3.tar"), deploy, require_golden=False, keep=4).release
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0), clock=Clock())
    assert watch.poll().rolled_back                                  # no frame in the window: failed, rolled back
    out, health = status()
    assert (out["current"], out["health"], health) == (r2, "ok", {r1: "ok", r2: "ok", r3: "failed"})
    assert (out["rollback"]["from"], out["rollback"]["failed"], out["rollback"]["by"]) == (r3, True, None)
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert f"rolled back from {r3} at " in res.stdout and ": it failed (health check: no frames processed" \
        in res.stdout, res.stdout
    rollback_model(deploy, to=r3, force=True)                        # by hand onto the failed one: still failed
    assert deployment(deploy).health == "failed" and status()[1][r3] == "failed"

    # deploy.json as an older edge-ad wrote it: a rollback by hand to r2, the release left named "failed"
    state = json.loads((deploy / "deploy.json").read_text())
    state.update(current=r2, previous=r3, health="rolled_back", rolled_back_from=r3, reason="edge-ad bundle rollback")
    state["history"] = [e for e in state["history"] if e["event"] != "rolled_back"] + [
        {"time": "t", "event": "rolled_back", "release": r2, "failed": r1, "reason": "edge-ad bundle rollback"}]
    for name, rid in (("current", r2), ("previous", r3)):
        (deploy / name).unlink()
        (deploy / name).symlink_to(f"releases/{rid}")
    (deploy / "deploy.json").write_text(json.dumps(state))
    (deploy / "releases" / r3 / ".health-failed.json").unlink()
    out, health = status()
    assert (out["health"], health) == ("ok", {r1: "ok", r2: "ok", r3: "unchecked"}), health
    assert (out["rollback"]["from"], out["rollback"]["failed"]) == (r3, False)


def test_status_takes_an_older_edge_ads_rollback_time_from_its_history_and_sees_its_install_after_one(bundles,
                                                                                                      tmp_path):
    """'bundle status' said an older edge-ad's rollback was made at the time of the install before it: that
    rollback left deploy.json's switched_at as it was (its history record has the right time). And an install that
    older edge-ad made after a rollback kept the rollback's rolled_back_from, so status said the release installed
    had come back by a rollback. deploy.json below is shaped as edge-ad 157ceb3 wrote it."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy = tmp_path / "deploy"
    r1, r2, r3 = (install_bundle(pack_bundle(b.path, tmp_path / f"{i}.tar"), deploy, require_golden=False,
                                 keep=3).release for i, b in enumerate(bundles))

    def status(current, previous, state):
        for name, rid in (("current", current), ("previous", previous)):
            (deploy / name).unlink()
            (deploy / name).symlink_to(f"releases/{rid}")
        (deploy / "deploy.json").write_text(json.dumps(state))
        res = CliRunner().invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"])
        assert res.exit_code == 0, res.output
        text = CliRunner().invoke(main, ["bundle", "status", "--deploy", str(deploy)])
        return json.loads(res.stdout)["rollback"], text.stdout

    t1, t2, t_back, t3 = "2026-12-07T02:32:26+00:00", "2026-12-07T02:32:30+00:00", "2026-12-07T02:54:44+00:00", \
        "2026-12-07T02:54:57+00:00"
    hist = []
    for rid, prev, t in ((r1, None, t1), (r2, r1, t2)):
        hist += [{"event": "switch_started", "previous": prev, "release": rid, "time": t},
                 {"event": "switched", "golden_passed": None, "previous": prev, "release": rid, "time": t}]
    hist += [{"event": "health_ok", "release": r2, "time": "2026-12-07T02:33:06+00:00"},
             {"event": "rolled_back", "failed": r2, "reason": "edge-ad bundle rollback", "release": r1, "time": t_back}]
    rolled = {"current": r1, "health": "rolled_back", "previous": r2, "reason": "edge-ad bundle rollback",
              "rolled_back_from": r2, "schema_version": 1, "switched_at": t2, "history": hist}
    back, text = status(r1, r2, rolled)
    assert back == {"from": r2, "failed": False, "by": None, "reason": "edge-ad bundle rollback", "time": t_back}
    assert f"rolled back from {r2} at {t_back}: by hand, edge-ad bundle rollback" in text, text
    back, text = status(r1, r2, {**rolled, "history": []})      # no longer in the history kept (the newest 50)
    assert back["time"] is None and f"rolled back from {r2}: by hand" in text, text

    installed = {**rolled, "current": r3, "previous": r1, "health": "pending", "switched_at": t3, "history": hist + [
        {"event": "switch_started", "previous": r1, "release": r3, "time": t3},
        {"event": "switched", "golden_passed": None, "previous": r1, "release": r3, "time": t3}]}
    back, text = status(r3, r1, installed)
    assert back is None and "rolled back" not in text, text


def test_cli_status_and_rollback_name_a_release_deleted_by_hand_or_with_a_corrupt_manifest(bundles, tmp_path):
    """status listed a deleted or unopenable release in force or previous as if all were well (exit 0), and
    a plain rollback whose previous release was deleted said only 'no previous release to roll back to'."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    r = CliRunner()
    archives = [pack_bundle(b.path, tmp_path / f"{i}.tar") for i, b in enumerate(bundles)]

    def three(name):
        d = tmp_path / name
        ids = [install_bundle(a, d, require_golden=False).release for a in archives]
        return d, ids                                           # ids[2] current, ids[1] previous

    def cli(*args):
        res = r.invoke(main, [*args])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception   # no traceback
        return res

    d, (r1, r2, r3) = three("prev_deleted")
    shutil.rmtree(d / "releases" / r2)
    res = cli("bundle", "status", "--deploy", str(d))
    assert res.exit_code == 0 and f"warning: the previous release, {r2}, is gone (no such folder" in res.stderr
    assert (f"prune): no rollback to 'previous' (edge-ad bundle rollback, the health check's, update_model's after "
            "a failed swap) can be made until it is repaired; 'edge-ad bundle rollback --to ID' can, and it or the "
            "next install repairs it (they point 'previous' at the release they replace); 'rollback --to ID' takes a "
            f"kept one: {r1}\n") in res.stderr, res.stderr
    res = cli("bundle", "rollback", "--deploy", str(d))
    assert res.exit_code == 1 and f"'previous' points at releases/{r2}, which is gone (no such folder" in res.output
    assert f"roll back to a kept release with --to ID: {r1}" in res.output and deployment(d).current == r3
    assert cli("bundle", "rollback", "--deploy", str(d), "--to", r1).exit_code == 0

    # the previous release deleted and the only other one unopenable: it was offered for --to all the same
    d, (r1, r2, r3) = three("prev_deleted_other_corrupt")
    shutil.rmtree(d / "releases" / r2)
    (d / "releases" / r1 / "manifest.json").write_text("{")
    res = cli("bundle", "status", "--deploy", str(d))
    assert res.exit_code == 0 and "takes a kept one" not in res.stderr and f"{r1}  installed" in res.stdout
    res = cli("bundle", "rollback", "--deploy", str(d))
    assert res.exit_code == 1 and "--to ID" not in res.output and r1 not in res.output, res.output
    assert ("no other kept release can be rolled back to (1 cannot be opened: see 'edge-ad bundle status'); "
            "install a release ('edge-ad bundle install')") in res.output and deployment(d).current == r3
    # one good, one bad: only the good one is offered
    r4 = install_bundle(archives[0], d, require_golden=False, keep=4).release   # previous: r3, deleted next
    (d / "releases" / r3).rename(d / "releases" / r2)   # r3's folder back as r2: kept and good
    res = cli("bundle", "rollback", "--deploy", str(d))
    assert res.exit_code == 1 and f"roll back to a kept release with --to ID: {r2}\n" in res.output, res.output
    assert r1 not in res.output and "install a release" not in res.output
    assert deployment(d).current == r4

    d, (r1, r2, r3) = three("cur_corrupt")
    (d / "releases" / r3 / "manifest.json").write_text("{not json")
    res = cli("bundle", "status", "--deploy", str(d))
    assert res.exit_code == 1 and re.search(rf"{r3} .*\(current\)  PROBLEM: not openable: .*unreadable manifest",
                                            res.stdout), res.output
    assert (f"error: the release in force, releases/{r3}, is not openable: " in res.output
            and f"roll back to a kept release ('edge-ad bundle rollback', or --to ID: {r2}, {r1})" in res.output)
    res = cli("bundle", "status", "--deploy", str(d), "--json")
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and "unreadable manifest" in out["current_problem"] and out["previous_problem"] is None
    assert [x["problem"] is None for x in out["releases"]] == [False, True, True]
    (d / "releases" / r1 / "manifest.json").write_text("")
    res = cli("bundle", "rollback", "--deploy", str(d), "--to", r1)
    assert res.exit_code == 2 and f"release {r1} is not openable: " in res.output and deployment(d).current == r3
    assert cli("bundle", "rollback", "--deploy", str(d)).exit_code == 0 and deployment(d).current == r2

    d, (r1, r2, r3) = three("cur_deleted")
    shutil.rmtree(d / "releases" / r3)
    res = cli("bundle", "status", "--deploy", str(d))
    assert res.exit_code == 1 and f"error: the release in force, releases/{r3}, is gone (no such folder" in res.output
    shutil.rmtree(d / "releases")
    res = cli("bundle", "rollback", "--deploy", str(d), "--to", r1)
    assert res.exit_code == 2 and f"--to {r1}: no such release: {d} has no releases/ folder" in res.output


def test_cli_bundle_refuses_bad_names_and_folders_leaving_nothing(bundles, golden, tmp_path):
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, _, _ = bundles
    r = CliRunner()
    res = r.invoke(main, ["bundle", "pack", str(a.path), str(tmp_path / "pk" / "a.zip")])  # was a tar named .zip
    assert res.exit_code == 2 and "a.zip: expected a name ending in .tar, .tar.gz, .tgz" in res.output, res.output
    assert not (tmp_path / "pk").exists()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(tmp_path / "nowhere")])  # was "current: -", exit 0
    assert res.exit_code == 2 and f"--deploy {tmp_path / 'nowhere'}: no such folder" in res.output, res.output
    junk = tmp_path / "junk.tar"
    junk.write_text("not a tar")
    deploy = tmp_path / "new" / "deploy"
    for args in (["--no-golden"], ["--golden", str(golden)]):
        res = r.invoke(main, ["bundle", "install", str(junk), "--deploy", str(deploy), *args])
        assert res.exit_code == 2 and "update refused" in res.output, res.output
        assert not (tmp_path / "new").exists()  # was an empty deploy/releases/ left behind
    existing = tmp_path / "dep"
    (existing / "releases").mkdir(parents=True)
    res = r.invoke(main, ["bundle", "install", str(junk), "--deploy", str(existing), "--no-golden"])
    assert res.exit_code == 2 and (existing / "releases").is_dir()  # folders it did not make stay


def test_cli_keygen_never_loses_or_strands_the_private_key(tmp_path):
    pytest.importorskip("cryptography")
    from click.testing import CliRunner

    from edge_ad.cli import main

    r = CliRunner()
    same = tmp_path / "same.pem"
    for pub in (same, tmp_path / "sub" / ".." / "same.pem"):
        res = r.invoke(main, ["bundle", "keygen", "--private", str(same), "--public", str(pub)])
        assert res.exit_code == 2 and "given for both the private and the public key" in res.output, res.output
        assert not same.exists()  # was: exit 0 and only the public key in it
    (tmp_path / "text.mp4").write_text("a file, not a folder")
    ok = tmp_path / "ok.pem"
    res = r.invoke(main, ["bundle", "keygen", "--private", str(ok), "--public", str(tmp_path / "text.mp4" / "pub.pem")])
    assert res.exit_code == 2 and "text.mp4 is a file" in res.output, res.output
    assert not ok.exists()  # was left behind, so a rerun said "exists; not overwriting a key"
    res = r.invoke(main, ["bundle", "keygen", "--private", str(ok), "--public", str(tmp_path / "keys" / "ok.pub")])
    assert res.exit_code == 0 and ok.stat().st_mode & 0o777 == 0o600, res.output
    assert b"PRIVATE KEY" in ok.read_bytes() and b"PUBLIC KEY" in (tmp_path / "keys" / "ok.pub").read_bytes()


def test_keygen_removes_the_private_key_when_the_public_one_fails(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from edge_ad import atomic
    from edge_ad.calibration import generate_ed25519

    real = atomic.write_bytes

    def failing(path, data, **kw):
        if str(path).endswith(".pub"):
            raise OSError(28, "No space left on device", str(path))
        real(path, data, **kw)

    monkeypatch.setattr(atomic, "write_bytes", failing)
    with pytest.raises(OSError):
        generate_ed25519(tmp_path / "k.pem", tmp_path / "k.pub")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --adapt
def _trained(tmp_path_factory, kind: str, part: str, steps: int) -> Bundle:
    """A bundle of ``kind`` trained for ``steps`` at 64 px on 20 synthetic ``part`` images (torch needed)."""
    pytest.importorskip("torch")
    from edge_ad.data.synthetic import write_category
    from edge_ad.train.pipeline import train_bundle

    root = tmp_path_factory.mktemp(kind)
    data = write_category(root / "data", n_train=20, n_test_good=0, n_test_defect=0, size=64, kind=part)
    return train_bundle(kind, data, root / "bundle", image_size=64, steps=steps, policy="max")


@pytest.fixture(scope="module")
def fader_bundle(tmp_path_factory):
    return _trained(tmp_path_factory, "fader", "grain", 2)


@pytest.fixture(scope="module")
def effad_bundle(tmp_path_factory):
    return _trained(tmp_path_factory, "efficientad-s", "disc", 1)


@pytest.mark.slow
def test_adapt_fine_tunes_a_candidate_and_switches_it_in_or_keeps_the_running_model(fader_bundle, tmp_path,
                                                                                     golden, monkeypatch):
    from edge_ad.calibration.adapt import adapt
    from edge_ad.data.synthetic import make_part

    deploy = tmp_path / "deploy"
    first = install_bundle(fader_bundle.path, deploy, require_golden=False)
    running = Bundle.open(first.path)
    frames = [make_part("grain", 64, None, seed=9, index=i).image for i in range(200)]
    before = _release_files(deploy)

    def failing(candidate, golden_dir, running, **settings):
        return {"passed": False, "failures": ["3 wrong decisions on 8 labelled golden images, the running model makes 0"]}

    monkeypatch.setattr(deploy_mod, "check_golden", failing)
    with pytest.raises(GuardFailure, match="golden-set check failed, the running model is unchanged: 3 wrong"):
        adapt(running.path, frames, steps=1, deploy_dir=deploy, golden_dir=golden)
    assert _release_files(deploy) == before and deployment(deploy).current == first.release
    assert not list(running.path.parent.glob("*.adapted-*"))          # the failed candidate is gone
    monkeypatch.undo()

    with pytest.raises(InputError, match="no golden set: give --golden DIR"):   # as 'bundle install' refuses
        adapt(running.path, frames, steps=1, deploy_dir=deploy)
    res = adapt(running.path, frames, steps=1, deploy_dir=deploy, require_golden=False)
    dep = deployment(deploy)
    assert dep.current == res.install.release and dep.previous == first.release and dep.health == "pending"
    cand = Bundle.open(current_path(deploy), verify=True)
    assert cand.manifest["adapted"]["steps"] == 1 and cand.manifest["adapted"]["frames"] == 200
    assert cand.model_hash() != running.model_hash() and res.precision == "fp32"
    assert _release_files(deploy).items() >= before.items()            # the running release untouched
    assert not list(running.path.parent.glob("*.adapted-*"))

    b = copy_bundle(fader_bundle, tmp_path / "g")
    b.manifest["model"]["kind"] = "gaussian"
    b.save_manifest()
    with pytest.raises(InputError, match="Gaussian model has no weights"):
        adapt(b.path, frames, steps=1)
    # the CLI refuses it before collecting any frame (a camera source would take minutes)
    from click.testing import CliRunner
    from edge_ad import calibration as calibration_pkg
    from edge_ad.cli import main

    monkeypatch.setattr(calibration_pkg, "collect_frames", lambda *a, **k: pytest.fail("frames were collected"))
    r = CliRunner().invoke(main, ["calibrate", "--bundle", str(b.path), "--source", str(tmp_path), "--adapt"])
    assert r.exit_code == 2 and "Gaussian model has no weights" in r.output
    r = CliRunner().invoke(main, ["calibrate", "--bundle", str(running.path), "--source", str(tmp_path), "--adapt",
                                  "--adapt-out", str(tmp_path)])
    assert r.exit_code == 2 and "exists; give --adapt-out a new folder" in r.output


@pytest.fixture
def new_normals(tmp_path) -> Path:
    from edge_ad.data.synthetic import make_part

    for i in range(200):
        _write(tmp_path / "new" / f"{i:03d}.png", make_part("disc", 64, None, seed=9, index=i).image)
    return tmp_path / "new"


def _calibrate(*args: str):
    from click.testing import CliRunner
    from edge_ad.cli import main

    return CliRunner().invoke(main, ["calibrate", "--backend", "onnxruntime", *args])


def test_cli_adapt_fine_tunes_an_efficientad_bundle_keeping_its_teacher_normalization(effad_bundle, new_normals,
                                                                                       tmp_path):
    """--adapt on EfficientAD: the candidate keeps the teacher normalization of the running bundle (its scores
    stay comparable) and the fine-tuning is not mistaken for a resume of a training run. With --config it
    reports the threshold the line decides with, as a refit does: here the config's [decision] threshold."""
    import torch
    from edge_ad.models import load_from_bundle

    running = copy_bundle(effad_bundle, tmp_path / "running")   # whose threshold every frame scores above
    running.write_calibration(running.calibration().replace(version=0, created="", threshold=-1e9, policy="manual"))
    line = tmp_path / "line.toml"
    line.write_text(f'[source]\nuri = "dir://{new_normals}"\n\n[decision]\nthreshold = 0.5\n')
    r = _calibrate("--bundle", str(running.path), "--config", str(line), "--frames", "200", "--adapt",
                   "--adapt-steps", "1", "--adapt-out", str(tmp_path / "cand"))
    assert r.exit_code == 0, r.output
    assert "warning: 100% of the frames used score above the threshold of calibration v2" in r.stderr   # as a refit
    cand = Bundle.open(tmp_path / "cand", verify=True)
    assert cand.calibration().n_frames == 20                    # the validation split: a refit's minimum
    thr = cand.calibration().threshold
    assert f"threshold {thr:.6g}, threshold in force 0.5 once installed; the running bundle is unchanged" in r.stdout
    assert f"which overrides the adapted model's {thr:.6g}" in r.stdout
    assert cand.manifest["adapted"]["steps"] == 1
    old, new = load_from_bundle(effad_bundle), load_from_bundle(cand)
    assert torch.equal(old.t_mean, new.t_mean) and torch.equal(old.t_std, new.t_std)
    assert not torch.equal(old.student[0].weight, new.student[0].weight)


def test_cli_adapt_refuses_the_bundles_own_training_images(effad_bundle, tmp_path):
    """--adapt calibrates the candidate on a split of the frames: on the running model's training images
    that threshold would be far too low. A folder of them is refused before any fine-tuning (exit 2)."""
    good = Path(effad_bundle.manifest["training"]["data"]) / "train" / "good"
    r = _calibrate("--bundle", str(effad_bundle.path), "--source", f"dir://{good}", "--frames", "200", "--adapt",
                   "--adapt-steps", "1", "--adapt-out", str(tmp_path / "cand"))
    n_val = len(effad_bundle.manifest["training"]["val_images"])
    assert r.exit_code == 2, r.output
    assert f"{20 - n_val} of the 20 images of {good} are images {effad_bundle.path} was trained on" in r.output
    assert f"the {n_val} other images are fewer than the 40 a calibration needs" in r.output
    assert not (tmp_path / "cand").exists() and effad_bundle.calibration_versions() == [1]


def test_adapt_of_200_frames_goes_on_when_the_screen_leaves_a_few_out(effad_bundle, tmp_path, monkeypatch):
    """--adapt --frames 200 whose screen left 6 likely defects out: the 194 kept still give the candidate 20
    frames to be calibrated on (it was refused: '--adapt on 194 frames: ... give --frames 200 or more')."""
    from edge_ad.calibration import adapt as adapt_mod
    from edge_ad.data.synthetic import make_part
    from edge_ad.train.adapt import adapt_bundle

    frames = [make_part("disc", 64, None, seed=9, index=i).image for i in range(200)]
    left_out = [adapt_mod.Excluded(i, 9.0, 9.0, "likely defect") for i in range(6)]
    monkeypatch.setattr(adapt_mod, "screen_frames", lambda insp, fr, **k: (list(range(6, 200)), left_out, ()))
    res = adapt_mod.adapt(effad_bundle.path, frames, steps=1, out_dir=tmp_path / "cand", progress=False)
    cand = Bundle.open(res.candidate, verify=True)
    assert cand.calibration().n_frames == 20 and cand.manifest["adapted"]["frames"] == 194
    assert len(res.excluded) == 6
    with pytest.raises(InputError, match="--adapt on 39 frames: the candidate is calibrated on 20 of them .* at "
                                         "least 40 are needed"):
        adapt_bundle(effad_bundle.path, frames[:39], tmp_path / "small", steps=1, export=False)


def test_a_failed_adapt_removes_the_candidate_asked_for_with_adapt_out(effad_bundle, new_normals, golden, tmp_path,
                                                                       monkeypatch):
    seen = {}

    def failing(candidate, golden_dir, running, backend="auto", precision=None, limits=None, device=None):
        seen.update(backend=backend, device=device)
        return {"passed": False, "failures": ["2 wrong decisions"]}

    monkeypatch.setattr(deploy_mod, "check_golden", failing)
    r = _calibrate("--bundle", str(effad_bundle.path), "--source", str(new_normals), "--frames", "200", "--adapt",
                   "--adapt-steps", "1", "--adapt-out", str(tmp_path / "cand"), "--golden", str(golden),
                   "--device", "cpu")
    assert r.exit_code == 1 and "failed the golden-set check" in r.output
    assert not (tmp_path / "cand").exists()
    assert seen == {"backend": "onnxruntime", "device": "cpu"}   # the golden check runs where the line runs


def test_adapt_needs_the_trained_weights_and_says_so_before_collecting(effad_bundle, new_normals, tmp_path,
                                                                       monkeypatch):
    from edge_ad import calibration as calibration_pkg

    b = copy_bundle(effad_bundle, tmp_path / "no-ckpt")
    (b.path / "checkpoint.pt").unlink()
    monkeypatch.setattr(calibration_pkg, "collect_frames", lambda *a, **k: pytest.fail("frames were collected"))
    r = _calibrate("--bundle", str(b.path), "--source", str(new_normals), "--adapt")
    assert r.exit_code == 2 and "checkpoint.pt: not found; --adapt fine-tunes the trained weights" in r.output


@pytest.mark.parametrize("option, message", [
    (["--train-device", "gpu0"], "--train-device gpu0: expected cpu, cuda or cuda:N"),
    (["--golden", "/nonexistent/golden"], "/nonexistent/golden: golden folder not found"),
    (["--deploy", "/nonexistent/deploy"], "no golden set: give --golden DIR or put images in "
                                          "/nonexistent/deploy/golden"),     # as 'bundle install' refuses
    (["--no-golden"], "--no-golden goes with --deploy"),
    (["--frames", "12"], "--adapt on 12 frames: the candidate is calibrated on one frame in 10 (its validation "
                         "split), and a calibration needs at least 20 frames: give --frames 200 or more"),
])
def test_adapt_options_are_checked_before_any_frame_is_collected(effad_bundle, new_normals, monkeypatch, option,
                                                                 message):
    from edge_ad import calibration as calibration_pkg

    monkeypatch.setattr(calibration_pkg, "collect_frames", lambda *a, **k: pytest.fail("frames were collected"))
    r = _calibrate("--bundle", str(effad_bundle.path), "--source", str(new_normals), "--adapt", *option)
    assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.parametrize("field, value", [("image_size", [32, 32]), ("outputs", []), ("map_pad", -5)])
def test_an_archive_with_a_bad_manifest_is_refused_even_without_golden_check(tiny_bundle, tmp_path, monkeypatch,
                                                                               field, value):
    from edge_ad import bundle as bundle_mod

    b = copy_bundle(tiny_bundle, tmp_path / "bad")
    b.manifest["model"][field] = value
    b.save_manifest()
    with monkeypatch.context() as m:          # an archive made by another (older, buggy) packer
        m.setattr(bundle_mod, "check_manifest", lambda manifest, where: None)
        m.setattr(package_mod, "_check_opens", lambda b, graph: None)
        archive = pack_bundle(b.path, tmp_path / "bad.tar")
    with pytest.raises(InputError, match=f"manifest.json: model.{field}"):
        install_bundle(archive, tmp_path / "deploy", require_golden=False)
    assert not (tmp_path / "deploy" / "current").exists() and not list((tmp_path / "deploy").rglob("*.*"))


# ----------------------------------------------------------------------------- the runtime's update_model
def _line(tmp_path, deploy: Path, health: str = "", jsonl: str = "", max_frames: int | None = None, **model):
    """A line on ``deploy`` (``model``: more [model] fields; ``health``: the [health] section's lines; ``jsonl``:
    the result log; ``max_frames``: for run()), its config file reloadable ('reload config')."""
    from edge_ad.config import load_settings
    from edge_ad.runtime.service import Service

    extra = "".join(f'{k} = "{v}"\n' for k, v in model.items())
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\n{extra}[source]\nuri = "synthetic://disc?size=64"\n'
                   f'[output]\njsonl = "{jsonl}"\n[telemetry]\ntegrastats = false\n[health]\n{health}')
    return Service(load_settings(cfg), install_signals=False, reload_settings=lambda: load_settings(cfg),
                   max_frames=max_frames)


def _update(svc, archive: Path, **args):
    from edge_ad.atomic import sha256_file

    return svc.update_model({"url": str(archive), "sha256": sha256_file(archive), **args})


def _mqtt_update_model(svc):
    """``svc``'s update_model as the MQTT link runs it (its dispatcher, no broker): args -> the reply's body,
    checked against the reply schema."""
    from edge_ad.mqtt import MqttSettings, schema
    from edge_ad.mqtt.commands import Dispatcher, Incoming
    from edge_ad.mqtt.topics import Topics
    from edge_ad.runtime.commands import Commands

    d = Dispatcher(MqttSettings(site="s", device="d"), Topics("s", "d"))
    d.register("update_model", Commands(svc).update_model)

    def send(args: dict) -> dict:
        body = d.handle(Incoming("update_model", json.dumps(args).encode())).body
        assert schema.errors("reply", body) == [], body
        return body
    return send


def _int8_release(tiny_bundle, tmp_path, golden):
    """A deploy folder whose release in force has an INT8 graph (the line runs precision int8)."""
    from fixtures_bundle import tiny_graph

    a = copy_bundle(tiny_bundle, tmp_path / "A8")
    a.add_file("model.int8.onnx", data=tiny_graph((64, 64)))   # stands in for a quantized graph
    a.set_active("model.int8.onnx", "int8")
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a8.tar"), deploy, golden)
    return deploy


@pytest.mark.parametrize("with_golden", [True, False])
def test_update_model_checks_and_opens_the_candidate_as_the_line_runs_it(tiny_bundle, golden, tmp_path,
                                                                        with_golden):
    """A candidate the line cannot open (no INT8 graph on an int8 line) is refused before 'current' moves,
    with or without a golden set; a restart still finds a model it can run."""
    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    if with_golden:
        shutil.copytree(golden, deploy / "golden")
    before = deployment(deploy).current
    svc = _line(tmp_path, deploy, precision="int8")
    fp32_only = pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar")
    try:
        refused = (rf"{re.escape(str(fp32_only))}: bundle has no int8 graph \(model\.int8\.onnx\) and the line runs "
                   r"int8 \(model\.precision\): run 'edge-ad quantize --precision int8' on the bundle before packing "
                   r"it \(it has fp32\); update refused")
        with pytest.raises(InputError, match=refused):
            _update(svc, fp32_only)
        with pytest.raises(InputError, match=refused):
            _update(svc, fp32_only, activate=False)   # the check alone too (it said ok)
        assert deployment(deploy).current == before and svc.inspector.model_hash == Bundle.open(
            current_path(deploy)).model_hash()
        assert [p.name for p in (deploy / "releases").iterdir()] == [before]
    finally:
        svc.inspector.backend.close()
    _line(tmp_path, deploy, precision="int8").inspector.backend.close()   # a restart opens it


def test_a_check_in_a_precision_the_archive_lacks_names_the_archive_and_the_precisions_it_has(tiny_bundle, tmp_path):
    """A check-only update_model asking for a precision whose graph the archive's bundle lacks said, on a line that
    runs fp32, that the new model "cannot be opened as the line runs it (..., precision int8, ...)", naming
    model.int8.onnx in the check's temporary folder, deleted by then. It names the archive, the graph it lacks
    and the precisions it has; the temporary folder is gone and a precision it has is checked."""
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    b = make_tiny_bundle(tmp_path / "B", pool=4)
    fp32_only = pack_bundle(b.path, tmp_path / "b.tar")
    with_int8 = pack_bundle(add_stand_in_graph(copy_bundle(b, tmp_path / "B8")).path, tmp_path / "b8.tar")
    svc = _line(tmp_path, deploy)   # runs each bundle's active graph: fp32
    update = _mqtt_update_model(svc)
    try:
        body = update({"url": str(fp32_only), "sha256": _sha(fp32_only), "activate": False, "precision": "int8"})
        assert (body["ok"], body["error"]["code"]) == (False, "failed"), body
        assert body["error"]["message"].endswith(
            f"{fp32_only}: bundle has no int8 graph (model.int8.onnx) to check: run 'edge-ad quantize --precision "
            "int8' on the bundle before packing it, or ask for a precision it has: fp32; update refused"), body
        body = update({"url": str(with_int8), "sha256": _sha(with_int8), "activate": False, "precision": "fp16"})
        assert body["error"]["message"].endswith(
            f"{with_int8}: bundle has no fp16 graph (model.fp16.onnx) to check: run 'edge-ad quantize --precision "
            "fp16' on the bundle before packing it, or ask for a precision it has: fp32, int8; update refused"), body
        body = update({"url": str(with_int8), "sha256": _sha(with_int8), "activate": False, "precision": "int8"})
        assert body["ok"] and body["result"]["activated"] is False, body
        assert body["result"]["warnings"][0].endswith("the archive was only verified and opened in precision int8, "
                                                      "as the check asks")
        assert [p.name for p in deploy.iterdir() if p.name.startswith(".check-")] == []
    finally:
        svc.inspector.backend.close()

def test_a_check_only_update_replies_the_model_hash_of_a_gaussian_archive(gaussian_bundle, tiny_bundle, tmp_path):
    """A Gaussian bundle's model_hash covers its statistics, named by its calibration.json: the check-only reply
    took the hash after the archive's temporary folder was deleted, so it said the graph's sha256 alone, the
    same for every Gaussian archive. It is now what 'bundle pack' recorded and the activated reply says."""
    import dataclasses

    from edge_ad.atomic import sha256_file
    from edge_ad.gaussian import GaussianStats

    g1 = copy_bundle(gaussian_bundle, tmp_path / "g1")
    g2 = copy_bundle(gaussian_bundle, tmp_path / "g2")   # the same graph, other statistics
    cal = g2.calibration()
    st = GaussianStats.load(g2.file(cal.extra["gaussian"]))
    dataclasses.replace(st, mean=st.mean + 0.5).save(g2.file("gaussian.d/0002.npz"))
    g2.add_file("gaussian.d/0002.npz")
    g2.write_calibration(cal.replace(version=2, extra={**cal.extra, "gaussian": "gaussian.d/0002.npz"}))
    archives = [pack_bundle(g.path, tmp_path / f"{g.path.name}.tar") for g in (g1, g2)]
    packed = [read_index(a).index["bundle"]["model_hash"] for a in archives]
    assert packed == [g1.model_hash(), g2.model_hash()] and packed[0] != packed[1] != g1.graph_hash()
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "tiny.tar"), deploy, require_golden=False)
    svc = _line(tmp_path, deploy)
    update = _mqtt_update_model(svc)
    try:
        checked = [update({"url": str(a), "sha256": sha256_file(a), "activate": False})["result"]["model_hash"]
                   for a in archives]
        assert checked == packed
        activated = update({"url": str(archives[1]), "sha256": sha256_file(archives[1])})["result"]
        assert activated["model_hash"] == packed[1] == svc.inspector.model_hash
    finally:
        svc.inspector.backend.close()


def test_update_model_rolls_back_when_the_swap_fails_after_the_switch(bundles, golden, tmp_path, monkeypatch):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    first = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    svc = _line(tmp_path, deploy)
    new = pack_bundle(b.path, tmp_path / "b.tar")
    try:
        def fail(bundle, reason):
            raise RuntimeFailure("out of device memory")

        monkeypatch.setattr(svc, "_swap_model", fail)
        with pytest.raises(RuntimeFailure, match=f"could not be swapped in.*back on {first.release}"):
            _update(svc, new)
        dep = deployment(deploy)
        assert dep.current == first.release and dep.health == "unchecked"
        [ev] = _health_events(svc)                                      # as a health-check rollback says it
        assert (ev["status"], ev["rolled_back"], ev["rollback"], ev["release"], ev["rolled_back_to"]) == (
            "failed", True, "done", dep.previous, first.release)
        assert ev["reason"] == f"update_model: {dep.previous} was installed but could not be swapped in (out of " \
                               "device memory); no golden check was done before it was switched in"   # no DEPLOY/golden
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("point", SWITCH_WRITES)
def test_a_failed_swaps_rollback_on_a_full_disk_is_a_failed_reply_naming_the_state_left(bundles, tmp_path,
                                                                                       monkeypatch, point):
    """update_model installed a release the line then could not swap in, and its rollback hit a full disk: the
    OSError left the command (the reply named only the path). Now the reply says what happened and the state
    left: before 'current' moved, 'current' is still the new release (a reload or restart after freeing disk
    space runs it, or rolls it back when it cannot be opened); after, rolled back with its record incomplete."""
    from edge_ad.atomic import sha256_file

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    first = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False).release
    deploy_mod.confirm(deploy)
    svc = _line(tmp_path, deploy)
    update = _mqtt_update_model(svc)
    archive = pack_bundle(b.path, tmp_path / "b.tar")
    full = _DiskFullAt(monkeypatch, point)
    full.on = False
    swap = svc._swap_model

    def fail(bundle, reason):
        full.on = True                                                  # the disk fills up after the install
        raise RuntimeFailure("out of device memory")

    try:
        monkeypatch.setattr(svc, "_swap_model", fail)
        body = update({"url": str(archive), "sha256": sha256_file(archive)})
        full.on = False
        new = deploy_mod._release_ids(deploy)[0]
        assert not body["ok"] and body["error"]["code"] == "failed", body
        msg = body["error"]["message"]
        assert msg.startswith(f"update_model: {new} was installed but could not be swapped in (out of device "
                              "memory); "), msg
        assert svc.inspector.model_hash == a.model_hash() and not list(deploy.glob(".*.tmp"))
        dep = deployment(deploy)
        [ev] = _health_events(svc)                                      # a dashboard learns of it either way
        assert (ev["status"], ev["release"]) == ("failed", new)
        if point in MOVED:
            assert (f"; rolled back, but its record is incomplete: {deploy / point.split()[0]}: no space left on "
                    "device") in msg
            assert msg.endswith(f"; 'current' is back on {first}, the running model is unchanged"), msg
            assert (dep.current, dep.previous, dep.health) == (first, new, "ok")
            assert (ev["rolled_back"], ev["rollback"], ev["rolled_back_to"]) == (True, "done", first)
            return
        assert msg.endswith(f"; and it cannot be rolled back now ({deploy / point.split()[0]}: no space left on "
                            f"device; 'current' is still {new}): free disk space, then reload or restart; the "
                            "running model is unchanged"), msg
        assert (dep.current, dep.previous, dep.health) == (new, first, "pending")
        assert (ev["rolled_back"], ev["rollback"]) == (False, "failed")   # not written, not tried again
        assert ev["reason"] == f"{msg}; no golden check was done before it was switched in"
        monkeypatch.setattr(svc, "_swap_model", swap)
        svc.reload("bundle")                                            # the disk has room again, the model opens
        assert svc.inspector.model_hash == b.model_hash() and svc.reporter.health.release == new
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("point", SWITCH_WRITES)
def test_an_update_on_a_full_disk_replies_as_the_switch_went(bundles, tmp_path, monkeypatch, caplog, point):
    """An OSError after 'current' moved (the 'previous' link or deploy.json's final record not written: a full
    disk) failed the install although the switch happened: update_model replied failed while 'current' said the
    new release (pending) and the line kept the old model until a restart. Now the install holds, as a rollback
    does: one ERROR, the reply activated with a warning naming the incomplete record, the new model swapped in
    and watched, the state read as pending with the right previous until the next install completes the record.
    Before 'current' moved: a failed reply saying nothing was installed, and nothing changed."""
    import logging
    import os

    from edge_ad.atomic import sha256_file

    a, b, c = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    deploy_mod.confirm(deploy)
    svc = _line(tmp_path, deploy)
    update = _mqtt_update_model(svc)
    archive = pack_bundle(b.path, tmp_path / "b.tar")
    try:
        full = _DiskFullAt(monkeypatch, point)
        caplog.set_level(logging.WARNING, logger="edge_ad.calibration.deploy")
        body = update({"url": str(archive), "sha256": sha256_file(archive)})
        full.on = False
        dep = deployment(deploy)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not list(deploy.glob(".*.tmp"))
        if point not in MOVED:
            assert not body["ok"] and body["error"]["code"] == "failed", body
            assert body["error"]["message"].startswith(f"update_model: {deploy / point.split()[0]}: no space left on "
                                                       f"device; not installed: 'current' is still {r1.release}, "
                                                       "the running model is unchanged"), body
            assert (dep.current, dep.previous, dep.health) == (r1.release, None, "ok") and not errors
            assert [p.name for p in (deploy / "releases").iterdir()] == [r1.release]   # no release left behind
            assert svc.inspector.model_hash == a.model_hash() and svc.reporter.health is None
            return
        assert body["ok"], body
        out = body["result"]
        new = out["install"]["release"]
        assert (out["activated"], out["health"], out["install"]["previous"]) == (True, "pending", r1.release)
        assert out["warnings"][1:] == [f"{new} is installed and in force, but the record of the install is "
                                       f"incomplete: {out['install']['unrecorded']}"]
        assert out["warnings"][0].startswith("no golden check was done") and out["golden_checked"] is False
        assert out["install"]["unrecorded"].startswith(f"{deploy / point.split()[0]}: no space left on device; "
                                                       "'current' and deploy.json's pending record say installed")
        assert svc.inspector.model_hash == b.model_hash() and svc.reporter.health.release == new
        assert (dep.current, dep.previous, dep.health) == (new, r1.release, "pending")
        assert {r["id"]: r["role"] for r in deploy_mod.releases(deploy)} == {new: "current", r1.release: "previous"}
        assert len(errors) == 1 and "the record of the install is incomplete" in errors[0].getMessage()
        r3 = install_bundle(pack_bundle(c.path, tmp_path / "c.tar"), deploy, require_golden=False)
        dep = deployment(deploy)                                        # the next install completes the record
        assert (dep.current, dep.previous, dep.health) == (r3.release, new, "pending") and r3.unrecorded is None
        assert "pending" not in dep.detail and os.readlink(deploy / "previous") == f"releases/{new}"
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("health", ["on", "off"])
def test_update_model_without_a_golden_set_says_plainly_that_no_golden_check_was_done(bundles, golden, tmp_path,
                                                                                      health):
    """A device without DEPLOY/golden installed the archive after verifying and opening it only; the reply said
    just "golden": null inside install, and the model_health events of the release nothing. Both say it now:
    golden_checked false, a warning naming what was done instead, and the events' reason; with a golden set,
    golden_checked true and no such words."""
    from edge_ad.atomic import sha256_file

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    deploy_mod.confirm(deploy)
    svc = _line(tmp_path, deploy, health="" if health == "on" else "enabled = false\n")
    update = _mqtt_update_model(svc)
    archive = pack_bundle(b.path, tmp_path / "b.tar")
    args = {"url": str(archive), "sha256": sha256_file(archive)}
    none = (f"no golden check was done: this device has no golden set (model.golden_dir is not set and "
            f"{deploy / 'golden'} does not exist); ")
    try:
        out = update({**args, "activate": False})["result"]
        assert (out["golden"], out["golden_checked"]) == (None, False)
        assert out["warnings"] == [none + "the archive was only verified and opened as the line runs it"]
        out = update(args)["result"]
        new = out["install"]["release"]
        assert (out["install"]["golden"], out["golden_checked"]) == (None, False)
        assert out["warnings"] == [none + f"{new} was only verified and opened as the line runs it before it was "
                                   "switched in; " + ("only the health check judges it, on its first frames"
                                                      if health == "on" else "and the health check is off ([health] "
                                                      "enabled = false): nothing judges its decisions")]
        if health == "off":
            assert svc.reporter.health is None
            return
        _failing_frames(svc)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["rollback"], ev["release"], ev["golden_checked"]) == ("failed", "done", new, False)
        assert ev["reason"] == "error rate 20/20 > 0.05; no golden check was done before it was switched in"
        shutil.copytree(golden, deploy / "golden")                      # with a golden set
        out = update({**args, "activate": False})["result"]
        assert out["golden"]["passed"] and out["golden_checked"] is True and "warnings" not in out
        out = update(args)["result"]
        assert out["install"]["golden"]["passed"] and out["golden_checked"] is True and "warnings" not in out
        _healthy_frames(svc)
        ev = _health_events(svc)[-1]
        assert (ev["status"], ev["release"], ev["golden_checked"]) == ("ok", out["install"]["release"], True)
        assert "golden" not in ev["reason"]
    finally:
        svc.inspector.backend.close()


def test_the_same_archive_again_changes_nothing(bundles, golden, tmp_path):
    """A retried update (the reply was lost) must not push the real previous release out."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    arch_b = pack_bundle(b.path, tmp_path / "b.tar")
    r2 = install_bundle(arch_b, deploy, golden)
    again = install_bundle(arch_b, deploy, golden)
    assert again.already_installed and again.release == r2.release and again.summary()["already_installed"]
    res = CliRunner().invoke(main, ["bundle", "install", str(arch_b), "--deploy", str(deploy), "--no-golden"])
    assert res.exit_code == 0 and "already installed" in res.output, res.output
    dep = deployment(deploy)
    assert (dep.current, dep.previous) == (r2.release, r1.release)
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == sorted([r1.release, r2.release])
    # the same model with another calibration is another release
    b.write_calibration(b.calibration().replace(version=0, created="", threshold=2.5, policy="manual"))
    r3 = install_bundle(pack_bundle(b.path, tmp_path / "b2.tar"), deploy, require_golden=False)
    assert not r3.already_installed and deployment(deploy).previous == r2.release

    svc = _line(tmp_path, deploy)
    try:
        out = _update(svc, tmp_path / "b2.tar")
        assert out["already_installed"] and deployment(deploy).current == r3.release
    finally:
        svc.inspector.backend.close()


@pytest.mark.parametrize("older_install", [False, True])
def test_a_retried_update_after_a_recalibration_on_the_device_keeps_its_calibration(tiny_bundle, tmp_path,
                                                                                   older_install):
    """The line recalibrated the release in force; the fleet tool retries the update it came from: still
    "already installed", and the line's calibration stays in force (a copy with the archive's went in).
    Also for a release installed before installs recorded their archive (older_install): recognised by its
    files, then recorded; an archive of the same model with another calibration is still a new release."""
    deploy = tmp_path / "deploy"
    src = copy_bundle(tiny_bundle, tmp_path / "a")
    arch = pack_bundle(src.path, tmp_path / "a.tar")
    r1 = install_bundle(arch, deploy, require_golden=False)
    marker = r1.path / deploy_mod.INSTALLED_FROM
    if older_install:
        marker.unlink()
    line = Bundle.open(current_path(deploy))
    line.write_calibration(line.calibration().replace(version=0, created="", threshold=2.5, policy="manual"))
    line.add_file("gaussian.d/0002.npz", data=b"refitted statistics")      # a Gaussian refit records its file
    again = install_bundle(arch, deploy, require_golden=False)
    assert again.already_installed and again.release == r1.release
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == [r1.release]
    assert Bundle.open(current_path(deploy)).calibration().threshold == 2.5
    assert marker.is_file()
    if older_install:
        marker.unlink()
        src.write_calibration(src.calibration().replace(version=0, created="", threshold=3.5, policy="manual"))
        other = install_bundle(pack_bundle(src.path, tmp_path / "a2.tar"), deploy, require_golden=False)
        assert not other.already_installed and Bundle.open(current_path(deploy)).calibration().threshold == 3.5
        return
    line.add_file("extra.onnx", data=b"not from the archive")                # anything else: not the same
    assert not install_bundle(arch, deploy, require_golden=False).already_installed


def test_the_update_model_example_of_the_docs_is_accepted_by_a_default_line(bundles, golden, tmp_path):
    """docs/mqtt.md's example once carried "precision": "int8" with activate true: refused on every line
    that does not run int8 (the check must run what will run)."""
    from edge_ad.atomic import sha256_file

    doc = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    example = json.loads(re.search(r"\| `update_model` \| yes \| `(\{.*?\})`", doc).group(1))
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    arch = pack_bundle(b.path, tmp_path / "b.tar")
    shutil.copytree(golden, deploy / "golden")
    svc = _line(tmp_path, deploy)
    try:
        out = svc.update_model({**example, "url": arch.as_uri(), "sha256": sha256_file(arch)})
        assert out["activated"] is True, out
    finally:
        svc.inspector.backend.close()


def test_an_install_cleans_what_a_killed_one_left_and_checks_the_free_space(bundles, tmp_path, monkeypatch):
    import collections

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    left = [deploy / "releases" / ".incoming-0123456789ab", deploy / ".check-x1y2", deploy / "downloads" / ".b.tar.part"]
    for p in left[:2]:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "big.bin").write_bytes(b"0" * 1000)
    left[2].parent.mkdir()
    left[2].write_bytes(b"half a download")
    arch_b = pack_bundle(b.path, tmp_path / "b.tar")
    real = shutil.disk_usage
    monkeypatch.setattr(deploy_mod.shutil, "disk_usage",
                        lambda p: collections.namedtuple("U", "total used free")(real(p).total, 0, 100_000))
    with pytest.raises(RuntimeFailure, match=r"releases: 0\.1 MiB free, the bundle needs .* MiB"):
        install_bundle(arch_b, deploy, require_golden=False)
    assert not any(p.exists() for p in left)
    assert [p.name for p in (deploy / "releases").iterdir()] == [deployment(deploy).current]


def test_one_install_at_a_time_per_deploy_folder(bundles, tmp_path):
    import fcntl
    import os

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    before = deployment(deploy)
    fd = os.open(deploy / "releases", os.O_RDONLY)   # another process installing holds this lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RuntimeFailure, match="another install or rollback in this deploy folder is running"):
            install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False)
    finally:
        os.close(fd)
    assert deployment(deploy) == before
    install_bundle(tmp_path / "b.tar", deploy, require_golden=False)   # free again


def _installed_twice(bundles, tmp_path):
    """A deploy folder with A, then B installed by the CLI (pending); (deploy, A's release)."""
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False)
    return deploy, r1


def _failing_frames(svc) -> None:
    """Every inference of the model in force fails, for as long as a health verdict needs."""
    for _ in range(HealthLimits().min_frames):
        svc.event({"type": "inference_error", "frames": 1})
    _check_health(svc)


def _healthy_frames(svc) -> None:
    """The model in force decides as many frames OK as a health verdict needs; the health check runs."""
    for _ in range(HealthLimits().min_frames):
        svc.reporter.health.record(ng=False)
    _check_health(svc)


def _check_health(svc) -> None:
    """The supervisor's health check, with the rollback's swap it may start on a thread of its own done."""
    svc._check_health()
    if svc._change_thread is not None:
        svc._change_thread.join(60)
    svc._change_running()   # its unexpected error raised here, as the supervisor does


def _health_events(svc) -> list[dict]:
    """The model_health events ``svc`` sent, each valid against the event schema as the MQTT link sends it, and
    each naming its release (and, after a rollback, the one rolled back to): the schema allows them absent, as
    events of an edge-ad before 372c9c5 are, this version always sends them."""
    from edge_ad.mqtt import schema

    out = [e for e in svc.events if e.get("type") == "model_health"]
    for e in out:
        body = {"schema_version": 1, "id": "e1", "seq": 1, "ts": "2025-05-01T12:00:00.000Z", "site": "s",
                "device": "d", **{k: v for k, v in e.items() if k != "ts"}}
        assert schema.errors("event", body) == [], body
        assert e.get("release"), e
        if e.get("rolled_back") or e["status"] == "rollback_failed":
            assert e.get("rolled_back_to"), e
    return out


def test_run_watches_a_release_installed_while_it_was_not_running(bundles, tmp_path):
    """'edge-ad bundle install' then a (re)start: the pending release is watched and rolled back."""
    a = bundles[0]
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    try:
        _failing_frames(svc)
        assert deployment(deploy).current == r1.release and deployment(deploy).health == "unchecked"
        assert svc.inspector.model_hash == a.model_hash()
        [ev] = _health_events(svc)
        assert (ev["status"], ev["rollback"], ev["release"], ev["rolled_back_to"]) == (
            "failed", "done", failing, r1.release)
    finally:
        svc.inspector.backend.close()
    svc = _line(tmp_path, deploy)   # not pending any more: not watched again
    try:
        _failing_frames(svc)
        assert deployment(deploy).current == r1.release and svc.inspector.model_hash == a.model_hash()
    finally:
        svc.inspector.backend.close()


def test_a_release_that_failed_its_health_check_is_put_back_by_hand_only_with_force_and_runs_with_a_warning(
        bundles, tmp_path, caplog):
    """'bundle rollback' (plain or --to) put back a release whose health check had failed, silently, and 'run'
    and 'reload' then inspected with it with no word: the line inspected with a release it judged wrong. It is
    refused, naming the verdict, unless --force; a line that starts or reloads on it says so in a WARNING."""
    import logging

    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    try:
        _failing_frames(svc)                                         # rolled back to r1: failing is 'previous'
        assert (deployment(deploy).current, deployment(deploy).previous) == (r1.release, failing)
        before = deployment(deploy)
        for to in (None, failing):
            with pytest.raises(InputError) as err:
                rollback_model(deploy, to=to, by="tests")
            assert str(err.value).startswith(f"release {failing} failed its health check (error rate 20/20 > 0.05, "
                                             "judged at "), str(err.value)
            assert f"not rolled back, 'current' is still {r1.release}: give --force" in str(err.value)
            assert deployment(deploy) == before
        res = CliRunner().invoke(main, ["bundle", "rollback", "--deploy", str(deploy)])
        assert res.exit_code == 2 and "failed its health check (error rate" in res.stderr, res.output
        (deploy / "releases" / failing / deploy_mod.HEALTH_FAILED).unlink()   # the verdict deploy.json records
        res = CliRunner().invoke(main, ["bundle", "rollback", "--deploy", str(deploy), "--to", failing])
        assert res.exit_code == 2, res.output
        assert (f"release {failing} failed (health check: error rate 20/20 > 0.05; rolled back from at "
                in res.stderr), res.output
        assert deployment(deploy) == before
        res = CliRunner().invoke(main, ["bundle", "rollback", "--deploy", str(deploy), "--force"])
        assert res.exit_code == 0 and deployment(deploy).current == failing, res.output
        assert f"warning: releases/{failing} failed (health check: error rate" in res.stderr
        assert "the line inspects with it (--force)" in res.stderr
        caplog.set_level(logging.WARNING)
        svc.reload("bundle")                                         # the running line switches to it
        assert svc.inspector.model_hash == b.model_hash() and svc.reporter.health is None
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and f"on release {failing}, which failed (health check: error rate" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("the line reloads"), said
    finally:
        svc.inspector.backend.close()
    caplog.clear()
    svc = _line(tmp_path, deploy)                                    # and a start on it
    try:
        assert svc.inspector.model_hash == b.model_hash() and svc.reporter.health is None
        assert any(r.getMessage().startswith(f"the line starts on release {failing}, which failed")
                   for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        svc.inspector.backend.close()
    assert deployment(deploy).current == failing


def test_a_healthy_verdict_event_names_the_release_judged(bundles, tmp_path):
    """A fleet consumer seeing "ok" (several updates a day) must know which release it is about."""
    deploy, _ = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    try:
        _healthy_frames(svc)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["release"]) == ("ok", judged) and deployment(deploy).health == "ok"
    finally:
        svc.inspector.backend.close()


def test_the_health_section_sets_the_watchs_limits_and_a_reload_applies_to_the_next_watch(bundles, tmp_path):
    """HealthLimits were fixed values. The config's [health] section now gives them to every watch the line
    starts (at its start, after update_model); a reload of it applies to the next watch, one running keeps its
    limits; enabled = false starts none: the release stays pending, neither judged nor rolled back."""
    a, b, c = bundles
    deploy, _ = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    svc = _line(tmp_path, deploy, health="min_frames = 3\nmax_error_rate = 0.5\n")
    try:
        watch = svc.reporter.health
        assert watch.limits == HealthLimits(min_frames=3, max_error_rate=0.5) and watch.release == judged
        (tmp_path / "line.toml").write_text((tmp_path / "line.toml").read_text().replace("min_frames = 3",
                                                                                        "min_frames = 4"))
        assert "health" in svc.reload("config")["config"]["applied"]
        assert svc.reporter.health is watch and watch.limits.min_frames == 3   # the running watch keeps its own
        for _ in range(3):
            watch.record(ng=False)
        _check_health(svc)                                              # 3 frames: judged (20 by default)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["release"]) == ("ok", judged) and deployment(deploy).health == "ok"
        out = _update(svc, pack_bundle(c.path, tmp_path / "c.tar"))
        assert out["health"] == "pending"
        assert svc.reporter.health.limits == HealthLimits(min_frames=4, max_error_rate=0.5)   # the next one
        (tmp_path / "line.toml").write_text((tmp_path / "line.toml").read_text() + "enabled = false\n")
        assert "health" in svc.reload("config")["config"]["applied"]
        out = _update(svc, pack_bundle(a.path, tmp_path / "a.tar"))
        assert out["health"] == "unchecked" and svc.reporter.health is None
        _failing_frames(svc)                                            # not judged, not rolled back
        dep = deployment(deploy)
        assert (dep.current, dep.health) == (out["install"]["release"], "pending") and not _health_events(svc)[1:]
    finally:
        svc.inspector.backend.close()
    svc = _line(tmp_path, deploy, health="enabled = false\n")         # a start with the check off: no watch
    try:
        assert svc.reporter.health is None and deployment(deploy).health == "pending"
    finally:
        svc.inspector.backend.close()
    svc = _line(tmp_path, deploy)                                       # on again: the pending release is watched
    try:
        assert svc.reporter.health.release == dep.current and svc.reporter.health.limits == HealthLimits()
    finally:
        svc.inspector.backend.close()


def test_a_full_disk_names_the_path_and_exits_1(tiny_bundle, tmp_path, monkeypatch):
    """ENOSPC from write()/fsync() names no file: the error must say where, and never blame the archive."""
    import errno
    import os

    from click.testing import CliRunner

    from edge_ad import atomic
    from edge_ad.cli import main

    arch = pack_bundle(tiny_bundle.path, tmp_path / "a.tar")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as ei:
        atomic.write_text(tmp_path / "cal.json", "{}")
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(tmp_path / "cal.json")
    assert not list(tmp_path.glob(".cal.json*"))
    res = CliRunner().invoke(main, ["bundle", "pack", str(tiny_bundle.path), str(tmp_path / "x.tar")])
    assert res.exit_code == 1 and f"error: {tmp_path / 'x.tar'}: no space left on device" in res.output, res.output
    assert not (tmp_path / "x.tar").exists()
    res = CliRunner().invoke(main, ["bundle", "install", str(arch), "--deploy", str(tmp_path / "dep"), "--no-golden"])
    assert res.exit_code == 1 and "releases: no space left on device (extracting bundle/" in res.output, res.output
    assert "corrupt" not in res.output and not (tmp_path / "dep").exists()


def test_pack_refuses_a_bundle_file_that_is_a_link(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "B")
    store = tmp_path / "store.onnx"
    (b.path / "model.onnx").rename(store)
    (b.path / "model.onnx").symlink_to(store)
    with pytest.raises(InputError, match="model.onnx: a symbolic link .*store.onnx.*copy of its target"):
        pack_bundle(b.path, tmp_path / "b.tar")
    assert not (tmp_path / "b.tar").exists()


def _copied_over_current(deploy: Path) -> None:
    """The 'current' link replaced by a copy of its release (a damaged deploy folder: 'cp -rL' done by hand)."""
    import os

    release = current_path(deploy)
    os.unlink(deploy / "current")
    shutil.copytree(release, deploy / "current")


@pytest.mark.parametrize("verdict", ["ok", "failed"])
def test_a_current_link_that_is_not_a_symlink_ends_the_watch_once_and_keeps_the_line(bundles, tmp_path, caplog,
                                                                                    verdict):
    """Every poll of the watch raised InputError once it had judged (deployment() cannot read the folder), and the
    supervisor logged it ten times a second for ever. Now the verdict is final at once: one model_health event
    naming the damage and how to repair it (rollback or record "impossible"), one ERROR, no watch left; the line
    keeps its model, and the deploy folder is left as it is."""
    import logging

    deploy, _ = _installed_twice(bundles, tmp_path)
    judged = deployment(deploy).current
    svc = _line(tmp_path, deploy)
    try:
        _copied_over_current(deploy)
        caplog.set_level(logging.WARNING)
        if verdict == "failed":
            _failing_frames(svc)
        else:
            for _ in range(HealthLimits().min_frames):
                svc.reporter.health.record(ng=False)
        for _ in range(50):                                             # the supervisor's calls: none raises
            _check_health(svc)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["release"]) == (verdict, judged)
        assert ev["rollback" if verdict == "failed" else "record"] == "impossible"
        assert f"{deploy / 'current'}: a folder, not a symlink (a release copied over the link?)" in ev["reason"]
        assert (f"mv {deploy / 'current'} {deploy / 'current'}.damaged && ln -s releases/{judged} "
                f"{deploy / 'current'}") in ev["reason"]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "not a symlink" in errors[0].getMessage()
        assert svc.reporter.health is None and svc.inspector.model_hash == bundles[1].model_hash()
        assert (deploy / "current").is_dir() and not (deploy / "current").is_symlink()
    finally:
        svc.inspector.backend.close()


def test_the_supervisor_logs_a_recurring_health_check_error_once_then_rate_limited(bundles, tmp_path, caplog):
    """A health check that raises at every call (ten a second) was logged at every call."""
    import logging

    deploy, _ = _installed_twice(bundles, tmp_path)
    svc = _line(tmp_path, deploy)
    calls = []

    def failing_check():
        calls.append(1)
        if len(calls) == 20:
            svc.stop("test")
        raise InputError("the deploy folder is damaged")

    svc._check_health = failing_check
    caplog.set_level(logging.ERROR, logger="edge_ad.runtime.service")
    svc.run()
    said = [r.getMessage() for r in caplog.records if "model health check" in r.getMessage()]
    assert len(calls) >= 20 and said == ["model health check: the deploy folder is damaged (1 time(s) since the last "
                                         "report; reported again in 60 s at the earliest)"], said


def test_bundle_status_and_doctor_name_a_damaged_link_and_how_to_repair_it(bundles, tmp_path):
    """'bundle status' said "exists but is not a symlink" without how to repair it, and doctor's fix said to
    install a bundle, which is refused on such a folder too. Both name the damage and the command that repairs
    it (the release deploy.json records there); after it, status reads the folder again. (A damaged 'previous':
    test_a_damaged_previous_link_alone_lets_the_line_run_and_refuses_every_rollback.)"""
    import os

    from click.testing import CliRunner

    from edge_ad.cli import main

    link = "current"
    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    rid = before.current
    p = deploy / link
    _copied_over_current(deploy)
    fix = f"move it away and link a kept release in its place: mv {p} {p}.damaged && ln -s releases/{rid} {p}"
    what = f"{p}: a folder, not a symlink (a release copied over the link?)"
    fix += f" ({rid}: the release deploy.json records as '{link}')"
    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {what}") and fix in res.stderr, res.output
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\n[source]\nuri = "synthetic://disc"\n')
    res = r.invoke(main, ["doctor", "--config", str(cfg), "--json"])
    assert res.exit_code == 1, res.output
    [check] = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "bundle"]
    assert check["status"] == "fail" and check["detail"].startswith(f"run cannot find the bundle: {what}")
    assert check["fix"] == fix
    os.rename(p, f"{p}.damaged")                                        # the repair, as said
    os.symlink(f"releases/{rid}", p)
    assert deployment(deploy) == before
    assert r.invoke(main, ["bundle", "status", "--deploy", str(deploy)]).exit_code == 0


def _damage_previous(deploy: Path, damage: str, rid: str) -> tuple[str, str]:
    """Damage the 'previous' link (it points at ``rid``): (what the error says, the repair it gives)."""
    import os

    p = deploy / "previous"
    os.unlink(p)
    if damage in ("folder", "file"):
        if damage == "folder":
            shutil.copytree(deploy / "releases" / rid, p)              # a release copied over the link
        else:
            p.write_text("notes kept here by hand\n")
        return (f"{p}: a {damage}, not a symlink (a release copied over the link?); the deploy folder layout is "
                "releases/<id> plus 'current' and 'previous' symlinks",
                f"move it away and link a kept release in its place: mv {p} {p}.damaged && ln -s releases/{rid} {p} "
                f"({rid}: the release deploy.json records as 'previous')")
    target = deploy / "releases" / rid if damage == "absolute" else Path("../elsewhere")   # the latter dangling
    os.symlink(target, p)
    return (f"{p}: points at {target}; expected releases/<id>",
            f"point it at a kept release: ln -sfn releases/{rid} {p} ({rid}: the release deploy.json records as "
            "'previous')")


@pytest.mark.parametrize("damage", ["folder", "file", "absolute", "outside"])
def test_a_damaged_previous_link_alone_lets_the_line_run_and_refuses_every_rollback(bundles, tmp_path, caplog,
                                                                                   damage):
    """A damaged 'previous' (not a link, pointing outside releases/) made 'edge-ad run' refuse to start (exit 2),
    though the line can run its release in force: only a rollback needs 'previous'. The line now starts with a
    WARNING naming the damage and its repair; 'bundle status' and doctor show it; every rollback (by hand, the
    health check's, update_model's after a failed swap) refuses with the damage and its repair, nothing changed, and
    so does every install (which points 'previous' at the release it replaces) over a folder in its place (a damaged
    link it replaces: test_an_install_replaces_a_damaged_previous_link_and_says_what_it_pointed_at). A healthy
    verdict is recorded, keeping deploy.json's 'previous' for the repair to name."""
    import logging

    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    what, fix = _damage_previous(deploy, damage, r1.release)
    before = sorted(p.name for p in (deploy / "releases").iterdir())
    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert res.exit_code == 0 and f"current: {failing}  previous: DAMAGED  health: pending" in res.stdout
    # what it blocks, as the line's warning and doctor's say it (deploy.previous_blocks, below): 'bundle status'
    # said it in its own words, an install blocked by a folder there which the line's and doctor's left out
    said = " ".join(res.stderr.split())
    assert said.startswith(f"warning: {what}: the line runs its release in force, but no rollback "), res.stderr
    status = json.loads(r.invoke(main, ["bundle", "status", "--deploy", str(deploy), "--json"]).stdout)
    assert status["previous"] is None and status["previous_damaged"] == f"{what}; {fix}"
    cfg = tmp_path / "doctor.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\n[source]\nuri = "synthetic://disc"\n')
    res = r.invoke(main, ["doctor", "--config", str(cfg), "--json"])
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["bundle"]["status"] == "ok" and checks["rollback"]["status"] == "warn", res.output
    assert checks["rollback"]["detail"].startswith(what) and checks["rollback"]["fix"] == fix
    # a damaged link blocks only the rollbacks to 'previous': a --to replaces it; a folder or file blocks every one
    blocks = ("no rollback (edge-ad bundle rollback, the health check's, update_model's after a failed swap) and no "
              "install (they point 'previous' at the release they replace) can be made until it is repaired"
              if damage in ("folder", "file") else
              "no rollback to 'previous' (edge-ad bundle rollback, the health check's, update_model's after a failed "
              "swap) can be made until it is repaired; 'edge-ad bundle rollback --to ID' can, and it or the next "
              "install repairs it (they point 'previous' at the release they replace)")
    assert said == f"warning: {what}: the line runs its release in force, but {blocks}: {fix}"
    assert checks["rollback"]["detail"] == f"{what}: run starts on the release in force, but {blocks}"
    # by hand; a --to replaces a damaged link: test_a_rollback_to_a_release_replaces_a_damaged_previous_link
    for args in ([], ["--to", r1.release]) if damage in ("folder", "file") else ([],):
        res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy), *args])
        assert res.exit_code == 2 and res.stderr == f"error: {what}; {fix}\n", res.output
    if damage == "folder":                                              # what it could hold is not deleted
        res = r.invoke(main, ["bundle", "install", str(pack_bundle(bundles[2].path, tmp_path / "c.tar")),
                              "--deploy", str(deploy), "--no-golden"])
        assert res.exit_code == 2 and res.stderr == f"error: {what}; {fix}\n", res.output
    assert deployment(deploy).current == failing and sorted(p.name for p in (deploy / "releases").iterdir()) == before

    caplog.set_level(logging.WARNING)
    svc = _line(tmp_path, deploy)                                       # the line starts
    try:
        assert svc.inspector.model_hash == bundles[1].model_hash() and svc.reporter.health.release == failing
        [warn] = [m.getMessage() for m in caplog.records if "no rollback" in m.getMessage()]
        assert warn == f"{what}; {fix}; the line runs its release in force, {failing}, but {blocks}"
        if damage == "folder":                                          # update_model: its install refuses
            update = _mqtt_update_model(svc)
            archive = pack_bundle(bundles[2].path, tmp_path / "c.tar")
            from edge_ad.atomic import sha256_file

            body = update({"url": str(archive), "sha256": sha256_file(archive)})
            assert not body["ok"] and body["error"]["message"] == f"update_model: {what}; {fix}", body
        _failing_frames(svc)                                            # the health check's rollback
        [ev] = _health_events(svc)
        assert (ev["status"], ev["rollback"], ev["release"]) == ("failed", "impossible", failing)
        assert ev["reason"].endswith(f"; rollback impossible: {what}; {fix}; no golden check was done before it "
                                     "was switched in"), ev["reason"]
        assert deployment(deploy).current == failing and svc.inspector.model_hash == bundles[1].model_hash()
    finally:
        svc.inspector.backend.close()
    assert sorted(p.name for p in (deploy / "releases").iterdir()) == before


def test_a_healthy_verdict_is_recorded_beside_a_damaged_previous_link(bundles, tmp_path):
    """The record needs no 'previous'; deploy.json keeps the one it records, which the repair names."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    what, fix = _damage_previous(deploy, "absolute", r1.release)
    svc = _line(tmp_path, deploy)
    try:
        _healthy_frames(svc)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["record"]) == ("ok", "done")
    finally:
        svc.inspector.backend.close()
    dep = deployment(deploy)
    assert dep.health == "ok" and dep.detail["previous"] == r1.release and str(dep.previous_damaged) == f"{what}; {fix}"


@pytest.mark.parametrize("damage", ["absolute", "outside"])
def test_an_install_replaces_a_damaged_previous_link_and_says_what_it_pointed_at(bundles, tmp_path, damage):
    """A 'previous' symlink pointing outside releases/ (absolute, or dangling elsewhere) made every install refuse
    (exit 2), so a device could not be updated until someone repaired it from a shell. A link holds no data: the
    install points it at the release it replaces, as always (atomically), and says what it pointed at (a
    WARNING, and on stderr; --json: replaced_previous); the next rollback goes back to that release."""
    import os

    from click.testing import CliRunner

    from edge_ad.cli import main

    def said(pointed_at: str, replaced: str) -> str:
        target = deploy / "releases" / pointed_at if damage == "absolute" else Path("../elsewhere")
        return (f"{deploy / 'previous'} was damaged (it pointed at {target}, not releases/<id>); the install "
                f"replaced it: it points at releases/{replaced}, the release replaced")

    deploy, r1 = _installed_twice(bundles, tmp_path)
    replaced = deployment(deploy).current
    _damage_previous(deploy, damage, r1.release)
    res = CliRunner().invoke(main, ["bundle", "install", str(pack_bundle(bundles[2].path, tmp_path / "c.tar")),
                                    "--deploy", str(deploy), "--no-golden"])
    assert res.exit_code == 0 and f"warning: {said(r1.release, replaced)}\n" in res.stderr, res.output
    dep = deployment(deploy)
    assert (dep.previous, dep.previous_damaged) == (replaced, None) and dep.current not in (r1.release, replaced)
    assert os.readlink(deploy / "previous") == f"releases/{replaced}" and not list(deploy.glob(".*.tmp"))
    _damage_previous(deploy, damage, replaced)                          # again: --json says it
    res = CliRunner().invoke(main, ["bundle", "install", str(tmp_path / "a.tar"), "--deploy", str(deploy),
                                    "--no-golden", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["previous"], out["replaced_previous"]) == (dep.current, said(replaced, dep.current))
    assert rollback_model(deploy).current == dep.current                # a rollback can be made again


@pytest.mark.parametrize("damage", ["absolute", "outside"])
def test_a_rollback_to_a_release_replaces_a_damaged_previous_link(bundles, tmp_path, damage):
    """'bundle rollback --to' over a 'previous' symlink pointing outside releases/ refused (exit 2), though it
    points 'previous' at the release it leaves, as an install does, which replaces such a link. It now replaces it
    the same way and says what it pointed at; a plain rollback (where to go is what the link would say) still
    refuses, as does a --to over a folder or file in its place
    (test_a_damaged_previous_link_alone_lets_the_line_run_and_refuses_every_rollback)."""
    import os

    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy, r1 = _installed_twice(bundles, tmp_path)
    left = deployment(deploy).current
    what, fix = _damage_previous(deploy, damage, r1.release)
    target = deploy / "releases" / r1.release if damage == "absolute" else Path("../elsewhere")
    r = CliRunner()
    res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy)])
    assert res.exit_code == 2 and res.stderr == f"error: {what}; {fix}\n", res.output
    assert deployment(deploy).current == left
    res = r.invoke(main, ["bundle", "rollback", "--deploy", str(deploy), "--to", r1.release])
    assert res.exit_code == 0, res.output
    assert (f"warning: {deploy / 'previous'} was damaged (it pointed at {target}, not releases/<id>); the rollback "
            f"replaced it: it points at releases/{left}, the release left\n") in res.stderr, res.stderr
    dep = deployment(deploy)
    # a rollback by hand judges no release: the one rolled back to keeps its own health (never checked here)
    assert (dep.current, dep.previous, dep.previous_damaged, dep.health) == (r1.release, left, None, "unchecked")
    assert os.readlink(deploy / "previous") == f"releases/{left}" and not list(deploy.glob(".*.tmp"))
    back = rollback_model(deploy)                                       # a plain rollback can be made again
    assert (back.current, back.previous, back.replaced_previous) == (left, r1.release, None)


def test_an_install_cut_short_over_a_damaged_previous_link_leaves_a_folder_that_rolls_back(bundles, tmp_path,
                                                                                           monkeypatch):
    """A power cut after 'current' moved, before the damaged 'previous' link was replaced: deploy.json's pending
    record names the release replaced (as for any install cut there), so the folder reads as the install left it
    and its rollback (by hand, or the health check's after a restart) replaces the link."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    replaced = deployment(deploy).current
    _damage_previous(deploy, "outside", r1.release)
    real = deploy_mod._point

    def cut(d, name, release):
        if name == "previous":
            raise SystemExit("power cut")
        return real(d, name, release)

    monkeypatch.setattr(deploy_mod, "_point", cut)
    with pytest.raises(SystemExit):
        install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy, require_golden=False)
    monkeypatch.undo()
    dep = deployment(deploy)
    assert (dep.previous, dep.previous_damaged, dep.health) == (replaced, None, "pending")
    assert dep.current not in (r1.release, replaced)
    back = rollback_model(deploy)
    assert (back.current, back.previous, back.previous_damaged) == (replaced, dep.current, None)


def test_update_model_replaces_a_damaged_previous_link_and_its_reply_says_so(bundles, tmp_path):
    """MQTT update_model was refused over a 'previous' link pointing outside releases/ (a fleet device could not
    be updated until repaired from a shell); it now installs, replacing the link, and its reply's warnings say
    what the link pointed at; the health check can then roll back to the release replaced."""
    from edge_ad.atomic import sha256_file

    deploy, r1 = _installed_twice(bundles, tmp_path)
    running = deployment(deploy).current
    _damage_previous(deploy, "outside", r1.release)
    svc = _line(tmp_path, deploy)
    try:
        update = _mqtt_update_model(svc)
        archive = pack_bundle(bundles[2].path, tmp_path / "c.tar")
        body = update({"url": str(archive), "sha256": sha256_file(archive)})
        said = (f"{deploy / 'previous'} was damaged (it pointed at ../elsewhere, not releases/<id>); the install "
                f"replaced it: it points at releases/{running}, the release replaced")
        assert body["ok"] and body["result"]["activated"], body
        assert said in body["result"]["warnings"] and body["result"]["install"]["replaced_previous"] == said
        new = body["result"]["install"]["release"]
        assert (deployment(deploy).current, deployment(deploy).previous) == (new, running)
        _failing_frames(svc)                                            # and its health check can roll back
        [ev] = _health_events(svc)
        assert (ev["release"], ev["rollback"], ev["rolled_back_to"]) == (new, "done", running)
        assert deployment(deploy).current == running and svc.inspector.model_hash == bundles[1].model_hash()
    finally:
        svc.inspector.backend.close()


def test_update_models_rollback_after_a_failed_swap_refuses_a_damaged_previous_link(bundles, tmp_path, monkeypatch):
    """'previous' damaged after the install (by hand, meanwhile): the rollback is refused with the damage and its
    repair, and the reply says the state left; so does a model_health event (it sent none: a dashboard following
    them never learnt of the release), "rollback": "impossible" as the health check's says it."""
    from edge_ad.atomic import sha256_file

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    svc = _line(tmp_path, deploy)
    update = _mqtt_update_model(svc)
    archive = pack_bundle(b.path, tmp_path / "b.tar")

    damaged = []

    def fail(bundle, reason):                                           # 'previous' damaged after the install
        damaged.extend(_damage_previous(deploy, "folder", deployment(deploy).previous))
        raise RuntimeFailure("out of device memory")

    try:
        monkeypatch.setattr(svc, "_swap_model", fail)
        body = update({"url": str(archive), "sha256": sha256_file(archive)})
        new = deployment(deploy).current
        what, fix = damaged
        assert not body["ok"] and body["error"]["message"] == (
            f"update_model: {new} was installed but could not be swapped in (out of device memory); and it cannot "
            f"be rolled back ({what}; {fix}); the running model is unchanged"), body
        assert svc.inspector.model_hash == a.model_hash()
        [ev] = _health_events(svc)
        assert (ev["status"], ev["rolled_back"], ev["rollback"], ev["release"]) == ("failed", False, "impossible", new)
        assert ev["reason"] == (f"{body['error']['message']}; no golden check was done before it was switched in")
        assert "rolled_back_to" not in ev and "restored" not in ev
    finally:
        svc.inspector.backend.close()


def test_a_restored_release_that_cannot_be_opened_keeps_the_loop_running(bundles, tmp_path, monkeypatch):
    from edge_ad.runtime import service as service_mod

    b = bundles[1]
    deploy, r1 = _installed_twice(bundles, tmp_path)
    svc = _line(tmp_path, deploy)
    try:
        failing = deployment(deploy).current
        opener = service_mod.open_inspector

        def open_inspector(bundle, settings):   # passes the rollback's checks, fails as the line opens it
            if Path(bundle.path).name == r1.release:
                raise RuntimeFailure(f"{bundle.path}: cannot be opened here")
            return opener(bundle, settings)

        monkeypatch.setattr(service_mod, "open_inspector", open_inspector)
        _failing_frames(svc)   # no exception out of the supervisor's call
        assert deployment(deploy).current == r1.release and svc.inspector.model_hash == b.model_hash()
        ev = _health_events(svc)
        assert [e["status"] for e in ev] == ["failed", "rollback_failed"]
        assert {(e["release"], e["rolled_back_to"]) for e in ev} == {(failing, r1.release)}
    finally:
        svc.inspector.backend.close()


def _fp32_only_installed(tiny_bundle, tmp_path, golden):
    """An int8 line's deploy folder where 'edge-ad bundle install --no-golden' (an older edge-ad, or a check
    run on another precision) switched in a bundle without an INT8 graph: pending, and unopenable there."""
    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    good = deployment(deploy).current
    fp32_only = make_tiny_bundle(tmp_path / "B", pool=4)
    install_bundle(pack_bundle(fp32_only.path, tmp_path / "b.tar"), deploy, require_golden=False)
    assert deployment(deploy).health == "pending" and deployment(deploy).current != good
    return deploy, good


def test_a_pending_release_the_line_cannot_open_is_rolled_back_at_start(tiny_bundle, tmp_path, golden):
    """Not a crash loop under systemd: the start rolls back to the release that ran, and says so."""
    deploy, good = _fp32_only_installed(tiny_bundle, tmp_path, golden)
    bad = deployment(deploy).current
    svc = _line(tmp_path, deploy, precision="int8")
    try:
        dep = deployment(deploy)
        assert dep.current == good and dep.health == "unchecked"
        assert Path(svc.bundle.path).resolve() == dep.current_path.resolve()
        ev = _health_events(svc)
        assert ev and ev[0]["status"] == "failed" and ev[0]["rolled_back"] is True
        assert (ev[0]["release"], ev[0]["rolled_back_to"]) == (bad, good)
        assert "cannot be opened as the line runs it (backend auto, precision int8" in ev[0]["reason"]
        assert "model.int8.onnx" in ev[0]["reason"]
        assert svc.reporter.health is None       # the restored release ran before: not watched again
    finally:
        svc.inspector.backend.close()


def test_a_release_that_cannot_open_and_has_nothing_to_roll_back_to_is_a_clear_failure(tiny_bundle, tmp_path):
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    with pytest.raises(RuntimeFailure, match=r"cannot be opened as the line runs it .*precision int8.*; and it "
                                             r"cannot be rolled back \(.*no previous release"):
        _line(tmp_path, deploy, precision="int8")


def test_reload_onto_a_pending_release_the_line_cannot_open_rolls_it_back(tiny_bundle, tmp_path, golden):
    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    good = deployment(deploy).current
    svc = _line(tmp_path, deploy, precision="int8")
    try:
        running = svc.inspector.model_hash
        install_bundle(pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar"), deploy,
                       require_golden=False)
        with pytest.raises(RuntimeFailure, match=r"reload: release .* cannot be opened .*rolled back: 'current' "
                                                 rf"is {good}, the running model is unchanged"):
            svc._reload_bundle()
        assert deployment(deploy).current == good and deployment(deploy).health == "unchecked"
        assert svc.inspector.model_hash == running
        assert svc.events[-1]["type"] == "model_health" and svc.events[-1]["rolled_back"] is True
        assert _health_events(svc)[-1]["rolled_back_to"] == good
        assert svc._reload_bundle()["model"] == "unchanged"   # and the next reload is quiet
    finally:
        svc.inspector.backend.close()


def test_reload_onto_an_unopenable_release_on_a_full_disk_fails_clearly_and_keeps_the_line(tiny_bundle, tmp_path,
                                                                                         golden, monkeypatch):
    """Its rollback's OSError left the reload (SIGHUP: the supervisor catches EdgeADError only) and stopped
    the line. It is now a RuntimeFailure naming the error, with nothing changed; the next reload rolls back."""
    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    good = deployment(deploy).current
    svc = _line(tmp_path, deploy, precision="int8")
    try:
        running = svc.inspector.model_hash
        pending = install_bundle(pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar"),
                                 deploy, require_golden=False).release
        full = _DiskFullAt(monkeypatch, "current")
        with pytest.raises(RuntimeFailure, match=rf"cannot be rolled back now \({deploy / 'current'}: no space left "
                                                 rf"on device; 'current' is still {pending}\): free disk space"):
            svc._reload_bundle()
        dep = deployment(deploy)
        assert (dep.current, dep.health) == (pending, "pending") and svc.inspector.model_hash == running
        full.on = False
        with pytest.raises(RuntimeFailure, match=f"rolled back: 'current' is {good}"):
            svc._reload_bundle()
        assert deployment(deploy).current == good and svc.inspector.model_hash == running
    finally:
        svc.inspector.backend.close()


def test_cli_install_opens_the_new_model_as_the_line_runs_it(tiny_bundle, tmp_path, golden):
    """--precision (or the line's --config) makes the install refuse what the line could not open, also
    without a golden set; nothing moves."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    before = deployment(deploy)
    arch = pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar")
    r = CliRunner()
    res = r.invoke(main, ["bundle", "install", str(arch), "--deploy", str(deploy), "--no-golden",
                          "--precision", "int8"])
    assert res.exit_code == 2, res.output
    assert (f"{arch}: bundle has no int8 graph (model.int8.onnx) and the line runs int8 (model.precision): run "
            "'edge-ad quantize --precision int8' on the bundle before packing it (it has fp32); update refused"
            in res.output), res.output
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\nprecision = "int8"\n[source]\nuri = "synthetic://disc"\n')
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--no-golden"])
    assert res.exit_code == 2 and "precision int8" in res.output, res.output
    assert deployment(deploy) == before and len(list((deploy / "releases").iterdir())) == 1
    # the line's own precision opens: installed, from the config's deploy folder and golden set
    shutil.copytree(golden, tmp_path / "g2")
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\ngolden_dir = "{tmp_path / "g2"}"\n'
                   '[source]\nuri = "synthetic://disc"\n')
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["golden"]["golden_dir"] == str(tmp_path / "g2") and deployment(deploy).current != before.current
    res = r.invoke(main, ["bundle", "install", str(arch)])
    assert res.exit_code == 2 and "--deploy DIR (or --config with a model.deploy_dir) is required" in res.output


def test_doctor_applies_bundle_as_run_does(tiny_bundle, tmp_path):
    """doctor --config C --bundle B says what run --config C --bundle B does: refused beside a deploy_dir."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\n[source]\nuri = "synthetic://disc"\n')
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--bundle", str(tiny_bundle.path), "--json"])
    assert res.exit_code == 1, res.output
    cfg_check = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "config"]
    assert cfg_check and cfg_check[0]["status"] == "fail" and "deploy_dir" in cfg_check[0]["detail"]


def test_an_altered_archive_of_the_release_in_force_is_refused_not_already_installed(tiny_bundle, tmp_path):
    """The 'already installed' short-cut compares the index; the archive's files must still match it."""
    deploy = tmp_path / "deploy"
    arch = pack_bundle(tiny_bundle.path, tmp_path / "a.tar")
    install_bundle(arch, deploy, require_golden=False)
    before = deployment(deploy)
    bad = tmp_path / "altered.tar"
    with tarfile.open(arch) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("calibration.json"):
                data = data.replace(b'"threshold"', b'"threshold" ')   # one byte more
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(InputError, match=r"altered\.tar: 'bundle/calibration\.json' is \d+ bytes, the index says"):
        install_bundle(bad, deploy, require_golden=False)
    assert deployment(deploy) == before and not list((deploy / "releases").glob(".incoming-*"))
    assert install_bundle(arch, deploy, require_golden=False).already_installed


def test_cli_status_on_a_bundle_folder_and_install_of_a_folder(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from edge_ad.cli import main

    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(tiny_bundle.path)])
    assert res.exit_code == 2 and "not a deploy folder: a bundle folder (use it as model.bundle" in res.output
    res = r.invoke(main, ["bundle", "install", str(tiny_bundle.path), "--deploy", str(tmp_path / "d"), "--no-golden"])
    assert res.exit_code == 0, res.output
    for _ in range(2):   # "already installed" from a folder (no archive index) names the model too
        res = r.invoke(main, ["bundle", "install", str(tiny_bundle.path), "--deploy", str(tmp_path / "d"),
                              "--no-golden", "--json"])
        assert res.exit_code == 0 and json.loads(res.stdout)["model_hash"] == tiny_bundle.model_hash(), res.output
    res = r.invoke(main, ["bundle", "status", "--deploy", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["health"] == "pending"


# ----------------------------------------------------------------------------- update_model's download
def test_update_model_refuses_a_folder_saying_it_takes_an_archive(tiny_bundle, tmp_path):
    from edge_ad.runtime.service import _fetch_archive

    for url in (str(tiny_bundle.path), tiny_bundle.path.as_uri()):
        with pytest.raises(InputError, match="is a folder: update_model takes an archive made by 'edge-ad bundle "
                                             "pack'") as err:
            _fetch_archive(url, tmp_path / "downloads", "ab" * 32)
        assert "update_model: update_model" not in str(err.value) and url in str(err.value)


def test_update_model_takes_the_sha256_in_either_case(tmp_path):
    import hashlib

    from edge_ad.mqtt import schema
    from edge_ad.runtime.service import _fetch_archive

    archive = tmp_path / "b.tar"
    archive.write_bytes(b"not really a tar")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest().upper()
    schema.validate("cmd.update_model", {"url": str(archive), "sha256": digest})
    assert _fetch_archive(str(archive), tmp_path / "dl", digest) == archive


def test_update_model_percent_decodes_a_file_url_as_camera_sources_do(tmp_path):
    import hashlib

    from edge_ad.runtime.service import _fetch_archive

    archive = tmp_path / "my parts" / "new 100%.tar"
    archive.parent.mkdir()
    archive.write_bytes(b"not really a tar")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert archive.as_uri().endswith("/my%20parts/new%20100%25.tar")
    assert _fetch_archive(archive.as_uri(), tmp_path / "dl", digest) == archive
    assert _fetch_archive(str(archive), tmp_path / "dl", digest) == archive   # a plain path is taken as written
    with pytest.raises(InputError, match="not found"):
        _fetch_archive(str(archive.parent / "new%20100%25.tar"), tmp_path / "dl", digest)


def test_update_model_refuses_a_file_url_it_would_misread(tiny_bundle, tmp_path, monkeypatch):
    """Through the MQTT command path: file://nas/b.tar was read as the relative path nas/b.tar (in the
    service's working folder), a query or fragment on a file:// URL was dropped (another file installed than
    the one meant), and '~' was not expanded (./~/b.tar was looked for). Each is refused, naming the part of
    the URL and what is expected, and nothing is installed; file://localhost/PATH is the local PATH."""
    from edge_ad.atomic import sha256_file

    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    before = deployment(deploy)
    archive = pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar")
    digest = sha256_file(archive)
    monkeypatch.chdir(tmp_path)
    for misread in ("nas", "~"):                       # what the URLs below were read as, relative paths
        (tmp_path / misread).mkdir()
        shutil.copy(archive, tmp_path / misread / "b.tar")
    svc = _line(tmp_path, deploy)
    update = _mqtt_update_model(svc)

    def send(url: str) -> dict:
        return update({"url": url, "sha256": digest})

    try:
        for url, said in (
                ("file://nas/b.tar", "host 'nas' in a file:// URL; expected file:///PATH or file://localhost/PATH"),
                (f"file:/{archive}", f"host '{archive.parts[1]}' in a file:// URL"),   # one '/' short
                (f"file://{archive}?v=2", "a file:// URL takes no query ('?v=2'); expected file:///PATH"),
                (f"file://{archive}#b", "a file:// URL takes no fragment ('#b'); expected file:///PATH"),
                ("~/b.tar", "'~' is not expanded"), ("file://~/b.tar", "'~' is not expanded")):
            body = send(url)
            assert not body["ok"] and body["error"]["code"] == "failed", (url, body)
            assert body["error"]["message"].startswith(f"update_model: url {url!r}: "), (url, body)
            assert said in body["error"]["message"], (url, body)
            assert deployment(deploy) == before and svc.bundle.path == before.current_path
        assert "expected an absolute path" in send("~/b.tar")["error"]["message"]
        body = send(f"file://LOCALHOST{archive}")
        assert body["ok"] and body["result"]["activated"], body
        assert deployment(deploy).current != before.current
    finally:
        svc.inspector.backend.close()


def test_update_model_refuses_a_url_scheme_it_cannot_fetch(tmp_path, monkeypatch):
    import hashlib

    from edge_ad.runtime.service import _fetch_archive

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ftp:" / "host").mkdir(parents=True)   # what "ftp://host/x.tar" read as a relative path finds
    (tmp_path / "ftp:" / "host" / "x.tar").write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    for url, scheme in (("ftp://host/x.tar", "ftp"), ("s3://bucket/x.tar", "s3"), ("FTP:x.tar", "ftp"),
                        ("sftp://bob:pw123@host/x.tar", "sftp")):
        with pytest.raises(InputError) as err:
            _fetch_archive(url, tmp_path / "dl", digest)
        msg = str(err.value)
        assert f"url scheme '{scheme}:' is not supported; expected file://, http://, https:// or a local path" in msg
        assert "not found" not in msg and "pw123" not in msg
    (tmp_path / "b2:v1.tar").write_bytes(b"x")   # a relative name with a colon: written as ./name it is a path
    with pytest.raises(InputError, match="url scheme 'b2:' is not supported.*write it as ./name"):
        _fetch_archive("b2:v1.tar", tmp_path / "dl", digest)
    assert _fetch_archive("./b2:v1.tar", tmp_path / "dl", digest) == Path("./b2:v1.tar")
    assert not (tmp_path / "dl").exists()


def test_a_failed_download_names_the_url_with_its_port_and_without_credentials(tmp_path):
    import functools
    import http.server
    import threading

    from edge_ad.runtime.service import _fetch_archive

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with pytest.raises(RuntimeFailure, match=f"cannot download http://127.0.0.1:{port}/nope.tar: HTTP Error 404"):
            _fetch_archive(f"http://127.0.0.1:{port}/nope.tar?sig=s3cret", tmp_path / "dl", "ab" * 32)
        with pytest.raises(RuntimeFailure) as err:
            _fetch_archive(f"http://bob:pw123@127.0.0.1:{port}/b.tar", tmp_path / "dl", "ab" * 32)
        assert f"cannot download http://127.0.0.1:{port}/b.tar:" in str(err.value)
        assert "pw123" not in str(err.value) and "bob" not in str(err.value)
        with pytest.raises(RuntimeFailure, match="cannot download http://127.0.0.1:8o/b.tar: nonnumeric port"):
            _fetch_archive("http://127.0.0.1:8o/b.tar", tmp_path / "dl", "ab" * 32)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not list((tmp_path / "dl").iterdir())                   # no partial download left


@pytest.fixture
def http_bytes():
    """An HTTP server on a free loopback port that answers every GET path (even "/.." or none) with
    ``state["data"]``; yields (base URL, state)."""
    import http.server

    state = {"data": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["data"])))
            self.end_headers()
            self.wfile.write(state["data"])

    with _serving(Handler) as base:
        yield base, state


@contextlib.contextmanager
def _serving(handler):
    """An HTTP server of ``handler`` (quiet: its log_message is silenced) on a free loopback port, in a thread;
    yields its base URL."""
    import http.server
    import threading

    handler.log_message = lambda self, *args: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_download_is_named_from_the_sha256_never_from_the_url(http_bytes, tmp_path):
    import hashlib

    from edge_ad.runtime.service import _fetch_archive

    base, state = http_bytes
    state["data"] = data = b"an archive" * 1000
    digest = hashlib.sha256(data).hexdigest()
    dl = tmp_path / "deploy" / "downloads"
    for path, name in (("/..", f"{digest[:16]}.tar"), ("/.", f"{digest[:16]}.tar"), ("", f"{digest[:16]}.tar"),
                       ("/x/%2E%2E", f"{digest[:16]}.tar"), ("/.b.tar.part", f"{digest[:16]}.tar"),
                       ("/odd%20name%3F*.tar?v=1", f"{digest[:16]}.tar"), ("/b.TGZ", f"{digest[:16]}.tar.gz"),
                       ("/b.tar.gz", f"{digest[:16]}.tar.gz")):
        got = _fetch_archive(base + path, dl, digest.upper())
        assert got == dl / name and got.read_bytes() == data, path
        assert [p.name for p in dl.iterdir()] == [name], path   # nothing else in the folder, nor beside it
        assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["downloads"], path
        got.unlink()
    # refused (its sha256 is not the command's): neither the download nor its .part stays
    with pytest.raises(InputError, match="refusing it"):
        _fetch_archive(base + "/b.tar", dl, "0" * 64)
    assert not list(dl.iterdir())


def test_a_sha256_mismatch_reply_does_not_give_the_files_sha256_the_log_does(http_bytes, tmp_path, caplog):
    """A command may name any local file the service can read: the reply must not tell its sender that
    file's sha256 (nor a prefix of it); the operator reads it in the log."""
    import hashlib
    import logging

    from edge_ad.runtime.service import _fetch_archive

    secret = tmp_path / "private.key"
    secret.write_bytes(b"only the service user reads this")
    real = hashlib.sha256(secret.read_bytes()).hexdigest()
    base, state = http_bytes
    state["data"] = secret.read_bytes()
    for url, shown in ((str(secret), str(secret)), (secret.as_uri(), str(secret)),
                       (base + "/k.tar?token=t0k", base + "/k.tar")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge_ad.runtime.service"):
            with pytest.raises(InputError) as err:
                _fetch_archive(url, tmp_path / "dl", "Ab" * 32)
        msg = str(err.value)
        assert msg == f"update_model: {shown}: its sha256 does not match the command's ({'Ab' * 8}…); refusing it"
        assert real[:4] not in msg
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert logged == [f"update_model: {shown} has sha256 {real}, the command says {'ab' * 32}; refused"]
        assert "t0k" not in logged[0]


def test_update_model_deletes_its_download_however_the_url_spells_http(bundles, http_bytes, tmp_path):
    from edge_ad.atomic import sha256_file

    a, _, _ = bundles
    deploy = tmp_path / "deploy"
    archive = pack_bundle(a.path, tmp_path / "a.tar")
    install_bundle(archive, deploy, require_golden=False)
    base, state = http_bytes
    state["data"] = archive.read_bytes()
    svc = _line(tmp_path, deploy)
    try:
        for url in (f" {base}/a.tar", base.upper() + "/a.tar"):   # urlopen strips the space; the scheme is caseless
            out = svc.update_model({"url": url, "sha256": sha256_file(archive)})
            assert out["already_installed"]
            assert not list((deploy / "downloads").iterdir()), url
    finally:
        svc.inspector.backend.close()


@pytest.fixture
def http_endless():
    """An HTTP server on a free loopback port whose GET ``/forever`` streams zeros with no Content-Length,
    ``/trickle`` sends a byte every 20 ms, and ``/big`` announces a Content-Length of 1 TiB then streams as
    /forever does; each stops after 10 s or 64 MiB (an unbounded client then gets a short, mismatching
    archive, not a hang); ``sent[path]`` counts the bytes sent. Yields (base URL, sent)."""
    import http.server
    import time

    sent: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            sent[self.path] = 0
            until = time.monotonic() + 10
            try:
                while time.monotonic() < until and sent[self.path] < 64 << 20:
                    block = b"x" if self.path == "/trickle" else bytes(1 << 16)
                    self.wfile.write(block)
                    self.wfile.flush()
                    sent[self.path] += len(block)
                    if self.path == "/trickle":
                        time.sleep(0.02)
            except OSError:   # the client went away
                pass
            self.close_connection = True

    with _serving(Handler) as base:
        yield base, sent


def test_a_download_is_bounded_in_size_and_time(http_endless, tmp_path, monkeypatch):
    """A server streaming forever or trickling neither fills the deploy disk nor holds update_model: the
    download stops at model.download_max_mb (refused before any byte when Content-Length says more), at half
    the disk's free space, and at model.download_timeout_s, naming the URL, the limit and the setting; its
    .part file is removed."""
    import shutil

    from edge_ad.runtime.service import _fetch_archive

    base, sent = http_endless
    dl = tmp_path / "dl"
    with pytest.raises(RuntimeFailure) as err:
        _fetch_archive(base + "/forever?t=s3cret", dl, "ab" * 32, max_mb=1)
    assert str(err.value) == (f"update_model: cannot download {base}/forever: the archive is larger than 1 MiB "
                              "(model.download_max_mb); stopped, nothing kept")
    assert not list(dl.iterdir())
    with pytest.raises(RuntimeFailure) as err:
        _fetch_archive(base + "/big", dl, "ab" * 32, max_mb=1)
    assert str(err.value) == (f"update_model: cannot download {base}/big: its Content-Length, {1 << 40} bytes, is "
                              "over 1 MiB (model.download_max_mb); nothing downloaded")
    assert not list(dl.iterdir())
    with pytest.raises(RuntimeFailure) as err:
        _fetch_archive(base + "/trickle", dl, "ab" * 32, timeout_s=0.3)
    assert str(err.value) == (f"update_model: cannot download {base}/trickle: not done within 0.3 s "
                              "(model.download_timeout_s); stopped, nothing kept")
    assert 0 < sent["/trickle"] and not list(dl.iterdir())
    # a disk with 3 MiB free takes at most half of it, whatever the setting allows
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 << 20))
    with pytest.raises(RuntimeFailure) as err:
        _fetch_archive(base + "/forever", dl, "ab" * 32)
    assert str(err.value) == (f"update_model: cannot download {base}/forever: the archive is larger than 1.5 MiB, "
                              f"half the free space of {dl} (3.0 MiB free: the install unpacks it beside the "
                              "download; free disk space); stopped, nothing kept")
    assert not list(dl.iterdir())


def test_update_model_downloads_within_the_lines_settings(bundles, http_endless, tmp_path):
    """update_model takes its limits from [model] download_max_mb and download_timeout_s; a refused download
    is a failed reply and the line runs on."""
    a, _, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    base, _ = http_endless
    svc = _line(tmp_path, deploy, download_max_mb=0.5, download_timeout_s=0.3)
    try:
        for path, setting in (("/forever", "model.download_max_mb"), ("/trickle", "model.download_timeout_s")):
            reply = _mqtt_update_model(svc)({"url": base + path, "sha256": "ab" * 32})
            assert (reply["ok"], reply["error"]["code"]) == (False, "failed"), reply
            assert f"({setting}); stopped, nothing kept" in reply["error"]["message"], reply
            assert not list((deploy / "downloads").iterdir())
        assert deployment(deploy).current_path.resolve() == Path(svc.bundle.path).resolve()
    finally:
        svc.inspector.backend.close()


# ----------------------------------------------------------------------------- TensorRT lines: orchestration
# TensorRT is not installable here: these tests fake edge_ad.compile.tensorrt.compile_bundle (it records its
# calls and drops a placeholder engine) and run the line's "tensorrt" backend on ONNX Runtime. They check what
# the install does around the engine build, not TensorRT (tests/test_tensorrt.py runs the real one).
@pytest.fixture
def trt_line(monkeypatch):
    """calls: one dict per compile_bundle call; order: "compile" / "open" as they happen. Set
    ``fail`` to an exception to make the build fail."""
    import edge_ad.compile.tensorrt as trt_compile
    import edge_ad.runtime.backends as backends

    state = {"calls": [], "order": [], "fail": None}
    real_open = backends.open_backend

    def fake_compile(bundle, precision="best", device=0, calib_dir=None, progress=True, **kw):
        state["order"].append("compile")
        state["calls"].append({"path": Path(bundle.path), "precision": precision, "device": device,
                               "calib_dir": calib_dir, "progress": progress})
        if state["fail"] is not None:
            raise state["fail"]
        bundle.engines_dir.mkdir(exist_ok=True)
        (bundle.engines_dir / f"x-{precision}.engine").write_bytes(b"placeholder")
        bundle.add_file("quant_report.json", data=b"{}")   # as the real one does: the manifest changes
        return {"engine": f"x-{precision}.engine", "passed": True}

    def fake_open(bundle, backend="auto", precision=None, device=None, **options):
        state["order"].append("open")
        if backend == "tensorrt":
            backend, device = "onnxruntime", "cpu"
        return real_open(bundle, backend, precision, device, **options)

    monkeypatch.setattr(trt_compile, "compile_bundle", fake_compile)
    monkeypatch.setattr(backends, "open_backend", fake_open)
    return state


def _normals(folder: Path, n: int = 8) -> Path:
    for i in range(n):
        _write(folder / f"{i}.png", part_frame(7000 + i))
    return folder


def test_orchestration_a_tensorrt_line_builds_the_engine_in_staging_before_the_checks(bundles, golden, tmp_path,
                                                                                     trt_line):
    """Archives carry no engine: on backend tensorrt the install builds and guards one in the staging folder
    (the golden set's good/ images by default, the line's device), before the golden check and the probe
    open the candidate; it travels with the release."""
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    archive = pack_bundle(a.path, tmp_path / "a.tar")
    trt_line["order"].clear()   # pack opened it as a line does
    r1 = install_bundle(archive, deploy, golden, backend="tensorrt", device="cuda:1",
                        probe=lambda c: trt_line["order"].append("probe"))
    (call,) = trt_line["calls"]
    assert call["path"].parent == deploy / "releases" and call["path"].name.startswith(".incoming-")
    # model.precision empty: what 'compile --precision best' builds (INT8, else FP16, else FP32), not an engine of
    # the candidate's active ONNX precision (fp32 here: a slow FP32 engine)
    assert a.active_precision == "fp32"
    assert (call["precision"], call["device"], call["calib_dir"]) == ("best", 1, golden / "good")
    assert trt_line["order"][0] == "compile" and trt_line["order"][-1] == "probe" and "open" in trt_line["order"]
    assert (r1.path / "engines" / "x-best.engine").is_file() and r1.golden["passed"]
    again = install_bundle(tmp_path / "a.tar", deploy, golden, backend="tensorrt", probe=lambda c: None)
    assert again.already_installed and again.release == r1.release and len(trt_line["calls"]) == 1   # a retry
    # --calib wins; the line's precision wins over the candidate's active one (fp32; it has an INT8 graph)
    calib = _normals(tmp_path / "calib")
    add_stand_in_graph(b)
    install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, None, require_golden=False,
                   backend="tensorrt", precision="int8", calib_dir=calib, probe=lambda c: None)
    assert (trt_line["calls"][-1]["precision"], trt_line["calls"][-1]["calib_dir"]) == ("int8", calib)
    assert deployment(deploy).previous == r1.release


@pytest.mark.parametrize("fail", [GuardFailure("int8 engine: AUROC drop 0.2 > 0.005"),
                                  InputError("TensorRT is not installed"),
                                  RuntimeFailure("TensorRT could not build the engine")])
def test_orchestration_a_failed_engine_build_or_guard_refuses_the_update(bundles, golden, tmp_path, trt_line,
                                                                        fail):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)   # an onnxruntime release
    before = _release_files(deploy)
    archive = pack_bundle(b.path, tmp_path / "b.tar")
    trt_line["fail"], trt_line["order"] = fail, []
    with pytest.raises(type(fail), match=f"new release's TensorRT engine .*{re.escape(str(fail))}"):
        install_bundle(archive, deploy, golden, backend="tensorrt",
                       probe=lambda c: pytest.fail("probed after a failed build"))
    assert trt_line["order"] == ["compile"]   # no golden check, no probe
    assert deployment(deploy).current == r1.release and _release_files(deploy) == before   # no staging left


def test_orchestration_a_tensorrt_line_without_normal_images_is_refused_clearly(bundles, tmp_path, trt_line,
                                                                               monkeypatch):
    a, _, _ = bundles
    arch = pack_bundle(a.path, tmp_path / "a.tar")
    deploy = tmp_path / "deploy"
    with pytest.raises(InputError, match=r"line runs TensorRT.*give them with --calib DIR.*golden set's good/"):
        install_bundle(arch, deploy, require_golden=False, backend="tensorrt")
    assert trt_line["calls"] == [] and not deploy.exists()
    extracted = []
    monkeypatch.setattr(deploy_mod, "extract_archive", lambda *a, **k: extracted.append(a))
    with pytest.raises(InputError, match=r"--calib .*nowhere: no such folder"):
        install_bundle(arch, deploy, require_golden=False, backend="tensorrt", calib_dir=tmp_path / "nowhere")
    assert extracted == [] and not deploy.exists()   # refused before anything was extracted


def test_orchestration_onnxruntime_lines_never_build_an_engine(bundles, golden, tmp_path, trt_line, monkeypatch):
    """backend onnxruntime (and auto on a CPU, or with a running release without engines, or without
    TensorRT here) installs as before; auto with TensorRT here and a running release with engines builds."""
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    archives = {"a": pack_bundle(a.path, tmp_path / "a.tar"), "b": pack_bundle(b.path, tmp_path / "b.tar")}

    def install(name, backend, device=None):
        install_bundle(archives[name], deploy, golden, backend=backend, device=device)
        engines = current_path(deploy) / "engines"   # the running release now has an engine
        engines.mkdir(exist_ok=True)
        (engines / "r.engine").write_bytes(b"placeholder")

    monkeypatch.setattr(deploy_mod, "_tensorrt_here", lambda: True)
    install_bundle(archives["a"], deploy, golden, backend="onnxruntime")
    install("b", "auto")              # the running release has no engines
    install("a", "onnxruntime")
    install("b", "auto", "cpu")
    monkeypatch.setattr(deploy_mod, "_tensorrt_here", lambda: False)
    install("a", "auto")
    assert trt_line["calls"] == []
    monkeypatch.setattr(deploy_mod, "_tensorrt_here", lambda: True)
    install("b", "auto")
    assert [c["calib_dir"] for c in trt_line["calls"]] == [golden / "good"]


def test_orchestration_cli_install_on_a_tensorrt_line_shows_progress(bundles, tmp_path, trt_line):
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, _, _ = bundles
    arch = pack_bundle(a.path, tmp_path / "a.tar")
    deploy = tmp_path / "deploy"
    base = ["bundle", "install", str(arch), "--deploy", str(deploy), "--no-golden", "--backend", "tensorrt"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 2 and "give them with --calib DIR" in res.output, res.output
    calib = _normals(tmp_path / "calib")
    res = CliRunner().invoke(main, base + ["--calib", str(calib)])
    assert res.exit_code == 0, res.output
    # a --calib typo is refused on any line, not only where it would be used
    typo = CliRunner().invoke(main, ["bundle", "install", str(arch), "--deploy", str(tmp_path / "d2"), "--no-golden",
                                     "--backend", "onnxruntime", "--calib", str(tmp_path / "nromals")])
    assert typo.exit_code == 2 and "nromals: no such folder" in typo.output, typo.output
    assert not (tmp_path / "d2").exists()
    assert "building and guarding the new release's engine (best: INT8, else FP16, else FP32" in res.output
    assert trt_line["calls"][0]["calib_dir"] == calib and trt_line["calls"][0]["progress"] is True
    assert list((current_path(deploy) / "engines").glob("*.engine"))


def test_orchestration_update_model_on_a_tensorrt_line_builds_from_the_golden_set(bundles, golden, tmp_path,
                                                                                 trt_line):
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden, backend="tensorrt")
    arch = pack_bundle(b.path, tmp_path / "b.tar")
    svc = _line(tmp_path, deploy, backend="tensorrt")
    try:
        with pytest.raises(InputError, match="line runs TensorRT.*golden set's good/"):
            _update(svc, arch)   # no golden set on the line: nowhere to take normal images from
        shutil.copytree(golden, deploy / "golden")
        out = _update(svc, arch, activate=False)   # the check alone builds too (in its scratch copy)
        assert out["golden"]["passed"] and trt_line["calls"][-1]["calib_dir"] == deploy / "golden" / "good"
        out = _update(svc, arch)
        assert out["activated"] and list((current_path(deploy) / "engines").glob("*.engine"))
        assert trt_line["calls"][-1]["path"].name.startswith(".incoming-") and len(trt_line["calls"]) == 3
        assert [c["precision"] for c in trt_line["calls"]] == ["best"] * 3   # model.precision empty
    finally:
        svc.inspector.backend.close()


def test_a_refused_candidates_compile_hint_names_the_new_release_not_a_path(tmp_path):
    staging = tmp_path / "deploy" / "releases" / ".incoming-abc"
    exc = InputError("no usable TensorRT engine: no engine of this model in the bundle's engines/. Build one on this "
                     f"device: edge-ad compile --bundle {staging} --precision fp32; update refused")
    msg = str(deploy_mod._named_in_archive(exc, staging, tmp_path / "part-a.tar"))
    assert "part-a.tar: bundle" not in msg and str(staging) not in msg
    assert "edge-ad compile --bundle <the new release> --precision fp32" in msg


def _line_to_install(tmp_path, deploy: Path, model: str = "", env: str = "") -> tuple[Path, Path]:
    """(an archive of another tiny bundle, etc/config.toml of a line on ``deploy`` with more ``[model]`` lines
    ``model`` and the service's ``etc/edge-ad.env`` holding ``env``)."""
    arch = pack_bundle(make_tiny_bundle(tmp_path / "B", pool=4).path, tmp_path / "b.tar")
    cfg = tmp_path / "etc" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\n{model}[source]\nuri = "synthetic://disc"\n')
    (cfg.parent / "edge-ad.env").write_text(env)
    return arch, cfg


def test_cli_install_config_takes_the_env_file_next_to_it(tiny_bundle, tmp_path, golden):
    """bundle install --config applies the service's edge-ad.env (or --env-file) over the config, as the line
    gets it from systemd: its precision override makes the install refuse what the line could not open."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy = _int8_release(tiny_bundle, tmp_path, golden)
    before = deployment(deploy)
    arch, cfg = _line_to_install(tmp_path, deploy, env="# the line runs int8\nEDGE_AD_MODEL__PRECISION=\"int8\"\n")
    r = CliRunner()
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--no-golden"])
    assert res.exit_code == 2 and "precision int8" in res.output, res.output
    other = tmp_path / "other.env"
    other.write_text("EDGE_AD_MODEL__PRECISION=int8\nBROKEN LINE\n")
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--env-file", str(other)])
    assert res.exit_code == 2 and f"{other}:2: no '='" in res.output, res.output
    res = r.invoke(main, ["bundle", "install", str(arch), "--deploy", str(deploy), "--env-file", str(other)])
    assert res.exit_code == 2 and "--env-file needs --config" in res.output, res.output
    assert deployment(deploy) == before


def test_cli_status_and_rollback_take_the_lines_deploy_folder_from_its_config(bundles, tmp_path):
    """'bundle status' and 'bundle rollback' took no --config, while install, doctor and calibrate do: the
    engineer had to copy the deploy folder out of the line's config. Both take --config (its edge-ad.env applied
    over it, or --env-file): the line's deploy_dir, named on stderr, as 'bundle install --config' takes it; a
    --deploy that is not the line's is warned of; neither given is an error naming both."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False).release
    r2 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False).release
    cfg = tmp_path / "etc" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[model]\ndeploy_dir = "{tmp_path / "elsewhere"}"\n[source]\nuri = "synthetic://disc"\n')
    env_file = cfg.parent / "edge-ad.env"                              # the service's: its deploy_dir is the line's
    env_file.write_text(f'EDGE_AD_MODEL__DEPLOY_DIR="{deploy}"\n')
    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--config", str(cfg), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["current"] == r2, res.output
    assert f"note: {env_file} applied over --config as the service gets it (EDGE_AD_MODEL__DEPLOY_DIR)" in res.stderr
    assert (f"note: no --deploy: deploy folder {deploy}, the EDGE_AD_MODEL__DEPLOY_DIR of {env_file}"
            in res.stderr), res.stderr
    res = r.invoke(main, ["bundle", "rollback", "--config", str(cfg)])
    assert res.exit_code == 0 and f"current -> releases/{r1} (previous: {r2})" in res.stdout, res.output
    assert f"note: no --deploy: deploy folder {deploy}, the EDGE_AD_MODEL__DEPLOY_DIR" in res.stderr
    other = tmp_path / "other.env"
    other.write_text(f"EDGE_AD_MODEL__DEPLOY_DIR={tmp_path / 'elsewhere'}\n")
    res = r.invoke(main, ["bundle", "status", "--config", str(cfg), "--env-file", str(other), "--deploy",
                          str(deploy)])                                 # given, not the line's: shown, warned
    assert res.exit_code == 0 and f"current: {r1}" in res.stdout, res.output
    assert (f"warning: --deploy {deploy} is not the line's deploy folder (it runs the release in force of "
            f"{tmp_path / 'elsewhere'}, the EDGE_AD_MODEL__DEPLOY_DIR of {other}): showing {deploy} as asked"
            in res.stderr), res.stderr
    res = r.invoke(main, ["bundle", "rollback", "--config", str(cfg), "--env-file", str(other)])
    assert res.exit_code == 2 and f"--deploy {tmp_path / 'elsewhere'}: no such folder" in res.output, res.output
    assert deployment(deploy).current == r1                            # nothing rolled back there
    for cmd in ("status", "rollback"):
        res = r.invoke(main, ["bundle", cmd])
        assert res.exit_code == 2 and ("without --deploy, the folder is the line's deploy folder: give --config "
                                       "LINE.toml (its [model] deploy_dir) or --deploy DIR") in res.output, res.output
        res = r.invoke(main, ["bundle", cmd, "--deploy", str(deploy), "--env-file", str(other)])
        assert res.exit_code == 2 and "--env-file needs --config" in res.output, res.output
    assert deployment(deploy).current == r1


def test_cli_install_config_names_the_lines_settings_it_takes_as_calibrate_config_does(tiny_bundle, tmp_path):
    """'bundle install --config' took the line's [model] deploy_dir, golden_dir, backend, precision and device with
    lines of its own and said nothing of them, while 'calibrate --config' names each setting it takes and warns of
    an option that is not the line's. Both go through one helper now: the install names the env file applied, the
    deploy folder and the settings it checks with, and warns of a --deploy or --precision that is not the line's."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(tiny_bundle.path, tmp_path / "a.tar"), deploy, require_golden=False)
    arch, cfg = _line_to_install(tmp_path, deploy, model='backend = "onnxruntime"\n', env="EDGE_AD_MODEL__DEVICE=cpu\n")
    etc = cfg.parent
    r = CliRunner()
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--no-golden", "--precision", "int8"])
    assert res.exit_code == 2 and "precision int8" in res.output, res.output      # refused: no INT8 graph
    assert f"note: {etc / 'edge-ad.env'} applied over --config as the service gets it (EDGE_AD_MODEL__DEVICE)" \
        in res.stderr
    assert f"note: no --deploy: deploy folder {deploy}, the [model] deploy_dir of {cfg}" in res.stderr
    assert (f"note: checking the new model as the line will run it: backend onnxruntime (the [model] backend of "
            f"{cfg}), device cpu (the EDGE_AD_MODEL__DEVICE of {etc / 'edge-ad.env'})") in res.stderr
    assert (f"warning: --precision int8 is not the line's precision (unset: each bundle's active graph, the [model] "
            f"precision of {cfg}): opening and checking the new model on int8 as asked; the line runs it "
            "otherwise") in res.stderr
    other = tmp_path / "other"
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--no-golden", "--deploy", str(other)])
    assert res.exit_code == 0, res.output                                         # installed where asked
    assert (f"warning: --deploy {other} is not the line's deploy folder (it runs the release in force of {deploy}, "
            f"the [model] deploy_dir of {cfg}): switching the new model into {other} as asked; the line does not "
            "run it") in res.stderr
    assert deployment(other).current is not None and len(list((deploy / "releases").iterdir())) == 1
    cfg.write_text(f'[model]\nbundle = "{tiny_bundle.path}"\n[source]\nuri = "synthetic://disc"\n')
    res = r.invoke(main, ["bundle", "install", str(arch), "--config", str(cfg), "--no-golden"])
    assert res.exit_code == 2 and (f"without --deploy, the folder is the line's deploy folder: {cfg} has no [model] "
                                   f"deploy_dir to take it from (the line runs the bundle {tiny_bundle.path}, which "
                                   "takes no model update); give --deploy DIR") in res.output, res.output


def test_a_reload_onto_a_release_installed_from_a_shell_judges_its_ng_rate_against_the_running_ones(bundles,
                                                                                                  tmp_path):
    """'edge-ad bundle install' from a shell, then a reload (SIGHUP, MQTT reload): the baseline NG rate was taken
    after the swap had cleared the decisions it counts, so a release calling every part NG was recorded ok."""
    a, b, _ = bundles
    deploy, r1, svc = _a_line_at_ng_rate_002(bundles, tmp_path)
    try:
        assert svc.reporter.health is None
        r2 = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False)
        assert svc.reload("bundle")["bundle"]["model_hash"] == b.model_hash()
        _all_ng_is_rolled_back(svc, r2.release, r1.release)
        assert deployment(deploy).current == r1.release and svc.inspector.model_hash == a.model_hash()
    finally:
        svc.inspector.backend.close()


def _a_line_at_ng_rate_002(bundles, tmp_path):
    """A line on a deploy folder with A installed and healthy, its latest decisions at NG rate 0.02 (1 of 50):
    (deploy, A's release, the line)."""
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(bundles[0].path, tmp_path / "a.tar"), deploy, require_golden=False)
    deploy_mod.confirm(deploy)
    svc = _line(tmp_path, deploy)
    svc.reporter.recent_ng.extend([False] * 49 + [True])
    return deploy, r1, svc


def _all_ng_is_rolled_back(svc, release: str, to: str) -> None:
    """``release``, watched by ``svc`` against NG rate 0.02, calls every part NG: failed, rolled back to ``to``."""
    watch = svc.reporter.health
    assert watch.release == release and watch.baseline_ng_rate == pytest.approx(0.02)
    for _ in range(HealthLimits().min_frames):
        watch.record(ng=True)
    _check_health(svc)
    [ev] = _health_events(svc)
    assert (ev["status"], ev["rollback"], ev["release"], ev["rolled_back_to"]) == ("failed", "done", release, to)
    assert "NG rate jumped to 1.000 from 0.020" in ev["reason"]


@pytest.mark.parametrize("cut", ["after the switch", "before the final record"])
def test_a_restart_after_an_update_judges_the_new_model_against_the_ng_rate_recorded_at_its_switch(bundles, tmp_path,
                                                                                                  monkeypatch, cut):
    """A power cut right after an update_model switch lost the old model's NG rate: after the restart the health
    check had nothing to compare with, and a model calling every part NG passed ('10 frames, NG rate 1.000, 0
    errors' -> ok). The switch records it in deploy.json (with the decisions behind it), also in its pending record
    when the final one is cut short, and the watch after a restart takes it."""
    b = bundles[1]
    deploy, r1, svc = _a_line_at_ng_rate_002(bundles, tmp_path)          # NG rate 0.02 over 50 decisions
    try:
        archive = pack_bundle(b.path, tmp_path / "b.tar")
        if cut == "before the final record":                             # only the pending record is written
            _DiskFullAt(monkeypatch, "deploy.json after the switch")
        out = _update(svc, archive)
        monkeypatch.undo()
        assert svc.reporter.health.baseline_ng_rate == pytest.approx(0.02)
    finally:
        svc.inspector.backend.close()                                    # the power goes: no verdict
    new = out["install"]["release"]
    dep = deployment(deploy)
    assert (dep.current, dep.health) == (new, "pending")
    assert (cut == "after the switch") == (out["install"]["unrecorded"] is None)
    assert deploy_mod.recorded_baseline(deploy, new) == {"ng_rate": pytest.approx(0.02), "frames": 50}
    svc = _line(tmp_path, deploy)                                        # the restart
    try:
        _all_ng_is_rolled_back(svc, new, r1.release)
    finally:
        svc.inspector.backend.close()
    r3 = install_bundle(pack_bundle(b.path, tmp_path / "b3.tar"), deploy, require_golden=False)   # from a shell: none
    assert deploy_mod.recorded_baseline(deploy, r3.release) is None


def test_a_reload_onto_another_release_of_the_same_model_switches_to_its_folder_and_watches_it(bundles, tmp_path):
    """A re-pack of the same model (same model_hash, another file changed) installed from a shell: the reload
    called it "unchanged", so the line kept the old release folder (a later calibration landed there, lost at
    the next restart) and the new release stayed pending, never watched."""
    a = bundles[0]
    deploy = tmp_path / "deploy"
    r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False)
    deploy_mod.confirm(deploy)
    a2 = copy_bundle(a, tmp_path / "A2")
    a2.add_file("notes.txt", data=b"re-packed\n")
    assert a2.model_hash() == a.model_hash()
    svc = _line(tmp_path, deploy)
    try:
        assert Path(svc.bundle.path).name == r1.release
        r2 = install_bundle(pack_bundle(a2.path, tmp_path / "a2.tar"), deploy, require_golden=False)
        out = svc.reload("bundle")["bundle"]
        assert out["bundle"] == str(r2.path) and out["model_hash"] == a.model_hash()
        assert Path(svc.bundle.path).resolve() == r2.path.resolve() == Path(svc.inspector.bundle.path).resolve()
        assert svc.reporter.health is not None and svc.reporter.health.release == r2.release
        assert svc.status()["model"]["bundle"] == str(r2.path)
        for _ in range(HealthLimits().min_frames):
            svc.reporter.health.record(ng=False)
        _check_health(svc)
        assert [(e["status"], e["release"]) for e in _health_events(svc)] == [("ok", r2.release)]
        assert deployment(deploy).health == "ok"
        assert svc.reload("bundle")["bundle"]["model"] == "unchanged"   # and the next reload is quiet
    finally:
        svc.inspector.backend.close()


def test_a_failed_release_whose_rollback_was_given_up_is_rolled_back_by_a_restart_never_called_healthy(bundles,
                                                                                                       tmp_path):
    """The given_up event recommended a restart, which watched the still pending release again without an NG
    rate to compare with: a model calling every part NG was recorded ok. The failed verdict is kept in the
    release (no deploy lock needed), and the restart rolls it back at its first check."""
    a, b, _ = bundles
    deploy, r1 = _installed_twice(bundles, tmp_path)
    failing = deployment(deploy).current
    svc = _line(tmp_path, deploy, health="rollback_wait_s = 0\n")
    held = _HeldElsewhere(deploy)
    try:
        _failing_frames(svc)
        [ev] = _health_events(svc)
        assert (ev["status"], ev["rollback"], ev["release"]) == ("failed", "given_up", failing)
        assert f"a restart (which rolls it back: the failed verdict is kept in {deploy / 'releases' / failing}" \
               in ev["reason"]
        assert deployment(deploy).current == failing and svc.inspector.model_hash == b.model_hash()
    finally:
        held.release()
        svc.inspector.backend.close()
    assert deployment(deploy).health == "pending"
    results = tmp_path / "results.jsonl"
    svc = _line(tmp_path, deploy, jsonl=str(results), max_frames=30)   # the restart
    [ev] = _health_events(svc)
    assert (ev["status"], ev["rollback"], ev["release"], ev["rolled_back_to"]) == (
        "failed", "done", failing, r1.release)
    assert ev["reason"].startswith(f"release {failing} failed its health check before this start") \
        and "error rate" in ev["reason"]
    dep = deployment(deploy)
    assert (dep.current, dep.health) == (r1.release, "unchecked") and svc.inspector.model_hash == a.model_hash()
    assert svc.reporter.health is None                              # the release restored ran before: not watched
    assert svc.run()["frames"] == 30
    assert {json.loads(line)["model_hash"] for line in results.read_text().splitlines()} == {a.model_hash()}


def _failed_before_restart(bundles, tmp_path, previous: bool = True):
    """A deploy folder whose pending release in force holds a failed health verdict (the line stopped while its
    rollback waited): (deploy, the failed release, the release before it, or None with ``previous`` false)."""
    a, b, _ = bundles
    deploy = tmp_path / "deploy"
    r1 = None
    if previous:
        r1 = install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, require_golden=False).release
    failing = install_bundle(pack_bundle(b.path, tmp_path / "b.tar"), deploy, require_golden=False).release
    watch = HealthWatch(deploy, limits=HealthLimits(window_s=0))
    held = _HeldElsewhere(deploy)
    try:
        assert watch.poll().rollback == "waiting"                   # the verdict is kept; the line stops here
    finally:
        held.release()
    # deploy.json still says pending (what the start acts on: Deployment.health), the listing says failed
    assert (deployment(deploy).current, deployment(deploy).health) == (failing, "pending")
    assert {r["id"]: r["health"] for r in deploy_mod.releases(deploy)}[failing] == "failed"
    return deploy, failing, r1


def test_a_restart_rolls_a_release_that_failed_its_health_check_back_before_it_inspects_a_frame(bundles,
                                                                                               tmp_path):
    """The restart rolled the failed release back at the supervisor's first health check, about 0.1 s after the
    pipeline started: a fast line inspected frames with the model known to be wrong first (10 of 40 here). The
    start rolls it back before the model is opened."""
    a = bundles[0]
    deploy, failing, r1 = _failed_before_restart(bundles, tmp_path)
    results = tmp_path / "results.jsonl"
    svc = _line(tmp_path, deploy, jsonl=str(results), max_frames=40)
    assert svc.run()["frames"] == 40
    assert {json.loads(line)["model_hash"] for line in results.read_text().splitlines()} == {a.model_hash()}
    dep = deployment(deploy)
    assert (dep.current, dep.previous, dep.health) == (r1, failing, "unchecked")
    [ev] = _health_events(svc)
    assert (ev["status"], ev["rolled_back"], ev["rollback"], ev["release"], ev["rolled_back_to"]) == (
        "failed", True, "done", failing, r1)
    assert "no frames processed within 0 s" in ev["reason"]


def test_a_failed_release_that_cannot_be_rolled_back_at_start_is_not_run(bundles, tmp_path, caplog):
    """No release to roll back to: the start fails (exit 1, systemd tries again) naming the verdict and how to go
    on, rather than inspect with a model known to be wrong; with [health] enabled = false it runs, with a
    WARNING."""
    import logging

    from click.testing import CliRunner

    from edge_ad.cli import main

    deploy, failing, _ = _failed_before_restart(bundles, tmp_path, previous=False)
    marker = deploy / "releases" / failing / deploy_mod.HEALTH_FAILED
    with pytest.raises(RuntimeFailure) as err:
        _line(tmp_path, deploy)
    msg = str(err.value)
    assert msg.startswith(f"release {failing} failed its health check before this start ({marker}: no frames "), msg
    assert "; and it cannot be rolled back (" in msg and "no previous release to roll back to" in msg
    assert msg.endswith("edge-ad run does not inspect with a release that failed its health check: switch to a "
                        "kept release ('edge-ad bundle rollback --to ID'; ids: 'edge-ad bundle status') or "
                        f"install another, or, to run this one anyway, delete {marker}"), msg
    assert deployment(deploy).current == failing
    res = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "line.toml"), "--max-frames", "1"])
    assert res.exit_code == 1 and "does not inspect with a release that failed" in res.stderr, res.output
    caplog.set_level(logging.WARNING)
    svc = _line(tmp_path, deploy, health="enabled = false\n")
    try:
        assert svc.inspector.model_hash == bundles[1].model_hash() and svc.reporter.health is None
        assert any(r.levelno == logging.WARNING and "[health] enabled = false: not rolled back" in r.getMessage()
                   for r in caplog.records)
    finally:
        svc.inspector.backend.close()


def _doctor_release(tmp_path, deploy: Path, health: str = "") -> tuple[int, dict, dict]:
    """doctor --config on a line of ``deploy``: (exit code, its 'release' check, its 'bundle' check)."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    cfg = tmp_path / "doctor.toml"
    cfg.write_text(f'[model]\ndeploy_dir = "{deploy}"\nbackend = "onnxruntime"\n[source]\nuri = "synthetic://disc"\n'
                   f'[telemetry]\ntegrastats = false\n[health]\n{health}')
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--json"])
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    return res.exit_code, checks.get("release"), checks["bundle"]


def test_doctor_says_what_run_does_with_a_release_in_force_that_failed_or_is_pending(bundles, tmp_path):
    """doctor --config said '[ok] bundle .../r0006' and 'run can start' on a release that had failed its health check
    (run then rolled it back at its start, or did not start at all when it could not) or was pending. It says what
    run does, decided by run's own code: the rollback and the release run runs instead (which the bundle check then
    checks), a failure with run's own fix when the rollback cannot be made, the watch of a pending release, the
    warning of a release judged wrong that inspects all the same."""
    deploy, failing, r1 = _failed_before_restart(bundles, tmp_path)
    code, release, bundle = _doctor_release(tmp_path, deploy)
    assert code == 0 and release["status"] == "warn", release
    assert release["detail"].startswith(f"the release in force, {failing}, failed its health check before this start")
    assert release["detail"].endswith(f": run rolls it back to {r1} at its start, before it inspects a frame, and "
                                      f"runs {r1} (the checks below are of it)")
    assert bundle["status"] == "ok" and bundle["detail"].startswith(str(deploy / "releases" / r1))
    code, release, _ = _doctor_release(tmp_path, deploy, health="enabled = false\n")
    assert code == 0 and release["status"] == "warn" and "[health] enabled = false: not rolled back" in release["detail"]
    svc = _line(tmp_path, deploy)                                       # and run does so
    try:
        assert svc.inspector.model_hash == bundles[0].model_hash() and deployment(deploy).current == r1
    finally:
        svc.inspector.backend.close()
    code, release, _ = _doctor_release(tmp_path, deploy)                # a release that ran: nothing to say
    assert code == 0 and release is None
    rollback_model(deploy, force=True, by="tests")                      # put back by hand: it inspects, warned of
    code, release, _ = _doctor_release(tmp_path, deploy)
    assert code == 0 and release["status"] == "warn", release
    assert release["detail"].startswith(f"the release in force, {failing}, failed its health check (")
    assert "switched in again by hand since ('edge-ad bundle rollback --force'), so it inspects" in release["detail"]

    deploy, failing, _ = _failed_before_restart(bundles, tmp_path / "none", previous=False)
    code, release, _ = _doctor_release(tmp_path, deploy)
    assert code == 1 and release["status"] == "fail" and release["required"], release
    assert (f"; and it cannot be rolled back ({deploy}: no previous release to roll back to): run does not inspect "
            "with a release that failed its health check, so it does not start") in release["detail"]
    with pytest.raises(RuntimeFailure) as err:                          # run's own words: the same fix
        _line(tmp_path, deploy)
    assert str(err.value).endswith(release["fix"]) and release["fix"].startswith("switch to a kept release")

    deploy, r1 = _installed_twice(bundles, tmp_path / "pending")
    code, release, _ = _doctor_release(tmp_path, deploy)
    assert code == 0 and release["status"] == "ok", release
    assert release["detail"] == (f"the release in force, {deployment(deploy).current}, is pending (its health check "
                                 f"is not done): run watches its first frames and rolls it back to {r1.release} if "
                                 "they look wrong")


def test_an_adapt_candidate_of_a_release_goes_to_candidates_never_among_the_releases(fader_bundle, tmp_path):
    """'calibrate --config --adapt' without --deploy took the line's release as BUNDLE and wrote
    BUNDLE.adapted-<time> inside releases/, where 'bundle status' listed it and 'rollback --to' switched the
    unchecked candidate in."""
    from edge_ad.calibration.adapt import adapt
    from edge_ad.calibration.deploy import releases
    from edge_ad.data.synthetic import make_part

    deploy = tmp_path / "deploy"
    first = install_bundle(fader_bundle.path, deploy, require_golden=False)
    frames = [make_part("grain", 64, None, seed=9, index=i).image for i in range(200)]
    res = adapt(first.path, frames, steps=1)
    assert res.install is None and res.candidate.parent == deploy / "candidates"
    assert res.candidate.name.startswith(f"{first.release}.adapted-")
    Bundle.open(res.candidate, verify=True)
    assert [r["id"] for r in releases(deploy)] == [first.release]
    # one an older edge-ad left among the releases is not taken for one either
    old = deploy / "releases" / f"{first.release}.adapted-20250101T000000"
    shutil.copytree(res.candidate, old)
    assert [r["id"] for r in releases(deploy)] == [first.release]
    with pytest.raises(InputError, match=r"--to .*adapted.*: no such release"):
        rollback_model(deploy, to=old.name)
    assert deployment(deploy).current == first.release


@pytest.mark.parametrize("damage", ["graph", "checkpoint"])
def test_a_release_with_a_corrupt_file_is_named_by_status_and_refused_by_rollback(bundles, tmp_path, damage):
    """release_problem checked only that the graph exists: 'bundle rollback' switched to a release with a corrupt
    graph (the runtime had just rolled back from it) and 'edge-ad run' then exited 2 at every start, while
    'bundle status' said nothing. The graph's sha256 is checked by both; a rollback checks every file, as run
    does at its start."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    before = deployment(deploy)
    name = "model.onnx" if damage == "graph" else "extra.bin"
    if damage == "checkpoint":                         # a recorded file run verifies but the line never loads
        Bundle.open(r1.path).add_file(name, data=b"weights\n")
    (r1.path / name).write_bytes(b"garbage\n")         # a bad SD card, a partial copy
    problem = deploy_mod.release_problem(deploy, r1.release, full=True)
    assert problem.startswith("not openable: ") and name in problem and "sha256" in problem
    listed = [r["problem"] for r in deploy_mod.releases(deploy) if r["id"] == r1.release]
    assert listed == ([problem] if damage == "graph" else [None])
    for to, error in ((None, RuntimeFailure), (r1.release, InputError)):
        with pytest.raises(error, match=f"release {r1.release} is not openable: .*{name}.*sha256"):
            rollback_model(deploy, to=to)
    assert deployment(deploy) == before
    if damage == "graph":
        from click.testing import CliRunner
        from edge_ad.cli import main

        res = CliRunner().invoke(main, ["bundle", "status", "--deploy", str(deploy)])
        assert res.exit_code == 0 and f"{r1.release}" in res.output and "PROBLEM: not openable" in res.output


def test_no_golden_skips_the_deploy_folders_own_golden_set(bundles, golden, tmp_path):
    """--no-golden still ran the check on DEPLOY/golden when it existed: the only way to skip it was to move the
    folder away."""
    from click.testing import CliRunner
    from edge_ad.cli import main

    a, _, c = bundles
    deploy = tmp_path / "deploy"
    install_bundle(pack_bundle(a.path, tmp_path / "a.tar"), deploy, golden)
    shutil.copytree(golden, deploy / "golden")
    bad = pack_bundle(c.path, tmp_path / "c.tar")                      # never says NG: fails the golden check
    r = CliRunner()
    res = r.invoke(main, ["bundle", "install", str(bad), "--deploy", str(deploy)])
    assert res.exit_code == 1 and "golden-set check failed" in res.output
    res = r.invoke(main, ["bundle", "install", str(bad), "--deploy", str(deploy), "--no-golden", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["golden"] is None and deployment(deploy).current == out["release"]
    assert install_bundle(pack_bundle(a.path, tmp_path / "a2.tar"), deploy, golden,
                          require_golden=False).golden["passed"]                   # one given is used


def test_the_repair_of_a_damaged_link_can_be_run_as_printed_when_the_path_has_a_space(bundles, tmp_path):
    """The repair text was not shell-quoted: under a path with a space the printed mv/ln failed."""
    import subprocess

    from click.testing import CliRunner

    from edge_ad.cli import main

    base = tmp_path / "line one"
    base.mkdir()
    deploy, _ = _installed_twice(bundles, base)
    before = deployment(deploy)
    _copied_over_current(deploy)
    r = CliRunner()
    res = r.invoke(main, ["bundle", "status", "--deploy", str(deploy)])
    assert res.exit_code == 2
    fix = res.stderr.split("in its place: ", 1)[1].rsplit(" (", 1)[0]
    subprocess.run(["bash", "-c", fix], cwd=deploy, check=True)
    assert deployment(deploy) == before
    assert r.invoke(main, ["bundle", "status", "--deploy", str(deploy)]).exit_code == 0


def test_a_switch_drops_the_reason_of_an_earlier_rollback_from_deploy_json(bundles, tmp_path):
    """deploy.json (and 'bundle status --json') carried an old rollback's reason and rolled_back_from next to a
    release switched in since."""
    deploy, r1 = _installed_twice(bundles, tmp_path)
    rollback_model(deploy, reason="by hand")
    assert deployment(deploy).detail["reason"] == "by hand"
    r3 = install_bundle(pack_bundle(bundles[2].path, tmp_path / "c.tar"), deploy, require_golden=False)
    detail = deployment(deploy).detail
    assert detail["current"] == r3.release and "reason" not in detail and "rolled_back_from" not in detail
    assert [h["event"] for h in json.loads((deploy / "deploy.json").read_text())["history"]][-2:] == [
        "switch_started", "switched"]
