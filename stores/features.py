"""Extraction outputs: the captions table, one vector table per feature (`feat_<feature>`), extraction failures.

Every output row records what produced it (model, revision, params) and the `input_hash` of what went in (input
bytes or text + model + revision + params), so an extraction re-run skips items whose hash is unchanged and a
trainer can tell which weights made a vector. Writes go through `Workspace.upsert`; the ANN index of a vector table
is built once it holds `INDEX_MIN_ROWS` rows and refreshed incrementally after that.

Every write runs under the workspace's write lease, and a chunk of results is re-checked there against the live
inputs and the deny-list: rows of items forgotten while the model ran are dropped (`skipped_forgotten`), never
written back after the forget.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from stores.erasure.keys import deny_list
from stores.lease import write_lease
from stores.schema import DENY_LIST, TIMESTAMP, TableSpec, sql_string
from stores.workspace import Workspace

CAPTION_FEATURE = "caption"
FEATURE_PREFIX = "feat_"
INDEX_MIN_ROWS = 10_000
# Rebuild rather than extend the index once this share of rows is unindexed: IVF centroids trained on the old rows
# stop fitting the data when it has grown a lot.
INDEX_REBUILD_SHARE = 0.5
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_DELETE_BATCH = 500

_PROVENANCE = [
    pa.field("model", pa.string()),
    pa.field("revision", pa.string()),
    # JSON object of the settings that shape the output (precision, normalisation, prompt, ...).
    pa.field("params", pa.string()),
    # sha256 over the input bytes / text, model, revision and params: equal hash, equal output.
    pa.field("input_hash", pa.string(), nullable=False),
    pa.field("created_at", TIMESTAMP),
]

CAPTIONS = TableSpec(
    "captions",
    pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("model", pa.string()),
            pa.field("revision", pa.string()),
            pa.field("prompt", pa.string()),
            *_PROVENANCE[2:],
        ]
    ),
    key=("item_id",),
    compare=("input_hash",),
)

FAILURES = TableSpec(
    "extract_failures",
    pa.schema(
        [
            pa.field("feature", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("input_hash", pa.string()),
            # Reason code (corrupt_image, missing_text, non_finite_vector, ...) and the message behind it.
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detail", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("feature", "item_id"),
    compare=("input_hash", "reason", "detail"),
)


def check_feature_name(feature: str) -> str:
    """Return `feature` if it can name a table (lower-case letters, digits, `_`), else raise naming the rule."""
    if not _NAME.fullmatch(feature or ""):
        raise ValueError(
            f"feature name {feature!r} is not allowed: use lower-case letters, digits and '_', starting with a "
            "letter (e.g. clip_image, text, caption_text)"
        )
    return feature


def feature_table(feature: str) -> str:
    """`clip_image` (or the table name `feat_clip_image`) -> `feat_clip_image`; the captions feature lives in
    `captions`. The one mapping from a feature to its table, for writers, readers, graphs and erasure."""
    if feature == CAPTION_FEATURE:
        return CAPTIONS.name
    return FEATURE_PREFIX + check_feature_name(feature.removeprefix(FEATURE_PREFIX))


def feature_spec(name: str, dim: int) -> TableSpec:
    """The vector table of feature `name`: item_id, fixed-size float32 `vector` of `dim`, provenance, input_hash."""
    if dim <= 0:
        raise ValueError(f"feature {name!r}: dim must be positive, got {dim}")
    return TableSpec(
        feature_table(name),
        pa.schema(
            [
                pa.field("item_id", pa.string(), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), dim)),
                *_PROVENANCE,
            ]
        ),
        key=("item_id",),
        compare=("input_hash",),
    )


def stored_dim(ws: Workspace, feature: str) -> int | None:
    """The vector width of an existing feature table, None when the table does not exist."""
    name = feature_table(feature)
    if not ws.exists(name):
        return None
    return ws.open(name).schema.field("vector").type.list_size


def ensure_feature(ws: Workspace, feature: str, dim: int, overwrite: bool = False) -> TableSpec:
    """The spec of `feature`'s table, created when missing. A table of another width is an error unless
    `overwrite`, which drops it (a model of another width makes every stored vector incomparable)."""
    spec = feature_spec(feature, dim)
    have = stored_dim(ws, feature)
    if have is not None and have != dim:
        if not overwrite:
            raise ValueError(
                f"table {spec.name} holds {have}-d vectors but the model gives {dim}-d; name another feature "
                f"(--feature NAME) or pass --overwrite to drop {spec.name} and re-extract"
            )
        with write_lease(ws, f"extract:{feature}"):
            ws.db.drop_table(spec.name)
    ws.ensure(spec)
    return spec


def hashes(ws: Workspace, table: str, feature: str | None = None) -> dict[str, str]:
    """item_id -> input_hash of every row of `table` (the failures table filtered to `feature`)."""
    if not ws.exists(table):
        return {}
    where = f"feature = {sql_string(feature)}" if feature is not None else None
    rows = ws.read(table, columns=["item_id", "input_hash"], where=where)
    return dict(zip(rows["item_id"].to_pylist(), rows["input_hash"].to_pylist(), strict=True))


def delete_items(ws: Workspace, table: str, item_ids: Iterable[str], feature: str | None = None) -> int:
    """Delete the rows of `item_ids` (in `feature` for the failures table); no write when there is nothing to do."""
    ids = sorted(set(item_ids))
    if not ids or not ws.exists(table):
        return 0
    scope = f"feature = {sql_string(feature)} AND " if feature is not None else ""
    with write_lease(ws, f"delete:{table}"):
        tbl = ws.open(table)
        for start in range(0, len(ids), _DELETE_BATCH):
            chunk = ", ".join(sql_string(i) for i in ids[start : start + _DELETE_BATCH])
            tbl.delete(f"{scope}item_id IN ({chunk})")
    return len(ids)


def denied_keys(ws: Workspace, kind: str, keys: Iterable[str]) -> set[str]:
    """The `keys` of `kind` ("user", "item", "image") that are on the deny-list, i.e. were forgotten."""
    keys = set(keys)
    if not keys or not ws.exists(DENY_LIST.name):
        return set()
    denied = deny_list(ws)  # keyed hashes: the same reader as ingest's
    return {k for k in keys if denied.has(kind, k)}


def live_items(
    ws: Workspace, item_ids: Iterable[str], inputs: tuple[str, ...], deny: tuple[str, ...]
) -> set[str]:
    """The `item_ids` still present in every table of `inputs` (read at their latest version) and on no deny-list
    of the kinds `deny`: what an extraction may still write. Call it under the write lease, right before a commit."""
    ids = set(item_ids)
    for table in inputs:
        if not ids:
            break
        if not ws.exists(table):
            return set()
        present: set[str] = set()
        ordered = sorted(ids)
        for start in range(0, len(ordered), _DELETE_BATCH):
            chunk = ", ".join(sql_string(i) for i in ordered[start : start + _DELETE_BATCH])
            present.update(
                ws.read(table, columns=["item_id"], where=f"item_id IN ({chunk})")["item_id"].to_pylist()
            )
        ids &= present
    for kind in deny:
        ids -= denied_keys(ws, kind, ids)
    return ids


# ---- writing results -------------------------------------------------------------------------------------------


class OutputWriter:
    """Writes one feature's results a chunk at a time. Successes are upserted into the output table and failures
    into `extract_failures`; each item then loses the other kind of row (an old failure, an old output), so an item
    has its output or its failure, never both. `stored` and `failed` are the item ids that have rows already.

    A chunk commits under the write lease, after `live_items` drops the items that left `inputs` or joined the
    deny-list (kinds `deny`) since they were read: `skipped_forgotten` counts them."""

    def __init__(
        self,
        ws: Workspace,
        feature: str,
        stored: set[str],
        failed: set[str],
        overwrite: bool = False,
        inputs: tuple[str, ...] = ("items",),
        deny: tuple[str, ...] = ("item",),
    ):
        self.ws, self.feature, self.overwrite = ws, feature, overwrite
        self.stored, self.failed = stored, failed
        self.inputs, self.deny = inputs, deny
        self.skipped_forgotten = 0
        self.spec: TableSpec | None = None

    def start(self, model: str, revision: str, params_json: str, dim: int | None) -> None:
        """Fix the provenance written with every row; creates the vector table of width `dim` if needed."""
        self.model, self.revision, self.params = model, revision, params_json
        self.prompt = json.loads(params_json).get("prompt")
        if self.feature == CAPTION_FEATURE:
            self.spec = CAPTIONS
        else:
            self.spec = ensure_feature(self.ws, self.feature, int(dim), self.overwrite)

    def write(
        self, ids: np.ndarray, hashes_: np.ndarray, values: np.ndarray, errors: np.ndarray
    ) -> dict[str, int]:
        """Write one chunk: `values` are vectors [n, dim] or captions, `errors` "" or "reason: detail" per row.
        Returns the count of failed rows per reason ("" for the rows written)."""
        if self.spec.name != CAPTIONS.name:
            dim = self.spec.schema.field("vector").type.list_size
            if values.ndim != 2 or values.shape[1] != dim:
                raise ValueError(
                    f"the model returned vectors of shape {values.shape}; {self.spec.name} holds {dim}-d"
                )
            errors = errors.copy()
            errors[~np.isfinite(values).all(axis=1) & (errors == "")] = (
                "non_finite_vector: the model returned NaN or infinite values"
            )
        with write_lease(self.ws, f"extract:{self.feature}") as lease:
            live = live_items(self.ws, ids.tolist(), self.inputs, self.deny)
            keep = np.fromiter((i in live for i in ids), bool, len(ids))
            self.skipped_forgotten += int((~keep).sum())
            ok, bad = (errors == "") & keep, (errors != "") & keep
            now = datetime.now(UTC)
            counts = {"": int(ok.sum())}
            lease.check()
            if ok.any():
                self._rows(ids[ok].tolist(), hashes_[ok].tolist(), values[ok], now)
            if bad.any():
                for reason, n in self._failures(
                    ids[bad].tolist(), hashes_[bad].tolist(), errors[bad], now
                ).items():
                    counts[reason] = n
        return counts

    def _rows(self, ids: list[str], hashes_: list[str], values: np.ndarray, now: datetime) -> None:
        n = len(ids)
        columns: dict[str, Any] = {
            "item_id": ids,
            "model": [self.model] * n,
            "revision": [self.revision] * n,
            "params": [self.params] * n,
            "input_hash": hashes_,
            "created_at": pa.array([now] * n, TIMESTAMP),
        }
        if self.spec.name == CAPTIONS.name:
            columns["caption"] = values.tolist()
            columns["prompt"] = [self.prompt] * n
        else:
            vectors = np.ascontiguousarray(values, dtype=np.float32)
            columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        self.ws.upsert(
            self.spec, pa.table({f.name: columns[f.name] for f in self.spec.schema}, schema=self.spec.schema)
        )
        cleared = [i for i in ids if i in self.failed]
        delete_items(self.ws, FAILURES.name, cleared, self.feature)
        self.failed.difference_update(cleared)
        self.stored.update(ids)

    def _failures(self, ids: list[str], hashes_: list[str], errors: np.ndarray, now: datetime) -> Counter:
        reasons, details = zip(*(split_error(e) for e in errors), strict=True)
        rows = {
            "feature": [self.feature] * len(ids),
            "item_id": ids,
            "input_hash": hashes_,
            "reason": list(reasons),
            "detail": list(details),
            "created_at": pa.array([now] * len(ids), TIMESTAMP),
        }
        self.ws.upsert(FAILURES, pa.table(rows, schema=FAILURES.schema))
        gone = [i for i in ids if i in self.stored]
        delete_items(self.ws, self.spec.name, gone)
        self.stored.difference_update(gone)
        self.failed.update(ids)
        return Counter(reasons)


def split_error(error: str) -> tuple[str, str]:
    """'corrupt_image: truncated file' -> ('corrupt_image', 'truncated file'); a bare message gets 'error'."""
    code, sep, detail = str(error).partition(": ")
    if sep and code.replace("_", "").isalnum() and " " not in code:
        return code, detail
    return "error", str(error)


# ---- ANN index -------------------------------------------------------------------------------------------------


def refresh_index(ws: Workspace, feature: str, min_rows: int = INDEX_MIN_ROWS) -> str:
    """Build the cosine IVF_HNSW_SQ index of `feat_<feature>` once it holds `min_rows` rows, then keep it current:
    new rows are folded in incrementally, and the index is rebuilt once more than half the rows are unindexed.
    Returns what it did: "none", "built", "extended", "rebuilt" or "current"."""
    from lancedb.index import IvfHnswSq

    with write_lease(ws, f"index:{feature}"):
        table = ws.open(feature_table(feature))
        rows = table.count_rows()
        index = next((i for i in table.list_indices() if i.columns == ["vector"]), None)
        if index is None and rows < min_rows:
            return "none"
        if index is not None:
            unindexed = index.num_unindexed_rows
            if not unindexed:
                return "current"
            if unindexed <= INDEX_REBUILD_SHARE * rows:
                table.to_lance().optimize.optimize_indices()
                return "extended"
        # About sqrt(n) partitions of at least a few hundred rows each; HNSW inside each partition.
        partitions = max(1, min(int(rows**0.5), rows // 256 or 1))
        table.create_index(
            "vector", config=IvfHnswSq(distance_type="cosine", num_partitions=partitions), replace=True
        )
        return "built" if index is None else "rebuilt"


def merge_small_fragments(ws: Workspace, table: str, max_fragments: int = 32) -> bool:
    """Merge the small fragments that chunked commits leave behind, once there are more than `max_fragments`.
    Old versions stay readable (no cleanup), so snapshots that pin them keep working."""
    if not ws.exists(table):
        return False
    if len(ws.dataset(table).get_fragments()) <= max_fragments:
        return False
    with write_lease(ws, f"compact:{table}"):
        ws.dataset(table).optimize.compact_files(materialize_deletions=True)
    return True


# ---- listing ----------------------------------------------------------------------------------------------------

# Degeneracy is judged on at most this many rows, spread evenly over the table: enough to see a constant feature,
# cheap enough to run on every listing.
DEGENERATE_SAMPLE = 512
# Vectors whose mean pairwise cosine exceeds this carry no item-specific signal (trained text and image encoders
# sit far below: MiniLM around 0.1-0.3, CLIP around 0.5-0.9 between unrelated items).
DEGENERATE_COSINE = 0.999
# Captions with fewer distinct strings than this share of the sampled rows say nothing about their item.
DEGENERATE_DISTINCT = 0.01
UNTRAINED = "untrained"


def is_untrained(revision: str | None, params: str | None = None) -> bool:
    """Whether rows came from untrained weights: their own (`revision` "untrained", or one of a comma-joined
    list), or upstream ones (`params` records `input.untrained`: vectors embedded from untrained captions)."""
    if UNTRAINED in str(revision or "").split(","):
        return True
    try:
        return bool(json.loads(params)["input"].get(UNTRAINED)) if params else False
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def degenerate_reason(
    ws: Workspace, table: str, version: int | None = None, sample: int = DEGENERATE_SAMPLE
) -> str:
    """Why the feature in `table` (at `version`) is degenerate, "" when it is not, judged on at most `sample`
    rows spread evenly over the table. Captions: one distinct string, or fewer than `DEGENERATE_DISTINCT` of the
    rows. Vectors: all zero, all identical (per-dimension spread ~0), or a mean pairwise cosine above
    `DEGENERATE_COSINE`. A feature like that makes every item the same to a model or a kNN graph."""
    ds = ws.dataset(table, version)
    n = ds.count_rows()
    if n < 2:
        return ""
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64))
    if table == CAPTIONS.name:
        texts = [(t or "").strip() for t in ds.take(rows, columns=["caption"])["caption"].to_pylist()]
        distinct = len(set(texts))
        if distinct == 1 or distinct < DEGENERATE_DISTINCT * len(texts):
            return f"{distinct} distinct caption(s) in {len(texts)} sampled rows, e.g. {texts[0][:60]!r}"
        return ""
    column = ds.take(rows, columns=["vector"])["vector"].combine_chunks()
    column = column.filter(column.is_valid())
    if len(column) < 2:
        return ""
    v = column.flatten().to_numpy().astype(np.float64).reshape(len(column), -1)
    v = v[np.isfinite(v).all(axis=1)]
    norms = np.linalg.norm(v, axis=1)
    if len(v) < 2 or not (norms > 0).any():
        return f"all {len(v)} sampled vectors are zero" if len(v) >= 2 else ""
    if float(v.std(axis=0).max()) <= 1e-6 * float(np.abs(v).max()):
        return f"all {len(v)} sampled vectors are identical"
    u = v[norms > 0] / norms[norms > 0, None]
    k = len(u)
    total = u.sum(axis=0)
    mean_cos = float((total @ total - k) / (k * (k - 1))) if k > 1 else 1.0
    if mean_cos > DEGENERATE_COSINE:
        return f"vectors nearly identical: mean pairwise cosine {mean_cos:.4f} over {k} sampled rows"
    return ""


@dataclass(frozen=True)
class FeatureInfo:
    """One extracted feature as `mmfeat features` lists it (and a snapshot records it). `degenerate` is the reason
    the feature carries no item-specific signal ("" when it does); `untrained_input`: embedded from captions of an
    untrained model."""

    feature: str
    table: str
    dim: int | None
    rows: int
    items: int
    failures: int
    model: str
    revision: str
    index: str
    degenerate: str = ""
    untrained_input: bool = False

    @property
    def coverage(self) -> float:
        return self.rows / self.items if self.items else 0.0

    @property
    def untrained(self) -> bool:
        return self.untrained_input or is_untrained(self.revision)

    def to_dict(self) -> dict:
        return vars(self) | {"coverage": round(self.coverage, 4), "untrained": self.untrained}


def describe_feature(
    ws: Workspace,
    table: str,
    version: int | None = None,
    items: int | None = None,
    failures: int = 0,
) -> FeatureInfo:
    """One feature table (`captions` or `feat_*`, at `version`): width, rows, models, index, untrained and
    degenerate. `items` is the catalogue size coverage is over (default: the current items table)."""
    feature = CAPTION_FEATURE if table == CAPTIONS.name else table.removeprefix(FEATURE_PREFIX)
    ds = ws.dataset(table, version)
    dim = None if table == CAPTIONS.name else ds.schema.field("vector").type.list_size
    index = None
    if dim and version is None:
        index = next((i for i in ws.open(table).list_indices() if i.columns == ["vector"]), None)
    prov = ds.to_table(columns=["model", "revision", "params"])
    # A table part-way through a model change holds rows of both; list the most common first.
    groups = (
        prov.group_by(["model", "revision", "params"])
        .aggregate([("model", "count")])
        .sort_by([("model_count", "descending")])
    )
    models = ",".join(dict.fromkeys(str(m) for m in groups["model"].to_pylist())) or "-"
    revisions = ",".join(dict.fromkeys(str(r) for r in groups["revision"].to_pylist())) or "-"
    return FeatureInfo(
        feature=feature,
        table=table,
        dim=dim,
        rows=prov.num_rows,
        items=ws.count("items") if items is None else items,
        failures=failures,
        model=models,
        revision=revisions,
        index=index.index_type if index is not None else "-",
        degenerate=degenerate_reason(ws, table, version),
        untrained_input=any(is_untrained(None, p) for p in groups["params"].to_pylist()),
    )


def list_features(ws: Workspace) -> list[FeatureInfo]:
    """Every extracted feature (the captions and each `feat_*` table) with its width, rows, models, coverage,
    and whether it is untrained or degenerate."""
    names = ws.table_names()
    items = ws.count("items")
    failures: dict[str, int] = {}
    if FAILURES.name in names:
        counts = ws.read(FAILURES.name, columns=["feature"])["feature"].value_counts()
        failures = {c["values"].as_py(): c["counts"].as_py() for c in counts}
    out = []
    for name in names:
        if name != CAPTIONS.name and not name.startswith(FEATURE_PREFIX):
            continue
        feature = CAPTION_FEATURE if name == CAPTIONS.name else name.removeprefix(FEATURE_PREFIX)
        out.append(describe_feature(ws, name, items=items, failures=failures.get(feature, 0)))
    return out
