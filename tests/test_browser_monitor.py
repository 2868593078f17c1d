"""The run monitor in JupyterLab in a real headless Chromium: notebooks/failures.ipynb runs an
agent that fails on odd tasks; the monitor shows the failures (red count, latest errors, a bar
that is not green), a clicked error row opens its rollout, and screenshots of the monitor in the
light and the dark theme land in artifacts/screenshots/. Needs /usr/bin/chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    _reap_browser_children,
    _set_subreaper,
    _wait_kernels_idle,
)
from tests.test_browser import jupyterlab as _jupyterlab_fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"


jupyterlab = _jupyterlab_fixture  # JupyterLab serving a folder; the notebook is copied in


def test_monitor_shows_failures_in_light_and_dark_theme(jupyterlab, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser`")
    from playwright.sync_api import expect, sync_playwright

    base, _server = jupyterlab
    work = Path(tmp_path / "work")
    shutil.copy(ROOT / "notebooks" / "failures.ipynb", work / "failures.ipynb")
    SHOTS.mkdir(parents=True, exist_ok=True)
    _set_subreaper(True)
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1300, "height": 2000},
            )
            try:
                page = context.new_page()
                page.set_default_timeout(90_000)
                _open_and_run_all(page, base)
                monitor = page.locator(".sandboxnb-monitor").first
                monitor.wait_for()
                compact = monitor.locator(".sandboxnb-compact").first
                expect(compact).to_contain_text("error 6", timeout=180_000)  # the run ended
                expect(compact.locator(".sandboxnb-status-error").first).to_be_visible()
                _dismiss_news(page)
                monitor.scroll_into_view_if_needed()
                monitor.screenshot(path=str(SHOTS / "monitor-compact-light.png"))
                monitor.locator("button", has_text="details").click()
                count = monitor.locator(".sandboxnb-count-error").first
                expect(count).to_contain_text("error 6")
                red = count.locator("span").first.evaluate("e => getComputedStyle(e).color")
                assert _is_red(red), red
                bar = monitor.locator(".progress-bar").first
                classes = bar.get_attribute("class") or ""
                assert "danger" in classes and "success" not in classes, classes
                rows = monitor.locator(".sandboxnb-run-row")
                expect(rows.first).to_contain_text("ConnectionError")
                rows.first.locator(".sandboxnb-open").click()
                detail = monitor.locator(".sandboxnb-detail").first
                expect(detail).to_contain_text("traceback")
                expect(detail).to_contain_text("in call_model")
                expect(detail).to_contain_text("thinking about task-")
                monitor.screenshot(path=str(SHOTS / "monitor-failures-light.png"))
                light_bg = _background(page)
                _switch_theme(page, "JupyterLab Dark")
                wait_until(lambda: _background(page) != light_bg, 30, "the dark theme")
                monitor.scroll_into_view_if_needed()
                monitor.screenshot(path=str(SHOTS / "monitor-failures-dark.png"))
                text = count.locator("span").first.evaluate("e => getComputedStyle(e).color")
                assert _is_red(text), text  # still red on the dark background
                _switch_theme(page, "JupyterLab Light")
                _wait_kernels_idle(base)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(SHOTS / "monitor-failure.png"), full_page=True)
                raise
            finally:
                context.close()
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    for name in ("monitor-compact-light.png", "monitor-failures-light.png",
                 "monitor-failures-dark.png"):
        assert (SHOTS / name).stat().st_size > 2_000, name


def _open_and_run_all(page, base: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):  # a loaded machine can fail a fetch (the page, or its theme's CSS)
        page.goto(f"{base}/lab/tree/failures.ipynb")
        try:
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            wait_until(lambda: _background(page), 20, "the theme's stylesheet", interval=0.2)
            break
        except (PlaywrightTimeout, AssertionError):
            if attempt == 2:
                raise
    with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" shows on first open
        page.locator(".jp-Dialog button", has_text="Select").first.click(timeout=15_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _dismiss_news(page) -> None:
    """Close JupyterLab's "get notified about news?" toast, which would cover the screenshots."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):
        page.locator(".jp-toast-button", has_text="No").first.click(timeout=5_000)


def _switch_theme(page, theme: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
    page.locator(".lm-Menu-itemLabel", has_text=theme).first.click()


def _background(page) -> str:
    return page.evaluate(
        "getComputedStyle(document.body).getPropertyValue('--jp-layout-color1').trim()")


def _is_red(css: str) -> bool:
    parts = [float(p) for p in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
    r, g, b = parts
    return r > 150 and r > g + 60 and r > b + 60
