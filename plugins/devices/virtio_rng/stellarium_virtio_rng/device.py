"""The virtio entropy device (virtio 1.x, section 5.4): one queue of writable buffers,
each filled from the host's ``getrandom``.

``bytes_per_sec`` caps what one guest may draw (a token bucket holding one second's
worth); a guest that asks for more waits on a timer in the VMM's event loop, its
buffers staying in the ring until the bucket refills. Nothing the guest posts can
make the device block or raise: a buffer with nowhere to write is returned empty.
"""

from __future__ import annotations

import os
import select
import time

from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    DeviceLink,
    QueueDevice,
    Timer,
    VirtqueueError,
)

DEVICE_ID = 4
QUEUE_SIZE = 256
#: The most one request gets at once (Linux asks for at most a page or so).
MAX_REQUEST = 64 << 10
#: A throttled guest waits until it can have at least this much (what Linux asks for at
#: a time), so the bucket is not drained in dribbles of a few bytes.
MIN_GRANT = 64


class VirtioRng(QueueDevice):
    """Entropy for the guest; ``bytes_per_sec`` 0 means unlimited."""

    device_id = DEVICE_ID
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, bytes_per_sec: int = 0) -> None:
        super().__init__()
        if bytes_per_sec < 0:
            raise ValueError("bytes_per_sec must be >= 0")
        self.rate = bytes_per_sec
        self.tokens = float(bytes_per_sec)
        self._stamp = time.monotonic()
        self._timer = Timer() if bytes_per_sec else None
        self._min_grant = min(MIN_GRANT, bytes_per_sec)
        self.counters = {"requests": 0, "bytes": 0, "throttled": 0, "errors": 0}

    def attach(self, link: DeviceLink) -> None:
        super().attach(link)
        if self._timer is not None:
            link.loop.add(self._timer.fd, self._refilled, select.EPOLLIN)

    def notify(self, queue: int) -> None:
        with self.lock:
            if queue == 0 and self.active:
                self._serve()

    def _refilled(self, _events: int) -> None:
        assert self._timer is not None
        self._timer.ack()
        with self.lock:
            if self.active:
                self._serve()

    def _take(self, want: int) -> int:
        """How many of ``want`` bytes the bucket allows now (and spend them)."""
        if not self.rate:
            return want
        now = time.monotonic()
        self.tokens = min(float(self.rate), self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n

    def _serve(self) -> None:
        mem, q = self.mem, self.queues[0]
        assert mem is not None
        used = 0
        try:
            while True:
                if self.rate and self._take(0) == 0 and self.tokens < self._min_grant:
                    if q.pending(mem):
                        self._wait_for_tokens()
                    break
                chain = q.pop(mem)
                if chain is None:
                    break
                out = chain.writer(mem)
                n = self._take(min(out.remaining, MAX_REQUEST))
                if n:
                    out.write(os.getrandom(n))
                q.add_used(mem, chain.head, out.written)
                self.counters["requests"] += 1
                self.counters["bytes"] += n
                used += 1
        except VirtqueueError as exc:
            self.counters["errors"] += 1
            self.give_up(str(exc))
        if used:
            self.used(q)

    def _wait_for_tokens(self) -> None:
        """Come back when the bucket holds a useful amount (a page, or all of it)."""
        assert self._timer is not None
        self.counters["throttled"] += 1
        need = max(min(4096, self.rate) - self.tokens, 1)
        self._timer.arm(need / self.rate + 0.001)

    def close(self) -> None:
        if self._timer is not None:
            self.unwatch(self._timer.fd)
            self._timer.close()
