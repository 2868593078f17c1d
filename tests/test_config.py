"""Runtime config: validation names every bad field, overrides merge field by field."""

from __future__ import annotations

import pytest

from sandboxnb.config import (
    GPU,
    ConfigError,
    RuntimeConfig,
    UnsupportedFieldError,
    check_supported,
    config_from_flat,
)


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"resources": {"cpu": 0}}, "resources.cpu", "0"),
        ({"resources": {"cpu": -1.5}}, "resources.cpu", "-1.5"),
        ({"resources": {"memory_mb": 0}}, "resources.memory_mb", "0"),
        ({"resources": {"memory_mb": "lots"}}, "resources.memory_mb", "'lots'"),
        ({"resources": {"disk_mb": -5}}, "resources.disk_mb", "-5"),
        ({"resources": {"gpu": "H100:0"}}, "resources.gpu.count", "0"),
        ({"resources": {"gpu": "H100:x"}}, "resources.gpu", "'H100:x'"),
        ({"resources": {"gpu": {"type": "A10G", "count": 0}}}, "resources.gpu.count", "0"),
        ({"resources": {"gpus": 1}}, "resources.gpus", "1"),
        ({"limits": {"run_timeout_s": 0}}, "limits.run_timeout_s", "0"),
        ({"limits": {"idle_timeout_s": -1}}, "limits.idle_timeout_s", "-1"),
        ({"limits": {"startup": 5}}, "limits.startup", "5"),
        ({"image": ""}, "image", "''"),
        ({"imag": "python"}, "imag", "'python'"),
    ],
)
def test_every_bad_field_is_named_with_its_value(overrides, field, value):
    with pytest.raises(ConfigError) as info:
        RuntimeConfig().merge(overrides)
    message = str(info.value)
    assert f"{field} = {value}" in message


def test_unknown_field_lists_what_is_accepted():
    with pytest.raises(ConfigError, match=r"accepted: resources.cpu, resources.memory_mb"):
        RuntimeConfig().merge({"resources": {"cores": 2}})


def test_gpu_string_forms():
    assert GPU.model_validate("H100") == GPU(type="H100", count=1)
    assert GPU.model_validate("A10G:2") == GPU(type="A10G", count=2)
    assert str(GPU(type="A10G", count=2)) == "A10G:2"
    assert str(GPU(type="H100")) == "H100"


def test_overrides_merge_field_by_field_and_none_clears():
    base = RuntimeConfig().merge(
        {"image": "py", "resources": {"cpu": 2, "memory_mb": 1024, "gpu": "A10G:2"}}
    )
    cpu_only = base.merge({"resources": {"cpu": 0.5}})
    assert cpu_only.resources.cpu == 0.5
    assert cpu_only.resources.memory_mb == 1024  # kept
    assert cpu_only.resources.gpu == GPU(type="A10G", count=2)
    assert cpu_only.image == "py"
    cleared = base.merge({"resources": {"gpu": None}, "image": None})
    assert cleared.resources.gpu is None and cleared.image is None
    assert cleared.resources.memory_mb == 1024
    # a whole GPU value replaces, not merges
    assert base.merge({"resources": {"gpu": "H100"}}).resources.gpu == GPU(type="H100", count=1)
    # the base is untouched (configs are frozen values)
    assert base.resources.cpu == 2


def test_flat_keywords_and_unknown_keyword():
    config = config_from_flat(cpu=2, memory_mb=512, gpu="A10G:2", run_timeout_s=30, image=None,
                              disk_mb=2048)
    assert config.resources.cpu == 2 and config.resources.memory_mb == 512
    assert config.resources.disk_mb == 2048
    assert config.limits.run_timeout_s == 30 and config.image is None
    with pytest.raises(ConfigError, match=r"unknown runtime option cpus=2; accepted: image, cpu"):
        config_from_flat(cpus=2)
    # the ambiguous alias is gone: a flat keyword is always a field's own name
    with pytest.raises(ConfigError, match=r"unknown runtime option timeout=30; .*run_timeout_s"):
        config_from_flat(timeout=30)


def test_unsupported_field_names_provider_and_field():
    config = config_from_flat(gpu="H100")
    with pytest.raises(UnsupportedFieldError) as info:
        check_supported("local", {"resources.cpu", "resources.memory_mb", "limits"}, config)
    assert str(info.value).startswith("local does not support resources.gpu (got H100)")
    # group names cover their fields
    check_supported("any", {"resources", "limits"}, config)
