"""Image captions from Hugging Face vision-language models as a Ray Data callable: bytes in, text out.

Two families: chat-template VLMs (Qwen2-VL, SmolVLM, LLaVA, ...; the prompt becomes a user turn) and BLIP-style
captioners (the prompt, if any, is the caption's text prefix). Test models, built from config with untrained weights
and the BERT vocabulary of the packaged MiniLM, so they run offline:
TINY_CAPTIONER (a toy BLIP), TINY_VLM (a toy LLaVA) and BLIP_LARGE_UNTRAINED (BLIP-large's shape, for benchmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from extractors.images import decode_rows
from extractors.text import model_revision, packaged_minilm_path

TINY_CAPTIONER = "test:tiny-captioner"
TINY_VLM = "test:tiny-vlm"
BLIP_LARGE_UNTRAINED = "test:blip-large-untrained"
DEFAULT_CHAT_PROMPT = "Describe this image in one sentence."
_SEED = 0
_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder with cross-attention.
_BLIP_LARGE_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 16,
}
_BLIP_LARGE_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _bert_tokenizer(**kwargs: Any) -> BertTokenizer:
    """The uncased BERT WordPiece tokenizer over the packaged MiniLM's vocab.txt (no download)."""
    with (packaged_minilm_path() / "vocab.txt").open(encoding="utf-8") as fh:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(fh)}
    return BertTokenizer(vocab=vocab, **kwargs)


def untrained_blip(size: str = "tiny") -> tuple[BlipProcessor, BlipForConditionalGeneration]:
    """A BLIP captioner with random (seeded) weights: "tiny" (32 px, 2 layers) or "large" (BLIP-large's shape)."""
    tokenizer = _bert_tokenizer()
    # BLIP's decoder starts from a [DEC] token appended to the BERT vocabulary.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    vision = _BLIP_LARGE_VISION if size == "large" else {**_TINY, "image_size": 32, "patch_size": 16}
    text = _BLIP_LARGE_TEXT if size == "large" else {**_TINY, "max_position_embeddings": 64}
    ids = {"bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id}
    config = BlipConfig(
        vision_config=vision,
        text_config={**text, **ids, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
    )
    side = vision["image_size"]
    processor = BlipProcessor(BlipImageProcessor(size={"height": side, "width": side}), tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = BlipForConditionalGeneration(config)
    return processor, model


def untrained_llava() -> tuple[LlavaProcessor, LlavaForConditionalGeneration]:
    """A toy LLaVA (CLIP ViT + Llama, 32 px) with a chat template, random seeded weights: the chat-VLM code path."""
    tokenizer = _bert_tokenizer(model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        chat_template=_TINY_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_TINY, "image_size": 32, "patch_size": 16},
        text_config={
            "model_type": "llama",
            **_TINY,
            "num_key_value_heads": 1,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlavaForConditionalGeneration(config)
    return processor, model


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Captioner:
    """Captions: batch["image"] (encoded bytes) -> batch["caption"] (object array of str) and batch["error"].

    Generation is batched (left padding for decoder-only models) and greedy unless `do_sample`; the prompt is
    stripped from the output. A row that cannot be decoded or preprocessed gets caption None and a reason.
    `dtype` is a torch dtype name; None means bfloat16 on GPU (float16 where bf16 is missing) and float32 on CPU.
    `processor` and `model` are the loaded Hugging Face objects.
    """

    def __init__(
        self,
        model: str,
        prompt: str | None = None,
        *,
        max_new_tokens: int = 40,
        min_new_tokens: int | None = None,
        num_beams: int = 1,
        do_sample: bool = False,
        dtype: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        output_column: str = "caption",
        error_column: str = "error",
    ) -> None:
        self.model_id = model
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _dtype(dtype, self.device)
        self.output_column = output_column
        self.error_column = error_column
        if model in (TINY_CAPTIONER, BLIP_LARGE_UNTRAINED):
            processor, net = untrained_blip("large" if model == BLIP_LARGE_UNTRAINED else "tiny")
            self._revision = "untrained"
        elif model == TINY_VLM:
            processor, net = untrained_llava()
            self._revision = "untrained"
        else:
            # Explicitly False: a model folder with custom code must never run it (transformers would otherwise
            # ask on stdin, and a "y" there runs arbitrary code).
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
            net = AutoModelForImageTextToText.from_pretrained(
                model, dtype=self.dtype, trust_remote_code=False
            )
            self._revision = model_revision(model)
        self.processor = processor
        self.model = net.to(self.device, self.dtype).eval()
        self._is_blip = net.config.model_type == "blip"
        self._chat = not self._is_blip and getattr(processor, "chat_template", None) is not None
        self.prompt = prompt if not self._chat else (prompt or DEFAULT_CHAT_PROMPT)
        if self._chat:
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            self._text: str | None = processor.apply_chat_template(turn, add_generation_prompt=True)
        else:
            self._text = self.prompt
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not self._is_blip:
            tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        self._generate_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "do_sample": do_sample,
        }
        if min_new_tokens is not None:
            self._generate_kwargs["min_new_tokens"] = min_new_tokens

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights revision and every setting that shapes the captions."""
        return {
            "model": self.model_id,
            "revision": self._revision,
            "params": {
                "prompt": self.prompt,
                "chat_template": self._chat,
                "dtype": str(self.dtype).removeprefix("torch."),
                **self._generate_kwargs,
            },
        }

    def _inputs(self, images: list[Image.Image]) -> Any:
        text = [self._text] * len(images) if self._text is not None else None
        inputs = self.processor(images=images, text=text, return_tensors="pt", padding=True)
        return inputs.to(self.device, dtype=self.dtype)  # BatchFeature casts float tensors only

    def _screened_inputs(
        self, rows: list[int], images: list[Image.Image], errors: np.ndarray
    ) -> tuple[list[int], Any]:
        """Processor inputs for a chunk; an image the processor refuses becomes an error row, not a failed batch."""
        try:
            return rows, self._inputs(images)
        except Exception:
            kept: list[int] = []
            for row, image in zip(rows, images, strict=True):
                try:
                    self._inputs([image])
                    kept.append(row)
                except Exception as exc:
                    errors[row] = f"preprocess_error: {type(exc).__name__}: {exc}"
            by_row = dict(zip(rows, images, strict=True))
            return kept, self._inputs([by_row[row] for row in kept]) if kept else None

    def _generate(self, inputs: Any) -> list[str]:
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._generate_kwargs)
        if "input_ids" not in inputs or self.model.config.is_encoder_decoder:
            new = out  # only generated tokens (and special tokens, skipped when decoding)
        elif self._is_blip:
            new = out[:, inputs["input_ids"].shape[1] - 1 :]  # BLIP drops the prompt's trailing [SEP]
        else:
            new = out[:, inputs["input_ids"].shape[1] :]
        return [caption.strip() for caption in self.processor.batch_decode(new, skip_special_tokens=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = batch["image"]
        n = len(data)
        captions = np.empty(n, dtype=object)
        errors = np.empty(n, dtype=object)
        rows, images = decode_rows(data, errors)
        self._caption(rows, images, captions, errors)
        return {**batch, self.output_column: captions, self.error_column: errors}

    def caption_decoded(self, decoded: np.ndarray, errors: np.ndarray) -> dict[str, np.ndarray]:
        """Captions for pictures the runner's CPU stage decoded (`runner.decode_images`: uint8 RGB [h, w, 3], None
        with a reason in `errors` for a bad one): the same pictures `__call__` decodes, so the same captions."""
        errors = np.array([e if isinstance(e, str) and e else None for e in errors], dtype=object)
        captions = np.empty(len(decoded), dtype=object)
        rows = [i for i, array in enumerate(decoded) if array is not None and errors[i] is None]
        images = [Image.fromarray(np.asarray(decoded[i], np.uint8), "RGB") for i in rows]
        self._caption(rows, images, captions, errors)
        return {self.output_column: captions, self.error_column: errors}

    def _caption(
        self, rows: list[int], images: list[Image.Image], captions: np.ndarray, errors: np.ndarray
    ) -> None:
        for start in range(0, len(rows), self.batch_size):
            end = start + self.batch_size
            kept, inputs = self._screened_inputs(rows[start:end], images[start:end], errors)
            if kept:
                for row, caption in zip(kept, self._generate(inputs), strict=True):
                    captions[row] = caption
