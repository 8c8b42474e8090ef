"""Where things go in guest physical memory at boot (Firecracker's x86-64 layout)."""

GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MODLIST_ADDR = 0x6040
PVH_MEMMAP_ADDR = 0x6100
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK = 0x8FF0
PML4_ADDR = 0x9000
PDPTE_ADDR = 0xA000
PDE_ADDR = 0xB000
EBDA_START = 0x9FC00
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 2048            # the x86 kernel's COMMAND_LINE_SIZE
HIMEM_START = 0x100000
KERNEL_MIN_ADDR = HIMEM_START
IOAPIC_ADDR = 0xFEC00000
APIC_ADDR = 0xFEE00000
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
MMIO_BASE = 0xD0000000        # virtio-mmio windows, one 4 KiB page each
MMIO_SIZE = 0x1000
IRQ_BASE = 5                  # first GSI for virtio-mmio devices
IRQ_MAX = 23
SERIAL_IRQ = 4
KEYBOARD_IRQ = 1              # the i8042 keyboard (ISA IRQ 1)
E820_RAM, E820_RESERVED = 1, 2
#: Device memory (virtio-pmem windows) starts above RAM and the 32-bit gap, each range
#: at a memory-section boundary so the guest can hot-add it (ZONE_DEVICE pages).
DEVICE_MEMORY_ALIGN = 128 << 20
