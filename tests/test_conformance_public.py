"""The public conformance suite as a provider author uses it: one import, one pytest option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_third_party_provider_runs_the_suite_with_one_import_and_one_option(tmp_path):
    """What a provider author does: one import in a test file, one pytest option."""

    (tmp_path / "test_mine.py").write_text(
        "from sandboxnb.testing.conformance import *  # noqa: F403\n")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
         "--sandboxnb-provider", "tests.shell_provider:ShellProvider",
         "--rootdir", str(tmp_path), "-k", "not rollouts_through_run"],
        cwd=root, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]
