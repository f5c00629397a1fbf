"""The lock of exact versions: scripts/setup.sh installs it, scripts/refresh_lock.sh writes it.

The set-up runs with a fake venv python that records its arguments, so nothing is installed;
refresh_lock.sh runs whole, with a fake ``python3`` whose venvs pass or fail the suite.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.setup_script import ROOT, fake_tool, source_setup

LOCK = ROOT / "requirements-lock.txt"
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")


def pins(text: str) -> dict[str, str]:
    """``name -> version`` of a lock's ``name==version`` lines, names normalised as pip does."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            names.add(re.sub(r"[-_.]+", "-", re.split(r"[\[=<>!~; @]", line)[0]).lower())
    return names


def setup_value(name: str) -> str:
    return re.search(rf'^{name}="([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text(),
                     re.M).group(1)


# ---------------------------------------------------------------- the lock file


def test_the_lock_pins_every_package_exactly() -> None:
    """Every line a ``name==version`` pin, every package of requirements*.txt among them, torch
    and AutoAWQ at the set-up's own pins, and the transitive packages too."""
    text = LOCK.read_text()
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s+;]+", line), line
    locked = pins(text)
    wanted = set().union(*(requirement_names((ROOT / name).read_text()) for name in REQUIREMENTS))
    assert wanted <= set(locked), wanted - set(locked)
    assert f"torch=={locked['torch']}" == setup_value("TORCH_PIN")
    assert f"autoawq=={locked['autoawq']}" == setup_value("AUTOAWQ_PIN")
    assert {"jinja2", "numpy", "sympy", "huggingface-hub"} <= set(locked)  # transitive ones


# ---------------------------------------------------------------- scripts/setup.sh


def fake_venv(folder: Path, calls: Path, freeze: str = "", fail_on: str = "") -> Path:
    """A venv whose python records its arguments (one call a line), prints ``freeze`` for
    ``pip freeze`` and fails a call containing ``fail_on``."""
    body = f'echo "$*" >> {calls}\n'
    if fail_on:
        body += f'case "$*" in *{fail_on}*) echo "ERROR: no such version" >&2; exit 1;; esac\n'
    body += f'[ "$*" = "-m pip freeze" ] && printf %s {shlex.quote(freeze)}\nexit 0'
    fake_tool(folder / "bin", "python", body)
    return folder


def repo_copy(folder: Path) -> Path:
    folder.mkdir()
    for name in (*REQUIREMENTS, LOCK.name):
        shutil.copy(ROOT / name, folder / name)
    return folder


def ensure_venv_in(repo: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    script = f"ROOT={shlex.quote(str(repo))}; VENV={shlex.quote(str(venv))}; " \
             'STAMP="$VENV/.requirements-stamp"; ensure_venv'
    return source_setup(script, repo)


def pip_calls(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line for line in lines if line.startswith("-m pip")]


def test_setup_installs_the_lock_torch_first_and_again_only_when_it_changes(
        tmp_path: Path) -> None:
    """README: "installs, at the exact versions of `requirements-lock.txt` ..., `torch==2.13.0`
    first, then `requirements-dev.txt` (... AutoAWQ's packing code, the latter with
    `--no-deps`) ... A stamp file holds a hash of the requirements and the lock, so the next run
    skips this step and starts at once; a changed lock refreshes `.venv`." """
    repo, calls = repo_copy(tmp_path / "repo"), tmp_path / "calls"
    venv = fake_venv(tmp_path / "venv", calls)
    result = ensure_venv_in(repo, venv)
    assert result.returncode == 0, result.stderr
    first = pip_calls(calls)
    lock = f"-c {repo}/requirements-lock.txt"
    quiet = "-m pip install -q --progress-bar off"
    assert first[0] == f"{quiet} {lock} {setup_value('TORCH_PIN')}"
    assert first[1] == f"{quiet} {lock} -r {repo}/requirements-dev.txt"
    assert first[2] == f"{quiet} {lock} --no-deps {setup_value('AUTOAWQ_PIN')}"
    assert first[3:] == ["-m pip freeze"]  # what to remove: nothing
    steps = [line for line in result.stderr.splitlines() if line.startswith("setup: [")]
    assert [line[:12] for line in steps] == [f"setup: [{i}/4]" for i in range(1, 5)]
    assert (venv / ".requirements-stamp").is_file()
    assert ensure_venv_in(repo, venv).returncode == 0
    assert pip_calls(calls) == first  # the second run: nothing installed
    with (repo / "requirements-lock.txt").open("a") as f:
        f.write("extra-package==1.0\n")
    refreshed = ensure_venv_in(repo, venv)
    assert refreshed.returncode == 0 and "refreshing" in refreshed.stderr
    assert pip_calls(calls) == first * 2


def test_setup_removes_what_the_lock_does_not_list(tmp_path: Path) -> None:
    """A package left from an older lock goes: the venv is the lock, not a superset."""
    repo, calls = repo_copy(tmp_path / "repo"), tmp_path / "calls"
    freeze = "torch==2.13.0+cpu\nPyYAML==6.0.4\nOld_Package==0.1\nzombie.pkg==2\n"
    venv = fake_venv(tmp_path / "venv", calls, freeze=freeze)
    assert ensure_venv_in(repo, venv).returncode == 0
    assert pip_calls(calls)[-1] == "-m pip uninstall -q -y old-package zombie-pkg"


def test_setup_refuses_a_requirement_the_lock_does_not_pin(tmp_path: Path) -> None:
    """A dependency added to requirements.txt without refreshing the lock: one line with the
    fix, and nothing installed."""
    repo, calls = repo_copy(tmp_path / "repo"), tmp_path / "calls"
    with (repo / "requirements.txt").open("a") as f:
        f.write("a-package-nobody-locked>=0.110\n")
    result = ensure_venv_in(repo, fake_venv(tmp_path / "venv", calls))
    assert result.returncode != 0 and pip_calls(calls) == []
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('setup: FAILED at step "check the lock": ')
    assert "a-package-nobody-locked" in last and "scripts/refresh_lock.sh" in last


def test_a_failed_install_ends_with_one_line_naming_the_step_and_the_fix(
        tmp_path: Path) -> None:
    repo, calls = repo_copy(tmp_path / "repo"), tmp_path / "calls"
    result = ensure_venv_in(repo, fake_venv(tmp_path / "venv", calls, fail_on="requirements-dev"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "pip: ERROR: no such version" in "\n".join(lines)  # pip's own lines, shown
    assert lines[-1].startswith(
        'setup: FAILED at step "install requirements-dev.txt from the lock": check the network')
    assert not (tmp_path / "venv" / ".requirements-stamp").exists()


def test_a_missing_python_venv_ends_with_the_apt_get_fix(tmp_path: Path) -> None:
    fake_tool(tmp_path / "bin", "python3", "exit 1")  # no venv module, and no way to install
    fake_tool(tmp_path / "bin", "apt-get", "exit 1")
    fake_tool(tmp_path / "bin", "id", "echo 1000")
    fake_tool(tmp_path / "bin", "sudo", "exit 1")
    result = source_setup("PYTHON=python3; setup_all", tmp_path / "bin")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        'setup: FAILED at step "python3 with venv": '
        "sudo apt-get install -y python3 python3-venv")


# ---------------------------------------------------------------- scripts/refresh_lock.sh

NEWEST = "transformers==9.0.0\nkernels==1.0.0\ntorch==2.13.0+cpu\nautoawq==0.2.9\n"


def run_refresh(tmp_path: Path, suite_exit: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    """refresh_lock.sh in a copy of the repository, with a fake ``python3`` whose venvs
    "install" ``NEWEST``, and whose pytest exits ``suite_exit``."""
    repo = repo_copy(tmp_path / "repo")
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    venv_python = (
        f'echo "$*" >> {calls}\n'
        f'case "$*" in "-m pip freeze") printf %s {shlex.quote(NEWEST)};; '
        f'"-m pytest"*) exit {suite_exit};; esac\nexit 0')
    fake_tool(bin_dir, "python3", (
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        f'printf "#!/bin/sh\\n%s\\n" {shlex.quote(venv_python)} > "$3/bin/python"; '
        'chmod +x "$3/bin/python"; fi\nexit 0'))
    fake_tool(bin_dir, "mosquitto", "exit 0")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "python3",
           "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(repo / "scripts" / "refresh_lock.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    return result, repo


def test_refresh_rewrites_the_lock_from_a_passing_venv(tmp_path: Path) -> None:
    result, repo = run_refresh(tmp_path, suite_exit=0)
    assert result.returncode == 0, result.stderr
    lock = (repo / "requirements-lock.txt").read_text()
    assert pins(lock) == {"autoawq": "0.2.9", "kernels": "1.0.0", "torch": "2.13.0",
                          "transformers": "9.0.0"}
    assert "scripts/refresh_lock.sh" in lock.splitlines()[1]
    calls = (tmp_path / "calls").read_text()
    assert "-m pytest -q -p no:cacheprovider" in calls and "-m agent.demo" in calls
    assert "requirements-lock.txt" not in calls  # the newest releases, not the old lock's
    assert not list(tmp_path.glob("vllm-deploy-newest.*"))  # the throwaway venv is gone


def test_refresh_keeps_the_lock_when_the_suite_fails(tmp_path: Path) -> None:
    result, repo = run_refresh(tmp_path, suite_exit=1)
    assert result.returncode != 0
    assert (repo / "requirements-lock.txt").read_text() == LOCK.read_text()
    assert result.stderr.strip().splitlines()[-1].startswith(
        'setup: FAILED at step "the test suite (pytest exit 1)"')
    assert "agent.demo" not in (tmp_path / "calls").read_text()


def test_refresh_counts_a_run_without_tests_as_a_failure(tmp_path: Path) -> None:
    result, repo = run_refresh(tmp_path, suite_exit=5)
    assert result.returncode != 0
    assert (repo / "requirements-lock.txt").read_text() == LOCK.read_text()
