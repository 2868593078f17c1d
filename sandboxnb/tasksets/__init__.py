"""Taskset registry: names -> loaders, built in and from the ``sandboxnb.tasksets`` entry-point
group, so another package adds a taskset without touching this one::

    [project.entry-points."sandboxnb.tasksets"]
    mybench = "mypackage.bench:load"      # a callable returning a Taskset (or a list of tasks)

``sandboxnb.run("mybench", ...)`` / ``sandboxnb run mybench`` then find it by name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from sandboxnb.tasks import TaskError, Taskset

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BUILTIN", "GROUP", "load_taskset", "taskset_loader", "taskset_names"]

GROUP = "sandboxnb.tasksets"

#: Built-in tasksets ("module:callable"), imported only when used.
BUILTIN: dict[str, str] = {
    "humaneval": "sandboxnb.tasksets.humaneval:load",
}


def _registered() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def taskset_names() -> list[str]:
    """Every registered taskset name (built in first, then plug-ins)."""
    return list(_registered())


def taskset_loader(name: str) -> Callable[[], object]:
    """The loader registered under ``name``; :class:`TaskError` listing the accepted names."""
    registered = _registered()
    if name not in registered:
        from sandboxnb.options import did_you_mean

        raise TaskError(
            f"taskset = {name!r} is not a registered taskset nor a path ending in .json or "
            f".jsonl{did_you_mean(name, list(registered))}; accepted: {', '.join(registered)}, "
            "or a .json/.jsonl file"
        )
    module_name, _, attr = registered[name].partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise TaskError(
            f"taskset = {name!r}: its loader {registered[name]!r} cannot be imported: {err}"
        ) from None
    if not callable(target):
        raise TaskError(f"taskset = {name!r}: {registered[name]!r} is not callable")
    return target


def load_taskset(name: str) -> Taskset:
    """Load the registered taskset ``name`` (its loader may return a Taskset or a task list)."""
    loaded = taskset_loader(name)()
    if isinstance(loaded, Taskset):
        return loaded
    try:
        return Taskset(loaded, name)  # type: ignore[arg-type]
    except TypeError:
        raise TaskError(
            f"taskset = {name!r}: its loader returned {type(loaded).__name__}, "
            "expected a Taskset or a list of tasks"
        ) from None
