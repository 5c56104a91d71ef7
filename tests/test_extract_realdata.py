"""Extraction on ML-100K with posters: exact row counts for every feature, and real MiniLM semantics."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from stores.features import FAILURES, list_features
from stores.sql import run_sql
from stores.workspace import Workspace
from tests.conftest import ingest_ml100k

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# NOTICE.md of the dataset: the movies without a poster.
NO_POSTER = {"330", "387", "563", "767", "868", "907", "1026", "1331", "1340", "1346", "1359", "1420", "1431",
             "1498", "1516", "1536", "1568", "1586", "1667"}  # fmt: skip


@pytest.fixture(scope="module")
def ml_ws(tmp_path_factory, ml100k, ray_local) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ml") / "ws")
    assert ingest_ml100k(ws, ml100k).balanced
    return ws


def mmfeat(ws: Workspace, *args: str) -> dict:
    """Run an extraction command the way `mmfeat` does (in this process, so it shares the module's Ray)."""
    from flows.extract_cli import caption, encode, features

    @click.group()
    @click.pass_context
    def cli(ctx):
        ctx.obj = {"workspace": ws.uri}

    for command in (caption, encode, features):
        cli.add_command(command)
    result = CliRunner().invoke(
        cli, [*args, "--no-progress", "--json"] if args[0] != "features" else [*args, "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("[" if args[0] == "features" else "{") :])


def test_every_feature_has_exactly_one_row_per_item_with_input(ml_ws):
    """Captions and CLIP image vectors for the 1,663 posters, CLIP title vectors for all 1,682 items, MiniLM vectors
    for exactly the items with an overview and for every caption; the 19 poster-less movies are "no input"."""
    ws = ml_ws
    cap = mmfeat(ws, "caption", "--model", "tiny-test", "--max-new-tokens", "8")
    assert (cap["done"], cap["no_input"], cap["failed"]) == (1663, 19, 0)
    assert ws.count("captions") == 1663
    missing = run_sql(ws, "select item_id from items anti join captions using (item_id)")[
        "item_id"
    ].to_pylist()
    assert set(missing) == NO_POSTER

    image = mmfeat(ws, "encode", "image", "--model", "tiny-test")
    assert (image["done"], image["no_input"], image["failed"]) == (1663, 19, 0)
    title = mmfeat(ws, "encode", "text", "--clip-text", "--model", "tiny-test")
    assert (title["feature"], title["done"], title["no_input"]) == ("clip_title", 1682, 0)
    overview = mmfeat(ws, "encode", "text", "--fields", "text", "--feature", "overview")
    with_overview = run_sql(ws, "select count(*) n from items where trim(coalesce(text, '')) <> ''")["n"][
        0
    ].as_py()
    assert overview["done"] == with_overview and overview["no_input"] == 1682 - with_overview
    captions = mmfeat(ws, "encode", "caption")
    assert (captions["feature"], captions["done"], captions["no_input"]) == ("caption_text", 1663, 19)
    assert ws.count(FAILURES.name) == 0

    counts = {
        t: ws.count(t) for t in ("feat_clip_image", "feat_clip_title", "feat_overview", "feat_caption_text")
    }
    assert counts == {"feat_clip_image": 1663, "feat_clip_title": 1682, "feat_overview": with_overview,
                      "feat_caption_text": 1663}  # fmt: skip
    for table in counts:
        ids = ws.read(table, columns=["item_id"])["item_id"]
        assert len(set(ids.to_pylist())) == ids.length()
    listed = {f["feature"]: f for f in mmfeat(ws, "features")}
    assert listed["clip_image"]["untrained"] and not listed["overview"]["untrained"]
    assert listed["overview"]["dim"] == 384 and listed["clip_image"]["dim"] == 32
    assert listed["clip_title"]["coverage"] == 1.0
    assert {f.feature for f in list_features(ws)} == {
        "caption",
        "clip_image",
        "clip_title",
        "overview",
        "caption_text",
    }

    again = mmfeat(ws, "encode", "image", "--model", "tiny-test")
    assert (again["model_calls"], again["done"], again["skipped"]) == (0, 0, 1663)


def test_minilm_neighbours_share_genres(ml_ws):
    """With the real MiniLM over "title. overview", an item's 10 nearest neighbours share its genres far beyond
    chance: mean genre Jaccard at least 1.4x that of random pairs, and for Horror, Western, Children and SciFi items
    at least 3x the genre's base rate among their neighbours."""
    ws = ml_ws
    s = mmfeat(ws, "encode", "text", "--fields", "title,text", "--feature", "text")
    assert s["done"] + s["skipped"] == 1682
    rows = run_sql(
        ws, "select v.item_id, v.vector, i.attributes from feat_text v join items i using (item_id)"
    )
    vectors = np.array(rows["vector"].to_pylist(), np.float32)
    genres = [set(json.loads(a)["genres"]) for a in rows["attributes"].to_pylist()]
    n = len(genres)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    neighbour = np.mean([jaccard(genres[i], genres[j]) for i in range(n) for j in top[i]])
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, n, size=(20_000, 2))
    random_pairs = np.mean([jaccard(genres[a], genres[b]) for a, b in pairs if a != b])
    assert neighbour >= 1.4 * random_pairs, (neighbour, random_pairs)
    for genre in ("Horror", "Western", "Children", "SciFi"):
        members = [i for i in range(n) if genre in genres[i]]
        base = len(members) / n
        share = np.mean([genre in genres[j] for i in members for j in top[i]])
        assert share >= 3 * base, (genre, share, base)
