"""Image ingest in bounded memory: a folder of images several times a process's memory margin ingests in full.

Each run is a child process under `RLIMIT_AS`. Virtual size counts what the libraries reserve (Lance, DuckDB and
their thread pools), so the cap is measured, not guessed: the same ingest of a 4-image folder gives the baseline
`VmPeak`, and the cap is that plus `MARGIN_MB`. glibc's per-thread malloc arenas (64 MB of address space each) are
limited with `MALLOC_ARENA_MAX=2` in every child so the baseline does not depend on how many threads happen to run.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_capped

MARGIN_MB = 300
N_IMAGES = 300  # of ~3.9 MB each: ~1.2 GB, about 4x the margin

CHILD = """
import json, pathlib, resource, sys
ws_dir, items, images, cap_mb, mode = sys.argv[1:6]
if int(cap_mb):
    resource.setrlimit(resource.RLIMIT_AS, (int(cap_mb) << 20, int(cap_mb) << 20))

def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmPeak", "VmHWM"):
            out[key] = int(line.split()[1]) // 1024
    return out

from recipes.ingest.load import ingest
from recipes.ingest.sources import table
from stores.workspace import Workspace

ws = Workspace(ws_dir)
report = ingest(ws, table(items, images=images, name="mem"))
out = {"stored": ws.count("item_images"), "balanced": report.balanced, "version": ws.version("item_images")}
if mode == "hold":  # the old behaviour: every image's bytes in one list before one write
    try:
        held = [p.read_bytes() for p in sorted(pathlib.Path(sys.argv[6]).iterdir())]
        out["held"] = len(held)
    except MemoryError:
        out["memory_error"] = True
print(json.dumps({**out, **status()}))
"""


def _folder(root: Path, n: int) -> tuple[Path, Path]:
    """`n` items whose images are hard links to 4 noise JPEGs (1000x1000, quality 100: ~3.9 MB each, since noise
    does not compress): the files read as `n` images of full size while the disk holds only 4."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    seeds = []
    for k in range(4):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG", quality=100, subsampling=0)
        seeds.append(root / f"seed{k}.jpg")
        seeds[-1].write_bytes(buf.getvalue())
    lines = ["item_id,title,image"]
    for i in range(n):
        os.link(seeds[i % 4], images / f"{i:04d}.jpg")
        lines.append(f"{i:04d},item {i},{i:04d}.jpg")
    (root / "items.csv").write_text("\n".join(lines) + "\n")
    return root / "items.csv", images


def _child(ws: Path, items: Path, images: Path, cap_mb: int, mode: str = "ingest", *extra: str) -> dict:
    return run_capped(CHILD, str(ws), str(items), str(images), str(cap_mb), mode, *extra, timeout=600)


@pytest.mark.slow
def test_image_folder_larger_than_the_memory_margin_ingests_in_full(tmp_path):
    """Local images stream in batches: under an address-space cap of (baseline + 300 MB), a folder of ~1.2 GB of
    images ingests with every image stored, a re-run under the same cap writes no new version, and holding the
    same bytes in one list (the old behaviour) fails under that cap, so the cap is one that binds."""
    try:
        tiny_items, tiny_images = _folder(tmp_path / "tiny", 4)
        base = _child(tmp_path / "ws_tiny", tiny_items, tiny_images, 0)
        assert base["stored"] == 4
        cap = base["VmPeak"] + MARGIN_MB

        items, images = _folder(tmp_path / "big", N_IMAGES)
        total_mb = sum(p.stat().st_size for p in images.iterdir()) / 2**20
        assert total_mb > 3.5 * MARGIN_MB

        first = _child(tmp_path / "ws", items, images, cap)
        assert first["balanced"] and first["stored"] == N_IMAGES, first
        again = _child(tmp_path / "ws", items, images, cap)
        assert again["stored"] == N_IMAGES and again["version"] == first["version"], (
            f"a re-run of an unchanged folder wrote a new item_images version: {first} -> {again}"
        )

        old = _child(tmp_path / "ws_hold", tiny_items, tiny_images, cap, "hold", str(images))
        assert old.get("memory_error"), f"{total_mb:.0f} MB held in one list fit under a {cap} MB cap: {old}"
    finally:
        for name in ("tiny", "big", "ws_tiny", "ws", "ws_hold"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
