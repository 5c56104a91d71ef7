"""Model actors reused across a refresh's extractors (extractors/model_pool.py): inside `model_pool()` each distinct
model starts one actor and is built once, whatever the number of features or steps that use it; the vectors are
the extractor's own; the actors are gone when the block ends, also when it raised."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from extractors.model_pool import CPU_SLOTS, model_key, model_pool
from extractors.registry import TINY_CLIP, caption_spec, clip_text_spec, image_spec, text_spec
from recipes import refresh as steps
from recipes.config import CONFIG_DIR, load_config
from stores.workspace import Workspace
from tests.conftest import run_capped

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


# ---- warm-up: models load while the refresh ingests ------------------------------------------------------------


class _Gated:
    """A model whose build waits for the test's go-ahead (`gate`) and counts its builds; `fail` builds raise."""

    builds = 0
    fail = 0
    gate = threading.Event()

    def __init__(self, name: str = "", tag: int = 0) -> None:
        if name == "gated":
            assert _Gated.gate.wait(60), "the test never opened the gate"
        _Gated.builds += 1
        if _Gated.fail:
            _Gated.fail -= 1
            raise OSError("weights unreadable")


def test_model_actor_builds_each_model_once_and_a_ready_model_waits_for_no_build():
    """ModelActor serves two calls at a time: concurrent calls for one model build it once; a failed build is
    raised to its caller, not kept (the next call builds again), and `warm` returns it instead of raising; a
    call for a model already built returns while another model is still being built."""
    from extractors.model_pool import ModelActor
    from extractors.runner import ExtractorSpec

    actor = ModelActor(None)
    gated = ExtractorSpec(_Gated, {"name": "gated"})
    _Gated.builds, _Gated.fail = 0, 0
    _Gated.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(actor.model, gated) for _ in range(4)]
        time.sleep(0.5)  # the four calls meet while the one build waits at the gate
        _Gated.gate.set()
        models = [call.result(timeout=60) for call in calls]
    assert _Gated.builds == 1 and all(m is models[0] for m in models)

    flaky = ExtractorSpec(_Gated, {"name": "flaky"})
    _Gated.builds, _Gated.fail = 0, 1
    (failure,) = actor.warm([flaky])  # returned, not raised
    assert failure.startswith("_Gated: TerminalError: cannot load _Gated") and "weights unreadable" in failure
    assert actor.model(flaky) is not None and _Gated.builds == 2

    later = ExtractorSpec(_Gated, {"name": "gated", "tag": 1})
    _Gated.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        warming = pool.submit(actor.warm, [later])
        assert actor.model(gated) is models[0]  # returns although `later` is still being built
        assert not warming.done()
        _Gated.gate.set()
        assert warming.result(timeout=60) == []


def _demo_refresh_config(tmp_path: Path, forget: bool = False, engine: str = "local") -> Path:
    """The demo's four extractions (captioner, CLIP, MiniLM over text and over captions) on 16 items."""
    data = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    data["sources"][0].update(n_items=16, n_users=8, dir=str(tmp_path / "source"))
    for key in ("splits", "graphs", "exports", "snapshot", "report", "schedules"):
        data.pop(key, None)
    if not forget:
        data.pop("forget")
    else:
        data["forget"][0]["users"] = ["u00001"]
    data["run"]["engine"] = engine
    path = tmp_path / f"warm-{engine}{int(forget)}.yaml"
    path.write_text("# Run: mmfeat run warm.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_models_to_warm_names_the_extractions_a_refresh_will_run(tmp_path):
    """Before a refresh's ingest: every extraction's model when the source is new or changed, when forced, or
    when a forget request is to be served; none once everything is fresh; only the stale extraction's model
    (and, for the captioner, those of the extractions that read its captions) otherwise."""
    cfg = load_config(_demo_refresh_config(tmp_path))
    ws = Workspace(str(tmp_path / "ws"))
    names = lambda specs: [s.name for s in specs]  # noqa: E731
    everything = ["Captioner", "ClipImageEncoder", "TextEncoder", "TextEncoder"]
    assert names(steps.models_to_warm(ws, cfg)) == everything  # nothing ingested yet
    steps.ingest_source(ws, cfg, "demo")
    for e in cfg.extract:
        steps.extract_feature(ws, cfg, e.feature)
    assert steps.models_to_warm(ws, cfg) == []
    assert names(steps.models_to_warm(ws, cfg, force=True)) == everything

    first = ws.read("items", columns=["item_id"])["item_id"][0].as_py()
    ws.open("feat_text").delete(f"item_id = '{first}'")  # one output changed: only its extraction runs again
    assert names(steps.models_to_warm(ws, cfg)) == ["TextEncoder"]
    ws.open("captions").delete(
        f"item_id = '{first}'"
    )  # the captioner's: the extraction of its captions follows
    assert names(steps.models_to_warm(ws, cfg)) == ["Captioner", "TextEncoder", "TextEncoder"]
    for e in cfg.extract:
        steps.extract_feature(ws, cfg, e.feature)
    assert steps.models_to_warm(ws, cfg) == []

    source = next((tmp_path / "source").glob("*.csv"))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert names(steps.models_to_warm(ws, cfg)) == everything  # the source changed
    steps.ingest_source(ws, cfg, "demo")
    with_forget = load_config(_demo_refresh_config(tmp_path, forget=True))
    assert names(steps.models_to_warm(ws, with_forget)) == everything  # a request not served yet
    assert steps.models_to_warm(ws, with_forget, serve_forget=False) == []


def test_a_refresh_warms_its_models_in_the_background_and_builds_each_once(tmp_path):
    """In a fresh process (Ray not started): the warm-up starts Ray on the starter thread and the models on one
    slot actor while the driver ingests; Ray stays up after that thread's job ended (its processes outlive the
    job), each model is built once, and the vectors are written."""
    cfg_path = _demo_refresh_config(tmp_path, engine="ray")
    code = f"""
import json, time
import ray
from extractors.model_pool import model_pool
from recipes import refresh as steps
from recipes.config import load_config
from stores.workspace import Workspace
cfg, ws = load_config({str(cfg_path)!r}), Workspace({str(tmp_path / "ws")!r})
with model_pool() as pool:
    pool.warm(steps.models_to_warm(ws, cfg))
    steps.ingest_source(ws, cfg, "demo")
    time.sleep(3)  # the warm-up's job has ended: Ray's processes must outlive the thread that started them
    out = [steps.extract_feature(ws, cfg, e.feature) for e in cfg.extract]
    print(json.dumps({{"started_here": ray.is_initialized(), "starts": list(pool.starts.values()),
          "built": list(pool.built().values()), "warmed": len(pool.warmed),
          "done": [o["done"] for o in out], "calls": [o["model_calls"] for o in out]}}))
"""
    result = run_capped(code, timeout=600)
    assert result["started_here"] and result["starts"] == [1] and result["warmed"] == 4
    assert [sorted(b) for b in result["built"][0]] == [["Captioner", "ClipImageEncoder", "TextEncoder"]]
    assert result["done"] == [16, 16, 16, 16] and all(c > 0 for c in result["calls"])


def test_a_refresh_that_fails_while_its_models_warm_keeps_its_error_and_releases_the_actors(
    prefect_api, tmp_path, ray_local, monkeypatch
):
    """A Ray refresh whose source is missing: the warm-up has started the slot actor and its model builds when
    the ingest fails; the flow fails with the ingest's own error (the one `mmfeat ingest` gives), and the
    actors the warm-up started are killed when the refresh's pool closes."""
    import ray

    from extractors import model_pool as pools
    from flows.pipeline import refresh_flow
    from stores.errors import TerminalError

    data = yaml.safe_load(_config(tmp_path).read_text())
    data["sources"] = [{"kind": "table", "name": "shop", "items": str(tmp_path / "missing.csv"),
                        "interactions": str(tmp_path / "missing_inter.csv")}]  # fmt: skip
    cfg_path = tmp_path / "missing.yaml"
    cfg_path.write_text("# Run: mmfeat run missing.yaml\n" + yaml.safe_dump(data, sort_keys=False))
    seen, close = [], pools.ModelPool.close

    def recording_close(pool: pools.ModelPool) -> None:
        from extractors.ray_start import settle

        settle()  # the warm-up's job has created its actors
        seen.append((list(pool.warmed), [a for handles in pool.actors.values() for a in handles]))
        close(pool)

    monkeypatch.setattr(pools.ModelPool, "close", recording_close)
    with pytest.raises(TerminalError, match="source 'shop'"):
        refresh_flow(str(cfg_path), str(tmp_path / "ws"))
    ((warmed, actors),) = seen
    assert len(warmed) == len(EXTRACT) and len(actors) == 1
    with pytest.raises(ray.exceptions.RayActorError):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ray.get(actors[0].pid.remote(), timeout=60)
            time.sleep(0.5)
