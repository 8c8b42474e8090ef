"""Asynchronous write-back of chunks to the cold tier, with retries and backoff.

Writers hand over digests, not bytes: the worker reads each chunk from the
durable local tier when it uploads it, so a long outage of the object store
costs queue slots, not memory. The queue is bounded; when it is full,
``submit`` blocks, which is the backpressure a writer should feel. Failed
uploads are retried with exponential backoff (capped) for as long as the
writer runs. Pending digests are journalled (``+hex`` on submit, ``-hex``
when durable below) so a restarted process resumes them.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable
from pathlib import Path

from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import TierBackend

_STOP = b""


def journalled(path: Path) -> list[bytes]:
    """The digests a write-back journal at ``path`` still owes the cold tier."""
    pending: dict[bytes, None] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        op, _, hexkey = line.partition(" ")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            continue  # a torn last line
        if op == "+":
            pending[key] = None
        elif op == "-":
            pending.pop(key, None)
    return list(pending)


class WriteBack:
    """``workers`` threads uploading queued chunks to ``target`` (object stores are
    latency-bound, so a few requests in flight multiply throughput)."""

    def __init__(self, target: TierBackend, source: Callable[[bytes], bytes | None], *,
                 on_done: Callable[[bytes], None] = lambda _k: None,
                 journal: Path | None = None, queue_size: int = 1024,
                 base_delay: float = 0.05, max_delay: float = 5.0, workers: int = 4) -> None:
        if queue_size < 1 or workers < 1:
            raise ValueError("queue_size and workers must be at least 1")
        self.target = target
        self._source = source
        self._on_done = on_done
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._base, self._max = base_delay, max_delay
        self._pending: set[bytes] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self.uploaded = self.retries = self.skipped = 0
        self.last_error = ""
        self._journal_path = journal
        resume = self._open_journal() if journal else []
        self._threads = [threading.Thread(target=self._run, name=f"photon-writeback-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()
        for key in resume:  # already journalled by _open_journal
            with self._lock:
                self._pending.add(key)
            self._queue.put(key)

    # -- journal ------------------------------------------------------------------

    def _open_journal(self) -> list[bytes]:
        """Replay the journal, rewrite it compacted, and return what is still pending."""
        assert self._journal_path is not None
        pending = journalled(self._journal_path)
        self._journal_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._journal_path, "".join(f"+ {k.hex()}\n" for k in pending).encode(),
                     durable=False)
        self._journal = open(self._journal_path, "a", buffering=1)  # noqa: SIM115
        return pending

    def _log(self, op: str, key: bytes) -> None:
        if self._journal_path is not None:
            self._journal.write(f"{op} {key.hex()}\n")

    # -- producer side ------------------------------------------------------------

    def submit(self, key: bytes) -> None:
        """Queue ``key`` for upload; blocks while the queue is full."""
        if self._stop.is_set():
            raise RuntimeError("write-back is closed")
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
            self._log("+", key)
        self._queue.put(key)

    def is_pending(self, key: bytes) -> bool:
        with self._lock:
            return key in self._pending

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted chunk is durable below; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Try to drain for ``timeout`` seconds, then stop; what is left stays journalled."""
        drained = self.flush(timeout)
        self._stop.set()
        for _ in self._threads:
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:
                break  # busy workers see _stop between uploads and retries
        for t in self._threads:
            t.join()
        if self._journal_path is not None:
            self._journal.close()
        return drained

    # -- worker -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if key == _STOP:
                return
            if self._upload(key):
                with self._idle:
                    self._pending.discard(key)
                    self._log("-", key)
                    self._idle.notify_all()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _upload(self, key: bytes) -> bool:
        """Put one chunk below, retrying until it is durable or we are stopped."""
        attempt = 0
        while not self._stop.is_set():
            try:
                data = self._source(key)
                if data is None:
                    self._count("skipped")  # gone from the local tiers: nothing left to save
                    return True
                self.target.put(key, data)
                self._count("uploaded")
                self._on_done(key)
                return True
            except Exception as exc:  # every failure is retried; the cause is kept
                self._count("retries")
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(self._max, self._base * 2 ** attempt)
                attempt += 1
                self._stop.wait(delay * random.uniform(0.5, 1.0))
        return False
