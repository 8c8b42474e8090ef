"""virtio-pmem: a read-only base mapped straight from NEBULA into guest-physical memory."""
