"""The launch spec: everything a backend needs to start one sandbox running our server.

One place decides the sandbox id, the token, the labels (one timestamp format) and the server's
options, from ONE policy for unset limits, the same on every provider:

=====================  =========  ==============================================================
field                  default    ``None`` means
=====================  =========  ==============================================================
``startup_timeout_s``  60 s       no deadline on acquire, and the server waits for its first
                                  client forever
``run_timeout_s``      none       no lifetime cap from sandboxnb (a backend with a hard cap of
                                  its own, like Modal's 24 h, still applies it)
``idle_timeout_s``     15 s       the dead-man switch is off: the server never exits for lack
                                  of a client and never drops a silent one; the sandbox still
                                  ends with its owner where the provider sees the owner die
                                  (local, docker) and at the backend's own net (Modal's
                                  ``timeout``, Daytona's auto-stop)
=====================  =========  ==============================================================

**The dead-man switch** (the server, :mod:`sandboxnb.server.lifecycle`): clients heartbeat every
3 s; the server exits ``idle_timeout_s`` after its last client is gone. A client is gone when its
connection closes (a killed owner's kernel closes it at once) or when it has sent nothing for
the silence limit, ``max(idle_timeout_s, 45 s)``. An event loop blocked that long (a notebook
cell that never yields) stops heartbeats too: the connection is dropped and the sandbox ends
one idle window later; raise ``idle_timeout_s``, or set it to ``None``, for such sessions. A
sandbox that never saw a client (its owner died while acquiring it) ends
``min(startup_timeout_s, max(idle_timeout_s, 15 s))`` after its server started.

**When the owner is killed** (``kill -9`` of a notebook kernel or ``sandboxnb run``), what is
left of its sandboxes, and for how long, with the defaults:

==========  ====================================================================================
provider    gone within
==========  ====================================================================================
local       ~1 s: a jailed server dies with its owner (bubblewrap's ``--die-with-parent``);
            an unjailed one watches its parent (``--owner-pid``) every second and, without a
            cgroup, removes its host directory (``--remove-dir``); a directory left is removed
            when the next local sandbox starts (or by ``sandboxnb gc``)
docker      ~1-3 s: a reaper process per provider (:mod:`.docker_reaper`) removes the session's
            containers, started or only created, once its owner's pipe closes; the server's
            switch (15 s) ends a container if the reaper is gone too; containers are
            ``--rm`` (auto-removed), so none is left stopped
modal       ~15 s after the last client (the server exits, and a Modal sandbox ends with its
            command); Modal's ``idle_timeout`` (``max(idle, startup)``) and ``timeout`` are the
            second net
daytona     the server exits after 15 s; the Daytona sandbox itself keeps running until its
            auto-stop, which is 1 minute (Daytona's shortest) after the last keepalive, then
            it is deleted at once (``auto_delete_interval=0``)
==========  ====================================================================================
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sandboxnb.config import RuntimeConfig

__all__ = [
    "LABEL",
    "SERVER_BUNDLE_NAME",
    "TOKEN_ENV",
    "LaunchSpec",
    "limit_option",
    "make_launch_spec",
    "owner_alive",
    "owner_label",
    "sandbox_labels",
]

#: Every sandbox carries ``LABEL=1``; the other labels are ``LABEL + ".<key>"``.
LABEL = "sandboxnb"
#: The environment variable that hands the token to the server (it removes it at start).
TOKEN_ENV = "SANDBOXNB_TOKEN"
#: The file name of the shipped server zipapp.
SERVER_BUNDLE_NAME = "sandboxnb.server.pyz"


def owner_label() -> str:
    """``user@host``: who owns a sandbox, for the labels that let us find it again."""
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def owner_alive(labels: Mapping[str, str]) -> bool:
    """Whether the process that created a sandbox (its labels say which) still runs here."""
    owner, pid = labels.get(f"{LABEL}.owner", ""), labels.get(f"{LABEL}.pid", "")
    if owner != owner_label() or not pid.isdigit():
        return False  # another user or host: its liveness cannot be asked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def utc_stamp() -> str:
    """The one timestamp format of labels: ``2026-01-31T12:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sandbox_labels(provider: str, sandbox_id: str, session: str) -> dict[str, str]:
    """The labels every sandbox of ours carries, on every backend."""
    return {
        LABEL: "1",
        f"{LABEL}.provider": provider,
        f"{LABEL}.sandbox_id": sandbox_id,
        f"{LABEL}.owner": owner_label(),
        f"{LABEL}.session": session,
        f"{LABEL}.pid": str(os.getpid()),
        f"{LABEL}.created": utc_stamp(),
    }


def limit_option(value: float | None) -> str:
    """A limit as the server's option value: ``0`` disables it (the policy's ``None``)."""
    return "0" if value is None else f"{value:g}"


@dataclass(frozen=True)
class LaunchSpec:
    """One sandbox to start: who it is, how it proves it is ours, how its server runs."""

    sandbox_id: str
    token: str = field(repr=False)
    config: RuntimeConfig
    labels: Mapping[str, str]

    def server_args(self, *, workdir: str | None = None, listen: list[str] | None = None,
                    memory_mb: bool = False, owner_pid: int | None = None,
                    remove_dir: str | None = None) -> list[str]:
        """The server's options (after ``python3 BUNDLE``), from the one policy.

        ``listen`` is how it listens (``["--host", "0.0.0.0", "--port", "7000"]``,
        ``["--unix", PATH]`` or ``["--listen-fd", "N"]``); ``memory_mb`` makes the server
        cap its own address space (for backends without a memory limit of their own);
        ``owner_pid`` is the parent whose death ends the server, which then removes
        ``remove_dir`` (the sandbox's host directory).
        """
        limits = self.config.limits
        args = ["--sandbox-id", self.sandbox_id,
                "--startup-timeout", limit_option(limits.startup_timeout_s),
                "--idle-timeout", limit_option(limits.idle_timeout_s)]
        if workdir is not None:
            args += ["--workdir", workdir]
        if memory_mb and self.config.resources.memory_mb is not None:
            args += ["--memory-mb", str(self.config.resources.memory_mb)]
        if owner_pid is not None:
            args += ["--owner-pid", str(owner_pid)]
        if remove_dir is not None:
            args += ["--remove-dir", remove_dir]
        return [*args, *(listen or [])]

    def server_env(self) -> dict[str, str]:
        """The environment the server needs: the token (which it removes at start)."""
        return {TOKEN_ENV: self.token}


def make_launch_spec(provider: str, config: RuntimeConfig, *, session: str) -> LaunchSpec:
    """A new sandbox's spec: a fresh id and token, the labels, the config."""
    sandbox_id = f"{provider}-{secrets.token_hex(6)}"
    return LaunchSpec(
        sandbox_id=sandbox_id,
        token=secrets.token_urlsafe(32),
        config=config,
        labels=sandbox_labels(provider, sandbox_id, session),
    )
