"""One emulated Modal sandbox: an isolated process tree running the create request's entrypoint,
reachable only through emulated tunnels (TLS, or plain TCP for ``unencrypted_ports``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modal_proto import api_pb2

from sandboxnb.testing.isolation import IsolatedSandbox

__all__ = ["CreateRecord", "EmulatedSandbox", "TunnelInfo"]

log = logging.getLogger("sandboxnb.modal_emulator")

_POLL_S = 0.1
_DEFAULT_ENTRYPOINT = ("sleep", "infinity")


@dataclass
class CreateRecord:
    """What one sandbox create request carried (as the control plane received it)."""

    sandbox_id: str
    api: str  # "v1" (SandboxCreate) or "v2" (SandboxCreateV2)
    app_id: str
    cpu: float | None
    cpu_max: float | None
    memory_mb: int | None
    memory_mb_max: int | None
    gpu: str | None  # "A10G" or "A10G:2", as Modal would schedule it
    timeout: int
    idle_timeout: int | None
    tags: dict[str, str]
    image_id: str
    image: str | None  # registry reference or published name the image resolves to
    ports: list[tuple[int, bool]]  # (container port, encrypted)
    entrypoint: list[str] = field(repr=False)
    workdir: str | None
    env_keys: list[str]
    created_at: float = field(default_factory=time.time)
    end_reason: str | None = None  # exited | terminated | timeout | idle_timeout | failed
    start_s: float | None = None  # time to start the isolated tree, entrypoint and tunnels

    @property
    def encrypted(self) -> bool:
        """True when every requested port is tunnelled with TLS only."""
        return all(enc for _, enc in self.ports)


@dataclass(frozen=True)
class TunnelInfo:
    container_port: int
    host: str
    port: int
    unencrypted_host: str = ""
    unencrypted_port: int = 0

    def proto(self) -> api_pb2.TunnelData:
        return api_pb2.TunnelData(
            container_port=self.container_port, host=self.host, port=self.port,
            unencrypted_host=self.unencrypted_host, unencrypted_port=self.unencrypted_port,
        )


class EmulatedSandbox:
    """Lifecycle of one sandbox: start, tunnels, timeout / idle timeout, terminate."""

    def __init__(
        self,
        record: CreateRecord,
        *,
        task_id: str,
        env: Mapping[str, str],
        root_dir: Path,
        tls: ssl.SSLContext,
        tunnel_host: str,
    ) -> None:
        self.id = record.sandbox_id
        self.task_id = task_id
        self.record = record
        self._env = dict(env)
        self._root = root_dir
        self._tls = tls
        self._tunnel_host = tunnel_host
        self.box: IsolatedSandbox | None = None
        self._pid: int | None = None
        self.tunnels: list[TunnelInfo] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.StreamWriter] = set()
        self._active = 0
        self._last_activity = time.monotonic()
        self.result = api_pb2.GenericResult()
        self.finished = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self._stopping: asyncio.Future | None = None
        self._start_done = asyncio.Event()

    @property
    def alive(self) -> bool:
        return not self.finished.is_set()

    async def start(self) -> None:
        """Start the isolated tree, the entrypoint and the tunnel listeners."""
        try:
            await self._start()
        finally:
            self._start_done.set()
        if self._stopping is not None:  # stopped while starting: make sure nothing survives
            await self.stop("terminated", api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)
            raise RuntimeError(f"sandbox {self.id} was terminated while starting")

    async def _start(self) -> None:
        rec = self.record
        self.box = await IsolatedSandbox.start(
            self._root, env=self._env, workdir=rec.workdir or "/tmp"
        )
        argv = list(rec.entrypoint) or list(_DEFAULT_ENTRYPOINT)
        # Inside a private mount namespace the host's /tmp (and root_dir) is hidden.
        logs = "/tmp" if self.box.isolation != "none" else str(self._root)
        self._pid = await self.box.spawn_background(
            argv,
            stdout_path=f"{logs}/.modal-entrypoint.stdout",
            stderr_path=f"{logs}/.modal-entrypoint.stderr",
        )
        for port, encrypted in rec.ports:
            tls_server = await asyncio.start_server(
                lambda r, w, p=port: self._relay(r, w, p), "127.0.0.1", 0, ssl=self._tls
            )
            self._servers.append(tls_server)
            info = TunnelInfo(port, self._tunnel_host, tls_server.sockets[0].getsockname()[1])
            if not encrypted:
                plain = await asyncio.start_server(
                    lambda r, w, p=port: self._relay(r, w, p), "127.0.0.1", 0
                )
                self._servers.append(plain)
                info = TunnelInfo(
                    port, info.host, info.port, self._tunnel_host,
                    plain.sockets[0].getsockname()[1],
                )
            self.tunnels.append(info)
        if self._stopping is None:
            self._watcher = asyncio.create_task(self._watch())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     port: int) -> None:
        self._active += 1
        self._last_activity = time.monotonic()
        self._conns.add(writer)
        try:
            if self.box is None or not self.alive:
                return
            try:
                up_r, up_w = await self.box.open_port(port)
            except (ConnectionError, OSError, RuntimeError) as err:
                log.debug("tunnel %s:%s: %s", self.id, port, err)
                return
            self._conns.add(up_w)
            try:
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                self._conns.discard(up_w)
                up_w.close()
        finally:
            self._active -= 1
            self._last_activity = time.monotonic()
            self._conns.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                self._last_activity = time.monotonic()
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError, ssl.SSLError):
            dst.close()

    async def _watch(self) -> None:
        rec = self.record
        deadline = time.monotonic() + rec.timeout
        failures = 0
        while True:
            await asyncio.sleep(_POLL_S)
            now = time.monotonic()
            if now >= deadline:
                await self.stop("timeout", api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT)
                return
            idle = rec.idle_timeout
            if idle and self._active == 0 and now - self._last_activity >= idle:
                await self.stop("idle_timeout", api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT)
                return
            assert self.box is not None and self._pid is not None
            if not self.box.alive:
                await self.stop("failed", api_pb2.GenericResult.GENERIC_STATUS_FAILURE,
                                "sandbox host died", exitcode=-9)
                return
            try:
                code = await self.box.process_exit_code(self._pid)
            except Exception as err:  # a busy host: only a persistent failure ends the sandbox
                failures += 1
                log.warning("sandbox %s: status poll failed (%d): %s", self.id, failures, err)
                if failures < 20:
                    continue
                await self.stop("failed", api_pb2.GenericResult.GENERIC_STATUS_FAILURE, str(err))
                return
            failures = 0
            if code is not None:
                status = (
                    api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
                    if code == 0
                    else api_pb2.GenericResult.GENERIC_STATUS_FAILURE
                )
                await self.stop("exited", status, exitcode=code)
                return

    async def stop(self, reason: str, status: int, exception: str = "", exitcode: int = 0) -> None:
        """End the sandbox (idempotent): close tunnels, kill the tree, publish the result."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._stop(reason, status, exception, exitcode)
            )
        await asyncio.shield(self._stopping)

    async def _stop(self, reason: str, status: int, exception: str, exitcode: int) -> None:
        self.record.end_reason = reason
        if not self._start_done.is_set():
            # Let a start in progress finish so the tree it spawns is the one killed below.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._start_done.wait(), 30)
        watcher = self._watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        for server in self._servers:
            server.close()
        for w in list(self._conns):
            w.close()
        if self.box is not None:
            await self.box.terminate()
        self.result = api_pb2.GenericResult(
            status=status, exception=exception or reason, exitcode=exitcode
        )
        self.finished.set()
        log.debug("sandbox %s ended: %s", self.id, reason)

    def tunnel_protos(self) -> Sequence[api_pb2.TunnelData]:
        return [t.proto() for t in self.tunnels]
