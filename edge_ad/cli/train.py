"""Commands: train, eval, distill-teacher, generic-images."""

from __future__ import annotations

import click

from ..runtime.backends import BACKENDS
from . import main


@main.command()
@click.option("--model", "model_kind", required=True,
              type=click.Choice(["efficientad-s", "efficientad-m", "fader", "gaussian"]), help="Model family.")
@click.option("--data", required=True, type=click.Path(), help="MVTec-layout category folder (train/good ...).")
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--image-size", default=256, show_default=True, type=int, help="Square input size (multiple of 32).")
@click.option("--steps", type=int, default=None, help="Training steps (default: the preset's).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default: the preset's).")
@click.option("--lr", type=float, default=None,
              help="Learning rate (default: the preset's: efficientad quick 3e-4, paper 1e-4; fader 1e-3); part of "
                   "the run, which --resume continues only at the checkpoint's.")
@click.option("--preset", default="quick", show_default=True, type=click.Choice(["quick", "paper"]))
@click.option("--teacher", default=None,
              help="EfficientAD teacher: 'lite0' (default: truncated ImageNet EfficientNet-Lite0) or a PDN "
                   "weights file (teacher_small.pth format, or from 'edge-ad distill-teacher').")
@click.option("--penalty-dir", type=click.Path(), default=None,
              help="Generic images for EfficientAD's penalty term (skipped, with a warning, when absent): a "
                   "folder of images, or one with none itself but a train/good (an MVTec category), as "
                   "distill-teacher's --data.")
@click.option("--gaussian-layout", type=click.Choice(["patch", "shared", "image"]), default=None,
              help="Gaussian model: per-location (PaDiM-like), one shared Gaussian, or image-level (Rippel).")
@click.option("--policy", default="max", show_default=True, help="Threshold policy: fpr:P | max | sigma:K.")
@click.option("--val-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="Share of the normal training images held out to fit the calibration and threshold.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT/train_state.pt (refused unless this run's options match it; "
                   "--steps, --max-minutes, --checkpoint-every, --device and --policy may change).")
@click.option("--checkpoint-every", default=500, show_default=True, type=int,
              help="Steps between checkpoints (OUT/train_state.pt); Ctrl-C or SIGTERM during the steps also saves "
                   "one, at the step reached, and exits 130 (Ctrl-C) or 143 (SIGTERM) (no bundle written; twice: "
                   "abort at once).")
@click.option("--max-minutes", type=float, default=None,
              help="Time budget for the gradient steps: stop there and write the bundle (the x0.1 learning-rate "
                   "drop then comes at 95% of the budget if the steps do not fit).")
@click.option("--no-export", is_flag=True, help="Skip the ONNX export at the end.")
def train(model_kind, data, out, image_size, steps, batch_size, lr, preset, teacher, penalty_dir, gaussian_layout,
          policy, val_fraction, seed, device, resume, checkpoint_every, max_minutes, no_export):
    """Fit a model on normal images and write a bundle (checkpoint, calibration, ONNX)."""
    from ..train.pipeline import train_bundle

    _check_options_apply(model_kind)
    config = {"layout": gaussian_layout} if gaussian_layout else None
    b = train_bundle(model_kind, data, out, image_size=image_size, steps=steps, preset=preset, teacher=teacher,
                     seed=seed, device=device, resume=resume, penalty_dir=penalty_dir, policy=policy,
                     val_fraction=val_fraction, batch_size=batch_size, lr=lr, export=not no_export, config=config,
                     checkpoint_every=checkpoint_every, max_minutes=max_minutes)
    cal = b.calibration()
    t = b.manifest["training"]
    if t.get("stopped_by_time_budget"):
        click.echo(f"time budget reached: {t['steps']} of {t['planned_steps']} steps")
    work = (f"fitted on {t['fitted_on']} images" if "fitted_on" in t   # the Gaussian: one pass, no steps
            else f"{t.get('steps', 0)} steps")
    click.echo(f"bundle {b.path}: {b.kind} {image_size}x{image_size}, {work} in {t['seconds']} s, "
               f"calibration v{cal.version} threshold {cal.threshold:.4g} ({cal.policy})")


# options that only some model families use: given to another, they would be silently ignored
_MODEL_OPTIONS = {
    "teacher": ("--teacher", ("efficientad-s", "efficientad-m")),
    "penalty_dir": ("--penalty-dir", ("efficientad-s", "efficientad-m")),
    "gaussian_layout": ("--gaussian-layout", ("gaussian",)),
    "steps": ("--steps", ("efficientad-s", "efficientad-m", "fader")),
    "batch_size": ("--batch-size", ("efficientad-s", "efficientad-m", "fader")),
    "lr": ("--lr", ("efficientad-s", "efficientad-m", "fader")),
    "checkpoint_every": ("--checkpoint-every", ("efficientad-s", "efficientad-m", "fader")),
    "max_minutes": ("--max-minutes", ("efficientad-s", "efficientad-m", "fader")),
}


def _check_options_apply(model_kind: str) -> None:
    """Refuse (exit 2, before any work) an option given on the command line that --model does not use."""
    from click.core import ParameterSource

    from ..errors import InputError

    ctx = click.get_current_context()
    wrong = [(flag, models) for name, (flag, models) in _MODEL_OPTIONS.items()
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None) and model_kind not in models]
    if wrong:
        raise InputError("; ".join(f"{flag} applies to {', '.join(models)} only" for flag, models in wrong)
                         + f": --model {model_kind} does not use {'it' if len(wrong) == 1 else 'them'}"
                         + (" (the gaussian model is fitted in one pass, without steps)"
                            if model_kind == "gaussian" else "") + "; leave it out")


@main.command("eval")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder.")
@click.option("--data", required=True, type=click.Path(), help="MVTec-layout category folder with test/.")
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice([b for b in BACKENDS if b != "auto"]))
@click.option("--precision", default=None, type=click.Choice(["fp32", "fp16", "int8", "int8-u8"]),
              help="Graph to evaluate (default: the bundle's active one; int8 on a CPU runs model.int8-u8.onnx "
                   "when the bundle has it). The report names the graph file that ran.")
@click.option("--device", default=None, help="cpu or cuda (default: what the backend picks).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--out", "out_dir", default=None, type=click.Path(), help="Report folder (default BUNDLE/eval).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (report.json: with 'samples', each image's path, type, score, decision).")
def eval_cmd(bundle_dir, data, backend, precision, device, batch, out_dir, as_json):
    """Image AUROC, pixel AUROC, AUPRO and F1 at the bundle's threshold, per defect type."""
    from ..evaluate import dumps, evaluate, report_text

    rep = evaluate(bundle_dir, data, backend, precision, device, batch, out_dir)
    click.echo(dumps(rep) if as_json else report_text(rep))


@main.command("distill-teacher")
@click.option("--data", required=True, multiple=True, type=click.Path(),
              help="Folder of images (any; ImageNet-like is best; of an MVTec category, its train/good); repeat "
                   "to use several folders.")
@click.option("--out", required=True, type=click.Path(), help="Teacher weights file to write (.pth).")
@click.option("--size", default="s", show_default=True, type=click.Choice(["s", "m"]), help="PDN size.")
@click.option("--image-size", default=256, show_default=True, type=int)
@click.option("--steps", default=2000, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--lr", default=1e-4, show_default=True, type=float,
              help="Learning rate; part of the run, which --resume continues only at the checkpoint's.")
@click.option("--max-minutes", default=None, type=float,
              help="Time budget: stop there and still write the teacher.")
@click.option("--checkpoint-every", default=1000, show_default=True, type=int,
              help="Steps between checkpoints (OUT.state.pt), for --resume; Ctrl-C or SIGTERM during the steps "
                   "also saves one, at the step reached, and exits 130 (Ctrl-C) or 143 (SIGTERM) (twice: abort at "
                   "once).")
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT.state.pt (refused unless this run's options match it; "
                   "--steps, --max-minutes, --checkpoint-every and --device may change).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True)
def distill_teacher(data, out, size, image_size, steps, batch_size, lr, max_minutes, checkpoint_every, resume, seed,
                    device):
    """Distill a PDN teacher from the offline ImageNet EfficientNet-Lite0 on image folders."""
    from ..train.distill import distill

    info = distill(list(data), out, size=size, image_size=image_size, steps=steps, batch_size=batch_size, lr=lr,
                   seed=seed, device=device, max_minutes=max_minutes, resume=resume,
                   checkpoint_every=checkpoint_every)
    click.echo(f"teacher {out}: PDN-{size.upper()} with {info['channels']} channels, final loss "
               f"{info['final_loss']:.4f} after {info['steps']} of {steps} steps on {info['images']} images")


@main.command("generic-images")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write the JPEG files into: new or empty, or a previous run's (replaced as a whole, "
                   "when all images are written: an interrupted run leaves it as it was).")
@click.option("--count", default=2000, show_default=True, type=int)
@click.option("--image-size", default=256, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def generic_images(out, count, image_size, seed):
    """Paint generic (dead-leaves) images: a stand-in for ImageNet in distill-teacher and --penalty-dir."""
    from ..data.generic import write_generic

    paths = write_generic(out, count, image_size, seed)
    click.echo(f"{len(paths)} generic images in {out}")
