"""End to end in the lab, under Volt's default confinement: two VMs booted from clones of
one base keep their writes private, and a file written in one ``volt run`` is there in the
next on the same volume. The guests write through ext4 on virtio-stellar; the host reads
the volumes back afterwards with debugfs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.lab_devices import VOLT
from devtools.stellar_host import ext4_image, host_with_volume, stellar

#: Prints /mnt/who, then writes ``volttest.write=`` (from the command line) into it.
INIT = BUSYBOX_PRELUDE + """
W=
for x in $(cat /proc/cmdline); do
  case "$x" in volttest.write=*) W="${x#volttest.write=}";; esac
done
if mount -t ext4 /dev/vda /mnt; then
  echo "WHO-BEFORE $(cat /mnt/who)"
  if [ -n "$W" ]; then echo "$W" > /mnt/who; sync; echo "WHO-WROTE $W"; fi
  umount /mnt
else
  echo WHO-MOUNT-FAILED
fi
reboot -f
"""


def who(cfg: Path, volume: str, tmp: Path) -> str:
    """/who on ``volume``, read on the host (export + debugfs)."""
    img = tmp / f"{volume}.raw"
    stellar(cfg, "vol", "export", volume, img)
    r = subprocess.run(["debugfs", "-R", "cat /who", str(img)], capture_output=True,
                       text=True, timeout=60)
    return r.stdout.strip()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install e2fsprogs)")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "who").write_text("base\n")
    return host_with_volume(tmp_path, "base", ext4_image(tree, tmp_path / "base.ext4"))


def boots(lab, kernel: Path, initrd: Path, cfg: Path, runs: list[tuple[str, str]]) -> str:
    """Boot one VM after the other in one lab run: (volume, what to write) each."""
    cmds = [shlex.join([VOLT, "--config", str(cfg), "run", "--kernel", str(kernel),
                        "--initrd", str(initrd), "--mem", "128",
                        "--cmdline", f"{CMDLINE} volttest.write={write}",
                        "--device", f"virtio-stellar,volume={vol}"]) + f" && echo RUN-OK-{i}"
            for i, (vol, write) in enumerate(runs)]
    res = lab.run(["sh", "-c", "; ".join(cmds)], timeout=600,
                  writable=[cfg.parent / "store"])
    out = res.stdout.replace("\r\n", "\n")
    for i in range(len(runs)):
        assert f"RUN-OK-{i}" in out, (res.stderr[-3000:], out[-3000:])
    return out


@pytest.mark.lab
def test_clones_of_one_base_keep_their_writes_private(lab, guest_kernel, busybox_initramfs,
                                                      store, tmp_path):
    stellar(store, "vol", "clone", "base", "vm-a")
    stellar(store, "vol", "clone", "base", "vm-b")
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    out = boots(lab, guest_kernel.bzimage, initrd, store, [("vm-a", "A"), ("vm-b", "B")])
    befores = [ln for ln in out.splitlines() if ln.startswith("WHO-BEFORE")]
    assert befores == ["WHO-BEFORE base", "WHO-BEFORE base"], out[-3000:]
    assert "WHO-WROTE A" in out and "WHO-WROTE B" in out
    assert (who(store, "vm-a", tmp_path), who(store, "vm-b", tmp_path),
            who(store, "base", tmp_path)) == ("A", "B", "base")


@pytest.mark.lab
def test_a_file_written_in_one_run_is_there_in_the_next(lab, guest_kernel, busybox_initramfs,
                                                        store, tmp_path):
    stellar(store, "vol", "clone", "base", "vm-p")
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    out = boots(lab, guest_kernel.bzimage, initrd, store,
                [("vm-p", "first-run"), ("vm-p", "second-run")])
    befores = [ln for ln in out.splitlines() if ln.startswith("WHO-BEFORE")]
    assert befores == ["WHO-BEFORE base", "WHO-BEFORE first-run"], out[-3000:]
    assert who(store, "vm-p", tmp_path) == "second-run"
