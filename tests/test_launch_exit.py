"""A ``sandboxnb.launch()`` entered and never exited is released when its interpreter exits: a
real process (a plain script, a real kernel) against the Modal emulator and the local provider,
judged by the emulator's own state, the sandbox's directory and its server process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from jupyter_client import KernelManager

from sandboxnb.testing.modal_emulator import ModalEmulator
from tests.helpers import processes_with, wait_until

ROOT = Path(__file__).resolve().parents[1]

#: Enters a launch on a loop of its own and exits the interpreter without exiting it.
NEVER_EXITED = textwrap.dedent("""
    import asyncio, sys
    import sandboxnb
    loop = asyncio.new_event_loop()
    sb = loop.run_until_complete(sandboxnb.launch(sys.argv[1]).__aenter__())
    print(sb.id, flush=True)
""")


def _script(provider: str, env: dict[str, str]) -> tuple[str, float, str]:
    """Run the script; (the sandbox id, seconds until the process ended, its stderr)."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", NEVER_EXITED, provider], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1], took, done.stderr


def _quiet(stderr: str) -> None:
    """Released in order: no task torn down mid-flight, no traceback."""
    assert "Traceback" not in stderr and "was destroyed" not in stderr, stderr


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def emu():
    with ModalEmulator() as emulator:
        yield emulator
        assert emulator.live_sandboxes() == []
    assert emulator.live_processes() == []


def _ended_by_us(emu: ModalEmulator) -> list[str | None]:
    return [record.end_reason for record in emu.creates]


def test_exit_releases_a_never_exited_modal_launch(emu):
    sandbox_id, took, stderr = _script("modal", _env(**emu.env()))
    assert sandbox_id.startswith("modal-")
    assert emu.live_sandboxes() == []  # released before the process ended, not by a timeout
    assert _ended_by_us(emu) == ["terminated"]
    assert took < 60
    _quiet(stderr)


def test_exit_releases_a_never_exited_local_launch():
    sandbox_id, _took, stderr = _script("local", _env())
    assert not Path(tempfile.gettempdir(), f"sandboxnb-{sandbox_id}").exists()
    assert not processes_with(sandbox_id)
    _quiet(stderr)


@contextlib.contextmanager
def _kernel(env: dict[str, str]):
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


@pytest.mark.slow
@pytest.mark.parametrize("extension", [False, True], ids=["plain-kernel", "with-extension"])
def test_kernel_shutdown_releases_a_never_exited_launch(emu, extension):
    """A notebook cell enters ``launch('modal')`` (and a local one) and never exits them; the
    kernel's shutdown releases both (the kernel shutdown hook with the extension loaded, the
    exit hook without it)."""
    with _kernel(_env(**emu.env())) as (km, kc):
        code = ("%load_ext sandboxnb\n" if extension else "") + (
            "import sandboxnb\n"
            "held = [await sandboxnb.launch(p).__aenter__() for p in ('modal', 'local')]\n"
            "print(*[sb.id for sb in held])")
        out: list[str] = []
        reply = kc.execute_interactive(
            code, timeout=120,
            output_hook=lambda msg: out.append(msg["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", out
        modal_id, local_id = "".join(out).split()
        assert modal_id.startswith("modal-")
        assert len(emu.live_sandboxes()) == 1 and processes_with(local_id)
        km.shutdown_kernel(now=False)
    wait_until(lambda: not emu.live_sandboxes(), 30, "the Modal sandbox to be released")
    assert _ended_by_us(emu) == ["terminated"]
    assert not processes_with(local_id)
    assert not Path(tempfile.gettempdir(), f"sandboxnb-{local_id}").exists()
