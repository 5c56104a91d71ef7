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
from recipes.report.charts import Graph, graph_stats, knn_to_graph, neighbour_overlap, time_bins
from recipes.report.data import feature_modality, load_report_data
from recipes.report.render import SECTIONS, ReportConfig, ReportData, ReportError, render_report
from stores.artifacts import save_split
from stores.erasure.log import FORGET_REQUESTS
from stores.features import CAPTIONS, feature_spec
from stores.schema import INTERACTIONS, ITEMS, TIMESTAMP
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


def feature_rows(ids: list[str], vectors: np.ndarray, model: str) -> pa.Table:
    flat = pa.array(vectors.astype(np.float32).ravel())
    now = datetime.now(UTC)
    return pa.table(
        {
            "item_id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            "model": [model] * len(ids),
            "input_hash": [f"{model}:{i}" for i in ids],
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
                "input_hash": f"caption:{row['item_id']}",
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
        conform(feature_rows(img_ids, np.stack(img_vecs), "tiny-pixels"), feature_spec("image", 48).schema),
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
        conform(feature_rows(txt_ids, np.stack(txt_vecs), "hashed-bow"), feature_spec("text", 64).schema),
    )

    split = make_split(ws.read("interactions"), SplitConfig(scheme="temporal", kcore=5))
    save_split(ws, "temporal", split, {})
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
    ws.upsert(FORGET_REQUESTS, conform(pa.Table.from_pylist([request, pending]), FORGET_REQUESTS.schema))


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
    """Every section renders when its data is absent, with a note naming the real CLI command that produces it."""
    empty = render_report(load_report_data(ws))
    assert list(sections(empty)) == list(SECTIONS)
    for key, body in sections(empty).items():
        assert 'class="note"' in body, key
        assert "could not build" not in body, body
    found = sections(empty)
    assert "run <code>mmfeat caption</code>" in found["captions"]
    assert "<code>mmfeat ingest movielens|mmrec|recbole|table ...</code>" in found["card"]
    assert "<code>mmfeat encode image|text|caption</code>" in found["projections"]
    assert "<code>mmfeat graph knn --split NAME --feature FEATURE</code>" in found["knn"]
    assert "<code>mmfeat forget user|item|" in found["forget"]
    assert "mmfeat embed" not in empty

    tiny_workspace(ws)
    page = render_report(load_report_data(ws), ReportConfig(kcore=2))
    found = sections(page)
    for key in ("card", "degrees", "time"):
        assert 'class="plotly-graph-div"' in found[key] and "could not build" not in found[key], found[key]
    assert "no feature tables" in found["projections"] and "no forget requests" in found["forget"]


HOSTILE = "<script>alert(1)</script>"


def graph_workspace(ws) -> dict[str, str]:
    """8 items (one with a hostile title), 6 users with 5 interactions each, a 6-d image and a 5-d text feature,
    split "s", and through the real recipe path a kNN graph of each feature and a user-item graph on it."""
    from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
    from recipes.splits import SplitConfig

    ids = list("abcdefgh")
    titles = [HOSTILE] + [f"Item {i}" for i in ids[1:]]
    items = pa.table({"item_id": ids, "title": titles, "content_hash": ids})
    ws.upsert(ITEMS, conform(items, ITEMS.schema))
    users = [f"u{n}" for n in range(6) for _ in range(5)]
    bought = [ids[(n + j * (n % 3 + 1)) % 8] for n in range(6) for j in range(5)]
    rows = pa.table(
        {
            "user_id": users,
            "item_id": bought,
            "timestamp": pa.array([86400 * t for t in range(30)], pa.timestamp("s", tz="UTC")),
            "event": ["click"] * 30,
            "seq": pa.array([0] * 30, pa.int32()),
        }
    )
    ws.upsert(INTERACTIONS, conform(rows, INTERACTIONS.schema))
    rng = np.random.default_rng(7)
    for name, dim in (("image", 6), ("text", 5)):
        spec = feature_spec(name, dim)
        vectors = rng.standard_normal((8, dim))
        ws.upsert(spec, conform(feature_rows(ids, vectors, f"tiny-{name}"), spec.schema))
    build_split(ws, "s", SplitConfig(scheme="random", seed=0))
    return {
        "image": build_knn_graph(ws, "s", ["image"], k=3)["name"],
        "text": build_knn_graph(ws, "s", ["text"], k=3)["name"],
        "ui": build_ui_graph(ws, "s")["name"],
    }


def neighbours(ws, graph: str) -> dict[str, set[str]]:
    """Out-neighbours by item id of a stored graph, self-loops left out."""
    out: dict[str, set[str]] = {}
    for e in ws.read(f"graph_{graph}", columns=["src", "dst"]).to_pylist():
        if e["src"] != e["dst"]:
            out.setdefault(e["src"], set()).add(e["dst"])
    return out


def knn_row(knn: str, graph: str) -> list[str]:
    row = re.search(rf"<tr><td>{re.escape(graph)}</td>(.*?)</tr>", knn)
    assert row, f"no row for {graph} in the kNN table"
    return re.findall(r"<td>(.*?)</td>", row.group(1))


def test_stored_knn_graphs_give_stats_and_overlap_and_item_text_is_escaped(ws):
    """Stored item-item kNN graphs (string-id edge tables found through their manifests) replace the computed
    graphs of their features; their reciprocity and image-vs-text neighbour overlap match the edge tables;
    other stored graphs are listed; and item text from the data is HTML-escaped (no markup injection)."""
    graphs = graph_workspace(ws)
    page = render_report(load_report_data(ws), ReportConfig(kcore=1))
    knn = sections(page)["knn"]
    assert "computed" not in knn and "could not build" not in knn, knn
    img, txt = neighbours(ws, graphs["image"]), neighbours(ws, graphs["text"])
    for key, edges in (("image", img), ("text", txt)):
        pairs = {(u, v) for u, vs in edges.items() for v in vs}
        mutual = sum((v, u) in pairs for u, v in pairs)
        cells = knn_row(knn, graphs[key])
        assert cells[0].startswith(f"stored graph_{graphs[key]} (split s v"), cells
        assert cells[1:3] == ["8", str(len(pairs))] and cells[-1] == f"{mutual / len(pairs):.1%}", cells
    common = sorted(set(img) & set(txt))
    shared = np.mean([len(img[i] & txt[i]) for i in common])
    assert (
        f"{graphs['image']} ∩ {graphs['text']}: on average {shared:.2f} shared neighbours per item "
        f"({len(common)} items compared)"
    ) in knn
    assert "Other stored graphs" in knn and f"<td>{graphs['ui']}</td><td>user-item</td>" in knn
    assert HOSTILE not in page and html.escape(HOSTILE) in page


def test_feature_modality_prefers_what_the_extractor_recorded():
    """The extractor's recorded input source decides; otherwise a word of the feature name, caption first."""
    assert feature_modality("mine", json.dumps({"input": {"source": "image"}})) == "image"
    assert feature_modality("clip_title", None) == "text"
    assert feature_modality("caption_text", None) == "caption"
    assert feature_modality("clip_image", "not json") == "image"
    assert feature_modality("x", None) is None


def test_snapshot_report_shows_the_pinned_versions(ws, tmp_path):
    """`mmfeat report --snapshot` reads every table at the version the snapshot pins: rows ingested after it do
    not show, its stored graphs do; an unknown snapshot is a one-line error naming the ones that exist."""
    from stores.snapshots import create_snapshot

    graphs = graph_workspace(ws)
    create_snapshot(ws, "v1", split="s", features=["image", "text"], graphs=[graphs["image"], graphs["text"]])
    pinned = ws.version("interactions")
    ws.upsert(ITEMS, conform(pa.table({"item_id": ["i"], "content_hash": ["9"]}), ITEMS.schema))
    more = pa.table(
        {
            "user_id": ["u9"] * 3,
            "item_id": ["a", "b", "i"],
            "timestamp": pa.array([10**8, 10**8 + 1, 10**8 + 2], pa.timestamp("s", tz="UTC")),
            "event": ["click"] * 3,
            "seq": pa.array([0] * 3, pa.int32()),
        }
    )
    ws.upsert(INTERACTIONS, conform(more, INTERACTIONS.schema))
    assert ws.version("interactions") != pinned

    def card(*args: str) -> tuple[str, str]:
        out = tmp_path / f"report{len(args)}.html"
        result = CliRunner().invoke(report, [*args, "--out", str(out)], obj={"workspace": ws.uri})
        assert result.exit_code == 0, result.output
        page = out.read_text(encoding="utf-8")
        return page, sections(page)["card"]

    page, found = card("--snapshot", "v1")
    assert "<th>items (items table)</th><td>8</td>" in found
    assert "<th>interactions</th><td>30</td>" in found, found
    assert "snapshot v1" in page and f"interactions@{pinned}" in page
    assert f"<td>{graphs['image']}</td>" in sections(page)["knn"] and "computed" not in sections(page)["knn"]
    _, found = card()
    assert "<th>items (items table)</th><td>9</td>" in found and "<th>interactions</th><td>33</td>" in found

    result = CliRunner().invoke(
        report, ["--snapshot", "nope", "--out", str(tmp_path / "r.html")], obj={"workspace": ws.uri}
    )
    assert result.exit_code != 0 and "no snapshot named 'nope'" in result.output and "v1" in result.output


def test_unknown_split_and_missing_snapshots_are_clear_errors(ws, tmp_path):
    """A split that does not exist names the ones that do and the command that makes one; --snapshot without
    stores.snapshots says so."""
    tiny_workspace(ws)
    with pytest.raises(ReportError, match=r"no split named 'nope'.*`mmfeat split --name nope"):
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


def test_computed_knn_graph_matches_brute_force_and_excludes_self():
    """The report's computed kNN graph (through recipes.graphs.knn's top-k) equals a full sort of cosine
    similarities, an item is never its own neighbour, and k is capped at n - 1."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    g = knn_to_graph("f", np.arange(50).astype(str), x, 5, "computed")
    got = g.dst.reshape(50, 5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert all(set(a) == set(w) for a, w in zip(got, want, strict=True))
    assert not (got == np.arange(50)[:, None]).any()
    assert len(knn_to_graph("f", np.array(["a", "b", "c"]), x[:3], 5, "computed").dst) == 3 * 2


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


def test_hostile_values_are_escaped_everywhere_they_show():
    """Every value taken from the data (item title, text, caption, graph name, workspace path, notes) is escaped by
    the templates' autoescaping: a `<script>` in any of them reaches the page only as text."""
    items = pa.table(
        {
            "item_id": ["i1", "i2"],
            "title": [HOSTILE, "ok"],
            "text": ["plain", HOSTILE],
            "attributes": [None, None],
        }
    )
    captions = pa.table({"item_id": ["i2"], "caption": [HOSTILE]})
    data = ReportData(
        source=f"/ws/{HOSTILE}",
        items=items,
        sample_ids=["i1", "i2"],
        captions=captions,
        notes=[HOSTILE],
        other_graphs=[{"name": HOSTILE, "type": "user-item", "node_kind": "user", "nodes": 2, "edges": 1}],
    )
    page = render_report(data)
    assert HOSTILE not in page
    assert page.count(html.escape(HOSTILE)) >= 6, page.count(html.escape(HOSTILE))
    gallery = sections(page)["captions"]
    assert f"<b>{html.escape(HOSTILE)}</b>" in gallery and "could not build" not in gallery


def add_context_rows(ws, tag: str, captions: list[str], images: list[str], quarantined: int) -> None:
    """Captions (distinct strings), images (tiny PNGs), one forget request and `quarantined` quarantine rows."""
    from stores.schema import ITEM_IMAGES, QUARANTINE

    now = datetime.now(UTC)
    rows = [{"item_id": i, "caption": f"{tag} caption of {i}", "model": "m", "input_hash": f"{tag}{i}",
             "created_at": now} for i in captions]  # fmt: skip
    if rows:
        ws.upsert(CAPTIONS, conform(pa.Table.from_pylist(rows), CAPTIONS.schema))
    data = []
    for n, i in enumerate(images):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (n * 30, 10, 10)).save(buf, format="PNG")
        data.append({"item_id": i, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "image": buf.getvalue(),
                     "format": "PNG", "created_at": now})  # fmt: skip
    ws.upsert(ITEM_IMAGES, conform(pa.Table.from_pylist(data), ITEM_IMAGES.schema))
    request = {"request_id": f"fr-{tag}", "kind": "user", "reason": "r", "created_at": now, "receipt": None}
    ws.upsert(FORGET_REQUESTS, conform(pa.Table.from_pylist([request]), FORGET_REQUESTS.schema))
    bad = [{"quarantine_id": f"{tag}{n}", "reason": "bad_row", "created_at": now} for n in range(quarantined)]
    if bad:
        ws.upsert(QUARANTINE, conform(pa.Table.from_pylist(bad), QUARANTINE.schema))


def test_snapshot_report_counts_the_captions_images_forgets_and_quarantine_it_recorded(ws, tmp_path):
    """In snapshot mode the report counts captions, images, forget requests and quarantined rows at the versions
    the snapshot recorded, not "no captions yet" and zeros, and not rows added after it; a snapshot that recorded
    none of them reads the current ones and says so."""
    from stores.snapshots import create_snapshot

    graph_workspace(ws)
    # v0: taken before any caption, image, forget request or quarantined row existed.
    create_snapshot(ws, "v0", split="s", features=["image"])
    add_context_rows(ws, "a", captions=list("abcdef"), images=list("abcd"), quarantined=2)
    create_snapshot(ws, "v1", split="s", features=["image", "text"])
    add_context_rows(ws, "b", captions=list("gh"), images=list("efgh"), quarantined=3)

    d = load_report_data(ws, snapshot="v1")
    counts = (d.captions.num_rows, len(d.image_ids), d.forget.num_rows, d.quarantined)
    assert counts == (6, 4, 1, 2), counts
    assert not [n for n in d.notes if "current version" in n], d.notes
    out = tmp_path / "v1.html"
    result = CliRunner().invoke(report, ["--snapshot", "v1", "--out", str(out)], obj={"workspace": ws.uri})
    assert result.exit_code == 0, result.output
    found = sections(out.read_text(encoding="utf-8"))
    assert "no captions yet" not in found["coverage"] + found["captions"]
    assert "<th>quarantined rows</th><td>2</td>" in found["card"], found["card"]
    assert "fr-a" in found["forget"] and "fr-b" not in found["forget"]
    assert "a caption of a" in found["captions"] and "b caption of" not in found["captions"]

    now = load_report_data(ws)
    assert (now.captions.num_rows, len(now.image_ids), now.forget.num_rows, now.quarantined) == (8, 8, 2, 5)
    old = load_report_data(ws, snapshot="v0")
    assert (old.captions.num_rows, old.forget.num_rows, old.quarantined) == (8, 2, 5)
    assert sorted(n.split(":")[0] for n in old.notes if "current version" in n) == [
        "captions", "forget_requests", "item_images", "quarantine"
    ]  # fmt: skip


@pytest.mark.slow
def test_constant_caption_feature_is_flagged_in_features_snapshots_and_report(ws, tmp_path):
    """Captions of `test:tiny-captioner` are all one string, so they and the MiniLM vectors embedded from them are
    flagged degenerate (with a reason) in `mmfeat features` (table and --json), in the snapshot's manifest and as
    a visible warning in the report; the embedded feature is untrained although MiniLM is real, through its
    captions. A random feature next to it is flagged nowhere."""
    from extractors.registry import caption_spec, text_spec
    from extractors.runner import run_extraction
    from flows.extract_cli import features
    from stores.snapshots import create_snapshot, show_snapshot

    graph_workspace(ws)
    add_context_rows(ws, "a", captions=[], images=list("abcdefgh"), quarantined=0)
    cap = run_extraction(ws, "caption", caption_spec("tiny-test", max_new_tokens=4), source="image",
                         engine="local", progress=False)  # fmt: skip
    text = text_spec(None)  # the packaged, real MiniLM
    enc = run_extraction(ws, "caption_text", text, source="caption", engine="local", progress=False)
    assert cap.done == enc.done == 8
    assert len(set(ws.read("captions", columns=["caption"])["caption"].to_pylist())) == 1

    listed = CliRunner().invoke(features, ["--json"], obj={"workspace": ws.uri})
    assert listed.exit_code == 0, listed.output
    by_name = {f["feature"]: f for f in json.loads(listed.output[listed.output.index("[") :])}
    assert "1 distinct caption" in by_name["caption"]["degenerate"]
    assert "identical" in by_name["caption_text"]["degenerate"]
    assert by_name["caption_text"]["untrained"] and by_name["caption_text"]["untrained_input"]
    assert by_name["image"]["degenerate"] == "" and not by_name["image"]["untrained"]
    table = CliRunner().invoke(features, [], obj={"workspace": ws.uri})
    assert table.exit_code == 0, table.output
    assert "warning: feature caption_text is DEGENERATE" in table.output
    assert "UNTRAINED captions, DEGENERATE" in table.output

    create_snapshot(ws, "v1", split="s", features=["image", "caption_text"])
    health = show_snapshot(ws, "v1")["feature_health"]
    assert health["caption_text"]["untrained"] and "identical" in health["caption_text"]["degenerate"]
    assert health["image"] == {"rows": 8, "missing": 0, "coverage": 1.0, "untrained": False, "degenerate": ""}

    for args in ([], ["--snapshot", "v1"]):
        out = tmp_path / f"report{len(args)}.html"
        result = CliRunner().invoke(report, [*args, "--out", str(out)], obj={"workspace": ws.uri})
        assert result.exit_code == 0, result.output
        found = sections(out.read_text(encoding="utf-8"))
        warned = re.findall(r'class="warn" data-warning="(\w+)"', found["coverage"])
        assert warned == ["caption", "caption_text"], (args, warned)
        assert 'data-warning="caption_text"' in found["projections"] and "untrained" in found["projections"]
        assert 'data-warning="caption"' in found["captions"] and 'data-warning="image"' not in str(found)
