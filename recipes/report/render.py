"""The dataset report: one self-contained HTML file that shows what a workspace holds, section by section.

`render_report` lays out the statistics and plotly figures of recipes/report/charts.py as one HTML string
(plotly.js inlined once, thumbnails as data URIs, so the file opens offline). recipes/report/data.py reads the
workspace into a `ReportData`; every section renders a note naming the command to run when its tables are absent.

    >>> data = load_report_data(Workspace("./mmfeat-data"), ReportConfig(), split="random")
    >>> Path("report.html").write_text(render_report(data, ReportConfig()))
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from markupsafe import Markup, escape

from recipes.report import charts
from recipes.report.charts import Graph
from stores.ids import seconds, sorted_codes
from stores.strict import strict_config

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


class ReportError(ValueError):
    """The report cannot be built as asked (unknown split, snapshots unavailable): says what to pass instead."""


@strict_config
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


@dataclass
class Feature:
    """One `feat_<name>` table: every item id it covers, and the vectors of a sample of them."""

    name: str
    all_ids: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray
    modality: str | None = None  # "image" / "text" / "caption": what the extractor embedded, when known


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
    images: dict[str, bytes] = field(default_factory=dict)  # the gallery items' image bytes
    captions: pa.Table | None = None  # item_id, caption[, model]
    features: dict[str, Feature] = field(default_factory=dict)
    graphs: dict[str, Graph] = field(default_factory=dict)  # stored item-item kNN graphs, by artifact name
    other_graphs: list[dict[str, Any]] = field(default_factory=list)  # manifests of the other stored graphs
    split_name: str | None = None
    split: pa.Table | None = None  # user_id, item_id, timestamp, label
    forget: pa.Table | None = None
    quarantined: int = 0
    notes: list[str] = field(default_factory=list)
    # feature ("caption" for the captions) -> why its values should not be trusted: degenerate, untrained
    feature_warnings: dict[str, str] = field(default_factory=dict)


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
.warn{background:#fdecea;border-left:4px solid #dc2626;padding:8px 12px;font-weight:600}
"""


# The commands that produce each section's tables, named in the notes shown where they are absent (trusted markup).
_INGEST = Markup("run <code>mmfeat ingest movielens|mmrec|recbole|table ...</code>")
_ENCODE = Markup("run <code>mmfeat encode image|text|caption</code>")
_CAPTION = Markup("run <code>mmfeat caption</code>")
_GRAPH = Markup("<code>mmfeat graph knn --split NAME --feature FEATURE</code>")
_FORGET = Markup("<code>mmfeat forget user|item|interactions|modality|before|attribute ...</code>")

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("recipes.report", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
# The macros of parts.html.j2 (note, warning, muted, kv, table, items, details, gallery, grid), callable from Python.
_PARTS = _ENV.get_template("parts.html.j2").module


def _when(value: object) -> object:
    return f"{value:%Y-%m-%d %H:%M:%S %Z}".strip() if isinstance(value, datetime) else value


def _note(text: str | Markup, hint: Markup | None = None) -> Markup:
    """A note box; `text` is escaped, `hint` (a command in <code>) is trusted markup."""
    return _PARTS.note(Markup("{}: {}").format(text, hint) if hint is not None else text)


def _warnings(d: ReportData, features: list[str] | None = None) -> Markup:
    """A warning box per flagged feature (all of them, or those in `features`)."""
    return _join(
        *(
            _PARTS.warning(name, text)
            for name, text in sorted(d.feature_warnings.items())
            if features is None or name in features
        )
    )


def _chart(fig: go.Figure) -> Markup:
    """A plotly figure's own HTML: trusted output of plotly, which escapes the data it embeds."""
    return Markup(
        fig.to_html(
            full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True}
        )
    )


def _join(*parts: Markup | str) -> Markup:
    return Markup("").join(parts)


def _safe(build: Callable[[], Markup], name: str) -> Markup:
    """A section that fails to build shows the error instead of sinking the whole report."""
    try:
        return build()
    except Exception as exc:  # the report is diagnostic: one bad table must not hide the others
        return _note(f"could not build the {name} section: {type(exc).__name__}: {exc}")


def _codes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return sorted_codes(table["user_id"])[0], sorted_codes(table["item_id"])[0]


def section_card(d: ReportData, cfg: ReportConfig) -> Markup:
    n_items = d.items.num_rows if d.items is not None else 0
    rows: list[tuple[str, object]] = [
        ("items (items table)", f"{n_items:,}"),
        ("users (users table)", f"{d.n_users:,}"),
    ]
    if d.interactions is None or d.interactions.num_rows == 0:
        return _join(_PARTS.kv(rows), _note("no interactions yet", _INGEST))
    inter = d.interactions
    if d.split is not None:
        raw, core = charts.counts_summary(*_codes(inter)), charts.counts_summary(*_codes(d.split))
        core_label = f"split {d.split_name}"
    else:
        raw, core = charts.kcore_effect(inter, cfg.kcore)
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
    return _join(_PARTS.kv(rows), _chart(charts.fig_card(raw, core, core_label, d.split)))


def section_degrees(d: ReportData, cfg: ReportConfig) -> Markup:
    if d.interactions is None or d.interactions.num_rows == 0:
        return _note("no interactions yet", _INGEST)
    return _chart(charts.fig_degrees(*_codes(d.interactions)))


def section_time(d: ReportData, cfg: ReportConfig) -> Markup:
    if d.interactions is None or d.interactions.num_rows == 0:
        return _note("no interactions yet", _INGEST)
    return _chart(charts.fig_time(seconds(d.interactions["timestamp"]), d.split))


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


def section_coverage(d: ReportData, cfg: ReportConfig) -> Markup:
    if d.items is None or d.items.num_rows == 0:
        return _note("no items yet", _INGEST)
    notes = [] if d.captions is not None else [_note("no captions yet", _CAPTION)]
    if not d.features:
        notes.append(_note("no feature tables (feat_*) yet", _ENCODE))
    return _join(*notes, _warnings(d), _chart(charts.fig_coverage(coverage_counts(d))))


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


def _gallery(d: ReportData, cfg: ReportConfig) -> Markup:
    if d.items is None or not d.sample_ids:
        return Markup("")
    caption_of: dict[str, str] = {}
    if d.captions is not None:
        for item, text in zip(
            d.captions["item_id"].to_pylist(), d.captions["caption"].to_pylist(), strict=True
        ):
            caption_of.setdefault(item, text)
    pos = pc.index_in(pa.array(d.sample_ids, pa.string()), value_set=d.items["item_id"].combine_chunks())
    rows = []
    for row in d.items.take(pos.drop_null()).to_pylist():
        data = d.images.get(row["item_id"])
        text = row.get("text") or ""
        rows.append(
            {
                "item_id": row["item_id"],
                "uri": thumbnail(data) if data else None,
                "title": row.get("title") or row["item_id"],
                "text": text if len(text) <= 400 else text[:400] + "…",
                "caption": caption_of.get(row["item_id"]),
            }
        )
    return _PARTS.gallery(rows)


def section_captions(d: ReportData, cfg: ReportConfig) -> Markup:
    head = (
        _note("no captions yet", _CAPTION)
        if d.captions is None or d.captions.num_rows == 0
        else _chart(charts.fig_captions(d.captions))
    )
    return _join(_warnings(d, ["caption"]), head, _gallery(d, cfg))


def _item_lookup(d: ReportData, ids: np.ndarray) -> tuple[list[str | None], list[str]]:
    """Category and hover text of each id (from the items table; unknown ids get none). Plotly shows hover text
    as HTML, so the data in it is escaped."""
    if d.items is None or d.items.num_rows == 0:
        return [None] * len(ids), [str(escape(str(i))) for i in ids]
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=d.items["item_id"].combine_chunks())
    sub = d.items.take(pc.fill_null(pos, 0))
    valid = pc.is_valid(pos).to_pylist()
    cats = [
        charts.first_category(a) if ok else None
        for a, ok in zip(sub["attributes"].to_pylist(), valid, strict=True)
    ]
    titles = sub["title"].to_pylist()
    hover = [
        str(escape(f"{t if ok and t else i}") + (Markup("<br>{}").format(c) if c else ""))
        for i, t, c, ok in zip(ids, titles, cats, valid, strict=True)
    ]
    return cats, hover


def section_projections(d: ReportData, cfg: ReportConfig) -> Markup:
    if not d.features:
        return _note("no feature tables (feat_*) yet", _ENCODE)
    figs = []
    for name, feat in d.features.items():
        take = np.sort(charts.hash_rank(feat.ids)[: cfg.max_points])
        ids, vectors = feat.ids[take], feat.vectors[take]
        coords, ratio = charts.pca_2d(vectors)
        cats, hover = _item_lookup(d, ids)
        fig = charts.fig_projection(name, coords, ratio, cats, hover, cfg.max_categories, len(feat.all_ids))
        figs.append(_join(_warnings(d, [name]), _chart(fig)))
    return _PARTS.grid(figs)


def knn_graphs(d: ReportData, cfg: ReportConfig) -> list[Graph]:
    """The stored item-item kNN graphs, then a top-k computed on the sample for each feature that no stored
    single-feature kNN graph covers (the same sampled items for every feature, so they can be compared)."""
    stored = list(d.graphs.values())
    covered = {g.features[0] for g in stored if len(g.features) == 1}
    computed = []
    for name, feat in d.features.items():
        if name in covered:
            continue
        n, total = len(feat.ids), len(feat.all_ids)
        where = f"on {n:,} of {total:,} items" if n < total else f"on all {n:,} items"
        origin = f"computed top-{cfg.k} cosine {where}"
        computed.append(charts.knn_to_graph(name, feat.ids, feat.vectors, cfg.k, origin, feat.modality))
    return stored + computed


def _other_graphs(d: ReportData) -> Markup:
    if not d.other_graphs:
        return Markup("")
    rows = [
        [g.get("name"), g.get("type"), g.get("node_kind")]
        + [f"{g.get(k) or 0:,}" for k in ("nodes", "edges")]
        + [g.get("split")]
        for g in d.other_graphs
    ]
    header = ["graph", "type", "nodes are", "nodes", "edges", "split"]
    return _join(Markup("<h3>Other stored graphs</h3>"), _PARTS.table(header, rows))


def section_knn(d: ReportData, cfg: ReportConfig) -> Markup:
    if not d.features and not d.graphs:
        hint = Markup("{}, then {}").format(_ENCODE, _GRAPH)
        return _join(_note("no feature tables (feat_*) or stored kNN graphs yet", hint), _other_graphs(d))
    graphs = knn_graphs(d, cfg)
    stats = [charts.graph_stats(g) for g in graphs]
    overlaps = {
        f"{a.name} ∩ {b.name}": charts.neighbour_overlap(a, b) for a, b in charts.overlap_pairs(graphs)
    }
    overlaps = {pair: shared for pair, shared in overlaps.items() if len(shared)}
    header = ["graph", "source", "nodes", "edges", "mean out-degree"]
    header += ["max in-degree", "never a neighbour", "reciprocity"]
    rows = [
        [g.name, g.origin, f"{s['nodes']:,}", f"{s['edges']:,}", f"{s['mean_out']:.1f}"]
        + [f"{s['max_in']:,}", f"{s['no_in']:.1%}", f"{s['reciprocity']:.1%}"]
        for g, s in zip(graphs, stats, strict=True)
    ]
    summary = [
        f"{p}: on average {s.mean():.2f} shared neighbours per item ({len(s):,} items compared)"
        for p, s in overlaps.items()
    ]
    hints = []
    computed = [g.name for g in graphs if g.group == "sample"]
    if computed:
        hints.append(
            Markup("no stored kNN graph of {}: computed here; store one with {}").format(
                ", ".join(computed), _GRAPH
            )
        )
    if not overlaps:
        hints.append(
            "image-vs-text neighbour overlap needs a kNN graph of an image feature and one of a text feature, "
            "both stored on the same split or both computed here"
        )
    return _join(
        _PARTS.table(header, rows),
        _PARTS.items(summary),
        *(_PARTS.muted(h) for h in hints),
        _chart(charts.fig_knn(graphs, stats, overlaps)),
        _other_graphs(d),
    )


def unlearn_checks(forget: pa.Table | None) -> list[dict]:
    """One row per forget request whose receipt holds an `unlearn_check` (recipes/unlearn_check.py): the
    membership AUC and forget/retain recall@20 of the model trained before the forget and of the gold model."""
    out = []
    for r in forget.to_pylist() if forget is not None and "receipt" in forget.column_names else []:
        try:
            check = json.loads(r["receipt"] or "{}").get("unlearn_check")
        except (ValueError, AttributeError):
            continue
        if not check:
            continue
        row = {"request_id": r["request_id"], "snapshot": check.get("snapshot"), "model": check.get("model")}
        for model in ("before", "gold"):
            m = check.get(model, {})
            row[f"{model}_auc"] = m.get("membership_auc")
            row[f"{model}_forget_recall"] = m.get("forget", {}).get("recall@20")
            row[f"{model}_retain_recall"] = m.get("retain", {}).get("recall@20")
        row["gold_at_chance"] = check.get("gold_at_chance")
        out.append(row)
    return out


def section_forget(d: ReportData, cfg: ReportConfig) -> Markup:
    if d.forget is None or d.forget.num_rows == 0:
        return _PARTS.note(Markup("no forget requests: submit one with {}").format(_FORGET))
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
        detail = _PARTS.details(charts.forget_status(receipt), pretty) if pretty else "pending"
        rows.append(
            [
                _when(r.get("created_at")),
                r.get("request_id"),
                r.get("kind"),
                r.get("requester"),
                r.get("reason"),
                detail,
            ]
        )
    table = _PARTS.table(["created", "request", "kind", "requester", "reason", "receipt"], rows)
    return _join(_chart(charts.fig_forget(forget)), table, _forget_checks(forget))


def _forget_checks(forget: pa.Table) -> Markup | str:
    """The `mmfeat unlearn-check` results: does the model trained before the forget still remember (membership
    AUC above 0.5), while the gold model retrained without the forgotten rows sits at chance?"""
    checks = unlearn_checks(forget)
    if not checks:
        return ""

    def f(x: object) -> str:
        return f"{x:.3f}" if isinstance(x, float) else "-"

    rows = [
        [
            c["request_id"],
            c["snapshot"],
            c["model"],
            f(c["before_auc"]),
            f(c["gold_auc"]),
            f(c["before_forget_recall"]),
            f(c["gold_forget_recall"]),
            f(c["before_retain_recall"]),
            f(c["gold_retain_recall"]),
            "yes" if c["gold_at_chance"] else "no",
        ]
        for c in checks
    ]
    header = [
        "request",
        "snapshot",
        "model",
        "membership AUC before",
        "AUC gold",
        "forget R@20 before",
        "forget R@20 gold",
        "retain R@20 before",
        "retain R@20 gold",
        "gold at chance",
    ]
    return _join(
        Markup("<h3>Forgetting check</h3>"),
        _PARTS.table(header, rows),
        _PARTS.muted(
            "membership AUC: the model's scores of forgotten train interactions against never-seen pairs of the "
            "same users (popularity-matched); 0.5 = the model cannot tell them apart (CURE4Rec's completeness). "
            "gold = retrained from scratch on the retain set (MMRecUn)."
        ),
    )


_BUILDERS: dict[str, Callable[[ReportData, ReportConfig], Markup]] = {
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
    """The whole report as one HTML string (templates/report.html.j2, autoescaped): plotly.js inlined once,
    every section present (chart or note)."""
    from plotly.offline import get_plotlyjs

    sections = [
        {"key": key, "title": title, "body": _safe(lambda b=_BUILDERS[key]: b(d, cfg), title)}
        for key, title in SECTIONS.items()
    ]
    return _ENV.get_template("report.html.j2").render(
        source=d.source,
        snapshot=d.snapshot,
        split=d.split_name,
        generated=f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        pinned=", ".join(f"{k}@{v}" for k, v in sorted(d.versions.items())),
        notes=d.notes,
        sections=sections,
        css=Markup(_CSS),
        plotly_js=Markup(get_plotlyjs()),
    )
