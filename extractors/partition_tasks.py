"""Ray tasks for the partitioned recipes (recipes/distributed.py): the `Tasks` runner `engine="ray"` hands them.

Handles are ObjectRefs, so partitions made by one task stay in the object store (on the node that made them)
and reach the next task as its arguments; the driver only fetches what it sums. Each task takes 1 CPU.
$RAY_ADDRESS is honoured (else a local Ray starts), as for every runner here.

    >>> split_partitioned(ws, version, cfg, RayTasks())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from extractors.ray_session import alive_cpus


class RayTasks:
    """Runs task functions as Ray tasks; `cpus` is the cluster's CPU count when it is made."""

    def __init__(self) -> None:
        self.cpus = alive_cpus()
        self._remote: dict[tuple[Callable, int], Any] = {}

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def submit(self, fn: Callable, *args: Any, returns: int = 1) -> Any:
        import ray

        remote = self._remote.get((fn, returns))
        if remote is None:
            remote = self._remote[(fn, returns)] = ray.remote(num_cpus=1, num_returns=returns)(fn)
        return remote.remote(*args)

    def get(self, handles: list) -> list:
        import ray

        return ray.get(list(handles))
