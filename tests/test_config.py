"""Settings for `edge-ad run`: TOML + EDGE_AD_* environment + flags, and errors that name the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ad.config import Mode, env_overrides, load_settings, parse_set_option
from edge_ad.errors import InputError

EDGE_AD = [sys.executable, "-c", "from edge_ad.cli import main; main()"]

MINIMAL = """
[model]
bundle = "bundles/part"

[source]
uri = "file://clip.avi"
"""


def _write(tmp_path: Path, text: str, name: str = "edge-ad.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults_and_paths_relative_to_the_file(tmp_path):
    cfg = _write(tmp_path, MINIMAL + '\n[output]\njsonl = "out/results.jsonl"\nsnapshots_dir = "/abs/snaps"\n')
    s = load_settings(cfg, environ={})
    assert s.model.bundle == tmp_path / "bundles/part"
    assert s.output.jsonl == tmp_path / "out/results.jsonl"
    assert str(s.output.snapshots_dir) == "/abs/snaps"
    assert s.source.mode is Mode.STREAM and s.source.trigger == "frame"
    assert s.pipeline.max_batch == 4 and s.pipeline.queue_size == 2
    assert s.model.backend == "auto" and s.model.precision is None and s.model.device is None
    assert s.mqtt_settings() is None            # no [mqtt] section: MQTT off
    assert s.drift.window == 200 and s.telemetry.interval_s == 10


def test_relative_source_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "file://recordings/line3.mp4?loop=1&fps=native"))
    s = load_settings(cfg, environ={})
    from edge_ad.runtime.sources import parse_uri

    spec = parse_uri(s.source.uri)
    assert spec.target == str(tmp_path / "recordings/line3.mp4")
    assert spec.options["loop"] is True and spec.options["fps"] == "native"
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "dir://parts/"))
    assert parse_uri(load_settings(cfg, environ={}).source.uri).target == str(tmp_path / "parts")
    # absolute paths and cameras are left alone; flags and environment stay relative to the working dir
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "file:///abs/clip.avi"))
    assert load_settings(cfg, environ={}).source.uri == "file:///abs/clip.avi"
    s = load_settings(_write(tmp_path, MINIMAL), [(["source", "uri"], "dir://here", "--source")], environ={})
    assert s.source.uri == "dir://here"
    s = load_settings(_write(tmp_path, MINIMAL), environ={"EDGE_AD_SOURCE__URI": "synthetic://disc"})
    assert s.source.uri == "synthetic://disc"


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[1] / "examples" / "edge-ad.toml"
    s = load_settings(example, environ={})
    assert s.source.uri and s.model.bundle
    assert s.mqtt_settings() is not None


@pytest.mark.parametrize("text, field, words", [
    (MINIMAL.replace('uri = "file://clip.avi"', 'uri = "file://clip.avi"\nmode = "strem"'),
     "source.mode", ["stream", "trigger", "strem"]),
    (MINIMAL + "\n[pipeline]\nmax_bach = 3\n", "pipeline.max_bach", ["unknown field"]),
    (MINIMAL + "\n[pipeline]\nmax_batch = 0\n", "pipeline.max_batch", ["greater than or equal to 1"]),
    (MINIMAL.replace("file://clip.avi", "ftp://cam/x"), "source.uri", ["unknown scheme", "ftp://"]),
    (MINIMAL.replace("file://clip.avi", "file://clip.avi?lop=1"), "source.uri", ["lop", "loop"]),
    (MINIMAL + "\n[decision]\nthreshold = \"high\"\n", "decision.threshold", ["high"]),
    (MINIMAL.replace('uri = "file://clip.avi"', 'uri = "file://clip.avi"\nroi = [0, 0, 10]'),
     "source.roi", ["[x, y, width, height]"]),
    (MINIMAL.replace('uri = "file://clip.avi"', 'uri = "file://clip.avi"\nrotate = 45'),
     "source.rotate", ["0, 90, 180 or 270"]),
    (MINIMAL + "\n[calibration]\npolicy = \"fpr:2\"\n", "calibration.policy", ["fpr:P"]),
    ('[source]\nuri = "file://x.avi"\n', "model", ["Field required"]),
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\nbackend = "tensorflow"'), "model.backend",
     ["onnxruntime", "tensorflow"]),    # both: an update installed into deploy_dir would be undone by a restart running bundle
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\ndeploy_dir = "dep"'), "model",
     ["bundle", "deploy_dir", "both", "give one"]),
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\nthreads = 100000'), "model.threads",
     ["1024", "100000"]),
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\nthreads = 99999999999999999999999'),
     "model.threads", ["1024"]),
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\ndevice = "gpu"'), "model.device",
     ["'gpu'", "cpu, cuda[:N] or tensorrt[:N]"]),                     # was valid until the backend opened
    (MINIMAL.replace('bundle = "bundles/part"', 'bundle = "b"\ndevice = "cuda:x"'), "model.device", ["cuda:x"]),
    (MINIMAL + "\n[decision]\nmax_regions = 0\n", "decision.max_regions", ["greater than or equal to 1"]),
    (MINIMAL + "\n[telemetry]\nmax_bytes = 10\n", "telemetry.max_bytes", ["greater than or equal to 1024"]),
    (MINIMAL + "\n[health]\nwindow_s = 0\n", "health.window_s", ["greater than 0"]),
    (MINIMAL + "\n[health]\nmin_frames = 0\n", "health.min_frames", ["greater than or equal to 1"]),
    (MINIMAL + "\n[health]\nmax_error_rate = 1.5\n", "health.max_error_rate", ["less than or equal to 1", "1.5"]),
    (MINIMAL + "\n[health]\nmax_ng_rate_jump = nan\n", "health.max_ng_rate_jump", ["finite number"]),
    (MINIMAL + "\n[health]\nrollback_wait_s = -1\n", "health.rollback_wait_s", ["greater than or equal to 0"]),
    (MINIMAL + "\n[health]\nwindow = 60\n", "health.window", ["unknown field"]),
    (MINIMAL + "\n[health]\nenabled = \"sometimes\"\n", "health.enabled", ["boolean", "sometimes"]),
])
def test_invalid_config_names_the_field_and_the_file(tmp_path, text, field, words):
    cfg = _write(tmp_path, text)
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={})
    msg = str(ei.value)
    assert field in msg, msg
    assert str(cfg) in msg, msg
    for w in words:
        assert w in msg, msg


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not valid TOML"):
        load_settings(_write(tmp_path, "[model\nbundle=1"), environ={})
    with pytest.raises(InputError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    """Notepad (and other Windows editors) write UTF-8 with a byte-order mark: it was refused as "not valid TOML
    (Invalid statement (at line 1, column 1))", which did not say why. It is taken as UTF-8."""
    cfg = _write(tmp_path, MINIMAL + "\n[pipeline]\nmax_batch = 2\n")
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    assert load_settings(cfg, environ={}).pipeline.max_batch == 2


def test_an_env_file_with_a_byte_order_mark_names_the_mark(tmp_path):
    """The service's edge-ad.env saved with a byte-order mark was refused as "'\\ufeffEDGE_AD_...' is not a
    variable name", which did not say why; systemd reads the mark into the first name too, so it is not taken,
    but named, with the fix."""
    from edge_ad.config import read_env_file

    env = tmp_path / "edge-ad.env"
    env.write_bytes(b"\xef\xbb\xbfEDGE_AD_MQTT__URL=mqtt://broker\n")
    with pytest.raises(InputError, match=r"edge-ad.env: the file starts with a UTF-8 byte-order mark .* systemd does "
                                         r"not read either; save it without one"):
        read_env_file(env)


def test_environment_and_flags_override_the_file_in_order(tmp_path):
    cfg = _write(tmp_path, MINIMAL + "\n[pipeline]\nmax_batch = 2\n")
    env = {"EDGE_AD_PIPELINE__MAX_BATCH": "8", "EDGE_AD_SOURCE__ROI": "[1, 2, 30, 40]",
           "EDGE_AD_SOURCE__URI": "rtsp://user:secret@10.0.0.5/stream1", "EDGE_AD_CONFIG": "ignored.toml",
           "EDGE_AD_MQTT_PASSWORD": "not-an-override", "PATH": "/bin"}
    s = load_settings(cfg, environ=env)
    assert s.pipeline.max_batch == 8
    assert s.source.roi == [1, 2, 30, 40]
    assert s.source.uri.startswith("rtsp://")
    s = load_settings(cfg, [parse_set_option("pipeline.max_batch=16"), (["source", "mode"], "trigger", "--mode")],
                      environ=env)
    assert s.pipeline.max_batch == 16 and s.source.mode is Mode.TRIGGER
    # the log-safe view hides the camera password
    red = json.dumps(s.redacted())
    assert "secret" not in red and "rtsp://***@10.0.0.5/stream1" in red


def test_an_invalid_override_names_its_origin(tmp_path):
    cfg = _write(tmp_path, MINIMAL)
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={"EDGE_AD_PIPELINE__QUEUE_SIZE": "-3"})
    assert "pipeline.queue_size" in str(ei.value) and "EDGE_AD_PIPELINE__QUEUE_SIZE" in str(ei.value)
    with pytest.raises(InputError) as ei:
        load_settings(cfg, [parse_set_option("drift.window=3")], environ={})
    assert "drift.window" in str(ei.value) and "--set drift.window" in str(ei.value)
    with pytest.raises(InputError) as ei:  # an unknown section is blamed on the flag that made it
        load_settings(cfg, [parse_set_option("pipelin.max_batch=3")], environ={})
    assert "pipelin: unknown field; did you mean pipeline? [from --set pipelin.max_batch]" in str(ei.value)
    with pytest.raises(InputError, match=r"model\.device: 'gpu': expected .*\[from --set model\.device\]"):
        load_settings(cfg, [parse_set_option("model.device=gpu")], environ={})
    assert load_settings(cfg, [parse_set_option("model.device=CUDA:1")], environ={}).model.device == "cuda:1"
    with pytest.raises(InputError, match="not a config section"):
        env_overrides({"EDGE_AD_SORCE__URI": "file://x"})
    with pytest.raises(InputError, match="SECTION.KEY=VALUE"):
        parse_set_option("max_batch=3")


def test_the_health_section_maps_onto_the_health_limits_with_overrides(tmp_path):
    """[health] gives the health check's limits (they were fixed HealthLimits values); its defaults are
    HealthLimits', and the environment and --set override it, an invalid override named by its origin."""
    from edge_ad.calibration import HealthLimits

    s = load_settings(_write(tmp_path, MINIMAL), environ={})
    assert s.health.enabled and s.health.limits() == HealthLimits()
    cfg = _write(tmp_path, MINIMAL + "\n[health]\nwindow_s = 30\nmin_frames = 5\n")
    env = {"EDGE_AD_HEALTH__MAX_ERROR_RATE": "0.1", "EDGE_AD_HEALTH__ROLLBACK_WAIT_S": "60"}
    s = load_settings(cfg, [parse_set_option("health.enabled=false"), parse_set_option("health.min_frames=8")],
                      environ=env)
    assert not s.health.enabled
    assert s.health.limits() == HealthLimits(window_s=30, min_frames=8, max_error_rate=0.1, rollback_wait_s=60)
    assert s.redacted()["health"] == {"enabled": False, "window_s": 30, "min_frames": 8, "max_error_rate": 0.1,
                                      "max_ng_rate_jump": 0.2, "rollback_wait_s": 60, "record_wait_s": 600}
    with pytest.raises(InputError, match=r"health\.min_frames: .*\[from environment variable "
                                         r"EDGE_AD_HEALTH__MIN_FRAMES\]"):
        load_settings(cfg, environ={"EDGE_AD_HEALTH__MIN_FRAMES": "-1"})
    with pytest.raises(InputError, match=r"health\.record_wait_s: .*\(got 'soon'\) "
                                         r"\[from --set health\.record_wait_s\]"):
        load_settings(cfg, [parse_set_option("health.record_wait_s=soon")], environ={})


def test_mqtt_section(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://127.0.0.1:1884"\nsite = "plant1"\ndevice = "cam-3"\n'
                                     'password = "hunter2"\n')
    s = load_settings(cfg, environ={})
    m = s.mqtt_settings()
    assert m.port == 1884 and m.site == "plant1" and m.device == "cam-3"
    assert "hunter2" not in json.dumps(s.redacted())
    s = load_settings(cfg, [parse_set_option("mqtt.enabled=false")], environ={})
    assert s.mqtt_settings() is None
    bad = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "http://broker"\n', "bad.toml")
    with pytest.raises(InputError) as ei:
        load_settings(bad, environ={})
    assert "mqtt.url" in str(ei.value) and str(bad) in str(ei.value)
    bad = _write(tmp_path, MINIMAL + '\n[mqtt]\nsite = "has space"\n', "bad2.toml")
    with pytest.raises(InputError, match="mqtt.site"):
        load_settings(bad, environ={})


def test_an_unknown_field_says_which_known_one_it_most_likely_misspells(tmp_path):
    """`snapshot_dir` for `snapshots_dir` was refused as 'unknown field' with no hint. The closest known field is
    named, as its origin writes it: `section.key` for the file and --set, the variable for EDGE_AD_*; with no
    close one, the fields of its table (the sections, for a section)."""
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL)

    def refused(text=MINIMAL, overrides=(), environ=None):
        with pytest.raises(InputError) as ei:
            load_settings(_write(tmp_path, text, "t.toml"), [parse_set_option(o) for o in overrides],
                          environ=environ or {})
        return str(ei.value)

    msg = refused(MINIMAL + '\n[output]\nsnapshot_dir = "snaps"\n')
    assert ("output.snapshot_dir: unknown field; did you mean output.snapshots_dir? (got 'snaps') "
            f"[from {tmp_path / 't.toml'}]") in msg, msg
    msg = refused(environ={"EDGE_AD_OUTPUT__SNAPSHOT_DIR": "snaps"})
    assert "did you mean EDGE_AD_OUTPUT__SNAPSHOTS_DIR? (got 'snaps') [from environment variable " in msg, msg
    msg = refused(overrides=["output.Snapshot_Dir=snaps"])
    assert "did you mean output.snapshots_dir? (got 'snaps') [from --set output.Snapshot_Dir]" in msg, msg
    msg = refused(overrides=["source.gpio.pn=4"])           # a table in a section
    assert "source.gpio.pn: unknown field; did you mean source.gpio.pin?" in msg, msg
    msg = refused(overrides=["output.colour=1"])            # no close field: the fields of its table
    assert "output.colour: unknown field (the [output] fields: event_image, heatmap, " in msg, msg
    msg = refused(overrides=["sauce.uri=x"])
    assert "sauce: unknown field; did you mean source? [from --set sauce.uri]" in msg, msg
    msg = refused(MINIMAL + '\n[mqtt]\nurl = "mqtt://b"\nusename = "u"\n', environ={"EDGE_AD_MQTT__KEEPALIVE": "9"})
    assert "mqtt.keepalive: unknown field; did you mean EDGE_AD_MQTT__KEEPALIVE_S? [from environment" in msg, msg
    assert "mqtt.usename: unknown field; did you mean mqtt.username? [from " in msg, msg
    assert "(the [mqtt] fields" not in msg, msg             # each has its close match: no list of 30 fields
    with pytest.raises(InputError, match=r"'outpt' is not a config section \(did you mean EDGE_AD_OUTPUT__JSONL\? "):
        env_overrides({"EDGE_AD_OUTPT__JSONL": "r.jsonl"})
    assert load_settings(cfg, environ={}).output.snapshots_dir is None


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_an_unknown_mqtt_key_is_refused_whether_or_not_mqtt_is_on(tmp_path, enabled):
    """A typo in [mqtt] is refused with enabled = false too (it was kept, to surface the day MQTT is turned on),
    naming it and the known fields, never its value (it may be a mistyped password)."""
    pytest.importorskip("paho.mqtt")
    from click.testing import CliRunner

    from edge_ad.cli import main

    cfg = _write(tmp_path, MINIMAL + f'\n[mqtt]\nenabled = {enabled}\nhots = "x"\npasword = "s3cret"\n')
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={})
    msg = str(ei.value)
    assert f"mqtt.hots: unknown field [from {cfg}]; mqtt.pasword: unknown field" in msg, msg
    assert "(the [mqtt] fields: " in msg and "password, protocol" in msg and "s3cret" not in msg
    res = CliRunner().invoke(main, ["run", "--config", str(cfg), "--print-config"])
    assert res.exit_code == 2 and "mqtt.hots: unknown field" in res.output, res.output
    ok = _write(tmp_path, MINIMAL + f'\n[mqtt]\nenabled = {enabled}\nurl = "mqtt://broker"\n', "ok.toml")
    assert load_settings(ok, environ={}).mqtt_enabled is (enabled == "true")


def test_a_command_trigger_without_mqtt_is_refused_with_the_config(tmp_path):
    """source.trigger = "command" with MQTT off (no [mqtt], or enabled = false) passed 'run --print-config' and
    doctor's config line, and only 'run' refused it, once the model was loaded. The config is refused (exit 2),
    naming the fields and where each value came from, by run and doctor (for_run); capture, calibrate and bundle
    install, which read no trigger, take it."""
    from click.testing import CliRunner

    from edge_ad.cli import main
    from edge_ad.config import CaptureSettings

    trig = MINIMAL.replace('uri = "file://clip.avi"', 'uri = "synthetic://disc"\nmode = "trigger"\ntrigger = "command"')
    cfg = _write(tmp_path, trig)
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={}, for_run=True)
    assert str(ei.value) == (
        f"{cfg}: invalid config: source.trigger = 'command' [from {cfg}] (with source.mode = 'trigger' [from {cfg}]) "
        "releases frames only on the MQTT inspect command, and MQTT is off (no [mqtt] section): nothing could ever be "
        "inspected; add an [mqtt] section (its url), or set source.trigger to 'frame', 'gpio' or a plug-in")
    res = CliRunner().invoke(main, ["run", "--config", str(cfg), "--print-config"])
    assert res.exit_code == 2 and res.output == f"error: {ei.value}\n", res.output
    res = CliRunner().invoke(main, ["doctor", "--config", str(cfg), "--min-free-mb", "1", "--json"])
    assert res.exit_code == 1, res.output
    [line] = [c for c in json.loads(res.output)["checks"] if c["name"] == "config"]
    assert line["status"] == "fail" and line["detail"] == str(ei.value), line
    off = _write(tmp_path, trig + '\n[mqtt]\nenabled = false\n', "off.toml")
    with pytest.raises(InputError, match=rf"MQTT is off \(mqtt.enabled = false \[from {off}\]\): nothing could ever "
                                         "be inspected; set mqtt.enabled = true, or"):
        load_settings(off, environ={}, for_run=True)
    with pytest.raises(InputError, match=r"source.trigger = 'command' \[from --set source.trigger\] \(with source.mode "
                                         r"= 'trigger' \[from environment variable EDGE_AD_SOURCE__MODE\]\)"):
        load_settings(_write(tmp_path, MINIMAL, "plain.toml"), [parse_set_option("source.trigger=command")],
                      environ={"EDGE_AD_SOURCE__MODE": "trigger"}, for_run=True)
    assert load_settings(off, [parse_set_option("mqtt.enabled=true")], environ={}, for_run=True).source.trigger == "command"
    assert load_settings(cfg, [parse_set_option("source.mode=stream")], environ={}, for_run=True).source.trigger == "command"
    assert load_settings(cfg, environ={}, schema=CaptureSettings).source.trigger == "command"
    assert load_settings(cfg, environ={}).source.trigger == "command"     # bundle install reads only [model]
    res = CliRunner().invoke(main, ["bundle", "install", "--config", str(cfg), str(tmp_path / "none.tar")])
    assert res.exit_code == 2 and "invalid config" not in res.output, res.output          # read: its [model] is
    assert "has no [model] deploy_dir" in res.output, res.output                             # what it refuses


def test_mqtt_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    pytest.importorskip("paho.mqtt")
    monkeypatch.chdir("/")
    (tmp_path / "ca.pem").write_text("not checked here")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtts://broker"\nca_file = "ca.pem"\n'
                                     'outbox_path = "state/outbox.sqlite"\n')
    m = load_settings(cfg, environ={}).mqtt_settings()     # ca.pem beside the file: was "does not exist"
    assert m.ca_file == tmp_path / "ca.pem" and m.outbox_path == tmp_path / "state/outbox.sqlite"
    s = load_settings(cfg, [parse_set_option(f"mqtt.ca_file={tmp_path / 'ca.pem'}")], environ={})
    assert s.mqtt_settings().ca_file == tmp_path / "ca.pem"


def test_a_missing_tls_file_is_named_by_its_field_and_a_relative_one_says_where_it_was_looked_for(tmp_path,
                                                                                                    monkeypatch):
    """A relative ca_file that is not beside the config (an older edge-ad read it from the working directory) was
    'mqtt.(settings): Value error, ca_file '...' does not exist': no field named, nothing said about where a
    relative path is read from. The field is named, and the message says so; so are cert_file and key_file, also
    for a certificate without its key. A path from --set is the working directory's: no such note."""
    pytest.importorskip("paho.mqtt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "ca.pem").write_text("beside the working directory, where an older edge-ad looked")
    cfg = _write(tmp_path / "etc", MINIMAL + '\n[mqtt]\nurl = "mqtts://broker"\nca_file = "ca.pem"\n')
    etc = tmp_path / "etc"
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={})
    assert str(ei.value) == (
        f"{cfg}: invalid config: mqtt.ca_file = '{etc / 'ca.pem'}': does not exist or is not a file (ca_file = "
        f"'ca.pem' in {cfg}: a relative path in the config file is read from the file's folder, {etc}, not from the "
        f"working directory) [from {cfg}]")
    with pytest.raises(InputError) as ei:
        load_settings(cfg, [parse_set_option("mqtt.ca_file=nope.pem")], environ={})
    assert str(ei.value) == (f"{cfg}: invalid config: mqtt.ca_file = 'nope.pem': does not exist or is not a file "
                             "[from --set mqtt.ca_file]")

    cfg.write_text(MINIMAL + '\n[mqtt]\nurl = "mqtts://broker"\ncert_file = "c.pem"\nkey_file = "k.pem"\n')
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={})
    assert str(ei.value).startswith(
        f"{cfg}: invalid config: mqtt.cert_file = '{etc / 'c.pem'}': does not exist or is not a file; mqtt.key_file = "
        f"'{etc / 'k.pem'}': does not exist or is not a file (cert_file = 'c.pem', key_file = 'k.pem' in {cfg}: a "
        "relative path in the config file is read from the file's folder"), str(ei.value)
    (etc / "c.pem").write_text("a certificate")
    for table, message in (('cert_file = "c.pem"', "mqtt.key_file: not set, but cert_file is: a client certificate "
                                                   "needs its key"),
                           ('key_file = "c.pem"', f"mqtt.key_file = '{etc / 'c.pem'}': set, but cert_file is not: a "
                                                  "client key needs its certificate")):
        cfg.write_text(MINIMAL + f'\n[mqtt]\nurl = "mqtts://broker"\n{table}\n')
        with pytest.raises(InputError) as ei:
            load_settings(cfg, environ={})
        assert str(ei.value) == f"{cfg}: invalid config: {message} [from {cfg}]"


def test_text_fields_keep_their_text_from_env_and_flags(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\n')
    env = {"EDGE_AD_MQTT__DEVICE": "42", "EDGE_AD_MQTT__SITE": "2024", "EDGE_AD_MQTT__PASSWORD": "123#456"}
    m = load_settings(cfg, environ=env).mqtt_settings()   # each was refused ("a valid string") or cut at '#'
    assert (m.device, m.site, m.password.get_secret_value()) == ("42", "2024", "123#456")
    assert parse_set_option("mqtt.password=123456")[1] == "123456"
    assert parse_set_option("pipeline.max_batch=8")[1] == 8            # numbers stay numbers elsewhere
    assert parse_set_option("source.roi=[0, 0, 8, 8]")[1] == [0, 0, 8, 8]


def test_an_empty_mqtt_user_name_or_password_is_not_set(tmp_path, monkeypatch):
    """username = "" / password = "" (file, environment or --set) is no value, as for other optional fields: the
    URL's or $EDGE_AD_MQTT_USERNAME's applies, else no login; an empty name was sent to the broker."""
    pytest.importorskip("paho.mqtt")
    monkeypatch.delenv("EDGE_AD_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("EDGE_AD_MQTT_PASSWORD", raising=False)
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\nusername = ""\npassword = ""\n')
    m = load_settings(cfg, environ={}).mqtt_settings()
    assert (m.username, m.password, m.credentials()) == (None, None, (None, None))
    assert load_settings(cfg, environ={}).redacted()["mqtt"]["password"] is None
    cfg2 = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\nusername = "u"\npassword = "p"\n', "2.toml")
    m = load_settings(cfg2, environ={"EDGE_AD_MQTT__USERNAME": "", "EDGE_AD_MQTT__PASSWORD": ""}).mqtt_settings()
    assert m.credentials() == (None, None)
    monkeypatch.setenv("EDGE_AD_MQTT_USERNAME", "svc")
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "svc-pw")
    assert load_settings(cfg, environ={}).mqtt_settings().credentials() == ("svc", "svc-pw")
    m = load_settings(cfg, [parse_set_option("mqtt.url=mqtt://alice:pw@broker")], environ={}).mqtt_settings()
    assert m.credentials() == ("alice", "pw")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_threshold_that_is_not_finite_is_refused_and_a_negative_one_taken(tmp_path, value):
    # a NaN threshold would decide every part NG (no score is <= NaN) with no defect region; negative
    # thresholds are legitimate (normalized scores are below 0 under a map's 0.9 quantile)
    cfg = _write(tmp_path, MINIMAL + f"\n[decision]\nthreshold = {value}\n")
    with pytest.raises(InputError, match=r"decision\.threshold: Input should be a finite number"):
        load_settings(cfg, environ={})
    with pytest.raises(InputError, match=r"decision\.threshold.*EDGE_AD_DECISION__THRESHOLD"):
        load_settings(_write(tmp_path, MINIMAL, "m.toml"), environ={"EDGE_AD_DECISION__THRESHOLD": value})
    assert load_settings(_write(tmp_path, MINIMAL + "\n[decision]\nthreshold = -0.05\n", "n.toml"),
                         environ={}).decision.threshold == -0.05


@pytest.mark.parametrize("field", ["pipeline.drain_timeout_s", "calibration.timeout_s", "source.watchdog_s"])
def test_infinite_timeouts_are_refused(tmp_path, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.") + ".*less than or equal"):
        load_settings(_write(tmp_path, MINIMAL), [parse_set_option(f"{field}=inf")], environ={})


def test_cli_invalid_config_exits_2_before_opening_the_camera(tmp_path):
    # the camera device does not exist: had the loop tried to open it, the error would be about it
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "v4l2:///dev/video-does-not-exist")
                 + "\n[pipeline]\nmax_batch = -1\n")
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "pipeline.max_batch" in r.stderr and "video-does-not-exist" not in r.stderr


def test_cli_run_without_a_config_says_what_to_give(tmp_path, monkeypatch):
    """'edge-ad run --max-frames 1' with no config said only 'invalid config: model: Field required [from
    defaults]; source: Field required [from defaults]'. With nothing giving a required field, it now says what
    to give: --config FILE, $EDGE_AD_CONFIG, or --bundle with --source; a config file that lacks them is named
    as before, and an error that is not a missing field gets no such advice."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    for k in [k for k in os.environ if k.startswith("EDGE_AD_")]:
        monkeypatch.delenv(k)
    hint = ("no config file was given: name one with --config FILE or $EDGE_AD_CONFIG (examples/edge-ad.toml is a "
            "documented example), or give the model and the source as flags: --bundle DIR --source URI")
    monkeypatch.chdir(tmp_path)
    for argv, first in ((["--max-frames", "1"], "model: Field required [from defaults]; source: Field required"),
                        (["--source", "synthetic://disc"], "model: Field required [from defaults]"),
                        (["--bundle", "b"], "source: Field required [from defaults]")):
        res = CliRunner().invoke(main, ["run", *argv])
        assert res.exit_code == 2 and res.output.startswith(f"error: invalid config: {first}"), res.output
        assert res.output.rstrip().endswith(hint), res.output
    res = CliRunner().invoke(main, ["run", "--bundle", "b", "--source", "synthetic://disc", "--precision", "int4"])
    assert res.exit_code == 2 and "model.precision" in res.output and "no config file" not in res.output
    cfg = _write(tmp_path, "[output]\njsonl = \"\"\n")
    res = CliRunner().invoke(main, ["run", "--config", str(cfg)])
    assert res.exit_code == 2 and f"model: Field required [from {cfg}]" in res.output, res.output
    assert "no config file" not in res.output


def test_an_empty_command_secret_stops_run_at_start_naming_where_it_came_from(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "synthetic://")
                 + '\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\ncommand_secret = ""\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AD_")}
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert "mqtt.command_secret" in r.stderr and "empty" in r.stderr and f"[from {cfg}]" in r.stderr
    cfg.write_text(cfg.read_text().replace('command_secret = ""\n', ""))   # then from the service's env file
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                       env={**env, "EDGE_AD_MQTT_COMMAND_SECRET": ""})
    assert r.returncode == 2, r.stderr
    assert "$EDGE_AD_MQTT_COMMAND_SECRET is set but empty" in r.stderr
    assert "[from environment variable EDGE_AD_MQTT_COMMAND_SECRET" in r.stderr


def test_an_empty_command_secret_override_is_refused_naming_only_where_it_came_from(tmp_path, monkeypatch):
    """docs/runtime.md: an empty override unsets an optional field, except command_secret (refused: signing
    would go off without a word). The message said '[from --set mqtt.command_secret or cfg.toml]', and
    '[from environment variable EDGE_AD_MQTT_COMMAND_SECRET or cfg.toml]' with no secret in cfg.toml."""
    pytest.importorskip("paho.mqtt")
    from edge_ad.mqtt.settings import ENV_COMMAND_SECRET

    monkeypatch.delenv(ENV_COMMAND_SECRET, raising=False)
    mqtt = '\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\n'
    signed = _write(tmp_path, MINIMAL + mqtt + 'command_secret = "0123456789abcdef0123"\n', "signed.toml")
    plain = _write(tmp_path, MINIMAL + mqtt, "plain.toml")
    cases = [
        (signed, [parse_set_option("mqtt.command_secret=")], {}, "--set mqtt.command_secret"),
        (signed, [], {"EDGE_AD_MQTT__COMMAND_SECRET": ""}, "environment variable EDGE_AD_MQTT__COMMAND_SECRET"),
        (plain, [parse_set_option("mqtt.command_secret= ")], {}, "--set mqtt.command_secret"),
    ]
    for cfg, overrides, environ, origin in cases:
        with pytest.raises(InputError) as ei:
            load_settings(cfg, overrides, environ=environ)
        msg = str(ei.value)
        assert "mqtt.command_secret" in msg and "an empty override does not unset" in msg, msg
        assert msg.endswith(f"[from {origin}]"), msg
    monkeypatch.setenv(ENV_COMMAND_SECRET, "")
    with pytest.raises(InputError) as ei:
        load_settings(plain, environ={})
    assert str(ei.value).endswith(f"[from environment variable {ENV_COMMAND_SECRET}]"), str(ei.value)
    assert load_settings(signed, environ={}).mqtt_settings().command_secret is not None   # the field wins
    monkeypatch.delenv(ENV_COMMAND_SECRET)
    with pytest.raises(InputError) as ei:     # the file's own empty secret: the file, as before
        load_settings(_write(tmp_path, MINIMAL + mqtt + 'command_secret = ""\n', "empty.toml"), environ={})
    assert str(ei.value).endswith(f"[from {tmp_path / 'empty.toml'}]"), str(ei.value)
    with pytest.raises(InputError) as ei:     # a bound the file gives against an override: both named
        load_settings(_write(tmp_path, MINIMAL + mqtt + "outbox_max_bytes = 100000\n", "bound.toml"),
                      [parse_set_option("mqtt.image_max_bytes=500000")], environ={})
    assert str(ei.value).endswith(f"[from --set mqtt.image_max_bytes or {tmp_path / 'bound.toml'}]"), str(ei.value)


def test_cli_print_config_applies_flags(tmp_path):
    cfg = _write(tmp_path, MINIMAL)
    r = subprocess.run([*EDGE_AD, "run", "--config", str(cfg), "--print-config",
                        "--mode", "trigger", "--set", "pipeline.max_batch=3", "--source", "synthetic://disc?size=64",
                        "--set", "health.min_frames=7"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["source"]["mode"] == "trigger" and d["pipeline"]["max_batch"] == 3
    assert d["health"]["min_frames"] == 7 and d["health"]["enabled"] is True and d["health"]["window_s"] == 120
    assert d["source"]["uri"] == "synthetic://disc?size=64"
    assert d["mqtt"] == {"enabled": False}   # no [mqtt] section: MQTT off, as with enabled = false (was null)


def test_mqtt_protocol_5_as_a_number_from_file_env_and_flag(tmp_path):
    pytest.importorskip("paho.mqtt")
    from edge_ad.mqtt.settings import Protocol

    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\nprotocol = 5\n')
    assert load_settings(cfg, environ={}).mqtt_settings().protocol is Protocol.V5   # was "Input should be '5'"
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\n', "plain.toml")
    assert load_settings(cfg, environ={"EDGE_AD_MQTT__PROTOCOL": "5"}).mqtt_settings().protocol is Protocol.V5
    s = load_settings(cfg, [parse_set_option("mqtt.protocol=3.1.1")], environ={})
    assert s.mqtt_settings().protocol is Protocol.V311
    with pytest.raises(InputError, match=r"mqtt\.protocol = 4.*'5' or '3\.1\.1'.*--set mqtt\.protocol"):
        load_settings(cfg, [parse_set_option("mqtt.protocol=4")], environ={})


def test_an_empty_override_unsets_an_optional_field_the_file_gives(tmp_path):
    cfg = _write(tmp_path, MINIMAL.replace('uri = "file://clip.avi"', 'uri = "file://clip.avi"\nroi = [0, 0, 8, 8]')
                 .replace('bundle = "bundles/part"', 'bundle = "b"\nthread_spinning = false')
                 + "\n[decision]\nthreshold = 0.5\n")
    s = load_settings(cfg, environ={})
    assert (s.decision.threshold, s.model.thread_spinning, s.source.roi) == (0.5, False, [0, 0, 8, 8])
    # each was "Input should be a valid number / boolean / list (got '')"
    s = load_settings(cfg, [parse_set_option("decision.threshold="), parse_set_option("model.thread_spinning="),
                            parse_set_option("source.roi=")], environ={})
    assert (s.decision.threshold, s.model.thread_spinning, s.source.roi) == (None, None, None)
    assert load_settings(cfg, environ={"EDGE_AD_DECISION__THRESHOLD": ""}).decision.threshold is None


def test_an_empty_override_unsets_an_optional_mqtt_field(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://broker"\noutbox_path = "ob.sqlite"\nclient_id = "c1"\n'
                                     'command_clients = ["ops"]\n')
    m = load_settings(cfg, [parse_set_option(f"mqtt.{k}=") for k in ("outbox_path", "client_id", "command_clients",
                                                                       "ca_file")], environ={}).mqtt_settings()
    assert (m.outbox_path, m.client_id, m.command_clients, m.ca_file) == (None, None, None, None)
    assert m.effective_outbox_path.name == "outbox-site-dev.sqlite"      # not the folder '.'


def test_an_mqtt_override_over_enabled_false_is_an_error_not_dropped(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nenabled = false\nurl = "mqtt://127.0.0.1:1"\n')
    assert load_settings(cfg, environ={}).mqtt_settings() is None
    url = (["mqtt", "url"], "mqtt://broker:1884", "--mqtt-url")
    with pytest.raises(InputError) as ei:          # the run went on without MQTT, saying nothing
        load_settings(cfg, [url], environ={})
    assert "mqtt.url [from --mqtt-url] given but mqtt.enabled = false [from " + str(cfg) in str(ei.value)
    with pytest.raises(InputError, match="EDGE_AD_MQTT__URL.*mqtt.enabled = false"):
        load_settings(cfg, environ={"EDGE_AD_MQTT__URL": "mqtt://broker"})
    m = load_settings(cfg, [url, parse_set_option("mqtt.enabled=true")], environ={}).mqtt_settings()
    assert m.port == 1884
    # a later enabled = false wins over what came before it; no [mqtt] section: the flag turns MQTT on
    assert load_settings(cfg, [parse_set_option("mqtt.enabled=false")],
                         environ={"EDGE_AD_MQTT__URL": "mqtt://broker"}).mqtt_settings() is None
    assert load_settings(_write(tmp_path, MINIMAL, "plain.toml"), [url], environ={}).mqtt_settings().port == 1884


def test_redacted_shows_the_mqtt_settings_the_run_uses(tmp_path, monkeypatch):
    pytest.importorskip("paho.mqtt")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", "hunter2")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://u:pw@broker"\nkeepalive_s = "45"\nsite = "p1"\n'
                                     'command_secret = "s3cret"\nkey_file = "k.pem"\ncert_file = "c.pem"\n')
    (tmp_path / "k.pem").write_text("x")
    (tmp_path / "c.pem").write_text("x")
    m = load_settings(cfg, environ={}).redacted()["mqtt"]   # was the table as typed: {'keepalive_s': '45', ...}
    assert m["enabled"] is True and m["keepalive_s"] == 45 and m["protocol"] == "5"
    assert m["client_id"] == "edge-ad-p1-dev"
    assert m["outbox_path"] == str(tmp_path / "state/edge-ad/outbox-p1-dev.sqlite")
    assert m["key_file"] == str(tmp_path / "k.pem")                        # a path, not a secret
    assert (m["url"], m["command_secret"]) == ("mqtt://***@broker", "***")
    text = json.dumps(m)
    assert "hunter2" not in text and "s3cret" not in text and "pw" not in text
    off = load_settings(cfg, [parse_set_option("mqtt.enabled=false")], environ={}).redacted()
    assert off["mqtt"] == {"enabled": False}


def test_a_refused_camera_uri_or_secret_never_shows_its_credentials(tmp_path):
    """The error of a config that does not validate lands in the journal: the '(got ...)' part shows the URI
    masked as the rest of the message does, and a secret field's value not at all."""
    cfg = _write(tmp_path, MINIMAL.replace("file://clip.avi", "rtsp://admin:Hunter2@10.0.0.5:5544O/ch1"))
    with pytest.raises(InputError) as ei:
        load_settings(cfg, environ={})
    assert "Hunter2" not in str(ei.value) and "(got 'rtsp://***@10.0.0.5:5544O/ch1')" in str(ei.value)
    from edge_ad.config import _shown_input

    assert _shown_input("mqtt.password", ["hunter2"]) == "***" and _shown_input("model.threads", 0) == "0"


def test_an_mqtt_cross_field_error_names_only_the_origins_of_its_fields(tmp_path):
    pytest.importorskip("paho.mqtt")
    cfg = _write(tmp_path, MINIMAL + '\n[mqtt]\nurl = "mqtt://127.0.0.1:1884"\noutbox_max_bytes = 60000\n')
    env = {"EDGE_AD_MQTT__SITE": "x", "EDGE_AD_MQTT__PASSWORD": "hunter2"}
    with pytest.raises(InputError) as ei:   # the conflict is in the file: no override is blamed for it
        load_settings(cfg, [parse_set_option("mqtt.keepalive_s=20")], environ=env)
    msg = str(ei.value)
    assert "image_max_bytes 2097152 > outbox_max_bytes 60000" in msg and msg.endswith(f"[from {cfg}]")
    assert "EDGE_AD_MQTT__SITE" not in msg and "PASSWORD" not in msg and "keepalive" not in msg
    with pytest.raises(InputError) as ei:   # an override of a field in the check is named
        load_settings(cfg, [parse_set_option("mqtt.image_max_bytes=70000")], environ=env)
    assert str(ei.value).endswith(f"[from --set mqtt.image_max_bytes or {cfg}]")


def test_every_env_file_option_is_the_shared_one():
    """capture, calibrate, bundle install and doctor each declared their own --env-file with its own help
    (three said 'With --config', doctor's 'checked'); they now use one option, edge_ad.cli.types.env_file_option."""
    import click

    from edge_ad.cli import main
    from edge_ad.cli.types import env_file_option

    want = env_file_option(click.Command("x")).params[0]
    commands = {"capture": main.commands["capture"], "calibrate": main.commands["calibrate"],
                "doctor": main.commands["doctor"], "bundle install": main.commands["bundle"].commands["install"]}
    for name, cmd in commands.items():
        (opt,) = [p for p in cmd.params if p.name == "env_file"]
        assert opt.opts == ["--env-file"] and opt.help == want.help, name
        assert opt.type.exists and not opt.type.dir_okay and opt.type.type is Path, name
    assert "Only doctor takes it without --config" in want.help


@pytest.mark.parametrize("args", [
    ["capture", "--out", "{tmp}/cap", "--frames", "1"],                             # no --source either
    ["calibrate", "--bundle", "{tmp}/no-bundle"],
    ["bundle", "install", "{tmp}/no.tar", "--deploy", "{tmp}/no-deploy"],
    ["bundle", "status", "--deploy", "{tmp}/no-deploy"],
    ["bundle", "rollback", "--deploy", "{tmp}/no-deploy"],
], ids=["capture", "calibrate", "bundle install", "bundle status", "bundle rollback"])
def test_env_file_without_config_is_refused_first(tmp_path, args):
    """--env-file without --config is refused (exit 2) before any other check, by every command but doctor: the
    check was written in capture, calibrate and bundle status / rollback and edge_ad.config.service_environ; it is
    made once now, in service_environ, which each calls first (bundle install directly, the others through
    edge_ad.cli.calibrate.line_config)."""
    from click.testing import CliRunner

    from edge_ad.cli import main

    env = tmp_path / "edge-ad.env"
    env.write_text("EDGE_AD_MODEL__PRECISION=fp32\n")
    res = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args] + ["--env-file", str(env)])
    assert res.exit_code == 2, res.output
    assert res.output == "error: --env-file needs --config (it changes the config's values)\n", res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge-ad.env"]            # nothing made


def _documented(md: Path) -> dict[str, set[str]]:
    """{heading: the names in the first column of its tables} of a Markdown file (a cell may name several:
    `a`, `b`)."""
    import re

    out: dict[str, set[str]] = {}
    head = None
    for line in md.read_text("utf-8").splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            head = m.group(1)
        elif line.startswith("| `") and head is not None:
            out.setdefault(head, set()).update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return out


def _fields(model, prefix: str = "") -> set[str]:
    """The settings of a config section (a nested section's as ``section.field``)."""
    out = set()
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        if hasattr(f.annotation, "model_fields"):
            out |= _fields(f.annotation, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_every_setting_is_in_the_documented_tables():
    """'mqtt.connect_timeout_s' was in 'run --print-config' but not in docs/mqtt.md's table. Every field of every
    config section is in its table (docs/runtime.md, docs/mqtt.md for [mqtt]), and the tables name no field
    that does not exist."""
    from edge_ad.config import Settings
    from edge_ad.mqtt.settings import MqttSettings

    docs = Path(__file__).resolve().parents[1] / "docs"
    runtime, mqtt = _documented(docs / "runtime.md"), _documented(docs / "mqtt.md")
    for section, f in Settings.model_fields.items():
        if section in ("mqtt", "config_dir"):
            continue
        [table] = [k for k in runtime if f"`[{section}]`" in k]   # a shared table names them section.field
        shared = " and " in table
        documented = {d.split(".", 1)[1] for d in runtime[table] if d.startswith(f"{section}.")} if shared \
            else runtime[table]
        assert _fields(f.annotation) == documented, (section, _fields(f.annotation) ^ documented)
    documented = mqtt["Settings (`[mqtt]` in the config file)"]
    assert {"enabled", *MqttSettings.model_fields} == documented, {"enabled", *MqttSettings.model_fields} ^ documented


def test_drift_clear_after_is_validated_and_reaches_the_monitor(tmp_path):
    from edge_ad.runtime.service import _drift_factory
    from edge_ad.scoring import Calibration, MapNorm

    cfg = _write(tmp_path, MINIMAL + "\n[drift]\nclear_after = 20\n")
    s = load_settings(cfg, environ={})
    cal = Calibration(maps={"map": MapNorm(0.0, 1.0)}, threshold=1.0, normal={"mean": 0.1, "std": 0.02, "n": 50.0})
    assert s.drift.clear_after == 20 and _drift_factory(s)(cal).clear_after == 20
    assert load_settings(_write(tmp_path, MINIMAL, "default.toml"), environ={}).drift.clear_after == 50
    for origin, kw in (("EDGE_AD_DRIFT__CLEAR_AFTER", {"environ": {"EDGE_AD_DRIFT__CLEAR_AFTER": "0"}}),
                       ("--set drift.clear_after", {"overrides": [parse_set_option("drift.clear_after=-5")],
                                                    "environ": {}})):
        with pytest.raises(InputError) as ei:
            load_settings(cfg, **kw)
        assert "drift.clear_after" in str(ei.value) and "greater than or equal to 1" in str(ei.value)
        assert origin in str(ei.value)


def test_config_dir_is_set_by_the_loader_and_refused_from_the_file(tmp_path):
    # an internal value (the folder relative paths are resolved against): a file's config_dir was accepted
    # without a word and then overwritten
    cfg = _write(tmp_path, 'config_dir = "/somewhere/else"\n' + MINIMAL)
    with pytest.raises(InputError, match=r"config_dir: unknown field .*\[from .*edge-ad\.toml\]"):
        load_settings(cfg, environ={})
    good = _write(tmp_path, MINIMAL, "good.toml")
    with pytest.raises(InputError, match=r"config_dir: unknown field .*\[from --set config_dir\.x\]"):
        load_settings(good, [parse_set_option("config_dir.x=1")], environ={})
    with pytest.raises(InputError, match="EDGE_AD_CONFIG_DIR__X: 'config_dir' is not a config section"):
        load_settings(good, environ={"EDGE_AD_CONFIG_DIR__X": "1"})
    s = load_settings(good, environ={})
    assert s.config_dir == tmp_path and s.model.bundle == tmp_path / "bundles/part"
    assert s.model_copy().config_dir == tmp_path and "config_dir" not in s.redacted()
    assert load_settings(None, [parse_set_option("model.bundle=b"), parse_set_option("source.uri=synthetic://disc")],
                         environ={}).config_dir is None
