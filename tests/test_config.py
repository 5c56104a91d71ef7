"""The pipeline config: every shipped YAML loads; bad keys and values fail naming the key and the fix; the
H&M-style and Amazon/MMRec-style configs map their layouts onto the workspace as they claim."""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from recipes.config import (
    CONFIG_DIR,
    ConfigError,
    DemoSource,
    check_cron,
    ensure_demo_catalog,
    graph_name,
    load_config,
    open_source,
    parse_config,
    shipped_configs,
)
from recipes.ingest.load import ingest

REQUIRED = {"demo", "ml100k", "hm_fashion", "amazon_mmrec"}
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # what LanceDB accepts


def _demo() -> dict:
    return yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, label="demo.yaml")
    return str(err.value)


def test_every_shipped_config_loads():
    """Each YAML in recipes/configs/ validates, is named after its file, opens with the command that runs it, and
    names graphs LanceDB accepts; the four required datasets are all shipped."""
    paths = shipped_configs()
    assert {p.stem for p in paths} >= REQUIRED
    for path in paths:
        cfg = load_config(path)
        assert cfg.name == path.stem
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run:") and "mmfeat" in first and " run " in first, first
        assert cfg.sources and cfg.extract and cfg.splits and cfg.graphs and cfg.snapshot, path.name
        for g in cfg.graphs:
            assert _TABLE_NAME.match(f"graph_{graph_name(g)}"), graph_name(g)
        for s in cfg.schedules:
            check_cron(s.cron)
    assert load_config("demo").file == CONFIG_DIR / "demo.yaml"  # a shipped name works without a path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["sources"][0].update(n_itemz=3),
            ["sources[0].n_itemz", "unknown key", "did you mean 'n_items'", "Valid keys here"],
        ),
        (lambda d: d.update(extrct=[]), ["extrct: unknown key", "did you mean 'extract'"]),
        (lambda d: d["graphs"][1].update(kk=3), ["graphs[1].kk", "did you mean 'k'"]),
        (lambda d: d["run"].update(timeout=3), ["run.timeout", "step_timeout_s"]),
        (lambda d: d["sources"][0].update(kind="demos"), ["sources[0].kind", "'demos'", "'demo'"]),
        (
            lambda d: d["splits"][0].update(scheme="randm"),
            ["splits[0].scheme", "'randm'", "did you mean 'random'"],
        ),
        (lambda d: d["splits"][0].update(ratios=[0.5, 0.1, 0.1]), ["splits[0]", "summing to 1"]),
        (lambda d: d["extract"][1].update(batch_size="big"), ["extract[1].batch_size", "'big'", "integer"]),
        (
            lambda d: d["graphs"][1].update(features=["clip_imag", "text"]),
            ["graphs[1].features", "'clip_imag'", "did you mean 'clip_image'"],
        ),
        (lambda d: d["graphs"][0].update(split="mian"), ["graphs[0].split", "'mian'", "did you mean 'main'"]),
        (
            lambda d: d["schedules"][0].update(cron="61 3 * * *"),
            ["schedules[0].cron", "'61'", "minute", "0-59"],
        ),
        (lambda d: d["schedules"][0].update(cron="0 3 * *"), ["schedules[0].cron", "has 4 fields; write 5"]),
        (lambda d: d["schedules"][0].update(timezone="Mars/Base"), ["schedules[0].timezone", "IANA"]),
        (lambda d: d["extract"][0].update(feature="captions"), ["extract[0]", "feature: caption"]),
        (lambda d: d["extract"].reverse(), ["reads captions", "before it"]),
        (lambda d: d["extract"][1].update(prompt="hi"), ["extract[1]", "prompt applies to kind: caption"]),
        (lambda d: d["forget"][0].update(users=[]), ["forget[0]", "needs", "users"]),
        (lambda d: d["forget"][0].update(request_id="bad id!"), ["forget[0].request_id", "pattern"]),
        (lambda d: d["snapshot"].update(name="{cfg}"), ["snapshot.name", "{config}"]),
        (lambda d: d["snapshot"].update(features=["caption"]), ["snapshot.features", "'caption'"]),
        (lambda d: d["run"].update(retries=-1), ["run.retries", "greater than or equal to 0"]),
        (
            lambda d: d["exports"][0].update(missing="avg"),
            ["exports[0].missing", "'avg'", "mean, zero, drop"],
        ),
        (lambda d: d.pop("sources"), ["sources: required key is missing"]),
        (lambda d: d["splits"].append(dict(d["splits"][0])), ["splits", "more than once"]),
    ],
)
def test_bad_config_names_the_key_and_the_fix(mutate, expected):
    """A wrong key or value is reported with its dotted path, what was wrong and what would be right."""
    data = copy.deepcopy(_demo())
    mutate(data)
    message = _error(data)
    assert message.startswith("demo.yaml"), message
    for part in expected:
        assert part in message, (part, message)


def test_env_expansion_and_relative_paths(tmp_path, monkeypatch):
    """${VAR:-default} is expanded, an unset ${VAR} is an error naming it, and relative input paths resolve
    against the config file's folder whatever the current folder."""
    text = "# Run: mmfeat run cfg.yaml\nname: t\nsources:\n  - {kind: movielens, path: '${T_ML:-data}/ml-100k'}\n"
    (tmp_path / "cfg.yaml").write_text(text)
    monkeypatch.chdir("/")
    monkeypatch.delenv("T_ML", raising=False)
    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.path(cfg.sources[0].path) == tmp_path / "data" / "ml-100k"
    monkeypatch.setenv("T_ML", "/elsewhere")
    assert load_config(tmp_path / "cfg.yaml").sources[0].path == "/elsewhere/ml-100k"
    (tmp_path / "bad.yaml").write_text(text.replace("${T_ML:-data}", "${T_UNSET_VAR}"))
    with pytest.raises(ConfigError, match=r"T_UNSET_VAR.*not set"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_demo_catalog_is_generated_once(tmp_path):
    """The demo source is generated once per parameters, so rows appended to it later (new items) stay."""
    spec = DemoSource(kind="demo", n_items=12, n_users=6)
    root = ensure_demo_catalog(tmp_path / "src", spec)
    with open(root / "items.csv", "a") as fh:
        fh.write("999999,Extra,an appended item,,toys,1.00,cc-by-4.0\n")
    ensure_demo_catalog(tmp_path / "src", spec)
    assert "999999" in (root / "items.csv").read_text()
    ensure_demo_catalog(tmp_path / "src", DemoSource(kind="demo", n_items=13, n_users=6))
    assert "999999" not in (root / "items.csv").read_text()


def _jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, quality=90)


def test_hm_fashion_config_ingests_hm_layout(tmp_path, monkeypatch, ws):
    """hm_fashion.yaml on an H&M-style folder: ids keep their leading zeros, dates parse, a repeat purchase on
    the same day stays two rows, image paths come from the id template, image-only items keep their image."""
    root = tmp_path / "hm"
    articles = [
        ("0108775015", "Strap top", "Jersey top with narrow straps."),
        ("0108775044", "Strap top (1)", ""),  # image-only: no description
        ("0110065001", "OP T-shirt (Idro)", "Short-sleeved top."),
        ("0111565001", "20 den 1p Stockings", ""),
    ]  # no image file, no description
    root.mkdir()
    with open(root / "articles.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "article_id",
                "product_code",
                "prod_name",
                "product_type_name",
                "colour_group_name",
                "detail_desc",
            ]
        )
        for aid, name, desc in articles:
            w.writerow([aid, aid[:7], name, "Vest top", "Black", desc])
    for aid, colour in (
        ("0108775015", (0, 0, 0)),
        ("0108775044", (250, 250, 250)),
        ("0110065001", (200, 0, 0)),
    ):
        _jpeg(root / "images" / aid[:3] / f"{aid}.jpg", colour)
    cust = "00000dbacae5abe5e23885899a1fa44253a17956c6d1c3d25f88aa139fdfc657"
    with open(root / "customers.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["customer_id", "age", "club_member_status"], [cust, "49", "ACTIVE"]])
    with open(root / "transactions_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_dat", "customer_id", "article_id", "price", "sales_channel_id"])
        w.writerow(["2018-09-20", cust, "0108775015", "0.0508", "2"])
        w.writerow(
            ["2018-09-20", cust, "0108775015", "0.0508", "2"]
        )  # same item, same day: a repeat purchase
        w.writerow(["2018-09-21", cust, "0110065001", "0.0305", "1"])
    monkeypatch.setenv("MMFEAT_HM", str(root))
    cfg = load_config("hm_fashion")
    report = ingest(ws, open_source(cfg, cfg.sources[0], ws.uri))
    assert report.balanced
    items = {r["item_id"]: r for r in ws.read("items").to_pylist()}
    assert set(items) == {a for a, _, _ in articles}
    assert items["0108775044"]["text"] in (None, "") and items["0108775044"]["title"] == "Strap top (1)"
    assert sorted(ws.read("item_images", columns=["item_id"])["item_id"].to_pylist()) == [
        "0108775015",
        "0108775044",
        "0110065001",
    ]
    inter = ws.read("interactions").to_pylist()
    repeat = sorted(r["seq"] for r in inter if r["item_id"] == "0108775015")
    assert repeat == [0, 1] and {r["event"] for r in inter} == {"purchase"}
    assert {r["timestamp"].date().isoformat() for r in inter} == {"2018-09-20", "2018-09-21"}
    assert ws.count("quarantine") == 0


def test_amazon_mmrec_config_ingests_raw_amazon_files(tmp_path, monkeypatch, ws):
    """amazon_mmrec.yaml is a source of kind amazon over the raw files in $MMFEAT_AMAZON: reviews and metadata
    (2014/2018 layout, gzipped JSON lines) become items, derived users, review interactions and review texts."""
    import gzip

    from recipes.refresh import ingest_source

    root = tmp_path / "baby"
    root.mkdir()
    with gzip.open(root / "meta_Baby.json.gz", "wt") as fh:
        for i in range(3):
            meta = {"asin": f"B00{i}", "title": f"Baby item {i}", "description": [f"Soft thing {i}."]}
            fh.write(json.dumps(meta | {"categories": [["Baby"]]}) + "\n")
    with gzip.open(root / "reviews_Baby_5.json.gz", "wt") as fh:
        for u in range(2):
            for i in range(3):
                review = {"reviewerID": f"A{u}", "asin": f"B00{i}", "overall": 5.0, "reviewText": "nice"}
                fh.write(json.dumps(review | {"unixReviewTime": 1400000000 + 60 * (u * 3 + i)}) + "\n")
    monkeypatch.setenv("MMFEAT_AMAZON", str(root))
    cfg = load_config("amazon_mmrec")
    assert cfg.sources[0].kind == "amazon"
    out = ingest_source(ws, cfg, cfg.sources[0].name)
    assert ws.count("quarantine") == 0 and out["by_table"]["reviews"] == 6
    items = {r["item_id"]: r for r in ws.read("items").to_pylist()}
    assert items["B001"]["text"] == "Soft thing 1." and json.loads(items["B001"]["attributes"]) == {
        "categories": [["Baby"]]
    }
    assert ws.count("users") == 2 and ws.count("interactions") == 6
    assert {r["event"] for r in ws.read("interactions").to_pylist()} == {"review"}


def test_missing_data_path_names_its_variable(tmp_path, monkeypatch):
    """A shipped config whose data is absent fails with one line naming the variable (MMFEAT_HM): unset, it says
    the default was used and how to set it; set to a folder without the files, it names the value."""
    from recipes.ingest.records import SourceError

    monkeypatch.delenv("MMFEAT_HM", raising=False)
    cfg = load_config("hm_fashion")
    with pytest.raises(SourceError) as err:
        open_source(cfg, cfg.sources[0], str(tmp_path / "ws"))
    msg = str(err.value)
    assert "\n" not in msg and "MMFEAT_HM is not set" in msg and "export MMFEAT_HM=" in msg, msg
    monkeypatch.setenv("MMFEAT_HM", str(tmp_path / "nothing"))
    cfg = load_config("hm_fashion")
    with pytest.raises(SourceError, match=r"articles\.csv not found: MMFEAT_HM='.*nothing' does not hold it"):
        open_source(cfg, cfg.sources[0], str(tmp_path / "ws"))
    (tmp_path / "cfg.yaml").write_text(
        "# Run: mmfeat run cfg.yaml\nname: t\nsources:\n  - {kind: mmrec, path: data/baby}\n"
    )
    plain = load_config(tmp_path / "cfg.yaml")
    with pytest.raises(SourceError, match=rf"{tmp_path / 'data' / 'baby'} not found; fix the path in"):
        open_source(plain, plain.sources[0], str(tmp_path / "ws"))


@pytest.mark.slow  # starts Prefect's temporary server (about 20 s)
def test_mmfeat_run_missing_path_is_one_line(tmp_path, monkeypatch):
    """`mmfeat run hm_fashion` without its data prints one `Error:` line naming MMFEAT_HM, no traceback."""
    from click.testing import CliRunner

    from flows.cli import cli

    monkeypatch.delenv("MMFEAT_HM", raising=False)
    result = CliRunner().invoke(cli, ["--workspace", str(tmp_path / "ws"), "run", "hm_fashion"])
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "MMFEAT_HM" in errors[0], result.stderr
    assert "Traceback" not in result.output


def test_ingest_table_image_template_and_warning(tmp_path):
    """`ingest table --image-template` finds images from the item id (H&M's `{item_id:.3}/{item_id}.jpg`); with
    --images but neither an image column nor a template that matches a file, one warning line says so."""
    from click.testing import CliRunner

    from flows.cli import cli

    (tmp_path / "items.csv").write_text("article_id,prod_name\n0108775015,Strap top\n0110065001,T-shirt\n")
    _jpeg(tmp_path / "images" / "010" / "0108775015.jpg", (10, 20, 30))
    base = ["ingest", "table", "--items", str(tmp_path / "items.csv"), "--images", str(tmp_path / "images")]
    base += ["--map", "article_id=item_id", "--json"]
    ok = CliRunner().invoke(
        cli, ["--workspace", str(tmp_path / "ws"), *base, "--image-template", "{item_id:.3}/{item_id}.jpg"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["tables"]["item_images"]["inserted"] == 1 and "warning" not in ok.stderr
    bare = CliRunner().invoke(cli, ["--workspace", str(tmp_path / "ws2"), *base])
    assert bare.exit_code == 0, bare.output
    warnings = [line for line in bare.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--image-template" in warnings[0], bare.stderr
    bad = CliRunner().invoke(
        cli, ["--workspace", str(tmp_path / "ws3"), *base, "--image-template", "{sku}.jpg"]
    )
    assert bad.exit_code != 0 and "{sku}.jpg" in bad.stderr and "Traceback" not in bad.output
