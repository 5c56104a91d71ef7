"""kNN past one process: the faiss ANN path (recall@10 measured on a sample, recorded in the manifest, same mask
and normalisation as exact) and the exact path over Ray actors by query block (identical to one process)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from extractors.knn_actors import ray_map_blocks
from flows.cli import cli
from recipes import pipeline
from recipes.graphs.knn import KnnConfig, knn_edges, knn_graph, knn_topk
from recipes.graphs.knn_ann import AnnConfig, AnnSearch
from recipes.splits import SplitConfig
from stores import artifacts
from stores.features import feature_spec
from stores.ids import id_maps
from stores.workspace import conform
from tests.conftest import JOIN_TWO_NODES, run_driver
from tests.test_ray_multinode import two_node_cluster  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _demo_split(ws, tmp_path) -> list[str]:
    """A 60-item demo catalogue with a random split; the split's item ids."""
    from recipes.ingest.demo_data import generate_catalog
    from recipes.ingest.load import ingest
    from recipes.ingest.sources import table

    cat = generate_catalog(tmp_path / "src", n_items=60, n_users=30, seed=1)
    ingest(ws, table(cat.items, cat.interactions, cat.users, cat.images))
    pipeline.build_split(ws, "s", SplitConfig(scheme="random", kcore=2, seed=3))
    return list(id_maps(artifacts.load_split(ws, "s"))[1])


def _write_feature(ws, name: str, items: list[str], dim: int = 8) -> None:
    spec = feature_spec(name, dim)
    vecs = _vectors(len(items), dim, seed=5)
    data = pa.table(
        {
            "item_id": items,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
            "model": ["random"] * len(items),
            "revision": ["untrained"] * len(items),
            "input_hash": [f"5:{i}" for i in items],
        }
    )
    ws.upsert(spec, conform(data, spec.schema))


@pytest.mark.parametrize("index", ["ivf_flat", "hnsw"])
def test_ann_recall_at_20k_and_same_policy_as_exact(index):
    """At 20k x 32 (random: the hard case for ANN) the ANN graph's recall@10 on a 1,000-row sample is >= 0.95,
    and its recall on every row agrees; it keeps FREEDOM's 1/k weights, gives absent items no edge in or out,
    and with self_loops=False never picks the item itself."""
    x = _vectors(20_000, 32)
    present = np.ones(len(x), bool)
    present[::7] = False
    cfg = KnnConfig(k=10, norm="freedom", self_loops=False)
    search = AnnSearch(AnnConfig(index=index))
    approx = knn_edges(x, cfg, present, search=search)
    exact = knn_edges(x, cfg, present)
    info = search.info
    assert info["index"] == index and info["sample"] == 1000 and info["recall_at_10"] >= 0.95
    src, dst = approx["src"].to_numpy(), approx["dst"].to_numpy()
    full = np.isin(src * len(x) + dst, exact["src"].to_numpy() * len(x) + exact["dst"].to_numpy()).mean()
    assert full >= 0.95 and abs(full - info["recall_at_10"]) < 0.02
    assert present[src].all() and present[dst].all() and (src != dst).all()
    assert np.allclose(approx["weight"].to_numpy(), 1 / 10)
    assert approx.num_rows == present.sum() * 10


def test_ann_graph_manifest_records_recall_and_missing_policy(ws, tmp_path):
    """`mmfeat graph knn --method ann` stores the graph with `ann: {index, params, recall_at_10, sample}` in its
    manifest, items lacking the feature have no edges, and LATTICE weights equal the exact graph's wherever the
    neighbours agree (here all: 60 items); --method auto below the threshold builds the exact graph."""
    items = _demo_split(ws, tmp_path)
    _write_feature(ws, "img", items[:45])
    run = CliRunner().invoke(
        cli,
        ["--workspace", str(tmp_path / "ws"), "graph", "knn", "--split", "s", "--feature", "img", "-k", "5"]
        + ["--norm", "lattice", "--method", "ann", "--name", "g_ann"],
    )
    assert run.exit_code == 0, run.output
    manifest = artifacts.manifest(ws, "graph", "g_ann")
    ann = manifest["ann"]
    assert ann["index"] == "ivf_flat" and ann["recall_at_5"] == 1.0 and ann["sample"] == 45
    assert {"nlist", "nprobe"} <= set(ann["params"]) and manifest["missing"]["img"] == 15
    approx, _ = artifacts.load_graph(ws, "g_ann")
    exact = pipeline.build_knn_graph(ws, "s", ["img"], k=5, norm="lattice", method="auto", name="g_auto")
    assert "ann" not in artifacts.manifest(ws, "graph", exact["name"])
    ref, _ = artifacts.load_graph(ws, exact["name"])
    assert np.allclose(approx.toarray(), ref.toarray(), atol=1e-6)
    assert approx[45:].nnz == 0 and approx[:, 45:].nnz == 0 and approx[:45].nnz == 45 * 5


def test_missing_faiss_is_one_line_naming_the_install(monkeypatch):
    """Without faiss the ANN search fails with one line that names `pip install faiss-cpu`."""
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu") as err:
        AnnSearch()(_vectors(50, 4), 5, False)
    assert "\n" not in str(err.value)


def test_exact_knn_on_ray_actors_equals_one_process(ray_local, ws, tmp_path):
    """The exact top-k over a pool of Ray actors (2 CPUs), block by block, is bit-identical to the single-process
    top-k, with and without the item itself; a stored graph built with engine="ray" equals the local one."""
    x = _vectors(3000, 16)
    for exclude in (False, True):
        local = knn_topk(x, 10, exclude_self=exclude, block_rows=256)
        remote = knn_topk(x, 10, exclude_self=exclude, block_rows=256, map_blocks=ray_map_blocks)
        assert np.array_equal(local[0], remote[0]) and np.array_equal(local[1], remote[1])
    items = _demo_split(ws, tmp_path)
    _write_feature(ws, "img", items[:50])
    on_ray = pipeline.build_knn_graph(ws, "s", ["img"], k=5, engine="ray", name="g_ray")
    mat, mask, _ = artifacts.feature_matrix(ws, "img", items)
    local = knn_graph(mat, KnnConfig(k=5), mask)
    assert on_ray["name"] == "g_ray"
    stored, _ = artifacts.load_graph(ws, "g_ray")
    assert (stored != local).nnz == 0


DRIVER = (
    JOIN_TWO_NODES
    + """
from extractors.knn_actors import ray_map_blocks
from recipes.graphs.knn import knn_topk
x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
local = knn_topk(x, 10, block_rows=128)
remote = knn_topk(x, 10, block_rows=128, map_blocks=ray_map_blocks)
print("RESULT " + json.dumps({"equal": bool(np.array_equal(local[0], remote[0]) and
      np.array_equal(local[1], remote[1])), "nodes": sum(n["Alive"] for n in ray.nodes())}), flush=True)
"""
)


@pytest.mark.slow
def test_exact_knn_on_a_two_node_cluster_equals_one_process(two_node_cluster):  # noqa: F811
    """A driver joining a real two-node Ray cluster through RAY_ADDRESS gets the same exact top-k from the actor
    pool (one actor per node's CPU) as from one process."""
    address, _ = two_node_cluster
    assert run_driver(address, DRIVER) == {"equal": True, "nodes": 2}
