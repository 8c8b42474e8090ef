"""Lab tests take their fixtures (``lab``, ``guest_kernel``, ...) from the volt runtime's
pytest plugin (entry point ``pytest11: volt-lab``); these tests never import Volt.
Without that distribution installed they skip, saying so."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("volt") is not None:
        return
    skip = pytest.mark.skip(reason="the volt runtime plugin (lab fixtures) is not installed")
    for item in items:
        if item.get_closest_marker("lab"):
            item.add_marker(skip)
