"""Postgres + pgvector target: `postgresql://user:password@host:port/db?table=NAME` (`table` may be
`schema.name`; every other query parameter goes to libpq, e.g. `sslmode=require` or `host=/socket/dir`;
without a password in the URI libpq reads `PGPASSWORD` or `~/.pgpass`).

The table: key text PRIMARY KEY, id, chunk, chunk_start, chunk_end, modality, meta jsonb, content (when
exported), shard, and `embedding` as vector(width) (halfvec(width) above 2,000 dims, pgvector >= 0.7). Rows
are normalized: search with the negative inner product `embedding <#> query` (HNSW `vector_ip_ops`). An
HNSW index is built after the first load (`index=False` skips it). The export state is a row of
`embindex_exports` (target table -> state JSON). Shard tasks write in parallel, one transaction per shard
(COPY into a staging table, then INSERT ... ON CONFLICT (key) DO UPDATE).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa

from ..plan import ExportPlan
from ..state import ConflictError, ExportError, ExportState, TargetError
from .base import Sink, float_rows, mask_uri, require

STATE_TABLE = "embindex_exports"
VECTOR_MAX_DIMS = 16000  # pgvector: vector columns
HALFVEC_MAX_DIMS = 16000  # pgvector: halfvec columns
HNSW_VECTOR_MAX_DIMS = 2000  # pgvector: HNSW over vector
HNSW_HALFVEC_MAX_DIMS = 4000  # pgvector: HNSW over halfvec
COLUMNS = ["key", "id", "chunk", "chunk_start", "chunk_end", "modality", "meta", "content", "shard", "embedding"]


def parse_pg_uri(uri: str) -> tuple[str, str]:
    """(libpq connection URI without `table`, table name) of a postgresql target URI."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    table = [v for k, v in query if k == "table"]
    if not table or not table[-1]:
        raise ValueError(f"{mask_uri(uri)}: name the table, e.g. postgresql://user@host:5432/db?table=docs")
    rest = urlencode([(k, v) for k, v in query if k != "table"])
    return urlunsplit(("postgresql", parts.netloc, parts.path, rest, "")), table[-1]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def vector_type(width: int, pgvector: str, index: bool, forced: str | None = None) -> str:
    """The column type for `width` dims, or ExportError when pgvector cannot hold (or index) it."""
    has_halfvec = _version_tuple(pgvector) >= (0, 7)
    kind = forced or ("vector" if width <= HNSW_VECTOR_MAX_DIMS or not has_halfvec else "halfvec")
    if kind not in ("vector", "halfvec"):
        raise ValueError(f"vector_type must be vector or halfvec, got {kind!r}")
    if kind == "halfvec" and not has_halfvec:
        raise ExportError(f"halfvec needs pgvector >= 0.7; this server has {pgvector}")
    limit = VECTOR_MAX_DIMS if kind == "vector" else HALFVEC_MAX_DIMS
    if width > limit:
        raise ExportError(f"{width} dims is over pgvector's {kind} limit of {limit}: export a narrower --tier")
    hnsw = HNSW_VECTOR_MAX_DIMS if kind == "vector" else HNSW_HALFVEC_MAX_DIMS
    if index and width > hnsw:
        hint = ("halfvec (pgvector >= 0.7, up to 4,000 dims)" if kind == "vector" and not has_halfvec
                else "a narrower --tier")
        raise ExportError(f"pgvector's HNSW index takes {kind} up to {hnsw} dims, not {width}: use {hint}, "
                          "or --no-index")
    return f"{kind}({width})"


class PgSink(Sink):
    parallel = True

    def __init__(self, uri: str, index: bool | None = None, m: int = 16, ef_construction: int = 64,
                 vector_type: str | None = None, connect_timeout: int = 10):
        self.uri = uri
        self.conninfo, self.table = parse_pg_uri(uri)
        require("psycopg", "export-pgvector")
        self.secrets = tuple(p for p in [urlsplit(uri).password] if p)
        self.index = True if index is None else bool(index)
        self.m, self.ef_construction = int(m), int(ef_construction)
        self.forced_type = vector_type
        self.connect_timeout = int(connect_timeout)
        self.column_type: str | None = None  # set by prepare (travels to the shard tasks)
        self.columns: list[str] = []
        self._conn = None

    def describe(self) -> str:
        return f"Postgres table {self.table} at {mask_uri(self.conninfo)}"

    # -- connection ---------------------------------------------------------------------------------------
    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(self.conninfo, connect_timeout=self.connect_timeout)
        except psycopg.OperationalError as e:
            msg = self.scrub(str(e).strip().replace("\n", " "))
            kind = "authentication failed" if ("authentication" in msg or "role" in msg) else "unreachable"
            raise TargetError(f"cannot connect to {mask_uri(self.conninfo)} ({kind}): {msg}") from None

    @property
    def conn(self):
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def connect(self) -> None:
        self.conn  # noqa: B018 - opens it, raising TargetError

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _ident(self) -> Any:
        from psycopg import sql

        return sql.Identifier(*self.table.split(".", 1))

    def _sql(self, text: str, **names: Any) -> Any:
        from psycopg import sql

        return sql.SQL(text).format(t=self._ident(), **names)

    def _run(self, query: Any, params: Any = None) -> Any:
        import psycopg

        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else cur.rowcount
        except psycopg.Error as e:
            raise ExportError(f"Postgres: {self.scrub(str(e).strip())}") from None

    # -- state ---------------------------------------------------------------------------------------------
    def _ensure_state_table(self) -> None:
        self._run(f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (target text PRIMARY KEY, state jsonb NOT NULL, "
                  "updated_at timestamptz NOT NULL DEFAULT now())")

    def read_state(self) -> ExportState | None:
        rows = self._run("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                         (STATE_TABLE, self._qualified()))
        has_state, has_table = rows[0]
        if not (has_state and has_table):
            return None
        got = self._run(f"SELECT state FROM {STATE_TABLE} WHERE target = %s", (self.table,))
        return ExportState.from_json(got[0][0]) if got else None

    def _qualified(self) -> str:
        return ".".join('"' + p.replace('"', '""') + '"' for p in self.table.split(".", 1))

    def save_state(self, state: ExportState) -> None:
        self._run(f"INSERT INTO {STATE_TABLE} (target, state) VALUES (%s, %s) ON CONFLICT (target) DO UPDATE "
                  "SET state = EXCLUDED.state, updated_at = now()", (self.table, state.to_json()))

    # -- schema --------------------------------------------------------------------------------------------
    def _pgvector(self) -> str:
        rows = self._run("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if not rows:
            try:
                self._run("CREATE EXTENSION IF NOT EXISTS vector")
            except ExportError as e:
                raise ExportError(f"pgvector is not installed in this database and could not be created ({e}); "
                                  "run CREATE EXTENSION vector as a privileged user") from None
            rows = self._run("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        return rows[0][0]

    def _existing_type(self) -> str | None:
        rows = self._run("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                         "to_regclass(%s) AND attname = 'embedding' AND NOT attisdropped", (self._qualified(),))
        return rows[0][0] if rows else None

    def prepare(self, plan: ExportPlan, replace: bool = False) -> None:
        wanted = vector_type(plan.width, self._pgvector(), self.index, self.forced_type)
        self._ensure_state_table()
        exists = self._run("SELECT to_regclass(%s) IS NOT NULL", (self._qualified(),))[0][0]
        if exists and replace:
            self._run(self._sql("DROP TABLE {t}"))
            self._run(f"DELETE FROM {STATE_TABLE} WHERE target = %s", (self.table,))
            exists = False
        if exists:
            if self.read_state() is None:
                raise ConflictError(f"table {self.table} exists and holds no embindex export; export to another "
                                    "table, or --replace to drop it")
            have = self._existing_type()
            if have != wanted:
                raise ConflictError(f"table {self.table} has embedding {have}, this export needs {wanted}; "
                                    "--replace to reload it")
        else:
            content = plan.rows.content and plan.manifest.config.get("index", {}).get("store_content", False)
            from psycopg import sql

            self._run(self._sql(
                "CREATE TABLE {t} (key text PRIMARY KEY, id text NOT NULL, chunk integer, chunk_start integer, "
                "chunk_end integer, modality text, meta jsonb, " + ("content text, " if content else "")
                + "shard text NOT NULL, embedding {typ})", typ=sql.SQL(wanted)))
            self._run(self._sql("CREATE INDEX {i} ON {t} (shard)", i=sql.Identifier(self._name("shard"))))
            self._run(self._sql("CREATE INDEX {i} ON {t} (id)", i=sql.Identifier(self._name("id"))))
        self.column_type = wanted
        rows = self._run("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                         "AND NOT attisdropped", (self._qualified(),))
        self.columns = [c for c in COLUMNS if c in {r[0] for r in rows}]

    def _name(self, suffix: str) -> str:
        return f"{self.table.rsplit('.', 1)[-1]}_{suffix}_idx"[:63]

    # -- rows ----------------------------------------------------------------------------------------------
    def _records(self, rows: pa.Table) -> list[tuple]:
        n = rows.num_rows
        texts = float_rows(rows.column("vector"))  # pgvector's text input: '[x1,x2,...]'
        source = {"key": "key", "id": "id", "chunk": "chunk", "chunk_start": "start", "chunk_end": "end",
                  "modality": "modality", "meta": "meta", "content": "content", "shard": "shard"}
        cols = []
        for c in self.columns:
            if c == "embedding":
                cols.append(texts)
            elif source[c] in rows.column_names:
                cols.append(rows.column(source[c]).to_pylist())
            else:
                cols.append([None] * n)
        return list(zip(*cols))

    def write(self, rows: pa.Table, fresh: bool = False) -> int:
        import psycopg
        from psycopg import sql

        if rows.num_rows == 0:
            return 0
        records = self._records(rows)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        stage = sql.Identifier("_embindex_stage")
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                if fresh:
                    target = self._ident()
                else:
                    cur.execute(self._sql("CREATE TEMP TABLE {s} (LIKE {t} INCLUDING DEFAULTS) ON COMMIT DROP",
                                          s=stage))
                    target = stage
                with cur.copy(sql.SQL("COPY {t} ({c}) FROM STDIN").format(t=target, c=cols)) as copy:
                    for rec in records:
                        copy.write_row(rec)
                if not fresh:
                    updates = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                                                 for c in self.columns if c != "key")
                    cur.execute(self._sql("INSERT INTO {t} ({c}) SELECT {c} FROM {s} ON CONFLICT (key) DO UPDATE "
                                          "SET {u}", c=cols, s=stage, u=updates))
        except psycopg.Error as e:
            raise ExportError(f"Postgres: {self.scrub(str(e).strip())}") from None
        return len(records)

    def delete_rows(self, pairs: list[tuple[str, str]]) -> int:
        if not pairs:
            return 0
        keys, shards = [p[0] for p in pairs], [p[1] for p in pairs]
        return self._run(self._sql("DELETE FROM {t} AS t USING unnest(%s::text[], %s::text[]) AS d(key, shard) "
                                   "WHERE t.key = d.key AND t.shard = d.shard"), (keys, shards))

    def delete_shards(self, shards: list[str]) -> int:
        if not shards:
            return 0
        return self._run(self._sql("DELETE FROM {t} WHERE shard = ANY(%s)"), (list(shards),))

    def finish(self, plan: ExportPlan) -> dict[str, Any]:
        from psycopg import sql

        out: dict[str, Any] = {}
        if self.index:
            ops = "halfvec_ip_ops" if (self.column_type or "").startswith("halfvec") else "vector_ip_ops"
            name = self._name("embedding_hnsw")
            exists = self._run("SELECT to_regclass(%s) IS NOT NULL", (self._schema_prefix() + f'"{name}"',))[0][0]
            if not exists:
                self._run(self._sql("CREATE INDEX {i} ON {t} USING hnsw (embedding {ops}) WITH (m = {m}, "
                                    "ef_construction = {ef})", i=sql.Identifier(name), ops=sql.SQL(ops),
                                    m=sql.Literal(self.m), ef=sql.Literal(self.ef_construction)))
                out["index"] = f"HNSW ({ops}, m={self.m}, ef_construction={self.ef_construction})"
        self._run(self._sql("ANALYZE {t}"))
        return out

    def _schema_prefix(self) -> str:
        return ('"' + self.table.split(".", 1)[0].replace('"', '""') + '".') if "." in self.table else ""

