"""pytest plugin (registered under ``pytest11``): ``--sandboxnb-provider module:Class`` points the
public conformance suite (:mod:`sandboxnb.testing.conformance`) at a provider."""

from __future__ import annotations

from typing import Any

import pytest

OPTION = "--sandboxnb-provider"


def pytest_addoption(parser: Any) -> None:
    parser.addoption(OPTION, default=None, metavar="MODULE:CLASS",
                     help="the provider class the sandboxnb conformance suite runs against")


@pytest.fixture
def harness(request: Any) -> Any:
    """The default conformance harness, from ``--sandboxnb-provider``."""
    spec = request.config.getoption(OPTION)
    if not spec:
        pytest.fail(f"the sandboxnb conformance suite needs {OPTION} module:ProviderClass "
                    "(or a `harness` fixture of your own)")
    from sandboxnb.testing.conformance import default_harness

    return default_harness(spec)
