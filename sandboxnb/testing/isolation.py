"""An emulated cloud sandbox host: a real, isolated process tree driven over a unix socket.

Cloud emulators (Daytona, Modal) run each emulated sandbox as an :class:`IsolatedSandbox`:

* the tree runs under ``unshare --user --map-root-user --pid --net --mount --fork`` when the
  kernel allows it (own PID namespace, own network namespace with only ``lo``, own mount
  namespace with a private ``/tmp``); otherwise in a plain process group (``isolation == "none"``);
* its first process is a small stdlib daemon (``_hostd.py``) listening on a unix socket inside
  ``root_dir``; the daemon runs commands, reads/writes files and relays byte streams to TCP ports
  on the sandbox's private loopback, so the outside reaches the sandbox only through that relay.

Stable API (used by both emulators)::

    sb = await IsolatedSandbox.start(root_dir, env={"A": "1"}, workdir="/tmp/work")
    sb.id, sb.root_dir, sb.workdir, sb.isolation ("unshare" | "none"), sb.alive, sb.host_pid
    r = await sb.exec(["ls"] | "echo hi", cwd=None, env=None, stdin=b"", timeout=None,
                      on_output=None)  # -> ExecOutput(exit_code, stdout, stderr, timed_out)
    pid = await sb.spawn_background(cmd, cwd=None, env=None, stdout_path=None, stderr_path=None)
    await sb.process_exit_code(pid)  # None while running;  await sb.kill(pid)
    await sb.write_file(path, data, mode=None); data = await sb.read_file(path)
    reader, writer = await sb.open_port(port)   # asyncio streams relayed into the sandbox
    await sb.terminate()                         # kills the whole tree, removes root_dir

Paths given to ``exec``/files are paths *inside* the sandbox (``/tmp`` is private there).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ExecOutput", "IsolatedSandbox", "SandboxHostError", "namespaces_available"]

_DAEMON = Path(__file__).with_name("_hostd.py")
_UNSHARE = [
    "--user", "--map-root-user", "--pid", "--net", "--mount", "--fork", "--kill-child",
    "--mount-proc",
]
_ns_ok: bool | None = None


class SandboxHostError(RuntimeError):
    """The emulated sandbox host failed (daemon gone, request rejected)."""


@dataclass(frozen=True)
class ExecOutput:
    """Result of a foreground command."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def _real_python() -> str:
    """The real interpreter binary (not a venv link or pyenv shim): fast and stdlib-only."""
    return os.path.realpath(sys.executable)


def namespaces_available() -> bool:
    """Whether unprivileged ``unshare`` with user/pid/net/mount namespaces works here (cached)."""
    global _ns_ok
    if _ns_ok is None:
        unshare = shutil.which("unshare")
        if not unshare or not sys.platform.startswith("linux"):
            _ns_ok = False
        else:
            try:
                done = subprocess.run(
                    [unshare, *_UNSHARE, "true"], capture_output=True, timeout=10, check=False
                )
                _ns_ok = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _ns_ok = False
    return _ns_ok


class IsolatedSandbox:
    """One emulated sandbox: an isolated process tree plus its control daemon."""

    def __init__(self, root_dir: Path, proc: asyncio.subprocess.Process, isolation: str,
                 report: dict, workdir: str) -> None:
        self.id = root_dir.name
        #: default cwd of commands, as a path inside the sandbox (relative paths resolve here)
        self.workdir = workdir
        self.root_dir = root_dir
        self.isolation = isolation
        #: what the daemon could set up: {"lo": bool, "private_tmp": bool}
        self.report = report
        self._proc = proc
        self._sock = str(root_dir / "host.sock")
        self._terminated = False

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        root_dir: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        workdir: str = "/tmp",
        isolate: bool | None = None,
        python: str | None = None,
        startup_timeout: float = 15.0,
    ) -> IsolatedSandbox:
        """Start a sandbox whose host directory is ``root_dir`` (created; removed on terminate).

        ``env`` is the base environment of every command (``PATH`` gets a ``python3`` that is
        the real interpreter, or ``python``); ``workdir`` the default cwd inside the sandbox.
        ``isolate=None`` uses namespaces when available, ``False`` forces a plain process group.
        """
        root = Path(root_dir) if root_dir else Path("/tmp") / f"isb-{uuid.uuid4().hex[:12]}"
        if "sandboxnb.server" in str(root) or "sandboxnb/server" in str(root):
            raise ValueError(f"root_dir = {str(root)!r} must not contain 'sandboxnb.server'")
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        bindir = root / "tmp" / ".bin"  # under the private /tmp: visible inside as /tmp/.bin
        bindir.mkdir(exist_ok=True)
        interp = python or _real_python()
        for name in ("python3", "python"):
            link = bindir / name
            if not link.exists():
                link.symlink_to(interp)
        use_ns = namespaces_available() if isolate is None else (isolate and namespaces_available())
        if isolate and not use_ns:
            raise SandboxHostError("namespaces requested but unshare is not usable here")
        inner_bin = "/tmp/.bin" if use_ns else str(bindir)
        base_env = {
            "PATH": f"{inner_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir if use_ns else str(root / "tmp"),
            "LANG": "C.UTF-8",
        }
        base_env.update(env or {})
        config = {
            "env": base_env,
            "netns": use_ns,
            "mountns": use_ns,
            "tmp_dir": str(root / "tmp") if use_ns else None,
            "workdir": workdir if use_ns else str(root / "tmp"),
        }
        argv = [_real_python(), "-I", str(_DAEMON), str(root / "host.sock")]
        if use_ns:
            argv = [shutil.which("unshare") or "unshare", *_UNSHARE, *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(config) + "\n").encode())
        await proc.stdin.drain()
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), startup_timeout)
        except BaseException:
            await cls._kill_tree(proc)
            shutil.rmtree(root, ignore_errors=True)
            raise
        if not line.startswith(b"READY "):
            err = b""
            with contextlib.suppress(Exception):
                err = await asyncio.wait_for(proc.stderr.read(), 2)  # type: ignore[union-attr]
            await cls._kill_tree(proc)
            shutil.rmtree(root, ignore_errors=True)
            raise SandboxHostError(f"sandbox host failed to start: {(line + err).decode()[-2000:]}")
        report = json.loads(line[6:])
        return cls(root, proc, "unshare" if use_ns else "none", report, config["workdir"])

    @property
    def alive(self) -> bool:
        """True until the daemon (and with it the tree) has exited."""
        return not self._terminated and self._proc.returncode is None

    @property
    def host_pid(self) -> int:
        """Host pid of the tree's outermost process (``unshare`` or the daemon)."""
        return self._proc.pid

    @staticmethod
    async def _kill_tree(proc: asyncio.subprocess.Process) -> None:
        # signal the group by pid: Process.kill() would poll() and steal the exit status from
        # asyncio's child watcher ("Unknown child process")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)

    async def terminate(self) -> None:
        """Kill every process of the sandbox and remove its host directory. Idempotent."""
        if self._terminated:
            return
        self._terminated = True
        try:
            if self._proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._request({"op": "shutdown"}), 3)
                await self._kill_tree(self._proc)
        finally:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    # -- transport -------------------------------------------------------------------------

    async def _connect(self, req: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._proc.returncode is not None or (self._terminated and req["op"] != "shutdown"):
            raise SandboxHostError(f"sandbox {self.id} is not running")
        try:
            reader, writer = await asyncio.open_unix_connection(self._sock, limit=2**26)
        except OSError as err:
            raise SandboxHostError(f"sandbox {self.id} host unreachable: {err}") from err
        writer.write((json.dumps(req) + "\n").encode())
        await writer.drain()
        return reader, writer

    @staticmethod
    async def _reply(reader: asyncio.StreamReader) -> dict:
        line = await reader.readline()
        if not line:
            raise SandboxHostError("sandbox host closed the connection")
        reply = json.loads(line)
        if reply.get("ok") is False:
            raise SandboxHostError(reply.get("error", "request failed"))
        return reply

    async def _request(self, req: dict) -> dict:
        reader, writer = await self._connect(req)
        try:
            return await self._reply(reader)
        finally:
            writer.close()

    # -- operations ------------------------------------------------------------------------

    async def exec(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: float | None = None,  # noqa: ASYNC109 (enforced inside the sandbox)
        on_output: Callable[[str, bytes], object] | None = None,
    ) -> ExecOutput:
        """Run ``cmd`` (argv, or a string for ``/bin/sh -c``) to completion; collect output.

        ``on_output(stream, data)`` ("stdout"/"stderr") is called as output arrives.
        """
        req = {
            "op": "exec", "cmd": cmd if isinstance(cmd, str) else list(cmd), "cwd": cwd,
            "env": dict(env or {}), "stdin": base64.b64encode(stdin).decode(), "timeout": timeout,
        }
        reader, writer = await self._connect(req)
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        try:
            await self._reply(reader)
            while True:
                line = await reader.readline()
                if not line:
                    raise SandboxHostError(f"sandbox {self.id} died while running {cmd!r}")
                frame = json.loads(line)
                if "exit" in frame:
                    return ExecOutput(
                        frame["exit"], b"".join(out["stdout"]), b"".join(out["stderr"]),
                        frame.get("timed_out", False),
                    )
                data = base64.b64decode(frame["data"])
                out[frame["stream"]].append(data)
                if on_output is not None:
                    on_output(frame["stream"], data)
        finally:
            writer.close()

    async def spawn_background(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout_path: str | None = None,
        stderr_path: str | None = None,
    ) -> int:
        """Start ``cmd`` detached; output is appended to the given in-sandbox files. Returns pid."""
        reply = await self._request({
            "op": "spawn", "cmd": cmd if isinstance(cmd, str) else list(cmd), "cwd": cwd,
            "env": dict(env or {}), "stdout": stdout_path, "stderr": stderr_path,
        })
        return int(reply["pid"])

    async def process_exit_code(self, pid: int) -> int | None:
        """Exit code of a background process, or None while it runs."""
        return (await self._request({"op": "status", "pid": pid}))["exit"]

    async def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a process started by this sandbox host."""
        await self._request({"op": "kill", "pid": pid, "signal": int(sig)})

    async def write_file(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        """Write ``data`` to ``path`` inside the sandbox (parent directories are created)."""
        if isinstance(data, str):
            data = data.encode()
        await self._request({
            "op": "write", "path": path, "data": base64.b64encode(data).decode(), "mode": mode,
        })

    async def read_file(self, path: str) -> bytes:
        """Read ``path`` inside the sandbox. Raises :class:`FileNotFoundError` if missing."""
        try:
            reply = await self._request({"op": "read", "path": path})
        except SandboxHostError as err:
            if "FileNotFoundError" in str(err) or "IsADirectoryError" in str(err):
                raise FileNotFoundError(path) from err
            raise
        return base64.b64decode(reply["data"])

    async def open_port(
        self, port: int, host: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a byte stream to ``host:port`` as seen inside the sandbox's network namespace.

        Raises :class:`ConnectionRefusedError` if nothing listens there.
        """
        reader, writer = await self._connect({"op": "connect", "port": int(port), "host": host})
        try:
            await self._reply(reader)
        except SandboxHostError as err:
            writer.close()
            raise ConnectionRefusedError(str(err)) from err
        return reader, writer

    def __repr__(self) -> str:
        state = "alive" if self.alive else "gone"
        return f"<IsolatedSandbox {self.id} {self.isolation} {state}>"
