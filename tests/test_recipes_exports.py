"""Exports read back: MMRec folder, RecBole atomic files, PyG HeteroData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from recipes.exports import export_mmrec, export_pyg, export_recbole, user_graph_dict
from recipes.graphs.cooccur import user_cooccurrence
from stores.ids import id_maps


@pytest.fixture
def split() -> pa.Table:
    """Four users, five items (ids with leading zeros), labels 0/1/2, one null value."""
    rows = [
        ("u1", "0108775015", 1, 5.0, 0),
        ("u1", "0000000002", 2, 4.0, 0),
        ("u1", "0000000003", 3, 3.0, 2),
        ("u2", "0108775015", 4, None, 0),
        ("u2", "0000000002", 5, 1.0, 1),
        ("u3", "0000000002", 6, 2.0, 0),
        ("u3", "0000000003", 7, 2.0, 0),
        ("u3", "0000000009", 8, 2.0, 2),
        ("u0", "0000000003", 9, 3.0, 0),
    ]
    return pa.table(
        {
            "user_id": pa.array([r[0] for r in rows]),
            "item_id": pa.array([r[1] for r in rows]),
            "timestamp": pa.array([r[2] for r in rows], pa.timestamp("s", tz="UTC")),
            "event": pa.array(["rating"] * len(rows)),
            "value": pa.array([r[3] for r in rows], pa.float64()),
            "label": pa.array([r[4] for r in rows], pa.int8()),
        }
    )


def test_export_mmrec_reads_back(split, tmp_path):
    """MMRec export: contiguous ids from 0, x_label in {0,1,2}, one feature row per item aligned to the id
    map (zeros + report for missing items), id maps round-trip to the original strings, DualGNN dict has
    every user."""
    users, items = id_maps(split)
    rng = np.random.default_rng(0)
    img_ids = np.array(["0000000009", "0108775015", "0000000002", "9999999999"], dtype=object)
    img = rng.standard_normal((4, 6)).astype(np.float32)
    txt = rng.standard_normal((len(items), 3)).astype(np.float32)
    report = export_mmrec(
        split,
        {"clip": (img_ids, img), "minilm": (items, txt)},
        tmp_path,
        "tiny",
        feature_files={"image_feat": "clip", "text_feat": "minilm"},
        user_graph=user_cooccurrence(split, k=200),
    )
    inter = pd.read_csv(tmp_path / "tiny.inter", sep="\t")
    assert list(inter.columns) == ["userID", "itemID", "rating", "timestamp", "x_label"]
    assert sorted(inter["userID"].unique()) == list(range(len(users)))
    assert sorted(inter["itemID"].unique()) == list(range(len(items)))
    assert set(inter["x_label"]) <= {0, 1, 2} and len(inter) == split.num_rows
    assert inter["rating"].isna().sum() == 1

    umap = pd.read_csv(tmp_path / "u_id_mapping.csv", sep="\t", dtype={"user_id": str})
    imap = pd.read_csv(tmp_path / "i_id_mapping.csv", sep="\t", dtype={"item_id": str})
    assert umap["user_id"].tolist() == users.tolist() and umap["userID"].tolist() == list(range(len(users)))
    assert imap["item_id"].tolist() == items.tolist() and "0108775015" in imap["item_id"].tolist()
    # Every original pair comes back through the maps.
    back = {
        (umap["user_id"][u], imap["item_id"][i])
        for u, i in zip(inter["userID"], inter["itemID"], strict=True)
    }
    assert back == set(zip(split["user_id"].to_pylist(), split["item_id"].to_pylist(), strict=True))

    image = np.load(tmp_path / "image_feat.npy")
    text = np.load(tmp_path / "text_feat.npy")
    assert image.shape == (len(items), 6) and image.dtype == np.float32 and text.shape == (len(items), 3)
    pos = {iid: k for k, iid in enumerate(items)}
    np.testing.assert_array_equal(image[pos["0108775015"]], img[1])
    np.testing.assert_array_equal(image[pos["0000000003"]], 0)
    assert report.missing["image_feat"].tolist() == ["0000000003"]
    assert report.missing["text_feat"].tolist() == []

    graph = np.load(tmp_path / "user_graph_dict.npy", allow_pickle=True).item()
    assert sorted(graph) == list(range(len(users)))
    assert all(len(v) == 2 and len(v[0]) == len(v[1]) for v in graph.values())
    assert "vision_feature_file: 'image_feat.npy'" in (tmp_path / "tiny.yaml").read_text()


def test_user_graph_dict_layout():
    """DualGNN's dict: {user: [[neighbours], [weights]]} for every user, empty lists for isolated ones."""
    edges = pa.table(
        {
            "src": pa.array([0, 0, 2], pa.int32()),
            "dst": pa.array([2, 1, 0], pa.int32()),
            "weight": pa.array([3.0, 1.0, 3.0], pa.float32()),
        }
    )
    assert user_graph_dict(edges, 3) == {0: [[2, 1], [3.0, 1.0]], 1: [[], []], 2: [[0], [3.0]]}


def test_export_recbole_atomic_files(split, tmp_path):
    """RecBole export: typed headers, original string ids, benchmark files partition the rows by label,
    and .item keeps only items of the split."""
    items = pa.table(
        {
            "item_id": ["0108775015", "0000000002", "0000000003", "0000000009", "0000000077"],
            "title": ["a", "b", "c", "d", "e"],
            "year": [1990, 1991, 1992, 1993, 1994],
        }
    )
    export_recbole(split, tmp_path, "tiny", items=items)
    inter = pd.read_csv(tmp_path / "tiny.inter", sep="\t", dtype={"item_id:token": str, "user_id:token": str})
    assert list(inter.columns) == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    # RecBole splits the raw header line on tabs, without CSV unquoting
    header = (tmp_path / "tiny.inter").read_text().splitlines()[0].split("\t")
    assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert len(inter) == split.num_rows and "0108775015" in set(inter["item_id:token"])
    sizes = {p: len(pd.read_csv(tmp_path / f"tiny.{p}.inter", sep="\t")) for p in ("train", "valid", "test")}
    assert sizes == {"train": 6, "valid": 1, "test": 2}
    item = pd.read_csv(tmp_path / "tiny.item", sep="\t", dtype={"item_id:token": str})
    assert list(item.columns) == ["item_id:token", "title:token", "year:float"]
    assert len(item) == 4 and "0000000077" not in set(item["item_id:token"])


def test_export_pyg_heterodata(split, tmp_path):
    """PyG export: user/item node counts, train-only message-passing edges, held-out pairs kept apart,
    aligned item features with a mask."""
    users, items = id_maps(split)
    feat = np.arange(len(items) * 2, dtype=np.float32).reshape(-1, 2)
    path = export_pyg(split, {"text": (items[:-1], feat[:-1])}, tmp_path / "g.pt")
    data = torch.load(path, weights_only=False)
    assert data["user"].num_nodes == len(users) and data["item"].num_nodes == len(items)
    rel = data["user", "interacts", "item"]
    assert rel.edge_index.shape == (2, 6)
    assert rel.val_edge_label_index.shape == (2, 1) and rel.test_edge_label_index.shape == (2, 2)
    assert data["item"].text.shape == (len(items), 2) and data["item"].text_mask.tolist()[-1] is False
    assert data["item"].ids == items.tolist()
    assert torch.equal(data["item", "rev_interacts", "user"].edge_index, rel.edge_index.flip(0))


def test_export_errors_name_the_problem(split, tmp_path):
    """A feature mapping naming an unknown feature, repeated feature ids, or a non-split table fail with a
    message that names the value."""
    with pytest.raises(ValueError, match="feature_files name feature"):
        export_mmrec(split, {}, tmp_path, "x", feature_files={"image_feat": "clip"})
    ids = np.array(["0108775015", "0108775015"], dtype=object)
    with pytest.raises(ValueError, match="repeat"):
        export_mmrec(split, {"f": (ids, np.zeros((2, 2)))}, tmp_path, "x")
    with pytest.raises(ValueError, match="label"):
        export_recbole(split.drop_columns(["label"]), tmp_path, "x")
