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


NODATA = ["--data", "/nonexistent/data"]  # a check that regressed fails on --data, never trains on the default


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
    ("accuracy", ["--models", "gaussian,efficientad-s,fadr"], "unknown model fadr"),
    ("accuracy", ["--max-minutes", "-1"], "--max-minutes: -1"),
    # --config KEY=VALUE: checked before any work (a typo was ignored, a bad value failed in training)
    ("accuracy", [*NODATA, "--models", "gaussian", "--config", "dim=50"],
     "--config: model config dim=50: not a gaussian config key; expected one of: dims, layout, seed"),
    ("accuracy", [*NODATA, "--models", "gaussian", "--config", "layout=pach"],
     "model config layout='pach': expected one of patch, shared, image"),
    ("accuracy", [*NODATA, "--models", "fader", "--config", "width=wide"], "model config width='wide': expected an integer"),
    ("accuracy", [*NODATA, "--models", "fader", "--config", "cell=48"], "cell=48: expected a divisor of the image size 256"),
    ("accuracy", [*NODATA, "--models", "efficientad-s", "--config", "teacher=pdn"], "none (its teacher is set by --teacher)"),
    ("accuracy", [*NODATA, "--models", "gaussian,fader", "--config", "dims=50"], "not a fader config key"),
    ("accuracy", [*NODATA, "--models", "gaussian", "--config", "dims"], "--config 'dims': expected KEY=VALUE"),
    ("speed", ["--models", "gaussian,foo"], "unknown model foo"),
    ("loop", ["--bundle", "/nonexistent"], "--bundle: /nonexistent: not a bundle folder"),
    ("calibration", ["--bundle", "/nonexistent"], "--bundle: /nonexistent: not a bundle folder"),
    ("calibration", ["--policy", "fpr:abc"], "threshold policy 'fpr:abc'"),
    ("calibration", ["--policy", "foo"], "threshold policy 'foo'"),
    ("mqtt", ["--down-s", "-1"], "--down-s: -1: expected a finite number >= 0"),
    ("mqtt", ["--down-s", "nan"], "--down-s: nan"),
    ("mqtt", ["--rate", "-5"], "--rate: -5: expected a finite number >= 0"),
])
def test_bad_arguments_are_usage_errors(capsys, name, argv, says):
    assert says in _usage_error(capsys, name, argv)


def test_accuracy_config_values_are_typed_and_checked_per_model():
    import argparse

    from edge_ad.errors import InputError
    from edge_ad.train.pipeline import train_bundle

    ap = argparse.ArgumentParser()
    assert _bench("accuracy").model_config(ap, ["layout=image", "dims=50"], ["gaussian"], 256) == \
        {"layout": "image", "dims": 50}
    assert _bench("accuracy").model_config(ap, [], ["gaussian", "fader", "efficientad-s"], 256) == {}
    with pytest.raises(InputError, match="model config dim=5: not a gaussian config key"):  # the library too
        train_bundle("gaussian", "/nonexistent", "/nonexistent/out", image_size=64, config={"dim": 5})


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


def _mvtec(root: Path, good: int = 2) -> Path:
    import cv2
    from fixtures_bundle import part_frame

    for sub, n, defect in (("train/good", 2, False), ("test/good", good, False), ("test/blob", 2, True)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / sub / f"{i:03d}.png"), part_frame(i, 64, defect))
    return root


@pytest.mark.parametrize("name", ["accuracy", "calibration", "loop", "speed"])
def test_unusable_work_folder_is_refused_before_the_run(capsys, monkeypatch, tmp_path, name):
    monkeypatch.delenv("EDGE_AD_BENCH_DATA", raising=False)
    (tmp_path / "afile").write_text("x")
    argv = ["--work", str(tmp_path / "afile" / "w")]
    if name in ("accuracy", "calibration"):
        argv += ["--data", str(_mvtec(tmp_path / "cat")), "--out", str(tmp_path / "r.json")]
    if name == "loop":
        argv += ["--out", ""]
    assert f"--work {tmp_path / 'afile' / 'w'}: cannot make the folder" in _usage_error(capsys, name, argv)


def test_accuracy_keeps_earlier_rows_when_a_later_model_fails(capsys, monkeypatch, tmp_path):
    """Each row is in --out as soon as it is evaluated; a failure afterwards is an error (exit 2)."""
    import edge_ad.evaluate
    import edge_ad.train.pipeline
    from edge_ad.errors import InputError

    class Trained:
        manifest = {"training": {"steps": 0}, "model": {"config": {}}}

    def train(kind, data, out, **kw):
        if kind == "fader":
            raise InputError("fader: training failed")
        return Trained()

    overall = {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}
    monkeypatch.setattr(edge_ad.train.pipeline, "train_bundle", train)
    monkeypatch.setattr(edge_ad.evaluate, "evaluate", lambda *a, **kw: {"overall": overall, "backend": "x",
                                                                         "images_per_second": 1.0})
    out = tmp_path / "acc.json"
    argv = ["--models", "gaussian,fader", "--data", str(_mvtec(tmp_path / "cat")), "--out", str(out),
            "--work", str(tmp_path / "w")]
    assert "accuracy.py: error: fader: training failed" in _usage_error(capsys, "accuracy", argv)
    rows = json.loads(out.read_text())
    assert list(rows) == ["gaussian-quick"] and rows["gaussian-quick"]["image_auroc"] == 0.9
    assert rows["gaussian-quick"]["command"].startswith("python bench/accuracy.py --models gaussian,fader")


def test_accuracy_table_names_the_dataset_of_data(capsys, monkeypatch, tmp_path):
    """The table was labelled "Magnetic Tile" whatever --data was: now the README title, else the folder."""
    import edge_ad.evaluate
    import edge_ad.train.pipeline

    class Trained:
        manifest = {"training": {"steps": 0}, "model": {"config": {}}}

    monkeypatch.setattr(edge_ad.train.pipeline, "train_bundle", lambda *a, **kw: Trained())
    monkeypatch.setattr(edge_ad.evaluate, "evaluate", lambda *a, **kw: {
        "overall": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}, "backend": "x", "images_per_second": 1.0})
    acc = _bench("accuracy")
    data = _mvtec(tmp_path / "screws")
    argv = ["--models", "gaussian", "--data", str(data), "--out", str(tmp_path / "a.json"), "--work", str(tmp_path / "w")]
    assert acc.main(argv) == 0
    assert f"\nscrews ({data}), 256x256" in capsys.readouterr().out
    (data / "README.md").write_text("\n# Bottle caps, line 3\n\nsome text\n")
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert f"\nBottle caps, line 3 ({data}), 256x256" in out and "Magnetic Tile" not in out


def test_calibration_writes_the_accuracy_results_before_the_timing(capsys, monkeypatch, tmp_path):
    from fixtures_bundle import make_tiny_bundle

    from edge_ad.errors import InputError

    cal = _bench("calibration")
    bundle = make_tiny_bundle(tmp_path / "tiny")

    def too_few(*a, **kw):
        raise InputError("only 17 of 20 calibration frames are usable")

    monkeypatch.setattr(cal, "timing", too_few)
    out = tmp_path / "cal.json"
    argv = ["--data", str(_mvtec(tmp_path / "cat", good=44)), "--bundle", str(bundle.path), "--repeats", "1",
            "--no-shift", "--out", str(out), "--work", str(tmp_path / "w")]
    err = _usage_error(capsys, "calibration", argv)
    assert "timing phase: only 17 of 20" in err and "raise --timing-frames" in err and str(out) in err
    res = json.loads(out.read_text())
    assert res["plain"]["n_calibration"] == 22 and "timing" not in res


def test_loop_median_round_of_an_even_count_is_the_lower():
    loop = _bench("loop")
    rounds = [{"ratio": r} for r in (1.071, 0.951)]
    assert loop.median_round(rounds)["ratio"] == 0.951
    assert loop.median_round(rounds + [{"ratio": 1.0}])["ratio"] == 1.0


def test_speed_fp32_peak_fraction_counts_fp32_rows_only():
    speed = _bench("speed")
    info = {"gflops": 10.0}
    rows = [{"model": "gaussian", "name": n, "throughput": {"1": v}, "latency_ms": {"p50": 1.0, "p99": 1.0},
             "peak_rss_mb": 1.0, "info": info} for n, v in (("onnxruntime fp32", 5.0),
                                                             ("onnxruntime int8 (u8, CPU form)", 30.0))]
    text = speed.fmt_table(rows, [1], peak=100.0, peak8=1000.0)
    assert "best on the CPU: onnxruntime int8 (u8, CPU form) 30.00 img/s = 300.0 GFLOP/s;" in text
    assert "best FP32: onnxruntime fp32 50.0 GFLOP/s = 50% of the measured FP32 peak" in text
    assert "300% of the measured FP32" not in text and "30% of the measured INT8 GEMM peak" in text


@pytest.mark.parametrize("spec, size, says", [("gaussian", "64", "a fader bundle; expected a gaussian one"),
                                              ("fader", "256", "image size 64x64; expected --size 256")])
def test_speed_bundle_must_match_its_kind_and_size(capsys, tmp_path, spec, size, says):
    from fixtures_bundle import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "tiny")                       # a fader bundle at 64x64
    assert says in _usage_error(capsys, "speed", ["--bundle", f"{spec}={b.path}", "--size", size,
                                                  "--out", str(tmp_path / "o")])


def test_speed_chart_of_one_model_is_wide_enough_for_its_title(tmp_path):
    import struct

    speed = _bench("speed")
    rows = [{"model": "gaussian", "name": "onnxruntime fp32", "throughput": {"1": 5.0}}]
    speed.plot(rows, [1], tmp_path / "s.png", {"machine": "x86_64", "cpu_count": 2})
    width = struct.unpack(">I", (tmp_path / "s.png").read_bytes()[16:20])[0]
    assert width >= 9 * 110                                        # 9 inches at 110 dpi
    assert speed.machine_label({"machine": "x86_64", "cpu_count": 2, "gpu_name": None}) == "x86_64, 2 CPU cores"
    assert speed.machine_label({"gpu_name": "NVIDIA H200"}) == "NVIDIA H200"


def test_readme_accuracy_table_rounds_the_results_file():
    """README's accuracy table gave AUPRO 0.557 and 0.542 for the H200 5,000- and 1,200-step rows, where
    bench/results/accuracy.json has 0.55648 and 0.54150: each row's image AUROC, pixel AUROC and AUPRO are those
    of a result in the file, rounded to 3 decimals."""
    import re

    repo = Path(__file__).resolve().parents[1]
    results = json.loads((repo / "bench" / "results" / "accuracy.json").read_text())
    known = {tuple(f"{r[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")): name
             for name, r in results.items() if isinstance(r, dict) and "aupro" in r}
    text = (repo / "README.md").read_text()
    table = text[text.index("| model | preset | steps |"):]
    rows = table[:table.index("\n\n")].splitlines()[2:]
    assert len(rows) >= 10, rows
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        assert tuple(cells[4:7]) in known, (cells[0], cells[1], cells[4:7])
        assert all(re.fullmatch(r"0\.\d{3}", c) for c in cells[4:7]), cells
