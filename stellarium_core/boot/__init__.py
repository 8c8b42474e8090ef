"""Boot manifests: a recorded microVM boot (kernel, initrd, root, command line, size,
prefetch set) stored in NEBULA and bound to names (:mod:`.manifest`, :mod:`.catalog`)."""

from stellarium_core.boot.catalog import (
    RESERVED,
    NoSuchManifest,
    Recorded,
    check,
    check_name,
    list_manifests,
    load,
    read_blob,
    record,
    remove,
)
from stellarium_core.boot.manifest import Blob, BootManifest, BootManifestError, decode

__all__ = ["RESERVED", "Blob", "BootManifest", "BootManifestError", "NoSuchManifest",
           "Recorded", "check", "check_name", "decode", "list_manifests", "load", "read_blob",
           "record", "remove"]
