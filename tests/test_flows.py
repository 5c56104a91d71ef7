"""Prefect flows over the pipeline (run against `prefect_test_harness`): refresh is incremental by content
version, forget requests run once per id, only transient errors are retried, `mmfeat run` reports config errors
by key, and `serve` builds one deployment per schedule."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from recipes.config import CONFIG_DIR, load_config
from stores.workspace import Workspace


def _write_config(path: Path, data: dict) -> Path:
    path.write_text("# Run: mmfeat run " + path.name + "\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _demo_config(tmp_path: Path, n_items: int = 40, n_users: int = 20, engine: str = "local") -> Path:
    """The shipped demo config, smaller, with its source, report and exports under `tmp_path`. The fast test runs
    the models in-process (engine local); the Ray path is exercised by the ML-100K and multi-node tests."""
    data = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    data["run"]["engine"] = engine
    data["sources"][0].update(n_items=n_items, n_users=n_users, dir=str(tmp_path / "source"))
    data["report"] = {"out": str(tmp_path / "report.html")}
    data["exports"][0]["out"] = str(tmp_path / "exports" / "mmrec")
    return _write_config(tmp_path / "demo_small.yaml", data)


def _add_items(source: Path, n: int, start: int = 900_000) -> list[str]:
    """Append `n` new items (a row in items.csv and a PNG each) to a demo catalog, as a daily feed would."""
    ids = [f"{start + i:06d}" for i in range(n)]
    with open(source / "items.csv", "a", newline="") as fh:
        w = csv.writer(fh)
        for k, item_id in enumerate(ids):
            Image.new("RGB", (64, 64), (20 * k % 255, 90, 160)).save(source / "images" / f"{item_id}.png")
            w.writerow(
                [
                    item_id,
                    f"New arrival {item_id}",
                    f"A fresh item number {k} for the catalogue.",
                    f"{item_id}.png",
                    "toys",
                    "9.99",
                    "cc-by-4.0",
                ]
            )
    return ids


def _ids(ws: Workspace, table: str) -> set[str]:
    return set(ws.read(table, columns=["item_id"])["item_id"].to_pylist())


def _assert_incremental(cfg_path: Path, ws: Workspace, new_ids_fn) -> dict:
    """refresh twice (the second makes 0 model calls and writes 0 rows), add items, refresh: exactly the new
    items are extracted, by every extractor."""
    from flows.pipeline import refresh_flow

    cfg = load_config(cfg_path)
    first = refresh_flow(str(cfg_path), ws.uri)
    assert first["model_calls"] > 0 and first["snapshot"]["published"]
    for e in first["extract"]:
        assert e["failed"] == 0 and e["done"] == e["eligible"] > 0, e
    second = refresh_flow(str(cfg_path), ws.uri)
    assert second["model_calls"] == 0
    assert second["rows_written"] == 0
    assert second["tables_changed"] == []
    assert all(e["skipped"] for e in second["extract"]) and all(i["skipped"] for i in second["ingest"])
    assert all(r["skipped"] for r in second["recipes"])
    assert second["snapshot"] == first["snapshot"] | {"published": False}
    before = {
        e.feature: _ids(ws, "captions" if e.feature == "caption" else f"feat_{e.feature}")
        for e in cfg.extract
    }
    new_ids = set(new_ids_fn())
    third = refresh_flow(str(cfg_path), ws.uri)
    for e in third["extract"]:
        table = "captions" if e["feature"] == "caption" else f"feat_{e['feature']}"
        assert e["model_calls"] == len(new_ids) == e["done"], e
        assert e["unchanged"] == len(before[e["feature"]]), e
        assert _ids(ws, table) - before[e["feature"]] == new_ids
    return {"first": first, "second": second, "third": third}


def test_refresh_demo_is_incremental(prefect_api, tmp_path):
    """The demo config through Prefect and Ray: run 2 makes 0 model calls and writes 0 rows, its forget request
    is not served again, and after 10 items are added to the source run 3 extracts exactly those 10."""
    cfg_path = _demo_config(tmp_path)
    ws = Workspace(tmp_path / "ws")
    runs = _assert_incremental(cfg_path, ws, lambda: _add_items(tmp_path / "source", 10))
    first, second, third = runs["first"], runs["second"], runs["third"]
    assert first["forget"][0]["status"].startswith("served") and first["forget"][0]["verified"]
    assert second["forget"][0] == {
        "request_id": "demo-gdpr-0001",
        "status": "already served",
        "skipped": True,
        "verified": True,
    }
    assert "u00007" not in set(ws.read("users", columns=["user_id"])["user_id"].to_pylist())
    assert third["snapshot"]["published"] and third["snapshot"]["snapshot"] != first["snapshot"]["snapshot"]
    assert Path(third["report"]["report"]).stat().st_size > 10_000
    assert (tmp_path / "exports" / "mmrec").is_dir()


@pytest.mark.realdata
@pytest.mark.slow
def test_refresh_ml100k_is_incremental(prefect_api, tmp_path, ml100k, monkeypatch):
    """The ML-100K config (a copy of the shared data, so items can be added): run 2 makes 0 model calls and
    writes 0 rows; after 10 movies with posters are added, run 3 extracts exactly those 10."""
    root = tmp_path / "ml100k"
    shutil.copytree(ml100k / "ml-100k", root / "ml-100k")
    shutil.copy(ml100k / "items_tmdb.csv", root / "items_tmdb.csv")
    shutil.copytree(ml100k / "posters", root / "posters")
    monkeypatch.setenv("MMFEAT_ML100K", str(root))
    data = yaml.safe_load(
        (CONFIG_DIR / "ml100k.yaml")
        .read_text()
        .replace("${MMFEAT_ML100K:-../../../shared/data/ml100k-posters}", str(root))
    )
    data["exports"][0]["out"] = str(tmp_path / "exports")
    cfg_path = _write_config(tmp_path / "ml100k.yaml", data)

    def add_movies() -> list[str]:
        ids = [str(2000 + i) for i in range(10)]
        with open(root / "ml-100k" / "u.item", "a", encoding="latin-1") as fh:
            for i, item_id in enumerate(ids):
                fh.write(
                    f"{item_id}|New Film {i} (2026)|01-Jan-2026||http://example.org/{item_id}|"
                    + "|".join("1" if g == i % 19 else "0" for g in range(19))
                    + "\n"
                )
        with open(root / "items_tmdb.csv", newline="") as fh:
            header = next(csv.reader(fh))
        with open(root / "items_tmdb.csv", "a", newline="") as fh:
            w = csv.writer(fh)
            for i, item_id in enumerate(ids):
                row = dict.fromkeys(header, "")
                row |= {
                    "movie_id": item_id,
                    "title": f"New Film {i} (2026)",
                    "overview": f"A new film, number {i}.",
                }
                w.writerow([row[h] for h in header])
        for i, item_id in enumerate(ids):
            src = Image.open(ml100k / "posters" / f"{i + 1}.jpg").convert("RGB")
            src.rotate(90).save(root / "posters" / f"{item_id}.jpg", quality=85)
        return ids

    _assert_incremental(cfg_path, Workspace(tmp_path / "ws"), add_movies)


# ---- retries -----------------------------------------------------------------------------------------------------


def test_error_classification():
    """Only the classes decide: a TransientError anywhere in the cause chain (also inside a Ray task error) is
    retried; a TerminalError, a builtin error nobody classified, or a Ray task error wrapping a ValueError is not.
    Both classes survive pickling (Ray workers, Prefect results) with their class and message."""
    import pickle

    import ray.exceptions as rex

    from stores.errors import TerminalError, TransientError, is_transient

    assert is_transient(TransientError("object store timed out"))
    assert not is_transient(TerminalError("source missing; fix `path:`"))
    assert not is_transient(OSError("disk hiccup")) and not is_transient(ValueError("bad value"))
    assert is_transient(rex.RayTaskError("f", "tb", TransientError("peer reset")))
    assert not is_transient(rex.RayTaskError("f", "tb", ValueError("bad row")).as_instanceof_cause())
    try:
        try:
            raise TransientError("read timed out")
        except TransientError as inner:
            raise RuntimeError("extraction failed") from inner
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    for err in (TransientError("a"), TerminalError("b; fix it")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_ray_boundary_classifies_lost_workers_and_keeps_terminal_errors():
    """At the runner boundary a lost Ray actor becomes a TransientError; a TerminalError raised inside a worker
    comes out as a TerminalError (not retried); anything else passes through unchanged."""
    import ray.exceptions as rex

    from extractors.ray_session import ray_errors
    from stores.errors import TerminalError, TransientError

    with pytest.raises(TransientError), ray_errors("extract x"):
        raise rex.ActorDiedError()
    with pytest.raises(TerminalError, match="pass --model tiny-test"), ray_errors("extract x"):
        raise rex.RayTaskError("f", "tb", TerminalError("no weights; pass --model tiny-test"))
    with pytest.raises(KeyError), ray_errors("extract x"):
        raise KeyError("no table")


def test_only_transient_errors_are_retried(prefect_api):
    """A task failing with a TransientError is retried (and then succeeds); one failing with a TerminalError or
    an unclassified ValueError is not retried at all."""
    from prefect import flow, task

    from flows.pipeline import retry_transient
    from stores.errors import TerminalError, TransientError

    calls = {"flaky": 0, "bad": 0, "odd": 0}

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TransientError("node went away")
        return "ok"

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def bad() -> None:
        calls["bad"] += 1
        raise TerminalError("item_id is empty; fix the source")

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def odd() -> None:
        calls["odd"] += 1
        raise ValueError("unclassified")

    @flow
    def both() -> str:
        out = flaky()
        for t in (bad, odd):
            with pytest.raises(Exception):  # noqa: B017, PT011  (the failure itself is the point)
                t()
        return out

    assert both() == "ok"
    assert calls == {"flaky": 3, "bad": 1, "odd": 1}


# ---- CLI and schedules -------------------------------------------------------------------------------------------


def _cli():
    from flows.run_cli import demo, run, serve

    @click.group()
    @click.option("--workspace", envvar="MMFEAT_HOME", default="./mmfeat-data")
    @click.pass_context
    def cli(ctx, workspace):
        ctx.ensure_object(dict)
        ctx.obj["workspace"] = workspace

    cli.add_command(run)
    cli.add_command(serve)
    cli.add_command(demo)
    return cli


def test_run_cli_runs_refresh_and_reports_config_errors(prefect_api, tmp_path):
    """`mmfeat run CONFIG` runs refresh once and prints a summary; a second run reports 0 model calls; a bad
    config fails before any work with the key and the fix."""
    data = {
        "name": "mini",
        "sources": [{"kind": "demo", "n_items": 12, "n_users": 8, "dir": str(tmp_path / "src")}],
        "splits": [{"name": "main", "kcore": 0}],
        "graphs": [{"type": "user_item", "split": "main"}],
    }
    cfg = _write_config(tmp_path / "mini.yaml", data)
    ws = tmp_path / "ws"
    runner = CliRunner()
    out = runner.invoke(_cli(), ["--workspace", str(ws), "run", str(cfg)], obj={})
    assert out.exit_code == 0, out.output
    assert "ingest    demo:" in out.output and "graph main_ui_sym: built" in out.output
    again = runner.invoke(_cli(), ["--workspace", str(ws), "run", str(cfg)], obj={})
    assert "0 model calls, 0 rows written; tables changed: none" in again.output
    data["splits"][0]["kcor"] = 2
    bad = runner.invoke(
        _cli(), ["--workspace", str(ws), "run", str(_write_config(tmp_path / "bad.yaml", data))], obj={}
    )
    assert bad.exit_code != 0 and "splits[0].kcor: unknown key; did you mean 'kcore'?" in bad.output


def test_demo_command_completes_every_flow_run(prefect_api, tmp_path):
    """`mmfeat demo` (here on a small config with a forget request): refresh, forget, refresh again; every flow
    run ends Completed, the forget request is verified, and the summary says where to look next."""
    data = {
        "name": "minidemo",
        "sources": [{"kind": "demo", "n_items": 16, "n_users": 8, "dir": str(tmp_path / "src")}],
        "extract": [{"feature": "clip_image", "kind": "clip_image", "model": "test:tiny-clip"}],
        "splits": [{"name": "main"}],
        "graphs": [{"type": "knn", "split": "main", "features": ["clip_image"], "k": 3}],
        "snapshot": {"split": "main"},
        "forget": [{"request_id": "mini-1", "kind": "user", "users": ["u00001"]}],
        "run": {"engine": "local"},
    }
    cfg = _write_config(tmp_path / "minidemo.yaml", data)
    out = CliRunner().invoke(
        _cli(), ["--workspace", str(tmp_path / "ws"), "demo", "--config", str(cfg)], obj={}
    )
    assert out.exit_code == 0, out.output
    assert "forget mini-1: served, verified" in out.output
    assert "prefect flow runs of this demo: 3 Completed" in out.output
    assert "verify-erasure mini-1" in out.output and "next:" in out.output


def test_serve_builds_one_deployment_per_schedule(tmp_path):
    """`mmfeat serve` turns each cron schedule of a config into a deployment of the named flow with the config
    and workspace as parameters."""
    from flows.run_cli import build_deployments

    cfg = load_config("hm_fashion")
    deployments = build_deployments(cfg, str(tmp_path / "ws"))
    assert [d.name for d in deployments] == ["hm_fashion-daily-articles", "hm_fashion-weekly-graphs"]
    assert [d.flow_name for d in deployments] == ["refresh", "recipes"]
    assert all(d.concurrency_limit == 1 for d in deployments)
    crons = [(d.schedules[0].schedule.cron, d.schedules[0].schedule.timezone) for d in deployments]
    assert crons == [("15 1 * * *", "Europe/Stockholm"), ("0 4 * * mon", "Europe/Stockholm")]
    assert deployments[0].parameters == {
        "config": str(CONFIG_DIR / "hm_fashion.yaml"),
        "workspace": str(tmp_path / "ws"),
    }


def _mini(tmp_path: Path, **source) -> dict:
    return {
        "name": "mini",
        "sources": [{"kind": "demo", "n_items": 12, "n_users": 8, "dir": str(tmp_path / "src")} | source],
        "splits": [{"name": "main", "kcore": 0}],
        "run": {"engine": "local", "retries": 2, "retry_delay_s": 0},
    }


def test_run_permanent_error_prints_one_line_and_is_not_retried(prefect_api, tmp_path, monkeypatch):
    """A missing source file in `mmfeat run` fails the first try without a retry and prints one line naming the
    path and the fix (the text `mmfeat ingest` gives for it), no traceback; --debug re-raises with the error."""
    import recipes.refresh as refresh

    data = _mini(tmp_path)
    data["sources"] = [
        {
            "kind": "table",
            "name": "shop",
            "items": str(tmp_path / "missing.csv"),
            "interactions": str(tmp_path / "missing_inter.csv"),
        }
    ]
    cfg = _write_config(tmp_path / "mini.yaml", data)
    calls = []
    real = refresh.ingest_source
    monkeypatch.setattr(refresh, "ingest_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = CliRunner().invoke(_cli(), ["--workspace", str(tmp_path / "ws"), "run", str(cfg)], obj={})
    assert out.exit_code == 1 and len(calls) == 1, out.output
    # Prefect's progress lines may be printed too; the failure is one line, once, without a traceback
    lines = [ln for ln in out.output.splitlines() if "missing.csv" in ln or "ERROR" in ln]
    assert len(lines) == 1 and lines[0].startswith("Error: source 'shop': "), out.output
    assert "Traceback" not in out.output
    debug = CliRunner().invoke(
        _cli(), ["--workspace", str(tmp_path / "ws"), "run", str(cfg), "--debug"], obj={}
    )
    from stores.errors import TerminalError

    assert debug.exit_code == 1 and isinstance(debug.exception, TerminalError)


def test_run_transient_error_is_retried(prefect_api, tmp_path, monkeypatch):
    """A TransientError in a step of `mmfeat run` is retried, and the run then completes."""
    import recipes.refresh as refresh
    from stores.errors import TransientError

    cfg = _write_config(tmp_path / "mini.yaml", _mini(tmp_path))
    calls = []
    real = refresh.ingest_source

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("object store timed out")
        return real(*a, **k)

    monkeypatch.setattr(refresh, "ingest_source", flaky)
    out = CliRunner().invoke(_cli(), ["--workspace", str(tmp_path / "ws"), "run", str(cfg)], obj={})
    assert out.exit_code == 0 and len(calls) == 2, out.output
    assert "ingest    demo:" in out.output


def test_second_publish_on_the_same_day_takes_a_suffix(tmp_path):
    """With a dated snapshot template, a second publish the same day whose pins changed gets `<name>-2`, decided
    before any work; an unchanged run publishes nothing and reports the last snapshot."""
    from datetime import UTC, datetime

    from recipes import refresh
    from recipes.config import load_config

    data = _mini(tmp_path) | {"snapshot": {"split": "main", "name": "{config}-{date:%Y%m%d}"}}
    cfg = load_config(str(_write_config(tmp_path / "mini.yaml", data)))
    ws = Workspace(str(tmp_path / "ws"))
    day = datetime(2026, 1, 2, tzinfo=UTC)

    def publish() -> dict:
        name = refresh.snapshot_name(ws, cfg, day)
        refresh.ingest_source(ws, cfg, "demo")
        refresh.build_split(ws, cfg, "main", ws.version("interactions"))
        return refresh.publish_snapshot(ws, cfg, name)

    first = publish()
    assert first == first | {"snapshot": "mini-20260102", "published": True}
    assert publish()["published"] is False
    _add_items(tmp_path / "src", 3)
    ws_rows = ws.count("interactions")
    with open(tmp_path / "src" / "interactions.csv", "a") as fh:
        fh.write("u00001,900000,1700000000,view,1\n")
    second = publish()
    assert ws.count("interactions") == ws_rows + 1
    assert second["snapshot"] == "mini-20260102-2" and second["published"]


def test_extractor_registry_defaults_are_real_models_and_fail_offline_in_one_line(tmp_path, monkeypatch):
    """The CLI and the flows pick extractors from one registry: CLIP defaults to the pretrained ViT-B-32
    (laion2b_s34b_b79k), the untrained test model only by name; offline without cached weights `encode image`
    fails before any work with one line naming the fix."""
    from extractors import registry
    from flows.extract_cli import encode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # an empty Hugging Face cache: the real weights are not there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert registry.image_spec(None).kwargs == {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    assert registry.config_spec("clip_image", "tiny-test").kwargs["model"] == "test:tiny-clip"
    assert registry.caption_spec(None).kwargs["model"] == registry.DEFAULT_CAPTIONER

    @click.group()
    @click.pass_context
    def cli(ctx):
        ctx.obj = {"workspace": str(tmp_path / "ws")}

    cli.add_command(encode)
    out = CliRunner().invoke(cli, ["encode", "image", "--engine", "local", "--no-progress"])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 1 and len(lines) == 1, out.output
    assert "ViT-B-32/laion2b_s34b_b79k" in lines[0] and "--model tiny-test" in lines[0]
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())
