"""Parquet interactions stream by batch (memory bounded by the batch, not the file) with the whole-file semantics."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import recipes.ingest.interactions as interactions
from recipes.ingest.interactions import ParquetStream
from recipes.ingest.load import ingest
from recipes.ingest.sources import table


def _source(tmp_path: Path) -> tuple[Path, Path]:
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["0001", "0002"], "title": ["a", "b"]}), items)
    day = dt.datetime(2020, 1, 2, tzinfo=dt.UTC)
    inter = tmp_path / "inter.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": ["007", "007", "008", "", "007"],
                "item_id": ["0001", "0001", "0002", "0001", "0009"],
                "timestamp": pa.array([day] * 5, pa.timestamp("s")),
            }
        ),
        inter,
    )
    return items, inter


def test_parquet_streams_in_batches_with_repeats_numbered_across_batches(ws, tmp_path, monkeypatch):
    """A scalar Parquet file is a ParquetStream; read two rows per batch, a same-day repeat that straddles
    batches still gets seq 1, timestamps keep their UTC seconds, and stored + quarantined = read."""
    monkeypatch.setattr(interactions, "PARQUET_BATCH_ROWS", 2)
    items, inter = _source(tmp_path)
    src = table(items, inter, name="pq")
    assert isinstance(src.interactions, ParquetStream)
    report = ingest(ws, src)
    assert report.balanced
    rows = ws.read("interactions").sort_by([("user_id", "ascending"), ("seq", "ascending")]).to_pylist()
    assert [(r["user_id"], r["item_id"], r["seq"]) for r in rows] == [
        ("007", "0001", 0),
        ("007", "0001", 1),
        ("008", "0002", 0),
    ]
    assert rows[0]["timestamp"].timestamp() == dt.datetime(2020, 1, 2, tzinfo=dt.UTC).timestamp()
    reasons = sorted(ws.read("quarantine", columns=["reason"])["reason"].to_pylist())
    assert reasons == ["empty_id", "unknown_item"]
    # identical re-ingest writes nothing and creates no version
    version = ws.version("interactions")
    again = ingest(ws, table(items, inter, name="pq"))
    assert again.tables["interactions"].inserted == 0
    assert ws.version("interactions") == version


def test_parquet_with_a_nested_column_is_read_whole(tmp_path):
    """A nested column in a scalar field is quarantined row by row, which the whole-file path does: no stream."""
    items, _ = _source(tmp_path)
    inter = tmp_path / "nested.parquet"
    pq.write_table(
        pa.table({"user_id": [["x"]], "item_id": ["0001"], "timestamp": pa.array([1], pa.int64())}), inter
    )
    assert not isinstance(table(items, inter, name="n").interactions, ParquetStream)
