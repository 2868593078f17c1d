"""The Daytona emulator: REST API + toolbox (aiohttp) and an SSH gateway (asyncssh), in process.

Validated against the ``daytona`` SDK 0.226.1. Unknown routes answer 501 naming the route and are
logged and recorded in :attr:`DaytonaEmulator.unknown_routes`, so SDK drift shows at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from sandboxnb.testing.daytona_emulator.api import ControlPlane, api_error, default_snapshot
from sandboxnb.testing.daytona_emulator.ssh import start_gateway
from sandboxnb.testing.daytona_emulator.state import (
    EmulatedSandbox,
    EmulatedSnapshot,
    SshToken,
)
from sandboxnb.testing.daytona_emulator.toolbox import Toolbox
from sandboxnb.testing.faults import FaultPlan, FaultRule
from sandboxnb.testing.isolation import IsolatedSandbox, SandboxHostError

log = logging.getLogger("sandboxnb.testing.daytona_emulator")
SDK_VERSION = "0.226.1"
_ENV_KEYS = ("DAYTONA_API_URL", "DAYTONA_API_KEY", "DAYTONA_TARGET")


class DaytonaEmulator:
    """An emulated Daytona cloud. Use as ``async with`` (current loop) or ``with`` (own thread).

    Entering sets ``DAYTONA_API_URL``, ``DAYTONA_API_KEY`` and ``DAYTONA_TARGET`` (restored on
    exit); leaving destroys every sandbox. ``minute_s`` is the length of one auto-stop minute in
    seconds (shorten it in tests). ``create_delay_s`` delays each create (the sandbox is listed
    as ``creating`` meanwhile). ``snapshot_build_s`` is how long a snapshot build takes;
    images whose name starts with one of ``failing_images`` fail to build. ``faults``
    (:class:`~sandboxnb.testing.faults.FaultPlan`, by default from ``SANDBOXNB_EMULATOR_FAULTS``)
    makes chosen routes (``"POST /sandbox"``) fail: an HTTP status (with ``Retry-After`` if the
    rule has one) or ``reset`` (done, then the connection is dropped before the answer).

    What tests inspect: :attr:`created` (raw ``POST /sandbox`` bodies), :attr:`snapshot_creates`,
    :attr:`sandboxes` (id -> :class:`EmulatedSandbox`), :meth:`live_sandboxes`,
    :attr:`requests` (method, route), :attr:`request_times`, :attr:`unknown_routes`,
    :attr:`ssh_auth_failures`, :attr:`ssh_forwards`, :attr:`deleted`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        target: str = "us",
        targets: Iterable[str] = ("us", "eu"),
        minute_s: float = 60.0,
        snapshot_build_s: float = 0.0,
        failing_images: Iterable[str] = ("fail/",),
        max_cpu: int = 8,
        max_memory_gib: int = 16,
        max_disk_gib: int = 50,
        max_gpu: int = 8,
        create_delay_s: float = 0.0,
        set_env: bool = True,
        faults: FaultPlan | None = None,
    ) -> None:
        self.faults = faults if faults is not None else FaultPlan.from_env()
        self.api_key = api_key or "emu-" + secrets.token_urlsafe(16)
        self.target, self.targets = target, tuple(targets)
        self.minute_s, self.snapshot_build_s = minute_s, snapshot_build_s
        self.failing_images = tuple(failing_images)
        self.max_cpu, self.max_memory_gib = max_cpu, max_memory_gib
        self.max_disk_gib, self.max_gpu = max_disk_gib, max_gpu
        self.set_env = set_env
        self.create_delay_s = create_delay_s
        self.sandboxes: dict[str, EmulatedSandbox] = {}
        self.deleted: list[EmulatedSandbox] = []
        snap = default_snapshot()
        self.snapshots: dict[str, EmulatedSnapshot] = {snap.id: snap}
        self.ssh_tokens: dict[str, SshToken] = {}
        self.created: list[dict[str, Any]] = []
        self.snapshot_creates: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        #: (method, route, seconds spent in the emulator's handler) per authenticated request
        self.request_times: list[tuple[str, str, float]] = []
        self.unknown_routes: list[str] = []
        self.ssh_auth_failures = 0
        self.ssh_forwards: list[tuple[str, int]] = []
        self.api_url = ""
        self.ssh_port = 0
        self._runner: web.AppRunner | None = None
        self._ssh: Any = None
        self._reaper: asyncio.Task | None = None
        self._base_dir: Path | None = None
        self._saved_env: dict[str, str | None] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lookups -----------------------------------------------------------------------------

    def find_sandbox(self, key: str) -> EmulatedSandbox | None:
        """A sandbox by id or name."""
        if key in self.sandboxes:
            return self.sandboxes[key]
        return next((s for s in self.sandboxes.values() if s.name == key), None)

    def find_snapshot(self, key: str) -> EmulatedSnapshot | None:
        """A snapshot by id or name."""
        if key in self.snapshots:
            return self.snapshots[key]
        return next((s for s in self.snapshots.values() if s.name == key), None)

    def live_sandboxes(self) -> list[str]:
        """Ids of sandboxes whose process tree is running (the leak check)."""
        return [s.id for s in self.sandboxes.values()
                if s.isolated is not None and s.isolated.alive]

    def sandbox(self, key: str) -> EmulatedSandbox:
        """A sandbox (also one already deleted) by id or name; KeyError if unknown."""
        found = self.find_sandbox(key) or next(
            (s for s in self.deleted if key in (s.id, s.name)), None)
        if found is None:
            raise KeyError(key)
        return found

    # -- sandbox lifecycle -------------------------------------------------------------------

    async def start_sandbox(self, sb: EmulatedSandbox) -> None:
        """Start the sandbox's isolated process tree; state ``started`` or ``error``."""
        assert self._base_dir is not None
        sb.state = "starting"
        try:
            sb.isolated = await IsolatedSandbox.start(self._base_dir / sb.id[:12], env=sb.env)
        except Exception as err:
            sb.state, sb.error_reason = "error", f"sandbox host failed: {err}"
            log.warning("sandbox %s failed to start: %s", sb.id, err)
            return
        if sb.state == "destroyed":  # deleted while it was starting
            await sb.isolated.terminate()
            sb.isolated = None
            return
        sb.state = "started"
        sb.touch()

    async def stop_sandbox(self, sb: EmulatedSandbox, reason: str) -> None:
        """Stop: kill the process tree (the record stays, state ``stopped``)."""
        if sb.isolated is not None:
            await sb.isolated.terminate()
            sb.isolated = None
        if sb.state != "destroyed":
            sb.state = "stopped"
        log.info("sandbox %s stopped (%s)", sb.id, reason)

    async def destroy_sandbox(self, sb: EmulatedSandbox) -> None:
        """Delete: kill the process tree, drop the record, revoke its SSH tokens."""
        await self.stop_sandbox(sb, reason="deleted")
        sb.state = "destroyed"
        self.sandboxes.pop(sb.id, None)
        self.deleted.append(sb)
        for tok in self.ssh_tokens.values():
            if tok.sandbox_id == sb.id:
                tok.revoked = True

    async def _auto_stop_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.02, min(1.0, self.minute_s / 4)))
            now = time.monotonic()
            for sb in list(self.sandboxes.values()):
                limit = sb.auto_stop_interval * self.minute_s
                if sb.state == "started" and sb.auto_stop_interval > 0 and (
                        now - sb.last_activity > limit):
                    await self.stop_sandbox(sb, reason="auto-stop: no activity")

    # -- HTTP plumbing -----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        route = request.match_info.route
        template = getattr(route.resource, "canonical", None) if route.resource else None
        if request.path.startswith("/socket.io"):
            return web.Response(status=404, text="socket.io is not emulated")
        if template is None:
            msg = f"daytona emulator: route not emulated: {request.method} {request.path}"
            log.warning(msg)
            self.unknown_routes.append(f"{request.method} {request.path}")
            status = 404 if request.method == "GET" and not request.path.startswith(
                ("/sandbox", "/snapshots", "/toolbox")) else 501
            return api_error(status, msg)
        self.requests.append((request.method, template))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return api_error(401, "Unauthorized: missing or wrong bearer token")
        fault = self.faults.take(f"{request.method} {template}")
        if fault is not None and not fault.reset:
            return _fault_response(request, fault)
        started = time.perf_counter()
        try:
            response = await handler(request)
            if fault is not None:  # carried out, but the answer never arrives
                log.info("injected fault: %s %s done, then the connection dropped",
                         request.method, template)
                if request.transport is not None:
                    request.transport.abort()
            return response
        except SandboxHostError as err:
            log.warning("sandbox host error on %s %s: %s", request.method, request.path, err)
            return api_error(500, f"sandbox host error: {err}")
        finally:
            self.request_times.append((request.method, template, time.perf_counter() - started))

    async def start(self) -> DaytonaEmulator:
        """Start the API and the SSH gateway on the running loop."""
        self._base_dir = Path(tempfile.mkdtemp(prefix="daytona-emu-"))
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 2**20)
        app.add_routes(ControlPlane(self).routes())
        app.add_routes(Toolbox(self).routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.api_url = f"http://127.0.0.1:{port}"
        self._ssh = await start_gateway(self)
        self.ssh_port = self._ssh.sockets[0].getsockname()[1]
        self._reaper = asyncio.ensure_future(self._auto_stop_loop())
        if self.set_env:
            self._saved_env = {k: os.environ.get(k) for k in _ENV_KEYS}
            os.environ.update({"DAYTONA_API_URL": self.api_url, "DAYTONA_API_KEY": self.api_key,
                               "DAYTONA_TARGET": self.target})
        return self

    async def stop(self) -> None:
        """Destroy every sandbox, stop the servers, restore the environment."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for sb in list(self.sandboxes.values()):
            await self.stop_sandbox(sb, reason="emulator shutdown")
        if self._ssh is not None:
            self._ssh.close()
            with contextlib.suppress(Exception):
                await self._ssh.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    async def __aenter__(self) -> DaytonaEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync use: the emulator runs on its own loop in a thread ------------------------------

    def __enter__(self) -> DaytonaEmulator:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as err:
                failure.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="daytona-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop = self._thread = None

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the emulator's loop (sync mode) and return its result."""
        if self._loop is None:
            raise RuntimeError("call() is for the sync (thread) mode")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def __repr__(self) -> str:
        return f"<DaytonaEmulator {self.api_url or 'stopped'} sandboxes={len(self.sandboxes)}>"


def _fault_response(request: web.Request, fault: FaultRule) -> web.Response:
    """The answer of an injected HTTP fault (``Retry-After`` when the rule has one)."""
    try:
        status = int(fault.error)
    except ValueError:
        return api_error(500, f"emulator: fault {fault.error!r} is neither an HTTP status nor "
                              "'reset'")
    headers = None if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
    log.info("injected fault: %s %s -> %d", request.method, request.path, status)
    return api_error(status, fault.message or f"emulator: injected {status} on "
                     f"{request.method} {request.path}", headers)
