"""Erasure on ML-100K with posters, captions, image and text vectors, a split and graphs: the canary, the modality
forget and the CURE4Rec scenario. The checks decode every table at every remaining version themselves and look
for poster bytes with `bytes in`, independent of the erasure's own scan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recipes.unlearning.forget import forget
from recipes.unlearning.scenarios import ScenarioConfig, select, train_degrees
from recipes.unlearning.split import build_unlearning_split
from stores import artifacts
from stores.erasure.requests import ForgetRequest
from stores.erasure.verify import verify
from stores.features import CAPTIONS, feature_spec
from stores.workspace import Workspace
from tests.conftest import ingest_ml100k

pytestmark = pytest.mark.realdata
NOW = datetime(2024, 6, 1, tzinfo=UTC)
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


def _noise(key: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def add_features(ws: Workspace) -> None:
    """Image vectors from the poster bytes (a byte histogram), text vectors from the genres, captions from the
    posters: stand-ins for CLIP, a text encoder and a captioner with the same provenance columns."""
    images = ws.read("item_images", columns=["item_id", "image", "sha256"]).to_pylist()
    spec = feature_spec("clip_image", 32)
    rows = []
    for r in images:
        hist = np.bincount(np.frombuffer(r["image"], np.uint8) >> 3, minlength=32).astype(np.float32)
        vec = hist / hist.sum() + 0.01 * _noise(r["sha256"], 32)
        rows.append(
            {
                "item_id": r["item_id"],
                "vector": vec.tolist(),
                "model": "byte-hist",
                "revision": "1",
                "params": json.dumps({"modality": "image"}),
                "input_hash": r["sha256"],
                "created_at": NOW,
            }
        )
    ws.upsert(spec, pa.Table.from_pylist(rows, schema=spec.schema))
    items = ws.read("items", columns=["item_id", "title", "attributes"]).to_pylist()
    spec = feature_spec("text", 24)
    rows = []
    for r in items:
        genres = set(json.loads(r["attributes"])["genres"])
        vec = np.concatenate([[g in genres for g in GENRES], np.zeros(5)]).astype(np.float32)
        vec = vec + 0.05 * _noise(r["item_id"], 24)
        rows.append(
            {
                "item_id": r["item_id"],
                "vector": vec.tolist(),
                "model": "genres",
                "revision": "1",
                "params": json.dumps({"modality": "text"}),
                "input_hash": r["item_id"],
                "created_at": NOW,
            }
        )
    ws.upsert(spec, pa.Table.from_pylist(rows, schema=spec.schema))
    titles = {r["item_id"]: r["title"] for r in items}
    ws.upsert(
        CAPTIONS,
        pa.Table.from_pylist(
            [
                {
                    "item_id": r["item_id"],
                    "caption": f"poster of {titles[r['item_id']]} ({r['sha256'][:12]})",
                    "model": "stub",
                    "revision": "1",
                    "prompt": "describe the poster",
                    "params": "{}",
                    "input_hash": r["sha256"],
                    "created_at": NOW,
                }
                for r in images
            ],
            schema=CAPTIONS.schema,
        ),
    )


@pytest.fixture(scope="module")
def template(ml100k, tmp_path_factory) -> Path:
    from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
    from recipes.splits import SplitConfig

    path = tmp_path_factory.mktemp("ml100k") / "ws"
    ws = Workspace(path)
    ingest_ml100k(ws, ml100k)
    add_features(ws)
    build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    build_ui_graph(ws, "main", "sym", name="main_ui")
    build_knn_graph(ws, "main", ["clip_image"], k=10, name="main_knn_image")
    build_knn_graph(ws, "main", ["text"], k=10, name="main_knn_text")
    ws.dataset("feat_clip_image").create_index("vector", "IVF_HNSW_SQ", num_partitions=4, metric="cosine")
    pins = ws.versions()
    artifacts.record_artifact(
        ws,
        "snapshot",
        "trainer-2024-06",
        "split_main",
        pins["split_main"],
        {
            "split": "main",
            "features": ["clip_image", "text"],
            "graphs": ["main_ui"],
            "tables": {
                t: pins[t]
                for t in (
                    "interactions",
                    "items",
                    "split_main",
                    "graph_main_ui",
                    "feat_clip_image",
                    "feat_text",
                )
            },
        },
    )
    return path


@pytest.fixture
def ws(template, tmp_path) -> Workspace:
    shutil.copytree(template, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def poster_slices(ml100k: Path, item: str) -> list[bytes]:
    data = (ml100k / "posters" / f"{item}.jpg").read_bytes()
    mid = len(data) // 2
    return [data[mid - 160 : mid - 96], data[mid : mid + 64], data[mid + 96 : mid + 160]]


def files_holding(ws: Workspace, pieces: list[bytes]) -> list[str]:
    out = []
    for root, _, files in os.walk(ws.uri):
        for f in files:
            data = Path(root, f).read_bytes()
            if any(p in data for p in pieces):
                out.append(os.path.relpath(Path(root, f), ws.uri))
    return out


def leaks(ws: Workspace, user: str, item: str, vectors: list[bytes], captions: list[str]) -> list[str]:
    """Every (table, version, what) that still mentions the user or item, decoded version by version."""
    found = []
    for name in ws.table_names():
        for v in [x["version"] for x in ws.dataset(name).versions()]:
            t = ws.read(name, version=v)
            cols = t.column_names
            if "user_id" in cols and pc.sum(pc.equal(t["user_id"], user)).as_py():
                found.append((name, v, "user_id"))
            if "item_id" in cols and pc.sum(pc.equal(t["item_id"], item)).as_py():
                found.append((name, v, "item_id"))
            for side in ("src", "dst"):
                if side in cols:
                    for kind, key in (("user", user), ("item", item)):
                        hit = pc.and_(pc.equal(t[side], key), pc.equal(t[f"{side}_kind"], kind))
                        if pc.sum(hit).as_py():
                            found.append((name, v, f"{side} {kind}"))
            for col in ("record_key", "raw_excerpt", "detail"):
                for value in t[col].to_pylist() if col in cols else []:
                    if value and (
                        f'"user_id": "{user}"' in value
                        or f'"item_id": "{item}"' in value
                        or value in (user, item)
                        or value.startswith(f"{user}|")
                        or value.endswith(f"|{item}")
                    ):
                        found.append((name, v, col))
            if "vector" in cols and t.num_rows:
                flat = t["vector"].combine_chunks()
                dim = flat.type.list_size
                raw = flat.flatten().to_numpy().astype(np.float32).reshape(-1, dim)
                if any(raw[j].tobytes() in vectors for j in range(len(raw))):
                    found.append((name, v, "vector"))
            if "caption" in cols and set(t["caption"].to_pylist()) & set(captions):
                found.append((name, v, "caption"))
    return found


def test_canary_forget_user_1_and_item_50(ws, ml100k):
    """Forget user 1 and item 50: afterwards no row, vector, caption or edge of any remaining version mentions
    them, the raw bytes of every file hold no slice of poster 50 (which the same scan finds before), the
    receipts say verified, and re-ingesting the source brings neither back nor stores them, quarantine included."""
    slices = poster_slices(ml100k, "50")
    assert files_holding(ws, slices), "the raw scan must find poster 50 before erasure"
    vectors = [
        np.array(v, np.float32).tobytes()
        for t in ("feat_clip_image", "feat_text")
        for v in ws.read(t, where="item_id = '50'")["vector"].to_pylist()
    ]
    captions = ws.read("captions", where="item_id = '50'")["caption"].to_pylist()
    assert len(vectors) == 2 and len(captions) == 1 and leaks(ws, "1", "50", vectors, captions)
    r_user = forget(ws, ForgetRequest("canary-user-1", "user", users=("1",), reason="canary"))
    r_item = forget(ws, ForgetRequest("canary-item-50", "item", items=("50",), reason="canary"))
    assert r_user["verification"]["verified"] and r_item["verification"]["verified"]
    assert (
        r_item["found_before"]["raw_files_with_slices"] and r_item["verification"]["raw_scan"]["files"] > 100
    )
    assert {"interactions", "users", "split_main", "graph_main_ui"} <= set(r_user["erased_tables"])
    assert {"item_images", "feat_clip_image", "feat_text", "captions", "graph_main_knn_image"} <= set(
        r_item["erased_tables"]
    )
    assert [s["name"] for s in r_user["snapshots_invalidated"]] == ["trainer-2024-06"]
    assert leaks(ws, "1", "50", vectors, captions) == []
    assert files_holding(ws, slices) == []
    assert ws.count("users") == 942 and ws.count("items") == 1681

    inter = ws.count("interactions")
    report = ingest_ml100k(ws, ml100k)
    assert report.balanced
    assert ws.count("users") == 942 and ws.count("items") == 1681 and ws.count("interactions") == inter
    assert ws.count("item_images", "item_id = '50'") == 0
    forgotten = ws.read("quarantine", where="reason = 'forgotten'")
    assert forgotten.num_rows == 100_000 - inter + 2  # the rating rows, u.user line 1 and u.item line 50
    assert set(forgotten["record_key"].to_pylist()) == {None} and set(
        forgotten["raw_excerpt"].to_pylist()
    ) == {None}
    assert leaks(ws, "1", "50", vectors, captions) == []
    assert files_holding(ws, slices) == []
    assert verify(ws, "canary-user-1")["verified"] and verify(ws, "canary-item-50")["verified"]
    versions = ws.versions()
    again = forget(ws, ForgetRequest("canary-user-1", "user", users=("1",)))
    assert again["duplicate"] and ws.versions() == versions


def test_modality_forget_of_ten_posters(ws, ml100k):
    """Forget the images of 10 items: poster bytes, image vectors and image-derived captions go; their text vectors
    stay byte-identical; the image kNN graph has no edge touching them; the text graph is unchanged."""
    split_items = set(ws.read("split_main", columns=["item_id"])["item_id"].to_pylist())
    posters = set(ws.read("item_images", columns=["item_id"])["item_id"].to_pylist())
    ten = sorted(split_items & posters, key=int)[:10]
    slices = [s for i in ten for s in poster_slices(ml100k, i)]
    text_before = ws.read("feat_text").sort_by("item_id")
    text_graph = (ws.version("graph_main_knn_text"), ws.read("graph_main_knn_text"))
    assert files_holding(ws, slices)
    receipt = forget(ws, ForgetRequest("posters-10", "modality", modality="image", items=tuple(ten)))
    assert receipt["verification"]["verified"]
    where = f"item_id IN ({', '.join(repr(i) for i in ten)})"
    for table in ("item_images", "feat_clip_image", "captions"):
        assert ws.count(table, where) == 0
    assert ws.count("items", where) == 10 and ws.count("feat_text", where) == 10
    assert files_holding(ws, slices) == []
    text_after = ws.read("feat_text").sort_by("item_id")
    assert text_after["vector"].combine_chunks().flatten().to_numpy().tobytes() == (
        text_before["vector"].combine_chunks().flatten().to_numpy().tobytes()
    )
    assert ws.version("graph_main_knn_text") == text_graph[0] and ws.read("graph_main_knn_text").equals(
        text_graph[1]
    )
    edges = ws.read("graph_main_knn_image")
    touching = pc.or_(pc.is_in(edges["src"], pa.array(ten)), pc.is_in(edges["dst"], pa.array(ten)))
    assert pc.sum(touching).as_py() == 0 and edges.num_rows > 0
    assert receipt["artifacts"]["graphs"]["main_knn_image"]["action"].startswith("patched")


def test_cure4rec_most_active_5_percent(ws):
    """CURE4Rec on ML-100K 5-core, seed 42, 5% most active users: 47 users whose train degrees are the 47
    largest, and every one of their interactions is in the forget set."""
    split = artifacts.load_split(ws, "main")
    cfg = ScenarioConfig("cure4rec", percent=5, seed=42, mode="most_active")
    sel = select(split, cfg)
    users, degrees = train_degrees(split)
    assert len(users) == 943 and len(sel.users) == 47
    chosen = np.isin(users, sel.users)
    assert degrees[chosen].min() >= degrees[~chosen].max()
    assert sorted(degrees[chosen].tolist()) == sorted(degrees.tolist())[-47:]
    out = build_unlearning_split(ws, "main", cfg, "cure_core5")
    forget_rows = artifacts.load_split(ws, "cure_core5_forget")
    theirs = split.filter(pc.is_in(split["user_id"], pa.array(sel.users)))
    assert forget_rows.num_rows == theirs.num_rows and set(forget_rows["user_id"].to_pylist()) == set(
        sel.users
    )
    gold = artifacts.load_split(ws, "cure_core5_gold")
    assert not set(gold["user_id"].to_pylist()) & set(sel.users)
    assert out["gold"]["counts_unlearning"]["forget_users"] == 47
