"""Daytona provider: a fresh Daytona sandbox per rollout, reached through Daytona's SSH gateway.

``create``: (build a snapshot from ``image`` once) -> create the sandbox from it, named by the
spec's id and carrying its labels -> upload the server zipapp and an env file (the token) through
the toolbox -> start the server in a background process session; SSH access is connected
meanwhile. ``address``: a local port forward to the server's fixed port inside the sandbox.

Leak nets: Daytona's auto-stop stays on (``auto_stop_minutes``) while ``refresh_activity``
keepalives hold a busy sandbox; the labels let ``gc`` find any sandbox again.

Resources map to Daytona units: ``memory_mb``/``disk_mb`` -> GiB rounded up, ``cpu`` -> whole
cores rounded up, ``gpu`` -> count plus a GPU type Daytona offers. Daytona fixes resources per
snapshot: they need an ``image`` (one snapshot per image + resources); a named ``snapshot`` takes
no resource overrides.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, ProviderError, UnsupportedFieldError
from sandboxnb.providers.base import Availability, Found, LaunchSpec, Provider
from sandboxnb.providers.spec import LABEL, SERVER_BUNDLE_NAME

__all__ = ["GPU_TYPES", "DaytonaProvider", "daytona_resources"]

log = logging.getLogger("sandboxnb.providers.daytona")

#: GPU models Daytona can allocate (``daytona.GpuType`` in SDK 0.226.1).
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000")
DEFAULT_IMAGE = "python:3.12-slim"
SESSION = "sandboxnb-server"
_SERVER, _ENV = f".sandboxnb/{SERVER_BUNDLE_NAME}", ".sandboxnb/env"
_SSH_CMD = re.compile(r"(?:-p\s+(?P<port>\d+)\s+)?(?P<user>[^\s@]+)@(?P<host>[^\s:]+)")


def daytona_resources(config: RuntimeConfig) -> dict[str, Any]:
    """Daytona's units for ``config.resources``: cores, GiB (rounded up), GPU count and type."""
    res, out = config.resources, {}
    if res.cpu is not None:
        out["cpu"] = math.ceil(res.cpu)
    if res.memory_mb is not None:
        out["memory"] = math.ceil(res.memory_mb / 1024)
    if res.disk_mb is not None:
        out["disk"] = math.ceil(res.disk_mb / 1024)
    if res.gpu is not None:
        kind = {t.upper(): t for t in GPU_TYPES}.get(res.gpu.type.upper())
        if kind is None:
            raise UnsupportedFieldError(
                "daytona", "resources.gpu.type", res.gpu.type, GPU_TYPES,
                message=f"daytona does not support resources.gpu.type = {res.gpu.type!r}; "
                        f"accepted GPU types: {', '.join(GPU_TYPES)} (e.g. gpu='H100:2')")
        out["gpu"], out["gpu_type"] = res.gpu.count, kind
    return out


def _state(obj: Any) -> str:
    return str(getattr(obj.state, "value", obj.state))


@dataclass(eq=False)
class DaytonaSandbox:
    """The handle: the SDK's sandbox, its server command, SSH connection, forward, keepalive."""

    sandbox: Any
    snapshot: str | None = None
    image: str | None = None
    cmd_id: str | None = None
    ssh: asyncio.Task[Any] | None = None
    forward: Any = None
    keepalive: asyncio.Task[None] | None = None


class DaytonaProvider(Provider):
    """Sandboxes on Daytona (``DAYTONA_API_KEY``; optionally ``DAYTONA_API_URL``/``_TARGET``).

    Options: ``snapshot`` (an existing snapshot name) or ``image`` (a snapshot is built from it
    once; a config's ``image`` wins), ``target`` (region), ``auto_stop_minutes`` (Daytona's
    auto-stop, kept on as a leak net), ``keepalive_s`` (interval of ``refresh_activity`` while
    held; default a quarter of the auto-stop interval, at most 60 s), ``server_port`` (inside the
    sandbox), ``ssh_minutes`` (SSH access lifetime), ``session_id``, ``labels`` (extra labels),
    ``api_url``, ``api_key`` (default from the environment), ``default_image`` (builds a snapshot
    when resources are set without an image).
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
        if snapshot is not None and image is not None:
            raise ConfigError(f"daytona snapshot = {snapshot!r} and image = {image!r}: "
                              "give one (a snapshot is built from an image)")
        if not isinstance(auto_stop_minutes, int) or auto_stop_minutes < 1:
            raise ConfigError(f"daytona auto_stop_minutes = {auto_stop_minutes!r}: expected an "
                              "int >= 1 (auto-stop is the leak net; it is never switched off)")
        if keepalive_s is not None and keepalive_s <= 0:
            raise ConfigError(f"daytona keepalive_s = {keepalive_s!r}: expected seconds > 0")
        if not 0 < server_port < 65536:
            raise ConfigError(f"daytona server_port = {server_port!r}: expected 1..65535")
        self.snapshot, self.image, self.target = snapshot, image, target
        self.auto_stop_minutes = auto_stop_minutes
        self.keepalive_s = keepalive_s or min(60.0, auto_stop_minutes * 60 / 4)
        self.server_port, self.ssh_minutes = server_port, ssh_minutes
        if session_id is not None:
            self.session_id = session_id
        self.extra_labels, self.default_image = dict(labels or {}), default_image
        self._api_url, self._api_key = api_url, api_key
        self._client: Any = None
        self._client_lock, self._snapshot_lock = asyncio.Lock(), asyncio.Lock()
        self._snapshots_ready: set[str] = set()

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

                key = self._api_key or os.environ.get("DAYTONA_API_KEY")
                if not key:
                    raise ProviderError(self.availability().reason or "DAYTONA_API_KEY is unset")
                self._client = AsyncDaytona(DaytonaConfig(
                    api_key=key, api_url=self._api_url or os.environ.get("DAYTONA_API_URL"),
                    target=self.target or os.environ.get("DAYTONA_TARGET")))
            return self._client

    # -- config and snapshots ---------------------------------------------------------------
    def prepare(self, config: RuntimeConfig) -> RuntimeConfig:
        """Reject GPU models Daytona lacks and resources on a fixed snapshot, up front."""
        if daytona_resources(config) and config.image is None and self.snapshot is not None:
            raise ConfigError(
                f"daytona snapshot = {self.snapshot!r} fixes its resources; got resources "
                f"{sorted(daytona_resources(config))}: pass image=... instead of snapshot= so "
                "sandboxnb builds a snapshot with them")
        return config

    def _snapshot_for(self, config: RuntimeConfig) -> tuple[str | None, str | None, dict]:
        """(snapshot name or None for Daytona's default, image to build it from, resources)."""
        resources, image = daytona_resources(config), config.image or self.image
        if image is None and (self.snapshot is not None or not resources):
            return self.snapshot, None, resources
        image = image or self.default_image
        key = hashlib.sha256(repr((image, sorted(resources.items()))).encode()).hexdigest()
        slug = re.sub(r"[^a-z0-9]+", "-", image.lower()).strip("-")[:40]
        return f"sandboxnb-{slug}-{key[:10]}", image, resources

    async def _ensure_snapshot(self, name: str, image: str, resources: dict) -> None:
        """Build snapshot ``name`` from ``image`` once (concurrent callers wait for one build)."""
        from daytona import CreateSnapshotParams, DaytonaError, DaytonaNotFoundError, Resources

        async with self._snapshot_lock:
            if name in self._snapshots_ready:
                return
            client = await self._daytona()
            try:
                try:
                    snap = await client.snapshot.get(name)
                except DaytonaNotFoundError:
                    log.info("daytona: building snapshot %s from image %s", name, image)
                    snap = await client.snapshot.create(CreateSnapshotParams(
                        name=name, image=image, resources=Resources(**resources)))
                while _state(snap) not in ("active", "error", "build_failed"):
                    await asyncio.sleep(1.0)
                    snap = await client.snapshot.get(name)
            except DaytonaError as err:
                raise ProviderError(f"daytona snapshot {name!r} for image {image!r} failed to "
                                    f"build: {err}") from None
            if _state(snap) != "active":
                raise ProviderError(
                    f"daytona snapshot {name!r} for image {image!r} is {_state(snap)}: "
                    f"{getattr(snap, 'error_reason', None) or 'no reason given'}")
            self._snapshots_ready.add(name)

    # -- backend hooks ----------------------------------------------------------------------
    async def create(self, spec: LaunchSpec) -> DaytonaSandbox:
        from daytona import CreateSandboxFromSnapshotParams, DaytonaError

        snapshot, image, resources = self._snapshot_for(spec.config)
        try:
            if image is not None and snapshot is not None:
                await self._ensure_snapshot(snapshot, image, resources)
            sandbox = await (await self._daytona()).create(CreateSandboxFromSnapshotParams(
                name=spec.sandbox_id, snapshot=snapshot, target=self.target,
                labels={**self.extra_labels, **spec.labels},
                auto_stop_interval=self.auto_stop_minutes),
                timeout=spec.config.limits.startup_timeout_s or 0)
        except DaytonaError as err:
            raise ProviderError(f"daytona: {err}") from None
        box = DaytonaSandbox(sandbox, snapshot=snapshot or sandbox.snapshot, image=image)
        box.keepalive = asyncio.ensure_future(self._keepalive(sandbox))
        box.ssh = asyncio.ensure_future(self._ssh(sandbox))  # overlaps with the server start
        try:
            await self._start_server(box, spec)
        except BaseException as err:
            await self.destroy(box)
            if isinstance(err, DaytonaError):
                raise ProviderError(f"daytona: starting the server failed: {err}") from None
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

    async def _ssh(self, sandbox: Any) -> Any:
        """SSH access (its token is the user name: never logged) and a connection to the gateway."""
        import asyncssh

        access = await sandbox.create_ssh_access(expires_in_minutes=self.ssh_minutes)
        match = _SSH_CMD.search(access.ssh_command or "")
        if match is None:
            raise ProviderError("daytona: could not parse the SSH gateway address from the "
                                "ssh-access response")
        host, port = match.group("host"), int(match.group("port") or 22)
        try:
            return await asyncssh.connect(
                host, port, username=access.token, known_hosts=None, client_keys=None,
                agent_path=None, password=None, config=None, keepalive_interval=30)
        except (OSError, asyncssh.Error) as err:
            raise ProviderError(f"daytona: SSH gateway {host}:{port} refused the connection: "
                                f"{type(err).__name__}") from None

    async def address(self, handle: DaytonaSandbox) -> str:
        assert handle.ssh is not None
        conn = await handle.ssh
        handle.forward = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1",
                                                       self.server_port)
        return f"tcp://127.0.0.1:{handle.forward.get_port()}"

    async def failure(self, handle: DaytonaSandbox) -> str | None:
        """The server's process exited (its output says why), or the sandbox is no longer up."""
        from daytona import DaytonaError

        process = handle.sandbox.process
        try:
            cmd = await process.get_session_command(SESSION, handle.cmd_id)
            if cmd.exit_code is None:
                return None
            logs = await process.get_session_command_logs(SESSION, handle.cmd_id)
        except DaytonaError as err:
            with contextlib.suppress(DaytonaError):
                await handle.sandbox.refresh_data()
            state = _state(handle.sandbox)
            return None if state in ("started", "starting") else f"the sandbox is {state}: {err}"
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
        """Stop the keepalive, close the forward and SSH connection, delete the sandbox."""
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
        with contextlib.suppress(DaytonaNotFoundError):
            await handle.sandbox.delete()

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        from daytona import ListSandboxesQuery

        query = ListSandboxesQuery(labels=dict(labels))
        return [Found(sb.labels.get(f"{LABEL}.sandbox_id", sb.id), DaytonaSandbox(sb), sb.labels)
                async for sb in (await self._daytona()).list(query)
                if _state(sb) != "destroyed"]

    async def aclose(self) -> None:
        """Wait for releases in flight, then close the SDK client."""
        await super().aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def __repr__(self) -> str:
        what = (f"snapshot={self.snapshot!r}" if self.snapshot else
                f"image={self.image!r}" if self.image else "default snapshot")
        return f"<DaytonaProvider {what} target={self.target!r}>"
