"""Kernel loaders and the boot-time tables (boot_params, e820, MP table)."""
