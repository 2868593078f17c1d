"""The Docker provider against a real engine (start one with `sudo bash scripts/setup-docker`)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import statistics
import subprocess
import sys
import tarfile
import time

import pytest

import sandboxnb
from sandboxnb.client import connect
from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError, config_from_flat
from sandboxnb.errors import SandboxError, StartupTimeout
from sandboxnb.providers import ProviderError, get_provider
from sandboxnb.providers.docker import BUSYBOX_IMAGE, DEFAULT_IMAGE, LABEL, DockerProvider
from sandboxnb.providers.spec import owner_label

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def engine():
    """A Docker SDK client; fails (never skips) when the engine or the images are missing."""
    status = DockerProvider.availability()
    if not status.available:
        pytest.fail(f"Docker provider unavailable: {status.reason}. Run scripts/setup-docker.")
    import docker

    client = docker.from_env()
    yield client
    client.close()


def ours(client) -> set[str]:
    """Ids of every sandboxnb-labelled container the engine has, in any state."""
    return {c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL}=1"})}


async def removed(client, cid: str, within: float) -> None:
    """Wait (in a thread, via the engine's wait API) until container ``cid`` no longer exists."""
    import docker.errors

    try:
        await asyncio.to_thread(client.api.wait, cid, timeout=within, condition="removed")
    except docker.errors.NotFound:
        pass
    assert cid not in ours(client)


@pytest.fixture
async def provider(engine):
    before = ours(engine)
    prov = DockerProvider()
    yield prov
    await prov.aclose()
    assert ours(engine) - before == set(), "containers left behind"


async def test_registry_and_availability(engine):
    prov = get_provider("docker")
    assert isinstance(prov, DockerProvider) and prov.name == "docker"
    assert DockerProvider.availability().available
    await prov.aclose()


async def test_exec_streaming_files_and_python(provider, engine):
    config = config_from_flat(cpu=1, memory_mb=512)
    async with provider.sandbox(config) as endpoint:
        assert endpoint.url.startswith("tcp://127.0.0.1:")
        assert endpoint.provider == "docker" and endpoint.config.image == DEFAULT_IMAGE
        async with await connect(endpoint) as sb:
            chunks: list[tuple[str, str]] = []
            r = await sb.exec(
                "for i in 1 2 3; do echo line$i; done; echo oops >&2; exit 3",
                on_output=lambda stream, data: chunks.append((stream, data)),
            )
            assert r.exit_code == 3 and r.stdout == "line1\nline2\nline3\n" and "oops" in r.stderr
            assert "".join(d for s, d in chunks if s == "stdout") == r.stdout
            await sb.write_file("/tmp/data.bin", bytes(range(256)) * 100)
            assert await sb.read_file("/tmp/data.bin") == bytes(range(256)) * 100
            await sb.python("import sys\ncounter = 41")
            assert (await sb.python("counter + 1")).value == "42"
            version = (await sb.python("sys.version_info[:2]")).value
            assert version == "(3, 11)"
            # We are inside the container, not on the host.
            r = await sb.exec(["cat", "/etc/os-release"])
            assert "bookworm" in r.stdout
        labels = engine.containers.get(endpoint.meta["container_id"]).labels
        assert labels[LABEL] == "1" and labels[f"{LABEL}.sandbox_id"] == endpoint.sandbox_id
        assert labels[f"{LABEL}.owner"] == owner_label()
        assert labels[f"{LABEL}.provider"] == "docker"
        assert labels[f"{LABEL}.session"] == provider.session_id
        assert {f"{LABEL}.pid", f"{LABEL}.created"} <= set(labels)
        assert endpoint.sandbox_id in await provider.live_sandboxes()
    assert endpoint.sandbox_id not in await provider.live_sandboxes()


async def test_cpu_memory_pids_applied(provider, engine):
    async with provider.sandbox(config_from_flat(cpu=0.5, memory_mb=256)) as endpoint:
        info = engine.api.inspect_container(endpoint.meta["container_id"])
        host = info["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 256 * 1024 * 1024 and host["MemorySwap"] == 256 * 1024 * 1024
        assert host["PidsLimit"] == 4096 and host["Init"] is True and host["AutoRemove"]
        binding = info["NetworkSettings"]["Ports"]["7000/tcp"][0]
        assert binding["HostIp"] == "127.0.0.1"
        assert int(binding["HostPort"]) == endpoint.meta["host_port"]
        async with await connect(endpoint) as sb:
            script = (
                "cat /sys/fs/cgroup/memory.max 2>/dev/null "
                "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
                "cat /sys/fs/cgroup/cpu.max 2>/dev/null "
                "|| echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) "
                "$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
            )
            memory, cpu = (await sb.exec(script)).stdout.split("\n", 1)
            assert int(memory) == 256 * 1024 * 1024
            quota, period = cpu.split()
            assert int(quota) / int(period) == 0.5
            # The memory cap is enforced: allocating past it kills the allocating process.
            r = await sb.exec(["python3", "-c", "b = bytearray(400 * 1024 * 1024); print('no')"])
            assert r.exit_code != 0 and "no" not in r.stdout
            assert (await sb.exec("echo still alive")).stdout == "still alive\n"


async def test_gpu_type_rejected_before_any_container(provider, engine):
    before = engine.containers.list(all=True)
    for spec in ("H100", "A10G:2"):
        with pytest.raises(UnsupportedFieldError) as info:
            provider.sandbox(config_from_flat(gpu=spec))
        message = str(info.value)
        assert "docker" in message and "resources.gpu.type" in message
        assert spec.split(":")[0] in message and "count" in message
    with pytest.raises(UnsupportedFieldError, match=r"resources\.gpu\.type"):
        async with sandboxnb.launch("docker", gpu="T4"):
            pass
    assert engine.containers.list(all=True) == before
    # A count alone is accepted (it needs an NVIDIA runtime only when a sandbox starts).
    assert provider.check(config_from_flat(gpu="2")).resources.gpu.count == 1
    assert provider.check(config_from_flat(gpu="any:2")).resources.gpu.count == 2


async def test_gpu_count_reaches_the_engine(provider, engine):
    before = ours(engine)
    config = config_from_flat(gpu="any:2")
    if "nvidia" not in (engine.info().get("Runtimes") or {}):
        with pytest.raises(ProviderError, match="no GPU device driver"):
            async with provider.sandbox(config):
                pass
    else:  # pragma: no cover - only on GPU hosts
        async with provider.sandbox(config) as endpoint:
            host = engine.api.inspect_container(endpoint.meta["container_id"])["HostConfig"]
            assert host["DeviceRequests"][0]["Count"] == 2
    assert ours(engine) == before


async def test_unsupported_fields_and_options_rejected(provider, engine):
    before = engine.containers.list(all=True)
    with pytest.raises(UnsupportedFieldError, match=r"docker does not support resources.disk_mb"):
        provider.sandbox(config_from_flat(disk_mb=1024))
    with pytest.raises(ConfigError, match="network = 'none'"):
        DockerProvider(network="none")
    assert engine.containers.list(all=True) == before


async def test_teardown_on_error_leaves_nothing(provider, engine):
    before = ours(engine)
    with pytest.raises(RuntimeError, match="boom"):
        async with provider.sandbox(config_from_flat()) as endpoint:
            assert ours(engine) - before
            raise RuntimeError("boom")
    assert ours(engine) == before
    assert endpoint.sandbox_id not in await provider.live_sandboxes()


async def test_teardown_on_cancel_while_in_use(provider, engine):
    before = ours(engine)
    entered = asyncio.Event()

    async def use():
        async with provider.sandbox(config_from_flat()) as endpoint:
            async with await connect(endpoint) as sb:
                entered.set()
                await sb.exec("sleep 60")

    task = asyncio.create_task(use())
    await asyncio.wait_for(entered.wait(), 30)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ours(engine) == before


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.15, 0.3, 0.6])
async def test_cancel_during_acquire_leaks_nothing(provider, engine, delay):
    before = ours(engine)

    async def acquire():
        async with provider.sandbox(config_from_flat()):
            await asyncio.sleep(60)

    task = asyncio.create_task(acquire())
    await asyncio.sleep(delay)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ours(engine) == before


async def test_image_without_python_gives_clear_error(provider, engine):
    before = ours(engine)
    started = time.monotonic()
    with pytest.raises(ProviderError, match="has no python3") as info:
        async with provider.sandbox(config_from_flat(image=BUSYBOX_IMAGE)):
            pass
    assert BUSYBOX_IMAGE in str(info.value)
    assert time.monotonic() - started < 20
    assert ours(engine) == before


async def test_server_dying_reports_its_output(provider, engine):
    before = ours(engine)
    prov = DockerProvider()
    # An unknown flag makes the real server exit at once, before it ever listens.
    config = config_from_flat(startup_timeout_s=30)
    run_kwargs = prov.run_kwargs

    def broken(spec):
        made = run_kwargs(spec)
        made["command"] = [*made["command"], "--no-such-flag"]
        return made

    prov.run_kwargs = broken
    try:
        with pytest.raises(ProviderError, match="exited before it was ready") as info:
            async with prov.sandbox(config):
                pass
        assert "no-such-flag" in str(info.value) and "exit code 1" in str(info.value)
    finally:
        await prov.aclose()
    assert ours(engine) == before


SLOW_PYTHON = '#!/bin/sh\nsleep 600\nexec /usr/bin/python3 "$@"\n'


@pytest.fixture(scope="module")
def slow_image(engine):
    """A throwaway image whose ``python3`` sleeps before it starts: its server can never be
    ready within a short startup timeout, however fast the machine."""
    repository, tag = "sandboxnb/slow-python", f"test-{secrets.token_hex(4)}"
    shim, buf = SLOW_PYTHON.encode(), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("python3")
        info.size, info.mode = len(shim), 0o755
        tar.addfile(info, io.BytesIO(shim))
    builder = engine.containers.create(DEFAULT_IMAGE, command=["true"])
    try:
        builder.put_archive("/usr/local/bin", buf.getvalue())  # before /usr/bin on PATH
        builder.commit(repository=repository, tag=tag)
    finally:
        builder.remove(force=True)
    yield f"{repository}:{tag}"
    engine.images.remove(f"{repository}:{tag}", force=True)


@pytest.mark.parametrize("startup_timeout_s", [0.05, 0.3, 1.5])
async def test_startup_timeout_bounds_acquire(provider, engine, slow_image, startup_timeout_s):
    before = ours(engine)
    started = time.monotonic()
    config = config_from_flat(image=slow_image, startup_timeout_s=startup_timeout_s)
    with pytest.raises(StartupTimeout, match=r"not ready within limits\.startup_timeout_s") as info:
        async with provider.sandbox(config):
            pass
    assert time.monotonic() - started < startup_timeout_s + 5
    sandbox_id = re.search(r"sandbox (docker-[0-9a-f]+) ", str(info.value))[1]
    mine = {"label": f"{LABEL}.sandbox_id={sandbox_id}"}
    assert engine.api.containers(all=True, filters=mine) == []  # the engine says: gone
    assert ours(engine) == before


async def test_unset_limits_follow_the_one_policy(provider, engine):
    """Defaults: 60 s startup, 15 s idle; None turns a limit off (0) on the server."""
    unset = RuntimeConfig().merge({"limits": {"startup_timeout_s": None, "idle_timeout_s": None}})
    for config, startup, idle in ((config_from_flat(), "60", "15"), (unset, "0", "0")):
        async with provider.sandbox(config) as endpoint:
            argv = engine.api.inspect_container(endpoint.meta["container_id"])["Args"]
            assert argv[argv.index("--startup-timeout") + 1] == startup
            assert argv[argv.index("--idle-timeout") + 1] == idle


async def test_missing_image_without_pull(engine):
    prov = DockerProvider(pull=False)
    try:
        with pytest.raises(ProviderError, match="not on the engine") as info:
            async with prov.sandbox(config_from_flat(image="sandboxnb/does-not-exist:1")):
                pass
        assert "setup-docker" in str(info.value)
    finally:
        await prov.aclose()


async def test_run_timeout_kills_container(provider, engine):
    before = ours(engine)
    async with provider.sandbox(config_from_flat(run_timeout_s=1.5)) as endpoint:
        async with await connect(endpoint) as sb:
            with pytest.raises(SandboxError):
                await sb.exec("sleep 30", timeout=20)
        await removed(engine, endpoint.meta["container_id"], within=10)
    assert ours(engine) == before


async def test_idle_dead_man_switch_removes_container(provider, engine):
    async with provider.sandbox(config_from_flat(idle_timeout_s=1)) as endpoint:
        sb = await connect(endpoint)
        assert (await sb.exec("echo hi")).ok
        await sb.close()
        await removed(engine, endpoint.meta["container_id"], within=15)


async def test_concurrent_sandboxes_do_not_block_the_loop(provider, engine):
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - started - 0.01)

    async def one(i: int) -> str:
        async with sandboxnb.launch(provider, cpu=0.5) as sb:
            return (await sb.exec(f"echo {i}")).stdout

    tick = asyncio.create_task(ticker())
    outputs = await asyncio.gather(*(one(i) for i in range(6)))
    stop.set()
    await tick
    assert outputs == [f"{i}\n" for i in range(6)]
    # Robust on a loaded 2-core machine: SDK calls on the loop would make most ticks late.
    assert statistics.median(lags) < 0.05, f"event loop lag median {statistics.median(lags):.3f}s"
    assert max(lags) < 2.0, f"event loop stalled {max(lags):.3f}s"


async def test_reap_removes_this_sessions_containers(provider, engine):
    async with provider.sandbox(config_from_flat()) as endpoint:
        assert await provider.reap(session_only=True) == [endpoint.sandbox_id]
        assert endpoint.sandbox_id not in await provider.live_sandboxes()


async def test_cli_runs_humaneval_subset_on_docker(engine, tmp_path):
    before = ours(engine)
    journal = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
        "--runtime", "docker", "--tasks", "HumanEval/1?", "--cpu", "1", "--memory-mb", "512",
        "--max-concurrent", "4", "--journal", str(journal), "--no-progress",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "task_id" in r]
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert {r["provider"] for r in rows} == {"docker"} and {r["cpu"] for r in rows} == {1.0}
    assert all(r["reward"] == 1.0 for r in rows)
    assert ours(engine) == before


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_humaneval_all_164_oracle_on_docker(engine, tmp_path):
    before = ours(engine)
    provider = DockerProvider()
    try:
        run = await sandboxnb.run(
            "humaneval", "oracle", runtime=provider, max_concurrent=8,
            journal=tmp_path / "journal.jsonl", progress=False,
        )
    finally:
        await provider.aclose()
    assert run.total == 164 and len(run.rows) == 164
    assert run.counts() == {"ok": 164}, [r["error"] for r in run.rows if r["status"] != "ok"][:3]
    assert run.mean_reward() == 1.0
    assert {r["provider"] for r in run.rows} == {"docker"}
    assert len({r["sandbox_id"] for r in run.rows}) == 164
    assert ours(engine) == before
