"""Deployment commands: ``edge-ad doctor``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..runtime.backends import BACKENDS  # the one list run and open_backend accept
from . import main
from .types import Seconds, env_file_option


@main.command()
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="EDGE_AD_CONFIG", help="The edge-ad run config to check (bundle or deploy_dir, backend, "
                                            "precision, device, source, MQTT, paths). Default: $EDGE_AD_CONFIG.")
@env_file_option
@click.option("--bundle", type=click.Path(path_type=Path), help="Bundle folder to verify (overrides the config's model.bundle, as run --bundle does).")
@click.option("--mqtt", "mqtt_url", metavar="URL",
              help="Broker to reach, mqtt://host[:port] or mqtts://host[:port] (overrides the config's URL).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate for an mqtts:// broker (when not in the config).")
@click.option("--source", metavar="URI", help="Camera / source URI to check (overrides the config).")
@click.option("--data-dir", "data_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Folder run writes to (outbox, log, snapshots); repeatable. Default: the config's paths, "
                   "else the outbox folder and the working directory.")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="Backend run will use: the model is opened on it as run opens it (tensorrt also makes "
                   "TensorRT, CUDA and an engine required). Overrides the config's, as run --backend does. "
                   "Default: the config's, else auto.")
@click.option("--min-free-mb", type=click.IntRange(0), default=256, show_default=True,
              help="Free disk space required in each data folder.")
@click.option("--timeout", "timeout_s", type=Seconds(0.1, max=60), default=3.0, show_default=True,
              help="Seconds to wait for a broker or camera host.")
@click.option("--probe-publish", is_flag=True,
              help="With --config (MQTT v5): publish an empty message to the device's result, event and event "
                   "image topics to check that the broker's ACL lets it write there. Their consumers receive it: "
                   "off by default.")
@click.option("--strict", is_flag=True, help="Exit 1 on any warning or failed optional check too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(config, env_file, bundle, mqtt_url, ca_file, source, data_dirs, backend, min_free_mb, timeout_s,
           probe_publish, strict, as_json):
    """Check what this machine can do for `edge-ad run`, and say how to fix what is missing.

    Exit code: 0 when `edge-ad run` can start, 1 when something it needs is missing, 2 for usage errors. With
    neither --config (nor $EDGE_AD_CONFIG) nor --bundle only this machine is checked: 0 then says it has what
    run needs, and the summary says that whether run can start is not known without a bundle.

    \b
    edge-ad doctor
    edge-ad doctor --config /etc/edge-ad/config.toml          (reads /etc/edge-ad/edge-ad.env too)
    edge-ad doctor --bundle bundles/tile --mqtt mqtts://broker:8883 --ca-file ca.pem --source csi://0
    """
    from .. import doctor as d
    from ..config import applied_environ, default_env_file, read_env_file
    from ..errors import EdgeADError

    extra: list[d.Check] = []
    env: dict[str, str] = {}
    env_file = env_file or default_env_file(config)
    if env_file is not None:
        try:
            env = read_env_file(env_file)
            extra.append(d.Check("env-file", d.Status.OK, f"{env_file}: {len(env)} variable(s) applied as the "
                                 f"service gets them" + (f" ({', '.join(sorted(env))})" if env else "")))
        except EdgeADError as exc:
            # required: the service would not get these values either (edge-ad refuses such a file)
            extra.append(d.Check("env-file", d.Status.FAIL, f"{exc}: not applied", required=True, fix=(
                "fix the line named above (NAME=value, # for comments)" if os.access(env_file, os.R_OK) else
                "run doctor as the service user (sudo -u edge-ad ...): the file is root:edge-ad, mode 0640")))
    # the checks below (config overrides, MQTT credentials) see the file's values, as the service does
    click.get_current_context().with_resource(applied_environ(env))
    settings = None
    mqtt = None
    precision = None
    invalid = None   # the config given, when it is invalid: what it would name is not checked
    if config is not None:
        from ..config import load_settings

        try:  # --bundle overrides model.bundle as run's --bundle does (and is refused beside a deploy_dir, too)
            settings = load_settings(config, [(["model", "bundle"], str(bundle), "--bundle")] if bundle else [],
                                     for_run=True)
            extra.append(d.Check("config", d.Status.OK, f"{config}: valid"))
        except EdgeADError as exc:
            invalid = config
            extra.append(d.Check("config", d.Status.FAIL, str(exc), required=True,
                                 fix="fix the field named above (docs: edge-ad run --help, examples/)"))
    dirs = list(data_dirs)
    resolve_bundle = None
    if settings is not None:
        m = settings.model
        if bundle is None:  # as run finds it: model.bundle, else model.deploy_dir's 'current' release
            resolve_bundle = m.bundle_path
        source = source or settings.source.uri
        if backend is not None:  # as run's --backend: the config's backend only, its device and options stay
            m.backend = backend
        backend = m.backend
        precision = m.precision
        if settings.mqtt and settings.mqtt.get("url"):
            try:
                mqtt = settings.mqtt_settings()
            except EdgeADError as exc:
                extra.append(d.Check("config", d.Status.FAIL, str(exc), required=True))
        if not dirs:
            out = settings.output
            dirs += [Path(p).parent for p in (out.jsonl, settings.telemetry.path) if p is not None]
            if out.snapshots_dir is not None:
                dirs.append(Path(out.snapshots_dir))
            if mqtt is not None:
                dirs.append(Path(mqtt.effective_outbox_path).parent)
    # the device's topics, probed on the broker when asked (its site and device come from the config, whatever
    # --mqtt says): consumers of those topics receive the probe
    publish = d.publish_probe_topics(mqtt) if mqtt is not None and probe_publish else None
    if probe_publish and mqtt is None and invalid is None:   # an invalid config is reported, not a usage error
        raise click.UsageError("--probe-publish needs --config LINE.toml with an [mqtt] url: the topics it probes "
                               "are named by the line's site and device")
    if ca_file is not None and mqtt_url is None and mqtt is None:
        raise click.UsageError("--ca-file needs --mqtt URL (or a config with an [mqtt] url)")
    if mqtt_url is not None or ca_file is not None:
        from ..mqtt.settings import BrokerSettings

        fields = {}
        if mqtt is not None:
            fields = {k: getattr(mqtt, k) for k in BrokerSettings.model_fields}
            if fields.get("password") is not None:
                fields["password"] = fields["password"].get_secret_value()
        if mqtt_url is not None:
            fields["url"] = mqtt_url
        if ca_file is not None:
            fields["ca_file"] = ca_file
        mqtt = BrokerSettings(**fields)  # a malformed URL is a usage error (exit 2)
    checks = extra + d.run_checks(bundle=bundle, mqtt=mqtt, data_dirs=dirs, source=source,
                                  backend=backend or "auto", precision=precision, min_free_mb=min_free_mb,
                                  timeout_s=timeout_s, resolve_bundle=resolve_bundle, settings=settings,
                                  publish=publish, invalid_config=invalid)
    code = d.exit_code(checks, strict)
    if as_json:
        click.echo(json.dumps(d.report_dict(checks, strict), indent=2, sort_keys=False, default=str))
    else:
        click.echo(d.format_report(checks, strict))
    sys.exit(code)
