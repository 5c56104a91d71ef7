"""The extraction runner: apply one extractor to the workspace's items with Ray Data and commit as results stream.

    summary = run_extraction(ws, "clip_image", ExtractorSpec(ClipImageEncoder, {"model": TINY_CLIP}), source="image")

Steps: pin the input tables' versions; hash every item's input (image sha256 or text, + model, revision, params)
and keep only items whose hash differs from the stored row (unchanged items cost no model call and no write); read
the inputs in CPU tasks (image bytes taken by row id at the pinned version, then checked with the safe decoder);
run the model in a pool of actors that never claims every CPU; and upsert results in chunks of `chunk_rows` while
Ray is still producing them, so a crash loses at most the chunk in flight. Bad rows go to `extract_failures` with a
reason code and the job goes on; items without input are counted as "no input". `engine="local"` runs the same
stages in this process, without Ray. Each chunk commits under the workspace's write lease after re-checking that
its items are still in the input tables and not on the deny-list (stores/features.py `OutputWriter`): results of
items forgotten while the model ran are dropped and counted as `skipped_forgotten`.

The model's provenance is needed before hashing, so the driver builds the extractor once to read it ("the probe";
on a GPU cluster in a GPU task, since precision depends on the device). A first run, with nothing stored to compare
against, skips the probe: the workers hash the inputs and report their provenance with the results.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from extractors.images import ImageError, decode_image, device_decodable
from extractors.model_pool import active_pool, model_pool
from extractors.ray_start import init_ray
from stores.errors import MmfeatError, TerminalError
from stores.features import (
    CAPTION_FEATURE,
    CAPTIONS,
    FAILURES,
    UNTRAINED,
    OutputWriter,
    delete_items,
    ensure_feature,
    feature_table,
    hashes,
    is_untrained,
    merge_small_fragments,
    refresh_index,
    stored_dim,
)
from stores.workspace import Workspace

Source = Literal["image", "text", "caption"]
TEXT_FIELDS = ("title", "text")


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build an extractor inside a worker: its class and constructor arguments (models are never pickled).
    The class may be named "module:Class" and is then imported only where it is built or inspected: a Ray run's
    driver, whose models run in actors, never imports torch or the model libraries."""

    cls: type | str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The class as "module:Class", the same for a class and its name."""
        return self.cls if isinstance(self.cls, str) else f"{self.cls.__module__}:{self.cls.__qualname__}"

    @property
    def name(self) -> str:
        return self.path.rsplit(":", 1)[-1]

    def resolve(self) -> type:
        """The class (imports its module when the spec names it)."""
        if not isinstance(self.cls, str):
            return self.cls
        module, name = self.cls.split(":", 1)
        return getattr(importlib.import_module(module), name)

    def traits(self) -> frozenset[str]:
        """Which input paths the class takes (see `TRAITS`)."""
        cls = self.resolve()
        return frozenset(t for t in TRAITS if callable(getattr(cls, t, None)))

    def build(self, **overrides: Any) -> Any:
        """The extractor, built where it runs. Loading a model is the model boundary: a failure here is the
        configuration's (weights missing offline, a bad id), so it is a TerminalError naming the fix."""
        kwargs = self.kwargs | overrides
        try:
            return self.resolve()(**kwargs)
        except MmfeatError:
            raise
        except Exception as exc:
            model = kwargs.get("model")
            raise TerminalError(
                f"cannot load {self.name} model {model!r}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; pass --model tiny-test (untrained, "
                "for tests) or a local path, or download the weights while online"
            ) from exc

    def takes(self, name: str) -> bool:
        return name in inspect.signature(self.resolve()).parameters


# Methods that choose an extractor's input path: pictures decoded in the CPU stage (`caption_decoded`), or uint8
# pixels prepared there (`encode_prepared`).
TRAITS = ("caption_decoded", "encode_prepared")


@dataclass
class ExtractSummary:
    """What one run did. eligible = skipped + known_failed + done + failed + skipped_forgotten;
    items = eligible + no_input. skipped_forgotten: results dropped at commit because their item was deleted or
    forgotten while the model ran."""

    feature: str
    table: str
    items: int = 0
    eligible: int = 0
    done: int = 0
    skipped: int = 0
    known_failed: int = 0
    failed: int = 0
    no_input: int = 0
    pruned: int = 0
    skipped_forgotten: int = 0
    model_calls: int = 0
    engine: str = "local"
    seconds: float = 0.0
    index: str = "none"
    inputs: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    # Seconds per stage: "read" (the input scan and the driver producing batches), "encode" (inside the model,
    # summed over batches and actors), "write" (chunk commits), "loop" (wall time from first batch asked to last
    # commit), "first_batch" (loop start to the first result: the workers' start). encode + write above
    # loop - first_batch means the model ran while the driver read and wrote.
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Items processed (written or failed) per second of the whole run."""
        return (self.done + self.failed) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return vars(self) | {"throughput": round(self.throughput, 2)}


# ---- inputs ------------------------------------------------------------------------------------------------------


def compose_text(parts: list[str | None]) -> str:
    """Join text fields as "title. text": blanks dropped, no doubled full stop after a field ending in . ! or ?"""
    out = ""
    for part in (p.strip() for p in parts if p is not None):
        if part:
            out = part if not out else out + (" " if out[-1] in ".!?" else ". ") + part
    return out


def _inputs(
    ws: Workspace, source: Source, fields: tuple[str, ...], versions: dict[str, int]
) -> tuple[pa.Table, int]:
    """Eligible items of the pinned tables: item_id, digest of the input, and `_rowid` (images) or `text`.
    Also returns the number of items."""
    item_ids = ws.read("items", columns=["item_id"], version=versions["items"])["item_id"]
    if source == "image":
        images = ws.dataset("item_images", versions["item_images"]).to_table(
            columns=["item_id", "sha256"], with_row_id=True
        )
        images = images.filter(pc.is_in(images["item_id"], item_ids))
        table = pa.table(
            {"item_id": images["item_id"], "digest": images["sha256"], "_rowid": images["_rowid"]}
        )
        return table, len(item_ids)
    if source == "text":
        rows = ws.read("items", columns=["item_id", *fields], version=versions["items"])
        texts, ids = _texts(rows, fields), rows["item_id"].to_pylist()
    else:
        rows = ws.read(CAPTIONS.name, columns=["item_id", "caption"], version=versions[CAPTIONS.name])
        present = set(item_ids.to_pylist())
        pairs = [
            (i, (c or "").strip())
            for i, c in zip(rows["item_id"].to_pylist(), rows["caption"].to_pylist(), strict=True)
        ]
        ids, texts = [i for i, _ in pairs if i in present], [c for i, c in pairs if i in present]
    keep = [i for i, text in enumerate(texts) if text]
    table = pa.table(
        {
            "item_id": pa.array([ids[i] for i in keep], pa.string()),
            "digest": pa.array([hashlib.sha256(texts[i].encode()).hexdigest() for i in keep], pa.string()),
            "text": pa.array([texts[i] for i in keep], pa.string()),
        }
    )
    return table, len(item_ids)


def read_images(batch: pa.Table, uri: str, version: int, storage_options: dict[str, str]) -> pa.Table:
    """CPU stage: take the image bytes of `batch`'s rows by row id from the pinned `item_images` version."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options or None)
    taken = ds._take_rows(batch["_rowid"].to_pylist(), columns=["item_id", "image"])
    by_id = dict(zip(taken["item_id"].to_pylist(), range(taken.num_rows), strict=True))
    order = pa.array([by_id[i] for i in batch["item_id"].to_pylist()], pa.int64())
    return batch.drop_columns(["_rowid"]).append_column("image", taken["image"].take(order))


def check_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU stage: decode every image with the safe decoder; one that fails gets its reason and no bytes, so the
    model never sees it."""
    images = batch["image"]
    errors = np.full(len(images), "", dtype=object)
    for i, data in enumerate(images):
        try:
            decode_image(bytes(data))
        except ImageError as exc:
            errors[i] = str(exc)
            images[i] = None
    return {**batch, "image": images, "error": errors}


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU stage for a model that takes decoded pictures (`caption_decoded`, e.g. Captioner): each image decoded
    once here with the safe decoder to uint8 RGB [h, w, 3] in `decoded` (None with the reason in `error` for one
    that fails); the encoded bytes are dropped, so the model decodes nothing."""
    images = batch["image"]
    decoded = np.full(len(images), None, dtype=object)
    errors = np.full(len(images), "", dtype=object)
    for i, data in enumerate(images):
        if data is None:
            errors[i] = "missing_image: no image bytes"
            continue
        try:
            decoded[i] = np.asarray(decode_image(bytes(data)), dtype=np.uint8)
        except ImageError as exc:
            errors[i] = str(exc)
    return {name: v for name, v in batch.items() if name != "image"} | {"decoded": decoded, "error": errors}


def decoded_pipeline(traits: frozenset[str], source: Source) -> bool:
    """Whether images for an extractor with `traits` (ExtractorSpec.traits) are decoded in the CPU stage and
    reach the model as RGB arrays: a model that takes decoded pictures (`caption_decoded`)."""
    return source == "image" and "caption_decoded" in traits


def pixel_pipeline(traits: frozenset[str], source: Source) -> bool:
    """Whether images for an extractor with `traits` are decoded, resized and cropped in the CPU stage and reach
    the model as uint8 pixels: an image encoder that takes prepared pixels (`encode_prepared`, ClipImageEncoder)."""
    return source == "image" and "encode_prepared" in traits


def decode_route(data: bytes | None, device_decode: bool) -> Literal["device", "cpu"]:
    """Where one image is decoded: on the model's GPU (nvJPEG) when the run decodes there and the bytes are a
    complete, upright RGB/grey JPEG; everywhere else on the CPU, whose errors are the quarantine reasons."""
    return "device" if device_decode and device_decodable(data) else "cpu"


def prepare_pixels(
    batch: dict[str, np.ndarray], preprocess_cfg: dict[str, Any], device_decode: bool = False
) -> dict[str, np.ndarray]:
    """CPU stage of the pixel pipeline: each image decoded with the safe decoder, resized and center-cropped
    exactly as open_clip does (PIL), as uint8 `pixels` [n, H, W, 3]; a bad one gets its reason and zeros. With
    `device_decode`, JPEGs the GPU can take keep their bytes in `jpeg` and are decoded by the model stage."""
    from extractors.pixels import pixel_transform, prepare_image  # PIL and NumPy: this task imports no torch

    transform = pixel_transform(preprocess_cfg)
    if transform is None:  # a resize mode only open_clip's transform does: this task imports torch after all
        from extractors.clip import pixel_transform as open_clip_transform

        transform = open_clip_transform(preprocess_cfg)
    size = preprocess_cfg["size"]
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    images = batch["image"]
    n = len(images)
    pixels = np.zeros((n, h, w, 3), np.uint8)
    errors = np.full(n, "", dtype=object)
    # Bytes for the GPU, b"" elsewhere, and a flag: Ray's Arrow round trip does not keep None in a bytes column.
    jpegs = np.full(n, b"", dtype=object)
    on_device = np.zeros(n, dtype=bool)
    for i, data in enumerate(images):
        if decode_route(data, device_decode) == "device":
            jpegs[i], on_device[i] = bytes(data), True
            continue
        array, errors[i] = prepare_image(data, transform)
        if array is not None:
            pixels[i] = array
    out = {name: v for name, v in batch.items() if name != "image"} | {"pixels": pixels, "error": errors}
    return out | ({"jpeg": jpegs, "on_device": on_device} if device_decode else {})


# ---- the model stage ---------------------------------------------------------------------------------------------


def output_params(
    provenance: dict[str, Any], source: Source, fields: tuple[str, ...], untrained_input: bool = False
) -> str:
    """The `params` JSON stored with each row and hashed into `input_hash`: the model's settings plus the input.
    `untrained_input` (captions written by an untrained model) is recorded as `input.untrained`, so a feature
    embedded from them reads as untrained even when its own encoder is real (stores.features.is_untrained)."""
    params = dict(provenance.get("params") or {})
    params["input"] = {"source": source, "fields": list(fields)} if source == "text" else {"source": source}
    if untrained_input:
        params["input"][UNTRAINED] = True
    return json.dumps(params, sort_keys=True, default=str)


def untrained_captions(ws: Workspace, source: Source, versions: dict[str, int]) -> bool:
    """Whether any caption at the pinned version came from untrained weights (only for `source` "caption"):
    then everything embedded from the captions is marked untrained too."""
    if source != "caption":
        return False
    rows = ws.read(CAPTIONS.name, columns=["revision", "params"], version=versions[CAPTIONS.name])
    distinct = rows.group_by(["revision", "params"]).aggregate([])
    return any(
        is_untrained(r, p)
        for r, p in zip(distinct["revision"].to_pylist(), distinct["params"].to_pylist(), strict=True)
    )


def input_hash(source: Source, digest: str, provenance: dict[str, Any], params_json: str) -> str:
    """sha256 over the input's digest, model, revision and params: equal hash, equal output."""
    parts = (source, digest, str(provenance["model"]), str(provenance["revision"]), params_json)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class ModelStage:
    """Wraps an extractor for `map_batches`: builds it once per worker (or takes a built one), feeds it only the
    rows that still have input, and returns the output, `error`, `called` (the model saw the row), each row's
    `input_hash` under this worker's model, and the worker's provenance in the first row of every batch."""

    def __init__(
        self,
        spec: ExtractorSpec | None,
        source: Source,
        fields: tuple[str, ...],
        output: str,
        threads: int | None = None,
        expect: str | None = None,
        model: Any = None,
        untrained_input: bool = False,
    ):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.extractor = model if model is not None else spec.build()
        self.source, self.output = source, output
        pixels = source == "image" and callable(getattr(self.extractor, "encode_prepared", None))
        self.input_column = "pixels" if pixels else "image" if source == "image" else "text"
        self.provenance = dict(self.extractor.provenance)
        self.params_json = output_params(self.provenance, source, fields, untrained_input)
        self.stamp = json.dumps({"provenance": self.provenance, "params": self.params_json}, default=str)
        got = provenance_json(self.provenance)
        if expect is not None and got != expect:
            raise RuntimeError(
                f"this worker's model reports {got} but the driver hashed inputs with {expect}; run the driver "
                "where the workers' hardware is (so both pick the same device and precision)"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        out = apply_model(self.extractor, batch, self.input_column, self.output)
        out["input_hash"] = np.array(
            [input_hash(self.source, d, self.provenance, self.params_json) for d in batch["digest"]],
            dtype=object,
        )
        stamp = np.full(len(out["item_id"]), None, dtype=object)
        stamp[:1] = self.stamp
        out["provenance"] = stamp
        seconds = np.zeros(len(out["item_id"]), np.float64)
        seconds[:1] = time.perf_counter() - started  # this batch's time in the model, for summary.stages
        out["seconds"] = seconds
        return out


def apply_model(
    extractor: Any, batch: dict[str, np.ndarray], input_column: str, output: str
) -> dict[str, np.ndarray]:
    """Run `extractor` on the rows of `batch` that have no error yet; every row comes back, with `called` set
    where the model saw it."""
    ids = batch["item_id"]
    n = len(ids)
    errors = _errors(batch["error"]) if "error" in batch else np.full(n, "", dtype=object)
    ready = errors == ""
    if "decoded" in batch and callable(getattr(extractor, "caption_decoded", None)):  # from `decode_images`
        out = extractor.caption_decoded(batch["decoded"], errors)
        errors = _errors(out["error"])
        return {"item_id": ids, output: out[output], "error": errors, "called": ready}
    if input_column == "pixels":  # prepared by `prepare_pixels`: the model takes the whole batch
        jpegs = None
        if "on_device" in batch:
            jpegs = [
                bytes(b) if flag else None for b, flag in zip(batch["jpeg"], batch["on_device"], strict=True)
            ]
        vectors, errors = extractor.encode_prepared(batch["pixels"], errors, jpegs)
        errors = _errors(errors)
        return {"item_id": ids, output: vectors, "error": errors, "called": ready & (errors == "")}
    if output == "vector":
        result = np.zeros((n, int(extractor.provenance["dim"])), np.float32)
    else:
        result = np.full(n, None, dtype=object)
    if ready.any():
        out = extractor({input_column: batch[input_column][ready]})
        errors[ready] = _errors(out["error"])
        result[ready] = out[output]
    return {"item_id": ids, output: result, "error": errors, "called": ready}


def _errors(values: np.ndarray) -> np.ndarray:
    """Errors as strings, "" for none: None becomes null and then NaN on its way through Arrow."""
    return np.array([v if isinstance(v, str) else "" for v in values], dtype=object)


def provenance_json(provenance: dict[str, Any]) -> str:
    return json.dumps(provenance, sort_keys=True, default=str)


# ---- the run -----------------------------------------------------------------------------------------------------


def run_extraction(
    ws: Workspace,
    feature: str,
    extractor: ExtractorSpec,
    *,
    source: Source,
    fields: tuple[str, ...] = TEXT_FIELDS,
    chunk_rows: int = 1024,
    batch_size: int = 64,
    concurrency: int | None = None,
    threads: int | None = None,
    engine: Literal["ray", "local"] = "ray",
    retry_failed: bool = False,
    overwrite: bool = False,
    index_min_rows: int | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Extract `feature` for every item whose input changed since the last run; see the module docstring.

    `feature` "caption" writes the `captions` table (the extractor outputs `caption`); any other name writes the
    vector table `feat_<feature>`. `source` picks the input: item images, the item text `fields` joined as
    "title. text", or the captions (when any of them came from untrained weights, the rows record
    `input.untrained` in their params, so the feature lists as untrained whatever its own encoder).
    `concurrency` is the number of model actors (default: one per GPU, else one fewer than the CPUs, at least
    one); a CPU job that fits in one batch runs in this process on the model loaded to read its provenance.
    `threads` is the torch threads of each CPU actor (default: the model pool's `slot_threads`, the CPUs its
    actors leave, 2 on a 2-CPU machine; 1 for the Ray Data path, the CPU each actor claims) or, with
    `engine="local"`, of this process (default: torch's).
    """
    started = time.perf_counter()
    output = "caption" if feature == CAPTION_FEATURE else "vector"
    table_name = feature_table(feature)
    if source == "text":
        _check_fields(fields)
    needed = {"image": ["items", "item_images"], "text": ["items"], "caption": ["items", CAPTIONS.name]}
    versions = {name: ws.version(name) for name in needed[source]}
    missing = [name for name, v in versions.items() if v is None]
    if missing:
        fix = "run `mmfeat caption` first" if CAPTIONS.name in missing else "ingest a source first"
        raise ValueError(f"cannot extract {feature!r} from {source}: {missing} missing in {ws.uri}; {fix}")
    summary = ExtractSummary(feature, table_name, inputs=dict(versions))
    untrained_input = untrained_captions(ws, source, versions)
    # Text streams: its rows are read in batches while earlier batches are encoded and written (TextStream).
    stream = source == "text"
    read_started = time.perf_counter()
    if stream:
        eligible, summary.items = None, ws.dataset("items", versions["items"]).count_rows()
    else:
        eligible, summary.items = _inputs(ws, source, fields, versions)
        summary.eligible, summary.no_input = eligible.num_rows, summary.items - eligible.num_rows
    summary.stages = {"read": time.perf_counter() - read_started, "encode": 0.0, "write": 0.0}
    stored, failed = hashes(ws, table_name), hashes(ws, FAILURES.name, feature)

    use_ray, use_gpu = engine == "ray", False
    if use_ray:
        use_gpu = init_ray()
    # Inside `model_pool()` (a refresh) the model runs on the pool's actors, started once per model per refresh;
    # a text run outside one takes a pool of its own, which consumes the driver's stream of batches.
    with ExitStack() as scope:
        pool = active_pool() if use_ray else None
        if use_ray and stream and pool is None:
            pool = scope.enter_context(model_pool())
        return _run(ws, summary, extractor, source, fields, output, versions, eligible, stored, failed, pool,
                    use_ray, use_gpu, stream, started, chunk_rows=chunk_rows, batch_size=batch_size,
                    concurrency=concurrency, threads=threads, retry_failed=retry_failed, overwrite=overwrite,
                    index_min_rows=index_min_rows, progress=progress, untrained_input=untrained_input)  # fmt: skip


def _run(
    ws: Workspace,
    summary: ExtractSummary,
    extractor: ExtractorSpec,
    source: Source,
    fields: tuple[str, ...],
    output: str,
    versions: dict[str, int],
    eligible: pa.Table | None,
    stored: dict[str, str],
    failed: dict[str, str],
    pool: Any,
    use_ray: bool,
    use_gpu: bool,
    stream: bool,
    started: float,
    *,
    chunk_rows: int,
    batch_size: int,
    concurrency: int | None,
    threads: int | None,
    retry_failed: bool,
    overwrite: bool,
    index_min_rows: int | None,
    progress: bool,
    untrained_input: bool,
) -> ExtractSummary:
    """run_extraction after the inputs are pinned and the engine chosen: probe, reconcile, run, commit."""
    feature, table_name, stages = summary.feature, summary.table, summary.stages
    provenance: dict[str, Any] | None = None
    model = None
    # With nothing stored there is nothing to compare, and every eligible item is to do whatever the model: the
    # workers hash the inputs themselves, and the driver loads no model (that is most of a first run's overhead).
    # The pixel pipeline's CPU stage needs the model's preprocessing config before any worker starts.
    preprocess_cfg: dict[str, Any] | None = None
    if pool is not None:  # the actor that will run the model loads it now and says what it is
        provenance, preprocess_cfg, traits = pool.facts(extractor, use_gpu, threads)
    else:
        traits = extractor.traits()
    pixels, decoded = pixel_pipeline(traits, source), decoded_pipeline(traits, source)
    if pool is None and (pixels or stream or stored or failed or overwrite or not use_ray
                         or eligible.num_rows <= batch_size):  # fmt: skip
        provenance, model, preprocess_cfg = _probe(extractor, use_gpu, local=not use_ray)
        if not use_ray and threads:
            import torch

            torch.set_num_threads(threads)
    if provenance is not None and output == "vector":
        had = stored_dim(ws, feature)
        ensure_feature(
            ws, feature, int(provenance["dim"]), overwrite
        )  # a width clash fails here, before any work
        if had not in (None, int(provenance["dim"])):
            stored = {}  # the old table was dropped
    todo = eligible
    if provenance is not None and not stream:
        todo = _reconcile(ws, summary, eligible, provenance, source, fields, stored, failed, retry_failed,
                          untrained_input)  # fmt: skip
    # A job that fits in one batch gains nothing from a pipeline: run it on the model the probe loaded here.
    if use_ray and model is not None and not stream and todo.num_rows <= batch_size:
        use_ray = False
    summary.engine = "ray" if use_ray else "local"
    # Commits re-check the inputs and the deny-list: an image forget also voids what was derived from the image.
    deny = ("item",) if source == "text" else ("item", "image")
    writer = OutputWriter(ws, feature, set(stored), set(failed), overwrite, tuple(versions), deny)
    if provenance is not None:
        summary.provenance = provenance
        writer.start(provenance["model"], provenance["revision"], output_params(provenance, source, fields,
                     untrained_input), provenance.get("dim"))  # fmt: skip
    text = None
    if stream:
        text = TextStream(ws, summary, writer, fields, versions["items"], batch_size, provenance, stored, failed,
                          retry_failed, output_params(provenance, source, fields, untrained_input))  # fmt: skip
    if stream or todo.num_rows:
        bar = tqdm(total=summary.items if stream else todo.num_rows, desc=feature, unit="item",
                   disable=not progress)  # fmt: skip
        if pool is not None:
            expect = provenance_json(provenance) if provenance is not None else None
            stage = partial(
                ModelStage, None, source, fields, output, expect=expect, untrained_input=untrained_input
            )
            inputs = _timed(
                iter(text) if stream else
                _pool_inputs(ws, todo, source, versions, batch_size, preprocess_cfg, use_gpu, decoded), stages
            )  # fmt: skip
            count = concurrency or _default_actors(use_gpu)
            batches = pool.run(extractor, stage, inputs, count, use_gpu, threads)
        elif use_ray:
            expect = provenance_json(provenance) if provenance is not None else None
            batches = _ray_batches(ws, extractor, todo, source, fields, output, versions, batch_size, concurrency,
                                   threads, use_gpu, expect, untrained_input, preprocess_cfg)  # fmt: skip
        else:
            stage = ModelStage(None, source, fields, output, model=model, untrained_input=untrained_input)
            device_decode = pixels and str(getattr(model, "device", "cpu")).startswith("cuda")
            inputs = _timed(
                iter(text) if stream else
                _local_inputs(ws, todo, source, versions, batch_size, preprocess_cfg, device_decode, decoded),
                stages,
            )  # fmt: skip
            batches = (stage(batch) for batch in inputs)
        pending: list[dict[str, np.ndarray]] = []
        rows = 0
        loop_started = time.perf_counter()
        for batch in batches:
            stages.setdefault("first_batch", time.perf_counter() - loop_started)  # the workers' start
            if writer.spec is None:  # the driver loaded no model: the workers say what they ran
                stamp = json.loads(batch["provenance"][0])
                summary.provenance = prov = stamp["provenance"]
                writer.start(prov["model"], prov["revision"], stamp["params"], prov.get("dim"))
            pending.append(batch)
            rows += len(batch["item_id"])
            summary.model_calls += int(np.count_nonzero(batch["called"]))
            bar.update(len(batch["item_id"]))
            stages["encode"] += float(np.sum(batch["seconds"]))
            if rows >= chunk_rows:
                _flush(writer, pending, output, summary)
                pending, rows = [], 0
                stages.setdefault("first_write", time.perf_counter() - loop_started)
        _flush(writer, pending, output, summary)
        stages.setdefault("first_write", time.perf_counter() - loop_started)
        stages["loop"] = time.perf_counter() - loop_started
        if text is not None and text.reads:
            # When the last input batch was read, after the loop started: above "first_write", reading overlapped
            # the commits (and the model, which ran before them).
            stages["last_read"] = text.reads[-1][0] - loop_started
        summary.skipped_forgotten = writer.skipped_forgotten
        bar.close()
        merge_small_fragments(ws, table_name)
    if output == "vector" and ws.exists(table_name):
        summary.index = refresh_index(ws, feature, **({"min_rows": index_min_rows} if index_min_rows else {}))
    summary.seconds = time.perf_counter() - started
    return summary


def _texts(rows: pa.Table | pa.RecordBatch, fields: tuple[str, ...]) -> list[str]:
    """Each row's text input: its `fields` joined by `compose_text` ("" when all are blank)."""
    return [compose_text(list(values)) for values in zip(*(rows[f].to_pylist() for f in fields), strict=True)]


def _triage(
    current: dict[str, str], stored: dict[str, str], failed: dict[str, str], retry_failed: bool
) -> tuple[list[str], list[str], list[bool], int]:
    """Decisions for items with input hashes `current`: outputs gone stale (their recorded failure matches the
    input, a different output is stored), failures cleared (the stored output matches the input), whether each
    item is to do (its hash matches neither its output nor, unless `retry_failed`, its failure), and how many
    are skipped (output current)."""
    stale = [i for i, h in current.items() if failed.get(i) == h and i in stored and stored[i] != h]
    cleared = [i for i, h in current.items() if i in failed and stored.get(i) == h]
    todo = [stored.get(i) != h and (retry_failed or failed.get(i) != h) for i, h in current.items()]
    skipped = sum(stored.get(i) == h for i, h in current.items())
    return stale, cleared, todo, skipped


def _reconcile(
    ws: Workspace,
    summary: ExtractSummary,
    eligible: pa.Table,
    provenance: dict[str, Any],
    source: Source,
    fields: tuple[str, ...],
    stored: dict[str, str],
    failed: dict[str, str],
    retry_failed: bool,
    untrained_input: bool = False,
) -> pa.Table:
    """Hash every eligible item's input under `provenance`, tidy what earlier (possibly killed) runs left, and
    return the items to do: those whose hash matches neither their stored output nor (unless `retry_failed`)
    their recorded failure."""
    params_json = output_params(provenance, source, fields, untrained_input)
    ids = eligible["item_id"].to_pylist()
    current = {i: input_hash(source, d, provenance, params_json) for i, d in zip(ids, eligible["digest"].to_pylist(), strict=True)}  # fmt: skip
    table_name, feature = summary.table, summary.feature
    # Each item keeps its output or its failure, whichever matches its current input; rows of items without input
    # go. After a clean run none of this finds anything, and nothing is written.
    summary.pruned = delete_items(ws, table_name, [i for i in stored if i not in current])
    stale, cleared, todo, summary.skipped = _triage(current, stored, failed, retry_failed)
    cleared += [i for i in failed if i not in current]
    delete_items(ws, table_name, stale)
    delete_items(ws, FAILURES.name, cleared, feature)
    for i in [*stale, *(i for i in stored if i not in current)]:
        stored.pop(i, None)
    for i in cleared:
        failed.pop(i, None)
    summary.known_failed = summary.eligible - summary.skipped - sum(todo)
    return eligible.filter(pa.array(todo, pa.bool_()))


class TextStream:
    """The text path's inputs, read while the model runs: the pinned `items` version scanned in row batches of
    `batch_size`, each batch's text composed, hashed under `provenance` and reconciled as `_reconcile` does for
    a whole table (stale outputs and matched failures tidied per batch), yielding only the items to do. When the
    scan ends, outputs and failures of items that no longer have input go. Memory: one scan batch plus the hash
    maps `stored` and `failed`. `reads` keeps (start, end) perf_counter seconds of each batch read."""

    def __init__(
        self,
        ws: Workspace,
        summary: ExtractSummary,
        writer: OutputWriter,
        fields: tuple[str, ...],
        version: int,
        batch_size: int,
        provenance: dict[str, Any],
        stored: dict[str, str],
        failed: dict[str, str],
        retry_failed: bool,
        params_json: str,
    ):
        self.ws, self.summary, self.writer, self.fields = ws, summary, writer, fields
        self.version, self.batch_size, self.provenance = version, batch_size, provenance
        self.stored, self.failed, self.retry_failed, self.params_json = (
            stored,
            failed,
            retry_failed,
            params_json,
        )
        self.reads: list[tuple[float, float]] = []

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        summary, stored, failed = self.summary, self.stored, self.failed
        seen: set[str] = set()
        scan = self.ws.dataset("items", self.version).to_batches(
            columns=["item_id", *self.fields], batch_size=self.batch_size
        )
        while True:
            started = time.perf_counter()
            rows = next(scan, None)
            if rows is None:
                break
            texts = _texts(rows, self.fields)
            pairs = [(i, t) for i, t in zip(rows["item_id"].to_pylist(), texts, strict=True) if t]
            summary.no_input += rows.num_rows - len(pairs)
            summary.eligible += len(pairs)
            digests = [hashlib.sha256(t.encode()).hexdigest() for _, t in pairs]
            current = {i: input_hash("text", d, self.provenance, self.params_json)
                       for (i, _), d in zip(pairs, digests, strict=True)}  # fmt: skip
            seen.update(current)
            stale, cleared, todo, skipped = _triage(current, stored, failed, self.retry_failed)
            delete_items(self.ws, summary.table, stale)
            delete_items(self.ws, FAILURES.name, cleared, summary.feature)
            for i in stale:
                stored.pop(i, None)
                self.writer.stored.discard(i)
            for i in cleared:
                failed.pop(i, None)
                self.writer.failed.discard(i)
            summary.skipped += skipped
            summary.known_failed += len(pairs) - skipped - sum(todo)
            keep = [k for k, t in enumerate(todo) if t]
            self.reads.append((started, time.perf_counter()))
            if keep:
                yield {
                    "item_id": np.array([pairs[k][0] for k in keep], dtype=object),
                    "digest": np.array([digests[k] for k in keep], dtype=object),
                    "text": np.array([pairs[k][1] for k in keep], dtype=object),
                }
        gone = [i for i in stored if i not in seen]
        summary.pruned = delete_items(self.ws, summary.table, gone)
        delete_items(self.ws, FAILURES.name, [i for i in failed if i not in seen], summary.feature)
        for i in gone:
            self.writer.stored.discard(i)
        self.writer.failed.difference_update(i for i in list(self.writer.failed) if i not in seen)


def _check_fields(fields: tuple[str, ...]) -> None:
    valid = ["title", "text", "attributes"]
    bad = [f for f in fields if f not in valid]
    if bad or not fields:
        raise ValueError(
            f"text fields {bad or list(fields)} are not item text columns; choose from {valid}, "
            "e.g. --fields title,text"
        )


def _probe(
    extractor: ExtractorSpec, use_gpu: bool, local: bool
) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """Build the extractor where its provenance (model, revision, dim, params) is what the workers will report:
    here on the CPU for CPU workers (the model is kept for small jobs), in a GPU task for GPU workers (precision
    and dtype depend on the device), here on any device for the local engine. Also returns the image
    preprocessing config of an image encoder (None for others)."""
    if use_gpu:
        import ray

        provenance, cfg = ray.get(ray.remote(num_gpus=1, num_cpus=1)(_facts_of).remote(extractor))
        return provenance, None, cfg
    kwargs = {"device": "cpu"} if not local and extractor.takes("device") else {}
    model = extractor.build(**kwargs)
    return dict(model.provenance), model, getattr(model, "preprocess_cfg", None)


def _facts_of(extractor: ExtractorSpec) -> tuple[dict[str, Any], dict[str, Any] | None]:
    model = extractor.build()
    return dict(model.provenance), getattr(model, "preprocess_cfg", None)


def _quiet_ray_data() -> None:
    """Ray Data without its progress bars and start banners (the runner has its own bar). Imported only by the
    path that uses Ray Data: a refresh's model pool does not."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # It would warn "progress bars disabled" on every run; the runner has its own.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _blocks(todo: pa.Table, rows: int) -> list[pa.Table]:
    return [todo.slice(start, rows) for start in range(0, todo.num_rows, rows)]


def _default_actors(use_gpu: bool) -> int:
    """One model actor per GPU, else one fewer than the CPUs: a pool that takes every CPU starves its own
    read and decode tasks."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        return int(resources.get("GPU", 0))
    return max(1, int(resources.get("CPU", 1)) - 1)


def _ray_batches(
    ws: Workspace,
    extractor: ExtractorSpec,
    todo: pa.Table,
    source: Source,
    fields: tuple[str, ...],
    output: str,
    versions: dict[str, int],
    batch_size: int,
    concurrency: int | None,
    threads: int | None,
    use_gpu: bool,
    expect: str | None,
    untrained_input: bool = False,
    preprocess_cfg: dict[str, Any] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Read (and for images, decode-check, or with `preprocess_cfg` decode to uint8 pixels) in CPU tasks, run
    the model in an actor pool, stream batches back. On a GPU cluster the pixel stage leaves complete JPEGs to
    the model's GPU (nvJPEG) and the CPU tasks prepare the rest."""
    import ray

    actors = concurrency or _default_actors(use_gpu)
    if not use_gpu and threads is None:
        # As many torch threads as CPUs the actor claims. More oversubscribes: on a busy 2-core machine two
        # threads made a small model 30x slower than one (OpenMP workers spinning for cores others hold).
        threads = 1
    _quiet_ray_data()
    ds = ray.data.from_arrow(_blocks(todo, batch_size))
    if source == "image":
        where = {"uri": ws.table_uri("item_images"), "version": versions["item_images"],
                 "storage_options": ws.storage_options}  # fmt: skip
        ds = ds.map_batches(read_images, batch_format="pyarrow", batch_size=None, num_cpus=1, fn_kwargs=where)
        if preprocess_cfg is not None:
            prep = {"preprocess_cfg": preprocess_cfg, "device_decode": use_gpu}
            ds = ds.map_batches(
                prepare_pixels, batch_format="numpy", batch_size=None, num_cpus=1, fn_kwargs=prep
            )
        else:
            ds = ds.map_batches(check_images, batch_format="numpy", batch_size=None, num_cpus=1)
    stage = {"spec": extractor, "source": source, "fields": fields, "output": output,
             "threads": None if use_gpu else threads, "expect": expect,
             "untrained_input": untrained_input}  # fmt: skip
    ds = ds.map_batches(
        ModelStage,
        batch_format="numpy",
        batch_size=batch_size,
        fn_constructor_kwargs=stage,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


def _local_inputs(
    ws: Workspace,
    todo: pa.Table,
    source: Source,
    versions: dict[str, int],
    batch_size: int,
    preprocess_cfg: dict[str, Any] | None = None,
    device_decode: bool = False,
    decoded: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray pipeline's read and decode stages in this process, one batch at a time."""
    where = _images_at(ws, versions) if source == "image" else None
    for block in _blocks(todo, batch_size):
        yield prepare_block(block, source, where, preprocess_cfg, device_decode, decoded)


def _images_at(ws: Workspace, versions: dict[str, int]) -> tuple[str, int, dict[str, str]]:
    """Where the pinned `item_images` version is: uri, version, storage options (`read_images`'s arguments)."""
    return ws.table_uri("item_images"), versions["item_images"], ws.storage_options


def prepare_block(
    block: pa.Table,
    source: Source,
    where: tuple[str, int, dict[str, str]] | None,
    preprocess_cfg: dict[str, Any] | None,
    device_decode: bool,
    decoded: bool = False,
) -> dict[str, np.ndarray]:
    """The read and decode stages for one block of the items to do: image bytes taken from `where` (uri,
    version, storage options of `item_images`) and checked, decoded (`decoded`) or prepared as pixels; text
    passes as is."""
    if source == "image":
        block = read_images(block, *where)
    batch = {name: block[name].to_numpy(zero_copy_only=False) for name in block.column_names}
    if source != "image":
        return batch
    if preprocess_cfg is not None:
        return prepare_pixels(batch, preprocess_cfg, device_decode)
    return decode_images(batch) if decoded else check_images(batch)


SMALL_JOB_BLOCKS = 4  # image jobs of at most this many batches decode in the driver (see _pool_inputs)


def _pool_inputs(
    ws: Workspace,
    todo: pa.Table,
    source: Source,
    versions: dict[str, int],
    batch_size: int,
    preprocess_cfg: dict[str, Any] | None,
    device_decode: bool,
    decoded: bool = False,
) -> Iterator[Any]:
    """Inputs for the model pool: text batches as they are, image blocks as the ObjectRefs of CPU tasks that
    read and decode them (the pool's window bounds how many run ahead of the model). A job of a few blocks is
    read and decoded here: starting a worker process for the tasks (Python, Ray, Arrow, Lance, PIL) costs more CPU
    than decoding `SMALL_JOB_BLOCKS` batches."""
    if source != "image" or todo.num_rows <= SMALL_JOB_BLOCKS * batch_size:
        yield from _local_inputs(
            ws, todo, source, versions, batch_size, preprocess_cfg, device_decode, decoded
        )
        return
    import ray

    task = ray.remote(num_cpus=1)(prepare_block)
    where = _images_at(ws, versions)
    for block in _blocks(todo, batch_size):
        yield task.remote(block, source, where, preprocess_cfg, device_decode, decoded)


def _timed(inputs: Iterator[Any], stages: dict[str, float]) -> Iterator[Any]:
    """`inputs`, adding the time spent producing each one to `stages["read"]`."""
    while True:
        started = time.perf_counter()
        item = next(inputs, None)
        stages["read"] += time.perf_counter() - started
        if item is None:
            return
        yield item


def _flush(
    writer: OutputWriter, batches: list[dict[str, np.ndarray]], output: str, summary: ExtractSummary
) -> None:
    """Commit the buffered batches as one chunk and count what happened to them."""
    if not batches:
        return
    started = time.perf_counter()

    def column(name: str) -> np.ndarray:
        return np.concatenate([b[name] for b in batches])

    values = column(output)
    counts = writer.write(
        column("item_id").astype(object),
        column("input_hash").astype(object),
        values if output == "vector" else values.astype(object),
        _errors(column("error")),
    )
    summary.done += counts.pop("", 0)
    summary.failed += sum(counts.values())
    for reason, n in counts.items():
        summary.reasons[reason] = summary.reasons.get(reason, 0) + n
    summary.stages["write"] = summary.stages.get("write", 0.0) + time.perf_counter() - started
