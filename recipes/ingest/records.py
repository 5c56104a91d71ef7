"""What every ingest module shares: the raw source a reader hands over (`RawSource`), per-file tallies, the report,
the quarantine collector, the content hash of an item and the one-line `SourceError`.

A `RawSource` holds string columns plus `__file`/`__line`, so every row can be traced to its file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from stores.workspace import UpsertResult


class SourceError(ValueError):
    """A source that cannot be read at all (missing or empty file, duplicate or non-UTF-8 header, corrupt
    compression): one line naming the file and the fix. Raised before anything is written."""


def file_label(name: str | Path) -> str:
    """A file name as text that can be stored: undecodable bytes of a non-UTF-8 name shown as escapes (\\xff)."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FileTally:
    """Per source file: rows read, and where each one went."""

    read: int = 0
    stored: int = 0
    merged: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        return self.read == self.stored + self.merged + self.quarantined


@dataclass
class RawSource:
    """What an adapter read. Tables hold strings (bytes where decoding must be checked) plus `__file`/`__line`."""

    name: str
    items: pa.Table | None = None
    users: pa.Table | None = None
    interactions: pa.Table | None = None
    image_root: Path | None = None
    text_encoding: str = "utf-8"
    derive_items: bool = False
    derive_users: bool = False
    default_event: str = "interaction"
    tallies: dict[str, FileTally] = field(default_factory=dict)
    quarantine: list[dict] = field(default_factory=list)

    def reject(self, file: str, line: int | str, reason: str, detail: str, raw: str | None) -> None:
        """Quarantine a row the adapter could not even parse (it counts as read and quarantined)."""
        self.tallies.setdefault(file, FileTally()).read += 1
        Quarantine(self).add(file, line, None, reason, detail, raw, into=self.quarantine)


@dataclass
class IngestReport:
    source: str
    tables: dict[str, UpsertResult]
    files: dict[str, FileTally]

    @property
    def balanced(self) -> bool:
        return all(t.balanced for t in self.files.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "tables": {k: vars(v) | {"written": v.written} for k, v in self.tables.items()},
            "files": {
                k: vars(v) | {"reasons": dict(v.reasons), "balanced": v.balanced}
                for k, v in self.files.items()
            },
            "balanced": self.balanced,
        }


def utc_now() -> datetime:
    return datetime.now(UTC)


def excerpt(row: dict) -> str:
    clean = {
        k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v)
        for k, v in row.items()
        if not k.startswith("__")
    }
    return json.dumps(clean, default=str, ensure_ascii=False)[:300]


class Quarantine:
    """Collects quarantine rows and keeps the per-file tallies in step with them."""

    def __init__(self, source: RawSource):
        self.source = source
        self.rows = list(source.quarantine)

    def tally(self, file: str) -> FileTally:
        tally = self.source.tallies.get(file)
        if tally is None:
            tally = self.source.tallies[file] = FileTally()
        return tally

    def add(
        self,
        file: str,
        line: int | str,
        key: str | None,
        reason: str,
        detail: str,
        raw: str | None,
        into: list[dict] | None = None,
    ) -> None:
        qid = hashlib.sha256(f"{self.source.name}|{file}|{line}|{reason}".encode()).hexdigest()[:32]
        (self.rows if into is None else into).append(
            {
                "quarantine_id": qid,
                "source": self.source.name,
                "file": f"{file}:{line}",
                "record_key": key,
                "reason": reason,
                "detail": detail,
                "raw_excerpt": raw,
                "created_at": utc_now(),
            }
        )
        tally = self.tally(file)
        tally.quarantined += 1
        tally.reasons[reason] += 1

    def non_utf8(self, file: str, line: int | str, exc: UnicodeDecodeError, raw: str | None) -> None:
        """Quarantine a row whose cells are not UTF-8, naming the offending byte and the fix."""
        self.add(
            file,
            line,
            None,
            "non_utf8",
            f"{exc.reason} at byte {exc.start}; re-encode the file as UTF-8",
            raw,
        )


def decode_cell(value: object, encoding: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(encoding)
    return str(value)


def content_hash(*parts: str | None) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update((part or "").encode())
        h.update(b"\x1f")
    return h.hexdigest()


def content_hashes(*columns: pa.Array) -> pa.Array:
    """`content_hash` of every row of equal-length string columns (null as empty), joined by Arrow: one
    sha256 call per row and no per-cell Python."""
    parts = [pc.fill_null(c.cast(pa.string()), "") for c in columns] + [pa.scalar("", pa.string())]
    joined = pc.binary_join_element_wise(*parts, "\x1f").cast(pa.binary())
    sha = hashlib.sha256
    return pa.array([sha(b).hexdigest() for b in joined.to_pylist()], pa.string())
