"""The one place that turns a model choice into an extractor spec, for the CLI (flows/extract_cli.py) and the
flows (a config's `extract:` list). Defaults are real pretrained models: CLIP is open_clip ViT-B-32 with the
laion2b_s34b_b79k weights, text is the packaged all-MiniLM-L6-v2. The tiny untrained test models are chosen only
by name (`tiny-test`, or their full names test:tiny-clip / test:tiny-captioner), never by default.

`preflight` checks, before any work, that the weights can be had: offline (HF_HUB_OFFLINE=1) without a cached
copy it raises a one-line TerminalError naming the fix, instead of a model load failing inside every worker.

    >>> spec = image_spec(None)                      # ViT-B-32 / laion2b_s34b_b79k
    >>> spec = image_spec("tiny-test")               # the untrained test CLIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from extractors.runner import ExtractorSpec
from stores.errors import TerminalError

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_WEIGHTS = "laion2b_s34b_b79k"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
TINY = "tiny-test"  # the short name of each modality's untrained test model
# Spelled out (not imported) so that choosing a spec does not import torch; extractors/clip.py and captioner.py
# define the same names.
TINY_CLIP = "test:tiny-clip"
TINY_CAPTIONER = "test:tiny-captioner"
_TEST_PREFIX = "test:"


def _clip(model: str | None, pretrained: str | None) -> dict[str, Any]:
    if model in (TINY, TINY_CLIP):
        return {"model": TINY_CLIP, "pretrained": pretrained}
    if model is None:
        return {"model": DEFAULT_CLIP, "pretrained": pretrained or DEFAULT_CLIP_WEIGHTS}
    return {"model": model, "pretrained": pretrained}


def image_spec(model: str | None, pretrained: str | None = None) -> ExtractorSpec:
    """CLIP's image tower: `model` None for ViT-B-32 / laion2b_s34b_b79k, "tiny-test", an open_clip
    architecture (with `pretrained`), or an "hf-hub:" / "local-dir:" id."""
    return ExtractorSpec("extractors.clip:ClipImageEncoder", _clip(model, pretrained))


def clip_text_spec(model: str | None, pretrained: str | None = None) -> ExtractorSpec:
    """CLIP's text tower, with the same model choice as `image_spec`."""
    return ExtractorSpec("extractors.clip:ClipTextEncoder", _clip(model, pretrained))


def text_spec(model: str | None) -> ExtractorSpec:
    """A sentence-transformers encoder: None for the packaged all-MiniLM-L6-v2, else a hub id or folder."""
    return ExtractorSpec("extractors.text:TextEncoder", {"model": model})


def caption_spec(
    model: str | None,
    prompt: str | None = None,
    max_new_tokens: int = 40,
    engine: str = "transformers",
) -> ExtractorSpec:
    """A captioner: None for BLIP-large, "tiny-test" for the untrained toy BLIP, else a hub id or folder.
    `engine` "transformers" (default, CPU or GPU) or "vllm" (GPU only, the optional vllm extra; chat VLMs such
    as Qwen2-VL / Qwen2.5-VL / SmolVLM, see extractors/vllm_captioner.py)."""
    name = TINY_CAPTIONER if model == TINY else model or DEFAULT_CAPTIONER
    kwargs = {"model": name, "prompt": prompt, "max_new_tokens": max_new_tokens}
    if engine == "vllm":
        from extractors.vllm_captioner import VllmCaptioner

        return ExtractorSpec(VllmCaptioner, kwargs)
    if engine != "transformers":
        raise TerminalError(f"caption engine {engine!r} is unknown; use transformers or vllm")
    return ExtractorSpec("extractors.captioner:Captioner", kwargs)


def config_spec(
    kind: str,
    model: str | None,
    pretrained: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 40,
    caption_engine: str = "transformers",
) -> ExtractorSpec:
    """The spec of a configured extractor (recipes/config.py `ExtractorConfig.kind`, `.caption_engine`)."""
    if kind == "caption":
        return caption_spec(model, prompt, max_new_tokens, caption_engine)
    if kind == "clip_image":
        return image_spec(model, pretrained)
    if kind == "clip_text":
        return clip_text_spec(model, pretrained)
    if kind == "text":
        return text_spec(model)
    raise TerminalError(f"extractor kind {kind!r} is unknown; use caption, clip_image, clip_text or text")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _cached(repo: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def preflight(spec: ExtractorSpec) -> None:
    """Raise a one-line TerminalError when the spec's weights cannot be loaded here: an unknown open_clip
    weights tag, the vllm engine where vllm is not installed, or (offline) weights that are not in the Hugging Face
    cache."""
    from extractors.vllm_captioner import VllmCaptioner, require_vllm

    if spec.path == f"{VllmCaptioner.__module__}:{VllmCaptioner.__qualname__}":  # imports no model library
        require_vllm()
    model, pretrained = spec.kwargs.get("model"), spec.kwargs.get("pretrained")
    if model is None or str(model).startswith(_TEST_PREFIX) or Path(str(model)).exists():
        return
    fix = f"pass --model {TINY} (untrained, for tests) or a local path, or download the weights while online"
    if "pretrained" in spec.kwargs:  # open_clip
        if pretrained is None or Path(pretrained).is_file() or str(model).startswith("local-dir:"):
            return
        if str(model).startswith("hf-hub:"):
            repo, files = model.removeprefix("hf-hub:"), ("open_clip_config.json",)
        else:
            import open_clip

            cfg = open_clip.get_pretrained_cfg(model, pretrained)
            if not cfg:
                tags = open_clip.list_pretrained_tags_by_model(model)
                raise TerminalError(
                    f"open_clip has no weights {pretrained!r} for {model!r}; use one of {tags or 'none'} "
                    "or a checkpoint file"
                )
            if not cfg.get("hf_hub"):
                return  # a URL download: open_clip's own cache, not checked here
            repo = cfg["hf_hub"].rstrip("/")
            files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if _offline() and not _cached(repo, files):
            raise TerminalError(
                f"CLIP weights {model}/{pretrained} ({repo}) are not cached and HF_HUB_OFFLINE=1; {fix}"
            )
        return
    if _offline() and not _cached(str(model), ("config.json",)):
        raise TerminalError(f"model {model!r} is not cached and HF_HUB_OFFLINE=1; {fix}")
