"""Interactive sandboxes: ``async with launch("local", cpu=1) as sb`` and ``attach(url, token)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sandboxnb.config import FLAT_FIELDS, RuntimeConfig, merge_config, overrides_from_flat
from sandboxnb.errors import ConfigError
from sandboxnb.providers import Provider, get_provider

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox

__all__ = ["attach", "launch", "resolve_launch"]


def resolve_launch(
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | None = None,
    **options: Any,
) -> tuple[Provider, RuntimeConfig]:
    """Split ``options`` into config fields and provider options; validate both, start nothing."""
    flat = {k: v for k, v in options.items() if k in FLAT_FIELDS}
    provider_options = {k: v for k, v in options.items() if k not in FLAT_FIELDS}
    try:
        provider = get_provider(runtime, **provider_options)
    except TypeError as err:
        raise ConfigError(
            f"{runtime!r} does not accept option(s) {', '.join(provider_options)}: {err}; "
            f"runtime options are {', '.join(FLAT_FIELDS)}"
        ) from None
    # a keyword given explicitly as None means None (no limit), as everywhere else
    return provider, provider.check(merge_config(config, overrides_from_flat(flat)))


@asynccontextmanager
async def launch(
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | None = None,
    **options: Any,
) -> AsyncIterator[Sandbox]:
    """Start a fresh sandbox and yield a connected :class:`~sandboxnb.client.Sandbox`.

    ``options`` are runtime options (``image``, ``cpu``, ``memory_mb``, ``disk_mb``, ``gpu``,
    ``startup_timeout_s``, ``run_timeout_s``, ``idle_timeout_s``: see
    :data:`sandboxnb.config.FLAT_FIELDS`) or provider options. The sandbox is released when the
    block exits, however it exits.
    """
    provider, effective = resolve_launch(runtime, config=config, **options)
    try:
        async with provider.open(effective) as sandbox:
            yield sandbox
    finally:
        if not isinstance(runtime, Provider):
            await provider.aclose()


@asynccontextmanager
async def attach(url: str, token: str) -> AsyncIterator[Sandbox]:
    """Connect to an already running sandbox server; the server is left running on exit."""
    from sandboxnb.client import connect

    sandbox = await connect(url, token=token)
    try:
        yield sandbox
    finally:
        await sandbox.close()
