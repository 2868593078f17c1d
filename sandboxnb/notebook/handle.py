"""The handle ``%sandbox launch`` puts in the user namespace for an interactive sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sandboxnb.notebook.loop import Job, submit
from sandboxnb.notebook.reprs import sandboxes_html
from sandboxnb.notebook.sandboxes import SandboxManager, SandboxRecord

__all__ = ["SandboxHandle"]


class SandboxHandle:
    """What ``%sandbox launch`` puts in the user namespace: a thin wrapper over the client
    ``Sandbox`` (attributes and methods pass through) plus ``stop()``.

    ``await sb.exec("ls")``, ``await sb.python("1 + 1")``, ``await sb.write_file(...)`` at top
    level run on the kernel loop like any other cell. Awaited from a different loop (another
    thread), the calls are handed to the kernel loop and awaited there.
    """

    _ASYNC = ("exec", "python", "write_file", "read_file", "ping")

    def __init__(self, record: SandboxRecord, manager: SandboxManager) -> None:
        self._record = record
        self._manager = manager

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def state(self) -> str:
        return self._record.state

    @property
    def sandbox(self) -> Any:
        """The underlying client ``Sandbox`` (bound to the kernel loop)."""
        return self._record.sandbox

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        record = self._record
        sandbox = record.sandbox
        if record.state == "ended":
            raise AttributeError(
                f"sandbox {record.name} has ended ({record.error}), so {attr!r} is unavailable; "
                f"launch a new one with %sandbox launch --name {record.name}"
            )
        if sandbox is None or record.state != "running":
            raise AttributeError(
                f"sandbox {record.name} is {record.state}; {attr!r} is unavailable"
            )
        target = getattr(sandbox, attr)
        if attr in self._ASYNC and self._foreign_loop():
            return self._bridge(target)
        return target

    def _foreign_loop(self) -> bool:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is not self._record.loop

    def _bridge(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return _await_job(submit(method(*args, **kwargs), self._record.loop))

        call.__doc__ = method.__doc__
        call.__name__ = getattr(method, "__name__", "call")
        return call

    def stop(self) -> None:
        """Stop this sandbox and wait for its teardown (an ended one is only forgotten)."""
        if self._record.state in ("starting", "running"):
            self._manager.stop(self._record.name)
        elif self._record.state == "ended":
            self._manager.forget(self._record.name)

    def __repr__(self) -> str:
        r = self._record
        why = f" ({r.error})" if r.state == "ended" else ""
        return f"<Sandbox {r.name} provider={r.provider} id={r.id} state={r.state}{why}>"

    def _repr_html_(self) -> str:
        return sandboxes_html([self._record])


async def _await_job(job: Job) -> Any:
    """Await a job from another loop; cancelling the awaiter cancels the job."""
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        job.cancel()
        raise
