"""A pool of Ray actors that runs a pure block kernel over blocks of query rows of one shared matrix.

The exact kNN graph scales out this way (`mmfeat graph knn --engine ray`): the unit feature matrix goes into
Ray's object store once, each actor maps it (zero-copy on its node), and blocks of query rows are handed out as
actors free up; results come back in block order, so the driver concatenates them into the same top-k the
single process computes. The kernel is passed in (recipes.graphs.knn.block_topk), so this module knows nothing
of kNN and holds no second copy of it. $RAY_ADDRESS is honoured (else a local Ray starts).

    >>> knn_topk(features, 10, map_blocks=ray_map_blocks)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from extractors.ray_session import alive_cpus, ray_errors


class BlockWorker:
    """Holds the shared matrix (resolved from the object store once) and applies the kernel to row blocks."""

    def __init__(self, kernel: Callable, x: np.ndarray) -> None:
        self.kernel = kernel
        self.x = x

    def run(self, rows: np.ndarray, kwargs: dict) -> tuple:
        return self.kernel(self.x, rows, **kwargs)


def ray_map_blocks(
    kernel: Callable, x: np.ndarray, blocks: list[np.ndarray], actors: int = 0, **kwargs
) -> Iterator[tuple]:
    """kernel(x, rows, **kwargs) for each block of rows on a pool of `actors` Ray actors (0: one per cluster
    CPU, at most one per block), yielded in block order. Each actor takes 1 CPU."""
    import ray
    from ray.util import ActorPool

    with ray_errors("exact kNN on Ray actors"):
        cpus = alive_cpus()
        shared = ray.put(x)
        worker = ray.remote(num_cpus=1)(BlockWorker)
        pool = [worker.remote(kernel, shared) for _ in range(max(1, min(actors or cpus, len(blocks))))]
        try:
            yield from ActorPool(pool).map(lambda a, rows: a.run.remote(rows, kwargs), blocks)
        finally:
            for actor in pool:
                ray.kill(actor)
