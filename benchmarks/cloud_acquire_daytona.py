"""Acquire latency of the Daytona provider against the emulated Daytona cloud, split into phases.

Each run walks the provider's own acquire steps one after another (the provider overlaps the
SSH phase with server start) and reports medians over ``--runs`` after one warm-up:

* ``sdk``            client-side time of the SDK's create (incl. its state wait) and of one
                     SSH-access call, minus the emulator's handler time for them (request
                     building, pydantic models, aiohttp)
* ``control plane``  create -> started as handled by the emulated API (of which the isolated
                     process tree start is nearly all)
* ``ssh``            create SSH access + SSH connect (token as user name) + local port forward
* ``server ready``   upload server + token, start it in a background session, poll its ready
                     line, then the client's token handshake through the forward
* ``acquire e2e``    ``DaytonaProvider.sandbox()`` to the yielded endpoint (phases overlapped)
* ``release``        tunnel close + delete

    .venv/bin/python benchmarks/cloud_acquire_daytona.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

from sandboxnb.client import connect
from sandboxnb.config import config_from_flat
from sandboxnb.providers.daytona import DaytonaProvider, _Tunnel
from sandboxnb.testing.daytona_emulator import DaytonaEmulator


def _server_time(emu: DaytonaEmulator, start: int) -> float:
    return sum(t for _, _, t in emu.request_times[start:])


async def one_run(emu: DaytonaEmulator, prov: DaytonaProvider) -> dict[str, Any]:
    """One acquisition, phase by phase (sequential), then release."""
    from daytona import CreateSandboxFromSnapshotParams

    config = prov.check(config_from_flat())
    client = await prov._daytona()
    out: dict[str, Any] = {}

    mark, t = len(emu.request_times), time.perf_counter()
    sandbox = await client.create(CreateSandboxFromSnapshotParams(
        labels=prov.labels_for(secrets.token_hex(4)), auto_stop_interval=prov.auto_stop_minutes))
    wall, server = time.perf_counter() - t, _server_time(emu, mark)
    out["control plane"] = server
    sdk_wall, sdk_server = wall, server

    isolation = emu.sandbox(sandbox.id).isolated.isolation  # type: ignore[union-attr]
    mark, t = len(emu.request_times), time.perf_counter()
    await sandbox.create_ssh_access(expires_in_minutes=5)  # one small call: SDK cost alone
    sdk_wall, sdk_server = sdk_wall + time.perf_counter() - t, sdk_server + _server_time(emu, mark)
    out["sdk"] = sdk_wall - sdk_server

    token = secrets.token_urlsafe(32)
    t = time.perf_counter()
    port = await prov._start_server(sandbox, token, config)
    start_wall = time.perf_counter() - t

    tunnel = _Tunnel()
    t = time.perf_counter()
    await tunnel.open(sandbox, 60)
    local = await tunnel.forward(port)
    out["ssh"] = time.perf_counter() - t

    t = time.perf_counter()
    sb = await connect(f"tcp://127.0.0.1:{local}", token, heartbeat_s=None)
    out["server ready"] = start_wall + time.perf_counter() - t
    await sb.close()

    t = time.perf_counter()
    await tunnel.close()
    await sandbox.delete()
    out["release"] = time.perf_counter() - t
    out["isolation"] = isolation
    return out


async def e2e(prov: DaytonaProvider) -> tuple[float, float]:
    t = time.perf_counter()
    async with prov.sandbox(config_from_flat()):
        acquired = time.perf_counter() - t
        t = time.perf_counter()
    return acquired, time.perf_counter() - t


async def main(runs: int) -> dict[str, Any]:
    async with DaytonaEmulator() as emu:
        prov = DaytonaProvider()
        try:
            t = time.perf_counter()
            from daytona import AsyncDaytona  # noqa: F401  (the SDK imports lazily)

            imported = time.perf_counter() - t
            t = time.perf_counter()
            await prov._daytona()
            init = time.perf_counter() - t
            await one_run(emu, prov)  # warm-up
            phases = [await one_run(emu, prov) for _ in range(runs)]
            ends = [await e2e(prov) for _ in range(runs)]
        finally:
            await prov.aclose()
        assert emu.live_sandboxes() == [] and not emu.unknown_routes
    isolation = phases[0].pop("isolation")
    for p in phases[1:]:
        p.pop("isolation")
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    med["acquire e2e"] = statistics.median(a for a, _ in ends)
    med["release e2e"] = statistics.median(r for _, r in ends)
    print(f"emulated Daytona acquire, medians of {runs} runs (isolation: {isolation})")
    print(f"  {'SDK import (once)':24s} {imported * 1000:8.1f} ms")
    print(f"  {'SDK client init (once)':24s} {init * 1000:8.1f} ms")
    for key in ("sdk", "control plane", "ssh", "server ready", "acquire e2e", "release",
                "release e2e"):
        print(f"  {key:24s} {med[key] * 1000:8.1f} ms")
    return med


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    asyncio.run(main(parser.parse_args().runs))
