"""A config as a TOML file: the nested {section: {key: value}} tables of dist_cnn.config, whose values
are booleans, numbers, strings or lists of strings (all that a config field can hold)."""

from __future__ import annotations

import json
from pathlib import Path

from dist_cnn.fileio import write_text_atomic


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # finite: the config refuses inf and nan
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(tables: dict) -> str:
    out = []
    for section, values in tables.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_value(v)}" for key, v in values.items())
        out.append("")
    return "\n".join(out)


def write(path: Path, tables: dict, header: str = "") -> None:
    """Atomically: a reader (a resumed trial, the report) never sees half a file."""
    write_text_atomic(path, (f"# {header}\n" if header else "") + dumps(tables))
