"""Read-only, bounded DuckDB SQL over a workspace.

Every table of the workspace is exposed under its own name as a Lance dataset (projection and filter pushdown),
optionally pinned to a version. The connection is locked down: only SELECT-like statements run, and DuckDB's
external access (files, URLs, extensions, ATTACH) is switched off, so a query can neither write nor read outside
the workspace.

Every query is bounded (`SqlLimits`): a wall-clock timeout (DuckDB has none of its own, so a timer calls
`con.interrupt()`), a memory limit that covers both DuckDB's execution and the result handed back, and a cap on
what DuckDB may spill, into a private (0700) folder inside the workspace that is removed afterwards. Results stream
out as Arrow batches (`open_sql`), so a caller that prints the first rows or writes a file never holds the whole
result:

    >>> with open_sql(ws, "SELECT * FROM items", limits=SqlLimits(timeout_s=5)) as reader:
    ...     first = reader.read_next_batch()
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

if TYPE_CHECKING:
    from stores.workspace import Workspace

_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_BATCH_ROWS = 8192
TEMP_DIR = "_tmp"
"""Scratch folder in a local workspace root; `stores.erasure.physical.remove_temp_files` clears leftovers."""

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class SqlRefused(ValueError):
    """A statement that would write, attach, install, configure or touch files was refused, or did not parse."""


class SqlStopped(RuntimeError):
    """A query ran past its timeout, memory limit or spill limit and was stopped."""


@dataclass(frozen=True)
class SqlLimits:
    """Bounds on one query.

    `timeout_s`: wall-clock seconds from start to the last batch read (0 = none). `memory`: DuckDB's memory limit;
    `run_sql` also refuses to materialise a result larger than it. `spill`: the most DuckDB may write to its
    temp folder. Sizes are strings such as "512MB" or "2GiB"."""

    timeout_s: float = 60.0
    memory: str = "2GB"
    spill: str = "10GB"

    def __post_init__(self) -> None:
        if self.timeout_s < 0:
            raise ValueError(f"timeout {self.timeout_s} s is negative; give seconds > 0, or 0 for no timeout")
        parse_size(self.memory)
        parse_size(self.spill)


def parse_size(text: str) -> int:
    """Bytes in a size such as "512MB", "2GiB" or "1000000B"; a one-line error names the bad value."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r} is not understood; write a number and a unit, e.g. 512MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def check_read_only(query: str) -> None:
    """Raise `SqlRefused` unless `query` is a single read-only statement."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlRefused(f"could not parse the query: {_first_line(exc)}") from None
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


def connect(
    ws: Workspace,
    versions: dict[str, int] | None = None,
    limits: SqlLimits | None = None,
    temp_dir: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A locked-down DuckDB connection with every workspace table registered (pinned where `versions` says),
    DuckDB's memory and spill limited by `limits` and its spill files kept in `temp_dir`."""
    limits = limits or SqlLimits()
    versions = versions or {}
    names = ws.table_names()
    unknown = set(versions) - set(names)
    if unknown:
        raise KeyError(f"cannot pin unknown tables {sorted(unknown)}; tables are {names}")
    config = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "memory_limit": f"{parse_size(limits.memory)}B",
        "max_temp_directory_size": f"{parse_size(limits.spill)}B",
    }
    if temp_dir is not None:
        config["temp_directory"] = temp_dir
    con = duckdb.connect(config=config)
    for name in names:
        con.register(name, ws.dataset(name, versions.get(name)))
    con.execute("SET lock_configuration = true")
    return con


@contextmanager
def open_sql(
    ws: Workspace, query: str, versions: dict[str, int] | None = None, limits: SqlLimits | None = None
) -> Iterator[pa.RecordBatchReader]:
    """Run one read-only statement and stream its result as Arrow batches, within `limits`.

    Reading stops with `SqlStopped` once the timeout passes or DuckDB runs out of memory or spill space; leaving
    the block early (e.g. after printing the first rows) stops the query."""
    limits = limits or SqlLimits()
    check_read_only(query)
    with _private_temp_dir(ws) as temp_dir:
        con = connect(ws, versions, limits, temp_dir)
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            con.interrupt()

        timer = threading.Timer(limits.timeout_s, stop) if limits.timeout_s else None
        try:
            if timer:
                timer.daemon = True
                timer.start()
            try:
                reader = con.sql(query).to_arrow_reader(_BATCH_ROWS)
            except Exception as exc:
                raise _clean_error(exc, timed_out, limits) from None
            yield pa.RecordBatchReader.from_batches(reader.schema, _guarded(reader, timed_out, limits))
        finally:
            if timer:
                timer.cancel()
            con.close()


def run_sql(
    ws: Workspace, query: str, versions: dict[str, int] | None = None, limits: SqlLimits | None = None
) -> pa.Table:
    """Run one read-only statement over the workspace and return an Arrow table.

    The result may hold at most `limits.memory` bytes; a larger one stops with `SqlStopped` (stream it with
    `open_sql` or `mmfeat sql --out FILE` instead)."""
    limits = limits or SqlLimits()
    budget = parse_size(limits.memory)
    with open_sql(ws, query, versions, limits) as reader:
        batches, size = [], 0
        for batch in reader:
            size += batch.nbytes
            if size > budget:
                raise SqlStopped(
                    f"the result is larger than the memory limit {limits.memory}; add a LIMIT or an aggregate, or "
                    "stream it to a file with `mmfeat sql --out FILE`"
                )
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=reader.schema)


def _guarded(
    reader: pa.RecordBatchReader, timed_out: threading.Event, limits: SqlLimits
) -> Iterator[pa.RecordBatch]:
    try:
        yield from reader
    except Exception as exc:
        raise _clean_error(exc, timed_out, limits) from None


def _clean_error(exc: Exception, timed_out: threading.Event, limits: SqlLimits) -> Exception:
    """One-line errors: stopped (timeout, memory, spill), refused (file access) or a plain query error."""
    if timed_out.is_set():
        return SqlStopped(
            f"query stopped after the {limits.timeout_s:g} s timeout; add a LIMIT or a filter, or raise --timeout"
        )
    if isinstance(exc, duckdb.OutOfMemoryException):
        return SqlStopped(
            f"query stopped: it needs more than the memory limit {limits.memory} (spill limit {limits.spill}): "
            f"{_first_line(exc)}; add a LIMIT or a filter, or raise --memory-limit"
        )
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(f"refused: {_first_line(exc)}. Queries may only read the workspace's tables.")
    return SqlRefused(f"query failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


@contextmanager
def _private_temp_dir(ws: Workspace) -> Iterator[str]:
    """A fresh 0700 folder for DuckDB's spill files: under the workspace's `_tmp/` when it is local and writable,
    else under the system temp folder (object-store or read-only workspaces). Removed afterwards."""
    parent: Path | None = None
    if ws.is_local:
        parent = Path(ws.uri) / TEMP_DIR
        try:
            parent.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            parent = None
    try:
        path = tempfile.mkdtemp(prefix="sql-", dir=parent)  # mkdtemp creates it 0700
    except OSError:
        path = tempfile.mkdtemp(prefix="mmfeat-sql-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
