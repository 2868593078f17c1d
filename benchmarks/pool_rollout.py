"""A trivial rollout (acquire, one ``exec(["true"])``, release) from a warm pool, sequentially,
against the interpreter floors of :mod:`floors` and against the same rollout without a pool.

Each timed rollout takes a spare from a full pool (the pool refills between rollouts, untimed:
that is what "warm" means); its release runs in the background, tracked by the pool, and
``aclose`` waits for every one of them before the script ends. All interleaved with the floors.

    .venv/bin/python benchmarks/pool_rollout.py [--n 40] [--size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from floors import Floors

from sandboxnb.pool import Pool
from sandboxnb.providers.local import LocalProvider


async def trivial(opener) -> float:
    start = time.perf_counter()
    async with opener as sandbox:
        result = await sandbox.exec(["true"])
        assert result.exit_code == 0, result
    return time.perf_counter() - start


async def main(n: int, size: int) -> None:
    provider = LocalProvider()
    floors = Floors()
    warm: list[float] = []
    cold: list[float] = []
    async with Pool(provider, size=size) as pool:
        for i in range(n + 3):
            await asyncio.wait_for(pool.wait_full(), 120)
            await pool.drain()  # the previous rollout's release is not timed against the next
            floors.sample()
            took = await trivial(pool.open(pool.config))
            fresh = await trivial(provider.open(pool.config))
            if i == 2:
                floors.samples = {name: [] for name in floors.samples}  # after the warm-up
            if i >= 3:
                warm.append(took)
                cold.append(fresh)
        stats = pool.stats()
    await provider.aclose()
    ms = {name: statistics.median(values) * 1000 for name, values in
          (("warm pool", warm), ("no pool", cold))}
    print(floors.header())
    for name, value in ms.items():
        print(f"  {name:<10} trivial rollout {value:8.2f} ms = {floors.ratios(value)}")
    print(f"  pool: size {size}, {stats['handed_out']} handed out, {stats['created']} created, "
          f"{stats['failures']} failures")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--size", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.size))
