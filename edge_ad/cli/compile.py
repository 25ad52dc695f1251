"""Commands: export, quantize, compile (ONNX export, INT8/FP16 graphs, TensorRT engines; all guarded)."""

from __future__ import annotations

import click

from ..compile import MAX_OPSET, MIN_OPSET
from . import main
from .types import FiniteFloat

_LIMITS = [
    click.option("--max-auroc-drop", default=0.005, show_default=True, type=FiniteFloat(0, 1),
                 help="Guard: largest allowed image-AUROC drop vs FP32."),
    click.option("--min-rank-corr", default=0.99, show_default=True, type=FiniteFloat(-1, 1),
                 help="Guard: smallest allowed Spearman correlation of image scores vs FP32."),
    click.option("--min-agreement", default=None, type=FiniteFloat(0, 1),
                 help="Guard: smallest allowed OK/NG agreement at the threshold (default: reported only)."),
    click.option("--test", "test_dir", default=None, type=click.Path(),
                 help="A real MVTec-layout test folder for the guard (besides synthetic defects)."),
    click.option("--test-limit", default=100, show_default=True, type=click.IntRange(min=2),
                 help="At most this many real test images (spread over good and defect types)."),
    click.option("--guard-normals", default=32, show_default=True, type=click.IntRange(min=4),
                 help="Held-out normal images the guard uses (and as many with synthetic defects); at "
                      "least 4, all there are when fewer."),
    click.option("--calib", "calib_dir", default=None, type=click.Path(),
                 help="Normal images (folder, or MVTec category) instead of the bundle's training images."),
]


def _with_limits(fn):
    for opt in reversed(_LIMITS):
        fn = opt(fn)
    return fn


def _limits(max_auroc_drop, min_rank_corr, min_agreement):
    from ..compile.guard import GuardLimits

    return GuardLimits(max_auroc_drop=max_auroc_drop, min_rank_corr=min_rank_corr, min_agreement=min_agreement)


def _open(bundle_dir):
    from ..bundle import Bundle

    return Bundle.open(bundle_dir)


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(MIN_OPSET, MAX_OPSET),
              help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}: {MIN_OPSET} is the lowest the INT8 graphs "
                   f"(per-channel Q/DQ) need, {MAX_OPSET} the highest torch's exporter writes.")
def export(bundle_dir, opset):
    """Export the bundle's checkpoint to model.onnx (normalization inside, raw maps out, dynamic batch)."""
    from ..compile.export import export_bundle

    b = _open(bundle_dir)
    path = export_bundle(b, opset=opset)
    click.echo(f"{path}: opset {opset}, input image [B,3,{b.image_size[0]},{b.image_size[1]}], "
               f"outputs {', '.join(b.outputs)}; active graph reset to fp32")


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--precision", required=True, type=click.Choice(["int8", "fp16"]))
@click.option("--samples", default=64, show_default=True, type=click.IntRange(min=1),
              help="Calibration images (int8; all there are when fewer).")
@click.option("--keep-fp32", default="auto", show_default=True, type=click.Choice(["head", "auto", "none"]),
              help="int8 convolutions kept in FP32: auto (those a per-layer sensitivity search finds "
                   "costly), head (the last conv of each map path), or none.")
@click.option("--threads", default=0, type=click.IntRange(0, 1024), help="ONNX Runtime threads (0: all cores).")
@_with_limits
def quantize(bundle_dir, precision, samples, keep_fp32, threads, max_auroc_drop, min_rank_corr, min_agreement,
             test_dir, test_limit, guard_normals, calib_dir):
    """INT8 (Q/DQ, two forms: TensorRT and CPU) or FP16 graph, guarded against FP32 before it is used.

    Each INT8 form goes in when it passes its guard; exit 0 when at least one graph went in (a refused
    form is named, with why and what to do), 1 when none passed."""
    from ..compile.quantize import quantize_bundle

    b = _open(bundle_dir)
    res = quantize_bundle(b, precision, calib_dir=calib_dir, samples=samples, keep_fp32=keep_fp32,
                          test_dir=test_dir, limits=_limits(max_auroc_drop, min_rank_corr, min_agreement),
                          guard_normals=guard_normals, test_limit=test_limit, threads=threads)
    refused = (f"; {', '.join(res.refused)} refused (why above, and in manifest.json's quantized.{precision}.refused)"
               if res.refused else "")
    click.echo(f"{', '.join(res.files)} written and guarded ({res.seconds:.0f} s){refused}; active graph: "
               f"{b.active_graph} ({b.active_precision}). Report: {b.file('quant_report.json')}")


@main.command("compile")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--precision", default="best", show_default=True, type=click.Choice(["fp16", "int8", "fp32", "best"]),
              help="best: INT8 (on a quantized bundle), else FP16, else FP32: the first engine to pass the guard.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Largest batch of the engine's profile.")
@click.option("--workspace", "workspace_mib", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Builder workspace limit, MiB.")
@click.option("--device", default=0, show_default=True, type=click.IntRange(min=0), help="CUDA device index.")
@click.option("--typing", default="auto", show_default=True, type=click.Choice(["auto", "weak", "strong"]),
              help="auto: builder precision flags on TensorRT 8.6/10, strongly typed on 11.")
@click.option("--force", is_flag=True, help="Rebuild even when a valid engine is cached.")
@_with_limits
def compile_cmd(bundle_dir, precision, max_batch, workspace_mib, device, typing, force, max_auroc_drop,
                min_rank_corr, min_agreement, test_dir, test_limit, guard_normals, calib_dir):
    """Build a TensorRT engine on this device, check it against FP32, cache it under engines/."""
    from ..runtime.backends.tensorrt import import_tensorrt

    b = _open(bundle_dir)   # a wrong --bundle is named before TensorRT is looked for
    import_tensorrt()   # exit 2 with what to install, before any work
    from ..compile.tensorrt import compile_bundle

    entry = compile_bundle(b, precision, max_batch=max_batch, workspace_mib=workspace_mib, device=device,
                           typing=typing, force=force, test_dir=test_dir,
                           limits=_limits(max_auroc_drop, min_rank_corr, min_agreement),
                           guard_normals=guard_normals, calib_dir=calib_dir, test_limit=test_limit)
    click.echo(f"engine {entry['engine']} passed the guard (rank corr {entry['rank_corr']:.4f}); "
               f"active precision: {b.active_precision}")
