"""Acquire latency of the Daytona provider against the emulated Daytona cloud, split into phases.

Each iteration walks the provider template's phases one after another through the public hooks,
then does one end-to-end acquisition; medians over ``--runs`` iterations after one warm-up:

* ``create``         ``prov.create(spec)``: create the sandbox (the SDK waits until it is started),
                     upload the server and its env, start it in a background session; SSH access
                     and the gateway connection are set up meanwhile. Split by the emulator's
                     handler times into ``control plane`` (create -> started: nearly all of it the
                     isolated process tree start), ``toolbox`` (upload + session + exec) and
                     ``client side``, the rest (SDK request building, pydantic models, aiohttp,
                     and the SSH connection that runs on the same loop)
* ``address``        ``prov.address(handle)``: what is left of the SSH connect once create is done,
                     plus the local port forward
* ``ready``          from the forward to the first authenticated handshake, retried with the
                     template's backoff and its ``failure`` check between attempts
* ``  server boot``  ``ready`` minus one handshake: the server starting in the sandbox
* ``handshake``      ``client.connect`` on the ready sandbox's endpoint (through the forward)
* ``destroy``        ``prov.destroy(handle)``: keepalive stop, forward and SSH close, delete
* ``acquire e2e``    ``async with prov.open(config)`` up to the connected client (phases in line,
                     as the template runs them), and ``release e2e`` its exit

Every sandbox is released on every path (an error, Ctrl-C), and none may be left at the end.

    .venv/bin/python benchmarks/cloud_acquire_daytona.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from sandboxnb.client import Sandbox, connect
from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.errors import AuthenticationError, ConnectionLost, ProviderError, SandboxTimeout
from sandboxnb.providers.base import (
    LABEL,
    READY_BACKOFF_CAP_S,
    READY_BACKOFF_START_S,
    Endpoint,
    LaunchSpec,
    Provider,
)
from sandboxnb.providers.daytona import DaytonaProvider
from sandboxnb.testing.daytona_emulator import DaytonaEmulator

T = TypeVar("T")

#: (key, label) of the table's rows, in order
ROWS = (
    ("create", "create"), ("control", "  control plane"), ("toolbox", "  toolbox"),
    ("client", "  client side"),
    ("address", "address"),
    ("ready", "ready"), ("server boot", "  server boot"),
    ("handshake", "handshake"),
    ("destroy", "destroy"),
    ("acquire e2e", "acquire e2e"), ("release e2e", "release e2e"),
)


def handler_times(emu: DaytonaEmulator, start: int) -> dict[str, float]:
    """The emulator's handler time since request ``start``: control plane and toolbox."""
    out = {"control": 0.0, "toolbox": 0.0}
    for _, route, seconds in emu.request_times[start:]:
        if route.startswith("/toolbox/"):
            out["toolbox"] += seconds
        elif not route.endswith("/ssh-access"):  # SSH setup runs alongside, off the path
            out["control"] += seconds
    return out


async def wait_ready(prov: Provider, handle: Any, endpoint: Endpoint, limit_s: float) -> Sandbox:
    """Connect and authenticate until the server answers, as the template's readiness does."""
    delay = READY_BACKOFF_START_S
    async with asyncio.timeout(limit_s):
        while True:
            try:
                return await connect(endpoint, heartbeat_s=None,
                                     connect_timeout_s=max(5.0, delay * 4))
            except AuthenticationError:
                raise
            except (ConnectionLost, SandboxTimeout, OSError):
                pass
            if (reason := await prov.failure(handle)) is not None:
                raise ProviderError(f"sandbox {endpoint.sandbox_id} will not be ready: {reason}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, READY_BACKOFF_CAP_S)


async def release(prov: Provider, spec: LaunchSpec, creating: asyncio.Future[Any] | None) -> None:
    """Destroy what a phase walk reached: the handle, or whatever carries the spec's id."""
    if creating is None:
        return
    handle = None
    with contextlib.suppress(BaseException):
        handle = await creating
    if handle is not None:
        await prov.destroy(handle)
        return
    for found in await prov.list_sandboxes({f"{LABEL}.sandbox_id": spec.sandbox_id}):
        await prov.destroy(found.handle)


async def phases(emu: DaytonaEmulator, prov: DaytonaProvider, config: RuntimeConfig
                 ) -> dict[str, Any]:
    """One acquisition, hook by hook, then its release."""
    spec = prov.launch_spec(config)
    creating: asyncio.Future[Any] | None = None
    out: dict[str, Any] = {}
    try:
        mark, t0 = len(emu.request_times), time.perf_counter()
        creating = asyncio.ensure_future(prov.create(spec))
        handle = await asyncio.shield(creating)  # an interrupted create still yields its handle
        t1 = time.perf_counter()
        server = handler_times(emu, mark)
        url = await prov.address(handle)
        t2 = time.perf_counter()
        endpoint = Endpoint(url=url, token=spec.token, sandbox_id=spec.sandbox_id,
                            provider=prov.name, config=spec.config)
        client = await wait_ready(prov, handle, endpoint, 60)
        t3 = time.perf_counter()
        await client.close()

        t = time.perf_counter()
        client = await connect(endpoint, heartbeat_s=None)
        handshake = time.perf_counter() - t
        await client.close()

        box = emu.find_sandbox(spec.sandbox_id)  # the emulator names it by the spec's id
        out.update({
            "create": t1 - t0, **server, "client": t1 - t0 - server["control"] - server["toolbox"],
            "address": t2 - t1, "ready": t3 - t2, "server boot": t3 - t2 - handshake,
            "handshake": handshake,
            "isolation": box.isolated.isolation if box and box.isolated else "?",
        })
        t = time.perf_counter()
        await prov.destroy(handle)
        out["destroy"] = time.perf_counter() - t
        creating = None  # released
    finally:
        await release(prov, spec, creating)
    return out


async def end_to_end(prov: DaytonaProvider, config: RuntimeConfig) -> dict[str, float]:
    t = time.perf_counter()
    async with prov.open(config):
        acquired = time.perf_counter() - t
        t = time.perf_counter()
    return {"acquire e2e": acquired, "release e2e": time.perf_counter() - t}


async def sdk_once() -> tuple[float, float]:
    """(import, client init) seconds of the Daytona SDK, as the provider's first use pays them."""
    t = time.perf_counter()
    from daytona import AsyncDaytona, DaytonaConfig

    imported = time.perf_counter() - t
    t = time.perf_counter()
    client = AsyncDaytona(DaytonaConfig(api_key=os.environ["DAYTONA_API_KEY"],
                                        api_url=os.environ["DAYTONA_API_URL"],
                                        target=os.environ["DAYTONA_TARGET"]))
    init = time.perf_counter() - t
    await client.close()
    return imported, init


async def measure(runs: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    found: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    once: dict[str, Any] = {}
    async with DaytonaEmulator() as emu:
        once["import"], once["init"] = await sdk_once()
        prov = DaytonaProvider()
        config = prov.check(config_from_flat())
        try:
            for i in range(runs + 1):
                row = await phases(emu, prov, config)
                row.update(await end_to_end(prov, config))
                once["isolation"] = row["isolation"]
                if i == 0:
                    continue  # warm-up: the provider's SDK client
                for key, _ in ROWS:
                    found[key].append(row[key])
        finally:
            try:
                left = await prov.reap(session_only=True)  # the net under the net
            finally:
                await prov.aclose()
            if left:
                print(f"released {len(left)} sandbox(es) left behind: {left}", file=sys.stderr)
        assert left == [], f"sandboxes left behind: {left}"
        assert emu.live_sandboxes() == [], emu.live_sandboxes()
        assert emu.unknown_routes == [], emu.unknown_routes
    return found, once


def run_interrupted_safely(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on an event loop in a worker thread; Ctrl-C cancels it there and waits for
    its release paths to finish (a second Ctrl-C stops waiting).

    Not ``asyncio.run`` in the main thread, because an SDK may take SIGINT over there: the
    Daytona SDK's socket.io client does, on a main-thread loop, and its handler cancels every
    task (the provider's shielded releases too) and stops the loop, which can leave sandboxes
    behind or hang.
    """
    box: dict[str, Any] = {}
    started, finished = threading.Event(), threading.Event()

    async def wrapper() -> T:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        return await main

    def target() -> None:
        try:
            box["result"] = asyncio.run(wrapper())
        except BaseException as err:
            box["error"] = err
        finally:
            started.set()
            finished.set()

    # an Event, not Thread.join: a join interrupted by Ctrl-C may report the thread ended
    threading.Thread(target=target, name="benchmark", daemon=True).start()
    interrupted = False
    while not finished.is_set():
        try:
            finished.wait()
        except KeyboardInterrupt:
            if interrupted:
                print("stopped waiting: sandboxes still being released may be left behind",
                      file=sys.stderr)
                raise
            interrupted = True
            print("interrupted: releasing the sandboxes (Ctrl-C again to stop waiting)",
                  file=sys.stderr)
            started.wait()
            if "task" in box:
                box["loop"].call_soon_threadsafe(box["task"].cancel)
    error = box.get("error")
    if interrupted and (error is None or isinstance(error, asyncio.CancelledError)):
        raise KeyboardInterrupt
    if error is not None:
        raise error
    return box["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        found, once = run_interrupted_safely(measure(args.runs))
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"emulated Daytona acquire, median (min-max) of {args.runs} runs, ms "
          f"(isolation: {once['isolation']})")
    for key, label in ROWS:
        values = found[key]
        med = statistics.median(values) * 1000
        print(f"{label:<24} {med:8.1f}   ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})")
    print(f"{'SDK import (once)':<24} {once['import'] * 1000:8.1f}")
    print(f"{'SDK client init (once)':<24} {once['init'] * 1000:8.1f}")


if __name__ == "__main__":
    main()
