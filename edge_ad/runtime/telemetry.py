"""Telemetry: latency percentiles per stage, process CPU and memory, Jetson tegrastats, NVML.

The pipeline keeps counters and latency windows; every ``telemetry.interval_s`` the service asks
:class:`Telemetry` for one payload (published on MQTT ``telemetry``, appended to ``telemetry.path``).
Field reference: docs/runtime.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from .tegrastats import TegrastatsReader

log = logging.getLogger(__name__)

STAGES = ("capture", "queue", "preprocess", "infer", "score", "report", "total")


class LatencyWindow:
    """Recent latency samples (ms) of one stage; ``summary()`` gives p50/p95/p99 and starts anew."""

    def __init__(self, maxlen: int = 20_000):
        self._d: deque[float] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._d.append(float(ms))

    def add_many(self, values) -> None:
        with self._lock:
            self._d.extend(float(v) for v in values)

    def summary(self, reset: bool = True) -> dict[str, float] | None:
        with self._lock:
            vals = np.fromiter(self._d, dtype=np.float64, count=len(self._d))
            if reset:
                self._d.clear()
        return percentiles(vals)


def percentiles(values) -> dict[str, float] | None:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3), "n": int(v.size)}


class ProcessStats:
    """CPU (percent of one core, averaged since the last call) and memory of this process."""

    def __init__(self):
        import psutil

        self._p = psutil.Process(os.getpid())
        self._p.cpu_percent(None)  # prime: the first call returns 0

    def read(self) -> dict[str, Any]:
        import psutil

        mem = self._p.memory_info()
        out = {"cpu_percent": round(self._p.cpu_percent(None), 1),
               "rss_mb": round(mem.rss / 2**20, 1),
               "threads": self._p.num_threads(),
               "system_cpu_percent": round(psutil.cpu_percent(None), 1)}
        try:
            vm = psutil.virtual_memory()
            out["system_memory_percent"] = round(vm.percent, 1)
        except Exception:  # pragma: no cover - exotic platforms
            pass
        return out


class NvmlReader:
    """GPU load, memory, temperature and power through NVML (the optional ``pynvml`` package)."""

    def __init__(self):
        self._nv = None
        self._handles: list = []
        try:
            import pynvml  # type: ignore

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nv = pynvml
        except Exception as exc:  # absent package, no driver, Jetson without NVML: all fine
            log.debug("NVML not available: %s", exc)

    @property
    def available(self) -> bool:
        return self._nv is not None and bool(self._handles)

    def read(self) -> list[dict[str, Any]]:
        nv = self._nv
        out = []
        if nv is None:
            return out
        for i, h in enumerate(self._handles):
            d: dict[str, Any] = {"index": i}
            for key, fn in (("util_percent", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                            ("mem_used_mb", lambda: round(nv.nvmlDeviceGetMemoryInfo(h).used / 2**20, 1)),
                            ("mem_total_mb", lambda: round(nv.nvmlDeviceGetMemoryInfo(h).total / 2**20, 1)),
                            ("temp_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                            ("power_w", lambda: round(nv.nvmlDeviceGetPowerUsage(h) / 1000.0, 2))):
                try:
                    d[key] = fn()
                except Exception:  # a field this GPU does not report
                    pass
            out.append(d)
        return out

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
            self._nv = None


# fields of a tegrastats reading worth sending (the per-core lists stay on the device)
_TEGRA_FIELDS = ("ram_used_mb", "ram_total_mb", "swap_used_mb", "cpu_load_avg", "cpu_freq_mhz", "gpu_load",
                 "gpu_freq_mhz", "emc_load", "temps_c", "temp_max_c", "power_mw", "power_total_mw")


class Telemetry:
    """Host-side readings (process, tegrastats, NVML) merged with the pipeline's own figures."""

    def __init__(self, tegrastats: bool = True, nvml: bool = True, interval_s: float = 10.0):
        self.process = ProcessStats()
        self.tegra = TegrastatsReader(interval_ms=int(max(0.5, min(interval_s, 5.0)) * 1000)) if tegrastats else None
        self.nvml = NvmlReader() if nvml else None
        self._started = False
        # a reading older than this is stale (tegrastats died or hangs): not sent as current
        self._tegra_max_age = max(3.0 * self.tegra.interval_ms / 1000.0, 5.0) if self.tegra else 0.0
        self._tegra_restart_at = 0.0

    def start(self) -> None:
        if self.tegra is not None and self.tegra.available:
            self._started = self.tegra.start()

    def host(self) -> dict[str, Any]:
        out: dict[str, Any] = {"process": self.process.read()}
        if self.tegra is not None and self._started:
            now = time.monotonic()
            if not self.tegra.alive and now >= self._tegra_restart_at:   # at most one restart a minute
                self._tegra_restart_at = now + 60.0
                self.tegra.stop()
                log.warning("restarting tegrastats (%d exit(s) so far)", self.tegra.exits)
                self.tegra.start()
            t = self.tegra.latest(max_age_s=self._tegra_max_age)
            if t:
                out["jetson"] = {k: t[k] for k in _TEGRA_FIELDS if k in t}
        if self.nvml is not None and self.nvml.available:
            out["gpu"] = self.nvml.read()
        return out

    def stop(self) -> None:
        if self.tegra is not None:
            self.tegra.stop()
        if self.nvml is not None:
            self.nvml.close()


class RateCounter:
    """Events per second between two reads."""

    def __init__(self):
        self._last_n = 0
        self._last_t = time.monotonic()

    def rate(self, n: int) -> tuple[float, int, float]:
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-9)
        dn = n - self._last_n
        self._last_n, self._last_t = n, now
        return dn / dt, dn, dt
