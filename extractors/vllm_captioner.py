"""Image captions from a vision-language model served by vLLM (GPU only): the same batch contract as
extractors/captioner.py's `Captioner` (batch["image"] bytes in, batch["caption"] and batch["error"] out), chosen
with `caption_engine: vllm` in an extract entry or `mmfeat caption --caption-engine vllm`.

vLLM is an optional extra (`pip install 'mmfeat[vllm]'`, baked into infra/docker/Dockerfile.gpu-vllm): it pins its
own torch, so the CPU install and `make test` never pull it. The engine starts on the first batch, not in
`__init__`, so the runner's provenance probe (which builds the extractor once in the driver or a GPU task) never
holds a GPU's memory. `load_format="dummy"` gives random weights from the model's config (benchmarks, no download);
the rows then read as untrained.

    >>> chat_prompt("qwen2_vl", "Describe this image.")[:24]
    '<|im_start|>system\\nYou ar'
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
from PIL import Image

from extractors.images import decode_rows
from stores.errors import TerminalError

DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."  # the same default as extractors/captioner.py
VLLM_FIX = (
    "engine 'vllm' needs the vllm extra: pip install 'mmfeat[vllm]' in the GPU worker image "
    "(infra/docker/Dockerfile.gpu-vllm), or use --caption-engine transformers"
)
# model_type (config.json) -> prompt family. One image per prompt, written as vLLM's offline examples do
# (examples/offline_inference/vision_language.py), so the image placeholder is the one the processor expands.
FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "idefics3": "smolvlm",
    "smolvlm": "smolvlm",
    "llava": "llava",
}


def chat_prompt(family: str, question: str) -> str:
    """The single-image user turn plus the assistant's opening for a model family (see `FAMILIES`).

    >>> chat_prompt("llava", "What is it?")
    'USER: <image>\\nWhat is it? ASSISTANT:'
    """
    if family == "qwen2_vl":
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    if family == "smolvlm":
        return f"<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"
    if family == "llava":
        return f"USER: <image>\n{question} ASSISTANT:"
    raise TerminalError(
        f"caption engine vllm has no prompt format for model family {family!r}; use one of "
        f"{sorted(set(FAMILIES.values()))} (model types {sorted(FAMILIES)}) or --caption-engine transformers"
    )


def family_of(model_type: str) -> str:
    """The prompt family of a config.json `model_type`, or a one-line TerminalError naming the supported ones."""
    if model_type not in FAMILIES:
        raise TerminalError(
            f"caption engine vllm does not know model type {model_type!r}; supported: {sorted(FAMILIES)}, "
            "or use --caption-engine transformers"
        )
    return FAMILIES[model_type]


def require_vllm() -> None:
    """A one-line TerminalError naming the fix when vllm is not installed in this environment."""
    if importlib.util.find_spec("vllm") is None:
        raise TerminalError(VLLM_FIX)


class VllmCaptioner:
    """Captions: batch["image"] (encoded bytes) -> batch["caption"] (object array of str) and batch["error"].

    Greedy decoding with `max_new_tokens` (and `min_new_tokens` when set, as `Captioner` takes it); vLLM batches
    and schedules the whole Ray batch itself. A row that cannot be decoded gets caption None and the same reason
    as `Captioner`; an image the model's processor refuses gets "preprocess_error: ...". `dtype` is a torch dtype
    name (default bfloat16); `load_format` "dummy" builds random weights from the config; `hf_overrides` change
    the config (e.g. fewer layers); `engine_kwargs` go to `vllm.LLM` as they are.
    """

    def __init__(
        self,
        model: str,
        prompt: str | None = None,
        *,
        max_new_tokens: int = 40,
        min_new_tokens: int | None = None,
        dtype: str | None = None,
        load_format: str = "auto",
        hf_overrides: dict[str, Any] | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        engine_kwargs: dict[str, Any] | None = None,
        batch_size: int = 64,
        output_column: str = "caption",
        error_column: str = "error",
    ) -> None:
        require_vllm()
        from transformers import AutoConfig

        self.model_id = model
        self.prompt = prompt or DEFAULT_CHAT_PROMPT
        self.dtype = dtype or "bfloat16"
        self.load_format = load_format
        self.batch_size = batch_size  # vLLM schedules its own batches; kept for the runner's interface
        self.output_column = output_column
        self.error_column = error_column
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
        self._text = chat_prompt(family_of(config.model_type), self.prompt)
        self._untrained = load_format == "dummy"
        if self._untrained:
            self._revision = "untrained"
        else:
            from extractors.text import model_revision

            self._revision = model_revision(model)
        self._generate = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
        self._engine_args: dict[str, Any] = {
            "model": model,
            "dtype": self.dtype,
            "load_format": load_format,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "limit_mm_per_prompt": {"image": 1},
            "trust_remote_code": False,
            **({"hf_overrides": hf_overrides} if hf_overrides else {}),
            **(engine_kwargs or {}),
        }
        self._llm: Any = None
        self._sampling: Any = None

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights revision ("untrained" for dummy weights) and every setting that shapes the captions."""
        params: dict[str, Any] = {
            "engine": "vllm",
            "prompt": self.prompt,
            "chat_template": True,
            "dtype": self.dtype,
            "max_new_tokens": self._generate["max_new_tokens"],
            "num_beams": 1,
            "do_sample": False,
        }
        if self._generate["min_new_tokens"] is not None:
            params["min_new_tokens"] = self._generate["min_new_tokens"]
        if self._untrained:
            params |= {"untrained": True, "load_format": self.load_format}
        return {"model": self.model_id, "revision": self._revision, "engine": "vllm", "params": params}

    def _start(self) -> None:
        """The vLLM engine, started once in the worker that captions."""
        from vllm import LLM, SamplingParams

        self._llm = LLM(**self._engine_args)
        self._sampling = SamplingParams(
            temperature=0.0,
            max_tokens=self._generate["max_new_tokens"],
            min_tokens=self._generate["min_new_tokens"] or 0,
        )

    def _captions(self, images: list[Image.Image]) -> list[str]:
        requests = [{"prompt": self._text, "multi_modal_data": {"image": image}} for image in images]
        outputs = self._llm.generate(requests, self._sampling, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = batch["image"]
        n = len(data)
        captions = np.empty(n, dtype=object)
        errors = np.empty(n, dtype=object)
        rows, images = decode_rows(data, errors)
        if rows:
            if self._llm is None:
                self._start()
            try:
                done = self._captions(images)
            except Exception:  # an image the processor refuses: find it, keep the others
                done = []
                for row, image in zip(rows, images, strict=True):
                    try:
                        done.append(self._captions([image])[0])
                    except Exception as exc:
                        errors[row] = f"preprocess_error: {type(exc).__name__}: {exc}"
                        done.append(None)
                if len(done) > 1 and all(caption is None for caption in done):
                    raise  # every row fails alone too: the engine, not the data; the batch fails
            for row, caption in zip(rows, done, strict=True):
                captions[row] = caption
        return {**batch, self.output_column: captions, self.error_column: errors}


# ---- untrained Qwen2-VL folders (tests and benchmarks: no download) ---------------------------------------------

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen2-VL-2B-Instruct's shape: a 675M ViT (14 px patches, 2x2 merge) and a 1.5B Qwen2 decoder.
_QWEN2_VL_2B = {
    "text": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 1536},
}
_QWEN2_VL_TINY = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 0,  # the tokenizer's size
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 32},
}


def untrained_qwen2_vl(
    folder: str, shape: str = "tiny", max_pixels: int = 224 * 224, device: str = "cpu"
) -> str:
    """Write a Qwen2-VL model folder with random (seeded) weights: config, processor (a word-level tokenizer over
    the packaged MiniLM vocabulary plus Qwen's special tokens, padded to the model's vocabulary so every id
    decodes; Qwen's chat template) and safetensors weights. `shape` "tiny" (tests) or "2b" (Qwen2-VL-2B's shape,
    for benchmarks). Both engines load it: transformers from the weights, vLLM with `load_format="dummy"`.
    Returns `folder`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from extractors.text import packaged_minilm_path

    dims = _QWEN2_VL_2B if shape == "2b" else _QWEN2_VL_TINY
    with (packaged_minilm_path() / "vocab.txt").open(encoding="utf-8") as fh:
        words = [line.rstrip("\n") for line in fh]
    size = dims["text"]["vocab_size"] or len(words) + len(_QWEN_SPECIALS)
    words += [f"<unused_{i}>" for i in range(size - len(words) - len(_QWEN_SPECIALS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(_QWEN_SPECIALS),
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=max_pixels),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    text = dims["text"] | {"vocab_size": size}
    config = Qwen2VLConfig(
        text_config={
            **text,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
            if shape == "2b"
            else {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={**dims["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16 if shape == "2b" else torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
