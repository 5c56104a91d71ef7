"""Safe image handling: format allow-list, decompression-bomb limits, truncation checks, EXIF orientation, RGB.

Ingest calls `inspect_image` to validate bytes before storing them unchanged; extractors call `decode_image` to get
an upright RGB picture. Both raise `ImageError` with a reason code that lands in the quarantine table.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_PIXELS = 50_000_000
MAX_SIDE = 20_000
MAX_BYTES = 50 * 1024 * 1024


class ImageError(ValueError):
    """A bad image: `code` is the quarantine reason (corrupt_image, unsupported_format, decompression_bomb, ...)."""

    def __init__(self, code: str, detail: str):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if len(data) > MAX_BYTES:
        raise ImageError("image_too_large", f"{len(data)} bytes exceeds the {MAX_BYTES}-byte limit")
    if not data:
        raise ImageError("corrupt_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("unsupported_format", "not a recognisable image (allowed: JPEG, PNG, WebP, GIF)") from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    if img.format not in ALLOWED_FORMATS:
        raise ImageError("unsupported_format", f"{img.format} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})")
    width, height = img.size
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ImageError(
            "decompression_bomb", f"{width}x{height} exceeds the limit of {max_pixels} pixels / {MAX_SIDE} px a side"
        )
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except Exception as exc:
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Validate `data` fully (header, limits, every pixel decodes) and return its format and upright size."""
    img = _open(data, max_pixels)
    fmt = img.format
    upright = _load(img)
    return ImageInfo(format=fmt, width=upright.width, height=upright.height)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to an upright RGB image (EXIF orientation applied; alpha composited on white; palettes expanded)."""
    img = _load(_open(data, max_pixels))
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def resolve_inside(root: str | Path, relative: str) -> Path:
    """Resolve `relative` under `root`, following symlinks, and refuse anything that ends up outside `root`."""
    root_path = Path(root).resolve()
    if not relative or not str(relative).strip():
        raise ImageError("missing_image", "empty image path")
    candidate = (root_path / relative).resolve()
    if not candidate.is_relative_to(root_path):
        raise ImageError("path_outside_root", f"{relative!r} resolves outside the image root {root_path}")
    if not candidate.is_file():
        raise ImageError("missing_image", f"{relative!r} does not exist under {root_path}")
    return candidate
