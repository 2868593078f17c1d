"""Bad input to `sandboxnb run` fails before any sandbox starts, naming what to fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandboxnb.config import config_from_flat
from sandboxnb.errors import ConfigError


def _run(tmp_path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
         "--journal", str(tmp_path / "j.jsonl"), "--no-progress", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path), **(env or {})},
    )


@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "daytona"], "--runtime 'daytona' is unavailable here: set DAYTONA_API_KEY"),
    (["--output", "/nonexistent/dir/x.csv"], "its folder '/nonexistent/dir' is not writable"),
    (["--cpu", "1e9"], "resources.cpu = '1e9': expected a number >= 0.01 and <= 1024"),
    (["--memory-mb", "1"], "resources.memory_mb = '1': expected an integer >= 4"),
    (["--idle-timeout", "inf"], "limits.idle_timeout_s = 'inf'"),
])
def test_refused_before_anything_starts(tmp_path, args, message):
    result = _run(tmp_path, *args, env={"DAYTONA_API_KEY": ""})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "j.jsonl").exists(), "nothing may run, so nothing is journaled"
    assert not list(tmp_path.glob("sandboxnb-*")), "no sandbox may have started"


@pytest.mark.parametrize("field", ["cpu", "memory_mb", "disk_mb", "idle_timeout_s"])
def test_a_bool_is_not_a_number(field):
    with pytest.raises(ConfigError, match=f"{field} = True: .*not the bool True"):
        config_from_flat(**{field: True})
