"""The warm pool: each rollout a distinct fresh sandbox, refills, failures with backoff, and
nothing left on any exit path (asked of the OS, the sandbox directories and Docker)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sandboxnb
from sandboxnb.config import ConfigError
from sandboxnb.pool import BACKOFF_START_S, Pool, open_pools
from sandboxnb.providers.local import LocalProvider

from .helpers import live_sandbox_servers, wait_until, wait_until_async

ROOT = Path(__file__).resolve().parents[1]


def _tasks(n: int, **runtime) -> list[dict]:
    task = {"prompt": "7", "grader": {"type": "match", "expected": "7"}}
    if runtime:
        task["runtime"] = runtime
    return [{"id": f"t{i}", **task} for i in range(n)]


async def _fresh_agent(sandbox, task):
    """Fails if anything ran in this sandbox before (a marker file in its working directory)."""
    result = await sandbox.exec(["sh", "-c", "test ! -e used && touch used && printf 7"])
    assert result.exit_code == 0, f"sandbox {sandbox.id} was used before: {result}"
    return result.stdout


def _dirs(root: Path) -> list[Path]:
    return sorted(root.glob("sandboxnb-local-*"))


def _gone(root: Path) -> None:
    assert not live_sandbox_servers(), "a sandbox server outlived the pool"
    assert _dirs(root) == [], "a sandbox directory outlived the pool"


@pytest.fixture
def provider(tmp_path):
    return LocalProvider(root=tmp_path)


async def test_every_rollout_gets_a_distinct_fresh_sandbox_and_spares_go_at_run_end(
        provider, tmp_path):
    pids: list[int] = []

    async def agent(sandbox, task):
        pids.append(sandbox.endpoint.meta["pid"])
        return await _fresh_agent(sandbox, task)

    run = await sandboxnb.run(_tasks(12), agent, provider, journal=None, progress=False,
                              max_concurrent=3, pool=4)
    assert run.counts() == {"ok": 12}, run.errors()
    ids = [row["sandbox_id"] for row in run.rows]
    assert len(set(ids)) == 12 and len(set(pids)) == 12
    _gone(tmp_path)  # the run's own pool released its spares before the run ended


async def test_a_pool_shared_across_two_runs_then_closed(provider, tmp_path):
    async with Pool(provider, size=3) as pool:
        await asyncio.wait_for(pool.wait_full(), 60)
        first = await sandboxnb.run(_tasks(4), _fresh_agent, provider, journal=None,
                                    progress=False, max_concurrent=2, pool=pool)
        second = await sandboxnb.run(_tasks(4), _fresh_agent, provider, journal=None,
                                     progress=False, max_concurrent=2, pool=pool)
        assert first.counts() == second.counts() == {"ok": 4}
        ids = [row["sandbox_id"] for row in (*first.rows, *second.rows)]
        assert len(set(ids)) == 8
        stats = pool.stats()
        assert stats["handed_out"] >= 3 and stats["releasing"] == 0  # each run drained its own
        assert not pool.closed
        await wait_until_async(lambda: pool.stats()["ready"] == 3, 60, "the pool to refill")
    assert pool.stats()["closed"] and pool.stats()["ready"] == 0
    assert pool not in open_pools()
    _gone(tmp_path)


async def test_refills_to_size_after_every_spare_is_taken(provider, tmp_path):
    async with Pool(provider, size=3) as pool:
        await asyncio.wait_for(pool.wait_full(), 60)
        held = [pool.open() for _ in range(3)]
        boxes = [await cm.__aenter__() for cm in held]
        assert pool.stats()["handed_out"] == 3
        await asyncio.wait_for(pool.wait_full(), 60)  # refilled while all three are in use
        assert pool.stats()["ready"] == 3 and pool.stats()["created"] == 6
        spares = {spare.client.id for spare in pool._ready}
        assert not spares & {box.id for box in boxes}
        for cm in held:
            await cm.__aexit__(None, None, None)
    _gone(tmp_path)


class FlakyProvider(LocalProvider):
    """A local provider whose first ``fail`` creates fail (as a cloud quota error would)."""

    def __init__(self, fail: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail = fail
        self.attempts: list[float] = []

    async def create(self, spec):
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.fail:
            raise RuntimeError(f"quota exceeded (attempt {len(self.attempts)})")
        return await super().create(spec)


async def test_a_create_failure_during_refill_is_retried_with_backoff_and_reported(
        tmp_path, caplog):
    provider = FlakyProvider(fail=3, root=tmp_path)
    caplog.set_level(logging.WARNING, logger="sandboxnb.pool")
    async with Pool(provider, size=1) as pool:
        await wait_until_async(lambda: pool.stats()["failures"] >= 1, 30, "a failed create")
        stats = pool.stats()
        assert "quota exceeded" in stats["last_error"] and stats["backoff_s"] > 0
        await asyncio.wait_for(pool.wait_full(), 60)
        assert pool.stats()["failures"] == 3 and pool.stats()["consecutive_failures"] == 0
    gaps = [b - a for a, b in zip(provider.attempts, provider.attempts[1:], strict=False)]
    assert len(provider.attempts) == 4  # no busy loop: one attempt per backoff
    assert gaps[0] >= BACKOFF_START_S * 0.9 and gaps[1] >= BACKOFF_START_S * 1.8, gaps
    assert gaps[2] >= BACKOFF_START_S * 3.6, gaps
    assert sum("quota exceeded" in r.getMessage() for r in caplog.records) == 3
    _gone(tmp_path)


async def test_a_rollout_with_another_config_acquires_as_usual(provider, tmp_path):
    tasks = _tasks(2) + [{**t, "id": f"o{i}"} for i, t in enumerate(
        _tasks(2, limits={"run_timeout_s": 120}))]
    async with Pool(provider, size=2) as pool:
        await asyncio.wait_for(pool.wait_full(), 60)
        run = await sandboxnb.run(tasks, _fresh_agent, provider, journal=None, progress=False,
                                  max_concurrent=1, pool=pool)
        assert run.counts() == {"ok": 4}
        assert pool.stats()["handed_out"] == 2  # the overriding tasks did not take spares
    _gone(tmp_path)


async def test_spares_are_released_on_cancel(provider, tmp_path):
    started = asyncio.Event()

    async def stuck(sandbox, task):
        started.set()
        await asyncio.Event().wait()

    run = sandboxnb.start(_tasks(6), stuck, provider, journal=None, max_concurrent=2, pool=3)
    await asyncio.wait_for(started.wait(), 60)
    await wait_until_async(lambda: len(_dirs(tmp_path)) >= 3, 60, "spares beside the rollouts")
    run.cancel()
    await asyncio.wait_for(run.wait(), 60)
    assert run.status == "cancelled"
    _gone(tmp_path)


async def test_spares_are_released_when_the_block_raises(provider, tmp_path):
    with pytest.raises(ZeroDivisionError):
        async with Pool(provider, size=2) as pool:
            await asyncio.wait_for(pool.wait_full(), 60)
            async with pool.open() as sandbox:
                assert (await sandbox.exec(["true"])).ok
                1 / 0  # noqa: B018
    assert pool.closed
    _gone(tmp_path)


async def test_spares_are_released_when_every_agent_raises(provider, tmp_path):
    async def broken(sandbox, task):
        raise ValueError("agent bug")

    run = await sandboxnb.run(_tasks(5), broken, provider, journal=None, progress=False,
                              max_concurrent=2, pool=2)
    assert run.counts() == {"error": 5} and "agent bug" in run.rows[0]["error"]
    assert len({row["sandbox_id"] for row in run.rows}) == 5
    _gone(tmp_path)


_SCRIPT = """
import asyncio, os, sys
from sandboxnb.pool import Pool
from sandboxnb.providers.local import LocalProvider

async def main():
    pool = Pool(LocalProvider(root=sys.argv[1], isolation="none"), size=2)
    await pool.start()
    await pool.wait_full()
    print("full", flush=True)
    if sys.argv[2] == "wait":
        await asyncio.Event().wait()
    # "exit": return with the pool open; asyncio.run closes the loop, then the interpreter exits

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_spares_are_released_at_interpreter_exit_and_on_ctrl_c(tmp_path, how):
    """isolation='none' servers outlive a dead owner for a while (their dead-man switch), and
    only a release removes their directories: both checked right after the process ended."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), "wait" if how == "sigint" else "exit"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "full", proc.stderr.read()
        if how == "sigint":
            assert len(_dirs(tmp_path)) == 2
            proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert _dirs(tmp_path) == [], "a spare was not released"


@pytest.mark.parametrize("bad", [0, 1001, -1, "4", 2.0, True, None])
def test_bad_sizes_are_refused_before_anything_starts(bad, tmp_path):
    if bad is not None:
        with pytest.raises(ConfigError, match=rf"size = {bad!r}: expected an integer from 1 to "
                                              "1000"):
            Pool("local", size=bad)
    bad = bad if bad is not None else "x"
    with pytest.raises(ConfigError, match=rf"pool = {bad!r}: expected an integer from 1 to"):
        sandboxnb.start(_tasks(1), _fresh_agent, journal=None, pool=bad)
    assert not live_sandbox_servers() and _dirs(tmp_path) == []


async def test_a_pool_of_another_provider_or_closed_is_refused(provider):
    with pytest.raises(ConfigError, match=r"low_water = 3: expected an integer from 1 to the "
                                          r"pool's size \(2\)"):
        Pool(provider, size=2, low_water=3)
    pool = Pool(provider, size=1)
    with pytest.raises(ConfigError, match="holds 'local' sandboxes but runtime = 'docker'"):
        sandboxnb.start(_tasks(1), _fresh_agent, "docker", journal=None, pool=pool)
    await pool.aclose()
    with pytest.raises(ConfigError, match="is closed"):
        sandboxnb.start(_tasks(1), _fresh_agent, provider, journal=None, pool=pool)


def test_cli_pool_runs_a_small_taskset_end_to_end(tmp_path):
    journal = tmp_path / "j.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
         "--limit", "6", "--pool", "4", "--max-concurrent", "2", "--journal", str(journal),
         "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "6/6 rollouts (ok 6)" in done.stdout and "mean reward 1.000" in done.stdout
    assert _dirs(tmp_path) == []
    bad = subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                          "oracle", "--pool", "0"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "--pool" in bad.stderr and "'0'" in bad.stderr, bad.stderr


@pytest.mark.docker
async def test_docker_pool_hands_out_distinct_containers_and_leaves_none():
    from sandboxnb.providers.docker import DockerProvider

    provider = DockerProvider()
    before = _own_containers()
    try:
        async with Pool(provider, size=2) as pool:
            await asyncio.wait_for(pool.wait_full(), 120)
            assert len(_own_containers() - before) == 2
            run = await sandboxnb.run(_tasks(3), _fresh_agent, provider, journal=None,
                                      progress=False, max_concurrent=1, pool=pool)
            assert run.counts() == {"ok": 3}, run.errors()
            assert len({row["sandbox_id"] for row in run.rows}) == 3
    finally:
        await provider.aclose()
    wait_until(lambda: not _own_containers() - before, 30, "the pool's containers to go")


def _own_containers() -> set[str]:
    """Ids of the labelled containers this test process started (others may share the engine)."""
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=sandboxnb.pid={os.getpid()}"],
                         capture_output=True, text=True, timeout=30, check=True)
    return set(out.stdout.split())


async def test_a_runs_own_pool_is_visible_to_monitors_and_closed_at_its_end(provider, tmp_path):
    run = sandboxnb.start(_tasks(3), _fresh_agent, provider, journal=None, max_concurrent=1,
                          pool=2)
    assert run.pool is not None and run.pool.stats()["size"] == 2
    await asyncio.wait_for(run.wait(), 60)
    assert run.counts() == {"ok": 3}
    stats = run.pool.stats()
    assert stats["closed"] and stats["ready"] == 0 and stats["handed_out"] >= 1
    _gone(tmp_path)


async def test_a_spare_that_died_while_waiting_is_never_handed_out(provider, tmp_path):
    async with Pool(provider, size=2) as pool:
        await asyncio.wait_for(pool.wait_full(), 60)
        dead = pool._ready[0]
        os.kill(dead.state.endpoint.meta["pid"], signal.SIGKILL)
        await wait_until_async(lambda: dead.client.closed, 30, "the client to see it die")
        async with pool.open() as sandbox:
            assert sandbox is not dead.client and (await sandbox.exec(["true"])).ok
        await asyncio.wait_for(pool.wait_full(), 60)  # and it was replaced
        assert dead.client not in {spare.client for spare in pool._ready}
    _gone(tmp_path)
