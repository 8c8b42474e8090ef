"""`volt boot record|list|show|rm` and `volt run --boot NAME`: manifests recorded from the
kernel registry, run-time layering (flags override the manifest), the chunk trace a
prefetch set is recorded from, prefetching before the vCPUs start, and bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from volt import boots
from volt.cli import main
from volt.vmm import config, exitcodes
from volt.vmm.config import DeviceSpec
from volt.vmm.exitcodes import VoltError

from stellarium_core import boot
from stellarium_core import config as config_mod
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore

sys.path.insert(0, str(Path(__file__).parent))
from test_vmm_config import IN_PROCESS, RESET_ELF, needs_kvm  # noqa: E402

CHUNK = 1 << 16


@pytest.fixture
def host_cfg(tmp_path: Path) -> Path:
    """A host with the tiny reset guest registered as kernel ``tiny`` (and an initrd), and
    a 4-chunk volume ``root0`` holding data."""
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(cfg), "host", "init"]) == 0
    (tmp_path / "vmlinux").write_bytes(RESET_ELF)
    (tmp_path / "initrd").write_bytes(b"07070100" * 512)
    assert main(["--config", str(cfg), "kernel", "import", str(tmp_path / "vmlinux"),
                 "--initrd", str(tmp_path / "initrd"), "--name", "tiny"]) == 0
    vol = VolumeStore.for_host(Host.from_config(cfg)).create("root0", 4 * CHUNK)
    for i in range(4):
        vol.write(i * CHUNK, bytes([i + 1]) * CHUNK)
    vol.close()
    return cfg


def _volt(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _chunks(cfg: Path) -> list[bytes]:
    vol = VolumeStore.for_host(Host.from_config(cfg)).open("root0", readonly=True)
    try:
        return [vol.manifest.refs[i].digest for i in range(4)]
    finally:
        vol.close()


def test_record_list_show_rm(host_cfg: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(host_cfg)]
    chunks = _chunks(host_cfg)
    trace = tmp_path / "trace"
    trace.write_text("".join(f"{d.hex()}\n" for d in [chunks[2], chunks[0], chunks[2]]))
    code, out, err = _volt(capsys, *c, "boot", "record", "web", "--kernel", "tiny",
                           "--initrd", "tiny", "--volume", "root0", "--mem", "64",
                           "--cmdline", "console=ttyS0 quiet", "--prefetch-from", str(trace),
                           "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["prefetch"] == 2 and rec["root"] == {"volume": "root0"}
    assert rec["memory_mib"] == 64 and rec["cmdline"] == "console=ttyS0 quiet"
    code, out, _ = _volt(capsys, *c, "boot", "list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["web"]
    code, out, _ = _volt(capsys, *c, "boot", "list")
    assert out.split("\n")[1].split()[3:] == ["volume=root0", "64", "1", "2"]
    m = boot.load(Host.from_config(host_cfg), rec["digest"][:10]).manifest
    assert m.prefetch == (chunks[2], chunks[0])          # first-access order, deduplicated
    code, out, _ = _volt(capsys, *c, "boot", "show", "web", "--json")
    assert json.loads(out)["digest"] == rec["digest"]
    assert _volt(capsys, *c, "boot", "rm", "web")[0] == 0
    code, _, err = _volt(capsys, *c, "boot", "show", "web")
    assert code == 1 and "no boot manifest named or hashed 'web'" in err


@pytest.mark.parametrize("argv, code, message", [
    (["--kernel", "nope", "--volume", "root0"], 2, "--kernel nope: no kernel named"),
    (["--kernel", "tiny", "--volume", "nope"], 1, "root volume 'nope' does not exist"),
    (["--kernel", "tiny", "--image", "nope"], 1, "no image named 'nope'"),
    (["--kernel", "tiny", "--volume", "root0", "--mem", "1"], 1, "memory_mib: expected"),
    (["--kernel", "tiny", "--volume", "root0", "--cmdline", "x" * 3000], 1, "cmdline"),
    (["--kernel", "tiny", "--volume", "root0", "--run-args", "--mem 4"], 2,
     "--run-args is for the traced boot"),
    (["--kernel", "tiny"], 2, "one of the arguments --volume --image is required"),
])
def test_bad_record_arguments_store_nothing(host_cfg: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], code: int, message: str) -> None:
    c = ["--config", str(host_cfg)]
    got, _, err = _volt(capsys, *c, "boot", "record", "web", *argv)
    assert (got, "Traceback" in err) == (code, False) and message in err, err
    assert boot.list_manifests(Host.from_config(host_cfg)) == []


def test_garbage_trace_and_reserved_names_are_refused(host_cfg: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(host_cfg), "boot", "record"]
    (tmp_path / "trace").write_text("00ff\n")
    code, _, err = _volt(capsys, *c, "web", "--kernel", "tiny", "--volume", "root0",
                         "--prefetch-from", str(tmp_path / "trace"))
    assert code == 1 and "trace:1: '00ff' is not a chunk digest" in err
    code, _, err = _volt(capsys, *c, "pvh", "--kernel", "tiny", "--volume", "root0")
    assert code == 2 and "bad boot manifest name 'pvh'" in err


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p.parse_args(argv)


def test_run_boot_name_layers_the_manifest_under_the_flags(host_cfg: Path) -> None:
    host = Host.from_config(host_cfg)
    rec = boots.record(host, "web", kernel="tiny", initrd="tiny", root_kind="volume",
                       root="root0", cmdline="console=ttyS0 quiet", memory_mib=64, vcpus=2)

    def expand(ref: str, flags: config.Layer) -> tuple[config.Layer, config.Layer]:
        return boots.expand(host, ref, flags)

    cfg = config.from_args(_args("--boot", "web"), host.config, expand=expand)
    assert (cfg.kernel, cfg.initrd) == (rec.manifest.kernel.digest,
                                        rec.manifest.initrd.digest)  # type: ignore[union-attr]
    assert (cfg.memory_mib, cfg.vcpus, cfg.cmdline, cfg.boot) == (64, 2, "console=ttyS0 quiet",
                                                                   "auto")
    assert cfg.devices == (DeviceSpec("virtio-stellar", {"volume": "root0"}, "root"),)
    assert cfg.root == "root" and cfg.manifest == rec.digest.hex()
    cfg = config.from_args(_args("--boot", "web", "--mem", "32", "--cmdline", "quiet",
                                 "--device", "virtio-rng"), host.config, expand=expand)
    assert (cfg.memory_mib, cfg.vcpus, cfg.cmdline) == (32, 2, "quiet")
    assert [d.id for d in cfg.devices] == ["root", "virtio-rng1"]
    assert config.from_args(_args("--boot", "pvh"), host.config, expand=expand).boot == "pvh"
    with pytest.raises(VoltError) as err:
        config.from_args(_args("--boot", "nope"), host.config, expand=expand)
    assert err.value.exit_code == exitcodes.USAGE
    assert "--boot nope: not a boot protocol (auto, linux64, pvh) and no boot manifest" \
        in str(err.value)
    with pytest.raises(VoltError, match="drop --root and --image"):
        config.from_args(_args("--boot", "web", "--image", "x"), host.config, expand=expand)
    # The host's [vm] table may name a manifest too; flags still win.
    named = host_cfg.parent / "named.toml"
    named.write_text(host_cfg.read_text() + '[vm]\nmanifest = "web"\nmemory_mib = 512\n')
    cfg = config.from_args(_args("--vcpus", "1"), config_mod.load(named), expand=expand)
    assert (cfg.manifest, cfg.memory_mib, cfg.vcpus) == (rec.digest.hex(), 64, 1)
    with pytest.raises(VoltError, match="boot manifests are not supported here yet"):
        config.from_args(_args("--boot", "web"), host.config)       # e.g. under volt jail


def test_chunk_trace_lists_first_reads_in_order(host_cfg: Path, tmp_path: Path) -> None:
    host = Host.from_config(host_cfg)
    chunks = _chunks(host_cfg)
    with boots.chunk_trace(host, str(tmp_path / "t")):
        vol = VolumeStore.for_host(host).open("root0", readonly=True)
        for idx in (3, 1, 3, 0):
            bytes(vol.slot_view(idx))
        vol.close()
    assert boots.read_trace(tmp_path / "t") == (chunks[3], chunks[1], chunks[0])
    assert host.photon.trace is None


@needs_kvm
def test_run_boot_reads_kernel_from_the_manifest_and_prefetches_first(
        host_cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The registry entry is gone, so only the manifest's chunks hold the kernel; the
    prefetch set is read (and timed) before the vCPUs start, and then sits in the hot tier."""
    c = ["--config", str(host_cfg)]
    chunks = _chunks(host_cfg)
    (tmp_path / "trace").write_text("".join(f"{d.hex()}\n" for d in chunks))
    assert _volt(capsys, *c, "boot", "record", "web", "--kernel", "tiny", "--initrd", "tiny",
                 "--volume", "root0", "--mem", "32", "--prefetch-from",
                 str(tmp_path / "trace"))[0] == 0
    assert _volt(capsys, *c, "kernel", "rm", "tiny")[0] == 0
    code, _, err = _volt(capsys, *c, "run", "--boot", "web", "--timing", "--serial", "none",
                         *IN_PROCESS)
    assert code == 0, err
    assert "prefetch " in err.split("volt: setup", 1)[1].splitlines()[0]
    hot = Host.from_config(host_cfg).photon.tiers.get("hot")
    if hot is not None:
        assert all(hot.contains(d) for d in chunks)
    VolumeStore.for_host(Host.from_config(host_cfg)).delete("root0")
    code, _, err = _volt(capsys, *c, "run", "--boot", "web", "--serial", "none", *IN_PROCESS)
    assert code == exitcodes.USAGE and "root volume 'root0' does not exist" in err, err


@needs_kvm
def test_record_trace_from_boot_runs_the_vm_until_it_ends(
        host_cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The traced boot runs as a real, confined `volt run` child; the tiny guest resets
    at once without touching its disk, so its prefetch set is empty (the lab test records
    a real one)."""
    code, out, err = _volt(capsys, "--config", str(host_cfg), "boot", "record", "web",
                           "--kernel", "tiny", "--volume", "root0", "--trace-from-boot",
                           "--json", "--run-args", "--serial none")
    assert code == 0, err
    assert json.loads(out)["prefetch"] == 0
