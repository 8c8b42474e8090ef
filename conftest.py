"""Hygiene for every test in the repo: the host-wide hot tiers (``shm``) that stores
under a test's temporary directory made live in /dev/shm, outside it; remove them."""

from __future__ import annotations

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
        if store.startswith(base + "/"):
            shutil.rmtree(d, ignore_errors=True)
