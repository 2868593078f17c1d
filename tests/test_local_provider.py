"""The local provider: real server processes, teardown on every path, limits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxnb.client import connect
from sandboxnb.config import RuntimeConfig, UnsupportedFieldError, config_from_flat
from sandboxnb.errors import ConnectionLost
from sandboxnb.providers import get_provider
from sandboxnb.providers.base import ProviderError
from sandboxnb.providers.local import LocalProvider

from .helpers import pid_alive, sandbox_server_pids, wait_until, wait_until_async


@pytest.fixture
def provider(tmp_path):
    return LocalProvider(root=tmp_path)


def _gone(endpoint, tmp_path) -> bool:
    return not pid_alive(endpoint.meta["pid"]) and not any(tmp_path.iterdir())


async def test_success_path_cleans_up(provider, tmp_path):
    assert get_provider("local").name == "local"
    async with provider.sandbox() as ep:
        assert ep.url.startswith(("unix://", "tcp://127.0.0.1:")) and ep.provider == "local"
        assert ep.token and ep.token not in repr(ep)
        async with await connect(ep) as sb:
            assert sb.id == ep.sandbox_id and sb.provider == "local"
            r = await sb.exec("pwd; echo $SANDBOXNB_TOKEN")
            assert r.stdout == f"{ep.meta['workdir']}\n\n"
            assert (await sb.python("1 + 1")).value == "2"
        assert await provider.live_sandboxes() == [ep.sandbox_id]
    assert _gone(ep, tmp_path)
    assert await provider.live_sandboxes() == []


async def test_error_path_cleans_up_children_too(tmp_path):
    # unjailed, so the worker's pid is a host pid (a jail's whole pid namespace ending is
    # tested in test_local_isolation.py)
    provider = LocalProvider(root=tmp_path, isolation="none")
    with pytest.raises(RuntimeError, match="boom"):
        async with provider.sandbox() as ep:
            sb = await connect(ep)
            await sb.exec("sleep 300 > /dev/null 2>&1 &")
            await sb.python("import os\npid = os.getpid()")
            worker = int((await sb.python("pid")).value)
            raise RuntimeError("boom")
    assert _gone(ep, tmp_path)
    await asyncio.sleep(0.1)
    assert not pid_alive(worker)
    await sb.close()


async def test_cancel_path_cleans_up(provider, tmp_path):
    entered = asyncio.Event()
    seen = {}

    async def rollout():
        async with provider.sandbox() as ep:
            seen["ep"] = ep
            async with await connect(ep) as sb:
                entered.set()
                await sb.exec("sleep 300")

    task = asyncio.ensure_future(rollout())
    await entered.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(seen["ep"], tmp_path)


async def test_cancel_during_startup_cleans_up(provider, tmp_path):
    task = asyncio.ensure_future(provider.sandbox().__aenter__())
    await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flat", [
    {"image": "python:3.11"}, {"gpu": "A10G"}, {"disk_mb": 1024},
])
async def test_unsupported_fields_rejected_before_start(provider, tmp_path, flat):
    with pytest.raises(UnsupportedFieldError) as info:
        provider.sandbox(config_from_flat(**flat))
    assert "local does not support" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_bad_isolation_is_rejected():
    with pytest.raises(ValueError, match="isolation = 'vm'"):
        LocalProvider(isolation="vm")


async def test_memory_limit_enforced(provider):
    async with provider.sandbox(config_from_flat(memory_mb=200)) as ep:
        async with await connect(ep) as sb:
            big = await sb.exec(["python3", "-c", "b = bytearray(400 * 1024 * 1024)"])
            assert big.exit_code != 0 and "MemoryError" in big.stderr
            small = await sb.exec(["python3", "-c", "b = bytearray(20 * 1024 * 1024)"])
            assert small.ok
            with pytest.raises(Exception, match="MemoryError"):
                await sb.python("b = bytearray(400 * 1024 * 1024)")


async def test_cpu_quota_when_supported(provider):
    if "resources.cpu" not in provider.supported:
        with pytest.raises(UnsupportedFieldError):
            provider.sandbox(config_from_flat(cpu=0.5))
        return
    async with provider.sandbox(config_from_flat(cpu=0.5)) as ep:
        async with await connect(ep) as sb:
            inside = int((await sb.exec("sleep 30 & cat /proc/self/stat")).stdout.split()[0])
            assert inside
            quota = Path(f"/sys/fs/cgroup/cpu/sandboxnb/{ep.sandbox_id}/cpu.cfs_quota_us")
            assert quota.read_text().strip() == "50000"  # noqa: ASYNC240
            members = (quota.parent / "cgroup.procs").read_text().split()
            assert str(ep.meta["pid"]) in members and len(members) >= 3  # server, sleep
    assert not quota.parent.exists()


async def test_run_timeout_kills_the_sandbox(provider, tmp_path):
    """The timer starts once the sandbox is ready; when it fires the server and everything it
    started are killed and the directory removed, whatever the machine's speed."""
    printed: list[str] = []
    config = RuntimeConfig().merge({"limits": {"run_timeout_s": 1.0}})
    provider = LocalProvider(root=tmp_path, isolation="none")  # `echo $$` is a host pid here
    async with provider.open(config) as sb:
        server = sb.endpoint.meta["pid"]
        with pytest.raises(ConnectionLost):
            await sb.exec("echo $$; exec sleep 30",
                          on_output=lambda stream, data: printed.append(data))
        await wait_until_async(lambda: not pid_alive(server), 10, "the server to be killed")
        if printed:  # the command had started before the timer fired: it dies too
            child = int(printed[0].split()[0])
            await wait_until_async(lambda: not pid_alive(child), 10,
                                   "the command to be killed")
    await wait_until_async(lambda: not any(tmp_path.iterdir()), 10,
                           "the sandbox dir to be removed")


async def test_startup_failure_reports_and_cleans_up(tmp_path):
    bad = LocalProvider(root=tmp_path, python="/bin/false")
    with pytest.raises(ProviderError, match="exited before it was ready"):
        async with bad.sandbox():
            pass
    assert not any(tmp_path.iterdir())


async def test_startup_timeout(tmp_path):
    slow = tmp_path / "slowpython"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()
    provider = LocalProvider(root=root, python=str(slow))
    config = RuntimeConfig().merge({"limits": {"startup_timeout_s": 0.3}})
    with pytest.raises(ProviderError, match="startup_timeout_s"):
        async with provider.sandbox(config):
            pass
    assert not any(root.iterdir())


async def test_namespaces_isolation(tmp_path):
    provider = LocalProvider(isolation="namespaces", root=tmp_path)
    async with provider.sandbox() as ep:
        assert ep.url.startswith("unix://")
        async with await connect(ep) as sb:
            r = await sb.exec("echo $$; ls /proc | grep -c '^[0-9]'")
            assert r.ok
            pid_inside = int(r.stdout.split()[0])
            assert pid_inside < 20  # a private pid namespace
            net = await sb.exec(["python3", "-c",
                                 "import socket; socket.create_connection(('1.1.1.1', 80), 1)"])
            assert net.exit_code != 0  # no network
    assert not pid_alive(ep.meta["pid"]) and not any(tmp_path.iterdir())


async def test_concurrent_sandboxes(provider, tmp_path):
    async def one(i: int) -> str:
        async with provider.sandbox() as ep:
            async with await connect(ep) as sb:
                return (await sb.exec(f"echo {i}")).stdout

    outs = await asyncio.gather(*(one(i) for i in range(6)))
    assert outs == [f"{i}\n" for i in range(6)]
    assert not any(tmp_path.iterdir())
    assert os.listdir(tmp_path) == []


def test_sandbox_exits_when_its_owner_process_dies(tmp_path):
    """A crashed kernel or CLI (SIGKILL: no teardown runs) takes its local sandboxes with it."""
    owner = tmp_path / "owner.py"
    owner.write_text(
        "import asyncio, sys\n"
        "from sandboxnb.providers.local import LocalProvider\n"
        "async def main():\n"
        "    async with LocalProvider().sandbox() as ep:\n"
        "        print(ep.meta.get('pid') or ep.meta, flush=True)\n"
        "        await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    before = sandbox_server_pids()
    proc = subprocess.Popen([sys.executable, str(owner)], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        servers = sandbox_server_pids() - before
        assert servers  # the server (and, jailed, bwrap and the namespace's init)
        proc.kill()
        proc.wait()
        wait_until(lambda: not (sandbox_server_pids() - before), 5,
                   "the server to exit with its owner", interval=0.1)
    finally:
        proc.kill()


async def test_a_short_idle_timeout_never_drops_a_busy_client(provider):
    """idle_timeout_s is about no client being connected, not about a quiet connected one."""
    config = RuntimeConfig().merge({"limits": {"idle_timeout_s": 1}})
    async with provider.open(config) as sb:
        result = await sb.exec(["sleep", "3"])
        assert result.exit_code == 0


HOLD_NAMESPACED = """
import asyncio, sys
from sandboxnb.config import RuntimeConfig
from sandboxnb.providers.local import LocalProvider

async def main():
    config = RuntimeConfig().merge({"limits": {"idle_timeout_s": None}})
    async with LocalProvider(isolation="namespaces").sandbox(config) as endpoint:
        print(endpoint.sandbox_id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_namespaced_sandbox_dies_with_its_owner_even_without_idle_timeout():
    import signal
    import subprocess
    import sys

    from .helpers import processes_with, wait_until

    owner = subprocess.Popen([sys.executable, "-c", HOLD_NAMESPACED], stdout=subprocess.PIPE,
                             text=True)
    try:
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("local-")
        assert processes_with(sandbox_id)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_until(lambda: not processes_with(sandbox_id), 10,
                   "the namespaced sandbox exited with its killed owner")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


async def test_launch_keywords_given_as_none_mean_no_limit():
    import sandboxnb
    from sandboxnb.doctor import server_command_in_sandbox

    async with sandboxnb.launch("local", idle_timeout_s=None, startup_timeout_s=None) as sb:
        argv = await server_command_in_sandbox(sb)
    assert argv[argv.index("--idle-timeout") + 1] == "0"
    assert argv[argv.index("--startup-timeout") + 1] == "0"


SCAN_PROC = """
import os, sys
secret = sys.stdin.read().strip().encode()  # not in our own argv
found = []
for pid in os.listdir('/proc'):
    if not pid.isdigit():
        continue
    for name in ('environ', 'cmdline'):
        try:
            with open(f'/proc/{pid}/{name}', 'rb') as fh:
                if secret in fh.read():
                    found.append(f'{pid}/{name}')
        except OSError:
            pass
print(found)
"""


async def test_another_sandbox_cannot_read_a_token_from_proc():
    """Sandbox A scans every /proc/PID/environ and cmdline it can read for B's token."""
    import sandboxnb

    async with sandboxnb.launch("local") as victim, sandboxnb.launch("local") as attacker:
        token = victim.endpoint.token
        scan = await attacker.exec(["python3", "-c", SCAN_PROC], stdin=token[:16])
        assert scan.exit_code == 0, scan.stderr
        assert scan.stdout.strip() == "[]", f"token readable at {scan.stdout}"
