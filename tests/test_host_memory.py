"""engine.host_memory: the CPU KV cache is sized within the cgroup's memory limit (systemd's
MemoryMax), not from the host's free memory alone."""

from __future__ import annotations

from pathlib import Path

from engine.host_memory import available_bytes, cgroup_headroom


def cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    proc, root = cgroup(tmp_path, "0::/system.slice/vllm-deploy.service\n", {
        "system.slice/vllm-deploy.service/memory.max": "8589934592\n",
        "system.slice/vllm-deploy.service/memory.current": "1073741824\n"})
    assert cgroup_headroom(proc, root) == 7 * 1024**3


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    proc, root = cgroup(tmp_path, "0::/user.slice\n", {
        "user.slice/memory.max": "max\n", "user.slice/memory.current": "123\n"})
    assert cgroup_headroom(proc, root) is None


def test_cgroup_v1_limit_and_no_limit(tmp_path: Path) -> None:
    proc, root = cgroup(tmp_path, "4:memory:/agent\n0::/\n", {
        "memory/agent/memory.limit_in_bytes": "2000\n",
        "memory/agent/memory.usage_in_bytes": "500\n"})
    assert cgroup_headroom(proc, root) == 1500
    (root / "memory/agent/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_headroom(proc, root) is None


def test_no_cgroup_file_and_the_host_figure(tmp_path: Path) -> None:
    assert cgroup_headroom(tmp_path / "missing", tmp_path) is None
    assert available_bytes() > 0
