"""The workspace: a LanceDB root (directory or object-store URI) holding every table of the platform.

A `Workspace` opens tables by name, creates them from their explicit schema on first use, and writes through
keyed upserts: rows whose key is new are inserted, rows whose compare-columns changed are updated, and identical
rows are left alone, so re-running an ingest or an extractor writes nothing and creates no new table version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import lance
import pyarrow as pa

from stores.lease import Lease, write_lease
from stores.schema import CORE_TABLES, TableSpec

DEFAULT_HOME = "./mmfeat-data"
_BATCH_ROWS = 1 << 19


def resolve_uri(uri: str | os.PathLike | None = None) -> str:
    """The workspace location: the argument, else $MMFEAT_HOME, else ./mmfeat-data (local paths made absolute)."""
    uri = str(uri) if uri is not None else os.environ.get("MMFEAT_HOME", DEFAULT_HOME)
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def storage_options_from_env() -> dict[str, str]:
    """Object-store settings for s3:// workspaces, taken from the usual AWS variables (for MinIO, moto, ...)."""
    mapping = {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "AWS_SESSION_TOKEN": "aws_session_token",
        "AWS_REGION": "aws_region",
        "AWS_ENDPOINT_URL": "aws_endpoint",
        "AWS_ENDPOINT": "aws_endpoint",
    }
    opts = {key: os.environ[env] for env, key in mapping.items() if os.environ.get(env)}
    if opts.get("aws_endpoint", "").startswith("http://"):
        opts["allow_http"] = "true"
    return opts


@dataclass
class UpsertResult:
    """What one keyed upsert did: rows inserted, updated and left unchanged, and the table version after it."""

    table: str
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    version: int | None = None

    @property
    def written(self) -> int:
        return self.inserted + self.updated


class WorkspaceNotFound(FileNotFoundError):
    """A reader was pointed at a workspace that does not exist (it is not created for a read)."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.uri = uri

    def __str__(self) -> str:
        return (
            f"workspace {self.uri} does not exist (or holds no tables); check --workspace / $MMFEAT_HOME, "
            "or create it first with `mmfeat ingest ...`"
        )


def _committed(path: Path) -> bool:
    """A local dataset directory holds a table once its first version is committed: a writer killed while
    creating the table leaves the directory without one, and the table is then created again rather than
    failing every later read."""
    versions = path / "_versions"
    return versions.is_dir() and any(v.suffix == ".manifest" for v in versions.iterdir())


class Workspace:
    """A LanceDB root with the platform's tables. Cheap to construct; picklable (holds only its URI)."""

    def __init__(
        self,
        uri: str | os.PathLike | None = None,
        storage_options: dict[str, str] | None = None,
        create: bool = True,
    ):
        """Open the workspace at `uri`. Writers create it (`create=True`); readers pass `create=False`, which
        raises `WorkspaceNotFound` instead of creating an empty workspace where the path has a typo."""
        self.uri = resolve_uri(uri)
        self.is_local = "://" not in self.uri
        if storage_options is None and not self.is_local:
            storage_options = storage_options_from_env()
        self.storage_options = storage_options or {}
        self._db: Any = None
        if create and self.is_local:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        if not create and not self._found():
            raise WorkspaceNotFound(self.uri)

    def _found(self) -> bool:
        """A local workspace exists as a folder; on object storage there are no folders, so it exists once it
        holds a table."""
        return Path(self.uri).is_dir() if self.is_local else bool(self.table_names())

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["storage_options"])

    def __repr__(self) -> str:
        return f"Workspace({self.uri!r})"

    @property
    def db(self) -> Any:
        """The LanceDB connection, for writes and indexes. Imported here, not at load time: read-only paths
        (`mmfeat sql`, snapshots, readers) list and read tables through pylance alone and start faster."""
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(self.uri, storage_options=self.storage_options or None)
        return self._db

    # ---- tables -------------------------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        if self.is_local:  # a local LanceDB root is a directory of <name>.lance datasets
            root = Path(self.uri)
            return sorted(p.name.removesuffix(".lance") for p in root.glob("*.lance") if _committed(p))
        names: list[str] = []
        token = None
        while True:
            page = self.db.list_tables(page_token=token)
            names.extend(page.tables)
            token = page.page_token
            if not token:
                return sorted(names)

    def exists(self, name: str) -> bool:
        return name in self.table_names()

    def open(self, name: str) -> Any:
        """Open an existing table; raise a clear error naming what exists when it does not."""
        if not self.exists(name):
            have = ", ".join(self.table_names()) or "none"
            raise KeyError(f"table {name!r} does not exist in workspace {self.uri} (tables: {have})")
        return self.db.open_table(name)

    def ensure(self, spec: TableSpec) -> Any:
        """Open `spec`'s table, creating it empty with its explicit schema when missing (under the write lease,
        so two writers never race to create it)."""
        if self.exists(spec.name):
            return self.db.open_table(spec.name)
        with write_lease(self, f"create:{spec.name}"):
            return self.db.create_table(spec.name, schema=spec.schema, exist_ok=True)

    def dataset(self, name: str, version: int | None = None) -> lance.LanceDataset:
        """The Lance dataset behind a table, optionally checked out at `version` (read with pylance directly)."""
        if not self.exists(name):
            self.open(name)  # raises the clear error naming the tables that exist
        return lance.dataset(
            self.table_uri(name), version=version, storage_options=self.storage_options or None
        )

    def table_uri(self, name: str) -> str:
        return f"{self.uri}/{name}.lance"

    def version(self, name: str) -> int | None:
        return self.open(name).version if self.exists(name) else None

    def versions(self) -> dict[str, int]:
        """Current version of every table: what a manifest or snapshot pins."""
        return {name: self.open(name).version for name in self.table_names()}

    def count(self, name: str, where: str | None = None) -> int:
        if not self.exists(name):
            return 0
        return self.open(name).count_rows(where)

    def read(
        self,
        name: str,
        columns: list[str] | None = None,
        where: str | None = None,
        version: int | None = None,
    ) -> pa.Table:
        """Read a table (or a version of it) into Arrow; missing core tables read as empty with their schema."""
        if not self.exists(name):
            if name in CORE_TABLES:
                schema = CORE_TABLES[name].schema
                empty = schema.empty_table()
                return empty.select(columns) if columns else empty
            self.open(name)  # raises the clear error
        return self.dataset(name, version).to_table(columns=columns, filter=where)

    # ---- writes -------------------------------------------------------------------------------------------
    def upsert(self, spec: TableSpec, data: pa.Table) -> UpsertResult:
        """Keyed upsert of `data` (rows with unique keys) into `spec`'s table.

        New keys are appended; rows whose compare-columns differ are merged in; identical rows are skipped, and
        when nothing differs no write happens at all (no new version).
        """
        con = duckdb.connect()
        con.register("new_rows", data)
        return self.upsert_relation(spec, con, "new_rows")

    def upsert_relation(self, spec: TableSpec, con: duckdb.DuckDBPyConnection, relation: str) -> UpsertResult:
        """`upsert` for rows already held by DuckDB (a table or view named `relation` in `con`), streamed out in
        batches so that large ingests never hold the whole table in memory twice.

        The anti-join against the current rows and the add that follows run under the workspace's write lease, so
        two writers can never both insert the same key."""
        with write_lease(self, f"upsert:{spec.name}") as lease:
            return self._upsert_locked(spec, con, relation, lease)

    def _upsert_locked(
        self, spec: TableSpec, con: duckdb.DuckDBPyConnection, relation: str, lease: Lease
    ) -> UpsertResult:
        table = self.ensure(spec)
        # Another process may have committed since this handle was opened: read the latest version.
        table.checkout_latest()
        result = UpsertResult(spec.name)
        total = con.sql(f"SELECT count(*) FROM {relation}").fetchall()[0][0]
        cols = ", ".join(f'n."{c}"' for c in spec.schema.names)
        if table.count_rows() == 0:
            if total:
                lease.check()
                table.add(_batches(con, f"SELECT {cols} FROM {relation} n", spec.schema))
            result.inserted = total
            result.version = table.version
            return result
        con.register("old_rows", table.to_lance())
        on = " AND ".join(f'n."{k}" = o."{k}"' for k in spec.key)
        new_query = f"SELECT {cols} FROM {relation} n ANTI JOIN old_rows o ON {on}"
        result.inserted = con.sql(f"SELECT count(*) FROM ({new_query})").fetchall()[0][0]
        if result.inserted:
            lease.check()
            table.add(_batches(con, new_query, spec.schema))
        if spec.compare:
            differs = " OR ".join(f'n."{c}" IS DISTINCT FROM o."{c}"' for c in spec.compare)
            changed = _fetch(
                con, f"SELECT {cols} FROM {relation} n JOIN old_rows o ON {on} WHERE {differs}", spec.schema
            )
            if changed.num_rows:
                lease.check()
                table.merge_insert(
                    list(spec.key)
                ).when_matched_update_all().when_not_matched_insert_all().execute(changed)
            result.updated = changed.num_rows
        result.unchanged = total - result.inserted - result.updated
        result.version = table.version
        con.unregister("old_rows")
        return result


def _fetch(con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(list(_iter_batches(con, query, schema)), schema=schema)


def _batches(con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(schema, _iter_batches(con, query, schema))


def _iter_batches(con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    reader = con.sql(query).to_arrow_reader(_BATCH_ROWS)
    for batch in reader:
        if batch.num_rows:
            yield from conform(pa.Table.from_batches([batch]), schema).combine_chunks().to_batches()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema` (DuckDB hands back binary for large_binary, us for s, ...)."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
