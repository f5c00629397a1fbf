"""No import name of ours is also an installed distribution's: the `kernels` collision, guarded.

transformers >= 5.25 imports the distribution `kernels` by that name; our Triton package was
called `kernels` too and, first on ``sys.path`` (the repository root), was imported in its
place. These tests list every name we put on ``sys.path`` and fail when an installed
distribution provides one of them (``importlib.metadata.packages_distributions()``), and check
that transformers' model classes import from the repository root, as the agent and demo run.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Folders whose modules are importable as top-level names too: pytest puts tests/ first on
# sys.path for the test modules, and a bench script run by its path has bench/ there.
SCRIPT_FOLDERS = ("tests", "bench")


def importable_names(folder: Path) -> set[str]:
    """Top-level names that ``folder`` on ``sys.path`` makes importable: modules, packages,
    and namespace packages (folders holding Python files)."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier() and any(entry.glob("*.py")):
            names.add(entry.name)
    return names - {"__init__"}


def collisions(folder: Path, provided: dict[str, list[str]]) -> dict[str, list[str]]:
    """Our names in ``folder`` that an installed distribution also provides, with those
    distributions."""
    return {name: provided[name] for name in sorted(importable_names(folder)) if name in provided}


def test_no_name_of_ours_is_an_installed_distributions_package() -> None:
    provided = importlib.metadata.packages_distributions()
    found = {}
    for folder in (ROOT, *(ROOT / name for name in SCRIPT_FOLDERS)):
        found.update({f"{folder.relative_to(ROOT)}/{name}": dists
                      for name, dists in collisions(folder, provided).items()})
    assert not found, (
        f"names of ours that installed distributions also import under: {found}; rename ours "
        "(an import from the repository root gets ours instead of theirs)")


def test_no_name_of_ours_is_a_standard_library_module() -> None:
    """The same for Python's own modules: ``bench/http.py`` run as a script would be imported
    as ``http`` by everything that needs the standard library's (urllib, the openai client)."""
    found = [f"{folder.relative_to(ROOT)}/{name}" for folder in (ROOT, *(ROOT / n for n in
             SCRIPT_FOLDERS)) for name in sorted(importable_names(folder))
             if name in sys.stdlib_module_names]
    assert not found, f"names of ours that are standard library modules: {found}"


def test_the_guard_sees_a_root_folder_named_like_an_installed_package(tmp_path: Path) -> None:
    """The check itself can fail: a root with a folder named like an installed
    distribution's package (pytest's own; and `kernels`, the one that bit us)."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "pytest.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "int_gemm.py").write_text("")  # a namespace package shadows too
    provided = importlib.metadata.packages_distributions()
    found = collisions(tmp_path, provided)
    assert "pytest" in found and "engine" not in found
    assert ("kernels" in found) == ("kernels" in provided)
    assert collisions(tmp_path, {"kernels": ["kernels"]}) == {"kernels": ["kernels"]}


def test_our_triton_package_does_not_take_the_name_kernels() -> None:
    assert not (ROOT / "kernels").exists()
    assert (ROOT / "deploy_kernels" / "__init__.py").is_file()


def test_transformers_model_classes_import_from_the_repository_root() -> None:
    """As ``python -m agent.demo`` and ``vLLMDeploy.py`` run: the root first on ``sys.path``.
    With transformers >= 5.25 this imports its ``kernels`` integration too."""
    code = (
        "import sys; assert sys.path[0] in ('', '.'), sys.path[0]\n"
        "from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\n"
        "import importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "if spec is not None:\n"
        "    where = pathlib.Path(spec.origin or next(iter(spec.submodule_search_locations)))\n"
        "    assert 'site-packages' in where.parts, where\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
