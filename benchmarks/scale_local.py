"""Many sandboxes at once on the local provider: N rollouts, each a fresh sandbox whose agent
runs ``sleep 0.5`` in it, at high concurrency. Prints wall time, throughput and acquire latency.

    .venv/bin/python benchmarks/scale_local.py [--rollouts 400] [--max-concurrent 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import sandboxnb


async def agent(sandbox, task) -> str:
    return (await sandbox.exec(["sh", "-c", "sleep 0.5; printf x"])).stdout


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=400)
    parser.add_argument("--max-concurrent", type=int, default=128)
    args = parser.parse_args()
    tasks = [{"id": f"t{i}", "prompt": "x", "grader": {"type": "match", "expected": "x"}}
             for i in range(args.rollouts)]
    start = time.perf_counter()
    run = await sandboxnb.run(tasks, agent, "local", max_concurrent=args.max_concurrent,
                              progress=False, journal=None)
    wall = time.perf_counter() - start
    frame = run.to_pandas()
    print(f"{args.rollouts} rollouts at max_concurrent {args.max_concurrent}: {run.summary()}")
    acquire_ms = frame["acquire_s"] * 1000
    print(f"wall {wall:.1f} s, {args.rollouts / wall:.0f} rollouts/s; acquire median "
          f"{acquire_ms.median():.0f} ms, max {acquire_ms.max():.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
