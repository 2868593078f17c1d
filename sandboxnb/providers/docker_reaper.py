"""The Docker provider's reaper: removes a session's containers once their owner process dies.

A ``--rm`` container's server ends itself when its client is gone (the dead-man switch), but a
container whose owner was killed between ``create`` and ``start`` never runs, so ``--rm`` never
removes it, and a running one would live a whole idle window. So each :class:`DockerProvider`
starts this script (``python3 -I docker_reaper.py``: the docker SDK and the stdlib only) in a
session of its own, with a pipe on stdin whose write end only the owner holds:

* the provider closes cleanly (``aclose``): it writes ``q`` and closes the pipe; the reaper exits;
* the owner dies (``kill -9`` included): the pipe reads EOF without ``q``; the reaper removes
  (``rm -f``) every container labelled with the owner's session and pid, started or not, and
  sweeps again until :data:`QUIET_S` seconds pass without finding one (a create the engine was
  still serving when the owner died lands late), at most :data:`MAX_SWEEP_S` seconds.

Usage: ``python3 -I docker_reaper.py SESSION OWNER_PID [BASE_URL]``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

LABEL = "sandboxnb"  # sandboxnb.providers.spec.LABEL (this script imports nothing of ours)
#: Stop sweeping after this long without finding a container ...
QUIET_S = 10.0
#: ... or this long after the owner died.
MAX_SWEEP_S = 60.0
_EVERY_S = 0.25
CLEAN_EXIT = b"q"


def sweep(client: Any, session: str, owner_pid: str, pool: ThreadPoolExecutor) -> int:
    """Remove the owner's containers in any state; how many were found."""
    filters = {"label": [f"{LABEL}.session={session}", f"{LABEL}.pid={owner_pid}"]}
    found = client.api.containers(all=True, filters=filters)

    def remove(cid: str) -> None:
        try:
            client.api.remove_container(cid, force=True)
        except Exception:  # gone already, or the engine is removing it (--rm)
            pass

    list(pool.map(remove, [c["Id"] for c in found]))
    return len(found)


def reap(session: str, owner_pid: str, base_url: str | None) -> None:
    """Sweep until quiet (see the module docstring)."""
    import docker

    client = (docker.DockerClient(base_url=base_url, timeout=30) if base_url
              else docker.from_env(timeout=30))
    started = last_found = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        while True:
            try:
                if sweep(client, session, owner_pid, pool):
                    last_found = time.monotonic()
            except Exception as err:  # the engine is busy or restarting: try again
                print(f"sandboxnb docker reaper: {type(err).__name__}: {err}", file=sys.stderr)
            now = time.monotonic()
            if now - last_found >= QUIET_S or now - started >= MAX_SWEEP_S:
                return
            time.sleep(_EVERY_S)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[0] or not argv[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    import docker  # noqa: F401  (imported before waiting: the sweep starts at once)

    data = sys.stdin.buffer.read()  # until the owner closes the pipe, or dies
    if CLEAN_EXIT in data:
        return 0
    reap(argv[0], argv[1], argv[2] if len(argv) == 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
