"""Recipe steps over the store: versioned splits and graphs, manifests, train-only graphs, skip-if-unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recipes import pipeline
from recipes.graphs.knn import KnnConfig, knn_graph
from recipes.graphs.user_item import ui_adjacency
from recipes.ingest.load import ingest
from recipes.splits import SplitConfig
from stores import artifacts
from stores.features import feature_spec
from stores.ids import id_maps
from stores.workspace import conform
from tests.conftest import ingest_ml100k


def _demo(ws, tmp_path):
    from recipes.ingest.demo_data import generate_catalog
    from recipes.ingest.sources import table

    cat = generate_catalog(tmp_path / "src", n_items=60, n_users=30, seed=1)
    ingest(ws, table(cat.items, cat.interactions, cat.users, cat.images))


def _write_feature(ws, name: str, items: list[str], dim: int = 8, seed: int = 0) -> np.ndarray:
    spec = feature_spec(name, dim)
    vecs = np.random.default_rng(seed).normal(size=(len(items), dim)).astype(np.float32)
    data = pa.table(
        {
            "item_id": items,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
            "model": ["random"] * len(items),
            "revision": ["untrained"] * len(items),
            "input_hash": [f"{seed}:{i}" for i in items],
        }
    )
    ws.upsert(spec, conform(data, spec.schema))
    return vecs


def test_graphs_come_from_train_rows_only_and_round_trip(ws, tmp_path):
    """Stored graphs equal the recipe computed on train rows; no validation/test pair is an edge; reloads match."""
    _demo(ws, tmp_path)
    info = pipeline.build_split(ws, "s", SplitConfig(scheme="random", kcore=2, seed=3))
    split = artifacts.load_split(ws, "s")
    assert info["counts"]["rows"] == split.num_rows
    g = pipeline.build_ui_graph(ws, "s", "none")
    mat, ids = artifacts.load_graph(ws, g["name"])
    expected = ui_adjacency(split, "none")
    assert (mat != expected).nnz == 0
    users, items = id_maps(split)
    held = split.filter(pa.compute.not_equal(split["label"], 0)).to_pylist()
    train = {
        (r["user_id"], r["item_id"]) for r in split.filter(pa.compute.equal(split["label"], 0)).to_pylist()
    }
    edges = {(r["src"], r["dst"]) for r in ws.read(f"graph_{g['name']}").to_pylist()}
    leaked = [
        (r["user_id"], r["item_id"])
        for r in held
        if (r["user_id"], r["item_id"]) in edges and (r["user_id"], r["item_id"]) not in train
    ]
    assert not leaked
    for label_row in held[:20]:
        u = int(np.searchsorted(users, label_row["user_id"]))
        i = len(users) + int(np.searchsorted(items, label_row["item_id"]))
        if (label_row["user_id"], label_row["item_id"]) not in train:
            assert mat[u, i] == 0


def test_knn_graph_from_stored_features_matches_recipe_and_skips_when_unchanged(ws, tmp_path):
    """A kNN graph built from a feature table equals knn_graph on the aligned matrix; rebuilding with the same
    inputs writes nothing; changing one vector rebuilds it."""
    _demo(ws, tmp_path)
    pipeline.build_split(ws, "s", SplitConfig(scheme="loo"))
    split = artifacts.load_split(ws, "s")
    _, items = id_maps(split)
    all_items = ws.read("items", columns=["item_id"])["item_id"].to_pylist()
    vecs = _write_feature(ws, "img", all_items)
    info = pipeline.build_knn_graph(ws, "s", ["img"], k=5, norm="lattice")
    mat, ids = artifacts.load_graph(ws, info["name"])
    aligned = vecs[[all_items.index(i) for i in items]]
    ref = knn_graph(aligned, KnnConfig(k=5, norm="lattice"))
    assert np.allclose(mat.toarray(), ref.toarray(), atol=1e-6)
    version = ws.version(f"graph_{info['name']}")
    again = pipeline.build_knn_graph(ws, "s", ["img"], k=5, norm="lattice")
    assert again.get("skipped") and ws.version(f"graph_{info['name']}") == version
    _write_feature(ws, "img", all_items[:1], seed=99)
    rebuilt = pipeline.build_knn_graph(ws, "s", ["img"], k=5, norm="lattice")
    assert not rebuilt.get("skipped") and ws.version(f"graph_{info['name']}") > version


def test_split_manifest_pins_input_version(ws, tmp_path):
    """A split records the interactions version it read; reading the split later gives the same rows."""
    _demo(ws, tmp_path)
    info = pipeline.build_split(ws, "t", SplitConfig(scheme="temporal"))
    assert info["inputs"]["interactions"] == ws.version("interactions")
    before = artifacts.load_split(ws, "t")
    pipeline.build_split(ws, "u", SplitConfig(scheme="random"))
    assert artifacts.load_split(ws, "t").equals(before)
    with pytest.raises(KeyError, match="no split named"):
        artifacts.load_split(ws, "missing")


@pytest.mark.realdata
def test_ml100k_5core_split_counts(ws, ml100k):
    """ML-100K 5-core: exactly 99,287 interactions, 943 users, 1,349 items."""
    ingest_ml100k(ws, ml100k)
    info = pipeline.build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    c = info["counts"]
    assert (c["rows"], c["users"], c["items"]) == (99_287, 943, 1_349)
    assert c["train"] + c["valid"] + c["test"] == c["rows"]


def test_step_runner_skips_unchanged_and_classifies_timeouts(ws):
    """run_step builds once per fingerprint (same inputs and params: skipped, nothing rebuilt; new inputs: built
    again), and a timeout inside a step's build comes out as a TransientError (retried by the flows)."""
    from stores.errors import TransientError
    from stores.steps import Step, fingerprint, run_step

    builds = []

    def build() -> tuple[str, int, dict]:
        builds.append(1)
        return "items", 0, {"note": "x"}

    first = run_step(ws, Step("step", "t", {"a": 1}, {"p": 2}, build, lambda _: True))
    again = run_step(ws, Step("step", "t", {"a": 1}, {"p": 2}, build, lambda _: True))
    moved = run_step(ws, Step("step", "t", {"a": 2}, {"p": 2}, build, lambda _: True))
    assert len(builds) == 2 and not first["skipped"] and again["skipped"] and not moved["skipped"]
    assert moved["fingerprint"] == fingerprint({"a": 2}, {"p": 2}) != first["fingerprint"]

    def slow() -> tuple[str, int, dict]:
        raise TimeoutError("read timed out")

    with pytest.raises(TransientError, match="read timed out"):
        run_step(ws, Step("step", "slow", {}, {}, slow))
