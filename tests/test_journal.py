"""The journal holds: a torn tail is repaired, never appended to; a line that is not a row is a
clear error naming it; resuming another run's journal is refused. Through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sandboxnb
from sandboxnb.errors import ConfigError
from sandboxnb.journal import read_journal


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                           "oracle", "--runtime", "local", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_tail_is_cut_and_resume_finishes_the_run(tmp_path):
    journal = tmp_path / "j.jsonl"
    first = _cli("--tasks", "HumanEval/[0-3]", "--journal", str(journal))
    assert first.returncode == 0, first.stderr
    lines = journal.read_text().splitlines(keepends=True)
    # a crash while writing the 4th row: half of it reached the disk, no newline
    journal.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    for _ in range(2):  # resuming twice: the second must find a clean, complete journal
        again = _cli("--tasks", "HumanEval/[0-3]", "--journal", str(journal), "--resume")
        assert again.returncode == 0, again.stderr
        assert "4/4 rollouts" in again.stdout, again.stdout
    rows = _rows(journal)  # every line parses: the fragment was cut, not appended to
    assert sorted(row["task_id"] for row in rows) == [f"HumanEval/{i}" for i in range(4)]
    assert len(sandboxnb.load(journal).to_pandas()) == 4


@pytest.mark.parametrize("line", ["[1, 2]", '{"hello": 1}', "not json"])
def test_a_line_that_is_not_a_row_is_named(tmp_path, line):
    journal = tmp_path / "j.jsonl"
    journal.write_text(line + "\n" + json.dumps(
        {"task_id": "HumanEval/0", "repeat": 0, "status": "ok"}) + "\n")
    with pytest.raises(ConfigError, match=r"j\.jsonl:1: not a journal row"):
        read_journal(journal)
    resumed = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--resume")
    assert resumed.returncode == 2 and "j.jsonl:1: not a journal row" in resumed.stderr
    assert "Traceback" not in resumed.stderr


def test_resuming_another_runs_journal_is_refused(tmp_path):
    journal = tmp_path / "j.jsonl"
    assert _cli("--tasks", "HumanEval/1?", "--journal", str(journal)).returncode == 0
    before = journal.read_text()
    other = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--resume")
    assert other.returncode == 2, other.stdout
    assert "belongs to another run" in other.stderr and "'HumanEval/10'" in other.stderr
    more = _cli("--tasks", "HumanEval/1?", "--journal", str(journal), "--resume",
                "--repeats", "1")
    assert more.returncode == 0 and "10/10 rollouts" in more.stdout, more.stdout + more.stderr
    assert journal.read_text() == before  # refused before anything ran or was written
