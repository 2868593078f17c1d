"""The lifecycle written once in the base, exercised through a real provider (the shell one):
startup deadline, readiness failure, label-based cleanup of a broken create, release grace and
cancellation during release. Each condition is forced, never left to the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import psutil
import pytest

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ProviderError, StartupTimeout
from sandboxnb.providers.base import LaunchSpec
from sandboxnb.testing.conformance import wait_until

from .shell_provider import DEFAULT_TEMPLATE, ShellProvider


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_startup_deadline_names_the_field_and_leaves_nothing():
    slow = ShellProvider(template="sleep 30; " + DEFAULT_TEMPLATE)  # never ready in time
    config = RuntimeConfig().merge({"limits": {"startup_timeout_s": 0.3}})
    started = time.monotonic()
    with pytest.raises(StartupTimeout, match=r"limits.startup_timeout_s = 0.3s") as caught:
        async with slow.sandbox(config):
            pass
    assert isinstance(caught.value, TimeoutError)
    assert time.monotonic() - started < 5
    assert slow.created == 1 and not slow._live


async def test_a_server_that_exits_fails_at_once_with_the_reason():
    broken = ShellProvider(template="exit 7")
    started = time.monotonic()
    with pytest.raises(ProviderError, match="exited with code 7"):
        async with broken.sandbox():
            pass
    assert time.monotonic() - started < 5  # not the 60 s startup deadline


class _CreateFailsAfterStarting(ShellProvider):
    """The backend started the sandbox, then create failed before returning a handle."""

    async def create(self, spec: LaunchSpec):
        box = await super().create(spec)
        self.started_pid = box.proc.pid
        raise ConnectionResetError("lost the create response")


async def test_a_create_that_fails_after_starting_is_found_by_label_and_destroyed():
    provider = _CreateFailsAfterStarting()
    with pytest.raises(ConnectionResetError):
        async with provider.sandbox():
            pass
    assert _gone(provider.started_pid) and not provider._live


class _SlowDestroy(ShellProvider):
    release_grace_s = 0.3

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def destroy(self, handle):
        await asyncio.sleep(self.delay)
        await super().destroy(handle)


async def test_release_past_its_grace_goes_on_in_the_background(caplog):
    provider = _SlowDestroy(delay=5.0)  # far past the 0.3 s grace, whatever the machine
    caplog.set_level(logging.ERROR, "sandboxnb.providers")
    async with provider.sandbox() as endpoint:
        pid = endpoint.meta["pid"]
        leaving = time.monotonic()  # time the release alone, not the acquire
    assert time.monotonic() - leaving < 4.0  # bounded by the grace, not the slow destroy
    assert "goes on in the background" in caplog.text
    provider.release_grace_s = 10
    await provider.aclose()  # waits (within its own grace) for the background release
    assert _gone(pid) and not provider._live


async def test_cancelled_during_release_still_releases_then_propagates():
    provider = _SlowDestroy(delay=0.2)
    provider.release_grace_s = 10
    entered = asyncio.Event()
    pid: list[int] = []

    async def use() -> None:
        async with provider.sandbox() as endpoint:
            pid.append(endpoint.meta["pid"])
            entered.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(use())
    await entered.wait()
    await asyncio.sleep(0.05)  # release (0.2 s) is now running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pid[0]) and not provider._live


async def test_a_storm_of_cancellations_still_releases(monkeypatch):
    """A cancellation at every await point of the exit path, closing the client included (made
    slow here, as a TLS close over a tunnel is)."""
    from sandboxnb.client import Sandbox

    real_close = Sandbox.close

    async def slow_close(self) -> None:
        await asyncio.sleep(0.05)
        await real_close(self)

    monkeypatch.setattr(Sandbox, "close", slow_close)
    provider = ShellProvider()
    entered = asyncio.Event()
    pids: list[int] = []

    async def use() -> None:
        async with provider.open() as sb:
            pids.append(sb.endpoint.meta["pid"])
            entered.set()
            await sb.exec(["sleep", "60"])

    task = asyncio.create_task(use())
    await entered.wait()
    cancels = 0
    while not task.done():
        task.cancel()
        cancels += 1
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancels > 1
    assert _gone(pids[0]) and not provider._live


async def test_aclose_does_not_wait_forever_for_a_stuck_release(caplog):
    provider = _SlowDestroy(delay=3600)  # a backend whose destroy never returns
    provider.release_grace_s = 0.2
    caplog.set_level(logging.ERROR, "sandboxnb.providers")
    async with provider.sandbox() as endpoint:
        pid = endpoint.meta["pid"]
    started = time.monotonic()
    await provider.aclose()
    assert time.monotonic() - started < 5
    assert "left to `sandboxnb gc`" in caplog.text
    for task in list(provider._releasing):  # end the stuck release; kill what it held
        task.cancel()
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    await wait_until(lambda: _gone(pid), 10, "the server was killed")
