"""The ``local`` provider: a fresh sandbox server process on this machine per acquisition.

Each sandbox gets a private directory ``<temp root>/sandboxnb-<id>-*`` (``work/`` is its working
directory, ``home/`` its HOME), a random token (through a pipe, never in argv or environ) and a
server started with the real interpreter (``python -S -E -s sandboxnb.server.pyz``). The
provider opens the listening socket itself and hands it to the server, so the address is known
before the server runs.

Isolation (``LocalProvider(isolation=...)``):

- ``"auto"`` (default): ``"bwrap"`` where bubblewrap works, else ``"namespaces"`` where user
  namespaces work, else ``"none"``; a weaker choice is announced once with a warning saying
  what is missing (``apt-get install bubblewrap``).
- ``"bwrap"``: the jail of :mod:`.local_jail`: own user/pid/mount/ipc/uts/net namespaces, the
  system and the interpreter read-only, its own work and home directories, a private ``/tmp``,
  uid 1000 without capabilities; nothing of the user's home, the host's ``/tmp`` or other
  sandboxes. It listens on a unix socket in its host directory (passed in as an fd). Teardown
  kills the pid namespace's init, which ends every process in it (``setsid`` and double-fork
  escapes included); bwrap's ``--die-with-parent`` does the same when the owner dies.
- ``"namespaces"``: util-linux ``unshare`` (user, pid, mount, net); the host's files stay
  visible.
- ``"none"``: a plain process in its own session, as the owner's user, seeing the owner's files.

Every mode gets a clean environment: an allow-list of the owner's (``LANG``, ``LC_*``, ``TERM``,
``TZ``), HOME and TMPDIR inside the sandbox, PATH with the interpreter's directory first, and what
``LocalProvider(env={...})`` adds; nothing else (no cloud credentials).

Processes: at most ``max_processes`` (default 512) through a pids cgroup where one is writable
(v1, or v2 with ``pids`` delegated) and, in the jail, RLIMIT_NPROC counted in the sandbox's own
user namespace (kernel >= 5.14; the kernel exempts sandboxes whose uid maps to host root, so for
a root owner the pids cgroup is the bound). Teardown also sweeps the sandbox's cgroups (v2
``cgroup.kill`` or SIGKILL to every member), which is what ends escaped processes in
``"none"`` mode; without any writable cgroup, ``"none"`` can only kill the process groups its
server started, and a ``setsid`` escape may survive.

Owner death (kill -9): the jail and the namespaces die with their owner (parent-death signal);
a ``"none"`` server exits through its dead-man switch. Directories and cgroups a dead owner left
are removed when a LocalProvider of any owner next starts a sandbox there (once per process) and
by
``sandboxnb gc --runtime local``: each sandbox directory records its owner's pid and start time.

Honoured fields: ``resources.memory_mb`` (RLIMIT_AS on every process, plus a memory cgroup
limit for the whole sandbox where writable), ``resources.cpu`` (only when a writable cgroup v1
``cpu`` hierarchy exists: a CFS quota; otherwise it is rejected), and every ``limits`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sandboxnb.bundle import bundle_path
from sandboxnb.errors import ConfigError
from sandboxnb.providers.base import Availability, Found, LaunchSpec, Provider
from sandboxnb.providers.local_cgroup import (
    CGROUP_ROOT,
    Hierarchy,
    SandboxCgroups,
    find_hierarchies,
    remove_group_now,
)
from sandboxnb.providers.local_jail import (
    bwrap_argv,
    bwrap_works,
    clean_env,
    passwd_lines,
    unshare_works,
)

__all__ = ["LocalProvider", "sweep_dead_owners"]

log = logging.getLogger("sandboxnb.providers.local")

ISOLATIONS = ("auto", "bwrap", "namespaces", "none")
DEFAULT_MAX_PROCESSES = 512
_TERM_GRACE_S = 2.0
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; a longer path gets a loopback tcp port
_PR_SET_PDEATHSIG = 1
_UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--mount", "--net", "--fork",
            "--mount-proc", "--kill-child=SIGKILL"]
#: The file in each sandbox directory naming its owner (pid, start time), labels and cgroups.
OWNER_FILE = "owner.json"
_warned: set[str] = set()
_swept: set[str] = set()


def choose_isolation() -> tuple[str, str | None]:
    """What ``"auto"`` picks here, and (when weaker than the jail) what is missing."""
    why_not = bwrap_works()
    if why_not is None:
        return "bwrap", None
    if unshare_works() is None:
        return "namespaces", (f"{why_not}; local sandboxes use isolation='namespaces' (own "
                              "pid/net namespaces, but the host's files stay visible)")
    return "none", (f"{why_not}; user namespaces do not work either: local sandboxes use "
                    "isolation='none' (they see your files and run as your user)")


class LocalSandbox:
    """One running local sandbox: its process, directory, socket address and cgroups."""

    def __init__(self, sandbox_id: str, labels: Mapping[str, str], root: Path) -> None:
        self.sandbox_id = sandbox_id
        self.labels = dict(labels)
        self.root = root
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroups: SandboxCgroups | None = None
        self.log_path = root / "server.log"

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"; server log:\n{text[-2000:]}" if text else ""


class LocalProvider(Provider):
    """Sandboxes as local processes, jailed with bubblewrap where the kernel allows it."""

    name = "local"
    #: Fields every LocalProvider honours; ``resources.cpu`` is added per instance when a
    #: writable cgroup v1 cpu hierarchy exists (see :attr:`supported` on the instance).
    supported: ClassVar[frozenset[str]] = frozenset({"resources.memory_mb", "limits"})
    description = ("a server process on this machine, jailed with bubblewrap (own namespaces, "
                   "read-only system, private dirs, clean env) where available")
    transport = "unix socket (tcp on 127.0.0.1 with isolation='none')"

    def __init__(self, *, isolation: str = "auto", python: str | None = None,
                 root: str | os.PathLike[str] | None = None, cgroups: bool = True,
                 env: Mapping[str, str] | None = None,
                 max_processes: int | None = DEFAULT_MAX_PROCESSES) -> None:
        if isolation not in ISOLATIONS:
            raise ConfigError(
                f"local isolation = {isolation!r} is not supported; accepted: "
                f"{', '.join(ISOLATIONS)}"
            )
        if isolation == "auto":
            isolation, weaker = choose_isolation()
            if weaker and weaker not in _warned:
                _warned.add(weaker)
                log.warning("local sandboxes are not jailed: %s", weaker)
        elif isolation == "bwrap" and (why := bwrap_works()) is not None:
            raise ConfigError(f"local isolation = 'bwrap' is unavailable: {why}")
        elif isolation == "namespaces" and not shutil.which("unshare"):
            raise ConfigError("local isolation = 'namespaces' needs util-linux `unshare` on PATH")
        if max_processes is not None and (isinstance(max_processes, bool)
                                          or not isinstance(max_processes, int)
                                          or not 8 <= max_processes <= 1_000_000):
            raise ConfigError(f"local max_processes = {max_processes!r} is not accepted: an "
                              "integer from 8 to 1000000, or None for no limit")
        env = dict(env or {})
        for key, value in env.items():
            if not isinstance(key, str) or not key or "=" in key or not isinstance(value, str):
                raise ConfigError(f"local env[{key!r}] = {value!r} is not accepted: names are "
                                  "non-empty strings without '=', values are strings")
        self.isolation = isolation
        self.python = python or sys.executable
        self.root = str(root) if root is not None else None
        self.env = env
        self.max_processes = max_processes
        self._hierarchies: list[Hierarchy] = find_hierarchies() if cgroups else []
        if any(h.kind == "cpu" for h in self._hierarchies):
            self.supported = type(self).supported | {"resources.cpu"}  # type: ignore[misc]
        self._live: dict[str, LocalSandbox] = {}

    @classmethod
    def availability(cls) -> Availability:
        if not os.access(sys.executable, os.X_OK):
            return Availability(False, f"no runnable Python interpreter at {sys.executable}")
        weaker = choose_isolation()[1]
        if weaker:
            return Availability(True, f"runs sandbox servers as local processes, NOT jailed: "
                                      f"{weaker}")
        return Availability(True, "runs sandbox servers as local processes in a bubblewrap jail")

    # -- backend hooks ----------------------------------------------------------------------
    async def create(self, spec: LaunchSpec) -> LocalSandbox:
        temp_root = self.root or tempfile.gettempdir()
        if temp_root not in _swept:  # what dead owners left here, once per process
            _swept.add(temp_root)
            sweep_dead_owners(temp_root)
        root = Path(temp_root, f"sandboxnb-{spec.sandbox_id}")
        root.mkdir(mode=0o700)  # noqa: ASYNC240 - the id is random: one that exists is an error
        box = LocalSandbox(spec.sandbox_id, spec.labels, root)
        self._live[spec.sandbox_id] = box
        workdir, home = root / "work", root / "home"
        for d in (workdir, home):
            d.mkdir()
        jailed = self.isolation == "bwrap"
        tmp = "/tmp" if jailed else str(root / "tmp")
        if not jailed:
            os.mkdir(tmp)
        resources = spec.config.resources
        if self._hierarchies:  # limits for the whole sandbox; always a teardown sweep
            box.cgroups = SandboxCgroups.create(
                self._hierarchies, spec.sandbox_id, cpu=resources.cpu,
                memory_mb=resources.memory_mb, max_processes=self.max_processes)
        _write_owner_file(box)
        listener = self._listener(box)
        token_read, token_write = os.pipe()  # the token never sits in /proc/PID/environ
        os.write(token_write, spec.token.encode())
        os.close(token_write)
        fds = [listener.fileno(), token_read]
        try:
            listen = ["--listen-fd", str(fds[0]), "--token-fd", str(token_read)]
            if self.max_processes and self.isolation != "none":
                listen += ["--max-processes", str(self.max_processes)]
            unjailed = self.isolation == "none"  # it watches its owner; with no cgroup of its
            # own (nothing but the directory to sweep) it also removes the directory then
            args = spec.server_args(
                workdir=str(workdir), memory_mb=True, listen=listen,
                owner_pid=os.getpid() if unjailed else None,
                remove_dir=str(root) if unjailed and box.cgroups is None else None)
            bundle = str(bundle_path())
            argv = [self.python, "-S", "-E", "-s", bundle, *args]
            if jailed:
                fds += _data_pipes(passwd_lines(str(home)))
                argv = [*bwrap_argv(python=self.python, bundle=bundle, workdir=str(workdir),
                                    home=str(home), passwd_fd=fds[2], group_fd=fds[3]), *argv]
            elif self.isolation == "namespaces":
                argv = [*_UNSHARE, *argv]
            if box.cgroups is not None:  # joined before exec: nothing it starts is outside
                argv = [*box.cgroups.join_argv(), *argv]
            env = clean_env(python=self.python, home=str(home), tmp=tmp, extra=self.env)
            if resources.memory_mb:
                env["MALLOC_ARENA_MAX"] = "2"  # fewer malloc arenas reserving address space
            with open(box.log_path, "wb") as log_file:  # noqa: ASYNC230 - a local temp file
                box.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not wait
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                    cwd=workdir, env=env, start_new_session=True, close_fds=True,
                    pass_fds=fds,
                    # unshare's namespaces cannot watch our pid: it dies with us (bwrap does
                    # that itself with --die-with-parent; no preexec_fn keeps the fast spawn)
                    preexec_fn=_die_with_parent if self.isolation == "namespaces" else None,
                )
        finally:
            listener.close()  # the server holds its own copies
            for fd in fds[1:]:
                os.close(fd)
        return box

    def _listener(self, box: LocalSandbox) -> socket.socket:
        """The server's listening socket, opened here so its address is known at once."""
        path = box.root / "sock"
        if self.isolation != "none" and len(str(path)) < _UNIX_PATH_MAX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o600)
            box.url = f"unix://{path}"
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            box.url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        sock.listen(128)
        sock.set_inheritable(True)
        return sock

    async def address(self, handle: LocalSandbox) -> str:
        return handle.url

    async def failure(self, handle: LocalSandbox) -> str | None:
        code = handle.proc.poll() if handle.proc is not None else None
        if code is None:
            return None
        return f"the server exited before it was ready (exit code {code}){handle.log_tail()}"

    def endpoint_meta(self, handle: LocalSandbox) -> dict[str, Any]:
        return {"pid": handle.proc.pid if handle.proc else None,
                "workdir": str(handle.root / "work"), "dir": str(handle.root),
                "isolation": self.isolation, "started_at": time.time()}

    async def destroy(self, handle: LocalSandbox) -> None:
        """End every process of the sandbox, remove its cgroups and its directory.

        ``"none"``: SIGTERM (the server ends its process groups), then SIGKILL its group.
        Jails: SIGKILL the outer process; its child, the pid namespace's init, dies with it and
        takes every process of the namespace along; we wait for that init to be gone.
        """
        proc = handle.proc
        if proc is not None:
            if self.isolation == "none" and proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
                if not await _wait_exit(proc, _TERM_GRACE_S):
                    log.warning("sandbox %s ignored SIGTERM: killing it", handle.sandbox_id)
            inits = _child_pidfds(proc.pid) if self.isolation != "none" else []
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            await _wait_exit(proc, None)
            for pidfd in inits:  # ready once the namespace's last process is gone
                await _wait_pidfd(pidfd, 10.0)
        if handle.cgroups is not None:
            await handle.cgroups.remove()
        shutil.rmtree(handle.root, ignore_errors=True)
        self._live.pop(handle.sandbox_id, None)

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        """This provider's running sandboxes, plus directories left by owners that died."""
        found = [Found(box.sandbox_id, box, box.labels) for box in list(self._live.values())
                 if box.proc is not None and box.proc.poll() is None]
        known = {box.root for box in self._live.values()}
        for root, record in _leftovers(self.root or tempfile.gettempdir()):
            if root not in known:
                box = LocalSandbox(record["sandbox_id"], record.get("labels", {}), root)
                box.cgroups = SandboxCgroups([Path(p) for p in record.get("cgroups", [])])
                found.append(Found(box.sandbox_id, box, box.labels))
        return [f for f in found if all(f.labels.get(k) == v for k, v in labels.items())]

    def owner_labels(self, *, session_only: bool = False) -> dict[str, str]:
        return {} if not session_only else {"sandboxnb.session": self.session_id}


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return fields.rsplit(")", 1)[1].split()[19]


def _write_owner_file(box: LocalSandbox) -> None:
    record = {"sandbox_id": box.sandbox_id, "pid": os.getpid(),
              "start": _process_start(os.getpid()), "labels": box.labels,
              "cgroups": [str(p) for p in box.cgroups.paths] if box.cgroups else []}
    (box.root / OWNER_FILE).write_text(json.dumps(record))


def _owner_dead(record: Mapping[str, Any]) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    start = _process_start(pid)
    return start is None or start != record.get("start")


_LEFTOVER_NAME = re.compile(r"sandboxnb-(local-[0-9a-f]{12})")


def _leftovers(temp_root: str) -> list[tuple[Path, dict[str, Any]]]:
    """Sandbox directories under ``temp_root`` whose owner process is gone.

    The temp root is shared: a record is trusted only when its directory and file are ours
    (same uid, no symlinks), its id matches the directory's name, and every cgroup it names is
    a ``sandboxnb/<that id>`` group of ours; anything else is left alone.
    """
    found = []
    try:
        entries = [e for e in os.scandir(temp_root) if _LEFTOVER_NAME.fullmatch(e.name)]
    except OSError:
        return []
    for entry in entries:
        record = _trusted_record(Path(entry.path))
        if record is not None and _owner_dead(record):
            found.append((Path(entry.path), record))
    return found


def _trusted_record(root: Path) -> dict[str, Any] | None:
    match = _LEFTOVER_NAME.fullmatch(root.name)
    try:
        if not _ours(root.lstat()) or not stat.S_ISDIR(root.lstat().st_mode):
            return None
        fd = os.open(root / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            if not _ours(os.fstat(file.fileno())):
                return None
            record = json.loads(file.read(1 << 20))
    except (OSError, ValueError):
        return None  # being created, or not ours
    if not isinstance(record, dict) or match is None or record.get("sandbox_id") != match[1]:
        return None
    labels = record.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        return None
    groups = record.get("cgroups", [])
    if not isinstance(groups, list) or not all(_our_group(g, match[1]) for g in groups):
        log.warning("ignoring %s: its record names cgroups that are not this sandbox's", root)
        return None
    return record


def _ours(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid()


def _our_group(path: Any, sandbox_id: str) -> bool:
    """Whether ``path`` is a cgroup directory of ours made for ``sandbox_id``."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return False
    group = Path(path)
    if os.path.normpath(path) != path or CGROUP_ROOT not in group.parents:
        return False
    if group.name != sandbox_id or group.parent.name != "sandboxnb":
        return False
    try:
        st = group.lstat()
    except FileNotFoundError:
        return True  # already gone: nothing to signal
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _ours(st)


def sweep_dead_owners(temp_root: str) -> list[str]:
    """Remove what dead owners left under ``temp_root`` (cgroups first, then directories);
    return the sandbox ids removed."""
    removed = []
    for root, record in _leftovers(temp_root):
        groups = [Path(p) for p in record.get("cgroups", [])]
        if all(any(remove_group_now(g) for _ in range(100)) for g in groups):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(record["sandbox_id"])
    if removed:
        log.info("removed %d local sandbox(es) left by dead owners: %s", len(removed),
                 ", ".join(removed))
    return removed


def _data_pipes(blobs: tuple[bytes, ...]) -> list[int]:
    """A pipe per blob, already written and closed for writing; the read ends (small blobs)."""
    fds = []
    for blob in blobs:
        r, w = os.pipe()
        os.write(w, blob)
        os.close(w)
        fds.append(r)
    return fds


def _child_pidfds(parent: int) -> list[int]:
    """Pidfds of ``parent``'s children (checked to be its children once the pidfd is open)."""
    fds = []
    for pid in _children(parent):
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            continue
        if pid in _children(parent):  # still its child, so the pidfd is that process
            fds.append(fd)
        else:
            os.close(fd)
    return fds


async def _pidfd_ready(pidfd: int, within: float | None) -> bool:
    """Wait until ``pidfd``'s process has exited (True) or ``within`` passed (False); the
    descriptor is closed either way."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop.add_reader(pidfd, lambda: waiter.done() or waiter.set_result(None))
    try:
        async with asyncio.timeout(within):
            await waiter
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def _wait_pidfd(pidfd: int, within: float) -> None:
    if not await _pidfd_ready(pidfd, within):
        log.warning("a local sandbox's pid namespace did not end within %gs", within)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started us dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def _wait_exit(proc: subprocess.Popen[bytes], within: float | None) -> bool:
    """Wait for ``proc`` to exit without blocking the loop (a pidfd when available)."""
    if proc.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            async with asyncio.timeout(within):
                await asyncio.to_thread(proc.wait)
            return True
        except TimeoutError:
            return False
    if not await _pidfd_ready(pidfd, within):
        return False
    proc.wait()
    return True

