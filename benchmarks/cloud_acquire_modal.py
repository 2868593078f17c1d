"""Acquire latency of the Modal provider against the emulated control plane, split into phases.

Each round walks the provider template's phases one after another through the public hooks
(``template_phases.py``), then does one end-to-end acquisition; medians over ``--runs`` rounds after
one warm-up (which opens the client and App and builds the image):

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

Every sandbox is released on every path (an error, Ctrl-C: exit status 130), and none may be left
at the end.

    .venv/bin/python benchmarks/cloud_acquire_modal.py [--runs 7] [--gpu A10G:2]
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from template_phases import arguments, print_table, rounds, run, walk

from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.providers.base import LABEL
from sandboxnb.providers.modal import ModalProvider
from sandboxnb.server import wire as P
from sandboxnb.testing.modal_emulator import ModalEmulator

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


async def phases(emu: ModalEmulator, prov: ModalProvider, config: RuntimeConfig
                 ) -> dict[str, float]:
    """One walk, its create and address split by the control plane's RPC handling times and its
    handshake by a bare connection through the tunnel."""
    async with walk(prov, config, lambda: emu.rpc_seconds) as w:
        tls, auth = await tunnel_probe(w.url, w.spec.token, emu.ca_file)
        sandbox_id = w.spec.sandbox_id
        (rec,) = (r for r in emu.creates if r.tags.get(f"{LABEL}.sandbox_id") == sandbox_id)
    rpc0, rpc1, rpc2 = w.readings
    s = w.seconds
    control_create, control_address = rpc_delta(rpc0, rpc1), rpc_delta(rpc1, rpc2)
    return {
        **s, "create sdk": s["create"] - control_create, "create control": control_create,
        "box start": rec.start_s or 0.0,
        "address sdk": s["address"] - control_address, "address control": control_address,
        "tls": tls, "auth": auth, "client rest": s["handshake"] - tls - auth,
    }


async def measure(runs: int, gpu: str | None) -> list[dict[str, Any]]:
    with ModalEmulator() as emu:
        prov = ModalProvider()
        config = prov.check(config_from_flat(cpu=1, memory_mb=512, gpu=gpu))
        rows = await rounds(prov, config, runs, lambda p, c: phases(emu, p, c))
        assert emu.unimplemented_calls == [], emu.unimplemented_calls
        assert emu.live_sandboxes() == [], emu.live_sandboxes()
    return rows


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--gpu", default=None, help="e.g. A10G:2 (uses the V1 sandbox API)")
    args = parser.parse_args()
    rows = run(measure(args.runs, args.gpu))
    api = "V1 (GPU)" if args.gpu else "V2"
    print_table(f"emulated Modal acquire, {api} sandboxes, median (min-max) of {args.runs} runs, "
                "ms", ROWS, rows)


if __name__ == "__main__":
    main()
