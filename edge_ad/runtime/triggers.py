"""Triggers for trigger mode: what says "a part is here, inspect the next frame(s)".

- ``frame``: the source's frame arrival is the trigger (a camera in hardware-trigger mode, a folder
  of part images, a file): every frame it delivers is inspected, none dropped.
- ``command``: only the MQTT ``inspect`` command triggers.
- ``gpio``: an edge on a GPIO line (a light barrier, a PLC output), read with ``Jetson.GPIO``.
- ``package.module:callable``: a plug-in. The callable receives the :class:`TriggerGate` and returns an
  object with ``start()`` and ``stop()`` methods; it calls ``gate.fire()`` for each part.

In every trigger mode the MQTT ``inspect`` command also fires the gate. The gate counts pending frames
(``frames_per_trigger`` per fire) and the capture thread consumes them.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Protocol

from ..errors import InputError

log = logging.getLogger(__name__)


class TriggerGate:
    """Pending triggered frames, shared by the trigger sources and the capture thread."""

    def __init__(self, frames_per_trigger: int = 1):
        self.frames_per_trigger = int(frames_per_trigger)
        self._pending = 0
        self._cv = threading.Condition()
        self.fired = 0

    def fire(self, parts: int = 1, source: str = "") -> None:
        _check_count(parts, "parts", source)
        with self._cv:
            self._pending += int(parts) * self.frames_per_trigger
            self.fired += int(parts)
            self._cv.notify_all()
        log.debug("trigger fired (%s): %d pending frames", source or "?", self._pending)

    def fire_frames(self, frames: int, source: str = "") -> None:
        """Release exactly ``frames`` frames (the inspect command's ``count``)."""
        _check_count(frames, "frames", source)
        with self._cv:
            self._pending += int(frames)
            self._cv.notify_all()
        log.debug("trigger fired (%s): %d pending frames", source or "?", self._pending)

    def clear(self) -> int:
        """Drop every pending frame (triggers that fired while inspection was paused); returns how many."""
        with self._cv:
            n, self._pending = self._pending, 0
            return n

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def take(self) -> bool:
        """Consume one pending frame if there is one (no waiting)."""
        with self._cv:
            if self._pending > 0:
                self._pending -= 1
                return True
            return False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a pending frame; True when one is there (not consumed)."""
        with self._cv:
            if self._pending <= 0:
                self._cv.wait(timeout)
            return self._pending > 0


def _check_count(n: Any, what: str, source: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"trigger {source or '?'}: fire {what}={n!r}; expected a whole number >= 1 "
                         "(a zero or negative count would cancel real triggers)")


class Trigger(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Passive:
    """``frame`` and ``command``: nothing to run; frames or commands drive the gate."""

    def __init__(self, name: str):
        self.name = name

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class GpioTrigger:
    """Fire the gate on an edge of a GPIO pin (Jetson.GPIO, BOARD numbering)."""

    name = "gpio"

    def __init__(self, gate: TriggerGate, pin: int, edge: str = "rising", debounce_ms: int = 20):
        try:
            import Jetson.GPIO as GPIO  # type: ignore
        except ImportError as exc:
            raise InputError("source.trigger = 'gpio' needs the Jetson.GPIO package "
                             "(pip install Jetson.GPIO; the service user must be in the 'gpio' group)") from exc
        self._gpio = GPIO
        self.gate = gate
        self.pin = int(pin)
        self.edge = {"rising": GPIO.RISING, "falling": GPIO.FALLING, "both": GPIO.BOTH}[edge]
        self.debounce_ms = int(debounce_ms)
        self._started = False

    def _on_edge(self, channel: Any) -> None:
        self.gate.fire(1, source=f"gpio pin {channel}")

    def start(self) -> None:
        g = self._gpio
        try:
            g.setmode(g.BOARD)
            g.setup(self.pin, g.IN)
            g.add_event_detect(self.pin, self.edge, callback=self._on_edge, bouncetime=max(1, self.debounce_ms))
        except Exception as exc:  # a wrong pin, a line in use, no permission on /dev/gpiochip*
            raise InputError(f"source.trigger = 'gpio': pin {self.pin} (BOARD numbering) could not be set up: "
                             f"{type(exc).__name__}: {exc} (is the pin right, free, and the service user in "
                             "the 'gpio' group?)") from exc
        self._started = True

    def stop(self) -> None:
        if self._started:
            try:
                self._gpio.remove_event_detect(self.pin)
                self._gpio.cleanup(self.pin)
            except Exception as exc:  # already released at exit
                log.debug("gpio cleanup: %s", exc)
            self._started = False


def load_trigger(spec: str, gate: TriggerGate, gpio_settings=None) -> Trigger:
    """A trigger from its config name (frame | command | gpio | package.module:callable)."""
    if spec in ("frame", "command"):
        return _Passive(spec)
    if spec == "gpio":
        gs = gpio_settings
        return GpioTrigger(gate, gs.pin if gs else 7, gs.edge if gs else "rising", gs.debounce_ms if gs else 20)
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"source.trigger '{spec}': cannot import module '{mod_name}' ({exc})") from exc
    except Exception as exc:  # the plug-in's own code failed while importing
        raise InputError(f"source.trigger '{spec}': importing module '{mod_name}' failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise InputError(f"source.trigger '{spec}': '{attr}' is not a callable in module '{mod_name}'")
    try:
        trig = factory(gate)
    except Exception as exc:
        raise InputError(f"source.trigger '{spec}': {attr}(gate) failed: {type(exc).__name__}: {exc}") from exc
    for method in ("start", "stop"):
        if not callable(getattr(trig, method, None)):
            raise InputError(f"source.trigger '{spec}': the object it returned has no {method}() method")
    if not getattr(trig, "name", None):
        try:
            trig.name = spec
        except AttributeError:
            pass
    return trig
