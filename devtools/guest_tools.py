"""Extra guest programs for lab tests whose guest is a busybox initramfs: built here,
cached by their source, and added to an initramfs as a second cpio archive (Linux
unpacks concatenated archives in order)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from devtools import cache

HERE = Path(__file__).parent / "guest"


def vsock_echo() -> Path:
    """A static vsock echo/connect tool (devtools/guest/vsock_echo.c)."""
    src = HERE / "vsock_echo.c"
    name = "vsock-echo-" + cache.key(src.read_text())
    with cache.locked(name) as out:
        if not out.is_file():
            if shutil.which("gcc") is None:
                raise RuntimeError("gcc is not installed (apt-get install gcc)")
            tmp = out.with_name(out.name + ".tmp")
            subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp), str(src)], check=True,
                           capture_output=True)
            tmp.rename(out)
        return out


def append_files(initramfs: Path, files: dict[str, Path]) -> Path:
    """Append ``{guest path: host file}`` to ``initramfs`` as a second newc archive."""
    with tempfile.TemporaryDirectory() as d:
        names = []
        for guest, host in files.items():
            dst = Path(d) / guest.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(host, dst)
            dst.chmod(0o755)
            names.append(guest.lstrip("/"))
        arc = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=d, check=True,
                             input=("\n".join(names) + "\n").encode(), capture_output=True)
    with open(initramfs, "ab") as f:
        f.write(arc.stdout)
    return initramfs
