"""The Amazon review catalogues (McAuley lab, 2014/2018 and 2023 releases) as a source: a reviews file and a
metadata file, gzipped JSON lines, read into a `RawSource` for `recipes.ingest.ingest`.

The layout is told by the keys of the first object of each file:

| file    | 2014/2018 (`reviewerID`, `asin`)                          | 2023 (`user_id`, `parent_asin`)                |
|---------|-----------------------------------------------------------|------------------------------------------------|
| reviews | reviewerID, asin, overall, unixReviewTime (s), summary,   | user_id, parent_asin (else asin), rating,      |
|         | reviewText                                                | timestamp (ms), title, text                    |
| meta    | asin, title, description (list or str), categories or     | parent_asin, title, description (list),        |
|         | category, brand, price, imageURLHighRes / imUrl / imageURL| categories, store, price, images [{large, ..}] |

Items get title, text (the description joined), attributes (categories, brand or store, price) and `image_url`
(the first high-resolution or large image), which the ingest downloads like any table's `image_url` column.
Interactions get the rating as value and the review time in seconds (2023's milliseconds converted); users are
derived. The review's summary/title and text are stored in the `reviews` side table (`store_reviews`), keyed like
interactions, only for interactions that were stored. A line that is not a JSON object is quarantined
(`malformed_row`); an empty id is quarantined by the ingest (`empty_id`), a review of an item without metadata as
`unknown_item`. 2014 metadata lines are Python literals rather than JSON: they are read with `ast.literal_eval`.
"""

from __future__ import annotations

import ast
import gzip
import json
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa

from extractors.fetch import FetchPolicy
from recipes.ingest.interactions import is_gzip
from recipes.ingest.load import ingest
from recipes.ingest.records import IngestReport, RawSource, SourceError, file_label
from stores.lease import write_lease
from stores.schema import INTERACTIONS, REVIEWS
from stores.workspace import UpsertResult, Workspace

EVENT = "review"
RIGHTS = "amazon-reviews-research"


def _objects(path: Path, src: RawSource) -> tuple[list[tuple[int, dict]], str]:
    """(line, object) for every JSON object line of `path` (gzipped or not); other lines are quarantined."""
    label = file_label(path.name)
    if not path.is_file():
        raise SourceError(f"Amazon file not found: {path}; pass the reviews and the metadata .json.gz files")
    out: list[tuple[int, dict]] = []
    try:
        with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                excerpt = raw[:300].decode("utf-8", "backslashreplace")
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    src.reject(
                        label,
                        number,
                        "non_utf8",
                        f"{exc.reason} at byte {exc.start}; re-encode the file as UTF-8",
                        excerpt,
                    )
                    continue
                obj = _parse(text)
                if not isinstance(obj, dict):
                    src.reject(
                        label,
                        number,
                        "malformed_row",
                        "not a JSON object; write one object per line",
                        excerpt,
                    )
                    continue
                out.append((number, obj))
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"cannot read {path}: {exc}; check that the file (or its gzip) is intact") from None
    return out, label


def _parse(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    if text.lstrip().startswith("{"):  # the 2014 metadata files hold Python dict literals, not JSON
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            return None
    return None


def _str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if not isinstance(value, dict | list) else None


def _joined(value: object) -> str | None:
    """A description as one text: list items joined by blank lines, empty parts dropped."""
    parts = value if isinstance(value, list) else [value]
    text = "\n\n".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    return text or None


def _first_url(meta: dict, layout: str) -> str | None:
    """The first high-resolution (2018) or large (2023) image URL of an item."""
    if layout == "2023":
        for image in meta.get("images") or []:
            if isinstance(image, dict):
                url = image.get("large") or image.get("hi_res")
                if isinstance(url, str) and url.strip():
                    return url.strip()
        return None
    for key in ("imageURLHighRes", "imUrl", "imageURL"):
        value = meta.get(key)
        for url in value if isinstance(value, list) else [value]:
            if isinstance(url, str) and url.strip():
                return url.strip()
    return None


def _layout(rows: list[tuple[int, dict]], new: str, old: str, path: Path) -> str:
    """`2023` or `2018` from the first object's keys; a file with neither key is an error naming both."""
    for _, obj in rows:
        if new in obj:
            return "2023"
        if old in obj:
            return "2018"
        break
    if not rows:
        raise SourceError(f"{path} holds no JSON object lines; pass an Amazon reviews or metadata .json.gz")
    raise SourceError(
        f"{path}: cannot tell the Amazon layout from keys {sorted(rows[0][1])[:8]}; expected {old!r} (2014/2018) "
        f"or {new!r} (2023)"
    )


def _items(path: Path, src: RawSource, images: bool) -> pa.Table:
    rows, label = _objects(path, src)
    layout = _layout(rows, "parent_asin", "asin", path)
    out: dict[str, list] = {k: [] for k in ("item_id", "title", "text", "attributes", "rights", "image_url")}
    lines: list[int] = []
    for number, meta in rows:
        item_id = (meta.get("parent_asin") or meta.get("asin")) if layout == "2023" else meta.get("asin")
        categories = meta.get("categories") if "categories" in meta else meta.get("category")
        attrs = {
            "categories": categories,
            "brand" if layout == "2018" else "store": meta.get("brand" if layout == "2018" else "store"),
            "price": meta.get("price"),
        }
        attrs = {k: v for k, v in attrs.items() if v not in (None, "", [])}
        out["item_id"].append(_str(item_id))
        out["title"].append(_str(meta.get("title")))
        out["text"].append(_joined(meta.get("description")))
        out["attributes"].append(json.dumps(attrs, ensure_ascii=False, default=str) if attrs else None)
        out["rights"].append(RIGHTS)
        out["image_url"].append(_first_url(meta, layout))
        lines.append(number)
    if not images:
        del out["image_url"]
    columns = {k: pa.array(v, pa.string()) for k, v in out.items()}
    return pa.table(columns | {"__file": pa.array([label] * len(lines), pa.string()), "__line": lines})


def _interactions(path: Path, src: RawSource) -> pa.Table:
    rows, label = _objects(path, src)
    layout = _layout(rows, "user_id", "reviewerID", path)
    keys = ("user_id", "item_id", "timestamp", "value", "review_title", "review_text")
    out: dict[str, list] = {k: [] for k in keys}
    lines: list[int] = []
    for number, review in rows:
        if layout == "2023":
            user, item = review.get("user_id"), review.get("parent_asin") or review.get("asin")
            ts = review.get("timestamp")
            if isinstance(ts, int | float) and not isinstance(ts, bool):
                ts = int(ts) // 1000  # 2023 timestamps are milliseconds
            value, title, text = review.get("rating"), review.get("title"), review.get("text")
        else:
            user, item, ts = review.get("reviewerID"), review.get("asin"), review.get("unixReviewTime")
            value, title, text = review.get("overall"), review.get("summary"), review.get("reviewText")
        for key, cell in zip(keys, (user, item, ts, value, title, text), strict=True):
            out[key].append(_str(cell))
        lines.append(number)
    columns = {k: pa.array(v, pa.string()) for k, v in out.items()}
    return pa.table(columns | {"__file": pa.array([label] * len(lines), pa.string()), "__line": lines})


def amazon(reviews: str | Path, meta: str | Path, name: str | None = None, images: bool = True) -> RawSource:
    """Read an Amazon reviews file and its metadata file (2014/2018 or 2023 layout, each detected from its keys).

    `images=False` leaves out the `image_url` column (no download); items, users and interactions are the same."""
    reviews, meta = Path(reviews), Path(meta)
    stem = reviews.name.split(".")[0]
    src = RawSource(name=name or f"amazon:{file_label(stem)}", derive_users=True, default_event=EVENT)
    src.items = _items(meta, src, images)
    src.interactions = _interactions(reviews, src)
    return src


def review_rows(src: RawSource) -> pa.Table:
    """The review texts of `src`'s interactions, keyed like interactions (`seq` numbers repeats of one user, item
    and second in file order), for rows with usable ids and timestamps; rows without any text are left out."""
    table = src.interactions
    if not isinstance(table, pa.Table) or "review_text" not in table.column_names:
        return REVIEWS.schema.empty_table()
    seen: Counter = Counter()
    rows = []
    for r in table.select(["user_id", "item_id", "timestamp", "review_title", "review_text"]).to_pylist():
        user, item = (r["user_id"] or "").strip(), (r["item_id"] or "").strip()
        try:
            ts = int(r["timestamp"])
        except (TypeError, ValueError):
            continue
        if not user or not item:
            continue
        key = (user, item, ts)
        seq, seen[key] = seen[key], seen[key] + 1
        if r["review_title"] or r["review_text"]:
            rows.append(
                {
                    "user_id": user,
                    "item_id": item,
                    "timestamp": ts,
                    "event": src.default_event,
                    "seq": seq,
                    "title": r["review_title"],
                    "text": r["review_text"],
                    "source": src.name,
                }
            )
    return pa.Table.from_pylist(rows, schema=REVIEWS.schema)


def store_reviews(ws: Workspace, src: RawSource) -> UpsertResult | None:
    """Write `src`'s review texts into `reviews`, only for interactions the ingest stored (a quarantined or
    forgotten interaction keeps no review). None when the source carries no review text."""
    rows = review_rows(src)
    if not rows.num_rows:
        return None
    with write_lease(ws, f"reviews:{src.name}"):  # no forget between reading the stored keys and the write
        return _store_stored(ws, rows)


def _store_stored(ws: Workspace, rows: pa.Table) -> UpsertResult:
    key = list(INTERACTIONS.key)
    stored = ws.read("interactions", columns=key)
    stored_keys = set(
        zip(
            stored["user_id"].to_pylist(),
            stored["item_id"].to_pylist(),
            stored["timestamp"].cast(pa.int64()).to_pylist(),
            stored["event"].to_pylist(),
            stored["seq"].to_pylist(),
            strict=True,
        )
    )
    mine = zip(
        rows["user_id"].to_pylist(),
        rows["item_id"].to_pylist(),
        rows["timestamp"].cast(pa.int64()).to_pylist(),
        rows["event"].to_pylist(),
        rows["seq"].to_pylist(),
        strict=True,
    )
    keep = pa.array([k in stored_keys for k in mine])
    return ws.upsert(REVIEWS, rows.filter(keep))


def ingest_amazon(ws: Workspace, src: RawSource, fetch: FetchPolicy | None = None) -> IngestReport:
    """`ingest` the source, then store its review texts; the report lists `reviews` among its tables."""
    with write_lease(ws, f"ingest:{src.name}"):
        report = ingest(ws, src, fetch)
        reviews = store_reviews(ws, src)
    if reviews is not None:
        report.tables["reviews"] = reviews
    return report
