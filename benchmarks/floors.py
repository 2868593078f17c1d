"""Honest floors: the base interpreter, outside any virtual environment, started bare.

Every ratio in ``BENCHMARKS.md`` is taken against two floors measured in the same run as the
candidate, interleaved with it (one floor sample, one candidate sample, ...):

- ``python -c pass``: the base interpreter with ``site`` (what a plain Python start costs);
- ``python -S -E -s -c pass``: what our own server pays (it starts with ``-S -E -s``).

Inside a venv, ``python -c pass`` also runs the venv's ``site`` and the editable install's
startup hook (about twice the base figure), so the floor must not be taken there.
:func:`base_python` finds the base interpreter and checks that it really runs outside the venv.

``python benchmarks/floors.py [--n 40]`` prints both floors and what each interpreter the
toolkit starts for its own purposes pays (the server, the HumanEval grader before and after it
started with ``-S -E -s``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["BARE_FLAGS", "Floors", "base_python", "median_ms", "time_argv"]

#: The flags our server (and now the HumanEval grader) starts the interpreter with.
BARE_FLAGS = ("-S", "-E", "-s")


@functools.cache
def base_python() -> str:
    """The base interpreter (``sys._base_executable``), checked to run outside any venv."""
    candidates = [getattr(sys, "_base_executable", ""),
                  os.path.join(sys.base_prefix, "bin", "python3")]
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        probe = subprocess.run(
            [path, "-c", "import sys; print(sys.prefix == sys.base_prefix, sys.prefix)"],
            capture_output=True, text=True, env=_env_without_venv(), check=False)
        if probe.stdout.startswith("True"):
            return path
    raise RuntimeError(f"no base interpreter outside a venv among {candidates}")


def _env_without_venv() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    return env


def time_argv(argv: Sequence[str], *, stdin: bytes | None = None,
              env: dict[str, str] | None = None) -> float:
    """Seconds to run ``argv`` to completion (blocking spawn and wait, output discarded)."""
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env, check=True)
    return time.perf_counter() - start


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


class Floors:
    """Both interpreter floors, sampled one at a time so a benchmark can interleave them with
    its candidate; :meth:`ratios` states a candidate's median against each."""

    NAMES = ("python -c pass", "python -S -E -s -c pass")

    def __init__(self) -> None:
        self.python = base_python()
        self._env = _env_without_venv()
        self.samples: dict[str, list[float]] = {name: [] for name in self.NAMES}

    def sample(self) -> None:
        """Take one sample of each floor."""
        self.samples[self.NAMES[0]].append(
            time_argv([self.python, "-c", "pass"], env=self._env))
        self.samples[self.NAMES[1]].append(
            time_argv([self.python, *BARE_FLAGS, "-c", "pass"], env=self._env))

    def medians_ms(self) -> dict[str, float]:
        return {name: median_ms(values) for name, values in self.samples.items() if values}

    def ratios(self, candidate_ms: float) -> str:
        """``0.91x python -c pass (10.2 ms), 1.50x python -S -E -s -c pass (6.2 ms)``."""
        return ", ".join(f"{candidate_ms / ms:.2f}x {name} ({ms:.1f} ms)"
                         for name, ms in self.medians_ms().items())

    def header(self) -> str:
        return (f"floors: base interpreter {self.python} (outside the venv), "
                f"{len(self.samples[self.NAMES[0]])} samples each: "
                + ", ".join(f"{name} {ms:.2f} ms" for name, ms in self.medians_ms().items()))


def toolkit_interpreters(n: int) -> dict[str, float]:
    """Median ms of each interpreter start the toolkit makes for itself, interleaved with the
    floors: the server (``-S -E -s``), the HumanEval grader's harness before and after."""
    from sandboxnb.tasksets.humaneval import _HARNESS

    venv_python = sys.executable  # what the local provider starts (its ``python``)
    floors = Floors()
    candidates = {
        "venv python -c pass": [venv_python, "-c", "pass"],
        "server: venv python -S -E -s -c pass": [venv_python, *BARE_FLAGS, "-c", "pass"],
        "grader before: venv python -c HARNESS": [venv_python, "-c", _HARNESS],
        "grader now: venv python -S -E -s -c HARNESS": [venv_python, *BARE_FLAGS, "-c",
                                                        _HARNESS],
    }
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(n):
        floors.sample()
        for name, argv in candidates.items():
            samples[name].append(time_argv(argv, stdin=b"pass\n"))
    print(floors.header())
    result = {}
    for name, values in samples.items():
        result[name] = median_ms(values)
        print(f"  {name:<46}{result[name]:7.2f} ms  = {floors.ratios(result[name])}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    toolkit_interpreters(parser.parse_args().n)
