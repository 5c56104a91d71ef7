"""Writers that race: keyed upserts from several processes at once, and extraction committing while forgets run.

Each test starts its worker processes once (spawn context) and runs its trials through them, a Barrier releasing
every worker of a trial at the same moment, so the trials race for real without paying a process start each.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from stores.lease import LeaseLost, LeaseTimeout, write_lease
from stores.schema import INTERACTIONS, ITEMS, USERS
from stores.workspace import Workspace

TRIALS = 10
ROWS = 3000  # interactions each writer upserts; writer k starts at k * OFFSET, so neighbours share 2000 keys
OFFSET = 1000
FORGOTTEN_ITEMS = ("i003", "i007", "i018")
FORGOTTEN_USER = "u2"
WAIT_S = 300  # barrier and join limits: generous for a loaded 2-core machine, never asserted on


def _interactions(start: int, n: int, value: float = 1.0) -> pa.Table:
    ks = np.arange(start, start + n)
    return pa.table(
        {
            "user_id": [f"u{k % 97}" for k in ks],
            "item_id": [f"i{k % 211}" for k in ks],
            "timestamp": pa.array(ks.astype("int64"), pa.int64()).cast(
                INTERACTIONS.schema.field("timestamp").type
            ),
            "event": ["view"] * n,
            "seq": pa.array(np.zeros(n, np.int32)),
            "value": pa.array(np.full(n, value)),
            "source": ["race"] * n,
        },
        schema=INTERACTIONS.schema,
    )


def _upsert_worker(k: int, uris: list[str], barrier) -> None:
    """Writer k: for every trial's workspace, wait for the others, then upsert its overlapping rows."""
    data = _interactions(k * OFFSET, ROWS)
    for uri in uris:
        barrier.wait(WAIT_S)
        Workspace(uri).upsert(INTERACTIONS, data)


def _run(ctx, target, args_list: list[tuple]) -> None:
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT_S * 2)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * len(procs), f"worker exit codes {codes} (see the captured stderr)"


@pytest.mark.slow
@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_upserts_never_duplicate_keys(tmp_path, writers):
    """`writers` processes upserting overlapping interactions at the same moment, 10 trials: the table holds each
    key once, exactly the union of what they wrote, and a later update of every key (changed compare column)
    succeeds, which a duplicated key would break ("Ambiguous merge inserts are prohibited")."""
    ctx = mp.get_context("spawn")
    uris = [str(tmp_path / f"ws{t}") for t in range(TRIALS)]
    barrier = ctx.Barrier(writers)
    _run(ctx, _upsert_worker, [(k, uris, barrier) for k in range(writers)])

    expected = (writers - 1) * OFFSET + ROWS
    for uri in uris:
        ws = Workspace(uri)
        keys = ws.read("interactions", columns=list(INTERACTIONS.key))
        distinct = keys.group_by(list(INTERACTIONS.key)).aggregate([]).num_rows
        assert (keys.num_rows, distinct) == (expected, expected), (
            f"{uri}: {keys.num_rows - distinct} duplicates"
        )
        result = ws.upsert(INTERACTIONS, _interactions(0, expected, value=2.0))
        assert (result.updated, result.inserted) == (expected, 0)
        assert pc.all(pc.equal(ws.read("interactions", columns=["value"])["value"], 2.0)).as_py()


# ---- extraction while forgetting ----------------------------------------------------------------------------


class GatedHashText:
    """A tiny text extractor (8-d vectors from a hash of the text). It drops a `started` file at its first call
    and, when `gated`, then waits for the `forgotten` file, so its commits are sure to come after the forgets."""

    def __init__(self, gate: str, gated: bool = False, delay: float = 0.01):
        self.gate, self.gated, self.delay = Path(gate), gated, delay
        self.provenance = {"model": "test:hash-text", "revision": "1", "dim": 8}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (self.gate / "started").touch()
        deadline = time.monotonic() + WAIT_S
        while self.gated and not (self.gate / "forgotten").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(self.delay)
        vectors = np.stack(
            [
                np.frombuffer(hashlib.sha256(str(t).encode()).digest()[:32], np.uint8)[:8]
                for t in batch["text"]
            ]
        )
        return {"vector": vectors.astype(np.float32) + 1, "error": np.full(len(vectors), "", dtype=object)}


def _seed(ws: Workspace) -> None:
    now = datetime.now(UTC)
    items = [
        {"item_id": f"i{k:03d}", "title": f"Item {k}", "text": f"about thing {k}", "attributes": "{}",
         "source": "race", "rights": "ok", "content_hash": str(k), "created_at": now, "updated_at": now}
        for k in range(40)
    ]  # fmt: skip
    ws.upsert(ITEMS, pa.Table.from_pylist(items, schema=ITEMS.schema))
    users = [{"user_id": f"u{k}", "attributes": "{}", "source": "race", "created_at": now} for k in range(8)]
    ws.upsert(USERS, pa.Table.from_pylist(users, schema=USERS.schema))
    rows = [
        {"user_id": f"u{k % 8}", "item_id": f"i{k % 40:03d}", "timestamp": datetime(2024, 1, 1 + k % 28, tzinfo=UTC),
         "event": "view", "seq": 0, "value": 1.0, "source": "race"}
        for k in range(160)
    ]  # fmt: skip
    ws.upsert(INTERACTIONS, pa.Table.from_pylist(rows, schema=INTERACTIONS.schema))


def _extract_worker(trials: list[tuple[str, str, bool]], barrier, out) -> None:
    from extractors.runner import ExtractorSpec, run_extraction

    for uri, gate, gated in trials:
        barrier.wait(WAIT_S)
        spec = ExtractorSpec(GatedHashText, {"gate": gate, "gated": gated})
        summary = run_extraction(
            Workspace(uri),
            "txt",
            spec,
            source="text",
            engine="local",
            chunk_rows=4,
            batch_size=4,
            progress=False,
        )
        out.put((uri, summary.done, summary.skipped_forgotten))


def _forget_worker(trials: list[tuple[str, str, bool]], barrier) -> None:
    from recipes.unlearning.forget import forget
    from stores.erasure.requests import ForgetRequest

    for t, (uri, gate, _) in enumerate(trials):
        barrier.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not (Path(gate) / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        ws = Workspace(uri)
        forget(ws, ForgetRequest(f"item-{t}", "item", items=FORGOTTEN_ITEMS))
        forget(ws, ForgetRequest(f"user-{t}", "user", users=(FORGOTTEN_USER,)))
        (Path(gate) / "forgotten").touch()


@pytest.mark.slow
def test_extraction_racing_forgets_writes_nothing_forgotten(tmp_path):
    """Extraction committing chunk by chunk while `forget item` and `forget user` run, 10 trials (the last one with
    every commit held until both forgets are done): afterwards no feature table holds a forgotten item, both
    requests verify, and the held trial reports the dropped rows as skipped_forgotten."""
    from stores.erasure.verify import verify

    ctx = mp.get_context("spawn")
    trials = []
    for t in range(TRIALS):
        ws = Workspace(tmp_path / f"ws{t}")
        _seed(ws)
        gate = tmp_path / f"gate{t}"
        gate.mkdir()
        trials.append((ws.uri, str(gate), t == TRIALS - 1))
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_extract_worker, args=(trials, barrier, out)),
        ctx.Process(target=_forget_worker, args=(trials, barrier)),
    ]
    for p in procs:
        p.start()
    summaries = {}
    for _ in trials:
        uri, done, skipped = out.get(timeout=WAIT_S * 2)
        summaries[uri] = (done, skipped)
    for p in procs:
        p.join(WAIT_S)
    assert [p.exitcode for p in procs] == [0, 0]

    for t, (uri, _, gated) in enumerate(trials):
        ws = Workspace(uri)
        for table in ws.table_names():
            if table.startswith("feat_") or table in ("captions", "extract_failures"):
                ids = set(ws.read(table, columns=["item_id"])["item_id"].to_pylist())
                assert not ids & set(FORGOTTEN_ITEMS), (
                    f"trial {t}: {table} holds {sorted(ids & set(FORGOTTEN_ITEMS))}"
                )
        feat = set(ws.read("feat_txt", columns=["item_id"])["item_id"].to_pylist())
        assert feat == {f"i{k:03d}" for k in range(40)} - set(FORGOTTEN_ITEMS), f"trial {t}: {sorted(feat)}"
        for rid in (f"item-{t}", f"user-{t}"):
            assert verify(ws, rid)["verified"], f"trial {t}: {rid} does not verify"
        if gated:
            assert summaries[uri][1] == len(FORGOTTEN_ITEMS), summaries[uri]


# ---- the lease itself ----------------------------------------------------------------------------------------


def _hold_then_steal(uri: str, ready, stolen) -> None:
    """Acquire the lease after the holder's lock file was removed (a fencing scenario), then signal."""
    with write_lease(Workspace(uri), "thief", timeout=WAIT_S):
        stolen.set()
        ready.wait(WAIT_S)


def test_lease_is_reentrant_exclusive_and_fenced(ws):
    """Nested leases in one thread reuse the outer one; another process waits and then gets a one-line timeout
    naming the holder; a lease whose lock was taken over fails `check()` (LeaseLost) instead of committing."""
    ctx = mp.get_context("spawn")
    with write_lease(ws, "outer") as outer:
        with write_lease(ws, "inner") as inner:
            assert inner is outer
        outer.check()
        waited: list[BaseException] = []

        def other_thread() -> None:
            try:
                with write_lease(Workspace(ws.uri), "other-thread", timeout=0.2):
                    pass
            except LeaseTimeout as exc:
                waited.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(waited) == 1 and "'outer'" in str(waited[0]), waited
    first = outer.token

    # A lease held, its lock file deleted by hand, and a new writer taking it: the first holder is fenced off.
    with write_lease(ws, "victim") as victim:
        assert victim.token == first + 1
        (Path(ws.uri) / "_lease" / "write.lock").unlink()
        release, stolen = ctx.Event(), ctx.Event()
        p = ctx.Process(target=_hold_then_steal, args=(ws.uri, release, stolen))
        p.start()
        assert stolen.wait(WAIT_S)
        with pytest.raises(LeaseLost, match="victim"):
            victim.check()
        release.set()
        p.join(WAIT_S)
    assert p.exitcode == 0


def _crash_holding_s3_lease(uri: str, env: dict, held, crash) -> None:
    """Take the s3 lease (1 s expiry, kept alive by its heartbeat), then die without releasing it."""
    os.environ.update(env)
    with write_lease(Workspace(uri), "crashed-writer", ttl=1.0):
        held.set()
        crash.wait(WAIT_S)
        os._exit(0)


def test_s3_lease_conditional_put_heartbeat_and_takeover(s3_endpoint):
    """On object storage (the session's moto S3 server, conditional puts): a held lock object makes another writer
    time out with a message naming the holder and the object to delete; the holder's heartbeat keeps it past its
    1 s expiry; once the holder dies the lease expires and is taken over with a higher fencing token."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="lease-test")
    uri = "s3://lease-test/ws"
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ctx = mp.get_context("spawn")
    held, crash = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_crash_holding_s3_lease, args=(uri, env, held, crash))
    p.start()
    assert held.wait(WAIT_S)
    time.sleep(1.5)  # past the 1 s expiry: only the heartbeat keeps the lease
    stuck = pytest.raises(LeaseTimeout, match=r"'crashed-writer'.*s3://lease-test/ws/_lease/write.json")
    with stuck, write_lease(Workspace(uri), "second", timeout=0.3):
        pass
    crash.set()
    p.join(WAIT_S)
    with write_lease(Workspace(uri), "second", timeout=WAIT_S) as lease:
        lease.check()
        assert lease.token == 2


# ---- whole ingests racing --------------------------------------------------------------------------------------


def _write_catalog(folder: Path, k: int) -> tuple[Path, Path]:
    """Writer k's source files: items 30k..30k+59 and interactions 200k..200k+399 (global row numbers), so writer k
    shares 30 items and 200 interactions with writer k + 1; every 50th row is bought twice the same day (the `seq`
    numbering that ingest derives from the rows already stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    items, inter = folder / "items.csv", folder / "interactions.csv"
    items.write_text("item_id,title\n" + "".join(f"{i:04d},t{i}\n" for i in range(30 * k, 30 * k + 60)))
    lines = []
    for n in range(200 * k, 200 * k + 400):
        line = f"u{n % 23},{30 * (n // 200) + n % 30:04d},{1_600_000_000 + (n // 2) * 86_400}\n"
        lines += [line, line] if n % 50 == 0 else [line]
    inter.write_text("user_id,item_id,timestamp\n" + "".join(lines))
    return items, inter


def _ingest_worker(k: int, uris: list[str], folder: str, barrier) -> None:
    """Writer k: for every trial's workspace, wait for the others, then run the real ingest of its source."""
    from recipes.ingest.load import ingest
    from recipes.ingest.sources import table

    items, inter = _write_catalog(Path(folder) / f"src{k}", k)
    for uri in uris:
        barrier.wait(WAIT_S)
        ingest(Workspace(uri), table(items, inter, name=f"race{k}"))


@pytest.mark.slow
@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_ingests_never_duplicate_keys(tmp_path, writers):
    """`writers` processes running the real `ingest()` of overlapping catalogues at the same moment, 10 trials:
    items and interactions hold each key once, every interaction of every source is stored exactly once (same-day
    repeats included), and a later update of those keys succeeds."""
    ctx = mp.get_context("spawn")
    uris = [str(tmp_path / f"ws{t}") for t in range(TRIALS)]
    barrier = ctx.Barrier(writers)
    _run(ctx, _ingest_worker, [(k, uris, str(tmp_path), barrier) for k in range(writers)])

    expected_items = 30 * (writers - 1) + 60
    for uri in uris:
        ws = Workspace(uri)
        for spec in (ITEMS, INTERACTIONS):
            keys = ws.read(spec.name, columns=list(spec.key))
            distinct = keys.group_by(list(spec.key)).aggregate([]).num_rows
            assert keys.num_rows == distinct, f"{uri}: {keys.num_rows - distinct} duplicate {spec.name} keys"
        assert ws.count("items") == expected_items
        # every source's rows, once each: identical (user, item, day) rows across sources merge, so the table
        # holds the union of the per-source row multisets
        inter = ws.read("interactions")
        union = {}
        for k in range(writers):
            _, path = _write_catalog(tmp_path / f"check{k}", k)
            counts = {}
            for line in path.read_text().splitlines()[1:]:
                counts[line] = counts.get(line, 0) + 1
            for row, n in counts.items():
                union[row] = max(union.get(row, 0), n)
        assert inter.num_rows == sum(union.values())
        changed = inter.set_column(
            inter.schema.get_field_index("value"), "value", pa.array(np.full(inter.num_rows, 5.0))
        )
        result = ws.upsert(INTERACTIONS, changed)
        assert (result.updated, result.inserted) == (inter.num_rows, 0)
