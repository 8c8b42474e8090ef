"""End to end in the lab, under Volt's default confinement: inflating the balloon by
64 MiB over guest memory the guest had used drops the VMM's RSS by at least 48 MiB.

The balloon starts at 64 MiB (``amount_mib``), so Linux inflates it while booting, over
pages it never touched (the guest waits for its MemTotal to settle: the worker that
inflates was measured still running when init started, at 52 of 64 MiB). The guest then
unbinds the driver (deflating it), fills almost all its memory and frees it again (now
every page is resident on the host), and binds the driver again: it inflates the same
64 MiB, this time over pages the host holds. The VMM's RSS is read in L1 at each marker."""

from __future__ import annotations

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.lab_devices import VOLT, lab_scenario

INIT = BUSYBOX_PRELUDE + """
D=/sys/bus/virtio/drivers/virtio_balloon
B=$(ls $D | grep virtio)
total() { awk '/MemTotal/ {print $2}' /proc/meminfo; }
# the driver inflates in a worker after probing: wait until MemTotal holds still for 2 s
boot=$(total); was=0; i=0
while [ "$boot" != "$was" ] && [ $i -lt 150 ]; do
  was=$boot; sleep 2; boot=$(total); i=$((i + 1))
done
echo "BALLOON-BOOT $boot"
echo $B > $D/unbind
echo "BALLOON-DEFLATED $(total)"
avail=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
mount -t tmpfs -o size=$((avail - 24))m tmpfs /mnt
dd if=/dev/zero of=/mnt/fill bs=1M count=$((avail - 24)) 2>/dev/null
rm /mnt/fill
umount /mnt
echo "BALLOON-FILLED $(total) filled $((avail - 24)) MiB"
sleep 1
echo $B > $D/bind
i=0
while [ "$(total)" -gt "$boot" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "BALLOON-INFLATED $(total)"
sleep 1
echo "BALLOON-AFTER $(total)"
reboot -f
"""


@pytest.mark.lab
def test_inflating_64_mib_drops_the_vmm_rss_by_48_mib(lab, guest_kernel, busybox_initramfs,
                                                      tmp_path):
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    argv = [VOLT, "run", "--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd),
            "--mem", "256", "--cmdline", CMDLINE, "--device", "virtio-balloon,amount_mib=64"]
    out = lab_scenario(lab, "balloon", {"argv": argv})
    console, rss = out["console"], out["rss_kib"]
    assert out["exit"] == 0, (out["stderr"], console[-3000:])
    assert "seccomp kill" in out["stderr"]
    lines = {ln.split()[0]: ln.split() for ln in console.splitlines()
             if ln.startswith("BALLOON-")}
    boot, deflated = int(lines["BALLOON-BOOT"][1]), int(lines["BALLOON-DEFLATED"][1])
    # MemTotal moves by a little less than the balloon (measured: 61 of 64 MiB)
    assert deflated - boot >= 56 << 10, console[-2000:]     # the guest had given 64 MiB
    assert int(lines["BALLOON-INFLATED"][1]) <= boot, console[-2000:]
    drop = rss["BALLOON-FILLED"] - rss["BALLOON-AFTER"]
    assert drop >= 48 << 10, f"RSS dropped by only {drop >> 10} MiB: {rss}"
