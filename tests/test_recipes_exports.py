"""Exports read back: MMRec folder, RecBole atomic files, PyG HeteroData."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from recipes.exports import (
    MANIFEST,
    attribute_columns,
    export_mmrec,
    export_pyg,
    export_recbole,
    user_graph_dict,
)
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


@pytest.fixture
def umask_022():
    """The process umask set to 022 for the test, restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def read_recbole(path) -> pd.DataFrame:
    """An atomic file read the way RecBole's `Dataset._load_feat` reads it: the raw first line split on tabs into
    `field:type`, float columns as float64 and the rest as str through pandas, token_seq / float_seq split on
    spaces. (A transcription of the convention, so the test needs no RecBole install.)"""
    header = path.read_text(encoding="utf-8").split("\n", 1)[0].split("\t")
    types = dict(h.split(":") for h in header)  # RecBole unpacks `field, ftype = h.split(":")`
    assert set(types.values()) <= {"token", "float", "token_seq", "float_seq"}, types
    dtype = {h: (np.float64 if h.split(":")[1] == "float" else str) for h in header}
    df = pd.read_csv(path, delimiter="\t", dtype=dtype, encoding="utf-8", engine="python")
    df.columns = list(types)
    for name, kind in types.items():
        if kind == "token_seq":
            df[name] = [list(filter(None, v.split(" "))) for v in df[name].fillna("")]
        elif kind == "float_seq":
            df[name] = [[float(x) for x in filter(None, v.split(" "))] for v in df[name].fillna("")]
    df.attrs["types"] = types
    return df


def test_export_mmrec_reads_back(split, tmp_path):
    """MMRec export: contiguous ids from 0, x_label in {0,1,2}, one feature row per item aligned to the id
    map, an item without the feature gets the mean of the others (MMRec's convention, never a zero row), is
    listed in missing_<feature>.txt and counted in a one-line warning; id maps round-trip to the original
    strings, DualGNN dict has every user."""
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
    np.testing.assert_allclose(image[pos["0000000003"]], img[:3].mean(axis=0), rtol=1e-6)
    assert np.abs(image).sum(axis=1).min() > 0 and np.abs(text).sum(axis=1).min() > 0
    assert report.missing["clip"].tolist() == ["0000000003"] and report.missing["minilm"].tolist() == []
    assert (tmp_path / "missing_clip.txt").read_text() == "0000000003\n"
    assert not (tmp_path / "missing_minilm.txt").exists()
    assert report.warnings == ["1 of 4 items have no clip; filled with the mean vector (--missing mean)"]

    graph = np.load(tmp_path / "user_graph_dict.npy", allow_pickle=True).item()
    assert sorted(graph) == list(range(len(users)))
    assert all(len(v) == 2 and len(v[0]) == len(v[1]) for v in graph.values())
    assert "vision_feature_file: 'image_feat.npy'" in (tmp_path / "tiny.yaml").read_text()


def test_missing_policy_zero_and_drop(split, tmp_path):
    """--missing zero writes the zero row it names; --missing drop removes the item lacking a feature together
    with its interactions, so every row left is a real vector and the ids stay contiguous."""
    items = id_maps(split)[1]
    vec = np.arange(1, len(items) * 2 + 1, dtype=np.float32).reshape(-1, 2)
    have = items != "0000000003"
    feats = {"clip": (items[have], vec[have])}
    zero = export_mmrec(split, feats, tmp_path / "z", "t", missing="zero")
    assert np.load(tmp_path / "z" / "clip.npy")[list(items).index("0000000003")].tolist() == [0.0, 0.0]
    assert zero.warnings == ["1 of 4 items have no clip; filled with zeros (--missing zero)"]

    drop = export_mmrec(split, feats, tmp_path / "d", "t", missing="drop")
    kept = np.load(tmp_path / "d" / "clip.npy")
    imap = pd.read_csv(tmp_path / "d" / "i_id_mapping.csv", sep="\t", dtype={"item_id": str})
    assert imap["item_id"].tolist() == items[have].tolist() and kept.tolist() == vec[have].tolist()
    assert drop.n_rows == split.num_rows - 3 and drop.n_items == 3
    assert (tmp_path / "d" / "missing_clip.txt").read_text() == "0000000003\n"
    with pytest.raises(ValueError, match="--missing 'nan' is unknown"):
        export_mmrec(split, feats, tmp_path / "x", "t", missing="nan")


def test_files_follow_the_umask_and_reexport_replaces_its_own(split, tmp_path, umask_022):
    """Under umask 022 every exported file is 0644 (a temp file + rename used to leave them 0600); exporting
    again into the folder removes the files the earlier export wrote and this one did not, and leaves files
    it never wrote; an export without features names no feature file in its MMRec config."""
    items = id_maps(split)[1]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    feats = {"clip": (items[1:], np.ones((len(items) - 1, 2), np.float32))}
    first = export_mmrec(split, feats, out, "a", feature_files={"image_feat": "clip"})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.name != "notes.txt"}
    assert set(modes) >= {"a.inter", "image_feat.npy", "missing_clip.txt", "a.yaml", MANIFEST}
    assert set(modes.values()) == {0o644}, modes
    assert json.loads((out / MANIFEST).read_text())["files"] == sorted(p.name for p in first.files.values())

    export_mmrec(split, {}, out, "b")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["b.inter", "b.yaml", "i_id_mapping.csv", "u_id_mapping.csv", "notes.txt", MANIFEST]
    )
    config = (out / "b.yaml").read_text()
    assert "vision_feature_file: ''" in config and "text_feature_file: ''" in config
    assert "user_graph_dict_file: ''" in config and ".npy" not in config

    path = export_pyg(split, {}, out / "g.pt").files["pyg"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["g.pt", "notes.txt", MANIFEST])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


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
    item = read_recbole(tmp_path / "tiny.item")
    assert item.attrs["types"] == {"item_id": "token", "title": "token_seq", "year": "float"}
    assert len(item) == 4 and "0000000077" not in set(item["item_id"])


def test_recbole_item_and_user_carry_every_attribute(split, tmp_path):
    """.item carries the title and every JSON attribute with RecBole's types (title and genres token_seq, numbers
    float, also when written as text like ML-100K's age, strings token, a zip code with a leading zero a token)
    and .user every user attribute;
    read back as RecBole parses them, values survive, including quotes, tabs and multi-word genres."""
    attrs = [
        {"genres": ["Action", "Film Noir"], "year": 1995.0, "imdb_url": "http://x/?a b"},
        {"genres": ["Comedy"], "year": 1996, "lang": "en"},
        {"genres": [], "year": None},
        {"genres": ["Drama"], "year": 2001.5, "lang": 'say "hi"\tnow'},
    ]
    ids = ["0108775015", "0000000002", "0000000003", "0000000009"]
    items = pa.table(
        {
            "item_id": ids,
            "title": ['"Great Day", A (1994)', "Toy  Story (1995)", None, "x"],
            "attributes": [json.dumps(a) for a in attrs],
        }
    )
    users = pa.table(
        {
            "user_id": ["u0", "u1", "u2", "u3", "u9"],
            "attributes": [
                json.dumps(
                    {
                        "age": str(20 + k),
                        "gender": "MF"[k % 2],
                        "occupation": "writer",
                        "zip": "0213" + str(k),
                    }
                )
                for k in range(5)
            ],
        }
    )
    export_recbole(
        split,
        tmp_path,
        "t",
        items=attribute_columns(items, "item_id", ["title"]),
        users=attribute_columns(users, "user_id"),
    )
    item = read_recbole(tmp_path / "t.item").set_index("item_id")
    assert item.attrs["types"] == {
        "item_id": "token",
        "title": "token_seq",
        "genres": "token_seq",
        "year": "float",
        "imdb_url": "token",
        "lang": "token",
    }
    assert item.loc["0108775015", "title"] == ['"Great', 'Day",', "A", "(1994)"]
    assert item.loc["0108775015", "genres"] == ["Action", "Film_Noir"]
    assert item.loc["0000000003", "genres"] == [] and np.isnan(item.loc["0000000003", "year"])
    assert item.loc["0000000009", "year"] == 2001.5 and item.loc["0000000009", "lang"] == 'say "hi" now'
    assert item.loc["0108775015", "imdb_url"] == "http://x/?a b"
    user = read_recbole(tmp_path / "t.user")
    assert user.attrs["types"] == {
        "user_id": "token",
        "age": "float",
        "gender": "token",
        "occupation": "token",
        "zip": "token",
    }
    assert sorted(user["user_id"]) == ["u0", "u1", "u2", "u3"] and user["zip"].tolist()[0] == "02130"
    assert user["age"].tolist() == [20.0, 21.0, 22.0, 23.0]


def test_export_pyg_heterodata(split, tmp_path):
    """PyG export: user/item node counts, train-only message-passing edges, held-out pairs kept as graph-level
    tensors, aligned item features (mean-filled) with a mask; ToUndirected adds exactly one reverse type and
    to_homogeneous keeps one row per train edge (held-out pairs are not edge attributes it would expand)."""
    from torch_geometric.transforms import ToUndirected

    users, items = id_maps(split)
    feat = np.arange(1, len(items) * 2 + 1, dtype=np.float32).reshape(-1, 2)
    report = export_pyg(split, {"text": (items[:-1], feat[:-1])}, tmp_path / "g.pt")
    data = torch.load(report.files["pyg"], weights_only=False)
    assert data["user"].num_nodes == len(users) and data["item"].num_nodes == len(items)
    assert data.edge_types == [("user", "interacts", "item")]
    rel = data["user", "interacts", "item"]
    assert rel.edge_index.shape == (2, 6) and rel.time.shape == (6,)
    assert data.val_pairs.shape == (2, 1) and data.test_pairs.shape == (2, 2)
    assert data["item"].text.shape == (len(items), 2) and data["item"].text_mask.tolist()[-1] is False
    assert data["item"].text[-1].tolist() == feat[:-1].mean(axis=0).tolist()
    assert data["item"].ids == items.tolist()
    assert report.warnings == ["1 of 4 items have no text; filled with the mean vector (--missing mean)"]

    undirected = ToUndirected()(data.clone())
    assert sorted(undirected.edge_types) == [("item", "rev_interacts", "user"), ("user", "interacts", "item")]
    assert torch.equal(undirected["item", "rev_interacts", "user"].edge_index, rel.edge_index.flip(0))
    homo = undirected.to_homogeneous()
    assert homo.edge_index.shape == (2, 12) and homo.num_nodes == len(users) + len(items)
    assert homo.val_pairs.shape == (2, 1)


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
