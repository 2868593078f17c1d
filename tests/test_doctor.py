"""``sandboxnb doctor``: live checks against a provider, each failure with its fix."""

from __future__ import annotations

import pytest

from sandboxnb.doctor import doctor
from sandboxnb.errors import ConfigError

from .shell_provider import ShellProvider


async def test_local_provider_is_healthy():
    report = await doctor("local")
    assert report.ok, report.text()
    names = [check.name for check in report.checks]
    assert names[:2] == ["installed and configured", "create and handshake"]
    assert {"exec", "files", "limits reach the server", "teardown", "memory limit holds"} <= set(
        names)
    assert len(report.acquire_s) == 3 and all(s > 0 for s in report.acquire_s)
    assert "local is healthy" in report.text()


async def test_a_provider_whose_server_never_starts_fails_with_the_reason():
    report = await doctor(ShellProvider(template="echo cannot start >&2; exit 3"))
    assert not report.ok
    failed = [check for check in report.checks if not check.ok]
    assert failed[0].name == "create and handshake"
    assert "exited with code 3" in failed[0].detail and failed[0].fix
    assert "NOT healthy" in report.text()


async def test_an_unknown_provider_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="not a known provider"):
        await doctor("nonesuch")


def test_the_cli_prints_the_report_and_exits_nonzero_on_failure(tmp_path):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "sandboxnb", "doctor", "local"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "local is healthy" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "sandboxnb", "doctor", "local", "--gpu", "H100"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "local does not support resources.gpu" in bad.stdout + bad.stderr
