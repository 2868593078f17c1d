"""Acquire latency of the Modal provider against the emulated control plane, split into phases.

Each iteration walks the provider template's phases one after another through the public hooks,
then does one end-to-end acquisition; medians over ``--runs`` iterations after one warm-up (which
opens the client and App and builds the image):

* ``create``         ``prov.create(spec)``: ``Sandbox.create`` with the bootstrap and the spec's
                     server options, tags and tunnel port
* ``  sdk``          client-side part of it: the create wall time minus the control plane's
                     handling of the RPCs received meanwhile (request building, auth token, gRPC
                     framing, synchronicity hops)
* ``  control plane`` server-side handling of those RPCs (of which ``box start`` is the emulated
                     container start: isolated process tree, entrypoint, tunnel listeners)
* ``address``        ``prov.address(handle)``: the tunnel URL (split the same way)
* ``ready``          from the URL to the first authenticated handshake, retried with the
                     template's backoff and its ``failure`` check between attempts
* ``  server boot``  ``ready`` minus one handshake: the bootstrap unpacking and starting the server
* ``handshake``      ``client.connect`` on the ready sandbox's endpoint; a bare connection splits
                     it into ``TLS connect`` through the emulated tunnel and the token ``auth round
                     trip``, and ``client side`` is the rest (the client's TLS context, its
                     reader task)
* ``destroy``        ``prov.destroy(handle)`` (terminate)
* ``acquire e2e``    ``async with prov.open(config)`` up to the connected client (phases in line,
                     as the template runs them), and ``release e2e`` its exit

Every sandbox is released on every path (an error, Ctrl-C), and none may be left at the end.

    .venv/bin/python benchmarks/cloud_acquire_modal.py [--runs 7] [--gpu A10G:2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
from sandboxnb.providers.modal import ModalProvider
from sandboxnb.server import wire as P
from sandboxnb.testing.modal_emulator import ModalEmulator

T = TypeVar("T")

#: (key, label) of the table's rows, in order
ROWS = (
    ("create", "create"), ("create sdk", "  sdk"), ("create control", "  control plane"),
    ("box start", "    of which box start"),
    ("address", "address"), ("address sdk", "  sdk"), ("address control", "  control plane"),
    ("ready", "ready"), ("server boot", "  server boot"),
    ("handshake", "handshake"), ("tls", "  TLS connect"), ("auth", "  auth round trip"),
    ("client rest", "  client side (rest)"),
    ("destroy", "destroy"),
    ("acquire e2e", "acquire e2e"), ("release e2e", "release e2e"),
)


def rpc_delta(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Control-plane handling time of the RPCs answered between two readings."""
    return sum(after.get(k, 0.0) - before.get(k, 0.0) for k in after)


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


async def tunnel_probe(url: str, token: str, ca_file: str) -> tuple[float, float]:
    """(TLS connect s, auth round trip s) on a fresh bare connection through the tunnel."""
    parts = urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca_file)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=ctx)
    t1 = time.perf_counter()
    try:
        writer.write(P.encode(P.request(1, "auth", {"token": token,
                                                    "protocol": P.PROTOCOL_VERSION})))
        await writer.drain()
        reply = P.decode(await reader.readline())
        t2 = time.perf_counter()
        assert "result" in reply, reply
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return t1 - t0, t2 - t1


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


async def phases(emu: ModalEmulator, prov: ModalProvider, config: RuntimeConfig
                 ) -> dict[str, float]:
    """One acquisition, hook by hook, then its release."""
    spec = prov.launch_spec(config)
    creating: asyncio.Future[Any] | None = None
    out: dict[str, float] = {}
    try:
        rpc0, t0 = emu.rpc_seconds, time.perf_counter()
        creating = asyncio.ensure_future(prov.create(spec))
        handle = await asyncio.shield(creating)  # an interrupted create still yields its handle
        t1, rpc1 = time.perf_counter(), emu.rpc_seconds
        url = await prov.address(handle)
        t2, rpc2 = time.perf_counter(), emu.rpc_seconds
        endpoint = Endpoint(url=url, token=spec.token, sandbox_id=spec.sandbox_id,
                            provider=prov.name, config=spec.config)
        client = await wait_ready(prov, handle, endpoint, 60)
        t3 = time.perf_counter()
        await client.close()

        t = time.perf_counter()
        client = await connect(endpoint, heartbeat_s=None)
        handshake = time.perf_counter() - t
        await client.close()
        tls, auth = await tunnel_probe(url, spec.token, emu.ca_file)

        (rec,) = (r for r in emu.creates if r.tags.get(f"{LABEL}.sandbox_id") == spec.sandbox_id)
        control_create, control_address = rpc_delta(rpc0, rpc1), rpc_delta(rpc1, rpc2)
        out.update({
            "create": t1 - t0, "create sdk": t1 - t0 - control_create,
            "create control": control_create, "box start": rec.start_s or 0.0,
            "address": t2 - t1, "address sdk": t2 - t1 - control_address,
            "address control": control_address,
            "ready": t3 - t2, "server boot": t3 - t2 - handshake,
            "handshake": handshake, "tls": tls, "auth": auth,
            "client rest": handshake - tls - auth,
        })
        t = time.perf_counter()
        await prov.destroy(handle)
        out["destroy"] = time.perf_counter() - t
        creating = None  # released
    finally:
        await release(prov, spec, creating)
    return out


async def end_to_end(prov: ModalProvider, config: RuntimeConfig) -> dict[str, float]:
    t = time.perf_counter()
    async with prov.open(config):
        acquired = time.perf_counter() - t
        t = time.perf_counter()
    return {"acquire e2e": acquired, "release e2e": time.perf_counter() - t}


async def measure(runs: int, gpu: str | None) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    with ModalEmulator() as emu:
        prov = ModalProvider()
        config = prov.check(config_from_flat(cpu=1, memory_mb=512, gpu=gpu))
        try:
            for i in range(runs + 1):
                row = await phases(emu, prov, config)
                row.update(await end_to_end(prov, config))
                if i == 0:
                    continue  # warm-up: client, App lookup and image build
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
        assert emu.unimplemented_calls == [], emu.unimplemented_calls
        assert emu.live_sandboxes() == [], emu.live_sandboxes()
    return found


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
    parser.add_argument("--gpu", default=None, help="e.g. A10G:2 (uses the V1 sandbox API)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        found = run_interrupted_safely(measure(args.runs, args.gpu))
    except KeyboardInterrupt:
        sys.exit(130)
    api = "V1 (GPU)" if args.gpu else "V2"
    print(f"emulated Modal acquire, {api} sandboxes, median (min-max) of {args.runs} runs, ms")
    for key, label in ROWS:
        values = found[key]
        med = statistics.median(values) * 1000
        print(f"{label:<24} {med:8.1f}   ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})")


if __name__ == "__main__":
    main()
