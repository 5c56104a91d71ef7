"""Write a split (and item features) in the formats trainers read: MMRec, RecBole atomic files, PyG.

Every export uses the contiguous ids of `stores.ids.id_maps` (sorted string ids -> 0..n-1) and writes each file
atomically (temporary name, then rename), so a reader never sees half a file. Files get the mode the umask gives a
new file (0644 under umask 022). Each export folder keeps `.mmfeat-export.json`, the list of files the last export
there wrote: the next export into that folder removes those it does not write again, and nothing else.

Items without a feature follow the missing-modality policy of `stores.missing.fill_missing` (default "mean", as
MMRec's preprocessing does); their ids are listed in `missing_<feature>.txt` and a one-line warning gives the count.

    >>> report = export_mmrec(split, {"clip_image": (item_ids, img), "text": (item_ids, txt)}, out, "ml100k",
    ...                       feature_files={"image_feat": "clip_image", "text_feat": "text"})
    >>> report.warnings    # ["19 of 1682 items have no clip_image; filled with the mean vector (--missing mean)"]
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from stores.artifacts import semantic_id_matrix
from stores.ids import id_maps, index_ids, seconds
from stores.missing import FILL_CHOICES, fill_missing, present_rows

Features = Mapping[str, tuple[np.ndarray, np.ndarray]]
LABEL_NAMES = {0: "train", 1: "valid", 2: "test"}


MANIFEST = ".mmfeat-export.json"
FILLED = {
    "mean": "filled with the mean vector",
    "zero": "filled with zeros",
    "drop": "dropped with their interactions",
}


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: files by role, counts, per feature the ids of the items that lacked it, and the
    one-line warnings about them."""

    out_dir: Path
    files: dict[str, Path]
    n_rows: int
    n_users: int
    n_items: int
    missing: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename. The temporary file is created with mode
    0666 less the umask, as `open()` creates files: `tempfile.mkstemp` makes 0600 files and the rename keeps that
    mode, which left exports unreadable to other users."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _previous_files(out: Path) -> list[str]:
    """The file names the last export into `out` wrote, from its manifest ([] when there is none)."""
    path = out / MANIFEST
    if not path.exists():
        return []
    try:
        names = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path} is not an mmfeat export manifest ({exc}); remove it (and the files it named) to export here"
        ) from exc
    # Only plain names inside the folder: a manifest never makes us delete anything elsewhere.
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")]


def finish_folder(out: Path, files: Mapping[str, Path]) -> None:
    """Remove the files an earlier export into `out` wrote and this one did not, then record this one's files.

    Runs after every new file is in place, so a crash leaves the old manifest, and the next export cleans up."""
    written = sorted({p.name for p in files.values() if p.parent.resolve() == out.resolve()})
    for name in _previous_files(out):
        if name not in written and name != MANIFEST:
            (out / name).unlink(missing_ok=True)
    _atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps({"files": written}, indent=1) + "\n"))


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
    """Rows of `matrix` (aligned to `item_ids`) re-ordered to `items`, and which items have the feature.

    Returns (float32 [len(items), d] with zero placeholders where absent, bool [len(items)] presence). An all-zero
    vector counts as absent (`stores.missing.present_rows`): its cosine similarity is undefined.
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
    return out, present_rows(out, present)


@dataclass(frozen=True)
class _Filled:
    split: pa.Table  # without the dropped items' rows under "drop"
    rows: dict[str, np.ndarray]  # output name -> [n_items, d], aligned to id_maps(split)
    missing: dict[str, np.ndarray]  # feature -> ids of the items that lacked it
    warnings: list[str]


def fill_features(split: pa.Table, features: Features, outputs: Mapping[str, str], how: str) -> _Filled:
    """Align each feature to the split's items and apply the missing-modality policy `how` to the items lacking it.

    `outputs` maps an output name to a feature of `features`. Under "drop" an item lacking any of them leaves the
    export with its interactions, so every row that remains is a real vector."""
    if how not in FILL_CHOICES:
        raise ValueError(f"--missing {how!r} is unknown; choose one of {', '.join(FILL_CHOICES)}")
    unknown = sorted(set(outputs.values()) - set(features))
    if unknown:
        raise ValueError(f"feature_files name feature(s) {unknown}; given features are {sorted(features)}")
    _, items = id_maps(split)
    placed = {f: align_features(*features[f], items) for f in dict.fromkeys(outputs.values())}
    missing = {f: items[~mask] for f, (_, mask) in placed.items()}
    warnings = [
        f"{len(ids)} of {len(items)} items have no {f}; {FILLED[how]} (--missing {how})"
        for f, ids in missing.items()
        if len(ids)
    ]
    if how == "drop":
        keep = np.logical_and.reduce([mask for _, mask in placed.values()]) if placed else None
        if keep is not None and not keep.all():
            split = split.filter(pc.is_in(split["item_id"], value_set=pa.array(items[keep], pa.string())))
            if split.num_rows == 0:
                raise ValueError(
                    f"no item has every one of {sorted(placed)}; --missing drop would export nothing: "
                    "use --missing mean"
                )
            placed = {f: (m[keep], np.ones(int(keep.sum()), bool)) for f, (m, mask) in placed.items()}
    rows = {out: fill_missing(*placed[f], how)[0] for out, f in outputs.items()}
    return _Filled(split, rows, missing, warnings)


def _write_missing_lists(out: Path, missing: Mapping[str, np.ndarray], files: dict[str, Path]) -> None:
    for feature, ids in missing.items():
        if len(ids):
            text = "".join(f"{i}\n" for i in ids)
            files[f"missing_{feature}"] = _atomic_write(
                out / f"missing_{feature}.txt", lambda p, t=text: p.write_text(t)
            )


def _contiguous(split: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    users, items = id_maps(split)
    u, i = index_ids(split, users, items)
    ts = seconds(split["timestamp"])
    order = np.lexsort((i, ts, u))
    return users, items, u, i, order


SEMANTIC_IDS_FILE = "semantic_ids.tsv"


def semantic_id_tokens(row: np.ndarray) -> list[str] | None:
    """One item's semantic ID as RecBole tokens, distinct per level: [l1_12, l2_5, l3_200, s_0]; None if none."""
    if row[0] < 0:
        return None
    return [f"l{level + 1}_{code}" for level, code in enumerate(row[:-1])] + [f"s_{row[-1]}"]


def _write_semantic_ids(
    out: Path, semantic_ids: pa.Table, items: np.ndarray, files: dict[str, Path], missing: dict
) -> None:
    """`semantic_ids.tsv` (itemID, item_id, sid_1..sid_L, sid_suffix) over the export's contiguous item ids;
    items without codes are left out and listed in `missing_semantic_ids.txt`."""
    codes, mask = semantic_id_matrix(semantic_ids, items)
    kept = np.flatnonzero(mask)
    columns = {"itemID": pa.array(kept), "item_id": pa.array(items[kept], pa.string())}
    for level in range(codes.shape[1] - 1):
        columns[f"sid_{level + 1}"] = pa.array(codes[kept, level])
    columns["sid_suffix"] = pa.array(codes[kept, -1])
    files["semantic_ids"] = _write_tsv(pa.table(columns), out / SEMANTIC_IDS_FILE)
    missing["semantic_ids"] = items[~mask]


def export_mmrec(
    split: pa.Table,
    features: Features,
    out_dir: str | Path,
    name: str,
    *,
    feature_files: Mapping[str, str] | None = None,
    user_graph: pa.Table | None = None,
    missing: str = "mean",
    semantic_ids: pa.Table | None = None,
) -> ExportReport:
    """Write an MMRec dataset folder: `<name>.inter`, feature .npy files, id maps, optional DualGNN graph.

    - `<name>.inter`: TSV `userID itemID rating timestamp x_label`, contiguous ids from 0, sorted by user
      then time; rating is the `value` column (empty where null; MMRec reads only ids and x_label).
    - feature_files maps an output file stem to a feature name, e.g. {"image_feat": "clip_image",
      "text_feat": "text"} -> image_feat.npy, text_feat.npy (MMRec's default `vision_feature_file` /
      `text_feature_file`). Default: each feature under its own name. Rows follow the contiguous item ids.
    - missing: what an item without a vector gets (`stores.missing.fill_missing`): "mean" (default, MMRec's
      preprocessing), "zero" (MMRec's cosine graphs turn a zero row into NaN), or "drop" (the item and its
      interactions leave the export). Their ids go to `missing_<feature>.txt` and `report.warnings`.
    - user_graph: Arrow (src, dst, weight) over contiguous user ids, e.g. `user_cooccurrence(split, 200)`,
      written as `user_graph_dict.npy` = {user: [[neighbours...], [weights...]]} for every user, in edge
      order, as MMRec's `dualgnn-gen-u-u-matrix.py` saves it. Under "drop", build it from `report`'s ids.
    - `u_id_mapping.csv` (user_id, userID) and `i_id_mapping.csv` (item_id, itemID), tab-separated as
      MMRec's preprocessing writes them.
    - `<name>.yaml`: the MMRec dataset config naming these files (copy it to src/configs/dataset/); a
      feature file it did not write is named as '' (MMRec then loads none, as for an absent file).
    - semantic_ids (a semantic-ID table: item_id, codes, suffix): `semantic_ids.tsv` over the contiguous item ids;
      items without codes go to `missing_semantic_ids.txt`.
    """
    _require_split(split)
    out = Path(out_dir)
    mapping = dict(feature_files) if feature_files is not None else {f: f for f in features}
    filled = fill_features(split, features, mapping, missing)
    split = filled.split
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
    for stem, rows in filled.rows.items():
        files[stem] = _save_npy(rows, out / f"{stem}.npy")
    if semantic_ids is not None:
        _write_semantic_ids(out, semantic_ids, items, files, filled.missing)
    _write_missing_lists(out, filled.missing, files)
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
    vision = next((f"{s}.npy" for s in mapping if "image" in s), "")
    text = next((f"{s}.npy" for s in mapping if "text" in s), "")
    graph = "user_graph_dict.npy" if user_graph is not None else ""
    yaml = (
        f"# MMRec dataset config for {name}: copy to MMRec/src/configs/dataset/{name}.yaml\n"
        "# '' names no file: this export wrote none for that role (MMRec then loads none)\n"
        "USER_ID_FIELD: userID\nITEM_ID_FIELD: itemID\nTIME_FIELD: timestamp\n"
        f"filter_out_cod_start_users: True\ninter_file_name: '{name}.inter'\n"
        f"vision_feature_file: '{vision}'\ntext_feature_file: '{text}'\n"
        f"user_graph_dict_file: '{graph}'\nfield_separator: \"\\t\"\n"
    )
    files["config"] = _atomic_write(out / f"{name}.yaml", lambda p: p.write_text(yaml))
    finish_folder(out, files)
    return ExportReport(out, files, split.num_rows, len(users), len(items), filled.missing, filled.warnings)


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


def attribute_columns(table: pa.Table, key: str, columns: Sequence[str] = ()) -> pa.Table:
    """`key`, the given `columns`, and one column per key of the JSON `attributes` column (the items / users
    tables keep source attributes there), holding the decoded JSON values: numbers, strings, lists."""
    rows = table.column("attributes").to_pylist() if "attributes" in table.column_names else []
    decoded = [json.loads(r) if r else {} for r in rows]
    names = list(dict.fromkeys(k for d in decoded for k in d))
    clash = sorted(set(names) & {key, *columns})
    if clash:
        raise ValueError(
            f"attributes {clash} repeat a column of the {key[:-3]}s table; rename them at ingest"
        )
    out = table.select([key, *columns])
    for k in names:
        out = out.append_column(k, pa.array([json.dumps(d.get(k)) for d in decoded], pa.string()))
    return out.replace_schema_metadata({"json_columns": json.dumps(names)})


# A number written as text (sources often store them so): no leading zero, so codes like zip "02134" stay tokens.
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _is_number(value: object) -> bool:
    if isinstance(value, str):
        return _NUMBER.fullmatch(value) is not None
    return isinstance(value, int | float)


def _recbole_type(values: list) -> str:
    """RecBole's type for a column of Python values: numbers (or text that is a plain number, such as ML-100K's
    age or TMDB's runtime) -> float, lists of numbers -> float_seq, other lists -> token_seq, anything else ->
    token (a code with a leading zero, such as a zip code "02134", stays a token)."""
    present = [v for v in values if v is not None and v != ""]
    if present and all(_is_number(v) for v in present):
        return "float"
    if present and all(isinstance(v, list) for v in present):
        flat = [x for v in present for x in v]
        numeric = flat and all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
        return "float_seq" if numeric else "token_seq"
    return "token"


def _recbole_cell(value: object, kind: str) -> str:
    """One cell: tabs and newlines become spaces; a token_seq element with spaces is joined by '_' so it stays
    one token (RecBole splits token_seq on spaces)."""
    if value is None or value == "":
        return ""
    if kind == "float":
        return repr(float(value))
    if kind == "float_seq":
        return " ".join(repr(float(x)) for x in value)
    if kind == "token_seq":
        parts = value if isinstance(value, list) else str(value).split()
        return " ".join("_".join(str(x).split()) for x in parts if str(x).strip())
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


def recbole_table(table: pa.Table, key: str, seq: Sequence[str] = ("title",)) -> tuple[list[str], list[list]]:
    """(typed header, rows of cells) for a .user/.item file: `key` as `token`, the columns in `seq` (titles) as
    `token_seq` of their words, and every other column typed from its values (`_recbole_type`); columns named in
    the table's `json_columns` metadata (from `attribute_columns`) are decoded first."""
    meta = (table.schema.metadata or {}).get(b"json_columns")
    json_cols = set(json.loads(meta)) if meta else set()
    header, columns = [], []
    for name in table.column_names:
        if any(c in name for c in ":\t\n ") or not name:
            raise ValueError(
                f"column {name!r} cannot be a RecBole field name (no ':', tab or space); rename it"
            )
        values = table.column(name).to_pylist()
        if name in json_cols:
            values = [json.loads(v) for v in values]
        if name == key:
            kind, values = "token", [str(v) for v in values]
        elif name in seq:
            kind = "token_seq"
        else:
            kind = _recbole_type(values)
        header.append(f"{name}:{kind}")
        columns.append([_recbole_cell(v, kind) for v in values])
    return header, [list(r) for r in zip(*columns, strict=True)]


def _write_recbole_side(header: list[str], rows: list[list], path: Path) -> Path:
    """The header raw (RecBole splits its first line on tabs, unquoted), cells CSV-quoted only where a quote
    needs it, as pandas, which RecBole reads with, unquotes."""

    def write(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as fh:
            fh.write("\t".join(header) + "\n")
            csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(rows)

    return _atomic_write(path, write)


def export_recbole(
    split: pa.Table,
    out_dir: str | Path,
    name: str,
    *,
    items: pa.Table | None = None,
    users: pa.Table | None = None,
    benchmark: bool = True,
    semantic_ids: pa.Table | None = None,
) -> ExportReport:
    """Write RecBole atomic files: `<name>.inter` (all rows) and, with benchmark=True, the split as
    `<name>.train.inter`, `<name>.valid.inter`, `<name>.test.inter` (RecBole's `benchmark_filename:
    [train, valid, test]`), plus `<name>.item` / `<name>.user` from the given tables (key `item_id` /
    `user_id`; only ids present in the split are kept), every column typed for RecBole (`recbole_table`:
    `title:token_seq`, genres `token_seq`, numbers `float`, ids and strings `token`).

    Ids stay the original strings (`user_id:token`, `item_id:token`): RecBole re-maps tokens itself.
    Columns: `user_id:token item_id:token rating:float timestamp:float` (rating empty where value is null).
    With `semantic_ids` (item_id, codes, suffix), the .item file gets `sid:token_seq`: one token per level and
    the suffix (`l1_12 l2_5 l3_200 s_0`), empty for an item without codes.
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
    if semantic_ids is not None:
        items = items if items is not None else pa.table({"item_id": pa.array(all_items, pa.string())})
        codes, _ = semantic_id_matrix(semantic_ids, items["item_id"].to_numpy(zero_copy_only=False))
        tokens = pa.array([semantic_id_tokens(row) for row in codes], pa.list_(pa.string()))
        items = items.append_column("sid", tokens).replace_schema_metadata(items.schema.metadata)
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
        header, rows = recbole_table(kept.select(cols).replace_schema_metadata(table.schema.metadata), key)
        files[suffix] = _write_recbole_side(header, rows, out / f"{name}.{suffix}")
    finish_folder(out, files)
    return ExportReport(out, files, split.num_rows, len(all_users), len(all_items))


def export_pyg(
    split: pa.Table,
    features: Features,
    out_path: str | Path,
    *,
    feature_attrs: Mapping[str, str] | None = None,
    missing: str = "mean",
) -> ExportReport:
    """Save a torch_geometric `HeteroData` (torch.save; load with `torch.load(path, weights_only=False)`).

    Node types "user" and "item" (contiguous ids; string id maps in `data["user"].ids` / `data["item"].ids`).
    Item features as `data["item"][attr]` float32 (`feature_attrs` maps attr -> feature; default each feature
    under its name), items lacking one filled by the `missing` policy and marked False in
    `data["item"][attr + "_mask"]`; `missing_<feature>.txt` beside the file lists them.

    One edge type, ("user", "interacts", "item"), holds the train edges only (`edge_index`, `time`, `rating`),
    so message passing never sees held-out rows. Held-out pairs are graph-level tensors `data.val_pairs` /
    `data.test_pairs` ([2, n]: contiguous user id, contiguous item id), not edge attributes: an edge type's
    `[2, n]` attributes of another length break `ToUndirected()` and make `to_homogeneous()` allocate n_train x
    n_heldout entries (35 GB on ML-100K). No reverse type is stored: `T.ToUndirected()` adds
    ("item", "rev_interacts", "user") once, where a stored one would be reversed again.

        >>> data = T.ToUndirected()(torch.load(path, weights_only=False))
        >>> loader = LinkNeighborLoader(data, [10], edge_label_index=(("user", "interacts", "item"), data.val_pairs))
    """
    try:
        import torch
        from torch_geometric.data import HeteroData
    except ImportError as exc:  # optional extra
        raise ImportError("export_pyg needs torch_geometric: pip install 'mmfeat[pyg]'") from exc
    _require_split(split)
    attrs = dict(feature_attrs) if feature_attrs is not None else {f: f for f in features}
    filled = fill_features(split, features, attrs, missing)
    split = filled.split
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
    for attr, rows in filled.rows.items():
        data["item"][attr] = torch.from_numpy(rows)
        data["item"][f"{attr}_mask"] = torch.from_numpy(~np.isin(items, filled.missing[attrs[attr]]))
    rel = ("user", "interacts", "item")
    train = label == 0
    data[rel].edge_index = torch.from_numpy(np.vstack((u[train], i[train])).astype(np.int64))
    data[rel].time = torch.from_numpy(ts[train])
    data[rel].rating = torch.from_numpy(rating[train].astype(np.float32))
    data.val_pairs = torch.from_numpy(np.vstack((u[label == 1], i[label == 1])).astype(np.int64))
    data.test_pairs = torch.from_numpy(np.vstack((u[label == 2], i[label == 2])).astype(np.int64))
    path = Path(out_path)
    files = {"pyg": _atomic_write(path, lambda p: torch.save(data, p))}
    _write_missing_lists(path.parent, filled.missing, files)
    finish_folder(path.parent, files)
    return ExportReport(
        path.parent, files, split.num_rows, len(users), len(items), filled.missing, filled.warnings
    )
