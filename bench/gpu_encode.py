"""Benchmark: CLIP image embeddings from JPEG bytes to a LanceDB table on one GPU, and where the time goes.

    python bench/gpu_encode.py                # ViT-B-32 (untrained weights), 20k generated JPEGs, GPU
    python bench/gpu_encode.py --record       # ... and append the tables to BENCHMARKS.md
    python bench/gpu_encode.py --smoke        # tiny model, 64 images, CPU is fine: checks the script works

Pipelines compared: the extractor class as Ray would call it (one process decodes and preprocesses); a CPU
process pool, then a thread pool, that decode and crop to uint8 while the GPU normalises and encodes; and nvJPEG
decoding on the GPU (torchvision.io.decode_jpeg) with resizing on the GPU. Vectors go to a temporary LanceDB table.
Then the product: `mmfeat encode image` (a subprocess: Python and Ray start, the runner's read, decode, model actor
and chunked keyed writes) on a workspace holding the same JPEGs, and its ratio to the best raw pipeline above.
Without CUDA (and without --smoke) it stops with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from extractors.clip import TINY_CLIP, ClipImageEncoder
from extractors.images import ImageError, decode_image

REPO = Path(__file__).resolve().parents[1]


def make_jpeg(seed: int) -> bytes:
    """A varied 160-320 px JPEG: a colour gradient, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(160, 320, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.8, 0.8, (2, 3)).astype(np.float32)
    pixels = rng.integers(0, 256, 3) + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
    return buf.getvalue()


def cpu_prepare(job: tuple[list[bytes], int]) -> tuple[np.ndarray, float]:
    """Pool worker: decode, resize the short side to `size` (bicubic) and centre-crop, as uint8 NHWC."""
    blobs, size = job
    start = time.perf_counter()
    out = np.zeros((len(blobs), size, size, 3), np.uint8)
    for i, blob in enumerate(blobs):
        try:
            img = decode_image(blob)
        except ImageError:
            continue  # stays zero; the extractor would report the row
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(img.crop((left, top, left + size, top + size)))
    return out, time.perf_counter() - start


class GpuSampler:
    """Samples GPU utilisation (%) in a thread: torch.cuda.utilization() (NVML), else nvidia-smi."""

    def __init__(self, interval: float = 0.1) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:
            if not shutil.which("nvidia-smi"):
                return None
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            )
            return float(out.stdout.strip() or "nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is None:
                return
            self.samples.append(value)
            self._stop.wait(self._interval)

    def __enter__(self) -> GpuSampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> str:
        return f"{np.mean(self.samples):.0f}" if self.samples else "n/a"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def normalise_on_device(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device) -> torch.Tensor:
    """uint8 NHWC (CPU) -> normalised fp16/fp32 NCHW channels_last on the device."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).to(mean.dtype)
    return ((x / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def gpu_decode(blobs: list[bytes], size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """nvJPEG batch decode, then per-image bicubic (antialiased) short-side resize and centre crop on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    images = decode_jpeg(data, device="cuda", mode=ImageReadMode.RGB)
    out = torch.empty(len(images), 3, size, size, device="cuda", dtype=mean.dtype)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i] = resized[0, :, top : top + size, left : left + size].clamp_(0, 255)
    return ((out / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def write_lancedb(vectors: np.ndarray) -> float:
    """Seconds to write the vectors with item ids to a fresh LanceDB table."""
    import lancedb  # imported after the pool forks: lancedb's runtime does not survive fork

    table = pa.table(
        {
            "item_id": pa.array(np.arange(len(vectors)), pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        lancedb.connect(tmp).create_table("clip_vectors", table)
        return time.perf_counter() - start


def require_cuda(script: str, smoke: bool) -> None:
    """Stop with one line (no traceback) where there is no CUDA device, unless this is a --smoke check."""
    if not smoke and not torch.cuda.is_available():
        print(
            f"{script}: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
            "(bench/gpu_all.sh), or pass --smoke to check the script on CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def image_workspace(root: Path, blobs: list[bytes]) -> Path:
    """A workspace at `root` whose items "i0000000".. each hold one of `blobs` (JPEG), as an ingest leaves them."""
    from datetime import datetime as _dt

    from stores.schema import ITEM_IMAGES, ITEMS
    from stores.workspace import Workspace

    now = _dt.now(UTC)
    ids = [f"i{k:07d}" for k in range(len(blobs))]
    ws = Workspace(root)
    items = [
        {"item_id": i, "title": f"Item {k}", "text": "", "attributes": "{}", "source": "bench",
         "content_hash": str(k), "created_at": now, "updated_at": now}
        for k, i in enumerate(ids)
    ]  # fmt: skip
    ws.upsert(ITEMS, pa.Table.from_pylist(items, schema=ITEMS.schema))
    images = []
    for i, blob in zip(ids, blobs, strict=True):
        width, height = Image.open(io.BytesIO(blob)).size  # header only
        images.append(
            {"item_id": i, "sha256": hashlib.sha256(blob).hexdigest(), "format": "JPEG", "width": width,
             "height": height, "image": blob, "source": "bench", "created_at": now}
        )  # fmt: skip
    ws.upsert(ITEM_IMAGES, pa.Table.from_pylist(images, schema=ITEM_IMAGES.schema))
    return root


def mmfeat_run(workspace: Path, args: list[str], timeout: float = 480) -> tuple[dict, float, str]:
    """Run `mmfeat --workspace W ARGS --json --no-progress` as a user would; returns (summary, wall seconds incl.
    Python and Ray start, mean GPU util % while it ran). Exits with the CLI's own error line when it fails."""
    exe = Path(sys.executable).with_name("mmfeat")
    cmd = [
        str(exe) if exe.exists() else "mmfeat",
        "--workspace",
        str(workspace),
        *args,
        "--json",
        "--no-progress",
    ]
    with GpuSampler() as util:
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise SystemExit(f"product run failed: {' '.join(cmd[1:])}: {tail}")
    out = done.stdout
    return json.loads(out[out.index("{") :]), wall, util.mean


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="number of generated JPEGs")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="CPU decode pool"
    )
    parser.add_argument(
        "--extractor-n", type=int, default=2048, help="images through the single-process extractor"
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and data: checks the script end to end"
    )
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    parser.add_argument(
        "--product-batch",
        type=int,
        default=None,
        help="--batch-size of `mmfeat encode image` (default --batch)",
    )
    parser.add_argument("--no-product", action="store_true", help="skip the `mmfeat encode image` run")
    args = parser.parse_args()
    require_cuda("gpu_encode", args.smoke)
    if args.smoke:
        args.n, args.batch, args.workers, args.extractor_n, args.model = 64, 16, 2, 32, TINY_CLIP

    # The pool forks before CUDA is touched: a forked CUDA context is unusable.
    pool = mp.get_context("fork").Pool(args.workers)
    start = time.perf_counter()
    blobs = pool.map(make_jpeg, range(args.n), chunksize=64)
    print(
        f"generated {args.n} JPEGs ({np.mean([len(b) for b in blobs]) / 1024:.1f} KiB avg) "
        f"in {time.perf_counter() - start:.1f}s"
    )

    encoder = ClipImageEncoder(args.model, pretrained=None, batch_size=args.batch)
    device, cfg = encoder.device, encoder.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mean = torch.tensor(cfg["mean"], device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device, dtype=dtype).view(1, 3, 1, 1)
    batches = [blobs[i : i + args.batch] for i in range(0, args.n, args.batch)]
    rows: list[tuple[str, int, float, str]] = []  # pipeline, images, seconds, gpu util
    stages: list[tuple[str, str, float]] = []  # pipeline, stage, ms per batch

    # Model ceiling: synthetic pixels, contiguous versus channels_last input.
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
        encoder.encode_pixels(x)
        sync()
        reps = 3 if args.smoke else 60  # about a second on an H100, long enough to sample utilisation
        with GpuSampler() as util:
            start = time.perf_counter()
            for _ in range(reps):
                encoder.encode_pixels(x)
            sync()
        name = "channels_last" if fmt is torch.channels_last else "contiguous"
        rows.append((f"model only, {name} input", reps * args.batch, time.perf_counter() - start, util.mean))

    # 1. The extractor as Ray Data calls it: decode + preprocess in this one process, then the model.
    sub = np.empty(min(args.extractor_n, args.n), dtype=object)
    sub[:] = blobs[: len(sub)]
    encoder({"image": sub[: args.batch]})  # warm-up
    with GpuSampler() as util:
        start = time.perf_counter()
        reference = encoder({"image": sub})["vector"]
        rows.append(("extractor __call__ (1 process)", len(sub), time.perf_counter() - start, util.mean))
    part = sub[: args.batch]
    t0 = time.perf_counter()
    for blob in part:
        decode_image(blob)
    t1 = time.perf_counter()
    encoder({"image": part})
    sync()
    t2 = time.perf_counter()
    encoder.encode_pixels(torch.zeros(len(part), 3, size, size, device=device, dtype=dtype))
    sync()
    model_secs = time.perf_counter() - t2
    stages.append(("extractor", "decode (PIL)", 1000 * (t1 - t0)))
    stages.append(
        ("extractor", "preprocess (open_clip transforms) + H2D", 1000 * (t2 - t1 - (t1 - t0) - model_secs))
    )
    stages.append(("extractor", "model", 1000 * model_secs))

    # 2. CPU pool decodes and crops to uint8; the GPU normalises and encodes; LanceDB write at the end.
    jobs = [(b, size) for b in batches]
    with GpuSampler() as util:
        start = time.perf_counter()
        outs, cpu_secs = [], []
        for crops, secs in pool.imap(cpu_prepare, jobs):
            outs.append(
                encoder.encode_pixels(normalise_on_device(torch.from_numpy(crops), mean, std, device))
            )
            cpu_secs.append(secs)
        pool_vectors = torch.cat(outs).cpu().numpy()
        pool_secs = time.perf_counter() - start
    rows.append((f"CPU pool ({args.workers} procs) + GPU", args.n, pool_secs, util.mean))
    stages.append(("CPU pool", "decode+resize+crop per batch, one worker", 1000 * float(np.mean(cpu_secs))))
    crops, _ = cpu_prepare(jobs[0])
    t0 = time.perf_counter()
    x = normalise_on_device(torch.from_numpy(crops), mean, std, device)
    sync()
    t1 = time.perf_counter()
    encoder.encode_pixels(x)
    sync()
    stages.append(("CPU pool", "H2D + normalise", 1000 * (t1 - t0)))
    stages.append(("CPU pool", "model", 1000 * (time.perf_counter() - t1)))
    # The same with threads: PIL releases the GIL while decoding and resizing, and nothing is pickled.
    with ThreadPoolExecutor(args.workers) as threads, GpuSampler() as util:
        start = time.perf_counter()
        outs = [
            encoder.encode_pixels(normalise_on_device(torch.from_numpy(crops), mean, std, device))
            for crops, _ in threads.map(cpu_prepare, jobs)
        ]
        torch.cat(outs).cpu()
        rows.append((f"CPU threads ({args.workers}) + GPU", args.n, time.perf_counter() - start, util.mean))
    lance_secs = write_lancedb(pool_vectors)
    rows.append(("  + LanceDB write", args.n, lance_secs, "-"))
    rows.append(("CPU pool end to end (with write)", args.n, pool_secs + lance_secs, "-"))
    agree = float(np.mean(np.sum(pool_vectors[: len(reference)] * reference, axis=1)))

    # 3. nvJPEG on the GPU: decode, resize and normalise without leaving the device.
    gpu_agree = None
    if device.type == "cuda":
        encoder.encode_pixels(gpu_decode(batches[0], size, mean, std))  # warm-up
        with GpuSampler() as util:
            start = time.perf_counter()
            gpu_vectors = torch.cat([encoder.encode_pixels(gpu_decode(b, size, mean, std)) for b in batches])
            gpu_vectors = gpu_vectors.cpu().numpy()
            gpu_secs = time.perf_counter() - start
        rows.append(("GPU decode (nvJPEG) + GPU", args.n, gpu_secs, util.mean))
        lance_secs = write_lancedb(gpu_vectors)
        rows.append(("GPU decode end to end (with write)", args.n, gpu_secs + lance_secs, "-"))
        gpu_agree = float(np.mean(np.sum(gpu_vectors[: len(reference)] * reference, axis=1)))
        from torchvision.io import ImageReadMode, decode_jpeg

        sync()
        t0 = time.perf_counter()
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batches[0]]
        decode_jpeg(data, device="cuda", mode=ImageReadMode.RGB)
        sync()
        t1 = time.perf_counter()
        x = gpu_decode(batches[0], size, mean, std)
        sync()
        t2 = time.perf_counter()
        encoder.encode_pixels(x)
        sync()
        stages.append(("GPU decode", "nvJPEG decode", 1000 * (t1 - t0)))
        stages.append(("GPU decode", "resize+crop+normalise", 1000 * ((t2 - t1) - (t1 - t0))))
        stages.append(("GPU decode", "model", 1000 * (time.perf_counter() - t2)))
    pool.close()

    # 4. The product: `mmfeat encode image` on a workspace holding the same JPEGs (the raw floor's model is freed).
    product_note = ""
    if not args.no_product:
        floor_name = (
            "GPU decode end to end (with write)"
            if device.type == "cuda"
            else "CPU pool end to end (with write)"
        )
        floor = next(n / secs for name, n, secs, _ in rows if name == floor_name)
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            ws_path = image_workspace(Path(tmp) / "ws", blobs)
            model_args = ["--model", "tiny-test"] if args.model == TINY_CLIP else ["--model", args.model]
            summary, wall, util = mmfeat_run(
                ws_path,
                ["encode", "image", *model_args, "--batch-size", str(args.product_batch or args.batch),
                 "--chunk-rows", str(max(1024, args.batch))],
            )  # fmt: skip
        done = summary["done"]
        rows.append(
            ("`mmfeat encode image` (runner: read, decode, model, writes)", done, summary["seconds"], util)
        )
        rows.append(("`mmfeat encode image` wall (+ Python, imports, Ray start)", done, wall, "-"))
        ratio = done / summary["seconds"] / floor
        product_note = (
            f"Product / raw floor ({floor_name}): {ratio:.2f}x by the runner's own seconds, "
            f"{done / wall / floor:.2f}x by wall time; {done} of {args.n} done, {summary['failed']} failed, "
            f"engine {summary['engine']}."
        )
        print(product_note)

    device_label = device_name()
    lines = [
        f"### gpu_encode: {args.model} (untrained), {device_label}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`python bench/gpu_encode.py --n {args.n} --batch {args.batch} --workers {args.workers}"
        f"{' --smoke' if args.smoke else ''}`; torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"dtype {str(dtype).removeprefix('torch.')}.",
        "",
        "| pipeline | images | seconds | images/s | GPU util % |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {n} | {secs:.2f} | {n / secs:,.0f} | {util} |" for name, n, secs, util in rows),
        "",
        f"Batch of {args.batch}, where the time goes:",
        "",
        "| pipeline | stage | ms per batch |",
        "|---|---|---:|",
        *(f"| {pipe} | {stage} | {ms:.1f} |" for pipe, stage, ms in stages),
        "",
        f"Mean cosine to the extractor's vectors: CPU pool {agree:.4f}"
        + (f", GPU decode {gpu_agree:.4f}" if gpu_agree is not None else "")
        + " (1.0 = same pixels; resize kernels differ slightly).",
        "",
        *([product_note, ""] if product_note else []),
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
