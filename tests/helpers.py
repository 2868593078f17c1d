"""What the tests share: processes (trees, liveness, command lines; on psutil) and one polling
helper, :func:`wait_until` (async tests use :func:`wait_until_async`, the public conformance
suite's own, which sleeps on their event loop)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import psutil

from sandboxnb.testing.conformance import wait_until as wait_until_async

__all__ = [
    "SERVER_MARKERS",
    "alive",
    "argv",
    "cmdline",
    "descendants",
    "live_sandbox_servers",
    "pid_alive",
    "processes_with",
    "sandbox_server_pids",
    "wait_until",
    "wait_until_async",
    "written",
]

T = TypeVar("T")

#: What the command line of a sandboxnb server (local, emulated or shipped) contains.
SERVER_MARKERS = ("sandboxnb.server", "sandboxnb/server")



# ---- polling -----------------------------------------------------------------------------------
def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail with an
    :class:`AssertionError` naming ``what`` (and the last value) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


def written(path: Path) -> str:
    """The text of ``path`` once something other than blanks is in it, else ``""`` (a predicate
    for :func:`wait_until`: a file another process writes)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    return text if text.strip() else ""


# ---- processes -------------------------------------------------------------------------------
def descendants(root: int) -> set[int]:
    """Pids of every process below ``root`` (children, grandchildren, ...)."""
    try:
        return {proc.pid for proc in psutil.Process(root).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def argv(pid: int) -> list[str]:
    """The arguments ``pid`` runs with (``[]`` if gone, a zombie or unreadable)."""
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return []


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces (``""`` if gone or unreadable)."""
    return " ".join(argv(pid))


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` that still run."""
    return {pid for pid in pids if pid_alive(pid)}


def processes_with(text: str, among: Iterable[int] | None = None) -> set[int]:
    """Pids whose command line contains ``text``: among ``among``, or every process."""
    pids = psutil.pids() if among is None else among
    return {pid for pid in pids if text in cmdline(pid)}


def sandbox_server_pids() -> set[int]:
    """Pids of sandboxnb servers (local, emulated or shipped) started by this test process."""
    found = set()
    for pid in descendants(os.getpid()):
        line = cmdline(pid)
        if any(marker in line for marker in SERVER_MARKERS) and "pytest" not in line:
            found.add(pid)
    return found


def live_sandbox_servers() -> set[int]:
    """Sandbox servers started by this test process that are still running (not zombies)."""
    return alive(sandbox_server_pids())
