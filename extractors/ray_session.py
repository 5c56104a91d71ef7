"""The driver's Ray session for flows, and the boundary where Ray's failures are classified.

Lost actors, workers, nodes or objects and get timeouts are `TransientError` (a retry on the nodes left can
succeed); a task that failed on its own error keeps that error's class, so a `TerminalError` raised in a worker
(a model that cannot be loaded) stops the flow at once.

    >>> with ray_errors("extract clip_image"):
    ...     run_extraction(ws, "clip_image", spec, source="image")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from extractors.ray_start import connect_ray, init_ray, settle
from stores.errors import MmfeatError, TransientError, classified

__all__ = ["alive_cpus", "connect_ray", "ray_errors", "reset_ray"]


def reset_ray() -> None:
    """Drop this driver's Ray session (a retry after a stall must not wait on the stalled run's actors), and with
    it the active model pool's actors: the retry starts fresh ones."""
    import ray

    from extractors.model_pool import active_pool

    settle()
    pool = active_pool()
    if pool is not None:
        pool.forget()
    if ray.is_initialized():
        ray.shutdown()


def alive_cpus() -> int:
    """CPUs of the Ray nodes alive now (connecting as the runner does: `init_ray`)."""
    import ray

    init_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _ray_system_error(exc: BaseException) -> bool:
    """Ray's infrastructure errors (actor/worker/node died, object lost, get timeout), not a task's own error."""
    import ray.exceptions as rex

    system = (
        rex.ActorDiedError,
        rex.ActorUnavailableError,
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
        rex.GetTimeoutError,
        rex.RaySystemError,
        rex.LocalRayletDiedError,
    )
    return isinstance(exc, system)


@contextmanager
def ray_errors(what: str) -> Iterator[None]:
    """Re-raise a classified error found in the cause chain as is; Ray's infrastructure failures anywhere in the
    chain as TransientError; anything else unchanged (unclassified errors are not retried)."""
    try:
        yield
    except MmfeatError:
        raise
    except Exception as exc:
        found = classified(exc)
        if found is not None:
            raise type(found)(found.message) from exc
        cause: BaseException | None = exc
        for _ in range(16):
            if cause is None:
                break
            if _ray_system_error(cause):
                raise TransientError(
                    f"{what}: Ray lost part of the run ({type(cause).__name__}); retrying"
                ) from exc
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        raise
