"""Read-only, bounded SQL over the workspace, through the Python API and the CLI."""

from __future__ import annotations

import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flows.cli import cli
from stores.schema import ITEMS
from stores.sql import TEMP_DIR, SqlLimits, SqlRefused, SqlStopped, open_sql, run_sql
from stores.workspace import Workspace, WorkspaceNotFound, conform

HUGE = "select * from range(3000000000)"


@pytest.fixture
def filled(ws):
    rows = pa.table({"item_id": ["01", "02"], "title": ["a", "b"], "content_hash": ["h1", "h2"]})
    ws.upsert(ITEMS, conform(rows, ITEMS.schema))
    return ws


def sql_cli(ws: Workspace | str, *args: str):
    uri = ws.uri if isinstance(ws, Workspace) else ws
    return CliRunner().invoke(cli, ["--workspace", uri, "sql", *args], obj={})


@pytest.mark.parametrize(
    "query",
    [
        "delete from items",
        "update items set title='x'",
        "insert into items (item_id) values ('z')",
        "create table t as select 1",
        "attach 'x.db'",
        "install httpfs",
        "copy items to 'out.csv'",
        "select 1; delete from items",
        "set enable_external_access=true",
    ],
)
def test_writes_and_side_effects_are_refused(filled, query):
    """Statements that write, attach, install, copy or reconfigure are refused and change nothing."""
    with pytest.raises(SqlRefused):
        run_sql(filled, query)
    assert filled.count("items") == 2


def test_file_access_is_refused(filled, tmp_path):
    """Table functions that read files outside the workspace are refused by DuckDB's locked configuration."""
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(SqlRefused, match="Queries may only read"):
        run_sql(filled, f"select * from read_csv('{tmp_path / 'x.csv'}')")


def test_select_and_version_pinning(filled):
    """SELECT sees every table; a version pin reads the table as it was."""
    v1 = filled.version("items")
    ws = filled
    ws.upsert(
        ITEMS, conform(pa.table({"item_id": ["03"], "title": ["c"], "content_hash": ["h3"]}), ITEMS.schema)
    )
    assert run_sql(ws, "select count(*) n from items")["n"].to_pylist() == [3]
    assert run_sql(ws, "select count(*) n from items", versions={"items": v1})["n"].to_pylist() == [2]


def test_cli_sql_prints_and_refuses(filled):
    """`mmfeat sql` prints query results and fails with a clear message on writes, deleting nothing."""
    ok = sql_cli(filled, "select count(*) as n from items")
    assert ok.exit_code == 0 and "2" in ok.output
    bad = sql_cli(filled, "delete from items")
    assert bad.exit_code != 0 and "read-only" in bad.output
    assert filled.count("items") == 2
    as_csv = sql_cli(filled, "select item_id from items order by 1", "--format", "csv")
    assert as_csv.exit_code == 0 and '"01"' in as_csv.output


def test_huge_result_prints_first_rows_and_stops(filled):
    """Printing `range(3e9)` reads only the first --max-rows rows and says the output was cut: the query never
    runs to the end (it would take minutes and gigabytes), so this returns well inside the 10 s timeout."""
    out = sql_cli(filled, HUGE, "--max-rows", "5", "--timeout", "10")
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].strip() == "range" and [ln.strip() for ln in lines[1:6]] == ["0", "1", "2", "3", "4"]
    assert "output cut at 5 rows" in out.output


def test_huge_result_to_file_stops_at_the_timeout(filled, tmp_path):
    """Streaming `range(3e9)` to a file stops at the --timeout with one line naming the limit and the fix, and
    leaves no file (not even a partial one) behind."""
    target = tmp_path / "all.parquet"
    out = sql_cli(filled, HUGE, "--out", str(target), "--timeout", "2")
    assert out.exit_code != 0
    message = out.output.strip()
    assert "\n" not in message and "2 s timeout" in message and "--timeout" in message
    assert not target.exists() and list(tmp_path.glob("*.partial")) == []


def test_aggregate_stops_at_the_timeout(filled):
    """A query that returns nothing for a long time (one huge aggregate) is interrupted by the timeout too."""
    with pytest.raises(SqlStopped, match="timeout"):
        run_sql(filled, "select sum(range) from range(300000000000)", limits=SqlLimits(timeout_s=1))


def test_materialised_result_is_bounded_by_the_memory_limit(filled):
    """`run_sql` never holds a result larger than the memory limit: it stops with a message pointing to --out."""
    with pytest.raises(SqlStopped, match="larger than the memory limit 32MB"):
        run_sql(filled, HUGE, limits=SqlLimits(timeout_s=30, memory="32MB"))


def test_duckdb_memory_and_spill_are_bounded(filled):
    """A sort bigger than DuckDB's memory and spill limits stops with SqlStopped, not an unbounded spill."""
    with pytest.raises(SqlStopped, match="needs more than the memory limit 64MB"):
        run_sql(
            filled,
            "select * from range(30000000) order by hash(range)",
            limits=SqlLimits(timeout_s=60, memory="64MB", spill="16MB"),
        )


def test_spill_folder_is_private_inside_the_workspace_and_removed(filled):
    """DuckDB's temp folder is a fresh 0700 folder under the workspace's _tmp/, gone once the query is done."""
    root = Path(filled.uri) / TEMP_DIR
    with open_sql(filled, "select * from items") as reader:
        folders = list(root.iterdir())
        assert len(folders) == 1 and folders[0].name.startswith("sql-")
        assert stat.S_IMODE(folders[0].stat().st_mode) == 0o700
        assert reader.read_all().num_rows == 2
    assert list(root.iterdir()) == []


def test_out_streams_every_row_to_a_file(filled, tmp_path):
    """--out writes the whole result, past --max-rows, in the format its suffix names."""
    target = tmp_path / "r.parquet"
    out = sql_cli(filled, "select * from range(5000)", "--out", str(target), "--max-rows", "10")
    assert out.exit_code == 0, out.output
    assert pq.read_table(target)["range"].to_pylist() == list(range(5000))
    as_csv = tmp_path / "r.csv"
    assert sql_cli(filled, "select item_id from items order by 1", "--out", str(as_csv)).exit_code == 0
    assert as_csv.read_text().splitlines() == ['"item_id"', '"01"', '"02"']


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("inside", "is inside the workspace"),
        ("missing_dir", "does not exist; create it first"),
        ("a_folder", "is a folder"),
        ("no_suffix", "cannot tell the format"),
    ],
)
def test_bad_out_paths_are_one_line_errors(filled, tmp_path, where, expected):
    """--out into the workspace (which would corrupt a table) or to an unwritable place is refused before the
    query runs, in one line, and nothing is written."""
    before = sorted(p.name for p in Path(filled.uri).iterdir())
    target = {
        "inside": Path(filled.uri) / "items.lance" / "x.parquet",
        "missing_dir": tmp_path / "nope" / "x.parquet",
        "a_folder": tmp_path,
        "no_suffix": tmp_path / "result",
    }[where]
    out = sql_cli(filled, "select * from items", "--out", str(target))
    assert out.exit_code != 0 and expected in out.output and "\n" not in out.output.strip()
    assert not target.is_file() and sorted(p.name for p in Path(filled.uri).iterdir()) == before


def test_bad_query_is_one_line(filled):
    """A query DuckDB rejects (unknown column) is a one-line error, not a traceback."""
    out = sql_cli(filled, "select nope from items")
    assert out.exit_code != 0 and "query failed" in out.output and "nope" in out.output
    assert "\n" not in out.output.strip() and "Traceback" not in out.output


def test_missing_workspace_is_not_created_by_a_reader(tmp_path):
    """`Workspace(create=False)` raises on a missing path and leaves it missing; writers (the default) create it."""
    missing = tmp_path / "typo"
    with pytest.raises(WorkspaceNotFound, match="does not exist"):
        Workspace(missing, create=False)
    assert not missing.exists()
    Workspace(missing)
    assert missing.is_dir() and Workspace(missing, create=False).uri == str(missing)


@pytest.mark.parametrize(
    "args",
    [
        ["sql", "select 1"],
        ["features"],
        ["snapshot", "list"],
        ["snapshot", "show", "s1"],
        ["verify-erasure", "r1"],
        ["report", "--out", "report.html"],
    ],
)
def test_read_only_commands_refuse_a_missing_workspace(tmp_path, args):
    """Commands that only read fail in one line naming the path and the fix, and do not create the workspace."""
    missing = tmp_path / "typo"
    out = CliRunner().invoke(cli, ["--workspace", str(missing), *args], obj={})
    assert out.exit_code != 0, out.output
    assert str(missing) in out.output and "mmfeat ingest" in out.output and "\n" not in out.output.strip()
    assert not missing.exists()
