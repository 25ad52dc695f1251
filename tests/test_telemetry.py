"""Telemetry: tegrastats lines recorded on JetPack 4-7 devices, the tegrastats reader, latency percentiles,
process figures, and the telemetry payload against the MQTT schema."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import time

import numpy as np
import pytest

from edge_ad.runtime.systemd import Notifier
from edge_ad.runtime.tegrastats import TegrastatsReader, parse_line
from edge_ad.runtime.telemetry import LatencyWindow, NvmlReader, ProcessStats, percentiles

# Lines as printed by tegrastats on real devices (public bug reports and parser test suites).
# JetPack 5.1 (L4T R35), Jetson AGX Orin: upper-case sensors, -256C for sensors that are off.
JP5_AGX_ORIN = (
    "04-24-2023 00:01:24 RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 GR3D2_FREQ 0%@0 VIC_FREQ 729 APE 174 CV0@-256C CPU@42.593C Tboard@32C "
    "SOC2@39.343C Tdiode@33.25C SOC0@39.375C CV1@-256C GPU@-256C tj@42.593C SOC1@40.468C CV2@-256C "
    "VDD_GPU_SOC 2399mW/2399mW VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 4032mW/4032mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")
# JetPack 5 (L4T R35), Jetson AGX Orin under load: GR3D frequency in brackets.
JP5_AGX_ORIN_LOAD = (
    "11-29-2025 10:14:02 RAM 6421/30536MB (lfb 3x4MB) SWAP 0/15268MB (cached 0MB) "
    "CPU [24%@2201,18%@2201,12%@2201,9%@2201,7%@2201,6%@2201,5%@2201,4%@2201,3%@2201,2%@2201,1%@2201,0%@2201] "
    "EMC_FREQ 31%@3199 GR3D_FREQ 78%@[1300] NVDEC off NVJPG off NVJPG1 off VIC off OFA off APE 174 "
    "CV0@-256C CPU@57.593C SOC2@54.906C SOC0@53.625C CV1@-256C GPU@56.125C tj@57.593C SOC1@54.281C CV2@-256C "
    "VDD_GPU_SOC 9431mW/8102mW VDD_CPU_CV 3122mW/2874mW VIN_SYS_5V0 4835mW/4610mW NC 0mW/0mW")
# JetPack 6.2 (L4T R36.4), Jetson AGX Orin: lower-case sensors, per-GPC clocks.
JP6_AGX_ORIN = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
    "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,6%@1036,10%@1036] "
    "EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off NVJPG off NVJPG1 off VIC 36%@115 OFA off "
    "NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C "
    "VDD_GPU_SOC 2412mW/2412mW VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW")
# JetPack 6 (L4T R36), Jetson Orin Nano: two cores off, a bare GR3D load, the VDD_IN input rail.
JP6_ORIN_NANO = (
    "12-23-2024 22:54:11 RAM 3162/7620MB (lfb 4x2MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,off,off] GR3D_FREQ 1% cpu@62.843C soc2@61.968C soc0@60.625C "
    "gpu@61.687C tj@62.843C soc1@61.687C VDD_IN 3913mW/3922mW VDD_CPU_GPU_CV 598mW/598mW VDD_SOC 1238mW/1237mW")
# JetPack 7.0 (L4T R38.4), Jetson AGX Thor: GPC clocks without a load figure, Thor's rails.
JP7_THOR = (
    "05-17-2026 10:00:32 RAM 4208/125773MB (lfb 31x4MB) SWAP 0/2048MB (cached 0MB) "
    "CPU [1%@972,0%@972,0%@972,0%@972,1%@972,0%@972,1%@972,1%@972,0%@972,0%@972,3%@972,0%@972,0%@972,1%@972] "
    "EMC_FREQ 0%@665 GR3D_FREQ @[0,0,0] NVENC0_FREQ @0 NVENC1_FREQ @0 NVDEC0_FREQ @0 NVDEC1_FREQ @0 "
    "NVJPG0_FREQ @0 VIC off OFA_FREQ @0 PVA0_FREQ off APE 300 cpu@34.468C tj@34.5C soc012@33.781C "
    "soc345@34.5C VDD_GPU 0mW/0mW VDD_CPU_SOC_MSS 4165mW/4165mW VIN_SYS_5V0 4126mW/4126mW")
# JetPack 7.2 (L4T R39.2), Jetson AGX Thor: current/maximum temperatures, current/average/maximum power.
JP7_THOR_R39 = (
    "07-23-2026 15:29:26 RAM 9101/125811MB (lfb 19x4MB) SWAP 0/2048MB (cached 0MB) "
    "CPU [39%@2160,20%@2160,16%@1944,15%@1944,17%@972,15%@972,19%@2214,22%@2214,13%@2430,20%@2430,26%@972,"
    "19%@972,15%@1836,22%@1836] EMC_FREQ 7%@3200 GR3D_FREQ @[314,314,314] NVENC0_FREQ @1556 NVENC1_FREQ @1556 "
    "NVDEC0_FREQ @1556 NVDEC1_FREQ @1556 NVJPG0_FREQ @1556 VIC 59%@423 OFA_FREQ @1556 PVA0_FREQ off APE 300 "
    "cpu@34.843C/34.843C tj@35.906C/35.906C soc012@34.437C/34.437C gpu@35.906C/35.906C soc345@34.406C/34.406C "
    "VDD_GPU 4925mW/4925mW/4925mW VDD_CPU_SOC_MSS 8710mW/8710mW/8710mW VIN_SYS_5V0 6767mW/6767mW/6767mW")
# A Thor line that also carries the VIN input rail.
JP7_THOR_VIN = (
    "01-20-2026 22:46:22 RAM 17842/125772MB (lfb 79x4MB) CPU [0%@972,0%@972,0%@1566,0%@1566,0%@972,0%@972,"
    "0%@972,0%@972,0%@972,0%@972,1%@972,0%@972,0%@972,0%@972] cpu@30.468C tj@31.218C soc012@30.218C "
    "soc345@31.218C VDD_GPU 0mW/0mW VDD_CPU_SOC_MSS 5535mW/5535mW VIN_SYS_5V0 5040mW/5040mW VIN 16802mW/16802mW")
# JetPack 4 (L4T R32), Jetson Nano: rails without units.
JP4_NANO = (
    "RAM 1180/3965MB (lfb 1x2MB) SWAP 149/1024MB (cached 7MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [30%@1036,33%@1036,28%@1036,26%@1036] EMC_FREQ 10%@1600 GR3D_FREQ 0%@76 NVENC 716 NVDEC 716 APE 25 "
    "PLL@57C CPU@60.5C PMIC@100C GPU@59C AO@65C thermal@59.75C POM_5V_IN 4520/4680 POM_5V_GPU 0/0 POM_5V_CPU 1078/1205")


def test_jetpack5_orin():
    d = parse_line(JP5_AGX_ORIN)
    assert d["time"] == "04-24-2023 00:01:24"
    assert (d["ram_used_mb"], d["ram_total_mb"], d["swap_total_mb"]) == (1282, 62795, 31398)
    assert len(d["cpu_load"]) == 12 and d["cpu_load_avg"] == 0.0 and d["cpu_freq_mhz"] == 729
    assert d["gpu_load"] == 0.0 and d["emc_freq_mhz"] == 2133
    # -256C sensors are off and left out; names are lower-cased across versions
    assert d["temps_c"] == {"cpu": 42.593, "tboard": 32.0, "soc2": 39.343, "tdiode": 33.25, "soc0": 39.375,
                            "tj": 42.593, "soc1": 40.468}
    assert "gpu" not in d["temps_c"] and d["temp_max_c"] == 42.593
    assert d["power_mw"] == {"VDD_GPU_SOC": 2399, "VDD_CPU_CV": 400, "VIN_SYS_5V0": 4032, "VDDQ_VDD2_1V8AO": 301}
    assert d["power_total_mw"] == 2399 + 400 + 4032      # VDDQ_VDD2_1V8AO is inside VIN_SYS_5V0
    d = parse_line(JP5_AGX_ORIN_LOAD)
    assert d["gpu_load"] == 78.0 and d["gpu_freq_mhz"] == 1300 and d["temps_c"]["gpu"] == 56.125
    assert d["power_mw"]["VDD_GPU_SOC"] == 9431 and d["power_avg_mw"]["VDD_GPU_SOC"] == 8102
    assert d["cpu_load_avg"] == pytest.approx(np.mean([24, 18, 12, 9, 7, 6, 5, 4, 3, 2, 1, 0]), abs=0.01)


def test_jetpack6_orin_and_nano():
    d = parse_line(JP6_AGX_ORIN)
    assert d["gpu_load"] == 0.0 and d["gpu_freq_mhz"] == 0 and d["emc_load"] == 3.0
    assert d["temps_c"]["tj"] == 52.562 and d["power_total_mw"] == 2412 + 1607 + 4707
    d = parse_line(JP6_ORIN_NANO)
    assert d["cpu_load"] == [1.0, 0.0, 0.0, 0.0, None, None] and d["cpu_load_avg"] == 0.25
    assert d["gpu_load"] == 1.0 and "gpu_freq_mhz" not in d
    assert d["temps_c"]["gpu"] == 61.687 and d["power_total_mw"] == 3913     # VDD_IN is the module input


def test_jetpack7_thor():
    d = parse_line(JP7_THOR)
    assert "gpu_load" not in d and d["gpu_freq_mhz"] == 0        # Thor prints GPC clocks only
    assert d["temps_c"] == {"cpu": 34.468, "tj": 34.5, "soc012": 33.781, "soc345": 34.5}
    assert d["power_mw"] == {"VDD_GPU": 0, "VDD_CPU_SOC_MSS": 4165, "VIN_SYS_5V0": 4126}
    assert len(d["cpu_load"]) == 14
    d = parse_line(JP7_THOR_R39)
    assert d["gpu_freq_mhz"] == 314 and d["temps_c"]["gpu"] == 35.906      # current of "current/max"
    assert d["power_mw"]["VDD_CPU_SOC_MSS"] == 8710 and d["power_total_mw"] == 4925 + 8710 + 6767
    d = parse_line(JP7_THOR_VIN)
    assert d["power_total_mw"] == 16802 and d["power_mw"]["VIN"] == 16802


def test_jetpack4_rails_without_units_and_placeholder_pmic():
    d = parse_line(JP4_NANO)
    assert d["power_mw"] == {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}
    assert d["power_total_mw"] == 4520 and d["gpu_freq_mhz"] == 76
    assert d["temps_c"]["pmic"] == 100.0 and d["temp_max_c"] == 65.0    # PMIC@100C is a placeholder


@pytest.mark.parametrize("line", ["", "garbage", "RAM x/yMB CPU [a,b]", "GR3D_FREQ", "tj@C VDD_IN mW/mW",
                                  JP6_ORIN_NANO[:57], JP7_THOR_R39[::2]])
def test_tolerant_of_unknown_or_broken_lines(line):
    assert isinstance(parse_line(line), dict)


def test_reader_runs_tegrastats_and_keeps_the_newest_line(tmp_path):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\n"
                    f"echo '{JP6_ORIN_NANO}'\n"
                    "echo 'not a tegrastats line'\n"
                    f"while true; do echo '{JP7_THOR_R39}'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = TegrastatsReader(binary=str(fake), interval_ms=50)
    assert r.available and r.start()
    deadline = time.monotonic() + 10
    while r.lines < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    latest = r.latest()
    r.stop()
    assert latest["power_mw"]["VDD_GPU"] == 4925 and r.lines >= 3
    from edge_ad.runtime.tegrastats import find_binary

    if find_binary() is None:        # not a Jetson: nothing to start, and no error
        assert not TegrastatsReader().available and TegrastatsReader().start() is False


def test_a_dead_tegrastats_is_restarted_and_its_last_reading_not_sent_as_current(tmp_path):
    from edge_ad.runtime.telemetry import Telemetry

    fake = tmp_path / "tegrastats"
    count = tmp_path / "starts"
    fake.write_text(f"#!/bin/sh\necho x >> '{count}'\necho '{JP6_ORIN_NANO}'\nexit 1\n")   # one line, then dies
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    tel = Telemetry(tegrastats=True, nvml=False, interval_s=1.0)
    tel.tegra.binary = str(fake)
    tel.start()
    deadline = time.monotonic() + 10
    while (tel.tegra.exits < 1 or tel.tegra.lines < 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tel.tegra.exits == 1 and not tel.tegra.alive
    assert "jetson" in tel.host()                        # fresh enough; the dead reader is started again
    deadline = time.monotonic() + 10
    while count.read_text().count("x") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count.read_text().count("x") == 2
    tel.host()                                            # still dead, but at most one restart a minute
    time.sleep(0.3)
    assert count.read_text().count("x") == 2
    tel._tegra_max_age = 0.0                              # a reading older than the limit is stale
    time.sleep(0.05)
    assert "jetson" not in tel.host() and tel.tegra.latest()
    tel.stop()


def test_latency_percentiles():
    w = LatencyWindow()
    w.add_many(range(1, 101))
    s = w.summary()
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01) and s["n"] == 100
    assert w.summary() is None          # the window starts anew after each summary
    assert percentiles([]) is None


def test_process_stats_and_nvml():
    p = ProcessStats()
    np.linalg.eigvals(np.random.default_rng(0).random((300, 300)))   # some CPU work
    d = p.read()
    assert d["rss_mb"] > 10 and d["threads"] >= 1 and d["cpu_percent"] >= 0
    nv = NvmlReader()
    assert isinstance(nv.read(), list)
    nv.close()


def test_notifier_never_blocks_on_a_reader_that_does_not_read(tmp_path):
    path = str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    t0 = time.monotonic()
    for _ in range(500):
        n.watchdog()
    assert time.monotonic() - t0 < 2
    assert sock.recv(100) == b"WATCHDOG=1"
    sock.close()
    assert 0 < len(n.sent) <= 64        # the record of sent messages is bounded (it grew for months)
    assert not Notifier({}).enabled and Notifier({}).ready() is False
    assert Notifier({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "5000000",
                     "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s == 0.0   # meant for another process


def test_telemetry_payload_matches_the_mqtt_schema(tmp_path):
    from edge_ad.config import load_settings
    from edge_ad.mqtt import schema
    from edge_ad.runtime.service import Service
    from fixtures_bundle import defect_video, make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    video, _ = defect_video(tmp_path / "v.avi", n=12, size=96)
    s = load_settings(None, [(["model", "bundle"], str(bundle.path), "t"), (["source", "uri"], f"file://{video}", "t"),
                             (["source", "mode"], "trigger", "t"), (["output", "jsonl"], "", "t"),
                             (["telemetry", "path"], str(tmp_path / "tel.jsonl"), "t"),
                             (["telemetry", "tegrastats"], False, "t")], environ={})
    svc = Service(s, install_signals=False)
    svc.run()
    payload = svc.last_telemetry
    body = {"schema_version": 1, "ts": "2026-01-01T00:00:00.000Z", "site": "s", "device": "d", **payload}
    assert schema.errors("telemetry", body) == []
    # telemetry.path without MQTT: the MQTT envelope without site and device (ts was a unix float)
    line = json.loads((tmp_path / "tel.jsonl").read_text().splitlines()[-1])
    assert line == {"schema_version": 1, "ts": line["ts"], **payload}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert payload["frames"] == 12 and payload["dropped"] == 0 and payload["memory_mb"] > 0
    assert set(payload["stages_ms"]) >= {"capture", "queue", "preprocess", "infer", "score", "report"}
    assert {"p50", "p95", "p99"} <= set(payload["latency_ms"])
    assert payload["drift"]["drift"] in (False, True)
    assert payload["output_errors"] == {"jsonl": 0, "outbox": 0, "snapshots": 0, "telemetry": 0}
    assert payload["discarded_at_stop"] == 0 and payload["unreported"] == 0


def test_each_telemetry_message_counts_a_decision_reported_while_it_is_built_in_its_totals_and_interval_alike(tmp_path):
    """frames, ok and ng are counts since the start, fps and ng_rate are over the interval: one message's interval
    is the difference of its counts and the previous message's. A decision reported while a message was built
    was in its ok (read a second time) but in the next message's interval, so ng_rate and the counts disagreed
    by a frame at the interval's edge (ok 1, ng 6, ng_rate 1.0; then ok 5, ng 8, ng_rate 2/7 for 2 of 6)."""
    from edge_ad.config import load_settings
    from edge_ad.runtime.service import Service
    from fixtures_bundle import defect_video, make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b")
    video, _ = defect_video(tmp_path / "v.avi", n=10, defect_every=3, size=96)
    s = load_settings(None, [(["model", "bundle"], str(bundle.path), "t"), (["source", "uri"], f"file://{video}", "t"),
                             (["source", "mode"], "trigger", "t"), (["output", "jsonl"], "", "t"),
                             (["telemetry", "tegrastats"], False, "t")], environ={})
    svc = Service(s, install_signals=False)
    svc.run()
    rep, pipe = svc.reporter, svc.pipeline
    assert rep.ng > 0 and rep.ok > 0
    frames_in_interval = []
    rate = svc._rate.rate

    def counted_rate(n):
        out = rate(n)
        frames_in_interval.append(out[1])
        return out

    decided = iter([False, True, False, True, True, False])
    host = svc.telemetry.host

    def host_while_a_decision_is_reported():   # the reporting thread goes on while the payload is built
        ng = next(decided)
        pipe.inspected += 1
        if ng:
            rep.ng += 1
        else:
            rep.ok += 1
        return host()

    svc._rate.rate = counted_rate
    svc.telemetry.host = host_while_a_decision_is_reported
    prev = svc.last_telemetry   # the run's last message, where the next interval starts
    for _ in range(6):
        msg = svc.telemetry_payload()
        dok, dng = msg["ok"] - prev["ok"], msg["ng"] - prev["ng"]
        assert msg["ng_rate"] == (round(dng / (dok + dng), 4) if dok + dng else 0.0), (prev, msg)
        assert frames_in_interval[-1] == msg["frames"] - prev["frames"]
        prev = msg


if __name__ == "__main__":  # print what the parser makes of each recorded line
    for name, line in list(globals().items()):
        if name.startswith("JP") and isinstance(line, str):
            print(name, json.dumps(parse_line(line)), file=sys.stdout)
