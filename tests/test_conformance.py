"""The public conformance suite (:mod:`sandboxnb.testing.conformance`) run against every built-in
provider: local, docker (real engine), modal and daytona (real SDKs against our emulated control
planes), and ``shell``, a provider written only for these tests from the template's hooks.

Whether a sandbox is still alive is asked of the ground truth (the OS process table, the Docker
engine, the emulator), never of the provider's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from sandboxnb.providers import Endpoint
from sandboxnb.testing.conformance import *  # noqa: F403
from sandboxnb.testing.conformance import Harness

from .helpers import argv, descendants, sandbox_server_pids, wait_until_async
from .shell_provider import ShellProvider

MiB = 1024 * 1024


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

    async def server_command(endpoint: Endpoint, sandbox: Any) -> list[str]:  # engine record
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
    from sandboxnb.providers.spec import SERVER_BUNDLE_NAME
    from sandboxnb.testing.modal_emulator import ModalEmulator

    with ModalEmulator() as emu:

        def record(sandbox_id: str) -> Any:  # the control plane's record, by our sandbox's tag
            return next(c for c in emu.creates if c.tags.get("sandboxnb.sandbox_id") == sandbox_id)

        async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
            rec = record(endpoint.sandbox_id)
            return rec.cpu, rec.memory_mb

        def argvs(root: int) -> Iterator[list[str]]:
            for pid in sorted(descendants(root)):
                yield argv(pid)  # [] for a process that just ended

        async def server_command(endpoint, sandbox) -> list[str]:
            # what the emulated sandbox runs once the bootstrap exec'd: its host process table
            box = emu.servicer.sandboxes[record(endpoint.sandbox_id).sandbox_id].box
            for argv in argvs(box.host_pid):
                if len(argv) > 1 and argv[1].endswith(SERVER_BUNDLE_NAME):
                    return argv
            raise AssertionError(f"no server process in modal sandbox {endpoint.sandbox_id}")

        yield Harness(
            "modal", ModalProvider, lambda: set(emu.live_sandboxes()), lambda: len(emu.creates),
            ({"resources": {"disk_mb": 10240}}, "modal does not support resources.disk_mb"),
            resources_seen, server_command,
        )
        assert not emu.unimplemented_calls, emu.unimplemented_calls


def _daytona() -> Iterator[Harness]:
    import shlex

    from sandboxnb.providers.daytona import SESSION, DaytonaProvider
    from sandboxnb.testing.daytona_emulator import DaytonaEmulator

    with DaytonaEmulator() as emu:

        async def resources_seen(endpoint, sandbox) -> tuple[float | None, int | None]:
            record = emu.sandbox(endpoint.sandbox_id)
            return float(record.cpu), record.memory * 1024  # Daytona speaks GiB

        async def server_command(endpoint: Endpoint, sandbox: Any = None) -> list[str]:
            # what the emulated toolbox ran in the sandbox's process session
            (cmd,) = emu.sandbox(endpoint.sandbox_id).sessions[SESSION].values()
            argv = shlex.split(cmd.command)
            return argv[argv.index("exec") + 1:]

        yield Harness(
            "daytona", DaytonaProvider, lambda: set(emu.live_sandboxes()),
            lambda: len(emu.created),
            ({"resources": {"gpu": "A10G"}}, "daytona does not support resources.gpu.type"),
            resources_seen, server_command=server_command,
        )


def _shell() -> Iterator[Harness]:
    def live() -> set[str]:
        return {str(pid) for pid in sandbox_server_pids()}

    made: list[ShellProvider] = []

    def make() -> ShellProvider:
        made.append(ShellProvider())
        return made[-1]

    async def resources_seen(endpoint, sandbox) -> tuple[None, None]:
        return None, None

    yield Harness(
        "shell", make, live, lambda: sum(p.created for p in made),
        ({"resources": {"cpu": 2}}, "shell does not support resources.cpu"), resources_seen,
    )


HARNESSES = {
    "shell": _shell, "local": _local, "docker": _docker, "modal": _modal, "daytona": _daytona,
}


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
    # teardown is awaited, but emulators reap asynchronously
    await wait_until_async(lambda: not (harness.live() - before), 5,
                           f"{harness.name}'s sandboxes to be gone (none may be left behind)")
