"""Daytona provider: a Daytona sandbox per rollout, its server reached via Daytona's SSH gateway.

``create`` builds a snapshot from ``image`` once (:mod:`.daytona_backend`), creates the sandbox
from it (named by the spec's id, with its labels), uploads the server and its env through the
toolbox and starts it in a process session while SSH access is connected; ``address`` forwards a
local port to the server's fixed port. Daytona's auto-stop stays on as a leak net while
``refresh_activity`` keepalives hold the sandbox.

Transient faults (:mod:`.retry`): 429 is a throttle (its ``Retry-After`` honoured); 5xx,
connection errors and a 409 on create (our sandbox id is its name: a repeat of a create that
happened) are uncertain; other 4xx are permanent. An adopted sandbox gets its server started
as a fresh one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, ProviderError
from sandboxnb.providers import retry
from sandboxnb.providers.base import Availability, Found, LaunchSpec, Provider
from sandboxnb.providers.daytona_backend import (
    DEFAULT_IMAGE,
    GPU_TYPES,
    Snapshots,
    daytona_resources,
    keep_sigint_ours,
    ssh_connect,
    state_of,
)
from sandboxnb.providers.spec import LABEL, SERVER_BUNDLE_NAME

__all__ = ["GPU_TYPES", "DaytonaProvider", "DaytonaSandbox", "daytona_resources"]

log = logging.getLogger("sandboxnb.providers.daytona")

#: The toolbox process session the server runs in.
SESSION = "sandboxnb-server"
_SERVER, _ENV = f".sandboxnb/{SERVER_BUNDLE_NAME}", ".sandboxnb/env"


@dataclass(eq=False)
class DaytonaSandbox:
    """The handle: the SDK's sandbox, the server's command id, SSH connection, forward."""

    sandbox: Any
    snapshot: str | None = None
    image: str | None = None
    cmd_id: str | None = None
    ssh: asyncio.Task[Any] | None = None
    forward: Any = None
    keepalive: asyncio.Task[None] | None = None


class DaytonaProvider(Provider):
    """Sandboxes on Daytona (``DAYTONA_API_KEY``; optionally ``DAYTONA_API_URL``/``_TARGET``).

    ``snapshot`` (an existing one) or ``image`` (a config's wins; ``default_image`` serves
    resources without one), ``target``, ``auto_stop_minutes`` (never off), ``keepalive_s``
    (default a quarter of auto-stop, at most 60 s), ``server_port`` (inside the sandbox),
    ``ssh_minutes``, ``session_id``, ``labels`` (extra), ``api_url``/``api_key``.
    """

    name: ClassVar[str] = "daytona"
    supported: ClassVar[frozenset[str]] = frozenset({
        "image", "resources.cpu", "resources.memory_mb", "resources.disk_mb", "resources.gpu",
        "limits"})
    description: ClassVar[str] = "a Daytona cloud sandbox per rollout, via its SSH gateway"
    transport: ClassVar[str] = "SSH local forward through Daytona's gateway"

    def __init__(self, *, snapshot: str | None = None, image: str | None = None,
                 target: str | None = None, auto_stop_minutes: int = 15,
                 keepalive_s: float | None = None, server_port: int = 7000,
                 ssh_minutes: int = 24 * 60, session_id: str | None = None,
                 labels: dict[str, str] | None = None, api_url: str | None = None,
                 api_key: str | None = None, default_image: str = DEFAULT_IMAGE) -> None:
        self.snapshots = Snapshots(snapshot, image, default_image)
        if not isinstance(auto_stop_minutes, int) or auto_stop_minutes < 1:
            raise ConfigError(f"daytona auto_stop_minutes = {auto_stop_minutes!r}: expected an "
                              "int >= 1 (auto-stop is the leak net; it is never switched off)")
        if keepalive_s is not None and keepalive_s <= 0:
            raise ConfigError(f"daytona keepalive_s = {keepalive_s!r}: expected seconds > 0")
        if not 0 < server_port < 65536:
            raise ConfigError(f"daytona server_port = {server_port!r}: expected 1..65535")
        self.target = target
        self.auto_stop_minutes = auto_stop_minutes
        self.keepalive_s = keepalive_s or min(60.0, auto_stop_minutes * 60 / 4)
        self.server_port, self.ssh_minutes = server_port, ssh_minutes
        if session_id is not None:
            self.session_id = session_id
        self.extra_labels = dict(labels or {})
        self._api_url, self._api_key = api_url, api_key
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    @classmethod
    def availability(cls) -> Availability:
        """Installed (``daytona``, ``asyncssh``) and configured (``DAYTONA_API_KEY``)?"""
        missing = [m for m in ("daytona", "asyncssh") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"install {' and '.join(missing)}: "
                                       "pip install 'sandboxnb[daytona]'")
        if not os.environ.get("DAYTONA_API_KEY"):
            return Availability(False, "set DAYTONA_API_KEY (and DAYTONA_API_URL / "
                                       "DAYTONA_TARGET for a non-default control plane)")
        return Availability(True)

    async def _daytona(self) -> Any:
        """The provider's one SDK client (created on first use, closed in aclose)."""
        async with self._client_lock:
            if self._client is None:
                from daytona import AsyncDaytona, DaytonaConfig

                keep_sigint_ours()
                key = self._api_key or os.environ.get("DAYTONA_API_KEY")
                if not key:
                    raise ProviderError(self.availability().reason or "DAYTONA_API_KEY is unset")
                self._client = AsyncDaytona(DaytonaConfig(
                    api_key=key, api_url=self._api_url or os.environ.get("DAYTONA_API_URL"),
                    target=self.target or os.environ.get("DAYTONA_TARGET")))
            return self._client

    def prepare(self, config: RuntimeConfig) -> RuntimeConfig:
        self.snapshots.check(config)
        return config

    # -- backend hooks ----------------------------------------------------------------------
    async def create(self, spec: LaunchSpec) -> DaytonaSandbox:
        from daytona import CreateSandboxFromSnapshotParams, DaytonaError

        snapshot, image, resources = self.snapshots.choose(spec.config)
        client = await self._daytona()
        try:
            if image is not None and snapshot is not None:
                await self.snapshots.ensure(client, snapshot, image, resources)
            sandbox = await client.create(CreateSandboxFromSnapshotParams(
                name=spec.sandbox_id, snapshot=snapshot, target=self.target,
                labels={**self.extra_labels, **spec.labels},
                auto_stop_interval=self.auto_stop_minutes),
                timeout=spec.config.limits.startup_timeout_s or 0)
        except DaytonaError as err:
            raise ProviderError(f"daytona: {err}") from err
        return await self._serve(DaytonaSandbox(sandbox, snapshot=snapshot or sandbox.snapshot,
                                                image=image), spec)

    async def adopt(self, found: Found, spec: LaunchSpec) -> DaytonaSandbox:
        """Wait until the sandbox an uncertain create made is started, then start the server."""
        from daytona import DaytonaError

        box: DaytonaSandbox = found.handle
        try:
            await box.sandbox.wait_for_sandbox_start(
                timeout=spec.config.limits.startup_timeout_s or 0)
        except DaytonaError as err:
            raise ProviderError(f"daytona: {err}") from err
        box.snapshot = box.sandbox.snapshot
        return await self._serve(box, spec)

    def classify(self, err: Exception) -> retry.Fault | None:
        return _classify(err)

    async def _serve(self, box: DaytonaSandbox, spec: LaunchSpec) -> DaytonaSandbox:
        """Keepalive, SSH access and the server of a started sandbox."""
        from daytona import DaytonaError

        sandbox = box.sandbox
        box.keepalive = asyncio.ensure_future(self._keepalive(sandbox))
        # SSH access and the gateway connection overlap with the server's start
        box.ssh = asyncio.ensure_future(ssh_connect(sandbox, self.ssh_minutes))
        try:
            await self._start_server(box, spec)
        except BaseException as err:
            await self.destroy(box)
            if isinstance(err, DaytonaError):
                raise ProviderError(f"daytona: starting the server failed: {err}") from err
            raise
        return box

    async def _start_server(self, box: DaytonaSandbox, spec: LaunchSpec) -> None:
        """Upload the server and its env (the token: never on an argv), start it detached."""
        from daytona import FileUpload, SessionExecuteRequest

        from sandboxnb.bundle import bundle_bytes

        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in spec.server_env().items())
        await box.sandbox.fs.upload_files([FileUpload(source=bundle_bytes(), destination=_SERVER),
                                           FileUpload(source=env.encode(), destination=_ENV)])
        args = spec.server_args(listen=["--host", "127.0.0.1", "--port", str(self.server_port)])
        command = f"umask 077; . ./{_ENV}; rm -f {_ENV}; exec python3 {_SERVER} {shlex.join(args)}"
        await box.sandbox.process.create_session(SESSION)
        cmd = await box.sandbox.process.execute_session_command(
            SESSION, SessionExecuteRequest(command=command, run_async=True))
        box.cmd_id = cmd.cmd_id

    async def address(self, handle: DaytonaSandbox) -> str:
        conn = await handle.ssh  # type: ignore[misc]
        handle.forward = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1",
                                                       self.server_port)
        return f"tcp://127.0.0.1:{handle.forward.get_port()}"

    async def failure(self, handle: DaytonaSandbox) -> str | None:
        """The server's process exited (its output says why), or the sandbox is not up."""
        from daytona import DaytonaError

        process = handle.sandbox.process
        try:
            cmd = await process.get_session_command(SESSION, handle.cmd_id)
            if cmd.exit_code is None:
                return None
            logs = await process.get_session_command_logs(SESSION, handle.cmd_id)
        except DaytonaError as err:  # the toolbox answers a started sandbox
            return f"its toolbox failed: {err}"
        output = "\n".join(s.strip() for s in (logs.stderr, logs.stdout) if s and s.strip())
        return (f"the server exited with code {cmd.exit_code} before it was ready; its output:\n"
                f"{output[-1500:] or '(none)'}")

    def endpoint_meta(self, handle: DaytonaSandbox) -> dict[str, Any]:
        sb = handle.sandbox
        return {"daytona_id": sb.id, "snapshot": handle.snapshot, "image": handle.image,
                "target": sb.target, "cpu": sb.cpu, "memory_gib": sb.memory, "disk_gib": sb.disk,
                "gpu": sb.gpu, "auto_stop_minutes": self.auto_stop_minutes}

    async def _keepalive(self, sandbox: Any) -> None:
        """Refresh Daytona's activity clock while held, so auto-stop spares a busy sandbox."""
        while True:
            await asyncio.sleep(self.keepalive_s)
            try:
                await sandbox.refresh_activity()
            except Exception as err:  # keep trying: auto-stop is minutes away
                log.warning("daytona keepalive for %s failed: %s", sandbox.id, err)

    async def destroy(self, handle: DaytonaSandbox) -> None:
        """Stop the keepalive, close the forward and the SSH connection, delete the sandbox."""
        from daytona import DaytonaNotFoundError

        ssh, handle.ssh = handle.ssh, None
        for task in (handle.keepalive, ssh):
            if task is not None:
                task.cancel()
        if ssh is not None:
            (conn,) = await asyncio.gather(ssh, return_exceptions=True)
            if handle.forward is not None:
                handle.forward.close()
            if not isinstance(conn, BaseException):
                conn.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), 5)
        sid = handle.sandbox.labels.get(f"{LABEL}.sandbox_id") or handle.sandbox.id
        await retry.destroy(self, sid, handle.sandbox.delete, gone=(DaytonaNotFoundError,))

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        from daytona import ListSandboxesQuery

        query = ListSandboxesQuery(labels=dict(labels))
        client = await self._daytona()

        async def listing() -> list[Found]:
            return [Found(sb.labels.get(f"{LABEL}.sandbox_id", sb.id), DaytonaSandbox(sb),
                          sb.labels) async for sb in client.list(query)
                    if state_of(sb) not in ("destroyed", "destroying")]

        return await retry.call(self, "list sandboxes", listing)

    async def aclose(self) -> None:
        """Wait for releases in flight, then close the SDK client."""
        await super().aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def __repr__(self) -> str:
        snaps = self.snapshots
        what = f"snapshot={snaps.snapshot!r}" if snaps.snapshot else f"image={snaps.image!r}"
        return f"<DaytonaProvider {what} target={self.target!r}>"


def _classify(err: BaseException) -> retry.Fault | None:
    """Daytona's transient errors (found on ``err`` or its causes), else ``None``."""
    from daytona import DaytonaError
    from daytona.common.errors import DaytonaConnectionError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DaytonaConnectionError):
            return retry.Fault(retry.Kind.UNCERTAIN)
        if isinstance(seen, DaytonaError) and seen.status_code is not None:
            code = seen.status_code
            if code == 429:
                return retry.Fault(retry.Kind.THROTTLED, retry.retry_after_s(seen.headers))
            if code == 409 or code >= 500:
                return retry.Fault(retry.Kind.UNCERTAIN)
            return None
        seen = seen.__cause__
    return None
