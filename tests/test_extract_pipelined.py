"""The pixel pipeline for image encoders: bytes decoded, resized and cropped to uint8 in a CPU stage, normalised and
encoded in the model stage; it must give the extractor's own `__call__` vectors and quarantine reasons."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from extractors.runner import ExtractorSpec, decode_route, prepare_pixels, run_extraction
from stores.features import FAILURES
from stores.schema import ITEM_IMAGES, ITEMS
from stores.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = "test:tiny-clip"


def encoded(
    seed: int, size: tuple[int, int], fmt: str, mode: str = "RGB", exif_rotate: bool = False
) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        kwargs["exif"] = exif
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def samples() -> dict[str, bytes | None]:
    """Good images of several formats, modes and aspect ratios (all larger than the tiny model's 32 px, so the
    resize matters), and the bad inputs the quarantine knows."""
    jpeg = encoded(1, (64, 48), "JPEG")
    return {
        "jpeg_wide": jpeg,
        "jpeg_tall": encoded(2, (40, 90), "JPEG"),
        "jpeg_grey": encoded(3, (70, 50), "JPEG", "L"),
        "jpeg_cmyk": encoded(4, (50, 50), "JPEG", "CMYK"),
        "jpeg_exif": encoded(5, (80, 40), "JPEG", exif_rotate=True),
        "png_rgba": encoded(6, (33, 77), "PNG", "RGBA"),
        "png_palette": encoded(7, (100, 60), "PNG", "P"),
        "webp": encoded(8, (45, 45), "WEBP"),
        "small_png": encoded(9, (8, 12), "PNG"),
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "not_an_image": b"item_id,title\n1,hello\n",
        "empty": b"",
        "tiff": encoded(10, (20, 20), "TIFF"),
        "missing": None,
    }


@pytest.fixture(scope="module")
def encoder():
    from extractors.clip import ClipImageEncoder

    return ClipImageEncoder(TINY_CLIP, device="cpu", batch_size=4)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("device_decode", [False, True])
def test_pixel_stages_give_the_extractors_vectors_and_reasons(encoder, device_decode):
    """CPU stage + model stage give, row by row, the vectors of `ClipImageEncoder.__call__` on the same bytes
    (cosine >= 0.9999) and exactly its error strings. With `device_decode` on a model that is not on a GPU, the
    JPEGs routed to the device come back through the CPU fallback with the same vectors and reasons."""
    names, data = zip(*samples().items(), strict=True)
    images = np.array(list(data), dtype=object)
    reference = encoder({"image": images.copy()})
    batch = prepare_pixels({"item_id": np.array(names, dtype=object), "image": images.copy()},
                           encoder.preprocess_cfg, device_decode)  # fmt: skip
    assert batch["pixels"].dtype == np.uint8 and batch["pixels"].shape == (len(names), 32, 32, 3)
    assert ("jpeg" in batch) == device_decode
    if device_decode:
        assert list(batch["on_device"]) == [n in ("jpeg_wide", "jpeg_tall", "jpeg_grey") for n in names]
    jpegs = (
        [b if d else None for b, d in zip(batch["jpeg"], batch["on_device"], strict=True)]
        if device_decode
        else None
    )
    vectors, errors = encoder.encode_prepared(batch["pixels"], batch["error"], jpegs)
    want = [e if isinstance(e, str) else "" for e in reference["error"]]
    assert list(errors) == want
    reasons = {n: e.split(":")[0] for n, e in zip(names, errors, strict=True) if e}
    assert reasons == {"truncated_jpeg": "corrupt_image", "not_an_image": "unsupported_format",
                       "empty": "corrupt_image", "tiff": "unsupported_format", "missing": "missing_image"}  # fmt: skip
    ok = np.array([e == "" for e in want])
    assert ok.sum() == 9
    assert _cosines(vectors[ok], reference["vector"][ok]).min() >= 0.9999
    assert not vectors[~ok].any()


def test_decode_route_sends_only_complete_upright_rgb_jpegs_to_the_device():
    """The GPU decoder is chosen only when the run decodes on a device and the bytes are a complete RGB or grey
    JPEG without EXIF rotation; truncated, CMYK, rotated, non-JPEG, empty and missing bytes take the CPU decoder
    (which quarantines them as before), and nothing goes to the device when the run has no GPU."""
    s = samples()
    device = {name for name, data in s.items() if decode_route(data, True) == "device"}
    assert device == {"jpeg_wide", "jpeg_tall", "jpeg_grey"}
    assert all(decode_route(data, False) == "cpu" for data in s.values())


def _workspace(path, images: dict[str, bytes]) -> Workspace:
    ws = Workspace(path)
    now = datetime.now(UTC)
    ids = sorted(images)
    items = [{"item_id": i, "title": i, "text": "", "attributes": "{}", "source": "test", "content_hash": i,
              "created_at": now, "updated_at": now} for i in ids]  # fmt: skip
    ws.upsert(ITEMS, pa.Table.from_pylist(items, schema=ITEMS.schema))
    rows = [{"item_id": i, "sha256": hashlib.sha256(images[i]).hexdigest(), "format": "PNG", "width": 1,
             "height": 1, "image": images[i], "source": "test", "created_at": now} for i in ids]  # fmt: skip
    ws.upsert(ITEM_IMAGES, pa.Table.from_pylist(rows, schema=ITEM_IMAGES.schema))
    return ws


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_runner_writes_the_extractors_vectors_and_quarantines_bad_images(
    tmp_path, ray_local, encoder, engine
):
    """Through `run_extraction` (Ray: CPU pixel tasks then the model actor; local: the same stages in process)
    every good image's stored vector is the extractor's `__call__` vector (cosine >= 0.9999) and every bad one
    lands in extract_failures with the reason `__call__` gives it, without a model call."""
    images = {k: v for k, v in samples().items() if v is not None}
    ws = _workspace(tmp_path / "ws", images)
    summary = run_extraction(ws, "clip_image", ExtractorSpec(type(encoder), {"model": TINY_CLIP}),
                             source="image", batch_size=4, chunk_rows=8, engine=engine, progress=False)  # fmt: skip
    assert summary.engine == engine
    _assert_as_call(ws, images, encoder, (summary.done, summary.failed, summary.model_calls))


def _assert_as_call(ws: Workspace, images: dict[str, bytes], encoder, counts: tuple[int, int, int]) -> None:
    names = sorted(images)
    reference = encoder({"image": np.array([images[n] for n in names], dtype=object)})
    want_failed = {n: e.split(":")[0] for n, e in zip(names, reference["error"], strict=True) if e}
    assert counts == (9, 4, 9)
    failures = ws.read(FAILURES.name, columns=["item_id", "reason"]).to_pylist()
    assert {f["item_id"]: f["reason"] for f in failures} == want_failed
    stored = ws.read("feat_clip_image", columns=["item_id", "vector"]).to_pylist()
    got = {r["item_id"]: np.asarray(r["vector"], np.float32) for r in stored}
    good = [n for n in names if n not in want_failed]
    assert sorted(got) == good
    ref = dict(zip(names, reference["vector"], strict=True))
    assert _cosines(np.stack([got[n] for n in good]), np.stack([ref[n] for n in good])).min() >= 0.9999


GPU_CLUSTER = """
import json, sys
import ray
from extractors.clip import ClipImageEncoder
from extractors.runner import ExtractorSpec, run_extraction
from stores.workspace import Workspace
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU in name only
s = run_extraction(Workspace(sys.argv[1]), "clip_image", ExtractorSpec(ClipImageEncoder, {"model": "test:tiny-clip"}),
                   source="image", batch_size=4, chunk_rows=8, progress=False)
print(json.dumps([s.engine, s.done, s.failed, s.model_calls]))
"""


@pytest.mark.slow
def test_a_gpu_cluster_routes_jpegs_to_the_model_stage_which_falls_back_without_cuda(tmp_path, encoder):
    """On a cluster that reports a GPU the CPU tasks leave complete JPEGs undecoded for nvJPEG in the model
    actor; where that actor finds no CUDA (here: a GPU resource without a device) every such JPEG is decoded by
    the CPU fallback, so vectors and quarantine reasons are still exactly those of `__call__`."""
    images = {k: v for k, v in samples().items() if v is not None}
    ws = _workspace(tmp_path / "ws", images)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", GPU_CLUSTER, ws.uri], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    engine, *counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert engine == "ray"
    _assert_as_call(ws, images, encoder, tuple(counts))
