"""Model actors reused across a refresh's extractors (extractors/model_pool.py): inside `model_pool()` each distinct
model starts one actor and is built once, whatever the number of features or steps that use it; the vectors are
the extractor's own; the actors are gone when the block ends, also when it raised."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from extractors.model_pool import CPU_SLOTS, model_key, model_pool
from extractors.registry import TINY_CLIP, caption_spec, clip_text_spec, image_spec, text_spec
from recipes import refresh as steps
from recipes.config import CONFIG_DIR, load_config
from stores.workspace import Workspace

pytestmark = pytest.mark.slow

EXTRACT = [
    {"feature": "clip_image", "kind": "clip_image", "model": TINY_CLIP, "batch_size": 8},
    {"feature": "clip_title", "kind": "clip_text", "model": TINY_CLIP, "fields": ["title"], "batch_size": 8},
    {"feature": "text", "kind": "text", "fields": ["title", "text"], "batch_size": 8},
    {"feature": "title", "kind": "text", "fields": ["title"], "batch_size": 8},
]


def _config(tmp_path: Path) -> Path:
    """The demo source (24 items) with four features over two models: tiny CLIP (both towers) and MiniLM."""
    data = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    data["sources"][0].update(n_items=24, n_users=12, dir=str(tmp_path / "source"))
    data["extract"] = EXTRACT
    for key in ("splits", "graphs", "exports", "snapshot", "report", "forget", "schedules"):
        data.pop(key, None)
    data["run"]["engine"] = "ray"
    path = tmp_path / "pool.yaml"
    path.write_text("# Run: mmfeat run pool.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_refresh_builds_each_model_once_and_releases_its_actors(tmp_path, ray_local):
    """Four features over two models (CLIP's two towers, MiniLM twice) on a CPU cluster: one slot actor starts,
    each extractor class is built once, a second pass over the steps builds nothing more, the written vectors are
    the extractor's own, and leaving the block on an error kills the actors."""
    import ray

    from extractors.clip import ClipImageEncoder

    cfg = load_config(_config(tmp_path))
    ws = Workspace(str(tmp_path / "ws"))
    steps.ingest_source(ws, cfg, "demo")
    with pytest.raises(RuntimeError, match="after the steps"), model_pool() as pool:
        first = [steps.extract_feature(ws, cfg, e["feature"]) for e in EXTRACT]
        again = [steps.extract_feature(ws, cfg, e["feature"], force=True) for e in EXTRACT]
        built = pool.built()
        actors = [a for handles in pool.actors.values() for a in handles]
        raise RuntimeError("after the steps")  # the pool must still be released
    for out in first:
        assert out["engine"] == "ray" and out["failed"] == 0 and out["done"] == out["eligible"] > 0, out
    assert all(out["model_calls"] == 0 and out["unchanged"] == out["eligible"] for out in again)
    # On the CPU cluster of the tests one slot actor serves every model, each extractor class built once.
    assert pool.starts == {CPU_SLOTS: 1}
    assert {k: [sorted(b) for b in v] for k, v in built.items()} == {
        CPU_SLOTS: [["ClipImageEncoder", "ClipTextEncoder", "TextEncoder"]]
    }
    for (
        actor
    ) in actors:  # ray.kill is asynchronous: a call racing it may still be served, so ask until refused
        with pytest.raises(ray.exceptions.RayActorError):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ray.get(actor.pid.remote(), timeout=60)
                time.sleep(0.5)

    rows = ws.read("feat_clip_image", columns=["item_id", "vector"])
    images = ws.read("item_images", columns=["item_id", "image"])
    by_id = dict(zip(images["item_id"].to_pylist(), images["image"].to_pylist(), strict=True))
    ids = rows["item_id"].to_pylist()
    want = ClipImageEncoder(TINY_CLIP)({"image": np.array([by_id[i] for i in ids], dtype=object)})["vector"]
    got = np.stack([np.asarray(v, np.float32) for v in rows["vector"].to_pylist()])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gpu_actors_are_keyed_by_the_model_they_hold():
    """On GPUs one actor serves one model: CLIP's towers share a key, MiniLM for any input shares one, and a
    different model, weights or device gets its own."""
    clip = model_key(image_spec(TINY_CLIP))
    assert model_key(clip_text_spec(TINY_CLIP)) == clip
    assert model_key(text_spec(None)) == model_key(text_spec(None)) != clip
    assert model_key(image_spec(None)) != clip
    assert model_key(image_spec(TINY_CLIP, "/weights.pt")) != clip
    assert model_key(caption_spec("tiny-test")) not in (clip, model_key(text_spec(None)))
