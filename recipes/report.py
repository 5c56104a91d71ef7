"""The dataset report: one self-contained HTML file that shows what a workspace holds, section by section.

Pure functions turn Arrow/NumPy into plotly figures and one HTML string (plotly.js inlined once, thumbnails as
data URIs, so the file opens offline). `load_report_data` at the bottom is the only function that reads a
workspace; every section renders a note naming the command to run when its tables are absent.

    >>> data = load_report_data(Workspace("./mmfeat-data"), ReportConfig(), split="random")
    >>> Path("report.html").write_text(render_report(data, ReportConfig()))
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from threadpoolctl import threadpool_limits

from recipes.kcore import dedup_mask, kcore_mask, seconds, sorted_codes

if TYPE_CHECKING:
    from stores.workspace import Workspace

SECTIONS: dict[str, str] = {
    "card": "Dataset card",
    "degrees": "Degree distributions",
    "time": "Interactions over time",
    "coverage": "Modality coverage",
    "captions": "Captions",
    "projections": "Embedding projections",
    "knn": "kNN graph statistics",
    "forget": "Forget requests",
}
LABELS = {0: "train", 1: "valid", 2: "test"}
_PALETTE = qualitative.Plotly + qualitative.D3
_TEMPLATE = "plotly_white"


class ReportError(ValueError):
    """The report cannot be built as asked (unknown split, snapshots unavailable): says what to pass instead."""


@dataclass(frozen=True)
class ReportConfig:
    """kcore: k of the on-the-fly core shown when no split is given. k: neighbours per item in the kNN graphs.
    max_points: items per projection scatter. knn_max_items: items per computed kNN graph (a hash-ranked
    sample, the same items for every feature, so neighbourhoods can be compared). sample_items: rows of the
    item gallery. max_categories: colours in the projections (the rest are "other")."""

    kcore: int = 5
    k: int = 10
    max_points: int = 5000
    knn_max_items: int = 20000
    sample_items: int = 8
    max_categories: int = 12

    def __post_init__(self) -> None:
        for name in ("kcore", "k", "max_points", "knn_max_items", "sample_items", "max_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportConfig:
        """Build from a mapping; an unknown key is an error naming it and the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown ReportConfig key(s) {unknown}; valid keys are {names}")
        return cls(**data)


@dataclass
class Feature:
    """One `feat_<name>` table: every item id it covers, and the vectors of a sample of them."""

    name: str
    all_ids: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray


@dataclass
class Graph:
    """An item-item graph: edges as positions into `ids` (None when the node ids are unknown)."""

    name: str
    origin: str
    src: np.ndarray
    dst: np.ndarray
    ids: np.ndarray | None
    n_nodes: int


@dataclass
class ReportData:
    """Everything the report shows, already read: Arrow tables (None when absent) and NumPy arrays."""

    source: str
    snapshot: str | None = None
    versions: dict[str, int] = field(default_factory=dict)
    items: pa.Table | None = None  # item_id, title, text, attributes
    n_users: int = 0
    interactions: pa.Table | None = None  # user_id, item_id, timestamp
    image_ids: np.ndarray | None = None
    sample_ids: list[str] = field(default_factory=list)  # the gallery's items
    thumbnails: dict[str, str] = field(default_factory=dict)  # item_id -> data URI
    captions: pa.Table | None = None  # item_id, caption[, model]
    features: dict[str, Feature] = field(default_factory=dict)
    graphs: dict[str, Graph] = field(default_factory=dict)  # stored graph tables
    split_name: str | None = None
    split: pa.Table | None = None  # user_id, item_id, timestamp, label
    forget: pa.Table | None = None
    quarantined: int = 0
    notes: list[str] = field(default_factory=list)


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


def knn_topk(vectors: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Exact cosine top-k neighbours of every row (itself excluded), [n, k] positions; blocks of `block` rows
    are scored in threads (NumPy releases the GIL), so memory stays O(block x n)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)

    def top(start: int) -> np.ndarray:
        sim = x[start : start + block] @ x.T
        rows = np.arange(len(sim))
        sim[rows, start + rows] = -np.inf
        return np.argpartition(sim, n - k, axis=1)[:, n - k :]

    # One BLAS thread per worker: BLAS's own threads on top of ours would oversubscribe the cores.
    with (
        threadpool_limits(1, user_api="blas"),
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
    ):
        return np.concatenate(list(pool.map(top, range(0, n, block)))).astype(np.int64)


def knn_to_graph(name: str, ids: np.ndarray, neighbours: np.ndarray, origin: str) -> Graph:
    n, k = neighbours.shape
    return Graph(name, origin, np.repeat(np.arange(n), k), neighbours.ravel(), ids, n)


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
    if a.ids is None or b.ids is None:
        return np.zeros(0, dtype=np.int64)
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


def pick_sample(items: pa.Table, has: list[set[str]], n: int) -> list[str]:
    """Gallery items: those with the most modalities in `has` first, then in hash order (deterministic)."""
    ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    if len(ids) == 0:
        return []
    order = hash_rank(ids)
    score = np.array([sum(i in s for s in has) for i in ids[order]])
    best = order[np.argsort(-score, kind="stable")][:n]
    return [str(ids[i]) for i in best]


def thumbnail(data: bytes, size: int = 160) -> str | None:
    """A JPEG data URI of at most size x size pixels, or None when the bytes do not decode safely."""
    from extractors.images import ImageError, decode_image

    try:
        img = decode_image(data)
    except ImageError:
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


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


def forget_status(receipt: str | None) -> str:
    """'pending' without a receipt, else the receipt's `status` (default 'done')."""
    if not receipt:
        return "pending"
    try:
        parsed = json.loads(receipt)
    except ValueError:
        return "unreadable receipt"
    return str(parsed.get("status", "done")) if isinstance(parsed, dict) else "done"


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


# ---- HTML ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1f2937;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#cbd5e1;font-size:13px}nav{padding:8px 32px;background:#e5e7eb;font-size:14px}
nav a{margin-right:14px;color:#1f2937}main{padding:12px 32px 40px}
section{background:#fff;border-radius:8px;padding:16px 20px;margin:16px 0;box-shadow:0 1px 3px #0002}
section h2{margin:0 0 8px;font-size:18px}.note{background:#fff7e6;border-left:4px solid #f59e0b;padding:8px 12px}
table.kv{border-collapse:collapse;font-size:13px;margin:6px 0 10px}table.kv td,table.kv th{padding:3px 10px;
border-bottom:1px solid #eee;text-align:left}.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.gallery{display:grid;grid-template-columns:110px 1fr 1fr;gap:8px 16px;font-size:13px;align-items:start}
.gallery .hd{font-weight:600;border-bottom:1px solid #ddd}.gallery img{max-width:100px;border-radius:4px}
.noimg{width:92px;height:130px;background:#eee;display:flex;align-items:center;justify-content:center;color:#888}
pre{white-space:pre-wrap;font-size:12px;margin:4px 0}.muted{color:#777}
"""


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _when(value: object) -> object:
    return f"{value:%Y-%m-%d %H:%M:%S %Z}".strip() if isinstance(value, datetime) else value


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _kv(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="kv"><tr>{head}</tr>{body}</table>'


def _chart(fig: go.Figure) -> str:
    return fig.to_html(
        full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True}
    )


def _safe(build: Callable[[], str], name: str) -> str:
    """A section that fails to build shows the error instead of sinking the whole report."""
    try:
        return build()
    except Exception as exc:  # the report is diagnostic: one bad table must not hide the others
        return _note(f"could not build the {_esc(name)} section: {_esc(type(exc).__name__)}: {_esc(exc)}")


def _codes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return sorted_codes(table["user_id"])[0], sorted_codes(table["item_id"])[0]


def section_card(d: ReportData, cfg: ReportConfig) -> str:
    n_items = d.items.num_rows if d.items is not None else 0
    rows: list[tuple[str, object]] = [
        ("items (items table)", f"{n_items:,}"),
        ("users (users table)", f"{d.n_users:,}"),
    ]
    if d.interactions is None or d.interactions.num_rows == 0:
        return _kv(rows) + _note("no interactions yet: run <code>mmfeat ingest ...</code>")
    inter = d.interactions
    if d.split is not None:
        raw, core = counts_summary(*_codes(inter)), counts_summary(*_codes(d.split))
        core_label = f"split {d.split_name}"
    else:
        raw, core = kcore_effect(inter, cfg.kcore)
        core_label = f"{cfg.kcore}-core"
    ts = seconds(inter["timestamp"])
    rows += [
        ("interactions", f"{raw['interactions']:,}"),
        ("users / items with interactions", f"{raw['users']:,} / {raw['items']:,}"),
        ("density", f"{raw['density']:.4%}"),
        (
            f"after {core_label}",
            f"{core['interactions']:,} interactions, {core['users']:,} users, "
            f"{core['items']:,} items, density {core['density']:.4%}",
        ),
        (
            "time span",
            f"{pd.Timestamp(ts.min(), unit='s', tz='UTC'):%Y-%m-%d} to "
            f"{pd.Timestamp(ts.max(), unit='s', tz='UTC'):%Y-%m-%d}",
        ),
        ("quarantined rows", f"{d.quarantined:,}"),
    ]
    return _kv(rows) + _chart(fig_card(raw, core, core_label, d.split))


def section_degrees(d: ReportData, cfg: ReportConfig) -> str:
    if d.interactions is None or d.interactions.num_rows == 0:
        return _note("no interactions yet: run <code>mmfeat ingest ...</code>")
    return _chart(fig_degrees(*_codes(d.interactions)))


def section_time(d: ReportData, cfg: ReportConfig) -> str:
    if d.interactions is None or d.interactions.num_rows == 0:
        return _note("no interactions yet: run <code>mmfeat ingest ...</code>")
    return _chart(fig_time(seconds(d.interactions["timestamp"]), d.split))


def coverage_counts(d: ReportData) -> dict[str, tuple[int, int]]:
    """Per modality: (items that have it, items), over the items table."""
    ids = d.items["item_id"]
    n = len(ids)
    text = d.items["text"]
    has_text = pc.sum(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text.fill_null(""))), 0)).as_py() or 0
    out = {"text": (int(has_text), n)}
    sets: dict[str, np.ndarray] = {
        "image": d.image_ids if d.image_ids is not None else np.array([], dtype=object)
    }
    sets["caption"] = (
        np.unique(d.captions["item_id"].to_numpy(zero_copy_only=False))
        if d.captions is not None
        else np.array([], dtype=object)
    )
    for name, feat in d.features.items():
        sets[f"feat_{name}"] = feat.all_ids
    every = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text.fill_null(""))), 0).to_numpy(
        zero_copy_only=False
    )
    for name, have in sets.items():
        mask = pc.is_in(ids, value_set=pa.array(have, pa.string())).to_numpy(zero_copy_only=False)
        out[name] = (int(mask.sum()), n)
        every &= mask
    out["every modality"] = (int(every.sum()), n)
    return out


def section_coverage(d: ReportData, cfg: ReportConfig) -> str:
    if d.items is None or d.items.num_rows == 0:
        return _note("no items yet: run <code>mmfeat ingest ...</code>")
    notes = [] if d.captions is not None else ["no captions yet: run <code>mmfeat caption</code>"]
    if not d.features:
        notes.append("no feature tables (feat_*) yet: run <code>mmfeat embed</code>")
    return "".join(_note(n) for n in notes) + _chart(fig_coverage(coverage_counts(d)))


def _gallery(d: ReportData, cfg: ReportConfig) -> str:
    if d.items is None or not d.sample_ids:
        return ""
    caption_of: dict[str, str] = {}
    if d.captions is not None:
        for item, text in zip(
            d.captions["item_id"].to_pylist(), d.captions["caption"].to_pylist(), strict=True
        ):
            caption_of.setdefault(item, text)
    pos = pc.index_in(pa.array(d.sample_ids, pa.string()), value_set=d.items["item_id"].combine_chunks())
    rows = d.items.take(pos.drop_null()).to_pylist()
    cells = ['<div class="hd">image</div><div class="hd">title and text</div><div class="hd">caption</div>']
    for row in rows:
        uri = d.thumbnails.get(row["item_id"])
        img = (
            f'<img src="{uri}" alt="item {_esc(row["item_id"])}">'
            if uri
            else '<div class="noimg">no image</div>'
        )
        text = row.get("text") or ""
        text = text if len(text) <= 400 else text[:400] + "…"
        caption = caption_of.get(row["item_id"])
        cells.append(
            f"<div>{img}</div><div><b>{_esc(row.get('title') or row['item_id'])}</b> "
            f'<span class="muted">({_esc(row["item_id"])})</span><br>{_esc(text)}</div>'
            f"<div>{_esc(caption) if caption else '<span class=muted>no caption</span>'}</div>"
        )
    return f'<h3>Sample items</h3><div class="gallery">{"".join(cells)}</div>'


def section_captions(d: ReportData, cfg: ReportConfig) -> str:
    head = (
        _note("no captions yet: run <code>mmfeat caption</code>")
        if d.captions is None or d.captions.num_rows == 0
        else _chart(fig_captions(d.captions))
    )
    return head + _gallery(d, cfg)


def _item_lookup(d: ReportData, ids: np.ndarray) -> tuple[list[str | None], list[str]]:
    """Category and hover text of each id (from the items table; unknown ids get none)."""
    if d.items is None or d.items.num_rows == 0:
        return [None] * len(ids), [html.escape(str(i)) for i in ids]
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=d.items["item_id"].combine_chunks())
    sub = d.items.take(pc.fill_null(pos, 0))
    valid = pc.is_valid(pos).to_pylist()
    cats = [
        first_category(a) if ok else None for a, ok in zip(sub["attributes"].to_pylist(), valid, strict=True)
    ]
    titles = sub["title"].to_pylist()
    hover = [
        html.escape(f"{t if ok and t else i}") + (f"<br>{html.escape(c)}" if c else "")
        for i, t, c, ok in zip(ids, titles, cats, valid, strict=True)
    ]
    return cats, hover


def section_projections(d: ReportData, cfg: ReportConfig) -> str:
    if not d.features:
        return _note("no feature tables (feat_*) yet: run <code>mmfeat embed</code>")
    charts = []
    for name, feat in d.features.items():
        take = np.sort(hash_rank(feat.ids)[: cfg.max_points])
        ids, vectors = feat.ids[take], feat.vectors[take]
        coords, ratio = pca_2d(vectors)
        cats, hover = _item_lookup(d, ids)
        fig = fig_projection(name, coords, ratio, cats, hover, cfg.max_categories, len(feat.all_ids))
        charts.append(f"<div>{_chart(fig)}</div>")
    return f'<div class="grid2">{"".join(charts)}</div>'


def knn_graphs(d: ReportData, cfg: ReportConfig) -> list[Graph]:
    """One graph per feature (its stored `graph_<feature>` table, else a top-k computed on the sample), then
    the stored graphs that match no feature."""
    out, used = [], set()
    for name, feat in d.features.items():
        stored = next(
            (
                g
                for g in d.graphs.values()
                if g.name == name or g.name.startswith(f"{name}_") or g.name.endswith(f"_{name}")
            ),
            None,
        )
        if stored is not None:
            used.add(stored.name)
            ids = np.sort(feat.all_ids)
            out.append(
                dataclasses.replace(stored, name=name, ids=ids if stored.n_nodes <= len(ids) else None)
            )
            continue
        n = len(feat.ids)
        origin = f"computed top-{cfg.k} cosine" + (
            f" on {n:,} of {len(feat.all_ids):,} items" if n < len(feat.all_ids) else f" on all {n:,} items"
        )
        out.append(knn_to_graph(name, feat.ids, knn_topk(feat.vectors, cfg.k), origin))
    out += [g for g in d.graphs.values() if g.name not in used]
    return out


def section_knn(d: ReportData, cfg: ReportConfig) -> str:
    if not d.features and not d.graphs:
        return _note("no feature tables (feat_*) or graphs yet: run <code>mmfeat embed</code>")
    graphs = knn_graphs(d, cfg)
    stats = [graph_stats(g) for g in graphs]
    overlaps = {}
    for i, a in enumerate(graphs):
        for b in graphs[i + 1 :]:
            shared = neighbour_overlap(a, b)
            if len(shared):
                overlaps[f"{a.name} ∩ {b.name}"] = shared
    header = [
        "graph",
        "source",
        "nodes",
        "edges",
        "mean out-degree",
        "max in-degree",
        "never a neighbour",
        "reciprocity",
    ]
    rows = [
        [
            _esc(g.name),
            _esc(g.origin),
            f"{s['nodes']:,}",
            f"{s['edges']:,}",
            f"{s['mean_out']:.1f}",
            f"{s['max_in']:,}",
            f"{s['no_in']:.1%}",
            f"{s['reciprocity']:.1%}",
        ]
        for g, s in zip(graphs, stats, strict=True)
    ]
    summary = "".join(
        f"<li>{_esc(p)}: on average {s.mean():.2f} shared neighbours per item "
        f"({len(s):,} items compared)</li>"
        for p, s in overlaps.items()
    )
    return (
        _table(header, rows)
        + (f"<ul>{summary}</ul>" if summary else "")
        + _chart(fig_knn(graphs, stats, overlaps))
    )


def section_forget(d: ReportData, cfg: ReportConfig) -> str:
    if d.forget is None or d.forget.num_rows == 0:
        return _note("no forget requests: submit one with <code>mmfeat forget ...</code>")
    forget = (
        d.forget.sort_by([("created_at", "descending")])
        if "created_at" in d.forget.column_names
        else d.forget
    )
    rows = []
    for r in forget.to_pylist():
        receipt = r.get("receipt")
        try:
            pretty = json.dumps(json.loads(receipt), indent=1, default=str) if receipt else None
        except ValueError:
            pretty = receipt
        detail = (
            f"<details><summary>{_esc(forget_status(receipt))}</summary><pre>{_esc(pretty)}</pre></details>"
            if pretty
            else "pending"
        )
        rows.append(
            [
                _esc(_when(r.get("created_at"))),
                _esc(r.get("request_id")),
                _esc(r.get("kind")),
                _esc(r.get("requester")),
                _esc(r.get("reason")),
                detail,
            ]
        )
    table = _table(["created", "request", "kind", "requester", "reason", "receipt"], rows)
    return _chart(fig_forget(forget)) + table


_BUILDERS: dict[str, Callable[[ReportData, ReportConfig], str]] = {
    "card": section_card,
    "degrees": section_degrees,
    "time": section_time,
    "coverage": section_coverage,
    "captions": section_captions,
    "projections": section_projections,
    "knn": section_knn,
    "forget": section_forget,
}


def render_report(d: ReportData, cfg: ReportConfig = ReportConfig()) -> str:
    """The whole report as one HTML string: plotly.js inlined once, every section present (chart or note)."""
    from plotly.offline import get_plotlyjs

    body = "".join(
        f'<section id="{key}" data-section="{key}"><h2>{_esc(title)}</h2>'
        f"{_safe(lambda b=_BUILDERS[key]: b(d, cfg), title)}</section>"
        for key, title in SECTIONS.items()
    )
    nav = "".join(f'<a href="#{k}">{_esc(t)}</a>' for k, t in SECTIONS.items())
    pinned = ", ".join(f"{k}@{v}" for k, v in sorted(d.versions.items()))
    subtitle = f"snapshot {_esc(d.snapshot)} · " if d.snapshot else ""
    split = f" · split {_esc(d.split_name)}" if d.split_name else ""
    notes = "".join(f"<p>{_esc(n)}</p>" for n in d.notes)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>mmfeat report: {_esc(d.source)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>mmfeat dataset report</h1><p>{subtitle}workspace {_esc(d.source)}{split} · generated "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}</p><p>tables read: {_esc(pinned) or 'none'}</p>{notes}</header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>"
    )


# ---- reading (the only function that touches a workspace) -----------------------------------------------


def load_report_data(
    ws: Workspace, cfg: ReportConfig = ReportConfig(), snapshot: str | None = None, split: str | None = None
) -> ReportData:
    """Read what the report needs: current tables, or every table at the versions a snapshot pins (tables the
    snapshot does not pin read as absent). Feature vectors are read for a hash-ranked sample only."""
    pins: dict[str, int] | None = None
    if snapshot:
        try:
            from stores.snapshots import snapshot_versions
        except ImportError:
            raise ReportError(
                "--snapshot needs stores/snapshots.py, which this installation lacks; "
                "drop --snapshot to report the current tables"
            ) from None
        pins = snapshot_versions(ws, snapshot)
    present = ws.table_names()
    names = [n for n in present if pins is None or n in pins]
    d = ReportData(source=ws.uri, snapshot=snapshot)

    def dataset(name: str):
        ds = ws.dataset(name, None if pins is None else pins[name])
        d.versions[name] = ds.version
        return ds

    def read(name: str, columns: list[str], where: str | None = None) -> pa.Table | None:
        if name not in names:
            return None
        ds = dataset(name)
        return ds.to_table(columns=[c for c in columns if c in ds.schema.names], filter=where)

    d.items = read("items", ["item_id", "title", "text", "attributes"])
    if d.items is not None:
        for col in ("title", "text", "attributes"):
            if col not in d.items.column_names:
                d.items = d.items.append_column(col, pa.nulls(d.items.num_rows, pa.string()))
    d.n_users = dataset("users").count_rows() if "users" in names else 0
    d.quarantined = dataset("quarantine").count_rows() if "quarantine" in names else 0
    d.interactions = read("interactions", ["user_id", "item_id", "timestamp"])
    images = read("item_images", ["item_id"])
    d.image_ids = images["item_id"].to_numpy(zero_copy_only=False) if images is not None else None
    d.captions = read("captions", ["item_id", "caption", "model"])
    d.forget = read("forget_requests", ["request_id", "kind", "reason", "requester", "created_at", "receipt"])

    splits = sorted(n.removeprefix("split_") for n in names if n.startswith("split_"))
    if split is not None and split not in splits:
        raise ReportError(
            f"no split named {split!r} (table split_{split}); splits here: {splits or 'none'}. "
            "Create one with `mmfeat split` or drop --split"
        )
    if split is None and splits:
        split = splits[0]
        if len(splits) > 1:
            d.notes.append(f"showing split {split!r}; others: {', '.join(splits[1:])} (choose with --split)")
    if split is not None:
        d.split_name, d.split = split, read(f"split_{split}", ["user_id", "item_id", "timestamp", "label"])

    for name in (n for n in names if n.startswith("feat_")):
        ds = dataset(name)
        all_ids = ds.to_table(columns=["item_id"])["item_id"].to_numpy(zero_copy_only=False)
        rows = np.sort(hash_rank(all_ids)[: cfg.knn_max_items])
        part = ds.take(rows, columns=["item_id", "vector"]).filter(pc.is_valid(pc.field("vector")))
        vec = part["vector"].combine_chunks()
        dim = vec.type.list_size if pa.types.is_fixed_size_list(vec.type) else None
        vectors = (
            vec.flatten().to_numpy().reshape(-1, dim)
            if dim
            else np.stack(vec.to_numpy(zero_copy_only=False))
            if len(vec)
            else np.zeros((0, 1))
        )
        ids = part["item_id"].to_numpy(zero_copy_only=False)
        d.features[name.removeprefix("feat_")] = Feature(
            name.removeprefix("feat_"), all_ids, ids, vectors.astype(np.float32)
        )
    for name in (n for n in names if n.startswith("graph_")):
        edges = dataset(name).to_table(columns=["src", "dst"])
        src, dst = edges["src"].to_numpy().astype(np.int64), edges["dst"].to_numpy().astype(np.int64)
        n = int(max(src.max(), dst.max())) + 1 if len(src) else 0
        d.graphs[name] = Graph(name.removeprefix("graph_"), f"stored table {name}", src, dst, None, n)

    if d.items is not None:
        has = [
            set(d.image_ids) if d.image_ids is not None else set(),
            set(d.captions["item_id"].to_pylist()) if d.captions is not None else set(),
        ]
        d.sample_ids = pick_sample(d.items, has, cfg.sample_items)
        quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in d.sample_ids)
        if images is not None and d.sample_ids:
            for row in read("item_images", ["item_id", "image"], where=f"item_id IN ({quoted})").to_pylist():
                uri = thumbnail(row["image"])
                if uri:
                    d.thumbnails[row["item_id"]] = uri
    return d
