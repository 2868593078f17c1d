"""Acquire latency of the Daytona provider against the emulated Daytona cloud, split into phases.

Each round walks the provider template's phases one after another through the public hooks
(``template_phases.py``), then does one end-to-end acquisition; medians over ``--runs`` rounds after
one warm-up:

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

Every sandbox is released on every path (an error, Ctrl-C: exit status 130), and none may be left
at the end.

    .venv/bin/python benchmarks/cloud_acquire_daytona.py [--runs 7]
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from template_phases import arguments, print_table, rounds, run, walk

from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.providers.daytona import DaytonaProvider
from sandboxnb.testing.daytona_emulator import DaytonaEmulator

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


def handler_times(emu: DaytonaEmulator, start: int, end: int) -> dict[str, float]:
    """The emulator's handler time of requests ``start`` to ``end``: control plane and toolbox."""
    out = {"control": 0.0, "toolbox": 0.0}
    for _, route, seconds in emu.request_times[start:end]:
        if route.startswith("/toolbox/"):
            out["toolbox"] += seconds
        elif not route.endswith("/ssh-access"):  # SSH setup runs alongside, off the path
            out["control"] += seconds
    return out


async def phases(emu: DaytonaEmulator, prov: DaytonaProvider, config: RuntimeConfig
                 ) -> dict[str, Any]:
    """One walk, its create split by the emulator's handler times."""
    async with walk(prov, config, lambda: len(emu.request_times)) as w:
        box = emu.find_sandbox(w.spec.sandbox_id)  # the emulator names it by the spec's id
        isolation = box.isolated.isolation if box and box.isolated else "?"
    mark, created, _ = w.readings
    server = handler_times(emu, mark, created)
    client = w.seconds["create"] - server["control"] - server["toolbox"]
    return {**w.seconds, **server, "client": client, "isolation": isolation}


async def sdk_once() -> tuple[float, float]:
    """(import, client init) seconds of the Daytona SDK, as the provider's first use pays them.

    Not the provider's client, so without its guard against the SDK's Socket.IO client taking
    Ctrl-C over (asyncio's own handling is what releases the sandboxes): checked to stay off."""
    sigint = signal.getsignal(signal.SIGINT)
    t = time.perf_counter()
    from daytona import AsyncDaytona, DaytonaConfig

    imported = time.perf_counter() - t
    t = time.perf_counter()
    client = AsyncDaytona(DaytonaConfig(api_key=os.environ["DAYTONA_API_KEY"],
                                        api_url=os.environ["DAYTONA_API_URL"],
                                        target=os.environ["DAYTONA_TARGET"]))
    init = time.perf_counter() - t
    await client.close()
    assert signal.getsignal(signal.SIGINT) is sigint, "the Daytona SDK took Ctrl-C over"
    return imported, init


async def measure(runs: int) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    async with DaytonaEmulator() as emu:
        sdk = await sdk_once()
        prov = DaytonaProvider()
        config = prov.check(config_from_flat())
        rows = await rounds(prov, config, runs, lambda p, c: phases(emu, p, c))
        assert emu.live_sandboxes() == [], emu.live_sandboxes()
        assert emu.unknown_routes == [], emu.unknown_routes
    return rows, sdk


def main() -> None:
    args = arguments(__doc__).parse_args()
    rows, (imported, init) = run(measure(args.runs))
    print_table(f"emulated Daytona acquire, median (min-max) of {args.runs} runs, ms "
                f"(isolation: {rows[-1]['isolation']})", ROWS, rows,
                once=[("SDK import (once)", imported), ("SDK client init (once)", init)])


if __name__ == "__main__":
    main()
