"""The i8042 under the exact sequence Linux 6.1's i8042, libps2 and atkbd drivers send.

:class:`LinuxDriver` replays drivers/input/serio/i8042.c (platform init, controller
check and init, the AUX probe, keyboard port setup) and atkbd_connect (GETID,
deactivate, LEDs, typematic, enable) the way the kernel does it: polling the status
register for controller replies, taking keyboard bytes from IRQ 1. Every poll that
finds no byte would cost a real guest 50 us and a VM exit, up to 10000 times per
command, so the test counts them; the model must answer every probe at once.
"""

from __future__ import annotations

import pytest
from volt.vmm.devices import i8042 as k
from volt.vmm.devices.i8042 import I8042, KeyboardNotReady

STR_OBF, STR_AUXDATA, STR_KEYLOCK = 0x01, 0x20, 0x10
CTR_KBDINT, CTR_KBDDIS, CTR_XLATE = 0x01, 0x10, 0x40
CMD_CTL_RCTR, CMD_CTL_WCTR, CMD_AUX_LOOP, CMD_AUX_TEST = 0x0120, 0x1060, 0x11D3, 0x01A9
ATKBD_GETID, ATKBD_RESET_DIS, ATKBD_SETLEDS, ATKBD_SETREP, ATKBD_ENABLE = (
    0x02F2, 0x00F5, 0x10ED, 0x10F3, 0x00F4)


class LinuxDriver:
    """Linux's side: port accesses, IRQ 1 handling, and what each step concluded."""

    def __init__(self, dev: I8042) -> None:
        self.dev = dev
        self.irqs = 0
        self.empty_polls = 0            # status reads that found no byte (a stalling guest)
        self.exits = 0                  # every port access is a VM exit
        self.kbd_bytes: list[int] = []  # bytes the IRQ handler delivered to the keyboard

    def status(self) -> int:
        self.exits += 1
        return self.dev.read(4, 1)[0]

    def data(self) -> int:
        self.exits += 1
        return self.dev.read(0, 1)[0]

    def out(self, port: int, v: int) -> None:
        self.exits += 1
        self.dev.write(port, bytes([v]))
        self.service_irqs()

    def service_irqs(self) -> None:
        """i8042_interrupt, once per pulse: read status, then the byte if there is one."""
        while self.irqs:
            self.irqs -= 1
            if self.status() & STR_OBF:
                self.kbd_bytes.append(self.data())

    def wait_read(self) -> bool:
        for _ in range(10000):              # I8042_CTL_TIMEOUT
            if self.status() & STR_OBF:
                return True
            self.empty_polls += 1
        return False

    def command(self, cmd: int, params: list[int] | None = None) -> list[int] | None:
        """__i8042_command: None where Linux gets -1."""
        self.out(4, cmd & 0xFF)
        for p in params or []:
            self.out(0, p)
        got = []
        for _ in range((cmd >> 8) & 0xF):
            if not self.wait_read():
                return None
            if cmd == CMD_AUX_LOOP and not self.status() & STR_AUXDATA:
                return None
            got.append(self.data())
        return got

    def flush(self) -> None:
        for _ in range(16):
            if not self.status() & STR_OBF:
                return
            self.data()

    def ps2_command(self, cmd: int, params: list[int] | None = None) -> list[int] | None:
        """libps2: each byte out must be ACKed (through IRQ 1), then the reply bytes."""
        for b in [cmd & 0xFF, *(params or [])]:
            start = len(self.kbd_bytes)
            self.out(0, b)
            if self.kbd_bytes[start:start + 1] != [k.ACK]:
                return None
            del self.kbd_bytes[start]
        n = (cmd >> 8) & 0xF
        if len(self.kbd_bytes) < n:
            return None
        reply, self.kbd_bytes = self.kbd_bytes[:n], self.kbd_bytes[n:]
        return reply

    def probe(self) -> dict:
        """i8042_init .. i8042_probe, then atkbd_connect; returns Linux's conclusions."""
        seen: dict = {}
        self.command(0x10D1, [0xDF])                     # A20 on, output port
        self.command(0x00FF)                             # null command for SMM
        self.flush()                                     # i8042_controller_check
        ctr = [self.command(CMD_CTL_RCTR), self.command(CMD_CTL_RCTR)]
        seen["ctr_stable"] = ctr[0] == ctr[1] and ctr[0] is not None
        c = ctr[0][0]
        c = (c | CTR_KBDDIS) & ~CTR_KBDINT
        seen["keylock"] = not self.status() & STR_KEYLOCK
        seen["translated"] = bool(c & CTR_XLATE)
        self.command(CMD_CTL_WCTR, [c])
        self.flush()
        self.flush()                                     # i8042_check_aux
        loop = self.command(CMD_AUX_LOOP, [0x5A])
        aux = loop == [0x5A]
        if not aux:
            test = self.command(CMD_AUX_TEST)
            aux = test is not None and test[0] in (0x00, 0xFA, 0xFF)
        seen["aux"] = aux
        c = (c & ~CTR_KBDDIS) | CTR_KBDINT                # i8042_enable_kbd_port
        self.command(CMD_CTL_WCTR, [c])
        seen["id"] = self.ps2_command(ATKBD_GETID)         # atkbd_probe
        seen["deactivate"] = self.ps2_command(ATKBD_RESET_DIS)
        seen["leds"] = self.ps2_command(ATKBD_SETLEDS, [0])
        seen["rep"] = self.ps2_command(ATKBD_SETREP, [0])
        seen["enable"] = self.ps2_command(ATKBD_ENABLE)
        return seen


@pytest.fixture
def linux() -> LinuxDriver:
    resets: list[int] = []
    drv: LinuxDriver

    def irq() -> None:
        drv.irqs += 1

    dev = I8042(lambda: resets.append(1), irq)
    drv = LinuxDriver(dev)
    drv.resets = resets
    return drv


def test_linux_probe_gets_every_answer_at_once(linux: LinuxDriver) -> None:
    seen = linux.probe()
    assert linux.empty_polls == 0, "a probe command went unanswered: the guest would poll"
    assert seen["ctr_stable"] and not seen["keylock"]
    assert seen["translated"] is False          # set 2 from the keyboard, as Firecracker
    assert seen["aux"] is False                  # given up after two answered commands
    assert seen["id"] == list(k.KEYBOARD_ID)
    assert seen["deactivate"] == seen["leds"] == seen["rep"] == seen["enable"] == []
    assert linux.kbd_bytes == [] and linux.irqs == 0
    assert linux.exits < 80, linux.exits         # the whole probe, in port accesses
    assert linux.resets == []                    # D1 0xDF and command 0xFF are no resets


def test_ctrl_alt_del_arrives_as_set2_make_and_break_codes_one_irq_each(linux) -> None:
    linux.probe()
    linux.dev.ctrl_alt_del()
    linux.service_irqs()
    assert linux.kbd_bytes == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    assert linux.dev.keys_sent == 1


def test_ctrl_alt_del_follows_translation_and_the_selected_set(linux) -> None:
    linux.probe()
    assert linux.ps2_command(0x10F0, [1]) == []            # select scan code set 1
    assert linux.ps2_command(0x11F0, [0]) == [1]           # ... and read it back
    linux.dev.ctrl_alt_del()
    linux.service_irqs()
    assert linux.kbd_bytes == list(k.CTRL_ALT_DEL[1])
    linux.kbd_bytes.clear()
    linux.ps2_command(0x10F0, [2])
    linux.command(CMD_CTL_WCTR, [CTR_KBDINT | CTR_XLATE | 0x04])
    linux.dev.ctrl_alt_del()                               # the controller translates
    linux.service_irqs()
    assert linux.kbd_bytes == list(k.CTRL_ALT_DEL[1])


def test_keys_are_refused_while_the_guest_has_the_keyboard_off(linux) -> None:
    linux.probe()
    linux.ps2_command(ATKBD_RESET_DIS)                     # scanning off
    with pytest.raises(KeyboardNotReady, match="not enabled"):
        linux.dev.ctrl_alt_del()
    linux.ps2_command(ATKBD_ENABLE)
    linux.out(4, 0xAD)                                      # controller: keyboard disabled
    with pytest.raises(KeyboardNotReady):
        linux.dev.ctrl_alt_del()
    linux.out(4, 0xAE)
    linux.dev.ctrl_alt_del()
    linux.service_irqs()
    assert len(linux.kbd_bytes) == 11


def test_reset_through_pulse_and_through_the_output_port(linux) -> None:
    linux.out(4, 0xFE)
    linux.command(0x10D1, [0xDE])                           # output port, reset bit low
    assert linux.resets == [1, 1]
    linux.out(4, 0xFF)                                      # pulses nothing
    assert linux.resets == [1, 1] and linux.dev.resets == 2


def test_unknown_keyboard_bytes_get_resend_and_echo_and_bat_work(linux) -> None:
    linux.probe()
    linux.out(0, 0x42)
    linux.out(0, 0xEE)
    linux.out(0, 0xFF)
    assert linux.kbd_bytes == [k.RESEND, k.KBD_ECHO, k.ACK, k.BAT_OK]
