"""Daytona's side of the Daytona provider: resource units, snapshots, the SSH gateway.

Daytona fixes resources per snapshot, so a config's image + resources become one snapshot, built
once per name. Units: ``memory_mb``/``disk_mb`` -> GiB rounded up, ``cpu`` -> whole cores rounded
up, ``gpu`` -> count plus a GPU type Daytona offers. A named ``snapshot`` takes no resource
overrides. The SSH gateway takes the SSH-access token as the user name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from typing import Any

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, ProviderError, UnsupportedFieldError

__all__ = ["DEFAULT_IMAGE", "GPU_TYPES", "Snapshots", "daytona_resources", "ssh_connect",
           "state_of"]

log = logging.getLogger("sandboxnb.providers.daytona")

#: GPU models Daytona can allocate (``daytona.GpuType`` in SDK 0.226.1).
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000")
DEFAULT_IMAGE = "python:3.12-slim"
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


def state_of(obj: Any) -> str:
    """A Daytona sandbox's or snapshot's state as a plain string."""
    return str(getattr(obj.state, "value", obj.state))


class Snapshots:
    """Which snapshot a config runs on; each snapshot built from its image once."""

    def __init__(self, snapshot: str | None, image: str | None, default_image: str) -> None:
        if snapshot is not None and image is not None:
            raise ConfigError(f"daytona snapshot = {snapshot!r} and image = {image!r}: "
                              "give one (a snapshot is built from an image)")
        self.snapshot, self.image, self.default_image = snapshot, image, default_image
        self._lock = asyncio.Lock()
        self._ready: set[str] = set()

    def check(self, config: RuntimeConfig) -> None:
        """Reject GPU models Daytona lacks and resources on a fixed snapshot."""
        resources = daytona_resources(config)
        if resources and config.image is None and self.snapshot is not None:
            raise ConfigError(
                f"daytona snapshot = {self.snapshot!r} fixes its resources; got resources "
                f"{sorted(resources)}: pass image=... instead of snapshot= so sandboxnb builds a "
                "snapshot with them")

    def choose(self, config: RuntimeConfig) -> tuple[str | None, str | None, dict[str, Any]]:
        """(snapshot name or None for Daytona's default, image to build it from, resources)."""
        resources, image = daytona_resources(config), config.image or self.image
        if image is None and (self.snapshot is not None or not resources):
            return self.snapshot, None, resources
        image = image or self.default_image
        key = hashlib.sha256(repr((image, sorted(resources.items()))).encode()).hexdigest()
        slug = re.sub(r"[^a-z0-9]+", "-", image.lower()).strip("-")[:40]
        return f"sandboxnb-{slug}-{key[:10]}", image, resources

    async def ensure(self, client: Any, name: str, image: str, resources: dict) -> None:
        """Build snapshot ``name`` from ``image`` unless it exists (concurrent callers wait for
        one build); a failed build raises ``ProviderError`` with Daytona's reason."""
        from daytona import CreateSnapshotParams, DaytonaError, DaytonaNotFoundError, Resources

        async with self._lock:
            if name in self._ready:
                return
            try:
                try:
                    snap = await client.snapshot.get(name)
                except DaytonaNotFoundError:
                    log.info("daytona: building snapshot %s from image %s", name, image)
                    snap = await client.snapshot.create(CreateSnapshotParams(
                        name=name, image=image, resources=Resources(**resources)))
                while state_of(snap) not in ("active", "error", "build_failed"):
                    await asyncio.sleep(1.0)
                    snap = await client.snapshot.get(name)
            except DaytonaError as err:
                raise ProviderError(f"daytona snapshot {name!r} for image {image!r} failed to "
                                    f"build: {err}") from None
            if state_of(snap) != "active":
                raise ProviderError(
                    f"daytona snapshot {name!r} for image {image!r} is {state_of(snap)}: "
                    f"{getattr(snap, 'error_reason', None) or 'no reason given'}")
            self._ready.add(name)


async def ssh_connect(sandbox: Any, minutes: int) -> Any:
    """An SSH connection to the sandbox's gateway, with fresh SSH access (its token is the user
    name: never logged or shown)."""
    import asyncssh

    access = await sandbox.create_ssh_access(expires_in_minutes=minutes)
    match = _SSH_CMD.search(access.ssh_command or "")
    if match is None:
        raise ProviderError("daytona: cannot parse the SSH gateway from the ssh-access reply")
    host, port = match.group("host"), int(match.group("port") or 22)
    try:
        return await asyncssh.connect(
            host, port, username=access.token, known_hosts=None, client_keys=None,
            agent_path=None, password=None, config=None, keepalive_interval=30)
    except (OSError, asyncssh.Error) as err:
        raise ProviderError(f"daytona: SSH gateway {host}:{port} refused the connection: "
                            f"{type(err).__name__}") from None


def keep_sigint_ours() -> None:
    """The SDK's Socket.IO client (engineio) installs a loop-wide SIGINT handler that cancels
    every task, our shielded releases included, then stops the loop: Ctrl-C would leak sandboxes
    and hang. engineio skips installing it once its module flag says one is set."""
    try:
        import engineio.async_client as engineio_client
    except ImportError:
        return
    engineio_client.async_signal_handler_set = True
