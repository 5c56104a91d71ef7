"""`mmfeat report`: every section renders (chart, or a note naming the command when its data is absent), the file
is self-contained, and the page runs in a real headless browser without JavaScript errors."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from flows.report_cli import report
from recipes.report import (
    SECTIONS,
    Graph,
    ReportConfig,
    ReportData,
    ReportError,
    graph_stats,
    knn_topk,
    load_report_data,
    neighbour_overlap,
    render_report,
    time_bins,
)
from stores.schema import INTERACTIONS, TIMESTAMP, TableSpec
from stores.workspace import conform
from tests.conftest import ingest_ml100k

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must render from the file alone
]

CAPTIONS = TableSpec(
    "captions",
    pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("model", pa.string()),
            pa.field("revision", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("params", pa.string()),
            pa.field("input_hash", pa.string()),
            pa.field("created_at", TIMESTAMP),
        ]
    ),
    key=("item_id", "model"),
)
FORGET = TableSpec(
    "forget_requests",
    pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("kind", pa.string()),
            pa.field("reason", pa.string()),
            pa.field("requester", pa.string()),
            pa.field("created_at", TIMESTAMP),
            pa.field("receipt", pa.string()),
        ]
    ),
    key=("request_id",),
)


def feature_spec(name: str, dim: int) -> TableSpec:
    return TableSpec(
        f"feat_{name}",
        pa.schema(
            [
                pa.field("item_id", pa.string(), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), dim)),
                pa.field("model", pa.string()),
                pa.field("revision", pa.string()),
                pa.field("params", pa.string()),
                pa.field("input_hash", pa.string()),
                pa.field("created_at", TIMESTAMP),
            ]
        ),
        key=("item_id",),
    )


def split_spec(name: str) -> TableSpec:
    fields = [INTERACTIONS.schema.field(c) for c in ("user_id", "item_id", "timestamp", "event", "value")]
    return TableSpec(f"split_{name}", pa.schema([*fields, pa.field("label", pa.int8())]), key=())


def feature_table(ids: list[str], vectors: np.ndarray, model: str) -> pa.Table:
    flat = pa.array(vectors.astype(np.float32).ravel())
    now = datetime.now(UTC)
    return pa.table(
        {
            "item_id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            "model": [model] * len(ids),
            "created_at": pa.array([now] * len(ids), TIMESTAMP),
        }
    )


def add_side_tables(ws) -> None:
    """Captions, an image and a text feature table, a split and a forget request, built cheaply from the data."""
    from recipes.splits import SplitConfig, make_split

    items = ws.read("items", columns=["item_id", "title", "text", "attributes"]).to_pylist()
    images = {
        r["item_id"]: r["image"] for r in ws.read("item_images", columns=["item_id", "image"]).to_pylist()
    }
    now = datetime.now(UTC)
    captions = []
    for n, row in enumerate(items):
        if n % 5 == 4:  # leave some items uncaptioned, as a real run would
            continue
        genres = json.loads(row["attributes"] or "{}").get("genres") or ["film"]
        extra = " ".join(["It has a striking, colourful design."] * (n % 4))
        captions.append(
            {
                "item_id": row["item_id"],
                "caption": f"A movie poster for {row['title']}, a {' and '.join(genres).lower()} film. {extra}",
                "model": "test-captioner",
                "created_at": now,
            }
        )
    ws.upsert(CAPTIONS, conform(pa.Table.from_pylist(captions), CAPTIONS.schema))

    # Image feature: the poster shrunk to 4x4 RGB; text feature: hashed bag of words of the plot.
    img_ids, img_vecs = [], []
    for item_id, data in images.items():
        pixels = Image.open(io.BytesIO(data)).convert("RGB").resize((4, 4))
        img_ids.append(item_id)
        img_vecs.append(np.asarray(pixels, dtype=np.float32).ravel() / 255.0)
    ws.upsert(
        feature_spec("image", 48),
        conform(feature_table(img_ids, np.stack(img_vecs), "tiny-pixels"), feature_spec("image", 48).schema),
    )
    txt_ids, txt_vecs = [], []
    for row in items:
        if not row["text"]:
            continue
        vec = np.zeros(64, dtype=np.float32)
        for word in re.findall(r"[a-z]+", row["text"].lower()):
            vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1
        txt_ids.append(row["item_id"])
        txt_vecs.append(vec)
    ws.upsert(
        feature_spec("text", 64),
        conform(feature_table(txt_ids, np.stack(txt_vecs), "hashed-bow"), feature_spec("text", 64).schema),
    )

    split = make_split(ws.read("interactions"), SplitConfig(scheme="temporal", kcore=5))
    ws.upsert(split_spec("temporal"), conform(split, split_spec("temporal").schema))
    receipt = {"status": "done", "rows_deleted": {"interactions": 20, "users": 1}, "tables_rewritten": 3}
    request = {
        "request_id": "fr-0001",
        "kind": "user",
        "reason": "GDPR art. 17",
        "requester": "dpo@example.org",
        "created_at": now,
        "receipt": json.dumps(receipt),
    }
    pending = request | {
        "request_id": "fr-0002",
        "kind": "item",
        "reason": "licence revoked",
        "receipt": None,
    }
    ws.upsert(FORGET, conform(pa.Table.from_pylist([request, pending]), FORGET.schema))


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)"[^>]*>(.*?)</section>', page, flags=re.S))


def run_chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def with_error_hook(page: str) -> str:
    """The page plus a hook that records any JS error in the title, and a post-load census of rendered charts."""
    hook = (
        "<script>window.__errors=[];function __fail(m){window.__errors.push(String(m));"
        "document.title='JSERROR '+window.__errors.join(' | ');}"
        "window.addEventListener('error',function(e){__fail(e.message)});"
        "window.addEventListener('unhandledrejection',function(e){__fail(e.reason)});"
        "var __ce=console.error;console.error=function(){__fail([].slice.call(arguments).join(' '));"
        "__ce.apply(console,arguments)};</script>"
    )
    census = (
        "<script>window.addEventListener('load',function(){setTimeout(function(){"
        "var out=[];document.querySelectorAll('section').forEach(function(s){"
        "out.push(s.id+'='+s.querySelectorAll('.js-plotly-plot .main-svg').length)});"
        "document.body.setAttribute('data-rendered',out.join(','))},1000)});</script>"
    )
    return page.replace("<head>", "<head>" + hook, 1).replace("</body>", census + "</body>", 1)


@pytest.mark.realdata
@pytest.mark.slow
def test_ml100k_report_renders_every_section_in_a_browser(ws, ml100k, tmp_path):
    """With every table present, each section holds a chart, the file is self-contained (plotly.js inlined once,
    thumbnails as data URIs, no network reference), small, and Chromium renders it without a JS error."""
    ingest_ml100k(ws, ml100k)
    add_side_tables(ws)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(report, ["--out", str(out)], obj={"workspace": ws.uri})
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")

    found = sections(page)
    assert list(found) == list(SECTIONS)
    for key, body in found.items():
        assert 'class="plotly-graph-div"' in body, f"section {key} has no chart"
        assert 'class="note"' not in body, f"section {key} shows a note although its data exists"
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    assert page.count(plotly_js) == 1
    ours = page.replace(plotly_js, "")
    assert not re.search(r'(src|href)="(https?:)?//|<link', ours), (
        "the report must not load anything from the network"
    )
    assert page.count('src="data:image/jpeg;base64,') >= 4
    assert "split temporal" in page and "fr-0001" in page and "rows_deleted" in page
    assert "feat_image" in page and "feat_text" in page and "image ∩ text" in page
    assert out.stat().st_size < 20e6

    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} not found; install it with tests/install_chromium.sh to check the page in a browser"
        )
    hooked = tmp_path / "report-hooked.html"
    hooked.write_text(with_error_hook(page), encoding="utf-8")
    dom = run_chromium(hooked, tmp_path, "--dump-dom", "--virtual-time-budget=20000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", dom.stdout, flags=re.S).group(1)
    assert "JSERROR" not in title, title
    rendered = dict(
        p.split("=") for p in re.search(r'data-rendered="([^"]*)"', dom.stdout).group(1).split(",")
    )
    assert set(rendered) == set(SECTIONS)
    for key, n in rendered.items():
        assert int(n) >= 1, f"section {key}: no chart was drawn by plotly.js in the browser"

    shot = tmp_path / "report.png"
    snap = run_chromium(
        out,
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1400,4000",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
    )
    assert snap.returncode == 0 and shot.exists(), snap.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1400, 4000)
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # not a blank page


def tiny_workspace(ws) -> None:
    rows = pa.table(
        {
            "user_id": ["u1", "u1", "u2", "u3"],
            "item_id": ["a", "b", "a", "c"],
            "timestamp": pa.array([0, 86400, 2 * 86400, 3 * 86400], pa.timestamp("s", tz="UTC")),
            "event": ["click"] * 4,
            "seq": pa.array([0] * 4, pa.int32()),
        }
    )
    ws.upsert(INTERACTIONS, conform(rows, INTERACTIONS.schema))


def test_absent_tables_give_notes_not_errors(ws, tmp_path):
    """Every section renders when its data is absent, with a note naming the command that produces it."""
    empty = render_report(load_report_data(ws))
    assert list(sections(empty)) == list(SECTIONS)
    for key, body in sections(empty).items():
        assert 'class="note"' in body, key
        assert "could not build" not in body, body
    assert "run <code>mmfeat caption</code>" in sections(empty)["captions"]

    tiny_workspace(ws)
    page = render_report(load_report_data(ws), ReportConfig(kcore=2))
    found = sections(page)
    for key in ("card", "degrees", "time"):
        assert 'class="plotly-graph-div"' in found[key] and "could not build" not in found[key], found[key]
    assert "no feature tables" in found["projections"] and "no forget requests" in found["forget"]


def test_stored_graph_is_used_and_item_text_is_escaped(ws):
    """A stored graph_<feature> replaces the computed kNN for that feature, and item text from the data is
    HTML-escaped, so a hostile title cannot inject markup into the report."""
    from stores.schema import ITEMS

    tiny_workspace(ws)
    hostile = "<script>alert(1)</script>"
    items = pa.table(
        {"item_id": ["a", "b", "c"], "title": [hostile, "B", "C"], "content_hash": ["1", "2", "3"]}
    )
    ws.upsert(ITEMS, conform(items, ITEMS.schema))
    vectors = np.eye(3, 4, dtype=np.float32)
    ws.db.create_table("feat_x", feature_table(["a", "b", "c"], vectors, "m"))
    ws.db.create_table("graph_x", pa.table({"src": [0, 1, 2], "dst": [1, 0, 0], "weight": [1.0, 1.0, 1.0]}))
    page = render_report(load_report_data(ws), ReportConfig(kcore=1))
    knn = sections(page)["knn"]
    assert "stored table graph_x" in knn and "computed" not in knn
    assert "<td>66.7%</td>" in knn  # reciprocity: a<->b mutual, c->a not
    assert hostile not in page and html.escape(hostile) in page


def test_unknown_split_and_missing_snapshots_are_clear_errors(ws, tmp_path):
    """A split that does not exist names the ones that do; --snapshot without stores.snapshots says so."""
    tiny_workspace(ws)
    with pytest.raises(ReportError, match="no split named 'nope'"):
        load_report_data(ws, split="nope")
    result = CliRunner().invoke(
        report, ["--split", "nope", "--out", str(tmp_path / "r.html")], obj={"workspace": ws.uri}
    )
    assert result.exit_code != 0 and "no split named" in result.output
    try:
        import stores.snapshots  # noqa: F401
    except ImportError:
        with pytest.raises(ReportError, match="stores/snapshots.py"):
            load_report_data(ws, snapshot="v1")


def test_knn_topk_matches_brute_force_and_excludes_self():
    """The blocked top-k equals a full sort of cosine similarities, and an item is never its own neighbour."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    got = knn_topk(x, 5, block=7)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert all(set(g) == set(w) for g, w in zip(got, want, strict=True))
    assert not (got == np.arange(50)[:, None]).any()


def test_graph_stats_and_overlap_on_a_hand_built_graph():
    """Reciprocity counts mutual edges; overlap compares neighbours by item id, whatever the node order."""
    g = Graph("a", "test", np.array([0, 1, 2, 2]), np.array([1, 0, 0, 2]), np.array(["x", "y", "z"]), 3)
    stats = graph_stats(g)  # the self-loop 2->2 is ignored
    assert (
        stats["edges"] == 3
        and stats["reciprocity"] == pytest.approx(2 / 3)
        and stats["no_in"] == pytest.approx(1 / 3)
    )
    # the same neighbourhoods, nodes listed in another order: x->y, y->x, z->y
    h = Graph("b", "test", np.array([1, 0, 2]), np.array([0, 1, 0]), np.array(["y", "x", "z"]), 3)
    shared = neighbour_overlap(g, h)  # common items x, y, z in sorted order
    assert shared.tolist() == [1, 1, 0]


def test_time_bins_pick_a_readable_width():
    """Seven months of ratings bin by day; ten years by 30 days; every timestamp falls inside the edges."""
    day = np.array([0, 200 * 86400])
    edges, width, unit = time_bins(day)
    assert unit == "day" and edges[0] <= 0 and edges[-1] > day[-1]
    assert time_bins(np.array([0, 3650 * 86400]))[2] == "30 days"


def test_report_data_defaults_render():
    """A ReportData with nothing in it is a valid report (the CLI's worst case)."""
    page = render_report(ReportData(source="memory://"))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
