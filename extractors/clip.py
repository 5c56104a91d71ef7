"""CLIP image and text encoders (open_clip) as Ray Data callables: bytes or text in, unit float32 vectors out.

`model` is an open_clip architecture ("ViT-B-32"), an "hf-hub:" / "local-dir:" id, or TINY_CLIP, a tiny untrained
ViT built from config for offline tests. `pretrained` is an open_clip tag ("laion2b_s34b_b79k") or a local checkpoint
file; None means untrained weights (seeded, so every worker builds the same model), which is what benchmarks use.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from extractors.images import ImageError, decode_image
from extractors.pixels import prepare_image
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


# Models live in this process, by (model, pretrained, device): the image and text towers of one checkpoint built
# in one process (a refresh's model actor) load its weights once. Weak: a model goes when no tower holds it.
_LOADED: weakref.WeakValueDictionary[tuple, _Clip] = weakref.WeakValueDictionary()


def _load_clip(model: str, pretrained: str | None, device: str | None) -> _Clip:
    """The model on `device` (CUDA if present), fp16 on GPU, in eval mode; shared with a live tower of the same
    checkpoint in this process."""
    # a checkpoint file is known by its size and mtime too: a file rewritten in place is loaded again
    stat = Path(pretrained).stat() if pretrained is not None and Path(pretrained).is_file() else None
    key = (model, pretrained, device, stat and (stat.st_size, stat.st_mtime_ns))
    loaded = _LOADED.get(key)
    if loaded is None:
        loaded = _LOADED[key] = _build_clip(model, pretrained, device)
    return loaded


def _build_clip(model: str, pretrained: str | None, device: str | None) -> _Clip:
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


def pixel_transform(preprocess_cfg: dict[str, Any]) -> Callable[[Any], np.ndarray]:
    """open_clip's inference preprocessing for `preprocess_cfg` up to, not including, ToTensor: PIL image in
    (resized with PIL as open_clip does, center-cropped, RGB), uint8 [H, W, 3] out. ToTensor only divides by 255,
    so shipping these bytes and normalising on the model's side (`ClipImageEncoder.encode_uint8`) is lossless."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Normalize, ToTensor

    compose = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    steps = list(compose.transforms)
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if cut is None or [type(t) for t in steps[cut + 1 :]] != [Normalize]:
        raise ValueError(
            f"open_clip preprocessing {steps} is not <PIL steps>, ToTensor, Normalize; cannot split it"
        )
    pil_steps = steps[:cut]

    def transform(image: Any) -> np.ndarray:
        for step in pil_steps:
            image = step(image)
        return np.array(image, dtype=np.uint8)  # writable: torch.from_numpy takes it without a copy

    return transform


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

    def encode_uint8(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unit vectors for uint8 pixels [n, H, W, 3] from `pixel_transform`: the same float ops as open_clip's
        ToTensor (/255) and Normalize, in float32 on the model's device, then `encode_pixels`."""
        pixels = torch.as_tensor(pixels).to(self._clip.device)
        cfg = self.preprocess_cfg
        mean = torch.as_tensor(cfg["mean"], dtype=torch.float32, device=pixels.device)[None, :, None, None]
        std = torch.as_tensor(cfg["std"], dtype=torch.float32, device=pixels.device)[None, :, None, None]
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size].permute(0, 3, 1, 2).contiguous()
            out.append(self.encode_pixels(chunk.to(torch.float32).div(255).sub_(mean).div_(std)))
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self._clip.device)

    def encode_prepared(
        self, pixels: np.ndarray, errors: np.ndarray, jpegs: list[bytes | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors and errors for rows prepared by the CPU stage: `pixels` uint8 [n, H, W, 3] where `errors` is
        "", and where `jpegs[i]` holds bytes, a JPEG to decode on this model's GPU (`_device_pixels`); one that
        fails there, or any when the model is not on a GPU, is decoded here on the CPU with the same reasons."""
        errors = np.array(errors, dtype=object, copy=True)
        batch = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"])).to(
            self._clip.device
        )  # one transfer
        if jpegs is not None:
            rows = [i for i, data in enumerate(jpegs) if data is not None and errors[i] == ""]
            on_device = self._device_pixels([bytes(jpegs[i]) for i in rows]) if rows else []
            transform = None
            for k, i in enumerate(rows):
                got = on_device[k] if on_device else None
                if got is None:  # not decodable on the GPU, or no GPU: the CPU decoder, with its reasons
                    transform = transform or pixel_transform(self.preprocess_cfg)
                    array, errors[i] = prepare_image(jpegs[i], transform)
                    got = None if array is None else torch.from_numpy(array)
                if got is not None:
                    batch[i] = got.to(batch.device)
        vectors = np.zeros((len(errors), self.dim), np.float32)
        ok = np.array([e == "" for e in errors], dtype=bool)
        if ok.any():
            vectors[ok] = self.encode_uint8(batch[torch.from_numpy(ok).to(batch.device)]).cpu().numpy()
        return vectors, errors

    def _device_pixels(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        """JPEGs decoded by nvJPEG and resized/cropped on the GPU (uint8 [H, W, 3]); None for one it cannot
        decode. Empty (all to the CPU) when the model is not on CUDA or the resize mode is not "shortest".
        Bicubic with antialias on a tensor is close to, not the same as, PIL's: vectors agree to cosine ~0.99."""
        cfg = self.preprocess_cfg
        if self._clip.device.type != "cuda" or cfg.get("resize_mode", "shortest") != "shortest":
            return []
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        h, w = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for its image decoders
            try:
                decoded: list[torch.Tensor | None] = list(
                    decode_jpeg(data, mode=ImageReadMode.RGB, device=self._clip.device)
                )
            except Exception:  # one bad file fails the batched call: retry one by one
                decoded = []
                for d in data:
                    try:
                        decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self._clip.device))
                    except Exception:
                        decoded.append(None)
        interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
        out: list[torch.Tensor | None] = []
        for img in decoded:
            if img is None:
                out.append(None)
                continue
            # open_clip: Resize(shortest side) then CenterCrop for a square size, else scale to cover then crop.
            scale = max(h / img.shape[1], w / img.shape[2])
            size = [h] if h == w else [round(img.shape[1] * scale), round(img.shape[2] * scale)]
            img = TF.resize(img, size, interpolation=interpolation, antialias=True)
            out.append(TF.center_crop(img, [h, w]).permute(1, 2, 0))
        return out

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
