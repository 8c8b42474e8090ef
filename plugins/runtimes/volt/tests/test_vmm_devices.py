"""8250 UART and i8042 register behaviour, as Linux's drivers exercise them."""

from __future__ import annotations

from volt.vmm.devices import serial as uart
from volt.vmm.devices.i8042 import I8042


def make():
    out, irqs = [], []
    return uart.Serial(out.append, lambda: irqs.append(1)), out, irqs


def reg(s: uart.Serial, off: int) -> int:
    return s.read(off, 1)[0]


def test_transmit_goes_to_sink_and_raises_thre_when_enabled():
    s, out, irqs = make()
    s.write(uart.DATA, b"A")
    assert out == [b"A"] and irqs == []          # THRE interrupt not enabled yet
    s.write(uart.IER, bytes([uart.IER_THRI]))
    assert irqs == [1]                            # enabling with an empty THR fires at once
    assert reg(s, uart.IIR_FCR) & 0x0F == uart.IIR_THRI
    assert reg(s, uart.IIR_FCR) & 0x0F == uart.IIR_NONE    # reading IIR acknowledged it
    s.write(uart.DATA, b"B")
    assert irqs == [1, 1] and reg(s, uart.LSR) & (uart.LSR_THRE | uart.LSR_TEMT)


def test_fifo_reported_as_16550a_and_scratch_and_ier_read_back():
    s, _, _ = make()
    s.write(uart.IIR_FCR, b"\x07")
    assert reg(s, uart.IIR_FCR) & 0xC0 == 0xC0
    s.write(uart.SCR, b"\x5a")
    assert reg(s, uart.SCR) == 0x5A
    s.write(uart.IER, b"\x0f")
    assert reg(s, uart.IER) == 0x0F


def test_input_interrupts_and_is_read_in_order():
    s, _, irqs = make()
    s.write(uart.IER, bytes([uart.IER_RDI]))
    assert s.input(b"hi") == 2 and irqs == [1]
    assert reg(s, uart.LSR) & uart.LSR_DR
    assert reg(s, uart.IIR_FCR) & 0x0F == uart.IIR_RDI
    assert bytes([reg(s, uart.DATA), reg(s, uart.DATA)]) == b"hi"
    assert not reg(s, uart.LSR) & uart.LSR_DR
    assert s.input(b"x" * 100) == uart.RX_FIFO_MAX


def test_divisor_latch_and_loopback():
    s, out, _ = make()
    s.write(uart.LCR, bytes([uart.LCR_DLAB]))
    s.write(uart.DATA, b"\x01")
    s.write(uart.IER, b"\x00")
    assert (reg(s, uart.DATA), reg(s, uart.IER)) == (1, 0)
    s.write(uart.LCR, b"\x03")
    s.write(uart.MCR, bytes([uart.MCR_LOOP | 0x0B]))
    assert reg(s, uart.MSR) & 0xF0 == uart.MSR_DCD | uart.MSR_DSR | uart.MSR_CTS
    s.write(uart.DATA, b"L")
    assert out == [] and reg(s, uart.DATA) == ord("L")


def test_i8042_reset_and_self_test():
    resets = []
    k = I8042(lambda: resets.append(1))
    k.write(4, b"\xaa")
    assert k.read(4, 1)[0] & 1 and k.read(0, 1) == b"\x55"
    k.write(4, b"\x20")
    assert k.read(0, 1)[0] == k.ctr
    k.write(4, b"\xfe")
    assert resets == [1]


def test_console_sinks_file_unix_and_bad_spec(tmp_path):
    import socket

    import pytest
    from volt.vmm import exitcodes
    from volt.vmm.devices.console import open_sink
    from volt.vmm.exitcodes import VoltError

    log = tmp_path / "console.log"
    sink = open_sink(f"file:{log}")
    sink(b"hello ")
    sink(b"file")
    assert log.read_bytes() == b"hello file"

    path = str(tmp_path / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    sink = open_sink(f"unix:{path}")
    conn, _ = server.accept()
    sink(b"over a socket")
    assert conn.recv(100) == b"over a socket"
    conn.close()
    server.close()
    sink(b"peer gone")           # a vanished console must not raise into the vCPU

    for bad in ("tty", f"unix:{tmp_path}/nobody-listens", "file:/proc/nope/x"):
        with pytest.raises(VoltError) as err:
            open_sink(bad)
        assert err.value.exit_code == exitcodes.DEVICE
