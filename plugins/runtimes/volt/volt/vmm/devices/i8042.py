"""Just enough of the PS/2 controller for Linux's reboot path (and its probe).

The guest resets the machine by writing 0xFE (pulse reset line) to the command
port; that ends the VM through ``on_reset``, the way Firecracker does it.
"""

from __future__ import annotations

from collections.abc import Callable

DATA_PORT = 0x60      # the bus registers the controller at 0x60 with length 5 (0x60..0x64)
CMD_OFFSET = 4
CMD_READ_CTR, CMD_WRITE_CTR, CMD_SELF_TEST, CMD_RESET = 0x20, 0x60, 0xAA, 0xFE
ST_OUT_FULL, ST_SYSFLAG = 0x01, 0x04


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.ctr = 0x47
        self.out: int | None = None
        self._pending_cmd: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        if offset == CMD_OFFSET:
            v = ST_SYSFLAG | (ST_OUT_FULL if self.out is not None else 0)
        elif offset == 0:
            v, self.out = (self.out or 0), None
        else:
            v = 0xFF
        return bytes([v]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        v = data[0]
        if offset == CMD_OFFSET:
            if v == CMD_RESET:
                self._on_reset()
            elif v == CMD_READ_CTR:
                self.out = self.ctr
            elif v == CMD_SELF_TEST:
                self.out = 0x55
            elif v == CMD_WRITE_CTR:
                self._pending_cmd = v
        elif offset == 0 and self._pending_cmd == CMD_WRITE_CTR:
            self.ctr, self._pending_cmd = v, None
