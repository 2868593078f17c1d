"""Transient-fault handling of the providers' backend calls (create, list, destroy).

Every backend call that can fail for a moment (a rate limit, HTTP 5xx, gRPC UNAVAILABLE or
RESOURCE_EXHAUSTED, a connection reset) goes through :func:`call` or :func:`create`, which retry
it with exponential backoff and jitter through `stamina <https://stamina.hynek.me>`_, honour a
``Retry-After`` the service sent (at most :attr:`RetryPolicy.max_retry_after_s`, and never past
the startup deadline), stop after :attr:`RetryPolicy.attempts` attempts or
:attr:`RetryPolicy.total_s` seconds, log each retry at debug with its attempt number and count it
in :class:`RetryStats` (``provider.retry_stats``). A provider says what an error is through its
``classify(err)`` hook, returning a :class:`Fault` or ``None`` (permanent: raised at once, with the
provider's own message).

A create whose outcome is uncertain (a reset or timeout after the request was sent, a 5xx, a
409 "name already exists" on a repeat) is never simply repeated: the sandbox is first looked up by
its own ``sandboxnb.sandbox_id`` label and adopted if found (``provider.adopt``); extra copies are
destroyed; only when none exists is it created again.

What the SDKs already retry, checked in their source (modal 1.6.4, daytona 0.226.1):

* ``modal``: every unary RPC goes through ``modal._utils.grpc_utils._retry_transient_errors``:
  up to 3 retries (0.1 s doubling to 1 s) of DEADLINE_EXCEEDED, UNAVAILABLE, CANCELLED, INTERNAL,
  UNKNOWN and of connection errors (``OSError``, stream resets, h2 protocol errors), all with the
  same ``x-idempotency-key``; RESOURCE_EXHAUSTED and the other codes are raised at once. A
  server-sent ``RPCRetryPolicy`` detail (Modal's Retry-After) is slept on by the SDK itself with no
  bound unless ``MODAL_MAX_THROTTLE_WAIT`` is set (the startup deadline still bounds it here). So
  we retry what the SDK gave up on (RESOURCE_EXHAUSTED, and the transient codes after its three
  tries). Since the SDK repeats a reset ``SandboxCreateV2`` on its own, a control plane that does
  not deduplicate by idempotency key can end up with two sandboxes for one create that we never
  see fail: the Modal provider therefore sweeps, after each create, the copies carrying the same
  sandbox id label (``duplicates_removed`` counts them).
* ``daytona``: the generated API client retries nothing by default (``Configuration.retries`` is
  ``None``; even when set it never retries a POST). A 429 becomes ``DaytonaRateLimitError`` with
  the response headers (``Retry-After``), a 5xx a ``DaytonaError`` with ``status_code``, a reset a
  ``DaytonaConnectionError``. Daytona refuses a second sandbox of the same name (409): our sandbox
  id is its name, so a repeated create cannot silently duplicate there.
* ``docker`` (docker-py): no retries of its own; a repeated create of the same container name is
  refused with 409 Conflict.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sandboxnb.providers.spec import LABEL

if TYPE_CHECKING:
    from sandboxnb.providers.base import LaunchSpec, Provider

__all__ = ["CreateProgress", "Fault", "Kind", "RetryPolicy", "RetryStats", "call", "create",
           "destroy", "retry_after_s", "stats_of"]

log = logging.getLogger("sandboxnb.providers.retry")
# stamina's own retry hook logs each retry at WARNING on the "stamina" logger; without a handler
# the root's last resort would print that bare line into notebooks. Ours is logged above, at debug.
logging.getLogger("stamina").addHandler(logging.NullHandler())
T = TypeVar("T")


class Kind(enum.Enum):
    """What a failed backend call means for retrying it."""

    #: refused before doing anything (429, RESOURCE_EXHAUSTED): wait, then try again
    THROTTLED = "throttled"
    #: may or may not have happened (reset, timeout, 5xx): a create looks up its sandbox first
    UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class Fault:
    """A transient failure: its kind and the wait the service asked for (``Retry-After``)."""

    kind: Kind
    retry_after_s: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of retrying one backend call: attempts, total time, backoff and Retry-After cap."""

    attempts: int = 6
    total_s: float = 120.0
    wait_initial_s: float = 0.2
    wait_max_s: float = 10.0
    wait_jitter_s: float = 0.5
    max_retry_after_s: float = 60.0


@dataclass
class CreateProgress:
    """Whether a create request may be on its way (else, between attempts, it can be cancelled
    without leaving anything behind that a label lookup would not find)."""

    sending: bool = False


@dataclass
class RetryStats:
    """What retrying did on one provider (``provider.retry_stats``)."""

    faults: int = 0              # transient failures seen (each one retried or given up on)
    retries: int = 0             # attempts made after a transient failure
    given_up: int = 0            # calls that still failed transiently when the bounds were hit
    permanent: int = 0           # permanent failures (raised at once)
    lookups: int = 0             # label lookups after an uncertain create
    adopted: int = 0             # sandboxes found by label after an uncertain create and kept
    duplicates_removed: int = 0  # extra sandboxes with one sandbox id, destroyed
    destroy_failed: int = 0      # destroys that failed for good (logged with the gc command)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def stats_of(provider: Provider) -> RetryStats:
    """The provider's :class:`RetryStats` (created on first use)."""
    return provider.__dict__.setdefault("_retry_stats", RetryStats())


def retry_after_s(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else ``None``."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _classify(provider: Provider, err: BaseException) -> Fault | None:
    if not isinstance(err, Exception):
        return None
    try:
        return provider.classify(err)
    except Exception:  # a classifier bug must not hide the real error
        log.exception("%s: classifying %r failed", provider.name, err)
        return None


async def call(provider: Provider, what: str, fn: Callable[[], Awaitable[T]], *,
               deadline: float | None = None) -> T:
    """``await fn()``, retrying transient failures (as the provider classifies them) within the
    provider's :class:`RetryPolicy` and, if given, the loop-time ``deadline``."""
    async for attempt in _attempts(provider, what, deadline):
        with attempt:
            try:
                return await fn()
            except Exception as err:
                _note(provider, what, err)
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def destroy(provider: Provider, sandbox_id: str, fn: Callable[[], Awaitable[Any]], *,
                  gone: tuple[type[BaseException], ...] = ()) -> None:
    """``await fn()`` ending sandbox ``sandbox_id``, retried like :func:`call`; an error of a type
    in ``gone`` means it is gone already. A failure that stays is logged loudly with the sandbox
    id and the command that releases it later, then raised."""
    try:
        await call(provider, f"destroy {sandbox_id}", fn)
    except gone:
        return
    except Exception as err:
        stats_of(provider).destroy_failed += 1
        log.error("%s: destroying sandbox %s failed (%s: %s); it may still be running (and "
                  "billed): release it with `sandboxnb gc --runtime %s --delete` (add "
                  "--include-live while the process that started it runs)", provider.name,
                  sandbox_id, type(err).__name__, err, provider.name)
        raise


async def create(provider: Provider, spec: LaunchSpec, deadline: float | None,
                 progress: CreateProgress | None = None) -> Any:
    """``provider.create(spec)`` with retries; after an uncertain failure the sandbox is looked
    up by its id label and adopted (extras destroyed) before anything is created again."""
    what = f"create {spec.sandbox_id}"
    progress = progress or CreateProgress()
    uncertain = False
    async for attempt in _attempts(provider, what, deadline):
        with attempt:
            try:
                if uncertain:
                    handle = await _adopt(provider, spec, progress)
                    if handle is not None:
                        return handle
                progress.sending = True
                return await provider.create(spec)
            except Exception as err:
                fault = _note(provider, what, err)
                uncertain = uncertain or (fault is not None and fault.kind is Kind.UNCERTAIN)
                raise
            finally:
                progress.sending = False
    raise AssertionError("unreachable")  # pragma: no cover


async def _adopt(provider: Provider, spec: LaunchSpec, progress: CreateProgress) -> Any:
    """The sandbox an uncertain create made, if the backend has it (extras destroyed)."""
    stats = stats_of(provider)
    stats.lookups += 1
    found = await provider.list_sandboxes({f"{LABEL}.sandbox_id": spec.sandbox_id})
    if not found:
        log.debug("%s: sandbox %s not found after an uncertain create: creating it again",
                  provider.name, spec.sandbox_id)
        return None
    keep, extras = found[0], found[1:]
    for extra in extras:
        await provider.destroy(extra.handle)
        stats.duplicates_removed += 1
    progress.sending = True  # from here a sandbox exists that only the returned handle holds
    handle = await provider.adopt(keep, spec)
    if handle is None:  # the backend cannot take it over: replace it
        await provider.destroy(keep.handle)
        log.debug("%s: sandbox %s found after an uncertain create was replaced",
                  provider.name, spec.sandbox_id)
        return await provider.create(spec)
    stats.adopted += 1
    log.debug("%s: adopted sandbox %s after an uncertain create", provider.name, spec.sandbox_id)
    return handle


def _note(provider: Provider, what: str, err: Exception) -> Fault | None:
    fault = _classify(provider, err)
    stats = stats_of(provider)
    if fault is None:
        stats.permanent += 1
    else:
        stats.faults += 1
    return fault


def _attempts(provider: Provider, what: str, deadline: float | None) -> Any:
    policy: RetryPolicy = provider.retry_policy
    stats = stats_of(provider)
    loop = asyncio.get_running_loop()
    started = loop.time()
    failures = 0

    def hook(err: Exception) -> bool | float:
        """Whether to retry after ``err``, and after how long (stamina sleeps it)."""
        nonlocal failures
        failures += 1
        fault = _classify(provider, err)
        if fault is None:
            return False
        if failures >= policy.attempts:
            return _give_up(f"failed transiently {failures} time(s)", err)
        if fault.retry_after_s is not None:
            wait = min(fault.retry_after_s, policy.max_retry_after_s)
        else:  # exponential backoff with jitter
            wait = min(policy.wait_max_s, policy.wait_initial_s * 2 ** (failures - 1))
            wait += random.uniform(0, policy.wait_jitter_s)
        left = None if deadline is None else deadline - loop.time()
        if left is not None and wait >= left:
            return _give_up(f"has {max(left, 0):.3g}s left before the startup deadline, "
                            f"less than the {wait:.3g}s wait", err)
        if loop.time() - started + wait > policy.total_s:
            return _give_up(f"would pass its {policy.total_s:g}s retry budget", err)
        stats.retries += 1
        log.debug("%s: %s failed (attempt %d of %d, %s): %s; retrying in %.3gs%s",
                  provider.name, what, failures, policy.attempts, fault.kind.value, err, wait,
                  " (Retry-After)" if fault.retry_after_s is not None else "")
        return wait

    def _give_up(why: str, err: Exception) -> bool:
        stats.given_up += 1
        log.debug("%s: %s %s; giving up: %s", provider.name, what, why, err)
        return False

    import stamina  # imported on the first backend call, not with every provider

    # the hook enforces the time bounds (so it can count what it gives up); stamina the attempts
    return stamina.retry_context(on=hook, attempts=policy.attempts, timeout=None)
