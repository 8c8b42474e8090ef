"""Boot manifests (stellarium_core.boot): the format's strict decoding, and the named
catalog in a real store (references held and released, missing chunks and roots refused)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from stellarium_core import boot
from stellarium_core.boot import manifest as fmt
from stellarium_core.cli import main as stellar
from stellarium_core.errors import StellarError, UsageError
from stellarium_core.holders import census
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore


@pytest.fixture
def host(tmp_path: Path) -> Host:
    path = tmp_path / "host.toml"
    path.write_text('[store]\npath = "store"\n')
    assert stellar(["--config", str(path), "host", "init"]) == 0
    return Host.from_config(path)


def _blob(host: Host, data: bytes) -> boot.Blob:
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    return boot.Blob(host.hasher.digest(data).hex(), len(data),
                     tuple((host.store.put(c), len(c)) for c in chunks))


def _manifest(host: Host, **kw: object) -> boot.BootManifest:
    vols = VolumeStore.for_host(host)
    if not vols.exists("root0"):
        vols.create("root0", 1 << 20).close()
    vals: dict[str, object] = dict(kernel=_blob(host, b"K" * 100_000), root_kind="volume",
                                   root="root0", cmdline="console=ttyS0", memory_mib=256,
                                   vcpus=2, prefetch=(host.store.put(b"p" * 4096),))
    vals.update(kw)
    return boot.BootManifest(**vals)  # type: ignore[arg-type]


def _doc(**changes: object) -> dict[str, object]:
    k = {"digest": "ab" * 32, "size": 5, "chunks": [["cd" * 32, 5]]}
    doc: dict[str, object] = {"format": fmt.FORMAT, "kernel": k, "root": {"volume": "v"},
                              "cmdline": "", "memory_mib": 128, "vcpus": 1, "prefetch": []}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def test_encoding_is_canonical_and_round_trips() -> None:
    data = json.dumps(_doc(prefetch=["ef" * 32]), sort_keys=True,
                      separators=(",", ":")).encode()
    m = boot.decode(data)
    assert m.encode() == data
    assert m.prefetch == (bytes.fromhex("ef" * 32),) and m.device_params() == {"volume": "v"}
    assert sum(m.chunks().values()) == 2


@pytest.mark.parametrize("data, message", [
    (b"", "not JSON"),
    (b"\x00\xffgarbage", "not JSON"),
    (json.dumps(_doc()).encode()[:-7], "not JSON"),                       # truncated
    (b"[1, 2]", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "recursion"),                       # deep nesting
    (b" " * (fmt.MAX_BYTES + 1), "more than"),
    (json.dumps(_doc(kernel=None)).encode(), "lacks: kernel"),
    (json.dumps(_doc(extra=1)).encode(), "unknown fields: extra"),
    (json.dumps(_doc(format="stellar-boot/9")).encode(), "format"),
    (json.dumps(_doc(root={"volume": "v", "image": "i"})).encode(), "root: expected"),
    (json.dumps(_doc(root={"path": "/etc/shadow"})).encode(), "root: expected"),
    (json.dumps(_doc(root={"volume": "../../etc"})).encode(), "bad volume name"),
    (json.dumps(_doc(cmdline="x" * 5000)).encode(), "cmdline"),
    (json.dumps(_doc(memory_mib=1 << 30)).encode(), "memory_mib"),
    (json.dumps(_doc(vcpus=True)).encode(), "vcpus"),
    (json.dumps(_doc(prefetch=["zz"])).encode(), "prefetch[0]"),
    (json.dumps(_doc(prefetch=["ab" * 32] * (fmt.MAX_PREFETCH + 1))).encode(), "prefetch"),
    (json.dumps(_doc(kernel={"digest": "ab" * 32, "size": 6,
                             "chunks": [["cd" * 32, 5]]})).encode(), "add up to 5"),
    (json.dumps(_doc(kernel={"digest": "AB" * 32, "size": 5,
                             "chunks": [["cd" * 32, 5]]})).encode(), "kernel.digest"),
    (json.dumps(_doc(kernel={"digest": "ab" * 32, "size": 5, "chunks": []})).encode(),
     "kernel.chunks"),
])
def test_bad_manifests_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(boot.BootManifestError) as err:
        boot.decode(data)
    assert message in str(err.value)


def test_record_holds_references_and_remove_releases_them(host: Host) -> None:
    m = _manifest(host)
    store = host.store
    kernel0 = m.kernel.chunks[0][0]
    before = store.refs(kernel0)
    rec = boot.record(host, "web", m)
    assert store.refs(kernel0) == before + 1 and store.refs(rec.digest) == 1
    loaded = boot.load(host, "web")
    assert loaded.manifest == m and loaded.digest == rec.digest
    assert boot.load(host, rec.digest.hex()[:12]).name == "web"
    assert [r.name for r in boot.list_manifests(host)] == ["web"]
    # the census (fsck, gc) counts what the record holds: nothing is over- or under-counted
    c = census(host.store_path, host.hasher)
    assert c.complete and c.held[rec.digest] == 1 and c.held[kernel0] == 1
    assert c.held[m.prefetch[0]] == 1
    boot.record(host, "web", dataclasses.replace(m, prefetch=()))  # rebinding releases
    assert store.refs(rec.digest) == 0
    boot.remove(host, "web")
    assert store.refs(kernel0) == before and boot.list_manifests(host) == []
    with pytest.raises(StellarError, match="no boot manifest named or hashed 'web'"):
        boot.load(host, "web")


def test_missing_chunk_and_unknown_root_are_refused_before_boot(host: Host) -> None:
    m = _manifest(host)
    ghost = bytes(32)
    with pytest.raises(boot.BootManifestError, match="1 chunk"):
        boot.record(host, "a", _manifest(host, prefetch=(ghost,)))
    with pytest.raises(boot.BootManifestError, match="root volume 'nope' does not exist"):
        boot.record(host, "a", _manifest(host, root="nope"))
    with pytest.raises(boot.BootManifestError, match="root image"):
        boot.record(host, "a", _manifest(host, root_kind="image", root="nope"))
    boot.record(host, "a", m)
    VolumeStore.for_host(host).delete("root0")       # the root went away after recording
    with pytest.raises(boot.BootManifestError, match="root volume 'root0' does not exist"):
        boot.load(host, "a")


def test_a_damaged_stored_manifest_is_an_error_not_a_traceback(host: Host) -> None:
    boot.record(host, "a", _manifest(host))
    path = host.store_path / "records" / "boot" / "a.json"
    doc = json.loads(path.read_text())
    doc["manifest"] = host.store.put(b'{"format": "stellar-boot/1", "kernel"').hex()
    path.write_text(json.dumps(doc))
    with pytest.raises(boot.BootManifestError, match="boot manifest 'a': .*not JSON"):
        boot.load(host, "a")
    path.write_text("{garbage")
    with pytest.raises(StellarError, match="damaged boot record"):
        boot.load(host, "a")


@pytest.mark.parametrize("name", ["pvh", "auto", "../x", "", "a/b", "x" * 200])
def test_bad_names_are_usage_errors(host: Host, name: str) -> None:
    with pytest.raises(UsageError, match="bad boot manifest name"):
        boot.record(host, name, _manifest(host))


def test_a_manifest_at_every_limit_still_fits_the_size_cap() -> None:
    """The bounds agree: the largest manifest the fields allow encodes within MAX_BYTES."""
    n = fmt.MAX_BLOB_BYTES // fmt.MAX_BLOB_CHUNKS
    big = boot.Blob("ab" * 32, n * fmt.MAX_BLOB_CHUNKS,
                    tuple((i.to_bytes(32, "big"), n) for i in range(fmt.MAX_BLOB_CHUNKS)))
    m = boot.BootManifest(kernel=big, initrd=big, root_kind="image", root="x" * 255,
                          cmdline="c" * fmt.MAX_CMDLINE, memory_mib=fmt.MAX_MEMORY_MIB,
                          vcpus=fmt.MAX_VCPUS,
                          prefetch=tuple(i.to_bytes(32, "little")
                                         for i in range(fmt.MAX_PREFETCH)))
    assert len(m.encode()) <= fmt.MAX_BYTES
    assert boot.decode(m.encode()) == m
