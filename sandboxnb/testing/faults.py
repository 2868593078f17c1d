"""Fault injection for the emulators: make chosen RPCs / routes fail on purpose.

A :class:`FaultPlan` holds rules; each emulator asks it, for every request it handles, whether
this one fails (:meth:`FaultPlan.take`). A rule names its target (a Modal RPC such as
``SandboxCreateV2``, or a Daytona ``"METHOD /route"`` such as ``"POST /sandbox"``), its error (a
gRPC status name such as ``RESOURCE_EXHAUSTED``, an HTTP status such as ``429``, or ``reset``: the
request is carried out, then the connection is cut before the answer), how many calls it hits and
which (every k-th), an optional Retry-After in seconds and a message.

In process: ``emu.faults.add("SandboxCreateV2", "RESOURCE_EXHAUSTED", times=2)``. For an
emulator in another process: the environment variable :data:`FAULTS_ENV`, read when the emulator
starts, e.g. ``SandboxCreateV2=UNAVAILABLE:times=2;POST /sandbox=429:retry_after=1``.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

__all__ = ["FAULTS_ENV", "FaultPlan", "FaultRule"]

#: Fault rules an emulator reads at start (see :meth:`FaultPlan.parse`).
FAULTS_ENV = "SANDBOXNB_EMULATOR_FAULTS"
_KEYS = ("times", "every", "retry_after", "message")


@dataclass
class FaultRule:
    """One rule: fail ``times`` calls (``None``: no limit) of ``target``, each ``every``-th."""

    target: str
    error: str
    times: int | None = 1
    every: int = 1
    retry_after: float | None = None
    message: str = ""
    seen: int = field(default=0, compare=False)
    injected: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if not self.target or not self.error:
            raise ValueError(f"fault rule {self.target!r}={self.error!r}: target and error are "
                             "required (e.g. 'SandboxCreateV2=RESOURCE_EXHAUSTED')")
        if self.times is not None and self.times < 0:
            raise ValueError(f"fault rule times = {self.times!r}: expected an int >= 0 or None")
        if self.every < 1:
            raise ValueError(f"fault rule every = {self.every!r}: expected an int >= 1")
        if self.retry_after is not None and not (0 <= self.retry_after < math.inf):
            raise ValueError(f"fault rule retry_after = {self.retry_after!r}: expected seconds "
                             ">= 0")

    @property
    def reset(self) -> bool:
        """Carry the request out, then cut the connection before answering."""
        return self.error.lower() == "reset"


class FaultPlan:
    """The fault rules of one emulator (thread-safe: tests add rules from their own thread)."""

    def __init__(self, rules: list[FaultRule] | None = None) -> None:
        self.rules: list[FaultRule] = list(rules or [])
        self._lock = threading.Lock()

    def add(self, target: str, error: str | int, *, times: int | None = 1, every: int = 1,
            retry_after: float | None = None, message: str = "") -> FaultRule:
        """Add a rule; returns it (its ``injected`` counts the calls it failed)."""
        rule = FaultRule(target, str(error), times, every, retry_after, message)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def take(self, target: str) -> FaultRule | None:
        """The rule that makes this call of ``target`` fail, if any (and count it)."""
        with self._lock:
            for rule in self.rules:
                if rule.target != target:
                    continue
                if rule.times is not None and rule.injected >= rule.times:
                    continue
                rule.seen += 1
                if rule.seen % rule.every == 0:
                    rule.injected += 1
                    return rule
        return None

    @property
    def injected(self) -> int:
        """Calls failed on purpose so far, over every rule."""
        with self._lock:
            return sum(rule.injected for rule in self.rules)

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Rules from ``TARGET=ERROR[:key=value,...][;...]``; keys: times (an int, or ``inf``),
        every, retry_after (seconds), message."""
        rules = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            target, sep, rest = part.partition("=")
            error, _, opts = rest.partition(":")
            if not sep or not error.strip():
                raise ValueError(f"{FAULTS_ENV}: rule {part!r}: expected TARGET=ERROR[:key=value"
                                 ",...], e.g. 'SandboxCreateV2=UNAVAILABLE:times=2'")
            kwargs: dict[str, object] = {}
            for opt in filter(None, (o.strip() for o in opts.split(","))):
                key, _, value = opt.partition("=")
                if key not in _KEYS:
                    raise ValueError(f"{FAULTS_ENV}: rule {part!r}: unknown key {key!r}; "
                                     f"accepted: {', '.join(_KEYS)}")
                if key == "times":
                    kwargs[key] = None if value == "inf" else int(value)
                elif key == "every":
                    kwargs[key] = int(value)
                elif key == "retry_after":
                    kwargs[key] = float(value)
                else:
                    kwargs[key] = value
            rules.append(FaultRule(target.strip(), error.strip(), **kwargs))  # type: ignore[arg-type]
        return cls(rules)

    @classmethod
    def from_env(cls) -> FaultPlan:
        """The rules in :data:`FAULTS_ENV` (none if unset)."""
        return cls.parse(os.environ.get(FAULTS_ENV, ""))

    def __repr__(self) -> str:
        return f"<FaultPlan {len(self.rules)} rule(s), {self.injected} injected>"
