"""One rollout: a fresh sandbox, task setup, the agent, grading, a result row; teardown always."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

from sandboxnb.agents import _REPEAT, Agent, current_repeat
from sandboxnb.config import RuntimeConfig
from sandboxnb.failure import clean_text, one_line, user_traceback
from sandboxnb.providers.base import Provider
from sandboxnb.results import STATUSES
from sandboxnb.tasks import Grade, Task, TaskError

__all__ = ["ANSWER_CHARS", "STATUSES", "current_repeat", "rollout"]

log = logging.getLogger("sandboxnb.rollout")

#: Answers longer than this are truncated in result rows.
ANSWER_CHARS = 20_000


def _new_row(run_id: str, provider: Provider, task: Task, repeat: int, config: RuntimeConfig):
    return {
        "run_id": run_id,
        "task_id": task.id,
        "repeat": repeat,
        "provider": provider.name,
        "sandbox_id": None,
        "status": "error",
        "reward": math.nan,
        "error": None,
        "error_type": None,
        "phase": None,
        "traceback": None,
        "output_tail": None,
        "started_at": datetime.now(UTC).isoformat(),
        "acquire_s": math.nan,
        "rollout_s": math.nan,
        "release_s": math.nan,
        "duration_s": math.nan,
        **config.summary(),
        "answer": None,
        "info": {},
    }


def _failed(row: dict[str, Any], phase: str, err: BaseException, sandbox: Any,
            traceback: bool = True) -> None:
    """Record what failed in ``row``: the phase, the exception's type, the user's traceback and
    the newest output the sandbox streamed."""
    row["phase"] = phase
    row["error_type"] = type(err).__name__
    if traceback:
        row["traceback"] = user_traceback(err)
    tail = getattr(sandbox, "output_tail", None)
    if tail:
        row["output_tail"] = clean_text(tail)


class UserCodeExit(Exception):
    """The user's agent or grader raised ``SystemExit`` or ``KeyboardInterrupt``."""


#: How long user code (an agent, a grader) may take to end once cancelled before the rollout
#: stops waiting for it and releases its sandbox anyway.
USER_CANCEL_GRACE_S = 5.0


async def _user_call(fn: Callable[..., Any], *args: Any) -> Any:
    """``await fn(*args)`` in a task of its own, so that user code which swallows cancellation
    (``except BaseException``, a retry loop) cannot hold its sandbox: once cancelled, it gets
    :data:`USER_CANCEL_GRACE_S` to end, then it is left behind and the rollout goes on to
    release."""
    async def guarded() -> Any:
        try:
            return await fn(*args)
        except (SystemExit, KeyboardInterrupt) as err:  # would stop the event loop in a task
            raise UserCodeExit(f"{type(err).__name__}({err})") from err

    call = asyncio.ensure_future(guarded())
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        call.cancel()
        await asyncio.wait({call}, timeout=USER_CANCEL_GRACE_S)
        if not call.done():
            log.warning("%s ignored its cancellation for %gs: its sandbox is released anyway",
                        getattr(fn, "__qualname__", fn), USER_CANCEL_GRACE_S)
            call.add_done_callback(_retrieve)
        elif call.cancelled():
            try:
                call.result()
            except asyncio.CancelledError as inner:  # it says where the user's code was
                raise inner from None
        raise


def _retrieve(call: asyncio.Future[Any]) -> None:
    if not call.cancelled():
        call.exception()  # retrieved: no "never retrieved" noise when it ends at last


def _checked(grade: Any) -> Grade:
    """A grader's result, checked: a :class:`Grade` with a finite reward."""
    if not isinstance(grade, Grade):
        raise TaskError(f"the grader returned {type(grade).__name__} {_safe_repr(grade)}: "
                        "expected a sandboxnb.tasks.Grade(reward, info)")
    try:
        reward = float(grade.reward)
    except (TypeError, ValueError):
        reward = math.nan
    if not math.isfinite(reward):
        raise TaskError(f"the grader's reward = {_safe_repr(grade.reward)}: expected a finite "
                        "number")
    return grade


def _safe_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} with a failing repr>"
    return text if len(text) <= 200 else text[:200] + "..."


def _answer_text(answer: Any) -> str | None:
    if answer is None:
        return None
    text = answer if isinstance(answer, str) else _safe_repr_full(answer)
    text = clean_text(text)
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + "...[truncated]"


def _safe_repr_full(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} with a failing repr>"


async def rollout(
    provider: Provider,
    task: Task,
    repeat: int,
    config: RuntimeConfig,
    agent: Agent,
    *,
    run_id: str = "",
    timeout_s: float | None = None,
    on_done: Callable[[dict[str, Any]], None],
    acquire: Callable[[RuntimeConfig], AbstractAsyncContextManager[Any]] | None = None,
) -> None:
    """Run ``task`` once in a fresh sandbox from ``provider`` and report its row to ``on_done``.

    Failures become the row's ``status``/``error`` (with ``error_type``, ``phase``,
    ``traceback`` and ``output_tail``); the row is reported on every path, also when the rollout
    is cancelled (status ``cancelled``, then the cancellation propagates). ``acquire(config)``
    replaces ``provider.open`` (a warm :class:`~sandboxnb.pool.Pool` hands out its spares).
    """
    row = _new_row(run_id, provider, task, repeat, config)
    repeat_token = _REPEAT.set(repeat)
    started = time.perf_counter()
    ready = done = None
    phase, failed_in = "acquire", None
    meta: dict[str, Any] = {}
    box: Any = None
    try:
        async with (acquire or provider.open)(config) as sandbox:
            box = sandbox
            row["sandbox_id"] = sandbox.id
            if sandbox.endpoint is not None:
                meta = sandbox.endpoint.meta
            try:
                ready = time.perf_counter()
                deadline = asyncio.timeout(timeout_s)
                try:
                    async with deadline:
                        phase = "setup"
                        await task.prepare(sandbox)
                        phase = "agent"
                        answer = await _user_call(agent, sandbox, task)
                        row["answer"] = _answer_text(answer)
                        phase = "grade"
                        grade = _checked(await _user_call(task.grade, sandbox, answer))
                except TimeoutError as err:
                    if not deadline.expired():
                        failed_in = phase
                        raise
                    row["status"] = "timeout"
                    row["error"] = f"rollout exceeded timeout_s={timeout_s} during {phase}"
                    _failed(row, phase, err, sandbox)
                except (SystemExit, KeyboardInterrupt) as err:
                    # raised by the user's code (argparse, click, a stray raise), not by an
                    # interrupt of ours (that arrives as a cancellation): a row, not the end of
                    # the kernel or the run
                    failed_in = phase
                    raise UserCodeExit(f"{type(err).__name__}({err})") from err
                except BaseException:
                    failed_in = phase  # the phase that failed, not the release that follows
                    raise
                else:
                    row.update(status="ok", reward=float(grade.reward), info=grade.info)
                finally:
                    done = time.perf_counter()
                    phase = "release"
            finally:
                await sandbox.close()
    except asyncio.CancelledError as err:
        row["status"] = "cancelled"
        row["error"] = f"cancelled during {failed_in or phase}"
        _failed(row, failed_in or phase, err, box, traceback=False)
        raise
    except Exception as err:  # a failing rollout is a row, not a failed run
        if isinstance(err, UserCodeExit) and err.__cause__ is not None:
            err = err.__cause__  # the row names what the user's code raised
        where = failed_in or phase
        limit = meta.get("run_timeout_expired")
        if limit is not None and where != "release":
            row["status"] = "timeout"
            row["error"] = (f"the sandbox reached limits.run_timeout_s = {limit:g}s during "
                            f"{where} ({one_line(err)})")
            _failed(row, where, err, box)
        elif where != "release":
            row["status"] = "error"
            row["error"] = f"{where}: {one_line(err)}"
            _failed(row, where, err, box)
        else:  # a failed release keeps the verdict (and the failure) already reached
            row["error"] = f"{where}: {one_line(err)}" if row["error"] is None else \
                f"{row['error']}; then release: {one_line(err)}"
            if row["phase"] is None:
                _failed(row, where, err, box)
    finally:
        _REPEAT.reset(repeat_token)
        end = time.perf_counter()
        if ready is not None:
            row["acquire_s"] = ready - started
        if done is not None:
            row["rollout_s"] = done - ready
            row["release_s"] = end - done
        row["duration_s"] = end - started
        on_done(row)
