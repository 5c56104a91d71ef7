"""Benchmark: batched versus one-image-at-a-time captioning with a BLIP-large-sized model on one GPU.

    python bench/gpu_caption.py               # BLIP-large shape (untrained), 512 JPEGs batched, 32 one at a time
    python bench/gpu_caption.py --record      # ... and append the table to BENCHMARKS.md
    python bench/gpu_caption.py --smoke       # tiny BLIP, a few images, CPU is fine: checks the script works

Every caption is exactly --tokens new tokens (min_new_tokens = max_new_tokens), so both modes do the same work
and untrained weights measure the same thing trained ones would.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from gpu_encode import GpuSampler, make_jpeg, sync  # bench/ is on sys.path when this script runs

from extractors.captioner import BLIP_LARGE_UNTRAINED, TINY_CAPTIONER, Captioner
from extractors.images import decode_image

REPO = Path(__file__).resolve().parents[1]


def _objects(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=512, help="images captioned in batches")
    parser.add_argument("--single-n", type=int, default=32, help="images captioned one at a time")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption (fixed)")
    parser.add_argument(
        "--dtype", default=None, help="torch dtype name; default bfloat16 on GPU, float32 on CPU"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and data: checks the script end to end"
    )
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    model = BLIP_LARGE_UNTRAINED
    if args.smoke:
        args.n, args.single_n, args.batch, model = 16, 4, 8, TINY_CAPTIONER

    blobs = [make_jpeg(seed) for seed in range(max(args.n, args.single_n))]
    start = time.perf_counter()
    captioner = Captioner(
        model,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        num_beams=1,
        dtype=args.dtype,
        batch_size=args.batch,
    )
    load_secs = time.perf_counter() - start
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    images = _objects(blobs[: args.n])
    captioner({"image": images[: args.batch]})  # warm-up, both shapes
    captioner({"image": images[:1]})
    sync()

    rows: list[tuple[str, int, float, str]] = []
    with GpuSampler() as util:
        start = time.perf_counter()
        batched = captioner({"image": images})["caption"]
        sync()
        rows.append((f"batched ({args.batch} per generate)", args.n, time.perf_counter() - start, util.mean))
    singles = []
    with GpuSampler() as util:
        start = time.perf_counter()
        for blob in blobs[: args.single_n]:
            singles.append(captioner({"image": _objects([blob])})["caption"][0])
        sync()
        rows.append(("one image at a time", args.single_n, time.perf_counter() - start, util.mean))
    same = np.mean([a == b for a, b in zip(batched[: args.single_n], singles, strict=False)])

    # Where a batch's time goes: decoding, the processor (resize + normalise), generation.
    part = images[: args.batch]
    t0 = time.perf_counter()
    pictures = [decode_image(b) for b in part]
    t1 = time.perf_counter()
    captioner.processor(images=pictures, return_tensors="pt")
    t2 = time.perf_counter()
    captioner({"image": part})
    sync()
    t3 = time.perf_counter()
    decode_ms, process_ms = 1000 * (t1 - t0), 1000 * (t2 - t1)
    generate_ms = 1000 * (t3 - t2) - decode_ms - process_ms

    device = captioner.device
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    per_sec = {name: n / secs for name, n, secs, _ in rows}
    speedup = per_sec[rows[0][0]] / per_sec[rows[1][0]]
    lines = [
        f"### gpu_caption: {model} ({params:.0f}M params), {device_name}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`python bench/gpu_caption.py --n {args.n} --single-n {args.single_n} --batch {args.batch} "
        f"--tokens {args.tokens}{' --smoke' if args.smoke else ''}`; torch {torch.__version__}, "
        f"dtype {str(captioner.dtype).removeprefix('torch.')}, greedy, {args.tokens} new tokens per caption; "
        f"model built in {load_secs:.1f}s.",
        "",
        "| mode | captions | seconds | captions/s | new tokens/s | GPU util % |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {n} | {secs:.2f} | {n / secs:,.1f} | {n * args.tokens / secs:,.0f} | {util} |"
            for name, n, secs, util in rows
        ),
        "",
        f"Batching speed-up: {speedup:.1f}x. Batch of {len(part)}: decode {decode_ms:.0f} ms, processor "
        f"{process_ms:.0f} ms, generate {generate_ms:.0f} ms. Batched and single captions identical for "
        f"{same:.0%} of the {args.single_n} compared (reduced-precision kernels may differ by batch shape).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print("sample captions (untrained weights, gibberish expected):", list(batched[:2]))
    if args.record:
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
