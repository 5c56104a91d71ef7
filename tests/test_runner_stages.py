"""The runner's stage accounting (read, encode, write, loop) that shows whether encoding overlaps the writes."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from extractors.model_pool import model_pool
from extractors.registry import TINY_CLIP, clip_text_spec
from extractors.runner import run_extraction
from stores.schema import ITEMS
from stores.workspace import Workspace

pytestmark = pytest.mark.slow


def _items(n: int) -> pa.Table:
    now = datetime.now(UTC)
    rows = [{"item_id": f"i{k:03d}", "title": f"title {k}", "text": f"some text about item {k}", "attributes": "{}",
             "source": "test", "content_hash": str(k), "created_at": now, "updated_at": now} for k in range(n)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=ITEMS.schema)


def _encode(ws: Workspace, engine: str, batch_size: int, chunk_rows: int):
    """Feature `t`, tiny CLIP's text tower over the items' text, inside a refresh's model pool."""
    with model_pool():
        return run_extraction(ws, "t", clip_text_spec(TINY_CLIP), source="text", batch_size=batch_size,
                              chunk_rows=chunk_rows, engine=engine, progress=False)  # fmt: skip


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_every_stage_is_timed_and_vectors_match_the_extractor(tmp_path, ray_local, engine):
    """A text extraction in several batches and chunks reports each stage's seconds (the input scan, the model
    summed over batches, the commits, the loop's wall time: what bench/encode.py compares to show overlap), and
    the timing column the model stage adds does not change what is written."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.upsert(ITEMS, _items(40))
    spec = clip_text_spec(TINY_CLIP)
    summary = _encode(ws, engine, batch_size=8, chunk_rows=16)
    assert summary.done == 40 and summary.failed == 0
    assert set(summary.stages) == {
        "read",
        "encode",
        "write",
        "loop",
        "first_batch",
        "first_write",
        "last_read",
    }
    assert summary.stages["encode"] > 0 and summary.stages["write"] > 0 and summary.stages["loop"] > 0
    rows = ws.read("feat_t", columns=["item_id", "vector"]).sort_by("item_id")
    texts = [f"title {k}. some text about item {k}" for k in range(40)]
    want = spec.build()({"text": np.array(texts, dtype=object)})["vector"]
    got = np.stack([np.asarray(v, np.float32) for v in rows["vector"].to_pylist()])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_text_is_read_in_batches_while_earlier_batches_are_encoded_and_written(tmp_path, ray_local, engine):
    """The text path streams: the first chunk is committed before the last input batch is read (reading is not a
    scan that ends before the model starts), and a rerun after edits, a deleted item and an emptied text makes the
    same decisions as reconciling the whole table at once: unchanged items skipped, changed ones re-encoded, the
    deleted and the emptied item's outputs pruned."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.upsert(ITEMS, _items(60))
    spec = clip_text_spec(TINY_CLIP)
    first = _encode(ws, engine, batch_size=6, chunk_rows=12)
    assert first.done == 60 and first.eligible == 60 and first.no_input == 0
    assert first.stages["first_write"] < first.stages["last_read"], first.stages
    edited = _items(60).to_pylist()
    edited[5]["text"] = "a new overview"
    edited[7]["title"], edited[7]["text"] = "", ""
    edited[5]["content_hash"], edited[7]["content_hash"] = "edited 5", "edited 7"
    ws.upsert(ITEMS, pa.Table.from_pylist(edited, schema=ITEMS.schema))
    ws.open("items").delete("item_id = 'i010'")
    second = _encode(ws, engine, batch_size=6, chunk_rows=12)
    assert (second.items, second.eligible, second.no_input) == (59, 58, 1), second
    assert (second.done, second.skipped, second.pruned) == (1, 57, 2), second
    rows = ws.read("feat_t", columns=["item_id", "vector"])
    assert rows.num_rows == 58 and {"i007", "i010"}.isdisjoint(rows["item_id"].to_pylist())
    got = dict(zip(rows["item_id"].to_pylist(), rows["vector"].to_pylist(), strict=True))
    want = spec.build()({"text": np.array(["title 5. a new overview"], dtype=object)})["vector"][0]
    np.testing.assert_allclose(np.asarray(got["i005"], np.float32), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_captions_from_the_cpu_stage_decode_equal_the_captioners_own(tmp_path, ray_local, engine):
    """A captioner takes the pictures the CPU stage decoded (`caption_decoded`), inside a refresh's model pool
    and on the local engine: the captions equal `Captioner.__call__` on the same bytes, and a corrupt image is
    quarantined with the decoder's reason."""
    from extractors.captioner import Captioner
    from extractors.runner import ExtractorSpec
    from stores.features import CAPTIONS, FAILURES
    from tests.test_extract_runner import add_items

    ws = Workspace(str(tmp_path / "ws"))
    add_items(ws, 10, corrupt={3})
    spec = ExtractorSpec(Captioner, {"model": "test:tiny-captioner", "max_new_tokens": 4})
    with model_pool():
        summary = run_extraction(
            ws, "caption", spec, source="image", batch_size=4, engine=engine, progress=False
        )
    assert summary.done == 9 and summary.failed == 1 and "corrupt_image" in summary.reasons, summary
    images = ws.read("item_images", columns=["item_id", "image"]).sort_by("item_id")
    want = spec.build()({"image": np.array(images["image"].to_pylist(), dtype=object)})
    rows = ws.read(CAPTIONS.name, columns=["item_id", "caption"])
    got = dict(zip(rows["item_id"].to_pylist(), rows["caption"].to_pylist(), strict=True))
    ids = images["item_id"].to_pylist()
    assert got == {i: c for i, c, e in zip(ids, want["caption"], want["error"], strict=True) if e is None}
    failures = ws.read(FAILURES.name, columns=["item_id", "reason"]).to_pylist()
    assert failures == [{"item_id": "i003", "reason": "corrupt_image"}]
