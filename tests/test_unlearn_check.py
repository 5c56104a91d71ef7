"""The forgetting check (`mmfeat unlearn-check`): membership AUC, non-member sampling, the receipt section, and on
ML-100K the gold model at chance while the model trained before the forget remembers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from recipes.unlearn_check import CheckConfig, membership_auc, nonmember_pairs, unlearn_check
from stores.erasure.log import append_to_receipt, logged
from stores.erasure.requests import ForgetRequest
from stores.reader import pair_keys
from stores.schema import INTERACTIONS, ITEMS, USERS
from stores.snapshots import SnapshotError, create_snapshot
from stores.workspace import Workspace

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def test_membership_auc_and_nonmembers():
    """AUC is 1 for separated scores and 0.5 for identical ones; a non-member pair has the member's user, an item
    from the members' own items, and is never a known pair."""
    assert membership_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert membership_auc(np.ones(3), np.ones(4)) == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        membership_auc(np.ones(2), np.array([]))
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 5, 40), rng.integers(0, 12, 40)
    known = pair_keys(user, item, 12)
    nu, ni = nonmember_pairs(user, item, known, 12, seed=1)
    assert len(nu) == len(user) and set(nu.tolist()) <= set(user.tolist())
    assert set(ni.tolist()) <= set(item.tolist())
    assert not np.isin(nu * 12 + ni, known).any()


def _tiny_workspace(ws: Workspace) -> None:
    """12 users in two taste groups over 30 items, 12 interactions each, a random split and a snapshot."""
    from recipes.pipeline import build_split
    from recipes.splits import SplitConfig

    rng = np.random.default_rng(0)
    items = [f"i{j:02d}" for j in range(30)]
    users = [f"u{j:02d}" for j in range(12)]
    ws.upsert(
        ITEMS,
        pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "title": i,
                    "text": i,
                    "source": "syn",
                    "attributes": "{}",
                    "rights": "syn",
                    "content_hash": i,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in items
            ],
            schema=ITEMS.schema,
        ),
    )
    ws.upsert(
        USERS,
        pa.Table.from_pylist(
            [{"user_id": u, "attributes": "{}", "source": "syn", "created_at": NOW} for u in users],
            schema=USERS.schema,
        ),
    )
    rows = [
        {
            "user_id": u,
            "item_id": items[j],
            "timestamp": NOW - timedelta(days=int(rng.integers(0, 300))),
            "event": "rating",
            "seq": 0,
            "value": 4.0,
            "source": "syn",
        }
        for k, u in enumerate(users)
        for j in rng.choice(np.arange(15) + 15 * (k % 2), 12, replace=False)
    ]
    ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))
    build_split(ws, "main", SplitConfig(scheme="random", seed=0))
    create_snapshot(ws, "s1", "main")


def test_check_carries_out_the_forget_and_appends_to_its_receipt(tmp_path):
    """Given a request not yet carried out, the check trains before, forgets, trains the gold and appends
    `unlearn_check` to the receipt, every other receipt section unchanged; the gold model never saw the forgotten
    users, so its forget-set recall is below the model's trained before; the snapshot, now erased, can no longer
    serve a check (`mmfeat unlearn-check` says to re-issue it), and an unknown request cannot take a section."""
    ws = Workspace(tmp_path / "ws")
    _tiny_workspace(ws)
    req = ForgetRequest("r-check", "user", users=("u00", "u01"))
    section = unlearn_check(ws, "s1", req, CheckConfig(epochs=40, dim=8, lr=0.05))
    receipt = logged(ws, "r-check")["receipt"]
    assert receipt["unlearn_check"] == json.loads(json.dumps(section))
    assert receipt["verification"]["verified"] and receipt["scope"]["users"] == 2
    assert section["counts"]["forget_users"] == 2 and section["counts"]["nonmembers"] > 0
    for model in ("before", "gold"):
        assert 0.0 <= section[model]["membership_auc"] <= 1.0
        assert set(section[model]) >= {"forget", "retain", "test", "train"}
    assert section["gold"]["forget"]["recall@10"] < section["before"]["forget"]["recall@10"]
    with pytest.raises(SnapshotError, match="re-issue|reissue"):
        unlearn_check(ws, "s1", "r-check", CheckConfig(epochs=1, dim=8))
    from click.testing import CliRunner

    from flows.cli import cli

    out = CliRunner().invoke(
        cli, ["--workspace", str(ws.uri), "unlearn-check", "--snapshot", "s1", "--request", "r-check"]
    )
    assert out.exit_code != 0 and "snapshot reissue s1" in out.output, out.output
    append_to_receipt(ws, "r-check", "note", {"a": 1})
    again = logged(ws, "r-check")["receipt"]
    assert again["note"] == {"a": 1} and again["unlearn_check"] == receipt["unlearn_check"]
    with pytest.raises(KeyError, match="no forget request"):
        append_to_receipt(ws, "nope", "note", {})


@pytest.mark.realdata
@pytest.mark.slow
def test_ml100k_cure4rec_core_users_gold_at_chance_before_remembers(ml100k, tmp_path):
    """ML-100K 5-core, CURE4Rec's 5% most active users forgotten through the real workflow (snapshot -> check,
    which carries out the forget between the two trainings): the gold model's membership AUC on the forget set is
    within 0.05 of 0.5, the model trained before the forget is at least 0.55; both land in the receipt and the
    report's forget section."""
    from recipes.ingest.load import ingest
    from recipes.ingest.sources import movielens
    from recipes.pipeline import build_split
    from recipes.report.data import load_report_data
    from recipes.report.render import render_report
    from recipes.splits import SplitConfig
    from recipes.unlearn_check import cure4rec_request

    ws = Workspace(tmp_path / "ws")
    ingest(ws, movielens(ml100k, ml100k / "items_tmdb.csv"))
    build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    create_snapshot(ws, "ml100k", "main")
    req = cure4rec_request(ws, "ml100k", "cure-core-5", mode="most_active", percent=5)
    assert len(req.users) == 47
    check = unlearn_check(ws, "ml100k", req, CheckConfig(epochs=10), log=print)
    before, gold = check["before"]["membership_auc"], check["gold"]["membership_auc"]
    print(
        f"\nmembership AUC before {before:.4f} gold {gold:.4f}; forget recall@20 before "
        f"{check['before']['forget']['recall@20']:.4f} gold {check['gold']['forget']['recall@20']:.4f}; "
        f"retain recall@20 before {check['before']['retain']['recall@20']:.4f} gold "
        f"{check['gold']['retain']['recall@20']:.4f}; test recall@20 before "
        f"{check['before']['test']['recall@20']:.4f} gold {check['gold']['test']['recall@20']:.4f}"
    )
    assert abs(gold - 0.5) <= 0.05 and check["gold_at_chance"]
    assert before >= 0.55 and check["before_remembers"]
    assert logged(ws, "cure-core-5")["receipt"]["unlearn_check"]["gold"]["membership_auc"] == gold
    html = render_report(load_report_data(ws))
    assert "Forgetting check" in html and f"{gold:.3f}" in html and f"{before:.3f}" in html
