"""Write a split (and item features) in the formats trainers read: MMRec, RecBole atomic files, PyG.

Every export uses the contiguous ids of `recipes.kcore.id_maps` (sorted string ids -> 0..n-1) and writes
each file atomically (temporary name, then rename), so a reader never sees half a file.

    >>> report = export_mmrec(split, {"clip_image": (item_ids, img), "minilm": (item_ids, txt)}, out, "ml100k",
    ...                       feature_files={"image_feat": "clip_image", "text_feat": "minilm"})
    >>> report.missing["image_feat"]      # item ids written as zero rows
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from stores.ids import id_maps, index_ids, seconds

Features = Mapping[str, tuple[np.ndarray, np.ndarray]]
LABEL_NAMES = {0: "train", 1: "valid", 2: "test"}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: files by role, counts, and per feature file the item ids given zero rows."""

    out_dir: Path
    files: dict[str, Path]
    n_rows: int
    n_users: int
    n_items: int
    missing: dict[str, np.ndarray] = field(default_factory=dict)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_tsv(table: pa.Table, path: Path) -> Path:
    """Tab-separated, unquoted, header included. Arrow quotes header names even with quoting_style="none",
    and RecBole splits `"user_id:token"` into a broken name and type, so the header is written by hand."""
    options = pcsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False)

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            fh.write(("\t".join(table.column_names) + "\n").encode())
            pcsv.write_csv(table, fh, write_options=options)

    return _atomic_write(path, write)


def _save_npy(array: np.ndarray | dict, path: Path) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=isinstance(array, dict))

    return _atomic_write(path, write)


def _check_tokens(values: np.ndarray, what: str) -> None:
    bad = [v for v in values if ("\t" in v or "\n" in v or "\r" in v)]
    if bad:
        raise ValueError(
            f"{what} {bad[:3]!r} contain a tab or newline, which TSV exports cannot hold; "
            "clean those ids at ingest"
        )


def _require_split(split: pa.Table) -> None:
    missing = [c for c in ("user_id", "item_id", "timestamp", "label") if c not in split.column_names]
    if missing:
        raise ValueError(
            f"expected a split with columns user_id, item_id, timestamp, label; missing {missing}"
        )


def align_features(
    item_ids: np.ndarray, matrix: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `matrix` (aligned to `item_ids`) re-ordered to `items`; absent items get zero rows.

    Returns (aligned float32 [len(items), d], the item ids that had no row).
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    ids = pa.array(np.asarray(item_ids, dtype=object), type=pa.string())
    if matrix.ndim != 2 or matrix.shape[0] != len(ids):
        raise ValueError(
            f"feature matrix has shape {matrix.shape} for {len(ids)} item ids; expected [n_ids, d]"
        )
    if len(pc.unique(ids)) != len(ids):
        counts = pc.value_counts(ids)
        dup = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:3]
        raise ValueError(f"feature item ids repeat (e.g. {dup}); keep one row per item before exporting")
    pos = pc.index_in(pa.array(items, type=pa.string()), value_set=ids)
    present = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    out = np.zeros((len(items), matrix.shape[1]), dtype=np.float32)
    out[present] = matrix[pos.drop_null().to_numpy()]
    return out, np.asarray(items)[~present]


def _contiguous(split: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    users, items = id_maps(split)
    u, i = index_ids(split, users, items)
    ts = seconds(split["timestamp"])
    order = np.lexsort((i, ts, u))
    return users, items, u, i, order


def export_mmrec(
    split: pa.Table,
    features: Features,
    out_dir: str | Path,
    name: str,
    *,
    feature_files: Mapping[str, str] | None = None,
    user_graph: pa.Table | None = None,
) -> ExportReport:
    """Write an MMRec dataset folder: `<name>.inter`, feature .npy files, id maps, optional DualGNN graph.

    - `<name>.inter`: TSV `userID itemID rating timestamp x_label`, contiguous ids from 0, sorted by user
      then time; rating is the `value` column (empty where null; MMRec reads only ids and x_label).
    - feature_files maps an output file stem to a feature name, e.g. {"image_feat": "clip_image",
      "text_feat": "minilm"} -> image_feat.npy, text_feat.npy (MMRec's default `vision_feature_file` /
      `text_feature_file`). Default: each feature under its own name. Rows follow the contiguous item ids;
      items without a vector get a zero row and are listed in `report.missing` (MMRec's cosine graphs turn
      a zero row into NaN, so fill or drop those items before training).
    - user_graph: Arrow (src, dst, weight) over contiguous user ids, e.g. `user_cooccurrence(split, 200)`,
      written as `user_graph_dict.npy` = {user: [[neighbours...], [weights...]]} for every user, in edge
      order, as MMRec's `dualgnn-gen-u-u-matrix.py` saves it.
    - `u_id_mapping.csv` (user_id, userID) and `i_id_mapping.csv` (item_id, itemID), tab-separated as
      MMRec's preprocessing writes them.
    - `<name>.yaml`: the MMRec dataset config naming these files (copy it to src/configs/dataset/).
    """
    _require_split(split)
    out = Path(out_dir)
    users, items, u, i, order = _contiguous(split)
    _check_tokens(users, "user ids")
    _check_tokens(items, "item ids")
    value = split["value"] if "value" in split.column_names else pa.nulls(split.num_rows, pa.float64())
    inter = pa.table(
        {
            "userID": pa.array(u[order]),
            "itemID": pa.array(i[order]),
            "rating": value.combine_chunks().take(pa.array(order)).cast(pa.float64()),
            "timestamp": pa.array(seconds(split["timestamp"])[order]),
            "x_label": split["label"].combine_chunks().take(pa.array(order)).cast(pa.int8()),
        }
    )
    files = {"inter": _write_tsv(inter, out / f"{name}.inter")}
    mapping = dict(feature_files) if feature_files is not None else {f: f for f in features}
    unknown = sorted(set(mapping.values()) - set(features))
    if unknown:
        raise ValueError(f"feature_files name feature(s) {unknown}; given features are {sorted(features)}")
    missing: dict[str, np.ndarray] = {}
    for stem, feat in mapping.items():
        ids, matrix = features[feat]
        aligned, absent = align_features(ids, matrix, items)
        files[stem] = _save_npy(aligned, out / f"{stem}.npy")
        missing[stem] = absent
    if user_graph is not None:
        files["user_graph"] = _save_npy(user_graph_dict(user_graph, len(users)), out / "user_graph_dict.npy")
    files["u_id_mapping"] = _write_tsv(
        pa.table({"user_id": pa.array(users, pa.string()), "userID": pa.array(np.arange(len(users)))}),
        out / "u_id_mapping.csv",
    )
    files["i_id_mapping"] = _write_tsv(
        pa.table({"item_id": pa.array(items, pa.string()), "itemID": pa.array(np.arange(len(items)))}),
        out / "i_id_mapping.csv",
    )
    vision = next((f"{s}.npy" for s in mapping if "image" in s), "image_feat.npy")
    text = next((f"{s}.npy" for s in mapping if "text" in s), "text_feat.npy")
    yaml = (
        f"# MMRec dataset config for {name}: copy to MMRec/src/configs/dataset/{name}.yaml\n"
        "USER_ID_FIELD: userID\nITEM_ID_FIELD: itemID\nTIME_FIELD: timestamp\n"
        f"filter_out_cod_start_users: True\ninter_file_name: '{name}.inter'\n"
        f"vision_feature_file: '{vision}'\ntext_feature_file: '{text}'\n"
        "user_graph_dict_file: 'user_graph_dict.npy'\nfield_separator: \"\\t\"\n"
    )
    files["config"] = _atomic_write(out / f"{name}.yaml", lambda p: p.write_text(yaml))
    return ExportReport(out, files, split.num_rows, len(users), len(items), missing)


def user_graph_dict(edges: pa.Table, n_users: int) -> dict[int, list[list]]:
    """DualGNN's `user_graph_dict`: {user: [[neighbour ids], [weights]]} for users 0..n_users-1."""
    src = edges["src"].to_numpy().astype(np.int64)
    dst = edges["dst"].to_numpy().astype(np.int64)
    w = edges["weight"].to_numpy().astype(np.float64)
    if len(src) and (src.max() >= n_users or dst.max() >= n_users):
        raise ValueError(
            f"user graph has node id {max(src.max(), dst.max())} >= n_users={n_users}; build it "
            "from the same split"
        )
    order = np.argsort(src, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    bounds = np.searchsorted(src, np.arange(n_users + 1))
    return {
        u: [dst[bounds[u] : bounds[u + 1]].tolist(), w[bounds[u] : bounds[u + 1]].tolist()]
        for u in range(n_users)
    }


def _recbole_columns(table: pa.Table, key: str) -> pa.Table:
    """A .user/.item table with RecBole typed headers (`name:token`, `:float`, `:token_seq`, `:float_seq`)."""
    cols, names = [], []
    for name in table.column_names:
        col = table[name]
        t = col.type
        if name == key or pa.types.is_string(t) or pa.types.is_large_string(t):
            kind, col = "token", col.cast(pa.string())
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            kind, col = "float", col.cast(pa.float64())
        elif pa.types.is_list(t) and (
            pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
        ):
            kind = "float_seq"
            col = pa.array(
                [
                    " ".join(repr(float(v)) for v in row) if row is not None else None
                    for row in col.to_pylist()
                ],
                pa.string(),
            )
        elif pa.types.is_list(t) and pa.types.is_string(t.value_type):
            kind = "token_seq"
            col = pa.array(
                [" ".join(row) if row is not None else None for row in col.to_pylist()], pa.string()
            )
        else:
            raise TypeError(
                f"column {name!r} has type {t}; RecBole files take strings, numbers and lists of them"
            )
        names.append(f"{name}:{kind}")
        cols.append(col)
    return pa.table(cols, names=names)


def export_recbole(
    split: pa.Table,
    out_dir: str | Path,
    name: str,
    *,
    items: pa.Table | None = None,
    users: pa.Table | None = None,
    benchmark: bool = True,
) -> ExportReport:
    """Write RecBole atomic files: `<name>.inter` (all rows) and, with benchmark=True, the split as
    `<name>.train.inter`, `<name>.valid.inter`, `<name>.test.inter` (RecBole's `benchmark_filename:
    [train, valid, test]`), plus `<name>.item` / `<name>.user` from the given tables (key `item_id` /
    `user_id`; only ids present in the split are kept).

    Ids stay the original strings (`user_id:token`, `item_id:token`): RecBole re-maps tokens itself.
    Columns: `user_id:token item_id:token rating:float timestamp:float` (rating empty where value is null).
    """
    _require_split(split)
    out = Path(out_dir)
    all_users, all_items, _, _, order = _contiguous(split)
    _check_tokens(all_users, "user ids")
    _check_tokens(all_items, "item ids")
    value = split["value"] if "value" in split.column_names else pa.nulls(split.num_rows, pa.float64())
    take = pa.array(order)
    inter = pa.table(
        {
            "user_id:token": split["user_id"].combine_chunks().take(take).cast(pa.string()),
            "item_id:token": split["item_id"].combine_chunks().take(take).cast(pa.string()),
            "rating:float": value.combine_chunks().take(take).cast(pa.float64()),
            "timestamp:float": pa.array(seconds(split["timestamp"])[order]),
        }
    )
    files = {"inter": _write_tsv(inter, out / f"{name}.inter")}
    if benchmark:
        label = split["label"].combine_chunks().take(take).to_numpy(zero_copy_only=False)
        for value_, part in LABEL_NAMES.items():
            files[part] = _write_tsv(inter.filter(pa.array(label == value_)), out / f"{name}.{part}.inter")
    for table, key, ids, suffix in (
        (items, "item_id", all_items, "item"),
        (users, "user_id", all_users, "user"),
    ):
        if table is None:
            continue
        if key not in table.column_names:
            raise ValueError(f"the .{suffix} table needs a {key!r} column; got {table.column_names}")
        kept = table.filter(pc.is_in(table[key].cast(pa.string()), value_set=pa.array(ids, pa.string())))
        cols = [key] + [c for c in kept.column_names if c != key]
        files[suffix] = _write_tsv(_recbole_columns(kept.select(cols), key), out / f"{name}.{suffix}")
    return ExportReport(out, files, split.num_rows, len(all_users), len(all_items))


def export_pyg(split: pa.Table, features: Features, out_path: str | Path) -> Path:
    """Save a torch_geometric `HeteroData` (torch.save; load with `torch.load(path, weights_only=False)`).

    Node types "user" and "item" (contiguous ids); item features as `data["item"][name]` float32, aligned,
    zero rows where missing (`data["item"][name + "_mask"]` marks the real ones). Edge type
    ("user", "interacts", "item") holds the train edges only (`edge_index`, `time`, `rating`) so message
    passing never sees held-out rows; validation / test pairs are `val_edge_label_index` /
    `test_edge_label_index`. The reverse type ("item", "rev_interacts", "user") mirrors the train edges.
    The string id maps are `data["user"].ids` / `data["item"].ids`.
    """
    try:
        import torch
        from torch_geometric.data import HeteroData
    except ImportError as exc:  # optional extra
        raise ImportError("export_pyg needs torch_geometric: pip install 'mmfeat[pyg]'") from exc
    _require_split(split)
    users, items, u, i, _ = _contiguous(split)
    label = split["label"].to_numpy()
    ts = seconds(split["timestamp"])
    value = split["value"] if "value" in split.column_names else pa.nulls(split.num_rows, pa.float64())
    rating = value.cast(pa.float64()).to_numpy(zero_copy_only=False)
    data = HeteroData()
    data["user"].num_nodes = len(users)
    data["user"].ids = users.tolist()
    data["item"].num_nodes = len(items)
    data["item"].ids = items.tolist()
    for name, (ids, matrix) in features.items():
        aligned, absent = align_features(ids, matrix, items)
        data["item"][name] = torch.from_numpy(aligned)
        data["item"][f"{name}_mask"] = torch.from_numpy(~np.isin(items, absent))
    rel = ("user", "interacts", "item")
    train = label == 0
    edge = torch.from_numpy(np.vstack((u[train], i[train])).astype(np.int64))
    data[rel].edge_index = edge
    data[rel].time = torch.from_numpy(ts[train])
    data[rel].rating = torch.from_numpy(rating[train].astype(np.float32))
    for value_, attr in ((1, "val_edge_label_index"), (2, "test_edge_label_index")):
        sel = label == value_
        data[rel][attr] = torch.from_numpy(np.vstack((u[sel], i[sel])).astype(np.int64))
    data["item", "rev_interacts", "user"].edge_index = edge.flip(0)
    path = Path(out_path)
    return _atomic_write(path, lambda p: torch.save(data, p))
