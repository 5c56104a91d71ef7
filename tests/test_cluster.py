"""Clustering a table by a key (stores/erasure/physical.py `cluster`): the same rows in the same order as a stable
sort of the whole table, in memory bounded by the key column and a chunk of rows (never the table), committed as
one version (a crash mid-way leaves the table as it was), and run by `mmfeat optimize` and the refresh step when
rows were appended since the last clustering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from flows.cli import cli
from recipes.refresh import cluster_interactions
from recipes.unlearning.forget import forget
from stores.erasure.physical import CLUSTER_KEY, cluster, cluster_state
from stores.erasure.requests import ForgetRequest
from stores.schema import INTERACTIONS
from stores.workspace import Workspace
from tests.conftest import REPO, run_capped, wide_interactions
from tests.test_forget_layout import _rows

CHILD = """
import json, resource, sys
ws_dir, cap_mb, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if cap_mb:
    resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
import lance, pyarrow.compute as pc
from stores.erasure.physical import cluster
from stores.workspace import Workspace
ws = Workspace(ws_dir)
if how == "whole-table":  # the previous cluster: the table in memory, then a sorted copy of it
    rows = ws.dataset("interactions").to_table()
    rows = rows.take(pc.sort_indices(rows, [("user_id", "ascending")]))
    lance.write_dataset(rows, ws.table_uri("interactions"), mode="overwrite", max_rows_per_file=20_000)
else:
    cluster(ws, "interactions", "user_id", rows_per_fragment=20_000)
vm = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
print(json.dumps({"VmPeak": vm["VmPeak"], "VmHWM": vm["VmHWM"]}))
"""

WIDE = 2_500  # characters of `source` per row: ~500 MB of rows in memory for 200k rows, a few MB on disk
MARGIN_MB = 350  # over a tiny cluster's address space: measured +130-200 MB chunked, +1.2 GB whole-table


def _wide(root: Path, rows: int) -> Workspace:
    """`rows` interactions of 997 users in arrival order (every batch holds every user), each with a
    WIDE-character source."""
    return wide_interactions(root, np.char.add("u", (np.arange(rows) % 997).astype(str)), WIDE, step=25_000)


def _sorted_reference(ws: Workspace) -> pa.Table:
    """What clustering must produce: the whole table, stably sorted by user_id in memory."""
    rows = ws.dataset("interactions").to_table()
    return rows.take(pc.sort_indices(rows, [("user_id", "ascending")]))


def test_cluster_equals_a_stable_sort_of_the_whole_table(tmp_path):
    """Chunked clustering (chunks smaller than a fragment, a table with deleted rows) writes exactly the rows
    and row order of a stable in-memory sort by the key, in fragments of the requested size, and records the
    clustering (key, version, fragment size) in the table's config; no user id is recorded there."""
    ws = Workspace(tmp_path / "ws")
    for batch in range(3):
        ws.upsert(INTERACTIONS, _rows(40, 5, batch))
    ws.open("interactions").delete("item_id = 'b1i2'")
    reference = _sorted_reference(ws)
    out = cluster(ws, "interactions", "user_id", rows_per_fragment=100, chunk_rows=64)
    assert out["rows"] == reference.num_rows == 560
    assert ws.dataset("interactions").to_table().equals(reference)
    assert [f.metadata.physical_rows for f in ws.dataset("interactions").get_fragments()] == [100] * 5 + [60]
    record = json.loads(ws.dataset("interactions").config()[CLUSTER_KEY])
    assert record["by"] == "user_id" and record["rows_per_fragment"] == 100 and record["rows"] == 560
    assert "u0" not in ws.dataset("interactions").config()[CLUSTER_KEY]
    assert cluster_state(ws, "interactions")["unclustered_rows"] == 0


@pytest.mark.slow
def test_cluster_fits_under_a_cap_the_whole_table_sort_exceeds(tmp_path):
    """Clustering 200k rows of ~2.5 KB (~500 MB in memory) completes in a child capped at a tiny cluster's peak
    + 350 MB, with the same rows as the whole-table sort; the previous whole-table sort (the table, then a sorted
    copy) fails under that cap."""
    tiny = _wide(tmp_path / "tiny", 2_000)
    cap = run_capped(CHILD, tiny.uri, "0", "chunked")["VmPeak"] + MARGIN_MB
    ws = _wide(tmp_path / "big", 200_000)
    reference = _sorted_reference(ws).select(["user_id", "item_id", "timestamp"])
    run_capped(CHILD, ws.uri, str(cap), "chunked")
    assert ws.dataset("interactions").to_table(columns=["user_id", "item_id", "timestamp"]).equals(reference)
    old = subprocess.run(
        [sys.executable, "-c", CHILD, _wide(tmp_path / "old", 200_000).uri, str(cap), "whole-table"],
        cwd=REPO,
        env={**os.environ, "MALLOC_ARENA_MAX": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert old.returncode != 0, f"the whole-table sort fit under {cap} MB; raise WIDE or lower MARGIN_MB"


KILLED = """
import os, signal, sys
from stores.erasure.physical import cluster
from stores.workspace import Workspace
def die(rows):  # killed after the first chunk was taken, before the overwrite commits
    os.kill(os.getpid(), signal.SIGKILL)
cluster(Workspace(sys.argv[1]), "interactions", "user_id", rows_per_fragment=100, chunk_rows=64, progress=die)
"""


def test_a_cluster_killed_mid_write_loses_nothing(tmp_path):
    """A cluster killed (SIGKILL) mid-write leaves the table at its previous version with every row, and its
    write lease is reclaimed: a second cluster then completes."""
    ws = Workspace(tmp_path / "ws")
    for batch in range(3):
        ws.upsert(INTERACTIONS, _rows(40, 5, batch))
    before, version = ws.dataset("interactions").to_table(), ws.version("interactions")
    proc = subprocess.run([sys.executable, "-c", KILLED, ws.uri], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert ws.version("interactions") == version
    assert ws.dataset("interactions").to_table().equals(before)
    cluster(ws, "interactions", "user_id", rows_per_fragment=100)
    assert (
        ws.dataset("interactions")
        .to_table()
        .equals(before.take(pc.sort_indices(before, [("user_id", "ascending")])))
    )


def test_optimize_command_clusters_then_reports_clustered(tmp_path):
    """`mmfeat optimize --json` clusters interactions by user_id and prints one JSON object; run again it
    changes nothing and says the table is already clustered."""
    ws = Workspace(tmp_path / "ws")
    for batch in range(3):
        ws.upsert(INTERACTIONS, _rows(40, 5, batch))
    args = ["--workspace", ws.uri, "optimize", "--rows-per-fragment", "100", "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.output)
    assert out["skipped"] is False and out["rows"] == 600 and out["fragments"] == 6
    version = ws.version("interactions")
    again = json.loads(CliRunner().invoke(cli, args).output)
    assert again["skipped"] == "already clustered" and ws.version("interactions") == version
    text = CliRunner().invoke(cli, ["--workspace", ws.uri, "optimize"])
    assert text.exit_code == 0 and "already clustered" in text.output


def test_refresh_step_reclusters_after_appends_and_forgets_stay_cheap(tmp_path):
    """The refresh's cluster step clusters a large-enough table, skips while nothing changed, leaves a table
    alone after a forget (compaction keeps the layout), and re-clusters once appended rows exceed the slack;
    a forget afterwards rewrites only the one or two fragments holding the user."""
    ws = Workspace(tmp_path / "ws")
    for batch in range(3):
        ws.upsert(INTERACTIONS, _rows(40, 5, batch))
    assert cluster_interactions(ws, min_rows=10_000)["skipped"] == "fewer than 10000 rows"
    first = cluster_interactions(ws, min_rows=100, rows_per_fragment=100)
    assert first["skipped"] is False and first["fragments"] == 6
    assert cluster_interactions(ws, min_rows=100, rows_per_fragment=100)["skipped"] is True

    receipt = forget(ws, ForgetRequest("r1", "user", users=("u003",)))
    assert receipt["verification"]["verified"]
    after_forget = cluster_interactions(ws, min_rows=100, rows_per_fragment=100)
    assert after_forget["skipped"] in (True, "already clustered")
    assert cluster_state(ws, "interactions")["unclustered_rows"] == 0

    ws.upsert(INTERACTIONS, _rows(40, 2, 9))  # 80 appended rows spanning every user: over 5% of the table
    assert cluster_state(ws, "interactions")["unclustered_rows"] == 80
    again = cluster_interactions(ws, min_rows=100, rows_per_fragment=100)
    assert again["skipped"] is False and again["unclustered_rows"] == 80
    assert cluster_state(ws, "interactions")["unclustered_rows"] == 0

    fragments = ws.dataset("interactions").get_fragments()
    holding = [f for f in fragments if "u007" in f.to_table(columns=["user_id"])["user_id"].to_pylist()]
    receipt = forget(ws, ForgetRequest("r2", "user", users=("u007",)))
    assert receipt["verification"]["verified"]
    assert receipt["physical"]["interactions"]["fragments_rewritten"] == len(holding) <= 2
