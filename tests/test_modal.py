"""The Modal provider end to end: real ``modal`` SDK -> emulated control plane -> isolated
sandbox process -> TLS tunnel -> our server -> our client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

import sandboxnb
from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError, config_from_flat
from sandboxnb.errors import StartupTimeout
from sandboxnb.providers import ProviderError, get_provider
from sandboxnb.providers import modal as modal_provider
from sandboxnb.providers.modal import MAX_TIMEOUT_S, ModalProvider
from sandboxnb.providers.spec import owner_label
from sandboxnb.testing.modal_emulator import CreateRecord, ModalEmulator

from .helpers import wait_until_async

SANDBOX_CREATES = ("SandboxCreate", "SandboxCreateV2")


@pytest.fixture
def emu():
    with ModalEmulator() as emulator:
        yield emulator
        # Teardown checks: no SDK call fell through, nothing left running.
        assert emulator.unimplemented_calls == []
        assert emulator.live_sandboxes() == []
    assert emulator.live_processes() == []


@pytest.fixture
async def provider(emu):
    prov = ModalProvider()
    yield prov
    await prov.aclose()


def creates(emu: ModalEmulator) -> int:
    return sum(emu.rpc_calls.get(name, 0) for name in SANDBOX_CREATES)


def record(emu: ModalEmulator, sandbox_id: str) -> CreateRecord:
    """The control plane's record of one of our sandboxes, found by the tag it carries."""
    found = [r for r in emu.creates if r.tags.get("sandboxnb.sandbox_id") == sandbox_id]
    assert len(found) == 1, (sandbox_id, found)
    return found[0]


def live(emu: ModalEmulator) -> list[str]:
    """Our ids of the sandboxes the control plane still runs."""
    return [r.tags["sandboxnb.sandbox_id"] for r in emu.creates
            if r.sandbox_id in emu.live_sandboxes()]


async def test_launch_exec_files_python(emu, provider):
    chunks: list[tuple[str, str]] = []
    async with sandboxnb.launch(provider, cpu=1, memory_mb=512) as sb:
        assert sb.endpoint.url.startswith("tls://localhost:")
        assert live(emu) == [sb.endpoint.sandbox_id]
        assert sb.endpoint.meta["modal_id"] == record(emu, sb.endpoint.sandbox_id).sandbox_id
        result = await sb.exec(
            "for i in 1 2 3; do echo line$i; done; echo oops >&2",
            on_output=lambda stream, data: chunks.append((stream, data)),
        )
        assert result.ok and result.stdout == "line1\nline2\nline3\n"
        assert result.stderr == "oops\n"
        assert "".join(d for s, d in chunks if s == "stdout") == result.stdout
        await sb.write_file("/tmp/work/data.bin", b"\x00\x01binary\xff")
        assert await sb.read_file("/tmp/work/data.bin") == b"\x00\x01binary\xff"
        await sb.python("import os\ncounter = 41")
        assert (await sb.python("counter + 1")).value == "42"
        # The server's token is not visible to commands, nor in the entrypoint's argv.
        env = await sb.exec("env")
        assert "SANDBOXNB_TOKEN" not in env.stdout
        rec = record(emu, sb.endpoint.sandbox_id)
        assert sb.endpoint.token not in " ".join(rec.entrypoint)
        assert "SANDBOXNB_TOKEN" in rec.env_keys
        # Our server is only reachable through the tunnel: the sandbox has its own network.
        probe = await sb.exec("python3 -c \"import socket; print(socket.gethostname())\"")
        assert probe.ok
    assert emu.live_sandboxes() == []
    assert emu.creates[-1].end_reason == "terminated"


async def test_resource_mapping_reaches_the_control_plane(emu, provider):
    config = config_from_flat(
        cpu=2, memory_mb=1536, gpu="A10G:2", run_timeout_s=120, idle_timeout_s=90,
        startup_timeout_s=30,
    )
    async with provider.sandbox(config) as endpoint:
        rec = record(emu, endpoint.sandbox_id)
        async with await sandboxnb.connect(endpoint) as sb:
            assert (await sb.exec(["echo", "gpu-box"])).stdout == "gpu-box\n"
    assert rec.api == "v1"  # Modal serves GPU sandboxes from the V1 backend
    assert rec.cpu == 2.0
    assert (rec.memory_mb, rec.memory_mb_max) == (1536, 1536)
    assert rec.gpu == "A10G:2"
    # Modal's clock starts at create, the run timeout at ready: its cap leaves the startup room
    assert (rec.timeout, rec.idle_timeout) == (120 + 30, 90)
    assert rec.image == "python:3.11-slim"
    assert rec.ports == [(7000, True)] and rec.encrypted
    assert rec.tags == endpoint.meta["labels"]  # the spec's labels, keys as they are
    assert rec.tags["sandboxnb"] == "1"
    assert rec.tags["sandboxnb.session"] == provider.session_id
    assert rec.tags["sandboxnb.owner"] == owner_label()
    assert rec.tags["sandboxnb.provider"] == "modal"
    assert {"sandboxnb.created", "sandboxnb.pid"} <= set(rec.tags)
    assert endpoint.config.resources.gpu.count == 2
    assert endpoint.config.image == "python:3.11-slim"


async def test_cpu_only_sandbox_uses_v2_and_defaults(emu, provider):
    async with provider.sandbox(RuntimeConfig()) as endpoint:
        rec = record(emu, endpoint.sandbox_id)
    assert rec.api == "v2"
    assert rec.cpu is None and rec.memory_mb is None and rec.gpu is None
    assert rec.timeout == MAX_TIMEOUT_S == 24 * 3600  # no run timeout: Modal's own maximum
    assert rec.idle_timeout == 60  # max(idle 15 s, startup 60 s): never cuts a slow start
    assert emu.rpc_calls["AuthTokenGet"] >= 1


@pytest.mark.parametrize(
    ("flat", "field"),
    [
        ({"disk_mb": 2048}, "resources.disk_mb"),
        ({"gpu": "TPU9000"}, "resources.gpu.type"),
        ({"gpu": "H100:16"}, "resources.gpu.count"),
        ({"run_timeout_s": 100_000}, "limits.run_timeout_s"),
    ],
)
async def test_unsupported_fields_rejected_before_any_create(emu, provider, flat, field):
    with pytest.raises(ConfigError) as info:
        provider.sandbox(config_from_flat(**flat))
    assert field in str(info.value)
    if "disk_mb" in flat:
        assert isinstance(info.value, UnsupportedFieldError)
        assert "modal does not support resources.disk_mb" in str(info.value)
    with pytest.raises(ConfigError):
        async with sandboxnb.launch(provider, **flat):
            pass
    assert creates(emu) == 0 and emu.creates == []


async def test_unencrypted_tunnel_only_when_asked(emu):
    plain = ModalProvider(encrypted=False)
    try:
        async with sandboxnb.launch(plain) as sb:
            assert sb.endpoint.url.startswith("tcp://")
            assert (await sb.exec(["echo", "plain"])).stdout == "plain\n"
            rec = record(emu, sb.endpoint.sandbox_id)
            assert rec.ports == [(7000, False)] and not rec.encrypted
    finally:
        await plain.aclose()
    default = get_provider("modal")
    try:
        async with default.sandbox(RuntimeConfig()) as endpoint:
            assert endpoint.url.startswith("tls://")
            assert record(emu, endpoint.sandbox_id).ports == [(7000, True)]
    finally:
        await default.aclose()


async def test_tls_tunnel_needs_the_ca(emu, provider, monkeypatch):
    async with provider.sandbox(RuntimeConfig()) as endpoint:
        monkeypatch.delenv("SANDBOXNB_TLS_CA_FILE")
        with pytest.raises(Exception) as info:  # certificate verify failed
            await sandboxnb.connect(endpoint)
        assert "certif" in str(info.value).lower()


async def test_teardown_on_error(emu, provider):
    with pytest.raises(RuntimeError, match="rollout failed"):
        async with provider.sandbox(RuntimeConfig()) as endpoint:
            sid = endpoint.sandbox_id
            raise RuntimeError("rollout failed")
    assert emu.live_sandboxes() == []
    assert record(emu, sid).end_reason == "terminated"


async def test_teardown_on_cancel(emu, provider):
    acquired = asyncio.Event()

    async def rollout():
        async with sandboxnb.launch(provider) as sb:
            acquired.set()
            await sb.exec(["sleep", "30"])

    task = asyncio.create_task(rollout())
    await asyncio.wait_for(acquired.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert emu.live_sandboxes() == []
    assert emu.creates[-1].end_reason == "terminated"


async def test_cancel_while_create_rpc_in_flight_leaves_nothing():
    with ModalEmulator(create_delay_s=3.0) as slow:
        prov = ModalProvider()
        try:
            task = asyncio.create_task(prov.sandbox(RuntimeConfig()).__aenter__())
            await wait_until_async(lambda: len(slow.creates) == 1, 10,  # the control plane has it
                                   "the create to reach the control plane", interval=0.02)
            assert slow.live_sandboxes() == [slow.creates[0].sandbox_id]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Cancelled before the handle reached us: release waited for it and terminated it.
            assert slow.live_sandboxes() == []
            assert slow.creates[0].end_reason == "terminated"
            assert slow.unimplemented_calls == []
        finally:
            await prov.aclose()


async def test_startup_timeout_during_create_leaves_nothing():
    with ModalEmulator(create_delay_s=3.0) as slow:
        prov = ModalProvider()
        try:
            with pytest.raises(StartupTimeout, match="startup_timeout_s = 1s"):
                async with prov.sandbox(config_from_flat(startup_timeout_s=1)):
                    pass
            assert len(slow.creates) == 1
            assert slow.live_sandboxes() == []
        finally:
            await prov.aclose()


async def test_image_resolved_once_under_concurrent_first_use():
    import modal

    with ModalEmulator(image_build_s=0.5) as emu:
        lazy = modal.Image.from_registry("python:3.12-slim").env({"SANDBOXNB_LAYER": "1"})
        prov = ModalProvider(image=lazy)
        try:
            async def rollout(i: int) -> str:
                async with prov.sandbox(RuntimeConfig()) as endpoint:
                    async with await sandboxnb.connect(endpoint) as sb:
                        out = await sb.exec(["echo", str(i)])
                        assert out.stdout == f"{i}\n"
                    return endpoint.sandbox_id

            ids = await asyncio.gather(*(rollout(i) for i in range(4)))
            assert len(set(ids)) == 4
            requested = [image_id for image_id, _ in emu.image_requests]
            assert len(requested) == len(set(requested))  # every layer requested exactly once
            assert emu.rpc_calls["ImageJoinStreaming"] == len(requested)
            used = {record(emu, i).image_id for i in ids}
            assert len(used) == 1 and {r.image for r in emu.creates} == {"python:3.12-slim"}
            assert emu.live_sandboxes() == [] and emu.unimplemented_calls == []
        finally:
            await prov.aclose()


async def test_published_image_by_name(emu, provider):
    image_id = emu.publish_image("sandboxnb-python", ref="python:3.11-bookworm")
    async with provider.sandbox(config_from_flat(image="modal://sandboxnb-python")) as endpoint:
        assert endpoint.config.image == "modal://sandboxnb-python"
        rec = record(emu, endpoint.sandbox_id)
    assert rec.image_id == image_id and rec.image == "python:3.11-bookworm"
    with pytest.raises(ProviderError, match="modal://missing"):
        async with provider.sandbox(config_from_flat(image="modal://missing")):
            pass
    assert len(emu.creates) == 1


async def test_live_sandboxes_and_reap_by_tags(emu, provider):
    async with provider.sandbox(RuntimeConfig()) as endpoint:
        assert await provider.live_sandboxes() == [endpoint.sandbox_id]
        other = ModalProvider(session_id="another-session")
        try:
            assert endpoint.sandbox_id in await other.live_sandboxes()  # same owner
            assert await other.reap(session_only=True) == []
        finally:
            await other.aclose()
    assert await provider.live_sandboxes() == []


async def test_gc_finds_and_releases_an_orphan_by_its_tags(emu, provider):
    spec = provider.launch_spec(provider.check(RuntimeConfig()))
    await provider.create(spec)  # as if its owner died before any teardown
    # the owner here is this (live) test process: gc leaves it alone unless asked
    shy = await asyncio.to_thread(_gc, "--runtime", "modal")
    assert spec.sandbox_id not in shy.stdout and "1 more in use" in shy.stdout, shy.stdout
    listed = await asyncio.to_thread(_gc, "--runtime", "modal", "--include-live")
    assert listed.returncode == 0 and spec.sandbox_id in listed.stdout, listed.stderr
    assert live(emu) == [spec.sandbox_id]
    released = await asyncio.to_thread(_gc, "--runtime", "modal", "--delete", "--include-live")
    assert released.returncode == 0 and spec.sandbox_id in released.stdout, released.stderr
    assert emu.live_sandboxes() == [] and record(emu, spec.sandbox_id).end_reason == "terminated"
    other = ModalProvider(session_id="another-session")
    try:
        assert await other.live_sandboxes() == [] and await other.reap() == []
    finally:
        await other.aclose()


def _gc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxnb", "gc", *args], capture_output=True,
                          text=True, timeout=120, check=False)


async def test_run_timeout_ends_the_sandbox(emu, provider):
    config = config_from_flat(run_timeout_s=1, startup_timeout_s=20)
    async with provider.sandbox(config) as endpoint:
        rec = record(emu, endpoint.sandbox_id)
        assert rec.timeout == 21
        await wait_until_async(lambda: not emu.live_sandboxes(), 10,
                               "Modal's sandboxes to be gone", interval=0.02)
    assert rec.end_reason == "terminated"  # by the base's run timeout, before Modal's cap


async def test_modal_lifetime_cap_is_the_backstop_when_the_owner_is_gone(emu, provider):
    unset = {"limits": {"run_timeout_s": 1, "startup_timeout_s": None, "idle_timeout_s": None}}
    spec = provider.launch_spec(provider.check(RuntimeConfig().merge(unset)))
    handle = await provider.create(spec)  # no lifecycle: as if the kernel died right after
    try:
        rec = record(emu, spec.sandbox_id)
        assert rec.timeout == 1
        await wait_until_async(lambda: not emu.live_sandboxes(), 10,
                               "Modal's sandboxes to be gone", interval=0.02)
        assert rec.end_reason == "timeout"
    finally:
        await provider.destroy(handle)
        await provider.destroy(handle)  # idempotent, also once Modal ended it


async def test_server_options_follow_the_one_policy(emu, provider):
    unset = {"limits": {"startup_timeout_s": None, "idle_timeout_s": None}}
    async with provider.sandbox(RuntimeConfig().merge(unset)) as endpoint:
        rec = record(emu, endpoint.sandbox_id)
    args = rec.entrypoint[4 + int(rec.entrypoint[3]):]  # after python3 -c BOOT N CHUNKS
    assert args == ["--sandbox-id", endpoint.sandbox_id, "--startup-timeout", "0",
                    "--idle-timeout", "0", "--host", "0.0.0.0", "--port", "7000"]
    assert rec.idle_timeout is None and rec.timeout == MAX_TIMEOUT_S


async def test_sandbox_that_exits_is_reported_at_once(emu, provider, monkeypatch):
    monkeypatch.setattr(modal_provider, "_bootstrap",
                        lambda: ("python3", "-c", "import sys; sys.exit(3)"))
    started = asyncio.get_running_loop().time()
    with pytest.raises(ProviderError, match="exited with code 3 before its server answered"):
        async with provider.sandbox(RuntimeConfig()):
            pass
    assert asyncio.get_running_loop().time() - started < 10  # not the 60 s startup deadline
    assert emu.creates[-1].end_reason == "exited"


async def test_untrusted_tunnel_certificate_is_reported_at_once(emu, provider, monkeypatch):
    monkeypatch.delenv("SANDBOXNB_TLS_CA_FILE")
    untrusted = r"certificate of tls://.* is not trusted .* SANDBOXNB_TLS_CA_FILE"
    with pytest.raises(ProviderError, match=untrusted):
        async with provider.sandbox(config_from_flat(startup_timeout_s=20)):
            pass
    assert emu.live_sandboxes() == [] and emu.creates[-1].end_reason == "terminated"


async def test_abandoned_sandbox_goes_away_after_idle_timeout(emu, provider):
    config = config_from_flat(idle_timeout_s=1, startup_timeout_s=5)
    async with provider.sandbox(config) as endpoint:
        rec = record(emu, endpoint.sandbox_id)
        assert rec.idle_timeout == 5  # max(idle, startup): Modal never cuts a slow start
        # Nobody connects (a crashed client): the server's dead-man switch or Modal's idle
        # timeout ends the sandbox without any terminate call.
        await wait_until_async(lambda: not emu.live_sandboxes(), 15,
                               "Modal's sandboxes to be gone", interval=0.02)
    assert rec.end_reason in ("exited", "idle_timeout")
    assert emu.rpc_calls.get("SandboxTerminateV2", 0) == 1  # only the teardown's own call


async def test_unimplemented_rpcs_fail_loudly_and_are_recorded():
    import modal

    with ModalEmulator() as emu:
        client = await modal.Client.from_credentials.aio(emu.token_id, emu.token_secret)
        try:
            with pytest.raises(modal.exception.Error, match="VolumeGetOrCreate"):
                await modal.Volume.from_name("data").hydrate.aio(client)
        finally:
            await client.close.aio()
        assert emu.unimplemented_calls == ["VolumeGetOrCreate"]


async def test_bad_token_is_reported(emu, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-wrong")
    prov = ModalProvider()
    try:
        with pytest.raises(ProviderError, match="cannot open app"):
            async with prov.sandbox(RuntimeConfig()):
                pass
    finally:
        await prov.aclose()
    assert emu.creates == []


def test_availability_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    import modal.config

    monkeypatch.setattr(modal.config, "_user_config", {})
    avail = ModalProvider.availability()
    assert not avail.available
    assert "MODAL_TOKEN_ID" in avail.reason and "modal token new" in avail.reason
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-y")
    assert ModalProvider.availability().available


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_humaneval_oracle_scores_164_of_164(emu, tmp_path):
    from sandboxnb.tasksets import humaneval

    provider = ModalProvider()
    try:
        run = await sandboxnb.run(
            humaneval.load(), "oracle", runtime=provider, max_concurrent=8,
            journal=tmp_path / "humaneval-modal.jsonl", progress=False,
        )
    finally:
        await provider.aclose()
    assert run.total == 164
    failed = [
        (r["error"], r["sandbox_id"] and record(emu, r["sandbox_id"]).end_reason)
        for r in run.rows if r["error"]
    ]
    assert run.counts() == {"ok": 164}, failed[:3]
    assert run.mean_reward() == 1.0
    assert {r["provider"] for r in run.rows} == {"modal"}
    assert len(emu.creates) == 164
    assert os.environ["MODAL_SERVER_URL"] == emu.url
