"""The CPU decode stage's PIL/NumPy preprocessing (extractors/pixels.py) against open_clip's own transform."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from extractors import clip, pixels
from extractors.images import decode_image

SIZES = [
    (1, 1),
    (1, 300),
    (300, 1),
    (32, 32),
    (33, 31),
    (224, 224),
    (225, 224),
    (640, 480),
    (479, 641),
    (97, 1013),
]
MODES = [
    ("RGB", "JPEG"),
    ("RGB", "PNG"),
    ("L", "PNG"),
    ("RGBA", "PNG"),
    ("P", "GIF"),
    ("LA", "PNG"),
    ("L", "JPEG"),
]
CONFIGS = [
    {
        "size": 32,
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
    {
        "size": 224,
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
    {"size": (64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"},
    {"size": 48, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "squash"},
]


def _encoded(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    image = rgb.convert(mode) if mode != "P" else rgb.quantize(64)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image.putalpha(alpha)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['size']}-{c.get('resize_mode', 'shortest')}")
def test_pil_transform_is_bit_identical_to_open_clip(cfg):
    """Every image size and colour mode the decoder accepts gives the same uint8 pixels from the PIL/NumPy
    transform as from open_clip's transform cut at ToTensor: the CPU stage's vectors equal `__call__`'s."""
    ours, reference = pixels.pixel_transform(cfg), clip.pixel_transform(cfg)
    for k, (width, height) in enumerate(SIZES):
        for mode, fmt in MODES:
            image = decode_image(_encoded(width, height, mode, fmt, seed=k))
            got, want = ours(image), reference(image)
            assert got.dtype == want.dtype == np.uint8
            assert np.array_equal(got, want), (cfg, width, height, mode, fmt)


def test_prepare_image_keeps_the_quarantine_reasons():
    """Bytes that do not decode give no pixels and the decoder's reason code, as `ClipImageEncoder` reports."""
    transform = pixels.pixel_transform(CONFIGS[0])
    assert pixels.prepare_image(None, transform) == (None, "missing_image: no image bytes")
    array, error = pixels.prepare_image(_encoded(40, 30, "RGB", "JPEG", 0)[:200], transform)
    assert array is None and error.startswith("corrupt_image")
    array, error = pixels.prepare_image(b"not an image", transform)
    assert array is None and error.startswith("unsupported_format")


def test_the_decode_stage_imports_no_torch():
    """A CPU decode task (extractors.runner.prepare_pixels) runs without importing torch, torchvision or
    open_clip: that import is what made each Ray decode worker cost seconds to start."""
    code = (
        "import sys, numpy as np, io\n"
        "from PIL import Image\n"
        "from extractors.runner import prepare_pixels\n"
        "buf = io.BytesIO(); Image.new('RGB', (50, 40), (1, 2, 3)).save(buf, 'PNG')\n"
        "batch = {'item_id': np.array(['a'], dtype=object), 'image': np.array([buf.getvalue()], dtype=object)}\n"
        "cfg = {'size': 32, 'mean': (0.5,)*3, 'std': (0.5,)*3, 'interpolation': 'bicubic', 'resize_mode': 'shortest'}\n"
        "out = prepare_pixels(batch, cfg)\n"
        "assert out['pixels'].shape == (1, 32, 32, 3) and out['error'][0] == '', out\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_clip_towers_share_one_model_in_a_process():
    """The image and text towers of one checkpoint built in one process (a refresh's CPU model actor) hold the
    same loaded network: its weights are loaded once, not once per tower."""
    image = clip.ClipImageEncoder(clip.TINY_CLIP, device="cpu")
    text = clip.ClipTextEncoder(clip.TINY_CLIP, device="cpu")
    assert image._clip is text._clip
    other = clip.ClipImageEncoder(clip.TINY_CLIP, device="cpu", batch_size=3)
    assert other._clip is image._clip
