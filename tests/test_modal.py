"""The Modal provider end to end: real ``modal`` SDK -> emulated control plane -> isolated
sandbox process -> TLS tunnel -> our server -> our client."""

from __future__ import annotations

import asyncio
import os

import pytest

import sandboxnb
from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError, config_from_flat
from sandboxnb.providers import ProviderError, get_provider
from sandboxnb.providers.modal import ModalProvider
from sandboxnb.testing.modal_emulator import ModalEmulator

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


async def wait_for(predicate, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_launch_exec_files_python(emu, provider):
    chunks: list[tuple[str, str]] = []
    async with sandboxnb.launch(provider, cpu=1, memory_mb=512) as sb:
        assert sb.endpoint.url.startswith("tls://localhost:")
        assert sb.endpoint.sandbox_id in emu.live_sandboxes()
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
        rec = emu.record(sb.endpoint.sandbox_id)
        assert sb.endpoint.token not in " ".join(rec.entrypoint)
        assert "SANDBOXNB_TOKEN" in rec.env_keys
        # Our server is only reachable through the tunnel: the sandbox has its own network.
        probe = await sb.exec("python3 -c \"import socket; print(socket.gethostname())\"")
        assert probe.ok
    assert emu.live_sandboxes() == []
    assert emu.creates[-1].end_reason == "terminated"


async def test_resource_mapping_reaches_the_control_plane(emu, provider):
    config = config_from_flat(
        cpu=2, memory_mb=1536, gpu="A10G:2", timeout=120, idle_timeout_s=90,
        startup_timeout_s=30,
    )
    async with provider.sandbox(config) as endpoint:
        rec = emu.record(endpoint.sandbox_id)
        async with await sandboxnb.connect(endpoint) as sb:
            assert (await sb.exec(["echo", "gpu-box"])).stdout == "gpu-box\n"
    assert rec.api == "v1"  # Modal serves GPU sandboxes from the V1 backend
    assert rec.cpu == 2.0
    assert (rec.memory_mb, rec.memory_mb_max) == (1536, 1536)
    assert rec.gpu == "A10G:2"
    assert (rec.timeout, rec.idle_timeout) == (120, 90)
    assert rec.image == "python:3.11-slim"
    assert rec.ports == [(7000, True)] and rec.encrypted
    assert rec.tags["sandboxnb"] == "1"
    assert rec.tags["session"] == provider.session_id
    assert rec.tags["owner"] == provider.owner
    assert {"created", "acquisition"} <= set(rec.tags)
    assert endpoint.config.resources.gpu.count == 2


async def test_cpu_only_sandbox_uses_v2_and_defaults(emu, provider):
    async with provider.sandbox(RuntimeConfig()) as endpoint:
        rec = emu.record(endpoint.sandbox_id)
    assert rec.api == "v2"
    assert rec.cpu is None and rec.memory_mb is None and rec.gpu is None
    assert rec.timeout == provider.default_timeout_s
    assert rec.idle_timeout == 300
    assert emu.rpc_calls["AuthTokenGet"] >= 1


@pytest.mark.parametrize(
    ("flat", "field"),
    [
        ({"disk_mb": 2048}, "resources.disk_mb"),
        ({"gpu": "TPU9000"}, "resources.gpu.type"),
        ({"gpu": "H100:16"}, "resources.gpu.count"),
        ({"timeout": 100_000}, "limits.run_timeout_s"),
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
            rec = emu.record(sb.endpoint.sandbox_id)
            assert rec.ports == [(7000, False)] and not rec.encrypted
    finally:
        await plain.aclose()
    default = get_provider("modal")
    try:
        async with default.sandbox(RuntimeConfig()) as endpoint:
            assert endpoint.url.startswith("tls://")
            assert emu.record(endpoint.sandbox_id).ports == [(7000, True)]
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
    assert emu.record(sid).end_reason == "terminated"


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
            await wait_for(lambda: len(slow.creates) == 1)  # the control plane has it
            assert slow.live_sandboxes() == [slow.creates[0].sandbox_id]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The handle never reached us; the provider found it by tag and terminated it.
            assert slow.live_sandboxes() == []
            assert slow.creates[0].end_reason == "terminated"
            assert slow.rpc_calls.get("SandboxListV2", 0) >= 1
            assert slow.unimplemented_calls == []
        finally:
            await prov.aclose()


async def test_startup_timeout_during_create_leaves_nothing():
    with ModalEmulator(create_delay_s=3.0) as slow:
        prov = ModalProvider()
        try:
            with pytest.raises(ProviderError, match="startup_timeout_s=1"):
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
            used = {emu.record(i).image_id for i in ids}
            assert len(used) == 1 and {r.image for r in emu.creates} == {"python:3.12-slim"}
            assert emu.live_sandboxes() == [] and emu.unimplemented_calls == []
        finally:
            await prov.aclose()


async def test_published_image_by_name(emu, provider):
    image_id = emu.publish_image("sandboxnb-python", ref="python:3.11-bookworm")
    async with provider.sandbox(config_from_flat(image="modal://sandboxnb-python")) as endpoint:
        assert endpoint.config.image == "modal://sandboxnb-python"
        rec = emu.record(endpoint.sandbox_id)
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


async def test_run_timeout_is_enforced_by_the_control_plane(emu, provider):
    async with provider.sandbox(config_from_flat(timeout=1)) as endpoint:
        await wait_for(lambda: not emu.live_sandboxes(), within=10)
        assert emu.record(endpoint.sandbox_id).end_reason == "timeout"
    assert emu.live_sandboxes() == []


async def test_abandoned_sandbox_goes_away_after_idle_timeout(emu, provider):
    async with provider.sandbox(config_from_flat(idle_timeout_s=1)) as endpoint:
        rec = emu.record(endpoint.sandbox_id)
        assert rec.idle_timeout == 1
        # Nobody connects (a crashed client): the server's dead-man switch or Modal's idle
        # timeout ends the sandbox without any terminate call.
        await wait_for(lambda: not emu.live_sandboxes(), within=15)
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
        (r["error"], r["sandbox_id"] and emu.record(r["sandbox_id"]).end_reason)
        for r in run.rows if r["error"]
    ]
    assert run.counts() == {"ok": 164}, failed[:3]
    assert run.mean_reward() == 1.0
    assert {r["provider"] for r in run.rows} == {"modal"}
    assert len(emu.creates) == 164
    assert os.environ["MODAL_SERVER_URL"] == emu.url
