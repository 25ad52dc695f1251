"""JSON schemas of every payload (``edge_ad/schemas/*.schema.json``, shipped in the package).

Names: ``status``, ``result``, ``event``, ``telemetry``, ``calibration``, ``reply`` (command replies),
``command`` (the command envelope) and ``cmd.<name>`` (each command's arguments).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema

from ..errors import InputError, clip_text

PAYLOADS = ("status", "result", "event", "telemetry", "calibration", "reply", "command")


def schema_names() -> list[str]:
    folder = resources.files("edge_ad") / "schemas"
    return sorted(p.name[: -len(".schema.json")] for p in folder.iterdir() if p.name.endswith(".schema.json"))


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The schema ``name`` as a dict; :class:`InputError` when there is none."""
    path = resources.files("edge_ad") / "schemas" / f"{name}.schema.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no payload schema '{name}': expected one of {', '.join(schema_names())}") from None
    return json.loads(text)


@functools.lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validator_for(schema: dict) -> jsonschema.protocols.Validator:
    """A validator for a schema given as a dict (commands registered with their own schema)."""
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


SHOWN = 60          # characters of a refused string that a message quotes
MOST_LISTED = 5     # unexpected field names a message lists


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shown(value: Any) -> str:
    """``value`` as a refusal quotes it, short whatever was sent: a string as ``'abc'``, one over :data:`SHOWN`
    characters cut, with its length (``'rrrr…' (300 characters)``); a long array or object by its size (``an array
    of 200 items``); anything else as its ``repr``, cut."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN else f"{value[:SHOWN]!r}… ({len(value)} characters)"
    text = repr(value)
    if len(text) <= SHOWN:
        return text
    if isinstance(value, list):
        return f"an array of {_count(len(value), 'item')}"
    if isinstance(value, dict):
        return f"an object of {_count(len(value), 'field')}"
    return clip_text(text, SHOWN)


def _sized(value: Any) -> str:
    """What a length limit counts in ``value``: ``a string of 300 characters``, ``an empty array``."""
    if isinstance(value, str):
        kind, noun, of = "string", "character", "of"
    elif isinstance(value, dict):
        kind, noun, of = "object", "field", "with"
    else:
        kind, noun, of = "array", "item", "of"
    if not value:
        return f"an empty {kind}"
    return f"{'an' if kind[0] in 'ao' else 'a'} {kind} {of} {_count(len(value), noun)}"


_LIMITS = {"maxLength": ("is too long", "at most"), "maxItems": ("is too long", "at most"),
           "maxProperties": ("has too many fields", "at most"), "minLength": ("is too short", "at least"),
           "minItems": ("is too short", "at least"), "minProperties": ("has too few fields", "at least")}


def error_text(err: jsonschema.ValidationError) -> str:
    """The message of a jsonschema error, with what it refuses quoted short (:func:`shown`). jsonschema's own
    message quotes the value whole (``'rrr...' is too long``): cut to a length, it lost the verdict and the limit;
    and it never says a length limit. Length limits: ``a string of 300 characters is too long (at most 256)``;
    fields no property allows: ``unexpected field 'bogus' (expected only 'reason')``; the rest (``pattern``,
    ``enum``, ``type``, ``format``, ...): jsonschema's message with the value in it quoted short."""
    value = err.instance
    if err.validator in _LIMITS and isinstance(value, (str, list, dict)):
        verdict, bound = _LIMITS[err.validator]
        return f"{_sized(value)} {verdict} ({bound} {err.validator_value})"
    if (err.validator == "additionalProperties" and err.validator_value is False and isinstance(value, dict)
            and not err.schema.get("patternProperties")):
        allowed = list(err.schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        names = ", ".join(shown(k) for k in extra[:MOST_LISTED])
        if len(extra) > MOST_LISTED:
            names += f" and {len(extra) - MOST_LISTED} more"
        expected = f"expected only {', '.join(map(repr, allowed))}" if allowed else "expected none"
        return clip_text(f"unexpected field{'s' if len(extra) > 1 else ''} {names} ({expected})", 300)
    text = err.message
    quoted = repr(value)
    if len(quoted) > SHOWN:
        text = text.replace(quoted, shown(value))
    return clip_text(text, 300)     # what is left is the schema's (an enum's values, a pattern): short enough


def problems(checker: jsonschema.protocols.Validator, obj: Any, root: str = "(root)") -> list[str]:
    """Every violation of ``checker``'s schema by ``obj``, as ``path: message`` lines ordered by path (``root`` for
    the object itself), each message from :func:`error_text`; empty when it is valid."""
    out = []
    for err in sorted(checker.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        where = clip_text("/".join(str(p) for p in err.absolute_path), 100) or root
        out.append(f"{where}: {error_text(err)}")
    return out


def errors(name: str, obj: Any) -> list[str]:
    """Every violation of schema ``name`` by ``obj``, as ``path: message`` lines (empty when valid):
    :func:`problems`."""
    return problems(validator(name), obj)


def validate(name: str, obj: Any, what: str | None = None) -> None:
    """Raise :class:`InputError` listing what in ``obj`` breaks schema ``name``."""
    found = errors(name, obj)
    if found:
        raise InputError(f"{what or name} payload does not match schema '{name}': " + "; ".join(found))
