"""Suite-wide guards: every test must leave no sandbox process or container behind.

The helpers the tests share (process trees and liveness, polling) are in :mod:`tests.helpers`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from tests.helpers import alive, sandbox_server_pids, wait_until

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphaned descendants (a double-forked server) are re-parented to this process, so the
    leak scan below still finds them, and another test run on the machine is never mistaken
    for ours."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_become_subreaper()


def sandbox_containers() -> set[str]:
    """Ids of Docker containers (any state) labelled as sandboxnb sandboxes, if an engine is up."""
    if not shutil.which("docker"):
        return set()
    try:
        out = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "label=sandboxnb"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


@pytest.fixture(autouse=True)
def no_leaked_sandboxes(request):
    """Fail the test if it leaves a sandbox server process or a labelled container running."""
    check_docker = request.node.get_closest_marker("docker") is not None
    before = sandbox_server_pids()
    containers_before = sandbox_containers() if check_docker else set()
    yield

    def leaks() -> tuple[set[int], set[str]]:
        containers = (sandbox_containers() - containers_before) if check_docker else set()
        return alive(sandbox_server_pids() - before), containers

    try:
        wait_until(lambda: not any(leaks()), 5.0, "sandbox servers and containers to be gone",
                   interval=0.1)
        return
    except AssertionError:
        leaked, leaked_containers = leaks()
    if not leaked and not leaked_containers:  # gone just now
        return
    for pid in leaked:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    for cid in leaked_containers:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
    pytest.fail(
        f"test leaked sandbox server processes {sorted(leaked)} "
        f"/ containers {sorted(leaked_containers)}"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: needs a running Docker engine (checked for leaks)")
    config.addinivalue_line("markers", "browser: drives a real headless Chromium")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    """Automatic run journals go to the test's own directory, not the working tree."""
    monkeypatch.setenv("SANDBOXNB_RUNS_DIR", str(tmp_path / "runs"))
