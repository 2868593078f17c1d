"""Ctrl-C (pressed again and again) and SIGTERM on `sandboxnb run`: every sandbox is released
before the process exits, whatever the backend; rows finished so far stay in the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import wait_until


def _start_run(tmp_path: Path, runtime: str) -> tuple[subprocess.Popen[str], Path]:
    journal = tmp_path / "j.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
         "--runtime", runtime, "--max-concurrent", "6", "--journal", str(journal),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    return proc, journal


def _rows(journal: Path) -> list[dict]:
    try:
        lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        return [line for line in lines if "task_id" in line]  # rows, not the header
    except FileNotFoundError:
        return []


def _interrupt(proc: subprocess.Popen[str], journal: Path, signals: list[int]) -> str:
    wait_until(lambda: len(_rows(journal)) >= 2 or proc.poll() is not None, 120,
               "the run finished two rollouts")
    assert proc.poll() is None, proc.communicate()
    for sig in signals:  # a user hammering Ctrl-C
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


def test_ctrl_c_three_times_releases_every_local_sandbox(tmp_path):
    proc, journal = _start_run(tmp_path, "local")
    err = _interrupt(proc, journal, [signal.SIGINT] * 3)  # pending ones may merge into one
    assert "sandboxes released" in err
    assert not list(tmp_path.glob("sandboxnb-local-*")), "a sandbox directory was left behind"
    rows = _rows(journal)
    assert len(rows) >= 2 and all(row["status"] in ("ok", "cancelled") for row in rows)


@pytest.mark.docker
def test_ctrl_c_three_times_and_sigterm_release_every_container(tmp_path):
    import docker

    proc, journal = _start_run(tmp_path, "docker")
    err = _interrupt(proc, journal, [signal.SIGINT, signal.SIGTERM])  # two distinct signals
    assert "still releasing" in err and "sandboxes released" in err
    client = docker.from_env()
    try:
        left = client.api.containers(all=True, filters={"label": f"sandboxnb.pid={proc.pid}"})
    finally:
        client.close()
    assert left == [], [c["Labels"].get("sandboxnb.sandbox_id") for c in left]
