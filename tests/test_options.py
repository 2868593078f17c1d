"""One vocabulary for every front end: the runtime option table is derived from RuntimeConfig,
and the CLI, the magics and the launcher expose exactly that table; one exception root."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

import sandboxnb
from sandboxnb import cli, errors, options
from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError
from sandboxnb.options import GROUP_TITLE, OPTIONS, config_from_options, option

ROOT = Path(__file__).resolve().parent.parent


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field of a config model, walked here independently of the table."""
    found = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += _leaf_paths(kind, f"{prefix}{name}.")
        else:
            found.append(prefix + name)
    return found


def test_table_is_derived_from_every_config_field():
    assert [opt.path for opt in OPTIONS] == _leaf_paths(RuntimeConfig)
    assert {opt.name: opt.flag for opt in OPTIONS} == {
        "image": "--image",
        "cpu": "--cpu",
        "memory_mb": "--memory-mb",
        "disk_mb": "--disk-mb",
        "gpu": "--gpu",
        "startup_timeout_s": "--startup-timeout",
        "run_timeout_s": "--run-timeout",
        "idle_timeout_s": "--idle-timeout",
    }
    for opt in OPTIONS:
        group, _, leaf = opt.path.rpartition(".")
        model = RuntimeConfig.model_fields[group].annotation if group else RuntimeConfig
        assert opt.name == leaf
        assert opt.help.startswith(model.model_fields[leaf].description)
    assert option("run_timeout_s").none_means == "no limit"
    assert option("cpu").kind is float and option("memory_mb").kind is int


def test_readme_table_is_the_table():
    rows = re.findall(r"^\| `(\w+)` \| `(--[\w-]+)` \| `([\w.]+)` \|$",
                      (ROOT / "README.md").read_text(), re.MULTILINE)
    assert rows == [(opt.name, opt.flag, opt.path) for opt in OPTIONS]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _runtime_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags of the parser's runtime option group; also checks that no other action of the
    parser feeds a config field (a hand-kept duplicate)."""
    (group,) = [g for g in parser._action_groups if g.title == GROUP_TITLE]
    names = {opt.name for opt in OPTIONS}
    for action in parser._actions:
        if action.dest in names:
            assert action in group._group_actions, action.option_strings
    return {flag for action in group._group_actions for flag in action.option_strings}


def _front_end_parsers() -> dict[str, argparse.ArgumentParser]:
    from sandboxnb.notebook.magics import CELL_PARSER, LINE_PARSER

    return {
        "sandboxnb run": _subparser(cli._build_parser(), "run"),
        "%sandbox launch": _subparser(LINE_PARSER, "launch"),
        "%sandbox run": _subparser(LINE_PARSER, "run"),
        "%%sandbox": CELL_PARSER,
    }


def test_cli_magics_and_launcher_expose_exactly_the_table():
    from sandboxnb.notebook.form import FORM_FIELDS, LauncherController
    from sandboxnb.notebook.magics import SandboxMagics
    from sandboxnb.notebook.widgets import Launcher

    flags = {opt.flag for opt in OPTIONS}
    names = [opt.name for opt in OPTIONS]
    for front_end, parser in _front_end_parsers().items():
        assert _runtime_flags(parser) == flags, front_end
    # the launcher: the provider, the sandbox's name, then one field per option, named like
    # the option, in table order
    assert list(FORM_FIELDS) == ["provider", "name", *names]
    ui = Launcher(LauncherController())
    try:
        assert list(ui.fields) == names
        disabled = {name for name, field in ui.fields.items() if field.disabled}
        assert set(ui.values()) | disabled == set(FORM_FIELDS)  # unhonoured ones are left out
        assert set(ui.errors) == set(FORM_FIELDS)
    finally:
        ui.close()
    # the magics' settings: a default for every option
    traits = set(SandboxMagics.class_trait_names(config=True))
    assert {f"default_{name}" for name in names} <= traits
    assert not {t for t in traits if t.startswith("default_")} - {
        f"default_{name}" for name in names} - {"default_provider"}


def test_rollout_deadline_has_one_name_and_timeout_is_gone():
    parsers = _front_end_parsers()
    for front_end in ("sandboxnb run", "%sandbox run"):
        parser = parsers[front_end]
        (action,) = [a for a in parser._actions if options.ROLLOUT_TIMEOUT_FLAG in a.option_strings]
        assert action.dest == "rollout_timeout_s", front_end
    for front_end, parser in parsers.items():
        visible = {f for a in parser._actions if a.help != argparse.SUPPRESS
                   for f in a.option_strings}
        assert "--timeout" not in visible, front_end


@pytest.mark.parametrize(
    ("text", "value"),
    [("none", None), ("None", None), (" 5 ", 5.0), ("0.5", 0.5)],
)
def test_parse_text_values(text, value):
    assert option("run_timeout_s").parse(text) == value
    assert option("cpu").parse(text) == value


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("cpu", "abc", "resources.cpu = 'abc': expected a number >= 0.01 and <= 1024, or none"),
        ("cpu", "-1", "resources.cpu = '-1': expected a number >= 0.01 and <= 1024"),
        ("memory_mb", "1.5",
         "resources.memory_mb = '1.5': expected an integer >= 4 and <= 16777216, or none"),
        ("disk_mb", "0", "resources.disk_mb = '0': expected an integer >= 1"),
        ("run_timeout_s", "nan", "limits.run_timeout_s = 'nan': expected a number > 0"),
        ("idle_timeout_s", "0", "limits.idle_timeout_s = '0': expected a number > 0"),
        ("gpu", "A10G:0", "resources.gpu.count = 0"),
        ("image", " ", "image = ''"),
    ],
)
def test_bad_values_name_field_value_and_what_is_accepted(name, text, message):
    with pytest.raises(ConfigError) as info:
        option(name).parse(text)
    assert message in str(info.value)


def test_none_clears_a_limit_and_absent_keeps_the_default():
    config = config_from_options({"startup_timeout_s": None, "disk_mb": 2048})
    assert config.limits.startup_timeout_s is None  # none: no limit
    assert config.limits.idle_timeout_s == 15.0  # not given: the config default
    assert config.resources.disk_mb == 2048


def test_cli_parses_every_option_into_the_config(monkeypatch):
    seen = {}

    async def fake_run(args):
        seen["config"] = options.config_from_options(options.given(args))
        seen["rollout"] = args.rollout_timeout_s
        return 0

    monkeypatch.setattr(cli, "_run_command", fake_run)
    assert cli.main(["run", "humaneval", "--agent", "oracle", "--disk-mb", "4096",
                     "--run-timeout", "600", "--startup-timeout", "none", "--idle-timeout", "9",
                     "--rollout-timeout", "30", "--gpu", "A10G:2", "--memory-mb", "512"]) == 0
    config = seen["config"]
    assert config.resources.disk_mb == 4096 and config.resources.memory_mb == 512
    assert str(config.resources.gpu) == "A10G:2"
    assert config.limits.run_timeout_s == 600 and config.limits.startup_timeout_s is None
    assert config.limits.idle_timeout_s == 9
    assert seen["rollout"] == 30


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu", "abc"], "argument --cpu: resources.cpu = 'abc': expected a number >= 0.01"),
        (["--run-timeout", "0"], "argument --run-timeout: limits.run_timeout_s = '0': "
                                 "expected a number > 0"),
        (["--rollout-timeout", "-3"], "argument --rollout-timeout: rollout_timeout_s = '-3'"),
        (["--timeout", "5"], "--timeout is ambiguous and no longer accepted: use --run-timeout"),
    ],
)
def test_cli_rejects_bad_values_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "humaneval", "--agent", "oracle", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_disk_mb_is_refused_by_local_before_any_sandbox_starts(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent", "oracle",
         "--runtime", "local", "--tasks", "HumanEval/0", "--no-progress", "--disk-mb", "1024",
         "--journal", str(tmp_path / "journal.jsonl")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "local does not support resources.disk_mb (got 1024)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "journal.jsonl").exists()


def test_every_exported_error_has_one_root_and_its_builtin():
    expected = {
        "SandboxnbError": Exception,
        "ConfigError": ValueError,
        "ProviderError": RuntimeError,
    }
    for name, builtin in expected.items():
        exported = getattr(sandboxnb, name)
        assert exported is getattr(errors, name)
        assert issubclass(exported, errors.SandboxnbError) and issubclass(exported, builtin)
        assert name in sandboxnb.__all__
    assert issubclass(errors.UnsupportedFieldError, sandboxnb.ConfigError)
    assert issubclass(errors.StartupTimeout, sandboxnb.ProviderError)
    assert issubclass(errors.StartupTimeout, TimeoutError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SandboxnbError), name


def test_front_end_raises_are_sandboxnb_errors():
    from sandboxnb.interactive import resolve_launch
    from sandboxnb.notebook.form import LauncherController
    from sandboxnb.notebook.magics import RemoteCellError
    from sandboxnb.providers import get_provider

    with pytest.raises(ConfigError, match="not a known provider"):
        get_provider("nowhere")
    with pytest.raises(ConfigError, match="does not accept option"):
        resolve_launch("local", bogus=1)
    with pytest.raises(ConfigError, match=r"resources\.cpu"):
        LauncherController().config({"provider": "local", "cpu": "-2"})
    assert issubclass(RemoteCellError, errors.SandboxnbError)
