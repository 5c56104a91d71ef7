"""open_clip's inference preprocessing up to ToTensor with PIL and NumPy alone, for the CPU decode stage.

    transform = pixel_transform(model.preprocess_cfg)   # no torch, torchvision or open_clip import
    array, error = prepare_image(data, transform)       # uint8 [H, W, 3] or None and the quarantine reason

torchvision's Resize and CenterCrop on a PIL image call PIL's `resize` and `crop` themselves, so doing the same
calls here gives the same bytes (tests/test_pixels.py compares them over varied sizes and modes). A Ray task that
decodes images then starts without importing torch (seconds per worker on a small machine). Resize modes other
than "shortest" to a square and "squash" fall back to open_clip's own transform (extractors.clip).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from extractors.images import ImageError, decode_image

_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}


def _resize_shortest(image: Image.Image, side: int, resample: int) -> Image.Image:
    """torchvision `Resize(side)`: the short side to `side`, the long one to int(side * long / short)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return image if size == (w, h) else image.resize(size, resample)


def _center_crop(image: Image.Image, h: int, w: int) -> Image.Image:
    """torchvision `CenterCrop((h, w))` on an image at least that large (offsets rounded as it rounds them)."""
    top = int(round((image.height - h) / 2.0))
    left = int(round((image.width - w) / 2.0))
    return image.crop((left, top, left + w, top + h))


def pixel_transform(preprocess_cfg: dict[str, Any]) -> Callable[[Image.Image], np.ndarray] | None:
    """An upright RGB PIL image to uint8 [H, W, 3], the same bytes as open_clip's transform for
    `preprocess_cfg` cut before ToTensor (`extractors.clip.pixel_transform`); None for a configuration done
    here only by open_clip's own transform (the caller falls back to it)."""
    size = preprocess_cfg["size"]
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    resample = _FILTERS.get(preprocess_cfg.get("interpolation") or "bicubic")
    if resample is None or mode not in ("shortest", "squash") or (mode == "shortest" and h != w):
        return None

    def transform(image: Image.Image) -> np.ndarray:
        if mode == "squash":
            image = image if image.size == (w, h) else image.resize((w, h), resample)
        else:
            image = _center_crop(_resize_shortest(image, h, resample), h, w)
        return np.array(image.convert("RGB"), dtype=np.uint8)  # open_clip's _convert_to_rgb, then ToTensor's

    return transform


def prepare_image(
    data: bytes | None, transform: Callable[[Any], np.ndarray]
) -> tuple[np.ndarray | None, str]:
    """One image's bytes to uint8 pixels with the safe decoder, or None and the reason `ClipImageEncoder` gives
    the same bytes ("missing_image", the decoder's codes, "preprocess_error")."""
    if data is None:
        return None, "missing_image: no image bytes"
    try:
        return transform(decode_image(bytes(data))), ""
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # a decodable but unusable picture is a bad row, not a bad batch
        return None, f"preprocess_error: {type(exc).__name__}: {exc}"
