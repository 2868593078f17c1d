"""Daytona provider: a fresh Daytona sandbox per rollout, reached through Daytona's SSH gateway.

Acquire: (build a snapshot from ``image`` once, if missing) -> create the sandbox from the
snapshot -> upload the stdlib server zipapp and a token file through the toolbox -> start the
server in a background process session -> wait for its ready line; meanwhile create SSH access
and connect (the SSH token is the user name) -> forward a local port to the server's port inside
the sandbox. The endpoint is ``tcp://127.0.0.1:<local port>``.

Leak nets, outermost first: Daytona's auto-stop stays on (``auto_stop_minutes``) and the
provider sends ``refresh_activity`` keepalives while a sandbox is held; every sandbox carries
``sandboxnb*`` labels (and a per-create nonce, so one whose create was interrupted is found and
deleted); the server's own idle timeout; deletion on every exit path.

Resources map to Daytona units: ``memory_mb``/``disk_mb`` -> GiB rounded up, ``cpu`` -> whole
cores rounded up, ``gpu`` -> count plus a GPU type Daytona offers (H100, H200, B200, B300,
RTX-PRO-6000). Daytona fixes resources per snapshot, so they need an ``image`` (the provider
builds one snapshot per image + resources); a named ``snapshot`` takes no resource overrides.
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
import secrets
import shlex
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, ClassVar

from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError
from sandboxnb.providers.base import Availability, Endpoint, Provider, ProviderError, owner_label

__all__ = ["GPU_TYPES", "LABEL", "DaytonaProvider", "daytona_resources"]

log = logging.getLogger("sandboxnb.providers.daytona")

LABEL = "sandboxnb"
#: GPU models Daytona can allocate (``daytona.GpuType`` in SDK 0.226.1).
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000")
DEFAULT_IMAGE = "python:3.12-slim"
_DIR = ".sandboxnb"
_SERVER = f"{_DIR}/sandboxnb.server.pyz"
_TOKEN_FILE = f"{_DIR}/token"
_SESSION = "sandboxnb-server"
_READY = re.compile(r"SANDBOXNB_READY (\{.*?\})")
_SSH_CMD = re.compile(r"(?:-p\s+(?P<port>\d+)\s+)?(?P<user>[^\s@]+)@(?P<host>[^\s:]+)")


def daytona_resources(config: RuntimeConfig) -> dict[str, Any]:
    """Daytona's units for ``config.resources``: cores, GiB (rounded up), GPU count and type.

    Raises :class:`UnsupportedFieldError` for a GPU model Daytona does not offer.
    """
    res = config.resources
    out: dict[str, Any] = {}
    if res.cpu is not None:
        out["cpu"] = math.ceil(res.cpu)
    if res.memory_mb is not None:
        out["memory"] = math.ceil(res.memory_mb / 1024)
    if res.disk_mb is not None:
        out["disk"] = math.ceil(res.disk_mb / 1024)
    if res.gpu is not None:
        by_upper = {t.upper(): t for t in GPU_TYPES}
        kind = by_upper.get(res.gpu.type.upper())
        if kind is None:
            err = UnsupportedFieldError("daytona", "resources.gpu.type", res.gpu.type, GPU_TYPES)
            err.args = (f"daytona does not support resources.gpu.type = {res.gpu.type!r}; "
                        f"accepted GPU types: {', '.join(GPU_TYPES)} (e.g. gpu='H100:2')",)
            raise err
        out["gpu"], out["gpu_type"] = res.gpu.count, kind
    return out


class DaytonaProvider(Provider):
    """Sandboxes on Daytona (``DAYTONA_API_KEY``; optionally ``DAYTONA_API_URL``/``_TARGET``).

    Options: ``snapshot`` (an existing snapshot name) or ``image`` (a snapshot is built from it
    once; a config's ``image`` wins), ``target`` (region), ``auto_stop_minutes`` (Daytona's
    auto-stop, kept on as a leak net), ``keepalive_s`` (interval of ``refresh_activity`` while
    held; default a quarter of the auto-stop interval, at most 60 s), ``server_port`` (inside the
    sandbox), ``ssh_minutes`` (SSH access lifetime), ``session_id``, ``labels``, ``api_url``,
    ``api_key`` (default from the environment), ``default_image`` (used to build a snapshot when
    resources are set without an image).
    """

    name: ClassVar[str] = "daytona"
    supported: ClassVar[frozenset[str]] = frozenset({
        "image", "resources.cpu", "resources.memory_mb", "resources.disk_mb", "resources.gpu",
        "limits",
    })
    description: ClassVar[str] = "a Daytona cloud sandbox per rollout, via its SSH gateway"

    def __init__(
        self,
        *,
        snapshot: str | None = None,
        image: str | None = None,
        target: str | None = None,
        auto_stop_minutes: int = 15,
        keepalive_s: float | None = None,
        server_port: int = 7000,
        ssh_minutes: int = 24 * 60,
        session_id: str | None = None,
        labels: dict[str, str] | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
        default_image: str = DEFAULT_IMAGE,
    ) -> None:
        if snapshot is not None and image is not None:
            raise ConfigError(f"daytona snapshot = {snapshot!r} and image = {image!r}: "
                              "give one (a snapshot is built from an image)")
        if not isinstance(auto_stop_minutes, int) or auto_stop_minutes < 1:
            raise ConfigError(f"daytona auto_stop_minutes = {auto_stop_minutes!r}: expected an "
                              "int >= 1 (auto-stop is the leak net; it is never switched off)")
        if keepalive_s is not None and keepalive_s <= 0:
            raise ConfigError(f"daytona keepalive_s = {keepalive_s!r}: expected seconds > 0")
        if not 0 <= server_port < 65536:
            raise ConfigError(f"daytona server_port = {server_port!r}: expected 0..65535")
        self.snapshot, self.image, self.target = snapshot, image, target
        self.auto_stop_minutes = auto_stop_minutes
        self.keepalive_s = keepalive_s or min(60.0, auto_stop_minutes * 60 / 4)
        self.server_port, self.ssh_minutes = server_port, ssh_minutes
        self.session_id = session_id or secrets.token_hex(6)
        self.extra_labels = dict(labels or {})
        self.default_image = default_image
        self.owner = owner_label()
        self._api_url, self._api_key = api_url, api_key
        self._client: Any = None
        self._client_lock: asyncio.Lock | None = None
        self._snapshot_lock: asyncio.Lock | None = None
        self._snapshots_ready: set[str] = set()
        self._bundle: bytes | None = None

    # ----------------------------------------------------------------- plumbing
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
        """The provider's one SDK client (created on first use, reused, closed in aclose)."""
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is None:
                from daytona import AsyncDaytona, DaytonaConfig

                key = self._api_key or os.environ.get("DAYTONA_API_KEY")
                if not key:
                    raise ProviderError(self.availability().reason or "DAYTONA_API_KEY is unset")
                self._client = AsyncDaytona(DaytonaConfig(
                    api_key=key, api_url=self._api_url or os.environ.get("DAYTONA_API_URL"),
                    target=self.target or os.environ.get("DAYTONA_TARGET"),
                ))
            return self._client

    def _server_bundle(self) -> bytes:
        if self._bundle is None:
            from sandboxnb.server import bundle_bytes

            self._bundle = bundle_bytes()
        return self._bundle

    # ----------------------------------------------------------------- config
    def check(self, config: RuntimeConfig) -> RuntimeConfig:
        """Reject unsupported fields, GPU models and resources on a fixed snapshot, up front."""
        config = super().check(config)
        resources = daytona_resources(config)
        if resources and config.image is None and self.snapshot is not None:
            raise ConfigError(
                f"daytona snapshot = {self.snapshot!r} fixes its resources; got resources "
                f"{sorted(resources)}: pass image=... instead of snapshot= so sandboxnb builds a "
                "snapshot with them")
        return config

    def _snapshot_spec(self, config: RuntimeConfig) -> tuple[str | None, str | None, dict]:
        """(snapshot name, image to build it from or None, Daytona resources)."""
        resources = daytona_resources(config)
        image = config.image or self.image
        if image is None and self.snapshot is not None:
            return self.snapshot, None, resources
        if image is None and not resources:
            return None, None, resources  # Daytona's default snapshot
        image = image or self.default_image
        key = repr((image, sorted(resources.items())))
        slug = re.sub(r"[^a-z0-9]+", "-", image.lower()).strip("-")[:40]
        return f"sandboxnb-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}", image, resources

    async def _ensure_snapshot(self, name: str, image: str, resources: dict) -> None:
        """Build snapshot ``name`` from ``image`` once (concurrent callers wait for one build)."""
        if name in self._snapshots_ready:
            return
        if self._snapshot_lock is None:
            self._snapshot_lock = asyncio.Lock()
        async with self._snapshot_lock:
            if name in self._snapshots_ready:
                return
            from daytona import CreateSnapshotParams, DaytonaError, DaytonaNotFoundError, Resources

            client = await self._daytona()
            try:
                snap = await client.snapshot.get(name)
            except DaytonaNotFoundError:
                snap = None
            try:
                if snap is None:
                    log.info("daytona: building snapshot %s from image %s", name, image)
                    snap = await client.snapshot.create(CreateSnapshotParams(
                        name=name, image=image, resources=Resources(**resources)))
                while str(getattr(snap.state, "value", snap.state)) not in (
                        "active", "error", "build_failed"):
                    await asyncio.sleep(1.0)
                    snap = await client.snapshot.get(name)
            except DaytonaError as err:
                raise ProviderError(f"daytona snapshot {name!r} for image {image!r} failed to "
                                    f"build: {err}") from None
            state = str(getattr(snap.state, "value", snap.state))
            if state != "active":
                raise ProviderError(
                    f"daytona snapshot {name!r} for image {image!r} is {state}: "
                    f"{getattr(snap, 'error_reason', None) or 'no reason given'}")
            self._snapshots_ready.add(name)

    def labels_for(self, nonce: str) -> dict[str, str]:
        """Labels of one sandbox: find ours again (owner, session) and this create (nonce)."""
        return {
            **self.extra_labels, LABEL: "1", f"{LABEL}.session": self.session_id,
            f"{LABEL}.owner": self.owner, f"{LABEL}.nonce": nonce,
            f"{LABEL}.created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    # ----------------------------------------------------------------- acquire / release
    def sandbox(self, config: RuntimeConfig) -> contextlib.AbstractAsyncContextManager[Endpoint]:
        """Acquire a Daytona sandbox running the server; yield its forwarded endpoint."""
        return self._sandbox(self.check(config))

    @contextlib.asynccontextmanager
    async def _sandbox(self, config: RuntimeConfig) -> AsyncIterator[Endpoint]:
        from daytona import CreateSandboxFromSnapshotParams

        started = time.perf_counter()
        snapshot, image, resources = self._snapshot_spec(config)
        client = await self._daytona()
        nonce = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        sandbox: Any = None
        ssh: _Tunnel | None = None
        keepalive: asyncio.Task | None = None
        try:
            if image is not None and snapshot is not None:
                await self._ensure_snapshot(snapshot, image, resources)
            startup = config.limits.startup_timeout_s or 0
            params = CreateSandboxFromSnapshotParams(
                snapshot=snapshot, labels=self.labels_for(nonce),
                auto_stop_interval=self.auto_stop_minutes, target=self.target)
            t0 = time.perf_counter()
            sandbox = await client.create(params, timeout=startup)
            t1 = time.perf_counter()
            ssh = _Tunnel()
            port = await _both(self._start_server(sandbox, token, config),
                               ssh.open(sandbox, self.ssh_minutes), startup or None)
            local_port = await ssh.forward(port)
            t2 = time.perf_counter()
            keepalive = asyncio.ensure_future(self._keepalive(sandbox, config))
            yield Endpoint(
                url=f"tcp://127.0.0.1:{local_port}", token=token, sandbox_id=sandbox.id,
                provider=self.name, config=config,
                meta={"snapshot": snapshot or sandbox.snapshot, "image": image,
                      "target": sandbox.target, "cpu": sandbox.cpu, "memory_gib": sandbox.memory,
                      "disk_gib": sandbox.disk, "gpu": sandbox.gpu,
                      "auto_stop_minutes": self.auto_stop_minutes,
                      "timings_s": {"create": t1 - t0, "server_and_ssh": t2 - t1,
                                    "total": t2 - started}},
            )
        except TimeoutError:
            raise ProviderError(f"daytona sandbox not ready within startup_timeout_s = "
                                f"{config.limits.startup_timeout_s}") from None
        except Exception as err:
            if isinstance(err, (ProviderError, ConfigError)):
                raise
            from daytona import DaytonaError

            if isinstance(err, DaytonaError):
                raise ProviderError(f"daytona: {err}") from None
            raise
        finally:
            if keepalive is not None:
                keepalive.cancel()
            cleanup = asyncio.ensure_future(self._release(sandbox, ssh, nonce))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await cleanup  # finish deleting even when cancelled again
                raise

    async def _start_server(self, sandbox: Any, token: str, config: RuntimeConfig) -> int:
        """Upload the server + token file, start it in a background session, await READY."""
        from daytona import FileUpload, SessionExecuteRequest

        await sandbox.fs.upload_files([
            FileUpload(source=self._server_bundle(), destination=_SERVER),
            FileUpload(source=token.encode(), destination=_TOKEN_FILE),
        ])
        limits = config.limits
        args = ["--host", "127.0.0.1", "--port", str(self.server_port),
                "--sandbox-id", sandbox.id,
                "--idle-timeout", str(limits.idle_timeout_s or 0),
                "--startup-timeout", str(limits.startup_timeout_s or 60)]
        # the token travels in a file, read into the environment and deleted: never on an argv
        command = (
            f"umask 077; SANDBOXNB_TOKEN=$(cat {_TOKEN_FILE}) && rm -f {_TOKEN_FILE} && "
            f"export SANDBOXNB_TOKEN && exec python3 {_SERVER} {shlex.join(args)}"
        )
        await sandbox.process.create_session(_SESSION)
        cmd = await sandbox.process.execute_session_command(
            _SESSION, SessionExecuteRequest(command=command, run_async=True))
        delay, polls = 0.01, 0
        while True:
            logs = await sandbox.process.get_session_command_logs(_SESSION, cmd.cmd_id)
            match = _READY.search(logs.stdout or "")
            if match:
                import json

                return int(json.loads(match.group(1))["port"])
            polls += 1
            if polls % 4 == 0:
                status = await sandbox.process.get_session_command(_SESSION, cmd.cmd_id)
                if status.exit_code is not None:
                    tail = (logs.stderr or logs.stdout or "").strip()[-1500:]
                    raise ProviderError(f"daytona: the sandbox server exited with code "
                                        f"{status.exit_code} before it was ready: {tail}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    async def _keepalive(self, sandbox: Any, config: RuntimeConfig) -> None:
        """Refresh Daytona's activity clock while held; delete at ``run_timeout_s``."""
        deadline = None
        if config.limits.run_timeout_s:
            deadline = time.monotonic() + config.limits.run_timeout_s
        while True:
            wait = self.keepalive_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("daytona sandbox %s reached run_timeout_s; deleting", sandbox.id)
                with contextlib.suppress(Exception):
                    await sandbox.delete()
                return
            try:
                await sandbox.refresh_activity()
            except Exception as err:  # keep trying: auto-stop is minutes away
                log.warning("daytona keepalive for %s failed: %s", sandbox.id, err)

    async def _release(self, sandbox: Any, ssh: _Tunnel | None, nonce: str) -> None:
        """Close the tunnel and delete the sandbox (found by its nonce label if create died)."""
        if ssh is not None:
            await ssh.close()
        if sandbox is not None:
            try:
                await sandbox.delete()
                return
            except Exception as err:
                log.warning("daytona: deleting %s failed (%s); retrying by label", sandbox.id,
                            err)
        await self._delete_by_labels({f"{LABEL}.nonce": nonce},
                                     attempts=1 if sandbox is not None else 4)

    async def _delete_by_labels(self, labels: dict[str, str], attempts: int = 1) -> list[str]:
        """Delete every sandbox carrying ``labels``; poll a few times (a create may be landing)."""
        from daytona import ListSandboxesQuery

        client = await self._daytona()
        deleted: list[str] = []
        for attempt in range(attempts):
            try:
                found = [sb async for sb in client.list(ListSandboxesQuery(labels=labels))]
            except Exception as err:
                log.warning("daytona: listing sandboxes by label failed: %s", err)
                found = []
            for sb in found:
                with contextlib.suppress(Exception):
                    await sb.delete()
                    deleted.append(sb.id)
            if deleted:
                break
            if attempt + 1 < attempts:
                await asyncio.sleep(0.25 * (attempt + 1))
        return deleted

    async def live_sandboxes(self) -> list[str]:
        """Ids of this owner's sandboxes (any session, any state) Daytona still has."""
        from daytona import ListSandboxesQuery

        client = await self._daytona()
        query = ListSandboxesQuery(labels={LABEL: "1", f"{LABEL}.owner": self.owner})
        return [sb.id async for sb in client.list(query)
                if str(getattr(sb.state, "value", sb.state)) != "destroyed"]

    async def reap(self, *, session_only: bool = False) -> list[str]:
        """Delete this owner's (or this session's) sandboxes; return the ids deleted."""
        labels = {LABEL: "1", f"{LABEL}.owner": self.owner}
        if session_only:
            labels[f"{LABEL}.session"] = self.session_id
        return await self._delete_by_labels(labels)

    async def aclose(self) -> None:
        """Close the SDK client."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def __repr__(self) -> str:
        what = (f"snapshot={self.snapshot!r}" if self.snapshot else
                f"image={self.image!r}" if self.image else "default snapshot")
        return f"<DaytonaProvider {what} target={self.target!r}>"


async def _both(first: Any, second: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
    """Run two coroutines concurrently; return the first's result; cancel both on failure."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        return (await asyncio.wait_for(asyncio.gather(*tasks), timeout))[0]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Tunnel:
    """An SSH connection to Daytona's gateway and one local port forward. Holds the SSH token
    only for the connect call; never logs or shows it."""

    def __init__(self) -> None:
        self._conn: Any = None
        self._listener: Any = None

    def __repr__(self) -> str:
        return "<daytona ssh tunnel>"

    async def open(self, sandbox: Any, minutes: int) -> None:
        import asyncssh

        access = await sandbox.create_ssh_access(expires_in_minutes=minutes)
        match = _SSH_CMD.search(access.ssh_command or "")
        if match is None:
            raise ProviderError("daytona: could not parse the SSH gateway address from the "
                                "ssh-access response")
        host, port = match.group("host"), int(match.group("port") or 22)
        try:
            self._conn = await asyncssh.connect(
                host, port, username=access.token, known_hosts=None, client_keys=None,
                agent_path=None, password=None, config=None, keepalive_interval=30)
        except (OSError, asyncssh.Error) as err:
            raise ProviderError(f"daytona: SSH gateway {host}:{port} refused the connection: "
                                f"{type(err).__name__}") from None

    async def forward(self, remote_port: int) -> int:
        self._listener = await self._conn.forward_local_port("127.0.0.1", 0, "127.0.0.1",
                                                             remote_port)
        return int(self._listener.get_port())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.wait_closed(), 5)
