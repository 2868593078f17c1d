"""Provider registry: names -> provider classes, built in and from the ``sandboxnb.providers``
entry-point group (so a third party can add one without touching this package)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from sandboxnb.errors import ConfigError
from sandboxnb.providers.base import Availability, Endpoint, Provider, ProviderError

__all__ = [
    "BUILTIN",
    "Availability",
    "Endpoint",
    "Provider",
    "ProviderError",
    "describe_providers",
    "get_provider",
    "provider_class",
    "provider_names",
]

#: Built-in providers, imported lazily so a missing optional SDK never breaks the others.
BUILTIN: dict[str, str] = {
    "local": "sandboxnb.providers.local:LocalProvider",
    "docker": "sandboxnb.providers.docker:DockerProvider",
    "modal": "sandboxnb.providers.modal:ModalProvider",
    "daytona": "sandboxnb.providers.daytona:DaytonaProvider",
}


def _registered() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="sandboxnb.providers"):
        found.setdefault(ep.name, ep.value)
    return found


def provider_names() -> list[str]:
    """Every provider name known here (built in first, then plug-ins)."""
    return list(_registered())


def provider_class(name: str) -> type[Provider]:
    """Import and return the class registered under ``name``."""
    registered = _registered()
    if name not in registered:
        from sandboxnb.options import did_you_mean

        raise ConfigError(
            f"runtime = {name!r} is not a known provider{did_you_mean(name, list(registered))}; "
            f"accepted: {', '.join(registered)}"
        )
    module_name, _, attr = registered[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get_provider(runtime: str | Provider, **options: Any) -> Provider:
    """Return a provider instance from a name (``"local"``) or pass an instance through."""
    if isinstance(runtime, Provider):
        if options:
            raise ConfigError("provider options can only be given with a provider name")
        return runtime
    if not isinstance(runtime, str):
        raise ConfigError(
            f"runtime = {runtime!r}: expected a provider name ({', '.join(_registered())}) "
            "or a Provider instance"
        )
    return provider_class(runtime)(**options)


def describe_providers() -> list[dict[str, Any]]:
    """One row per registered provider: name, availability, the reason when unavailable, the
    fields it honours here and a description. A provider whose optional SDK is missing is
    reported unavailable with the extra to install, never raised."""
    rows = []
    for name in provider_names():
        try:
            cls = provider_class(name)
            status = cls.availability()
            try:  # an instance knows what this machine lets it honour (local: cgroup cpu)
                supported = cls().supported
            except Exception:
                supported = cls.supported
        except Exception as err:  # ImportError of an optional SDK, or a broken plug-in
            rows.append({
                "provider": name, "available": False, "supports": "",
                "reason": f"cannot import: {err} (try: pip install 'sandboxnb[{name}]')",
                "transport": "", "description": "",
            })
            continue
        rows.append({
            "provider": name,
            "available": bool(status.available),
            "supports": ", ".join(sorted(supported)),
            "reason": "" if status.available else status.reason,
            "transport": getattr(cls, "transport", ""),
            "description": getattr(cls, "description", ""),
        })
    return rows
