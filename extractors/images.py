"""Safe image handling: format allow-list, decompression-bomb limits, truncation checks, EXIF orientation, RGB.

Ingest calls `stat_image_file` on every image first (path and size, nothing read), then `read_checked_file` and
`inspect_image` batch by batch to validate bytes before storing them unchanged; extractors call `decode_image` to get
an upright RGB picture. All raise `ImageError` with a reason code that lands in the quarantine table.
"""

from __future__ import annotations

import io
import stat
import warnings
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_PIXELS = 50_000_000
MAX_SIDE = 20_000
MAX_BYTES = 50 * 1024 * 1024
NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


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
        raise ImageError(
            "unsupported_format", "not a recognisable image (allowed: JPEG, PNG, WebP, GIF)"
        ) from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    if img.format not in ALLOWED_FORMATS:
        raise ImageError(
            "unsupported_format", f"{img.format} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})"
        )
    width, height = img.size
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ImageError(
            "decompression_bomb",
            f"{width}x{height} exceeds the limit of {max_pixels} pixels / {MAX_SIDE} px a side",
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


def decode_rows(data: Sequence, errors: MutableSequence) -> tuple[list[int], list[Image.Image]]:
    """Decode a batch's image bytes: (rows that decoded, their images); a row without bytes or that fails to
    decode gets its reason in `errors` ("missing_image: ..." or the `ImageError` text)."""
    rows: list[int] = []
    images: list[Image.Image] = []
    for i, raw in enumerate(data):
        if raw is None:
            errors[i] = "missing_image: no image bytes"
            continue
        try:
            images.append(decode_image(bytes(raw)))
            rows.append(i)
        except ImageError as exc:
            errors[i] = str(exc)
    return rows, images


def device_decodable(data: bytes | None, max_pixels: int = MAX_PIXELS) -> bool:
    """Whether `data` may be decoded by nvJPEG on a GPU, judged from its header alone (no pixel is decoded): a
    complete JPEG (ends with the EOI marker, so a truncated file is left to the CPU decoder), RGB or grayscale,
    upright (nvJPEG ignores EXIF orientation), within the size limits. Anything else takes the CPU path, whose
    `ImageError` reasons are the quarantine reasons."""
    if not data or not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    try:
        img = _open(data, max_pixels)
        upright = img.getexif().get(0x0112, 1) == 1
    except Exception:
        return False
    return img.format == "JPEG" and img.mode in ("RGB", "L") and upright


def resolve_inside(root: str | Path, relative: str) -> Path:
    """Resolve `relative` under `root`, following symlinks, and refuse anything that ends up outside `root`.

    Every failure is an `ImageError` (a quarantine reason), never an OS error: NUL bytes, names over the
    file system's limit, symlink loops and non-files included."""
    root_path = Path(root).resolve()
    if not relative or not str(relative).strip():
        raise ImageError("missing_image", "empty image path")
    if "\x00" in relative:
        raise ImageError("bad_path", "image path holds a NUL byte; fix the path in the source")
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in Path(relative).parts):
        raise ImageError(
            "bad_path", f"a name in the image path is over {NAME_MAX} bytes; shorten it in the source"
        )
    try:
        candidate = (root_path / relative).resolve()
    except RuntimeError:  # Python 3.11 reports a symlink loop this way
        raise ImageError(
            "bad_path", f"{relative!r} is a symlink loop; fix the link under {root_path}"
        ) from None
    except (OSError, ValueError) as exc:
        raise ImageError(
            "bad_path", f"{relative!r} cannot be resolved ({exc}); fix the path in the source"
        ) from None
    if not candidate.is_relative_to(root_path):
        raise ImageError("path_outside_root", f"{relative!r} resolves outside the image root {root_path}")
    return candidate


def stat_image_file(root: str | Path, relative: str, max_bytes: int = MAX_BYTES) -> tuple[Path, int]:
    """The resolved path of the image `relative` under `root` and its size, checked with `stat` alone: nothing is
    read, so a whole folder can be checked up front at no memory cost. Failures raise `ImageError`."""
    path = resolve_inside(root, relative)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("missing_image", f"{relative!r} does not exist under {root}") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EACCES on a parent folder...
        raise ImageError(
            "unreadable_image", f"{relative!r}: {exc.strerror or exc}; fix the file or its permissions"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageError("missing_image", f"{relative!r} is {kind}, not an image file")
    if st.st_size > max_bytes:
        raise ImageError("image_too_large", f"{st.st_size} bytes exceeds the {max_bytes}-byte limit")
    return path, st.st_size


def read_checked_file(path: Path, relative: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of a file `stat_image_file` accepted, never more than `max_bytes` even if the file grew since;
    `relative` names it in errors."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(
            "unreadable_image", f"{relative!r}: {exc.strerror or exc}; fix the file or its permissions"
        ) from None
    if len(data) > max_bytes:
        raise ImageError(
            "image_too_large", f"{relative!r} grew past the {max_bytes}-byte limit while being read"
        )
    return data


def read_image_file(root: str | Path, relative: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of the image `relative` under `root`: size checked with `stat` before anything is read, and
    never more than `max_bytes` read even if the file grows meanwhile. Failures raise `ImageError`."""
    path, _size = stat_image_file(root, relative, max_bytes)
    return read_checked_file(path, relative, max_bytes)
