"""Daytona provider end to end: the real ``daytona`` SDK -> the Daytona emulator (REST, toolbox,
SSH gateway) -> isolated sandbox processes -> our server, reached only through the SSH forward."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from sandboxnb.client import connect
from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError, config_from_flat
from sandboxnb.errors import ConnectionLost, SandboxError, StartupTimeout
from sandboxnb.providers.base import ProviderError
from sandboxnb.providers.daytona import SESSION, DaytonaProvider
from sandboxnb.testing.daytona_emulator import SDK_VERSION, DaytonaEmulator
from sandboxnb.testing.isolation import namespaces_available

from .helpers import cmdline, processes_with, wait_until_async

ROOT = Path(__file__).resolve().parents[1]


def test_sdk_version_pinned():
    import importlib.metadata

    assert importlib.metadata.version("daytona") == SDK_VERSION


@pytest.fixture
async def emu():
    async with DaytonaEmulator(snapshot_build_s=0.3) as emulator:
        yield emulator
        assert emulator.unknown_routes == [], emulator.unknown_routes
    assert emulator.live_sandboxes() == []


@pytest.fixture
async def provider(emu):
    prov = DaytonaProvider(image="python:3.11")
    yield prov
    await prov.aclose()


async def test_launch_exec_files_python(emu, provider):
    config = config_from_flat(cpu=2, memory_mb=1024)
    async with provider.sandbox(config) as ep:
        assert ep.url.startswith("tcp://127.0.0.1:") and ep.provider == "daytona"
        assert ep.token not in repr(ep) and ep.token not in repr(provider)
        async with await connect(ep) as sb:
            chunks: list[tuple[str, str]] = []
            r = await sb.exec("echo one; echo two >&2; echo three",
                              on_output=lambda s, d: chunks.append((s, d)))
            assert r.exit_code == 0 and r.stdout == "one\nthree\n" and r.stderr == "two\n"
            assert "".join(d for s, d in chunks if s == "stdout") == "one\nthree\n"
            await sb.write_file("data/hello.bin", b"\x00\x01hello")
            assert await sb.read_file("data/hello.bin") == b"\x00\x01hello"
            await sb.python("x = 20")
            assert (await sb.python("x + 22")).value == "42"
            # the server holds the token only in its environment, never on an argv
            cmdlines = [line for line in map(cmdline, processes_with("sandboxnb.server"))
                        if "pytest" not in line]
            assert cmdlines and not any(ep.token in c for c in cmdlines)
        record = emu.sandbox(ep.sandbox_id)
        assert record.state == "started" and record.labels["sandboxnb"] == "1"
        assert {"sandboxnb.session", "sandboxnb.owner", "sandboxnb.created"} <= set(record.labels)
        assert record.auto_stop_interval == provider.auto_stop_minutes
        assert await provider.live_sandboxes() == [ep.sandbox_id]
        if namespaces_available():  # the server is reachable only through the SSH forward
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", 7000)
    assert emu.live_sandboxes() == [] and emu.sandboxes == {}
    assert await provider.live_sandboxes() == []


async def test_resource_mapping_recorded_by_emulator(emu, provider):
    config = config_from_flat(cpu=1.5, memory_mb=1500, gpu="h100:2").merge(
        {"resources": {"disk_mb": 2049}})
    async with provider.sandbox(config) as ep:
        record = emu.sandbox(ep.sandbox_id)
    (snap,) = emu.snapshot_creates
    assert snap["imageName"] == "python:3.11"
    assert (snap["cpu"], snap["memory"], snap["disk"], snap["gpu"]) == (2, 2, 3, 2)
    assert snap["gpuType"] == ["H100"]
    assert (record.cpu, record.memory, record.disk, record.gpu) == (2, 2, 3, 2)
    assert emu.created[0]["snapshot"] == snap["name"]
    assert emu.created[0]["autoStopInterval"] == provider.auto_stop_minutes
    assert ep.meta["memory_gib"] == 2 and ep.meta["disk_gib"] == 3


async def test_unsupported_fields_rejected_before_any_request(emu):
    prov = DaytonaProvider(image="python:3.11")
    fixed = DaytonaProvider(snapshot="my-snapshot")
    try:
        with pytest.raises(UnsupportedFieldError, match=r"gpu.type.*A10G.*H100"):
            async with prov.sandbox(config_from_flat(gpu="A10G")):
                pass
        with pytest.raises(ConfigError, match="snapshot = 'my-snapshot' fixes its resources"):
            async with fixed.sandbox(config_from_flat(cpu=2)):
                pass
        with pytest.raises(ConfigError, match="auto_stop_minutes"):
            DaytonaProvider(auto_stop_minutes=0)
        with pytest.raises(ConfigError, match="server_port = 0"):
            DaytonaProvider(server_port=0)
        with pytest.raises(ConfigError, match="give one"):
            DaytonaProvider(snapshot="s", image="python:3.11")
    finally:
        await prov.aclose()
        await fixed.aclose()
    assert emu.created == [] and emu.snapshot_creates == [] and emu.requests == []


async def test_ssh_gateway_refuses_wrong_token_and_foreign_forwards(emu, provider):
    from daytona import AsyncDaytona

    async with provider.sandbox(config_from_flat()) as ep:
        opts = dict(known_hosts=None, client_keys=None, agent_path=None, password=None,
                    config=None)
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", emu.ssh_port, username="not-a-token", **opts)
        async with AsyncDaytona() as client:
            sandbox = await client.get(ep.sandbox_id)
            access = await sandbox.create_ssh_access(expires_in_minutes=5)
        async with asyncssh.connect("127.0.0.1", emu.ssh_port, username=access.token,
                                    **opts) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("10.0.0.1", 7000)  # only the sandbox's loopback
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", 1)  # nothing listens there
    assert emu.ssh_auth_failures >= 1
    # the token died with its sandbox
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", emu.ssh_port, username=access.token, **opts)


async def test_keepalive_holds_and_autostop_stops_abandoned():
    from daytona import AsyncDaytona, CreateSandboxFromSnapshotParams

    async with DaytonaEmulator(minute_s=0.5) as emu:
        prov = DaytonaProvider(auto_stop_minutes=1, keepalive_s=0.1)
        try:
            async with AsyncDaytona() as client:
                abandoned = await client.create(CreateSandboxFromSnapshotParams(
                    auto_stop_interval=1, labels={"purpose": "abandoned"}))
                async with prov.sandbox(config_from_flat()) as ep:
                    async with await connect(ep) as sb:
                        await asyncio.sleep(1.5)  # three auto-stop "minutes"
                        assert (await sb.exec("echo alive")).stdout == "alive\n"
                    held = emu.sandbox(ep.sandbox_id)
                    assert held.state == "started" and held.activity_refreshes >= 5
                    assert emu.sandbox(abandoned.id).state == "stopped"
                    assert emu.live_sandboxes() == [held.id]
                await abandoned.delete()
        finally:
            await prov.aclose()
        assert emu.live_sandboxes() == [] and emu.sandboxes == {}


async def test_teardown_on_error(emu, provider):
    with pytest.raises(RuntimeError, match="boom"):
        async with provider.sandbox(config_from_flat()) as ep:
            assert emu.live_sandboxes() == [emu.sandbox(ep.sandbox_id).id]
            raise RuntimeError("boom")
    assert emu.live_sandboxes() == [] and emu.sandboxes == {}


async def test_teardown_on_cancel_while_held_and_during_create(emu, provider):
    held = asyncio.Event()

    async def hold() -> None:
        async with provider.sandbox(config_from_flat()):
            held.set()
            await asyncio.sleep(60)

    task = asyncio.ensure_future(hold())
    await asyncio.wait_for(held.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert emu.live_sandboxes() == [] and emu.sandboxes == {}

    emu.create_delay_s = 0.5  # cancel while POST /sandbox is in flight

    async def acquire() -> None:
        async with provider.sandbox(config_from_flat()):
            pytest.fail("create should have been cancelled")

    before = len(emu.created)
    task = asyncio.ensure_future(acquire())
    while len(emu.created) == before:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.7)  # let the emulator finish the interrupted create
    assert emu.live_sandboxes() == [] and emu.sandboxes == {}
    assert len(emu.deleted) == 2


async def test_snapshot_built_once_under_concurrent_first_use(emu, provider):
    async def one() -> str:
        async with provider.sandbox(config_from_flat(cpu=1)) as ep, await connect(ep) as sb:
            return (await sb.exec("echo ok")).stdout

    assert await asyncio.gather(*(one() for _ in range(3))) == ["ok\n"] * 3
    assert len(emu.snapshot_creates) == 1 and len(emu.created) == 3
    async with provider.sandbox(config_from_flat(cpu=1)):
        pass
    assert len(emu.snapshot_creates) == 1


async def test_snapshot_build_failure_is_clear(emu):
    prov = DaytonaProvider(image="fail/broken:1")
    try:
        with pytest.raises(ProviderError, match=r"snapshot .* for image 'fail/broken:1' failed"):
            async with prov.sandbox(config_from_flat()):
                pass
    finally:
        await prov.aclose()
    assert emu.created == []


async def test_server_failure_reported_and_cleaned(emu):
    prov = DaytonaProvider()
    try:
        async with emu_sandbox_without_python(emu):
            with pytest.raises(ProviderError, match=r"(?s)will not become ready: the server "
                               r"exited with code 127 .*python3"):
                async with prov.sandbox(config_from_flat()):
                    pass
    finally:
        await prov.aclose()
    assert emu.live_sandboxes() == [] and emu.sandboxes == {}


def _server_argv(emu: DaytonaEmulator, sandbox_id: str) -> tuple[str, list[str]]:
    """The command the emulated toolbox ran for the server, and the server's argv in it."""
    (cmd,) = emu.sandbox(sandbox_id).sessions[SESSION].values()
    argv = shlex.split(cmd.command)
    return cmd.command, argv[argv.index("exec") + 1:]


async def test_server_options_follow_the_one_policy(emu, provider):
    cases = [
        (RuntimeConfig(), {"--startup-timeout": "60", "--idle-timeout": "15"}),
        (RuntimeConfig().merge({"limits": {"startup_timeout_s": None, "idle_timeout_s": None}}),
         {"--startup-timeout": "0", "--idle-timeout": "0"}),
        (RuntimeConfig().merge({"limits": {"startup_timeout_s": 45, "idle_timeout_s": 7.5}}),
         {"--startup-timeout": "45", "--idle-timeout": "7.5"}),
    ]
    for config, expected in cases:
        async with provider.sandbox(config) as ep:
            command, argv = _server_argv(emu, ep.sandbox_id)
            assert ep.token not in command  # the token travels in a file, never on a command
            assert {flag: argv[argv.index(flag) + 1] for flag in expected} == expected
            assert argv[argv.index("--sandbox-id") + 1] == ep.sandbox_id
            assert argv[-4:] == ["--host", "127.0.0.1", "--port", "7000"]
        assert emu.sandbox(ep.sandbox_id).state == "destroyed"


async def test_labels_name_and_extra_labels(emu):
    prov = DaytonaProvider(labels={"team": "evals", "sandboxnb.owner": "someone-else"},
                           session_id="s-1")
    try:
        async with prov.sandbox(config_from_flat()) as ep:
            record = emu.sandbox(ep.sandbox_id)
            assert record.name == ep.sandbox_id and ep.meta["daytona_id"] == record.id
            assert record.labels.items() >= {**ep.meta["labels"], "team": "evals"}.items()
            assert record.labels["sandboxnb.session"] == "s-1"
            assert record.labels["sandboxnb.provider"] == "daytona"
            assert record.labels["sandboxnb.sandbox_id"] == ep.sandbox_id
            assert record.labels["sandboxnb.owner"] != "someone-else"  # ours win
            assert record.labels["sandboxnb.pid"] == str(os.getpid())
    finally:
        await prov.aclose()


async def test_gc_finds_and_reaps_by_label(emu, provider):
    other = DaytonaProvider()  # same owner, another session (another kernel, the CLI)
    try:
        async with provider.sandbox(config_from_flat()) as ep:
            assert await other.live_sandboxes() == [ep.sandbox_id]
            assert await other.reap(session_only=True) == []
            assert emu.live_sandboxes() == [emu.sandbox(ep.sandbox_id).id]
            assert await other.reap() == [ep.sandbox_id]
            assert emu.live_sandboxes() == [] and await provider.live_sandboxes() == []
        # release of a sandbox gc already deleted is quiet (destroy is idempotent)
    finally:
        await other.aclose()
    assert emu.sandboxes == {}


async def test_run_timeout_deletes_a_held_sandbox(emu):
    prov = DaytonaProvider(keepalive_s=0.05)
    try:
        config = RuntimeConfig().merge({"limits": {"run_timeout_s": 1.0}})
        async with prov.open(config) as sb:
            assert (await sb.exec("true")).ok
            with pytest.raises((ConnectionLost, SandboxError)):
                await sb.exec(["sleep", "60"])
            await wait_until_async(lambda: not emu.sandboxes and not emu.live_sandboxes(), 10,
                                   "the emulator to hold no sandbox")
        (record,) = emu.deleted
        refreshes = record.activity_refreshes
        assert refreshes >= 1
        await asyncio.sleep(0.3)
        assert record.activity_refreshes == refreshes  # the keepalive ended with the sandbox
    finally:
        await prov.aclose()


async def test_startup_timeout_is_the_policy_and_leaves_nothing(emu, provider):
    emu.create_delay_s = 1.5
    config = RuntimeConfig().merge({"limits": {"startup_timeout_s": 0.5}})
    with pytest.raises(StartupTimeout, match=r"startup_timeout_s = 0.5s \(while creating"):
        async with provider.sandbox(config):
            pytest.fail("the sandbox cannot be ready in time")
    # the interrupted create lands, then is deleted
    await wait_until_async(lambda: emu.sandboxes == {} and emu.live_sandboxes() == [], 10,
                           "the emulator to hold no sandbox")


class emu_sandbox_without_python:
    """Make python3 inside new emulated sandboxes fail (a broken image)."""

    def __init__(self, emu: DaytonaEmulator) -> None:
        self.emu = emu

    async def __aenter__(self) -> None:
        original = self.emu.start_sandbox

        async def start(sb):
            sb.env = {**sb.env, "PATH": "/nonexistent"}
            await original(sb)

        self.emu.start_sandbox = start  # type: ignore[method-assign]
        self._original = original

    async def __aexit__(self, *exc: object) -> None:
        self.emu.start_sandbox = self._original  # type: ignore[method-assign]


def test_availability(monkeypatch):
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    avail = DaytonaProvider.availability()
    assert not avail.available and "DAYTONA_API_KEY" in avail.reason
    monkeypatch.setenv("DAYTONA_API_KEY", "x")
    assert DaytonaProvider.availability().available


def test_sync_emulator_and_unknown_routes_fail_loudly():
    import urllib.error
    import urllib.request

    with DaytonaEmulator() as emu:
        assert os.environ["DAYTONA_API_URL"] == emu.api_url
        req = urllib.request.Request(f"{emu.api_url}/sandbox/x/fork", method="POST",
                                     headers={"Authorization": f"Bearer {emu.api_key}"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 501 and b"/sandbox/x/fork" in info.value.read()
        assert emu.unknown_routes == ["POST /sandbox/x/fork"]
        req = urllib.request.Request(f"{emu.api_url}/sandbox", headers={
            "Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 401
    assert "DAYTONA_API_URL" not in os.environ or os.environ["DAYTONA_API_URL"] != emu.api_url


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_humaneval_all_164_with_oracle_on_daytona(tmp_path):
    out = tmp_path / "rows.jsonl"
    with DaytonaEmulator() as emu:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
             "--runtime", "daytona", "--max-concurrent", "4", "--no-progress", "-o", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
        )
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-3000:]
        assert emu.unknown_routes == []
        assert emu.live_sandboxes() == [] and emu.sandboxes == {}
        assert len(emu.created) == 164
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(rows) == 164
    assert all(r["provider"] == "daytona" for r in rows)
    assert sum(1 for r in rows if r["status"] == "ok" and r["reward"] == 1) == 164, [
        (r["task_id"], r["status"], r["error"]) for r in rows if r["reward"] != 1][:5]
    print(f"humaneval on emulated daytona: 164/164 in {elapsed:.1f}s")


HOLD_A_SANDBOX = """
import asyncio
from sandboxnb.providers.daytona import DaytonaProvider

async def main():
    provider = DaytonaProvider()
    try:
        async with provider.sandbox() as endpoint:
            print("ready", endpoint.sandbox_id, flush=True)
            await asyncio.sleep(3600)
    finally:
        await provider.aclose()

asyncio.run(main())
"""


async def test_ctrl_c_in_a_script_releases_the_sandbox(emu):
    """The SDK's Socket.IO client must not take SIGINT away from us: Ctrl-C ends the script
    through asyncio's own path, which releases the sandbox."""
    import signal
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_A_SANDBOX, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(120):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("ready"), line + (await proc.stderr.read()).decode()[-2000:]
        assert len(emu.live_sandboxes()) == 1
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        # asyncio's own Ctrl-C path (not a foreign handler that cancels everything, releases
        # included, and stops the loop)
        assert err.decode().rstrip().endswith("KeyboardInterrupt"), err.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await wait_until_async(lambda: not emu.live_sandboxes(), 30, "the sandbox was released")
