"""Run every benchmark, each printing its figures beside its peer's (``make.py bench``).

Each ``bench/<name>/run.py`` also runs alone, with its own options (``--help``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("ingest", "volumes", "unify", "pull", "photon", "boot", "blk", "net", "density",
         "snapshot")


def main() -> int:
    failed = []
    for name in ORDER:
        print(f"\n##### bench/{name}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / name / "run.py")]).returncode
        if rc:
            failed.append(f"{name} (exit {rc})")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
