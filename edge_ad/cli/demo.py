"""``edge-ad demo``: the end-to-end demo on a machine with no camera and no GPU."""

from __future__ import annotations

import sys

import click

from . import main


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Work folder (data, bundle, loop outputs, report.html). A previous demo's folder is emptied.")
@click.option("--quick", is_flag=True, help="Fewer and smaller images, fewer frames (CI: well under a minute).")
@click.option("--model", default="gaussian", show_default=True,
              type=click.Choice(["gaussian", "efficientad-s", "efficientad-m", "fader"]),
              help="Model to train (the Gaussian takes seconds; the others train --steps steps).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps of efficientad-* / fader (default 200; 20 with --quick).")
@click.option("--image-size", type=int, default=None,
              help="Model input size (default 128; 64 with --quick for the Gaussian).")
@click.option("--fps", type=float, default=None,
              help="Conveyor frames per second (Gaussian: 10, 20 with --quick; other models: 3).")
@click.option("--kind", default="disc", show_default=True, type=click.Choice(["disc", "plate", "grain", "woven"]),
              help="Synthetic part.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--no-mqtt", is_flag=True,
              help="Run the loop without a broker (recalibration then goes through the bundle and SIGHUP).")
def demo(out, quick, model, steps, image_size, fps, kind, seed, no_mqtt):
    """Synthetic parts -> train -> evaluate -> INT8 with the accuracy guard -> Mosquitto -> 'edge-ad run'
    on a synthetic conveyor with the live MQTT monitor -> a lighting change and a recalibration over
    MQTT -> clean stop -> OUT/report.html. Exit 1 naming the step that failed."""
    from ..demo import Terminated, run_demo

    try:
        run_demo(out, quick=quick, model=model, image_size=image_size, steps=steps, fps=fps, kind=kind, seed=seed,
                 mqtt=not no_mqtt)
    except Terminated as exc:   # SIGTERM / SIGHUP: the loop and the broker were stopped on the way out
        click.echo(f"{exc}: the loop and the broker were stopped", err=True)
        sys.exit(128 + exc.signum)
