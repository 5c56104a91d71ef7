"""Source adapters: read a dataset's files into a `RawSource` for `recipes.ingest.ingest`.

Supported layouts: MovieLens-100K (+ a TMDB-style items CSV and a posters folder), MMRec (`<name>.inter` TSV),
RecBole atomic files (`.inter/.item/.user` with `field:type` headers) and generic tables (CSV, Parquet, JSONL).
Ids are read as strings, never inferred as numbers, so leading zeros survive.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from recipes.ingest.interactions import CsvStream
from recipes.ingest.load import FileTally, RawSource, _content_hash

ITEM_FIELDS = ("item_id", "title", "text", "image", "rights")
USER_FIELDS = ("user_id",)
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp", "event", "value")
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "FilmNoir", "Horror", "Musical", "Mystery", "Romance", "SciFi", "Thriller", "War", "Western"]


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, unreadable format): names the file and the fix."""


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}. {fix}")
    return path


def _with_lineage(table: pa.Table, file: str) -> pa.Table:
    n = table.num_rows
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([file]))
    table = table.append_column("__file", files)
    return table.append_column("__line", pa.array(np.arange(1, n + 1, dtype=np.int64)))


def read_table_file(path: Path, as_binary: bool = False, delimiter: str | None = None) -> pa.Table:
    """CSV/TSV/Parquet/JSONL → Arrow with every column as string (or binary, to check the encoding per row)."""
    path = _require(Path(path), "source file", "check the path")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            table = pajson.read_json(path)
        else:
            sep = delimiter or ("\t" if suffix in (".tsv", ".inter", ".item", ".user") else ",")
            with open(path, encoding="utf-8", errors="replace", newline="") as fh:
                header = next(csv.reader(fh, delimiter=sep), None)
            if not header:
                raise SourceError(f"{path} is empty or has no header row; add a header naming the columns")
            kind = pa.binary() if as_binary else pa.string()
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: kind for name in header}, strings_can_be_null=False, quoted_strings_can_be_null=False
                ),
            )
            return table
    except SourceError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        if not as_binary and "UTF8" in str(exc).upper():
            raise UnicodeError(str(exc)) from None
        raise SourceError(f"cannot read {path}: {exc}. Check the file's format (CSV with a header, Parquet, JSONL).") from None
    return table.cast(pa.schema([pa.field(f.name, pa.string()) for f in table.schema]), safe=False) if not as_binary else table


def _rename(table: pa.Table, mapping: dict[str, str]) -> pa.Table:
    return table.rename_columns([mapping.get(name, name) for name in table.column_names])


def _pack_attributes(table: pa.Table, keep: tuple[str, ...]) -> pa.Table:
    """Move every column not in `keep` into one JSON `attributes` column."""
    extra = [c for c in table.column_names if c not in keep and not c.startswith("__")]
    if not extra:
        return table
    values = table.select(extra).to_pylist()
    attrs = [
        json.dumps({k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v) for k, v in row.items()},
                   ensure_ascii=False, default=str)
        for row in values
    ]
    table = table.drop_columns(extra)
    return table.append_column("attributes", pa.array(attrs, pa.string()))


def _interactions(path: Path, mapping: dict[str, str]) -> pa.Table | CsvStream:
    """Interactions, lazily: delimited files stream in batches (UTF-8 checked per row at ingest); Parquet and
    JSONL are read whole."""
    path = _require(Path(path), "interactions file", "check the path")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq", ".jsonl", ".ndjson", ".json"):
        return _with_lineage(_rename(read_table_file(path), mapping), path.name)
    sep = "\t" if suffix in (".tsv", ".inter") else ","
    stream = CsvStream(path, sep, mapping)
    if not stream.header:
        raise SourceError(f"{path} is empty or has no header row; add a header naming the columns")
    return stream


def _fields(interactions: pa.Table | CsvStream) -> list[str]:
    return interactions.fields if isinstance(interactions, CsvStream) else interactions.column_names


# ---- MovieLens ---------------------------------------------------------------------------------------------


def movielens(directory: str | Path, items_csv: str | Path | None = None, posters: str | Path | None = None) -> RawSource:
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
        attrs = {"genres": r["genres"], "release_date": r["release_date"], "imdb_url": r["imdb_url"]} | extra.get("attrs", {})
        image = f"{r['item_id']}.jpg" if poster_dir is not None and (poster_dir / f"{r['item_id']}.jpg").exists() else None
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
            users.append({"user_id": parts[0], "attributes": json.dumps(attrs), "__file": "u.user", "__line": line_no})
        src.users = pa.Table.from_pylist(users)
    else:
        src.derive_users = True
    data_path = _require(root / "u.data", "u.data", "the ML-100K folder must hold u.data")
    src.interactions = CsvStream(data_path, "\t", column_names=["user_id", "item_id", "value", "timestamp"])
    src.default_event = "rating"
    return src


def _tmdb(path: Path, src: RawSource, known: set[str]) -> dict[str, dict]:
    """The TMDB items CSV, de-duplicated on `movie_id` (identical rows merged, conflicting ones quarantined)."""
    from recipes.ingest.load import _Quarantine

    table = read_table_file(path)
    tally = src.tallies.setdefault(path.name, FileTally())
    q = _Quarantine(src)
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
            q.add(path.name, line_no, movie_id, "unknown_item", "movie_id is not in u.item", json.dumps(row)[:300])
        elif movie_id in out:
            if _content_hash(json.dumps(out[movie_id], sort_keys=True)) == _content_hash(json.dumps(entry, sort_keys=True)):
                tally.merged += 1
            else:
                q.add(path.name, line_no, movie_id, "duplicate_conflict",
                      f"movie_id {movie_id!r} appears again with different content; the first row was kept",
                      json.dumps(row)[:300])
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
        raise SourceError(f"no <name>.inter file in {root}; MMRec datasets keep their interactions in <name>.inter")
    mapping = {"userID": "user_id", "itemID": "item_id", "rating": "value"}
    src = RawSource(name=f"mmrec:{inter[0].stem}", derive_items=True, derive_users=True, default_event="rating")
    src.interactions = _interactions(inter[0], mapping)
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
    stream.mapping = {h: ("value" if h.split(":", 1)[0] == "rating" else h.split(":", 1)[0]) for h in stream.header}
    if "timestamp" not in stream.fields:
        raise SourceError(f"{inter[0]} has no timestamp:float column; add one (unix seconds)")
    src.interactions = stream
    item_path, user_path = root / f"{name}.item", root / f"{name}.user"
    if item_path.exists():
        items = _strip_types(read_table_file(item_path, as_binary=True))
        items = _rename(items, {"movie_title": "title", "title": "title", "description": "text"})
        src.items = _with_lineage(_pack_attributes(items, ITEM_FIELDS), item_path.name)
    else:
        src.derive_items = True
    if user_path.exists():
        users = _strip_types(read_table_file(user_path, as_binary=True))
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
            raise SourceError(f"--map {pair!r} is malformed; write SOURCE_COLUMN=FIELD, e.g. article_id=item_id")
        out[column] = target
    return out


def table(
    items: str | Path,
    interactions: str | Path | None = None,
    users: str | Path | None = None,
    images: str | Path | None = None,
    mapping: dict[str, str] | None = None,
    name: str | None = None,
) -> RawSource:
    """CSV / Parquet / JSONL tables. Items: `item_id, title, text, image` (+ `rights`; other columns become
    attributes; `image` is a path under `images`). Interactions: `user_id, item_id, timestamp` (+ `event, value`)."""
    mapping = mapping or {}
    items_path = Path(items)
    src = RawSource(name=name or f"table:{items_path.stem}", image_root=Path(images) if images else None)
    item_table = _rename(read_table_file(items_path, as_binary=True), mapping)
    if "item_id" not in item_table.column_names:
        raise SourceError(
            f"{items_path} has no item_id column (columns: {item_table.column_names}); pass --map COLUMN=item_id"
        )
    src.items = _with_lineage(_pack_attributes(item_table, ITEM_FIELDS), items_path.name)
    if users:
        users_path = Path(users)
        user_table = _rename(read_table_file(users_path, as_binary=True), mapping)
        if "user_id" not in user_table.column_names:
            raise SourceError(f"{users_path} has no user_id column; pass --map COLUMN=user_id")
        src.users = _with_lineage(_pack_attributes(user_table, USER_FIELDS), users_path.name)
    else:
        src.derive_users = True
    if interactions:
        inter_path = Path(interactions)
        inter = _interactions(inter_path, mapping)
        missing = {"user_id", "item_id", "timestamp"} - set(_fields(inter))
        if missing:
            raise SourceError(f"{inter_path} lacks columns {sorted(missing)}; pass --map COLUMN=FIELD for each")
        src.interactions = inter
    return src
