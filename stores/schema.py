"""The data model: every workspace table, its Arrow schema and its key.

Keys are strings end to end, so ids such as H&M's "0108775015" keep their leading zeros. Each table names the
columns that identify a row (`key`) and the cheap columns that tell whether a row's content changed (`compare`);
`stores.workspace.upsert` uses both so that writing the same rows twice adds nothing and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
EVENT_TIME = pa.timestamp("s", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    """One table of the workspace: its name, schema, key columns and change-detection columns."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    compare: tuple[str, ...] = ()


def sql_string(value: object) -> str:
    """`value` as a quoted SQL string literal for a Lance filter or DuckDB query: `o'brien` -> `'o''brien'`."""
    return "'" + str(value).replace("'", "''") + "'"


ITEMS = TableSpec(
    "items",
    pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("title", pa.string()),
            pa.field("text", pa.string()),
            # JSON object of source-specific attributes (genres, year, category, ...), queryable with DuckDB's json_*.
            pa.field("attributes", pa.string()),
            pa.field("source", pa.string()),
            # Rights / licence tag, used by attribute-based forget requests ("licence revoked").
            pa.field("rights", pa.string()),
            # sha256 over title, text, attributes and rights: what extractors and upserts compare.
            pa.field("content_hash", pa.string()),
            pa.field("created_at", TIMESTAMP),
            pa.field("updated_at", TIMESTAMP),
        ]
    ),
    key=("item_id",),
    compare=("content_hash",),
)

ITEM_IMAGES = TableSpec(
    "item_images",
    pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("format", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            # The original file bytes, unchanged; decoders apply EXIF orientation and mode at read time.
            pa.field("image", pa.large_binary()),
            pa.field("source", pa.string()),
            pa.field("created_at", TIMESTAMP),
            # The http(s) URL the bytes were downloaded from (null for local files): re-ingest skips a stored URL.
            # Added after the first release; `recipes.ingest.load` adds it to older tables.
            pa.field("url", pa.string()),
        ]
    ),
    key=("item_id",),
    compare=("sha256", "url"),
)

USERS = TableSpec(
    "users",
    pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("attributes", pa.string()),
            pa.field("source", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("user_id",),
    compare=("attributes",),
)

INTERACTIONS = TableSpec(
    "interactions",
    pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("timestamp", EVENT_TIME, nullable=False),
            pa.field("event", pa.string(), nullable=False),
            # Occurrence number of an identical (user, item, timestamp, event) within one source: repeat purchases
            # on the same day (H&M) stay distinct rows, while re-ingesting the source maps onto the same keys.
            pa.field("seq", pa.int32(), nullable=False),
            pa.field("value", pa.float64()),
            pa.field("source", pa.string()),
        ]
    ),
    key=("user_id", "item_id", "timestamp", "event", "seq"),
    compare=("value",),
)

# Review texts of interactions (the Amazon source: summary/title and text), keyed like `interactions` so each
# review names the interaction it belongs to; written only for interactions that were stored.
REVIEWS = TableSpec(
    "reviews",
    pa.schema(
        [
            *(INTERACTIONS.schema.field(name) for name in INTERACTIONS.key),
            pa.field("title", pa.string()),
            pa.field("text", pa.string()),
            pa.field("source", pa.string()),
        ]
    ),
    key=INTERACTIONS.key,
    compare=("title", "text"),
)

QUARANTINE = TableSpec(
    "quarantine",
    pa.schema(
        [
            pa.field("quarantine_id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("file", pa.string()),
            pa.field("record_key", pa.string()),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("detail", pa.string()),
            pa.field("raw_excerpt", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("quarantine_id",),
)

KEYED_PREFIX = "hmac:"


@lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)


def key_hash(secret: bytes | None, kind: str, key: str) -> str:
    """How the deny-list and the forget log name a forgotten user, item, image or interaction without storing the
    key: "hmac:" + HMAC-SHA256 of "<kind>:<key>" under the workspace's secret (stores/erasure/log.py
    `workspace_secret`), so nobody without the secret can recover an id by hashing candidates. `secret=None` gives
    the unkeyed sha256 of deny-list rows and log entries written before keyed hashes (see `legacy_hash`).
    Kinds: user, item, image, interaction, interaction_user."""
    if secret is None:
        return legacy_hash(kind, key)
    mac = _keyed(secret).copy()
    mac.update(f"{kind}:{key}".encode())
    return KEYED_PREFIX + mac.hexdigest()


def legacy_hash(kind: str, key: str) -> str:
    """The unkeyed sha256 of "<kind>:<key>" that older workspaces' deny-lists hold (no prefix); still honoured by
    ingest, never written any more."""
    return hashlib.sha256(f"{kind}:{key}".encode()).hexdigest()


# Hashed keys of forgotten users and items: re-ingesting a source that still holds them quarantines the rows
# without storing the key itself (see stores/erasure/). `key_hash` is keyed ("hmac:..."); rows without the prefix
# are unkeyed sha256 from before keyed hashes.
DENY_LIST = TableSpec(
    "deny_list",
    pa.schema(
        [
            pa.field("key_hash", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("request_id", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("key_hash",),
)

# Versioned artifacts (splits, graphs, snapshots, exports): a name, its kind, the table that holds its rows and a
# JSON manifest recording the input tables and their versions, the parameters and the counts.
ARTIFACTS = TableSpec(
    "artifacts",
    pa.schema(
        [
            pa.field("name", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("table_name", pa.string()),
            pa.field("table_version", pa.int64()),
            pa.field("manifest", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("kind", "name"),
    compare=("table_version", "manifest"),
)

CORE_TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (ITEMS, ITEM_IMAGES, USERS, INTERACTIONS, REVIEWS, QUARANTINE, DENY_LIST, ARTIFACTS)
}
