"""Speed benchmark: every model x backend x precision side by side, in one run, on this machine.

Per model (EfficientAD-S, EfficientAD-M, FADeR-style, Gaussian) and configuration (torch eager FP32, ONNX
Runtime FP32, ONNX Runtime INT8 in both forms: signed symmetric activations (the TensorRT form) and
unsigned activations (the CPU form), OpenVINO FP32, OpenVINO NNCF INT8 (anomalib's CPU path) and our
guarded INT8 graph on OpenVINO (edge_ad's ``openvino`` backend) when ``openvino`` + ``nncf`` are
installed; on a GPU: torch FP16 with CUDA graphs, ONNX Runtime CUDA, TensorRT when compiled):

- batch-1 latency p50 / p99 (ms), throughput (images/s) at each batch size, peak memory (RSS of a fresh
  process running only that configuration), the ratio to torch eager FP32;
- GFLOPs per image of each model (from its ONNX graph) and the fraction of this machine's FP32 peak
  (measured with a large matmul) that the fastest FP32 configuration reaches, and of its INT8 GEMM peak
  that the fastest INT8 one reaches;
- the INT8 accuracy guard result (vs FP32, default limits) on the calibration data given.

Each configuration runs in its own subprocess (peak memory per configuration, no interference), and the
configurations are measured in ``--rounds`` interleaved rounds (every configuration once per round): on a
machine shared with other work the load changes from one configuration to the next, and interleaving
spreads it over all of them. Reported: medians over the rounds (throughput from the median batch time),
and the spread of each configuration's throughput over the rounds, which says how noisy the machine
was. Weights are random (or ImageNet for the backbones) unless ``--bundle KIND=DIR`` names a trained
bundle: speed does not depend on the weights, accuracy guard results do (``--test DIR`` adds a real test
folder to the guard; NNCF's model is guarded the same way, in its own process).

    python bench/speed.py                                   # all models, batches 1 and 8, 256x256
    python bench/speed.py --models efficientad-s --batches 1,8,32 --data ../shared/data/magnetic_tile
    python bench/speed.py --models efficientad-s,gaussian --size 128 --seconds 2   # a quick look
    python bench/speed.py --models efficientad-s --bundle efficientad-s=B --data D --test D --rounds 5

Prints a table, writes ``OUT/speed.json`` / ``OUT/speed.txt`` (after every model) and ``OUT/speed.png``
(``--out OUT``, default bench/out; the README's figures: bench/results/speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import (MODELS, at_least, check_out, check_work, command, dataset, input_errors_exit_2, int_list,
                      kind_dir, model_list, out_default, positive_float)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABEL = {"efficientad-s": "EfficientAD-S", "efficientad-m": "EfficientAD-M", "fader": "FADeR-style",
         "gaussian": "Gaussian"}


# ============================================================================ worker (one configuration)
def _rss_mb() -> float:
    """Peak resident memory of this process since its exec (VmHWM; ru_maxrss would include the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(run, batch: np.ndarray, seconds: float, min_iters: int) -> list[float]:
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return times


def _runner(cfg: dict):
    """(run(batch) callable, close()) for one configuration."""
    from edge_ad.bundle import Bundle

    b = Bundle.open(cfg["bundle"])
    backend, prec, device = cfg["backend"], cfg["precision"], cfg.get("device", "cpu")
    if backend == "openvino-nncf":
        import openvino as ov

        core = ov.Core()
        path = Path(cfg["bundle"]) / "openvino-int8.xml"
        model = core.read_model(str(path))
        compiled: dict[int, object] = {}

        def run(x):
            n = x.shape[0]
            if n not in compiled:  # static shapes per batch, as an x86 OpenVINO deployment compiles them
                m = model.clone()
                m.reshape({m.inputs[0].get_any_name(): [n, 3, x.shape[2], x.shape[3]]})
                # one synchronous request per call, as the inspection loop makes them (and as the openvino
                # backend compiles): LATENCY; THROUGHPUT would split the cores into streams that one request
                # cannot use together (measured: half the img/s at batch 8 on 2 cores)
                conf = {"PERFORMANCE_HINT": "LATENCY"}
                if cfg.get("threads"):
                    conf["INFERENCE_NUM_THREADS"] = int(cfg["threads"])
                compiled[n] = core.compile_model(m, "CPU", conf).create_infer_request()
            return compiled[n].infer({0: x})

        return run, lambda: None
    from edge_ad.runtime.backends import open_backend

    opts = {}
    if backend == "torch":
        import torch

        from edge_ad import models

        torch.manual_seed(0)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        opts["module"] = models.build(b.kind, b.image_size, b.model.get("config", {}), pretrained=False)
        opts["cuda_graphs"] = bool(cfg.get("cuda_graphs"))
    if backend in ("onnxruntime", "openvino") and prec == "int8":
        opts["int8_form"] = cfg.get("int8_form", "auto")
    opts["max_batch"] = 1024
    if cfg.get("threads") and backend in ("onnxruntime", "openvino"):
        opts["threads"] = int(cfg["threads"])
    be = open_backend(b, backend, prec, device, **opts)
    sync = None
    if device.startswith("cuda") and backend == "torch":
        import torch

        sync = torch.cuda.synchronize

    def run(x):
        out = be.infer(x)
        if sync:
            sync()
        return out

    return run, be.close


def worker(cfg: dict) -> dict:
    h = w = cfg["size"]
    rss0 = _rss_mb()
    run, close = _runner(cfg)
    rng = np.random.default_rng(0)
    res = {"latency_ms": None, "throughput": {}}
    for b in cfg["batches"]:
        x = (rng.random((b, 3, h, w)) * 255).astype(np.float32)
        run(x)  # warm-up (allocations, kernel selection, graph capture)
        if b == 1:
            run(x)
            t = np.array(_time(run, x, cfg["seconds"], 5)) * 1000.0
            res["latency_ms"] = {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)),
                                 "n": int(len(t))}
            res["throughput"]["1"] = float(1000.0 / np.median(t))
        else:
            t = _time(run, x, cfg["seconds"], 2)
            res["throughput"][str(b)] = float(b / np.median(t))   # median: bursts of load skew a mean
    close()
    res["peak_rss_mb"] = _rss_mb()
    res["rss_before_model_mb"] = rss0
    if cfg.get("device", "cpu").startswith("cuda"):
        try:
            import torch

            res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        except Exception:
            pass
    return res


# ============================================================================ preparation (main process)
def graph_gflops(onnx_path: Path, size: int) -> float:
    """GFLOPs (2 x multiply-adds) of Conv / ConvTranspose / MatMul / Gemm for one image. Shapes come from
    running the graph once on a zero image with ONNX Runtime (static shape inference cannot follow the
    pads and sizes some graphs compute, e.g. the Lite0 backbone's 'same' padding)."""
    import onnx

    from edge_ad.compile.qgraph import session

    m = onnx.load(str(onnx_path))
    ops = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    known = {o.name for o in m.graph.output}
    for name in dict.fromkeys(t for n in ops for t in (n.input[0], n.input[1], n.output[0])):
        if name and name not in known:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    sess = session(m, optimize=False)  # unoptimized: every tensor kept as the graph names it
    inp = sess.get_inputs()[0]
    names = [o.name for o in sess.get_outputs()]
    shapes = {}
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    vals = sess.run(names, {inp.name: np.zeros((1, 3, size, size), np.float32)})
    shapes.update({k: list(v.shape) for k, v in zip(names, vals)})
    macs = 0
    for n in ops:
        a, wshape, out = shapes.get(n.input[0]), shapes.get(n.input[1]), shapes.get(n.output[0])
        if not a or not wshape or not out:
            continue
        if n.op_type == "Conv":
            macs += int(np.prod(out)) * int(np.prod(wshape[1:]))
        elif n.op_type == "ConvTranspose":  # every input element meets C_out/group x kernel weights
            macs += int(np.prod(a)) * wshape[1] * int(np.prod(wshape[2:]))
        else:
            macs += int(np.prod(out)) * a[-1]
    return 2.0 * macs / 1e9


def measured_peak_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """FP32 matmul GFLOP/s with all cores, the best of numpy's BLAS and torch's (MKL / oneDNN) when
    installed: the machine's practical FP32 peak."""
    mats = [(np.random.default_rng(0).random((n, n), dtype=np.float32),
             np.random.default_rng(1).random((n, n), dtype=np.float32))]
    try:
        import torch

        mats.append((torch.from_numpy(mats[0][0]), torch.from_numpy(mats[0][1])))
    except ImportError:
        pass
    return max(_best_rate(lambda: a @ b, 2.0 * n ** 3, seconds) for a, b in mats)


def _best_rate(run, ops: float, seconds: float) -> float:
    """Giga-operations per second of the fastest of the calls of ``run`` made in ``seconds`` (after one
    warm-up call): the machine's peak, not its average under whatever else is running."""
    run()
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run()
        best = max(best, ops / (time.perf_counter() - t0) / 1e9)
    return best


def measured_int8_peak_gops(n: int = 2048, seconds: float = 2.0) -> float:
    """INT8 GEMM GOP/s (2 x u8 x s8 multiply-adds with int32 sums) with all cores: ONNX Runtime's
    ``MatMulInteger`` on a large square matrix, the same MLAS kernels (VNNI where the CPU has it) its
    quantized convolutions use. The ceiling any INT8 graph on this machine can approach."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, n)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y"])], "int8_peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(3, np.uint8), "a_zero")])
    # IR 8 (opset 17's): a newer onnx would stamp its own IR version, which an older ONNX Runtime refuses
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = {"a": rng.integers(0, 256, (n, n)).astype(np.uint8)}
    return _best_rate(lambda: sess.run(None, a), 2.0 * n ** 3, seconds)


def synthetic_data(work: Path, size: int) -> Path:
    from edge_ad.data.synthetic import write_category

    d = work / "synthetic-data"
    if not d.is_dir():
        write_category(d, n_train=60, n_test_good=16, n_test_defect=4, size=size, kind="grain")
    return d


def _guard_summary(e: dict) -> dict:
    return {"passed": bool(e["passed"]), "rank_corr": e["rank_corr"], "failures": e.get("failures", []),
            "auroc": {g: (a["fp32"], a["candidate"]) for g, a in e["auroc"].items()}}


def prepare(kind: str, size: int, work: Path, data: Path, trained: str | None, calib_samples: int,
            guard_normals: int, log, keep_fp32: str = "head", calibration: str = "minmax",
            test_dir: str | None = None, guard_timeout: float = 900, openvino: bool = True,
            int8: bool = True) -> dict:
    """Bundle with model.onnx, both INT8 forms (+ guard results) and, with ``openvino``, the OpenVINO NNCF
    INT8 model and the guard of NNCF's model and of both our INT8 forms run by OpenVINO."""
    from edge_ad import models
    from edge_ad.bundle import Bundle
    from edge_ad.compile.export import export_bundle
    from edge_ad.compile.guard import GuardLimits, judge
    from edge_ad.compile.quantize import quantize_bundle

    info: dict = {"kind": kind}
    if trained:
        src = Bundle.open(trained)
        d = work / f"{kind}-{size}-trained"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(src.path, d)
        b = Bundle.open(d)
        if b.image_size != (size, size):
            raise SystemExit(f"{trained}: image size {b.image_size}, bench runs at {size}")
        info["weights"] = f"trained ({trained})"
        if not b.has("model.onnx"):
            export_bundle(b, progress=False)
    else:
        d = work / f"{kind}-{size}"
        if d.exists():
            shutil.rmtree(d)
        m = models.build(kind, size)
        b = Bundle.create(d, models.describe(m, kind, size, models.default_config(kind)))
        info["weights"] = "random (ImageNet backbone where the model has one)"
        try:
            export_bundle(b, m, progress=False)
        except Exception as exc:  # report and go on: the torch row is still measured
            info["export_error"] = str(exc).splitlines()[0][:200]
            log(f"  {kind}: export failed: {info['export_error']}")
            return info | {"bundle": str(d)}
    if not trained or not (b.manifest.get("training") or {}).get("data"):
        b.manifest["training"] = {"data": str(data)}   # a trained bundle keeps its own held-out split
        b.save_manifest()
    info["bundle"] = str(d)
    info["gflops"] = graph_gflops(b.file("model.onnx"), size)
    if not int8:
        return info | {"openvino": None}
    t0 = time.perf_counter()
    # Keep the graphs whatever the guard says (the speed of a graph that fails is still worth knowing);
    # judge the guard with the default limits below.
    res = quantize_bundle(b, "int8", samples=calib_samples, guard_normals=guard_normals, keep_fp32=keep_fp32,
                          calibration=calibration, test_dir=test_dir,
                          limits=GuardLimits(max_auroc_drop=1.0, min_rank_corr=-1.0), progress=False)
    info["quantize_s"] = time.perf_counter() - t0
    info["int8"] = {"keep_fp32": keep_fp32, "fp32_convs": len(res.fp32_nodes), "calibration": calibration,
                    "samples": calib_samples, "prepared": res.details.get("prepared")}
    info["guard"] = {}
    for e in res.entries:   # measured under relaxed limits: judged again under the default ones
        failures = judge(e, GuardLimits())
        info["guard"][e["candidate"]] = _guard_summary(e) | {"passed": not failures, "failures": failures}
    b.set_active("model.onnx", "fp32")
    info["openvino"] = None
    if not openvino:
        return info
    try:
        info["openvino"] = openvino_int8(b, calib_samples)
    except ImportError:
        return info
    # The same guard for NNCF's model and for our INT8 graph run by OpenVINO (its kernels round differently
    # from ONNX Runtime's), each in its own process: OpenVINO may crash compiling a graph.
    for name in ("openvino-nncf-int8", "openvino-int8", "openvino-int8-u8"):
        job = {"bundle": str(d), "candidate": name, "guard_normals": guard_normals, "test": test_dir}
        info["guard"][name] = run_job("--guard-worker", job, guard_timeout)
    return info


class _NncfBackend:
    """NNCF's OpenVINO model behind the Backend calls the guard makes (static batch 1, as deployed)."""

    name, precision, device = "openvino-nncf", "int8", "cpu"

    def __init__(self, xml: Path, outputs: list[str], size: tuple[int, int]):
        import openvino as ov

        core = ov.Core()
        m = core.read_model(str(xml))
        m.reshape({m.inputs[0].get_any_name(): [1, 3, int(size[0]), int(size[1])]})
        self._compiled = core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        self._names = [o.get_any_name() for o in self._compiled.outputs]
        self.outputs = outputs

    def infer(self, batch: np.ndarray) -> dict:
        parts = [self._compiled(batch[i:i + 1]) for i in range(len(batch))]
        return {n: np.concatenate([np.asarray(p[j]) for p in parts]) for j, n in enumerate(self._names)}

    def describe(self) -> str:
        return "openvino nncf int8 (cpu)"

    def close(self) -> None:
        pass


def guard_worker(job: dict) -> dict:
    """Guard (default limits) of one OpenVINO candidate of a prepared bench bundle, in its own process."""
    from edge_ad.bundle import Bundle
    from edge_ad.compile.guard import GuardLimits, evaluate, prepare_guard_set, training_images
    from edge_ad.runtime.backends.openvino import OpenVinoBackend

    b = Bundle.open(job["bundle"])
    _, held = training_images(b)
    gset = prepare_guard_set(b, held, test_dir=job.get("test"), n_normal=job["guard_normals"])
    if job["candidate"] == "openvino-nncf-int8":
        cand = _NncfBackend(b.file("openvino-int8.xml"), b.outputs, b.image_size)
    else:
        cand = OpenVinoBackend(b, "int8", int8_form="u8" if job["candidate"].endswith("-u8") else "s8")
    e = evaluate(b, cand, gset, None, GuardLimits(), name=job["candidate"])
    cand.close()
    return _guard_summary(e)


def run_job(flag: str, job: dict, timeout: float) -> dict:
    """Run ``speed.py FLAG JSON`` in a fresh process; its RESULT line, or {"error": ...}."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, flag, json.dumps(job)], capture_output=True,
                           text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (use --timeout, fewer --batches)"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall_s"] = time.perf_counter() - t0
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:]
    crash = f"exit code {p.returncode}" + (" (crashed: signal %d)" % -p.returncode if p.returncode < 0 else "")
    return {"error": (tail[0][:160] + f" [{crash}]") if tail else crash}


def openvino_int8(bundle, samples: int) -> str:
    """NNCF post-training INT8 (its default preset, as anomalib's OpenVINO export uses) on the same
    calibration images; saved as openvino-int8.xml beside the ONNX graphs."""
    import nncf
    import openvino as ov

    from edge_ad.compile.guard import spread, training_images
    from edge_ad.data.image import load_image, to_batch

    pool, _ = training_images(bundle)
    calib = [to_batch([load_image(p)], bundle.image_size) for p in spread(pool, samples)]
    model = ov.Core().read_model(str(bundle.file("model.onnx")))
    q = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib))
    out = bundle.file("openvino-int8.xml")
    ov.save_model(q, str(out))
    return str(out)


def configs(info: dict, gpu: bool, have_ov: bool) -> list[dict]:
    out = [{"name": "torch eager fp32", "backend": "torch", "precision": "fp32", "device": "cpu"}]
    if "export_error" in info:
        return out
    out += [{"name": "onnxruntime fp32", "backend": "onnxruntime", "precision": "fp32", "device": "cpu"},
            {"name": "onnxruntime int8 (s8, TensorRT form)", "backend": "onnxruntime", "precision": "int8",
             "device": "cpu", "int8_form": "s8"},
            {"name": "onnxruntime int8 (u8, CPU form)", "backend": "onnxruntime", "precision": "int8",
             "device": "cpu", "int8_form": "u8"}]
    if have_ov and info.get("openvino"):
        out += [{"name": "openvino fp32", "backend": "openvino", "precision": "fp32", "device": "cpu"},
                {"name": "openvino int8 (NNCF, anomalib's path)", "backend": "openvino-nncf", "precision": "int8",
                 "device": "cpu"},
                {"name": "openvino int8 (our guarded s8 graph)", "backend": "openvino", "precision": "int8",
                 "device": "cpu", "int8_form": "s8"},
                {"name": "openvino int8 (our guarded u8 graph)", "backend": "openvino", "precision": "int8",
                 "device": "cpu", "int8_form": "u8"}]
    if gpu:
        out += [{"name": "torch cuda fp32", "backend": "torch", "precision": "fp32", "device": "cuda"},
                {"name": "torch cuda fp16 + cuda graphs", "backend": "torch", "precision": "fp16",
                 "device": "cuda", "cuda_graphs": True},
                {"name": "onnxruntime cuda fp32", "backend": "onnxruntime", "precision": "fp32", "device": "cuda"}]
    return out


def run_config(cfg: dict, timeout: float) -> dict:
    return run_job("--worker", cfg, timeout)


def merge_rounds(runs: list[dict]) -> dict:
    """One configuration's rounds -> medians (latency, throughput), the largest peak memory, and the
    spread of the throughput at the largest batch over the rounds (machine noise)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run", "rounds": len(runs)}
    out: dict = {"rounds": len(ok), "throughput": {}, "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
    lats = [r["latency_ms"] for r in ok if r.get("latency_ms")]
    if lats:
        out["latency_ms"] = {k: float(np.median([lt[k] for lt in lats])) for k in ("p50", "p99")}
    for b in ok[0]["throughput"]:
        vals = [r["throughput"][b] for r in ok if b in r["throughput"]]
        out["throughput"][b] = float(np.median(vals))
        out.setdefault("throughput_rounds", {})[b] = vals
    top = max(out["throughput"], key=int)
    vals = out["throughput_rounds"][top]
    out["spread"] = float((max(vals) - min(vals)) / out["throughput"][top]) if out["throughput"][top] else 0.0
    if len(ok) < len(runs):
        out["failed_rounds"] = [r["error"] for r in runs if "error" in r]
    return out


# ============================================================================ report
def fmt_table(results: list[dict], batches: list[int], peak: float, peak8: float = 0.0) -> str:
    """Medians over the rounds. ``x torch`` / ``x NNCF``: throughput at the largest batch over torch eager
    FP32's (on the same device: torch CUDA FP32 for a GPU row) / OpenVINO NNCF INT8's; ``spread``:
    (max - min) / median of that throughput over the rounds."""
    bb = str(max(batches))
    head = (f"{'model':<14} {'configuration':<38} {'p50 ms':>8} {'p99 ms':>8} "
            + " ".join(f"{'b' + str(b) + ' img/s':>10}" for b in batches)
            + f" {'spread':>7} {'peak MB':>8} {'x torch':>8} {'x NNCF':>7} {'guard':>6}")
    lines = [head, "-" * len(head)]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        base_cpu = next((r for r in rows if r["name"] == "torch eager fp32" and "error" not in r), None)
        base_gpu = next((r for r in rows if r["name"] == "torch cuda fp32" and "error" not in r), None)
        nncf = next((r for r in rows if r["name"].startswith("openvino int8 (NNCF") and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"{LABEL[model]:<14} {r['name']:<38} error: {r['error']}")
                continue
            lat = r.get("latency_ms") or {}
            tp = r["throughput"]

            def ratio(ref):
                if ref is None or ref is r or bb not in tp or bb not in ref["throughput"]:
                    return ""
                return f"{tp[bb] / ref['throughput'][bb]:.2f}"

            lines.append(f"{LABEL[model]:<14} {r['name']:<38} {lat.get('p50', float('nan')):8.1f} "
                         f"{lat.get('p99', float('nan')):8.1f} "
                         + " ".join(f"{tp.get(str(b), float('nan')):10.2f}" for b in batches)
                         + f" {r.get('spread', 0.0):7.0%} {r['peak_rss_mb']:8.0f} {ratio(base_gpu if 'cuda' in r['name'] else base_cpu):>8} {ratio(nncf):>7} "
                           f"{r.get('guard', ''):>6}")
        info = next((r["info"] for r in rows if "info" in r), {})
        if info.get("gflops"):
            ok = [r for r in rows if "error" not in r and r["throughput"]]
            for where, group in (("CPU", [r for r in ok if "cuda" not in r["name"]]),
                                 ("GPU", [r for r in ok if "cuda" in r["name"]])):
                if not group:
                    continue
                best = max(group, key=lambda r: max(r["throughput"].values()))
                ips = max(best["throughput"].values())
                # the measured peak is the CPU's FP32 matmul: only a CPU FP32 row is a fraction of it (INT8:
                # the INT8 GEMM peak below; a GPU row: neither)
                fp32 = [r for r in group if "int8" not in r["name"]] if where == "CPU" else []
                frac = ""
                if fp32:
                    bf = max(fp32, key=lambda r: max(r["throughput"].values()))
                    gf = info["gflops"] * max(bf["throughput"].values())
                    frac = (f"; best FP32: {bf['name']} {gf:.1f} GFLOP/s = {gf / peak:.0%} of the measured FP32 "
                            f"peak ({peak:.0f} GFLOP/s)")
                lines.append(f"{'':<14} {info['gflops']:.1f} GFLOPs/image; best on the {where}: {best['name']} "
                             f"{ips:.2f} img/s = {info['gflops'] * ips:.1f} GFLOP/s{frac}")
            ok = [r for r in ok if "cuda" not in r["name"]]
            int8 = [r for r in ok if "int8" in r["name"]]
            if int8 and peak8:
                b8 = max(int8, key=lambda r: max(r["throughput"].values()))
                ips8 = max(b8["throughput"].values())
                lines.append(f"{'':<14} best INT8: {b8['name']} {info['gflops'] * ips8:.1f} GOP/s = "
                             f"{info['gflops'] * ips8 / peak8:.0%} of the measured INT8 GEMM peak "
                             f"({peak8:.0f} GOP/s, ONNX Runtime MatMulInteger)")
        if info.get("int8"):
            q = info["int8"]
            lines.append(f"{'':<14} our INT8: keep-fp32 {q['keep_fp32']} ({q['fp32_convs']} convs in FP32), "
                         f"{q['calibration']} on {q['samples']} images, quantized + guarded in "
                         f"{info.get('quantize_s', 0):.0f} s")
        for name, g in (info.get("guard") or {}).items():
            if "error" in g:
                lines.append(f"{'':<14} guard {name}: could not run ({g['error']})")
            else:
                au = "; ".join(f"{k} AUROC {a:.4f} -> {c:.4f}" for k, (a, c) in g["auroc"].items())
                lines.append(f"{'':<14} guard {name}: {'pass' if g['passed'] else 'FAIL'}, rank corr "
                             f"{g['rank_corr']:.4f}; {au}")
        if info.get("export_error"):
            lines.append(f"{'':<14} export failed: {info['export_error']}")
    return "\n".join(lines)


def machine_label(machine: dict) -> str:
    """The machine in a few words, for the chart's title: the GPU's name, else the CPU cores."""
    if machine.get("gpu_name"):
        return f"{machine['gpu_name']}"
    return f"{machine.get('machine', '?')}, {machine.get('cpu_count', '?')} CPU cores"


def plot(results: list[dict], batches: list[int], path: Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    # at least 9 inches wide: with one model the title would be cut off at both sides
    fig, axes = plt.subplots(1, len(models), figsize=(max(9.0, 4.5 * len(models)), 4.8), squeeze=False)
    b = str(max(batches))
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and "error" not in r]
        names = [r["name"] for r in rows]
        vals = [r["throughput"].get(b, 0.0) for r in rows]
        ax.barh(range(len(rows)), vals, color=["#888" if "torch" in n else "#2a7" if "u8" in n else
                                               "#36c" if "openvino" in n else "#c84" for n in names])
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"images/s at batch {b}")
        ax.set_title(LABEL[model])
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    fig.suptitle(f"edge_ad inference throughput, {machine_label(machine)} (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ============================================================================ main
@input_errors_exit_2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=model_list, default=",".join(MODELS),
                    help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--size", type=at_least(32), default=256, help="square input size")
    ap.add_argument("--batches", type=int_list, default="1,8", help="batch sizes (1 gives latency too), e.g. 1,8,32")
    ap.add_argument("--seconds", type=positive_float, default=3.0, help="time per measurement (at least 5 / 2 runs)")
    ap.add_argument("--data", default=None, help="normal images for calibration and the guard (MVTec category); "
                                                 "default: $EDGE_AD_BENCH_DATA, else a synthetic category")
    ap.add_argument("--bundle", action="append", type=kind_dir, default=[], metavar="KIND=DIR",
                    help="use a trained bundle for KIND (a KIND bundle at --size) instead of random weights; "
                         "its calibration and guard use its own training data where its manifest names it")
    ap.add_argument("--calib-samples", type=at_least(1), default=64)
    ap.add_argument("--guard-normals", type=at_least(1), default=32)
    ap.add_argument("--test", default=None, help="a real MVTec-layout test folder for the guard")
    ap.add_argument("--keep-fp32", default="auto", choices=["auto", "head", "none"],
                    help="INT8 layers kept in FP32 (edge-ad quantize --keep-fp32)")
    ap.add_argument("--calibration", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--threads", type=at_least(0), default=0,
                    help="threads for every engine (ONNX Runtime intra-op, OpenVINO, torch); 0: each engine's "
                         "default (all cores)")
    ap.add_argument("--rounds", type=at_least(1), default=3,
                    help="every configuration is measured this many times, interleaved with the others "
                         "(medians reported: on a shared machine the load changes between configurations)")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO columns")
    ap.add_argument("--gpu-only", action="store_true",
                    help="only the CUDA rows (no CPU rows, no INT8 preparation): for a short lease of a GPU")
    ap.add_argument("--timeout", type=positive_float, default=900, help="per configuration, seconds")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "edge_ad_speed"))
    ap.add_argument("--out", default=out_default(""), help="folder for speed.json, speed.txt and speed.png "
                    "(default: %(default)s; the README's figures: bench/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--guard-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.guard_worker:
        print("RESULT " + json.dumps(guard_worker(json.loads(args.guard_worker))), flush=True)
        return 0

    import importlib.util

    kinds = args.models
    bad = [k for k, _ in args.bundle if k not in MODELS]
    if bad:
        ap.error(f"--bundle {bad[0]}=...: unknown model; choose from {', '.join(MODELS)}")
    from edge_ad.bundle import Bundle

    for k, d in args.bundle:
        if not Path(d, "manifest.json").is_file():
            ap.error(f"--bundle {k}={d}: not a bundle folder (no manifest.json in it)")
        b = Bundle.open(d)
        if b.kind != k:
            ap.error(f"--bundle {k}={d}: a {b.kind} bundle; expected a {k} one")
        if b.image_size != (args.size, args.size):
            ap.error(f"--bundle {k}={d}: image size {b.image_size[1]}x{b.image_size[0]}; expected --size "
                     f"{args.size} ({args.size}x{args.size})")
    batches = args.batches
    trained = dict(args.bundle)
    out = check_out(ap, args.out, folder=True)
    # a named --data (or $EDGE_AD_BENCH_DATA) must be an MVTec-layout folder (exit 2); none: synthetic parts
    named = dataset(ap, args.data) if args.data or os.environ.get("EDGE_AD_BENCH_DATA") else None
    work = check_work(ap, args.work)
    out.mkdir(parents=True, exist_ok=True)
    data = named or synthetic_data(work, args.size)
    have_ov = (not args.no_openvino and not args.gpu_only and importlib.util.find_spec("openvino") is not None
               and importlib.util.find_spec("nncf") is not None)
    gpu = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpu = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name() if gpu else None
    if args.gpu_only and not gpu:
        print("skipped: --gpu-only, and torch sees no CUDA device here")
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    peak = measured_peak_gflops()
    peak8 = 0.0 if args.gpu_only else measured_int8_peak_gops()
    import platform

    machine = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
               "fp32_matmul_peak_gflops": peak, "int8_gemm_peak_gops": peak8, "gpu": gpu, "gpu_name": gpu_name, "openvino": have_ov, "load_avg_start": os.getloadavg()}
    log(f"machine: {os.cpu_count()} cores, FP32 matmul peak {peak:.0f} GFLOP/s, INT8 GEMM peak {peak8:.0f} "
        f"GOP/s, load average "
        f"{os.getloadavg()[0]:.1f}; OpenVINO: {'yes' if have_ov else 'no (pip install openvino nncf)'}; "
        f"GPU: {'yes' if gpu else 'no'}")
    results = []
    for kind in kinds:
        own = (Bundle.open(trained[kind]).manifest.get("training") or {}).get("data") if kind in trained else None
        where = f"{own}, the bundle's training data" if own else data
        log(f"{LABEL[kind]}: preparing (export, INT8 calibration + guard on {where})")
        info = prepare(kind, args.size, work, data, trained.get(kind), args.calib_samples, args.guard_normals, log,
                       keep_fp32=args.keep_fp32, calibration=args.calibration, test_dir=args.test,
                       guard_timeout=args.timeout, openvino=have_ov, int8=not args.gpu_only)
        cfgs = [c for c in configs(info, gpu, have_ov) if c["device"] == "cuda" or not args.gpu_only]
        runs: list[list[dict]] = [[] for _ in cfgs]
        for rnd in range(args.rounds):   # interleaved: every configuration once per round
            for i, cfg in enumerate(cfgs):
                if runs[i] and "crashed" in runs[i][0].get("error", ""):
                    continue   # a crash is not noise: once is enough
                cfg.update(bundle=info["bundle"], size=args.size, batches=batches, seconds=args.seconds,
                           threads=args.threads)
                log(f"  [{rnd + 1}/{args.rounds}] {cfg['name']} ...")
                r = run_config(cfg, args.timeout)
                runs[i].append(r)
                if "error" in r:
                    log(f"    error: {r['error']}")
                else:
                    log(f"    p50 {((r.get('latency_ms') or {}).get('p50') or float('nan')):.1f} ms, "
                        f"throughput {r['throughput']}")
        for cfg, rr in zip(cfgs, runs):
            r = merge_rounds(rr)
            r.update(model=kind, name=cfg["name"], info=info)
            if cfg["precision"] == "int8" and cfg["backend"] in ("onnxruntime", "openvino", "openvino-nncf"):
                guard_name = {"openvino": "openvino-int8", "openvino-nncf": "openvino-nncf-int8",
                              "onnxruntime": "onnxruntime-int8"}[cfg["backend"]]
                g = info.get("guard", {}).get(guard_name + ("-u8" if cfg.get("int8_form") == "u8" else ""))
                r["guard"] = "" if not g else ("error" if "error" in g else "pass" if g["passed"] else "FAIL")
            results.append(r)
        # after each model: a run cut short still leaves what it measured
        machine["load_avg_end"] = os.getloadavg()
        (out / "speed.json").write_text(json.dumps({"machine": machine, "size": args.size, "batches": batches,
                                                    "rounds": args.rounds, "threads": args.threads,
                                                    "command": command("speed", argv),
                                                    "results": results}, indent=2, default=str))
        (out / "speed.txt").write_text(fmt_table(results, batches, peak, peak8) + "\n")
    table = fmt_table(results, batches, peak, peak8)
    print(table)
    plot(results, batches, out / "speed.png", machine)
    print(f"\nwrote {out / 'speed.json'}, speed.txt and {out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
