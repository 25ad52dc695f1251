"""A throw-away broker on a free loopback port, for tests, demos and benchmarks.

:class:`Mosquitto` runs the real broker (MQTT 5 and 3.1.1). Where it is not installed,
:class:`EmbeddedBroker` runs the pure-Python amqtt broker in a thread of this process (MQTT 3.1.1 only:
connect with ``protocol = "3.1.1"``; install it with ``pip install amqtt``). :func:`start_broker` picks
the first that is available; both have ``url``, ``protocol``, ``start``, ``stop`` and ``close``.

::

    with Mosquitto(workdir) as broker:      # starts in well under a second
        link = MqttLink(MqttSettings(url=broker.url, ...))
        broker.stop(); broker.start()      # a restart keeps the port and (persistence on) the sessions

Persistence is on by default: a clean stop (SIGTERM) saves sessions and queued messages, so a
subscriber with a persistent session loses nothing across a restart, as with a production broker.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import threading
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RuntimeFailure

ENV_BINARY = "EDGE_AD_MOSQUITTO"
_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto",
               "/usr/local/opt/mosquitto/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary ($EDGE_AD_MOSQUITTO, PATH, then the usual sbin folders), or None."""
    env = os.environ.get(ENV_BINARY)
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def find_mosquitto_passwd() -> str | None:
    binary = find_mosquitto()
    candidates = [shutil.which("mosquitto_passwd")]
    if binary:
        candidates.append(str(Path(binary).parent.parent / "bin" / "mosquitto_passwd"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


def _current_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or "root"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """Broker side of TLS: its certificate and key, and the CA that signs client certificates."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


class Mosquitto:
    protocol = "5"          # speaks 5 and 3.1.1

    def __init__(self, workdir: str | os.PathLike | None = None, port: int | None = None, *,
                 host: str = "127.0.0.1", persistence: bool = True, tls: TlsFiles | None = None,
                 password_file: str | os.PathLike | None = None, extra_config: str = "",
                 binary: str | None = None):
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise RuntimeFailure("mosquitto not found (install it: apt-get install -y mosquitto, or set "
                                 f"{ENV_BINARY} to its path)")
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-ad-mosquitto-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._fixed_port = port is not None
        self.port = port or free_port(host)
        self.persistence = persistence
        self.tls = tls
        self.password_file = Path(password_file) if password_file else None
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # ------------------------------------------------------------------ info
    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"mqtts://localhost:{self.port}"
        return f"mqtt://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def config_text(self) -> str:
        lines = [
            # run as whoever started us: as root, Mosquitto would otherwise switch to the 'mosquitto' user
            # and could not write its log and persistence file in our (private) folder
            f"user {_current_user()}",
            f"listener {self.port} {self.host}",
            "allow_anonymous " + ("false" if self.password_file else "true"),
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 3600",
            "max_queued_messages 1000000",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}", f"keyfile {self.tls.key_file}",
                      f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
                      "tls_version tlsv1.2"]
        if self.extra_config:
            lines.append(self.extra_config.strip())
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ control
    def start(self, timeout: float = 10.0) -> "Mosquitto":
        if self.running:
            return self
        for attempt in range(5):
            self.conf_path.write_text(self.config_text())
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if port_open(self.host, self.port):
                    self.starts += 1
                    return self
                time.sleep(0.02)
            code = self.proc.poll()
            err = self.proc.stderr.read().decode(errors="replace") if code is not None else ""
            self._terminate(signal.SIGKILL)
            text = (err + "\n" + self.log_tail()).strip()
            if "in use" in text and not self._fixed_port and self.starts == 0 and attempt < 4:
                self.port = free_port(self.host)          # lost a race for the port: take another
                continue
            what = (f"exited with code {code} before listening" if code is not None
                    else f"was not listening within {timeout:g} s")
            raise RuntimeFailure(f"mosquitto ({self.binary}) did not start on {self.host}:{self.port}: {what}; "
                                 + (f"its output and log ({self.log_path}): {text[-800:]}" if text
                                    else f"no output, nothing in its log {self.log_path}"))
        raise RuntimeFailure(f"mosquitto could not find a free port on {self.host}")

    def stop(self, timeout: float = 10.0) -> None:
        """Clean stop (SIGTERM): persistence is written; the port is free when this returns."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: nothing saved, as in a crash."""
        self._terminate(signal.SIGKILL)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        self.proc = None
        deadline = time.monotonic() + 5.0
        while port_open(self.host, self.port, timeout=0.05) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def make_password_file(path: str | os.PathLike, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by ``mosquitto_passwd -b``)."""
    tool = find_mosquitto_passwd()
    if tool is None:
        raise RuntimeFailure("mosquitto_passwd not found (it ships with the mosquitto package)")
    path = Path(path)
    path.write_text("")
    os.chmod(path, 0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


def embedded_available() -> bool:
    """True when the amqtt package (the embedded broker) is importable."""
    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker:
    """amqtt (pure Python, MQTT 3.1.1 only) on a free loopback port, in a thread with its own event loop.

    No persistence and no TLS: for demos on machines without Mosquitto. A link or monitor that talks to it
    needs ``protocol = "3.1.1"`` (:attr:`protocol`).
    """

    protocol = "3.1.1"

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1"):
        if not embedded_available():
            raise RuntimeFailure("the embedded broker needs the amqtt package (pip install amqtt) "
                                 "or install mosquitto (apt-get install -y mosquitto)")
        self.host = host
        self.port = port or free_port(host)
        self.log_path = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        if self.running:
            return self
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:     # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="edge-ad-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            self._thread = None
            raise RuntimeFailure(f"embedded broker did not start on {self.host}:{self.port}: "
                                 f"{failure[0] if failure else 'timeout'}")
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(timeout)
        except Exception:   # shutting down anyway
            logging.getLogger(__name__).debug("embedded broker shutdown", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def start_broker(workdir: str | os.PathLike | None = None, **mosquitto_options) -> "Mosquitto | EmbeddedBroker":
    """A started broker on a free loopback port: Mosquitto when installed, else the embedded amqtt broker
    (check ``.protocol``), else :class:`RuntimeFailure` saying what to install."""
    if find_mosquitto() is not None:
        return Mosquitto(workdir, **mosquitto_options).start()
    if embedded_available():
        return EmbeddedBroker().start()
    raise RuntimeFailure("no MQTT broker: install mosquitto (apt-get install -y mosquitto) or amqtt "
                         "(pip install amqtt) for the embedded one")
