"""`sandboxnb gc` finds and releases sandboxes whose owner died without tearing them down."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from sandboxnb.providers.docker import LABEL

pytestmark = pytest.mark.docker

OWNER = """
import asyncio
from sandboxnb.config import RuntimeConfig
from sandboxnb.providers.docker import DockerProvider

async def main():
    # the switch off: only gc may end this one once its owner is gone
    config = RuntimeConfig(limits={"idle_timeout_s": None})
    async with DockerProvider().sandbox(config) as ep:
        print(ep.sandbox_id, flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def _containers(sandbox_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={LABEL}.sandbox_id={sandbox_id}"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.split()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxnb", "gc", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_gc_lists_then_releases_an_orphaned_container():
    """The owner and its reaper both die at once (the machine's session is killed): nothing
    removes the container but gc."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("docker-")
        reapers = [p for p in psutil.Process(owner.pid).children()
                   if any("docker_reaper" in part for part in p.cmdline())]
        assert reapers, "the provider starts a reaper with its first sandbox"
        for reaper in reapers:
            reaper.kill()  # SIGKILL: it never runs again (its parent reaps it, or init)
    finally:
        owner.kill()  # a crash: no teardown runs
        owner.wait()
    assert _containers(sandbox_id), "the orphan should still exist"

    listed = _cli("--runtime", "docker")
    assert listed.returncode == 0 and sandbox_id in listed.stdout
    assert "gc --delete" in listed.stdout
    assert _containers(sandbox_id), "listing must not delete"

    released = _cli("--runtime", "docker", "--delete")
    assert released.returncode == 0 and sandbox_id in released.stdout
    assert not _containers(sandbox_id)


def test_gc_usage_errors():
    unknown = _cli("--runtime", "nowhere")
    assert unknown.returncode == 2 and "not a known provider" in unknown.stderr
    unavailable = subprocess.run(
        [sys.executable, "-m", "sandboxnb", "gc", "--runtime", "daytona"],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert unavailable.returncode == 2 and "DAYTONA_API_KEY" in unavailable.stderr


def test_gc_leaves_the_sandboxes_of_a_running_owner_alone():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id = owner.stdout.readline().strip()
        released = _cli("--runtime", "docker", "--delete")
        assert released.returncode == 0 and sandbox_id not in released.stdout
        assert f"in use by running process(es) {owner.pid}" in released.stdout
        assert _containers(sandbox_id), "a live owner's sandbox must not be touched"
        listed = _cli("--runtime", "docker", "--include-live")
        assert sandbox_id in listed.stdout
    finally:
        owner.kill()
        owner.wait()
    assert _cli("--runtime", "docker", "--delete").returncode == 0
    assert not _containers(sandbox_id)
