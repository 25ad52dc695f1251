"""Remote commands: ``cmd/<name>`` in, one reply out. Parsing, authorization, argument schemas, dispatch.

A command payload is a JSON object: the command's arguments plus a few reserved fields (``ts``,
``client_id``, ``reply_to``, ``correlation_id``), checked for every command, signed or not (schema ``command``,
and a ``ts`` must read as a time): a bad one is ``malformed``. An empty payload means no arguments. The arguments
are checked against ``edge_ad/schemas/cmd.<name>.schema.json`` and handed to the handler the runtime
registered (``handler(args: dict) -> dict``). Every command gets exactly one reply; a malformed,
unknown, unauthorized or failing command gets an error reply (and a log line) and never stops anything.

Where the reply goes: the MQTT v5 response topic with the request's correlation data; else the payload's
``reply_to`` (MQTT 3.1.1); else ``edge-ad/v1/<site>/<device>/reply/<name>``. A payload ``correlation_id`` is
echoed in the reply body whichever way it goes. A reply topic that cannot be published to (NUL or control
characters, wildcards, ``$SYS/...``, over 1024 bytes: :func:`~.topics.reply_topic_problem`), or that is under
``edge-ad/v1/`` but not this device's ``reply/...`` (another device's ``cmd/pause``, ``result``, ...: the reply
would go out with this device's credentials), is refused: the command is not run, and its ``malformed`` reply,
naming the field, goes to ``reply/<name>`` (and a WARNING to the log).

Authorization applies to the commands that change state (:data:`STATE_CHANGING`; all commands with
``command_auth_all``):

* **allow-list** (``command_clients``): the requester's id is taken from the v5 user property
  ``client_id``, else the payload field ``client_id``. Receivers cannot see a publisher's MQTT client id,
  so this is a self-declared name that guards against mistakes, not attackers: use the HMAC and broker
  ACLs for that.
* **HMAC** (``command_secret``): ``hex(HMAC-SHA256(secret, topic + "\n" + payload bytes))`` in the v5 user
  property ``hmac-sha256``, or the signed form ``{"signed": "<payload JSON text>", "hmac-sha256": "<hex>"}``
  (any protocol). The topic (``edge-ad/v1/<site>/<device>/cmd/<name>``) is signed with the payload, so a
  signature is good for one command on one device only. A signed payload must carry ``ts`` (unix seconds
  or RFC 3339) within ``command_max_skew_s`` of the device's clock, and a signature is accepted once
  (replays are refused).

Commands published with the retain flag are not run (a retained command would run again at every
reconnect): the link refuses them with a ``malformed`` reply. An empty retained message (the one that clears
a retained command on the broker) is no command: not run, not answered. MQTT 3.1.1 delivers neither with
its retain flag (only a subscribe's retained messages carry it): see docs/mqtt.md.

Commands run one at a time, in order, except :data:`QUICK` ones (``status``), which the link answers on
a thread of their own so they never wait behind a long ``calibrate``. While a :data:`LONG` one
(``calibrate``, ``update_model``, ``reload``) waits or runs, any other command is refused at once with a
``busy`` reply naming it, instead of running minutes after it was sent. A command whose MQTT v5 message
expiry has passed when its turn comes (it waited behind a long one) is not run: it gets an ``expired``
reply, since its requester has stopped waiting and was told it timed out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import SURROGATE, EdgeADError, InputError, clip_text, os_error_text, valid_unicode
from . import payloads, schema
from .settings import MqttSettings
from .topics import MAX_REPLY_TOPIC_BYTES, ROOT, Topics, check_level, reply_topic_problem

log = logging.getLogger(__name__)

COMMANDS = ("status", "calibrate", "rollback_calibration", "set_threshold", "inspect", "snapshot", "pause",
            "resume", "reload", "update_model")
STATE_CHANGING = frozenset({"calibrate", "rollback_calibration", "set_threshold", "pause", "resume", "reload",
                            "update_model"})
QUICK = frozenset({"status"})   # read-only and instant: answered on their own thread, never queued behind others
# can take minutes: while one waits or runs, every other command but QUICK ones is refused at once (busy)
LONG = frozenset({"calibrate", "update_model", "reload"})
RESERVED = ("ts", "client_id", "reply_to", "correlation_id")
HMAC_KEY = "hmac-sha256"
Handler = Callable[[dict], "Mapping[str, Any] | None"]


class CommandError(Exception):
    """A command refused or failed; ``code`` is one of the reply schema's error codes; ``fields``: more fields of
    the reply's ``error`` object (:meth:`edge_ad.errors.EdgeADError.reply_fields`), each one the schema names."""

    def __init__(self, code: str, message: str, fields: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields or {}


def sign(secret: str | bytes, topic: str, data: bytes) -> str:
    """Hex HMAC-SHA256 of ``topic + "\n" + data`` under ``secret`` (what a requester puts in
    ``hmac-sha256``). The command topic is part of what is signed, so the signature cannot be moved to
    another command or another device."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(key, topic.encode("utf-8") + b"\n" + bytes(data), hashlib.sha256).hexdigest()


def signed_envelope(secret: str | bytes, topic: str, payload: bytes) -> bytes:
    """The signed form of a payload, for requesters without v5 user properties."""
    return payloads.encode({"signed": bytes(payload).decode("utf-8"), HMAC_KEY: sign(secret, topic, payload)})


@dataclass(frozen=True)
class Incoming:
    """A command message as it came off the wire (the network thread builds this and nothing more)."""

    name: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: Mapping[str, str] = field(default_factory=dict)
    received: float = field(default_factory=time.time)
    expiry_s: float | None = None       # MQTT v5 message expiry left when it arrived (None: none set)

    def expired(self, now: float) -> bool:
        """Its message expiry has passed: the requester stopped waiting for the reply."""
        return self.expiry_s is not None and now > self.received + self.expiry_s


@dataclass
class Reply:
    topic: str
    body: dict
    correlation_data: bytes | None = None

    @property
    def ok(self) -> bool:
        return bool(self.body.get("ok"))


@dataclass
class Spec:
    name: str
    handler: Handler | None
    schema_name: str | None
    validator: Any          # a jsonschema validator, or None: any JSON object is accepted
    changes_state: bool
    unavailable: str | None = None   # why this device cannot run it (a setting it lacks): answered not_available


class FieldProblem(ValueError):
    """A command payload is a JSON object, but one of its fields holds what no command can take: a number that is
    not a finite double (:class:`NonFiniteNumber`), or a string that is not valid Unicode (a lone surrogate
    escape such as ``"\\ud800"``, which JSON allows and nothing downstream can encode). Its message names the
    field: ``threshold: NaN``."""


class NonFiniteNumber(FieldProblem):
    """A command payload holds a number that is not a finite double: ``NaN``, ``Infinity`` (which Python's
    JSON parser accepts), ``1e999`` (parsed as infinity) or an integer too large for a double. Its message
    names the field: ``threshold: NaN``."""


class _NotFinite:
    """Placeholder the parser leaves where such a number was, so that the refusal can name its field."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _int(text: str):
    value = int(text)
    return value if abs(value) <= sys.float_info.max else _NotFinite(text)


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of ``text`` as its escape (``\\ud800``), None when it is valid Unicode."""
    found = SURROGATE.search(text)
    return None if found is None else f"\\u{ord(found.group()):04x}"


def _first_problem(obj, what: str) -> FieldProblem | None:
    """The first field of ``obj`` (in the payload's order) that no command can take, as the error naming it (its
    path as jsonschema's, "a/0/b"): a number the parser marked (:class:`_NotFinite`), a string value or a field
    name that is not valid Unicode. Iterative: the payload may be nested as deeply as the parser allows."""
    todo = [(obj, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, _NotFinite):
            return NonFiniteNumber(f"{what} field '{clip_text(valid_unicode(path), 100)}' is {clip_text(value.text, 40)}: "
                                   "expected a finite number (JSON has no NaN or infinity, and a number must fit a "
                                   "64-bit float)")
        if isinstance(value, str) and _lone_surrogate(value):
            return FieldProblem(f"{what} field '{clip_text(valid_unicode(path), 100)}' is not valid Unicode: it holds a lone "
                                f"surrogate escape ({_lone_surrogate(value)}), which has no UTF-8 form")
        if isinstance(value, dict):
            for k in value:
                if _lone_surrogate(k):
                    name = clip_text(valid_unicode(f"{path}/{k}" if path else k), 100)
                    return FieldProblem(f"{what} field name '{name}' is not valid Unicode: it holds a lone surrogate "
                                        f"escape ({_lone_surrogate(k)}), which has no UTF-8 form")
            todo.extend((v, f"{path}/{k}" if path else str(k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, f"{path}/{i}" if path else str(i)) for i, v in reversed(list(enumerate(value))))
    return None


def _parse_object(data: bytes, what: str, finite: bool = True) -> dict:
    """A JSON object from untrusted bytes; every way it can be bad is a ValueError (a field no command can take:
    :class:`FieldProblem`, naming it: a number that is not a finite double, :class:`NonFiniteNumber` (a NaN
    threshold would make every part NG, with no region), or a string that is not valid Unicode). ``finite=False``:
    such fields are kept (numbers as _NotFinite markers), for reading the routing fields of a payload that is
    refused for them (the refusal still goes where the requester waits; :func:`_text` reads them)."""
    text = bytes(data).decode("utf-8")      # UnicodeDecodeError is a ValueError
    if not text.strip():
        return {}
    try:
        obj = json.loads(text, parse_constant=_NotFinite, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    if isinstance(obj, _NotFinite):
        raise ValueError(f"{what} is {clip_text(obj.text, 40)}, expected an object")
    if isinstance(obj, str) and _lone_surrogate(obj):
        raise ValueError(f"{what} is a JSON string, expected an object; and it is not valid Unicode: it holds a "
                         f"lone surrogate escape ({_lone_surrogate(obj)})")
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is a JSON {type(obj).__name__}, expected an object")
    bad = _first_problem(obj, what) if finite else None
    if bad is not None:
        raise bad
    return obj


def _text(value) -> str | None:
    """A routing field read from a payload parsed with ``finite=False`` (``correlation_id``, ``client_id``): the
    string, None when it is not one or not valid Unicode (it could not be written in the reply nor the log)."""
    return value if isinstance(value, str) and not _lone_surrogate(value) else None


class Dispatcher:
    """Turns an :class:`Incoming` into a :class:`Reply`. No network here: the link publishes replies."""

    def __init__(self, settings: MqttSettings, topics: Topics, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.topics = topics
        self.clock = clock
        self._specs: dict[str, Spec] = {}
        self._seen: dict[str, float] = {}       # accepted signatures -> when they may be forgotten
        self._lock = threading.Lock()           # two workers: the ordered one and the QUICK one
        self._running = threading.local()       # the requester id of the command this thread runs
        self.handled = 0
        self.errors = 0
        for name in COMMANDS:
            self._specs[name] = Spec(name, None, f"cmd.{name}", schema.validator(f"cmd.{name}"),
                                     name in STATE_CHANGING)

    # ------------------------------------------------------------------ registry
    def register(self, name: str, handler: Handler, schema_name: str | dict | None = None,
                 changes_state: bool | None = None, unavailable: str | None = None) -> None:
        """Attach ``handler`` to command ``name``. The ten standard commands keep their shipped schemas;
        another name needs ``schema_name`` (a shipped schema name or a schema dict) or takes any object.
        ``unavailable``: why this device cannot run the command (``update_model`` without ``model.deploy_dir``):
        it is left out of :meth:`names` (the birth's ``commands``) and answered ``not_available`` with that
        message, as a command without a handler is."""
        if not callable(handler):
            raise InputError(f"command '{name}': handler {handler!r} is not callable")
        check_level(name, "command name")
        old = self._specs.get(name)
        if old is not None and schema_name is None:
            sname, validator = old.schema_name, old.validator
        elif isinstance(schema_name, dict):
            sname, validator = None, schema.validator_for(schema_name)
        elif schema_name is not None:
            sname, validator = schema_name, schema.validator(schema_name)
        else:
            sname, validator = None, None
        if changes_state is None:
            changes_state = old.changes_state if old is not None else True
        self._specs[name] = Spec(name, handler, sname, validator, bool(changes_state), unavailable)

    def has_handler(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.handler is not None and spec.unavailable is None

    def requester(self) -> str | None:
        """Called from a handler: the requester id of the command it runs (v5 user property or payload field
        ``client_id``; self-declared), None when the command named none."""
        return getattr(self._running, "who", None)

    def names(self) -> list[str]:
        """The commands this device can run (the birth's ``commands``)."""
        return sorted(n for n in self._specs if self.has_handler(n))

    # ------------------------------------------------------------------ routing
    def route(self, msg: Incoming) -> tuple[str, bytes | None, str | None]:
        """(reply topic, correlation data, correlation id) for ``msg``, even when it is malformed."""
        return self._route(msg)[:3]

    def _route(self, msg: Incoming) -> tuple[str, bytes | None, str | None, str | None]:
        """:meth:`route` and why the reply topic the command named is refused (None: it is not). The v5 response
        topic wins over the payload's ``reply_to``; a refused one (:func:`~.topics.reply_topic_problem`: a
        reply there would cost the device its connection, or pass for a device's message or a command to it) is
        replaced by ``reply/<name>``."""
        obj = None
        try:
            obj = _parse_object(msg.payload, "payload", finite=False)
            if isinstance(obj.get("signed"), str):
                obj = _parse_object(obj["signed"].encode("utf-8"), "signed payload", finite=False)
        except ValueError:
            obj = None
        corr_id = _text(obj.get("correlation_id")) if obj is not None else None
        default = self.topics.reply(msg.name)
        if msg.response_topic is not None:
            field_name, reply_to = "the MQTT v5 response topic", msg.response_topic
        elif obj is not None and "reply_to" in obj:
            field_name, reply_to = "'reply_to'", obj["reply_to"]
        else:
            return default, msg.correlation_data, corr_id, None
        why = reply_topic_problem(reply_to, self.topics)
        if why is None:
            return reply_to, msg.correlation_data, corr_id, None
        if isinstance(reply_to, str):   # cut: a 70 KB topic came back whole, in the reply and the log
            shown = repr(reply_to[:80]) + (f"… ({len(reply_to)} characters)" if len(reply_to) > 80 else "")
        else:
            shown = clip_text(json.dumps(reply_to, default=lambda v: getattr(v, "text", "?")), 80)
        return default, msg.correlation_data, corr_id, (
            f"cmd/{msg.name}: {field_name} {shown} {why}; expected a topic to publish the reply to (UTF-8 without "
            f"NUL or control characters, no '+' or '#', not starting with '$', at most {MAX_REPLY_TOPIC_BYTES} "
            f"bytes, not under {ROOT}/ but for {self.topics.reply('<name>')}). Not run; this reply went to "
            f"{default}")

    def error_reply(self, msg: Incoming, code: str, message: str) -> Reply:
        """A refusal of ``msg`` with ``code`` and ``message``; one whose reply topic is refused is refused for
        that (``malformed``, on ``reply/<name>``), as :meth:`handle` does."""
        topic, corr, corr_id, problem = self._route(msg)
        if problem is not None:
            code, message = "malformed", problem
        self._count(ok=False)
        return Reply(topic, self._body(msg.name, False, corr_id, error={"code": code, "message": message}), corr)

    def _body(self, name: str, ok: bool, corr_id: str | None, result: dict | None = None,
              error: dict | None = None) -> dict:
        body = {"schema_version": payloads.SCHEMA_VERSION, "ts": payloads.now_iso(), "site": self.topics.site,
                "device": self.topics.device, "command": name, "ok": ok}
        if corr_id is not None:
            body["correlation_id"] = corr_id
        if ok:
            body["result"] = result if result is not None else {}
        else:   # a message quoting a file name or an argument may hold a lone surrogate: escaped, so the reply encodes
            body["error"] = valid_unicode(error)
        return body

    # ------------------------------------------------------------------ handling
    def handle(self, msg: Incoming) -> Reply:
        """Parse, authorize, validate, run. Always returns a reply; never raises."""
        topic, corr, corr_id, problem = self._route(msg)
        try:
            if problem is not None:
                raise CommandError("malformed", problem)
            now = self.clock()
            if msg.expired(now):
                raise CommandError("expired", f"{msg.name}: not run: its message expiry ({msg.expiry_s:g} s) "
                                              f"passed {now - msg.received - msg.expiry_s:.1f} s ago while it "
                                              "waited behind another command; send it again")
            try:
                spec, args, who = self._admit(msg)
            except CommandError:
                raise
            except Exception as exc:  # a parsing or checking bug must not stop the command worker
                log.exception("command %s: refused by an unexpected error", msg.name)
                raise CommandError("internal", f"{msg.name}: {type(exc).__name__}: {exc}") from None
            self._running.who = who
            if msg.name in LONG:   # minutes: a kill before its end would leave no trace of it in the log
                # the v5 correlation data, which the requester matches the reply on, else the payload's
                corr_text = msg.correlation_data.decode("utf-8", "replace") if msg.correlation_data else corr_id
                log.info("command %s from %s started (%s)", msg.name, who or "?",
                         f"correlation id {clip_text(corr_text, 80)}" if corr_text else "no correlation id")
            try:
                result = self._run(spec, args)
            finally:
                self._running.who = None
        except CommandError as exc:
            self._count(ok=False)
            log.warning("command %s from %s refused: %s: %s", msg.name, self._claimed(msg) or "?", exc.code,
                        exc.message)
            return Reply(topic, self._body(msg.name, False, corr_id,
                                           error={"code": exc.code, "message": exc.message, **exc.fields}), corr)
        self._count(ok=True)
        log.info("command %s from %s: ok", msg.name, who or "?")
        return Reply(topic, self._body(msg.name, True, corr_id, result=result), corr)

    def _count(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.handled += 1
            else:
                self.errors += 1

    def _claimed(self, msg: Incoming) -> str | None:
        who = msg.user_properties.get("client_id")
        if who:
            return who
        try:
            obj = _parse_object(msg.payload, "payload", finite=False)
            if isinstance(obj.get("signed"), str):
                obj = _parse_object(obj["signed"].encode("utf-8"), "signed payload", finite=False)
        except ValueError:
            return None
        return _text(obj.get("client_id"))

    def _admit(self, msg: Incoming) -> tuple[Spec, dict, str | None]:
        try:
            obj = _parse_object(msg.payload, "payload")
        except FieldProblem as exc:
            raise CommandError("malformed", f"cmd/{msg.name}: {exc}") from None
        except ValueError as exc:
            raise CommandError("malformed", f"cmd/{msg.name}: payload is not a JSON object ({exc})") from None
        signature = msg.user_properties.get(HMAC_KEY)
        signed_bytes = bytes(msg.payload)
        sent = _reserved(msg.name, obj, "")
        if "signed" in obj:
            extra = sorted(set(obj) - {"signed", HMAC_KEY})
            if extra:
                raise CommandError("malformed", f"cmd/{msg.name}: the signed form holds only 'signed' and "
                                                f"'{HMAC_KEY}', not {', '.join(extra)}")
            signature = obj[HMAC_KEY]
            try:
                signed_bytes = obj["signed"].encode("utf-8")
                obj = _parse_object(signed_bytes, "signed payload")
            except FieldProblem as exc:
                raise CommandError("malformed", f"cmd/{msg.name}: {exc}") from None
            except ValueError as exc:
                raise CommandError("malformed", f"cmd/{msg.name}: 'signed' is not a JSON object ({exc})") from None
            if "signed" in obj:
                raise CommandError("malformed", f"cmd/{msg.name}: signed payload: nested 'signed'")
            sent = _reserved(msg.name, obj, "signed payload: ")
        spec = self._specs.get(msg.name)
        if spec is None:
            known = ", ".join(sorted(self._specs))
            raise CommandError("unknown_command", f"unknown command '{msg.name}': expected one of {known}")
        who = msg.user_properties.get("client_id") or (obj.get("client_id") if isinstance(obj.get("client_id"), str)
                                                       else None)
        if spec.changes_state or self.settings.command_auth_all:
            self._authorize(msg, sent, who, signature, signed_bytes)
        args = {k: v for k, v in obj.items() if k not in RESERVED}
        if spec.validator is not None:
            problems = schema.problems(spec.validator, args, "(args)")
            if problems:
                raise CommandError("invalid_args", f"{msg.name}: " + "; ".join(problems))
        if spec.unavailable is not None:
            raise CommandError("not_available", spec.unavailable)
        if spec.handler is None:
            raise CommandError("not_available", f"command '{msg.name}' has no handler on this device")
        return spec, args, who

    def _authorize(self, msg: Incoming, sent: float | None, who: str | None, signature: str | None,
                   signed_bytes: bytes) -> None:
        """The allow-list, then the signature (``sent``: the payload's ``ts`` as unix seconds, None when it has
        none)."""
        allow = self.settings.command_clients
        if allow is not None and who not in allow:
            raise CommandError("unauthorized", f"{msg.name}: client id {who!r} is not in the allow-list "
                                               "(v5 user property or payload field 'client_id')")
        secret = self.settings.command_secret
        if secret is None:
            return
        if not signature:
            raise CommandError("unauthorized", f"{msg.name} changes state and needs an HMAC-SHA256 signature "
                                               f"('{HMAC_KEY}' user property or the signed form)")
        expected = sign(secret.get_secret_value(), self.topics.cmd(msg.name), signed_bytes)
        given = str(signature).lower().encode("utf-8", "replace")   # bytes: compare_digest refuses non-ASCII str
        if not hmac.compare_digest(expected.encode("ascii"), given):
            raise CommandError("unauthorized", f"{msg.name}: bad HMAC-SHA256 signature")
        if sent is None:
            raise CommandError("unauthorized", f"{msg.name}: a signed command needs 'ts' (unix seconds or RFC 3339)")
        now = self.clock()
        skew = self.settings.command_max_skew_s
        if abs(now - sent) > skew:
            raise CommandError("unauthorized", _skew_text(msg.name, now - sent, skew))
        with self._lock:   # the QUICK worker may check a signature at the same time (command_auth_all)
            for sig, until in list(self._seen.items()):
                if until < now:
                    del self._seen[sig]
            key = str(signature).lower()
            if key in self._seen:
                raise CommandError("unauthorized", f"{msg.name}: this signed command was already received (replay)")
            if len(self._seen) >= 100_000:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = now + 2 * skew

    def _run(self, spec: Spec, args: dict) -> dict:
        try:
            out = spec.handler(args)
        except EdgeADError as exc:
            text = str(exc)
            if not text.startswith((f"{spec.name}:", f"{spec.name} ")):   # many messages name it already
                text = f"{spec.name}: {text}"
            raise CommandError("failed", text, exc.reply_fields()) from None
        except Exception as exc:  # a handler bug must not stop the command loop
            if isinstance(exc, OSError) and exc.filename is not None:   # a read-only or full disk: no bug
                log.warning("command %s: %s", spec.name, os_error_text(exc))
                raise CommandError("failed", f"{spec.name}: {os_error_text(exc)}") from None
            log.exception("command %s: handler raised", spec.name)
            raise CommandError("internal", f"{spec.name}: {type(exc).__name__}: {exc}") from None
        if out is None:
            return {}
        if not isinstance(out, Mapping):
            raise CommandError("internal", f"{spec.name}: handler returned {type(out).__name__}, expected a dict")
        # a file name in it (the frames a calibrate left out) may hold a lone surrogate: escaped, as in an error's
        # message, since the command ran (a new calibration in force) and must not be answered as failed for it
        out = valid_unicode(dict(out))
        try:
            payloads.encode(out, f"{spec.name} result")
        except InputError as exc:
            raise CommandError("internal", str(exc)) from None
        return out


def _reserved(name: str, obj: dict, what: str) -> float | None:
    """Check the reserved fields of a command payload (``what``: ``"signed payload: "`` for the one inside the signed
    form), the same for every command, signed or not: their types and sizes (schema ``command``), and ``ts``, which
    must read as a time. A bad one is ``malformed``, naming it and what is expected. Returns ``ts`` as unix seconds,
    None when the payload has none."""
    problems = schema.errors("command", obj)
    sent = payloads.parse_time(obj.get("ts"))
    if not problems and "ts" in obj and sent is None:
        problems = [f"ts: {schema.shown(obj['ts'])} is not a time: expected unix seconds (a number) or an RFC 3339 "
                    "date and time (2025-05-01T12:00:00Z)"]
    if problems:
        raise CommandError("malformed", f"cmd/{name}: {what}" + "; ".join(problems))
    return sent


def _skew_text(name: str, age: float, skew: float) -> str:
    """The refusal of a signed command whose ``ts`` is ``age`` s before this device's clock (negative: after)."""
    if age > 0:
        why = ("made that long ago, or this device's clock is ahead of the sender's")
    else:
        why = "this device's clock is behind the sender's"
    return (f"{name}: the command is {abs(age):.0f} s {'older' if age > 0 else 'newer'} than this device's clock "
            f"(its 'ts'; accepted: within {skew:g} s): {why}; check that both clocks are synchronized (NTP)")


QUEUED, FULL, CLOSED = "queued", "full", "closed"      # what CommandQueue.offer did with a command


class CommandQueue:
    """Bounded queue between the network thread (producer) and a command worker (consumer). Once closed (the
    link stops) it takes no more commands (:data:`CLOSED`) and :meth:`get` hands out those still waiting, to be
    answered without being run, then None."""

    def __init__(self, size: int):
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def offer(self, msg: Incoming) -> str:
        """:data:`QUEUED`, :data:`FULL` or :data:`CLOSED` (stopping: the caller answers it)."""
        if self._closed.is_set():
            return CLOSED
        try:
            self._q.put_nowait(msg)
            return QUEUED
        except queue.Full:
            return FULL

    def close(self) -> None:
        """Take no more commands and wake the worker. Never blocks."""
        self._closed.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass            # the worker sees the closed queue once it has taken what waits

    def get(self) -> Incoming | None:
        """The next command (after :meth:`close`: the next one still waiting), or None once closed and empty."""
        while True:
            try:
                msg = self._q.get(timeout=0.25)
            except queue.Empty:
                if self._closed.is_set():
                    return None
                continue
            if msg is not None:
                return msg
            if self._closed.is_set():
                return None

    def drain(self) -> list[Incoming]:
        """The commands still waiting, taken now (a worker that is stuck in a command will not take them)."""
        out = []
        while True:
            try:
                msg = self._q.get_nowait()
            except queue.Empty:
                return out
            if msg is not None:
                out.append(msg)
