"""Exports of ML-100K with posters: what trainers load is complete, readable and fits in memory.

The features are cheap stand-ins with the production table specs: an image vector per poster (a byte histogram of
the JPEG, so the 19 items without a poster have none) and a hashed bag of words per overview (items without an
overview have none). What is checked is the export's handling of items lacking them, not the vectors."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from recipes import pipeline
from recipes.splits import SplitConfig
from stores.artifacts import load_split
from stores.features import feature_spec
from stores.sql import run_sql
from stores.workspace import Workspace
from tests.conftest import REPO, ingest_ml100k
from tests.test_recipes_exports import read_recbole

pytestmark = pytest.mark.realdata
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _feature_rows(
    item_ids: list[str], vectors: list[np.ndarray], inputs: list[str], model: str
) -> list[dict]:
    return [
        {
            "item_id": i,
            "vector": v.tolist(),
            "model": model,
            "revision": "1",
            "params": "{}",
            "input_hash": h,
            "created_at": NOW,
        }
        for i, v, h in zip(item_ids, vectors, inputs, strict=True)
    ]


def add_features(ws: Workspace) -> None:
    """`clip_image` (16-d) for items with a poster, `text` (16-d) for items with an overview."""
    images = ws.read("item_images", columns=["item_id", "image", "sha256"]).to_pylist()
    hists = [np.bincount(np.frombuffer(r["image"], np.uint8) >> 4, minlength=16) for r in images]
    spec = feature_spec("clip_image", 16)
    rows = _feature_rows(
        [r["item_id"] for r in images],
        [h / h.sum() for h in hists],
        [r["sha256"] for r in images],
        "byte-hist",
    )
    ws.upsert(spec, pa.Table.from_pylist(rows, schema=spec.schema))
    items = [r for r in ws.read("items", columns=["item_id", "text"]).to_pylist() if r["text"]]
    vectors = []
    for r in items:
        vec = np.zeros(16, np.float32)
        for word in r["text"].lower().split():
            vec[hashlib.sha256(word.encode()).digest()[0] % 16] += 1.0
        vectors.append(vec / np.linalg.norm(vec))
    spec = feature_spec("text", 16)
    rows = _feature_rows([r["item_id"] for r in items], vectors, [r["item_id"] for r in items], "hashed-bow")
    ws.upsert(spec, pa.Table.from_pylist(rows, schema=spec.schema))


@pytest.fixture(scope="module")
def ml_ws(ml100k, tmp_path_factory) -> Workspace:
    """ML-100K ingested with posters, the two features, and split `main` (random, no k-core: all 1,682 items)."""
    ws = Workspace(tmp_path_factory.mktemp("exports") / "ws")
    ingest_ml100k(ws, ml100k)
    add_features(ws)
    pipeline.build_split(ws, "main", SplitConfig(scheme="random", seed=0))
    return ws


def test_mmrec_export_fills_items_without_a_poster(ml_ws, tmp_path):
    """`mmfeat export mmrec --feature image_feat=clip_image --feature text_feat=text` on ML-100K: no all-zero row
    in either .npy (items without a poster get the mean vector), a one-line warning with the count of items
    without a poster, missing_clip_image.txt lists them, and under umask 022 every file is mode 0644."""
    out = tmp_path / "mmrec"
    no_text = run_sql(ml_ws, "select count(*) n from items where text is null or length(text) = 0")["n"][0]
    old_umask = os.umask(0o022)  # the CLI inherits it
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "--workspace",
                ml_ws.uri,
                "export",
                "mmrec",
                "--split",
                "main",
            ]
            + ["--out", str(out), "--feature", "image_feat=clip_image", "--feature", "text_feat=text"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    finally:
        os.umask(old_umask)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings[0] == (
        "warning: 19 of 1682 items have no clip_image; filled with the mean vector (--missing mean)"
    )
    assert warnings[1:] == [
        f"warning: {no_text.as_py()} of 1682 items have no text; filled with the mean vector (--missing mean)"
    ]
    for stem in ("image_feat", "text_feat"):
        rows = np.load(out / f"{stem}.npy")
        assert rows.shape == (1682, 16) and (np.abs(rows).sum(axis=1) > 0).all(), stem
    missing = (out / "missing_clip_image.txt").read_text().split()
    assert sorted(missing, key=int)[:3] == ["330", "387", "563"] and len(missing) == 19
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert {"main.inter", "main.yaml", "u_id_mapping.csv", "missing_text.txt"} <= set(modes)


def test_recbole_item_and_user_files_carry_all_attributes(ml_ws, tmp_path):
    """RecBole's .item holds every ML-100K item with its title and attributes typed as RecBole parses them
    (title and genres token_seq, TMDB numbers float) and .user every user with age, gender, occupation, zip."""
    pipeline.export(ml_ws, "main", "recbole", tmp_path, name="ml100k")
    item = read_recbole(tmp_path / "ml100k.item").set_index("item_id")
    types = item.attrs["types"]
    assert len(item) == 1682 and types["title"] == "token_seq" and types["genres"] == "token_seq"
    assert types["tmdb_runtime"] == "float" and types["tmdb_vote_average"] == "float"
    assert types["tmdb_year"] == "float" and item.loc["1", "tmdb_runtime"] == 81.0
    assert types["release_date"] == "token" and types["imdb_url"] == "token"
    assert item.loc["1", "title"] == ["Toy", "Story", "(1995)"]
    assert item.loc["1", "genres"] == ["Animation", "Children", "Comedy"]
    user = read_recbole(tmp_path / "ml100k.user")
    assert user.attrs["types"] == {
        "user_id": "token",
        "age": "float",
        "gender": "token",
        "occupation": "token",
        "zip": "token",
    }
    user = user.set_index("user_id")
    assert len(user) == 943 and user.loc["1", "occupation"] == "technician" and user.loc["1", "age"] == 24.0
    assert user.loc["1", "zip"] == "85711" and "T8H1N" in set(user["zip"])  # zip: a token, not a number


PEAK_SCRIPT = """
import json, sys, torch
from torch_geometric.transforms import ToUndirected

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

data = ToUndirected()(torch.load(sys.argv[1], weights_only=False))
before = status()
try:  # reset the high-water mark so VmHWM is the peak of to_homogeneous alone
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
homo = data.to_homogeneous()
after = status()
print(json.dumps({"before": before, "after": after, "edge_types": [list(t) for t in data.edge_types],
                  "edges": homo.edge_index.shape[1], "nodes": homo.num_nodes}))
"""


def test_pyg_to_homogeneous_stays_under_1_gb(ml_ws, tmp_path):
    """The PyG export of ML-100K: ToUndirected adds one reverse edge type and to_homogeneous() needs less than
    1 GB above what the loaded graph holds (held-out pairs as edge attributes made it ask for 35 GB)."""
    report = pipeline.export(ml_ws, "main", "pyg", tmp_path, {"image": "clip_image", "text": "text"})
    assert report.warnings[0].startswith("19 of 1682 items have no clip_image")
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(report.files["pyg"])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(map(tuple, got["edge_types"])) == [
        ("item", "rev_interacts", "user"),
        ("user", "interacts", "item"),
    ]
    n_train = int((load_split(ml_ws, "main")["label"].to_numpy() == 0).sum())
    assert got["nodes"] == 943 + 1682 and got["edges"] == 2 * n_train
    peak = got["after"]["VmHWM"] - got["before"]["VmRSS"]
    print(
        f"to_homogeneous: peak {peak / 2**20:.1f} MiB above the loaded graph; process peak "
        f"{max(got['after']['VmHWM'], got['before']['VmHWM']) / 2**20:.0f} MiB"
    )
    assert peak < 2**30
