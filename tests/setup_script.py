"""Runs functions of scripts/setup.sh with fake tools (apt-get, sudo, pip's python) on PATH."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"


def fake_tool(folder: Path, name: str, body: str) -> None:
    """An executable ``folder/name`` running the shell ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def source_setup(script: str, path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``script`` run by bash after sourcing scripts/setup.sh, with ``path`` first on PATH."""
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}", "PYTHON": sys.executable}
    return subprocess.run(["bash", "-c", f"source {shlex.quote(str(SETUP))}\n{script}"],
                          capture_output=True, text=True, timeout=timeout, env=env)
