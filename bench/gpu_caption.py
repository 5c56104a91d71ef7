"""Benchmark: captioning on one GPU, transformers batched `generate` versus vLLM on the same VLM, raw and through
the product (`mmfeat caption`).

    python bench/gpu_caption.py               # Qwen2-VL-2B's shape (random weights), GPU
    python bench/gpu_caption.py --record      # ... and append the table to BENCHMARKS.md
    python bench/gpu_caption.py --smoke       # tiny Qwen2-VL, a few images, CPU is fine (vLLM rows skipped)

The model is built from a config (extractors/vllm_captioner.py `untrained_qwen2_vl`: Qwen2-VL-2B's shape, seeded
random weights, no download): transformers loads its saved weights, raw vLLM uses `load_format="dummy"` on the same
config. Same prompt (the chat template renders exactly the prompt vLLM is sent), same image size cap, greedy, and
every raw caption exactly --tokens new tokens (min = max), so both engines do the same work. The product rows run
`mmfeat caption --caption-engine transformers|vllm` as a subprocess on a workspace holding the same JPEGs (Python,
Ray start, read, decode, model actor, writes); they load the folder's weights and cap tokens at --tokens (random
weights almost never emit the end token early). Without CUDA (and without --smoke) it stops with one line.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from gpu_encode import (  # bench/ is on sys.path when this script runs
    GpuSampler,
    device_name,
    image_workspace,
    make_jpeg,
    mmfeat_run,
    require_cuda,
    sync,
)

from extractors.captioner import Captioner
from extractors.vllm_captioner import VLLM_FIX, VllmCaptioner, untrained_qwen2_vl

REPO = Path(__file__).resolve().parents[1]


def _objects(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1024, help="images captioned by vLLM (raw and product)")
    parser.add_argument(
        "--hf-n", type=int, default=256, help="images captioned by transformers (raw and product)"
    )
    parser.add_argument(
        "--batch", type=int, default=64, help="transformers generate batch (and its Ray batch)"
    )
    parser.add_argument("--vllm-batch", type=int, default=256, help="Ray batch handed to vLLM in the product")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per caption")
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="image size cap (both engines)")
    parser.add_argument("--no-product", action="store_true", help="skip the `mmfeat caption` runs")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and data: checks the script end to end"
    )
    parser.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    args = parser.parse_args()
    require_cuda("gpu_caption", args.smoke)
    shape = "2b"
    if args.smoke:
        args.n, args.hf_n, args.batch, args.vllm_batch, args.tokens, shape = 8, 8, 4, 8, 4, "tiny"
    cuda = torch.cuda.is_available()
    vllm_ok = cuda and _has_vllm()
    if not vllm_ok:
        why = "no CUDA device" if not cuda else VLLM_FIX
        print(f"gpu_caption: vLLM rows skipped: {why}", file=sys.stderr)

    tmp = tempfile.TemporaryDirectory()
    folder = str(Path(tmp.name) / "qwen2-vl")
    start = time.perf_counter()
    untrained_qwen2_vl(folder, shape=shape, max_pixels=args.max_pixels, device="cuda" if cuda else "cpu")
    build_secs = time.perf_counter() - start
    _free()
    blobs = [make_jpeg(seed) for seed in range(max(args.n, args.hf_n))]
    rows: list[tuple[str, int, float, str]] = []  # mode, captions, seconds, GPU util
    notes: list[str] = []

    # The product first: each run is its own process, so the GPU is free for it.
    if not args.no_product:
        for engine, n, batch in (("transformers", args.hf_n, args.batch), ("vllm", args.n, args.vllm_batch)):
            if engine == "vllm" and not vllm_ok:
                continue
            ws_path = image_workspace(Path(tmp.name) / f"ws-{engine}", blobs[:n])
            summary, wall, util = mmfeat_run(
                ws_path,
                ["caption", "--model", folder, "--caption-engine", engine, "--max-new-tokens", str(args.tokens),
                 "--batch-size", str(batch)],
            )  # fmt: skip
            rows.append(
                (
                    f"`mmfeat caption --caption-engine {engine}` (runner)",
                    summary["done"],
                    summary["seconds"],
                    util,
                )
            )
            rows.append(
                (f"`mmfeat caption --caption-engine {engine}` wall (+ start)", summary["done"], wall, "-")
            )
            if summary["failed"]:
                notes.append(f"{engine} product: {summary['failed']} failed ({summary['reasons']}).")

    # Raw transformers: the Captioner class alone, batched.
    start = time.perf_counter()
    hf = Captioner(folder, max_new_tokens=args.tokens, min_new_tokens=args.tokens, batch_size=args.batch)
    hf_load = time.perf_counter() - start
    params = sum(p.numel() for p in hf.model.parameters()) / 1e6
    dtype = str(hf.dtype).removeprefix("torch.")
    images = _objects(blobs[: args.hf_n])
    hf({"image": images[: args.batch]})  # warm-up
    sync()
    with GpuSampler() as util:
        start = time.perf_counter()
        hf_captions = hf({"image": images})["caption"]
        sync()
        rows.append(
            (
                f"transformers generate, batch {args.batch} (raw)",
                args.hf_n,
                time.perf_counter() - start,
                util.mean,
            )
        )
    prompt = hf._text
    del hf
    _free()

    # Raw vLLM: the VllmCaptioner class alone, one call with every image (vLLM schedules its own batches).
    vllm_load = None
    if vllm_ok:
        llm = VllmCaptioner(
            folder,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            dtype=dtype,
            load_format="dummy",
            max_model_len=4096,
        )
        assert llm._text == prompt, "the two engines must see the same prompt"
        start = time.perf_counter()
        llm({"image": _objects(blobs[:8])})  # starts the engine (dummy weights, CUDA graphs) and warms up
        vllm_load = time.perf_counter() - start
        images = _objects(blobs[: args.n])
        with GpuSampler() as util:
            start = time.perf_counter()
            out = llm({"image": images})
            rows.append(("vLLM (raw, one call)", args.n, time.perf_counter() - start, util.mean))
        bad = int(sum(e is not None for e in out["error"]))
        if bad:
            notes.append(f"vLLM raw: {bad} rows failed, e.g. {next(e for e in out['error'] if e)}.")

    per_sec = {name: n / secs for name, n, secs, _ in rows}
    raw_hf = per_sec[next(name for name in per_sec if name.startswith("transformers generate"))]
    summary_lines = []
    if "vLLM (raw, one call)" in per_sec:
        summary_lines.append(
            f"vLLM / transformers (raw, captions/s): {per_sec['vLLM (raw, one call)'] / raw_hf:.2f}x"
        )
    for engine, raw in (("transformers", raw_hf), ("vllm", per_sec.get("vLLM (raw, one call)"))):
        name = f"`mmfeat caption --caption-engine {engine}` (runner)"
        if name in per_sec and raw:
            wall = per_sec[f"`mmfeat caption --caption-engine {engine}` wall (+ start)"]
            summary_lines.append(
                f"product / raw, {engine}: {per_sec[name] / raw:.2f}x (runner seconds), {wall / raw:.2f}x (wall)"
            )
    if "`mmfeat caption --caption-engine vllm` (runner)" in per_sec:
        product_ratio = (
            per_sec["`mmfeat caption --caption-engine vllm` (runner)"]
            / per_sec["`mmfeat caption --caption-engine transformers` (runner)"]
        )
        summary_lines.append(
            f"product vLLM / product transformers (runner, captions/s): {product_ratio:.2f}x"
        )

    version = ""
    if vllm_ok:
        import vllm

        version = f", vllm {vllm.__version__}"
    lines = [
        f"### gpu_caption: untrained Qwen2-VL ({shape} shape, {params:.0f}M params), {device_name()}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"`python bench/gpu_caption.py --n {args.n} --hf-n {args.hf_n} --batch {args.batch} --vllm-batch "
        f"{args.vllm_batch} --tokens {args.tokens} --max-pixels {args.max_pixels}{' --smoke' if args.smoke else ''}`; "
        f"torch {torch.__version__}{version}, dtype {dtype}, greedy, {args.tokens} new tokens per caption, same "
        f"prompt; model folder built in {build_secs:.1f}s, transformers loaded in {hf_load:.1f}s"
        + (f", vLLM engine started in {vllm_load:.1f}s" if vllm_load is not None else ", vLLM not run")
        + ".",
        "",
        "| mode | captions | seconds | captions/s | new tokens/s | GPU util % |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {n} | {secs:.2f} | {n / secs:,.1f} | {n * args.tokens / secs:,.0f} | {util} |"
            for name, n, secs, util in rows
        ),
        "",
        *summary_lines,
        *notes,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print("sample captions (untrained weights, gibberish expected):", list(hf_captions[:2]))
    if args.record:
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    tmp.cleanup()


if __name__ == "__main__":
    main()
