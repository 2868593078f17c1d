"""One vocabulary of runtime options for every front end, derived from :class:`RuntimeConfig`.

Each leaf field of the config is one :class:`Option` in :data:`OPTIONS`: its name is the field's
own name (the keyword of :func:`~sandboxnb.config.config_from_flat` and of the launcher's form),
its flag is that name with dashes and without the ``_s`` (seconds) suffix, its help is the
field's description, and its path is where it lives in the config:

====================  ===========================  =====================
name                  path                         flag
====================  ===========================  =====================
``image``             ``image``                    ``--image``
``cpu``               ``resources.cpu``            ``--cpu``
``memory_mb``         ``resources.memory_mb``      ``--memory-mb``
``disk_mb``           ``resources.disk_mb``        ``--disk-mb``
``gpu``               ``resources.gpu``            ``--gpu``
``startup_timeout_s`` ``limits.startup_timeout_s`` ``--startup-timeout``
``run_timeout_s``     ``limits.run_timeout_s``     ``--run-timeout``
``idle_timeout_s``    ``limits.idle_timeout_s``    ``--idle-timeout``
====================  ===========================  =====================

The CLI (``sandboxnb run``), the magics (``%sandbox launch``/``run``, ``%%sandbox``) and the
launcher widget declare their runtime options from this table and turn what was given into a
config with :func:`config_from_options`, so a word means the same thing everywhere and a new
config field appears in all three by itself.

Text values (flags, form fields) go through :meth:`Option.parse`: ``none`` means ``None``, which
is no limit for a limit and the provider's default for anything else; a bad value raises
:class:`~sandboxnb.errors.ConfigError` naming the field, the value and what is accepted.

The per-rollout deadline is an engine option, not a config field: ``--rollout-timeout``
(:func:`add_rollout_timeout`), the same in the CLI and the magics.
"""

from __future__ import annotations

import argparse
import builtins
import difflib
import keyword
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sandboxnb.config import FLAT_FIELDS, RuntimeConfig, merge_config, overrides_from_flat
from sandboxnb.errors import ConfigError

__all__ = [
    "OPTIONS",
    "ROLLOUT_TIMEOUT_FLAG",
    "Option",
    "add_removed_timeout",
    "add_rollout_timeout",
    "add_runtime_arguments",
    "check_variable_name",
    "config_from_options",
    "did_you_mean",
    "explain_usage_error",
    "given",
    "option",
    "parse_count",
    "parse_globs",
    "parse_seconds",
]

#: Upper bound of ``max_concurrent`` and ``repeats`` (a typo such as 1e9 is refused, not planned).
MAX_COUNT = 10_000

#: Title of the argparse group that holds the runtime options (tests look for it).
GROUP_TITLE = "runtime options"
#: The engine's per-rollout deadline flag (CLI and magics); ``timeout_s`` of ``sandboxnb.run``.
ROLLOUT_TIMEOUT_FLAG = "--rollout-timeout"

_NONE_MEANS = {"limits": "no limit"}
_NONE_DEFAULT = "the provider's default"


@dataclass(frozen=True)
class Option:
    """One runtime option: a leaf field of :class:`RuntimeConfig` as every front end shows it."""

    name: str  #: flat name: the field's own name (``memory_mb``)
    path: str  #: dotted config path (``resources.memory_mb``)
    flag: str  #: command-line flag (``--memory-mb``)
    kind: type  #: what text is converted to before validation: ``float``, ``int`` or ``str``
    description: str  #: the pydantic field description
    default: Any  #: the config's default (``None``: unset)
    none_means: str  #: what ``None`` (``none``) means for this field
    bound: str = ""  #: the numeric bound, e.g. ``"> 0"``

    @property
    def metavar(self) -> str:
        if self.name.endswith("_s"):
            return "SECONDS"
        if self.name.endswith("_mb"):
            return "MIB"
        return "N" if self.kind in (int, float) else self.name.upper()

    @property
    def accepted(self) -> str:
        """What a value may be, for error messages."""
        if self.kind is float:
            what = f"a number {self.bound}".rstrip()
        elif self.kind is int:
            what = f"an integer {self.bound}".rstrip()
        else:
            what = self.description
        return f"{what}, or none ({self.none_means})"

    @property
    def default_text(self) -> str:
        if self.default is None:
            return self.none_means
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    @property
    def help(self) -> str:
        text = self.description
        if self.default is not None:
            text += f"; default {self.default_text}"
        return f"{text}; none: {self.none_means}"

    def parse(self, value: Any) -> Any:
        """A flag's or form field's value -> the field's value (``"none"`` -> ``None``),
        validated against the config model. Raises :class:`ConfigError` naming the field, the
        value and what is accepted."""
        if isinstance(value, str):
            text = value.strip()
            if text.lower() == "none":
                return None
            if self.kind is str:
                parsed: Any = text
            else:
                number = _ascii_number(text, self.kind)
                if number is None or not math.isfinite(number):
                    raise ConfigError(f"{self.path} = {value!r}: expected {self.accepted} "
                                      "(ASCII digits)")
                parsed = number
            try:
                config_from_options({self.name: parsed})  # the model's own checks, e.g. > 0
            except ConfigError as err:
                if self.kind is str:  # name the text as typed, then what the model said
                    raise ConfigError(f"{self.path} = {value!r}: {err}") from err
                raise ConfigError(f"{self.path} = {value!r}: expected {self.accepted}") from err
            return parsed
        if value is not None:
            config_from_options({self.name: value})
        return value


def _value_kind(annotation: Any) -> type:
    """``float | None`` -> float; a structured value such as ``GPU | None`` is given as text."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (
        annotation,
    )
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) == 1 and kinds[0] in (float, int, str):
        return kinds[0]
    return str


def _bound(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None:
                shown = int(value) if float(value).is_integer() else value
                found.append(f"{sign} {shown}")
    return " and ".join(found)


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def _build() -> tuple[Option, ...]:
    found = []
    for name, path in FLAT_FIELDS.items():
        model: type[BaseModel] = RuntimeConfig
        for group in path[:-1]:
            model = model.model_fields[group].annotation
        info = model.model_fields[name]
        if not info.description:
            raise ConfigError(f"RuntimeConfig field {'.'.join(path)} has no description")
        found.append(Option(
            name=name,
            path=".".join(path),
            flag=_flag(name),
            kind=_value_kind(info.annotation),
            description=info.description,
            default=info.default,
            none_means=_NONE_MEANS.get(path[0], _NONE_DEFAULT),
            bound=_bound(info.metadata),
        ))
    return tuple(found)


#: Every runtime option, in config order.
OPTIONS: tuple[Option, ...] = _build()
_BY_NAME = {opt.name: opt for opt in OPTIONS}


def option(name: str) -> Option:
    """The option called ``name`` (``"memory_mb"``)."""
    if name not in _BY_NAME:
        raise ConfigError(
            f"unknown runtime option {name!r}; accepted: {', '.join(_BY_NAME)}"
        )
    return _BY_NAME[name]


def config_from_options(
    values: Mapping[str, Any], base: RuntimeConfig | None = None
) -> RuntimeConfig:
    """Apply ``values`` (option name -> value) to ``base``: every key given is applied, and
    ``None`` clears its field (no limit, or the provider's default). Raises :class:`ConfigError`."""
    return merge_config(base, overrides_from_flat(values))


# ---- argparse: the CLI and the magics ---------------------------------------------------------
def _argparse_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as err:  # argparse shows it as "argument --flag: <message>"
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def add_runtime_arguments(parser: argparse.ArgumentParser) -> Any:
    """Add one flag per :data:`OPTIONS` entry, in a group of its own. A flag not given is absent
    from the parsed namespace (see :func:`given`), so it never overrides a default."""
    group = parser.add_argument_group(
        GROUP_TITLE, "the sandbox's config; 'none' sets a field to None"
    )
    for opt in OPTIONS:
        group.add_argument(
            opt.flag, dest=opt.name, type=_argparse_type(opt.parse, opt.name),
            default=argparse.SUPPRESS, metavar=opt.metavar, help=opt.help.replace("%", "%%"),
        )
    add_removed_timeout(parser)
    return group


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime options present in ``args`` (``None`` where ``none`` was given)."""
    return {opt.name: getattr(args, opt.name) for opt in OPTIONS if hasattr(args, opt.name)}


_NUMBER_TEXT = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$|^[+-]?(inf|nan)$",
                          re.IGNORECASE)


def _ascii_number(text: str, kind: type) -> Any:
    """``kind(text)`` for plain ASCII number text, else None (``int("٣")`` is 3 in Python,
    and ``float("1_0")`` is 10: neither is what anyone means on a command line)."""
    if not _NUMBER_TEXT.match(text):
        return None
    try:
        return kind(text)
    except ValueError:
        return None


def parse_count(value: Any, name: str, maximum: int | None = MAX_COUNT, *,
                text: bool = False) -> int:
    """An integer >= 1 (and <= ``maximum``); ``text=True`` also takes a flag's text (ASCII
    digits). Raises :class:`ConfigError` naming ``name``, the value and what is accepted."""
    bound = f" and <= {maximum}" if maximum is not None else ""
    if isinstance(value, str) and text:
        number = _ascii_number(value.strip(), int)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if number is None or number < 1 or (maximum is not None and number > maximum):
        digits = " (ASCII digits)" if text else ""
        raise ConfigError(f"{name} = {value!r}: expected an integer >= 1{bound}{digits}")
    return number


def parse_globs(value: str, name: str = "tasks") -> list[str]:
    """Comma-separated task id globs (``"HumanEval/1*,HumanEval/2"``), at least one."""
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    if not patterns:
        raise ConfigError(f"{name} = {value!r}: expected task id globs, comma-separated "
                          "(e.g. 'HumanEval/1*,HumanEval/2')")
    return patterns


def check_variable_name(value: str, field: str) -> str:
    """``value`` if it can become a notebook variable without hiding a Python builtin."""
    if keyword.iskeyword(value) or keyword.issoftkeyword(value):
        raise ConfigError(f"{field} {value!r} is a Python keyword; expected a variable name "
                          "that is not a keyword or a builtin (e.g. sb1, box)")
    if not value.isidentifier() or not value.isascii():
        raise ConfigError(f"{field} {value!r} is not a valid Python identifier; expected a "
                          "Python variable name (e.g. sb1, box)")
    if hasattr(builtins, value):
        raise ConfigError(f"{field} {value!r} shadows the Python builtin {value}(); expected a "
                          "variable name that is not a keyword or a builtin (e.g. sb1, box)")
    if value in RESERVED_NAMES:
        raise ConfigError(f"{field} {value!r} would replace {RESERVED_NAMES[value]}; expected "
                          "another variable name (e.g. sb1, box, df)")
    return value


#: Notebook names a sandbox or a DataFrame must not replace, and what they hold.
RESERVED_NAMES = {
    "_sandbox_run": "the last run (set by %sandbox run)",
    "_sandbox_doctor": "the last doctor report",
    "sandboxnb": "the sandboxnb module",
    "In": "IPython's input history", "Out": "IPython's output history",
    "get_ipython": "IPython's shell accessor",
}


def did_you_mean(value: Any, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flags_of(parser: argparse.ArgumentParser) -> list[str]:
    flags = [f for f in parser._option_string_actions if f.startswith("--")]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags += _flags_of(sub)
    return sorted(set(flags))


def explain_usage_error(parser: argparse.ArgumentParser, message: str) -> str:
    """An argparse error with a did-you-mean for an unknown flag or subcommand."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = _flags_of(parser)
        hints = []
        for word in unknown.group(1).split():
            if word.startswith("-"):
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6)
                hints.append(f"{word} (did you mean {close[0]}?)" if close else word)
        if hints:
            return (f"{message}; not an option here: {', '.join(hints)}; see "
                    f"{parser.prog} --help")
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice.group(2))
        return message + did_you_mean(choice.group(1), choices)
    return message


def parse_seconds(value: Any, name: str = "timeout_s") -> float | None:
    """A number of seconds > 0, or ``none``/``None`` (no deadline)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str):
        seconds = _ascii_number(value.strip(), float)
        seconds = math.nan if seconds is None else seconds
    else:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{name} = {value!r}: expected a number of seconds > 0 and finite, "
                          "or none (ASCII digits)")
    return seconds


def count_type(name: str, maximum: int | None = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type`` for an integer >= 1 (``--max-concurrent``, ``--repeats``)."""
    return _argparse_type(lambda value: parse_count(value, name, maximum, text=True), "count")


def add_rollout_timeout(parser: argparse.ArgumentParser) -> None:
    """``--rollout-timeout``: the engine's per-rollout deadline (``timeout_s``), parsed into
    ``args.rollout_timeout_s``."""
    parser.add_argument(
        ROLLOUT_TIMEOUT_FLAG, dest="rollout_timeout_s", default=None, metavar="SECONDS",
        type=_argparse_type(lambda text: parse_seconds(text, "rollout_timeout_s"), "seconds"),
        help="per-rollout deadline in seconds for task setup, agent and grading once the sandbox "
             "is up (the row's status becomes 'timeout'); an engine option, not a sandbox limit "
             "(see --run-timeout); none: no deadline (the default)",
    )


class _Removed(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(
            f"{option_string} is ambiguous and no longer accepted: use --run-timeout SECONDS "
            f"(sandbox lifetime cap, limits.run_timeout_s) or {ROLLOUT_TIMEOUT_FLAG} SECONDS "
            "(per-rollout deadline of a run)"
        )


def add_removed_timeout(parser: argparse.ArgumentParser) -> None:
    """A hidden ``--timeout`` that fails with a pointer to the two options it could mean."""
    if "--timeout" not in parser._option_string_actions:
        parser.add_argument("--timeout", action=_Removed, nargs="?", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
