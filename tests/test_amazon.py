"""The Amazon review catalogues as a source (recipes/ingest/amazon.py): the 2014/2018 and 2023 layouts, written here
as small gzipped JSON-lines samples, ingest with the expected ids, counts and timestamps; review texts land in the
`reviews` table; image URLs reach the ingest's `image_url` path (never the network: the URLs point at TEST-NET
addresses, which the default fetch policy refuses before any connection)."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from flows.cli import cli
from recipes.ingest.amazon import amazon, ingest_amazon
from recipes.ingest.load import ingest
from recipes.ingest.records import SourceError
from stores.erasure.requests import ForgetRequest

TEST_NET = "http://192.0.2.1"  # RFC 5737 documentation range: reserved, refused by the SSRF guard without I/O


def _write(path: Path, lines: list) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for line in lines:
            fh.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def _sample_2018(d: Path) -> tuple[Path, Path]:
    reviews = [
        {"reviewerID": "A1", "asin": "0001", "overall": 5.0, "unixReviewTime": 1400000000,
         "reviewText": "Lovely.", "summary": "Five stars"},
        {"reviewerID": "A2", "asin": "0001", "overall": 3.0, "unixReviewTime": 1400000600, "reviewText": "Fine."},
        {"reviewerID": "A2", "asin": "0002", "overall": 4.0, "unixReviewTime": 1400001200, "summary": "Good"},
        "{not json",
        {"reviewerID": "", "asin": "0002", "overall": 1.0, "unixReviewTime": 1400001800},
        {"reviewerID": "A3", "asin": "9999", "overall": 2.0, "unixReviewTime": 1400002400},  # no metadata
    ]  # fmt: skip
    meta = [
        {"asin": "0001", "title": "Rattle", "description": ["Soft.", "Washable."], "category": ["Baby", "Toys"],
         "brand": "Acme", "price": "$9.99", "imageURLHighRes": [f"{TEST_NET}/hi1.jpg"],
         "imageURL": [f"{TEST_NET}/lo1.jpg"]},
        # the 2014 files write Python literals, not JSON
        str({"asin": "0002", "title": "Bib", "description": "Cotton bib.", "categories": [["Baby", "Feeding"]],
             "imUrl": f"{TEST_NET}/im2.jpg"}),
        [1, 2],
        {"asin": "", "title": "no id"},
    ]  # fmt: skip
    return _write(d / "reviews_Baby_5.json.gz", reviews), _write(d / "meta_Baby.json.gz", meta)


def _sample_2023(d: Path) -> tuple[Path, Path]:
    reviews = [
        {"user_id": "U1", "parent_asin": "P1", "asin": "C1", "rating": 5.0, "timestamp": 1588615855070,
         "title": "Great", "text": "Works well."},
        {"user_id": "U1", "parent_asin": "P2", "rating": 2.0, "timestamp": 1600000000000, "text": "Meh."},
        {"user_id": "U2", "parent_asin": "P1", "rating": 4.0, "timestamp": 1610000000123, "title": "OK"},
        {"user_id": "U2", "rating": 4.0, "timestamp": 1610000000123},  # no item id at all
    ]  # fmt: skip
    meta = [
        {"parent_asin": "P1", "title": "Lamp", "description": ["Bright.", "LED."], "categories": ["Home"],
         "store": "LightCo", "price": 19.5,
         "images": [{"thumb": f"{TEST_NET}/t1.jpg", "large": f"{TEST_NET}/l1.jpg", "hi_res": None,
                     "variant": "MAIN"}]},
        {"parent_asin": "P2", "title": "Shade", "description": [], "categories": [], "store": None,
         "price": None, "images": []},
    ]  # fmt: skip
    return _write(d / "Home.jsonl.gz", reviews), _write(d / "meta_Home.jsonl.gz", meta)


def _seconds(rows: list[dict]) -> dict[tuple[str, str], int]:
    return {(r["user_id"], r["item_id"]): int(r["timestamp"].timestamp()) for r in rows}


def test_amazon_2018_layout_ingests_items_users_interactions_reviews(tmp_path, ws):
    """2014/2018 layout: asin/reviewerID ids, seconds kept, rating as value, description joined, attributes
    (categories, brand, price), the first high-resolution image URL in `image_url`; a bad JSON line, a non-object
    and empty ids are quarantined, a review of an item without metadata is `unknown_item`; every file balances and
    review texts are stored for exactly the stored interactions."""
    reviews, meta = _sample_2018(tmp_path)
    src = amazon(reviews, meta)
    urls = dict(zip(src.items["item_id"].to_pylist(), src.items["image_url"].to_pylist(), strict=True))
    assert urls == {"0001": f"{TEST_NET}/hi1.jpg", "0002": f"{TEST_NET}/im2.jpg", "": None}

    report = ingest_amazon(ws, amazon(reviews, meta, images=False))
    assert report.balanced
    files = report.to_dict()["files"]
    assert files["meta_Baby.json.gz"]["reasons"] == {"malformed_row": 1, "empty_id": 1}
    assert files["reviews_Baby_5.json.gz"]["reasons"] == {
        "malformed_row": 1,
        "empty_id": 1,
        "unknown_item": 1,
    }
    assert files["reviews_Baby_5.json.gz"]["stored"] == 3 and "image_url" not in files

    items = {r["item_id"]: r for r in ws.read("items").to_pylist()}
    assert set(items) == {"0001", "0002"}  # leading zeros kept
    assert items["0001"]["text"] == "Soft.\n\nWashable." and items["0002"]["text"] == "Cotton bib."
    assert json.loads(items["0001"]["attributes"]) == {
        "categories": ["Baby", "Toys"],
        "brand": "Acme",
        "price": "$9.99",
    }
    assert json.loads(items["0002"]["attributes"]) == {"categories": [["Baby", "Feeding"]]}
    assert sorted(ws.read("users")["user_id"].to_pylist()) == ["A1", "A2"]
    inter = ws.read("interactions").to_pylist()
    assert _seconds(inter) == {
        ("A1", "0001"): 1400000000,
        ("A2", "0001"): 1400000600,
        ("A2", "0002"): 1400001200,
    }
    assert {r["event"] for r in inter} == {"review"} and sorted(r["value"] for r in inter) == [3.0, 4.0, 5.0]
    texts = {(r["user_id"], r["item_id"]): (r["title"], r["text"]) for r in ws.read("reviews").to_pylist()}
    assert texts == {
        ("A1", "0001"): ("Five stars", "Lovely."),
        ("A2", "0001"): (None, "Fine."),
        ("A2", "0002"): ("Good", None),
    }
    again = ingest_amazon(ws, amazon(reviews, meta, images=False))
    assert {name: r.written for name, r in again.tables.items()}[
        "reviews"
    ] == 0  # keyed: re-ingest writes nothing


def test_amazon_2023_layout_converts_milliseconds_and_refuses_urls_offline(tmp_path, ws):
    """2023 layout: parent_asin is the item id, millisecond timestamps become seconds, the first large image is the
    item's `image_url`; with the default fetch policy the TEST-NET URL is quarantined `blocked_address` (no
    request leaves the machine) and the image_url tally balances; the item without images gets none."""
    reviews, meta = _sample_2023(tmp_path)
    src = amazon(reviews, meta)
    assert src.items["image_url"].to_pylist() == [f"{TEST_NET}/l1.jpg", None]
    report = ingest_amazon(ws, src)
    assert report.balanced
    files = report.to_dict()["files"]
    assert files["Home.jsonl.gz"]["stored"] == 3 and files["Home.jsonl.gz"]["reasons"] == {"empty_id": 1}
    assert files["image_url"]["read"] == 1 and files["image_url"]["reasons"] == {"blocked_address": 1}
    assert ws.count("item_images") == 0
    inter = ws.read("interactions").to_pylist()
    assert _seconds(inter) == {("U1", "P1"): 1588615855, ("U1", "P2"): 1600000000, ("U2", "P1"): 1610000000}
    assert min(r["timestamp"] for r in inter) == datetime(2020, 5, 4, 18, 10, 55, tzinfo=UTC)
    items = {r["item_id"]: r for r in ws.read("items").to_pylist()}
    assert items["P1"]["text"] == "Bright.\n\nLED." and items["P2"]["text"] is None
    assert json.loads(items["P1"]["attributes"]) == {
        "categories": ["Home"],
        "store": "LightCo",
        "price": 19.5,
    }
    assert items["P2"]["attributes"] is None
    assert ws.count("reviews") == 3


def test_amazon_layout_is_detected_or_named(tmp_path):
    """A file with neither layout's id key is one `SourceError` naming the keys expected, not a traceback; a
    missing file is one naming the path."""
    reviews, meta = _sample_2023(tmp_path)
    odd = _write(tmp_path / "odd.json.gz", [{"id": 1, "stars": 5}])
    with pytest.raises(SourceError, match=r"'reviewerID' \(2014/2018\) or 'user_id' \(2023\)"):
        amazon(odd, meta)
    with pytest.raises(SourceError, match="not found"):
        amazon(reviews, tmp_path / "absent.json.gz")


def test_forget_user_erases_their_reviews(tmp_path, ws):
    """Review texts are personal data: forgetting a user removes their rows from `reviews` with their
    interactions, and a re-ingest does not bring either back."""
    from recipes.unlearning.forget import forget

    reviews, meta = _sample_2018(tmp_path)
    ingest_amazon(ws, amazon(reviews, meta, images=False))
    receipt = forget(ws, ForgetRequest(request_id="r-a2", kind="user", users=("A2",)))
    assert receipt["verification"]["verified"]
    assert set(ws.read("reviews")["user_id"].to_pylist()) == {"A1"}
    ingest_amazon(ws, amazon(reviews, meta, images=False))
    assert set(ws.read("reviews")["user_id"].to_pylist()) == {"A1"}
    assert set(ws.read("interactions")["user_id"].to_pylist()) == {"A1"}


def test_cli_ingest_amazon(tmp_path):
    """`mmfeat ingest amazon REVIEWS META --json` reports balanced counts with the reviews table; plain `ingest`
    (without the review step) ignores the review columns."""
    reviews, meta = _sample_2023(tmp_path)
    result = CliRunner().invoke(
        cli, ["--workspace", str(tmp_path / "ws"), "ingest", "amazon", str(reviews), str(meta), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["balanced"] and out["tables"]["reviews"]["inserted"] == 3
    assert out["tables"]["interactions"]["inserted"] == 3 and out["source"] == "amazon:Home"
    missing = CliRunner().invoke(
        cli, ["--workspace", str(tmp_path / "ws"), "ingest", "amazon", str(reviews), str(tmp_path / "no.gz")]
    )
    assert missing.exit_code != 0 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_plain_ingest_keeps_reviews_out_of_other_tables(tmp_path, ws):
    """The review columns of the interactions RawSource are for `store_reviews` only: a plain `ingest` writes
    the same interactions and no review text anywhere."""
    reviews, meta = _sample_2023(tmp_path)
    report = ingest(ws, amazon(reviews, meta, images=False))
    assert report.balanced and ws.count("interactions") == 3 and not ws.exists("reviews")
    assert "Works well." not in json.dumps(ws.read("items").to_pylist(), default=str)
