"""Acquire latency of the Modal provider against the emulated control plane, split into phases.

One acquisition = ``ModalProvider.sandbox(config)`` up to the yielded endpoint, then release.
Phases (medians over ``--runs`` acquisitions after one warm-up that creates the App and builds
the image):

* ``sdk``            client-side time inside ``Sandbox.create`` + ``tunnels()`` that is not spent
                     in the control plane's RPC handlers (SDK request building, auth token,
                     gRPC framing, synchronicity hops)
* ``control plane``  server-side handling of the create/tunnel RPCs (of which ``box start`` is the
                     emulated container start: isolated process tree, entrypoint, tunnel listeners)
* ``server boot``    from tunnels known to the first successful handshake, minus that handshake:
                     the bootstrap unpacking and starting the server inside the sandbox
* ``tunnel``         a fresh TLS connect through the tunnel edge (measured after ready)
* ``handshake``      the token handshake (auth round trip) over an open tunnel connection
* ``release``        terminate on exit

    .venv/bin/python benchmarks/cloud_acquire_modal.py [--runs 7] [--gpu A10G:2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from sandboxnb.config import config_from_flat
from sandboxnb.providers.modal import ModalProvider
from sandboxnb.server import wire as P
from sandboxnb.testing.modal_emulator import ModalEmulator

_CREATE_RPCS = (
    "SandboxCreate", "SandboxCreateV2", "SandboxGetTaskId", "SandboxGetTunnels",
    "SandboxGetTunnelsV2", "AuthTokenGet", "SecretGetOrCreate",
)


async def tunnel_probe(emu: ModalEmulator, host: str, port: int, token: str) -> tuple[float, float]:
    """(TLS connect s, auth handshake s) on a fresh connection through the tunnel."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, ssl=emu.certs.client_context())
    t1 = time.perf_counter()
    writer.write(P.encode(P.request(1, "auth", {"token": token, "protocol": P.PROTOCOL_VERSION})))
    await writer.drain()
    reply = P.decode(await reader.readline())
    t2 = time.perf_counter()
    assert "result" in reply, reply
    writer.close()
    await writer.wait_closed()
    return t1 - t0, t2 - t1


async def measure(runs: int, gpu: str | None) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    with ModalEmulator() as emu:
        provider = ModalProvider()
        config = config_from_flat(cpu=1, memory_mb=512, gpu=gpu)
        try:
            for i in range(runs + 1):
                before = emu.rpc_seconds
                t0 = time.perf_counter()
                async with provider.sandbox(config) as endpoint:
                    t1 = time.perf_counter()
                    phases = endpoint.meta["phases"]
                    tunnel = endpoint.meta["tunnel"]
                    tls_s, handshake_s = await tunnel_probe(
                        emu, tunnel["host"], tunnel["port"], endpoint.token
                    )
                    rec = emu.record(endpoint.sandbox_id)
                    t2 = time.perf_counter()
                t3 = time.perf_counter()
                after = emu.rpc_seconds
                if i == 0:
                    continue  # warm-up: App lookup and image build
                control = sum(after.get(k, 0.0) - before.get(k, 0.0) for k in _CREATE_RPCS)
                row = {
                    "acquire total": t1 - t0,
                    "sdk": phases["create_s"] + phases["tunnels_s"] - control,
                    "control plane": control,
                    "  of which box start": rec.start_s or 0.0,
                    "server boot": phases["ready_s"] - phases["handshake_s"],
                    "tunnel (TLS connect)": tls_s,
                    "handshake": handshake_s,
                    "release": t3 - t2,
                }
                for key, value in row.items():
                    found.setdefault(key, []).append(value)
        finally:
            await provider.aclose()
        assert emu.unimplemented_calls == [], emu.unimplemented_calls
        assert emu.live_sandboxes() == []
    return found


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--gpu", default=None, help="e.g. A10G:2 (uses the V1 sandbox API)")
    args = parser.parse_args()
    found = await measure(args.runs, args.gpu)
    api = "V1 (GPU)" if args.gpu else "V2"
    print(f"emulated Modal acquire, {api} sandboxes, median (min-max) of {args.runs} runs, ms")
    for key, values in found.items():
        med = statistics.median(values) * 1000
        print(f"{key:<24} {med:8.1f}   ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})")


if __name__ == "__main__":
    asyncio.run(main())
