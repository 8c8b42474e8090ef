"""The end-to-end demo: every landed feature, on real parts, in one transcript.

It drives the real command-line tools as a user would, on a real debootstrap
Debian tree, a real HTTP server on loopback, real systemd-nspawn, and a real
Linux guest booted by Volt under real KVM inside the nested lab. Work files go
to /var/tmp/volt-stellarium-demo (recreated on each run).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.guest import image_root_init  # noqa: E402
from devtools.net import free_port, wait_listening  # noqa: E402
from devtools.rootfs import debian_rootfs  # noqa: E402

WORK = Path("/var/tmp/volt-stellarium-demo")
BIN = Path(sys.executable).parent


#: /init for the VM-root step: mount the virtio-stellar disk and run Debian's own binaries.
ROOT_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
if mount -t ext4 -o ro /dev/vda /mnt; then
  chroot /mnt /bin/sh -c 'echo "guest: Debian $(cat /etc/debian_version) root on /dev/vda,"\
" $(ls /usr/bin | wc -l) programs in /usr/bin, $(/usr/bin/uname -r) kernel"'
else
  echo "guest: mounting /dev/vda failed"
fi
reboot -f
"""


#: What the image-root VM runs from the image: Debian's own sh as PID 1, stat and cat.
IMAGE_SCRIPT = ('echo "guest: PID $$ is the image /bin/sh, / is $(stat -f -c %T /),'
                ' Debian $(cat /etc/debian_version)"')


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def sh(*args: str | Path, config: Path | None = None, check: bool = True,
       tail: int = 25, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    """Run a project CLI (or any command), echo it, and show the end of its output."""
    cmd = [str(a) for a in args]
    if config is not None:
        cmd[1:1] = ["--config", str(config)]
    if (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    print("$ " + " ".join(shlex.quote(Path(c).name if i == 0 else c)
                          for i, c in enumerate(cmd)), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout + proc.stderr).rstrip().splitlines()
    for line in out[-tail:]:
        print("  " + line)
    print(f"  [exit {proc.returncode}, {time.monotonic() - t0:.1f} s]", flush=True)
    if check and proc.returncode != 0:
        sys.exit(f"demo: step failed: {' '.join(cmd)}")
    return proc


def host_config(name: str) -> Path:
    cfg = WORK / f"{name}.toml"
    cfg.write_text(f'[store]\npath = "{name}-store"\n')
    return cfg


@contextmanager
def http_server(directory: Path):
    """A plain static file server on loopback: the 'CDN'."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    a = host_config("a")

    step("Host setup from a config file; installed plugins")
    sh("stellar", "host", "init", config=a)
    sh("stellar", "plugins")

    step("NEBULA: ingest two real Debian trees (minbase, and minbase + python3); dedup")
    base, variant = debian_rootfs(), debian_rootfs(("python3-minimal",))
    sh("stellar", "ingest", base, config=a)
    sh("stellar", "ingest", variant, config=a)
    sh("stellar", "stats", config=a)
    sh("stellar", "fsck", config=a)

    step("Volumes: a 10 GiB TinyVol is a 64-byte manifest; clones copy no data")
    sh("stellar", "vol", "create", "scratch", "10GiB", config=a)
    sh("stellar", "vol", "info", "scratch", config=a)
    image = WORK / "debian.ext4"
    subprocess.run(["truncate", "-s", "512M", str(image)], check=True)
    sh("mkfs.ext4", "-q", "-F", "-d", base, image)
    sh("stellar", "vol", "import", "debian-root", image, config=a)
    sh("stellar", "vol", "commit", "debian-root", config=a)
    for i in range(3):
        sh("stellar", "vol", "clone", "debian-root", f"vm{i}-root", config=a, tail=2)
    sh("stellar", "vol", "ls", config=a)
    sh("stellar", "stats", config=a)

    step("CDN-native distribution: publish as static files, pull over HTTP into another store")
    sh("stellar", "image", "import", base, "debian", config=a)
    cdn = WORK / "cdn"
    sh("stellar", "publish", "debian", cdn, config=a)
    b = host_config("b")
    sh("stellar", "host", "init", config=b)
    with http_server(cdn) as url:
        sh("stellar", "pull", f"{url}/tags/debian", "debian", config=b)
    sh("stellar", "image", "ls", config=b)

    step("One store for VMs and containers: the image's VM form is EROFS over its own chunks")
    sh("stellar", "image", "vmdisk", "debian", config=a)
    sh("stellar", "stats", config=a, tail=12)

    step("Voltainer: the pulled image runs under systemd-nspawn, never extracted")
    sh("voltainer", "run", "--private-network", "debian", "--", "cat", "/etc/debian_version",
       config=b)

    step("PHOTON tiers (NEBULA is the warm level; hot and cold come from [tiers])")
    sh("stellar", "tiers", config=a)

    step("Volt: is /dev/kvm hardware-assisted here?")
    sh("volt", "detect", config=a, check=False)

    step("Volt: build the microVM guest kernel (cached) and store it in NEBULA")
    built = json.loads(sh("volt", "kernel", "build", "--json", config=a, tail=3).stdout)["build"]
    sh("volt", "kernel", "list", config=a)
    initrd = json.loads(sh("volt", "kernel", "initramfs", "--json", config=a).stdout)["initramfs"]

    step("Volt boots the guest to /init under real KVM inside the nested lab")
    sh("volt", "lab", "run", "--", str(BIN / "volt"), "run", "--kernel", built["bzimage"],
       "--initrd", initrd, "--vcpus", "2", "--mem", "128", "--timing", timeout=900)

    from volt.kernels.initramfs import base_archive

    for title, init, device in (
            ("Volt boots a VM whose root disk is the Stellarium volume vm0-root "
             "(virtio-stellar)", ROOT_INIT, "volume=vm0-root,readonly=true"),
            ("Volt boots a VM whose root filesystem is the image debian's VM form",
             image_root_init(IMAGE_SCRIPT), "image=debian")):
        step(title)
        initrd = base_archive(init).write(WORK / "root-init.cpio")
        sh("volt", "lab", "run", "--writable", WORK / "a-store", "--", str(BIN / "volt"),
           "--config", a, "run", "--kernel", built["bzimage"], "--initrd", initrd,
           "--mem", "256", "--device", f"virtio-stellar,{device}",
           "--cmdline", "console=ttyS0 reboot=k panic=-1 pci=off quiet", timeout=900, tail=6)
    print("\ndemo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
