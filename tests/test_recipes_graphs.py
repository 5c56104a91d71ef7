"""Graph recipes against dense transcriptions of the published MMRec / DualGNN / MMHCL code.

The reference side of each test is written from the papers' code (dense N x N torch or NumPy), not from
recipes/, so a shared mistake cannot hide.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp
import torch

from recipes.graphs.cooccur import item_cooccurrence, user_cooccurrence
from recipes.graphs.hypergraph import (
    hgnn_operator,
    item_incidence,
    knn_incidence,
    mmhcl_item_graph,
    mmhcl_user_graph,
    user_incidence,
)
from recipes.graphs.knn import (
    KnnConfig,
    freedom_mm_graph,
    knn_edges,
    knn_graph,
    knn_recall,
    knn_topk,
    multimodal_knn_graph,
)
from recipes.graphs.user_item import csr_to_edges, edges_to_csr, to_torch_sparse, train_matrix, ui_adjacency
from recipes.splits import SplitConfig, make_split
from stores.ids import id_maps, index_ids

# ---------------------------------------------------------------- references (dense, from the papers' code)


def ref_build_sim(x: torch.Tensor) -> torch.Tensor:
    xn = x.div(torch.norm(x, p=2, dim=-1, keepdim=True))
    return torch.mm(xn, xn.transpose(1, 0))


def ref_lattice(x: torch.Tensor, k: int) -> torch.Tensor:
    """LATTICE: build_sim -> build_knn_neighbourhood -> compute_normalized_laplacian (utils.py)."""
    adj = ref_build_sim(x)
    knn_val, knn_ind = torch.topk(adj, k, dim=-1)
    adj = torch.zeros_like(adj).scatter_(-1, knn_ind, knn_val)
    rowsum = torch.sum(adj, -1)
    d_inv_sqrt = torch.pow(rowsum, -0.5)
    d_inv_sqrt[torch.isinf(d_inv_sqrt)] = 0.0
    d = torch.diagflat(d_inv_sqrt)
    return torch.mm(torch.mm(d, adj), d)


def ref_freedom(x: torch.Tensor, k: int) -> torch.Tensor:
    """FREEDOM.get_knn_adj_mat + compute_normalized_laplacian(indices, adj_size), densified."""
    sim = ref_build_sim(x)
    _, knn_ind = torch.topk(sim, k, dim=-1)
    indices0 = torch.arange(knn_ind.shape[0]).unsqueeze(1).expand(-1, k)
    indices = torch.stack((torch.flatten(indices0), torch.flatten(knn_ind)), 0)
    adj = torch.sparse_coo_tensor(indices, torch.ones_like(indices[0]), sim.size(), check_invariants=True)
    row_sum = 1e-7 + torch.sparse.sum(adj, -1).to_dense()
    r_inv_sqrt = torch.pow(row_sum, -0.5)
    values = r_inv_sqrt[indices[0]] * r_inv_sqrt[indices[1]]
    return torch.sparse_coo_tensor(indices, values, sim.size(), check_invariants=True).to_dense()


def ref_norm_adj(r: np.ndarray) -> np.ndarray:
    """FREEDOM.get_norm_adj_mat on a dense users x items 0/1 matrix."""
    n_u, n_i = r.shape
    a = np.zeros((n_u + n_i, n_u + n_i))
    a[:n_u, n_u:] = r
    a[n_u:, :n_u] = r.T
    diag = (a > 0).sum(axis=1) + 1e-7
    d = np.diag(np.power(diag, -0.5))
    return d @ a @ d


def ref_lattice_adj(r: np.ndarray) -> np.ndarray:
    """LATTICE.get_adj_mat: D^-1 (A + I)."""
    n_u, n_i = r.shape
    a = np.zeros((n_u + n_i, n_u + n_i))
    a[:n_u, n_u:] = r
    a[n_u:, :n_u] = r.T
    a = a + np.eye(len(a))
    return a / a.sum(axis=1, keepdims=True)


def dense_train(split: pa.Table) -> np.ndarray:
    users, items = id_maps(split)
    train = split.filter(pc.equal(split["label"], 0))
    r = np.zeros((len(users), len(items)))
    for u, i in zip(train["user_id"].to_pylist(), train["item_id"].to_pylist(), strict=True):
        r[list(users).index(u), list(items).index(i)] = 1.0
    return r


# ---------------------------------------------------------------- fixtures


def random_split(seed: int = 0, n_users: int = 15, n_items: int = 20, n: int = 160) -> pa.Table:
    rng = np.random.default_rng(seed)
    t = pa.table(
        {
            "user_id": pa.array([f"u{x:02d}" for x in rng.integers(0, n_users, n)]),
            "item_id": pa.array([f"{x:05d}" for x in rng.integers(0, n_items, n)]),
            "timestamp": pa.array(rng.integers(1_000, 2_000, n), pa.timestamp("s", tz="UTC")),
            "event": pa.array(["click"] * n),
            "value": pa.array([None] * n, pa.float64()),
        }
    )
    return make_split(t, SplitConfig(scheme="random", seed=seed, min_ratio_inters=4))


def compare_rows(ours: sp.csr_matrix, ref: np.ndarray, sim: np.ndarray, k: int, atol: float = 1e-6) -> None:
    """Per row: same neighbour set and weights within atol, except rows whose k-th and (k+1)-th
    similarities tie (within 1e-5), where either choice is right."""
    dense = ours.toarray()
    checked = 0
    for row in range(ref.shape[0]):
        s = np.sort(sim[row])[::-1]
        if k < len(s) and s[k - 1] - s[k] < 1e-5:
            continue
        assert set(np.flatnonzero(dense[row])) == set(np.flatnonzero(ref[row])), row
        np.testing.assert_allclose(dense[row], ref[row], atol=atol, rtol=0)
        checked += 1
    assert checked >= ref.shape[0] * 0.9


# ---------------------------------------------------------------- user-item graphs


def test_ui_adjacency_matches_freedom_and_lattice():
    """Normalised user-item graphs equal FREEDOM's D^-1/2 A D^-1/2 (degree + 1e-7) and LATTICE's
    D^-1 (A + I) built densely from the train rows."""
    split = random_split(1)
    r = dense_train(split)
    np.testing.assert_allclose(ui_adjacency(split, "none").toarray()[: r.shape[0], r.shape[0] :], r)
    np.testing.assert_allclose(ui_adjacency(split, "sym").toarray(), ref_norm_adj(r), atol=1e-6)
    np.testing.assert_allclose(ui_adjacency(split, "lattice").toarray(), ref_lattice_adj(r), atol=1e-6)


def test_edges_and_torch_round_trip():
    """csr -> Arrow edges -> csr and csr -> torch sparse keep every entry; the edge schema is int32/float32."""
    adj = ui_adjacency(random_split(2), "sym")
    edges = csr_to_edges(adj)
    assert edges.schema.types == [pa.int32(), pa.int32(), pa.float32()]
    back = edges_to_csr(edges, adj.shape[0])
    assert (back != adj).nnz == 0
    t = to_torch_sparse(adj)
    np.testing.assert_allclose(t.to_dense().numpy(), adj.toarray())


# ---------------------------------------------------------------- item-item kNN graphs


@pytest.mark.parametrize("block_rows,max_tile", [(1024, 1 << 27), (7, 7 * 13)])
def test_knn_matches_lattice_and_freedom(block_rows, max_tile):
    """Blocked top-k graphs equal MMRec's dense LATTICE and FREEDOM graphs row by row (same neighbours,
    weights within 1e-6), with one tile and with many small row/column tiles."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((57, 16)).astype(np.float32)
    k = 5
    sim = ref_build_sim(torch.from_numpy(x)).numpy()
    lat = knn_graph(x, KnnConfig(k=k, norm="lattice", block_rows=block_rows, max_tile=max_tile))
    compare_rows(lat, ref_lattice(torch.from_numpy(x), k).numpy(), sim, k)
    fre = knn_graph(x, KnnConfig(k=k, norm="freedom", block_rows=block_rows, max_tile=max_tile))
    compare_rows(fre, ref_freedom(torch.from_numpy(x), k).numpy(), sim, k)
    # FREEDOM's formula uses row sums on both sides: every weight is 1/k, in-degree notwithstanding.
    np.testing.assert_allclose(fre.data, 1.0 / k, atol=1e-6)


def test_fused_freedom_graph_matches_reference():
    """FREEDOM's mm_adj = 0.1 * image_adj + 0.9 * text_adj, compared per row with the dense reference."""
    rng = np.random.default_rng(4)
    img = rng.standard_normal((40, 12)).astype(np.float32)
    txt = rng.standard_normal((40, 8)).astype(np.float32)
    k = 4
    ref = 0.1 * ref_freedom(torch.from_numpy(img), k) + 0.9 * ref_freedom(torch.from_numpy(txt), k)
    ours = freedom_mm_graph(img, txt, KnnConfig(k=k, block_rows=9, max_tile=9 * 11), image_weight=0.1)
    sim_i = ref_build_sim(torch.from_numpy(img)).numpy()
    sim_t = ref_build_sim(torch.from_numpy(txt)).numpy()
    clear = [
        r
        for r in range(40)
        if all(np.sort(s[r])[::-1][k - 1] - np.sort(s[r])[::-1][k] > 1e-5 for s in (sim_i, sim_t))
    ]
    dense = ours.toarray()
    np.testing.assert_allclose(dense[clear], ref.numpy()[clear], atol=1e-6)
    generic = multimodal_knn_graph({"a": img, "b": txt}, {"a": 0.1, "b": 0.9}, KnnConfig(k=k))
    np.testing.assert_allclose(generic.toarray()[clear], dense[clear], atol=1e-6)


def test_knn_options_self_loops_symmetric_edges_recall():
    """self_loops=False never links an item to itself and still gives k neighbours; symmetric=True yields
    a symmetric matrix; the edge table is (src, dst, weight); recall of a graph against itself is 1."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 6)).astype(np.float32)
    idx, sim = knn_topk(x, 3, exclude_self=True, block_rows=4, max_tile=4 * 5)
    assert not (idx == np.arange(30)[:, None]).any()
    assert (np.diff(sim, axis=1) <= 0).all()
    g = knn_graph(x, KnnConfig(k=3, norm="none", symmetric=True, self_loops=False))
    assert (g != g.T).nnz == 0 and g.diagonal().sum() == 0
    exact = knn_edges(x, KnnConfig(k=3))
    assert exact.column_names == ["src", "dst", "weight"] and exact.num_rows == 90
    assert knn_recall(exact, exact) == 1.0
    assert knn_recall(exact.slice(0, 45), exact) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="candidate neighbours"):
        knn_topk(x[:3], 3, exclude_self=True)


# ---------------------------------------------------------------- co-occurrence and hypergraphs


def test_cooccurrence_matches_dense_products():
    """Item-item counts / Jaccard and user-user counts equal dense R^T R and R R^T (diagonal removed) with
    a per-row top-k, and the user graph equals DualGNN's gen_user_matrix + top-k."""
    split = random_split(6)
    r = dense_train(split)
    n_items = r.shape[1]
    c = r.T @ r
    np.fill_diagonal(c, 0)
    deg = r.sum(axis=0)
    jac = np.where(c > 0, c / (deg[:, None] + deg[None, :] - c + (c == 0)), 0)
    for weight, ref in (("count", c), ("jaccard", jac)):
        edges = item_cooccurrence(split, k=3, weight=weight, max_block_work=25)
        g = edges_to_csr(edges, n_items).toarray()
        for row in range(n_items):
            vals = np.sort(ref[row][ref[row] > 0])[::-1]
            kept = g[row][g[row] > 0]
            assert len(kept) == min(3, len(vals))
            np.testing.assert_allclose(np.sort(kept)[::-1], vals[:3], rtol=1e-6)
            for j in np.flatnonzero(g[row]):
                assert g[row, j] == pytest.approx(ref[row, j], rel=1e-6)
    # DualGNN gen_user_matrix: symmetric shared-item counts, then per user topk over non-zeros.
    uu = r @ r.T
    np.fill_diagonal(uu, 0)
    edges = user_cooccurrence(split, k=200, max_block_work=10)
    g = edges_to_csr(edges, r.shape[0]).toarray()
    np.testing.assert_allclose(g, uu)


def test_hypergraphs_match_mmhcl():
    """User incidence is R, item incidence R^T; MMHCL's u2u (R R^T, no diagonal, row-normalised) and i2i
    (H H^T of binary top-k per modality, sym-normalised) equal their dense transcriptions; the HGNN operator
    equals Dv^-1/2 H De^-1 H^T Dv^-1/2."""
    split = random_split(7)
    r = dense_train(split)
    np.testing.assert_allclose(user_incidence(split).toarray(), r)
    np.testing.assert_allclose(item_incidence(split).toarray(), r.T)
    uu = torch.from_numpy(r @ r.T).float()
    uu[torch.eye(len(uu)) > 0] = 0
    rowsum = uu.sum(-1)
    d = torch.pow(rowsum, -1)
    d[torch.isinf(d)] = 0
    np.testing.assert_allclose(
        mmhcl_user_graph(split, max_block_work=10).toarray(), (d[:, None] * uu).numpy(), atol=1e-6
    )

    rng = np.random.default_rng(8)
    img = torch.from_numpy(rng.standard_normal((25, 8)).astype(np.float32))
    txt = torch.from_numpy(rng.standard_normal((25, 5)).astype(np.float32))
    k = 4
    blocks = []
    for f in (img, txt):
        s = ref_build_sim(f)
        val, ind = torch.topk(s, k, dim=-1)
        blocks.append((torch.zeros_like(s).scatter_(-1, ind, val) != 0).float())
    h = torch.cat(blocks, dim=1)
    m = torch.mm(h, h.T)
    ds = torch.pow(m.sum(-1), -0.5)
    ref = (ds[:, None] * m * ds[None, :]).numpy()
    edges = [knn_edges(f.numpy(), KnnConfig(k=k)) for f in (img, txt)]
    np.testing.assert_allclose(knn_incidence(edges, 25).toarray(), h.numpy())
    np.testing.assert_allclose(mmhcl_item_graph(edges, 25).toarray(), ref, atol=1e-6)

    hh = r.T  # items x users
    dv = hh.sum(axis=1)
    de = hh.sum(axis=0)
    with np.errstate(divide="ignore"):
        dvi = np.where(dv > 0, dv**-0.5, 0)
        dei = np.where(de > 0, 1 / de, 0)
    ref = np.diag(dvi) @ hh @ np.diag(dei) @ hh.T @ np.diag(dvi)
    np.testing.assert_allclose(hgnn_operator(item_incidence(split)).toarray(), ref, atol=1e-6)


def test_no_heldout_interaction_reaches_any_graph():
    """No validation or test (user, item) pair becomes an edge of the user-item graph, weighs in a
    co-occurrence count or joins a hypergraph; all nodes of the split still exist (as isolated ones)."""
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 3), ("b", "z", 4), ("c", "y", 5), ("c", "q", 6)]
    t = pa.table(
        {
            "user_id": pa.array([r[0] for r in rows]),
            "item_id": pa.array([r[1] for r in rows]),
            "timestamp": pa.array([r[2] for r in rows], pa.timestamp("s", tz="UTC")),
            "event": pa.array(["click"] * 6),
            "value": pa.array([None] * 6, pa.float64()),
        }
    )
    split = t.append_column("label", pa.array([0, 0, 0, 1, 0, 2], pa.int8()))  # (b,z) valid, (c,q) test
    users, items = id_maps(split)
    held = split.filter(pc.not_equal(split["label"], 0))
    hu, hi = index_ids(held, users, items)
    n_u = len(users)

    r = train_matrix(split)
    assert r.shape == (3, 4) and r.nnz == 4
    for norm in ("none", "sym", "lattice"):
        adj = ui_adjacency(split, norm)
        assert adj.shape == (7, 7)
        for u, i in zip(hu, hi, strict=True):
            assert adj[u, n_u + i] == 0 and adj[n_u + i, u] == 0
    # z and q have no train users: no co-occurrence edge, no hyperedge, no incidence.
    z, q = list(items).index("z"), list(items).index("q")
    ii = item_cooccurrence(split, k=10)
    nodes = set(ii["src"].to_pylist()) | set(ii["dst"].to_pylist())
    assert z not in nodes and q not in nodes
    # Users b and c share no train item (b's z is valid), a-b share x, a-c share y.
    uu = edges_to_csr(user_cooccurrence(split, k=10), n_u).toarray()
    b, c = list(users).index("b"), list(users).index("c")
    assert uu[b, c] == 0 and uu.sum() == 4
    assert user_incidence(split)[:, [z, q]].nnz == 0
    assert item_incidence(split)[[z, q]].nnz == 0
    assert mmhcl_user_graph(split)[b, c] == 0
    with pytest.raises(ValueError, match="label"):
        ui_adjacency(t)


# ---------------------------------------------------------------- missing modalities (stores/missing.py)


def ref_present_freedom(x: np.ndarray, have: np.ndarray, k: int) -> np.ndarray:
    """FREEDOM's top-k graph (self included, weights (k + 1e-7)^-1) computed densely in NumPy among the items
    that have the modality; the others get an empty row and column."""
    n = len(x)
    rows = np.flatnonzero(have)
    xn = x[rows].astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    sim = xn @ xn.T
    out = np.zeros((n, n))
    for a, i in enumerate(rows):
        out[i, rows[np.argsort(-sim[a], kind="stable")[:k]]] = 1.0 / (k + 1e-7)
    return out


def clear_rows(x: np.ndarray, have: np.ndarray, k: int) -> np.ndarray:
    """Bool [n]: items whose k-th and (k+1)-th similarities (among the items with the modality) differ by more
    than 1e-5, so the top-k set is unambiguous; items without the modality are trivially clear."""
    out = np.ones(len(x), dtype=bool)
    rows = np.flatnonzero(have)
    xn = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
    s = -np.sort(-(xn @ xn.T), axis=1)
    out[rows] = s[:, k - 1] - s[:, k] > 1e-5
    return out


def incomplete_catalogue(
    n: int = 200, seed: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image [n, 8], text [n, 8], has_image, has_text): 60% of the items lack text, 10% an image; a missing
    vector is a zero row, as `artifacts.feature_matrix` returns it."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, 8)).astype(np.float32)
    text = rng.standard_normal((n, 8)).astype(np.float32)
    has_text = np.ones(n, bool)
    has_text[rng.choice(n, int(0.6 * n), replace=False)] = False
    has_image = np.ones(n, bool)
    has_image[rng.choice(n, int(0.1 * n), replace=False)] = False
    image[~has_image] = 0
    text[~has_text] = 0
    return image, text, has_image, has_text


def test_fused_graph_with_missing_modalities_has_no_hubs_and_matches_dense_policy():
    """60% of items lack text and 10% an image. The fused FREEDOM graph: no item gets more than 3k incoming
    edges (before the policy, every item without text had the same k "text neighbours"); an item missing one
    modality keeps exactly k neighbours from the other, at full weight (row sum 1); an item missing both has
    none; and the graph equals the policy computed densely: per-modality top-k among the items that have it,
    fused with each item's weights renormalised over the modalities it has."""
    k = 10
    image, text, has_image, has_text = incomplete_catalogue()
    masks = {"image": has_image, "text": has_text}
    ours = freedom_mm_graph(image, text, KnnConfig(k=k, block_rows=16, max_tile=16 * 50), 0.1, masks)
    dense = ours.toarray()

    in_degree = (dense > 0).sum(axis=0)
    assert in_degree.max() <= 3 * k, np.sort(in_degree)[-5:]
    out_degree = (dense > 0).sum(axis=1)
    one = has_image ^ has_text
    assert one.sum() > 100 and (out_degree[one] == k).all()
    np.testing.assert_allclose(dense[one].sum(axis=1), 1.0, atol=1e-5)
    assert (out_degree[~has_image & ~has_text] == 0).all()
    both = has_image & has_text
    assert ((out_degree[both] >= k) & (out_degree[both] <= 2 * k)).all()

    # the reference: weights written per case, not through stores.missing
    w_image = np.where(both, 0.1, np.where(has_image, 1.0, 0.0))
    w_text = np.where(both, 0.9, np.where(has_text, 1.0, 0.0))
    ref = w_image[:, None] * ref_present_freedom(image, has_image, k) + w_text[:, None] * ref_present_freedom(
        text, has_text, k
    )
    clear = clear_rows(image, has_image, k) & clear_rows(text, has_text, k)
    assert clear.mean() > 0.9
    np.testing.assert_allclose(dense[clear], ref[clear], atol=1e-6)
    # without masks the zero rows are recognised as missing: the same graph
    implicit = freedom_mm_graph(image, text, KnnConfig(k=k), 0.1)
    assert abs(implicit - ours).max() < 1e-6


@pytest.mark.parametrize(
    "cfg",
    [
        KnnConfig(k=4, norm="freedom"),
        KnnConfig(k=4, norm="lattice", symmetric=True),
        KnnConfig(k=4, norm="none", self_loops=False),
    ],
)
def test_per_modality_graph_has_no_edge_to_or_from_items_without_it(cfg):
    """A modality's graph spans only the items that have it: no edge leaves or reaches an item without it
    (even when its placeholder vector is not zero), every item with it keeps k neighbours, and on those items
    the graph equals the graph of the sub-matrix (MMRec's normalisation among the present items)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    have = rng.random(60) > 0.4
    g = knn_graph(x, cfg, have)
    absent = np.flatnonzero(~have)
    assert g[absent].nnz == 0 and g[:, absent].nnz == 0
    out_degree = np.diff(g.indptr)
    assert (out_degree[have] >= cfg.k).all()
    sub = knn_graph(x[have], cfg).toarray()
    np.testing.assert_allclose(g.toarray()[np.ix_(have, have)], sub, atol=1e-6)


def test_knn_graph_manifest_counts_missing_items_and_fingerprint_follows_the_mask(ws, tmp_path):
    """build_knn_graph over a text feature that most items lack: the manifest records how many items lacked each
    input, the stored graph equals the in-memory policy graph, and giving one more item a text vector changes
    the fingerprint and rebuilds the graph (who lacks what is an input)."""
    from recipes.ingest.demo_data import generate_catalog
    from recipes.ingest.load import ingest
    from recipes.ingest.sources import table
    from recipes.pipeline import build_knn_graph, build_split
    from stores import artifacts
    from stores.features import feature_spec
    from stores.workspace import conform

    cat = generate_catalog(tmp_path / "src", n_items=40, n_users=20, seed=1)
    ingest(ws, table(cat.items, cat.interactions, cat.users, cat.images))
    build_split(ws, "s", SplitConfig(scheme="random", seed=1))
    _, items = id_maps(artifacts.load_split(ws, "s"))

    def write(name: str, ids: list[str], seed: int) -> None:
        spec = feature_spec(name, 8)
        vecs = np.random.default_rng(seed).normal(size=(len(ids), 8)).astype(np.float32)
        data = pa.table(
            {
                "item_id": ids,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 8),
                "model": ["random"] * len(ids),
                "revision": ["untrained"] * len(ids),
                "input_hash": [f"{seed}:{i}" for i in ids],
            }
        )
        ws.upsert(spec, conform(data, spec.schema))

    ids = [str(i) for i in items]
    write("img", ids[3:], seed=1)  # 3 items without an image
    write("txt", ids[::3], seed=2)  # two thirds without text
    info = build_knn_graph(ws, "s", ["img", "txt"], k=3, weights=[0.1, 0.9], name="fused")
    n_text = len(ids[::3])
    assert info["missing"] == {"img": 3, "txt": len(ids) - n_text}
    assert info["feature_provenance"]["txt"]["missing_items"] == len(ids) - n_text

    img, img_mask, _ = artifacts.feature_matrix(ws, "img", items)
    txt, txt_mask, _ = artifacts.feature_matrix(ws, "txt", items)
    ref = multimodal_knn_graph(
        {"img": img, "txt": txt}, {"img": 0.1, "txt": 0.9}, KnnConfig(k=3), {"img": img_mask, "txt": txt_mask}
    )
    stored, _ = artifacts.load_graph(ws, "fused")
    assert abs(stored - ref).max() < 1e-6
    assert stored[[1, 2]].nnz == 0 and stored[:, [1, 2]].nnz == 0  # items 1 and 2 lack both features

    again = build_knn_graph(ws, "s", ["img", "txt"], k=3, weights=[0.1, 0.9], name="fused")
    assert again["skipped"]
    write("txt", [ids[1]], seed=3)  # one more item has text now
    rebuilt = build_knn_graph(ws, "s", ["img", "txt"], k=3, weights=[0.1, 0.9], name="fused")
    assert not rebuilt["skipped"] and rebuilt["fingerprint"] != info["fingerprint"]
    assert rebuilt["missing"]["txt"] == len(ids) - n_text - 1
    stored, _ = artifacts.load_graph(ws, "fused")
    assert np.diff(stored.indptr)[1] == 3 and stored[2].nnz == 0  # item 1 has text now: k text neighbours
