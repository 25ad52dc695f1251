"""Jetson ``tegrastats``: a tolerant line parser and a background reader.

The line format changed with every JetPack; the parser reads each field on its own and skips what it
does not find, so one unknown token never loses the rest. Formats seen (tests/test_telemetry.py holds
recorded lines of each):

- JetPack 5 (L4T R35, Orin): upper-case sensors ``CPU@42.593C GPU@-256C tj@42.593C`` (``-256C``: a
  sensor that is off), ``GR3D_FREQ 0%@0`` or ``0%@[1300]``, rails ``VDD_GPU_SOC 2399mW/2399mW``.
- JetPack 6 (L4T R36, Orin): lower-case sensors ``cpu@52.562C soc2@48.437C``, ``GR3D_FREQ 0%@[0,0]`` or
  a bare ``GR3D_FREQ 1%`` (Orin Nano), rails ``VDD_IN 3913mW/3922mW`` or ``VIN_SYS_5V0 4707mW/4707mW``.
- JetPack 7 (L4T R38/R39, Thor): ``GR3D_FREQ @[314,314,314]`` (GPC clocks, no load figure),
  ``soc012@33.781C``, rails ``VDD_GPU``/``VDD_CPU_SOC_MSS``/``VIN``; R39 adds a maximum to each value:
  ``cpu@34.843C/34.843C`` and ``VDD_GPU 4925mW/4925mW/4925mW`` (current/average/maximum).
- Older JetPack 4 rails without units (``POM_5V_IN 4520/4680``) are read too.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_DATE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ(?: (\d+)%)?(?:\s*@\s*\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C(?:/(-?\d+(?:\.\d+)?)C)?")
_RAIL_MW = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW(?:/(\d+)mW)?")
_RAIL_OLD = re.compile(r"\b((?:VDD|POM)_[A-Z0-9_]+) (\d+)/(\d+)(?![\dm])")
# rails that measure the whole module's input, in order of preference
_INPUT_RAILS = ("VDD_IN", "VIN", "POM_5V_IN")
# rails already counted inside another one (AGX Orin: VDDQ_VDD2_1V8AO is part of VIN_SYS_5V0)
_SUB_RAILS = ("VDDQ_VDD2_1V8AO",)
# sensors that are not temperatures of the chip (PMIC@100C always reads 100 C on older modules, not a real sensor)
_NOT_CHIP = ("pmic",)
_OFF_TEMP = -200.0  # -256C marks a sensor that is powered off


def parse_line(line: str) -> dict[str, Any]:
    """One tegrastats line -> a dict of what it holds (missing fields are left out)."""
    out: dict[str, Any] = {}
    text = line.strip()
    m = _DATE.match(text)
    if m:
        out["time"] = m.group(1)
        text = text[m.end():]
    if m := _RAM.search(text):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(text):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(text):
        loads, freqs = [], []
        for item in m.group(1).split(","):
            item = item.strip()
            if not item or item == "off":
                loads.append(None)
                continue
            pct, _, f = item.partition("@")
            try:
                loads.append(float(pct.rstrip("%")))
            except ValueError:
                loads.append(None)
            if f.strip().isdigit():
                freqs.append(int(f))
        if m.group(2):
            freqs.append(int(m.group(2)))
        out["cpu_load"] = loads
        online = [v for v in loads if v is not None]
        if online:
            out["cpu_load_avg"] = round(sum(online) / len(online), 2)
        if freqs:
            out["cpu_freq_mhz"] = max(freqs)
    if m := _GR3D.search(text):
        if m.group(1) is not None:
            out["gpu_load"] = float(m.group(1))
        if m.group(2):
            clocks = [int(c) for c in m.group(2).split(",") if c.isdigit()]
            if clocks:
                out["gpu_freq_mhz"] = max(clocks)
    if m := _EMC.search(text):
        out["emc_load"] = float(m.group(1))
        if m.group(2):
            out["emc_freq_mhz"] = int(m.group(2))
    temps = {}
    for name, cur, _mx in _TEMP.findall(text):
        v = float(cur)
        if v > _OFF_TEMP:
            temps[name.lower()] = v
    if temps:
        out["temps_c"] = temps
        chip = [v for k, v in temps.items() if k not in _NOT_CHIP]
        if chip:
            out["temp_max_c"] = max(chip)
    power, power_avg = {}, {}
    for name, cur, avg, _mx in _RAIL_MW.findall(text):
        if name == "NC":  # "not connected" channels
            continue
        power[name], power_avg[name] = int(cur), int(avg)
    if not power:
        for name, cur, avg in _RAIL_OLD.findall(text):
            power[name], power_avg[name] = int(cur), int(avg)
    if power:
        out["power_mw"] = power
        out["power_avg_mw"] = power_avg
        for rail in _INPUT_RAILS:
            if rail in power:
                out["power_total_mw"] = power[rail]
                break
        else:  # no input rail: the sum of the module's top-level rails
            out["power_total_mw"] = sum(v for k, v in power.items() if k not in _SUB_RAILS)
    return out


def find_binary() -> str | None:
    found = shutil.which("tegrastats")
    if found:
        return found
    for p in ("/usr/bin/tegrastats", "/usr/sbin/tegrastats"):
        if Path(p).is_file():
            return p
    return None


class TegrastatsReader:
    """Runs ``tegrastats --interval MS`` and keeps the newest parsed line (thread-safe)."""

    def __init__(self, binary: str | None = None, interval_ms: int = 1000):
        self.binary = binary or find_binary()
        self.interval_ms = int(interval_ms)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._latest: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.lines = 0
        self.errors = 0
        self.exits = 0            # times the tegrastats process ended on its own

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self) -> bool:
        if not self.binary:
            return False
        try:
            self._proc = subprocess.Popen([self.binary, "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                          bufsize=1)
        except OSError as exc:
            log.warning("tegrastats (%s) could not start: %s", self.binary, exc)
            return False
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return True

    @property
    def alive(self) -> bool:
        p = self._proc
        return p is not None and p.poll() is None

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            try:
                parsed = parse_line(line)
            except Exception:  # a line this parser chokes on must never stop telemetry
                self.errors += 1
                continue
            if parsed:
                parsed["read_at"] = time.time()
                with self._lock:
                    self._latest = parsed
                    self.lines += 1
        if self._proc is proc:      # not stop(): the process ended by itself
            code = proc.wait()      # reaped first: once exits counts it, alive is False
            self.exits += 1
            log.warning("tegrastats (%s) ended (exit code %s); Jetson readings stop until it is restarted",
                        self.binary, code)

    def latest(self, max_age_s: float | None = None) -> dict[str, Any]:
        """The newest reading; empty when there is none, or it is older than ``max_age_s`` (stale)."""
        with self._lock:
            t = dict(self._latest)
        if t and max_age_s is not None and time.time() - t.get("read_at", 0.0) > max_age_s:
            return {}
        return t

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is not None:
            p.terminate()
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=2)
