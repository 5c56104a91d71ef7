"""Interactions clustered by user: a forget rewrites only the fragments holding the user's rows.

The checks read data files and rows straight from Lance: which fragment paths survive a forget, and that the
rows left are exactly the rows before minus the forgotten user's.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from recipes.unlearning.forget import forget
from stores.erasure.physical import cluster, compact
from stores.erasure.requests import ForgetRequest
from stores.schema import INTERACTIONS
from stores.workspace import Workspace

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def _rows(users: int, per_user: int, batch: int) -> pa.Table:
    """Every user's rows in every batch: arrival order spreads one user over every fragment."""
    return pa.Table.from_pylist(
        [
            {
                "user_id": f"u{u:03d}",
                "item_id": f"b{batch}i{j}",
                "timestamp": NOW,
                "event": "rating",
                "seq": 0,
                "value": 1.0,
                "source": "s",
            }
            for u in range(users)
            for j in range(per_user)
        ],
        schema=INTERACTIONS.schema,
    )


def _keys(ws: Workspace) -> list[tuple[str, str]]:
    t = ws.dataset("interactions").to_table(columns=["user_id", "item_id"])
    return sorted(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), strict=True))


def test_clustered_forget_rewrites_few_fragments(tmp_path):
    """After `cluster`, each user's rows sit in at most two fragments of bounded size; forgetting a user rewrites
    only those (every other fragment keeps its data file), the rows left are the rows before minus the user's,
    and the receipt verifies (old versions cleaned, so the unclustered layout holding the user is gone too)."""
    ws = Workspace(tmp_path / "ws")
    for batch in range(3):
        ws.upsert(INTERACTIONS, _rows(40, 5, batch))
    before = _keys(ws)
    assert all(
        "u007" in f.to_table()["user_id"].to_pylist() for f in ws.dataset("interactions").get_fragments()
    )

    out = cluster(ws, "interactions", "user_id", rows_per_fragment=100)
    assert out == {"rows": 600, "fragments": 6, "indices": []}
    fragments = ws.dataset("interactions").get_fragments()
    assert all(f.metadata.physical_rows <= 100 for f in fragments)
    holding = [f for f in fragments if "u007" in f.to_table(columns=["user_id"])["user_id"].to_pylist()]
    assert 1 <= len(holding) <= 2
    untouched = {f.data_files()[0].path for f in fragments} - {f.data_files()[0].path for f in holding}

    receipt = forget(ws, ForgetRequest("r1", "user", users=("u007",)))
    assert receipt["verification"]["verified"], receipt["verification"]
    assert receipt["removed"]["interactions"] == 15
    assert receipt["physical"]["interactions"]["fragments_rewritten"] == len(holding)
    after = ws.dataset("interactions")
    assert untouched <= {f.data_files()[0].path for f in after.get_fragments()}
    assert all(f.metadata.deletion_file is None for f in after.get_fragments())
    assert _keys(ws) == [k for k in before if k[0] != "u007"]


def test_compact_default_target_keeps_small_fragments(tmp_path):
    """Without a target, `compact` rewrites only fragments with deleted rows: small fragments without deletions
    are not merged into one (Lance's default target of 1M rows would rewrite them all)."""
    ws = Workspace(tmp_path / "ws")
    ws.upsert(INTERACTIONS, _rows(20, 5, 0))
    cluster(ws, "interactions", "user_id", rows_per_fragment=25)
    paths = {f.data_files()[0].path for f in ws.dataset("interactions").get_fragments()}
    ws.open("interactions").delete("user_id = 'u000'")
    out = compact(ws, "interactions")
    assert out["fragments_rewritten"] == 1
    after = {f.data_files()[0].path for f in ws.dataset("interactions").get_fragments()}
    assert len(paths - after) == 1 and len(after) == 4
    assert ws.dataset("interactions").count_rows() == 95
