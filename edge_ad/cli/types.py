"""Option types and options the commands share (click's own ranges, plus what they miss)."""

from __future__ import annotations

import math
from pathlib import Path

import click


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: ``nan`` passes every range comparison
    (``--duration nan`` ran forever, ``--timeout nan`` waited 'nan s') and ``inf`` overflows timers."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Seconds(FiniteFloat):
    """A finite number of seconds, at most what ``threading`` can wait (``threading.TIMEOUT_MAX``, about
    292 years): ``--every inf`` or ``1e300`` made ``Event.wait`` raise OverflowError."""

    def convert(self, value, param, ctx):
        import threading

        rv = super().convert(value, param, ctx)
        if rv > threading.TIMEOUT_MAX:
            self.fail(f"{value!r} seconds is too long (at most {threading.TIMEOUT_MAX:.0f}).", param, ctx)
        return rv


# --env-file of capture, calibrate, bundle install, status and rollback, and doctor: the service's
# EnvironmentFile=, read with edge_ad.config.read_env_file (edge_ad.config.service_environ, doctor's own check)
env_file_option = click.option(
    "--env-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The environment file the service runs with (systemd EnvironmentFile= syntax: NAME=value lines, # "
         "comments, optional quotes). Its variables (MQTT credentials, the command secret, "
         "EDGE_AD_<SECTION>__<KEY> overrides of --config) replace this shell's, as systemd gives them to the "
         "service. Default: edge-ad.env next to --config, when there is one. Only doctor takes it without "
         "--config.")
