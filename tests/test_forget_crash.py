"""A forget killed at any point is never lost: SIGKILL of the real `mmfeat forget user` CLI at random moments, a
re-ingest of the source between the kill and the resume, then the resume (`resume_pending`, `mmfeat forget
--resume`). The user never comes back, the resumed request verifies, and its receipt counts what every attempt
removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.ingest.load import ingest
from recipes.ingest.sources import table
from recipes.unlearning.forget import forget, resume_pending
from stores.erasure.keys import deny_list
from stores.erasure.log import logged
from stores.erasure.requests import ForgetRequest
from stores.erasure.verify import verify
from stores.workspace import Workspace

pytestmark = pytest.mark.slow

MMFEAT = str(Path(sys.executable).with_name("mmfeat"))
USERS, ITEMS, PER_USER = 16, 24, 12
VICTIM = "u03"
REQUEST = "crash-1"


def write_source(folder: Path) -> dict[str, Path]:
    """Items, users and interactions CSVs: every user rates PER_USER items."""
    folder.mkdir()
    items = folder / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{j:02d},title {j}\n" for j in range(ITEMS)))
    users = folder / "users.csv"
    users.write_text("user_id\n" + "".join(f"u{j:02d}\n" for j in range(USERS)))
    inter = folder / "inter.csv"
    rows = [
        f"u{u:02d},i{(u * 5 + k) % ITEMS:02d},{1_600_000_000 + u * 1000 + k}\n"
        for u in range(USERS)
        for k in range(PER_USER)
    ]
    inter.write_text("user_id,item_id,timestamp\n" + "".join(rows))
    return {"items": items, "users": users, "interactions": inter}


def reingest(ws: Workspace, files: dict[str, Path]) -> None:
    ingest(ws, table(files["items"], files["interactions"], files["users"]))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A workspace ingested from the CSVs, with a split and a user-item graph built from it."""
    from recipes.pipeline import build_split, build_ui_graph
    from recipes.splits import SplitConfig

    root = tmp_path_factory.mktemp("crash")
    files = write_source(root / "src")
    ws = Workspace(root / "ws")
    reingest(ws, files)
    build_split(ws, "main", SplitConfig(scheme="random", seed=1))
    build_ui_graph(ws, "main", "sym", name="ui")
    return root / "ws", files


def victim_rows(ws: Workspace) -> dict[str, int]:
    """Rows naming the victim in the tables that hold users (0 everywhere once forgotten)."""
    where = f"user_id = '{VICTIM}'"
    out = {t: ws.count(t, where) for t in ("users", "interactions", "split_main")}
    out["graph_ui"] = ws.count("graph_ui", f"src = '{VICTIM}' OR dst = '{VICTIM}'")
    return out


def run_forget(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [MMFEAT, "--workspace", str(path), "forget", "user", VICTIM, "--request-id", REQUEST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def check_after_kill(ws: Workspace, before: dict[str, int]) -> None:
    """Write-ahead: once any row of the victim is gone, the request is in the log and the user is denied."""
    now = victim_rows(ws)
    if any(now[t] < before[t] for t in before):
        assert logged(ws, REQUEST) is not None, now
        assert deny_list(ws).has("user", VICTIM), now


def finish(ws: Workspace) -> dict:
    """What an operator does after the crash: resume pending requests; a request killed before it was written
    ahead (nothing deleted yet) is simply issued again."""
    receipts = {r["request"]["request_id"]: r for r in resume_pending(ws)}
    if REQUEST in receipts:
        return receipts[REQUEST]
    row = logged(ws, REQUEST)
    if row is not None:  # the killed run had finished
        return row["receipt"]
    return forget(ws, ForgetRequest(REQUEST, "user", users=(VICTIM,)))


def check_erased(ws: Workspace, receipt: dict, before: dict[str, int]) -> None:
    assert victim_rows(ws) == {t: 0 for t in before}
    assert receipt["verification"]["verified"], receipt["verification"]
    again = verify(ws, REQUEST)
    assert again["verified"], again["problems"]
    # what every attempt removed adds up to what the victim had
    assert receipt["removed"].get("interactions") == before["interactions"] == PER_USER, receipt["removed"]
    assert receipt["removed"].get("users") == 1


def test_a_table_whose_creation_was_killed_is_created_again(tmp_path):
    """A writer killed while creating a table leaves its directory without a committed version (seen here when a
    forget was killed creating the deny-list): the workspace does not list it, so the next writer creates it and
    readers never fail on it (before, every later ingest failed reading the half-made deny-list)."""
    from stores.schema import DENY_LIST

    ws = Workspace(tmp_path / "ws")
    ws.ensure(DENY_LIST)
    shutil.rmtree(Path(ws.table_uri(DENY_LIST.name)) / "_versions")  # what the kill leaves behind
    ws = Workspace(tmp_path / "ws")
    assert not ws.exists(DENY_LIST.name) and deny_list(ws).hashes == frozenset()
    ws.ensure(DENY_LIST)
    assert ws.exists(DENY_LIST.name) and ws.count(DENY_LIST.name) == 0


def _logged_yet(path: Path) -> dict | None:
    """The request's log row, None until it is readable (the log table may be in the middle of its creation)."""
    try:
        return logged(Workspace(path), REQUEST)
    except ValueError:
        return None


def test_forget_killed_at_random_points_resumes_and_never_brings_the_user_back(template, tmp_path):
    """10 trials: `mmfeat forget user` SIGKILLed after a random delay within a full run's duration (odd trials) or
    a random moment of up to 0.2 s after the request is logged (even trials: most of a run is start-up, so under
    load purely random delays can miss the erasure itself), the source re-ingested, then resumed. Whatever the kill point: once a row is gone the request and its deny-list entry
    are logged; after the resume the user is nowhere, the request verifies and its receipt counts every row
    removed across attempts."""
    base, files = template
    before = victim_rows(Workspace(base))
    assert before["interactions"] == PER_USER and before["users"] == 1
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    started = time.monotonic()
    assert run_forget(probe).wait(timeout=300) == 0
    full = time.monotonic() - started
    rng = random.Random(11)
    states: list[str] = []
    for trial in range(10):
        path = tmp_path / f"t{trial}"
        shutil.copytree(base, path)
        proc = run_forget(path)
        if trial % 2:
            time.sleep(rng.uniform(0.3, full))
        else:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and _logged_yet(path) is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        ws = Workspace(path)
        check_after_kill(ws, before)
        row = logged(ws, REQUEST)
        states.append("not started" if row is None else row["status"])
        reingest(ws, files)
        receipt = finish(ws)
        check_erased(ws, receipt, before)
    print("states at kill:", states)
    assert "pending" in states, f"no kill landed mid-erasure ({states}); the delays do not cover a run"


@pytest.mark.parametrize("after", ["delete", "artifacts"])
def test_kill_after_a_phase_then_cli_resume(template, tmp_path, after):
    """Killed right after a phase (rows deleted; or artifacts re-derived too, so no latest row names the user
    while old versions still do), the request is pending; a re-ingest refuses the user; `mmfeat forget
    --resume` finishes it, old versions included, and the receipt sums both attempts."""
    base, files = template
    before = victim_rows(Workspace(base))
    path = tmp_path / "ws"
    shutil.copytree(base, path)
    ws = Workspace(path)
    proc = run_forget(path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        row = logged(ws, REQUEST)
        if row is not None and any(after in a["phases"] for a in row["params"]["attempts"]):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    row = logged(ws, REQUEST)
    assert row is not None and row["status"] == "pending", "the run finished before it could be killed"
    assert not verify(ws, REQUEST)["verified"]  # pending is not verified
    reingest(ws, files)
    assert victim_rows(ws)["users"] == 0 and victim_rows(ws)["interactions"] == 0
    out = subprocess.run(
        [MMFEAT, "--workspace", str(path), "forget", "--resume"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    [receipt] = json.loads(out.stdout)["resumed"]
    assert [a["attempt"] for a in receipt["attempts"]] == [1, 2]
    check_erased(ws, receipt, before)
    assert logged(ws, REQUEST)["status"] == "done" and resume_pending(ws) == []
