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


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_every_stage_is_timed_and_vectors_match_the_extractor(tmp_path, ray_local, engine):
    """A text extraction in several batches and chunks reports each stage's seconds (the input scan, the model
    summed over batches, the commits, the loop's wall time: what bench/encode.py compares to show overlap), and
    the timing column the model stage adds does not change what is written."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.upsert(ITEMS, _items(40))
    spec = clip_text_spec(TINY_CLIP)
    with model_pool():
        summary = run_extraction(ws, "t", spec, source="text", batch_size=8, chunk_rows=16, engine=engine,
                                 progress=False)  # fmt: skip
    assert summary.done == 40 and summary.failed == 0
    assert set(summary.stages) == {"read", "encode", "write", "loop", "first_batch"}
    assert summary.stages["encode"] > 0 and summary.stages["write"] > 0 and summary.stages["loop"] > 0
    rows = ws.read("feat_t", columns=["item_id", "vector"]).sort_by("item_id")
    texts = [f"title {k}. some text about item {k}" for k in range(40)]
    want = spec.build()({"text": np.array(texts, dtype=object)})["vector"]
    got = np.stack([np.asarray(v, np.float32) for v in rows["vector"].to_pylist()])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


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
