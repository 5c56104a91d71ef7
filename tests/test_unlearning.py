"""Forget requests, erasure and unlearning splits on a small synthetic workspace built in code.

The checks here do not trust the erasure's own scan: they decode every table at every remaining version with
`Workspace.read`, look for raw bytes with `bytes in`, and rebuild graphs from scratch to compare.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp

from recipes.graphs.knn import KnnConfig, knn_edges
from recipes.splits import TRAIN
from recipes.unlearning.forget import forget
from recipes.unlearning.patch import edges_matrix, knn_patch, knn_retained
from recipes.unlearning.scenarios import ScenarioConfig, forget_retain, select, train_degrees
from recipes.unlearning.split import build_unlearning_split
from stores import artifacts
from stores.erasure.keys import workspace_secret
from stores.erasure.log import FORGET_REQUESTS, logged
from stores.erasure.requests import ForgetRequest, interaction_mask, resolve
from stores.erasure.targets import image_slices
from stores.erasure.verify import verify
from stores.features import CAPTIONS, FAILURES, feature_spec
from stores.schema import INTERACTIONS, ITEM_IMAGES, ITEMS, QUARANTINE, USERS, key_hash
from stores.workspace import Workspace

NOW = datetime(2024, 1, 1, tzinfo=UTC)
N_USERS, N_ITEMS, DIM = 12, 24, 8


USER_IDS = [f"u{j:02d}" for j in range(N_USERS)]
ITEM_IDS = [f"i{j:02d}" for j in range(N_ITEMS)]


def build_workspace(ws: Workspace, seed: int = 0) -> None:
    """Items with images, users, interactions, image and text vectors, captions, failures, quarantine rows,
    a split, a user-item graph and image, text and fused kNN graphs, a vector index and a scalar index."""
    from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
    from recipes.splits import SplitConfig

    rng = np.random.default_rng(seed)
    genres = ["Horror", "Comedy", "Drama"]
    ws.upsert(
        ITEMS,
        pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "title": f"title {i}",
                    "text": f"overview of {i}",
                    "source": "syn",
                    "attributes": json.dumps({"genres": [genres[j % 3]]}),
                    "rights": "syn;tmdb" if j % 4 == 0 else "syn",
                    "content_hash": i,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for j, i in enumerate(ITEM_IDS)
            ],
            schema=ITEMS.schema,
        ),
    )
    images = {i: bytes(rng.integers(0, 256, 1500, dtype=np.uint8)) for i in ITEM_IDS}
    ws.upsert(
        ITEM_IMAGES,
        pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "sha256": hashlib.sha256(b).hexdigest(),
                    "format": "jpeg",
                    "width": 8,
                    "height": 8,
                    "image": b,
                    "source": "syn",
                    "created_at": NOW,
                }
                for i, b in images.items()
            ],
            schema=ITEM_IMAGES.schema,
        ),
    )
    ws.upsert(
        USERS,
        pa.Table.from_pylist(
            [{"user_id": u, "attributes": "{}", "source": "syn", "created_at": NOW} for u in USER_IDS],
            schema=USERS.schema,
        ),
    )
    rows = [
        {
            "user_id": u,
            "item_id": ITEM_IDS[j],
            "timestamp": NOW - timedelta(days=int(rng.integers(0, 400))),
            "event": "rating",
            "seq": 0,
            "value": float(rng.integers(1, 6)),
            "source": "syn",
        }
        for u in USER_IDS
        for j in rng.choice(N_ITEMS, 10, replace=False)
    ]
    ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))
    for name, modality in (("clip_image", "image"), ("text", "text")):
        spec, vec = feature_spec(name, DIM), rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
        ws.upsert(
            spec,
            pa.Table.from_pylist(
                [
                    {
                        "item_id": i,
                        "vector": vec[j].tolist(),
                        "model": "m",
                        "revision": "r",
                        "input_hash": f"{name}{i}",
                        "params": json.dumps({"modality": modality}),
                        "created_at": NOW,
                    }
                    for j, i in enumerate(ITEM_IDS)
                ],
                schema=spec.schema,
            ),
        )
    ws.upsert(
        CAPTIONS,
        pa.Table.from_pylist(
            [
                {
                    "item_id": i,
                    "caption": f"a poster of {i}, tone {rng.integers(10**6)}",
                    "model": "m",
                    "revision": "r",
                    "prompt": "describe",
                    "params": "{}",
                    "input_hash": f"c{i}",
                    "created_at": NOW,
                }
                for i in ITEM_IDS
            ],
            schema=CAPTIONS.schema,
        ),
    )
    ws.upsert(
        FAILURES,
        pa.Table.from_pylist(
            [
                {
                    "feature": f,
                    "item_id": "i01",
                    "input_hash": f,
                    "reason": "bad",
                    "detail": "",
                    "created_at": NOW,
                }
                for f in ("clip_image", "text")
            ],
            schema=FAILURES.schema,
        ),
    )
    ws.upsert(
        QUARANTINE,
        pa.Table.from_pylist(
            [
                {
                    "quarantine_id": f"q{u}",
                    "source": "syn",
                    "file": "inter.csv:3",
                    "record_key": f"{u}|{i}",
                    "reason": "bad_value",
                    "detail": "value is not a number",
                    "raw_excerpt": json.dumps({"user_id": u, "item_id": i}),
                    "created_at": NOW,
                }
                for u, i in (("u00", "i00"), ("u05", "i07"))
            ],
            schema=QUARANTINE.schema,
        ),
    )
    build_split(ws, "main", SplitConfig(scheme="random", seed=1))
    build_ui_graph(ws, "main", "sym", name="ui")
    build_knn_graph(ws, "main", ["clip_image"], k=3, name="knn_image")
    build_knn_graph(ws, "main", ["text"], k=3, name="knn_text")
    build_knn_graph(ws, "main", ["clip_image", "text"], k=3, weights=[0.1, 0.9], name="knn_fused")
    ws.dataset("feat_clip_image").create_index("vector", "IVF_FLAT", num_partitions=2, metric="cosine")
    ws.dataset("interactions").create_scalar_index("user_id", "BTREE")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "ws"
    build_workspace(Workspace(path))
    return path


@pytest.fixture
def sws(template, tmp_path) -> Workspace:
    """A fresh copy of the synthetic workspace."""
    shutil.copytree(template, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


# ---- independent checks ------------------------------------------------------------------------------------


def every_version(ws: Workspace):
    """(table, version, decoded rows) for every remaining version of every table."""
    for name in ws.table_names():
        for v in ws.dataset(name).versions():
            yield name, v["version"], ws.read(name, version=v["version"])


def mentions_id(table: pa.Table, kind: str, key: str) -> int:
    n = 0
    if f"{kind}_id" in table.column_names:
        n += pc.sum(pc.equal(table[f"{kind}_id"], key)).as_py() or 0
    for side in ("src", "dst"):
        if side in table.column_names:
            hit = pc.and_(pc.equal(table[side], key), pc.equal(table[f"{side}_kind"], kind))
            n += pc.sum(hit).as_py() or 0
    for col in ("record_key", "raw_excerpt"):
        if col in table.column_names:
            n += sum(
                1
                for v in table[col].to_pylist()
                if v and (key in v.split("|") or f'"{kind}_id": "{key}"' in v)
            )
    return n


def files_holding(ws: Workspace, pieces: list[bytes]) -> list[str]:
    out = []
    for root, _, files in os.walk(ws.uri):
        for f in files:
            data = Path(root, f).read_bytes()
            if any(p in data for p in pieces):
                out.append(os.path.relpath(Path(root, f), ws.uri))
    return out


def graph_edges(ws: Workspace, name: str) -> set[tuple[str, str]]:
    t = ws.read(f"graph_{name}")
    return set(zip(t["src"].to_pylist(), t["dst"].to_pylist(), strict=True))


# ---- requests --------------------------------------------------------------------------------------------------


def test_request_validation_names_the_problem():
    """A request missing its fields, carrying fields of another kind, or with a naive time is refused clearly."""
    with pytest.raises(ValueError, match="needs \\['users'\\]"):
        ForgetRequest("r", "user")
    with pytest.raises(ValueError, match="do not apply"):
        ForgetRequest("r", "user", users=("1",), items=("2",))
    with pytest.raises(ValueError, match="timezone-aware"):
        ForgetRequest("r", "before", before=datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="supported"):
        ForgetRequest("r", "modality", modality="audio", items=("1",))
    with pytest.raises(ValueError, match="not allowed"):
        ForgetRequest("it's", "user", users=("1",))
    with pytest.raises(ValueError, match="unknown ScenarioConfig"):
        ScenarioConfig(**{"scenario": "cure4rec", "pct": 5})


def test_forget_user_reaches_every_table_and_version(sws):
    """After forgetting a user no row, edge, quarantine key or excerpt of any remaining version names it; every
    erased table keeps one version with no deletion file and no unreferenced file; the log holds no raw id."""
    before = {n: sws.count(n) for n in ("interactions", "users")}
    receipt = forget(sws, ForgetRequest("gdpr-1", "user", users=("u00",), reason="art. 17", requester="dpo"))
    assert receipt["verification"]["verified"], receipt["verification"]
    assert receipt["found_before"]["tables"]["interactions"]["rows"] == 10
    assert receipt["removed"]["users"] == 1 and receipt["removed"]["quarantine"] == 1
    assert (
        sws.count("interactions") == before["interactions"] - 10 and sws.count("users") == before["users"] - 1
    )
    for name, version, rows in every_version(sws):
        assert mentions_id(rows, "user", "u00") == 0, (name, version)
    for name in receipt["erased_tables"]:
        ds = sws.dataset(name)
        assert [v["version"] for v in ds.versions()] == [ds.version]
        assert all(f.metadata.deletion_file is None for f in ds.get_fragments())
        tracked = set(ds.tracked_files().read_all()["path"].to_pylist())
        assert set(ds.all_files().read_all()["path"].to_pylist()) - tracked <= {
            "_versions/latest_version_hint.json"
        }
    assert "user_id_idx (BTree) rebuilt" in receipt["physical"]["interactions"]["indices"]
    assert sws.read("deny_list")["key_hash"].to_pylist() == [key_hash(workspace_secret(sws), "user", "u00")]
    log = sws.read(FORGET_REQUESTS.name).to_pylist()[0]
    assert "u00" not in log["params"] + log["receipt"] and log["reason"] == "art. 17"
    # the user-item graph is what a rebuild from the retained split gives
    from recipes.graphs.user_item import ui_adjacency

    mat, _ = artifacts.load_graph(sws, "ui")
    ref = ui_adjacency(artifacts.load_split(sws, "main"), "sym")
    assert abs(mat - ref).max() < 1e-6 and mat.nnz == ref.nnz
    assert receipt["artifacts"]["graphs"]["ui"]["action"].startswith("patched")
    from recipes.pipeline import build_ui_graph

    build_ui_graph(sws, "main", "sym", name="ui_rebuilt")  # the patch is the rebuild, row for row
    assert sws.read("graph_ui").equals(sws.read("graph_ui_rebuilt"))
    assert receipt["artifacts"]["graphs"]["knn_image"]["action"].startswith("unchanged")


def test_forget_item_removes_content_bytes_vectors_captions_and_reindexes(sws):
    """Forgetting an item removes its rows, vectors, caption and image everywhere: the raw byte scan finds the
    image slices before and not after; the vector index is rebuilt; the image kNN graph equals a rebuild
    without the item."""
    image = sws.read("item_images", where="item_id = 'i03'")["image"][0].as_py()
    vec = np.array(sws.read("feat_clip_image", where="item_id = 'i03'")["vector"][0].as_py(), np.float32)
    caption = sws.read("captions", where="item_id = 'i03'")["caption"][0].as_py()
    old_index = {i["name"]: i["uuid"] for i in sws.dataset("feat_clip_image").list_indices()}
    assert files_holding(sws, image_slices(image))  # the scan can fail: it finds the image before erasure
    receipt = forget(sws, ForgetRequest("lic-7", "item", items=("i03",)))
    assert receipt["verification"]["verified"] and receipt["found_before"]["raw_files_with_slices"]
    assert files_holding(sws, image_slices(image) + [vec.tobytes()]) == []
    for name, version, rows in every_version(sws):
        assert mentions_id(rows, "item", "i03") == 0, (name, version)
        if "vector" in rows.column_names:
            flat = rows["vector"].combine_chunks().flatten().to_numpy().reshape(-1, DIM)
            assert not (flat == vec).all(axis=1).any(), name
        if "caption" in rows.column_names:
            assert caption not in rows["caption"].to_pylist()
    new_index = {
        i["name"]: (i["uuid"], i["fragment_ids"]) for i in sws.dataset("feat_clip_image").list_indices()
    }
    assert new_index["vector_idx"][0] != old_index["vector_idx"]
    assert set(new_index["vector_idx"][1]) == {
        f.fragment_id for f in sws.dataset("feat_clip_image").get_fragments()
    }
    mat, nodes = artifacts.load_graph(sws, "knn_image")
    feats, _, _ = artifacts.feature_matrix(sws, "clip_image", nodes)
    src, dst, w = knn_retained(feats, np.ones(len(nodes), bool), KnnConfig(k=3))
    assert "i03" not in nodes.tolist() and abs(mat - edges_matrix(src, dst, w, len(nodes))).max() < 1e-6


def test_one_deleted_row_rewrites_its_fragment_only(tmp_path):
    """A full-size fragment holding one deleted row is rewritten (Lance's default threshold would keep it, deleted
    row and all), while full-size fragments without deleted rows keep their data files; `forget` leaves no
    deletion file either."""
    from stores.erasure.physical import compact

    ws = Workspace(tmp_path / "ws")
    for part in range(3):
        rows = [
            {
                "user_id": f"p{part}u{j}",
                "item_id": f"x{j}",
                "timestamp": NOW,
                "event": "e",
                "seq": 0,
                "value": 1.0,
                "source": "s",
            }
            for j in range(2000)
        ]
        ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))
    shutil.copytree(ws.uri, tmp_path / "default")
    files = {f.fragment_id: f.data_files()[0].path for f in ws.dataset("interactions").get_fragments()}
    for root in (ws, Workspace(tmp_path / "default")):
        root.open("interactions").delete("user_id = 'p1u7'")
    lance_default = Workspace(tmp_path / "default").dataset("interactions")
    lance_default.optimize.compact_files(materialize_deletions=True, target_rows_per_fragment=2000)
    assert any(
        f.metadata.deletion_file is not None
        for f in Workspace(tmp_path / "default").dataset("interactions").get_fragments()
    )
    compact(ws, "interactions", target_rows_per_fragment=2000)
    ds = ws.dataset("interactions")
    after = {f.data_files()[0].path for f in ds.get_fragments()}
    assert files[0] in after and files[2] in after and files[1] not in after
    assert all(f.metadata.deletion_file is None for f in ds.get_fragments()) and ds.count_rows() == 5999
    receipt = forget(ws, ForgetRequest("one", "user", users=("p2u9",)))
    assert receipt["removed"] == {"interactions": 1} and receipt["verification"]["verified"]
    assert all(f.metadata.deletion_file is None for f in ws.dataset("interactions").get_fragments())


def test_modality_forget_keeps_text(sws):
    """Forgetting the images of items removes image bytes, image vectors, captions and image-graph edges; text
    vectors stay byte-identical and the text graph is untouched; a text failure row stays, the image one goes."""
    gone = ("i01", "i04", "i05")
    text_before = sws.read("feat_text").sort_by("item_id")
    text_graph = (sws.version("graph_knn_text"), graph_edges(sws, "knn_text"))
    receipt = forget(sws, ForgetRequest("img-1", "modality", modality="image", items=gone))
    assert receipt["verification"]["verified"]
    for table in ("item_images", "feat_clip_image", "captions"):
        assert sws.count(table, "item_id IN ('i01', 'i04', 'i05')") == 0
    assert sws.count("items", "item_id IN ('i01', 'i04', 'i05')") == 3
    text_after = sws.read("feat_text").sort_by("item_id")
    assert text_after["vector"].combine_chunks().flatten().to_numpy().tobytes() == (
        text_before["vector"].combine_chunks().flatten().to_numpy().tobytes()
    )
    assert (sws.version("graph_knn_text"), graph_edges(sws, "knn_text")) == text_graph
    assert not {n for e in graph_edges(sws, "knn_image") for n in e} & set(gone)
    assert sws.read("extract_failures")["feature"].to_pylist() == ["text"]
    fused = {n for e in graph_edges(sws, "knn_fused") for n in e}
    assert set(gone) <= fused  # the fused graph still links them through their text vectors


def test_pairs_before_and_attribute_requests(sws):
    """Pair requests remove exactly those interactions, before-time requests every older one (in the split
    too), attribute requests whole items whose rights tag matches."""
    inter = sws.read("interactions")
    u, i = inter["user_id"][0].as_py(), inter["item_id"][0].as_py()
    n_pair = sws.count("interactions", f"user_id = '{u}' AND item_id = '{i}'")
    total = sws.count("interactions")
    r = forget(sws, ForgetRequest("p1", "interactions", pairs=((u, i),)))
    assert r["verification"]["verified"] and sws.count("interactions") == total - n_pair
    cut = NOW - timedelta(days=200)
    r = forget(sws, ForgetRequest("b1", "before", before=cut))
    assert r["verification"]["verified"] and r["removed"]["interactions"] > 0
    for table in ("interactions", "split_main"):
        assert pc.min(sws.read(table)["timestamp"]).as_py() >= cut
    r = forget(sws, ForgetRequest("a1", "attribute", attribute="rights", value="tmdb"))
    assert r["scope"]["items"] == 6 and r["verification"]["verified"]
    assert sws.count("items") == N_ITEMS - 6 and sws.count("item_images") == N_ITEMS - 6


def test_same_request_id_does_the_work_once(sws):
    """Submitting a request id again returns the logged receipt and writes nothing."""
    first = forget(sws, ForgetRequest("dup", "item", items=("i02",)))
    versions = sws.versions()
    second = forget(sws, ForgetRequest("dup", "item", items=("i02",)))
    assert second["duplicate"] and not first["duplicate"] and sws.versions() == versions
    assert second["removed"] == first["removed"] and sws.count(FORGET_REQUESTS.name) == 1


def test_snapshots_pinning_forgotten_data_are_reported(sws):
    """A snapshot pinning a version that held the forgotten user is listed as invalidated, and that version is
    gone, so the snapshot cannot serve the data."""
    pins = {
        "interactions": sws.version("interactions"),
        "split_main": sws.version("split_main"),
        "feat_text": sws.version("feat_text"),
    }
    artifacts.record_artifact(
        sws,
        "snapshot",
        "trainer-v1",
        "split_main",
        pins["split_main"],
        {"split": "main", "features": ["text"], "graphs": [], "tables": pins},
    )
    receipt = forget(sws, ForgetRequest("s1", "user", users=("u03",)))
    [snap] = receipt["snapshots_invalidated"]
    assert snap["name"] == "trainer-v1" and set(snap["pinned_versions_with_forgotten_data"]) == {
        "interactions",
        "split_main",
    }
    have = {v["version"] for v in sws.dataset("interactions").versions()}
    assert pins["interactions"] not in have and receipt["snapshots_note"]


def test_reingest_is_refused_and_stores_nothing(sws):
    """Re-ingesting a source that still holds a forgotten user and item quarantines those rows as `forgotten`
    without the key or an excerpt, and the verification stays clean."""
    from recipes.ingest.load import ingest
    from recipes.ingest.records import RawSource
    from stores.erasure.keys import deny_list

    forget(sws, ForgetRequest("f-u", "user", users=("u02",)))
    assert deny_list(sws).has("user", "u02")  # one deny-list naming on both sides
    forget(sws, ForgetRequest("f-i", "item", items=("i09",)))
    src = RawSource(
        "again",
        derive_items=False,
        items=pa.table(
            {"item_id": ["i09", "new1"], "title": ["t", "n"], "__file": ["items.csv"] * 2, "__line": [1, 2]}
        ),
        users=pa.table({"user_id": ["u02", "n2"], "__file": ["users.csv"] * 2, "__line": [1, 2]}),
        interactions=pa.table(
            {
                "user_id": ["u02", "n2", "n2"],
                "item_id": ["i00", "i09", "new1"],
                "timestamp": ["1700000000"] * 3,
                "__file": ["inter.csv"] * 3,
                "__line": [1, 2, 3],
            }
        ),
    )
    report = ingest(sws, src)
    assert report.balanced
    assert sws.count("users", "user_id = 'u02'") == 0 and sws.count("items", "item_id = 'i09'") == 0
    assert sws.count("interactions", "user_id = 'u02' OR item_id = 'i09'") == 0
    q = sws.read("quarantine", where="reason = 'forgotten'")
    assert (
        q.num_rows == 4
        and set(q["record_key"].to_pylist()) == {None}
        and set(q["raw_excerpt"].to_pylist()) == {None}
    )
    assert verify(sws, "f-u")["verified"] and verify(sws, "f-i")["verified"]


def test_verify_finds_leftovers(sws):
    """The verifier is not vacuous: a stray file holding image bytes, or a logically deleted row still in a data
    file, fails it; a forget request removes temp files of the workspace root."""
    image = sws.read("item_images", where="item_id = 'i06'")["image"][0].as_py()
    forget(sws, ForgetRequest("v1", "item", items=("i06",)))
    assert verify(sws, "v1")["verified"]
    stray = Path(sws.uri, "exports", "copy.bin")
    stray.parent.mkdir()
    stray.write_bytes(b"head" + image + b"tail")
    result = verify(sws, "v1")
    assert not result["verified"] and any("exports/copy.bin" in p for p in result["problems"])
    stray.unlink()
    rows = [
        {"item_id": i, "title": "back", "content_hash": "x", "created_at": NOW, "updated_at": NOW}
        for i in ("i06", "new")
    ]
    sws.upsert(ITEMS, pa.Table.from_pylist(rows, schema=ITEMS.schema))
    sws.open("items").delete("item_id = 'i06'")  # logical: the row stays in the data file
    result = verify(sws, "v1")
    assert not result["verified"] and any(p.startswith("items: 1 row(s)") for p in result["problems"])
    assert any("transaction" in p for p in result["problems"])  # the delete predicate names the key
    temp = Path(sws.uri, "tmp", "spill.bin")
    temp.parent.mkdir()
    temp.write_bytes(image)
    receipt = forget(sws, ForgetRequest("v2", "item", items=("i06",)))
    assert receipt["physical"]["_temp_files_removed"] == ["tmp/spill.bin"] and verify(sws, "v1")["verified"]


# ---- retained kNN graphs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["freedom", "lattice", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("self_loops", [True, False])
def test_knn_patch_equals_full_rebuild(norm, symmetric, self_loops):
    """Patching a kNN graph after removing items gives the graph rebuilt on the retained items, recomputing
    only the rows that lost a neighbour."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((80, 12)).astype(np.float32)
    cfg = KnnConfig(k=5, norm=norm, symmetric=symmetric, self_loops=self_loops)
    old = knn_edges(x, cfg)
    keep = np.ones(80, bool)
    keep[[3, 17, 40, 41, 79]] = False
    src, dst, w, redone = knn_patch(old["src"].to_numpy(), old["dst"].to_numpy(), x, keep, cfg)
    ref = edges_matrix(*knn_retained(x, keep, cfg), 80)
    got = edges_matrix(src, dst, w, 80)
    assert (got != 0).sum() == (ref != 0).sum() and abs(got - ref).max() < 1e-5
    assert set(zip(*sp.find(got)[:2], strict=True)) == set(zip(*sp.find(ref)[:2], strict=True))
    assert 0 < redone < 40 and not got[~keep].nnz and not got[:, ~keep].nnz


# ---- scenarios and unlearning splits --------------------------------------------------------------------------


def test_cure4rec_selection_rules(sws):
    """CURE4Rec: int(n * p / 100) users; most/least active are the degree extremes; random is
    RandomState(seed).choice over users ordered by degree; with parts=all every row of theirs is forgotten."""
    split = artifacts.load_split(sws, "main")
    users, deg = train_degrees(split)
    for mode in ("most_active", "least_active", "random"):
        sel = select(split, ScenarioConfig("cure4rec", percent=25, seed=3, mode=mode))
        assert len(sel.users) == 3
        chosen = np.isin(users, sel.users)
        if mode == "most_active":
            assert deg[chosen].min() >= deg[~chosen].max()
        elif mode == "least_active":
            assert deg[chosen].max() <= deg[~chosen].min()
        else:
            assert sel.users == list(np.random.RandomState(3).choice(users, 3, replace=False))
        theirs = pc.is_in(split["user_id"], pa.array(sel.users)).to_numpy(zero_copy_only=False)
        assert (sel.mask == theirs).all()


def cure4rec_delete(ratings, del_type: str, del_per: float) -> list:
    """CURE4Rec's `read.py: delete(ratings, del_type, del_per)`, transcribed: pandas `value_counts` over the
    train DataFrame as it is ordered, then a seeded draw ("random"), the head ("core") or the ascending head
    ("edge")."""
    np.random.seed(42)
    user_counts = ratings["uid"].value_counts(ascending=del_type == "edge")
    num_delete_users = int(len(user_counts) * del_per / 100)
    if del_type == "random":
        return np.random.choice(user_counts.index, num_delete_users, replace=False).tolist()
    return user_counts.index[:num_delete_users].tolist()


def test_cure4rec_users_match_its_value_counts_order_with_ties():
    """CURE4Rec parity with ties: on a split whose train rows are interleaved, with several users per degree,
    first-seen order unlike id order, and validation/test rows that must not count, the random / most / least
    active users are exactly CURE4Rec's `delete()` on a DataFrame of the same train rows in the same order
    (pandas >= 3: value_counts sorts stably over first appearance)."""
    pd = pytest.importorskip("pandas", minversion="3.0", reason="stable value_counts ties need pandas 3")
    rng = np.random.RandomState(5)
    degrees = [6, 3, 3, 1, 3, 6, 1, 1, 2, 6, 3, 2, 1, 3, 6, 1, 2, 3, 1, 1]  # ties in every group
    ids = [f"u{n:02d}" for n in rng.permutation(len(degrees))]
    rows = [(u, f"i{j}", TRAIN) for u, d in zip(ids, degrees, strict=True) for j in range(d)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows += [(u, "held", label) for u, label in zip(ids[::3], [1, 2] * 4, strict=False)]
    split = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": pa.array([0] * len(rows), pa.timestamp("s", tz="UTC")),
            "label": pa.array([r[2] for r in rows], pa.int8()),
        }
    )
    train = pd.DataFrame({"uid": [r[0] for r in rows if r[2] == TRAIN]})
    for mode, del_type in (("random", "random"), ("most_active", "core"), ("least_active", "edge")):
        for percent in (10, 25, 40):
            theirs = cure4rec_delete(train, del_type, percent)
            sel = select(split, ScenarioConfig("cure4rec", percent=percent, seed=42, mode=mode))
            assert sel.users == theirs, (mode, percent)
    users, deg = train_degrees(split)
    assert list(users) == train["uid"].value_counts().index.tolist()
    assert sorted(deg.tolist(), reverse=True) == deg.tolist() and sorted(users) != list(users)


def test_l2unrank_and_erase_rules(sws):
    """L2UnRank interaction: max(1, int(n_u * 0.2)) train rows of each chosen user; item: every train row of the
    chosen items; ERASE-style: only the chosen users' train rows on items of the sensitive category."""
    split = artifacts.load_split(sws, "main")
    train = pc.equal(split["label"], 0).to_numpy(zero_copy_only=False)
    sel = select(split, ScenarioConfig("l2unrank_interaction", percent=50, seed=1))
    users = split["user_id"].to_numpy(zero_copy_only=False)
    assert len(sel.users) == 6 and not (sel.mask & ~train).any()
    for u in sel.users:
        n_u = int((train & (users == u)).sum())
        assert int((sel.mask & (users == u)).sum()) == max(1, int(n_u * 0.2))
    sel = select(split, ScenarioConfig("l2unrank_item", percent=25, seed=1))
    items = split["item_id"].to_numpy(zero_copy_only=False)
    assert len(sel.items) == 6 and (sel.mask == (train & np.isin(items, sel.items))).all()
    cfg = ScenarioConfig("erase_sensitive", percent=50, seed=2, category="Horror", batch_users=2)
    sel = select(split, cfg, sws.read("items"))
    horror = {i for j, i in enumerate(ITEM_IDS) if j % 3 == 0}
    assert set(items[sel.mask]) <= horror and set(users[sel.mask]) == set(sel.users)
    assert [u for b in sel.batches for u in b] == sel.users and all(len(b) <= 2 for b in sel.batches)
    cut = forget_retain(split, sel.mask, "train")
    assert cut.forget.num_rows + cut.retain.num_rows == int(train.sum())
    assert cut.gold.num_rows == split.num_rows - cut.forget.num_rows


def test_unlearning_split_gold_and_retained_graphs(sws):
    """`build_unlearning_split` stores the forget rows and the gold retain-only split (no ids in the
    manifest), and retained graphs: the kNN graph equals a rebuild on the gold split's items."""
    cfg = ScenarioConfig("l2unrank_item", percent=25, seed=4)
    build_unlearning_split(sws, "main", cfg, "unl", graphs=["knn_text", "ui"])
    forget_rows, gold = artifacts.load_split(sws, "unl_forget"), artifacts.load_split(sws, "unl_gold")
    split = artifacts.load_split(sws, "main")
    assert forget_rows.num_rows + gold.num_rows == split.num_rows
    info = artifacts.manifest(sws, "split", "unl_gold")
    assert info["base_split_version"] == artifacts.manifest(sws, "split", "main")["table_version"]
    assert not any(f'"{i}"' in json.dumps(info) for i in ITEM_IDS + USER_IDS)
    mat, nodes = artifacts.load_graph(sws, "knn_text__unl")
    feats, _, _ = artifacts.feature_matrix(sws, "text", nodes)
    ref = edges_matrix(*knn_retained(feats, np.ones(len(nodes), bool), KnnConfig(k=3)), len(nodes))
    assert abs(mat - ref).max() < 1e-6
    assert artifacts.manifest(sws, "graph", "ui__unl")["split"] == "unl_gold"
    scope = resolve(ForgetRequest("x", "item", items=("i00",)))
    assert interaction_mask(split, scope).sum() == pc.sum(pc.equal(split["item_id"], "i00")).as_py()


def test_cli_forget_verify_and_unlearn_split(sws):
    """`mmfeat forget user`, `verify-erasure` and `unlearn-split` run end to end and print JSON."""
    from click.testing import CliRunner

    from flows.cli import cli

    runner = CliRunner()
    base = ["--workspace", sws.uri]
    out = runner.invoke(cli, [*base, "forget", "user", "u07", "--request-id", "cli-1", "--reason", "test"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["verification"]["verified"]
    out = runner.invoke(cli, [*base, "verify-erasure", "cli-1"])
    assert out.exit_code == 0 and json.loads(out.output)["verified"]
    out = runner.invoke(cli, [*base, "forget", "interactions", "--pair", "bad"])
    assert out.exit_code != 0 and "USER:ITEM" in out.output
    out = runner.invoke(
        cli,
        [
            *base,
            "unlearn-split",
            "--split",
            "main",
            "--scenario",
            "cure4rec",
            "--mode",
            "most_active",
            "--percent",
            "20",
            "--name",
            "c",
        ],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["unlearning"]["forget_users"] == 2
    assert logged(sws, "cli-1")["reason"] == "test"


def test_graph_without_rebuild_rule_loses_its_rows(sws):
    """A graph erasure cannot re-derive (unknown type) still loses every edge of the forgotten user, is purged
    to one version, and its manifest says it is stale."""
    from stores.artifacts import GRAPH_SCHEMA, write_table

    edges = pa.table(
        {
            "src": ["u00", "u01"],
            "dst": ["i00", "i00"],
            "src_kind": ["user"] * 2,
            "dst_kind": ["item"] * 2,
            "weight": [1.0, 1.0],
        },
        schema=GRAPH_SCHEMA,
    )
    version = write_table(sws, "graph_custom", edges)
    split_version = artifacts.manifest(sws, "split", "main")["table_version"]
    artifacts.record_artifact(
        sws,
        "graph",
        "custom",
        "graph_custom",
        version,
        {"split": "main", "split_version": split_version, "params": {"type": "custom"}},
    )
    receipt = forget(sws, ForgetRequest("c1", "user", users=("u00",)))
    assert receipt["verification"]["verified"] and "custom" in receipt["artifacts"]["failed"]
    assert sws.read("graph_custom")["src"].to_pylist() == ["u01"] and receipt["removed"]["graph_custom"] == 1
    info = artifacts.manifest(sws, "graph", "custom")
    assert "stale" in info and info["table_version"] == sws.version("graph_custom")
    assert len(sws.dataset("graph_custom").versions()) == 1


def test_reingest_after_modality_and_pair_forgets_brings_neither_back(sws, tmp_path):
    """After forgetting an item's image and one (user, item) pair, re-ingesting a source that still holds the
    image and the pair stores neither (both quarantined as `forgotten`, with no key), while the item, its text
    and the user's other interactions come back."""
    import io

    from PIL import Image

    from recipes.ingest.load import ingest
    from recipes.ingest.records import RawSource

    inter = sws.read("interactions")
    u, i = inter["user_id"][0].as_py(), inter["item_id"][0].as_py()
    other = "i02" if i != "i02" else "i03"
    forget(sws, ForgetRequest("m-img", "modality", modality="image", items=("i01",)))
    forget(sws, ForgetRequest("m-pair", "interactions", pairs=((u, i),)))
    root = tmp_path / "imgs"
    root.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    (root / "i01.png").write_bytes(buf.getvalue())
    src = RawSource(
        "again",
        image_root=root,
        items=pa.table(
            {"item_id": ["i01"], "title": ["t"], "image": ["i01.png"], "__file": ["items.csv"], "__line": [1]}
        ),
        interactions=pa.table(
            {
                "user_id": [u, u],
                "item_id": [i, other],
                "timestamp": ["1700000000"] * 2,
                "__file": ["inter.csv"] * 2,
                "__line": [1, 2],
            }
        ),
        derive_users=True,
    )
    report = ingest(sws, src)
    assert report.balanced
    assert sws.count("items", "item_id = 'i01'") == 1
    assert sws.count("item_images", "item_id = 'i01'") == 0
    assert sws.count("interactions", f"user_id = '{u}' AND item_id = '{i}'") == 0
    assert sws.count("interactions", f"user_id = '{u}' AND item_id = '{other}'") >= 1
    q = sws.read("quarantine", where="reason = 'forgotten'")
    assert q.num_rows == 2 and set(q["record_key"].to_pylist()) == {None}


# ---- fail-closed verification, exports, keyed deny-list -----------------------------------------------------------


def test_truncated_data_file_fails_verification_naming_it(sws):
    """A data file the verifier cannot decode is a problem naming that file, never zero hits: with a forgotten
    user written back and the file holding it truncated, verify says verified: false and names the file."""
    forget(sws, ForgetRequest("t1", "user", users=("u05",)))
    assert verify(sws, "t1")["verified"]
    row = {"user_id": "u05", "attributes": None, "source": "back", "created_at": NOW}
    sws.upsert(USERS, pa.Table.from_pylist([row], schema=USERS.schema))
    ds = sws.dataset("users")
    holding = [
        f.data_files()[0].path
        for f in ds.get_fragments()
        if "u05" in f.to_table(columns=["user_id"])["user_id"].to_pylist()
    ]
    [name] = holding
    path = Path(ds.uri, "data", name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = verify(sws, "t1")
    assert not result["verified"]
    assert any(name in p and "cannot be read" in p for p in result["problems"]), result["problems"]
    assert any(name in u for u in result["unverified"])


def test_exports_are_listed_outside_the_guarantee(sws, tmp_path):
    """An export mmfeat wrote from a split that held the forgotten user is recorded with its path and appears
    in the receipt under `outside_guarantee`; erasure does not claim files outside the workspace."""
    from recipes.pipeline import export

    out = tmp_path / "exported"
    export(sws, "main", "recbole", out)
    receipt = forget(sws, ForgetRequest("x1", "user", users=("u04",)))
    [entry] = receipt["outside_guarantee"]
    assert entry["path"] == str(out.resolve()) and entry["format"] == "recbole" and entry["split"] == "main"
    assert receipt["verification"]["verified"]


def test_deny_list_keys_are_keyed_with_a_private_workspace_secret(sws, tmp_path):
    """Deny-list and log hashes are HMACs under a per-workspace secret (mode 0600): hashing a candidate id
    without the secret finds nothing, two workspaces name the same id differently, and an unkeyed row of an
    older workspace is still honoured by ingest's check."""
    from stores.erasure.keys import SECRET_PATH, deny_list
    from stores.schema import legacy_hash

    forget(sws, ForgetRequest("k1", "user", users=("u00",)))
    secret_file = Path(sws.uri, SECRET_PATH)
    assert secret_file.stat().st_mode & 0o777 == 0o600
    listed = sws.read("deny_list")["key_hash"].to_pylist()
    log = sws.read(FORGET_REQUESTS.name).to_pylist()[0]
    unkeyed = legacy_hash("user", "u00")
    assert unkeyed not in listed and unkeyed not in log["params"] + log["receipt"]
    other = Workspace(tmp_path / "other")
    forget(other, ForgetRequest("k1", "user", users=("u00",)))
    assert other.read("deny_list")["key_hash"].to_pylist() != listed
    row = {"key_hash": legacy_hash("user", "u07"), "kind": "user", "request_id": "old", "created_at": NOW}
    from stores.schema import DENY_LIST

    sws.upsert(DENY_LIST, pa.Table.from_pylist([row], schema=DENY_LIST.schema))
    denied = deny_list(sws)
    assert denied.has("user", "u07") and denied.has("user", "u00") and not denied.has("user", "u01")


@pytest.fixture
def s3_ws(s3_endpoint):
    """A workspace in its own bucket on the session's loopback moto S3 server (conftest's s3_endpoint)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="erasure")
    return Workspace("s3://erasure/ws")


@pytest.mark.slow
def test_erasure_on_s3_deletes_unreferenced_objects_and_scans_every_object(s3_ws):
    """On an s3:// workspace erasure deletes objects no version references and temp objects, and the raw scan
    reads every object: a copy of a forgotten image left outside the tables fails verification until removed."""
    from stores.erasure.files import delete_file, list_files, write_file

    ws = s3_ws
    build_workspace(ws)
    image = ws.read("item_images", where="item_id = 'i06'")["image"][0].as_py()
    write_file(ws, "item_images.lance/data/orphan.lance", b"x" + image)
    write_file(ws, "tmp/spill.bin", image)
    write_file(ws, "exports/copy.bin", b"head" + image + b"tail")
    receipt = forget(ws, ForgetRequest("s3-1", "item", items=("i06",)))
    files = list_files(ws)
    assert "item_images.lance/data/orphan.lance" not in files and "tmp/spill.bin" not in files
    assert receipt["physical"]["item_images"]["unreferenced_files_removed"] >= 1
    assert receipt["verification"]["raw_scan"]["files"] > 0 and not receipt["verification"]["unverified"]
    assert not receipt["verification"]["verified"]
    assert any("exports/copy.bin" in p for p in receipt["verification"]["problems"])
    delete_file(ws, "exports/copy.bin")
    assert verify(ws, "s3-1")["verified"] and ".mmfeat/secret" in list_files(ws)


def test_patched_split_counts_and_ui_graph_equal_a_rebuild_after_user_then_item_forgets(tmp_path):
    """The split counts erasure records (recorded counts minus the deleted rows, not a re-scan) equal the counts
    of the split left, including an item that only the forgotten user held and a user left with no row after an
    item forget; the patched user-item graph (stored as train pairs: only the forgotten node's rows deleted)
    equals a rebuild on the erased split row for row, with the same manifest counts, after a user forget and
    again after an item forget (whose removal changes its users' degrees, so the weights read back change too:
    the matrix read equals `ui_adjacency` of the split left)."""
    from recipes.graphs.user_item import ui_adjacency
    from recipes.pipeline import build_split, build_ui_graph
    from recipes.splits import SplitConfig, split_counts

    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(3)
    pairs = {(f"u{u}", f"i{i:02d}") for u in range(8) for i in rng.choice(12, 6, replace=False)}
    pairs |= {("heavy", f"i{i:02d}") for i in range(12)} | {("heavy", "solo"), ("loner", "i05")}
    rows = [
        {
            "user_id": u,
            "item_id": i,
            "timestamp": NOW - timedelta(days=k),
            "event": "rating",
            "seq": 0,
            "value": 1.0,
            "source": "syn",
        }
        for k, (u, i) in enumerate(sorted(pairs))
    ]
    ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))
    build_split(ws, "main", SplitConfig(scheme="random", kcore=0, seed=0))
    build_ui_graph(ws, "main", "sym", name="ui")
    for k, request in enumerate(
        (
            ForgetRequest("r-user", "user", users=("heavy",), reason="t"),
            ForgetRequest("r-item", "item", items=("i05",), reason="t"),
        )
    ):
        receipt = forget(ws, request)
        assert receipt["verification"]["verified"], receipt["verification"]
        assert receipt["artifacts"]["graphs"]["ui"]["action"].startswith("patched")
        assert artifacts.manifest(ws, "split", "main")["counts"] == split_counts(ws.read("split_main"))
        build_ui_graph(ws, "main", "sym", name=f"ui_rebuilt{k}")
        assert ws.read("graph_ui").equals(ws.read(f"graph_ui_rebuilt{k}"))
        patched, rebuilt = (artifacts.manifest(ws, "graph", g) for g in ("ui", f"ui_rebuilt{k}"))
        assert patched["layout"] == artifacts.UI_PAIRS
        assert {k: patched[k] for k in ("nodes", "edges", "pairs", "split_version")} == {
            k: rebuilt[k] for k in ("nodes", "edges", "pairs", "split_version")
        }
        mat, _ = artifacts.load_graph(ws, "ui")
        ref = ui_adjacency(ws.read("split_main"), "sym")
        assert mat.nnz == ref.nnz == patched["edges"] and abs(mat - ref).max() == 0
    counts = artifacts.manifest(ws, "split", "main")["counts"]
    held = set(ws.read("split_main")["user_id"].to_pylist())
    assert "loner" not in held and "solo" not in set(ws.read("split_main")["item_id"].to_pylist())
    assert counts["users"] == len(held)


def test_ui_graph_stored_normalised_by_an_older_version_stays_readable_and_a_forget_rebuilds_it(tmp_path):
    """A user-item graph written before the pairs layout (D^-1/2 A D^-1/2 weights per edge, no `layout` in its
    manifest) reads back as the same matrix through load_graph and FeatureReader, and a forget rebuilds it into
    the pairs layout (equal to a fresh build) instead of patching a table it cannot patch."""
    from recipes.graphs.user_item import ui_adjacency
    from recipes.pipeline import build_split, build_ui_graph
    from recipes.splits import SplitConfig
    from stores.reader import FeatureReader
    from stores.snapshots import create_snapshot

    ws = Workspace(tmp_path / "ws")
    rows = [
        {
            "user_id": f"u{u}",
            "item_id": f"i{(u * 3 + j) % 9}",
            "timestamp": NOW - timedelta(days=u * 5 + j),
            "event": "rating",
            "seq": 0,
            "value": 1.0,
            "source": "syn",
        }
        for u in range(6)
        for j in range(4)
    ]
    ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))
    build_split(ws, "main", SplitConfig(scheme="random", kcore=0, seed=0))
    split = artifacts.load_split(ws, "main")
    old = ui_adjacency(split, "sym")
    pins = {"split": "main", "split_version": artifacts.manifest(ws, "split", "main")["table_version"]}
    params = {"type": "user-item", "norm": "sym"}
    artifacts.save_graph(ws, "ui", old, split, "user+item", {"params": params, "inputs": pins} | pins)
    assert "layout" not in artifacts.manifest(ws, "graph", "ui")
    mat, _ = artifacts.load_graph(ws, "ui")
    assert abs(mat - old).max() == 0
    create_snapshot(ws, "s", "main", graphs=["ui"])
    assert abs(FeatureReader(ws, "s").graph_matrix("ui") - old).max() == 0
    receipt = forget(ws, ForgetRequest("r1", "user", users=("u2",), reason="t"))
    assert receipt["verification"]["verified"], receipt["verification"]
    assert receipt["artifacts"]["graphs"]["ui"]["action"] == "rebuilt"
    assert artifacts.manifest(ws, "graph", "ui")["layout"] == artifacts.UI_PAIRS
    build_ui_graph(ws, "main", "sym", name="ui_fresh")
    assert ws.read("graph_ui").equals(ws.read("graph_ui_fresh"))
