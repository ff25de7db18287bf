"""LanceDB target: `lancedb:///abs/path/to/db/TABLE`, `lancedb://relative/db/TABLE`,
`lancedb+s3://bucket/prefix/db/TABLE` (also `lancedb+gs://`, `lancedb+az://`): the last path segment is the
table, the rest the LanceDB database URI.

The table: key (the row key, upserted on), id, chunk, start, end, modality, meta (JSON), content (when
exported), shard, `vector` fixed_size_list<float32>[width] (renormalized: search it with the `dot` distance),
and one typed column per scalar metadata field of the sampled metadata (string / int64 / float64 / bool;
a name that clashes with a column above gets a `meta_` prefix; other fields stay in `meta`). The export
state is a row of the table `_embindex_exports` in the same database. `index=True` builds an IVF-PQ index
(dot distance) once the rows are in, and a BTREE scalar index on `key`; later exports `optimize()` the
table so new rows are indexed too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from ..plan import SCALAR_KINDS, ExportPlan
from ..state import ConflictError, ExportState, TargetError
from .base import Sink, keys_by_shard, require

STATE_TABLE = "_embindex_exports"
BASE_COLUMNS = ("key", "id", "chunk", "start", "end", "modality", "meta", "content", "shard", "vector")
_ARROW = {"keyword": pa.string(), "long": pa.int64(), "double": pa.float64(), "boolean": pa.bool_()}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PQ_MIN_ROWS = 256  # PQ training needs at least this many vectors
DELETE_BATCH = 1000


def parse_lance_uri(uri: str) -> tuple[str, str]:
    """(database URI, table name) of a lancedb target URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not (scheme == "lancedb" or scheme.startswith("lancedb+")):
        raise ValueError(f"not a LanceDB target: {uri!r} (lancedb:///path/to/db/table or lancedb+s3://bucket/db/table)")
    rest = rest.rstrip("/")
    db, _, table = rest.rpartition("/")
    if not table or not db:
        raise ValueError(f"{uri!r}: give the database path and the table name (lancedb:///path/to/db/table)")
    if scheme != "lancedb":
        db = f"{scheme.split('+', 1)[1]}://{db}"
    return db, table


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def meta_columns(fields: dict[str, Any]) -> dict[str, tuple[str, pa.DataType]]:
    """{metadata field: (column name, arrow type)} for the scalar fields that make typed columns."""
    out = {}
    for name, kind in fields.items():
        if not isinstance(kind, str) or kind not in SCALAR_KINDS or not _NAME.match(name):
            continue
        column = f"meta_{name}" if name in BASE_COLUMNS or name.startswith("meta_") else name
        out[name] = (column, _ARROW[kind])
    return out


def _coerce(value: Any, kind: pa.DataType) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return None
    if pa.types.is_boolean(kind):
        return value if isinstance(value, bool) else None
    if pa.types.is_integer(kind):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if pa.types.is_floating(kind):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value if isinstance(value, str) else json.dumps(value)


class LanceSink(Sink):
    parallel = False  # one writer: the driver (Lance commits are atomic per write)

    def __init__(self, uri: str, index: bool | None = None, storage_options: dict[str, str] | None = None,
                 num_partitions: int | None = None, num_sub_vectors: int | None = None):
        self.uri = uri
        self.db_uri, self.table_name = parse_lance_uri(uri)
        require("lancedb", "export-lancedb")
        self.index = bool(index)  # IVF-PQ: off unless asked for
        self.storage_options = dict(storage_options or {})
        self.num_partitions = num_partitions
        self.num_sub_vectors = num_sub_vectors
        self._db = None
        self._table = None
        self._meta_cols: dict[str, tuple[str, pa.DataType]] = {}

    def describe(self) -> str:
        return f"LanceDB table {self.table_name!r} in {self.db_uri}"

    # -- connection and state ---------------------------------------------------------------------------
    def connect(self) -> None:
        import lancedb

        try:
            self._db = lancedb.connect(self.db_uri, storage_options=self.storage_options or None)
            self._tables()
        except Exception as e:  # lancedb raises plain errors for a bad bucket, credentials or path
            raise TargetError(f"cannot open LanceDB database {self.db_uri}: {self.scrub(str(e))}") from None

    def _tables(self) -> list[str]:
        res = self._db.list_tables()
        names = list(getattr(res, "tables", res))
        while getattr(res, "page_token", None):
            res = self._db.list_tables(page_token=res.page_token)
            names += list(res.tables)
        return names

    def _state_table(self, create: bool = False):
        if STATE_TABLE in self._tables():
            return self._db.open_table(STATE_TABLE)
        if not create:
            return None
        schema = pa.schema([("target", pa.string()), ("state", pa.string())])
        return self._db.create_table(STATE_TABLE, schema=schema, exist_ok=True)

    def read_state(self) -> ExportState | None:
        table = self._state_table()
        if table is None:
            return None
        rows = table.search().where(f"target = {_quote(self.table_name)}").limit(1).to_list()
        if not rows or self.table_name not in self._tables():
            return None
        return ExportState.from_json(rows[0]["state"])

    def save_state(self, state: ExportState) -> None:
        row = pa.table({"target": [self.table_name], "state": [state.to_json()]})
        (self._state_table(create=True).merge_insert("target").when_matched_update_all()
         .when_not_matched_insert_all().execute(row))

    # -- schema ------------------------------------------------------------------------------------------
    def schema(self, plan: ExportPlan, content: bool) -> pa.Schema:
        fields = [pa.field("key", pa.string(), nullable=False), pa.field("id", pa.string()),
                  pa.field("chunk", pa.int32()), pa.field("start", pa.int32()), pa.field("end", pa.int32()),
                  pa.field("modality", pa.string()), pa.field("meta", pa.string())]
        if content:
            fields.append(pa.field("content", pa.string()))
        fields += [pa.field("shard", pa.string()), pa.field("vector", pa.list_(pa.float32(), plan.width))]
        fields += [pa.field(col, kind) for col, kind in meta_columns(plan.fields).values()]
        return pa.schema(fields)

    def prepare(self, plan: ExportPlan, replace: bool = False) -> None:
        exists = self.table_name in self._tables()
        if exists and replace:
            self._db.drop_table(self.table_name)
            exists = False
        if exists:
            table = self._db.open_table(self.table_name)
            if self.read_state() is None:
                raise ConflictError(f"LanceDB table {self.table_name!r} exists and holds no embindex export; "
                                    "export to another table, or --replace to drop it")
            vec = table.schema.field("vector").type if "vector" in table.schema.names else None
            if vec is None or getattr(vec, "list_size", None) != plan.width:
                raise ConflictError(f"LanceDB table {self.table_name!r} has vector column {vec}, not "
                                    f"{plan.width} dims; --replace to reload it")
        else:
            content = plan.rows.content and plan.manifest.config.get("index", {}).get("store_content", False)
            table = self._db.create_table(self.table_name, schema=self.schema(plan, bool(content)))
        self._table = table
        self._meta_cols = {name: (col, kind) for name, (col, kind) in meta_columns(plan.fields).items()
                           if col in table.schema.names}

    # -- rows -----------------------------------------------------------------------------------------
    def _conform(self, rows: pa.Table) -> pa.Table:
        """Export rows -> the table's schema: typed metadata columns added, columns it lacks dropped."""
        schema = self._table.schema
        cols: dict[str, Any] = {n: rows.column(n) for n in rows.column_names if n in schema.names}
        if self._meta_cols:
            metas = [json.loads(m) if m else {} for m in rows.column("meta").to_pylist()]
            for name, (col, kind) in self._meta_cols.items():
                cols[col] = pa.array([_coerce(m.get(name), kind) for m in metas], kind)
        arrays = [cols[f.name].cast(f.type) if f.name in cols else pa.nulls(rows.num_rows, f.type)
                  for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    def write(self, rows: pa.Table, fresh: bool = False) -> int:
        if rows.num_rows == 0:
            return 0
        data = self._conform(rows)
        if fresh:
            self._table.add(data)
        else:
            (self._table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
             .execute(data))
        return rows.num_rows

    def delete_rows(self, pairs: list[tuple[str, str]]) -> int:
        n = 0
        for shard, keys in keys_by_shard(pairs, DELETE_BATCH):
            keys_sql = ", ".join(_quote(k) for k in keys)
            n += self._table.delete(f"shard = {_quote(shard)} AND key IN ({keys_sql})").num_deleted_rows
        return n

    def delete_shards(self, shards: list[str]) -> int:
        if not shards:
            return 0
        return self._table.delete(f"shard IN ({', '.join(_quote(s) for s in shards)})").num_deleted_rows

    def finish(self, plan: ExportPlan) -> dict[str, Any]:
        indices = {getattr(i, "columns", [None])[0] for i in self._table.list_indices()}
        rows = self._table.count_rows()
        out: dict[str, Any] = {"rows": rows}
        if "key" not in indices and rows:
            self._table.create_scalar_index("key", index_type="BTREE")
        if self.index and "vector" not in indices:
            if rows < PQ_MIN_ROWS:
                out["index"] = f"not built: IVF-PQ needs at least {PQ_MIN_ROWS} rows, the table has {rows}"
            else:
                self._table.create_index(metric="dot", vector_column_name="vector", index_type="IVF_PQ",
                                         num_partitions=self.num_partitions, num_sub_vectors=self.num_sub_vectors)
                out["index"] = "IVF_PQ (dot)"
        elif indices and (plan.upsert or plan.deletes or plan.dropped):
            self._table.optimize()  # index the new rows
            out["index"] = "optimized"
        return out

