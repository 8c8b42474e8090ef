"""VM snapshots: guest RAM as chunks (zero pages skipped, cells stored once, Diffs), the
manifest and its catalog, restores mapped copy-on-write (clones keep writes apart), a
counting guest on this machine's /dev/kvm that counts on after a restore, and bad input."""

from __future__ import annotations

import mmap
import sys
import time
from pathlib import Path

import pytest
from volt.snapshot import catalog, pages
from volt.snapshot.machine import capture, restore
from volt.snapshot.manifest import Manifest, SnapshotError, decode
from volt.vmm import cpu, exitcodes, kvm
from volt.vmm.config import VmConfig
from volt.vmm.exitcodes import VoltError
from volt.vmm.memory import GuestMemory
from volt.vmm.runner import Runner
from volt.vmm.vm import Machine

from stellarium_core.host import Host
from stellarium_core.nebula.compose import compose
from stellarium_core.virtio.memory import RegionMemory

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import CODE_ADDR, kvm_unusable  # noqa: E402

PAGE = mmap.PAGESIZE
#: mov dx,0x3f8; 1: inc word [0x2000]; mov al,[0x2000]; out dx,al; jmp 1b
COUNT_FOREVER = bytes.fromhex("baf803" "ff060020" "a00020" "ee" "ebf6")
COUNTER = 0x2000
needs_kvm = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(cfg), "host", "init"]) == 0
    return Host.from_config(cfg)


def _save(host: Host, mem: RegionMemory, **kw: object) -> list[pages.Piece]:
    with host.store.batch() as batch:
        return pages.save(mem, lambda d: batch.put(d, mappable=True), **kw)  # type: ignore[arg-type]


def test_zero_pages_are_not_stored_and_equal_cells_are_stored_once(host: Host) -> None:
    with GuestMemory(4 << 20) as mem:
        mem.write(0, b"\x01" * PAGE)                 # page 0
        mem.write(3 * PAGE, b"\x02" * (2 * PAGE))    # pages 3-4: one run
        mem.write(1 << 20, b"\x01" * PAGE)           # the same bytes as page 0, elsewhere
        mem.write(2 << 20, bytes(PAGE))              # written, but zero: not stored
        before = len(host.store)
        got = _save(host, mem)
        assert [(p.offset, p.length) for p in got] == [(0, PAGE), (3 * PAGE, 2 * PAGE),
                                                       (1 << 20, PAGE)]
        assert got[0].digest == got[2].digest
        assert len(host.store) == before + 2
        assert all(host.store.indexed(p.digest, mappable=True) for p in got)
        again = _save(host, mem)                     # a second snapshot: nothing new
        assert again == got and len(host.store) == before + 2


def test_a_diff_reads_only_dirty_cells_and_keeps_the_parents_pieces(host: Host) -> None:
    buf = bytearray(1 << 20)
    mem = RegionMemory.over(buf)
    buf[0:PAGE] = b"\x01" * PAGE
    buf[pages.CELL:pages.CELL + PAGE] = b"\x02" * PAGE
    parent = _save(host, mem)
    buf[0:PAGE] = b"\x03" * PAGE                     # cell 0 changes
    buf[pages.CELL:pages.CELL + PAGE] = b"\x04" * PAGE  # so does cell 1, unreported
    kept: list[pages.Piece] = []
    diff = _save(host, mem, parent=parent, dirty=lambda cell: cell == 0, kept=kept)
    assert diff[0].digest == host.hasher.digest(b"\x03" * PAGE)
    assert diff[1] == parent[1] and kept == [parent[1]]   # taken from the parent as told


def test_clones_share_the_snapshots_pages_and_keep_their_writes(host: Host) -> None:
    buf = bytearray(1 << 20)
    buf[PAGE:2 * PAGE] = b"\x07" * PAGE
    pieces = _save(host, RegionMemory.over(buf))
    chunks = [(p.offset, p.digest) for p in pieces]
    a = GuestMemory.mapped((ca := compose(host.store, chunks, 1 << 20, private=True)).addr,
                           1 << 20, ca)
    b = GuestMemory.mapped((cb := compose(host.store, chunks, 1 << 20, private=True)).addr,
                           1 << 20, cb)
    try:
        a.write(PAGE, b"A" * 8)
        assert a.read(PAGE, 9) == b"A" * 8 + b"\x07"
        assert b.read(PAGE, 8) == b"\x07" * 8       # the other clone does not see it
        assert host.store.get(pieces[0].digest) == b"\x07" * PAGE   # nor does the store
        assert a.read(0, PAGE) == bytes(PAGE)       # never stored: zeros
    finally:
        a.close()
        b.close()
    assert ca.addr == 0 and cb.addr == 0            # closing the memory unmapped them


def _manifest(**over: object) -> Manifest:
    fields = dict(kind="Full", config={}, cpu="x", memory_size=1 << 20, pieces=(), vm={},
                  vcpus=({"regs": b"\x00"},), devices={}, legacy={})
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("damage, says", [
    (lambda d: d.replace(b'"kind":"Full"', b'"kind":"Half"'), "kind must be one of"),
    (lambda d: d.replace(b'"size":1048576', b'"size":-1'), "not a positive byte count"),
    (lambda d: d.replace(b'"pieces":[]', b'"pieces":[[4096,4096,"zz"]]'), "piece 0"),
    (lambda d: d.replace(b'"pieces":[]', b'"pieces":[[4097,4096,"' + b"a" * 64 + b'"]]'),
     "whole pages"),
    (lambda d: d.replace(b'"pieces":[]', b'"pieces":[[1048576,4096,"' + b"a" * 64 + b'"]]'),
     "past the"),
    (lambda d: d.replace(b'"regs":"00"', b'"regs":"0g"'), "not a hex blob"),
    (lambda d: d.replace(b'"format"', b'"formet"'), "expected the fields"),
    (lambda d: d[:40], "not JSON"),
    (lambda d: b"[]", "expected the fields"),
])
def test_a_damaged_manifest_is_refused_with_its_reason(damage, says) -> None:  # noqa: ANN001
    data = _manifest().encode()
    assert decode(data) == _manifest()
    with pytest.raises(SnapshotError, match=says):
        decode(damage(data))


def test_a_snapshot_whose_chunks_are_gone_is_refused_before_anything_runs(host: Host) -> None:
    missing = pages.Piece(0, PAGE, b"\x01" * 32)
    catalog.save(host, "lost", lambda batch: (_manifest(pieces=(missing,)), []))
    with pytest.raises(SnapshotError, match="1 memory chunk.*missing.*0101"):
        catalog.load(host, "lost")
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        catalog.load(host, "nope")
    with pytest.raises(Exception, match="bad snapshot name"):
        catalog.load(host, "../etc")


def test_removing_a_snapshot_gives_its_references_back(host: Host) -> None:
    buf = bytearray(1 << 20)
    buf[0:PAGE] = b"\x09" * PAGE
    snap = catalog.save(host, "s1", lambda batch: (_manifest(pieces=tuple(
        pages.save(RegionMemory.over(buf), lambda d: batch.put(d, mappable=True)))), []))
    digest = snap.manifest.pieces[0].digest
    assert host.store.refs(digest) == 1 and host.store.refs(snap.digest) == 1
    assert catalog.names(host) == ["s1"]
    catalog.remove(host, "s1")
    assert host.store.refs(digest) == 0 and host.store.refs(snap.digest) == 0
    assert catalog.names(host) == []


def _counting_machine(sink) -> Machine:  # noqa: ANN001
    m = Machine(8 << 20)
    m.add_legacy_devices(sink)
    m.mem.write(CODE_ADDR, COUNT_FOREVER)
    v = m.vcpus[0].fd
    cpu.configure_vcpu(v, cpu.normalize_cpuid(m.kvm.supported_cpuid(), 0, 1, None, False))
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    v.set_sregs(s)
    v.set_regs(kvm.Regs(rip=CODE_ADDR, rflags=0x2))
    return m


def _run_until(out: list[bytes], n: int) -> None:
    deadline = time.monotonic() + 120
    while len(out) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(out) >= n, "the guest did not count"


@needs_kvm
def test_a_counting_guest_counts_on_after_snapshot_and_restore(host: Host) -> None:
    first: list[bytes] = []
    m = _counting_machine(first.append)
    r = Runner(m)
    r.start()
    _run_until(first, 20)
    r.pause()
    counted = int.from_bytes(m.mem.read(COUNTER, 2), "little")
    snap = capture(m, host, "count", VmConfig(memory_mib=8))
    m.stop(exitcodes.TERMINATED, "test")
    r.wait(30)
    m.close()
    assert snap.manifest.cpu and len(snap.manifest.pieces) >= 1
    assert sum(p.length for p in snap.manifest.pieces) <= 2 * PAGE   # code + counter

    second: list[bytes] = []

    def machine_for(memory: GuestMemory) -> Machine:
        n = Machine(8 << 20, memory=memory)
        n.add_legacy_devices(second.append)
        return n

    n = restore(machine_for, catalog.load(host, "count"), host)
    assert int.from_bytes(n.mem.read(COUNTER, 2), "little") == counted
    r2 = Runner(n)
    r2.start()
    _run_until(second, 5)
    n.stop(exitcodes.TERMINATED, "test")
    r2.wait(30)
    # the restored guest goes on from where it stopped: the next byte it writes is the
    # counter's next value, not a count from zero
    assert second[0][0] in ((counted + 1) & 0xFF, counted & 0xFF)
    assert int.from_bytes(n.mem.read(COUNTER, 2), "little") > counted
    n.close()


@needs_kvm
def test_a_snapshot_from_another_cpu_model_is_refused_before_any_vcpu_runs(
        host: Host) -> None:
    m = _counting_machine(lambda b: None)
    snap = capture(m, host, "cpu", VmConfig(memory_mib=8))
    m.close()
    cpuid = bytearray(snap.manifest.vcpus[0]["cpuid"])
    alien = catalog.save(host, "alien", lambda batch: (Manifest(**{
        **snap.manifest.__dict__, "vcpus": ({**snap.manifest.vcpus[0],
                                             "cpuid": _other_vendor(cpuid)},)}), []))
    made: list[Machine] = []

    def machine_for(memory: GuestMemory) -> Machine:
        made.append(Machine(8 << 20, memory=memory))
        made[0].add_legacy_devices(lambda b: None)
        return made[0]

    with pytest.raises(VoltError, match="CPU") as err:
        restore(machine_for, catalog.load(host, alien.name), host)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    assert made[0].first_run is None
    made[0].close()


def _other_vendor(cpuid: bytearray) -> bytes:
    """The CPUID blob with leaf 0's vendor string replaced (entries after an 8-byte head)."""
    size = 40
    for off in range(8, len(cpuid), size):
        if int.from_bytes(cpuid[off:off + 4], "little") == 0:
            cpuid[off + 16:off + 20] = b"Evil"          # ebx
    return bytes(cpuid)


#: (32-bit, PVH entry) mov dx,0x3f8; 1: inc dword [0x1800000]; mov al,[0x1800000];
#: out dx,al; jmp 1b
COUNT_FOREVER_32 = bytes.fromhex("66baf803" "ff0500008001" "a000008001" "ee" "ebf2")


@needs_kvm
def test_the_api_snapshots_a_vm_and_a_confined_vmm_restores_it(tmp_path: Path) -> None:
    from apiclient import VoltProcess
    from tinyguest import make_elf

    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(cfg), "host", "init"]) == 0
    kernel = tmp_path / "count.elf"
    kernel.write_bytes(make_elf(body=COUNT_FOREVER_32, pvh=0x1000000))
    conf = ["--config", str(cfg)]
    src = VoltProcess(tmp_path / "a.sock", "--landlock", "off", "--seccomp", "off",
                      console=tmp_path / "a.out", volt_args=conf)
    try:
        a = src.api
        assert a.call("PUT", "/snapshot/create", {"snapshot_path": "s1"})[1] == {
            "fault_message": "The requested operation is not supported before starting "
                             "the microVM."}
        for path, body in [("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
                           ("/boot-source", {"kernel_image_path": str(kernel)}),
                           ("/actions", {"action_type": "InstanceStart"})]:
            assert a.call("PUT", path, body) == (204, None), path
        deadline = time.monotonic() + 60
        while len(src.output()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, fault = a.call("PUT", "/snapshot/create", {"snapshot_path": "s1"})
        assert status == 400 and "paused VM" in fault["fault_message"]
        assert a.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
        status, fault = a.call("PUT", "/snapshot/create", {"snapshot_path": "s1",
                                                           "mem_file_path": "/tmp/mem"})
        assert status == 400 and "keeps guest memory in the store" in fault["fault_message"]
        assert a.call("PUT", "/snapshot/create", {"snapshot_path": "s1"}) == (204, None)
        assert a.call("PUT", "/snapshot/create", {"snapshot_path": "s2",
                                                  "snapshot_type": "Diff"}) == (204, None)
        last = src.output()[-1]
        assert a.call("PUT", "/snapshot/load", {"snapshot_path": "s1"})[1] == {
            "fault_message": "The requested operation is not supported after starting "
                             "the microVM."}
    finally:
        src.stop()
    host = Host.from_config(cfg)
    s1, s2 = catalog.load(host, "s1"), catalog.load(host, "s2")
    assert s2.manifest.kind == "Diff" and s2.manifest.parent == s1.digest
    assert s2.manifest.pieces == s1.manifest.pieces     # nothing ran in between

    clone = VoltProcess(tmp_path / "b.sock", console=tmp_path / "b.out", volt_args=conf)
    try:
        b = clone.api
        status, fault = b.call("PUT", "/snapshot/load", {"snapshot_path": "nope"})
        assert status == 400 and "no snapshot named 'nope'" in fault["fault_message"]
        assert b.call("GET", "/")[1]["state"] == "Not started"
        assert b.call("PUT", "/snapshot/load", {"snapshot_path": "s1", "resume_vm": True}) \
            == (204, None)
        assert b.call("GET", "/")[1]["state"] == "Running"
        assert clone.wait_output(b"", 1) and _wait_len(clone, 5)
        first = clone.output()[0]
        assert first in (last, (last + 1) & 0xFF), (last, clone.output()[:8])
    finally:
        clone.stop()


def _wait_len(proc, n: int) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while len(proc.output()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(proc.output()) >= n


def _api_source(tmp_path: Path, cfg: Path, *args: str):  # noqa: ANN202
    """A counting VM (unconfined, so it may snapshot) behind its API, and its kernel."""
    from apiclient import VoltProcess
    from tinyguest import make_elf

    kernel = tmp_path / "count.elf"
    kernel.write_bytes(make_elf(body=COUNT_FOREVER_32, pvh=0x1000000))
    src = VoltProcess(tmp_path / "a.sock", "--landlock", "off", "--seccomp", "off", *args,
                      console=tmp_path / "a.out", volt_args=["--config", str(cfg)])
    for path, body in [("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
                       ("/boot-source", {"kernel_image_path": str(kernel)})]:
        assert src.api.call("PUT", path, body) == (204, None), path
    return src


@needs_kvm
def test_volumes_are_snapshotted_with_the_vm_and_each_restore_writes_its_own_clone(
        host: Host, tmp_path: Path) -> None:
    from apiclient import VoltProcess

    from stellarium_core.volumes.volume import VolumeStore

    vols = VolumeStore.for_host(host)
    with vols.create("data", 1 << 20) as v:
        v.write(0, b"before the snapshot")
    cfg = host.config.source
    src = _api_source(tmp_path, cfg)
    try:
        a = src.api
        assert a.call("PUT", "/stellar/devices/disk", {
            "plugin": "virtio-stellar", "params": {"volume": "data"}}) == (204, None)
        assert a.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
        assert _wait_len(src, 5)
        assert a.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
        assert a.call("PUT", "/snapshot/create", {"snapshot_path": "withdisk"}) == (204, None)
    finally:
        src.stop()
    snap = catalog.load(host, "withdisk")
    frozen = snap.manifest.volumes["disk"]
    with vols.open(frozen, readonly=True) as v:
        assert v.read(0, 19) == b"before the snapshot"
    with vols.open("data") as v:          # the original goes on changing
        v.write(0, b"after the snapshot!")
    clones = []
    for i in range(2):
        vm = VoltProcess(tmp_path / f"c{i}.sock", console=tmp_path / f"c{i}.out",
                         volt_args=["--config", str(cfg)])
        try:
            assert vm.api.call("PUT", "/snapshot/load", {"snapshot_path": "withdisk",
                                                         "resume_vm": True}) == (204, None)
            assert _wait_len(vm, 3)
            clones.append(f"{frozen}.volt-{vm.proc.pid}")
        finally:
            vm.stop()
    for name in clones:                    # each restore got a writable clone of the frozen
        with vols.open(name) as v:         # volume, not the changed original
            assert v.read(0, 19) == b"before the snapshot"
    catalog.remove(host, "withdisk")
    assert not vols.exists(frozen)


@needs_kvm
def test_a_snapshot_with_a_corrupt_chunk_is_refused_before_any_vcpu_runs(
        host: Host, tmp_path: Path) -> None:
    from apiclient import VoltProcess

    cfg = host.config.source
    src = _api_source(tmp_path, cfg)
    try:
        assert src.api.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
        assert _wait_len(src, 5)
        assert src.api.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
        assert src.api.call("PUT", "/snapshot/create", {"snapshot_path": "bad"}) == (204, None)
    finally:
        src.stop()
    piece = catalog.load(host, "bad").manifest.pieces[0]
    e = host.store.entry(piece.digest)
    with open(host.store.pack_path(e.pack), "r+b") as f:
        f.seek(e.offset)
        byte = f.read(1)
        f.seek(e.offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    vm = VoltProcess(tmp_path / "r.sock", console=tmp_path / "r.out",
                     volt_args=["--config", str(cfg)])
    try:
        status, fault = vm.api.call("PUT", "/snapshot/load", {"snapshot_path": "bad",
                                                              "resume_vm": True})
        assert status == 400 and "its memory" in fault["fault_message"], fault
        assert piece.digest.hex()[:16] in fault["fault_message"], fault
        assert vm.api.call("GET", "/")[1]["state"] == "Not started"
        assert vm.output() == b""
    finally:
        vm.stop()


@needs_kvm
def test_a_snapshot_whose_chunks_are_stored_compressed_restores_from_mappable_copies(
        host: Host, tmp_path: Path) -> None:
    """As a snapshot copied chunk by chunk into another store would be (compressed, not
    mappable): the restore makes each chunk mappable once, then maps it."""
    m = _counting_machine(lambda b: None)
    m.mem.write(0x100000, b"\x5a" * (3 * PAGE))
    snap = capture(m, host, "orig", VmConfig(memory_mib=8))
    m.close()
    other_cfg = tmp_path / "other.toml"
    other_cfg.write_text('[store]\npath = "other-store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(other_cfg), "host", "init"]) == 0
    other = Host.from_config(other_cfg)
    for p in snap.manifest.pieces:
        other.store.put(host.store.get(p.digest))            # compressed, not mappable
    assert not other.store.indexed(snap.manifest.pieces[0].digest, mappable=True)
    copied = catalog.save(other, "copied", lambda batch: (snap.manifest,
                                                          list(snap.manifest.pieces)))

    def machine_for(memory: GuestMemory) -> Machine:
        n = Machine(8 << 20, memory=memory)
        n.add_legacy_devices(lambda b: None)
        return n

    n = restore(machine_for, catalog.load(other, copied.name), other)
    try:
        assert n.mem.read(0x100000, 3 * PAGE) == b"\x5a" * (3 * PAGE)
        assert all(other.store.indexed(p.digest, mappable=True) for p in snap.manifest.pieces)
    finally:
        n.close()


@pytest.mark.parametrize("volume", ["../../etc/passwd", "/etc/passwd", "a/../../b"])
def test_a_manifest_naming_a_volume_outside_the_store_is_refused(host: Host,
                                                                 volume: str) -> None:
    from volt.snapshot.machine import restored_config

    m = _manifest(config={"memory_mib": 8, "devices": [
        {"plugin": "virtio-stellar", "id": "disk", "params": {"volume": "x"}}]},
        memory_size=8 << 20, volumes={"disk": volume})
    snap = catalog.save(host, "escape", lambda batch: (m, []))
    with pytest.raises(VoltError) as err:
        restored_config(host, catalog.load(host, snap.name), "volt-1")
    assert err.value.exit_code == exitcodes.SNAPSHOT and "bad volume name" in str(err.value)
    assert not Path("/etc/passwd.volt-1").exists()
