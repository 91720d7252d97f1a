"""One TOML home: reading files, writing flat tables and reading values into typed dataclass fields.

risloc writes TOML for scenarios (:meth:`risloc.Scenario.to_toml`) and training
configurations (:meth:`risloc.nn.config.TrainConfig.to_toml`), and reads values from TOML
files and ``--set field=value`` strings into dataclass fields. Both directions live here:

* :func:`read_toml`: a file's table, or :class:`~risloc._files.InputError` naming the file;
* :func:`toml_value` / :func:`dumps`: booleans, numbers (``repr``, so floats round-trip),
  strings (JSON-quoted, a subset of TOML's basic strings), lists and tuples, in flat tables;
* :func:`coerce`: a value (from TOML or a command-line string) to a field's declared type
  (``bool``: true/false/yes/no/on/off/1/0; ``int``: integral floats accepted; ``float``;
  ``str``; ``tuple[float, ...]``: a list or "a, b, c"; ``dict``: a TOML inline table;
  ``X | None`` for X one of those scalars: None or the strings none/off, else as ``X``),
  ValueError naming the field otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ._files import InputError

__all__ = ["read_toml", "toml_value", "dumps", "coerce"]

_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


def read_toml(path: str | os.PathLike) -> dict:
    """The table of a TOML file; :class:`InputError` naming the file and the line if it is not TOML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TOML file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid TOML (not UTF-8 text: {exc.reason} at byte {exc.start})") from None


def toml_value(value: Any) -> str:
    """One value as TOML (bool, int, float, str, list/tuple of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(tables: dict[str, dict[str, Any]]) -> str:
    """Write a mapping of flat tables (``{"section": {"key": value}}``) as TOML (None values are left out)."""
    out: list[str] = []
    for section, table in tables.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None)
        out.append("")
    return "\n".join(out)


def coerce(f: dataclasses.Field, value: Any, label: str | None = None) -> Any:
    """``value`` read as the declared type of field ``f`` (see the module docstring); ValueError
    "<label>: cannot read <value> as <type>" (label: ``field 'name'`` unless given)."""
    typ = f.type if isinstance(f.type, type) else _TYPES.get(str(f.type), str(f.type))
    if isinstance(typ, str) and typ.endswith(" | None") and typ[: -len(" | None")] in _TYPES:  # e.g. "float | None"
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
            return None
        typ = _TYPES[typ[: -len(" | None")]]
    name = getattr(typ, "__name__", str(typ))
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, str):
                value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if str(typ).startswith("tuple"):
            if isinstance(value, str):
                value = [float(v) for v in value.strip("()[] ").split(",")]
            return tuple(float(v) for v in value)
        if str(typ).startswith("dict"):
            if isinstance(value, str):
                return tomllib.loads(f"x = {value}")["x"]
            return dict(value)
    except (TypeError, ValueError, tomllib.TOMLDecodeError):
        raise ValueError(f"{label or f'field {f.name!r}'}: cannot read {value!r} as {name}") from None
    return value
