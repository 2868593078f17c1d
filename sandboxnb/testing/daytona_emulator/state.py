"""Records of the Daytona emulator: sandboxes, snapshots, SSH tokens, process-session commands."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.testing.isolation import IsolatedSandbox

#: Fields of the SDK's ``CreateSandbox`` / ``CreateSnapshot`` bodies (daytona-api-client 0.226.1).
CREATE_SANDBOX_FIELDS = frozenset({
    "name", "snapshot", "user", "env", "labels", "public", "networkBlockAll", "kvm",
    "networkAllowList", "domainAllowList", "outboundProxyUrl", "otelEndpointOverride", "target",
    "cpu", "gpu", "gpuType", "spot", "memory", "disk", "autoStopInterval", "autoPauseInterval",
    "autoArchiveInterval", "autoDeleteInterval", "ttlMinutes", "queueTimeout", "volumes",
    "buildInfo", "linkedSandbox", "secrets",
})
CREATE_SNAPSHOT_FIELDS = frozenset({
    "name", "imageName", "entrypoint", "cpu", "gpu", "gpuType", "memory", "disk", "buildInfo",
    "regionId", "sandboxClass",
})
#: GPU types the SDK's ``GpuType`` enum accepts.
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000")
DEFAULT_SNAPSHOT = "daytonaio/sandbox:0.5.0"


def now_iso() -> str:
    """Current UTC time in the API's ISO format."""
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class SessionCommand:
    """A command run in a toolbox process session."""

    id: str
    command: str
    pid: int | None = None
    exit_code: int | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None
    stdout: str = ""
    stderr: str = ""


@dataclass
class EmulatedSandbox:
    """One emulated Daytona sandbox; ``isolated`` is its process tree while started."""

    id: str
    name: str
    snapshot: str
    labels: dict[str, str]
    env: dict[str, str]
    target: str
    cpu: int
    memory: int
    disk: int
    gpu: int
    gpu_type: list[str] | None
    auto_stop_interval: int
    auto_archive_interval: int
    auto_delete_interval: int
    toolbox_proxy_url: str
    request: dict[str, Any]
    state: str = "creating"
    error_reason: str | None = None
    isolated: IsolatedSandbox | None = None
    created_at: str = field(default_factory=now_iso)
    last_activity: float = field(default_factory=time.monotonic)
    last_activity_at: str = field(default_factory=now_iso)
    activity_refreshes: int = 0
    #: when it last stopped (monotonic), for auto-delete
    stopped_at: float | None = None
    sessions: dict[str, dict[str, SessionCommand]] = field(default_factory=dict)

    def touch(self) -> None:
        """Record SDK activity (resets the auto-stop clock)."""
        self.last_activity = time.monotonic()
        self.last_activity_at = now_iso()

    def dto(self) -> dict[str, Any]:
        """The sandbox as the REST API returns it (camelCase JSON)."""
        return {
            "id": self.id, "organizationId": "emulated-org", "name": self.name,
            "snapshot": self.snapshot, "user": "daytona", "env": self.env, "labels": self.labels,
            "public": False, "networkBlockAll": False, "kvm": False, "target": self.target,
            "cpu": self.cpu, "gpu": self.gpu, "gpuType": (self.gpu_type or [None])[0],
            "memory": self.memory, "disk": self.disk, "state": self.state,
            "desiredState": "destroyed" if self.state == "destroyed" else
            ("stopped" if self.state == "stopped" else "started"),
            "errorReason": self.error_reason, "autoStopInterval": self.auto_stop_interval,
            "autoArchiveInterval": self.auto_archive_interval,
            "autoDeleteInterval": self.auto_delete_interval, "createdAt": self.created_at,
            "updatedAt": now_iso(), "lastActivityAt": self.last_activity_at,
            "toolboxProxyUrl": self.toolbox_proxy_url, "daemonVersion": "emulated",
        }


@dataclass
class EmulatedSnapshot:
    """A snapshot: becomes ``active`` (or ``build_failed``) once its build time has passed."""

    id: str
    name: str
    image_name: str | None
    cpu: int
    memory: int
    disk: int
    gpu: int
    gpu_type: list[str] | None
    general: bool = False
    state: str = "pending"
    error_reason: str | None = None
    ready_at: float = 0.0
    fails: bool = False
    created_at: str = field(default_factory=now_iso)

    def advance(self) -> None:
        """Move a pending build to its final state once due."""
        if self.state == "pending" and time.monotonic() >= self.ready_at:
            if self.fails:
                self.state = "build_failed"
                self.error_reason = f"emulated build of image {self.image_name!r} failed"
            else:
                self.state = "active"

    def dto(self) -> dict[str, Any]:
        """The snapshot as the REST API returns it."""
        return {
            "id": self.id, "organizationId": "emulated-org", "general": self.general,
            "name": self.name, "imageName": self.image_name, "state": self.state,
            "cpu": self.cpu, "gpu": self.gpu, "gpuType": (self.gpu_type or [None])[0],
            "mem": self.memory, "disk": self.disk, "errorReason": self.error_reason,
            "createdAt": self.created_at, "updatedAt": now_iso(),
        }


@dataclass
class SshToken:
    """An issued SSH access token (the SSH user name at the gateway)."""

    id: str
    token: str = field(repr=False)
    sandbox_id: str
    expires_at: float  # wall clock (time.time())
    created_at: str = field(default_factory=now_iso)
    revoked: bool = False

    def valid(self) -> bool:
        """Issued, not revoked, not expired."""
        return not self.revoked and time.time() < self.expires_at
