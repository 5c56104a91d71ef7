"""The report's statistics and plotly figures: pure functions from Arrow/NumPy to numbers and `go.Figure`s.

recipes/report/render.py lays them out as HTML; nothing here reads a workspace.

    >>> g = knn_to_graph("text", ids, vectors, 10, "computed top-10 cosine", modality="text")
    >>> graph_stats(g)["reciprocity"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from recipes.graphs.knn import knn_topk
from recipes.kcore import dedup_mask, kcore_mask
from stores.ids import seconds, sorted_codes

LABELS = {0: "train", 1: "valid", 2: "test"}
_PALETTE = qualitative.Plotly + qualitative.D3
_TEMPLATE = "plotly_white"


@dataclass
class Graph:
    """An item-item graph: edges as positions into `ids` (string item ids; nodes beyond them have no edge).
    modality: "image" / "text" / "caption" when built from one feature of that kind, else None. group: graphs
    are compared (neighbour overlap) only within one group: one split version, or the report's own sample."""

    name: str
    origin: str
    src: np.ndarray
    dst: np.ndarray
    ids: np.ndarray
    n_nodes: int
    modality: str | None = None
    group: str = ""
    features: tuple[str, ...] = ()


# ---- computations ----------------------------------------------------------------------------------------


def hash_rank(ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random order of string ids (by a stable hash): samples drawn from it agree across tables."""
    return np.argsort(pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False), kind="stable")


def first_category(attributes: str | None) -> str | None:
    """The colour attribute of an item: the first of `genres`, else `category`, from the attributes JSON."""
    try:
        attrs = json.loads(attributes) if attributes else None
    except ValueError:
        return None
    if not isinstance(attrs, dict):
        return None
    genres = attrs.get("genres")
    if isinstance(genres, list) and genres:
        return str(genres[0])
    value = attrs.get("category")
    return str(value) if value not in (None, "") else None


def counts_summary(user: np.ndarray, item: np.ndarray) -> dict[str, float]:
    """Users, items, rows and density (rows / users x items) of integer-coded interactions."""
    n_users, n_items = len(np.unique(user)), len(np.unique(item))
    density = len(user) / (n_users * n_items) if n_users and n_items else 0.0
    return {"users": n_users, "items": n_items, "interactions": len(user), "density": density}


def kcore_effect(interactions: pa.Table, k: int) -> tuple[dict[str, float], dict[str, float]]:
    """(raw, k-core) counts of an interaction table; the core keeps the first row of a repeated pair."""
    user, _ = sorted_codes(interactions["user_id"])
    item, _ = sorted_codes(interactions["item_id"])
    if len(user) == 0:
        empty = counts_summary(user, item)
        return empty, empty
    keep = dedup_mask(user, item, seconds(interactions["timestamp"]), "first")
    idx = np.flatnonzero(keep)
    idx = idx[kcore_mask(user[idx], item[idx], k, k)]
    return counts_summary(user, item), counts_summary(user[idx], item[idx])


def degree_histogram(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(degree, number of nodes with that degree) of integer codes, degree >= 1."""
    degree = np.bincount(codes)
    return np.unique(degree[degree > 0], return_counts=True)


def time_bins(ts: np.ndarray) -> tuple[np.ndarray, int, str]:
    """Bin edges (epoch seconds) of a readable width (hour, day, week, 30 days, year) for about <= 400 bins."""
    lo, hi = int(ts.min()), int(ts.max())
    widths = ((3600, "hour"), (86400, "day"), (7 * 86400, "week"), (30 * 86400, "30 days"))
    width, unit = next(((w, u) for w, u in widths if (hi - lo) / w <= 400), (365 * 86400, "year"))
    start = lo - lo % width
    return np.arange(start, hi + width + 1, width), width, unit


def knn_to_graph(
    name: str, ids: np.ndarray, vectors: np.ndarray, k: int, origin: str, modality: str | None = None
) -> Graph:
    """The exact cosine top-k graph of `vectors` (rows aligned to `ids`; an item is never its own neighbour, k is
    capped at n - 1), in the group of graphs computed here. The top-k is the graph recipes' own."""
    n = len(vectors)
    k = min(k, n - 1)
    if k < 1:
        neighbours = np.zeros((n, 0), dtype=np.int64)
    else:
        neighbours, _ = knn_topk(vectors, k, exclude_self=True)
    src, dst = np.repeat(np.arange(n), neighbours.shape[1]), neighbours.ravel()
    return Graph(name, origin, src, dst, ids, n, modality, group="sample", features=(name,))


def graph_stats(g: Graph) -> dict[str, float]:
    """Edges, mean out-degree, in-degree spread (max, share of nodes never a neighbour) and reciprocity
    (share of edges u->v whose reverse v->u exists); self-loops are left out."""
    keep = g.src != g.dst
    src, dst = g.src[keep].astype(np.int64), g.dst[keep].astype(np.int64)
    indeg = np.bincount(dst, minlength=g.n_nodes)
    keys = np.unique(src * g.n_nodes + dst)
    reverse = (keys % g.n_nodes) * g.n_nodes + keys // g.n_nodes
    return {
        "nodes": g.n_nodes,
        "edges": len(keys),
        "mean_out": len(keys) / max(g.n_nodes, 1),
        "max_in": int(indeg.max()) if len(indeg) else 0,
        "no_in": float((indeg == 0).mean()) if len(indeg) else 0.0,
        "reciprocity": float(np.isin(reverse, keys).mean()) if len(keys) else 0.0,
    }


def neighbour_overlap(a: Graph, b: Graph) -> np.ndarray:
    """Per item in both graphs: shared neighbours |N_a ∩ N_b| (neighbours compared by item id)."""
    universe = pd.Index(np.concatenate([a.ids, b.ids])).unique()
    common = np.intersect1d(a.ids, b.ids)
    if len(common) == 0:
        return np.zeros(0, dtype=np.int64)
    size = len(universe)

    def edge_keys(g: Graph) -> np.ndarray:
        code = universe.get_indexer(g.ids).astype(np.int64)
        keep = g.src != g.dst
        return np.unique(code[g.src[keep]] * size + code[g.dst[keep]])

    shared = np.intersect1d(edge_keys(a), edge_keys(b), assume_unique=True) // size
    per_item = np.bincount(shared, minlength=size)
    return per_item[universe.get_indexer(common)]


def overlap_pairs(graphs: list[Graph]) -> list[tuple[Graph, Graph]]:
    """(image graph, text graph) pairs of one group: built on the same split version, or both computed here."""
    return [
        (a, b)
        for a in graphs
        for b in graphs
        if a.modality == "image" and b.modality == "text" and a.group == b.group
    ]


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of L2-normalised rows: ([n, 2] coordinates, explained variance ratio of the two axes)."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    x = x - x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    # Eigenvectors of the d x d covariance: far cheaper than an SVD of the n x d sample when n >> d.
    var, vecs = np.linalg.eigh(x.T @ x / len(x))
    top = np.argsort(var)[::-1][:2]
    coords = np.zeros((len(x), 2))
    coords[:, : len(top)] = x @ vecs[:, top]
    ratio = np.zeros(2)
    total = var.clip(min=0).sum()
    ratio[: len(top)] = var[top].clip(min=0) / total if total > 0 else 0
    return coords, ratio


def forget_status(receipt: str | None) -> str:
    """'pending' without a receipt, else the receipt's `status` (default 'done')."""
    if not receipt:
        return "pending"
    try:
        parsed = json.loads(receipt)
    except ValueError:
        return "unreadable receipt"
    return str(parsed.get("status", "done")) if isinstance(parsed, dict) else "done"


# ---- figures ---------------------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 15}},
        template=_TEMPLATE,
        height=height,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def fig_card(
    raw: dict[str, float], core: dict[str, float], core_label: str, split: pa.Table | None
) -> go.Figure:
    """Users / items / interactions before and after the core (or split), and the split's label sizes."""
    cols = 2 if split is not None else 1
    titles = [f"raw vs {core_label}"] + (["split rows per label"] if split is not None else [])
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles)
    names = ["users", "items", "interactions"]
    for label, counts, colour in (("raw", raw, _PALETTE[0]), (core_label, core, _PALETTE[1])):
        ys = [counts[n] for n in names]
        fig.add_bar(
            x=names, y=ys, name=label, marker_color=colour, text=[f"{int(y):,}" for y in ys], row=1, col=1
        )
    fig.update_yaxes(type="log", title_text="count (log)", row=1, col=1)
    if split is not None:
        labels = split["label"].to_numpy()
        sizes = [int((labels == v).sum()) for v in LABELS]
        share = [f"{s:,} ({s / max(len(labels), 1):.1%})" for s in sizes]
        fig.add_bar(
            x=list(LABELS.values()),
            y=sizes,
            text=share,
            marker_color=_PALETTE[2:5],
            showlegend=False,
            row=1,
            col=2,
        )
    return _layout(fig, "Dataset size and the effect of filtering")


def fig_degrees(user: np.ndarray, item: np.ndarray) -> go.Figure:
    fig = go.Figure()
    for name, codes, colour in (("users", user, _PALETTE[0]), ("items", item, _PALETTE[1])):
        deg, n = degree_histogram(codes)
        fig.add_scatter(
            x=deg,
            y=n,
            mode="markers",
            name=f"{name} (median {int(np.median(np.bincount(codes)))})",
            marker={"color": colour, "size": 6, "opacity": 0.75},
        )
    fig.update_xaxes(type="log", title_text="interactions per node (degree)")
    fig.update_yaxes(type="log", title_text="number of nodes")
    return _layout(fig, "User and item degree distributions (log-log)")


def fig_time(ts: np.ndarray, split: pa.Table | None) -> go.Figure:
    edges, width, unit = time_bins(ts)
    x = pd.to_datetime(edges[:-1], unit="s", utc=True)
    fig = go.Figure()
    fig.add_scatter(
        x=x,
        y=np.histogram(ts, edges)[0],
        name="all interactions",
        mode="lines",
        line={"color": "#444", "width": 1.5},
    )
    if split is not None:
        split_ts, labels = seconds(split["timestamp"]), split["label"].to_numpy()
        for value, name in LABELS.items():
            sel = split_ts[labels == value]
            fig.add_bar(
                x=x,
                y=np.histogram(sel, edges)[0],
                name=f"split: {name}",
                marker_color=_PALETTE[2 + value],
                opacity=0.8,
            )
        fig.update_layout(barmode="stack", bargap=0)
    fig.update_yaxes(title_text=f"interactions per {unit}")
    return _layout(fig, f"Interactions over time (per {unit})")


def fig_coverage(coverage: dict[str, tuple[int, int]]) -> go.Figure:
    """Horizontal bars: share of items that have each modality."""
    names = list(coverage)[::-1]
    share = [coverage[n][0] / max(coverage[n][1], 1) for n in names]
    text = [f"{coverage[n][0]:,} / {coverage[n][1]:,} ({s:.1%})" for n, s in zip(names, share, strict=True)]
    fig = go.Figure(
        go.Bar(
            x=share,
            y=names,
            orientation="h",
            text=text,
            textposition="auto",
            marker_color=[_PALETTE[i % len(_PALETTE)] for i in range(len(names))],
        )
    )
    fig.update_xaxes(range=[0, 1.05], tickformat=".0%", title_text="share of items")
    return _layout(fig, "Modality coverage per item", height=120 + 40 * len(names))


def fig_captions(captions: pa.Table) -> go.Figure:
    words = pc.list_value_length(pc.utf8_split_whitespace(captions["caption"].fill_null(""))).to_numpy()
    models = (
        captions["model"].fill_null("?").to_numpy(zero_copy_only=False)
        if "model" in captions.column_names
        else np.full(len(words), "captions", dtype=object)
    )
    fig = go.Figure()
    for i, model in enumerate(sorted(set(models))):
        sel = words[models == model]
        fig.add_histogram(
            x=sel,
            name=f"{model} (n={len(sel):,}, median {np.median(sel):.0f} words)",
            marker_color=_PALETTE[i % len(_PALETTE)],
            opacity=0.75,
            nbinsx=40,
        )
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="caption length (words)")
    fig.update_yaxes(title_text="captions")
    return _layout(fig, "Caption length distribution")


def fig_projection(
    name: str,
    coords: np.ndarray,
    ratio: np.ndarray,
    categories: list[str | None],
    hover: list[str],
    max_categories: int,
    n_total: int,
) -> go.Figure:
    """A PCA scatter coloured by the top categories (the rest 'other', missing 'none')."""
    cats = np.array([c if c is not None else "none" for c in categories], dtype=object)
    ranked = pd.Series(cats[cats != "none"]).value_counts().index[:max_categories].tolist()
    cats = np.where(np.isin(cats, ranked + ["none"]), cats, "other")
    hover_arr = np.asarray(hover, dtype=object)
    fig = go.Figure()
    for i, cat in enumerate(ranked + ["other", "none"]):
        sel = cats == cat
        if not sel.any():
            continue
        colour = _PALETTE[i % len(_PALETTE)] if i < len(ranked) else "#bbbbbb"
        # SVG, not WebGL: <= max_points markers render anywhere, headless browsers and old GPUs included.
        fig.add_scatter(
            x=coords[sel, 0],
            y=coords[sel, 1],
            mode="markers",
            name=str(cat),
            hovertext=hover_arr[sel],
            hoverinfo="text",
            marker={"size": 4, "color": colour, "opacity": 0.7},
        )
    shown = f"{len(coords):,} of {n_total:,} items" if len(coords) < n_total else f"{n_total:,} items"
    fig.update_xaxes(title_text=f"PC1 ({ratio[0]:.1%})")
    fig.update_yaxes(title_text=f"PC2 ({ratio[1]:.1%})")
    return _layout(fig, f"feat_{name}: PCA, {shown}", height=460)


def fig_knn(graphs: list[Graph], stats: list[dict[str, float]], overlaps: dict[str, np.ndarray]) -> go.Figure:
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=["in-degree distribution (log-log)", "reciprocity", "shared neighbours per item"],
    )
    for i, g in enumerate(graphs):
        colour = _PALETTE[i % len(_PALETTE)]
        keep = g.src != g.dst
        indeg = np.bincount(g.dst[keep], minlength=g.n_nodes)
        deg, n = np.unique(indeg[indeg > 0], return_counts=True)
        fig.add_scatter(
            x=deg,
            y=n,
            mode="markers",
            name=g.name,
            marker={"color": colour, "size": 5},
            legendgroup=g.name,
            row=1,
            col=1,
        )
    fig.add_bar(
        x=[g.name for g in graphs],
        y=[s["reciprocity"] for s in stats],
        text=[f"{s['reciprocity']:.1%}" for s in stats],
        showlegend=False,
        marker_color=[_PALETTE[i % len(_PALETTE)] for i in range(len(graphs))],
        row=1,
        col=2,
    )
    for j, (pair, shared) in enumerate(overlaps.items()):
        values, n = np.unique(shared, return_counts=True)
        fig.add_bar(
            x=values,
            y=n / max(len(shared), 1),
            name=f"{pair} (mean {shared.mean():.2f})",
            marker_color=_PALETTE[(len(graphs) + j) % len(_PALETTE)],
            row=1,
            col=3,
        )
    fig.update_xaxes(type="log", title_text="in-degree", row=1, col=1)
    fig.update_yaxes(type="log", title_text="items", row=1, col=1)
    fig.update_yaxes(tickformat=".0%", range=[0, 1], row=1, col=2)
    fig.update_xaxes(title_text="shared neighbours", row=1, col=3)
    fig.update_yaxes(tickformat=".0%", title_text="share of items", row=1, col=3)
    return _layout(fig, "Item-item kNN graphs", height=420)


def fig_forget(forget: pa.Table) -> go.Figure:
    kinds = (
        forget["kind"].fill_null("?").to_pylist()
        if "kind" in forget.column_names
        else ["?"] * forget.num_rows
    )
    receipts = forget["receipt"].to_pylist() if "receipt" in forget.column_names else [None] * forget.num_rows
    frame = pd.DataFrame({"kind": kinds, "status": [forget_status(r) for r in receipts]})
    counts = frame.groupby(["status", "kind"]).size()
    fig = go.Figure()
    for i, status in enumerate(sorted(frame["status"].unique())):
        part = counts[status]
        fig.add_bar(
            x=part.index.tolist(),
            y=part.to_numpy(),
            name=status,
            text=part.to_numpy(),
            marker_color=_PALETTE[i % len(_PALETTE)],
        )
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="requests", tickformat=",d", dtick=1 if counts.max() <= 10 else None)
    if frame["kind"].nunique() <= 2:  # one or two bars would otherwise fill the whole width
        fig.update_traces(width=0.4)
    return _layout(fig, "Forget requests by kind and status", height=300)
