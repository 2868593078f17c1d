"""The launcher's form logic in plain Python (no ipywidgets import): validating form values
field by field and launching/stopping through the sandbox manager. Tests call it directly."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, UnsupportedFieldError
from sandboxnb.notebook.reprs import provider_rows
from sandboxnb.notebook.sandboxes import (
    SandboxManager,
    SandboxRecord,
    config_difference,
    manager,
    validate_launch,
)
from sandboxnb.options import OPTIONS, check_variable_name, config_from_options

__all__ = ["FORM_FIELDS", "LauncherController"]

#: Launcher form fields, in display order: the provider, the sandbox's name (also its variable),
#: then one per runtime option (:data:`sandboxnb.options.OPTIONS`), named like the option
#: (``memory_mb``, ``run_timeout_s``).
FORM_FIELDS = ("provider", "name", *(opt.name for opt in OPTIONS))


def _field_of(path: str) -> str | None:
    """The form field of a dotted config path (``resources.gpu.count`` -> ``gpu``)."""
    for opt in OPTIONS:
        if path == opt.path or path.startswith(opt.path + "."):
            return opt.name
    return None


class LauncherController:
    """Validates launcher form values and starts/stops sandboxes through the shared manager.

    Form values are text, parsed like the flags of the CLI and the magics: an empty field leaves
    the option to the config (its default), ``none`` sets it to None (no limit, or the
    provider's default).
    """

    def __init__(self, manager_: SandboxManager | None = None) -> None:
        self.manager = manager_ or manager()
        self.providers = provider_rows()

    def provider_info(self, name: str) -> dict[str, Any] | None:
        return next((row for row in self.providers if row["provider"] == name), None)

    def unsupported(self, provider: str) -> dict[str, str]:
        """``{option name: why}`` for every runtime option ``provider`` does not honour (its
        ``supported`` fields, as :func:`~sandboxnb.config.check_supported` applies them)."""
        info = self.provider_info(provider)
        if info is None or not info["supports"]:
            return {}
        supported = {part.strip() for part in info["supports"].split(",")}
        return {
            opt.name: f"{provider} does not support {opt.path}; it honours: "
                      f"{', '.join(sorted(supported))}"
            for opt in OPTIONS
            if opt.path not in supported and opt.path.split(".", 1)[0] not in supported
        }

    @staticmethod
    def parse(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Form values -> (the runtime options given, ``{form field: message}`` for the ones
        that do not parse). Empty fields are left out."""
        given: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for opt in OPTIONS:
            value = values.get(opt.name)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            try:
                given[opt.name] = opt.parse(value)
            except ConfigError as err:
                errors[opt.name] = _strip_prefix(str(err))
        return given, errors

    def config(self, values: Mapping[str, Any]) -> RuntimeConfig:
        """The runtime config the form describes; ConfigError if a field is invalid."""
        given, errors = self.parse(values)
        if errors:
            raise ConfigError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        return config_from_options(given)

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
        name = (values.get("name") or "").strip()
        if name:
            try:
                check_variable_name(name, "name")
            except ConfigError as err:
                errors["name"] = str(err)
        given, field_errors = self.parse(values)
        errors.update(field_errors)
        if errors:
            return errors
        try:
            _, config = validate_launch(provider, config_from_options(given))
        except UnsupportedFieldError as err:
            errors[_field_of(err.field) or "provider"] = str(err)
            return errors
        except ConfigError as err:
            errors[_guess_field(str(err))] = _strip_prefix(str(err))
            return errors
        running = self.manager.get(name) if name else None
        if running is not None and (running.provider, running.config) != (provider, config):
            differs = (f"provider={running.provider}" if running.provider != provider
                       else config_difference(running.config, config))
            errors["name"] = (f"{name} is already running with another configuration "
                              f"({differs}); stop it first or pick another name")
        return errors

    def launch(self, values: Mapping[str, Any], name: str | None = None,
               namespace: MutableMapping[str, Any] | None = None) -> SandboxRecord:
        """Validate, then start a sandbox without waiting; ConfigError (with the per-field
        messages) if the form is invalid, so nothing starts. ``name`` (else the form's
        ``name`` field, else sb1, sb2...) running with the same configuration is reused (the
        record returned is already started); with another configuration it is an error.
        ``namespace`` receives the sandbox's handle under its name once it runs."""
        errors = self.validate(values)
        if errors:
            raise ConfigError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        name = name or (values.get("name") or "").strip() or None
        try:
            record = self.manager.prepare(values["provider"], name, config=self.config(values),
                                          namespace=namespace)
        except ConfigError as err:
            raise ConfigError(str(err).replace("add --replace to stop it and launch a new one",
                                               "stop it first")) from None
        if record.job is None:
            self.manager.start(record)
        return record

    def stop(self, name: str) -> None:
        """Ask a sandbox to stop (returns at once; the table updates when it is gone); an
        ended one is removed from the table."""
        if self.manager.forget(name) is None:
            self.manager.request_stop(name)


def _strip_prefix(message: str) -> str:
    return message.removeprefix("invalid runtime config: ")


def _guess_field(message: str) -> str:
    """The field a provider's own check names (``modal limits.run_timeout_s = ...``)."""
    for opt in OPTIONS:
        if ("." in opt.path and opt.path in message) or f"{opt.path} =" in message:
            return opt.name
    return "provider"
