"""Runtime configuration: what a sandbox runs (image), with what (resources), for how long (limits).

Per-task overrides merge *field by field*: overriding ``resources.cpu`` keeps
``resources.memory_mb``; an explicit ``None`` clears a field. Every provider declares which
fields it honours, and :func:`check_supported` rejects a set field the provider cannot honour
before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sandboxnb.errors import ConfigError, UnsupportedFieldError

__all__ = [
    "FLAT_FIELDS",
    "GPU",
    "ConfigError",
    "Limits",
    "Resources",
    "RuntimeConfig",
    "UnsupportedFieldError",
    "check_supported",
    "config_from_flat",
    "merge_config",
    "overrides_from_flat",
]

_GPU_SPEC = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(?::\s*(\d+))?\s*$")


#: Upper bounds of every field: each limit has one (an infinite or absurd value is refused
#: before anything starts, instead of overflowing a backend call later).
MAX_CPU = 1024.0
MAX_GPUS = 64
MAX_MEMORY_MB = 16 * 1024 * 1024  # 16 TiB
MAX_DISK_MB = 64 * 1024 * 1024  # 64 TiB
MAX_SECONDS = 30 * 24 * 3600.0  # 30 days


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        """Validate; a bad value raises :class:`ConfigError` naming field, value and what is
        accepted (not pydantic's ValidationError). pydantic calls this for nested models too:
        only the outermost validation converts the error, so its fields keep their full path."""
        with _validating() as outermost:
            try:
                super().__init__(**data)
            except ValidationError as err:
                if not outermost:
                    raise
                prefix = {"Resources": "resources.", "Limits": "limits.",
                          "GPU": "resources.gpu."}.get(type(self).__name__, "")
                raise ConfigError(_format_validation_error(err, prefix)) from None


_DEPTH: ContextVar[int] = ContextVar("sandboxnb_config_depth", default=0)


@contextmanager
def _validating() -> Iterator[bool]:
    """Count nested validations; yields True for the outermost."""
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield _DEPTH.get() == 1
    finally:
        _DEPTH.reset(token)


class GPU(_Model):
    """A GPU request: a type such as ``"H100"`` and a count; also ``"H100"`` or ``"A10G:2"``."""

    type: str = Field(min_length=1)
    count: int = Field(1, ge=1, le=MAX_GPUS)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _GPU_SPEC.match(value)
            if not match:
                raise ConfigError(
                    f"GPU spec {value!r} is not of the form 'TYPE' or 'TYPE:COUNT' "
                    "(e.g. 'H100', 'A10G:2')"
                )
            return {"type": match.group(1), "count": int(match.group(2) or 1)}
        return value

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


class Resources(_Model):
    """Compute resources. ``None`` means the provider's default."""

    cpu: float | None = Field(
        None, ge=0.01, le=MAX_CPU, description="CPU cores (fractions allowed)")
    memory_mb: int | None = Field(None, ge=4, le=MAX_MEMORY_MB, description="memory limit in MiB")
    disk_mb: int | None = Field(None, ge=1, le=MAX_DISK_MB, description="disk size in MiB")
    gpu: GPU | None = Field(None, description="GPU: TYPE or TYPE:COUNT, e.g. H100 or A10G:2")

    @field_validator("cpu", "memory_mb", "disk_mb", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        return _refuse_bool(value)


#: The dead-man switch's default window: a sandbox server exits this long after its last
#: client is gone (a few heartbeats: clients send one every 3 s). See sandboxnb/providers/spec.py.
DEFAULT_IDLE_TIMEOUT_S = 15.0


class Limits(_Model):
    """Time limits, in seconds. ``None`` means no limit (or the provider's default)."""

    startup_timeout_s: float | None = Field(
        60.0, gt=0, le=MAX_SECONDS, description="acquire-to-ready deadline in seconds"
    )
    run_timeout_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS,
        description="sandbox lifetime cap in seconds: the sandbox is ended then"
    )
    idle_timeout_s: float | None = Field(
        DEFAULT_IDLE_TIMEOUT_S, gt=0, le=MAX_SECONDS,
        description="seconds without a connected client after which the sandbox server exits "
        "(the dead-man switch)",
    )

    @field_validator("startup_timeout_s", "run_timeout_s", "idle_timeout_s", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        return _refuse_bool(value)


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the bool {value!r}")
    return value


class RuntimeConfig(_Model):
    """Everything that decides what sandbox a rollout gets."""

    image: str | None = Field(
        None, min_length=1, description="image the sandbox runs (providers that run images)"
    )
    resources: Resources = Resources()
    limits: Limits = Limits()

    def merge(self, overrides: Mapping[str, Any] | RuntimeConfig | None) -> RuntimeConfig:
        """Return a copy with ``overrides`` applied field by field (see module docstring)."""
        return merge_config(self, overrides)

    def set_fields(self) -> dict[str, Any]:
        """The dotted names and values of every field that is set (not ``None``)."""
        found: dict[str, Any] = {}
        if self.image is not None:
            found["image"] = self.image
        for group in ("resources", "limits"):
            for name, value in getattr(self, group):
                if value is not None:
                    found[f"{group}.{name}"] = value
        return found

    def summary(self) -> dict[str, Any]:
        """Flat view used for result rows and tables."""
        res = self.resources
        return {
            "image": self.image,
            "cpu": res.cpu,
            "memory_mb": res.memory_mb,
            "gpu": str(res.gpu) if res.gpu else None,
        }


def _format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            msg = f"unknown field; accepted: {', '.join(_accepted_fields(parent))}"
        lines.append(f"{loc} = {item.get('input')!r}: {msg}")
    return "invalid runtime config: " + "; ".join(lines)


def _accepted_fields(parent: str) -> list[str]:
    model = {"": RuntimeConfig, "resources": Resources, "limits": Limits, "resources.gpu": GPU}.get(
        parent, RuntimeConfig
    )
    return [f"{parent + '.' if parent else ''}{name}" for name in model.model_fields]


def _validate(data: Any) -> RuntimeConfig:
    with _validating():
        try:
            return RuntimeConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err)) from None


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict) and key != "gpu":
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def merge_config(
    base: RuntimeConfig | None, overrides: Mapping[str, Any] | RuntimeConfig | None
) -> RuntimeConfig:
    """Merge ``overrides`` into ``base`` field by field; ``None`` values clear fields.

    A :class:`RuntimeConfig` given as ``overrides`` contributes only the fields that were set
    explicitly when it was built.
    """
    base = base or RuntimeConfig()
    if overrides is None:
        return base
    if isinstance(overrides, RuntimeConfig):
        overrides = overrides.model_dump(exclude_unset=True)
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"runtime overrides = {overrides!r}: expected a mapping such as "
            "{'resources': {'cpu': 2}} or a RuntimeConfig"
        )
    return _validate(_deep_merge(base.model_dump(), overrides))


def _leaf_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> dict[str, tuple[str, ...]]:
    """Leaf field name -> its path, walking nested groups (a GPU is one value, not a group)."""
    found: dict[str, tuple[str, ...]] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            leaves = _leaf_fields(kind, (*prefix, name))
        else:
            leaves = {name: (*prefix, name)}
        for leaf, path in leaves.items():
            if leaf in found:  # flat names (CLI flags, keywords) must stay unambiguous
                raise ConfigError(f"RuntimeConfig leaf field {leaf!r} is not unique")
            found[leaf] = path
    return found


#: Flat runtime option name (a leaf field's own name) -> its path in :class:`RuntimeConfig`,
#: derived from the models: ``{"cpu": ("resources", "cpu"), "run_timeout_s": ("limits", ...)}``.
FLAT_FIELDS: dict[str, tuple[str, ...]] = _leaf_fields(RuntimeConfig)


def _flat_path(key: str, value: Any) -> tuple[str, ...]:
    if key not in FLAT_FIELDS:
        raise ConfigError(
            f"unknown runtime option {key}={value!r}; accepted: {', '.join(FLAT_FIELDS)}"
        )
    return FLAT_FIELDS[key]


def overrides_from_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest flat options (``{"cpu": 2, "run_timeout_s": None}``) into config overrides; every key
    is kept, so ``None`` clears its field when merged (see :func:`merge_config`)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = _flat_path(key, value)
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def config_from_flat(base: RuntimeConfig | None = None, **flat: Any) -> RuntimeConfig:
    """Build a config from flat keywords (``cpu=2, memory_mb=512, gpu="A10G:2",
    run_timeout_s=600``), one per leaf field of :class:`RuntimeConfig` (see :data:`FLAT_FIELDS`).

    Keywords whose value is ``None`` are ignored (left to ``base``); to clear a field, merge
    :func:`overrides_from_flat` or use :func:`sandboxnb.options.config_from_options`.
    """
    for key, value in flat.items():
        _flat_path(key, value)
    return merge_config(
        base, overrides_from_flat({k: v for k, v in flat.items() if v is not None})
    )


def check_supported(provider: str, supported: Iterable[str], config: RuntimeConfig) -> None:
    """Raise :class:`UnsupportedFieldError` for the first set field ``provider`` cannot honour.

    ``supported`` holds dotted names (``"resources.cpu"``); a group name (``"limits"``) covers all
    of its fields.
    """
    supported = set(supported)
    for field, value in config.set_fields().items():
        group = field.split(".", 1)[0]
        if field not in supported and group not in supported:
            raise UnsupportedFieldError(provider, field, value, supported)
