"""Projects: one YAML file each in this folder; adding one needs no code change.

A project file holds its system prompt, optional generation defaults, its
share of the KV cache and, optionally, ``output_rules``: the name of a module
in this package (``driving_rules``) whose ``check(text)`` and/or
``finalize(text)`` every reply of the project passes through (see
``OutputRules``), and ``plugin``: a module with topics of the project's own
(``projects.plugins``). ``load_project`` reads it; an unknown name gets the generic
assistant of ``general.yaml`` and a warning.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from projects.plugins import PluginModule, load_plugin

log = logging.getLogger(__name__)

PROJECTS_DIR = Path(__file__).resolve().parent
GENERIC = "general"
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_KEYS = {"name", "description", "system_prompt", "temperature", "top_p", "max_tokens", "kv_share",
         "output_rules", "plugin"}


@dataclass(frozen=True)
class OutputRules:
    """What a project requires of its replies, from the module its YAML names.

    ``check(text)`` says why a reply breaks the rules (None: it does not); the
    agent then generates it once more. ``finalize(text)`` gives the text as sent
    (repaired, cut to a limit); it runs on every reply, the retried one included.
    """

    module: str
    check: Callable[[str], str | None] | None = None
    finalize: Callable[[str], str] | None = None


def load_rules(module: str) -> OutputRules:
    """The rules of ``projects/<module>.py``; ValueError if there is no such module."""
    if not _NAME_RE.match(module):
        raise ValueError(f"output_rules {module!r} is no module name of the projects package")
    qualified = f"{__name__}.{module}"
    try:
        loaded = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise
        raise ValueError(f"output_rules {module!r}: there is no projects/{module}.py") from None
    check, finalize = getattr(loaded, "check", None), getattr(loaded, "finalize", None)
    if not callable(check) and not callable(finalize):
        raise ValueError(f"projects/{module}.py defines neither check(text) nor finalize(text)")
    return OutputRules(module, check if callable(check) else None,
                       finalize if callable(finalize) else None)


@dataclass(frozen=True)
class ProjectSpec:
    name: str
    system_prompt: str
    description: str = ""
    temperature: float | None = None  # None: the agent's default
    top_p: float | None = None
    max_tokens: int | None = None
    kv_share: float = 1.0  # relative weight of this project's KV-cache share
    output_rules: OutputRules | None = None
    plugin: PluginModule | None = None  # topics of its own (projects.plugins)


def validate_project_name(name: str) -> str:
    """Project names become MQTT topic levels: letters, digits, '_' and '-' only."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid project name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(it becomes an MQTT topic level)"
        )
    return name


def available_projects(directory: Path = PROJECTS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _read_spec(path: Path, name: str) -> ProjectSpec:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"project file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"project file {path} must hold a mapping")
    unknown = set(data) - _KEYS
    if unknown:
        raise ValueError(f"project file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    prompt = data.get("system_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"project file {path}: 'system_prompt' must be a non-empty string")
    kv_share = float(data.get("kv_share", 1.0))
    if kv_share <= 0:
        raise ValueError(f"project file {path}: 'kv_share' must be > 0")
    rules = data.get("output_rules")
    if rules is not None and not isinstance(rules, str):
        raise ValueError(f"project file {path}: 'output_rules' must be a module name")
    plugin = data.get("plugin")
    if plugin is not None and not isinstance(plugin, str):
        raise ValueError(f"project file {path}: 'plugin' must be a module name")
    try:
        output_rules = load_rules(rules) if rules else None
        plugin_module = load_plugin(plugin) if plugin else None
    except ValueError as exc:
        raise ValueError(f"project file {path}: {exc}") from None
    return ProjectSpec(
        name=name,
        system_prompt=prompt.strip(),
        description=str(data.get("description", "")),
        temperature=data.get("temperature"),
        top_p=data.get("top_p"),
        max_tokens=data.get("max_tokens"),
        kv_share=kv_share,
        output_rules=output_rules,
        plugin=plugin_module,
    )


def load_project(name: str, directory: Path = PROJECTS_DIR) -> ProjectSpec:
    """The spec of project ``name``; an unknown one serves the generic assistant."""
    validate_project_name(name)
    path = directory / f"{name}.yaml"
    if path.is_file():
        return _read_spec(path, name)
    log.warning(
        "unknown project %r (known: %s): serving it with the generic assistant prompt",
        name, ", ".join(available_projects(directory)),
    )
    generic = _read_spec(directory / f"{GENERIC}.yaml", name)
    return generic


def parse_projects_arg(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``--projects`` accepts "a b c", "a,b,c" or a list; order kept, duplicates dropped."""
    parts = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for part in parts:
        for name in re.split(r"[\s,]+", str(part).strip()):
            if name and name not in names:
                names.append(validate_project_name(name))
    if not names:
        raise ValueError("--projects is empty: name at least one project")
    return tuple(names)


@functools.cache
def plugin_of(name: str, directory: Path = PROJECTS_DIR) -> PluginModule | None:
    """The plug-in that project ``name``'s file names (None: none, or no such file)."""
    path = directory / f"{name}.yaml"
    return _read_spec(path, name).plugin if _NAME_RE.match(name) and path.is_file() else None


@functools.cache
def plugin_requests(directory: Path = PROJECTS_DIR) -> frozenset[tuple[str, str]]:
    """``(project, request topic name)`` of every project here with a plug-in: request topics
    of any agent that serves it (what our agent must never publish on)."""
    return frozenset((name, request) for name in available_projects(directory)
                     if (module := plugin_of(name, directory)) for request in module.requests)
