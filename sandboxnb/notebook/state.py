"""Interactive sandboxes of a notebook session: launched by ``%sandbox launch`` or the launcher
widget, kept on the sandbox loop until stopped, released all together at extension unload.

Plain Python (no IPython, no widgets) so tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.notebook.loop import Job, LoopThread, run_blocking, sandbox_loop

__all__ = [
    "FLAT_FIELDS",
    "SandboxHandle",
    "SandboxManager",
    "SandboxRecord",
    "manager",
    "validate_launch",
]

#: Flat launch options accepted everywhere (magics, widgets), in display order.
FLAT_FIELDS = ("image", "cpu", "memory_mb", "gpu", "timeout")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_launch(provider: str, **flat: Any) -> tuple[Any, RuntimeConfig]:
    """Resolve the provider and build the effective config; raise before anything starts.

    Raises :class:`ValueError` for an unknown provider and :class:`ConfigError` (naming field,
    value and what is accepted) for a bad or unsupported option.
    """
    from sandboxnb.providers import get_provider

    config = config_from_flat(**flat)
    instance = get_provider(provider)
    return instance, instance.check(config)


@dataclass
class SandboxRecord:
    """One interactive sandbox and its lifecycle state."""

    name: str
    provider: str
    config: RuntimeConfig
    state: str = "starting"  # starting | running | stopping | stopped | failed
    started_at: float = field(default_factory=time.time)
    sandbox: Any = None
    error: str | None = None
    job: Job | None = field(default=None, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def id(self) -> str | None:
        return getattr(self.sandbox, "id", None)

    @property
    def age_s(self) -> float:
        return time.time() - self.started_at

    @property
    def effective_config(self) -> RuntimeConfig:
        return getattr(self.sandbox, "config", None) or self.config

    def summary(self) -> dict[str, Any]:
        """A flat row for tables."""
        cfg = self.effective_config
        shown = {k: v for k, v in cfg.summary().items() if v is not None}
        if cfg.limits.run_timeout_s:
            shown["timeout"] = cfg.limits.run_timeout_s
        return {
            "name": self.name,
            "provider": self.provider,
            "id": self.id or "",
            "age_s": round(self.age_s, 1),
            "config": ", ".join(f"{k}={v}" for k, v in shown.items()) or "provider defaults",
            "state": self.state,
            "error": self.error or "",
        }


class SandboxManager:
    """Owns interactive sandboxes. Each one is held open by a task on the sandbox loop (the
    task that entered ``sandboxnb.launch(...)`` also exits it, on every path)."""

    def __init__(self, loop_thread: LoopThread | None = None) -> None:
        self._loop_thread = loop_thread
        self._records: dict[str, SandboxRecord] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    @property
    def loop_thread(self) -> LoopThread:
        return self._loop_thread or sandbox_loop()

    # ---- observation -------------------------------------------------------------------
    def records(self, include_stopped: bool = False) -> list[SandboxRecord]:
        with self._lock:
            found = list(self._records.values())
        return [r for r in found if include_stopped or r.state in ("starting", "running")]

    def get(self, name: str) -> SandboxRecord | None:
        record = self._records.get(name)
        return record if record is not None and record.state in ("starting", "running") else None

    def names(self) -> list[str]:
        return [r.name for r in self.records()]

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every change (from any thread); returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self) -> None:
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener()

    # ---- lifecycle ---------------------------------------------------------------------
    def free_name(self, prefix: str = "sb") -> str:
        n = 1
        while f"{prefix}{n}" in self._records and self._records[f"{prefix}{n}"].state in (
            "starting",
            "running",
        ):
            n += 1
        return f"{prefix}{n}"

    def prepare(self, provider: str, name: str | None = None, **flat: Any) -> SandboxRecord:
        """Validate everything and reserve the name; nothing starts. Raises ValueError."""
        if name is not None and not _NAME.match(name):
            raise ValueError(
                f"name = {name!r} is not a valid Python identifier (it becomes a variable); "
                "use letters, digits and underscores, e.g. --name sb1"
            )
        _, config = validate_launch(provider, **flat)
        with self._lock:
            if name is None:
                name = self.free_name()
            elif self.get(name) is not None:
                raise ValueError(
                    f"a sandbox named {name!r} is already running; pick another name "
                    f"or stop it first (%sandbox stop {name})"
                )
            record = SandboxRecord(name=name, provider=provider, config=config)
            self._records[name] = record
        return record

    def start(self, record: SandboxRecord) -> Job:
        """Start the sandbox of a prepared record on the sandbox loop (returns at once)."""
        record.job = self.loop_thread.submit(self._hold(record))
        record.job.add_done_callback(lambda job: self._ended(record, job))
        self._changed()
        return record.job

    async def _hold(self, record: SandboxRecord) -> None:
        import sandboxnb.launch as launch_mod

        record._stop = asyncio.Event()
        async with launch_mod.launch(record.provider, config=record.config) as sb:
            record.sandbox = sb
            record.state = "running"
            record._ready.set()
            self._changed()
            await record._stop.wait()
            record.state = "stopping"
            self._changed()

    def _ended(self, record: SandboxRecord, job: Job) -> None:
        """Final state once the holding task is over, however it ended (even if cancelled
        before it ever ran)."""
        error = None if job.cancelled() else job.exception()
        if error is not None and record.state == "starting":
            record.state, record.error = "failed", f"{type(error).__name__}: {error}"
        else:
            record.state = "stopped"
        record._ready.set()
        self._changed()

    def launch(self, provider: str, name: str | None = None, *, wait: bool = True,
               **flat: Any) -> SandboxRecord:
        """Validate, start and (``wait=True``) block until the sandbox is up or failed."""
        record = self.prepare(provider, name, **flat)
        self.start(record)
        if wait:
            self.wait_ready(record)
        return record

    def wait_ready(self, record: SandboxRecord, timeout: float | None = None) -> SandboxRecord:
        """Block until ``record`` is running; re-raise its launch error. Interrupt cancels it."""
        ready = record._ready
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ready.wait(0.05):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"sandbox {record.name} not ready after {timeout} s")
        except KeyboardInterrupt:
            if record.job is not None:
                record.job.cancel_and_wait(30)
            raise
        if record.state != "running" and record.job is not None and record.job.done():
            record.job.result()  # raises the launch error
        return record

    def stop(self, name: str, timeout: float = 30.0) -> SandboxRecord:
        """Stop one sandbox and wait for its teardown. KeyError if unknown."""
        record = self.get(name)
        if record is None:
            raise KeyError(name)
        self._request_stop(record)
        if record.job is not None and not record.job.finished():
            record.job._finished.wait(timeout)
            if not record.job.finished():
                record.job.cancel_and_wait(timeout)
        return record

    def stop_async(self, name: str) -> None:
        """Ask one sandbox to stop and return at once (widget buttons)."""
        record = self.get(name)
        if record is not None:
            self._request_stop(record)

    def _request_stop(self, record: SandboxRecord) -> None:
        if record.state == "starting" or record._stop is None:
            if record.job is not None:
                record.job.cancel()
            return
        loop = self.loop_thread.loop
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(record._stop.set)

    def stop_all(self, timeout: float = 30.0) -> list[str]:
        """Stop every sandbox (concurrently) and wait; returns their names."""
        records = self.records()
        for record in records:
            self._request_stop(record)
        deadline = time.monotonic() + timeout
        for record in records:
            if record.job is not None:
                record.job._finished.wait(max(0.0, deadline - time.monotonic()))
                if not record.job.finished():
                    record.job.cancel_and_wait(5)
        return [r.name for r in records]

    def run(self, coro: Any, **kwargs: Any) -> Any:
        """Run a coroutine using these sandboxes to completion, blocking (magics)."""
        return run_blocking(coro, **kwargs)


class SandboxHandle:
    """What ``%sandbox launch`` puts in the user namespace: the client methods, awaitable from
    any loop (they run on the sandbox loop), plus ``stop()``.

    ``await sb.exec("ls")``, ``await sb.python("1 + 1")``, ``await sb.write_file(...)``.
    Without a running loop in the calling thread they return a ``concurrent.futures.Future``.
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
        """The underlying client ``Sandbox`` (bound to the sandbox loop)."""
        return self._record.sandbox

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        target = getattr(self._record.sandbox, attr)
        if attr in self._ASYNC:
            return self._bridge(target)
        return target

    def _bridge(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            job = self._manager.loop_thread.submit(method(*args, **kwargs))
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return job
            return _await_job(job)

        call.__doc__ = method.__doc__
        call.__name__ = getattr(method, "__name__", "call")
        return call

    def stop(self) -> None:
        """Stop this sandbox and wait for its teardown."""
        if self._record.state in ("starting", "running"):
            self._manager.stop(self._record.name)

    def __repr__(self) -> str:
        r = self._record
        return f"<Sandbox {r.name} provider={r.provider} id={r.id} state={r.state}>"

    def _repr_html_(self) -> str:
        from sandboxnb.notebook.reprs import sandboxes_html

        return sandboxes_html([self._record])


async def _await_job(job: Job) -> Any:
    """Await a job from another loop; cancelling the awaiter cancels the job."""
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        job.cancel()
        raise


_manager: SandboxManager | None = None


def manager() -> SandboxManager:
    """The process-wide manager shared by magics and widgets."""
    global _manager
    if _manager is None:
        _manager = SandboxManager()
    return _manager


def _reset_manager() -> None:
    global _manager
    _manager = None

