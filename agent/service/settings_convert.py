"""Checking and converting settings, the same for every source; reading --config YAML.

Command-line and environment values arrive as text, YAML values typed; both go
through ``convert`` so that a wrong value gets the same clear message wherever it
was set.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from agent.service.settings_table import FLAGS, Flag
from projects import parse_projects_arg

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_NONE = {"", "none", "null"}


class SettingsError(ValueError):
    """A setting the user got wrong; the message is one line, ready to print."""


def parse_bool(text: str) -> bool | None:
    """True/False for the usual spellings (true/false, 1/0, yes/no, on/off), else None."""
    word = text.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


def convert(flag: Flag, raw: Any, source: str) -> Any:
    """Check and convert one value, from the command line / environment (text) or YAML."""

    def fail(problem: str) -> SettingsError:
        return SettingsError(f"--{flag.name} {problem} (from {source})")

    text = raw if isinstance(raw, str) else None
    if raw is None or (flag.optional and text is not None and text.strip().lower() in _NONE):
        if flag.optional:
            return None
        raise fail("must be set")
    if flag.kind == "bool":
        value = raw if isinstance(raw, bool) else parse_bool(text) if text is not None else None
        if value is None:
            raise fail(f"must be true or false (also 1/0, yes/no), got {raw!r}")
        return value
    if flag.kind == "strs":
        if text is not None:  # the environment's: separated by commas
            items = text.split(",") if source.startswith("environment") else [text]
        else:
            items = raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise fail(f"must be texts, got {type(raw).__name__}")
        if len(items) == 1 and items[0].strip().lower() in _NONE:
            return ()
        return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    if flag.kind == "list":
        items = [raw] if text is not None else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise fail(f"must be names separated by spaces or commas, got {raw!r}")
        if flag.name != "projects":  # other names (broker users): checked where they are used
            names = [n for i in items for n in re.split(r"[\s,]+", i.strip()) if n]
            return () if [n.lower() for n in names] in ([], ["none"]) else tuple(dict.fromkeys(names))
        try:
            return parse_projects_arg(items)
        except ValueError as exc:
            raise fail(f"is invalid: {exc}") from None
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise fail(f"must be a {_kind_word(flag)}, got {raw!r} ({type(raw).__name__})")
    if flag.kind == "str":
        return _choose(flag, str(raw), fail)
    value = _number(flag, raw, text)
    if value is None:
        raise fail(f"must be {'an' if flag.kind == 'int' else 'a'} {_kind_word(flag)}, got {raw!r}")
    if flag.minimum is not None and value < flag.minimum:
        raise fail(f"must be >= {flag.minimum:g}, got {value}")
    if flag.maximum is not None and value > flag.maximum:
        raise fail(f"must be <= {flag.maximum:g}, got {value}")
    return value


def _kind_word(flag: Flag) -> str:
    return {"int": "integer", "float": "number", "str": "string"}.get(flag.kind, flag.kind)


def _number(flag: Flag, raw: str | int | float, text: str | None) -> int | float | None:
    try:
        if flag.kind == "int":
            if text is None:
                return raw if isinstance(raw, int) else None
            return int(text.strip())
        value = float(text.strip()) if text is not None else float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _choose(flag: Flag, value: str, fail: Any) -> str:
    if not flag.choices:
        return value
    for choice in flag.choices:
        if value.strip().lower() == choice.lower():
            return choice
    raise fail(f"must be one of {', '.join(flag.choices)}, got {value!r}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A --config file's settings; unknown keys are an error that lists the valid ones."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SettingsError(f"config file {path} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise SettingsError(f"config file {path} cannot be read as YAML: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of flag names to values")
    valid = [f.name for f in FLAGS if f.in_yaml]
    unknown = [str(k) for k in data if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            k.replace("-", "_"), valid, n=1)) else repr(k) for k in unknown]
        raise SettingsError(f"config file {path}: unknown key(s) {', '.join(hints)}; "
                            f"valid keys: {', '.join(valid)}")
    return data
