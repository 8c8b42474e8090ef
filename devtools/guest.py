"""Guest-side scripts shared by tests, demo and benchmarks that boot real Linux."""

from __future__ import annotations


def image_root_init(script: str) -> str:
    """A busybox /init that mounts /dev/vda (an image's VM form, EROFS) as the root and
    hands PID 1 to the image's own /bin/sh running ``script`` (no single quotes).

    Afterwards Debian's perl calls reboot(2), so the guest restarts cleanly (Volt
    exits on the reset) instead of panicking on a dead init.
    """
    if "'" in script:
        raise ValueError("the script is passed in single quotes; it must not hold one")
    return f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mkdir -p /newroot
if mount -t erofs -o ro /dev/vda /newroot; then
  umount /proc
  exec switch_root /newroot /bin/sh -c \\
    '{script}; exec perl -e "syscall(169, 0xfee1dead, 672274793, 0x01234567)"'
fi
echo "guest: mounting /dev/vda as EROFS failed"
reboot -f
"""


#: What every busybox /init of the device lab tests starts with.
BUSYBOX_PRELUDE = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
"""
#: Linux's command line for a Volt guest with a serial console that ends on reboot.
CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off"
