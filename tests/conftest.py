"""Suite-wide guards: every test must leave no sandbox process or container behind."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time

import pytest

SERVER_MARKERS = ("sandboxnb.server", "sandboxnb/server")
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


def descendants(root: int) -> set[int]:
    """Pids of every process below ``root`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def sandbox_server_pids() -> set[int]:
    """Pids of sandboxnb servers (local, emulated or shipped) started by this test process."""
    pids = set()
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in SERVER_MARKERS) and "pytest" not in cmdline:
            pids.add(pid)
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped, counts as gone)."""
    return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if pid_alive(pid)}


def live_sandbox_servers() -> set[int]:
    """Sandbox servers started by this test process that are still running (not zombies)."""
    return _alive(sandbox_server_pids())


@pytest.fixture(autouse=True)
def no_leaked_sandboxes(request):
    """Fail the test if it leaves a sandbox server process or a labelled container running."""
    check_docker = request.node.get_closest_marker("docker") is not None
    before = sandbox_server_pids()
    containers_before = sandbox_containers() if check_docker else set()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = _alive(sandbox_server_pids() - before)
        leaked_containers = (sandbox_containers() - containers_before) if check_docker else set()
        if not leaked and not leaked_containers:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
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
