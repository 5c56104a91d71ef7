"""An `s3://` workspace against a local S3-compatible server (moto, on loopback, started here): the refresh flow
ingests, encodes with tiny models (Ray workers read the image bytes from S3 themselves), splits, builds a graph
and a snapshot, and everything reads back through LanceDB and DuckDB; a second refresh writes nothing."""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.slow
BUCKET = "mmfeat-test"


@pytest.fixture
def bucket(s3_endpoint):
    """This test's bucket on the session's moto server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return BUCKET


def test_refresh_on_an_s3_workspace(s3_endpoint, bucket, prefect_api, ray_local, tmp_path):
    """ingest -> encode (tiny CLIP, image and text) -> split -> kNN graph -> snapshot on s3://; read back the
    rows, vectors and split, query them with DuckDB, and a second refresh writes 0 rows."""
    import boto3

    from flows.pipeline import refresh_flow
    from stores.snapshots import snapshot_versions
    from stores.sql import run_sql
    from stores.workspace import Workspace

    cfg = {
        "name": "s3demo",
        "sources": [
            {"kind": "demo", "name": "demo", "n_items": 24, "n_users": 12, "dir": str(tmp_path / "src")}
        ],
        "extract": [
            {"feature": "clip_image", "kind": "clip_image", "model": "test:tiny-clip", "batch_size": 8},
            {"feature": "clip_title", "kind": "clip_text", "model": "test:tiny-clip", "fields": ["title"]},
        ],
        "splits": [{"name": "main", "scheme": "random", "kcore": 0, "seed": 1}],
        "graphs": [{"type": "knn", "split": "main", "features": ["clip_image"], "k": 5}],
        "snapshot": {"name": "s3demo-{n}", "split": "main"},
    }
    path = tmp_path / "s3demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = f"s3://{BUCKET}/workspaces/demo"
    first = refresh_flow(str(path), uri)
    assert first["workspace"] == uri and first["snapshot"]["snapshot"] == "s3demo-1"

    ws = Workspace(uri)
    assert ws.storage_options["aws_endpoint"] == s3_endpoint and not ws.is_local
    assert ws.count("items") == ws.count("item_images") == 24
    vectors = ws.read("feat_clip_image", columns=["item_id", "vector"])
    assert vectors.num_rows == 24 and vectors.schema.field("vector").type.list_size == 32
    assert ws.count("feat_clip_title") == 24
    split = ws.read("split_main")
    assert split.num_rows == ws.count("interactions") and set(split["label"].to_pylist()) == {0, 1, 2}
    counts = run_sql(ws, "select label, count(*) n from split_main group by 1 order by 1").to_pylist()
    assert sum(r["n"] for r in counts) == split.num_rows
    pins = snapshot_versions(ws, "s3demo-1")
    assert run_sql(ws, "select count(*) n from feat_clip_image", versions=pins).to_pylist() == [{"n": 24}]
    keys = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="workspaces/demo/")
    assert any(
        o["Key"].startswith("workspaces/demo/feat_clip_image.lance/") for o in keys.get("Contents", [])
    )

    second = refresh_flow(str(path), uri)
    assert second["model_calls"] == 0 and second["rows_written"] == 0 and second["tables_changed"] == []
