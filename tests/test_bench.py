"""bench/: argument checks at parsing, explicit vs default dataset, where results go, the calibration
bench's bundle cache key. Nothing here runs a measurement."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
benchlib = importlib.import_module("benchlib")


def _bench(name):
    return importlib.import_module(name)


def _usage_error(capsys, name, argv) -> str:
    with pytest.raises(SystemExit) as ei:
        _bench(name).main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("name, argv, says", [
    ("loop", ["--batch", "0"], "--batch: 0: expected an integer >= 1"),
    ("loop", ["--frames", "3"], "--frames 3: expected at least --warmup (5) + 2"),
    ("loop", ["--rounds", "x"], "--rounds: 'x'"),
    ("speed", ["--bundle", "gaussian"], "expected KIND=DIR"),
    ("speed", ["--batches", "1,x"], "'1,x'"),
    ("speed", ["--batches", "0"], "expected an integer >= 1"),
    ("speed", ["--bundle", "nomodel=/tmp"], "unknown model"),
    ("calibration", ["--timing-frames", "8"], "--timing-frames: 8: expected an integer >= 20"),
    ("calibration", ["--repeats", "0"], "--repeats: 0"),
    ("mqtt", ["--n", "0"], "--n: 0"),
    ("accuracy", ["--steps", "-1"], "--steps: -1"),
])
def test_bad_arguments_are_usage_errors(capsys, name, argv, says):
    assert says in _usage_error(capsys, name, argv)


def test_speed_bundle_must_be_a_bundle(capsys, tmp_path):
    assert "not a bundle folder" in _usage_error(capsys, "speed", ["--bundle", f"gaussian={tmp_path}"])


@pytest.mark.parametrize("name", ["accuracy", "calibration", "speed"])
def test_named_missing_dataset_is_an_error(capsys, monkeypatch, tmp_path, name):
    monkeypatch.delenv("EDGE_AD_BENCH_DATA", raising=False)
    err = _usage_error(capsys, name, ["--data", str(tmp_path / "typo"), "--out", str(tmp_path / "r.json")])
    assert f"--data {tmp_path / 'typo'}" in err
    monkeypatch.setenv("EDGE_AD_BENCH_DATA", str(tmp_path / "typo"))
    assert "EDGE_AD_BENCH_DATA" in _usage_error(capsys, name, ["--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()   # nothing made before the refusal


@pytest.mark.parametrize("name", ["accuracy", "calibration"])
def test_default_dataset_absent_skips(capsys, monkeypatch, tmp_path, name):
    monkeypatch.delenv("EDGE_AD_BENCH_DATA", raising=False)
    monkeypatch.setattr(benchlib, "DEFAULT_DATA", tmp_path / "absent")
    assert _bench(name).main(["--out", str(tmp_path / "r.json")]) == 0
    assert "skipped: dataset not found" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("name", ["accuracy", "calibration", "loop", "mqtt", "speed"])
def test_results_default_outside_the_tracked_figures(capsys, monkeypatch, name):
    """Every bench has --out, and by default it does not replace the README's bench/results/ files."""
    monkeypatch.setenv("COLUMNS", "1000")             # no wrapping inside the default path
    with pytest.raises(SystemExit):
        _bench(name).main(["--help"])
    text = capsys.readouterr().out
    assert "--out" in text
    assert str(BENCH / "out") in text


def test_unwritable_out_is_refused_before_the_run(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "afile" in _usage_error(capsys, "calibration", ["--out", str(tmp_path / "afile" / "r.json")])


def _merge(args):
    path, i = args
    benchlib.merge_json(path, {f"row{i}": {"i": i}})


def test_merge_json_keeps_concurrent_rows(tmp_path):
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"old": 1}))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_merge, [(path, i) for i in range(40)])
    got = json.loads(path.read_text())
    assert set(got) == {"old"} | {f"row{i}" for i in range(40)}


def _category(root: Path, names):
    d = root / "train" / "good"
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_bytes(b"\x89PNG" + n.encode())   # only names, sizes and times count
    return root


def test_calibration_cache_follows_the_data(tmp_path):
    cal = _bench("calibration")
    a = _category(tmp_path / "a" / "tile", ["1.png", "2.png"])
    b = _category(tmp_path / "b" / "tile", ["1.png", "2.png"])
    ka, kb = cal.cache_name(a, 64), cal.cache_name(b, 64)
    assert ka != kb                                   # same folder name, other data: its own bundle
    assert ka == cal.cache_name(a, 64) and ka != cal.cache_name(a, 128)
    assert "tile" in ka
    (a / "train" / "good" / "3.png").write_bytes(b"new")
    assert cal.cache_name(a, 64) != ka                # images added: trained again
