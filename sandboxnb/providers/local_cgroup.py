"""Cgroups for local sandboxes: limits for the sandbox as a whole, and a teardown sweep.

Each writable hierarchy found at provider start gets one group per sandbox, below the owner's own
group (``<mount>/<our cgroup>/sandboxnb/<sandbox id>``), so the owner's limits still apply:

- cgroup v1 ``cpu``: a CFS quota (``resources.cpu``);
- cgroup v1 ``memory``: ``memory.limit_in_bytes`` (``resources.memory_mb`` for the whole sandbox);
- cgroup v1 ``pids`` or a v2 group with the ``pids`` controller: ``pids.max`` (process count);
- any cgroup v2 group: ``cgroup.kill``, which ends every member at once (fork races included).

The sandbox's first process joins its groups before it execs (:meth:`SandboxCgroups.join_argv`),
so nothing it starts, ``setsid`` or double-forked, can be outside them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hierarchy", "SandboxCgroups", "find_hierarchies", "remove_group"]

log = logging.getLogger("sandboxnb.providers.local")

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000
_V1 = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class Hierarchy:
    """A writable parent directory for our groups in one hierarchy."""

    kind: str  # "cpu", "memory", "pids" (v1) or "v2"
    parent: Path
    controllers: frozenset[str] = frozenset()  # of a v2 parent: what its children may limit


def _own_path(controller: str) -> str | None:
    """Our cgroup path in a v1 hierarchy (``controller``) or in v2 (``""``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, names, path = line.split(":", 2)
        if (controller and controller in names.split(",")) or (not controller and not names):
            return path
    return None


def _probe(parent: Path, marker: str) -> bool:
    try:
        parent.mkdir(exist_ok=True)
        probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(3)}"
        probe.mkdir()
        ok = (probe / marker).exists()
        probe.rmdir()
        return ok
    except OSError:
        return False


def _v2_mount() -> Path | None:
    for candidate in (CGROUP_ROOT, CGROUP_ROOT / "unified"):  # pure v2, or hybrid
        if (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def find_hierarchies() -> list[Hierarchy]:
    """The hierarchies where we may create groups (probed with a throwaway group)."""
    found = []
    for kind in _V1:
        mount, own = CGROUP_ROOT / kind, _own_path(kind)
        if own is None or not (mount / "cgroup.procs").exists():
            continue
        parent = mount / own.lstrip("/") / "sandboxnb"
        marker = {"cpu": "cpu.cfs_quota_us", "memory": "memory.limit_in_bytes",
                  "pids": "pids.max"}[kind]
        if _probe(parent, marker):
            found.append(Hierarchy(kind, parent))
    mount, own = _v2_mount(), _own_path("")
    if mount is not None and own is not None:
        parent = mount / own.lstrip("/") / "sandboxnb"
        if _probe(parent, "cgroup.kill"):
            controllers = frozenset()
            try:  # delegate pids/memory to our sandboxes' groups where the parent has them
                have = set((parent.parent / "cgroup.controllers").read_text().split())
                wanted = have & {"pids", "memory"}
                if wanted:
                    (parent / "cgroup.subtree_control").write_text(
                        " ".join(f"+{c}" for c in sorted(wanted)))
                    controllers = frozenset(
                        (parent / "cgroup.subtree_control").read_text().split())
            except OSError:
                pass
            found.append(Hierarchy("v2", parent, controllers))
    return found


class SandboxCgroups:
    """One sandbox's groups, one per hierarchy."""

    def __init__(self, paths: list[Path], *, limits_memory: bool = False) -> None:
        self.paths = paths
        #: whether a memory limit covers the sandbox as a whole
        self.limits_memory = limits_memory

    @classmethod
    def create(cls, hierarchies: list[Hierarchy], name: str, *, cpu: float | None,
               memory_mb: int | None, max_processes: int | None) -> SandboxCgroups:
        """Make the groups and set the limits asked for."""
        paths = []
        memory = False
        try:
            for h in hierarchies:
                path = h.parent / name
                path.mkdir()
                paths.append(path)
                if h.kind == "cpu" and cpu:
                    (path / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
                    (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * _PERIOD_US))))
                elif h.kind == "memory" and memory_mb:
                    (path / "memory.limit_in_bytes").write_text(str(memory_mb << 20))
                    swap = path / "memory.memsw.limit_in_bytes"
                    if swap.exists():
                        swap.write_text(str(memory_mb << 20))
                    memory = True
                elif (h.kind == "pids" or (h.kind == "v2" and "pids" in h.controllers)) \
                        and max_processes:
                    (path / "pids.max").write_text(str(max_processes))
                if h.kind == "v2" and "memory" in h.controllers and memory_mb:
                    (path / "memory.max").write_text(str(memory_mb << 20))
                    memory = True
        except OSError:
            for path in paths:
                remove_group_now(path)
            raise
        return cls(paths, limits_memory=memory)

    def join_argv(self) -> list[str]:
        """A ``/bin/sh`` prefix for a command line: it moves itself into every group, then
        execs the command (a ``preexec_fn`` would cost the fast spawn path, ~20 ms here)."""
        joins = "".join(f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))} || exit 125; "
                        for p in self.paths)
        return ["/bin/sh", "-c", f'{joins}exec "$@"', "sandboxnb-cgroup"]

    async def remove(self) -> None:
        """Kill every member, then remove the groups (waiting for killed tasks to leave)."""
        await asyncio.gather(*(remove_group(path) for path in self.paths))


def _kill_members(path: Path) -> None:
    kill = path / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
            return
        except OSError:
            pass
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def remove_group_now(path: Path) -> bool:
    """One attempt: kill the members and remove the group; True once it is gone."""
    _kill_members(path)
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


async def remove_group(path: Path, attempts: int = 500) -> None:
    """Kill every member and remove ``path``, polling while killed tasks are reaped (<= 5 s)."""
    for _ in range(attempts):
        if remove_group_now(path):
            return
        await asyncio.sleep(0.01)
    log.warning("could not remove cgroup %s (processes still in it)", path)
