"""Snapshots: pinned versions, immutability under new ingests and re-encodes, SQL through a snapshot, invalidation,
cleaned-up versions and re-issue, and the `mmfeat snapshot` CLI."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
from recipes.splits import SplitConfig
from stores.features import CAPTIONS, feature_spec
from stores.reader import FeatureReader
from stores.schema import INTERACTIONS, ITEMS
from stores.snapshots import (
    SnapshotError,
    create_snapshot,
    invalidate_snapshot,
    list_snapshots,
    reissue_snapshot,
    show_snapshot,
    snapshot_versions,
    snapshots_pinning,
)
from stores.sql import run_sql
from stores.workspace import Workspace, conform

N_USERS, N_ITEMS = 12, 20


def put_items(ws: Workspace, ids: list[str], tag: str = "") -> None:
    rows = pa.table(
        {
            "item_id": ids,
            "title": [f"item {i}{tag}" for i in ids],
            "content_hash": [f"h{i}{tag}" for i in ids],
        }
    )
    ws.upsert(ITEMS, conform(rows, ITEMS.schema))


def put_interactions(ws: Workspace, pairs: list[tuple[str, str]], t0: int = 1_600_000_000) -> None:
    rows = pa.table(
        {
            "user_id": [u for u, _ in pairs],
            "item_id": [i for _, i in pairs],
            "timestamp": pa.array([t0 + k for k in range(len(pairs))], pa.timestamp("s", tz="UTC")),
            "event": ["click"] * len(pairs),
            "seq": pa.array([0] * len(pairs), pa.int32()),
        }
    )
    ws.upsert(INTERACTIONS, conform(rows, INTERACTIONS.schema))


def put_vectors(ws: Workspace, feature: str, ids: list[str], vectors: np.ndarray, model: str = "m") -> None:
    """Write a feature table the way an extractor run does (keyed upsert on item_id, input_hash changes)."""
    spec = feature_spec(feature, vectors.shape[1])
    flat = pa.array(vectors.astype(np.float32).ravel(), pa.float32())
    rows = pa.table(
        {
            "item_id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            "model": [model] * len(ids),
            "revision": ["r1"] * len(ids),
            "params": ["{}"] * len(ids),
            "input_hash": [f"{model}:{i}:{vectors[k].sum():.6f}" for k, i in enumerate(ids)],
            "created_at": pa.array([datetime.now(UTC)] * len(ids), pa.timestamp("us", tz="UTC")),
        }
    )
    ws.upsert(spec, conform(rows, spec.schema))


def tiny_workspace(ws: Workspace, seed: int = 0) -> Workspace:
    """12 users x 20 items, 8 interactions per user; `text` (8-d) misses items 018 and 019, `image` (4-d) has all;
    split "main", graphs "ui" (user-item, sym) and "knn" (text+image kNN), snapshot "s1" over all of them."""
    rng = np.random.default_rng(seed)
    items = [f"{i:03d}" for i in range(N_ITEMS)]
    put_items(ws, items)
    pairs = [(f"u{u:02d}", items[i]) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 8, replace=False)]
    put_interactions(ws, pairs)
    put_vectors(ws, "text", items[:-2], rng.normal(size=(N_ITEMS - 2, 8)))
    put_vectors(ws, "image", items, rng.normal(size=(N_ITEMS, 4)))
    build_split(ws, "main", SplitConfig(scheme="random", seed=1, min_ratio_inters=4))
    build_ui_graph(ws, "main", "sym", name="ui")
    build_knn_graph(ws, "main", ["text", "image"], k=3, weights=[0.9, 0.1], name="knn")
    create_snapshot(ws, "s1", "main", ["text", "image"], ["ui", "knn"])
    return ws


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> Workspace:
    return tiny_workspace(Workspace(tmp_path_factory.mktemp("tiny") / "ws"))


@pytest.fixture
def tiny(tiny_template, tmp_path) -> Workspace:
    """A private copy of the tiny workspace (built once per module: building it takes seconds)."""
    shutil.copytree(tiny_template.uri, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def test_snapshot_records_feature_health_and_context_versions(tiny):
    """A snapshot records, per feature, rows, missing items, coverage, untrained and degenerate as they were when it was taken
    (a later constant re-encode does not change it), and the versions of the context tables the report reads;
    recording them does not make the snapshot serve them."""
    health = show_snapshot(tiny, "s1")["feature_health"]
    assert health["text"] == {"rows": 18, "missing": 2, "coverage": 0.9, "untrained": False, "degenerate": ""}
    assert health["image"]["coverage"] == 1.0 and health["image"]["degenerate"] == ""
    assert health["image"]["missing"] == 0
    items = [f"{i:03d}" for i in range(N_ITEMS)]
    put_vectors(tiny, "image", items, np.ones((N_ITEMS, 4)), model="constant")
    create_snapshot(tiny, "s2", "main", ["image"])
    assert "identical" in show_snapshot(tiny, "s2")["feature_health"]["image"]["degenerate"]
    assert show_snapshot(tiny, "s1")["feature_health"]["image"]["degenerate"] == ""
    tiny.ensure(CAPTIONS)
    create_snapshot(tiny, "s3", "main", ["image"])
    info = show_snapshot(tiny, "s3")
    assert info["context"] == {"captions": tiny.version("captions")}
    assert "captions" not in snapshot_versions(tiny, "s3")


def read_all(reader: FeatureReader) -> dict[str, bytes]:
    """Every array a trainer reads from a snapshot, as bytes."""
    out = {"users": "|".join(reader.users).encode(), "items": "|".join(reader.items).encode()}
    for part in ("train", "valid", "test"):
        out[part] = reader.interactions(part).numpy().tobytes()
    for f in ("text", "image"):
        matrix, mask = reader.feature(f)
        out[f] = matrix.numpy().tobytes() + mask.numpy().tobytes()
    for g in ("ui", "knn"):
        adj = reader.graph(g)
        out[g] = adj.indices().numpy().tobytes() + adj.values().numpy().tobytes()
    return out


def test_snapshot_pins_current_versions(tiny):
    """A snapshot records the version of items, interactions, each chosen feature table, the split and the graphs
    as they were, and `snapshot_versions` hands back exactly those."""
    pinned = snapshot_versions(tiny, "s1")
    assert set(pinned) == {
        "items",
        "interactions",
        "feat_text",
        "feat_image",
        "split_main",
        "graph_ui",
        "graph_knn",
    }
    for table, version in pinned.items():
        assert version == tiny.version(table), table
    info = show_snapshot(tiny, "s1")
    assert info["status"] == "ok" and info["missing_versions"] == {}
    assert info["graph_manifests"]["ui"]["node_kind"] == "user+item"
    assert [s["name"] for s in list_snapshots(tiny)] == ["s1"]


def test_snapshot_reads_are_byte_identical_after_new_ingest_and_reencode(tiny):
    """Reading a snapshot, then ingesting new items and interactions, re-encoding every vector (new model, new
    items), rebuilding the split and graphs under the same names, and reading again gives byte-identical arrays."""
    before = read_all(FeatureReader(tiny, "s1"))
    pinned = snapshot_versions(tiny, "s1")

    new_items = [f"{i:03d}" for i in range(N_ITEMS, N_ITEMS + 5)]
    put_items(tiny, new_items)
    put_items(tiny, ["000"], tag=" (edited)")
    put_interactions(
        tiny, [(f"u{u:02d}", i) for u in range(N_USERS + 3) for i in new_items], t0=1_700_000_000
    )
    all_items = [f"{i:03d}" for i in range(N_ITEMS + 5)]
    rng = np.random.default_rng(99)
    put_vectors(tiny, "text", all_items, rng.normal(size=(len(all_items), 8)), model="m2")
    put_vectors(tiny, "image", all_items, rng.normal(size=(len(all_items), 4)), model="m2")
    build_split(tiny, "main", SplitConfig(scheme="random", seed=7, min_ratio_inters=4))
    build_ui_graph(tiny, "main", "sym", name="ui")
    build_knn_graph(tiny, "main", ["text", "image"], k=3, weights=[0.9, 0.1], name="knn")
    assert all(tiny.version(t) > v for t, v in pinned.items() if t != "users"), "every pinned table moved on"

    after = read_all(FeatureReader(tiny, "s1"))
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == before[key], key
    # A fresh snapshot does see the new data.
    create_snapshot(tiny, "s2", "main", ["text", "image"], ["ui", "knn"])
    assert FeatureReader(tiny, "s2").n_items == N_ITEMS + 5


def test_sql_through_a_snapshot(tiny):
    """`mmfeat sql --snapshot NAME` (and `run_sql` with `snapshot_versions`) reads the pinned versions, not the latest."""
    from flows.cli import cli

    put_vectors(tiny, "text", ["100", "101"], np.ones((2, 8)))
    assert tiny.count("feat_text") == N_ITEMS
    assert (
        run_sql(tiny, "SELECT count(*) AS n FROM feat_text", versions=snapshot_versions(tiny, "s1"))["n"][
            0
        ].as_py()
        == N_ITEMS - 2
    )
    result = CliRunner().invoke(
        cli,
        [
            "--workspace",
            tiny.uri,
            "sql",
            "--snapshot",
            "s1",
            "--format",
            "json",
            "SELECT count(*) AS n FROM feat_text",
        ],
        obj={},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"n": N_ITEMS - 2}]


def test_invalidated_snapshot_is_refused_until_reissued(tiny):
    """A snapshot flagged by erasure is never served: reading it raises an error that says to re-issue it; after
    `reissue_snapshot` it serves the current versions and keeps the invalidated manifest in its history."""
    old = snapshot_versions(tiny, "s1")
    put_vectors(tiny, "text", ["000"], np.zeros((1, 8)))  # erasure rewrote the table
    invalidate_snapshot(tiny, "s1", "forget request: user u01", request_id="req-1")
    assert list_snapshots(tiny)[0]["status"] == "invalidated"
    with pytest.raises(SnapshotError, match=r"invalidated .*req-1.*mmfeat snapshot reissue s1"):
        snapshot_versions(tiny, "s1")
    with pytest.raises(SnapshotError, match="reissue"):
        FeatureReader(tiny, "s1").feature("text")

    info = reissue_snapshot(tiny, "s1")
    assert info["invalidated"] is None
    assert info["tables"]["feat_text"] == tiny.version("feat_text") > old["feat_text"]
    assert info["previous"][0]["tables"] == old
    assert info["previous"][0]["invalidated"]["request_id"] == "req-1"
    assert snapshot_versions(tiny, "s1") == info["tables"]
    assert list_snapshots(tiny)[0] | {"created_at": None} == {
        "name": "s1",
        "created_at": None,
        "split": "main",
        "features": ["text", "image"],
        "graphs": ["ui", "knn"],
        "status": "ok",
        "reissues": 1,
    }


def test_cleaned_up_versions_make_a_snapshot_stale(tiny):
    """When erasure cleans up the old versions a snapshot pins, the snapshot reports them missing and refuses to be
    read (never falling back to another version); re-issuing pins what exists now."""
    put_vectors(tiny, "text", ["000"], np.zeros((1, 8)))
    tiny.dataset("feat_text").cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    info = show_snapshot(tiny, "s1")
    assert info["status"] == "stale"
    assert list(info["missing_versions"]) == ["feat_text"]
    with pytest.raises(SnapshotError, match=r"no longer exist \(feat_text v\d+\).*reissue s1"):
        snapshot_versions(tiny, "s1")
    reissue_snapshot(tiny, "s1")
    assert show_snapshot(tiny, "s1")["status"] == "ok"
    assert FeatureReader(tiny, "s1").feature("text")[0][0].abs().sum().item() == 0.0


def test_snapshots_pinning_finds_snapshots_holding_a_key(tiny):
    """Erasure can ask which snapshots pin a version that still holds a given key."""
    assert snapshots_pinning(tiny, "feat_text", "item_id = '000'") == ["s1"]
    assert snapshots_pinning(tiny, "feat_text", "item_id = '019'") == []  # 019 has no text vector
    assert snapshots_pinning(tiny, "feat_nothing") == []


def test_bad_requests_name_the_problem(tiny):
    """Existing names, unknown features and splits, and graphs built on another split are refused with the fix."""
    with pytest.raises(ValueError, match="already exists.*reissue"):
        create_snapshot(tiny, "s1", "main")
    with pytest.raises(KeyError, match="feature 'audio' not found.*text"):
        create_snapshot(tiny, "s9", "main", ["audio"])
    with pytest.raises(KeyError, match="no split named 'nope'"):
        create_snapshot(tiny, "s9", "nope")
    with pytest.raises(SnapshotError, match="no snapshot named 'zz'.*s1"):
        snapshot_versions(tiny, "zz")
    build_split(tiny, "other", SplitConfig(scheme="random", seed=3, min_ratio_inters=4))
    with pytest.raises(ValueError, match="graph 'ui' was built on split 'main'"):
        create_snapshot(tiny, "s9", "other", graphs=["ui"])
    info = create_snapshot(tiny, "s1", "main", ["feat_text"], replace=True)
    assert info["features"] == ["text"] and info["graphs"] == []


def test_snapshot_cli(tiny):
    """create / list / show / reissue through `mmfeat snapshot`, with clean one-line errors."""
    from flows.cli import cli

    run = CliRunner()

    def invoke(*args):
        return run.invoke(cli, ["--workspace", tiny.uri, "snapshot", *args], obj={})

    res = invoke("create", "s3", "--split", "main", "--feature", "text", "--graph", "ui")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tables"]["feat_text"] == tiny.version("feat_text")
    res = invoke("list")
    assert res.exit_code == 0 and "s3" in res.output and "ok" in res.output
    res = invoke("show", "s3")
    assert json.loads(res.output)["status"] == "ok"
    put_vectors(tiny, "text", ["000"], np.zeros((1, 8)))
    res = invoke("reissue", "s3")
    assert res.exit_code == 0 and "feat_text" in res.output and "->" in res.output
    res = invoke("show", "missing")
    assert (
        res.exit_code != 0 and "no snapshot named 'missing'" in res.output and "Traceback" not in res.output
    )


def test_erasure_invalidates_the_snapshot_and_reissue_serves_the_erased_data(tiny):
    """A forget request that erases rows a snapshot pins flags it: reading fails with the re-issue hint instead of
    serving the forgotten user; after `reissue_snapshot` the reader serves the erased data, without that user."""
    from recipes.unlearning.forget import forget
    from stores.erasure.requests import ForgetRequest

    assert "u01" in FeatureReader(tiny, "s1").users
    receipt = forget(tiny, ForgetRequest("req-u01", "user", users=("u01",), reason="test"))
    assert [s["name"] for s in receipt["snapshots_invalidated"]] == ["s1"]
    assert list_snapshots(tiny)[0]["status"] == "invalidated"
    with pytest.raises(SnapshotError, match=r"invalidated .*req-u01.*reissue s1"):
        FeatureReader(tiny, "s1").interactions("train")
    reissue_snapshot(tiny, "s1")
    reader = FeatureReader(tiny, "s1")
    assert "u01" not in reader.users and reader.n_users == N_USERS - 1
    assert show_snapshot(tiny, "s1")["previous"][0]["invalidated"]["request_id"] == "req-u01"
