"""A cgroup v1 ``cpu`` group per local sandbox: a CFS quota, and a sweep that kills every
process still in it at teardown (escaped grandchildren included)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from pathlib import Path

__all__ = ["CPU_CGROUP", "CpuCgroup", "cpu_cgroup_parent"]

log = logging.getLogger("sandboxnb.providers.local")

CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
_PERIOD_US = 100_000


def cpu_cgroup_parent() -> Path | None:
    """A writable cgroup v1 cpu directory for our sandboxes, or None."""
    parent = CPU_CGROUP / "sandboxnb"
    try:
        parent.mkdir(exist_ok=True)
        probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(3)}"
        probe.mkdir()
        ok = (probe / "cpu.cfs_quota_us").exists()
        probe.rmdir()
        return parent if ok else None
    except OSError:
        return None


class CpuCgroup:
    """One sandbox's cpu cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, cpu: float | None) -> CpuCgroup:
        """Make the group; with ``cpu`` set, cap it at that many cores."""
        path.mkdir(exist_ok=True)
        if cpu:
            (path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * _PERIOD_US))))
        return cls(path)

    def add(self, pid: int) -> None:
        """Move ``pid`` into the group (a process already gone is ignored)."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.debug("cannot move %s into %s: %s", pid, self.path, exc)

    def sweep(self) -> None:
        """SIGKILL everything still in the group."""
        try:
            pids = (self.path / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass

    async def remove(self) -> None:
        """Sweep until empty, then remove the group."""
        for _ in range(50):
            self.sweep()
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                await asyncio.sleep(0.01)  # killed tasks leave the cgroup once reaped
        log.warning("could not remove cgroup %s", self.path)
