"""Live build progress without an extra Ray process.

Each embed actor keeps its running row count (and the wall time its first batch started) under its own
key in Ray's GCS key-value store; a driver thread sums the keys every few seconds. An actor used as a
counter would cost a Ray worker process that wakes ~100 times a second while idle (Ray's 10 ms signal
check), preempting the model's threads on a CPU node for the whole build.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from ray.experimental import internal_kv as kv  # Ray's own libraries use this store the same way

NAMESPACE = "embindex-progress"


class ProgressSink:
    """Actor side: `add(rows)` accumulates; the count is written at most every `every` seconds and on
    `flush()`. Writes never raise: progress must not fail a build."""

    def __init__(self, prefix: str, every: float = 2.0):
        self.key = f"{prefix}/{uuid.uuid4().hex}"
        self.every = every
        self.rows, self._written, self._last = 0, 0, time.perf_counter()
        self._first_put = False

    def started(self) -> None:
        """Record the wall time of this actor's first batch (once)."""
        if not self._first_put:
            self._first_put = self._put(f"{self.key}/first", repr(time.time()))

    def add(self, rows: int) -> None:
        self.rows += rows
        if time.perf_counter() - self._last > self.every:
            self.flush()

    def flush(self) -> None:
        if self.rows != self._written and self._put(f"{self.key}/rows", str(self.rows)):
            self._written = self.rows
        self._last = time.perf_counter()

    @staticmethod
    def _put(key: str, value: str) -> bool:
        try:
            kv._internal_kv_put(key, value, True, namespace=NAMESPACE)
            return True
        except Exception:
            return False


def read_progress(prefix: str) -> tuple[int, float | None]:
    """(rows embedded so far, wall time the first batch started or None) over every sink of `prefix`."""
    rows, first = 0, None
    for key in kv._internal_kv_list(prefix + "/", namespace=NAMESPACE):
        value = kv._internal_kv_get(key, namespace=NAMESPACE)
        if value is None:
            continue
        if key.endswith(b"/rows"):
            rows += int(value)
        elif key.endswith(b"/first"):
            t = float(value)
            first = t if first is None else min(first, t)
    return rows, first


class ProgressReporter:
    """Driver side: prints 'embedded X/Y documents (R rows/s)' every `every` seconds while embedding;
    `first_batch_at` (wall time the first batch started, or None) is known after exit."""

    def __init__(self, total: int, log: Callable[[str], None], every: float = 10.0):
        self.prefix = f"run-{uuid.uuid4().hex}"
        self.total, self.log, self.every = total, log, every
        self.first_batch_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()

    def __enter__(self) -> "ProgressReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            _, self.first_batch_at = read_progress(self.prefix)
            kv._internal_kv_del(self.prefix + "/", del_by_prefix=True, namespace=NAMESPACE)
        except Exception:  # progress must never fail a build
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                done, _ = read_progress(self.prefix)
            except Exception:
                continue
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.log(f"[embindex] embedded {done}/{self.total} documents ({rate:.0f} rows/s)")
