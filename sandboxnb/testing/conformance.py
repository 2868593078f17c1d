"""The provider conformance suite, for provider authors and for our own providers.

A third-party provider passes it with one import and one pytest parameter::

    # test_my_provider.py
    from sandboxnb.testing.conformance import *  # noqa: F403

    $ pytest test_my_provider.py --sandboxnb-provider mypackage.module:MyProvider

Whether a sandbox is alive is asked of a :class:`Harness`. The default harness built from
``--sandboxnb-provider`` asks the provider's own ``list_sandboxes`` and reads the server's command
line from ``/proc`` inside the sandbox; a provider author who can ask their backend directly (an
engine, an API) defines a ``harness`` fixture of their own that returns a :class:`Harness`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

import sandboxnb
from sandboxnb.client import connect
from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.doctor import server_command_in_sandbox as read_server_command
from sandboxnb.errors import ConfigError, ConnectionLost, SandboxError
from sandboxnb.providers.base import Endpoint, Provider
from sandboxnb.tasks import Taskset

__all__ = [
    "Harness",
    "default_harness",
    "provider",
    "pytestmark",
    "server_command_in_sandbox",
    "test_cancel_during_acquire_leaves_nothing",
    "test_exec_streams_files_and_python_namespace",
    "test_resources_reach_the_backend",
    "test_rollouts_through_run",
    "test_run_timeout_ends_the_sandbox",
    "test_teardown_on_cancel",
    "test_teardown_on_error",
    "test_unset_limits_mean_the_same_everywhere",
    "test_unsupported_field_fails_before_any_sandbox_starts",
    "wait_until",
]

#: Every test here is a coroutine, whatever the caller's asyncio mode.
pytestmark = pytest.mark.asyncio
MiB = 1024 * 1024
#: Candidate fields a provider may not honour, for the "fails before anything starts" check.
_UNSUPPORTED_CANDIDATES = ({"resources": {"gpu": "H100"}}, {"resources": {"disk_mb": 10240}},
                           {"resources": {"cpu": 3.5}})


@dataclass
class Harness:
    """How to make one provider and how to ask the ground truth about it.

    ``live`` and ``creates`` may be plain or async callables.
    """

    name: str
    make: Callable[[], Provider]
    #: ids of what the backend (engine, emulator, OS) says is running
    live: Callable[[], Any]
    #: create attempts the backend has seen
    creates: Callable[[], Any]
    #: a config the provider must refuse, and the message it must give
    unsupported: tuple[dict[str, Any], str] | None
    #: (cpu, memory MiB) as the backend applied them, from (endpoint, connected sandbox);
    #: ``None`` where it cannot be asked
    resources_seen: Callable[[Endpoint, Any], Awaitable[tuple[float | None, int | None]]]
    #: the server's argv as the backend records it
    server_command: Callable[[Endpoint, Any], Awaitable[list[str]]] | None = None


async def ask(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; await the result if it is awaitable."""
    value = fn()
    return await value if inspect.isawaitable(value) else value


async def wait_until(predicate: Callable[[], Any], within: float = 10.0,
                     what: str = "the condition", interval: float = 0.05) -> Any:
    """Poll ``predicate`` (plain or async) until it returns something truthy and return that;
    fail naming ``what`` and the last value after ``within`` seconds. Sleeps on the loop."""
    deadline = time.monotonic() + within
    while True:
        value = await ask(predicate)
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {within:g} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


async def server_command_in_sandbox(endpoint: Endpoint, sandbox: Any) -> list[str]:
    """The server's argv as the sandbox's OS sees it (``/proc/<server>/cmdline``)."""
    return await read_server_command(sandbox)


def default_harness(spec: str) -> Harness:
    """A harness for the provider class at ``module:Class`` (``--sandboxnb-provider``)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--sandboxnb-provider = {spec!r}: expected 'module:ProviderClass'")
    cls = getattr(importlib.import_module(module_name), attr)
    creates = [0]
    made: list[Provider] = []

    def make() -> Provider:
        prov = cls()
        made.append(prov)
        original = prov.create

        async def counted(spec: Any) -> Any:
            creates[0] += 1
            return await original(spec)

        prov.create = counted  # type: ignore[method-assign]
        return prov

    observer = cls()
    unsupported = None
    for candidate in _UNSUPPORTED_CANDIDATES:
        try:
            observer.check(RuntimeConfig().merge(candidate))
        except ConfigError as err:
            unsupported = (candidate, str(err).split(" (got")[0])
            break

    async def live() -> set[str]:  # what any instance can still find on the backend
        found = set(await observer.live_sandboxes())
        for prov in made:
            found |= set(await prov.live_sandboxes())
        return found

    async def resources_seen(endpoint: Endpoint, sandbox: Any) -> tuple[None, None]:
        return None, None

    return Harness(cls.name, make, live, lambda: creates[0], unsupported, resources_seen,
                   server_command_in_sandbox)


@pytest_asyncio.fixture
async def provider(harness: Harness) -> Any:
    """A fresh provider; afterwards, nothing of it may be left on the backend."""
    before = await ask(harness.live)
    prov = harness.make()
    yield prov
    await prov.aclose()
    await wait_until(lambda: _gone(harness, before), 10,
                     f"{harness.name} released every sandbox it started")


async def _gone(harness: Harness, before: set[str]) -> bool:
    return not (await ask(harness.live) - before)


async def test_exec_streams_files_and_python_namespace(provider):
    async with sandboxnb.launch(provider) as sb:
        chunks: list[tuple[str, str]] = []
        result = await sb.exec(
            "echo one; sleep 0.3; echo two >&2; exit 3",
            on_output=lambda stream, data: chunks.append((stream, data)),
        )
        assert result.exit_code == 3 and result.stdout == "one\n" and result.stderr == "two\n"
        assert ("stdout", "one\n") in chunks and ("stderr", "two\n") in chunks

        payload = bytes(range(256)) * 64
        await sb.write_file("nested/dir/blob.bin", payload)
        assert await sb.read_file("nested/dir/blob.bin") == payload

        await sb.python("import os\ncounter = 41")
        out = await sb.python("counter += 1\nprint('side', end='')\ncounter")
        assert out.value == "42" and out.stdout == "side"


async def test_resources_reach_the_backend(harness, provider):
    cpu, memory_mb = 1.0, 768
    wanted = {"memory_mb": memory_mb} if "resources.memory_mb" in provider.supported else {}
    if "resources.cpu" in provider.supported:
        wanted["cpu"] = cpu
    config = provider.check(config_from_flat(**wanted))
    async with provider.sandbox(config) as endpoint:
        async with await connect(endpoint) as sb:
            seen_cpu, seen_memory = await harness.resources_seen(endpoint, sb)
        if "memory_mb" in wanted and seen_memory is not None:
            # Daytona allocates whole GiB: 768 MiB becomes 1 GiB
            assert seen_memory in (memory_mb, 1024)
        if "cpu" in wanted and seen_cpu is not None:
            assert seen_cpu == cpu


async def test_unsupported_field_fails_before_any_sandbox_starts(harness, provider):
    if harness.unsupported is None:
        pytest.skip(f"{harness.name} honours every candidate field")
    overrides, message = harness.unsupported
    before_live, before_creates = await ask(harness.live), await ask(harness.creates)
    with pytest.raises(ConfigError, match=message):
        async with sandboxnb.launch(provider, config=RuntimeConfig().merge(overrides)):
            pass
    with pytest.raises(ConfigError, match=message):
        await sandboxnb.run(
            Taskset.load("humaneval").select("HumanEval/0"), "oracle", provider,
            config=overrides, journal=None, progress=False,
        )
    assert await ask(harness.creates) == before_creates
    assert await ask(harness.live) == before_live


async def test_rollouts_through_run(provider, tmp_path):
    tasks = Taskset.load("humaneval").select("HumanEval/[0-5]")
    run = await sandboxnb.run(tasks, "oracle", provider, max_concurrent=3,
                              journal=tmp_path / "j.jsonl", progress=False)
    frame = run.to_pandas()
    assert len(frame) == 6 and (frame["status"] == "ok").all(), frame["error"].tolist()
    assert (frame["reward"] == 1.0).all()
    assert set(frame["provider"]) == {provider.name}
    assert frame["sandbox_id"].nunique() == 6


async def test_teardown_on_error(harness, provider):
    before = await ask(harness.live)
    with pytest.raises(RuntimeError, match="user code failed"):
        async with sandboxnb.launch(provider) as sb:
            assert (await sb.exec("true")).ok
            assert await ask(harness.live) - before  # really running
            raise RuntimeError("user code failed")
    assert not (await ask(harness.live) - before)


async def test_teardown_on_cancel(harness, provider):
    before = await ask(harness.live)
    started = asyncio.Event()

    async def hold() -> None:
        async with sandboxnb.launch(provider) as sb:
            started.set()
            await sb.exec(["sleep", "60"])

    task = asyncio.create_task(hold())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (await ask(harness.live) - before)


async def test_cancel_during_acquire_leaves_nothing(harness, provider):
    """Cancelled after the backend saw the create but before the sandbox is ready."""
    before_creates = await ask(harness.creates)
    before = await ask(harness.live)
    task = asyncio.create_task(_enter_and_hold(provider))
    await wait_until(lambda: _created(harness, before_creates), 60, "the backend saw a create")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: _gone(harness, before), 10,
                     "the sandbox of a cancelled acquire was destroyed")


async def _created(harness: Harness, before: int) -> bool:
    return await ask(harness.creates) > before


async def _enter_and_hold(provider: Provider) -> None:
    async with provider.sandbox():
        await asyncio.sleep(3600)


async def test_unset_limits_mean_the_same_everywhere(harness, provider):
    """Defaults and ``None`` reach the server as the one policy says, asked of the backend."""
    read = harness.server_command or server_command_in_sandbox
    cases = {
        "defaults": (RuntimeConfig(), {"--startup-timeout": "60", "--idle-timeout": "15"}),
        "unset": (RuntimeConfig().merge({"limits": {"startup_timeout_s": None,
                                                    "idle_timeout_s": None}}),
                  {"--startup-timeout": "0", "--idle-timeout": "0"}),
        "set": (RuntimeConfig().merge({"limits": {"startup_timeout_s": 45,
                                                  "idle_timeout_s": 7.5}}),
                {"--startup-timeout": "45", "--idle-timeout": "7.5"}),
    }
    for label, (config, expected) in cases.items():
        async with provider.sandbox(config) as endpoint:
            async with await connect(endpoint) as sb:
                argv = await read(endpoint, sb)
        seen = {flag: argv[argv.index(flag) + 1] for flag in expected if flag in argv}
        assert seen == expected, f"{harness.name} {label}: server ran with {argv}"


async def test_run_timeout_ends_the_sandbox(harness, provider):
    before = await ask(harness.live)
    config = RuntimeConfig().merge({"limits": {"run_timeout_s": 1.0}})
    async with provider.open(config) as sb:
        assert (await sb.exec("true")).ok
        with pytest.raises((ConnectionLost, SandboxError)):
            await sb.exec(["sleep", "60"])
        await wait_until(lambda: _gone(harness, before), 30,
                         "the backend ended a sandbox past limits.run_timeout_s")
