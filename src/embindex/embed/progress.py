"""Live build progress: embed actors report rows to a tiny Ray actor; the driver polls it."""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


class ProgressReporter:
    """Prints 'embedded X/Y documents (R rows/s)' every `every` seconds from a driver thread."""

    def __init__(self, total: int, log: Callable[[str], None], every: float = 10.0):
        self.counter = ProgressCounter.remote()
        self.total, self.log, self.every = total, log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()

    def __enter__(self) -> "ProgressReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        ray.kill(self.counter)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                done = ray.get(self.counter.get.remote(), timeout=5)
            except Exception:  # progress must never fail a build
                continue
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.log(f"[embindex] embedded {done}/{self.total} documents ({rate:.0f} rows/s)")
