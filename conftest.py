"""Hygiene for every test in the repo: the host-wide hot tiers (``shm``) that test
stores made live in /dev/shm, outside any temporary directory. At the end of the
session, remove those of stores under pytest's base temp dir, and those whose store
is gone (tests that make stores with ``tempfile``): both are caches of nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from stellarium_core.photon.shm import SHM_ROOT, STORE


@pytest.fixture(autouse=True, scope="session")
def _remove_test_hot_tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    base = str(tmp_path_factory.getbasetemp().resolve())
    for d in SHM_ROOT.glob("stellarium-*"):
        try:
            store = (d / STORE).read_text().strip()
        except OSError:
            continue
        if store.startswith(base + "/") or not os.path.exists(store):
            shutil.rmtree(d, ignore_errors=True)
