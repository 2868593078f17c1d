"""Per-rollout overhead of the Docker provider against a bare `docker run` on the same engine.

One rollout = acquire (container + server ready) -> connect -> exec `true` -> release
(container removed). The floor is `docker run --rm IMAGE python3 -c pass`; the interpreter
floors of :mod:`floors` (the base interpreter outside the venv, `python -c pass` and `python -S
-E -s -c pass`) are stated too. All are measured interleaved in the same run (the machine is
shared: compare ratios, not absolute times).

    .venv/bin/python benchmarks/docker_overhead.py [--n 15] [--image sandboxnb/python:3.11]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time

from floors import Floors

from sandboxnb.client import connect
from sandboxnb.config import config_from_flat
from sandboxnb.providers.docker import DEFAULT_IMAGE, DockerProvider


async def rollout(provider: DockerProvider, image: str) -> dict[str, float]:
    """One trivial rollout; returns phase durations in seconds."""
    t0 = time.perf_counter()
    async with provider.sandbox(config_from_flat(image=image)) as endpoint:
        t1 = time.perf_counter()
        async with await connect(endpoint) as sb:
            t2 = time.perf_counter()
            result = await sb.exec(["true"])
            assert result.exit_code == 0, result
            t3 = time.perf_counter()
    t4 = time.perf_counter()
    return {
        "acquire": t1 - t0, "connect": t2 - t1, "exec": t3 - t2, "release": t4 - t3,
        "total": t4 - t0,
    }


async def bare_run(image: str) -> float:
    """`docker run --rm IMAGE python3 -c pass`, timed end to end."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", image, "python3", "-c", "pass",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed: {err.decode(errors='replace')}")
    return time.perf_counter() - t0


async def main(n: int, image: str) -> None:
    provider = DockerProvider()
    try:
        await rollout(provider, image)  # warm up: SDK client, server bundle, page cache
        await bare_run(image)
        rows: list[dict[str, float]] = []
        floors: list[float] = []
        interpreter = Floors()
        for _ in range(n):
            rows.append(await rollout(provider, image))
            floors.append(await bare_run(image))
            interpreter.sample()
    finally:
        await provider.aclose()
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    floor = statistics.median(floors)
    print(f"image {image}, {n} sequential rollouts, interleaved with `docker run --rm`")
    for key in ("acquire", "connect", "exec", "release"):
        print(f"  {key:<8} median {med[key] * 1000:8.1f} ms")
    total = med["total"] * 1000
    print(f"  rollout  median {total:8.1f} ms  (acquire -> connect -> exec -> release)")
    print(f"  floor    median {floor * 1000:8.1f} ms  (docker run --rm {image} python3 -c pass)")
    print(f"  ratio    {med['total'] / floor:.2f}x the bare docker run")
    print(f"  {interpreter.header()}")
    print(f"  rollout  = {interpreter.ratios(total)}")
    print(f"  docker run floor = {interpreter.ratios(floor * 1000)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=15, help="rollouts (and bare runs) to time")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image with python3")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.image))
