"""The provider template: one sandbox lifecycle for every backend.

:meth:`Provider.sandbox` is implemented here, once. A backend subclass supplies four small hooks
and nothing of the lifecycle itself:

``create(spec) -> handle``
    start a sandbox that runs our server as ``spec`` says (:mod:`sandboxnb.providers.spec`);
``address(handle) -> url``
    where its server is reached: ``tcp://``, ``tls://`` or ``unix://``;
``destroy(handle)``
    end it (idempotent: it may run twice, or after the backend ended it);
``list_sandboxes(labels) -> [Found]``
    the sandboxes of ours the backend still has, by label (``gc``, leak checks, and cleanup of a
    create that was interrupted before it returned a handle).

Optional: ``failure(handle)`` (why a sandbox that is not ready yet will never be), ``prepare``
(check a config beyond the supported fields), ``endpoint_meta`` and ``aclose``; for transient
faults (:mod:`sandboxnb.providers.retry`) ``classify(err)`` (which errors are transient) and
``adopt(found, spec)`` (take over a sandbox an uncertain create made).

The base does the rest on every path: the launch spec (id, token, labels, server options from
one policy), the startup deadline, readiness through the client's own authenticated handshake
with backoff, the run timeout, and a shielded release with a bounded grace period.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from sandboxnb.config import RuntimeConfig, check_supported
from sandboxnb.errors import ProviderError, StartupTimeout
from sandboxnb.providers import retry
from sandboxnb.providers.retry import Fault, RetryPolicy, RetryStats
from sandboxnb.providers.spec import (
    LABEL,
    LaunchSpec,
    make_launch_spec,
    owner_label,
    sandbox_labels,
)

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox

__all__ = [
    "LABEL",
    "Availability",
    "Endpoint",
    "Found",
    "LaunchSpec",
    "Provider",
    "ProviderError",
    "StartupTimeout",
    "owner_label",
    "sandbox_labels",
]

log = logging.getLogger("sandboxnb.providers")

#: Readiness retries start at this delay and double up to the cap.
READY_BACKOFF_START_S = 0.002
READY_BACKOFF_CAP_S = 0.25


@dataclass(frozen=True)
class Endpoint:
    """Where a sandbox's server listens and how to prove we own it.

    ``url`` is ``tcp://HOST:PORT``, ``tls://HOST:PORT`` or ``unix:///PATH`` (an SSH forward
    appears as a local ``tcp://127.0.0.1:PORT``). ``token`` is the per-sandbox secret for the
    handshake; it is excluded from the repr so it never lands in logs or notebook output.
    """

    url: str
    token: str = field(repr=False)
    sandbox_id: str
    provider: str
    config: RuntimeConfig
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    """Whether a provider can be used here, and if not, why (and how to fix it)."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class Found:
    """A sandbox of ours that a backend still has: its id, the backend's handle, its labels."""

    sandbox_id: str
    handle: Any
    labels: Mapping[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """Base class of sandbox providers: subclasses set ``name``/``supported`` and the hooks."""

    name: ClassVar[str]
    #: Dotted config fields the provider honours (``"resources.cpu"``); a group name covers all.
    supported: ClassVar[frozenset[str]]
    description: ClassVar[str] = ""
    #: How long release may take before it is left to finish in the background (and logged).
    release_grace_s: ClassVar[float] = 30.0
    #: How the kernel reaches the server (shown by ``sandboxnb providers``).
    transport: ClassVar[str] = "tcp"
    #: Bounds of retrying a backend call that failed transiently.
    retry_policy: RetryPolicy = RetryPolicy()

    # -- hooks a backend writes -----------------------------------------------------------
    @abc.abstractmethod
    async def create(self, spec: LaunchSpec) -> Any:
        """Start a sandbox running the server as ``spec`` says; return the backend's handle.

        The sandbox must carry ``spec.labels`` so that :meth:`list_sandboxes` finds it even when
        this call is interrupted before it returns.
        """

    @abc.abstractmethod
    async def address(self, handle: Any) -> str:
        """The URL of the sandbox's server (``tcp://``, ``tls://`` or ``unix://``)."""

    @abc.abstractmethod
    async def destroy(self, handle: Any) -> None:
        """End the sandbox and free what it holds. Idempotent."""

    @abc.abstractmethod
    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        """The sandboxes the backend still has whose labels include all of ``labels``."""

    async def failure(self, handle: Any) -> str | None:
        """Why a sandbox that does not answer yet never will (it exited, the image is broken),
        or ``None`` while it may still come up. Checked between readiness attempts."""
        return None

    def classify(self, err: Exception) -> Fault | None:
        """A transient backend error as a :class:`~sandboxnb.providers.retry.Fault` (retried),
        or ``None``: permanent, raised at once. By default every error is permanent."""
        return None

    async def adopt(self, found: Found, spec: LaunchSpec) -> Any:
        """Take over ``found``, the sandbox an uncertain create of ``spec`` made, and return a
        handle as ``create`` would; ``None`` has it destroyed and created again."""
        return None

    @property
    def retry_stats(self) -> RetryStats:
        """What retrying backend calls did on this provider (faults, retries, adoptions)."""
        return retry.stats_of(self)

    def prepare(self, config: RuntimeConfig) -> RuntimeConfig:
        """Check ``config`` beyond the supported fields and return it as this backend uses it."""
        return config

    def endpoint_meta(self, handle: Any) -> dict[str, Any]:
        """Backend details shown on the endpoint (container id, pid, ...)."""
        return {}

    async def aclose(self) -> None:
        """Release shared resources (clients, pools) after every sandbox is released."""
        pending = list(self._releasing)
        if not pending:
            return
        _, stuck = await asyncio.wait(pending, timeout=self.release_grace_s)
        if stuck:
            log.error("%s: %d release(s) still running after %gs; left to `sandboxnb gc`",
                      self.name, len(stuck), self.release_grace_s)

    @classmethod
    def availability(cls) -> Availability:
        """Report whether the provider is installed and configured on this machine."""
        return Availability(True)

    # -- the lifecycle, written once --------------------------------------------------------
    @property
    def session_id(self) -> str:
        """Labels every sandbox of this provider instance (one kernel, one CLI run)."""
        sid = self.__dict__.get("_session_id")
        if sid is None:
            sid = self.__dict__["_session_id"] = secrets.token_hex(6)
        return sid

    @session_id.setter
    def session_id(self, value: str) -> None:
        self.__dict__["_session_id"] = value

    @property
    def _releasing(self) -> set[asyncio.Task[None]]:
        return self.__dict__.setdefault("_release_tasks", set())

    def check(self, config: RuntimeConfig | None = None) -> RuntimeConfig:
        """Validate ``config`` for this provider before anything starts; return it as used."""
        config = config if config is not None else RuntimeConfig()
        check_supported(self.name, self.supported, config)
        return self.prepare(config)

    def launch_spec(self, config: RuntimeConfig) -> LaunchSpec:
        """The one launch spec of a new sandbox (id, token, labels, server options)."""
        return make_launch_spec(self.name, config, session=self.session_id)

    def sandbox(self, config: RuntimeConfig | None = None) -> AbstractAsyncContextManager[Endpoint]:
        """Acquire a fresh sandbox, yield its ready :class:`Endpoint`, release it on every path.

        The config is checked before anything starts (a bad one raises ``ConfigError`` here).
        """
        config = self.check(config)
        return self._lifecycle(config, keep_client=False)

    def open(self, config: RuntimeConfig | None = None) -> AbstractAsyncContextManager[Sandbox]:
        """Like :meth:`sandbox`, but yield the connected :class:`~sandboxnb.client.Sandbox`
        (the readiness connection itself, so no second handshake is paid)."""
        config = self.check(config)
        return self._lifecycle(config, keep_client=True)

    @contextlib.asynccontextmanager
    async def _lifecycle(self, config: RuntimeConfig, *, keep_client: bool) -> AsyncIterator[Any]:
        spec = self.launch_spec(config)
        state = _Acquired(spec)
        client: Sandbox | None = None
        try:
            client = await self._acquire(state)
            endpoint = state.endpoint
            assert endpoint is not None
            run_timeout = spec.config.limits.run_timeout_s
            if run_timeout is not None:
                state.timer = asyncio.get_running_loop().call_later(
                    run_timeout, self._expire, state, run_timeout
                )
            if keep_client:
                yield client
            else:
                await client.close()
                client = None
                yield endpoint
        except BaseException:
            # the error in flight is what the user must see; a failing release is logged
            await self._end(state, client, raise_errors=False)
            raise
        await self._end(state, client, raise_errors=True)

    async def _end(self, state: _Acquired, client: Sandbox | None, *, raise_errors: bool) -> None:
        if state.timer is not None:
            state.timer.cancel()
        cancelled = False
        if client is not None:
            try:  # a cancellation here must not skip the release below
                await _close_quietly(client)
            except asyncio.CancelledError:
                cancelled = True
        try:
            await self._release(state)
        except ProviderError:
            if raise_errors and not cancelled:
                raise
            log.exception("%s: releasing sandbox %s failed", self.name, state.spec.sandbox_id)
        if cancelled:
            raise asyncio.CancelledError

    async def _acquire(self, state: _Acquired) -> Sandbox:
        spec = state.spec
        limit = spec.config.limits.startup_timeout_s
        started = time.monotonic()
        phase = "creating the sandbox"
        try:
            async with asyncio.timeout(limit):
                deadline = None if limit is None else asyncio.get_running_loop().time() + limit
                state.creating = asyncio.ensure_future(
                    retry.create(self, spec, deadline, state.progress))
                state.handle = await asyncio.shield(state.creating)
                state.created = True
                phase = "asking for its address"
                url = await self.address(state.handle)
                phase = "waiting for the server's handshake"
                state.endpoint = Endpoint(
                    url=url, token=spec.token, sandbox_id=spec.sandbox_id, provider=self.name,
                    config=spec.config, meta={**self.endpoint_meta(state.handle),
                                              "labels": dict(spec.labels)},
                )
                client = await self._wait_ready(state)
        except TimeoutError as err:
            if isinstance(err, StartupTimeout) or limit is None:
                raise
            raise StartupTimeout(
                f"{self.name}: sandbox {spec.sandbox_id} was not ready within "
                f"limits.startup_timeout_s = {limit:g}s (while {phase}); raise the limit or "
                f"set it to None for no limit"
            ) from None
        state.endpoint.meta["acquire_s"] = round(time.monotonic() - started, 4)
        return client

    async def _wait_ready(self, state: _Acquired) -> Sandbox:
        """Connect and authenticate with backoff until the server answers (or never will)."""
        from sandboxnb.client import TLS_CA_ENV, connect
        from sandboxnb.errors import AuthenticationError, ConnectionLost, SandboxTimeout

        endpoint = state.endpoint
        assert endpoint is not None
        delay = READY_BACKOFF_START_S
        last: Exception | None = None
        while True:
            try:
                return await connect(endpoint, connect_timeout_s=max(5.0, delay * 4))
            except AuthenticationError:
                raise
            except (ConnectionLost, SandboxTimeout, OSError) as err:
                if isinstance(err.__cause__, ssl.SSLCertVerificationError):
                    raise ProviderError(
                        f"{self.name}: the certificate of {endpoint.url} is not trusted "
                        f"({err.__cause__.verify_message}); set {TLS_CA_ENV} to the CA file "
                        "that signed it"
                    ) from err
                last = err
            reason = await self.failure(state.handle)
            if reason is not None:
                raise ProviderError(
                    f"{self.name}: sandbox {endpoint.sandbox_id} will not become ready: "
                    f"{reason}"
                ) from last
            await asyncio.sleep(delay)
            delay = min(delay * 2, READY_BACKOFF_CAP_S)

    def _expire(self, state: _Acquired, after: float) -> None:
        log.warning("%s: sandbox %s reached limits.run_timeout_s = %gs: ending it",
                    self.name, state.spec.sandbox_id, after)
        state.expired = True
        if state.endpoint is not None:  # lets a rollout say why its sandbox went away
            state.endpoint.meta["run_timeout_expired"] = after
        self._start_release(state)

    def _start_release(self, state: _Acquired) -> asyncio.Task[None]:
        if state.releasing is None:
            state.releasing = asyncio.ensure_future(self._destroy_all(state))
            self._releasing.add(state.releasing)
            state.releasing.add_done_callback(self._releasing.discard)
        return state.releasing

    async def _destroy_all(self, state: _Acquired) -> None:
        """Destroy what acquire reached: the handle, or whatever carries the spec's labels."""
        if state.creating is not None and not state.created:
            if not state.progress.sending:  # between attempts: no create can come of it
                state.creating.cancel()
            with contextlib.suppress(BaseException):
                state.handle = await state.creating
                state.created = True
        if state.created:
            await self.destroy(state.handle)
            return
        # create failed or never returned a handle: find the sandbox by its own label
        for found in await self.list_sandboxes({f"{LABEL}.sandbox_id": state.spec.sandbox_id}):
            await self.destroy(found.handle)

    async def _release(self, state: _Acquired) -> None:
        """Release shielded from cancellation, within ``release_grace_s``; a cancellation that
        arrives meanwhile is re-raised once release is over."""
        task = self._start_release(state)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.release_grace_s
        cancelled = False
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.error("%s: releasing sandbox %s is taking longer than %gs; it goes on in the "
                          "background (`sandboxnb gc` finds it if it never ends)",
                          self.name, state.spec.sandbox_id, self.release_grace_s)
                break
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
            except TimeoutError:
                continue
            except Exception:
                break
        if task.done() and not task.cancelled() and task.exception() is not None:
            err = task.exception()
            if not cancelled:
                raise ProviderError(
                    f"{self.name}: releasing sandbox {state.spec.sandbox_id} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
        if cancelled:
            raise asyncio.CancelledError

    # -- finding sandboxes again ------------------------------------------------------------
    def owner_labels(self, *, session_only: bool = False) -> dict[str, str]:
        """Labels that select this owner's sandboxes (and only this session's, if asked)."""
        labels = {LABEL: "1", f"{LABEL}.owner": owner_label(), f"{LABEL}.provider": self.name}
        if session_only:
            labels[f"{LABEL}.session"] = self.session_id
        return labels

    async def live_sandboxes(self) -> list[str]:
        """Ids of this owner's sandboxes the backend still has (leak checks and ``gc``)."""
        return [found.sandbox_id for found in await self.list_sandboxes(self.owner_labels())]

    async def reap(self, sandbox_ids: list[str] | None = None, *,
                   session_only: bool = False) -> list[str]:
        """Destroy this owner's sandboxes the backend still has (all, or ``sandbox_ids``);
        return their ids (``sandboxnb gc``)."""
        found = await self.list_sandboxes(self.owner_labels(session_only=session_only))
        chosen = [f for f in found if sandbox_ids is None or f.sandbox_id in sandbox_ids]
        await asyncio.gather(*(self.destroy(f.handle) for f in chosen))
        return [f.sandbox_id for f in chosen]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class _Acquired:
    """What one lifecycle reached, for release to find again."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.creating: asyncio.Future[Any] | None = None
        self.progress = retry.CreateProgress()
        self.handle: Any = None
        self.created = False
        self.endpoint: Endpoint | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.releasing: asyncio.Task[None] | None = None
        self.expired = False


async def _close_quietly(client: Sandbox) -> None:
    with contextlib.suppress(Exception):
        await client.close()
