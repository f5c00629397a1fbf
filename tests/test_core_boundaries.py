"""The shape of agent/: a transport-free core, front doors beside it, projects as plug-ins.

- Importing every module of ``agent.core`` pulls in no front door (``agent.mqtt``, paho, an
  HTTP stack), no service wiring and no project's own module (only ``projects`` and its
  plug-in interface).
- No code under ``agent/`` names a project: a project's own topics and rules come from
  ``projects/`` (maze's through its plug-in). The only names are the defaults of three flags
  (``--projects``, ``--legacy_project``, ``--legacy_driving_project``).
- No import circles in ``agent/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"
PROJECT_NAMES = {p.stem for p in (ROOT / "projects").glob("*.yaml")}
FLAG_DEFAULTS = {AGENT / "service" / "settings_table.py", AGENT / "service" / "config.py"}


def test_the_core_imports_no_front_door_no_service_and_no_project_by_name() -> None:
    code = (
        "import pkgutil, importlib, sys, agent.core\n"
        "for m in pkgutil.walk_packages(agent.core.__path__, 'agent.core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    assert "agent.core.conversation" in loaded and "agent.core.session_store_redis" in loaded
    forbidden = [m for m in loaded if m.split(".")[0] in ("paho", "fastapi", "uvicorn", "starlette")
                 or m.startswith(("agent.mqtt", "agent.service", "agent.http", "agent.demo"))]
    assert not forbidden, forbidden
    assert {m for m in loaded if m.startswith("projects")} <= {"projects", "projects.plugins"}


def string_constants(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_code_under_agent_names_a_project() -> None:
    named = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
             for path in sorted(AGENT.rglob("*.py")) if path not in FLAG_DEFAULTS
             and AGENT / "demo" not in path.parents  # the demo shows every shipped project
             for line, value in string_constants(path) if value in PROJECT_NAMES]
    assert not named, named


def test_only_flag_defaults_name_projects() -> None:
    """The check above can fail: the defaults it allows are there."""
    allowed = {value for path in FLAG_DEFAULTS for _, value in string_constants(path)}
    assert {"general", "driving"} <= allowed & PROJECT_NAMES


def imports_within_agent(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agent."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("agent."))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circles_in_agent() -> None:
    """Every import counts: lazy ones and those for type checking too."""
    graph = {module_name(p): imports_within_agent(p) for p in AGENT.rglob("*.py")}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, f"import circle: {' -> '.join([*path, target])}"
            if target in graph and target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_a_front_door_never_reaches_into_another() -> None:
    for door, other in (("mqtt", "agent.http"), ("http", "agent.mqtt")):
        for path in (AGENT / door).rglob("*.py"):
            reached = {m for m in imports_within_agent(path) if m.startswith(other)}
            assert not reached, f"{path.relative_to(ROOT)} imports {reached}"
