"""The ``local`` provider: a fresh sandbox server process on this machine per acquisition.

Each sandbox gets a private temp directory (its working dir), a random token and a server
started with the real interpreter (``sys.executable -S -E -s sandboxnb.server.pyz``) in its own
session, listening on ``127.0.0.1`` with an ephemeral port. ``isolation="namespaces"`` runs it
under ``unshare --user --map-root-user --pid --mount --net --fork`` and reaches it through a unix
socket in the sandbox directory (no network inside).

Honoured fields: ``resources.memory_mb`` (RLIMIT_AS on the server and every process it starts),
``resources.cpu`` (only when a writable cgroup v1 ``cpu`` hierarchy exists: a CFS quota of
``cpu`` cores for the whole sandbox; otherwise it is rejected), and every ``limits`` field
(``run_timeout_s`` caps the sandbox lifetime: it is killed when it expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from sandboxnb.config import ConfigError, RuntimeConfig
from sandboxnb.providers.base import Availability, Endpoint, Provider, ProviderError

__all__ = ["LocalProvider"]

log = logging.getLogger("sandboxnb.providers.local")

ISOLATIONS = ("none", "namespaces")
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
_READY = b"SANDBOXNB_READY "
_TERM_GRACE_S = 2.0
_UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--mount", "--net", "--fork",
            "--mount-proc", "--kill-child=SIGKILL"]


def _cpu_cgroup_parent() -> Path | None:
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


class LocalProvider(Provider):
    """Sandboxes as local processes (optionally in user/pid/mount/net namespaces)."""

    name = "local"
    #: Fields every LocalProvider honours; ``resources.cpu`` is added per instance when a
    #: writable cgroup v1 cpu hierarchy exists (see :attr:`supported` on the instance).
    supported: ClassVar[frozenset[str]] = frozenset({"resources.memory_mb", "limits"})
    description = "a server process on this machine (temp dir, own session, optional namespaces)"

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
        self._cgroup_parent = _cpu_cgroup_parent() if cgroups else None
        if self._cgroup_parent is not None:
            self.supported = type(self).supported | {"resources.cpu"}  # type: ignore[misc]
        self._live: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def availability(cls) -> Availability:
        if not os.access(sys.executable, os.X_OK):
            return Availability(False, f"no runnable Python interpreter at {sys.executable}")
        extra = "" if shutil.which("unshare") else " (isolation='namespaces' needs unshare)"
        return Availability(True, "runs sandbox servers as local processes" + extra)

    async def live_sandboxes(self) -> list[str]:
        return [sid for sid, proc in self._live.items() if proc.poll() is None]

    def sandbox(
        self, config: RuntimeConfig | None = None
    ) -> contextlib.AbstractAsyncContextManager[Endpoint]:
        """Start a fresh server; yield its :class:`Endpoint`; kill it and remove its dir."""
        config = self.check(config if config is not None else RuntimeConfig())
        return self._sandbox(config)

    @contextlib.asynccontextmanager
    async def _sandbox(self, config: RuntimeConfig) -> AsyncIterator[Endpoint]:
        from sandboxnb.server import bundle_path

        sandbox_id = f"local-{secrets.token_hex(5)}"
        token = secrets.token_urlsafe(32)
        root = Path(tempfile.mkdtemp(prefix=f"sandboxnb-{sandbox_id}-", dir=self.root))
        state = _Running(sandbox_id, root)
        try:
            workdir = root / "work"
            workdir.mkdir()
            limits, res = config.limits, config.resources
            argv = [self.python, "-S", "-E", "-s", str(bundle_path()),
                    "--sandbox-id", sandbox_id, "--workdir", str(workdir),
                    "--startup-timeout", str(limits.startup_timeout_s or 0),
                    "--idle-timeout", str(limits.idle_timeout_s or 0)]
            if res.memory_mb:
                argv += ["--memory-mb", str(res.memory_mb)]
            if self.isolation == "namespaces":
                sock = root / "server.sock"
                argv = [*_UNSHARE, *argv, "--unix", str(sock)]
            else:
                # the server also exits within a second if this process dies (crashed kernel)
                argv += ["--host", "127.0.0.1", "--port", "0", "--owner-pid", str(os.getpid())]
            # `python3` in the sandbox is the interpreter that runs it (as in an active venv)
            path = os.pathsep.join([os.path.dirname(self.python), os.environ.get("PATH", "")])
            env = dict(os.environ, SANDBOXNB_TOKEN=token, PATH=path)
            if res.memory_mb:
                env["MALLOC_ARENA_MAX"] = "2"  # fewer malloc arenas reserving address space
            state.log = open(root / "server.log", "wb")  # noqa: ASYNC230 - closed in teardown
            state.proc = proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not wait
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=state.log,
                cwd=root, env=env, start_new_session=True, close_fds=True,
            )
            self._live[sandbox_id] = proc
            if self._cgroup_parent is not None:  # quota if asked; always a teardown sweep
                state.cgroup = _make_cpu_cgroup(self._cgroup_parent / sandbox_id, res.cpu)
                _cgroup_add(state.cgroup, proc.pid)
            ready = await _read_ready(proc, limits.startup_timeout_s, root / "server.log")
            if self.isolation == "namespaces":
                url = f"unix://{sock}"
                if state.cgroup is not None:  # the namespaced server may have forked before
                    for pid in _children(proc.pid):
                        _cgroup_add(state.cgroup, pid)
            else:
                url = f"tcp://127.0.0.1:{ready['port']}"
            if limits.run_timeout_s:
                state.timer = asyncio.get_running_loop().call_later(
                    limits.run_timeout_s, _expire, state, limits.run_timeout_s
                )
            meta = {"pid": proc.pid, "workdir": str(workdir), "dir": str(root),
                    "isolation": self.isolation, "started_at": time.time()}
            yield Endpoint(url=url, token=token, sandbox_id=sandbox_id, provider=self.name,
                           config=config, meta=meta)
        finally:
            self._live.pop(sandbox_id, None)
            await _teardown(state, graceful=self.isolation == "none")


class _Running:
    """What teardown needs to find again."""

    def __init__(self, sandbox_id: str, root: Path) -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None
        self.cgroup: Path | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False


def _expire(state: _Running, after: float) -> None:
    log.warning("sandbox %s reached its run timeout of %gs: killing it", state.sandbox_id, after)
    state.expired = True
    _kill_group(state, signal.SIGTERM)  # the server kills its children's groups, then exits
    asyncio.get_running_loop().call_later(
        _TERM_GRACE_S, lambda: state.proc is not None and state.proc.poll() is None
        and _kill_group(state)
    )


def _kill_group(state: _Running, sig: int = signal.SIGKILL) -> None:
    if state.proc is None:
        return
    try:
        os.killpg(state.proc.pid, sig)
    except OSError:
        pass


async def _read_ready(proc: subprocess.Popen[bytes], within: float | None,
                      log_path: Path) -> dict[str, Any]:
    """Read the READY line from the server's stdout without blocking the loop."""
    loop = asyncio.get_running_loop()
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)
    deadline = None if within is None else loop.time() + within
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            waiter = loop.create_future()
            loop.add_reader(fd, lambda w=waiter: w.done() or w.set_result(None))
            try:
                remaining = None if deadline is None else max(deadline - loop.time(), 0)
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise ProviderError(
                    f"local sandbox server was not ready within limits.startup_timeout_s = "
                    f"{within:g}s{_log_tail(log_path)}"
                ) from None
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            code = proc.poll()
            raise ProviderError(
                f"local sandbox server exited before it was ready (exit code {code})"
                f"{_log_tail(log_path)}"
            )
        buf += chunk
    line = buf.split(b"\n", 1)[0]
    if not line.startswith(_READY):
        raise ProviderError(f"local sandbox server printed {line[:200]!r} instead of READY")
    return json.loads(line[len(_READY):])


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"; server log:\n{text[-2000:]}" if text else ""


async def _wait_exit(proc: subprocess.Popen[bytes], within: float | None) -> bool:
    """Wait for ``proc`` to exit without blocking the loop (pidfd when available)."""
    if proc.poll() is not None:
        return True
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), within)
            return True
        except TimeoutError:
            return False
    waiter = loop.create_future()
    loop.add_reader(pidfd, lambda: waiter.done() or waiter.set_result(None))
    try:
        await asyncio.wait_for(waiter, within)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    proc.wait()
    return True


async def _teardown(state: _Running, graceful: bool) -> None:
    """Kill the server (and its children), reap it, sweep the cgroup, remove the dir.

    Runs to completion even if the awaiting task is cancelled meanwhile.
    """
    task = asyncio.ensure_future(_teardown_async(state, graceful))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        _teardown_sync(state)
        raise


async def _teardown_async(state: _Running, graceful: bool) -> None:
    if state.timer is not None:
        state.timer.cancel()
    proc = state.proc
    if proc is not None:
        if graceful and proc.poll() is None:
            try:  # the server kills its own children's process groups on SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
            except OSError:
                pass
            if not await _wait_exit(proc, _TERM_GRACE_S):
                log.warning("sandbox %s ignored SIGTERM: killing it", state.sandbox_id)
        _kill_group(state)
        await _wait_exit(proc, None)
    if state.cgroup is not None:
        await _remove_cgroup(state.cgroup)
    _teardown_sync(state)


def _teardown_sync(state: _Running) -> None:
    if state.timer is not None:
        state.timer.cancel()
    proc = state.proc
    if proc is not None:
        _kill_group(state)
        if proc.poll() is None:
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if state.cgroup is not None:
        _sweep_cgroup(state.cgroup)
    if state.log is not None:
        state.log.close()
    shutil.rmtree(state.root, ignore_errors=True)


# -- cgroup v1 cpu quota ------------------------------------------------------------------------


def _make_cpu_cgroup(path: Path, cpu: float | None) -> Path:
    path.mkdir(exist_ok=True)
    if cpu:
        period = 100_000
        (path / "cpu.cfs_period_us").write_text(str(period))
        (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * period))))
    return path


def _cgroup_add(path: Path, pid: int) -> None:
    try:
        (path / "cgroup.procs").write_text(str(pid))
    except OSError as exc:  # the process may already be gone
        log.debug("cannot move %s into %s: %s", pid, path, exc)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _sweep_cgroup(path: Path) -> None:
    """SIGKILL anything still in the sandbox's cgroup (escaped grandchildren included)."""
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


async def _remove_cgroup(path: Path) -> None:
    for _ in range(50):
        _sweep_cgroup(path)
        try:
            path.rmdir()  # noqa: ASYNC240 - a cgroup rmdir does no disk I/O
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(0.01)  # killed tasks leave the cgroup once reaped
    log.warning("could not remove cgroup %s", path)
