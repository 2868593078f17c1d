"""kill -9 of `sandboxnb run` mid-flight: within the documented window (sandboxnb/providers/spec.py)
nothing of the run is left, asked of the backend itself (processes, containers in any state,
emulated sandboxes, directories); `--resume` then runs exactly the missing rollouts.

Each run is 200 rollouts (100 HumanEval tasks x 2 repeats) with an agent that holds its sandbox
a moment, so sandboxes are live when the owner dies."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import sandboxnb
from sandboxnb.agents import oracle
from sandboxnb.journal import read_journal

from .helpers import SERVER_MARKERS, alive, argv, descendants, wait_until

TASKS = "HumanEval/?,HumanEval/??"  # HumanEval/0 .. HumanEval/99
REPEATS = 2
PLANNED = 100 * REPEATS
HOLD_S = 0.3


async def sleepy_oracle(sandbox, task) -> str:
    """The oracle, after holding the sandbox a moment (so a run is mid-flight when killed)."""
    await asyncio.sleep(HOLD_S)
    return await oracle(sandbox, task)


def _command(runtime: str, journal: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
            f"{__name__}:sleepy_oracle", "--runtime", runtime, "--max-concurrent", "8",
            "--tasks", TASKS, "--repeats", str(REPEATS), "--journal", str(journal),
            "--no-progress", *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])  # `tests.` is importable in the run
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": path}


def _rows(journal: Path) -> int:
    try:
        return len(read_journal(journal))
    except (FileNotFoundError, ValueError):
        return 0


def _kill_mid_flight(runtime: str, tmp_path: Path,
                     live: Callable[[int], int]) -> tuple[int, int]:
    """Start the run; once the journal holds rows and the backend says sandboxes are live
    (``live(pid of the run)``), kill -9 it. Returns (its pid, rows it journaled)."""
    journal = tmp_path / "j.jsonl"
    proc = subprocess.Popen(_command(runtime, journal), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or (_rows(journal) >= 8 and live(proc.pid) >= 4),
                   180, "8 journaled rows and 4 live sandboxes")
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        proc.stderr.close()
    return proc.pid, _rows(journal)


def _resume_completes_the_plan(runtime: str, tmp_path: Path, before: int) -> None:
    journal = tmp_path / "j.jsonl"
    done = subprocess.run(_command(runtime, journal, "--resume"), env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = sandboxnb.load(journal).to_pandas()
    assert len(frame) == PLANNED, (len(frame), before)
    assert not frame.duplicated(["task_id", "repeat"]).any()
    assert set(frame["repeat"]) == set(range(REPEATS))
    assert frame["task_id"].nunique() == PLANNED // REPEATS
    resumed = frame.iloc[before:]  # the resumed run appended exactly the missing ones
    bad = resumed[resumed["status"] != "ok"]
    assert len(resumed) == PLANNED - before and bad.empty, \
        (collections.Counter(resumed["status"]), bad[["sandbox_id", "error"]].values.tolist())


_EARLIER: set[int] = set()  # servers an earlier test left behind (its own failure)


@pytest.fixture(autouse=True)
def _earlier_servers() -> None:
    _EARLIER.clear()
    _EARLIER.update(live_sandbox_servers())


def live_sandbox_servers() -> set[int]:
    """Sandbox servers below this test process (a killed run's are re-parented to it) that
    this test started."""
    return alive(pid for pid in descendants(os.getpid())
                 if pid not in _EARLIER and "--sandbox-id" in (args := argv(pid))
                 and any(m in part for part in args for m in SERVER_MARKERS))


def _servers_gone_within(seconds: float, what: str) -> None:
    try:
        wait_until(lambda: not live_sandbox_servers(), seconds, what, interval=0.2)
    except AssertionError as err:
        left = {pid: " ".join(argv(pid))[:200] for pid in live_sandbox_servers()}
        raise AssertionError(f"{err}; still running: {left}") from None


def test_local_owner_death(tmp_path):
    _, before = _kill_mid_flight("local", tmp_path, lambda _: len(live_sandbox_servers()))
    # documented: ~1 s (a jailed server dies with its owner; an unjailed one polls its parent
    # every second). A jailed server that bubblewrap's --die-with-parent misses (seen when this
    # test runs after tests/test_server_package.py) ends by the dead-man switch: 15 s.
    _servers_gone_within(25, "local servers to exit after their owner died")
    _resume_completes_the_plan("local", tmp_path, before)
    # what the killed owner left is swept when the next local sandbox starts
    assert not list(tmp_path.glob("sandboxnb-local-*"))


def _containers(pid: int) -> list[dict]:
    import docker

    client = docker.from_env()
    try:
        return client.api.containers(all=True, filters={"label": f"sandboxnb.pid={pid}"})
    finally:
        client.close()


def _reapers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("docker_reaper.py" in part for part in p.info["cmdline"] or [])]


@pytest.mark.docker
def test_docker_owner_death(tmp_path):
    reapers_before = {p.pid for p in _reapers()}
    pid, before = _kill_mid_flight(
        "docker", tmp_path, lambda pid: sum(c["State"] == "running" for c in _containers(pid)))
    # documented: ~1-3 s (the reaper), containers in every state, created ones included
    wait_until(lambda: _containers(pid) == [], 15, "the run's containers (any state) to go")
    wait_until(lambda: not ({p.pid for p in _reapers()} - reapers_before), 90,
               "the reaper to finish")
    _resume_completes_the_plan("docker", tmp_path, before)
    assert _containers(pid) == []


def _modal_state(emu, since: float) -> str:
    """For a failure message: each live sandbox's age and its server's output."""
    out = []
    for sid in emu.live_sandboxes():
        sb = emu.servicer.sandboxes[sid]
        logs = b"".join(p.read_bytes() for p in sb._root.rglob(".modal-entrypoint.std*"))
        out.append(f"{sid} created {time.time() - sb.record.created_at:.1f}s ago: {logs[-300:]}")
    return f"{time.monotonic() - since:.1f}s after the kill: " + "; ".join(out)


@pytest.fixture
def modal_emu() -> Iterator:
    from sandboxnb.testing.modal_emulator import ModalEmulator

    with ModalEmulator() as emu:
        yield emu


def test_modal_owner_death(tmp_path, modal_emu):
    _, before = _kill_mid_flight("modal", tmp_path, lambda _: len(modal_emu.live_sandboxes()))
    # documented: 15 s after the last client (connected or not), then Modal ends the sandbox
    killed = time.monotonic()
    try:
        wait_until(lambda: not modal_emu.live_sandboxes(), 40,
                   "Modal sandboxes to end after their owner died", interval=0.2)
    except AssertionError as err:
        raise AssertionError(f"{err}: {_modal_state(modal_emu, killed)}") from None
    assert modal_emu.live_processes() == []
    assert {rec.end_reason for rec in modal_emu.creates} <= {"exited", "terminated"}
    _servers_gone_within(5, "the emulated sandboxes' servers to be gone")
    _resume_completes_the_plan("modal", tmp_path, before)


MINUTE_S = 20.0  # one emulated Daytona minute (the provider's keepalive is every 15 s)


@pytest.fixture
def daytona_emu() -> Iterator:
    from sandboxnb.testing.daytona_emulator import DaytonaEmulator

    with DaytonaEmulator(minute_s=MINUTE_S) as emu:
        yield emu


def test_daytona_owner_death(tmp_path, daytona_emu):
    emu = daytona_emu
    _, before = _kill_mid_flight("daytona", tmp_path, lambda _: len(emu.live_sandboxes()))
    # documented: the servers exit 15 s after their last client; the sandboxes stop at
    # auto-stop (1 minute after the last SDK call) and, being ephemeral, are deleted at once
    _servers_gone_within(30, "the servers in Daytona sandboxes to exit")
    wait_until(lambda: not emu.sandboxes and not emu.live_sandboxes(), MINUTE_S + 30,
               "Daytona sandboxes to be stopped and deleted", interval=0.2)
    assert all(sb.state == "destroyed" for sb in emu.deleted)
    _resume_completes_the_plan("daytona", tmp_path, before)
    assert emu.live_sandboxes() == [] and not emu.sandboxes


def test_server_whose_owner_dies_removes_its_host_directory(tmp_path):
    """The local cause: a server's host directory outlived a killed owner."""
    box = tmp_path / "sandboxnb-local-x"
    (box / "work").mkdir(parents=True)
    server = [sys.executable, "-m", "sandboxnb.server", "--port", "0", "--sandbox-id", "x",
              "--workdir", str(box / "work"), "--remove-dir", str(box)]
    owner = subprocess.Popen(  # the owner starts the server with itself as --owner-pid
        [sys.executable, "-c", "import os, subprocess, sys; subprocess.Popen(sys.argv[1:] + "
         "['--owner-pid', str(os.getpid())]); sys.stdin.read()", *server],
        stdin=subprocess.PIPE, env={**_env(tmp_path), "SANDBOXNB_TOKEN": "t"})
    try:
        wait_until(lambda: descendants(owner.pid) & live_sandbox_servers(), 30,
                   "the server to start")
        owner.send_signal(signal.SIGKILL)
    finally:
        owner.kill()
        owner.wait(30)
        owner.stdin.close()
    _servers_gone_within(10, "the server to exit after its owner died")
    wait_until(lambda: not box.exists(), 10, "the host directory to be removed")
