from volt.lab.pytest_plugin import guest_kernel, lab  # noqa: F401
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins/devices/virtio_stellar/tests"))
import shlex
import subprocess
import test_virtio_stellar_boot as t
from volt.kernels.initramfs import base_archive


def test_probe(lab, guest_kernel, tmp_path):
    img = tmp_path / "root.ext4"
    (tmp_path / "tree/etc").mkdir(parents=True)
    (tmp_path / "tree/etc/debian_version").write_text("12.0\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "tree"), str(img), "16M"], check=True)
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    t.stellar(cfg, "host", "init")
    t.stellar(cfg, "vol", "import", "debroot", img)
    t.stellar(cfg, "vol", "create", "scratch", "1MiB")
    initrd = base_archive(t.INIT).write(tmp_path / "init.cpio")
    volt = Path(sys.executable).with_name("volt")
    cmd = [str(volt), "run", "--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd), "--mem", "256",
           "--device", f"virtio-stellar,volume=debroot,readonly=true,config={cfg}",
           "--device", f"virtio-stellar,volume=scratch,config={cfg}", "--seccomp=kill",
           "--cmdline", "console=ttyS0 reboot=k panic=-1 pci=off"]
    res = lab.run(["sh", "-c", "timeout 200 " + shlex.join(cmd) + "; echo RC=$?; dmesg | grep -a type=1326"], timeout=300,
                  writable=[tmp_path / "store"])
    print(res.stdout[-6000:])
    print(res.stderr[-3000:])
