"""What every export target implements (one module per target in this package).

The job drives a sink in this order, and a sink sends no row before `prepare` has accepted the plan:

    connect()            reach the target and check the credentials (TargetError: one clear line)
    read_state()         the ExportState the target records, or None
    prepare(plan, ...)   create the table / index / mapping, or check the existing one (ConflictError),
                         check the engine's limits (ExportError); record `pending`
    write(rows)          upsert a shard's export rows (Ray tasks call it when `parallel`, else the driver)
    save_state(state)    after each wave of shards
    delete_rows(pairs), delete_shards(paths)
    finish(plan)         build the ANN index where the target builds it after loading
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..plan import ExportPlan
from ..state import ExportState

_SECRET_IN_URI = re.compile(r"(://[^:/@?#]*:)([^@/?#]*)(@)")


def mask_uri(uri: str) -> str:
    """A URI with the password of its user-info replaced by ***."""
    return _SECRET_IN_URI.sub(r"\1***\3", uri)


def require(module: str, extra: str) -> None:
    """ImportError naming the extra to install when a target's client library is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this export target needs the {module!r} package: pip install 'embindex[{extra}]'")


def float_rows(col: pa.ChunkedArray | pa.Array) -> list[str]:
    """fixed_size_list<float32> -> '[x1,x2,...]' per row, rounded to 8 decimals (below float32 precision
    for the components of a unit vector); the JSON array text Elasticsearch and pgvector both read."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n, d = len(col), col.type.list_size
    m = np.round(col.flatten().to_numpy(zero_copy_only=False).reshape(n, d).astype(np.float64), 8)
    return [json.dumps(r) for r in m.tolist()]


class Sink(ABC):
    """An export target: subclasses implement the abstract methods. Sinks are pickled into Ray tasks when
    `parallel` (connections are opened lazily and not pickled)."""

    parallel = False  # Ray tasks write their shard's rows themselves (else they return the rows to the driver)
    secrets: tuple[str, ...] = ()  # strings scrubbed from every error message

    @abstractmethod
    def describe(self) -> str:
        """The target as it may be logged (no credentials)."""

    @abstractmethod
    def connect(self) -> None:
        ...

    @abstractmethod
    def read_state(self) -> ExportState | None:
        ...

    @abstractmethod
    def prepare(self, plan: ExportPlan, replace: bool = False) -> None:
        ...

    @abstractmethod
    def write(self, rows: pa.Table, fresh: bool = False) -> int:
        """Upsert rows; `fresh`: none of these keys can be in the target yet (a plain append is enough)."""

    @abstractmethod
    def save_state(self, state: ExportState) -> None:
        ...

    @abstractmethod
    def delete_rows(self, pairs: list[tuple[str, str]]) -> int:
        """Delete rows by (key, shard): a row whose key was rewritten from another shard stays."""

    @abstractmethod
    def delete_shards(self, shards: list[str]) -> int:
        ...

    def finish(self, plan: ExportPlan) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def scrub(self, text: str) -> str:
        """`text` without any of this sink's secrets."""
        for s in self.secrets:
            if s:
                text = text.replace(s, "***")
        return mask_uri(text)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in [k for k in state if k.startswith("_conn") or k.startswith("_client") or k.startswith("_db")]:
            state[k] = None
        return state


def keys_by_shard(pairs: list[tuple[str, str]], batch: int = 1000) -> Iterator[tuple[str, list[str]]]:
    """(shard, up to `batch` keys) groups of (key, shard) pairs: a delete removes a key only from the shard
    that held it (a changed document's new row, in another shard, stays)."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in pairs:
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        for i in range(0, len(keys), batch):
            yield shard, keys[i:i + batch]
