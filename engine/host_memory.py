"""Memory the CPU engine may take: the host's available memory, within its cgroup's limit.

Under systemd's ``MemoryMax`` (systemd/vllm-deploy.service) the process is killed at its
cgroup's limit, whatever the host has free: sizing the CPU KV cache from the host's
available memory alone would plan past that limit. cgroup v2 (``memory.max``,
``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``) are read.
"""

from __future__ import annotations

from pathlib import Path

import psutil

UNLIMITED_V1 = 1 << 60  # cgroup v1 writes "no limit" as a huge number near 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"),
                    root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit; None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            folder = root / relative
            limit, used = folder / "memory.max", folder / "memory.current"
        elif "memory" in controllers.split(","):
            folder = root / "memory" / relative
            limit, used = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
        else:
            continue
        most, now = _read_int(limit), _read_int(used)
        if most is not None and now is not None and most < UNLIMITED_V1:
            return max(0, most - now)
    return None


def available_bytes() -> int:
    """The host's available memory, or less if this process's cgroup allows less."""
    available = psutil.virtual_memory().available
    headroom = cgroup_headroom()
    return available if headroom is None else min(available, headroom)
