"""Ingest: validation, quarantine reason codes, counts that add up, idempotent keyed upserts."""

from __future__ import annotations

import csv
import io
import json
import random
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from recipes.ingest import load
from recipes.ingest.load import ingest
from recipes.ingest.records import RawSource
from recipes.ingest.sources import SourceError, mmrec, parse_mapping, recbole, table
from stores.sql import run_sql
from stores.workspace import Workspace


def _jpeg(colour=(200, 30, 30), size=(24, 32), exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif)
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def _png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims 1.6 billion pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def bad_source(tmp_path: Path):
    """A small catalogue with one example of every bad-input kind the platform must quarantine."""
    root = tmp_path / "src"
    images = root / "images"
    images.mkdir(parents=True)
    (images / "ok.jpg").write_bytes(_jpeg())
    (images / "rotated.jpg").write_bytes(_jpeg(size=(20, 40), exif_orientation=6))
    good = _jpeg()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "garbage.jpg").write_bytes(b"this is not an image at all")
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    (images / "picture.bmp").write_bytes(bmp.getvalue())
    (images / "bomb.png").write_bytes(_png_bomb())
    (tmp_path / "secret.jpg").write_bytes(_jpeg())
    (images / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    rows = [
        ["0001", "Good item", "fine text", "ok.jpg"],
        ["0002", "Rotated", "exif", "rotated.jpg"],
        ["0003", "Truncated", "x", "truncated.jpg"],
        ["0004", "Garbage", "x", "garbage.jpg"],
        ["0005", "Bitmap", "x", "picture.bmp"],
        ["0006", "Bomb", "x", "bomb.png"],
        ["0007", "Missing", "x", "nowhere.jpg"],
        ["0008", "Dotdot", "x", "../secret.jpg"],
        ["0009", "Symlink", "x", "escape.jpg"],
        ["0010", "No image", "text only", ""],
        ["0001", "Good item", "fine text", "ok.jpg"],  # identical duplicate: merged
        ["0002", "Rotated v2", "conflicting", "rotated.jpg"],  # conflicting duplicate: quarantined
        ["", "No id", "x", ""],  # empty id
    ]
    items = _write_csv(root / "items.csv", ["item_id", "title", "text", "image"], rows)
    with open(items, "ab") as fh:  # a latin-1 row in a UTF-8 file
        fh.write("0011,Caf\xe9,cr\xe8me br\xfbl\xe9e,\n".encode("latin-1"))
    users = _write_csv(root / "users.csv", ["user_id", "age"], [["u1", "30"], ["u2", "41"]])
    inter = _write_csv(
        root / "interactions.csv",
        ["user_id", "item_id", "timestamp", "event", "value"],
        [
            ["u1", "0001", "1700000000", "view", "1"],
            ["u1", "0002", "2023-11-15", "purchase", "2.5"],
            ["u2", "0001", "2023-11-15T10:20:30", "view", ""],
            ["u2", "0010", "1700000000", "purchase", "1"],
            ["u2", "0010", "1700000000", "purchase", "1"],  # a repeat purchase: a distinct row (seq 1)
            ["u1", "9999", "1700000000", "view", "1"],  # unknown item
            ["u3", "0001", "1700000000", "view", "1"],  # unknown user
            ["u1", "0001", "not a date", "view", "1"],  # bad timestamp
            ["", "0001", "1700000000", "view", "1"],  # empty user id
            ["u1", "0001", "1700000001", "view", "abc"],  # bad value
        ],
    )
    with open(inter, "ab") as fh:  # latin-1 bytes in the streaming interactions path
        fh.write("u\xe9,0001,1700000000,view,1\n".encode("latin-1"))
    return table(items, inter, users, images, name="bad")


def test_every_bad_input_kind_is_quarantined_and_counts_add_up(ws, bad_source):
    """Each bad-input kind gets its reason code, the good rows are stored, and read = stored + merged + quarantined."""
    report = ingest(ws, bad_source)
    q = ws.read("quarantine").to_pylist()
    reasons = {(r["record_key"], r["reason"]) for r in q}
    expected = {
        ("0003", "corrupt_image"),
        ("0004", "unsupported_format"),
        ("0005", "unsupported_format"),
        ("0006", "decompression_bomb"),
        ("0007", "missing_image"),
        ("0008", "path_outside_root"),
        ("0009", "path_outside_root"),
        ("0002", "duplicate_conflict"),
        (None, "empty_id"),
        (None, "non_utf8"),
        ("u1|9999", "unknown_item"),
        ("u3|0001", "unknown_user"),
        ("u1|0001", "bad_timestamp"),
        ("|0001", "empty_id"),
        ("u1|0001", "bad_value"),
    }
    assert expected <= reasons, expected - reasons
    assert report.balanced
    files = report.files
    assert files["items.csv"].read == 14
    assert files["items.csv"].merged == 1
    assert files["items.csv"].quarantined == 3  # conflict, empty id, non-UTF-8
    assert files["items.csv"].stored == 10
    assert files["interactions.csv"].read == 11
    assert files["interactions.csv"].stored == 5
    assert files["interactions.csv"].reasons["non_utf8"] == 1
    assert ws.count("items") == 10
    assert ws.count("item_images") == 2  # ok.jpg and the rotated one
    assert ws.count("interactions") == 5
    images = {r["item_id"]: r for r in ws.read("item_images").to_pylist()}
    assert (images["0002"]["width"], images["0002"]["height"]) == (40, 20), (
        "EXIF orientation applied to the size"
    )
    assert images["0001"]["image"] == (bad_source.image_root / "ok.jpg").read_bytes(), (
        "bytes stored as they are"
    )
    total_quarantined = sum(t.quarantined for t in files.values())
    assert total_quarantined == len(q)


def test_reingest_adds_nothing_and_changes_nothing(ws, bad_source):
    """A second ingest of the same source writes no row and creates no new table version."""
    ingest(ws, bad_source)
    before = ws.versions()
    report = ingest(ws, bad_source)
    assert all(r.written == 0 for r in report.tables.values()), report.tables
    assert ws.versions() == before


def test_string_ids_iso_dates_and_repeat_purchases(ws, bad_source):
    """Leading zeros survive, ISO dates parse, and a repeated identical purchase stays two rows."""
    ingest(ws, bad_source)
    ids = set(ws.read("items", columns=["item_id"])["item_id"].to_pylist())
    assert "0001" in ids and "1" not in ids
    rows = run_sql(
        ws,
        "select seq, epoch(timestamp) ts from interactions where user_id='u2' and item_id='0010' order by seq",
    )
    assert rows["seq"].to_pylist() == [0, 1]
    iso = run_sql(ws, "select epoch(timestamp) t from interactions where user_id='u1' and item_id='0002'")
    assert iso["t"].to_pylist() == [1700006400]


def test_padded_numbers_and_repeats_across_small_batches(ws, tmp_path, monkeypatch):
    """A padded timestamp or value parses like a bare one (a batch that casts as it stands skips the trim, one that
    does not is trimmed: same rows), and `seq` numbers a key's repeats in file order, within one batch and across
    later batches alike."""
    from recipes.ingest import interactions

    monkeypatch.setattr(interactions, "BATCH_BYTES", 128)  # a few rows per CSV block
    items = _write_csv(tmp_path / "items.csv", ["item_id", "title"], [["i1", "one"], ["i2", "two"]])
    filler = [[f"u{k}", "i2", 1700000100 + k, "view", 1] for k in range(3, 20)]
    rows = [["u1", "i1", 1700000000, "view", 1], ["u1", "i1", " 1700000000 ", "view", " 2.5"], *filler]
    rows += [["u1", "i1", "1700000000", "view", "4"], *filler[:3]]
    inter = _write_csv(tmp_path / "inter.csv", ["user_id", "item_id", "timestamp", "event", "value"], rows)
    report = ingest(ws, table(items, inter, name="pad"))
    assert report.balanced and report.tables["interactions"].inserted == len(rows)
    got = run_sql(
        ws, "select seq, value, epoch(timestamp) t from interactions where user_id='u1' order by seq"
    ).to_pylist()
    assert got == [
        {"seq": 0, "value": 1.0, "t": 1700000000},
        {"seq": 1, "value": 2.5, "t": 1700000000},
        {"seq": 2, "value": 4.0, "t": 1700000000},
    ]
    assert run_sql(ws, "select max(seq) m from interactions where user_id='u3'")["m"].to_pylist() == [1]


def test_changed_content_updates_in_place(ws, tmp_path):
    """Re-ingesting a source whose item text changed updates that one row (no duplicate key)."""
    f = _write_csv(
        tmp_path / "items.csv", ["item_id", "title", "text"], [["a", "A", "one"], ["b", "B", "two"]]
    )
    ingest(ws, table(f))
    _write_csv(f, ["item_id", "title", "text"], [["a", "A", "one"], ["b", "B", "changed"]])
    report = ingest(ws, table(f))
    assert (report.tables["items"].inserted, report.tables["items"].updated) == (0, 1)
    assert run_sql(ws, "select text from items where item_id='b'")["text"].to_pylist() == ["changed"]
    assert ws.count("items") == 2


def test_parquet_jsonl_and_column_mapping(ws, tmp_path):
    """Parquet and JSONL inputs work, and --map renames source columns to the platform's fields."""
    pq.write_table(
        pa.table({"article_id": ["0108775015", "0108775044"], "prod_name": ["Tee", "Top"]}),
        tmp_path / "a.parquet",
    )
    with open(tmp_path / "t.jsonl", "w") as fh:
        for row in [{"customer_id": "c1", "article_id": "0108775015", "t_dat": "2020-09-01"}]:
            fh.write(json.dumps(row) + "\n")
    mapping = parse_mapping(
        ["article_id=item_id", "prod_name=title", "customer_id=user_id", "t_dat=timestamp"]
    )
    report = ingest(ws, table(tmp_path / "a.parquet", tmp_path / "t.jsonl", mapping=mapping))
    assert report.balanced
    assert sorted(ws.read("items")["item_id"].to_pylist()) == ["0108775015", "0108775044"]
    assert ws.read("interactions")["user_id"].to_pylist() == ["c1"]
    with pytest.raises(SourceError, match="SOURCE_COLUMN=FIELD"):
        parse_mapping(["oops"])


def test_unreadable_source_is_a_clear_error(tmp_path):
    """A missing file or folder fails with a message naming the path and the fix."""
    with pytest.raises(SourceError, match="not found"):
        table(tmp_path / "absent.csv")
    with pytest.raises(SourceError, match=r"<name>\.inter"):
        mmrec(tmp_path)


def test_mmrec_and_recbole_layouts(ws, tmp_path):
    """MMRec .inter (with x_label) and RecBole typed atomic files ingest with derived or given items/users."""
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "baby.inter").write_text(
        "userID\titemID\trating\ttimestamp\tx_label\n0\t5\t4\t1500000000\t0\n1\t5\t5\t1500000100\t2\n"
    )
    report = ingest(ws, mmrec(mm))
    assert (
        report.balanced
        and ws.count("interactions") == 2
        and ws.count("items") == 1
        and ws.count("users") == 2
    )
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu9\ti9\t3\t1600000000\n"
    )
    (rb / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\tgenre:token_seq\ni9\tHeat\tAction Crime\n"
    )
    report = ingest(ws, recbole(rb))
    assert report.balanced
    row = run_sql(ws, "select title, attributes from items where item_id='i9'").to_pylist()[0]
    assert row["title"] == "Heat" and json.loads(row["attributes"])["genre"] == "Action Crime"


def test_derived_items_never_overwrite_real_ones(ws, tmp_path):
    """An interactions-only source (MMRec) ingested after a catalogue keeps the catalogue's titles and text."""
    f = _write_csv(tmp_path / "items.csv", ["item_id", "title", "text"], [["5", "Heat", "a heist"]])
    ingest(ws, table(f))
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "x.inter").write_text(
        "userID\titemID\trating\ttimestamp\tx_label\n0\t5\t4\t1500000000\t0\n0\t6\t4\t1500000001\t0\n"
    )
    ingest(ws, mmrec(mm))
    rows = {r["item_id"]: r for r in ws.read("items").to_pylist()}
    assert rows["5"]["title"] == "Heat" and rows["5"]["text"] == "a heist"
    assert "6" in rows and rows["6"]["title"] is None


def test_oversized_image_is_refused_by_stat_without_reading(tmp_path):
    """`image_too_large` comes from the file's size alone: a 200 MB (sparse) file allocates nothing on the way."""
    import tracemalloc

    from extractors.images import MAX_BYTES, ImageError, read_image_file

    with open(tmp_path / "huge.jpg", "wb") as fh:
        fh.truncate(4 * MAX_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            read_image_file(tmp_path, "huge.jpg")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "image_too_large"
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing an oversized image"


def test_plausible_timestamps_window():
    """Seconds outside 1970..now+1y are rejected; ms/us/ns epochs are rescaled only into 2000..now+1y."""
    from recipes.ingest.interactions import plausible_seconds

    now = 1_750_000_000
    t = pa.array(
        [
            0,
            1_700_000_000,
            -1,
            1_700_000_000_123,
            1_700_000_000_000_000,
            10**18,
            2**63 - 1,
            30_000_000_000,
            None,
        ],
        pa.int64(),
    )
    assert plausible_seconds(t, now=now).to_pylist() == [
        0,
        1_700_000_000,
        None,
        1_700_000_000,
        1_700_000_000,
        1_000_000_000,
        None,
        None,
        None,
    ]


def _hostile_source(name: str) -> RawSource:
    """~400 item rows and ~200 user rows from two files, built to hit every per-row rule: ids null, empty, blank,
    padded with ASCII or Unicode whitespace (so ' a' and 'a' collide after strip), identical and conflicting
    repeats, non-UTF-8 bytes in any column, surrogate bytes, blank and padded image paths, URLs where no image."""
    rng = random.Random(15)
    keys = [b"a", b" a", b"a\xc2\xa0", b"\xc2\xa0b", b"", b"  ", None, b"\xff", b"\xed\xa0\x80"]
    keys += [f"k{i}".encode() for i in range(60)] + [b"u3", b" u5"]
    texts = [None, b"", b"t", b"t2", b"caf\xc3\xa9", b"\xfe", b" x "]
    images = [None, b"", b"  ", b"img/1.jpg", b" img/2.jpg ", b"\x80.jpg"]
    urls = [None, b"", b"http://127.0.0.1/p.jpg", b" http://10.0.0.1/q.jpg"]

    def pick(values: list, n: int) -> list:
        return [rng.choice(values) for _ in range(n)]

    def ids(n: int) -> list:  # most ids fresh (the column path), the rest from the hostile pool
        return [f"u{i}".encode() if rng.random() < 0.6 else rng.choice(keys) for i in range(n)]

    n = 400
    items = pa.table(
        {
            "item_id": pa.array(ids(n), pa.binary()),
            "title": pa.array(pick(texts, n), pa.binary()),
            "text": pa.array(pick(texts, n), pa.binary()),
            "attributes": pa.array(pick([None, '{"c": 1}', '{"c": 2}'], n), pa.string()),
            "rights": pa.array(pick([None, b"cc-by", b"\xc0"], n), pa.binary()),
            "image": pa.array(pick(images, n), pa.binary()),
            "image_url": pa.array(pick(urls, n), pa.binary()),
            "__file": pa.array(pick(["items_b.csv", "items_a.csv"], n)),
            "__line": pa.array(range(2, n + 2), pa.int64()),
        }
    )
    m = 200
    users = pa.table(
        {
            "user_id": pa.array(ids(m), pa.binary()),
            "attributes": pa.array(pick([None, b'{"age": 3}', b"\xff"], m), pa.binary()),
            "__file": pa.array(["users.csv"] * m),
            "__line": pa.array(range(2, m + 2), pa.int64()),
        }
    )
    return RawSource(name, items=items, users=users)


def test_columnar_validation_equals_per_row_path(tmp_path, monkeypatch):
    """Items and users checked a column at a time store, merge and quarantine exactly what the per-row path does
    on a hostile source: same report (per-file counts and reason codes), same stored rows and hashes, same
    quarantine rows (file:line, key, reason, detail) including those of the image and URL refs."""

    def run(root: Path) -> tuple[dict, list, list, list]:
        ws = Workspace(root)
        report = ingest(ws, _hostile_source("hostile")).to_dict()
        report.pop("tables")

        def rows(name: str, drop: tuple[str, ...]) -> list:
            got = ws.read(name).drop_columns(list(drop)).to_pylist()
            return sorted(got, key=lambda r: json.dumps(r, sort_keys=True, default=str))

        # Sorted: URL downloads finish in any order, so the quarantine's row order is not a contract.
        return (
            report,
            rows("items", ("created_at", "updated_at")),
            rows("users", ("created_at",)),
            rows("quarantine", ("created_at",)),
        )

    columnar = run(tmp_path / "columnar")
    monkeypatch.setattr(load._Columns, "check", classmethod(lambda cls, *args, **kwargs: None))
    per_row = run(tmp_path / "per_row")
    assert columnar[0]["balanced"] and columnar[0]["files"]["items_a.csv"]["reasons"]
    assert columnar == per_row


def test_known_id_lookup_equals_is_in_even_on_hash_collisions():
    """The once-hashed known-id lookup answers exactly what `pc.is_in` answers (nulls unknown), also when a batch
    id's hash matches a different known id's or two known ids share a hash (collisions forced by passing hashes)."""
    import duckdb
    import numpy as np
    import pyarrow.compute as pc

    from recipes.ingest.interactions import _KnownIds, _uint64

    con = duckdb.connect()
    known = pa.array(["a", "b", "c", "0042", "a"])  # stored keys: never null
    ids = pa.array(["a", "x", None, "c", "0042", "42", "b", ""])

    def duck(values: pa.Array) -> np.ndarray:
        con.register("v", pa.table({"v": values}))
        return _uint64(con.sql("SELECT hash(v) AS h FROM v").to_arrow_table()["h"])

    expected = np.asarray(pc.fill_null(pc.is_in(ids, value_set=known), False))
    lookup = _KnownIds(con, known)
    assert (lookup.has(ids, duck(ids)) == expected).all()
    forced = duck(ids).copy()
    forced[1] = duck(pa.array(["a"]))[0]  # "x" collides with "a": not known
    forced[6] = duck(pa.array(["a"]))[0]  # "b" found only through the fallback
    assert (lookup.has(ids, forced) == expected).all()
    assert not _KnownIds(con, pa.array([], pa.string())).has(ids, duck(ids)).any()
    many = pa.array(
        [f"item{k:05d}" for k in range(2000)]
    )  # ~100 buckets hold two ids: the walk past the first
    probe = pa.array([f"item{k:05d}" for k in range(0, 4000, 3)] + [None])
    expected = np.asarray(pc.fill_null(pc.is_in(probe, value_set=many), False))
    lookup = _KnownIds(con, many)
    assert (np.diff(lookup.starts) > 1).any()
    assert (lookup.has(probe, duck(probe)) == expected).all()


def test_seq_numbers_repeats_exactly_across_merged_runs():
    """`seq` is each key's count of earlier occurrences (earlier batches, then earlier in its batch), whatever the
    Bloom filter lets through and however earlier batches' hashes were merged into sorted runs."""
    from collections import Counter

    import numpy as np

    from recipes.ingest.interactions import _Seen

    rng = np.random.default_rng(7)
    pool = rng.integers(0, 2**64, 300, dtype=np.uint64)  # many repeats, within and across batches
    seen, counts = _Seen(), Counter()
    for size in [50] * 30 + [7, 120, 1]:
        h = pool[rng.integers(0, len(pool), size)]
        expected = []
        for key in h.tolist():
            expected.append(counts[key])
            counts[key] += 1
        assert seen.seq(h).tolist() == expected
    assert len(seen.chunks) < 10, "earlier batches' hashes were never merged into runs"


@pytest.mark.parametrize("with_users", [False, True])
def test_dictionary_read_ids_equal_the_plain_path(tmp_path, monkeypatch, with_users):
    """Ids read dictionary-encoded (trimmed, UTF-8 checked, hashed and looked up once per distinct id in a batch)
    store and quarantine exactly what ids read as plain bytes do, on hostile ids across small batches: padded,
    Unicode-blank, empty, non-UTF-8 (in a dictionary value), unknown, mapped columns, padded and empty events
    (the default), repeated keys (same seq) and users derived from the clean rows (same users table)."""
    from recipes.ingest import interactions

    monkeypatch.setattr(interactions, "BATCH_BYTES", 256)  # many batches, each with its own dictionary
    rng = random.Random(3)
    pool = [b"i1", b" i1", b"i1\xc2\xa0", b"i2", b"", b"  ", b"i9", b"\xff", b"0042", b"42", b"i\xed\xa0\x80"]
    users = [b"u1", b" u1 ", b"u2", b"", b"\xc3\x28", b"u3", b"\xc2\xa0u4", b"u5"]
    lines = [b"who,what,timestamp,event,value"]
    for k in range(300):
        ts = rng.choice([b"1700000000", b" 1700000001", b"x", str(1700000000 + k % 5).encode()])
        event = rng.choice([b"view", b" view", b"buy", b"", b"\xfe"])
        lines.append(b",".join([rng.choice(users), rng.choice(pool), ts, event, b"1"]))
        if k % 97 == 0:
            lines.append(b"u1,i1")  # ragged
    (tmp_path / "inter.csv").write_bytes(b"\n".join(lines) + b"\n")
    items = _write_csv(
        tmp_path / "items.csv", ["item_id", "title"], [["i1", "a"], ["i2", "b"], ["0042", "c"]]
    )
    user_file = (
        _write_csv(tmp_path / "users.csv", ["user_id"], [["u1"], ["u2"], ["u4"]]) if with_users else None
    )

    def run(root: Path) -> tuple[dict, list, list, list]:
        ws = Workspace(root)
        source = table(
            items,
            tmp_path / "inter.csv",
            users=user_file,
            mapping={"who": "user_id", "what": "item_id"},
            name="d",
        )
        report = ingest(ws, source).to_dict()
        report.pop("tables")

        def rows(name: str) -> list:
            got = ws.read(name).drop_columns(["created_at"] if name != "interactions" else []).to_pylist()
            return sorted(got, key=lambda r: json.dumps(r, sort_keys=True, default=str))

        return report, rows("interactions"), rows("quarantine"), rows("users")

    dictionary = run(tmp_path / "dictionary")
    monkeypatch.setattr(interactions, "ID_FIELDS", ())  # every column read as plain bytes
    plain = run(tmp_path / "plain")
    reasons = dictionary[0]["files"]["inter.csv"]["reasons"]
    assert {"non_utf8", "empty_id", "unknown_item", "malformed_row"} <= set(reasons)
    assert max(r["seq"] for r in dictionary[1]) > 0
    assert dictionary == plain
