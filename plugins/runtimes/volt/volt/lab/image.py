"""The lab's L1 guest: Debian's generic kernel plus a generated busybox initramfs.

The initramfs loads kvm_amd (real KVM on QEMU's emulated SVM), the virtio PCI
and 9p modules, mounts the host's / read-only over 9p beneath a tmpfs overlay
(so the guest can write anywhere without touching the host, and the host's /tmp
stays visible), mounts the per-run I/O directory writable at its host path, and
runs the command there in a chroot. Everything is cached by its inputs.
"""

from __future__ import annotations

import lzma
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from stellarium_core.errors import StellarError
from volt import cache
from volt.kernels.initramfs import base_archive, busybox

#: Modules the L1 guest needs; their dependencies are added from modules.dep. The
#: network and vsock devices' host sides need tun (taps), bridge, vhost_net and
#: vhost_vsock (QEMU's vhost-vsock peer).
WANTED = ("kvm-amd", "virtio_pci", "9pnet_virtio", "9p", "overlay", "tun", "bridge",
          "vhost_net", "vhost_vsock")
#: Debian's generic (not cloud) image: it ships kvm_amd and virtio_pci as modules.
KERNEL_PACKAGE = "linux-image-amd64"
RECIPE = 3

#: Printed by the lab's /init; the host parses them from the console log.
MARK_READY = "VOLT-LAB-READY"
MARK_FAIL = "VOLT-LAB-FAIL"

LAB_INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "VOLT-LAB-FAIL $*"; sync; reboot -f; }
for m in $(cat /modules.order); do
  insmod "/modules/$m.ko" || fail "insmod $m"
done
IO=
for x in $(cat /proc/cmdline); do
  case "$x" in volt.io=*) IO="${x#volt.io=}";; esac
done
[ -n "$IO" ] || fail "no volt.io= on the kernel command line"
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
  || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
  || fail "mount overlay"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mkdir -p "/newroot$IO"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 labio "/newroot$IO" \
  || fail "mount labio"
i=0
while read -r p; do
  [ -n "$p" ] || continue
  mkdir -p "/newroot$p"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "labrw$i" "/newroot$p" \
    || fail "mount writable $p"
  i=$((i+1))
done <"/newroot$IO/writable"
# The heartbeat: L1's uptime in $IO/alive every few seconds, so the host can tell a
# wedged L1 (no new beat) from a slow command.
sh -c 'while :; do cut -d" " -f1 /proc/uptime >"$1"; sleep 5; done' volt-lab-heartbeat \
  "/newroot$IO/alive" &
beat=$!
echo "VOLT-LAB-READY $(uname -r) kvm=$([ -c /dev/kvm ] && echo yes || echo no)"
chroot /newroot /bin/sh "$IO/cmd.sh" >"/newroot$IO/stdout" 2>"/newroot$IO/stderr" </dev/null
echo $? >"/newroot$IO/rc.tmp" && mv "/newroot$IO/rc.tmp" "/newroot$IO/rc"
kill $beat
sync
umount "/newroot$IO"
reboot -f
"""


@dataclass(frozen=True)
class LabImage:
    """The L1 kernel and initramfs a lab run boots."""

    kernel: Path
    initramfs: Path
    release: str


def _release_of(vmlinuz: Path) -> str:
    return vmlinuz.name.removeprefix("vmlinuz-")


def _kvm_amd(release: str) -> Path | None:
    base = Path("/lib/modules") / release / "kernel/arch/x86/kvm"
    for name in ("kvm-amd.ko", "kvm-amd.ko.xz", "kvm-amd.ko.zst"):
        if (base / name).is_file():
            return base / name
    return None


def find_kernel() -> Path | None:
    """The newest /boot/vmlinuz-*-amd64 whose modules include kvm-amd, if any."""
    cands = [p for p in Path("/boot").glob("vmlinuz-*-amd64")
             if "cloud" not in p.name and _kvm_amd(_release_of(p)) and os.access(p, os.R_OK)]
    cands.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])
    return cands[-1] if cands else None


def ensure_kernel(install: bool = True) -> Path:
    """Debian's generic kernel, installed with apt when /boot has none."""
    found = find_kernel()
    if found is None and install:
        print(f"volt lab: installing {KERNEL_PACKAGE} with apt-get (once)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                               KERNEL_PACKAGE], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise StellarError(f"apt-get install {KERNEL_PACKAGE} failed:\n{tail}")
        found = find_kernel()
    if found is None:
        raise StellarError("no Debian generic kernel with kvm_amd: /boot has no "
                           f"vmlinuz-*-amd64 with modules; install {KERNEL_PACKAGE}")
    return found


def module_order(release: str, wanted: tuple[str, ...] = WANTED) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, dependencies first."""
    moddir = Path("/lib/modules") / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()

    def norm(path: str) -> str:
        return re.sub(r"\.ko(\.\w+)?$", "", Path(path).name).replace("-", "_")

    by_name = {norm(p): p for p in deps}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...] = ()) -> None:
        if path in order or path in stack:
            return
        # modules.dep lists every transitive dependency, deepest last.
        for d in reversed(deps.get(path, [])):
            visit(d, (*stack, path))
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise StellarError(f"kernel {release} has no module {name} in {moddir}")
        visit(path)
    return [moddir / p for p in order]


SIG_MAGIC = b"~Module signature appended~\n"


def _strip_signature(data: bytes) -> bytes:
    """Drop a module's appended signature: verifying RSA under TCG costs seconds per boot,
    and the modules come straight from the installed package anyway."""
    if not data.endswith(SIG_MAGIC):
        return data
    info = data[-len(SIG_MAGIC) - 12:-len(SIG_MAGIC)]
    sig_len = int.from_bytes(info[8:12], "big")
    return data[:-len(SIG_MAGIC) - 12 - sig_len]


def _module_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        data = lzma.decompress(path.read_bytes())
    elif path.suffix == ".zst":
        data = subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    else:
        data = path.read_bytes()
    return _strip_signature(data)


def _boot_kernel(vmlinuz: Path, release: str) -> Path:
    """An ELF vmlinux unpacked from ``vmlinuz`` when the kernel supports PVH entry.

    QEMU then enters the ELF directly, skipping the in-guest decompression that
    costs several seconds per boot under TCG; otherwise the bzImage is used as is.
    """
    config = Path("/boot") / f"config-{release}"
    if not config.is_file() or "CONFIG_PVH=y" not in config.read_text().splitlines():
        return vmlinuz
    st = vmlinuz.stat()
    out = cache.root() / "lab" / f"vmlinux-{release}-{cache.key(st.st_size, st.st_mtime_ns)}"
    with cache.locked(out):
        if out.is_file():
            return out
        data = vmlinuz.read_bytes()
        for magic, make in ((b"\xfd7zXZ\x00", lzma.LZMADecompressor),
                            (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))):
            at = data.find(magic)
            if at < 0:
                continue
            try:
                elf = make().decompress(data[at:])
            except (lzma.LZMAError, zlib.error):
                continue
            if elf[:4] == b"\x7fELF":
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_bytes(elf)
                os.replace(tmp, out)
                return out
    return vmlinuz


def ensure_image(install: bool = True) -> LabImage:
    """The cached lab kernel + initramfs, building the initramfs on first use."""
    kernel = ensure_kernel(install)
    release = _release_of(kernel)
    mods = module_order(release)
    bb = busybox()
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [*mods, bb, kernel]]
    k = cache.key("lab", RECIPE, LAB_INIT, stamp)
    out = cache.root() / "lab" / k / "initramfs.cpio"
    with cache.locked(out):
        if not out.is_file():
            arc = base_archive(LAB_INIT)
            names = []
            for p in mods:
                name = re.sub(r"\.ko(\.\w+)?$", "", p.name)
                arc.file(f"modules/{name}.ko", _module_bytes(p))
                names.append(name)
            arc.file("modules.order", ("\n".join(names) + "\n").encode())
            arc.write(out)
    return LabImage(kernel=_boot_kernel(kernel, release), initramfs=out, release=release)
