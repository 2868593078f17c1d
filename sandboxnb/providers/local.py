"""The ``local`` provider: a fresh sandbox server process on this machine per acquisition.

Each sandbox gets a private temp directory (its working dir), a random token and a server
started with the real interpreter (``sys.executable -S -E -s sandboxnb.server.pyz``) in its own
session. The provider opens the listening socket itself (``127.0.0.1`` with an ephemeral port)
and hands it to the server, so the address is known before the server runs.
``isolation="namespaces"`` runs the server under ``unshare --user --map-root-user --pid --mount
--net --fork`` and listens on a unix socket in the sandbox directory (no network inside).

Honoured fields: ``resources.memory_mb`` (RLIMIT_AS on the server and every process it starts),
``resources.cpu`` (only when a writable cgroup v1 ``cpu`` hierarchy exists: a CFS quota of
``cpu`` cores for the whole sandbox; otherwise it is rejected), and every ``limits`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
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
from sandboxnb.providers.local_cgroup import CpuCgroup, cpu_cgroup_parent

__all__ = ["LocalProvider"]

log = logging.getLogger("sandboxnb.providers.local")

ISOLATIONS = ("none", "namespaces")
_TERM_GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1
_UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--mount", "--net", "--fork",
            "--mount-proc", "--kill-child=SIGKILL"]


class LocalSandbox:
    """One running local sandbox: its process, directory, socket address and cgroup."""

    def __init__(self, spec: LaunchSpec, root: Path) -> None:
        self.sandbox_id = spec.sandbox_id
        self.labels = dict(spec.labels)
        self.root = root
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup: CpuCgroup | None = None
        self.log_path = root / "server.log"

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"; server log:\n{text[-2000:]}" if text else ""


class LocalProvider(Provider):
    """Sandboxes as local processes (optionally in user/pid/mount/net namespaces)."""

    name = "local"
    #: Fields every LocalProvider honours; ``resources.cpu`` is added per instance when a
    #: writable cgroup v1 cpu hierarchy exists (see :attr:`supported` on the instance).
    supported: ClassVar[frozenset[str]] = frozenset({"resources.memory_mb", "limits"})
    description = "a server process on this machine (temp dir, own session, optional namespaces)"
    transport = "tcp on 127.0.0.1 (unix socket with isolation='namespaces')"

    def __init__(self, *, isolation: str = "none", python: str | None = None,
                 root: str | os.PathLike[str] | None = None, cgroups: bool = True) -> None:
        if isolation not in ISOLATIONS:
            raise ConfigError(
                f"local isolation = {isolation!r} is not supported; accepted: "
                f"{', '.join(ISOLATIONS)}"
            )
        if isolation == "namespaces" and not shutil.which("unshare"):
            raise ConfigError("local isolation = 'namespaces' needs util-linux `unshare` on PATH")
        self.isolation = isolation
        self.python = python or sys.executable
        self.root = str(root) if root is not None else None
        self._cgroup_parent = cpu_cgroup_parent() if cgroups else None
        if self._cgroup_parent is not None:
            self.supported = type(self).supported | {"resources.cpu"}  # type: ignore[misc]
        self._live: dict[str, LocalSandbox] = {}

    @classmethod
    def availability(cls) -> Availability:
        if not os.access(sys.executable, os.X_OK):
            return Availability(False, f"no runnable Python interpreter at {sys.executable}")
        extra = "" if shutil.which("unshare") else " (isolation='namespaces' needs unshare)"
        return Availability(True, "runs sandbox servers as local processes" + extra)

    # -- backend hooks ----------------------------------------------------------------------
    async def create(self, spec: LaunchSpec) -> LocalSandbox:
        root = Path(tempfile.mkdtemp(prefix=f"sandboxnb-{spec.sandbox_id}-", dir=self.root))
        box = LocalSandbox(spec, root)
        self._live[spec.sandbox_id] = box
        workdir = root / "work"
        workdir.mkdir()
        listener = self._listener(box)
        token_read, token_write = os.pipe()  # the token never sits in /proc/PID/environ
        os.write(token_write, spec.token.encode())
        os.close(token_write)
        try:
            fd = listener.fileno()
            args = spec.server_args(workdir=str(workdir), memory_mb=True,
                                    listen=["--listen-fd", str(fd), "--token-fd",
                                            str(token_read)],
                                    **({} if self.isolation == "namespaces" else
                                       {"owner_pid": os.getpid(), "remove_dir": str(root)}))
            argv = [self.python, "-S", "-E", "-s", str(bundle_path()), *args]
            if self.isolation == "namespaces":
                argv = [*_UNSHARE, *argv]
            # `python3` in the sandbox is the interpreter that runs it (as in an active venv)
            path = os.pathsep.join([os.path.dirname(self.python), os.environ.get("PATH", "")])
            env = dict(os.environ, PATH=path)
            if spec.config.resources.memory_mb:
                env["MALLOC_ARENA_MAX"] = "2"  # fewer malloc arenas reserving address space
            with open(box.log_path, "wb") as log_file:  # noqa: ASYNC230 - a local temp file
                box.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not wait
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                    cwd=root, env=env, start_new_session=True, close_fds=True,
                    pass_fds=(fd, token_read),
                    # the namespaced server cannot watch our pid from its own pid namespace:
                    # unshare gets SIGKILL when we die, and takes the server with it
                    preexec_fn=_die_with_parent if self.isolation == "namespaces" else None,
                )
        finally:
            listener.close()  # the server holds its own copies
            os.close(token_read)
        if self._cgroup_parent is not None:  # quota if asked; always a teardown sweep
            box.cgroup = CpuCgroup.create(self._cgroup_parent / spec.sandbox_id,
                                          spec.config.resources.cpu)
            box.cgroup.add(box.proc.pid)
        return box

    def _listener(self, box: LocalSandbox) -> socket.socket:
        """The server's listening socket, opened here so its address is known at once."""
        if self.isolation == "namespaces":
            path = box.root / "server.sock"
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
        if handle.cgroup is not None and self.isolation == "namespaces":
            for pid in _children(handle.proc.pid):  # the namespaced server forked under unshare
                handle.cgroup.add(pid)
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
        """SIGTERM (the server ends its children), then SIGKILL the group, sweep the cgroup and
        remove the directory."""
        proc = handle.proc
        if proc is not None:
            if self.isolation == "none" and proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
                if not await _wait_exit(proc, _TERM_GRACE_S):
                    log.warning("sandbox %s ignored SIGTERM: killing it", handle.sandbox_id)
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            await _wait_exit(proc, None)
        if handle.cgroup is not None:
            await handle.cgroup.remove()
        shutil.rmtree(handle.root, ignore_errors=True)
        self._live.pop(handle.sandbox_id, None)

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        """Local sandboxes never outlive their owner: only this provider's own are listed."""
        return [Found(box.sandbox_id, box, box.labels) for box in list(self._live.values())
                if box.proc is not None and box.proc.poll() is None
                and all(box.labels.get(k) == v for k, v in labels.items())]

    def owner_labels(self, *, session_only: bool = False) -> dict[str, str]:
        return {} if not session_only else {"sandboxnb.session": self.session_id}


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
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            async with asyncio.timeout(within):
                await asyncio.to_thread(proc.wait)
            return True
        except TimeoutError:
            return False
    waiter = loop.create_future()
    loop.add_reader(pidfd, lambda: waiter.done() or waiter.set_result(None))
    try:
        async with asyncio.timeout(within):
            await waiter
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()
    return True

