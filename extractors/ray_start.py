"""Starting the driver's Ray: in the foreground (`init_ray`) or on the process's Ray starter thread
(`in_background`), which a refresh uses to start Ray and its models while it ingests.

    >>> in_background(lambda: start_ray())   # returns at once
    >>> init_ray()                            # waits for that start, then reuses the session
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS, else a local Ray the runner starts)."""
    if address:
        os.environ["RAY_ADDRESS"] = address


class _Starter:
    """One daemon thread per process that runs jobs handed to it in the background (`in_background`), and
    `settle()` to wait for them. It never exits: Ray starts its local processes with a parent-death signal
    tied to the thread that called `ray.init`, so a Ray started from a thread that then ended loses its GCS
    (seen here: "Failed to connect to GCS within 60 seconds")."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="mmfeat-ray-starter", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception as exc:  # the foreground's own call meets the same failure and reports it
                logging.getLogger("mmfeat.ray").warning("background Ray start failed: %s", exc)
            finally:
                self.jobs.task_done()

    def settle(self) -> None:
        self.jobs.join()


_starter = _Starter()


class _NotMainThread(logging.Filter):
    """Drops Ray's warning that a `ray.init` off the main thread sets no SIGTERM handler: the starter thread's
    Ray leaves SIGTERM's default (the process ends), which is what a flow run expects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "current thread is not the main thread" not in record.getMessage()


logging.getLogger("ray._private.worker").addFilter(_NotMainThread())


def in_background(job: Callable[[], None]) -> None:
    """Run `job` (a Ray start, a model pool's warm-up) on the process's Ray starter thread. Its failures are
    logged, not raised: the step that needs Ray starts it again in the foreground and reports the error."""
    _starter.submit(job)


def settle() -> None:
    """Wait until the background Ray jobs handed over so far are done (before any foreground use of Ray)."""
    _starter.settle()


def init_ray() -> bool:
    """Local Ray with this machine's CPUs, or the cluster at $RAY_ADDRESS; reuses a running session, waiting
    first for a start in the background (a refresh's `ModelPool.warm`). Returns whether the cluster has a GPU."""
    settle()
    return start_ray()


def start_ray() -> bool:
    """`init_ray` without waiting for background starts: what the background start itself runs."""
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count() or 1}
        with warnings.catch_warnings():
            # Starting Ray's processes forks this one; lance warns about forks it is not part of.
            warnings.filterwarnings("ignore", message=".*fork", category=Warning)
            ray.init(
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=False,
                logging_level=logging.WARNING,
                **kwargs,
            )
    return ray.cluster_resources().get("GPU", 0) >= 1
