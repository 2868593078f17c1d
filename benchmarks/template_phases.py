"""The provider template's phases, one public hook at a time: the shared part of the cloud acquire
benchmarks (``cloud_acquire_modal.py``, ``cloud_acquire_daytona.py``), which split them further
by what their emulator reports.

* ``walk``        ``launch_spec``, ``create``, ``address``, readiness as the template waits for it
                  (handshakes with its backoff, its ``failure`` check between them), one timed
                  handshake on the ready sandbox and, on leaving, a timed ``destroy``
* ``end_to_end``  ``async with prov.open(config)`` up to the connected client, then its exit
* ``rounds``      one warm-up and ``--runs`` measured rounds of both, then the session's reap
* ``run``         ``asyncio.run``; Ctrl-C cancels the benchmark, asyncio waits for it (every
                  release on its way out), then the process exits with status 130

A walk releases its sandbox on every path: an error, a cancellation, Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sandboxnb.client import Sandbox, connect
from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import AuthenticationError, ConnectionLost, ProviderError, SandboxTimeout
from sandboxnb.providers.base import (
    LABEL,
    READY_BACKOFF_CAP_S,
    READY_BACKOFF_START_S,
    Endpoint,
    LaunchSpec,
    Provider,
)

T = TypeVar("T")

#: how long a walk waits for the server's first handshake
READY_LIMIT_S = 60.0


@dataclass
class Walk:
    """One walk: its launch spec, the sandbox's ``url``, ``seconds`` by phase (``create``,
    ``address``, ``ready``, ``server boot``, ``handshake``; ``destroy`` once left) and the
    caller's ``readings`` before create, after create and after address."""

    spec: LaunchSpec
    url: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    readings: tuple[Any, ...] = ()


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
    """Destroy what a walk reached: the handle, or whatever carries the spec's id."""
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


@contextlib.asynccontextmanager
async def walk(prov: Provider, config: RuntimeConfig,
               reading: Callable[[], Any] = lambda: None) -> AsyncIterator[Walk]:
    """Acquire a sandbox hook by hook and yield the walk while it is alive; destroy it on
    leaving. ``reading()`` is taken at the phase boundaries (an emulator's counters)."""
    out = Walk(prov.launch_spec(config))
    spec = out.spec
    creating: asyncio.Future[Any] | None = None
    try:
        r0, t0 = reading(), time.perf_counter()
        creating = asyncio.ensure_future(prov.create(spec))
        handle = await asyncio.shield(creating)  # an interrupted create still yields its handle
        t1, r1 = time.perf_counter(), reading()
        out.url = await prov.address(handle)
        t2, r2 = time.perf_counter(), reading()
        endpoint = Endpoint(url=out.url, token=spec.token, sandbox_id=spec.sandbox_id,
                            provider=prov.name, config=spec.config)
        client = await wait_ready(prov, handle, endpoint, READY_LIMIT_S)
        t3 = time.perf_counter()
        await client.close()

        t = time.perf_counter()
        client = await connect(endpoint, heartbeat_s=None)
        handshake = time.perf_counter() - t
        await client.close()

        out.readings = (r0, r1, r2)
        out.seconds.update({"create": t1 - t0, "address": t2 - t1, "ready": t3 - t2,
                            "server boot": t3 - t2 - handshake, "handshake": handshake})
        yield out
        t = time.perf_counter()
        await prov.destroy(handle)
        out.seconds["destroy"] = time.perf_counter() - t
        creating = None  # released
    finally:
        await release(prov, spec, creating)


async def end_to_end(prov: Provider, config: RuntimeConfig) -> dict[str, float]:
    """``acquire e2e`` and ``release e2e`` of one ``prov.open(config)``."""
    t = time.perf_counter()
    async with prov.open(config):
        acquired = time.perf_counter() - t
        t = time.perf_counter()
    return {"acquire e2e": acquired, "release e2e": time.perf_counter() - t}


async def rounds(prov: Provider, config: RuntimeConfig, runs: int,
                 phases: Callable[[Provider, RuntimeConfig], Awaitable[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """The rows of ``runs`` rounds, each ``phases(prov, config)`` then ``end_to_end``, after one
    warm-up round (the provider's client, what its first sandbox builds). Then the session's
    sandboxes are reaped and the provider closed; none may have been left."""
    rows: list[dict[str, Any]] = []
    try:
        for i in range(runs + 1):
            row = await phases(prov, config)
            row.update(await end_to_end(prov, config))
            if i > 0:
                rows.append(row)
    finally:
        try:
            left = await prov.reap(session_only=True)  # the net under the net
        finally:
            await prov.aclose()
        if left:
            print(f"released {len(left)} sandbox(es) left behind: {left}", file=sys.stderr)
    assert left == [], f"sandboxes left behind: {left}"
    return rows


def print_table(title: str, keys: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]],
                once: Sequence[tuple[str, float]] = ()) -> None:
    """``title``, then a line per (key, label) of ``keys``: median (min-max) over ``rows`` in
    ms, then a line per (label, seconds) measured ``once``."""
    print(title)
    for key, label in keys:
        values = [row[key] for row in rows]
        med = statistics.median(values) * 1000
        print(f"{label:<24} {med:8.1f}   ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})")
    for label, seconds in once:
        print(f"{label:<24} {seconds * 1000:8.1f}")


def _at_least_one(text: str) -> int:
    if (value := int(text)) < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def arguments(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--runs``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=_at_least_one, default=7,
                        help="measured rounds, after one warm-up (default 7)")
    return parser


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``. On Ctrl-C asyncio cancels ``main`` and waits for it to end (its
    releases run on the way out) before raising ``KeyboardInterrupt``: exit with status 130."""
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
