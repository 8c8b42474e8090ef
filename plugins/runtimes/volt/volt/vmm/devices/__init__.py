"""Emulated devices: port/MMIO bus, 8250 serial, i8042, virtio-mmio transport."""
