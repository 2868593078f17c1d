"""JupyterLab in a real headless Chromium: run notebooks/widgets.ipynb, click Launch, watch the
sandbox's row appear, click Stop, watch it go. Needs /usr/bin/chromium (scripts/setup-browser)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import alive, descendants, sandbox_server_pids, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reap_browser_children() -> None:
    """Kill and reap chromium processes orphaned to us (we are their subreaper)."""

    def none_left() -> bool:
        left = []
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, OSError):
                if "chrom" not in child.name():
                    continue
                left.append(child.pid)
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()
                os.waitpid(child.pid, os.WNOHANG)
        return not left

    with contextlib.suppress(AssertionError):  # best effort, as before: give up after 5 s
        wait_until(none_left, 5, "chromium's orphans to be reaped", interval=0.1)


def _wait_kernels_idle(base: str, timeout: float = 300, stable_s: float = 3) -> None:
    idle_since: list[float] = []

    def idle_long_enough() -> bool:
        kernels = json.loads(_get(f"{base}/api/kernels"))
        if not all(k["execution_state"] == "idle" for k in kernels):
            idle_since.clear()
            return False
        if not idle_since:
            idle_since.append(time.monotonic())
        return time.monotonic() - idle_since[0] >= stable_s

    wait_until(idle_long_enough, timeout,
               f"the notebook to finish running (kernels idle for {stable_s:g} s)", interval=0.25)


def _set_subreaper(on: bool) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _get(url: str, method: str = "GET", timeout: float = 5) -> bytes:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 with an empty token, serving a copy of notebooks/widgets.ipynb."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "widgets.ipynb", work / "widgets.ipynb")
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT),
           "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = (tmp_path / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={work}",
         "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                _get(f"{base}/api/status")
                return True
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError("JupyterLab exited") from None
                return False

        try:
            wait_until(answers, 60, "JupyterLab to answer", interval=0.2)
        except AssertionError:
            raise RuntimeError(
                "JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()
            ) from None
        yield base, proc
    finally:
        try:  # shut kernels down cleanly first: they release their sandboxes at exit
            for kernel in json.loads(_get(f"{base}/api/kernels")):
                _get(f"{base}/api/kernels/{kernel['id']}", method="DELETE", timeout=30)
        except OSError:
            pass
        tree = descendants(proc.pid) | {proc.pid}
        with_servers = tree & sandbox_server_pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()
        assert not alive(with_servers), "sandbox servers outlived the kernel"


def test_launch_and_stop_from_jupyterlab(jupyterlab, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser` (installs Debian's "
                    "chromium); this test never downloads a browser")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    base, server = jupyterlab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    _set_subreaper(True)  # chromium's helpers get reaped here instead of lingering as zombies
    try:
        _drive_browser(base, server, shots, tmp_path, expect, sync_playwright,
                       PlaywrightTimeout)
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    assert sorted(p.name for p in shots.iterdir()) == ["1-launcher.png", "2-running.png",
                                                        "3-stopped.png"]
    keep = ROOT / "test-output" / "browser"
    keep.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, keep / shot.name)


def _drive_browser(base, server, shots, tmp_path, expect, sync_playwright, PlaywrightTimeout):
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            for attempt in range(3):  # a loaded machine can fail the first fetch
                page.goto(f"{base}/lab/tree/widgets.ipynb")
                try:
                    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 2:
                        raise
            select = page.locator(".jp-Dialog button", has_text="Select")
            with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" shows on first open
                select.first.click(timeout=15_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
                timeout=90_000
            )
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            launch = page.locator(".sandboxnb-launch").first
            launch.wait_for(timeout=120_000)
            page.screenshot(path=str(shots / "1-launcher.png"))
            launch.click()
            row = page.locator(".sandboxnb-row").first
            expect(row).to_contain_text("sb1", timeout=90_000)
            expect(row).to_contain_text("running", timeout=90_000)
            expect(row).to_contain_text("local")
            page.screenshot(path=str(shots / "2-running.png"))
            servers = alive(sandbox_server_pids()) & descendants(server.pid)
            assert len(servers) >= 1, "no sandbox server runs under the kernel"

            row.locator(".sandboxnb-stop").click()
            expect(page.locator(".sandboxnb-row")).to_have_count(0, timeout=90_000)
            page.screenshot(path=str(shots / "3-stopped.png"))
            wait_until(lambda: not alive(servers), 10,
                       "the stopped sandbox's server to exit", interval=0.1)
            _wait_kernels_idle(base)  # the notebook's remaining cells (a run) finish cleanly
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shots / "failure.png"), full_page=True)
                keep = ROOT / "test-output" / "browser"
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(shots / "failure.png", keep / "failure.png")
            raise
        finally:
            context.close()


# ---- the launcher as a new user meets it --------------------------------------------------------
LAUNCHER_NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import sandboxnb\n%load_ext sandboxnb"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "sandboxnb.launcher(provider=\"local\")"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": ""},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_launcher_adapts_to_the_provider_and_publishes_the_sandbox(jupyterlab, tmp_path):
    """Fields local does not honour are disabled with the reason (and enabled for a provider
    that honours them); Launch puts the sandbox in the notebook under its name, says how to use
    it, and the table has headers and ages that move; screenshots in the light and dark theme
    go to artifacts/screenshots/."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser`")
    from playwright.sync_api import expect, sync_playwright

    base, _server = jupyterlab
    work = tmp_path / "work"  # what the fixture serves
    (work / "launcher.ipynb").write_text(json.dumps(LAUNCHER_NOTEBOOK))
    shots = ROOT / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    _set_subreaper(True)
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile-launcher"), executable_path=CHROMIUM,
                headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
            try:
                page = context.new_page()
                page.set_default_timeout(60_000)
                _open_and_run_all(page, base, "launcher.ipynb")
                launcher = page.locator(".sandboxnb-launcher").first
                launcher.wait_for(timeout=120_000)
                disk = page.locator(".sandboxnb-field-disk_mb")
                expect(disk.locator("input")).to_be_disabled()
                expect(disk).to_contain_text("local does not support resources.disk_mb")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_disabled()
                expect(page.locator(".sandboxnb-field-memory_mb input")).to_be_enabled()
                _choose(launcher.locator("select").first, "modal")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_enabled()
                expect(page.locator(".sandboxnb-field-image input")).to_be_enabled()
                expect(disk.locator("input")).to_be_disabled()
                _choose(launcher.locator("select").first, "local")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_disabled()
                launcher.locator("input").first.fill("box")  # the name field
                page.locator(".sandboxnb-launch").first.click()
                status = page.locator(".sandboxnb-status").first
                expect(status).to_contain_text('await box.exec("ls")', timeout=90_000)
                expect(status).to_contain_text("%%sandbox box")
                expect(page.locator(".sandboxnb-header")).to_contain_text("age")
                row = page.locator(".sandboxnb-row-box")
                expect(row).to_contain_text("running")
                first = row.inner_text()  # only the age changes in a running row
                wait_until(lambda: row.inner_text() != first, 30,
                           f"the age to move on by itself (row: {first!r})", interval=0.2)
                launcher.screenshot(path=str(shots / "launcher-light.png"))
                # the sandbox is in the namespace under its name
                cell = page.locator(".jp-Cell").nth(2)  # the empty third cell
                cell.locator(".cm-content").click()
                page.keyboard.type("print((await box.exec('echo from-box')).stdout)")
                page.keyboard.press("Shift+Enter")
                expect(cell.locator(".jp-OutputArea")).to_contain_text("from-box",
                                                                        timeout=60_000)
                _dark_theme(page)
                launcher.screenshot(path=str(shots / "launcher-dark.png"))
                row.locator(".sandboxnb-stop").click()
                expect(page.locator(".sandboxnb-row")).to_have_count(0, timeout=90_000)
            finally:
                context.close()
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    assert {"launcher-light.png", "launcher-dark.png"} <= {p.name for p in shots.iterdir()}


def _open_and_run_all(page, base: str, notebook: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):  # a loaded machine can fail the first fetch
        page.goto(f"{base}/lab/tree/{notebook}")
        try:
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" shows on first open
        page.locator(".jp-Dialog button", has_text="Select").first.click(timeout=15_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _choose(select, provider: str) -> None:
    """Pick ``provider`` in the dropdown (labelled ``modal (unavailable)`` where it is)."""
    labels = select.locator("option").all_text_contents()
    (label,) = [t for t in labels if t.replace("\xa0", " ").split(" ")[0] == provider]
    select.select_option(label=label)


def _dark_theme(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
    page.locator(".lm-Menu-itemLabel", has_text="JupyterLab Dark").first.click()
    page.wait_for_function(
        "document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=30_000)
