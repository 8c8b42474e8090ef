"""A 16550A-compatible UART (8250 family) as the guest console.

Transmit is instant (bytes go straight to the sink), so the transmitter is
always empty; the FIFO is reported so Linux writes 16 bytes per interrupt.
Interrupts are edge-style: ``irq()`` is called when a new enabled condition
becomes pending, and Linux's handler drains by reading IIR until it is clear.

:meth:`Serial.save` / :meth:`Serial.restore` carry the registers and the input not yet
read across a snapshot; an interrupt already raised is the irqchip's state, not this.
"""

from __future__ import annotations

import base64
import binascii
import collections
import threading
from collections.abc import Callable
from typing import Any

from stellarium_core.virtio import StateError, unpack_state

DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NONE, IIR_THRI, IIR_RDI, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_FIFO_MAX = 64
_BYTE = (0, 0xFF)
_SAVED = {"ier": (0, 0x0F), "lcr": _BYTE, "mcr": (0, 0x1F), "scr": _BYTE, "fcr": (0, 0xC9),
          "dll": _BYTE, "dlm": _BYTE, "thr_pending": bool, "rx": str}


class Serial:
    """The UART at one I/O base; ``out`` gets every transmitted byte string."""

    def __init__(self, out: Callable[[bytes], None], irq: Callable[[], None]) -> None:
        self._out = out
        self._irq = irq
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0
        self._thr_pending = False
        self.rx: collections.deque[int] = collections.deque()
        self._lock = threading.RLock()      # vCPU threads and the console input thread

    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & 1 else 0
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI | fifo
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI | fifo
        return IIR_NONE | fifo

    def _update(self, before: int) -> None:
        if self._iir() & IIR_NONE == 0 and before & IIR_NONE:
            self._irq()

    def input(self, data: bytes) -> int:
        """Bytes typed at the console, for the guest to read; returns how many fit."""
        with self._lock:
            before = self._iir()
            room = RX_FIFO_MAX - len(self.rx)
            self.rx.extend(data[:room])
            self._update(before)
            return min(room, len(data))

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self._read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._write(offset, data)

    def _read(self, offset: int, size: int) -> bytes:
        before = self._iir()
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                v = self.dll
            else:
                v = self.rx.popleft() if self.rx else 0
        elif offset == IER:
            v = self.dlm if self.lcr & LCR_DLAB else self.ier
        elif offset == IIR_FCR:
            v = before
            if v & 0x0F == IIR_THRI:
                self._thr_pending = False      # reading IIR acknowledges THRE
        elif offset == LCR:
            v = self.lcr
        elif offset == MCR:
            v = self.mcr
        elif offset == LSR:
            v = LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        elif offset == MSR:
            v = self._msr()
        else:
            v = self.scr
        self._update(before)
        return bytes([v]) + b"\0" * (size - 1)

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4))
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _write(self, offset: int, data: bytes) -> None:
        v = data[0]
        before = self._iir()
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = v
            else:
                if self.mcr & MCR_LOOP:
                    self.rx.append(v)
                else:
                    self._out(bytes([v]))
                self._thr_pending = True
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = v
            else:
                if v & IER_THRI and not self.ier & IER_THRI:
                    self._thr_pending = True
                self.ier = v & 0x0F
        elif offset == IIR_FCR:
            self.fcr = v & 0xC9
            if v & 0x02:
                self.rx.clear()
        elif offset == LCR:
            self.lcr = v
        elif offset == MCR:
            self.mcr = v & 0x1F
        elif offset == SCR:
            self.scr = v
        self._update(before)

    def save(self) -> dict[str, Any]:
        """Registers, the pending transmit interrupt and unread input, JSON-able."""
        with self._lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                    "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm,
                    "thr_pending": self._thr_pending,
                    "rx": base64.b64encode(bytes(self.rx)).decode()}

    def restore(self, state: object) -> None:
        """Take a state :meth:`save` made; anything malformed raises StateError (a
        ValueError) and changes nothing. No interrupt is raised: one pending at the
        snapshot is in the irqchip's state."""
        s = unpack_state(state, "serial", _SAVED)
        try:
            rx = base64.b64decode(s["rx"], validate=True)
        except binascii.Error:
            raise StateError("serial: rx is not base64") from None
        if len(rx) > RX_FIFO_MAX or s["fcr"] & ~0xC9:
            raise StateError(f"serial: {len(rx)} bytes of input (at most {RX_FIFO_MAX}) or "
                             f"FCR {s['fcr']:#x} (bits 0xc9 only)")
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr = s["ier"], s["lcr"], s["mcr"], s["scr"]
            self.fcr, self.dll, self.dlm = s["fcr"], s["dll"], s["dlm"]
            self._thr_pending = s["thr_pending"]
            self.rx = collections.deque(rx)
