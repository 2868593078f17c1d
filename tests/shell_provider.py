"""A provider written only for the tests, from the template's hooks alone: it starts the sandbox
server through a shell command template. It is the worked example of a new backend."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sandboxnb.bundle import bundle_path
from sandboxnb.providers.base import Found, LaunchSpec, Provider

#: ``{python}``, ``{bundle}`` and ``{args}`` (the server's quoted options) are filled in.
DEFAULT_TEMPLATE = "exec {python} -S -E -s {bundle} {args}"


class ShellSandbox:
    """A server started by ``/bin/sh`` in its own session, reached on a unix socket."""

    def __init__(self, spec: LaunchSpec, root: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sandbox_id, self.labels, self.root, self.proc = (
            spec.sandbox_id, dict(spec.labels), root, proc)


class ShellProvider(Provider):
    """Sandboxes started by a shell command template (no isolation: for tests only)."""

    name = "shell"
    supported: ClassVar[frozenset[str]] = frozenset({"limits"})
    description = "a sandbox server started by a shell command template"
    transport = "unix socket"

    def __init__(self, template: str = DEFAULT_TEMPLATE) -> None:
        self.template = template
        self.created = 0
        self._live: dict[str, ShellSandbox] = {}

    async def create(self, spec: LaunchSpec) -> ShellSandbox:
        self.created += 1
        root = Path(tempfile.mkdtemp(prefix=f"sandboxnb-{spec.sandbox_id}-"))
        args = spec.server_args(workdir=str(root / "work"),
                                listen=["--unix", str(root / "server.sock")])
        command = self.template.format(python=shlex.quote(sys.executable),
                                       bundle=shlex.quote(str(bundle_path())),
                                       args=shlex.join(args))
        proc = subprocess.Popen(  # noqa: ASYNC220 - spawning does not wait
            ["/bin/sh", "-c", command], env={**os.environ, **spec.server_env()},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        box = self._live[spec.sandbox_id] = ShellSandbox(spec, root, proc)
        return box

    async def address(self, handle: ShellSandbox) -> str:
        return f"unix://{handle.root / 'server.sock'}"

    async def failure(self, handle: ShellSandbox) -> str | None:
        code = handle.proc.poll()
        return None if code is None else f"the shell command exited with code {code}"

    async def destroy(self, handle: ShellSandbox) -> None:
        with contextlib.suppress(OSError):
            os.killpg(handle.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(handle.proc.wait)
        shutil.rmtree(handle.root, ignore_errors=True)
        self._live.pop(handle.sandbox_id, None)

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        return [Found(box.sandbox_id, box, box.labels) for box in list(self._live.values())
                if all(box.labels.get(key) == value for key, value in labels.items())]

    def endpoint_meta(self, handle: ShellSandbox) -> dict[str, Any]:
        return {"pid": handle.proc.pid}
