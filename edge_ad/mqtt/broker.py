"""A throw-away Mosquitto broker on a free loopback port, for tests, demos and benchmarks.

::

    with Mosquitto(workdir) as broker:      # starts in well under a second
        link = MqttLink(MqttSettings(url=broker.url, ...))
        broker.stop(); broker.start()      # a restart keeps the port and (persistence on) the sessions

Persistence is on by default: a clean stop (SIGTERM) saves sessions and queued messages, so a
subscriber with a persistent session loses nothing across a restart, as with a production broker.
"""

from __future__ import annotations

import os
import shutil
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
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self._terminate(signal.SIGKILL)
            text = err + "\n" + self.log_tail()
            if "in use" in text and not self._fixed_port and self.starts == 0 and attempt < 4:
                self.port = free_port(self.host)          # lost a race for the port: take another
                continue
            raise RuntimeFailure(f"mosquitto did not start on {self.host}:{self.port} within {timeout:g} s: "
                                 f"{text.strip()[-800:]}")
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
