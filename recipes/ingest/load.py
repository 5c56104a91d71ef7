"""Validated ingest: raw source rows in, clean keyed rows and quarantine rows out, counts that add up.

Adapters (recipes/ingest/sources.py) turn a source's files into `RawSource`: string columns plus `__file`/`__line` so
every row can be traced. `ingest` validates items, images, users and interactions, writes the good rows through
keyed upserts and every bad row into `quarantine` with a reason code, and returns a report in which, per source
file, rows read = rows stored + rows merged (identical duplicates) + rows quarantined.

Bad input is data or one error, never a traceback and never a half-written source: a row that cannot be used is
quarantined with a reason code (malformed_row, non_utf8, empty_id, bad_value, bad_timestamp, duplicate_conflict,
an image reason...) and the job goes on; a file that cannot be read at all raises `SourceError` (one line naming the
file and the fix) before anything is written. Items, images and users are validated in full before the first write,
and interactions are checked (header, columns, compression) before it too; their rows then stream into one commit.

Images named by URL (`image_url`, used where an item has no local `image`) are downloaded after the rows are written
(extractors/fetch.py: SSRF guard, timeouts, retries, size limit), decoded like local files and committed in batches:
an interrupted ingest keeps what it fetched, and a URL whose bytes are stored for that item is never fetched again.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
from tqdm.auto import tqdm

from extractors.fetch import FetchPolicy, fetch_many
from extractors.images import ImageError, inspect_image, read_image_file
from recipes.ingest.interactions import check_readable, ingest_interactions
from recipes.ingest.records import (
    IngestReport,
    Quarantine,
    RawSource,
    content_hash,
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


def _validate_items(
    src: RawSource, q: Quarantine, denied: DenyList
) -> tuple[list[dict], list[ImageRef], list[ImageRef]]:
    """Items → clean rows, plus the image refs: local paths, and URLs of items that name no local image."""
    rows: dict[str, dict] = {}
    images: list[ImageRef] = []
    urls: list[ImageRef] = []
    now = utc_now()
    for raw in src.items.to_pylist():
        file, line = raw["__file"], raw["__line"]
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
            q.add(
                file,
                line,
                None,
                "non_utf8",
                f"{exc.reason} at byte {exc.start}; re-encode the file as UTF-8",
                excerpt(raw),
            )
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
            if rows[item_id]["content_hash"] == digest:
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
        rows[item_id] = {
            "item_id": item_id,
            "title": title,
            "text": text,
            "attributes": attributes,
            "source": src.name,
            "rights": rights,
            "content_hash": digest,
            "created_at": now,
            "updated_at": now,
        }
        q.tally(file).stored += 1
        if image is not None and image.strip():
            images.append((item_id, image.strip(), file, line))
        elif url is not None and url.strip():
            urls.append((item_id, url.strip(), file, line))
    return list(rows.values()), images, urls


def _validate_images(
    src: RawSource, refs: list[tuple[str, str, str, int]], q: Quarantine, denied: DenyList
) -> list[dict]:
    rows = []
    root = src.image_root
    label = file_label(root) if root else "images"
    now = utc_now()
    for item_id, rel, _file, _line in tqdm(refs, desc="images", unit="img", disable=len(refs) < 500):
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
            data = read_image_file(root, rel)
            info = inspect_image(data)
        except ImageError as exc:
            q.add(label, rel, item_id, exc.code, exc.detail, json.dumps({"item_id": item_id, "image": rel}))
            continue
        rows.append(
            {
                "item_id": item_id,
                "sha256": hashlib.sha256(data).hexdigest(),
                "format": info.format,
                "width": info.width,
                "height": info.height,
                "image": data,
                "source": src.name,
                "created_at": now,
            }
        )
        q.tally(label).stored += 1
    return rows


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
    batch: list[dict] = []
    size = 0

    def commit() -> None:
        nonlocal result, batch, size
        if batch:
            table = pa.Table.from_pylist(batch, schema=ITEM_IMAGES.schema)
            result = _add_results(result, ws.upsert(ITEM_IMAGES, table))
        batch, size = [], 0

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
                batch.append(
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
                size += len(got)
                q.tally(URL_LABEL).stored += 1
            if len(batch) >= URL_BATCH_ROWS or size >= URL_BATCH_BYTES:
                commit()
    commit()
    return result


def _validate_users(src: RawSource, q: Quarantine, denied: DenyList) -> list[dict]:
    rows: dict[str, dict] = {}
    now = utc_now()
    for raw in src.users.to_pylist():
        file, line = raw["__file"], raw["__line"]
        q.tally(file).read += 1
        try:
            user_id = (decode_cell(raw.get("user_id"), "utf-8") or "").strip()
            attributes = decode_cell(raw.get("attributes"), src.text_encoding)
        except UnicodeDecodeError as exc:
            q.add(
                file,
                line,
                None,
                "non_utf8",
                f"{exc.reason} at byte {exc.start}; re-encode the file as UTF-8",
                excerpt(raw),
            )
            continue
        if not user_id:
            q.add(file, line, None, "empty_id", "user_id is empty", excerpt(raw))
            continue
        if denied and denied.has("user", user_id):
            q.add(file, line, None, "forgotten", "user was erased by a forget request; not re-ingested", None)
            continue
        if user_id in rows:
            if rows[user_id]["attributes"] == attributes:
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
        rows[user_id] = {"user_id": user_id, "attributes": attributes, "source": src.name, "created_at": now}
        q.tally(file).stored += 1
    return list(rows.values())


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
    items = image_refs = images = users = None
    url_refs: list[ImageRef] = []
    if src.items is not None:
        items, image_refs, url_refs = _validate_items(src, q, denied)
        images = _validate_images(src, image_refs, q, denied) if image_refs else None
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
            new_items=[r["item_id"] for r in items or []],
            new_users=[r["user_id"] for r in users or []],
        )

    if items is not None:
        tables["items"] = ws.upsert(ITEMS, pa.Table.from_pylist(items, schema=ITEMS.schema))
    if images is not None:
        _ensure_url_column(ws)
        tables["item_images"] = ws.upsert(
            ITEM_IMAGES, pa.Table.from_pylist(images, schema=ITEM_IMAGES.schema)
        )
    if users is not None:
        tables["users"] = ws.upsert(USERS, pa.Table.from_pylist(users, schema=USERS.schema))

    if src.interactions is not None:
        items, users = seen_items, seen_users
        now = utc_now()
        if src.derive_items:  # only ids the workspace lacks: never overwrite a real item with a bare one
            items -= set(ws.read("items", columns=["item_id"])["item_id"].to_pylist())
            derived = pa.table({"item_id": sorted(items)})
            n = derived.num_rows
            derived = derived.append_column("source", pa.array([src.name] * n, pa.string()))
            derived = derived.append_column("content_hash", pa.array([content_hash()] * n, pa.string()))
            derived = derived.append_column(
                "created_at", pa.array([now] * n, ITEMS.schema.field("created_at").type)
            )
            tables["items"] = ws.upsert(ITEMS, conform(derived, ITEMS.schema))
        if src.derive_users:
            users -= set(ws.read("users", columns=["user_id"])["user_id"].to_pylist())
            derived = pa.table({"user_id": sorted(users)})
            n = derived.num_rows
            derived = derived.append_column("source", pa.array([src.name] * n, pa.string()))
            derived = derived.append_column(
                "created_at", pa.array([now] * n, USERS.schema.field("created_at").type)
            )
            tables["users"] = ws.upsert(USERS, conform(derived, USERS.schema))
        tables["interactions"] = result

    if url_refs:  # after the items they belong to are written; committed in batches (see the docstring)
        fetched = _fetch_url_images(ws, src, url_refs, q, denied, fetch, tables.get("item_images"))
        if fetched is not None:
            tables["item_images"] = fetched

    tables["quarantine"] = ws.upsert(QUARANTINE, pa.Table.from_pylist(q.rows, schema=QUARANTINE.schema))
    return IngestReport(src.name, tables, src.tallies)
