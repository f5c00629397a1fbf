"""Settings of ``vLLMDeploy.py``: command line > environment > YAML (--config) > defaults.

Everything is derived from the one table in ``agent.service.settings_table``. This module
imports no torch: ``vLLMDeploy.py`` parses settings and pins the visible GPUs
before torch is imported anywhere. ``python -m agent.service.settings --markdown`` prints
the README's flag table.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from agent.service.settings_convert import SettingsError, convert, load_yaml
from agent.service.settings_table import (
    BY_NAME,
    FLAGS,
    README_BEGIN,
    README_END,
    Flag,
    default_yaml,
    format_default,
    markdown_table,
    readme_table,
)

if TYPE_CHECKING:
    from agent.service.config import AgentConfig
    from engine.api import EngineConfig

CLI, ENV, YAML, DEFAULT = "command line", "environment", "config file", "default"
_RANK = {CLI: 3, ENV: 2, YAML: 1, DEFAULT: 0}
__all__ = ["Settings", "SettingsError", "build_parser", "load_yaml", "parse_settings"]


# ---------------------------------------------------------------- sources


class _Formatter(argparse.HelpFormatter):
    def _split_lines(self, text: str, width: int) -> list[str]:  # keep --no-x in one piece
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line instead of usage + exit
        raise SettingsError(message)


def build_parser(prog: str = "vLLMDeploy.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Serve one LLM to several projects over MQTT, on our own engine.",
        epilog="Every flag also has a dash spelling (--max-tokens) and an environment variable; "
        "precedence: command line > environment > --config YAML > defaults.",
        usage="%(prog)s [--projects NAME ...] [--model PATH_OR_ID] [options]",
        allow_abbrev=False,
        formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS,
    )
    groups: dict[str, Any] = {}
    for flag in FLAGS:
        group = groups.get(flag.group) or groups.setdefault(
            flag.group, parser.add_argument_group(flag.group))
        extra = f"; --no-{flag.name} turns it off" if flag.kind == "bool" else ""
        help_text = f"{flag.help} [default: {format_default(flag)}; env: {flag.env}{extra}]"
        kw: dict[str, Any] = {"dest": flag.name, "help": help_text.replace("%", "%%"),
                              "default": argparse.SUPPRESS}
        if flag.kind == "bool":
            group.add_argument(*flag.options, nargs="?", const=True, metavar="BOOL", **kw)
            group.add_argument(*flag.negations, dest=flag.name, action="store_const",
                               const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif flag.kind == "list":
            group.add_argument(*flag.options, nargs="+", metavar=flag.metavar, **kw)
        elif flag.kind == "strs":
            group.add_argument(*flag.options, action="append", metavar=flag.metavar, **kw)
        else:
            metavar = ("{" + ",".join(flag.choices) + "}" if flag.choices else flag.metavar
                       or {"int": "N", "float": "NUM"}.get(flag.kind, "TEXT"))
            group.add_argument(*flag.options, metavar=metavar, **kw)
    return parser


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Every flag's value (``settings.max_tokens``) and where it came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]  # flag name -> command line | environment | config file | default
    notices: tuple[str, ...] = field(default=())  # warnings for the launcher to log

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"no setting {name!r}")

    def __repr__(self) -> str:
        return f"Settings({dict(self.masked())})"

    def masked(self) -> dict[str, Any]:
        """Values safe to log: secrets replaced by '***'."""
        return {k: ("***" if BY_NAME[k].secret and v is not None else v)
                for k, v in self.values.items()}

    def describe(self) -> list[str]:
        return [f"{k} = {v!r} ({self.sources[k]})" for k, v in self.masked().items()]

    def agent_config(self) -> AgentConfig:
        """The agent's settings, checked (TLS files included: before the model loads)."""
        from agent.service.checks import check_agent_config
        from agent.service.config import AgentConfig

        config = AgentConfig(**_kwargs_for(AgentConfig, "agent", self.values))
        check_agent_config(config)
        return config

    def engine_config(
        self, model_path: str | None = None, project_shares: Mapping[str, float] | None = None
    ) -> EngineConfig:
        """``project_shares``: each served project's ``kv_share`` (from its YAML); unset:
        one pool, shared equally by the projects as they appear."""
        from engine.api import EngineConfig

        kwargs = _kwargs_for(EngineConfig, "engine", self.values)
        kwargs["model_path"] = str(model_path if model_path is not None else self.model)
        kwargs["project_shares"] = tuple((project_shares or {}).items())
        if self.sources["max_model_len"] == DEFAULT:  # the old default, within the model's limit
            kwargs["max_model_len"], kwargs["max_model_len_limit"] = None, self.max_model_len
        return EngineConfig(**kwargs)


def _kwargs_for(cls: type, target: str, values: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    kwargs = {f.name: values[f.name] for f in FLAGS if f.target == target}
    missing = sorted(set(kwargs) - names)
    if missing:  # the table and the config class disagree: a bug, not a user error
        raise RuntimeError(f"{cls.__name__} has no field(s) {missing} that the settings table maps")
    return kwargs


def _reject_not_yet_supported(values: dict[str, Any]) -> None:
    """Values this engine does not support yet: clear errors, never silently ignored.

    Each check goes away with the issue that brings the feature.
    """
    if values["tensor_parallel_size"] != 1:
        raise SettingsError(f"--tensor_parallel_size {values['tensor_parallel_size']}: this engine "
                            "runs a model on one GPU; use --tensor_parallel_size 1")
    if values["quantization"] in ("none", "auto"):
        values["quantization"] = None  # what the checkpoint's config says


def _read_password_file(values: dict[str, Any], sources: dict[str, str], notes: list[str]) -> None:
    path = values["mqtt_password_file"]
    if path is None:
        return
    if values["mqtt_password"] is not None:
        if _RANK[sources["mqtt_password"]] == _RANK[sources["mqtt_password_file"]]:
            raise SettingsError("give either --mqtt_password or --mqtt_password_file, not both")
        if _RANK[sources["mqtt_password"]] > _RANK[sources["mqtt_password_file"]]:
            return
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--mqtt_password_file {path} cannot be read: "
                            f"{exc.strerror if isinstance(exc, OSError) else exc}") from None
    if not lines or not lines[0]:
        raise SettingsError(f"--mqtt_password_file {path}: the first line (the password) is empty")
    if file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        notes.append(f"the password file {path} is readable by other users: chmod 600 it")
    values["mqtt_password"] = lines[0]
    sources["mqtt_password"] = sources["mqtt_password_file"]


def _read_api_key_file(values: dict[str, Any]) -> None:
    path = values["api_key_file"]
    if path is None:
        return
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--api_key_file {path} cannot be read: "
                            f"{exc.strerror if isinstance(exc, OSError) else exc}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not keys:
        raise SettingsError(f"--api_key_file {path} holds no key (one a line)")
    values["api_key"] = tuple(dict.fromkeys((*values["api_key"], *keys)))


def _pick(flag: Flag, given: Mapping[str, Any], environ: Mapping[str, str],
          from_yaml: Mapping[str, Any], config: str | None) -> tuple[Any, str]:
    """One flag's value and its level; an empty environment variable counts as unset."""
    if flag.name in given:
        return convert(flag, given[flag.name], "the command line"), CLI
    if environ.get(flag.env, "") != "":
        return convert(flag, environ[flag.env], f"environment variable {flag.env}"), ENV
    if flag.name in from_yaml:
        return convert(flag, from_yaml[flag.name], f"config file {config}"), YAML
    return flag.default, DEFAULT


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """The settings for ``argv`` (default: sys.argv[1:]) and ``environ`` (default: os.environ)."""
    environ = os.environ if environ is None else environ
    given = vars(build_parser().parse_args(list(sys.argv[1:] if argv is None else argv)))
    config, _ = _pick(BY_NAME["config"], given, environ, {}, None)
    from_yaml = load_yaml(config) if config else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for flag in FLAGS:
        values[flag.name], sources[flag.name] = _pick(flag, given, environ, from_yaml, config)
    notes: list[str] = []
    if sources["mqtt_password"] == CLI:
        notes.append("the MQTT password was given on the command line, where any user can read "
                     "it in `ps`; use --mqtt_password_file or VLLM_DEPLOY_MQTT_PASSWORD instead")
    _read_password_file(values, sources, notes)
    _read_api_key_file(values)
    _reject_not_yet_supported(values)
    settings = Settings(MappingProxyType(values), MappingProxyType(sources), tuple(notes))
    try:
        settings.agent_config()
        settings.engine_config()  # values the table's bounds let through (--block_size 12)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return settings


# ---------------------------------------------------------------- README table


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m agent.service.settings", description=__doc__)
    cli.add_argument("--markdown", action="store_true", help="print the README flag table")
    cli.add_argument("--update-readme", metavar="README.md",
                     help="rewrite the table between the README's flag-table markers")
    cli.add_argument("--default-yaml", action="store_true", help="print configs/default.yaml")
    args = cli.parse_args(argv)
    if args.default_yaml:
        sys.stdout.write(default_yaml())
        return 0
    if args.update_readme:
        path = Path(args.update_readme)
        text = path.read_text(encoding="utf-8")
        if readme_table(text) is None:
            print(f"{path}: no {README_BEGIN} ... {README_END} markers", file=sys.stderr)
            return 1
        head, rest = text.split(README_BEGIN, 1)
        tail = rest.split(README_END, 1)[1]
        path.write_text(f"{head}{README_BEGIN}\n{markdown_table()}{README_END}{tail}",
                        encoding="utf-8")
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    cli.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
