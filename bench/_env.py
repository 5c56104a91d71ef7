"""What every benchmark records beside its figures: BLAS/OpenMP thread settings, load average, CPU seconds.

    >>> env = RunEnv.start()          # load average, CPU and wall clocks at the start
    >>> ...                           # the timed work (children included in CPU seconds once they are reaped)
    >>> env.stop()
    >>> lines += env.lines()          # markdown lines for --record

A ratio measured on a shared machine means little unless both sides ran with the same thread counts, so the
thread pools (threadpoolctl), torch's and faiss's thread counts and the OMP/MKL/OPENBLAS variables are written
next to the result. CPU seconds (self + reaped children, user + system) are less noisy than wall time under load.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass, field

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loadavg() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def thread_settings() -> dict[str, object]:
    """Thread pools loaded in this process (threadpoolctl), torch/faiss thread counts if imported, env vars."""
    import sys

    from threadpoolctl import threadpool_info

    pools = sorted(
        {
            f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('num_threads')} threads)".replace(
                "  ", " "
            )
            for p in threadpool_info()
        }
    )
    out: dict[str, object] = {"pools": pools}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "faiss" in sys.modules:
        out["faiss_threads"] = sys.modules["faiss"].omp_get_max_threads()
    out["env"] = {v: os.environ[v] for v in THREAD_VARS if v in os.environ}
    return out


def describe(settings: dict[str, object]) -> str:
    """One line for a report: pools, torch/faiss threads, env vars."""
    parts = [f"BLAS/OpenMP pools: {'; '.join(settings['pools']) or 'none loaded'}"]
    for key in ("torch_threads", "faiss_threads"):
        if key in settings:
            parts.append(f"{key.split('_')[0]} {settings[key]} threads")
    env = settings.get("env") or {}
    parts.append(
        "env " + (", ".join(f"{k}={v}" for k, v in env.items()) if env else "no thread variables set")
    )
    return "; ".join(parts)


@dataclass
class RunEnv:
    """Load average and clocks at start and stop of a benchmark run, plus the thread settings seen at stop."""

    load_start: str
    wall0: float
    cpu0: float
    load_end: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    settings: dict[str, object] = field(default_factory=dict)

    @classmethod
    def start(cls) -> RunEnv:
        return cls(loadavg(), time.perf_counter(), cpu_seconds())

    def stop(self) -> RunEnv:
        self.load_end = loadavg()
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = cpu_seconds() - self.cpu0
        self.settings = thread_settings()
        return self

    def lines(self) -> list[str]:
        """Markdown lines for BENCHMARKS.md."""
        return [
            "",
            f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared; load average "
            f"start / end: {self.load_start} / {self.load_end}. Whole run: {self.wall_s:.1f} s wall, "
            f"{self.cpu_s:.1f} CPU s (self + children). {describe(self.settings)}.",
        ]


def peak_mb() -> float:
    """Peak RSS of this process in MB (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak RSS needs Linux")
