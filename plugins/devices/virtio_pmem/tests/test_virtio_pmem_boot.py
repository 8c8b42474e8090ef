"""End to end in the lab: a Debian root filesystem, imported once as a mappable volume,
is mapped into a real Linux guest by virtio-pmem. The guest mounts it with DAX, puts a
tmpfs overlay over it for its writes, switches root, and runs Debian's own binaries from
it. Reading 100+ MB of files then leaves the guest's page cache as it was: the bytes are
read straight from the host's pages, which is what lets N guests share one copy. A pack
truncated under a running guest ends that VM with a clear error, never a SIGBUS."""

from __future__ import annotations

import hashlib
import shlex
import shutil
from pathlib import Path

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.lab_devices import VOLT
from devtools.stellar_host import ext4_image, host_with_volume

#: The store is copied into L1's own memory: the lab's 9p share is no place to map packs
#: from, and a host's store is on a local filesystem anyway.
STORE = "/dev/shm/pmem"

BEGIN, END = "PMEM-ROOT-BEGIN", "PMEM-ROOT-END"

#: Run by Debian's /bin/sh as PID 1 on the overlay root.
SCRIPT = (
    f"mount -t proc proc /proc; echo {BEGIN}; cat /etc/debian_version; "
    "c0=$(awk \"/^Cached:/{print \\$2}\" /proc/meminfo); "
    "n=$(tar cf - /usr 2>/dev/null | wc -c); "
    "c1=$(awk \"/^Cached:/{print \\$2}\" /proc/meminfo); "
    "echo read $n cached_kib $((c1 - c0)); "
    "md5sum /usr/bin/dpkg; "
    "echo written-in-the-guest > /etc/volt-pmem && cat /etc/volt-pmem; "
    f"echo {END}")

#: Mounts /dev/pmem0 read-only with DAX, a tmpfs overlay on it, and hands over PID 1.
INIT = BUSYBOX_PRELUDE + f"""
mkdir -p /base /rw /newroot
i=0   # the nvdimm bus probes the region and its namespace asynchronously
while [ ! -b /dev/pmem0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o ro,dax /dev/pmem0 /base; then
  echo "PMEM-MOUNT $(grep pmem0 /proc/mounts)"   # the new root cannot see /base
  mount -t tmpfs tmpfs /rw && mkdir /rw/upper /rw/work
  mount -t overlay overlay -o lowerdir=/base,upperdir=/rw/upper,workdir=/rw/work /newroot
  umount /sys /proc
  exec switch_root /newroot /bin/sh -c \\
    '{SCRIPT}; exec perl -e "syscall(169, 0xfee1dead, 672274793, 0x01234567)"'
fi
echo "guest: mounting /dev/pmem0 with DAX failed; nd devices:" /sys/bus/nd/devices/*
reboot -f
"""



#: For the truncation test: mount the base, say so, wait for the host, then read it all.
READ_LATE = BUSYBOX_PRELUDE + """
i=0
while [ ! -b /dev/pmem0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /base
mount -t ext4 -o ro,dax /dev/pmem0 /base && echo PMEM-MAPPED
sleep 5
tar cf - /base/usr 2>/dev/null | wc -c
echo PMEM-READ-AFTER-TRUNCATE
reboot -f
"""


@pytest.fixture(scope="module")
def dax_base(tmp_path_factory) -> tuple[Path, Path]:
    """(Debian tree, host dir): the tree as an ext4 volume imported mappable."""
    from devtools.rootfs import debian_rootfs

    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    src = debian_rootfs()
    tmp = tmp_path_factory.mktemp("dax")
    img = ext4_image(src, tmp / "base.ext4", "320M", "-b", "4096")  # DAX: page blocks
    host_with_volume(tmp, "base", img, "--mappable")
    return src, tmp


def volt_in_l1(kernel: Path, initrd: Path) -> str:
    """The shell command that copies the host into L1's memory and runs the VM from it."""
    return shlex.join([VOLT, "--config", f"{STORE}/host.toml", "run", "--kernel", str(kernel),
                       "--initrd", str(initrd), "--mem", "256", "--cmdline", CMDLINE,
                       "--device", "virtio-pmem,volume=base", "--landlock=off"])


def copy_in(host: Path) -> str:
    return f"mkdir -p {STORE} && " + shlex.join(["cp", "-a", str(host / "host.toml"),
                                                 str(host / "store"), f"{STORE}/"])


@pytest.mark.lab
def test_a_debian_root_mapped_with_dax_boots_and_bypasses_the_guest_page_cache(
        lab, guest_kernel, busybox_initramfs, dax_base, tmp_path):
    src, host = dax_base
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    boot = volt_in_l1(guest_kernel.bzimage, initrd)
    res = lab.run(["/bin/sh", "-c", f"{copy_in(host)} && exec {boot}"], timeout=600)
    out = res.stdout.replace("\r\n", "\n")
    assert BEGIN in out and END in out, (res.stderr[-2000:], out[-3000:])
    got = out.split(BEGIN + "\n", 1)[1].split(END, 1)[0].splitlines()
    assert got[0].encode() + b"\n" == (src / "etc/debian_version").read_bytes()
    mount = out.split("PMEM-MOUNT ", 1)[1].split("\n", 1)[0].split()
    assert mount[0] == "/dev/pmem0" and mount[2] == "ext4", mount
    assert "ro" in mount[3].split(",") and "dax" in mount[3], mount  # dax or dax=always
    words = got[1].split()
    read, cached_kib = int(words[1]), int(words[3])
    assert read > 100 << 20, got[1]                  # /usr, every byte read through DAX
    assert cached_kib * 1024 < read // 8, got[1]     # and not copied into the page cache
    dpkg = hashlib.md5((src / "usr/bin/dpkg").read_bytes()).hexdigest()
    assert got[2].split()[0] == dpkg
    assert got[3] == "written-in-the-guest"          # the overlay takes the guest's writes
    assert res.returncode == 0, (res.stderr[-2000:], out[-3000:])


@pytest.mark.lab
def test_a_pack_truncated_under_a_running_guest_ends_it_with_a_clear_error(
        lab, guest_kernel, busybox_initramfs, dax_base, tmp_path):
    """Someone truncates every pack while the guest has the base mounted: the guest's next
    reads find no page behind the memory slot, KVM says EFAULT, and Volt ends the VM
    with GUEST_ERROR (21) and a message naming the cause; no SIGBUS kills the VMM."""
    _, host = dax_base
    initrd = busybox_initramfs(READ_LATE, tmp_path / "init.cpio")
    boot = volt_in_l1(guest_kernel.bzimage, initrd)
    script = f"""{copy_in(host)} || exit 9
{boot} > /tmp/pmem-console 2>&1 &
vm=$!
i=0
while ! grep -q PMEM-MAPPED /tmp/pmem-console && [ $i -lt 600 ]; do sleep 0.2; i=$((i + 1)); done
for f in {STORE}/store/nebula/packs/*.dat; do truncate -s 4096 "$f"; done
echo TRUNCATED
wait $vm
echo "VOLT-EXIT $?"
cat /tmp/pmem-console
"""
    res = lab.run(["/bin/sh", "-c", script], timeout=600)
    out = res.stdout.replace("\r\n", "\n")
    assert "PMEM-MAPPED" in out and "TRUNCATED" in out, (res.stderr[-2000:], out[-3000:])
    code = int(out.split("VOLT-EXIT ", 1)[1].split()[0])
    assert code == 21, out[-3000:]                   # GUEST_ERROR, not 135 (SIGBUS)
    assert "guest memory is gone from under the VM" in out, out[-3000:]
    assert "PMEM-READ-AFTER-TRUNCATE" not in out
