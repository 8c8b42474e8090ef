"""The PS/2 controller (i8042) and its keyboard: Linux's probe, its keyboard driver, Ctrl-Alt-Del,
and the reset line.

Every command Linux's i8042 and atkbd drivers send gets its answer at once, because a
missing byte costs the guest a polling loop (0.5 s of status reads per byte) or a
sleeping timeout. The model is an AT-type controller with a keyboard and no AUX port:
a microVM has no mouse, and GSI 12 belongs to a virtio-mmio device. An AT controller
knows no AUX commands, so the byte Linux sends after "AUX loopback" (0xD3) reaches the
keyboard, which answers RESEND; Linux sees keyboard data where it wanted AUX data and
gives up on AUX at once, without its 250 ms interrupt test. The status register says
"keyboard not inhibited" (else Linux warns "Keylock active").

The controller starts untranslated (no XLATE in the control byte), like Firecracker's,
so Linux drives the keyboard in scan code set 2. Keyboard bytes raise IRQ 1 when the
control byte enables it, one pulse per byte; controller replies raise none (Linux
polls for them). The guest resets the machine through output-port bit 0: command
0xFE (pulse it, Linux's ``reboot=k``) or 0xD1 with the bit clear.

:meth:`I8042.save` / :meth:`I8042.restore` carry the controller's and keyboard's state
(bytes waiting in the output buffer, a command awaiting its argument) across a snapshot.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from stellarium_core.virtio import StateError, unpack_state

DATA_PORT = 0x60      # the bus registers the controller at 0x60 with length 5 (0x60..0x64)
CMD_OFFSET = 4

ST_OUT_FULL, ST_SYSFLAG, ST_CMD, ST_NOT_INHIBITED = 0x01, 0x04, 0x08, 0x10
CTR_KBDINT, CTR_SYSFLAG, CTR_KBDDIS, CTR_XLATE = 0x01, 0x04, 0x10, 0x40

CMD_READ_CTR, CMD_WRITE_CTR, CMD_SELF_TEST, CMD_KBD_TEST = 0x20, 0x60, 0xAA, 0xAB
CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xAD, 0xAE
CMD_READ_OUTP, CMD_WRITE_OUTP, CMD_RESET = 0xD0, 0xD1, 0xFE
SELF_TEST_OK, INTERFACE_OK = 0x55, 0x00
OUTP_RESET_LINE, OUTP_A20 = 0x01, 0x02

KBD_SET_LEDS, KBD_ECHO, KBD_SCANCODE_SET, KBD_GET_ID = 0xED, 0xEE, 0xF0, 0xF2
KBD_TYPEMATIC, KBD_ENABLE, KBD_DISABLE, KBD_DEFAULTS = 0xF3, 0xF4, 0xF5, 0xF6
KBD_RESEND, KBD_RESET = 0xFE, 0xFF
ACK, RESEND, BAT_OK = 0xFA, 0xFE, 0xAA
KEYBOARD_ID = (0xAB, 0x83)            # an MF2 keyboard
#: The controller's output buffer (Linux's I8042_BUFFER_SIZE).
BUFFER = 16

#: Ctrl, Alt and Delete pressed, then released, in scan code sets 1, 2 and 3.
CTRL_ALT_DEL = {
    1: bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]),
    2: bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]),
    3: bytes([0x11, 0x19, 0x64, 0xF0, 0x64, 0xF0, 0x19, 0xF0, 0x11]),
}


_BYTE = (0, 0xFF)
_SAVED = {"ctr": _BYTE, "outp": _BYTE, "out": list, "last": _BYTE, "last_was_cmd": bool,
          "ctl_pending": frozenset({None, CMD_WRITE_CTR, CMD_WRITE_OUTP}),
          "kbd_pending": frozenset({None, KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC}),
          "kbd_last": _BYTE, "scanning": bool, "scancode_set": frozenset(CTRL_ALT_DEL),
          "leds": (0, 7)}


class KeyboardNotReady(Exception):
    """The guest has not enabled the keyboard (no driver yet, or it turned it off)."""


class I8042:
    """Controller + keyboard on ports 0x60/0x64; thread-safe (vCPUs and the API use it)."""

    def __init__(self, on_reset: Callable[[], None],
                 irq: Callable[[], None] = lambda: None) -> None:
        self._on_reset, self._irq = on_reset, irq
        self._lock = threading.Lock()
        self.ctr = CTR_KBDINT | CTR_SYSFLAG
        self.outp = OUTP_RESET_LINE | OUTP_A20
        self._out: deque[tuple[int, bool]] = deque()     # (byte, from the keyboard)
        self._last = 0
        self._last_was_cmd = False
        self._ctl_pending: int | None = None             # controller command awaiting data
        self._kbd_pending: int | None = None             # keyboard command awaiting data
        self._kbd_last = 0
        self.scanning = True
        self.scancode_set = 2
        self.leds = 0
        self.resets = 0
        self.keys_sent = 0

    # -- snapshots ------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """Controller and keyboard state, JSON-able (the counters are not the guest's)."""
        with self._lock:
            return {"ctr": self.ctr, "outp": self.outp,
                    "out": [[b, kbd] for b, kbd in self._out], "last": self._last,
                    "last_was_cmd": self._last_was_cmd, "ctl_pending": self._ctl_pending,
                    "kbd_pending": self._kbd_pending, "kbd_last": self._kbd_last,
                    "scanning": self.scanning, "scancode_set": self.scancode_set,
                    "leds": self.leds}

    def restore(self, state: object) -> None:
        """Take a state :meth:`save` made; anything malformed raises StateError (a
        ValueError) and changes nothing. No interrupt is raised (the irqchip has it)."""
        s = unpack_state(state, "i8042", _SAVED)
        out = s["out"]
        if len(out) > BUFFER or not all(
                type(e) is list and len(e) == 2 and type(e[0]) is int and 0 <= e[0] <= 0xFF
                and type(e[1]) is bool for e in out):
            raise StateError(f"i8042: out must be at most {BUFFER} [byte, from keyboard] "
                             "pairs")
        with self._lock:
            self.ctr, self.outp, self._last = s["ctr"], s["outp"], s["last"]
            self._out = deque((b, kbd) for b, kbd in out)
            self._last_was_cmd = s["last_was_cmd"]
            self._ctl_pending, self._kbd_pending = s["ctl_pending"], s["kbd_pending"]
            self._kbd_last, self.scanning = s["kbd_last"], s["scanning"]
            self.scancode_set, self.leds = s["scancode_set"], s["leds"]

    # -- the bus --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == CMD_OFFSET:
                v = (ST_NOT_INHIBITED | (self.ctr & CTR_SYSFLAG)
                     | (ST_CMD if self._last_was_cmd else 0)
                     | (ST_OUT_FULL if self._out else 0))
            elif offset == 0:
                if self._out:
                    self._last = self._out.popleft()[0]
                    self._arm()
                v = self._last
            else:
                v = 0xFF
        return bytes([v]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        reset = False
        with self._lock:
            v = data[0]
            self._last_was_cmd = offset == CMD_OFFSET
            if offset == CMD_OFFSET:
                reset = self._command(v)
            elif offset == 0:
                reset = self._data(v)
        if reset:
            self.resets += 1
            self._on_reset()

    # -- the controller -------------------------------------------------------------------

    def _command(self, v: int) -> bool:
        """A controller command; True when it pulses the reset line."""
        self._ctl_pending = None
        if v == CMD_READ_CTR:
            self._reply(self.ctr)
        elif v in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
            self._ctl_pending = v
        elif v == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif v == CMD_KBD_TEST:
            self._reply(INTERFACE_OK)
        elif v == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif v == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif v == CMD_READ_OUTP:
            self._reply(self.outp)
        elif v >= 0xF0:                         # pulse output lines; bit 0 low = reset
            return not v & OUTP_RESET_LINE
        # Anything else (AUX 0xA7-0xA9/0xD3/0xD4, MUX 0x90-0x93) is not an AT command.
        return False

    def _data(self, v: int) -> bool:
        pending, self._ctl_pending = self._ctl_pending, None
        if pending == CMD_WRITE_CTR:
            self.ctr = v
            self._arm()
        elif pending == CMD_WRITE_OUTP:
            self.outp = v
            return not v & OUTP_RESET_LINE
        else:
            self._keyboard(v)
        return False

    def _reply(self, v: int) -> None:
        """A controller reply goes out ahead of keyboard bytes still waiting."""
        self._out.appendleft((v, False))

    # -- the keyboard ---------------------------------------------------------------------

    def _keyboard(self, v: int) -> None:
        """A byte sent to the keyboard: a command, or the argument of the last one."""
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None:
            if pending == KBD_SET_LEDS:
                self.leds = v & 7
            elif pending == KBD_SCANCODE_SET:
                if v == 0:
                    self._send(ACK, self.scancode_set)
                    return
                if v not in CTRL_ALT_DEL:
                    self._send(RESEND)
                    return
                self.scancode_set = v
            self._send(ACK)
            return
        if v in (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC):
            self._kbd_pending = v
            self._send(ACK)
        elif v == KBD_ECHO:
            self._send(KBD_ECHO)
        elif v == KBD_GET_ID:
            self._send(ACK, *KEYBOARD_ID)
        elif v in (KBD_ENABLE, KBD_DISABLE, KBD_DEFAULTS):
            self.scanning = v == KBD_ENABLE
            self._send(ACK)
        elif 0xF7 <= v <= 0xFD:                 # set-3 key types: accepted, no effect here
            self._send(ACK)
        elif v == KBD_RESEND:
            self._send(self._kbd_last)
        elif v == KBD_RESET:
            self.scanning, self.scancode_set, self.leds = True, 2, 0
            self._send(ACK, BAT_OK)
        else:
            self._send(RESEND)

    def _send(self, *data: int) -> None:
        """Keyboard bytes into the output buffer (IRQ 1 if it is enabled)."""
        for b in data:
            if len(self._out) < BUFFER:
                self._out.append((b, True))
                self._kbd_last = b
        self._arm()

    def _arm(self) -> None:
        """Pulse IRQ 1 when a keyboard byte is next in the output buffer."""
        if self._out and self._out[0][1] and self.ctr & CTR_KBDINT:
            self._irq()

    def ctrl_alt_del(self) -> None:
        """Press and release Ctrl-Alt-Del on the keyboard (the guest decides what it means).

        Raises KeyboardNotReady when the guest has not enabled the keyboard, its
        interrupt, or scanning: the keys would never reach a driver.
        """
        with self._lock:
            if not self.scanning or self.ctr & CTR_KBDDIS or not self.ctr & CTR_KBDINT:
                raise KeyboardNotReady("the guest has not enabled its i8042 keyboard (no "
                                       "keyboard driver running yet, or it was turned off)")
            keys = CTRL_ALT_DEL[1 if self.ctr & CTR_XLATE else self.scancode_set]
            if BUFFER - len(self._out) < len(keys):
                raise KeyboardNotReady("the guest is not reading its i8042 keyboard "
                                       "(output buffer full)")
            self.keys_sent += 1
            self._send(*keys)
