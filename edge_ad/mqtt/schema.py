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

from ..errors import InputError

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


def errors(name: str, obj: Any) -> list[str]:
    """Every violation of schema ``name`` by ``obj``, as ``path: message`` lines (empty when valid)."""
    out = []
    for err in sorted(validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{where}: {err.message}")
    return out


def validate(name: str, obj: Any, what: str | None = None) -> None:
    """Raise :class:`InputError` listing what in ``obj`` breaks schema ``name``."""
    problems = errors(name, obj)
    if problems:
        raise InputError(f"{what or name} payload does not match schema '{name}': " + "; ".join(problems))
