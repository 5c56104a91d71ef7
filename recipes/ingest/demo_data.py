"""A synthetic multimodal catalog for the offline demo and tests.

Items belong to latent categories; each category has its own shape, palette and vocabulary, so images, text and
interactions all carry the same signal: a pipeline that works finds it again (kNN neighbours share a category,
users prefer their categories). Written as ordinary source files (CSV + PNG/JPEG) and ingested through the same
`table` adapter a user would call.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = {
    "outdoor": (
        "triangle",
        [(34, 139, 34), (85, 107, 47)],
        ["tent", "backpack", "trail boots", "compass"],
        "rugged",
    ),
    "kitchen": (
        "circle",
        [(220, 20, 60), (255, 140, 0)],
        ["skillet", "kettle", "chef knife", "mixing bowl"],
        "durable",
    ),
    "office": (
        "square",
        [(30, 60, 160), (70, 130, 180)],
        ["notebook", "desk lamp", "stapler", "monitor stand"],
        "ergonomic",
    ),
    "toys": (
        "star",
        [(255, 215, 0), (238, 130, 238)],
        ["puzzle", "robot kit", "plush bear", "building blocks"],
        "colourful",
    ),
    "garden": (
        "stripes",
        [(107, 142, 35), (160, 82, 45)],
        ["watering can", "pruning shears", "seed tray", "hose"],
        "weatherproof",
    ),
    "audio": (
        "ring",
        [(20, 20, 20), (128, 0, 128)],
        ["headphones", "speaker", "turntable", "microphone"],
        "high-fidelity",
    ),
}


@dataclass(frozen=True)
class DemoCatalog:
    root: Path
    items: Path
    users: Path
    interactions: Path
    images: Path


def _draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 64) -> Image.Image:
    bg = tuple(int(c) for c in rng.integers(215, 255, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    jitter = [int(v) for v in rng.integers(-6, 7, size=4)]
    box = (10 + jitter[0], 10 + jitter[1], 54 + jitter[2], 54 + jitter[3])
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    elif shape == "star":
        cx, cy, r = 32 + jitter[0] // 2, 32 + jitter[1] // 2, 24
        pts = [
            (
                cx + (r if i % 2 == 0 else r // 2) * np.cos(np.pi * i / 5 - np.pi / 2),
                cy + (r if i % 2 == 0 else r // 2) * np.sin(np.pi * i / 5 - np.pi / 2),
            )
            for i in range(10)
        ]
        d.polygon(pts, fill=fill)
    elif shape == "stripes":
        for x in range(0, size, 12):
            d.rectangle((x + jitter[0] % 4, 0, x + 5 + jitter[0] % 4, size), fill=fill)
    else:  # ring
        d.ellipse(box, outline=fill, width=8)
    return img


def generate_catalog(
    out_dir: str | Path, n_items: int = 120, n_users: int = 60, seed: int = 0, interactions_per_user: int = 20
) -> DemoCatalog:
    """Write items.csv, users.csv, interactions.csv and images/ under `out_dir`; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(CATEGORIES)
    item_cat = rng.integers(0, len(names), size=n_items)
    item_ids = [f"{i:06d}" for i in range(n_items)]  # zero-padded string ids, like real catalogues
    with open(root / "items.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "text", "image", "category", "price", "rights"])
        for iid, c in zip(item_ids, item_cat, strict=True):
            cat = names[c]
            shape, palette, nouns, adjective = CATEGORIES[cat]
            colour = palette[int(rng.integers(0, len(palette)))]
            noun = nouns[int(rng.integers(0, len(nouns)))]
            img = _draw(shape, colour, rng)
            fmt = "png" if int(iid) % 5 == 0 else "jpg"
            img.save(images / f"{iid}.{fmt}", quality=90)
            title = f"{adjective.capitalize()} {noun} {iid[-3:]}"
            text = (
                f"A {adjective} {noun} for {cat} lovers. Part of our {cat} range: "
                f"{', '.join(nouns)}. Colour code {colour}."
            )
            rights = "cc-by-4.0" if int(iid) % 7 else "partner-licence"
            w.writerow([iid, title, text, f"{iid}.{fmt}", cat, f"{rng.uniform(5, 200):.2f}", rights])
    prefs = rng.dirichlet(np.full(len(names), 0.3), size=n_users)
    user_ids = [f"u{u:05d}" for u in range(n_users)]
    with open(root / "users.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "favourite"])
        for uid, p in zip(user_ids, prefs, strict=True):
            w.writerow([uid, names[int(np.argmax(p))]])
    by_cat = [np.flatnonzero(item_cat == c) for c in range(len(names))]
    start = 1_700_000_000
    with open(root / "interactions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "timestamp", "event", "value"])
        for u, uid in enumerate(user_ids):
            n = int(rng.integers(interactions_per_user // 2, interactions_per_user * 3 // 2 + 1))
            seen: set[int] = set()
            for _ in range(n):
                c = int(rng.choice(len(names), p=prefs[u]))
                pool = by_cat[c] if len(by_cat[c]) else np.arange(n_items)
                item = int(rng.choice(pool))
                if item in seen:
                    continue
                seen.add(item)
                ts = start + int(rng.integers(0, 90 * 86400))
                w.writerow([uid, item_ids[item], ts, "purchase" if rng.random() < 0.2 else "view", 1.0])
    (root / "README.txt").write_text(json.dumps({"generator": "mmfeat demo", "seed": seed, "items": n_items}))
    return DemoCatalog(root, root / "items.csv", root / "users.csv", root / "interactions.csv", images)
