"""The extraction runner and its tables: incremental re-runs, failures as data, crash safety, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from extractors.runner import ExtractorSpec, compose_text, run_extraction
from stores.features import CAPTIONS, FAILURES, degenerate_reason, feature_spec, list_features
from stores.schema import ITEM_IMAGES, ITEMS
from stores.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = "test:tiny-clip"


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()[:300]  # a valid header, then the file stops: truncated


def add_items(
    ws: Workspace,
    n: int,
    *,
    no_image: set[int] = frozenset(),
    corrupt: set[int] = frozenset(),
    blank_text: set[int] = frozenset(),
    seed: int = 0,
) -> None:
    """n items "i000".."; an image for each except `no_image`, corrupt bytes (stored as-is, as a bad disk or a
    bypassed ingest would leave them) for `corrupt`."""
    now = datetime.now(UTC)
    ids = [f"i{k:03d}" for k in range(n)]
    items = [
        {
            "item_id": i,
            "title": f"Item {k}",
            "text": "" if k in blank_text else f"about thing {k % 5}",
            "attributes": "{}",
            "source": "test",
            "content_hash": str(k),
            "created_at": now,
            "updated_at": now,
        }
        for k, i in enumerate(ids)
    ]
    ws.upsert(ITEMS, pa.Table.from_pylist(items, schema=ITEMS.schema))
    images = []
    for k, i in enumerate(ids):
        if k in no_image:
            continue
        data = corrupt_jpeg() if k in corrupt else png(seed * 100_000 + k)
        images.append(
            {
                "item_id": i,
                "sha256": hashlib.sha256(data).hexdigest(),
                "format": "PNG",
                "width": 16,
                "height": 16,
                "image": data,
                "source": "test",
                "created_at": now,
            }
        )
    ws.upsert(ITEM_IMAGES, pa.Table.from_pylist(images, schema=ITEM_IMAGES.schema))


def set_image(ws: Workspace, item_id: str, data: bytes) -> None:
    row = {
        "item_id": item_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "PNG",
        "width": 16,
        "height": 16,
        "image": data,
        "source": "test",
        "created_at": datetime.now(UTC),
    }
    ws.upsert(ITEM_IMAGES, pa.Table.from_pylist([row], schema=ITEM_IMAGES.schema))


def clip_image(**kwargs) -> ExtractorSpec:
    from extractors.clip import ClipImageEncoder

    return ExtractorSpec(ClipImageEncoder, {"model": TINY_CLIP, **kwargs})


def vectors(ws: Workspace, feature: str) -> dict[str, tuple]:
    t = ws.read(f"feat_{feature}", columns=["item_id", "vector", "input_hash", "created_at"])
    return {r["item_id"]: (tuple(r["vector"]), r["input_hash"], r["created_at"]) for r in t.to_pylist()}


# ---- unit tests ------------------------------------------------------------------------------------------------


def test_compose_text_joins_fields_once():
    """Text features read "title. text": blanks dropped, no doubled full stop."""
    assert compose_text(["Heat (1995)", "A heist."]) == "Heat (1995). A heist."
    assert compose_text(["Really?", " yes "]) == "Really? yes"
    assert compose_text([None, "  ", "only"]) == "only"
    assert compose_text([None, ""]) == ""


def test_feature_spec_is_keyed_fixed_size():
    """Vector tables hold fixed-size float32 vectors keyed by item_id, compared on input_hash."""
    spec = feature_spec("clip_image", 32)
    assert spec.name == "feat_clip_image"
    assert spec.schema.field("vector").type == pa.list_(pa.float32(), 32)
    assert spec.key == ("item_id",) and spec.compare == ("input_hash",)
    with pytest.raises(ValueError, match="not allowed"):
        feature_spec("Bad-Name", 8)


def test_rerun_is_free_and_a_changed_image_reencodes_only_that_item(ws, ray_local):
    """Unchanged items cost no model call and no write (no new table version); new bytes for one image re-encode
    exactly that item and leave every other row as it was."""
    add_items(ws, 20)
    first = run_extraction(
        ws, "clip_image", clip_image(), source="image", chunk_rows=8, batch_size=4, progress=False
    )
    assert (first.eligible, first.done, first.model_calls, first.failed) == (20, 20, 20, 0)
    before, versions = vectors(ws, "clip_image"), ws.versions()
    assert len(before) == 20 and all(abs(np.linalg.norm(v[0]) - 1) < 1e-4 for v in before.values())

    again = run_extraction(ws, "clip_image", clip_image(), source="image", chunk_rows=8, progress=False)
    assert (again.model_calls, again.done, again.skipped) == (0, 0, 20)
    assert ws.versions() == versions

    set_image(ws, "i007", png(999))
    third = run_extraction(ws, "clip_image", clip_image(), source="image", batch_size=4, progress=False)
    assert (third.model_calls, third.done, third.skipped) == (1, 1, 19)
    assert (first.engine, third.engine) == ("ray", "local")  # one changed item: no actor pool for it
    after = vectors(ws, "clip_image")
    assert [i for i in before if before[i] != after[i]] == ["i007"]
    assert ws.count("feat_clip_image") == 20


def test_local_engine_gives_the_ray_engine_rows(tmp_path, ray_local):
    """The Ray pipeline (CPU read and decode tasks, model actor) and the in-process engine write the same vectors,
    hashes and failures for the same inputs; a corrupt image fails in the decode task without a model call."""
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    for w in (a, b):
        add_items(w, 8, no_image={3}, corrupt={5})
    sa = run_extraction(a, "clip_image", clip_image(), source="image", batch_size=2, progress=False)
    sb = run_extraction(b, "clip_image", clip_image(), source="image", engine="local", progress=False)
    assert (sa.engine, sb.engine) == ("ray", "local")
    assert (sa.done, sa.failed, sa.no_input, sa.model_calls) == (
        sb.done,
        sb.failed,
        sb.no_input,
        sb.model_calls,
    )
    assert (sa.done, sa.failed, sa.no_input, sa.model_calls) == (6, 1, 1, 6)
    va, vb = vectors(a, "clip_image"), vectors(b, "clip_image")
    assert va.keys() == vb.keys()
    for i in va:
        np.testing.assert_allclose(va[i][0], vb[i][0], atol=1e-5)
        assert va[i][1] == vb[i][1]  # same input hash
    fa, fb = (w.read(FAILURES.name, columns=["item_id", "reason", "input_hash"]).to_pylist() for w in (a, b))
    assert fa == fb == [{"item_id": "i005", "reason": "corrupt_image", "input_hash": fa[0]["input_hash"]}]


def test_corrupt_image_is_a_failure_and_a_missing_one_is_no_input(ws, ray_local):
    """A corrupt image lands in extract_failures with its reason while the rest succeed; an item without an
    image is counted as no input, not as a failure. Fixing the image moves the item from failures to the table."""
    add_items(ws, 10, no_image={3}, corrupt={5})
    s = run_extraction(ws, "clip_image", clip_image(), source="image", engine="local", progress=False)
    assert (s.items, s.eligible, s.no_input, s.done, s.failed) == (10, 9, 1, 8, 1)
    assert s.model_calls == 8  # the decoder stopped the corrupt image before the model
    failures = ws.read(FAILURES.name).to_pylist()
    assert [(f["feature"], f["item_id"], f["reason"]) for f in failures] == [
        ("clip_image", "i005", "corrupt_image")
    ]
    assert failures[0]["detail"] and failures[0]["input_hash"]
    stored = set(vectors(ws, "clip_image"))
    assert "i005" not in stored and "i003" not in stored and len(stored) == 8

    again = run_extraction(ws, "clip_image", clip_image(), source="image", engine="local", progress=False)
    assert (again.model_calls, again.known_failed, again.failed) == (0, 1, 0)

    set_image(ws, "i005", png(555))
    fixed = run_extraction(ws, "clip_image", clip_image(), source="image", engine="local", progress=False)
    assert (fixed.done, fixed.model_calls) == (1, 1)
    assert ws.count(FAILURES.name) == 0 and ws.count("feat_clip_image") == 9


def test_text_features_skip_blank_text_and_change_with_fields(ws, ray_local):
    """Text features embed the chosen fields; items whose fields are blank are no input; other fields, other hash."""
    from extractors.clip import ClipTextEncoder

    add_items(ws, 8, blank_text={2, 6})
    spec = ExtractorSpec(ClipTextEncoder, {"model": TINY_CLIP})
    s = run_extraction(ws, "clip_text", spec, source="text", fields=("text",), progress=False)
    assert (s.eligible, s.no_input, s.done) == (6, 2, 6)
    row = ws.read("feat_clip_text").to_pylist()[0]
    assert json.loads(row["params"])["input"] == {"source": "text", "fields": ["text"]}
    assert row["revision"] == "untrained" and row["model"] == TINY_CLIP
    both = run_extraction(ws, "clip_text", spec, source="text", fields=("title", "text"), progress=False)
    assert (both.eligible, both.done, both.pruned) == (8, 8, 0)
    with pytest.raises(ValueError, match="choose from"):
        run_extraction(ws, "clip_text", spec, source="text", fields=("nope",), progress=False)


def test_captions_then_caption_vectors(ws, ray_local):
    """Captions record model, revision, prompt and params, one per item; a new prompt replaces them; captions
    feed a text feature."""
    from extractors.captioner import Captioner
    from extractors.clip import ClipTextEncoder

    add_items(ws, 6, no_image={1})
    cap = ExtractorSpec(Captioner, {"model": "test:tiny-captioner", "max_new_tokens": 4})
    s = run_extraction(ws, "caption", cap, source="image", progress=False)
    assert (s.done, s.no_input) == (5, 1)
    rows = ws.read(CAPTIONS.name).to_pylist()
    assert len(rows) == 5 and all(r["caption"] and r["revision"] == "untrained" for r in rows)
    assert json.loads(rows[0]["params"])["max_new_tokens"] == 4

    prompted = ExtractorSpec(
        Captioner, {"model": "test:tiny-captioner", "max_new_tokens": 4, "prompt": "a poster of"}
    )
    s2 = run_extraction(ws, "caption", prompted, source="image", progress=False)
    assert s2.done == 5
    rows = ws.read(CAPTIONS.name).to_pylist()
    assert len(rows) == 5 and {r["prompt"] for r in rows} == {"a poster of"}

    enc = run_extraction(
        ws,
        "clip_caption",
        ExtractorSpec(ClipTextEncoder, {"model": TINY_CLIP}),
        source="caption",
        progress=False,
    )
    assert (enc.eligible, enc.done, enc.no_input) == (5, 5, 1)


def test_ann_index_is_built_past_the_threshold_and_kept_current(ws, ray_local):
    """Past `index_min_rows` the vector table gets a cosine ANN index; later rows are folded into it."""
    add_items(ws, 12)
    s = run_extraction(ws, "clip_image", clip_image(), source="image", index_min_rows=10, progress=False)
    assert s.index == "built"
    table = ws.open("feat_clip_image")
    [index] = list(table.list_indices())
    assert index.columns == ["vector"]
    query = np.array(ws.read("feat_clip_image", columns=["vector"])["vector"][0].as_py(), np.float32)
    assert len(table.search(query).distance_type("cosine").limit(3).to_list()) == 3
    set_image(ws, "i004", png(444))
    s2 = run_extraction(ws, "clip_image", clip_image(), source="image", index_min_rows=10, progress=False)
    assert s2.index in ("extended", "rebuilt", "current")
    assert (
        run_extraction(
            ws, "clip_image", clip_image(), source="image", index_min_rows=10, progress=False
        ).index
        == "current"
    )


def test_many_small_commits_are_compacted(ws, ray_local):
    """Chunked commits leave one fragment per chunk; past the limit they are merged, and every row survives."""
    add_items(ws, 40)
    s = run_extraction(
        ws,
        "clip_image",
        clip_image(),
        source="image",
        engine="local",
        chunk_rows=1,
        batch_size=1,
        progress=False,
    )
    assert s.done == 40 and ws.version("feat_clip_image") > 40  # one commit per row, then the compaction
    assert len(ws.dataset("feat_clip_image").get_fragments()) <= 32
    ids = ws.read("feat_clip_image", columns=["item_id"])["item_id"].to_pylist()
    assert sorted(ids) == [f"i{k:03d}" for k in range(40)]


def test_features_listing_and_width_change(ws, ray_local):
    """`list_features` reports width, rows, coverage and untrained weights; a model of another width needs
    another feature name or an explicit overwrite."""
    add_items(ws, 5, no_image={0})
    run_extraction(ws, "clip_image", clip_image(), source="image", engine="local", progress=False)
    [info] = list_features(ws)
    assert (info.feature, info.dim, info.rows, info.items, info.untrained) == ("clip_image", 32, 4, 5, True)
    assert info.coverage == pytest.approx(0.8)
    ws.db.drop_table("feat_clip_image")
    ws.ensure(feature_spec("clip_image", 8))
    with pytest.raises(ValueError, match="--overwrite"):
        run_extraction(ws, "clip_image", clip_image(), source="image", engine="local", progress=False)
    s = run_extraction(
        ws, "clip_image", clip_image(), source="image", engine="local", overwrite=True, progress=False
    )
    assert s.done == 4 and list_features(ws)[0].dim == 32


def put_vectors(ws: Workspace, feature: str, vectors: np.ndarray) -> None:
    spec = feature_spec(feature, vectors.shape[1])
    n = len(vectors)
    rows = {"item_id": [f"i{k:03d}" for k in range(n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), vectors.shape[1]),
            "model": ["m"] * n, "revision": ["r"] * n, "params": ["{}"] * n, "input_hash": [str(k) for k in range(n)],
            "created_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC"))}  # fmt: skip
    ws.upsert(spec, pa.table(rows, schema=spec.schema))


def put_captions(ws: Workspace, captions: list[str], revision: str = "r1") -> None:
    n = len(captions)
    rows = {"item_id": [f"i{k:03d}" for k in range(n)], "caption": captions, "model": ["m"] * n,
            "revision": [revision] * n, "prompt": [None] * n, "params": ["{}"] * n,
            "input_hash": [f"{revision}:{c}" for c in captions],
            "created_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC"))}  # fmt: skip
    ws.upsert(CAPTIONS, pa.table(rows, schema=CAPTIONS.schema))


def test_degenerate_rule_flags_constant_features_and_only_those(ws):
    """A feature is degenerate when its sampled vectors are all zero, all identical or nearly so (mean pairwise
    cosine > 0.999), or its captions are (nearly) one string; random vectors and varied captions are not, and the
    reason names what was seen on how many sampled rows."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16)
    cases = {
        "random": (rng.standard_normal((600, 16)), ""),
        "same": (np.tile(base, (600, 1)), "all 512 sampled vectors are identical"),
        "close": (base + 1e-4 * rng.standard_normal((600, 16)), "mean pairwise cosine 1.0000 over 512"),
        "zero": (np.zeros((5, 16)), "all 5 sampled vectors are zero"),
        "one": (base[None, :], ""),  # a single row says nothing about spread
    }
    for name, (vectors, _) in cases.items():
        put_vectors(ws, name, vectors)
    got = {name: degenerate_reason(ws, f"feat_{name}") for name in cases}
    for name, (_, want) in cases.items():
        assert (want in got[name]) and (bool(want) == bool(got[name])), (name, got[name])
    put_captions(ws, ["a red chair"] * 299 + ["a blue chair"])  # 2 strings: under 1% of 300 rows
    assert "2 distinct caption(s) in 300 sampled rows" in degenerate_reason(ws, CAPTIONS.name)
    put_captions(ws, [f"a chair of colour {k}" for k in range(151)])
    assert degenerate_reason(ws, CAPTIONS.name) == ""


def test_untrained_captions_mark_the_features_embedded_from_them(ws):
    """`encode caption` over captions of `test:tiny-captioner` records untrained (input.untrained in params) even
    though MiniLM is real, and a re-run skips every item; once the captions come from trained weights, the
    re-encoded feature is neither untrained nor degenerate."""
    from extractors.registry import caption_spec, text_spec

    add_items(ws, 6, no_image={1})
    run_extraction(ws, "caption", caption_spec("tiny-test", max_new_tokens=4), source="image", engine="local",
                   progress=False)  # fmt: skip
    text = text_spec(None)  # the packaged, real MiniLM
    s = run_extraction(ws, "caption_text", text, source="caption", engine="local", progress=False)
    assert s.done == 5 and s.provenance["revision"] != "untrained"
    params = {json.loads(p)["input"]["untrained"] for p in ws.read("feat_caption_text")["params"].to_pylist()}
    assert params == {True}
    info = {i.feature: i for i in list_features(ws)}["caption_text"]
    assert info.untrained and info.untrained_input and "identical" in info.degenerate
    again = run_extraction(ws, "caption_text", text, source="caption", engine="local", progress=False)
    assert (again.done, again.skipped) == (0, 5)

    put_captions(ws, [f"a photo of thing number {k}" for k in range(6)], revision="trained-r1")
    run_extraction(ws, "caption_text", text, source="caption", engine="local", progress=False)
    info = {i.feature: i for i in list_features(ws)}["caption_text"]
    assert not info.untrained and info.degenerate == "", info


# ---- crash safety ----------------------------------------------------------------------------------------------

CLI = "from flows.cli import main; main()"


def _encode_cmd(ws_path: Path, engine: str = "ray", source: str = "image") -> list[str]:
    what = ["image"] if source == "image" else ["text", "--clip-text", "--fields", "text", "--feature", "t"]
    return [sys.executable, "-c", CLI, "--workspace", str(ws_path), "encode", *what, "--model", "tiny-test",
            "--chunk-rows", "16", "--batch-size", "8", "--engine", engine, "--no-progress"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source", ["image", "text"])
def test_sigkill_at_random_points_then_resume_leaves_exactly_one_row_per_item(tmp_path, ray_local, source):
    """Killing the encode CLI with SIGKILL at random points, again and again, then finishing, leaves exactly one
    row per eligible item in the feature table and one failure row for the bad image: none missing, none twice.
    Kills land after a random number of further rows were committed, so each interrupts a run mid-stream; they
    alternate between the Ray engine (driver killed with its actor working in the cluster) and the local one
    (same commit loop, a third of the start-up cost). Text is read in batches while earlier ones commit
    (TextStream), so there a kill also lands between a batch's reconcile and its commit."""
    ws = Workspace(tmp_path / "ws")
    # Text encodes fast enough that a kill can land 80 rows after its target (the poll's lag): more items keep
    # five kills short of the end.
    n = 240 if source == "image" else 480
    if source == "image":
        add_items(ws, n, no_image={10, 20}, corrupt={30})
        table, missing, bad = (
            "feat_clip_image",
            {"i010", "i020", "i030"},
            [{"item_id": "i030", "reason": "corrupt_image"}],
        )
    else:
        add_items(ws, n, blank_text={10, 20})
        table, missing, bad = "feat_t", {"i010", "i020"}, []
    env = os.environ | {"RAY_ADDRESS": ray_local, "PYTHONPATH": str(REPO)}
    rng = random.Random(7)
    kills: list[tuple[str, int, int]] = []
    for attempt in range(12):
        before = ws.count(table)
        if len(kills) >= 5 or before >= n - 10:
            break
        engine = "ray" if attempt % 2 == 0 else "local"
        target = before + rng.randint(1, 30)
        proc = subprocess.Popen(_encode_cmd(ws.uri, engine, source), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if ws.count(table) >= target:
                break
            time.sleep(rng.uniform(0.01, 0.2))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI's whole process group: no orphans left behind
            kills.append((engine, before, ws.count(table)))
        proc.wait()
    assert len(kills) >= 5 and {k[0] for k in kills} == {"ray", "local"}, kills
    done = subprocess.run(
        _encode_cmd(ws.uri, source=source) + ["--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ids = ws.read(table, columns=["item_id"])["item_id"].to_pylist()
    eligible = {f"i{k:03d}" for k in range(n)} - missing
    assert len(ids) == len(set(ids)) == len(eligible) and set(ids) == eligible
    failures = (
        ws.read(FAILURES.name, columns=["item_id", "reason"]).to_pylist() if ws.exists(FAILURES.name) else []
    )
    assert failures == bad
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["no_input"] == 2 and summary["skipped"] + summary["done"] == n - 2 - len(bad)
