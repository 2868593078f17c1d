"""Transient backend faults: injected into the emulators, met through the real SDKs.

Each test injects faults with the emulator's fault plan and checks, from the emulator's own
state, that a transient fault is retried (honouring Retry-After), that an uncertain create leaves
exactly one sandbox, that a permanent error fails at once with the provider's message, and that
nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter

import pytest

import sandboxnb
from sandboxnb.config import config_from_flat
from sandboxnb.errors import ProviderError
from sandboxnb.providers import retry
from sandboxnb.providers.daytona import DaytonaProvider
from sandboxnb.providers.docker import DockerProvider
from sandboxnb.providers.modal import ModalProvider
from sandboxnb.providers.retry import RetryPolicy
from sandboxnb.testing.daytona_emulator import DaytonaEmulator
from sandboxnb.testing.faults import FaultPlan
from sandboxnb.testing.modal_emulator import ModalEmulator

from .helpers import wait_until_async

ID_TAG = "sandboxnb.sandbox_id"
#: Short waits keep the tests quick; bounds are what is checked, not speed.
FAST = RetryPolicy(attempts=6, total_s=60, wait_initial_s=0.05, wait_max_s=0.2,
                   wait_jitter_s=0.05)


class FastModal(ModalProvider):
    retry_policy = FAST


# ---- Modal --------------------------------------------------------------------------------------
@pytest.fixture
def memu():
    with ModalEmulator() as emulator:
        yield emulator
        assert emulator.unimplemented_calls == []
        assert emulator.live_sandboxes() == []
    assert emulator.live_processes() == []


@pytest.fixture
async def modal_provider(memu):
    prov = FastModal()
    yield prov
    await prov.aclose()


def modal_copies(emu: ModalEmulator, sandbox_id: str) -> tuple[int, int]:
    """(sandboxes the control plane made for ``sandbox_id``, how many of them still run)."""
    made = [r.sandbox_id for r in emu.creates if r.tags.get(ID_TAG) == sandbox_id]
    live = set(emu.live_sandboxes())
    return len(made), sum(1 for sid in made if sid in live)


async def test_modal_resource_exhausted_is_retried(memu, modal_provider, caplog):
    rule = memu.faults.add("SandboxCreateV2", "RESOURCE_EXHAUSTED", times=2)
    with caplog.at_level(logging.DEBUG, "sandboxnb.providers.retry"):
        async with sandboxnb.launch(modal_provider) as sb:
            assert (await sb.exec("echo ok")).stdout == "ok\n"
            assert modal_copies(memu, sb.endpoint.sandbox_id) == (1, 1)
    assert rule.injected == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "sandboxnb.providers.retry"]
    assert [("attempt 1 of 6" in m, "attempt 2 of 6" in m) for m in logged] == [
        (True, False), (False, True)], logged
    assert {r.levelno for r in caplog.records if r.name == "sandboxnb.providers.retry"} == {
        logging.DEBUG}
    assert memu.rpc_calls["SandboxCreateV2"] == 3
    stats = modal_provider.retry_stats
    assert (stats.faults, stats.retries, stats.lookups) == (2, 2, 0)  # refused: no lookup


async def test_modal_retry_after_is_honoured(memu, modal_provider):
    # Modal's Retry-After is an RPCRetryPolicy detail; the SDK sleeps on it itself
    memu.faults.add("SandboxCreateV2", "RESOURCE_EXHAUSTED", times=1, retry_after=1.0)
    started = time.monotonic()
    async with modal_provider.sandbox(config_from_flat(startup_timeout_s=60)):
        pass
    assert time.monotonic() - started >= 1.0
    assert memu.rpc_calls["SandboxCreateV2"] == 2


async def test_modal_unavailable_past_the_sdk_retries(memu, modal_provider):
    # the SDK retries UNAVAILABLE 3 times itself, then we take over (uncertain: look up first)
    rule = memu.faults.add("SandboxCreateV2", "UNAVAILABLE", times=6)
    async with modal_provider.sandbox() as endpoint:
        assert modal_copies(memu, endpoint.sandbox_id) == (1, 1)
    assert rule.injected == 6
    stats = modal_provider.retry_stats
    assert stats.retries >= 1 and stats.lookups == stats.retries and stats.adopted == 0


@pytest.mark.parametrize("resets", [1, 5])
async def test_modal_uncertain_create_leaves_one_sandbox(memu, modal_provider, resets):
    # each reset create did make a sandbox. The SDK repeats a reset create 3 times itself: 1
    # reset is hidden from us (its copy is swept), 5 outlast the SDK's 4 attempts (we adopt one)
    memu.faults.add("SandboxCreateV2", "reset", times=resets)
    async with modal_provider.sandbox() as endpoint:
        sid = endpoint.sandbox_id
        made, _ = modal_copies(memu, sid)
        assert made == (resets + 1 if resets < 4 else 4), made
        await wait_until_async(lambda: modal_copies(memu, sid)[1] == 1, 30,
                               "the duplicates to be terminated")
        async with await sandboxnb.connect(endpoint) as sb:
            assert (await sb.exec("echo ok")).ok
    assert modal_copies(memu, sid)[1] == 0
    stats = modal_provider.retry_stats
    if resets >= 4:
        assert stats.adopted == 1 and stats.lookups == 1
    assert stats.duplicates_removed == made - 1


async def test_modal_permanent_error_fails_at_once(memu, modal_provider):
    memu.faults.add("SandboxCreateV2", "INVALID_ARGUMENT", times=1,
                    message="Image 'nope' is not a valid image")
    with pytest.raises(ProviderError, match="Image 'nope' is not a valid image"):
        async with modal_provider.sandbox():
            pass
    assert memu.rpc_calls["SandboxCreateV2"] == 1
    assert memu.creates == []
    assert modal_provider.retry_stats.retries == 0
    assert modal_provider.retry_stats.permanent == 1


async def test_permanent_error_fails_one_rollout_and_the_run_goes_on(memu, modal_provider):
    from sandboxnb.tasksets import humaneval

    memu.faults.add("SandboxCreateV2", "PERMISSION_DENIED", times=1, every=2,
                    message="token lacks the sandbox:create permission")
    run = await sandboxnb.run(humaneval.load().select(["HumanEval/1", "HumanEval/2",
                                                        "HumanEval/3"]),
                              "oracle", runtime=modal_provider, max_concurrent=1, journal=None,
                              progress=False)
    assert run.counts() == {"ok": 2, "error": 1}
    (failed,) = [r for r in run.rows if r["status"] == "error"]
    assert "token lacks the sandbox:create permission" in failed["error"], failed["error"]
    assert memu.rpc_calls["SandboxCreateV2"] == 3  # no retry of the permanent one
    assert modal_provider.retry_stats.retries == 0


async def test_modal_quota_exhausted_is_permanent(memu, modal_provider):
    memu.faults.add("SandboxCreateV2", "RESOURCE_EXHAUSTED", times=1,
                    message="workspace quota exceeded: 100 sandboxes")
    with pytest.raises(ProviderError, match="quota exceeded"):
        async with modal_provider.sandbox():
            pass
    assert memu.rpc_calls["SandboxCreateV2"] == 1


async def test_modal_destroy_is_retried(memu, modal_provider):
    rule = memu.faults.add("SandboxTerminateV2", "UNAVAILABLE", times=5)
    async with modal_provider.sandbox() as endpoint:
        sid = endpoint.sandbox_id
    assert rule.injected == 5
    assert modal_copies(memu, sid) == (1, 0)


async def test_modal_destroy_that_fails_for_good_is_logged_loudly(memu, modal_provider, caplog):
    memu.faults.add("SandboxTerminateV2", "PERMISSION_DENIED", times=1)
    with caplog.at_level(logging.ERROR, "sandboxnb"):
        with pytest.raises(ProviderError, match="releasing sandbox"):
            async with modal_provider.sandbox() as endpoint:
                sid = endpoint.sandbox_id
    assert modal_copies(memu, sid) == (1, 1)
    loud = [r.getMessage() for r in caplog.records if sid in r.getMessage()]
    assert any("sandboxnb gc --runtime modal --delete" in m for m in loud), loud
    assert await modal_provider.reap() == [sid]  # what gc does
    assert modal_copies(memu, sid) == (1, 0)


async def test_modal_list_is_retried(memu, modal_provider):
    spec = modal_provider.launch_spec(modal_provider.check(None))
    await modal_provider.create(spec)
    memu.faults.add("SandboxList", "RESOURCE_EXHAUSTED", times=2)
    memu.faults.add("SandboxListV2", "RESOURCE_EXHAUSTED", times=2)
    assert await modal_provider.reap() == [spec.sandbox_id]
    assert memu.faults.injected == 2


def test_fault_rules_from_the_environment(monkeypatch):
    monkeypatch.setenv("SANDBOXNB_EMULATOR_FAULTS",
                       "SandboxCreateV2=UNAVAILABLE:times=2; POST /sandbox=429:retry_after=1.5,"
                       "every=3,times=inf")
    plan = FaultPlan.from_env()
    first, second = plan.rules
    assert (first.target, first.error, first.times) == ("SandboxCreateV2", "UNAVAILABLE", 2)
    assert (second.target, second.error, second.times, second.every, second.retry_after) == (
        "POST /sandbox", "429", None, 3, 1.5)
    assert [plan.take("POST /sandbox") is not None for _ in range(6)] == [False, False, True] * 2
    with pytest.raises(ValueError, match="unknown key 'tims'"):
        FaultPlan.parse("SandboxCreateV2=UNAVAILABLE:tims=2")
    with pytest.raises(ValueError, match="expected TARGET=ERROR"):
        FaultPlan.parse("SandboxCreateV2")
    with ModalEmulator() as emu:
        assert [r.target for r in emu.faults.rules] == ["SandboxCreateV2", "POST /sandbox"]


# ---- Daytona ------------------------------------------------------------------------------------
class FastDaytona(DaytonaProvider):
    retry_policy = FAST


@pytest.fixture
async def demu():
    async with DaytonaEmulator() as emulator:
        yield emulator
        assert emulator.unknown_routes == [], emulator.unknown_routes
    assert emulator.live_sandboxes() == []


@pytest.fixture
async def daytona_provider(demu):
    prov = FastDaytona()
    yield prov
    await prov.aclose()


def daytona_copies(emu: DaytonaEmulator, sandbox_id: str) -> tuple[int, int]:
    """(sandboxes the API made named ``sandbox_id``, how many of them still run)."""
    made = [s for s in [*emu.sandboxes.values(), *emu.deleted] if s.name == sandbox_id]
    return len(made), sum(1 for s in made if s.isolated is not None and s.isolated.alive)


def posts(emu: DaytonaEmulator) -> int:
    return emu.requests.count(("POST", "/sandbox"))


async def test_daytona_rate_limit_honours_retry_after(demu, daytona_provider):
    rule = demu.faults.add("POST /sandbox", 429, times=1, retry_after=1.0,
                           message="Too many requests, slow down")
    started = time.monotonic()
    async with daytona_provider.sandbox() as endpoint:
        waited = time.monotonic() - started
        assert daytona_copies(demu, endpoint.sandbox_id) == (1, 1)
    assert rule.injected == 1 and posts(demu) == 2
    assert waited >= 1.0  # the Retry-After, not the 0.05 s backoff
    stats = daytona_provider.retry_stats
    assert (stats.retries, stats.lookups) == (1, 0)


async def test_daytona_retry_after_is_capped_by_the_startup_deadline(demu, daytona_provider):
    demu.faults.add("POST /sandbox", 429, times=1, retry_after=3600)
    started = time.monotonic()
    with pytest.raises(ProviderError, match=r"Too Many Requests|429"):
        async with daytona_provider.sandbox(config_from_flat(startup_timeout_s=20)):
            pass
    assert time.monotonic() - started < 20  # gave up at once instead of sleeping past it
    assert posts(demu) == 1 and daytona_provider.retry_stats.given_up == 1


async def test_daytona_cancel_while_waiting_to_retry_creates_nothing_more(demu, daytona_provider):
    demu.faults.add("POST /sandbox", 429, times=1, retry_after=30)
    task = asyncio.create_task(daytona_provider.sandbox().__aenter__())
    await wait_until_async(lambda: daytona_provider.retry_stats.retries == 1, 30,
                           "the create to wait on its Retry-After")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert posts(demu) == 1 and not demu.sandboxes  # the pending retry died with the rollout


async def test_daytona_5xx_is_retried_after_a_lookup(demu, daytona_provider):
    rule = demu.faults.add("POST /sandbox", 503, times=2)
    async with daytona_provider.sandbox() as endpoint:
        assert daytona_copies(demu, endpoint.sandbox_id) == (1, 1)
    assert rule.injected == 2 and posts(demu) == 3
    stats = daytona_provider.retry_stats
    assert (stats.retries, stats.lookups, stats.adopted) == (2, 2, 0)


async def test_daytona_uncertain_create_is_adopted(demu, daytona_provider):
    # the create happens, the connection drops before the answer: the sandbox exists
    rule = demu.faults.add("POST /sandbox", "reset", times=1)
    async with daytona_provider.sandbox() as endpoint:
        assert daytona_copies(demu, endpoint.sandbox_id) == (1, 1)  # exactly one, adopted
        async with await sandboxnb.connect(endpoint) as sb:
            assert (await sb.exec("echo adopted")).stdout == "adopted\n"
    assert rule.injected == 1 and posts(demu) == 1
    assert daytona_copies(demu, endpoint.sandbox_id) == (1, 0)
    stats = daytona_provider.retry_stats
    assert (stats.lookups, stats.adopted, stats.duplicates_removed) == (1, 1, 0)


async def test_daytona_permanent_error_fails_at_once(demu, daytona_provider):
    demu.faults.add("POST /sandbox", 400, times=1,
                    message="Invalid image: 'nope:latest' does not exist")
    with pytest.raises(ProviderError, match="Invalid image: 'nope:latest' does not exist"):
        async with daytona_provider.sandbox():
            pass
    assert posts(demu) == 1 and not demu.sandboxes
    assert daytona_provider.retry_stats.retries == 0


async def test_daytona_destroy_is_retried(demu, daytona_provider):
    rule = demu.faults.add("DELETE /sandbox/{id}", 502, times=2)
    async with daytona_provider.sandbox() as endpoint:
        sid = endpoint.sandbox_id
    assert rule.injected == 2
    assert daytona_copies(demu, sid) == (1, 0) and not demu.sandboxes


# ---- a whole run through the CLI, faults on a fraction of creates -------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_cli_run_completes_every_rollout_with_faults_injected(memu, tmp_path):
    refused = memu.faults.add("SandboxCreateV2", "RESOURCE_EXHAUSTED", times=6, every=3)
    reset = memu.faults.add("SandboxCreateV2", "reset", times=2, every=4)
    unavailable = memu.faults.add("SandboxCreateV2", "UNAVAILABLE", times=2, every=5)
    out = tmp_path / "rows.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
        "--tasks", "HumanEval/1?", "--repeats", "2", "--runtime", "modal",
        "--max-concurrent", "4", "--no-progress", "-o", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 540)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and {r["status"] for r in rows} == {"ok"}, rows[:2]
    ids = {r["sandbox_id"] for r in rows}
    per_id = Counter(r.tags[ID_TAG] for r in memu.creates)
    injected = refused.injected + reset.injected + unavailable.injected
    creates = memu.rpc_calls["SandboxCreateV2"]
    # a reset the SDK repeats itself leaves a copy, which the sweep terminates
    swept = sum(n - 1 for n in per_id.values())
    report = {"rollouts": len(rows), "faults injected": injected,
              "create calls beyond one per rollout (retried)": creates - len(rows),
              "copies made by the SDK's own repeat, swept": swept,
              "leaked": len(memu.live_sandboxes())}
    print(report)
    assert set(per_id) == ids  # every sandbox made belongs to a rollout
    assert refused.injected == 6 and reset.injected == 2 and unavailable.injected == 2
    assert creates - len(rows) == injected  # each fault cost exactly one more call
    assert swept <= reset.injected
    await wait_until_async(lambda: memu.live_sandboxes() == [], 30, "every sandbox to be gone")


# ---- Docker: a real engine ----------------------------------------------------------------------
class FastDocker(DockerProvider):
    retry_policy = FAST


def docker_containers(sandbox_id: str) -> list[str]:
    import docker

    with contextlib.closing(docker.from_env()) as client:
        return [c.id for c in client.containers.list(
            all=True, filters={"label": f"{ID_TAG}={sandbox_id}"})]


@pytest.mark.docker
async def test_docker_create_whose_answer_was_lost_leaves_one_container():
    if not DockerProvider.availability().available:
        pytest.fail(f"Docker unavailable: {DockerProvider.availability().reason}")
    prov = FastDocker()
    try:
        spec = prov.launch_spec(prov.check(None))
        first = await prov.create(spec)  # the attempt whose answer never came back
        # the repeat meets 409 (the name is taken): uncertain, so the container is looked up
        # and, as Docker cannot tell whether it was started, replaced by a fresh one
        box = await retry.create(prov, spec, None)
        assert docker_containers(spec.sandbox_id) == [box.cid] != [first.cid]
        stats = prov.retry_stats
        assert (stats.faults, stats.lookups, stats.adopted) == (1, 1, 0)
        await prov.destroy(box)
        await wait_until_async(lambda: docker_containers(spec.sandbox_id) == [], 30,
                               "the container to be removed")
    finally:
        await prov.aclose()



def test_retry_after_header_forms():
    from email.utils import formatdate

    assert retry.retry_after_s({"Retry-After": "2"}) == 2.0
    assert retry.retry_after_s({"retry-after": "0.5"}) == 0.5
    in_a_minute = retry.retry_after_s({"Retry-After": formatdate(time.time() + 60, usegmt=True)})
    assert in_a_minute is not None and 50 < in_a_minute <= 60
    assert retry.retry_after_s({"Retry-After": formatdate(time.time() - 60, usegmt=True)}) == 0
    assert retry.retry_after_s({"Retry-After": "soon"}) is None
    assert retry.retry_after_s({"Retry-After": "inf"}) is None
    assert retry.retry_after_s({}) is None and retry.retry_after_s(None) is None
