"""The clustering step alone (stores/erasure/physical.py `cluster`) vs the whole-table sort it replaced, each run
in a fresh child process twice: wall, CPU seconds and peak RSS. Interactions from bench/forget.py's generator,
appended in 500k-row batches (arrival order); work directory /tmp/hcluster-bench<N>, removed at the end.

    .venv/bin/python bench/cluster.py 5000000
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import lance, pyarrow.compute as pc
from stores.erasure.physical import cluster
from stores.workspace import Workspace
ws = Workspace(sys.argv[1]); how = sys.argv[2]
t = time.perf_counter(); c = time.process_time()
if how == "old":
    rows = ws.dataset("interactions").to_table()
    rows = rows.take(pc.sort_indices(rows, [("user_id", "ascending")]))
    lance.write_dataset(rows, ws.table_uri("interactions"), mode="overwrite", max_rows_per_file=131072)
else:
    cluster(ws, "interactions", "user_id")
wall, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"how": how, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main(n: int) -> None:
    sys.path.insert(0, "bench")
    sys.path.insert(0, ".")
    from forget import make_data

    from stores.schema import INTERACTIONS
    from stores.workspace import Workspace

    root = Path(f"/tmp/hcluster-bench{n}")
    shutil.rmtree(root, ignore_errors=True)
    inter = make_data(n, max(n // 100, 1000), 8, 0)["interactions"]
    base = Workspace(str(root / "base"))
    step = 500_000
    for s in range(0, n, step):  # arrival order in 500k-row appends
        part = inter.slice(s, step)
        if s == 0:
            base.db.create_table("interactions", data=part, schema=INTERACTIONS.schema)
        else:
            base.open("interactions").add(part)
    del inter
    for how in ("old", "new", "old", "new"):
        shutil.rmtree(root / "ws", ignore_errors=True)
        shutil.copytree(root / "base", root / "ws")
        p = subprocess.run(
            [sys.executable, "-c", CHILD, str(root / "ws"), how],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": "."},
        )
        out = (
            json.loads(p.stdout.strip().splitlines()[-1])
            if p.returncode == 0
            else {"how": how, "rc": p.returncode, "err": p.stderr[-300:]}
        )
        print(n, json.dumps(out), "load", [round(x, 2) for x in os.getloadavg()], flush=True)
    shutil.rmtree(root)


main(int(sys.argv[1]))
