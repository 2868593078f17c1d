"""The launcher's form logic in plain Python (no ipywidgets import): validating form values
field by field and launching/stopping through the sandbox manager. Tests call it directly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandboxnb.config import ConfigError, UnsupportedFieldError, config_from_flat
from sandboxnb.notebook.reprs import provider_rows
from sandboxnb.notebook.sandboxes import SandboxManager, SandboxRecord, manager, validate_launch

__all__ = ["LauncherController"]

# config field (dotted or flat) -> form field that shows its message
_FIELD_OF = {
    "image": "image",
    "cpu": "cpu",
    "resources.cpu": "cpu",
    "memory_mb": "memory_mb",
    "resources.memory_mb": "memory_mb",
    "gpu": "gpu_type",
    "resources.gpu": "gpu_type",
    "resources.gpu.type": "gpu_type",
    "resources.gpu.count": "gpu_count",
    "timeout": "timeout",
    "limits.run_timeout_s": "timeout",
}


class LauncherController:
    """Validates launcher form values and starts/stops sandboxes through the shared manager."""

    def __init__(self, manager_: SandboxManager | None = None) -> None:
        self.manager = manager_ or manager()
        self.providers = provider_rows()

    def provider_info(self, name: str) -> dict[str, Any] | None:
        return next((row for row in self.providers if row["provider"] == name), None)

    @staticmethod
    def flat(values: Mapping[str, Any]) -> dict[str, Any]:
        """Form values -> flat runtime options (empty/zero optional fields mean "default")."""
        image = (values.get("image") or "").strip() or None
        gpu_type = (values.get("gpu_type") or "").strip()
        gpu = f"{gpu_type}:{values.get('gpu_count')}" if gpu_type else None
        timeout = values.get("timeout")
        return {
            "image": image,
            "cpu": values.get("cpu"),
            "memory_mb": values.get("memory_mb"),
            "gpu": gpu,
            "timeout": timeout if timeout not in (None, 0, 0.0) else None,
        }

    def validate(self, values: Mapping[str, Any]) -> dict[str, str]:
        """``{form field: message}`` for every problem; empty when the launch may go ahead."""
        errors: dict[str, str] = {}
        provider = values.get("provider") or ""
        info = self.provider_info(provider)
        if info is None:
            known = ", ".join(r["provider"] for r in self.providers)
            errors["provider"] = f"provider = {provider!r} is not known; accepted: {known}"
        elif not info["available"]:
            errors["provider"] = f"{provider} is unavailable here: {info['reason']}"
        gpu_type = (values.get("gpu_type") or "").strip()
        count = values.get("gpu_count")
        if gpu_type and (not isinstance(count, int) or count < 1):
            errors["gpu_count"] = f"GPU count = {count!r}: expected an integer >= 1"
        flat = self.flat(values)
        for key, value in flat.items():
            if value is None or _FIELD_OF[key] in errors:
                continue
            try:
                config_from_flat(**{key: value})
            except ConfigError as err:
                errors[_FIELD_OF[key]] = _strip_prefix(str(err))
        if errors:
            return errors
        try:
            validate_launch(provider, **flat)
        except UnsupportedFieldError as err:
            errors[_FIELD_OF.get(err.field, "provider")] = str(err)
        except (ConfigError, ValueError, TypeError) as err:
            errors[_guess_field(str(err))] = _strip_prefix(str(err))
        return errors

    def launch(self, values: Mapping[str, Any], name: str | None = None) -> SandboxRecord:
        """Validate, then start a sandbox without waiting; ValueError (with the per-field
        messages) if the form is invalid, so nothing starts."""
        errors = self.validate(values)
        if errors:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        record = self.manager.prepare(values["provider"], name, **self.flat(values))
        self.manager.start(record)
        return record

    def stop(self, name: str) -> None:
        """Ask a sandbox to stop (returns at once; the table updates when it is gone)."""
        self.manager.request_stop(name)


def _strip_prefix(message: str) -> str:
    return message.removeprefix("invalid runtime config: ")


def _guess_field(message: str) -> str:
    for key, form_field in _FIELD_OF.items():
        if "." in key and key in message:
            return form_field
    return "provider"
