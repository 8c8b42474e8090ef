"""Which thread sees which signal: the main thread handles the control signals, a vCPU
thread is kicked out of KVM_RUN with KICK_SIGNAL, and the I/O thread sees neither."""

from __future__ import annotations

import signal

#: Sent to a vCPU thread to make KVM_RUN return (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN
#: Handled by the main thread only: stop (TERM, INT), pause (USR1), resume (USR2).
MAIN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2})


def block_in_this_thread(*, kick: bool) -> None:
    """Keep the main thread's signals (and the kick, unless ``kick``) off this thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_SIGNALS if kick else MAIN_SIGNALS
                           | {KICK_SIGNAL})
