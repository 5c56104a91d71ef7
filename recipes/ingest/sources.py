"""Source adapters: read a dataset's files into a `RawSource` for `recipes.ingest.ingest`.

Supported layouts: MovieLens-100K (+ a TMDB-style items CSV and a posters folder), MMRec (`<name>.inter` TSV),
RecBole atomic files (`.inter/.item/.user` with `field:type` headers) and generic tables (CSV, Parquet, JSONL).
Ids are read as strings, never inferred as numbers, so leading zeros survive (a UTF-8 BOM is stripped, never
allowed to hide the id column's name). Files may be gzipped (detected by magic bytes). A row that cannot be parsed
is quarantined (`malformed_row`; `bad_value` for a JSON object or array where a scalar field belongs); a file that
cannot be read at all is a `SourceError`: an empty file (0 bytes, or no header) is an error, a header-only file is
zero rows, and a duplicate or non-UTF-8 header is an error naming the column and the file.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recipes.ingest.interactions import (
    CsvStream,
    ParquetStream,
    Stream,
    check_unique,
    first_line,
    is_gzip,
    open_input,
    parse_header,
    quiet_invalid_row_decoding,
)
from recipes.ingest.records import FileTally, RawSource, SourceError, content_hash, file_label

ITEM_FIELDS = ("item_id", "title", "text", "image", "image_url", "rights")
USER_FIELDS = ("user_id",)
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp", "event", "value")
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "FilmNoir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "SciFi",
    "Thriller",
    "War",
    "Western",
]


Reject = tuple[int | str, str, str, str]
"""A row an adapter could not parse: (line, reason, detail, raw excerpt)."""


def _require(path: Path, what: str, fix: str) -> Path:
    try:
        found = path.exists()
    except (OSError, ValueError) as exc:  # a NUL byte or an over-long name in the path itself
        raise SourceError(f"{what} path {str(path)[:200]!r} is not usable ({exc}). {fix}") from None
    if not found:
        raise SourceError(f"{what} not found: {path}. {fix}")
    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(
            f"{path} is empty (0 bytes); give a file with a header row, or leave the option out"
        )
    return path


def _with_lineage(table: pa.Table, file: str) -> pa.Table:
    """Add `__file` and, unless the reader set true line numbers, `__line` (the row's 1-based position)."""
    n = table.num_rows
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([file_label(file)]))
    if "__line" in table.column_names:
        lines = table["__line"]
        table = table.drop_columns(["__line"])
    else:
        lines = pa.array(np.arange(1, n + 1, dtype=np.int64))
    table = table.append_column("__file", files)
    return table.append_column("__line", lines)


def _format(path: Path) -> str:
    """`parquet`, `json` or `csv` from the name, ignoring a trailing `.gz`."""
    suffixes = [x.lower() for x in path.suffixes if x.lower() != ".gz"] or [""]
    if suffixes[-1] in (".parquet", ".pq"):
        return "parquet"
    return "json" if suffixes[-1] in (".jsonl", ".ndjson", ".json") else "csv"


def _delimiter(path: Path) -> str:
    suffixes = [x.lower() for x in path.suffixes if x.lower() != ".gz"] or [""]
    return "\t" if suffixes[-1] in (".tsv", ".inter", ".item", ".user") else ","


def _cell(value: object) -> str | None:
    """A JSON value as the string the platform stores (objects and arrays as JSON text)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _read_jsonl(path: Path, scalar: set[str], rejects: list[Reject]) -> pa.Table:
    """JSON lines (or one JSON array of objects) → string columns with true `__line`s. A line that is not a JSON
    object is `malformed_row`; an object or array where a scalar field belongs is `bad_value`."""
    with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if data.lstrip()[:1] == b"[":  # a .json file holding one array of objects; otherwise read line by line
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            lines = [json.dumps(x, ensure_ascii=False).encode() for x in parsed]
    rows: list[dict] = []
    names: dict[
        str, None
    ] = {}  # every key seen, rejected lines included: a file of only bad rows keeps its columns
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        excerpt = line[:300].decode("utf-8", "backslashreplace")
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rejects.append(
                (
                    number,
                    "non_utf8",
                    f"{exc.reason} at byte {exc.start}; re-encode the file as UTF-8",
                    excerpt,
                )
            )
            continue
        except (ValueError, RecursionError) as exc:
            rejects.append((number, "malformed_row", f"not a JSON object ({exc}); fix the line", excerpt))
            continue
        if not isinstance(obj, dict):
            rejects.append(
                (
                    number,
                    "malformed_row",
                    "line is JSON but not an object; write one object per line",
                    excerpt,
                )
            )
            continue
        names.update(dict.fromkeys(obj))
        nested = sorted(k for k, v in obj.items() if k in scalar and isinstance(v, dict | list))
        if nested:
            rejects.append(
                (
                    number,
                    "bad_value",
                    f"{nested[0]} holds a JSON object or array; it must be a single value",
                    excerpt,
                )
            )
            continue
        rows.append({k: _cell(v) for k, v in obj.items()} | {"__line": number})
    columns = {n: pa.array([row.get(n) for row in rows], pa.string()) for n in names if n != "__line"}
    return pa.table(columns | {"__line": pa.array([row["__line"] for row in rows], pa.int64())})


def _read_parquet(path: Path, scalar: set[str], rejects: list[Reject]) -> pa.Table:
    """Parquet → string columns; a nested value where a scalar field belongs is `bad_value`."""
    table = pq.read_table(path)
    check_unique(table.column_names, path)
    n = table.num_rows
    bad = np.zeros(n, bool)
    columns = {}
    for f in table.schema:
        col = table[f.name]
        if pa.types.is_nested(f.type):
            if f.name in scalar:
                bad |= np.asarray(col.is_valid())
            col = pa.array([_cell(v) for v in col.to_pylist()], pa.string())
        elif not pa.types.is_string(f.type):
            col = col.cast(pa.string(), safe=False)
        columns[f.name] = col
    columns["__line"] = pa.array(np.arange(1, n + 1, dtype=np.int64))
    out = pa.table(columns)
    for number in np.flatnonzero(bad):
        rejects.append(
            (int(number) + 1, "bad_value", "a JSON-like object or list where a single value belongs", None)
        )
    return out.filter(pa.array(~bad)) if bad.any() else out


def read_table_file(
    path: Path,
    as_binary: bool = False,
    delimiter: str | None = None,
    rejects: list[Reject] | None = None,
    scalar: set[str] | None = None,
) -> pa.Table:
    """CSV/TSV/Parquet/JSONL (optionally gzipped) → Arrow with every column as string (or binary for CSV, to check
    the encoding per row). Unparseable rows go to `rejects`; without a list, the first one is a `SourceError`."""
    path = _require(Path(path), "source file", "check the path")
    found: list[Reject] = []
    scalar = scalar or set()
    try:
        if _format(path) == "parquet":
            table = _read_parquet(path, scalar, found)
        elif _format(path) == "json":
            table = _read_jsonl(path, scalar, found)
        else:
            sep = delimiter or _delimiter(path)
            header = parse_header(first_line(path), path, sep)
            kind = pa.binary() if as_binary else pa.string()

            def skip(row: pacsv.InvalidRow) -> str:
                found.append(
                    (
                        f"malformed-{len(found) + 1}",
                        "malformed_row",
                        f"expected {row.expected_columns} fields, got {row.actual_columns}; fix the quoting "
                        "or the delimiter",
                        row.text[:300],
                    )
                )
                return "skip"

            with quiet_invalid_row_decoding():
                table = pacsv.read_csv(
                    open_input(path),
                    parse_options=pacsv.ParseOptions(
                        delimiter=sep, newlines_in_values=True, invalid_row_handler=skip
                    ),
                    convert_options=pacsv.ConvertOptions(
                        column_types={name: kind for name in header},
                        strings_can_be_null=False,
                        quoted_strings_can_be_null=False,
                    ),
                )
    except SourceError:
        raise
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        text = str(exc).splitlines()[0][:200]
        if "parse error" in text.lower():
            raise SourceError(
                f"cannot read {path}: {text}; a row with the wrong number of fields also holds "
                "non-UTF-8 bytes: re-encode the file as UTF-8"
            ) from None
        if "UTF8" in text.upper():
            raise SourceError(f"{path} is not UTF-8 ({text}); re-encode the file as UTF-8") from None
        raise SourceError(
            f"cannot read {path}: {text}. Check the file's format (CSV with a header, Parquet, JSONL)."
        ) from None
    if found:
        if rejects is None:
            line, _, detail, _ = found[0]
            raise SourceError(f"{path} line {line}: {detail}")
        rejects.extend(found)
    if _format(path) == "csv" or as_binary:
        return table
    return table.cast(
        pa.schema(
            [pa.field(f.name, pa.int64() if f.name == "__line" else pa.string()) for f in table.schema]
        ),
        safe=False,
    )


def _record(src: RawSource, file: str, rejects: list[Reject]) -> None:
    for line, reason, detail, raw in rejects:
        src.reject(file_label(file), line, reason, detail, raw)


def _scalar_columns(fields: tuple[str, ...], mapping: dict[str, str]) -> set[str]:
    """Source column names that must hold a single value: the platform's fields, under their mapped names."""
    return set(fields) | {column for column, target in mapping.items() if target in fields}


def _rename(table: pa.Table, mapping: dict[str, str], path: Path | str = "the source") -> pa.Table:
    names = [mapping.get(name, name) for name in table.column_names]
    check_unique(names, path)
    return table.rename_columns(names)


def _pack_attributes(table: pa.Table, keep: tuple[str, ...]) -> pa.Table:
    """Move every column not in `keep` into one JSON `attributes` column."""
    extra = [c for c in table.column_names if c not in keep and not c.startswith("__")]
    if not extra:
        return table
    values = table.select(extra).to_pylist()
    attrs = [
        json.dumps(
            {
                k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v)
                for k, v in row.items()
            },
            ensure_ascii=False,
            default=str,
        )
        for row in values
    ]
    table = table.drop_columns(extra)
    return table.append_column("attributes", pa.array(attrs, pa.string()))


def _interactions(path: Path, mapping: dict[str, str], src: RawSource) -> pa.Table | Stream:
    """Interactions, lazily: delimited files stream in batches (UTF-8 checked per row at ingest); Parquet and
    JSONL are read whole (their unparseable rows quarantined into `src`)."""
    path = _require(Path(path), "interactions file", "check the path")
    if _format(path) == "parquet" and _streamable_parquet(path):
        stream = ParquetStream(path, mapping)
        check_unique(stream.header, path)
        check_unique(stream.fields, path)
        return stream
    if _format(path) != "csv":
        rejects: list[Reject] = []
        table = read_table_file(path, rejects=rejects, scalar=_scalar_columns(INTERACTION_FIELDS, mapping))
        _record(src, path.name, rejects)
        return _with_lineage(_rename(table, mapping, path), path.name)
    stream = CsvStream(path, _delimiter(path), mapping)
    check_unique(stream.fields, path)  # reads the header: empty, non-UTF-8 or duplicate is a SourceError here
    return stream


def _fields(interactions: pa.Table | Stream) -> list[str]:
    return interactions.fields if isinstance(interactions, Stream) else interactions.column_names


def _streamable_parquet(path: Path) -> bool:
    """An uncompressed-on-disk Parquet file with only scalar columns streams by batch; otherwise it is read whole
    (a nested value is quarantined row by row there)."""
    if is_gzip(path):
        return False
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowInvalid, OSError):
        return False  # the whole-file read reports the error
    return not any(pa.types.is_nested(f.type) for f in schema)


# ---- MovieLens ---------------------------------------------------------------------------------------------


def movielens(
    directory: str | Path, items_csv: str | Path | None = None, posters: str | Path | None = None
) -> RawSource:
    """ML-100K layout: latin-1 `u.item`, `u.user`, tab-separated `u.data`; optional TMDB items CSV (`movie_id`,
    `overview`, ...) merged on the movie id, and a posters folder of `<item_id>.jpg`."""
    root = _require(Path(directory), "MovieLens folder", "pass the folder holding u.data, u.item and u.user")
    if (root / "ml-100k").is_dir() and not (root / "u.data").exists():
        root = root / "ml-100k"
    src = RawSource(name=f"movielens:{root.name}", image_root=Path(posters) if posters else None)
    item_path = _require(root / "u.item", "u.item", "the ML-100K folder must hold u.item")
    rows = []
    for line_no, line in enumerate(item_path.read_bytes().decode("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        flags = parts[5:24]
        genres = [g for g, f in zip(GENRES, flags, strict=False) if f == "1"]
        rows.append(
            {
                "item_id": parts[0],
                "title": parts[1] if len(parts) > 1 else None,
                "release_date": parts[2] if len(parts) > 2 else None,
                "imdb_url": parts[4] if len(parts) > 4 else None,
                "genres": genres,
                "__line": line_no,
            }
        )
    overviews = _tmdb(Path(items_csv), src, {r["item_id"] for r in rows}) if items_csv else {}
    poster_dir = Path(posters) if posters else None
    if poster_dir is not None:
        _require(poster_dir, "posters folder", "pass the folder of <item_id>.jpg files")
    items = []
    for r in rows:
        extra = overviews.get(r["item_id"], {})
        attrs = {
            "genres": r["genres"],
            "release_date": r["release_date"],
            "imdb_url": r["imdb_url"],
        } | extra.get("attrs", {})
        image = (
            f"{r['item_id']}.jpg"
            if poster_dir is not None and (poster_dir / f"{r['item_id']}.jpg").exists()
            else None
        )
        items.append(
            {
                "item_id": r["item_id"],
                "title": r["title"],
                "text": extra.get("overview"),
                "attributes": json.dumps(attrs, ensure_ascii=False),
                "image": image,
                "rights": "grouplens-research;tmdb",
                "__file": "u.item",
                "__line": r["__line"],
            }
        )
    src.items = pa.Table.from_pylist(items)
    user_path = root / "u.user"
    if user_path.exists():
        users = []
        for line_no, line in enumerate(user_path.read_bytes().decode("latin-1").splitlines(), start=1):
            parts = line.split("|")
            if len(parts) < 5:
                parts += [""] * (5 - len(parts))
            attrs = {"age": parts[1], "gender": parts[2], "occupation": parts[3], "zip": parts[4]}
            users.append(
                {"user_id": parts[0], "attributes": json.dumps(attrs), "__file": "u.user", "__line": line_no}
            )
        src.users = pa.Table.from_pylist(users)
    else:
        src.derive_users = True
    data_path = _require(root / "u.data", "u.data", "the ML-100K folder must hold u.data")
    src.interactions = CsvStream(data_path, "\t", column_names=["user_id", "item_id", "value", "timestamp"])
    src.default_event = "rating"
    return src


def _tmdb(path: Path, src: RawSource, known: set[str]) -> dict[str, dict]:
    """The TMDB items CSV, de-duplicated on `movie_id` (identical rows merged, conflicting ones quarantined)."""
    from recipes.ingest.records import Quarantine

    rejects: list[Reject] = []
    table = read_table_file(path, rejects=rejects)
    _record(src, path.name, rejects)
    tally = src.tallies.setdefault(path.name, FileTally())
    q = Quarantine(src)
    out: dict[str, dict] = {}
    for line_no, row in enumerate(table.to_pylist(), start=1):
        tally.read += 1
        movie_id = (row.get("movie_id") or "").strip()
        attrs = {
            k: row.get(k)
            for k in ("year", "original_language", "runtime", "vote_average", "vote_count", "cleaned_title")
            if row.get(k) not in (None, "")
        }
        entry = {"overview": row.get("overview") or None, "attrs": {f"tmdb_{k}": v for k, v in attrs.items()}}
        if not movie_id:
            q.add(path.name, line_no, None, "empty_id", "movie_id is empty", json.dumps(row)[:300])
        elif movie_id not in known:
            q.add(
                path.name,
                line_no,
                movie_id,
                "unknown_item",
                "movie_id is not in u.item",
                json.dumps(row)[:300],
            )
        elif movie_id in out:
            if content_hash(json.dumps(out[movie_id], sort_keys=True)) == content_hash(
                json.dumps(entry, sort_keys=True)
            ):
                tally.merged += 1
            else:
                q.add(
                    path.name,
                    line_no,
                    movie_id,
                    "duplicate_conflict",
                    f"movie_id {movie_id!r} appears again with different content; the first row was kept",
                    json.dumps(row)[:300],
                )
        else:
            out[movie_id] = entry
            tally.stored += 1
    src.quarantine = q.rows
    return out


# ---- MMRec and RecBole -------------------------------------------------------------------------------------


def mmrec(directory: str | Path) -> RawSource:
    """MMRec's `<name>.inter` TSV (`userID itemID rating timestamp x_label`); items and users are derived."""
    root = _require(Path(directory), "MMRec folder", "pass the folder holding <name>.inter")
    inter = sorted(root.glob("*.inter"))
    if not inter:
        raise SourceError(
            f"no <name>.inter file in {root}; MMRec datasets keep their interactions in <name>.inter"
        )
    mapping = {"userID": "user_id", "itemID": "item_id", "rating": "value"}
    src = RawSource(
        name=f"mmrec:{inter[0].stem}", derive_items=True, derive_users=True, default_event="rating"
    )
    src.interactions = _interactions(inter[0], mapping, src)
    return src


def _strip_types(table: pa.Table) -> pa.Table:
    """RecBole headers are `name:type`; keep the name."""
    return table.rename_columns([c.split(":", 1)[0] for c in table.column_names])


def recbole(directory: str | Path) -> RawSource:
    """RecBole atomic files: `<name>.inter` (+ optional `.item`, `.user`) with typed `field:type` headers."""
    root = _require(Path(directory), "RecBole folder", "pass the folder holding <name>.inter")
    inter = sorted(p for p in root.glob("*.inter") if p.stem.count(".") == 0)
    if not inter:
        raise SourceError(f"no <name>.inter atomic file in {root}")
    name = inter[0].stem
    src = RawSource(name=f"recbole:{name}", default_event="rating")
    stream = CsvStream(inter[0], "\t")
    stream.mapping = {
        h: ("value" if h.split(":", 1)[0] == "rating" else h.split(":", 1)[0]) for h in stream.header
    }
    if "timestamp" not in stream.fields:
        raise SourceError(f"{inter[0]} has no timestamp:float column; add one (unix seconds)")
    src.interactions = stream
    item_path, user_path = root / f"{name}.item", root / f"{name}.user"
    if item_path.exists():
        rejects: list[Reject] = []
        items = _strip_types(read_table_file(item_path, as_binary=True, rejects=rejects))
        _record(src, item_path.name, rejects)
        items = _rename(items, {"movie_title": "title", "title": "title", "description": "text"}, item_path)
        src.items = _with_lineage(_pack_attributes(items, ITEM_FIELDS), item_path.name)
    else:
        src.derive_items = True
    if user_path.exists():
        rejects = []
        users = _strip_types(read_table_file(user_path, as_binary=True, rejects=rejects))
        _record(src, user_path.name, rejects)
        src.users = _with_lineage(_pack_attributes(users, USER_FIELDS), user_path.name)
    else:
        src.derive_users = True
    return src


# ---- generic tables ----------------------------------------------------------------------------------------


def parse_mapping(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["article_id=item_id", ...]` → {"article_id": "item_id"}; clear error on malformed pairs."""
    out = {}
    for pair in pairs:
        column, sep, target = pair.partition("=")
        if not sep or not column or not target:
            raise SourceError(
                f"--map {pair!r} is malformed; write SOURCE_COLUMN=FIELD, e.g. article_id=item_id"
            )
        out[column] = target
    return out


def table(
    items: str | Path,
    interactions: str | Path | None = None,
    users: str | Path | None = None,
    images: str | Path | None = None,
    mapping: dict[str, str] | None = None,
    name: str | None = None,
    image_url_column: str | None = None,
) -> RawSource:
    """CSV / Parquet / JSONL tables. Items: `item_id, title, text, image` (+ `rights`; other columns become
    attributes; `image` is a path under `images`), or `image_url` (an http(s) URL, downloaded at ingest; another
    column named by `image_url_column`). Interactions: `user_id, item_id, timestamp` (+ `event, value`)."""
    mapping = dict(mapping or {})
    if image_url_column:
        mapping[image_url_column] = "image_url"
    items_path = Path(items)
    src = RawSource(
        name=name or f"table:{file_label(items_path.stem)}", image_root=Path(images) if images else None
    )
    rejects: list[Reject] = []
    item_table = read_table_file(
        items_path, as_binary=True, rejects=rejects, scalar=_scalar_columns(ITEM_FIELDS, mapping)
    )
    _record(src, items_path.name, rejects)
    item_table = _rename(item_table, mapping, items_path)
    if "item_id" not in item_table.column_names:
        raise SourceError(
            f"{items_path} has no item_id column (columns: {item_table.column_names}); pass --map COLUMN=item_id"
        )
    if image_url_column and "image_url" not in item_table.column_names:
        raise SourceError(
            f"--image-url-column {image_url_column!r} is not a column of {items_path} "
            f"(columns: {[c for c in item_table.column_names if not c.startswith('__')]})"
        )
    src.items = _with_lineage(_pack_attributes(item_table, ITEM_FIELDS), items_path.name)
    if users:
        users_path = Path(users)
        rejects = []
        user_table = read_table_file(
            users_path, as_binary=True, rejects=rejects, scalar=_scalar_columns(USER_FIELDS, mapping)
        )
        _record(src, users_path.name, rejects)
        user_table = _rename(user_table, mapping, users_path)
        if "user_id" not in user_table.column_names:
            raise SourceError(f"{users_path} has no user_id column; pass --map COLUMN=user_id")
        src.users = _with_lineage(_pack_attributes(user_table, USER_FIELDS), users_path.name)
    else:
        src.derive_users = True
    if interactions:
        inter_path = Path(interactions)
        inter = _interactions(inter_path, mapping, src)
        missing = {"user_id", "item_id", "timestamp"} - set(_fields(inter))
        if missing:
            raise SourceError(
                f"{inter_path} lacks columns {sorted(missing)}; pass --map COLUMN=FIELD for each"
            )
        src.interactions = inter
    return src
