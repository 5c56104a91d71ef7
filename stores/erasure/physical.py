"""Physical erasure: delete the rows that mention a request's targets, then make the deletion physical.

Deletes commit `_rowid IN (...)` predicates (a table losing more than 200k rows is rewritten instead), so no
transaction ever names a forgotten key. Compaction rewrites every fragment holding a deleted row and rebuilds the
indexes; purging drops tags on old versions, every old version and any file (object, on s3) no version
references. Erasure holds the workspace's write lease while it runs (recipes/unlearning/forget.py), so no other
writer can be committing the files it deletes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import PurePosixPath

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.erasure.files import delete_file, list_files
from stores.erasure.log import BOOKKEEPING
from stores.erasure.match import mentions, needed_columns
from stores.erasure.targets import TableClass, Targets
from stores.lease import write_lease
from stores.workspace import Workspace

_ROWID_DELETE_MAX = 200_000
_CHUNK = 20_000
_SCAN_BATCH = 65_536  # rows per batch when matching, which reads only the id columns
CLUSTER_ROWS = 131_072
CLUSTER_CHUNK = 262_144  # rows taken at a time when clustering, at most
CLUSTER_CHUNK_BYTES = 16 << 20  # and about this many bytes (64 MB chunks of 2.5 KB rows peaked 170 MB higher)
CLUSTER_SLACK = 0.05  # unclustered share of a table that `cluster_if_needed` tolerates
_CLUSTER_MAX_FILES = 256  # temporary files a cluster writes at once, at most (chunks grow past that)
_RANK = "_mmfeat_rank"
_CLUSTER_SCAN = {"batch_readahead": 2, "fragment_readahead": 1}  # Lance reads ahead 16 batches by default
CLUSTER_KEY = "mmfeat.cluster"  # table config key: the last `cluster` (key column, version, fragment size)
_TEMP_DIRS = {".tmp", "_tmp", "tmp", ".cache", "_cache", "cache"}


def delete_rows(
    ws: Workspace,
    targets: Targets,
    classes: dict[str, TableClass],
    skip: set[str] = frozenset(),
    only: set[str] | None = None,
    planned: Callable[[dict[str, int]], None] | None = None,
    deleted: dict[str, pa.Table] | None = None,
) -> dict[str, int]:
    """Delete the rows that mention the targets from every table (or those in `only`) but `skip` and the
    bookkeeping tables. Small deletions commit `_rowid IN (...)`; large ones rewrite the table without them.
    `planned` is called with the counts about to be deleted before the first delete (what a crash mid-way
    leaves in the request log). `deleted`, when given, receives each table's deleted rows (their user_id,
    item_id and label columns, where it has them): what the re-derivation subtracts from recorded counts."""
    plan: dict[str, tuple[lance.LanceDataset, np.ndarray, np.ndarray]] = {}
    for name in ws.table_names():
        if name in skip or name in BOOKKEEPING or (only is not None and name not in only):
            continue
        ds = ws.dataset(name)
        columns = needed_columns(ds.schema, targets)
        if not columns:
            continue
        mask, ids = matching_rows(ds, columns, classes.get(name, TableClass()), targets)
        if len(ids):
            plan[name] = (ds, mask, ids)
            kept = [c for c in ("user_id", "item_id", "label") if c in ds.schema.names]
            if deleted is not None and kept:  # a scan's row offsets are take()'s indices
                deleted[name] = ds.take(pa.array(np.flatnonzero(mask)), columns=kept)
    if planned is not None:
        planned({name: len(ids) for name, (_, _, ids) in plan.items()})
    removed = {}
    for name, (ds, mask, ids) in plan.items():
        table = ws.open(name)
        if len(ids) <= _ROWID_DELETE_MAX:
            for start in range(0, len(ids), _CHUNK):
                table.delete(f"_rowid IN ({', '.join(str(i) for i in ids[start : start + _CHUNK].tolist())})")
        else:
            table.add(pa.RecordBatchReader.from_batches(ds.schema, _kept_batches(ds, mask)), mode="overwrite")
        removed[name] = len(ids)
    return removed


def matching_rows(
    ds: lance.LanceDataset, columns: list[str], cls: TableClass, targets: Targets
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `ds` that mention the targets, one record batch at a time (never the whole table in memory):
    a boolean mask over the rows in scan order and their `_rowid`s."""
    masks, ids = [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=np.uint64)]
    memo: dict[tuple[str, str], bool] = {}  # hashed ids, when only hashes are known: each id is hashed once
    for batch in ds.to_batches(columns=columns, with_row_id=True, batch_size=_SCAN_BATCH):
        m = mentions(pa.Table.from_batches([batch]), cls, targets, memo)
        masks.append(m)
        if m.any():
            ids.append(batch["_rowid"].to_numpy()[m])
    return np.concatenate(masks), np.concatenate(ids)


def _kept_batches(ds: lance.LanceDataset, mask: np.ndarray) -> Iterator[pa.RecordBatch]:
    """Every row of `ds` whose entry in `mask` (over the rows in scan order) is False, batch by batch."""
    start = 0
    for batch in ds.to_batches():
        drop = mask[start : start + batch.num_rows]
        start += batch.num_rows
        if not drop.any():
            yield batch
        elif not drop.all():
            yield batch.filter(pa.array(~drop))
    if start != len(mask):  # the table changed under the lease: never write a partial or shifted copy
        raise RuntimeError(
            f"{ds.uri}: scanned {start} rows, the deletion mask has {len(mask)}; retry the request"
        )


_SCALAR = {
    "BTree": "BTREE",
    "Bitmap": "BITMAP",
    "LabelList": "LABEL_LIST",
    "Inverted": "INVERTED",
    "NGram": "NGRAM",
    "ZoneMap": "ZONEMAP",
    "BloomFilter": "BLOOMFILTER",
}


def index_specs(ds) -> list[dict]:
    """What it takes to rebuild each index of a dataset: name, column, type and the vector parameters."""
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    specs = []
    for idx in ds.list_indices():
        spec = {
            "name": idx["name"],
            "column": ds.schema.names[idx["fields"][0]]
            if isinstance(idx["fields"][0], int)
            else idx["fields"][0],
            "type": idx["type"],
        }
        if idx["type"] not in _SCALAR:
            stats = (ds.stats.index_stats(idx["name"]).get("indices") or [{}])[0]
            sub = stats.get("sub_index") or {}
            spec |= {
                "metric": stats.get("metric_type", "l2"),
                "num_partitions": stats.get("num_partitions"),
                "m": (sub.get("params") or {}).get("m"),
                "ef_construction": (sub.get("params") or {}).get("ef_construction"),
                "num_sub_vectors": sub.get("num_sub_vectors"),
                "num_bits": sub.get("num_bits") or sub.get("nbits"),
            }
        specs.append(spec)
    return specs


def rebuild_indices(ws: Workspace, name: str, specs: list[dict]) -> list[str]:
    """Recreate each index from the current rows (replacing the remapped one); drop it where that fails."""
    done = []
    for spec in specs:
        ds = ws.dataset(name)
        rows = ds.count_rows()
        try:
            if spec["type"] in _SCALAR:
                ds.create_scalar_index(spec["column"], _SCALAR[spec["type"]], name=spec["name"], replace=True)
            elif rows == 0:
                raise ValueError("no rows left to train on")
            else:
                extra = {
                    k: spec[k] for k in ("m", "ef_construction", "num_sub_vectors", "num_bits") if spec.get(k)
                }
                parts = max(1, min(int(spec.get("num_partitions") or 1), rows))
                base = {
                    "name": spec["name"],
                    "metric": spec["metric"],
                    "num_partitions": parts,
                    "replace": True,
                }
                try:
                    ds.create_index(spec["column"], spec["type"], **base, **extra)
                except (TypeError, ValueError):  # an index type without those sub-index parameters
                    ds.create_index(spec["column"], spec["type"], **base)
            done.append(f"{spec['name']} ({spec['type']}) rebuilt")
        except Exception as exc:  # a stale index must not survive: drop it and say so
            ws.dataset(name).drop_index(spec["name"])
            done.append(f"{spec['name']} ({spec['type']}) dropped, rebuild it: {exc}")
    return done


def compact(ws: Workspace, name: str, target_rows_per_fragment: int | None = None) -> dict:
    """Rewrite every fragment that holds deleted rows (threshold 0: one deleted row is enough, where Lance's
    default 10% would leave a large fragment with a few deleted rows as it is), falling back to rewriting the
    whole table, then rebuild the indexes on the rewritten data. The target defaults to the largest fragment's
    row count, so fragments without deletions are not merged (a table clustered by `cluster` stays clustered
    and only the few fragments holding the deleted rows are rewritten)."""
    ds = ws.dataset(name)
    fragments = ds.get_fragments()
    if not any(f.metadata.deletion_file is not None for f in fragments):
        return {}
    if target_rows_per_fragment is None:
        target_rows_per_fragment = max(f.metadata.physical_rows for f in fragments)
    specs = index_specs(ds)
    metrics = ds.optimize.compact_files(
        materialize_deletions=True,
        materialize_deletions_threshold=0.0,
        target_rows_per_fragment=target_rows_per_fragment,
    )
    out = {"fragments_rewritten": metrics.fragments_removed, "fragments_written": metrics.fragments_added}
    ds = ws.dataset(name)
    if any(f.metadata.deletion_file is not None for f in ds.get_fragments()):
        ws.open(name).add(ds.scanner().to_reader(), mode="overwrite")
        out["rewritten_whole_table"] = True
    out["indices"] = rebuild_indices(ws, name, specs)
    return out


def cluster(
    ws: Workspace,
    name: str,
    by: str,
    rows_per_fragment: int = CLUSTER_ROWS,
    chunk_rows: int = CLUSTER_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Rewrite a table ordered by `by` in fragments of at most `rows_per_fragment` rows, so that the rows of one
    key (a user's interactions) sit in one or two fragments and erasing them rewrites only those (`compact`).
    Memory is bounded by the distinct keys and ~16 bytes a row (int32 codes, then the sort order), plus a chunk
    of rows (`chunk_rows`, at most ~16 MB; `_in_order`): never the whole table. The rows and their order are those of a stable sort of
    the whole table by `by`.
    A maintenance step under the workspace's write lease; the rewrite commits as one new version (a crash before
    the commit leaves the current version as it was), recorded in the table's config (`CLUSTER_KEY`).
    `progress`, when given, is called with the rows ordered so far after each chunk."""
    with write_lease(ws, holder=f"cluster:{name}"):
        ds = ws.dataset(name)
        specs = index_specs(ds)
        order = _sort_order(ds, by)
        rows = len(order)
        batches = _in_order(ds, order, chunk_rows, progress)
        del order

        written = lance.write_dataset(
            pa.RecordBatchReader.from_batches(ds.schema, batches),
            ws.table_uri(name),
            mode="overwrite",
            max_rows_per_file=rows_per_fragment,
            storage_options=ws.storage_options or None,
        )
        fragments = len(written.get_fragments())
        out = {"rows": rows, "fragments": fragments, "indices": rebuild_indices(ws, name, specs)}
        record = {
            "by": by,
            "version": written.version,
            "rows": rows,
            "rows_per_fragment": rows_per_fragment,
        }
        ws.dataset(name).update_config({CLUSTER_KEY: json.dumps(record)})
        return out


def _sort_order(ds: lance.LanceDataset, by: str) -> np.ndarray:
    """The row positions of `ds` (in scan order) stably sorted by `by`, nulls last: `pc.sort_indices` of the
    whole column, from two scans of it: the sorted distinct keys, then each row's int32 code among them (4 bytes
    a row) and a stable argsort of the codes, so that the key column is never held whole."""
    seen: list[pa.Array] = []
    for batch in ds.to_batches(columns=[by], batch_size=_SCAN_BATCH, **_CLUSTER_SCAN):
        seen.append(pc.unique(batch[by]).drop_null())
        if len(seen) > 16:
            seen = [pc.unique(pa.concat_arrays(seen))]
    uniques = pc.unique(pa.concat_arrays(seen)) if seen else pa.array([], ds.schema.field(by).type)
    uniques = uniques.take(pc.sort_indices(uniques))
    codes = np.empty(ds.count_rows(), dtype=np.int32)
    at = 0
    for batch in ds.to_batches(columns=[by], batch_size=_SCAN_BATCH, **_CLUSTER_SCAN):
        found = pc.index_in(batch[by], value_set=uniques).fill_null(len(uniques))  # nulls sort last
        codes[at : at + batch.num_rows] = found.to_numpy()
        at += batch.num_rows
    return np.argsort(codes[:at], kind="stable")


def _in_order(
    ds: lance.LanceDataset, order: np.ndarray, chunk_rows: int, progress: Callable[[int], None] | None
) -> Iterator[pa.RecordBatch]:
    """The rows of `ds` in `order` (row positions in scan order), a chunk of the order at a time, from two
    sequential passes (random `take`s cost ~30x a scan): one scan spills each row, with its rank in the order, to
    a local temporary Arrow file per chunk of ranks; each chunk is then read back, sorted by rank and yielded.
    Memory: 8 bytes a row of ranks and about one chunk (~CLUSTER_CHUNK_BYTES); disk: one copy of the rows."""
    n = len(order)
    sample = ds.to_table(limit=1024)
    row_bytes = max(1, sample.nbytes // max(1, sample.num_rows))
    chunk = max(1, min(chunk_rows, CLUSTER_CHUNK_BYTES // row_bytes), -(-n // _CLUSTER_MAX_FILES))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    del order  # the caller dropped its reference: the ranks replace it
    schema = ds.schema.append(pa.field(_RANK, pa.int64()))
    with tempfile.TemporaryDirectory(prefix="mmfeat-cluster-") as tmp:
        writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        start = 0
        for batch in ds.to_batches(batch_size=chunk, **_CLUSTER_SCAN):
            ranks = rank[start : start + batch.num_rows]
            start += batch.num_rows
            part = ranks // chunk
            by_part = np.argsort(part, kind="stable")
            part = part[by_part]
            batch = pa.RecordBatch.from_arrays(
                [*batch.take(pa.array(by_part)).columns, pa.array(ranks[by_part])], schema=schema
            )
            cuts = [0, *(np.flatnonzero(np.diff(part)) + 1).tolist(), len(part)]
            for lo, hi in itertools.pairwise(cuts):
                k = int(part[lo])
                if k not in writers:
                    writers[k] = pa.ipc.new_file(os.path.join(tmp, f"{k}.arrow"), schema)
                writers[k].write_batch(batch.slice(lo, hi - lo))
        for writer in writers.values():
            writer.close()
        if start != n:  # the table changed under the lease: never write a partial or shifted copy
            raise RuntimeError(
                f"{ds.uri}: scanned {start} rows, the sort order has {n}; run the clustering again"
            )
        del rank
        done = 0
        for k in sorted(writers):
            with pa.memory_map(os.path.join(tmp, f"{k}.arrow")) as source:
                rows = pa.ipc.open_file(source).read_all()
            rows = rows.take(pc.sort_indices(rows[_RANK])).drop_columns([_RANK])
            os.remove(os.path.join(tmp, f"{k}.arrow"))
            done += rows.num_rows
            yield from rows.to_batches()
            if progress is not None:
                progress(done)


def cluster_state(ws: Workspace, name: str) -> dict:
    """How far a table is from the layout `cluster` left: its config record (by, version, rows_per_fragment) and
    `unclustered_rows`, the rows of fragments a forget would rewrite for most keys. A fragment counts as
    unclustered when it is larger than the recorded fragment size or its key range contains two or more other
    fragments' ranges (rows appended since: each batch spans most users). Compaction of a clustered fragment keeps
    a narrow range, so a forget does not make the table unclustered. Reads only the key column, fragment by
    fragment; records no key (a forgotten user's id must not survive in the table's metadata)."""
    ds = ws.dataset(name)
    rows = ds.count_rows()
    record = json.loads(ds.config().get(CLUSTER_KEY, "null") or "null")
    if record is None:
        return {"clustered": False, "rows": rows, "unclustered_rows": rows}
    lows, highs, sizes = [], [], []
    for fragment in ds.get_fragments():
        keys = fragment.to_table(columns=[record["by"]])[record["by"]].drop_null()
        if len(keys) == 0:
            continue
        lo_hi = pc.min_max(keys)
        lows.append(lo_hi["min"].as_py())
        highs.append(lo_hi["max"].as_py())
        sizes.append((fragment.metadata.physical_rows, fragment.count_rows()))
    ranks = {k: i for i, k in enumerate(sorted(set(lows) | set(highs)))}
    lo = np.array([ranks[k] for k in lows], dtype=np.int64)
    hi = np.array([ranks[k] for k in highs], dtype=np.int64)
    scattered = 0
    for i, (physical, live) in enumerate(sizes):
        inside = int(np.count_nonzero((lo >= lo[i]) & (hi <= hi[i]))) - 1
        if physical > record["rows_per_fragment"] or inside >= 2:
            scattered += live
    return {"clustered": True, **record, "rows": rows, "unclustered_rows": scattered}


def cluster_if_needed(
    ws: Workspace,
    name: str,
    by: str,
    min_rows: int = 0,
    max_unclustered: float = CLUSTER_SLACK,
    rows_per_fragment: int = CLUSTER_ROWS,
    force: bool = False,
) -> dict:
    """`cluster` a table of at least `min_rows` rows, clustered by another key or never, or whose unclustered
    rows (`cluster_state`) exceed `max_unclustered` of it; otherwise report why not. The entry point of
    `mmfeat optimize` and of the refresh's automatic step."""
    if not ws.exists(name):
        return {"table": name, "clustered": False, "skipped": "no such table"}
    rows = ws.count(name)
    if not force and rows < min_rows:  # decided before reading any key
        return {"table": name, "by": by, "rows": rows, "skipped": f"fewer than {min_rows} rows"}
    state = cluster_state(ws, name)
    out = {"table": name, "by": by, "rows": state["rows"], "unclustered_rows": state["unclustered_rows"]}
    if not force:
        same_key = state.get("by") == by
        if same_key and state["unclustered_rows"] <= max_unclustered * state["rows"]:
            return out | {"skipped": "already clustered", "version": state["version"]}
    done = cluster(ws, name, by, rows_per_fragment)
    return out | {"skipped": False, "version": ws.version(name)} | done


def purge_versions(ws: Workspace, name: str) -> dict:
    """Drop tags on old versions, delete every version but the latest (unverified files included) and any
    file no version references; afterwards the table has exactly one version."""
    ds = ws.dataset(name)
    current = ds.version
    tags = [t for t, info in ds.tags.list().items() if info.get("version") != current]
    for tag in tags:
        ds.tags.delete(tag)
    stats = ds.cleanup_old_versions(
        older_than=timedelta(0), delete_unverified=True, error_if_tagged_old_versions=False
    )
    ds = ws.dataset(name)
    tracked = set(ds.tracked_files().read_all()["path"].to_pylist())
    present = set(ds.all_files().read_all()["path"].to_pylist())
    stray = sorted(present - tracked - {"_versions/latest_version_hint.json"})
    for path in stray:
        with contextlib.suppress(FileNotFoundError):
            delete_file(ws, f"{name}.lance/{path}")
    left = [v["version"] for v in ws.dataset(name).versions()]
    return {
        "versions_removed": stats.old_versions,
        "bytes_removed": stats.bytes_removed,
        "unreferenced_files_removed": len(stray),
        "tags_removed": tags,
        "versions_left": left,
    }


def remove_temp_files(ws: Workspace) -> list[str]:
    """Delete scratch files of the workspace root (local or s3): *.tmp files and tmp/cache folders outside the
    tables."""
    removed = []
    for rel in list_files(ws):
        parts = PurePosixPath(rel).parts
        if parts and parts[0].endswith(".lance"):
            continue
        if rel.endswith(".tmp") or any(p in _TEMP_DIRS for p in parts[:-1]):
            try:
                delete_file(ws, rel)
            except FileNotFoundError:
                continue
            removed.append(rel)
    return removed


def parallel(fn, names: list[str], workers: int = 4) -> dict:
    """{name: fn(name)} with the names run in threads: Lance and Arrow release the GIL, and compaction
    waits on I/O about half of the time."""
    if len(names) <= 1:
        return {n: fn(n) for n in names}
    with ThreadPoolExecutor(max_workers=min(workers, len(names))) as pool:
        return dict(zip(names, pool.map(fn, names), strict=True))
