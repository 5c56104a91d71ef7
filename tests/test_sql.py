"""Read-only SQL over the workspace, through the Python API and the CLI."""

from __future__ import annotations

import pyarrow as pa
import pytest
from click.testing import CliRunner

from flows.cli import cli
from stores.schema import ITEMS
from stores.sql import SqlRefused
from stores.workspace import conform


@pytest.fixture
def filled(ws):
    rows = pa.table({"item_id": ["01", "02"], "title": ["a", "b"], "content_hash": ["h1", "h2"]})
    ws.upsert(ITEMS, conform(rows, ITEMS.schema))
    return ws


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
        filled.sql(query)
    assert filled.count("items") == 2


def test_file_access_is_refused(filled, tmp_path):
    """Table functions that read files outside the workspace are refused by DuckDB's locked configuration."""
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(SqlRefused, match="Queries may only read"):
        filled.sql(f"select * from read_csv('{tmp_path / 'x.csv'}')")


def test_select_and_version_pinning(filled):
    """SELECT sees every table; a version pin reads the table as it was."""
    v1 = filled.version("items")
    ws = filled
    ws.upsert(ITEMS, conform(pa.table({"item_id": ["03"], "title": ["c"], "content_hash": ["h3"]}), ITEMS.schema))
    assert ws.sql("select count(*) n from items")["n"].to_pylist() == [3]
    assert ws.sql("select count(*) n from items", versions={"items": v1})["n"].to_pylist() == [2]


def test_cli_sql_prints_and_refuses(filled):
    """`mmfeat sql` prints query results and fails with a clear message on writes, deleting nothing."""
    runner = CliRunner()
    ok = runner.invoke(cli, ["--workspace", filled.uri, "sql", "select count(*) as n from items"], obj={})
    assert ok.exit_code == 0 and "2" in ok.output
    bad = runner.invoke(cli, ["--workspace", filled.uri, "sql", "delete from items"], obj={})
    assert bad.exit_code != 0 and "read-only" in bad.output
    assert filled.count("items") == 2
    as_csv = runner.invoke(cli, ["--workspace", filled.uri, "sql", "select item_id from items order by 1", "--format", "csv"], obj={})
    assert as_csv.exit_code == 0 and '"01"' in as_csv.output
