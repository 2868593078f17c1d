"""HumanEval oracle wall time on local sandboxes vs the floor of bare check programs.

For each concurrency N in (1, 2, 4, 8): the wall time of ``sandboxnb.run(humaneval, oracle,
max_concurrent=N)`` (a fresh sandbox per problem, journal on) against running the same 164 check
programs as processes of the base interpreter outside the venv, N at a time, two ways: ``python
-c PROGRAM`` and ``python -S -E -s -c PROGRAM`` (how our grader starts it). Prints medians of
``--repeats`` interleaved runs and the ratio to each. Target on a 2-core machine: at most 2x.

    .venv/bin/python benchmarks/humaneval_wall.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

from floors import BARE_FLAGS, base_python

import sandboxnb
from sandboxnb.tasksets.humaneval import check_program, load


async def floor_wall(programs: list[str], concurrency: int, flags: tuple[str, ...]) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(program: str) -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                base_python(),
                *flags,
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
        f"(python {sys.version.split()[0]}; floors: {base_python()} outside the venv)"
    )
    print(f"{'concurrency':>11} {'-c s':>7} {'-S -E -s s':>11} {'sandboxnb s':>12} "
          f"{'vs -c':>7} {'vs -S -E -s':>12}")
    with tempfile.TemporaryDirectory() as journal_dir:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            site, bare, ours = [], [], []
            for _ in range(args.repeats):  # interleave so drift hits all alike
                site.append(await floor_wall(programs, concurrency, ()))
                bare.append(await floor_wall(programs, concurrency, BARE_FLAGS))
                ours.append(await sandbox_wall(concurrency, journal_dir))
            a, b, mine = (statistics.median(x) for x in (site, bare, ours))
            print(f"{concurrency:>11} {a:>7.2f} {b:>11.2f} {mine:>12.2f} {mine / a:>6.2f}x "
                  f"{mine / b:>11.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
