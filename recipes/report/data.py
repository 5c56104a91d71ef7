"""What `mmfeat report` reads from a workspace: the current tables, or every table at the versions a snapshot pins.

In snapshot mode the tables the snapshot serves are read at their pinned versions; the tables that only describe
the data (item images, captions, quarantine, forget requests) at the versions the snapshot recorded as `context`,
or, where it recorded none or that version is gone, at their current version, with a note saying so. Each feature
is checked for untrained weights and degeneracy (stores/features.py `describe_feature`), and the report shows a
warning on those.

The report's only I/O; recipes/report/render.py renders the `ReportData` this returns. Stored graphs are found through
their manifests in `artifacts` (stores/artifacts.py): item-item kNN graphs are read as string-id edge tables,
the others are listed by their manifests.

    >>> data = load_report_data(Workspace("./mmfeat-data"), ReportConfig(), snapshot="ml100k-v1")
"""

from __future__ import annotations

import json
from collections.abc import Callable

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipes.report.charts import Graph, hash_rank
from recipes.report.render import Feature, ReportConfig, ReportData, ReportError
from stores import artifacts
from stores.features import CAPTION_FEATURE, describe_feature
from stores.workspace import Workspace

MODALITIES = ("image", "text", "caption")
# Words of a feature name that give away what it embeds, for tables whose rows do not record it; the first
# match wins, so "caption_text" (text embeddings of captions) is a caption feature.
_NAME_HINTS = {"caption": "caption", "image": "image", "img": "image", "text": "text", "title": "text"}


def feature_modality(name: str, params: str | None) -> str | None:
    """What a feature embeds: the `input.source` its extractor recorded in `params`, else a word of its name
    ("clip_image" -> image, "clip_title" -> text, "caption_text" -> caption), else None."""
    try:
        source = json.loads(params)["input"]["source"] if params else None
    except (ValueError, KeyError, TypeError):
        source = None
    if source in MODALITIES:
        return source
    words = set(name.split("_"))
    return next((modality for word, modality in _NAME_HINTS.items() if word in words), None)


def pick_sample(items: pa.Table, has: list[set[str]], n: int) -> list[str]:
    """Gallery items: those with the most modalities in `has` first, then in hash order (deterministic)."""
    ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    if len(ids) == 0:
        return []
    order = hash_rank(ids)
    score = np.array([sum(i in s for s in has) for i in ids[order]])
    best = order[np.argsort(-score, kind="stable")][:n]
    return [str(ids[i]) for i in best]


def _snapshot(ws: Workspace, name: str) -> tuple[dict[str, int], dict[str, dict], dict[str, int]]:
    """The `{table: version}` a snapshot pins, the graph manifests it copied when it was taken, and the
    `{table: version}` of the tables it recorded as context (read, not served)."""
    try:
        from stores import snapshots
    except ImportError:
        raise ReportError(
            "--snapshot needs stores/snapshots.py, which this installation lacks; "
            "drop --snapshot to report the current tables"
        ) from None
    pins = snapshots.snapshot_versions(ws, name)
    info = snapshots.load_manifest(ws, name)
    return pins, dict(info.get("graph_manifests") or {}), dict(info.get("context") or {})


# Tables the report reads in snapshot mode even when the snapshot does not serve them.
_CONTEXT = ("item_images", "captions", "quarantine", "forget_requests")


def _context_versions(
    ws: Workspace, snapshot: str, pins: dict[str, int], recorded: dict[str, int], notes: list[str]
) -> dict[str, int | None]:
    """The version to read of each context table in snapshot mode: pinned, else recorded, else current (None),
    each fallback noted."""
    out: dict[str, int | None] = {}
    for table in _CONTEXT:
        if table in pins or not ws.exists(table):
            continue
        version = recorded.get(table)
        if version is not None and version in {v["version"] for v in ws.dataset(table).versions()}:
            out[table] = version
            continue
        why = "its recorded version is gone" if version is not None else "it does not record it"
        notes.append(f"{table}: read at its current version (snapshot {snapshot!r}: {why})")
        out[table] = None
    return out


def feature_warning(ws: Workspace, table: str, version: int | None, items: int) -> str:
    """The warning the report shows on a feature ("" when none): degenerate (with the reason) and/or untrained."""
    info = describe_feature(ws, table, version, items=items)
    parts = [f"degenerate: {info.degenerate}"] if info.degenerate else []
    if info.untrained:
        parts.append("made by untrained weights" + (" (its captions)" if info.untrained_input else ""))
    return "; ".join(parts)


def _read_feature(name: str, ds: lance.LanceDataset, cfg: ReportConfig) -> Feature:
    """Every item id of a `feat_*` table, and the vectors of a hash-ranked sample of `knn_max_items`."""
    all_ids = ds.to_table(columns=["item_id"])["item_id"].to_numpy(zero_copy_only=False)
    rows = np.sort(hash_rank(all_ids)[: cfg.knn_max_items])
    part = ds.take(rows, columns=["item_id", "vector"]).filter(pc.is_valid(pc.field("vector")))
    vec = part["vector"].combine_chunks()
    dim = vec.type.list_size if pa.types.is_fixed_size_list(vec.type) else None
    if dim:
        vectors = vec.flatten().to_numpy().reshape(-1, dim)
    else:
        vectors = np.stack(vec.to_numpy(zero_copy_only=False)) if len(vec) else np.zeros((0, 1))
    params = None
    if "params" in ds.schema.names:
        found = ds.to_table(columns=["params"], filter="params IS NOT NULL", limit=1)["params"]
        params = found[0].as_py() if len(found) else None
    ids = part["item_id"].to_numpy(zero_copy_only=False)
    modality = feature_modality(name, params)
    return Feature(name, all_ids, ids, vectors.astype(np.float32), modality)


def _knn_graph(info: dict, edges: pa.Table, features: dict[str, Feature]) -> Graph:
    """A stored item-item kNN graph: its string-id edges coded as positions into the ids they mention."""
    both = pa.concat_arrays([edges["src"].combine_chunks(), edges["dst"].combine_chunks()])
    coded = both.dictionary_encode()
    codes = coded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ids = coded.dictionary.to_numpy(zero_copy_only=False)
    params = info.get("params") or {}
    names = tuple(params.get("features") or ())
    modality = None
    if len(names) == 1:
        feature = features.get(names[0])
        modality = feature.modality if feature is not None else feature_modality(names[0], None)
    split = f"split {info.get('split')} v{info.get('split_version')}"
    how = [f"k={params.get('k')}", str(params.get("norm"))] + (
        ["symmetric"] if params.get("symmetric") else []
    )
    if len(names) > 1:
        how.append("fused " + " + ".join(names))
    origin = f"stored {info['table']} ({split}, {', '.join(how)})"
    n = edges.num_rows
    n_nodes = max(len(ids), int(info.get("nodes") or 0))
    return Graph(info["name"], origin, codes[:n], codes[n:], ids, n_nodes, modality, split, names)


def _read_graphs(
    d: ReportData, manifests: list[dict], names: list[str], dataset: Callable[[str], lance.LanceDataset]
) -> None:
    """Stored item-item kNN graphs into `d.graphs`; the manifests of the other graphs into `d.other_graphs`."""
    for info in sorted(manifests, key=lambda m: m["name"]):
        table = info.get("table") or f"graph_{info['name']}"
        if table not in names:
            continue
        params = info.get("params") or {}
        if params.get("type") == "knn" and info.get("node_kind") == "item":
            edges = dataset(table).to_table(columns=["src", "dst"])
            d.graphs[info["name"]] = _knn_graph(info | {"table": table}, edges, d.features)
        else:
            keys = ("name", "node_kind", "nodes", "edges", "split")
            d.other_graphs.append({k: info.get(k) for k in keys} | {"type": params.get("type")})


def load_report_data(
    ws: Workspace, cfg: ReportConfig = ReportConfig(), snapshot: str | None = None, split: str | None = None
) -> ReportData:
    """Read what the report needs: current tables, or every table at the versions a snapshot pins (tables the
    snapshot does not pin read as absent). Feature vectors are read for a hash-ranked sample only."""
    pins, pinned_graphs, recorded = _snapshot(ws, snapshot) if snapshot else (None, {}, {})
    present = ws.table_names()
    d = ReportData(source=ws.uri, snapshot=snapshot)
    versions = dict(pins or {}) | (_context_versions(ws, snapshot, pins, recorded, d.notes) if pins else {})
    names = [n for n in present if pins is None or n in versions]

    def dataset(name: str) -> lance.LanceDataset:
        ds = ws.dataset(name, None if pins is None else versions[name])
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
            f"Create one with `mmfeat split --name {split} ...` or drop --split"
        )
    if split is None and splits:
        split = splits[0]
        if len(splits) > 1:
            d.notes.append(f"showing split {split!r}; others: {', '.join(splits[1:])} (choose with --split)")
    if split is not None:
        d.split_name, d.split = split, read(f"split_{split}", ["user_id", "item_id", "timestamp", "label"])

    for name in (n for n in names if n.startswith(artifacts.VECTOR_PREFIX)):
        feature = name.removeprefix(artifacts.VECTOR_PREFIX)
        d.features[feature] = _read_feature(feature, dataset(name), cfg)
    n_items = d.items.num_rows if d.items is not None else 0
    for name in (n for n in names if n == "captions" or n.startswith(artifacts.VECTOR_PREFIX)):
        feature = CAPTION_FEATURE if name == "captions" else name.removeprefix(artifacts.VECTOR_PREFIX)
        warning = feature_warning(ws, name, dataset(name).version, n_items)
        if warning:
            d.feature_warnings[feature] = warning
    # The graph manifests as the snapshot copied them (a graph rebuilt since may have other parameters).
    manifests = (
        {m["name"]: m for m in artifacts.list_artifacts(ws, "graph")} if "artifacts" in present else {}
    )
    _read_graphs(d, list((manifests | pinned_graphs).values()), names, dataset)

    if d.items is not None:
        has = [
            set(d.image_ids) if d.image_ids is not None else set(),
            set(d.captions["item_id"].to_pylist()) if d.captions is not None else set(),
        ]
        d.sample_ids = pick_sample(d.items, has, cfg.sample_items)
        quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in d.sample_ids)
        if images is not None and d.sample_ids:
            rows = read("item_images", ["item_id", "image"], where=f"item_id IN ({quoted})").to_pylist()
            d.images = {r["item_id"]: r["image"] for r in rows if r["image"]}
    return d
