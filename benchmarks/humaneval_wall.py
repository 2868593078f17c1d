"""HumanEval oracle wall time on local sandboxes vs the floor of bare check programs.

For each concurrency N in (1, 2, 4, 8): the wall time of ``sandboxnb.run(humaneval, oracle,
max_concurrent=N)`` (a fresh sandbox per problem, journal on) against running the same 164 check
programs as bare interpreter processes, N at a time. Prints medians of ``--repeats`` runs and the
ratio. Target on a 2-core machine: at most 2x the floor at N = 8.

    .venv/bin/python benchmarks/humaneval_wall.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

import sandboxnb
from sandboxnb.tasksets.humaneval import check_program, load


async def floor_wall(programs: list[str], concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(program: str) -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                program,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in programs))
    return time.perf_counter() - start


async def sandbox_wall(concurrency: int, journal_dir: str) -> float:
    start = time.perf_counter()
    run = await sandboxnb.run(
        "humaneval",
        "oracle",
        "local",
        max_concurrent=concurrency,
        progress=False,
        journal=f"{journal_dir}/c{concurrency}-{time.monotonic_ns()}.jsonl",
    )
    wall = time.perf_counter() - start
    assert run.counts() == {"ok": 164} and run.mean_reward() == 1.0, run.summary()
    return wall


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    tasks = load()
    programs = [check_program(t.metadata, t.metadata["canonical_solution"]) for t in tasks]
    print(
        f"HumanEval oracle, 164 problems, median of {args.repeats} "
        f"(python {sys.version.split()[0]})"
    )
    print(f"{'concurrency':>11} {'floor s':>9} {'sandboxnb s':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as journal_dir:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            floors, ours = [], []
            for _ in range(args.repeats):  # interleave so drift hits both alike
                floors.append(await floor_wall(programs, concurrency))
                ours.append(await sandbox_wall(concurrency, journal_dir))
            floor, mine = statistics.median(floors), statistics.median(ours)
            print(f"{concurrency:>11} {floor:>9.2f} {mine:>12.2f} {mine / floor:>6.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
