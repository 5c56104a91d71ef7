"""Streaming, validated ingest of interactions: bounded memory at any size.

The source is read in batches (CSV through Arrow's streaming reader, bytes checked for UTF-8 per batch). Each
batch is classified in DuckDB (ids, timestamps, values, deny-list, unknown items/users); bad rows become quarantine
rows, clean rows stream straight into the Lance table. Two 64-bit hashes per row (of the key, and of key + value)
replace a global join: `seq` (the occurrence number of an identical user/item/time/event, so same-day repeat
purchases stay distinct) comes from the key hashes seen so far, and a re-ingest compares against the hashes of
the rows already stored, so unchanged rows are skipped and changed values are merged.

Bad rows are quarantined, never fatal: a row with the wrong number of fields is `malformed_row` (pyarrow's
`invalid_row_handler`), a value that is not a finite number is `bad_value`, and a timestamp is `bad_timestamp`
unless it lands between 1970-01-01 and one year from now. A number too large to be seconds in that window is read
as milliseconds, microseconds or nanoseconds, the first of those that lands between 2000-01-01 and one year from now
(1700000000000 is 2023-11-14 in milliseconds); anything else is `bad_timestamp`, so a value such as 2^63-1 never
reaches the table. Gzipped files are read (detected by their magic bytes, whatever their name); a file that cannot
be read at all (empty, duplicate or non-UTF-8 header, corrupt compression) raises `SourceError` before any write.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import queue
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recipes.ingest.records import SourceError, file_label
from stores.erasure.keys import DenyList
from stores.schema import INTERACTIONS
from stores.workspace import UpsertResult, Workspace

# Small batches keep the transient copies of a batch (bytes, strings, classified columns, Lance's encoding) near
# 100 MB in all; larger ones bought no CPU at 2M rows (bench/ingest.py) but cost ~150 MB more peak.
BATCH_BYTES = 4 << 20
PARQUET_BATCH_ROWS = 1 << 17
FIELDS = ("user_id", "item_id", "timestamp", "event", "value")
# Ids and events repeat within a batch (a catalogue's popular items, a user's sessions): the CSV reader
# dictionary-encodes them, so trims, UTF-8 checks, hashes and known-id lookups run once per distinct value in the
# batch, not once per row.
ID_FIELDS = ("user_id", "item_id", "event")
ID_BYTES = pa.dictionary(pa.int32(), pa.binary())

MIN_SECONDS = 0  # 1970-01-01: no interaction log predates the unix epoch
MIN_SCALED_SECONDS = 946_684_800  # 2000-01-01: the earliest a millisecond/micro/nano epoch is taken to mean
FUTURE_SLACK_SECONDS = 366 * 86_400  # clocks and time zones drift; a year ahead does not

DETAILS = {
    "empty_id": "user_id or item_id is empty",
    "bad_timestamp": "timestamp is not unix seconds (or ms/us/ns) or an ISO date/time between 1970 and a year from now",
    "bad_value": "value is not a finite number",
    "malformed_row": "row has the wrong number of fields; fix the quoting or the delimiter",
    "forgotten": "user or item was erased by a forget request; not re-ingested",
    "unknown_item": "item_id is not among the source's or the workspace's items; ingest the item first",
    "unknown_user": "user_id is not among the source's or the workspace's users; ingest the user first",
    "non_utf8": "row holds bytes that are not UTF-8; re-encode the file as UTF-8",
}


@dataclass
class CsvStream:
    """A delimited interactions file read lazily in batches (every column as bytes, then checked as UTF-8)."""

    path: Path
    delimiter: str = ","
    mapping: dict[str, str] = field(default_factory=dict)
    column_names: list[str] | None = None  # for files without a header row (ML-100K's u.data)

    malformed: list[str] = field(default_factory=list)  # ragged rows skipped by the reader, drained per batch

    @property
    def file(self) -> str:
        return file_label(self.path.name)

    @property
    def header(self) -> list[str]:
        """The column names; raises `SourceError` for an empty file or a non-UTF-8 or duplicate header."""
        first = first_line(self.path)
        if self.column_names is not None:
            return list(self.column_names)
        return parse_header(first, self.path, self.delimiter)

    @property
    def fields(self) -> list[str]:
        return [self.mapping.get(c, c) for c in self.header]

    def drain_malformed(self) -> Iterator[str]:
        """The ragged rows skipped so far (the reader may append from its read-ahead thread meanwhile)."""
        while self.malformed:
            yield self.malformed.pop(0)

    def batches(self) -> Iterator[pa.Table]:
        names = self.header
        read = pacsv.ReadOptions(
            block_size=BATCH_BYTES, column_names=self.column_names, autogenerate_column_names=False
        )
        convert = pacsv.ConvertOptions(
            column_types={n: ID_BYTES if self.mapping.get(n, n) in ID_FIELDS else pa.binary() for n in names},
            strings_can_be_null=False,
        )

        def skip(row: pacsv.InvalidRow) -> str:
            self.malformed.append(row.text)
            return "skip"

        parse = pacsv.ParseOptions(delimiter=self.delimiter, invalid_row_handler=skip)
        with quiet_invalid_row_decoding():
            reader = pacsv.open_csv(
                open_input(self.path), read_options=read, convert_options=convert, parse_options=parse
            )
            line = 1
            for batch in reader:
                table = pa.Table.from_batches([batch])
                table = table.rename_columns([self.mapping.get(c, c) for c in table.column_names])
                n = table.num_rows
                table = table.append_column("__line", pa.array(np.arange(line, line + n, dtype=np.int64)))
                line += n
                yield table


@dataclass
class ParquetStream:
    """A Parquet interactions file read lazily by record batch, every column as strings (the same conversion as a
    whole-file read), so memory does not grow with the file. Only files whose columns are all scalar stream; a nested
    column (quarantined row by row as `bad_value`) takes the whole-file path in `sources`."""

    path: Path
    mapping: dict[str, str] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return file_label(self.path.name)

    @property
    def header(self) -> list[str]:
        return pq.ParquetFile(self.path).schema_arrow.names

    @property
    def fields(self) -> list[str]:
        return [self.mapping.get(c, c) for c in self.header]

    def drain_malformed(self) -> Iterator[str]:
        return iter(())  # Parquet has no ragged rows

    def batches(self) -> Iterator[pa.Table]:
        line = 1
        with pq.ParquetFile(self.path) as pf:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                columns = {}
                for name, col in zip(batch.schema.names, batch.columns, strict=True):
                    if pa.types.is_timestamp(col.type) and col.type.unit == "s":
                        # the stored value is already unix seconds (UTC): no ISO round trip through DuckDB
                        col = col.cast(pa.int64())
                    columns[self.mapping.get(name, name)] = (
                        col if pa.types.is_string(col.type) else col.cast(pa.string(), safe=False)
                    )
                n = batch.num_rows
                columns["__line"] = pa.array(np.arange(line, line + n, dtype=np.int64))
                line += n
                yield pa.table(columns)


Stream = CsvStream | ParquetStream


@contextlib.contextmanager
def quiet_invalid_row_decoding() -> Iterator[None]:
    """pyarrow decodes a ragged row as UTF-8 before calling `invalid_row_handler`; when that fails it prints an
    "Exception ignored" traceback and then fails the read, which the caller reports as one `SourceError`. Keep
    that traceback off the user's terminal; every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(info) -> None:
        if not (
            isinstance(info.exc_value, UnicodeDecodeError)
            and "invalid_row" in repr(info.object) + "".join(traceback.format_tb(info.exc_traceback))
        ):
            previous(info)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_input(path: Path) -> pa.NativeFile:
    """A byte stream over `path`, decompressed when the file is gzip (by its magic bytes, whatever its name)."""
    compression = "gzip" if is_gzip(path) else None
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 file name: Arrow takes only UTF-8 paths, Python's open takes any
        raw = pa.PythonFile(open(path, "rb"), mode="r")  # noqa: SIM115 - closed with the stream
        return pa.CompressedInputStream(raw, compression) if compression else raw
    return pa.input_stream(str(path), compression=compression)


def first_line(path: Path) -> bytes:
    """The first line of a (possibly gzipped) file; `SourceError` when the file is empty or unreadable."""
    try:
        with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as fh:
            first = fh.readline()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(
            f"cannot read {path}: {exc}; check that the file (or its compression) is intact"
        ) from None
    if not first.strip():
        raise SourceError(f"{path} is empty or has no header row; add a header naming the columns")
    return first


def parse_header(first: bytes, path: Path, delimiter: str) -> list[str]:
    """Column names from a header line: BOM stripped, UTF-8 required, no name twice."""
    try:
        first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"the header of {path} is not UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    try:
        names = pacsv.read_csv(
            pa.py_buffer(first), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        ).column_names
    except pa.ArrowInvalid as exc:
        raise SourceError(f"cannot parse the header of {path}: {exc}; fix the header row") from None
    check_unique(names, path)
    return names


def check_unique(names: list[str], path: Path | str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SourceError(
                f"column {name!r} appears twice in the header of {path}; rename or drop one of them "
                "(or fix the --map that maps two columns onto it)"
            )
        seen.add(name)


def check_readable(interactions: pa.Table | Stream) -> None:
    """What must hold before anything is written: a header without duplicates (after --map), the key columns
    present, and, for a gzipped file, compression that decodes to its end."""
    if isinstance(interactions, Stream):
        fields, name = interactions.fields, interactions.path
        if isinstance(interactions, CsvStream) and is_gzip(interactions.path):
            try:
                with gzip.open(interactions.path, "rb") as fh:
                    while fh.read(16 << 20):
                        pass
            except (OSError, EOFError, zlib.error) as exc:
                raise SourceError(
                    f"{name} is a damaged gzip file ({exc}); re-compress or unpack it"
                ) from None
    else:
        fields = interactions.column_names
        name = interactions["__file"][0].as_py() if interactions.num_rows else "interactions"
    check_unique(fields, name)
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in fields]
    if missing:
        raise SourceError(f"{name} has no {', '.join(missing)} column; map one with --map COLUMN=FIELD")


def iter_batches(interactions: pa.Table | Stream) -> Iterator[pa.Table]:
    if isinstance(interactions, Stream):
        yield from interactions.batches()
    else:
        yield from (pa.Table.from_batches([b]) for b in interactions.to_batches(max_chunksize=1 << 20))


def _utf8_dictionary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary column of bytes as a dictionary of strings, checking only its distinct values; its rows as
    plain bytes when a value is not UTF-8 (then checked row by row like any bytes column)."""
    try:
        return pa.chunked_array(
            [pa.DictionaryArray.from_arrays(c.indices, c.dictionary.cast(pa.string())) for c in col.chunks],
            pa.dictionary(pa.int32(), pa.string()),
        )
    except pa.ArrowInvalid:
        return col.cast(pa.binary())


def _utf8(batch: pa.Table) -> tuple[pa.Table, list[int]]:
    """Cast bytes columns to strings; rows with invalid UTF-8 are dropped and their positions returned."""
    bad: set[int] = set()
    columns = {}
    for name in batch.column_names:
        col = batch[name]
        if col.type == ID_BYTES:
            col = _utf8_dictionary(col)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            try:
                col = col.cast(pa.string())
            except pa.ArrowInvalid:
                values = col.to_pylist()
                for idx, value in enumerate(values):
                    try:
                        if value is not None:
                            value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad.add(idx)
                col = pa.array(
                    [None if i in bad or v is None else v.decode("utf-8") for i, v in enumerate(values)],
                    pa.string(),
                )
        columns[name] = col
    table = pa.table(columns)
    if bad:
        keep = np.ones(table.num_rows, bool)
        keep[list(bad)] = False
        table = table.filter(pa.array(keep))
    return table, sorted(bad)


_TS_SECONDS = """COALESCE(
  TRY_CAST(floor(TRY_CAST(ts AS DOUBLE)) AS BIGINT),
  epoch(TRY_CAST(ts AS TIMESTAMP))::BIGINT)"""


def _strings(batch: pa.Table, name: str, n: int) -> pa.Array:
    """A column as trimmed strings with empty strings as null (all nulls when the column is absent)."""
    if name not in batch.column_names:
        return pa.nulls(n, pa.string())
    return _trimmed(batch[name].combine_chunks().cast(pa.string()))


def _trimmed(strings: pa.Array) -> pa.Array:
    """Strings trimmed of surrounding whitespace, empty ones as null."""
    col = pc.utf8_trim_whitespace(strings)
    empty = pc.equal(col, "")
    if not pc.any(empty).as_py():  # the common case: no copy of the column through if_else
        return col
    return pc.if_else(empty, pa.scalar(None, pa.string()), col)


def _strings_cast(batch: pa.Table, name: str, n: int, to: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """`_strings` of a column and, when every value casts to `to` as it stands, that cast (else None). Arrow's
    number parsing rejects surrounding whitespace and empty strings, so a column that casts needs no trim."""
    if name in batch.column_names:
        raw = batch[name].combine_chunks().cast(pa.string())
        try:
            return raw, pc.cast(raw, to)
        except pa.ArrowInvalid:
            pass
    return _strings(batch, name, n), None


def _hashes(con: duckdb.DuckDBPyConnection, strings: pa.Array) -> np.ndarray:
    """DuckDB's `hash` of each string (null included: any value, its row is quarantined as empty_id)."""
    con.register("ids", pa.table({"id": strings}))
    out = _uint64(con.sql("SELECT hash(id) AS h FROM ids").to_arrow_table()["h"])
    con.unregister("ids")
    return out


def _distinct(batch: pa.Table, name: str, n: int) -> tuple[pa.Array, np.ndarray | None]:
    """A column as `_strings` makes it, as (values, each row's position in them): for a dictionary column (the CSV
    reader's) the values are the batch's distinct ones, trimmed once each; for any other, the rows themselves and
    None. `values.take(rows)` is exactly `_strings` of the column."""
    col = batch[name] if name in batch.column_names else None
    if col is not None and pa.types.is_dictionary(col.type) and col.num_chunks == 1:
        codes = col.chunk(0).indices
        if not codes.null_count:
            return _trimmed(col.chunk(0).dictionary.cast(pa.string())), codes.to_numpy()
    return _strings(batch, name, n), None


def _per_row(values: pa.Array | np.ndarray, rows: np.ndarray | None):
    if rows is None:
        return values
    return values[rows] if isinstance(values, np.ndarray) else values.take(pa.array(rows))


def _fmix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection whose every output bit depends on every input bit."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _key_hash(hu: np.ndarray, hi: np.ndarray, t: pa.Array, he: np.ndarray) -> np.ndarray:
    """One 64-bit hash of (user, item, time, event) from the ids' and event's hashes: two keys differing only in
    time never collide (odd multiplier), others as often as random 64-bit values. Null times hash as 0 (their rows
    are quarantined)."""
    seconds = pc.fill_null(t, 0).to_numpy(zero_copy_only=False).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = hu * np.uint64(0x9E3779B97F4A7C15) + hi * np.uint64(0xC2B2AE3D27D4EB4F)
        mixed += seconds * np.uint64(0x165667B19E3779F9) + he
    return _fmix(mixed)


def _seconds(con: duckdb.DuckDBPyConnection, ts: pa.Array) -> pa.Array:
    """Unix seconds from unix-second strings (fast path) or decimals / ISO dates and times (DuckDB, only for
    the rows that need it). Unparseable values become null."""
    try:
        return pc.cast(ts, pa.int64())
    except pa.ArrowInvalid:
        pass
    is_int = pc.fill_null(
        pc.match_substring_regex(ts, r"^-?[0-9]{1,18}$"), False
    )  # longer ones overflow int64
    ints = pc.cast(pc.if_else(is_int, ts, pa.scalar(None, pa.string())), pa.int64())
    rest = pc.and_(pc.invert(is_int), pc.is_valid(ts))
    if not pc.any(rest).as_py():
        return ints
    idx = pc.indices_nonzero(rest)
    con.register("odd_ts", pa.table({"ts": ts.take(idx)}))
    parsed = con.sql(f"SELECT {_TS_SECONDS} AS t FROM odd_ts").to_arrow_table()["t"].combine_chunks()
    con.unregister("odd_ts")
    out = ints.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(ints))
    out = np.where(valid, np.nan_to_num(out), 0).astype(np.int64)
    fill = np.asarray(idx)
    out[fill] = np.nan_to_num(parsed.to_numpy(zero_copy_only=False)).astype(np.int64)
    valid[fill] = np.asarray(parsed.is_valid())
    return pa.array(out, pa.int64(), mask=~valid)


def plausible_seconds(t: pa.Array, now: float | None = None) -> pa.Array:
    """Seconds inside [1970, now + 1 year]; larger values rescaled from ms/us/ns when that lands in
    [2000, now + 1 year]; everything else null (then quarantined as bad_timestamp)."""
    latest = int(now if now is not None else time.time()) + FUTURE_SLACK_SECONDS
    valid = np.asarray(t.is_valid())
    values = pc.fill_null(t, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = values.copy()
    ok = valid & (values >= MIN_SECONDS) & (values <= latest)
    for scale in (1_000, 1_000_000, 1_000_000_000):
        scaled = values // scale
        fits = valid & ~ok & (values > latest) & (scaled >= MIN_SCALED_SECONDS) & (scaled <= latest)
        out[fits] = scaled[fits]
        ok |= fits
    return pa.array(out, pa.int64(), mask=~ok)


def _floats(v: pa.Array) -> pa.Array:
    """Numbers from strings; unparseable values become null (and are flagged as bad_value by the caller)."""
    try:
        return pc.cast(v, pa.float64())
    except pa.ArrowInvalid:
        ok = pc.fill_null(
            pc.match_substring_regex(v, r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"), False
        )
        return pc.cast(pc.if_else(ok, v, pa.scalar(None, pa.string())), pa.float64())


def _denied_mask(ids: pa.Array, kind: str, denied: DenyList) -> pa.Array:
    uniques = pc.unique(ids).drop_null().to_pylist()
    hit = [x for x in uniques if denied.has(kind, x)]
    return pc.fill_null(pc.is_in(ids, value_set=pa.array(hit, pa.string())), False)


def _denied_pairs(u: pa.Array, i: pa.Array, denied: DenyList) -> pa.Array:
    """Rows whose (user, item) pair was forgotten; only rows of users with a forgotten pair are hashed."""
    candidates = np.flatnonzero(np.asarray(_denied_mask(u, "interaction_user", denied)))
    mask = np.zeros(len(u), bool)
    if len(candidates):
        users, items = u.take(candidates).to_pylist(), i.take(candidates).to_pylist()
        for pos, user, item in zip(candidates, users, items, strict=True):
            if item is not None:
                mask[pos] = denied.has_pair(user, item)
    return pa.array(mask)


def _classify(
    con: duckdb.DuckDBPyConnection,
    batch: pa.Table,
    default_event: str,
    denied: DenyList,
    known_items: _KnownIds | None,
    known_users: _KnownIds | None,
) -> tuple[pa.Table, tuple[pa.Array, np.ndarray | None], tuple[pa.Array, np.ndarray | None]]:
    """Arrow-native validation of one batch: typed columns, a reason code per bad row (first rule wins) and a
    64-bit hash of the (user, item, time, event) key; with it, the user and item ids as `_distinct` gives them."""
    n = batch.num_rows
    (u_values, u_rows), (i_values, i_rows) = _distinct(batch, "user_id", n), _distinct(batch, "item_id", n)
    e_values, e_rows = _distinct(batch, "event", n)
    e_values = pc.fill_null(e_values, default_event)
    # one DuckDB query hashes the distinct users, items and events together
    hashes = _hashes(con, pa.concat_arrays([u_values, i_values, e_values]))
    hu_values, hi_values = hashes[: len(u_values)], hashes[len(u_values) : len(u_values) + len(i_values)]
    known_u = known_users.has(u_values, hu_values) if known_users is not None else None
    known_i = known_items.has(i_values, hi_values) if known_items is not None else None
    u, i, e = _per_row(u_values, u_rows), _per_row(i_values, i_rows), _per_row(e_values, e_rows)
    hu, hi = _per_row(hu_values, u_rows), _per_row(hi_values, i_rows)
    he = _per_row(hashes[len(u_values) + len(i_values) :], e_rows)
    ts, seconds = _strings_cast(batch, "timestamp", n, pa.int64())
    v, val = _strings_cast(batch, "value", n, pa.float64())
    t = plausible_seconds(seconds if seconds is not None else _seconds(con, ts))
    val = val if val is not None else _floats(v)
    rules = [
        ("empty_id", pc.or_(pc.is_null(u), pc.is_null(i))),
        ("bad_timestamp", pc.is_null(t)),
        ("bad_value", pc.and_(pc.is_valid(v), pc.invert(pc.fill_null(pc.is_finite(val), False)))),
    ]
    if denied:
        rules.append(("forgotten", pc.or_(_denied_mask(u, "user", denied), _denied_mask(i, "item", denied))))
        rules.append(("forgotten", _denied_pairs(u, i, denied)))
    h1 = pa.array(_key_hash(hu, hi, t, he))
    if known_i is not None:
        rules.append(("unknown_item", pa.array(~_per_row(known_i, i_rows))))
    if known_u is not None:
        rules.append(("unknown_user", pa.array(~_per_row(known_u, u_rows))))
    reason = pa.nulls(n, pa.string())
    # A clean batch (the common case) flags nothing: skip the per-row if_else chain over it.
    flagged = [(code, pc.fill_null(mask, False)) for code, mask in rules]
    for code, mask in reversed([(c, m) for c, m in flagged if pc.any(m).as_py()]):
        reason = pc.if_else(mask, pa.scalar(code), reason)
    out = pa.table(
        {
            "u": u,
            "i": i,
            "t": t,
            "e": e,
            "val": val,
            "__line": batch["__line"],
            "ts": ts,
            "v": v,
            "reason": reason,
            "h1": h1,
        }
    )
    return out, (u_values, u_rows), (i_values, i_rows)


def _clean_ids(ids: tuple[pa.Array, np.ndarray | None], reason: pa.Array) -> pa.Array:
    """The ids the clean rows hold (each at least once): a dictionary's values that a clean row points at, so the
    distinct ids of a batch are collected from its ~10k distinct values, not its ~100k rows."""
    values, rows = ids
    clean = np.asarray(reason.is_null())
    if rows is None:
        return values.filter(pa.array(clean))
    held = np.zeros(len(values), bool)
    held[rows[clean]] = True
    return values.filter(pa.array(held))


class _Seen:
    """Key hashes of the rows already streamed, to number repeated (user, item, time, event) rows.

    A 16 MB Bloom filter (two bits per key: one from the high hash bits, one from the low) says which rows cannot have
    been seen (about 98% of them at 10M rows; one bit alone let ~7% through); only the rest are counted exactly
    against the sorted hashes of earlier batches, which are kept in few sorted runs (every RUNS_MERGED runs of about
    the same size are merged), so the searches per batch grow with log(rows), not with the batch count. A 64-bit hash
    collision between two different keys only bumps `seq` for one of them: keys stay unique.
    """

    SLOT_BITS = 27
    SLOTS = 1 << SLOT_BITS  # bits
    RUNS_MERGED = 4
    MERGE_CAP = 1 << 24  # hashes in one sorted run (128 MB): bounds the merge's transient copy

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.filter = np.zeros(self.SLOTS // 8, np.uint8)

    def _high(self, h: np.ndarray) -> np.ndarray:
        return (h >> np.uint64(64 - self.SLOT_BITS)).astype(np.int64)  # sorted when h is

    def _low(self, h: np.ndarray) -> np.ndarray:
        return (h & np.uint64(self.SLOTS - 1)).astype(np.int64)

    def _test(self, slots: np.ndarray) -> np.ndarray:
        return (self.filter[slots >> 3] & np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8))) != 0

    def _set(self, sorted_slots: np.ndarray) -> None:
        """One OR per distinct byte, the bits of its slots combined first: ufunc.at is ~2x slower."""
        byte, bit = sorted_slots >> 3, np.left_shift(np.uint8(1), (sorted_slots & 7).astype(np.uint8))
        first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        self.filter[byte[first]] |= np.bitwise_or.reduceat(bit, first)

    def seq(self, h: np.ndarray) -> np.ndarray:
        """Occurrences of each row's key before it: in earlier batches, then earlier in this one."""
        prior = np.zeros(len(h), np.int64)
        maybe = np.flatnonzero(self._test(self._high(h)))
        maybe = maybe[self._test(self._low(h[maybe]))]
        if len(maybe):
            o = np.argsort(h[maybe])
            queries = h[maybe][o]
            counts = np.zeros(len(maybe), np.int64)
            for chunk in self.chunks:  # one binary search per query; a second only for the queries found
                left = np.searchsorted(chunk, queries, "left")
                found = np.flatnonzero(chunk[np.minimum(left, len(chunk) - 1)] == queries)
                if len(found):
                    counts[found] += np.searchsorted(chunk, queries[found], "right") - left[found]
            prior[maybe[o]] = counts
        # A plain sort is ~3x cheaper than argsort; the order is needed only when a key repeats in the batch.
        sorted_h = np.sort(h)
        starts = np.r_[True, sorted_h[1:] != sorted_h[:-1]]
        repeated = np.flatnonzero(~starts)
        if len(repeated):
            order = np.argsort(h)
            # rows of a repeated key: order them by position (quicksort is not stable)
            in_run = np.unique(np.concatenate([repeated, repeated - 1]))
            fix = np.lexsort((order[in_run], sorted_h[in_run]))
            order[in_run] = order[in_run][fix]
            run_start = np.maximum.accumulate(np.where(starts, np.arange(len(h)), 0))
            seq = np.empty(len(h), np.int32)
            seq[order] = prior[order] + np.arange(len(h)) - run_start
        else:  # no key twice in this batch: a row's number is its count in earlier batches
            seq = prior.astype(np.int32)
        self._set(self._high(sorted_h))
        self._set(np.sort(self._low(h)))
        self.chunks.append(sorted_h)
        runs, k = self.chunks, self.RUNS_MERGED
        # timsort merges the k sorted runs in linear time per pass
        while (
            len(runs) >= k
            and len(runs[-k]) < 2 * len(runs[-1])
            and sum(map(len, runs[-k:])) <= self.MERGE_CAP
        ):
            merged = np.concatenate(runs[-k:])
            merged.sort(kind="stable")
            del runs[-k:]
            runs.append(merged)
        return seq


def _uint64(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy().astype(np.uint64, copy=False)


class _KnownIds:
    """The ids a batch's item (or user) ids must be among, hashed once for the whole stream.

    `pc.is_in` rebuilds a hash set of every known id on each call (two-thirds of its cost per batch at 100k items);
    here the ids' DuckDB hashes are sorted once and bucketed by their high bits, a batch's ids are found by the
    hashes its key query already computes, and every hash hit is confirmed by comparing the strings. A row whose
    hash matches a different id (a 64-bit collision, or the second of two known ids sharing a hash) is decided by
    `pc.is_in` on those rows alone, so the answer is exactly `is_in`'s.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, ids: pa.Array) -> None:
        self.ids = ids.drop_null().cast(pa.string())
        con.register("known_ids", pa.table({"id": self.ids}))
        hashes = _uint64(con.sql("SELECT hash(id) AS h FROM known_ids").to_arrow_table()["h"])
        con.unregister("known_ids")
        order = np.argsort(hashes)
        self.hashes, self.sorted_ids = hashes[order], self.ids.take(pa.array(order))
        bits = int(len(hashes)).bit_length() + 3  # ~1/8 of the buckets taken: a lookup walks ~1 entry
        self.shift = np.uint64(64 - bits)
        self.starts = np.searchsorted(self.hashes >> self.shift, np.arange((1 << bits) + 1, dtype=np.uint64))

    def has(self, ids: pa.Array, hashes: np.ndarray) -> np.ndarray:
        """Whether each id is known (null ids are not); `hashes` are DuckDB's `hash` of `ids`."""
        if not len(self.hashes):
            return np.zeros(len(ids), bool)
        bucket = (hashes >> self.shift).astype(np.int64)
        last = len(self.hashes) - 1
        pos = np.minimum(self.starts[bucket], last)
        hit = self.hashes[pos] == hashes  # an equal hash is in the row's own bucket
        miss = np.flatnonzero(~hit)
        if len(
            miss
        ):  # not its bucket's first entry: walk the bucket (~1 entry) to the first not below the hash
            at, end, wanted = self.starts[bucket[miss]], self.starts[bucket[miss] + 1], hashes[miss]
            while True:
                behind = (at < end) & (self.hashes[np.minimum(at, last)] < wanted)
                if not behind.any():
                    break
                at[behind] += 1
            pos[miss] = np.minimum(at, last)
            hit[miss] = (at < end) & (self.hashes[pos[miss]] == wanted)
        same = pc.fill_null(pc.equal(self.sorted_ids.take(pa.array(pos)), ids), False)
        known = hit & np.asarray(same)
        collided = np.flatnonzero(hit & ~known & np.asarray(ids.is_valid()))
        if len(collided):
            found = pc.is_in(ids.take(pa.array(collided)), value_set=self.ids)
            known[collided] = np.asarray(pc.fill_null(found, False))
        return known


def _known(
    con: duckdb.DuckDBPyConnection, ws: Workspace, name: str, column: str, extra: pa.Array | list[str] | None
) -> _KnownIds:
    ids = ws.read(name, columns=[column])[column].combine_chunks()
    if extra is not None and len(extra):
        ids = pa.concat_arrays([ids, pa.array(extra, pa.string()).cast(ids.type)])
    return _KnownIds(con, ids)


def ingest_interactions(
    ws: Workspace,
    src,
    q,
    denied: DenyList,
    new_items: pa.Array | list[str] | None = None,
    new_users: pa.Array | list[str] | None = None,
) -> tuple[UpsertResult, pa.Array, pa.Array]:
    """Stream `src.interactions` into the interactions table in one commit; returns the upsert result and the
    distinct clean item and user ids (empty unless the source derives them). `new_items`/`new_users` are ids of this source not yet written, known alongside the workspace's."""
    table = ws.ensure(INTERACTIONS)
    result = UpsertResult("interactions")
    existing = _existing_hashes(table) if table.count_rows() else None
    con = duckdb.connect(config={"threads": 2})
    known_items = None if src.derive_items else _known(con, ws, "items", "item_id", new_items)
    known_users = None if src.derive_users else _known(con, ws, "users", "user_id", new_users)
    seen = _Seen()
    items, users = _Distinct(), _Distinct()
    updates: list[pa.Table] = []
    file = src.interactions.file if isinstance(src.interactions, Stream) else None

    failure: list[SourceError] = []

    def read_batches() -> Iterator[pa.Table]:
        """The source's batches; a read error mid-file becomes a `SourceError` (raised before the one commit)."""
        try:
            yield from iter_batches(src.interactions)
        except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            fix = (
                "re-encode the file as UTF-8 (a row with the wrong number of fields also holds non-UTF-8 bytes)"
                if "parse error" in text.lower()
                else "check the file's format and compression"
            )
            failure.append(SourceError(f"cannot read {file or 'interactions'}: {text[:200]}; {fix}"))
            raise failure[-1] from None

    malformed = 0

    def quarantine_malformed(name: str) -> None:
        nonlocal malformed
        for text in src.interactions.drain_malformed():
            malformed += 1
            q.tally(name).read += 1
            q.add(name, f"malformed-{malformed}", None, "malformed_row", DETAILS["malformed_row"], text[:300])

    def clean_batches() -> Iterator[pa.RecordBatch]:
        for raw in read_batches():
            name = file or raw["__file"][0].as_py()
            if isinstance(src.interactions, Stream):
                quarantine_malformed(name)
            selected = raw.select([c for c in raw.column_names if c in FIELDS or c == "__line"])
            raw, bad_utf8 = _utf8(selected)
            tally = q.tally(name)
            tally.read += raw.num_rows + len(bad_utf8)
            for pos in bad_utf8:
                row = selected.slice(pos, 1).to_pylist()[0]
                line = row.pop("__line")
                excerpt = json.dumps(
                    {
                        k: v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v
                        for k, v in row.items()
                    }
                )[:300]
                q.add(name, line, None, "non_utf8", DETAILS["non_utf8"], excerpt)
            for col in ("user_id", "item_id", "timestamp"):
                if col not in raw.column_names:
                    raise SourceError(f"{name} has no {col} column; map one with --map COLUMN={col}")
            out, batch_users, batch_items = _classify(
                con, raw, src.default_event, denied, known_items, known_users
            )
            reason = out["reason"]
            clean = reason.null_count == len(reason)  # no bad row: no filter copies of the batch
            bad = out.slice(0, 0) if clean else out.filter(pc.is_valid(reason))
            for row in bad.select(["__line", "u", "i", "ts", "e", "v", "reason"]).to_pylist():
                r = row["reason"]
                if r == "forgotten":
                    q.add(name, row["__line"], None, r, DETAILS[r], None)
                else:
                    excerpt = json.dumps(
                        {
                            "user_id": row["u"],
                            "item_id": row["i"],
                            "timestamp": row["ts"],
                            "event": row["e"],
                            "value": row["v"],
                        }
                    )[:300]
                    q.add(
                        name,
                        row["__line"],
                        f"{row['u'] or ''}|{row['i'] or ''}",
                        r,
                        f"{DETAILS[r]}: {excerpt}",
                        excerpt,
                    )
            good = out if clean else out.filter(pc.is_null(reason))
            tally.stored += good.num_rows
            if not good.num_rows:
                continue
            seq = seen.seq(good["h1"].to_numpy())
            if src.derive_items:
                items.add(_clean_ids(batch_items, reason))
            if src.derive_users:
                users.add(_clean_ids(batch_users, reason))
            rows = pa.table(
                {
                    "user_id": good["u"],
                    "item_id": good["i"],
                    "timestamp": good["t"].cast(pa.int64()).cast(pa.timestamp("s", tz="UTC")),
                    "event": good["e"],
                    "seq": pa.array(seq, pa.int32()),
                    "value": good["val"],
                    "source": pa.repeat(pa.scalar(src.name, pa.string()), good.num_rows),
                },
                schema=INTERACTIONS.schema,
            )
            if existing is not None:
                rows = _split_existing(rows, existing, result, updates)
            result.inserted += rows.num_rows
            yield from rows.to_batches()

    stream = _prefetch(clean_batches())
    try:
        first = next(stream, None)  # nothing to insert: no write, no new version
        if first is not None:
            table.add(
                pa.RecordBatchReader.from_batches(INTERACTIONS.schema, itertools.chain([first], stream))
            )
    except Exception:
        if failure:  # Lance wraps errors raised inside its reader: surface ours, one line
            raise failure[-1] from None
        raise
    if isinstance(src.interactions, Stream):  # ragged rows the last batch left, or a file of only those
        quarantine_malformed(src.interactions.file)
    if updates:
        changed = pa.concat_tables(updates)
        table.merge_insert(
            list(INTERACTIONS.key)
        ).when_matched_update_all().when_not_matched_insert_all().execute(changed)
        result.updated = changed.num_rows
    result.version = table.version
    con.close()
    return result, items.values(), users.values()


class _Distinct:
    """The distinct strings of many batches, kept in Arrow: each batch's distinct values are held until they
    outnumber the distinct values so far, then folded in, so memory stays near the number of distinct ids."""

    def __init__(self) -> None:
        self.done = pa.array([], pa.string())
        self.pending: list[pa.Array] = []
        self.size = 0

    def add(self, values: pa.ChunkedArray | pa.Array) -> None:
        self.pending.append(pc.unique(values))
        self.size += len(self.pending[-1])
        if self.size > max(len(self.done), 1 << 16):
            self.done = self.values()

    def values(self) -> pa.Array:
        if self.pending:
            self.done = pc.unique(pa.chunked_array([self.done, *self.pending], pa.string()))
            self.pending, self.size = [], 0
        return self.done


def _prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Produce batches in a Python thread of our own: parsing and classifying overlap with Lance's encoding,
    and our DuckDB/Arrow work never runs inside Lance's reader callback."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                buffer.put(batch)
        except BaseException as exc:  # re-raised in the consumer
            buffer.put(exc)
        finally:
            buffer.put(done)

    threading.Thread(target=produce, daemon=True, name="ingest-producer").start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _row_hashes(con: duckdb.DuckDBPyConnection, relation: str) -> tuple[np.ndarray, np.ndarray]:
    out = con.sql(
        f"SELECT hash(user_id, item_id, epoch(timestamp)::BIGINT, event, seq) AS k, "
        f"hash(user_id, item_id, epoch(timestamp)::BIGINT, event, seq, value) AS r FROM {relation}"
    ).to_arrow_table()
    return out["k"].to_numpy().astype(np.uint64), out["r"].to_numpy().astype(np.uint64)


def _existing_hashes(table) -> tuple[np.ndarray, np.ndarray]:
    """Sorted key hashes of the stored rows and, aligned, their key+value hashes."""
    con = duckdb.connect()
    con.register("stored", table.to_lance().scanner(columns=list(INTERACTIONS.key) + ["value"]).to_reader())
    keys, rows = _row_hashes(con, "stored")
    con.close()
    order = np.argsort(keys, kind="stable")
    return keys[order], rows[order]


def _split_existing(
    rows: pa.Table, existing: tuple[np.ndarray, np.ndarray], result: UpsertResult, updates: list[pa.Table]
) -> pa.Table:
    """Keep the rows to insert; count unchanged rows; collect rows whose value changed for a merge."""
    con = duckdb.connect()
    con.register("fresh", rows)
    keys, full = _row_hashes(con, "fresh")
    con.close()
    stored_keys, stored_full = existing
    idx = np.searchsorted(stored_keys, keys).clip(0, max(len(stored_keys) - 1, 0))
    known = stored_keys[idx] == keys
    same = known & (stored_full[idx] == full)
    changed = known & ~same
    result.unchanged += int(same.sum())
    if changed.any():
        updates.append(rows.filter(pa.array(changed)))
    return rows.filter(pa.array(~known))
