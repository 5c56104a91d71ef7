"""CLIP image and text encoders (open_clip) as Ray Data callables: bytes or text in, unit float32 vectors out.

`model` is an open_clip architecture ("ViT-B-32"), an "hf-hub:" / "local-dir:" id, or TINY_CLIP, a tiny untrained
ViT built from config for offline tests. `pretrained` is an open_clip tag ("laion2b_s34b_b79k") or a local checkpoint
file; None means untrained weights (seeded, so every worker builds the same model), which is what benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from extractors.images import ImageError, decode_image
from extractors.text import fingerprint, model_revision

TINY_CLIP = "test:tiny-clip"
# Real open_clip ViT/text-transformer code at toy size; vocab 49408 and context 77 keep the real BPE tokenizer usable.
_TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_SEED = 0


@dataclass
class _Clip:
    net: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    revision: str


def _load_clip(model: str, pretrained: str | None, device: str | None) -> _Clip:
    """Build the model on `device` (CUDA if present), fp16 on GPU, in eval mode."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    arch, overrides = ("ViT-B-32", _TINY_CLIP_CFG) if model == TINY_CLIP else (model, {})
    if model == TINY_CLIP and pretrained is not None and not Path(pretrained).is_file():
        raise ValueError(f"{TINY_CLIP} takes pretrained=None or a local checkpoint file, got {pretrained!r}")
    precision = "fp16" if dev.type == "cuda" else "fp32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)  # untrained weights must be identical in every worker
        net, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, precision=precision, device=dev, **overrides
        )
    net.eval()
    if pretrained is None and not model.startswith(("hf-hub:", "local-dir:")):
        revision = "untrained"
    elif pretrained is not None and Path(pretrained).is_file():
        revision = fingerprint(pretrained)
    elif model.startswith("local-dir:"):
        revision = fingerprint(model.removeprefix("local-dir:"))
    elif model.startswith("hf-hub:"):
        revision = model_revision(model.removeprefix("hf-hub:"))
    else:
        revision = f"open_clip:{pretrained}"
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return _Clip(net, preprocess, open_clip.get_tokenizer(arch), dev, dtype, revision)


def _normalised(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).cpu().numpy()


class ClipImageEncoder:
    """Image embeddings: batch["image"] (encoded bytes) -> batch["vector"] float32 [n, dim] and batch["error"].

    A row that cannot be decoded or preprocessed gets a zero vector and a reason such as "corrupt_image: ...".
    `batch_size` caps how many images go through the model at once.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        batch_size: int = 256,
        device: str | None = None,
        output_column: str = "vector",
        error_column: str = "error",
    ) -> None:
        self.model_id = model
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.output_column = output_column
        self.error_column = error_column
        self._clip = _load_clip(model, pretrained, device)
        size = self._clip.net.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *self.image_size, device=self._clip.device, dtype=self._clip.dtype)
            self.dim = int(self._clip.net.encode_image(probe).shape[-1])

    @property
    def device(self) -> torch.device:
        return self._clip.device

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights revision, output dimension and the settings that shape the vectors."""
        return {
            "model": self.model_id,
            "revision": self._clip.revision,
            "dim": self.dim,
            "params": {
                "pretrained": self.pretrained,
                "normalize": "l2",
                "precision": str(self._clip.dtype).removeprefix("torch."),
                "image_size": list(self.image_size),
            },
        }

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's inference preprocessing (size, mean, std, interpolation, resize_mode) for callers that
        prepare pixels themselves, e.g. decoding JPEGs on the GPU."""
        return dict(self._clip.net.visual.preprocess_cfg)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit float32 vectors, on the model's device, for preprocessed pixels [n, 3, H, W] (any memory format)."""
        with torch.inference_mode():
            features = self._clip.net.encode_image(pixels.to(self._clip.device, self._clip.dtype))
            return F.normalize(features.float(), dim=-1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        errors = np.empty(n, dtype=object)
        rows: list[int] = []
        pixels: list[torch.Tensor] = []
        for i, data in enumerate(images):
            if data is None:
                errors[i] = "missing_image: no image bytes"
                continue
            try:
                pixels.append(self._clip.preprocess(decode_image(bytes(data))))
                rows.append(i)
            except ImageError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # a decodable but unusable picture is a bad row, not a bad batch
                errors[i] = f"preprocess_error: {type(exc).__name__}: {exc}"
        for start in range(0, len(rows), self.batch_size):
            chunk = torch.stack(pixels[start : start + self.batch_size])
            vectors[rows[start : start + self.batch_size]] = self.encode_pixels(chunk).cpu().numpy()
        return {**batch, self.output_column: vectors, self.error_column: errors}


class ClipTextEncoder:
    """CLIP text embeddings in the image space: batch["text"] -> batch["vector"] float32 [n, dim] and batch["error"].

    Texts longer than the context (77 tokens) are truncated by the open_clip tokenizer; None or blank gives an error.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        batch_size: int = 1024,
        device: str | None = None,
        output_column: str = "vector",
        error_column: str = "error",
    ) -> None:
        self.model_id = model
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.output_column = output_column
        self.error_column = error_column
        self._clip = _load_clip(model, pretrained, device)
        with torch.inference_mode():
            self.dim = int(self._encode(["probe"]).shape[-1])

    @property
    def device(self) -> torch.device:
        return self._clip.device

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights revision, output dimension and the settings that shape the vectors."""
        return {
            "model": self.model_id,
            "revision": self._clip.revision,
            "dim": self.dim,
            "params": {
                "pretrained": self.pretrained,
                "normalize": "l2",
                "precision": str(self._clip.dtype).removeprefix("torch."),
                "context_length": int(getattr(self._clip.tokenizer, "context_length", 77)),
            },
        }

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self._clip.tokenizer(texts).to(self._clip.device)
        return self._clip.net.encode_text(tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch["text"]
        n = len(texts)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        errors = np.empty(n, dtype=object)
        rows: list[int] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                errors[i] = f"missing_text: expected a string, got {type(text).__name__}"
            elif not text.strip():
                errors[i] = "missing_text: blank string"
            else:
                rows.append(i)
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                vectors[chunk] = _normalised(self._encode([str(texts[i]) for i in chunk]))
        return {**batch, self.output_column: vectors, self.error_column: errors}
