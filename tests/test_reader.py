"""FeatureReader over a snapshot: aligned ids and features, split parts, graphs, BPR and full-ranking datasets,
pickling into DataLoader workers, and the all-ranking metrics the example trainer reports."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from recipes.train_example import TrainConfig, compare, evaluate
from stores import artifacts
from stores.reader import FeatureReader, UserBatches, pair_keys, sample_negatives
from stores.workspace import Workspace
from tests.test_snapshots import N_ITEMS, tiny_workspace


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory) -> Workspace:
    return tiny_workspace(Workspace(tmp_path_factory.mktemp("tiny") / "ws"), seed=3)


@pytest.fixture
def reader(tiny_ws) -> FeatureReader:
    return FeatureReader(tiny_ws, "s1")


def test_ids_features_and_parts_are_aligned(reader, tiny_ws):
    """Item index k is the k-th sorted item id everywhere: feature row k is that item's stored vector, the mask is
    False exactly for items without a vector, and the split parts are the split table's rows by label."""
    assert list(reader.items) == sorted(reader.items) and reader.n_items == N_ITEMS
    stored = tiny_ws.read("feat_text").to_pylist()
    text, mask = reader.feature("text")
    assert text.dtype == torch.float32 and mask.dtype == torch.bool
    for row in stored:
        k = reader.item_index([row["item_id"]])[0]
        assert np.array_equal(text[k].numpy(), np.asarray(row["vector"], np.float32))
    assert sorted(reader.items[~mask.numpy()]) == ["018", "019"]
    assert text[~mask].abs().sum().item() == 0
    split = artifacts.load_split(tiny_ws, "main").to_pylist()
    for part, label in (("train", 0), ("valid", 1), ("test", 2)):
        got = reader.interactions(part).numpy()
        want = [(r["user_id"], r["item_id"]) for r in split if r["label"] == label]
        assert [(reader.users[u], reader.items[i]) for u, i in got] == want


def test_graphs_match_the_stored_artifacts(reader, tiny_ws):
    """Graphs come back as torch sparse tensors equal to `load_graph`'s matrices (users then items for user-item)."""
    for name in ("ui", "knn"):
        want, _ = artifacts.load_graph(tiny_ws, name)
        got = reader.graph(name)
        assert got.is_sparse and got.dtype == torch.float32
        assert np.array_equal(got.to_dense().numpy(), want.toarray())
    assert reader.graph("ui").shape == (reader.n_users + N_ITEMS,) * 2
    assert reader.graph_names("item") == ["knn"] and reader.graph_names("user+item") == ["ui"]
    with pytest.raises(KeyError, match="not in snapshot"):
        reader.graph("nope")


def test_bpr_negatives_exclude_train_positives_and_are_seeded(reader):
    """Every negative is an item the user has no train interaction with; each epoch covers every train row once;
    the same (seed, epoch) gives the same batches and another epoch other negatives; feature rows are the items'."""
    ds = reader.bpr(batch_size=16, features=["text", "image"], seed=5)
    train = reader.positives("train").toarray().astype(bool)
    text = reader.feature("text")[0]
    epochs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        batches = [ds[b] for b in range(len(ds))]
        user = torch.cat([b["user"] for b in batches]).numpy()
        pos = torch.cat([b["pos"] for b in batches]).numpy()
        neg = torch.cat([b["neg"] for b in batches]).numpy()
        assert not train[user, neg].any()
        assert train[user, pos].all()
        assert sorted(zip(user, pos, strict=True)) == sorted(map(tuple, reader.interactions("train").numpy()))
        for b in batches:
            assert torch.equal(b["pos_text"], text[b["pos"]]) and torch.equal(b["neg_text"], text[b["neg"]])
            assert b["neg_image"].shape == (len(b["user"]), 4)
        epochs.append(neg)
    ds.set_epoch(0)
    assert np.array_equal(torch.cat([ds[b]["neg"] for b in range(len(ds))]).numpy(), epochs[0])
    assert not np.array_equal(epochs[0], epochs[1])


def test_sample_negatives_edge_cases():
    """A user with one free item always gets it; a user who has every item is an error naming the user."""
    n_items = 50
    keys = pair_keys(np.zeros(49, np.int64), np.arange(1, 50), n_items)
    neg = sample_negatives(np.random.default_rng(0), np.zeros(100, np.int64), n_items, keys)
    assert (neg == 0).all()
    full = pair_keys(np.zeros(50, np.int64), np.arange(50), n_items)
    with pytest.raises(ValueError, match="user index 0 interacted with all 50 items"):
        sample_negatives(np.random.default_rng(0), np.zeros(3, np.int64), n_items, full)


# Workers only cut batches from NumPy arrays and never call into Lance, so Lance's fork warning does not apply.
@pytest.mark.filterwarnings("ignore:lance is not fork-safe")
def test_reader_pickles_without_handles_and_feeds_workers(reader):
    """The reader pickles to its URI, snapshot name and NumPy arrays (what spawn-started workers receive), and a
    DataLoader with two workers yields exactly the batches the main process cuts."""
    ds = reader.bpr(batch_size=8, features=["text"], seed=1)
    ds.set_epoch(2)
    state = pickle.loads(pickle.dumps(reader)).__getstate__()
    assert set(state) == {"uri", "storage_options", "snapshot", "manifest", "arrays"}
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.feature("text")[0], reader.feature("text")[0])
    want = [ds[b] for b in range(len(ds))]
    revived = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(revived[2][k], want[2][k]) for k in want[2])
    got = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.slow
def test_spawn_loader_yields_the_zero_worker_batches_across_epochs(reader):
    """`BprDataset.loader` with 2 spawn-started persistent workers yields exactly the batches the 0-worker reader
    cuts (ids, negatives and feature rows), in order, for two epochs set by `set_epoch` after the workers started:
    the epoch reaches workers that live across epochs. A second seed gives other batches through the same path."""
    ds = reader.bpr(batch_size=8, features=["text", "image"], seed=5)
    other = reader.bpr(batch_size=8, features=["text"], seed=6)
    loader = ds.loader(num_workers=2)
    assert (
        loader._loader.persistent_workers
        and loader._loader.multiprocessing_context.get_start_method() == "spawn"
    )
    try:
        wants = []
        for epoch in (3, 0):
            ds.set_epoch(epoch)
            want = [ds[b] for b in range(len(ds))]
            got = list(loader)
            assert len(got) == len(want) == len(loader)
            for g, w in zip(got, want, strict=True):
                assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
            wants.append(torch.cat([w["neg"] for w in want]))
        assert not torch.equal(wants[0], wants[1])
    finally:
        loader.close()
    other.set_epoch(3)
    in_process = list(other.loader(num_workers=0))
    assert [torch.equal(g["neg"], other[b]["neg"]) for b, g in enumerate(in_process)] == [True] * len(other)
    assert not torch.equal(torch.cat([g["neg"] for g in in_process]), wants[0])


def test_user_batches_cover_held_out_users_and_mask_train(reader):
    """Full-ranking batches list each user with test items once, with exactly their test items as truth and their
    train items as the mask."""
    batches = reader.user_batches("test", batch_size=5)
    test, train = reader.positives("test"), reader.positives("train")
    seen = []
    for b in DataLoader(batches, batch_size=None, num_workers=0):
        users = b["user"].numpy()
        seen.extend(users)
        truth = sp.csr_matrix(
            (np.ones(len(b["truth_row"])), (b["truth_row"], b["truth_item"])), shape=(len(users), N_ITEMS)
        )
        excl = sp.csr_matrix(
            (np.ones(len(b["exclude_row"])), (b["exclude_row"], b["exclude_item"])),
            shape=(len(users), N_ITEMS),
        )
        assert (truth != test[users]).nnz == 0 and (excl != train[users]).nnz == 0
    assert seen == list(np.flatnonzero(np.diff(test.indptr)))


def test_evaluate_matches_hand_computed_metrics():
    """recall@k and NDCG@k follow MMRec: masked train items never count; recall divides by the held-out count;
    NDCG divides by the ideal DCG of min(held-out, k) hits."""
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    truth = sp.csr_matrix(np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]))
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    batches = UserBatches(truth=truth, exclude_matrix=exclude, batch_size=2)
    got = evaluate(lambda u: scores[u], batches, ks=(1, 3))
    # user 0: item 0 masked -> ranking 1,2,3,4: hits at ranks 1 and 3. user 1: ranking 4,3,2,1,0: no hit in top 3.
    log2 = np.log2
    assert got["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["recall@3"] == pytest.approx((2 / 2 + 0) / 2)
    assert got["ndcg@1"] == pytest.approx((1.0 + 0) / 2)
    assert got["ndcg@3"] == pytest.approx(((1 + 1 / log2(4)) / (1 + 1 / log2(3)) + 0) / 2)
    assert got["users"] == 2


def test_train_example_runs_on_a_tiny_snapshot(reader):
    """The three example models train end to end on a snapshot and report every metric in [0, 1]."""
    results = compare(reader, TrainConfig(epochs=2, eval_every=1, batch_size=32, dim=8))
    assert set(results) == {"popularity", "mf_bpr", "freedom"}
    for r in results.values():
        assert all(0.0 <= r[f"{m}@{k}"] <= 1.0 for m in ("recall", "ndcg") for k in (10, 20))
    assert results["freedom"]["train"]["epochs"] == 2


@pytest.mark.slow
def test_train_example_with_workers_trains_the_same_model(reader):
    """`TrainConfig(workers=2)` reads through persistent spawn workers (BprDataset.loader) and trains exactly the
    model the in-process reads train: the same batches in the same order, so the same metrics."""
    cfg = TrainConfig(models=("mf_bpr",), epochs=2, eval_every=1, batch_size=32, dim=8)
    alone = compare(reader, cfg)["mf_bpr"]
    workers = compare(reader, dataclasses.replace(cfg, workers=2))["mf_bpr"]
    drop = ("train",)
    assert {k: v for k, v in workers.items() if k not in drop} == {
        k: v for k, v in alone.items() if k not in drop
    }


def test_copy_of_workspace_reads_the_same(reader, tiny_ws, tmp_path):
    """A snapshot travels with its workspace: a copied workspace serves the same arrays."""
    shutil.copytree(tiny_ws.uri, tmp_path / "copy")
    other = FeatureReader(tmp_path / "copy", "s1")
    assert torch.equal(other.feature("image")[0], reader.feature("image")[0])
    assert torch.equal(other.interactions("valid"), reader.interactions("valid"))


def test_unlearning_eval_full_vs_retain(reader, tiny_ws):
    """With a retain split that drops one user's train rows, the forget set is exactly those rows; both the full and
    the retain-only model are scored on forget, retain and test interactions."""
    import pyarrow.compute as pc

    from recipes.train_example import unlearning_eval

    split = artifacts.load_split(tiny_ws, "main")
    gone = pc.and_(pc.equal(split["user_id"], "u03"), pc.equal(split["label"], 0))
    retain = split.filter(pc.invert(gone))
    results = unlearning_eval(reader, retain, TrainConfig(models=("popularity", "mf_bpr"), epochs=2, dim=8))
    assert results["counts"] == {
        "forget": pc.sum(gone).as_py(),
        "retain": len(reader.interactions("train")) - pc.sum(gone).as_py(),
    }
    assert set(results) == {"counts", "popularity/full", "popularity/retain", "mf_bpr/full", "mf_bpr/retain"}
    for name in ("popularity/full", "mf_bpr/retain"):
        assert results[name]["forget"]["users"] == 1
        assert set(results[name]) == {"forget", "retain", "test", "train"}


def test_train_example_cli(reader, tiny_ws):
    """`mmfeat train-example --snapshot s1` prints the metrics table; an unknown snapshot is a clean error."""
    from click.testing import CliRunner

    from flows.cli import cli

    base = ["--workspace", tiny_ws.uri, "train-example"]
    res = CliRunner().invoke(
        cli,
        [*base, "--snapshot", "s1", "--epochs", "1", "--model", "popularity", "--model", "mf_bpr", "--json"],
        obj={},
    )
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.output)) == {"popularity", "mf_bpr"}
    res = CliRunner().invoke(cli, [*base, "--snapshot", "nope"], obj={})
    assert res.exit_code != 0 and "no snapshot named 'nope'" in res.output
