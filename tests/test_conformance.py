"""One conformance suite for every provider: local, docker (real engine), modal and daytona
(real SDKs against our emulated control planes).

Whether a sandbox is still alive is asked of the ground truth (the OS process table, the Docker
engine, the emulator), never of the provider's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import sandboxnb
from sandboxnb.client import connect
from sandboxnb.config import ConfigError, RuntimeConfig, config_from_flat
from sandboxnb.providers import Endpoint, Provider
from sandboxnb.tasks import Taskset

from .conftest import sandbox_server_pids

MiB = 1024 * 1024


@dataclass
class Harness:
    """How to reach one provider and how to ask the ground truth about it."""

    name: str
    make: Callable[[], Provider]
    live: Callable[[], set[str]]  # what the engine/emulator/OS says is running
    creates: Callable[[], int]  # create attempts the backend has seen
    unsupported: tuple[dict[str, Any], str]  # a config it must refuse, and the message
    #: (cpu, memory MiB) as the backend applied them, from (endpoint, connected sandbox)
    resources_seen: Callable[[Any, Any], Awaitable[tuple[float | None, int | None]]]
    #: the server's argv as the backend records it (not the provider's own bookkeeping)
    server_command: Callable[[Endpoint], Awaitable[list[str]]] | None = None


def _local() -> Iterator[Harness]:
    from sandboxnb.providers.local import LocalProvider

    def live() -> set[str]:
        return {str(pid) for pid in sandbox_server_pids()}

    async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
        probe = await sandbox.exec(
            ["python3", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"]
        )
        return None, int(probe.stdout) // MiB  # the address-space limit every process gets

    yield Harness(
        "local", LocalProvider, live, lambda: len(live()),
        ({"resources": {"gpu": "H100"}}, "local does not support resources.gpu"),
        resources_seen,
    )


def _docker() -> Iterator[Harness]:
    import docker

    from sandboxnb.providers.docker import LABEL, DockerProvider

    status = DockerProvider.availability()
    if not status.available:
        pytest.fail(f"docker unavailable: {status.reason} (run scripts/setup-docker)")
    client = docker.from_env()

    def containers() -> list[dict[str, Any]]:  # one engine call, no per-container inspect race
        mine = [f"{LABEL}=1", f"{LABEL}.pid={os.getpid()}"]  # this test process's containers
        return client.api.containers(all=True, filters={"label": mine})

    async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
        host = client.api.inspect_container(endpoint.meta["container_id"])["HostConfig"]
        return host["NanoCpus"] / 1e9, host["Memory"] // MiB

    async def server_command(endpoint: Endpoint) -> list[str]:  # what the engine runs
        info = await asyncio.to_thread(client.api.inspect_container, endpoint.meta["container_id"])
        return [info["Path"], *info["Args"]]

    try:
        yield Harness(
            "docker", DockerProvider, lambda: {c["Id"] for c in containers()},
            lambda: len(containers()),
            ({"resources": {"gpu": "H100"}}, "docker does not support resources.gpu.type"),
            resources_seen, server_command=server_command,
        )
    finally:
        client.close()


def _modal() -> Iterator[Harness]:
    from sandboxnb.providers.modal import ModalProvider
    from sandboxnb.testing.modal_emulator import ModalEmulator

    with ModalEmulator() as emu:

        async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
            record = next(c for c in emu.creates if c.sandbox_id == endpoint.sandbox_id)
            return record.cpu, record.memory_mb

        yield Harness(
            "modal", ModalProvider, lambda: set(emu.live_sandboxes()), lambda: len(emu.creates),
            ({"resources": {"disk_mb": 10240}}, "modal does not support resources.disk_mb"),
            resources_seen,
        )
        assert not emu.unimplemented_calls, emu.unimplemented_calls


def _daytona() -> Iterator[Harness]:
    from sandboxnb.providers.daytona import DaytonaProvider
    from sandboxnb.testing.daytona_emulator import DaytonaEmulator

    with DaytonaEmulator() as emu:

        async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
            record = emu.sandbox(endpoint.sandbox_id)
            return float(record.cpu), record.memory * 1024  # Daytona speaks GiB

        yield Harness(
            "daytona", DaytonaProvider, lambda: set(emu.live_sandboxes()),
            lambda: len(emu.created),
            ({"resources": {"gpu": "A10G"}}, "daytona does not support resources.gpu.type"),
            resources_seen,
        )


HARNESSES = {"local": _local, "docker": _docker, "modal": _modal, "daytona": _daytona}


@pytest.fixture(scope="module", params=list(HARNESSES))
def harness(request) -> Iterator[Harness]:
    if request.param == "docker":
        request.applymarker(pytest.mark.docker)
    yield from HARNESSES[request.param]()


@pytest.fixture
async def provider(harness) -> Any:
    before = harness.live()
    prov = harness.make()
    yield prov
    await prov.aclose()
    for _ in range(100):  # teardown is awaited, but emulators reap asynchronously
        if not (harness.live() - before):
            break
        await asyncio.sleep(0.05)
    assert not (harness.live() - before), f"{harness.name} left sandboxes behind"


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
    config = provider.check(config_from_flat(cpu=cpu if "resources.cpu" in provider.supported
                                             else None, memory_mb=memory_mb))
    async with provider.sandbox(config) as endpoint:
        assert endpoint.config.resources.memory_mb == memory_mb
        async with await connect(endpoint) as sb:
            seen_cpu, seen_memory = await harness.resources_seen(endpoint, sb)
        # Daytona allocates whole GiB: 768 MiB becomes 1 GiB
        expected = 1024 if harness.name == "daytona" else memory_mb
        assert seen_memory == expected
        if config.resources.cpu is not None and seen_cpu is not None:
            assert seen_cpu == cpu


async def test_unsupported_field_fails_before_any_sandbox_starts(harness, provider):
    overrides, message = harness.unsupported
    before_live, before_creates = harness.live(), harness.creates()
    with pytest.raises(ConfigError, match=message):
        async with sandboxnb.launch(provider, config=RuntimeConfig().merge(overrides)):
            pass
    with pytest.raises(ConfigError, match=message):
        await sandboxnb.run(
            Taskset.load("humaneval").select("HumanEval/0"), "oracle", provider,
            config=overrides, journal=None, progress=False,
        )
    assert harness.creates() == before_creates
    assert harness.live() == before_live


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
    before = harness.live()
    with pytest.raises(RuntimeError, match="user code failed"):
        async with sandboxnb.launch(provider) as sb:
            assert (await sb.exec("true")).ok
            assert harness.live() - before  # really running
            raise RuntimeError("user code failed")
    assert not (harness.live() - before)


async def test_teardown_on_cancel(harness, provider):
    before = harness.live()
    started = asyncio.Event()

    async def hold() -> None:
        async with sandboxnb.launch(provider) as sb:
            started.set()
            await sb.exec(["sleep", "60"])

    task = asyncio.create_task(hold())
    await asyncio.wait_for(started.wait(), 60)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (harness.live() - before)
