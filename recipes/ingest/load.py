"""Validated ingest: raw source rows in, clean keyed rows and quarantine rows out, counts that add up.

Adapters (recipes/ingest/sources.py) turn a source's files into `RawSource`: string columns plus `__file`/`__line` so
every row can be traced. `ingest` validates items, images, users and interactions, writes the good rows through
keyed upserts and every bad row into `quarantine` with a reason code, and returns a report in which, per source
file, rows read = rows stored + rows merged (identical duplicates) + rows quarantined.

Bad input is data or one error, never a traceback and never a half-written source: a row that cannot be used is
quarantined with a reason code (malformed_row, non_utf8, empty_id, bad_value, bad_timestamp, duplicate_conflict,
an image reason...) and the job goes on; a file that cannot be read at all raises `SourceError` (one line naming the
file and the fix) before anything is written. Items and users are validated in full before the first write,
and interactions are checked (header, columns, compression) before it too; their rows then stream into one commit.

Local images stream in bounded memory: every image's path, type and size are checked with `stat` before the first
write (nothing read; `image_too_large` from the size alone), then, after items and users are written, the bytes are
read, hashed, decoded and committed batch by batch (`IMAGE_BATCH_ROWS` rows or `IMAGE_BATCH_BYTES` bytes, whichever
comes first), so at most one batch of image bytes is ever held. A bad image is a quarantine row, never a stop; an
ingest killed half-way keeps whole committed batches, and the next run reads each file again but writes only the
images whose sha256 is not already stored for that item (a re-run of an unchanged folder writes no new version).

Images named by URL (`image_url`, used where an item has no local `image`) are downloaded after the rows are written
(extractors/fetch.py: SSRF guard, timeouts, retries, size limit), decoded like local files and committed in batches:
an interrupted ingest keeps what it fetched, and a URL whose bytes are stored for that item is never fetched again.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from extractors.fetch import FetchPolicy, fetch_many
from extractors.images import ImageError, inspect_image, read_checked_file, stat_image_file
from recipes.ingest.interactions import check_readable, ingest_interactions
from recipes.ingest.records import (
    IngestReport,
    Quarantine,
    RawSource,
    content_hash,
    content_hashes,
    decode_cell,
    excerpt,
    file_label,
    utc_now,
)
from stores.erasure.keys import DenyList, deny_list
from stores.lease import write_lease
from stores.schema import ITEM_IMAGES, ITEMS, QUARANTINE, USERS
from stores.workspace import UpsertResult, Workspace, conform

ImageRef = tuple[str, str, str, int]
"""(item_id, image path or URL, file, line)"""

URL_LABEL = "image_url"
URL_BATCH_ROWS = 256
URL_BATCH_BYTES = 64 * 1024 * 1024
IMAGE_BATCH_ROWS = 256
# A batch costs about 8x its bytes at its peak (the rows, the Arrow table, DuckDB's anti-join, Lance's write): 16 MB
# keeps an ingest within ~150 MB above its baseline (tests/test_ingest_memory.py) while thumbnails still fill 256 rows.
IMAGE_BATCH_BYTES = 16 * 1024 * 1024


class _Columns:
    """A raw table checked a column at a time (Arrow casts, null/empty and whitespace checks, deny-list, duplicate
    keys): `values` are the cells decoded as strings (null where a row is sent to the per-row path) and `slow` the
    positions of the rows that need the per-row path. Every other row is clean: its key is stripped, non-empty,
    not denied, unique, and no slow row's key equals it, so it is stored exactly as the per-row path would."""

    def __init__(self, values: dict[str, pa.Array], slow: np.ndarray):
        self.values, self.slow = values, slow

    @classmethod
    def check(
        cls,
        table: pa.Table,
        key: str,
        utf8: tuple[str, ...],
        text: tuple[str, ...],
        src: RawSource,
        kind: str,
        denied: DenyList,
    ) -> _Columns | None:
        """None where a column is not text or the text encoding is not UTF-8 (the per-row path does it all)."""
        n = table.num_rows
        strict = codecs.lookup(src.text_encoding).name == "utf-8"
        flagged = np.zeros(n, bool)
        values: dict[str, pa.Array] = {}
        for name in utf8 + text:
            if name not in table.column_names:
                values[name] = pa.nulls(n, pa.string())
                continue
            column = table[name].combine_chunks()
            if pa.types.is_null(column.type) or pa.types.is_string(column.type):
                values[name] = column.cast(pa.string())
                continue
            if not pa.types.is_binary(column.type) or (name in text and not strict):
                return None
            try:
                values[name] = column.cast(pa.string())
            except pa.ArrowInvalid:  # some cell is not UTF-8: the per-row path names the byte
                bad = np.array([v is not None and not _is_utf8(v) for v in column.to_pylist()], bool)
                flagged |= bad
                values[name] = pc.if_else(pa.array(bad), pa.scalar(None, pa.binary()), column).cast(
                    pa.string()
                )
        ids = values[key]
        # An id that is null, empty, or starts or ends with anything but printable ASCII goes the per-row path,
        # whose str.strip() is the definition of the key (Arrow's whitespace is not Python's).
        odd = pc.or_kleene(
            pc.equal(ids, ""), pc.match_substring_regex(ids, r"^[^\x21-\x7e]|[^\x21-\x7e]$")
        ).fill_null(True)
        flagged |= odd.to_numpy(zero_copy_only=False)
        if denied:
            flagged |= np.array([v is not None and denied.has(kind, v) for v in ids.to_pylist()], bool)
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        if len(repeated):
            flagged |= pc.is_in(ids, value_set=repeated).fill_null(False).to_numpy(zero_copy_only=False)
        slow = np.flatnonzero(flagged)
        if len(slow):  # a clean row whose key a slow row strips to goes with it, so first-wins holds
            stripped = set()
            for raw in table[key].take(slow).to_pylist() if key in table.column_names else []:
                with contextlib.suppress(UnicodeDecodeError):
                    stripped.add((decode_cell(raw, "utf-8") or "").strip())
            flagged |= (
                pc.is_in(ids, value_set=pa.array(sorted(stripped), pa.string()))
                .fill_null(False)
                .to_numpy(zero_copy_only=False)
            )
            slow = np.flatnonzero(flagged)
        return cls(values, slow)

    def clean(self, n: int) -> pa.Array:
        """Positions of the clean rows."""
        keep = np.ones(n, bool)
        keep[self.slow] = False
        return pa.array(np.flatnonzero(keep))


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _tally_clean(table: pa.Table, clean: pa.Array, q: Quarantine) -> None:
    """Count every row as read (files in order of first appearance, as the per-row path creates them) and the
    clean rows as stored."""
    files = table["__file"].combine_chunks()
    if isinstance(files, pa.DictionaryArray):
        files = files.dictionary_decode()
    for file in pc.unique(files).to_pylist():
        q.tally(file)
    for row in pc.value_counts(files).to_pylist():
        q.tally(row["values"]).read += row["counts"]
    for row in pc.value_counts(files.take(clean)).to_pylist():
        q.tally(row["values"]).stored += row["counts"]


_ITEM_UTF8 = ("item_id", "rights", "image", "image_url")
_ITEM_TEXT = ("title", "text", "attributes")


def _validate_items(
    src: RawSource, q: Quarantine, denied: DenyList
) -> tuple[pa.Table, list[ImageRef], list[ImageRef]]:
    """Items → clean rows (first-occurrence order), plus the image refs: local paths, and URLs of items that name
    no local image. Checked a column at a time; only the rows a column check flags go the per-row path."""
    table, now = src.items, utc_now()
    cols = _Columns.check(table, "item_id", _ITEM_UTF8, _ITEM_TEXT, src, "item", denied)
    if cols is None:
        rows, images, urls = _item_rows(src, enumerate(table.to_pylist()), q, denied, now)
        return _ordered(rows, ITEMS.schema), [r for _, r in images], [r for _, r in urls]
    clean = cols.clean(table.num_rows)
    _tally_clean(table, clean, q)
    slow_raw = zip(cols.slow.tolist(), table.take(cols.slow).to_pylist(), strict=True)
    rows, images, urls = _item_rows(src, slow_raw, q, denied, now, tally_read=False)
    v = {name: cols.values[name].take(clean) for name in _ITEM_UTF8 + _ITEM_TEXT}
    n = len(clean)
    fast = pa.table(
        {
            "item_id": v["item_id"],
            "title": v["title"],
            "text": v["text"],
            "attributes": v["attributes"],
            "source": pa.repeat(pa.scalar(src.name, pa.string()), n),
            "rights": v["rights"],
            "content_hash": content_hashes(v["title"], v["text"], v["attributes"], v["rights"]),
            "created_at": pa.repeat(pa.scalar(now, ITEMS.schema.field("created_at").type), n),
            "updated_at": pa.repeat(pa.scalar(now, ITEMS.schema.field("updated_at").type), n),
        },
        schema=ITEMS.schema,
    )
    if v["image"].null_count < n or v["image_url"].null_count < n:
        files = table["__file"].combine_chunks().take(clean).cast(pa.string()).to_pylist()
        lines = table["__line"].combine_chunks().take(clean).to_pylist()
        given = zip(
            clean.to_pylist(),
            v["item_id"].to_pylist(),
            v["image"].to_pylist(),
            v["image_url"].to_pylist(),
            files,
            lines,
            strict=True,
        )
        for i, item_id, image, url, file, line in given:
            if image is not None and image.strip():
                images.append((i, (item_id, image.strip(), file, line)))
            elif url is not None and url.strip():
                urls.append((i, (item_id, url.strip(), file, line)))
    return (
        _merge(fast, clean, rows, ITEMS.schema),
        [r for _, r in sorted(images, key=lambda x: x[0])],
        [r for _, r in sorted(urls, key=lambda x: x[0])],
    )


def _item_rows(
    src: RawSource, raws, q: Quarantine, denied: DenyList, now, tally_read: bool = True
) -> tuple[list[tuple[int, dict]], list[tuple[int, ImageRef]], list[tuple[int, ImageRef]]]:
    """The per-row path: (position, raw row) pairs in source order → (position, clean row) pairs and
    (position, image ref) pairs; the first row of a key wins, an identical repeat is merged."""
    rows: dict[str, tuple[int, dict]] = {}
    images: list[tuple[int, ImageRef]] = []
    urls: list[tuple[int, ImageRef]] = []
    for at, raw in raws:
        file, line = raw["__file"], raw["__line"]
        if tally_read:
            q.tally(file).read += 1
        try:
            item_id = (decode_cell(raw.get("item_id"), "utf-8") or "").strip()
            title = decode_cell(raw.get("title"), src.text_encoding)
            text = decode_cell(raw.get("text"), src.text_encoding)
            attributes = decode_cell(raw.get("attributes"), src.text_encoding)
            rights = decode_cell(raw.get("rights"), "utf-8")
            image = decode_cell(raw.get("image"), "utf-8")
            url = decode_cell(raw.get("image_url"), "utf-8")
        except UnicodeDecodeError as exc:
            q.non_utf8(file, line, exc, excerpt(raw))
            continue
        if not item_id:
            q.add(
                file,
                line,
                None,
                "empty_id",
                "item_id is empty; every item needs a non-empty string id",
                excerpt(raw),
            )
            continue
        if denied and denied.has("item", item_id):
            q.add(file, line, None, "forgotten", "item was erased by a forget request; not re-ingested", None)
            continue
        digest = content_hash(title, text, attributes, rights)
        if item_id in rows:
            if rows[item_id][1]["content_hash"] == digest:
                q.tally(file).merged += 1
            else:
                q.add(
                    file,
                    line,
                    item_id,
                    "duplicate_conflict",
                    f"item_id {item_id!r} appears again with different content; the first row was kept. "
                    "De-duplicate the source.",
                    excerpt(raw),
                )
            continue
        rows[item_id] = (
            at,
            {
                "item_id": item_id,
                "title": title,
                "text": text,
                "attributes": attributes,
                "source": src.name,
                "rights": rights,
                "content_hash": digest,
                "created_at": now,
                "updated_at": now,
            },
        )
        q.tally(file).stored += 1
        if image is not None and image.strip():
            images.append((at, (item_id, image.strip(), file, line)))
        elif url is not None and url.strip():
            urls.append((at, (item_id, url.strip(), file, line)))
    return list(rows.values()), images, urls


def _ordered(rows: list[tuple[int, dict]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([r for _, r in rows], schema=schema)


def _merge(fast: pa.Table, clean: pa.Array, rows: list[tuple[int, dict]], schema: pa.Schema) -> pa.Table:
    """The clean rows and the per-row path's rows in source order (first occurrence), as one table."""
    if not rows:
        return fast
    at = pa.concat_arrays([clean.cast(pa.int64()), pa.array([i for i, _ in rows], pa.int64())])
    both = pa.concat_tables([fast, _ordered(rows, schema)])
    return both.take(pc.sort_indices(at))


def _check_images(
    src: RawSource, refs: list[ImageRef], q: Quarantine, denied: DenyList
) -> list[tuple[str, str, Path]]:
    """Local image refs -> (item_id, path as written, resolved path) for every file that passes the checks that need
    no read (deny-list, path inside the root, a regular file, size by `stat`); the rest are quarantined."""
    checked = []
    root = src.image_root
    label = file_label(root) if root else "images"
    for item_id, rel, _file, _line in refs:
        q.tally(label).read += 1
        if denied and denied.has("image", item_id):  # a modality forget: the item stays, its image not
            q.add(
                label, "-", None, "forgotten", "image was erased by a forget request; not re-ingested", None
            )
            continue
        try:
            if root is None:
                raise ImageError(
                    "missing_image", "the source names images but no image root was given (--images DIR)"
                )
            path, _size = stat_image_file(root, rel)
        except ImageError as exc:
            q.add(label, rel, item_id, exc.code, exc.detail, json.dumps({"item_id": item_id, "image": rel}))
            continue
        checked.append((item_id, rel, path))
    return checked


class _ImageBatches:
    """`item_images` rows committed every `max_rows` rows or `max_bytes` image bytes, whichever comes first: the
    one writer for local files and downloads, so an ingest never holds more than one batch of image bytes."""

    def __init__(self, ws: Workspace, result: UpsertResult | None, max_rows: int, max_bytes: int):
        self.ws, self.result, self.max_rows, self.max_bytes = ws, result, max_rows, max_bytes
        self.rows: list[dict] = []
        self.size = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.size += len(row["image"])
        if len(self.rows) >= self.max_rows or self.size >= self.max_bytes:
            self.commit()

    def commit(self) -> UpsertResult | None:
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=ITEM_IMAGES.schema)
            self.rows, self.size = [], 0
            self.result = _add_results(self.result, self.ws.upsert(ITEM_IMAGES, table))
        return self.result


def _store_images(
    ws: Workspace, src: RawSource, checked: list[tuple[str, str, Path]], q: Quarantine
) -> UpsertResult:
    """Read, hash, decode and commit the checked local images batch by batch. An item whose stored local image
    has the same sha256 is counted unchanged without decoding or writing it."""
    _ensure_url_column(ws)
    stored: dict[str, str] = {}
    if ws.exists(ITEM_IMAGES.name):
        old = ws.read(ITEM_IMAGES.name, columns=["item_id", "sha256"], where="url IS NULL")
        stored = dict(zip(old["item_id"].to_pylist(), old["sha256"].to_pylist(), strict=True))
    label = file_label(src.image_root) if src.image_root else "images"
    batches = _ImageBatches(ws, None, IMAGE_BATCH_ROWS, IMAGE_BATCH_BYTES)
    unchanged = 0
    now = utc_now()
    for item_id, rel, path in tqdm(checked, desc="images", unit="img", disable=len(checked) < 500):
        try:
            data = read_checked_file(path, rel)
            digest = hashlib.sha256(data).hexdigest()
            if stored.get(item_id) == digest:
                unchanged += 1
                q.tally(label).stored += 1
                continue
            info = inspect_image(data)
        except ImageError as exc:
            q.add(label, rel, item_id, exc.code, exc.detail, json.dumps({"item_id": item_id, "image": rel}))
            continue
        batches.add(
            {
                "item_id": item_id,
                "sha256": digest,
                "format": info.format,
                "width": info.width,
                "height": info.height,
                "image": data,
                "source": src.name,
                "created_at": now,
            }
        )
        q.tally(label).stored += 1
    done = batches.commit() or UpsertResult(ITEM_IMAGES.name, version=ws.version(ITEM_IMAGES.name))
    done.unchanged += unchanged
    return done


def _ensure_url_column(ws: Workspace) -> bool:
    """Add the `url` column (all null) to an `item_images` table written before it existed; False when the table
    does not exist yet."""
    if not ws.exists(ITEM_IMAGES.name):
        return False
    if "url" not in ws.dataset(ITEM_IMAGES.name).schema.names:
        ws.open(ITEM_IMAGES.name).add_columns({"url": "CAST(NULL AS STRING)"})
    return True


def _stored_urls(ws: Workspace) -> dict[str, str]:
    """item_id -> the URL its stored image came from."""
    if not _ensure_url_column(ws):
        return {}
    stored = ws.read(ITEM_IMAGES.name, columns=["item_id", "url"], where="url IS NOT NULL")
    return dict(zip(stored["item_id"].to_pylist(), stored["url"].to_pylist(), strict=True))


def _add_results(a: UpsertResult | None, b: UpsertResult) -> UpsertResult:
    if a is None:
        return b
    return UpsertResult(
        b.table, a.inserted + b.inserted, a.updated + b.updated, a.unchanged + b.unchanged, b.version
    )


def _fetch_url_images(
    ws: Workspace,
    src: RawSource,
    refs: list[ImageRef],
    q: Quarantine,
    denied: DenyList,
    policy: FetchPolicy,
    result: UpsertResult | None,
) -> UpsertResult | None:
    """Download, check and store the images named by URL, committing every `URL_BATCH_ROWS` rows or
    `URL_BATCH_BYTES` bytes. Items whose stored image came from the same URL are not fetched; items sharing a
    URL share one download. Every failure is a quarantine row (file `image_url`, line = item id)."""
    stored = _stored_urls(ws)
    wanted: dict[str, list[str]] = {}
    for item_id, url, _file, _line in refs:
        q.tally(URL_LABEL).read += 1
        if denied and denied.has("image", item_id):
            q.add(
                URL_LABEL,
                item_id,
                None,
                "forgotten",
                "image was erased by a forget request; not re-fetched",
                None,
            )
        elif stored.get(item_id) == url:
            q.tally(URL_LABEL).stored += 1
        else:
            wanted.setdefault(url, []).append(item_id)
    batches = _ImageBatches(ws, result, URL_BATCH_ROWS, URL_BATCH_BYTES)
    todo = sum(len(v) for v in wanted.values())
    with tqdm(total=todo, desc="image urls", unit="img", disable=todo < 500) as bar:
        for url, got in fetch_many(wanted, policy):
            items = wanted[url]
            bar.update(len(items))
            try:
                if isinstance(got, ImageError):
                    raise got
                info = inspect_image(got)
            except ImageError as exc:
                for item_id in items:
                    raw = json.dumps({"item_id": item_id, "image_url": url})[:300]
                    q.add(URL_LABEL, item_id, item_id, exc.code, exc.detail, raw)
                continue
            digest = hashlib.sha256(got).hexdigest()
            now = utc_now()
            for item_id in items:
                batches.add(
                    {
                        "item_id": item_id,
                        "sha256": digest,
                        "format": info.format,
                        "width": info.width,
                        "height": info.height,
                        "image": got,
                        "source": src.name,
                        "created_at": now,
                        "url": url,
                    }
                )
                q.tally(URL_LABEL).stored += 1
    return batches.commit()


def _validate_users(src: RawSource, q: Quarantine, denied: DenyList) -> pa.Table:
    """Users → clean rows (first-occurrence order), checked a column at a time like items."""
    table, now = src.users, utc_now()
    cols = _Columns.check(table, "user_id", ("user_id",), ("attributes",), src, "user", denied)
    if cols is None:
        return _ordered(_user_rows(src, enumerate(table.to_pylist()), q, denied, now), USERS.schema)
    clean = cols.clean(table.num_rows)
    _tally_clean(table, clean, q)
    slow_raw = zip(cols.slow.tolist(), table.take(cols.slow).to_pylist(), strict=True)
    rows = _user_rows(src, slow_raw, q, denied, now, tally_read=False)
    n = len(clean)
    fast = pa.table(
        {
            "user_id": cols.values["user_id"].take(clean),
            "attributes": cols.values["attributes"].take(clean),
            "source": pa.repeat(pa.scalar(src.name, pa.string()), n),
            "created_at": pa.repeat(pa.scalar(now, USERS.schema.field("created_at").type), n),
        },
        schema=USERS.schema,
    )
    return _merge(fast, clean, rows, USERS.schema)


def _user_rows(
    src: RawSource, raws, q: Quarantine, denied: DenyList, now, tally_read: bool = True
) -> list[tuple[int, dict]]:
    """The per-row path for users: (position, raw row) pairs → (position, clean row) pairs."""
    rows: dict[str, tuple[int, dict]] = {}
    for at, raw in raws:
        file, line = raw["__file"], raw["__line"]
        if tally_read:
            q.tally(file).read += 1
        try:
            user_id = (decode_cell(raw.get("user_id"), "utf-8") or "").strip()
            attributes = decode_cell(raw.get("attributes"), src.text_encoding)
        except UnicodeDecodeError as exc:
            q.non_utf8(file, line, exc, excerpt(raw))
            continue
        if not user_id:
            q.add(file, line, None, "empty_id", "user_id is empty", excerpt(raw))
            continue
        if denied and denied.has("user", user_id):
            q.add(file, line, None, "forgotten", "user was erased by a forget request; not re-ingested", None)
            continue
        if user_id in rows:
            if rows[user_id][1]["attributes"] == attributes:
                q.tally(file).merged += 1
            else:
                q.add(
                    file,
                    line,
                    user_id,
                    "duplicate_conflict",
                    f"user_id {user_id!r} appears again with different attributes",
                    excerpt(raw),
                )
            continue
        rows[user_id] = (
            at,
            {"user_id": user_id, "attributes": attributes, "source": src.name, "created_at": now},
        )
        q.tally(file).stored += 1
    return list(rows.values())


def _new_ids(ids: pa.Array, stored: pa.ChunkedArray) -> pa.Array:
    """The distinct `ids` not in `stored`, sorted (UTF-8 byte order is code-point order, as Python sorts str)."""
    new = ids.filter(pc.invert(pc.is_in(ids, value_set=stored.combine_chunks().cast(pa.string()))))
    return new.take(pc.sort_indices(new))


def ingest(ws: Workspace, src: RawSource, fetch: FetchPolicy | None = None) -> IngestReport:
    """Validate and write one source into the workspace; see the module docstring for the guarantees. `fetch`
    says how images named by URL are downloaded (default: public addresses only, `FetchPolicy()`).

    The whole ingest holds the workspace's write lease: the deny-list it reads and the rows it writes cannot be
    interleaved with another writer (a concurrent ingest, a forget)."""
    with write_lease(ws, f"ingest:{src.name}"):
        return _ingest_locked(ws, src, fetch or FetchPolicy())


def _ingest_locked(ws: Workspace, src: RawSource, fetch: FetchPolicy) -> IngestReport:
    q = Quarantine(src)
    tables: dict[str, UpsertResult] = {}
    denied = deny_list(ws)

    # Everything that can stop the job is checked before the first write: no source is committed half-way.
    items = image_refs = users = None
    checked_images: list[tuple[str, str, Path]] | None = None
    url_refs: list[ImageRef] = []
    if src.items is not None:
        items, image_refs, url_refs = _validate_items(src, q, denied)
        checked_images = _check_images(src, image_refs, q, denied) if image_refs else None
    if src.users is not None:
        users = _validate_users(src, q, denied)
    if src.interactions is not None:
        check_readable(src.interactions)
        # Interactions stream first, in one commit: a file that turns out unreadable half-way (a ragged non-UTF-8
        # row) then stops the job before anything at all is written.
        result, seen_items, seen_users = ingest_interactions(
            ws,
            src,
            q,
            denied,
            new_items=items["item_id"].combine_chunks() if items is not None else None,
            new_users=users["user_id"].combine_chunks() if users is not None else None,
        )

    if items is not None:
        tables["items"] = ws.upsert(ITEMS, items)
    if users is not None:
        tables["users"] = ws.upsert(USERS, users)
    if checked_images is not None:  # after the rows checked in full: image batches commit one by one
        tables["item_images"] = _store_images(ws, src, checked_images, q)

    if src.interactions is not None:
        items, users = seen_items, seen_users
        now = utc_now()
        if src.derive_items:  # only ids the workspace lacks: never overwrite a real item with a bare one
            derived = pa.table({"item_id": _new_ids(items, ws.read("items", columns=["item_id"])["item_id"])})
            n = derived.num_rows
            derived = derived.append_column("source", pa.repeat(pa.scalar(src.name, pa.string()), n))
            derived = derived.append_column(
                "content_hash", pa.repeat(pa.scalar(content_hash(), pa.string()), n)
            )
            derived = derived.append_column(
                "created_at", pa.repeat(pa.scalar(now, ITEMS.schema.field("created_at").type), n)
            )
            tables["items"] = ws.upsert(ITEMS, conform(derived, ITEMS.schema))
        if src.derive_users:
            derived = pa.table({"user_id": _new_ids(users, ws.read("users", columns=["user_id"])["user_id"])})
            n = derived.num_rows
            derived = derived.append_column("source", pa.repeat(pa.scalar(src.name, pa.string()), n))
            derived = derived.append_column(
                "created_at", pa.repeat(pa.scalar(now, USERS.schema.field("created_at").type), n)
            )
            tables["users"] = ws.upsert(USERS, conform(derived, USERS.schema))
        tables["interactions"] = result

    if url_refs:  # after the items they belong to are written; committed in batches (see the docstring)
        fetched = _fetch_url_images(ws, src, url_refs, q, denied, fetch, tables.get("item_images"))
        if fetched is not None:
            tables["item_images"] = fetched

    tables["quarantine"] = ws.upsert(QUARANTINE, pa.Table.from_pylist(q.rows, schema=QUARANTINE.schema))
    return IngestReport(src.name, tables, src.tallies)
