"""Fixtures most storage tests share: the default hasher and chunker, and a fresh NEBULA store.

A test module that needs something else (another hasher, a store elsewhere)
defines its own fixture of the same name, which takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import Chunker
from stellarium_core.nebula import ChunkStore
from stellarium_core.plugins import Registry


@pytest.fixture
def hasher() -> Blake3Hasher:
    return Blake3Hasher({})


@pytest.fixture
def chunker() -> Chunker:
    return Registry().create("chunker", "fastcdc", {})


@pytest.fixture
def store(hasher: Blake3Hasher, tmp_path: Path) -> Iterator[ChunkStore]:
    """An empty ChunkStore in ``tmp_path/nebula``, closed after the test."""
    with ChunkStore.open(tmp_path / "nebula", hasher, create=True) as s:
        yield s
