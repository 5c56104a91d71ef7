"""ML-100K with posters: the spine's fixed points on real data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stores.sql import run_sql
from tests.conftest import REPO, ingest_ml100k

pytestmark = pytest.mark.realdata


def test_ml100k_counts_and_idempotent_reingest(ws, ml100k):
    """1,682 items, 943 users, 100,000 interactions, 1,663 posters; TMDB duplicates merged; re-ingest adds 0 rows."""
    report = ingest_ml100k(ws, ml100k)
    assert report.balanced
    assert ws.count("items") == 1682
    assert ws.count("users") == 943
    assert ws.count("interactions") == 100_000
    assert ws.count("item_images") == 1663
    assert ws.count("quarantine") == 0
    assert report.files["items_tmdb.csv"].merged == 64
    no_poster = run_sql(
        ws, "select item_id from items anti join item_images using (item_id) order by item_id::int"
    )
    assert no_poster["item_id"].to_pylist()[:3] == ["330", "387", "563"] and no_poster.num_rows == 19
    overview = run_sql(ws, "select count(*) n from items where text is not null and length(text) > 0")["n"][
        0
    ].as_py()
    assert overview > 1600
    again = ingest_ml100k(ws, ml100k)
    assert sum(r.inserted + r.updated for r in again.tables.values()) == 0


def test_cli_sql_on_ml100k(tmp_path, ml100k):
    """`mmfeat sql "select count(*) from interactions"` prints 100000 and `delete from items` fails, deleting nothing."""
    ws = str(tmp_path / "ws")
    mmfeat = [sys.executable, "-m", "flows.cli", "--workspace", ws]
    subprocess.run(
        mmfeat
        + [
            "ingest",
            "movielens",
            str(ml100k),
            "--items-csv",
            str(ml100k / "items_tmdb.csv"),
            "--posters",
            str(ml100k / "posters"),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    out = subprocess.run(
        mmfeat + ["sql", "select count(*) from interactions"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "100000" in out.stdout
    bad = subprocess.run(mmfeat + ["sql", "delete from items"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "read-only" in bad.stderr
    left = subprocess.run(
        mmfeat + ["sql", "select count(*) from items"], cwd=REPO, capture_output=True, text=True
    )
    assert "1682" in left.stdout
