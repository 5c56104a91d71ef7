"""End to end on ML-100K: ingest, 5-core split, MiniLM title+overview vectors, tiny-CLIP poster vectors, user-item
and fused kNN graphs, a snapshot, and the example FREEDOM-style model beating popularity by >= 20% recall@20.

The full-length figures (and MF-BPR) are in BENCHMARKS.md; here fewer epochs keep CI within a few minutes.
"""

from __future__ import annotations

import pytest

from tests.conftest import ingest_ml100k

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def build_ml100k_snapshot(ws, root, name: str = "ml100k") -> dict:
    """The workspace BENCHMARKS.md's training figures use, built through the platform's own code paths:
    `mmfeat ingest movielens`, `split --kcore 5 --seed 42`, `encode text` (packaged MiniLM over "title. overview"),
    `encode image` (tiny untrained CLIP), `graph user-item`, `graph knn` (text 0.9 + image 0.1, k=10, FREEDOM norm)."""
    from extractors.clip import TINY_CLIP, ClipImageEncoder
    from extractors.runner import ExtractorSpec, run_extraction
    from extractors.text import TextEncoder
    from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
    from recipes.splits import SplitConfig
    from stores.snapshots import create_snapshot

    ingest_ml100k(ws, root)
    build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    build_ui_graph(ws, "main", "sym", name="main_ui")
    run_extraction(ws, "text", ExtractorSpec(TextEncoder, {}), source="text", engine="local", progress=False)
    run_extraction(
        ws,
        "clip_image",
        ExtractorSpec(ClipImageEncoder, {"model": TINY_CLIP}),
        source="image",
        engine="local",
        progress=False,
    )
    build_knn_graph(ws, "main", ["text", "clip_image"], k=10, weights=[0.9, 0.1], name="main_knn")
    return create_snapshot(ws, name, "main", ["text", "clip_image"], ["main_ui", "main_knn"])


@pytest.fixture(scope="module")
def ml100k_reader(ml100k, tmp_path_factory):
    from stores.reader import FeatureReader
    from stores.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("ml100k") / "ws")
    build_ml100k_snapshot(ws, ml100k)
    return FeatureReader(ws, "ml100k")


def test_snapshot_covers_ml100k_5core(ml100k_reader):
    """The snapshot serves the 5-core's 943 users and 1,349 items, text vectors for every item with an overview
    and poster vectors for every item with a poster, and graphs over exactly those nodes."""
    r = ml100k_reader
    assert (r.n_users, r.n_items) == (943, 1349)
    assert sum(len(r.interactions(p)) for p in ("train", "valid", "test")) == 99287
    text, has_text = r.feature("text")
    image, has_image = r.feature("clip_image")
    assert text.shape == (1349, 384) and has_text.sum() >= 1340
    assert image.shape[0] == 1349 and has_image.sum() >= 1340
    assert r.graph("main_ui").shape == (943 + 1349,) * 2
    assert r.graph("main_knn").shape == (1349, 1349)


def test_freedom_beats_popularity_on_ml100k(ml100k_reader):
    """Trained briefly (12 epochs), the FREEDOM-style model over the snapshot's graphs and features reaches at least
    1.2x the popularity baseline's test recall@20 under MMRec's all-ranking protocol."""
    from recipes.train_example import TrainConfig, compare

    cfg = TrainConfig(models=("popularity", "freedom"), epochs=12, eval_every=4, lr=5e-3)
    results = compare(ml100k_reader, cfg)
    pop, model = results["popularity"]["recall@20"], results["freedom"]["recall@20"]
    print(f"\nrecall@20 popularity {pop:.4f} freedom {model:.4f} ({model / pop - 1:+.0%})")
    assert pop > 0.1, (
        "popularity on ML-100K 5-core finds about one test item in six; less means broken evaluation"
    )
    assert model >= 1.2 * pop
    assert results["freedom"]["ndcg@20"] > results["popularity"]["ndcg@20"]
