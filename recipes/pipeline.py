"""The recipe steps with their store I/O at the edges: read pinned inputs, call the pure recipe, save a versioned
artifact with its manifest. Each step skips its work when an artifact of the same name was already built from the
same input versions, feature content and parameters (what `refresh` relies on).

    >>> build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    >>> build_knn_graph(ws, "main", ["clip_image", "text"], k=10, norm="freedom", weights=[0.1, 0.9])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pyarrow as pa

from recipes import splits
from recipes.graphs import cooccur, hypergraph
from recipes.graphs import knn as knn_graph
from recipes.graphs import user_item as ui_graph
from recipes.graphs.user_item import edges_to_csr
from stores import artifacts
from stores.ids import id_maps
from stores.workspace import Workspace


def _fingerprint(inputs: dict, params: dict) -> str:
    return hashlib.sha256(json.dumps([inputs, params], sort_keys=True, default=str).encode()).hexdigest()


def _previous(ws: Workspace, kind: str, name: str, fingerprint: str) -> dict | None:
    try:
        info = artifacts.manifest(ws, kind, name)
    except KeyError:
        return None
    if info.get("fingerprint") != fingerprint or not ws.exists(info["table"]):
        return None
    return info | {"skipped": True}


def build_split(ws: Workspace, name: str, cfg: splits.SplitConfig, interactions_version: int | None = None) -> dict:
    """Split the workspace's interactions (at a pinned version) and store `split_<name>` with its manifest."""
    version = ws.version("interactions") if interactions_version is None else interactions_version
    if version is None:
        raise KeyError("the workspace has no interactions yet; run `mmfeat ingest ...` first")
    inputs = {"interactions": version}
    params = dataclasses.asdict(cfg)
    fingerprint = _fingerprint(inputs, params)
    if (done := _previous(ws, "split", name, fingerprint)) is not None:
        return done
    table = ws.read("interactions", version=version)
    split = splits.make_split(table, cfg)
    info = {"inputs": inputs, "params": params, "counts": splits.split_counts(split), "fingerprint": fingerprint}
    return artifacts.save_split(ws, name, split, info)


def _split_inputs(ws: Workspace, split_name: str) -> tuple[pa.Table, dict]:
    info = artifacts.manifest(ws, "split", split_name)
    return artifacts.load_split(ws, split_name, info["table_version"]), {
        "split": split_name,
        "split_version": info["table_version"],
    }


def _save(ws: Workspace, name: str, matrix, split: pa.Table, node_kind: str, inputs: dict, params: dict,
          fingerprint: str, extra: dict | None = None) -> dict:
    info = inputs | {"inputs": inputs, "params": params, "fingerprint": fingerprint} | (extra or {})
    return artifacts.save_graph(ws, name, matrix, split, node_kind, info)


def build_ui_graph(ws: Workspace, split_name: str, norm: str = "sym", name: str | None = None) -> dict:
    """User-item graph from the split's train rows: raw, symmetric (FREEDOM/LightGCN) or LATTICE-normalised."""
    name = name or f"{split_name}_ui_{norm}"
    split, inputs = _split_inputs(ws, split_name)
    params = {"type": "user-item", "norm": norm}
    fingerprint = _fingerprint(inputs, params)
    if (done := _previous(ws, "graph", name, fingerprint)) is not None:
        return done
    return _save(ws, name, ui_graph.ui_adjacency(split, norm), split, "user+item", inputs, params, fingerprint)


def build_knn_graph(
    ws: Workspace,
    split_name: str,
    features: list[str],
    k: int = 10,
    norm: str = "freedom",
    weights: list[float] | None = None,
    symmetric: bool = False,
    self_loops: bool = True,
    name: str | None = None,
) -> dict:
    """Item-item cosine top-k graph per feature, fused with `weights` when several features are given."""
    if weights is None:
        weights = [1.0 / len(features)] * len(features)
    if len(weights) != len(features):
        raise ValueError(f"{len(features)} features but {len(weights)} weights; give one weight per feature")
    name = name or f"{split_name}_knn_{'_'.join(features)}_k{k}_{norm}"  # Lance table names: no '+'
    split, inputs = _split_inputs(ws, split_name)
    _, items = id_maps(split)
    mats, provenance = {}, {}
    for feature in features:
        table = artifacts.feature_table(feature)
        if not ws.exists(table):
            raise KeyError(f"feature {feature!r} not found (table {table}); run `mmfeat encode ...` first")
        mats[feature], mask, provenance[feature] = artifacts.feature_matrix(ws, feature, items)
        provenance[feature]["missing_items"] = int((~mask).sum())
    inputs = inputs | {"features": {f: {"version": p["version"], "content_hash": p["content_hash"]}
                                    for f, p in provenance.items()}}
    params = {"type": "knn", "features": features, "weights": weights, "k": k, "norm": norm,
              "symmetric": symmetric, "self_loops": self_loops}
    fingerprint = _fingerprint(inputs, params)
    if (done := _previous(ws, "graph", name, fingerprint)) is not None:
        return done
    cfg = knn_graph.KnnConfig(k=k, norm=norm, symmetric=symmetric, self_loops=self_loops)
    graphs = [knn_graph.knn_graph(mats[f], cfg) for f in features]
    matrix = graphs[0] if len(graphs) == 1 and weights[0] == 1.0 else knn_graph.fuse_graphs(graphs, weights)
    return _save(ws, name, matrix, split, "item", inputs, params, fingerprint, {"feature_provenance": provenance})


def build_cooccur_graph(ws: Workspace, split_name: str, kind: str = "item", k: int = 10, weight: str = "count",
                        name: str | None = None) -> dict:
    """Item-item (shared users) or user-user (shared items) co-occurrence top-k graph from train rows."""
    name = name or f"{split_name}_cooccur_{kind}_k{k}_{weight}"
    split, inputs = _split_inputs(ws, split_name)
    params = {"type": "cooccur", "kind": kind, "k": k, "weight": weight}
    fingerprint = _fingerprint(inputs, params)
    if (done := _previous(ws, "graph", name, fingerprint)) is not None:
        return done
    users, items = id_maps(split)
    if kind == "item":
        edges, n = cooccur.item_cooccurrence(split, k=k, weight=weight), len(items)
    elif kind == "user":
        edges, n = cooccur.user_cooccurrence(split, k=k, weight=weight), len(users)
    else:
        raise ValueError(f"kind={kind!r}; expected 'item' or 'user'")
    return _save(ws, name, edges_to_csr(edges, n), split, kind, inputs, params, fingerprint)


def build_hypergraph(ws: Workspace, split_name: str, kind: str = "user", knn_graphs: list[str] | None = None,
                     name: str | None = None) -> dict:
    """MMHCL hypergraph operators: user-user from R R^T, or item-item from the incidence of stored kNN graphs."""
    name = name or f"{split_name}_hyper_{kind}"
    split, inputs = _split_inputs(ws, split_name)
    params = {"type": "hyper", "kind": kind, "knn_graphs": knn_graphs or []}
    if kind == "item":
        if not knn_graphs:
            raise ValueError("an item hypergraph needs --knn GRAPH (one or more stored kNN graphs)")
        inputs = inputs | {"graphs": {g: artifacts.manifest(ws, "graph", g)["table_version"] for g in knn_graphs}}
    fingerprint = _fingerprint(inputs, params)
    if (done := _previous(ws, "graph", name, fingerprint)) is not None:
        return done
    _, items = id_maps(split)
    if kind == "user":
        matrix = hypergraph.mmhcl_user_graph(split)
    elif kind == "item":
        edge_tables = []
        for g in knn_graphs:
            mat, _ = artifacts.load_graph(ws, g)
            edge_tables.append(ui_graph.csr_to_edges(mat))
        matrix = hypergraph.mmhcl_item_graph(edge_tables, len(items))
    else:
        raise ValueError(f"kind={kind!r}; expected 'user' or 'item'")
    return _save(ws, name, matrix, split, kind, inputs, params, fingerprint)


def export(ws: Workspace, split_name: str, fmt: str, out: str | Path, features: dict[str, str] | None = None,
           name: str | None = None, user_graph_k: int = 0):
    """Export a split (and aligned features) as MMRec, RecBole or PyG; id maps are written beside the data."""
    from recipes import exports

    split, _ = _split_inputs(ws, split_name)
    _, items = id_maps(split)
    feats = {}
    for out_name, feature in (features or {}).items():
        matrix, mask, _ = artifacts.feature_matrix(ws, feature, items)
        feats[out_name] = (items[mask], matrix[mask])
    name = name or split_name
    if fmt in ("mmrec", "recbole", "pyg"):  # recorded before writing: forget lists it even if this stops half-way
        from stores.erasure.log import record_export

        record_export(ws, Path(out) / f"{name}.pt" if fmt == "pyg" else out, fmt, split_name)
    if fmt == "mmrec":
        user_graph = cooccur.user_cooccurrence(split, k=user_graph_k) if user_graph_k else None
        return exports.export_mmrec(split, feats, out, name, feature_files={k: k for k in feats},
                                    user_graph=user_graph)
    if fmt == "recbole":
        return exports.export_recbole(split, out, name, items=ws.read("items", columns=["item_id", "title"]),
                                      users=ws.read("users", columns=["user_id"]))
    if fmt == "pyg":
        return exports.export_pyg(split, feats, Path(out) / f"{name}.pt")
    raise ValueError(f"format {fmt!r}; expected mmrec, recbole or pyg")


def feature_names(ws: Workspace) -> list[str]:
    return [n[len(artifacts.VECTOR_PREFIX):] for n in ws.table_names() if n.startswith(artifacts.VECTOR_PREFIX)]


__all__ = ["build_cooccur_graph", "build_hypergraph", "build_knn_graph", "build_split", "build_ui_graph", "export",
           "feature_names"]
