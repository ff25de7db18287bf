"""A lease object for stores without conditional writes (`index.commit: lease`).

`INDEX_URI/_commit.lease` holds {owner, expires_at}. To take it a writer waits until it is absent or
expired, writes its own lease, waits `settle` seconds and reads it back: it holds the lease only if its
own owner token is still there (a writer that wrote at the same time overwrote it, or was overwritten).
It then publishes (a few small writes) and deletes the lease.

The guarantees rest on timing, as any lock on a store without compare-and-swap must:
- between reading "absent/expired" and writing its lease a writer spends far less than `settle`
  (default 2 s) — one PUT;
- writers' clocks agree to well within `ttl` (default 60 s), and a publish inside the lease takes less
  than `ttl` (it writes one manifest and `_latest`);
- the store is read-after-write consistent (S3, GCS and Azure are).
Prefer a store with conditional writes (local disk, S3): there publishing needs no lease.
"""

from __future__ import annotations

import json
import secrets
import time

from ..storage import Storage

LEASE = "_commit.lease"


class LeaseTimeout(TimeoutError):
    """Another writer held the lease for longer than the wait allows."""


class Lease:
    def __init__(self, store: Storage, ttl: float = 60.0, settle: float = 2.0, wait: float = 600.0,
                 poll: float = 0.5):
        self.store, self.ttl, self.settle, self.wait, self.poll = store, ttl, settle, wait, poll
        self.owner = secrets.token_hex(8)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_text(LEASE))
        except (FileNotFoundError, ValueError):  # absent, or caught half-written by another store client
            return None

    def __enter__(self) -> "Lease":
        deadline = time.time() + self.wait
        while True:
            held = self._read()
            if held is None or held.get("expires_at", 0) < time.time():
                self.store.write_text(LEASE, json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl}))
                time.sleep(self.settle)
                held = self._read()
                if held is not None and held.get("owner") == self.owner:
                    return self
            if time.time() > deadline:
                raise LeaseTimeout(f"{self.store.uri(LEASE)} is held by another writer (waited {self.wait:.0f}s)")
            time.sleep(self.poll)

    def __exit__(self, *exc: object) -> None:
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.store.delete(LEASE)
