"""Read-only DuckDB SQL over a workspace.

Every table of the workspace is exposed under its own name as a Lance dataset (projection and filter pushdown),
optionally pinned to a version. The connection is locked down: only SELECT-like statements run, and DuckDB's
external access (files, URLs, extensions, ATTACH) is switched off, so a query can neither write nor read outside
the workspace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

if TYPE_CHECKING:
    from stores.workspace import Workspace

_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class SqlRefused(ValueError):
    """A statement that would write, attach, install, configure or touch files was refused."""


def check_read_only(query: str) -> None:
    """Raise `SqlRefused` unless `query` is a single read-only statement."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlRefused(f"could not parse the query: {exc}") from None
    if not statements:
        raise SqlRefused("the query is empty; pass one SELECT statement")
    if len(statements) > 1:
        raise SqlRefused(f"{len(statements)} statements given; pass exactly one SELECT statement")
    kind = statements[0].type
    if kind not in _READ_ONLY:
        name = str(kind).rsplit(".", 1)[-1]
        raise SqlRefused(
            f"{name} statements are refused: `mmfeat sql` is read-only. Use SELECT; to change data, re-ingest the "
            "source or submit a forget request (`mmfeat forget ...`)."
        )


def connect(ws: Workspace, versions: dict[str, int] | None = None) -> duckdb.DuckDBPyConnection:
    """A locked-down DuckDB connection with every workspace table registered (pinned where `versions` says)."""
    versions = versions or {}
    con = duckdb.connect(
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )
    names = ws.table_names()
    unknown = set(versions) - set(names)
    if unknown:
        raise KeyError(f"cannot pin unknown tables {sorted(unknown)}; tables are {names}")
    for name in names:
        con.register(name, ws.dataset(name, versions.get(name)))
    con.execute("SET lock_configuration = true")
    return con


def run_sql(ws: Workspace, query: str, versions: dict[str, int] | None = None) -> pa.Table:
    """Run one read-only statement over the workspace and return an Arrow table."""
    check_read_only(query)
    con = connect(ws, versions)
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise SqlRefused(f"refused: {exc}. Queries may only read the workspace's tables.") from None
    finally:
        con.close()
