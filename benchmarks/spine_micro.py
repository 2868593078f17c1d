"""Micro-benchmarks of the sandbox spine, each against its floor measured in the same run.

1. acquire -> ready -> released (local provider: spawn, handshake, close, teardown), jailed
   (the default, bubblewrap) and with ``isolation="none"``, vs the two interpreter floors of
   :mod:`floors` (the base interpreter outside the venv: ``python -c pass`` and
   ``python -S -E -s -c pass``), all interleaved;
2. ``ping`` round trip on an open connection vs a bare loopback TCP line echo (same asyncio
   streams client stack, echo server in its own process);
3. ``exec("true")`` vs spawning ``true`` from asyncio.

Usage: ``python benchmarks/spine_micro.py [--n-acquire 40] [--n-ping 2000] [--n-exec 100]``
"""
# ruff: noqa: ASYNC220 - the floors are measured with plain blocking spawns on purpose

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from floors import Floors

from sandboxnb.client import connect
from sandboxnb.providers.local import LocalProvider

ECHO_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = conn.makefile("rb")
for line in f:
    conn.sendall(line)
"""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _acquire_once(provider: LocalProvider) -> float:
    start = time.perf_counter()
    async with provider.sandbox() as ep:
        sb = await connect(ep)
        await sb.close()
    return time.perf_counter() - start


async def bench_acquire(n: int, floors: Floors) -> dict[str, float]:
    """Median ms of acquire -> ready -> released, jailed and not, interleaved with the floors."""
    providers = {"jailed (default)": LocalProvider(), "isolation='none'": LocalProvider(
        isolation="none")}
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(3):  # warm caches (bundle file, page cache)
        floors.sample()
        for provider in providers.values():
            await _acquire_once(provider)
    floors.samples = {name: [] for name in floors.samples}
    for _ in range(n):
        floors.sample()
        for name, provider in providers.items():
            samples[name].append(await _acquire_once(provider))
    return {name: _median_ms(values) for name, values in samples.items()}


async def bench_ping(n: int) -> tuple[float, float]:
    """Interleaved: each iteration times one echo round trip and one ping (same noise)."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE)
    floor, spine = [], []
    try:
        port = int(echo.stdout.readline())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}\n'
        async with LocalProvider().sandbox() as ep:
            async with await connect(ep, heartbeat_s=None) as sb:
                for i in range(n + 50):
                    start = time.perf_counter()
                    writer.write(payload)
                    await reader.readline()
                    echo_rtt = time.perf_counter() - start
                    rtt = await sb.ping()
                    if i >= 50:
                        floor.append(echo_rtt)
                        spine.append(rtt)
        writer.close()
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()
    return _median_ms(floor), _median_ms(spine)


async def bench_exec(n: int) -> tuple[float, float]:
    floor, spine = [], []
    async with LocalProvider().sandbox() as ep:
        async with await connect(ep) as sb:
            await sb.exec("true")
            for _ in range(n):
                start = time.perf_counter()
                proc = await asyncio.create_subprocess_exec("true")
                await proc.wait()
                floor.append(time.perf_counter() - start)
                start = time.perf_counter()
                result = await sb.exec(["true"])
                spine.append(time.perf_counter() - start)
                assert result.ok
    return _median_ms(floor), _median_ms(spine)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-acquire", type=int, default=40)
    parser.add_argument("--n-ping", type=int, default=2000)
    parser.add_argument("--n-exec", type=int, default=100)
    args = parser.parse_args()
    floors = Floors()
    acquire = await bench_acquire(args.n_acquire, floors)
    print(floors.header())
    for name, ms in acquire.items():
        print(f"acquire->ready->released {name:<18}{ms:8.2f} ms = {floors.ratios(ms)}")
    jail = acquire["jailed (default)"] - acquire["isolation='none'"]
    print(f"the jail's cost per acquire: {jail:+.2f} ms")
    rows = [
        ("ping round trip", "loopback TCP echo", *await bench_ping(args.n_ping), 3.0),
        ("exec(['true'])", "asyncio spawn `true`", *await bench_exec(args.n_exec), None),
    ]
    print(f"{'measure':<26}{'floor':<22}{'floor ms':>10}{'spine ms':>10}{'ratio':>8}"
          f"{'target':>8}")
    for name, floor_name, floor, spine, target in rows:
        ratio = spine / floor
        verdict = "" if target is None else ("<=" if ratio <= target else "> ") + f"{target:g}x"
        print(f"{name:<26}{floor_name:<22}{floor:>10.3f}{spine:>10.3f}{ratio:>7.2f}x"
              f"{verdict:>8}")


if __name__ == "__main__":
    asyncio.run(main())
