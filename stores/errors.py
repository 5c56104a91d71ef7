"""The two kinds of failure a job can meet, decided where the error enters (I/O, model loading, Ray), not guessed
later from builtin types: `TransientError` (retry: a timeout, a lost node) and `TerminalError` (do not retry: a
missing source, a model that cannot be loaded offline; its message is one line naming the fix). Both pickle, so
they survive Ray workers and Prefect result storage.

    >>> raise TerminalError("source path /data/ml100k does not exist; set MMFEAT_ML100K or fix `path:`")
    >>> is_transient(RuntimeError("wrapped"))   # False unless a TransientError is in the cause chain
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MmfeatError(Exception):
    """Base of the classified errors. One positional message, so pickling rebuilds it exactly."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the class and message through pickle (Ray, Prefect result storage)
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class TransientError(MmfeatError):
    """Worth retrying: the same call may succeed later (a timeout, a dropped connection, a lost Ray node)."""


class TerminalError(MmfeatError):
    """Retrying cannot help: bad input or configuration. The message is one line naming the value and the fix."""


def classified(exc: BaseException | None, depth: int = 16) -> MmfeatError | None:
    """The first TransientError or TerminalError in `exc`'s cause chain (`__cause__`, `__context__`, and the
    `cause` attribute Ray's task errors carry), or None when nothing classified it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < depth:
        if isinstance(exc, MmfeatError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def is_transient(exc: BaseException | None) -> bool:
    """True only when a TransientError is in the cause chain (and no TerminalError comes before it)."""
    return isinstance(classified(exc), TransientError)


def one_line(exc: BaseException) -> str:
    """The message to print for `exc`: the classified error's one line where there is one."""
    found = classified(exc)
    text = str(found if found is not None else exc).strip().strip('"')
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def network_boundary(what: str) -> Iterator[None]:
    """Classify timeouts and dropped connections of a remote call (object store, model hub) as transient.

    >>> with network_boundary("s3://bucket/ws"):
    ...     ws.read("items")
    """
    try:
        yield
    except (TimeoutError, ConnectionError) as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {exc}; retried by the flow") from exc


def require_path(path: object, what: str, fix: str) -> None:
    """A missing input path is terminal: raise one line naming the path and the fix."""
    from pathlib import Path

    if not Path(str(path)).exists():
        raise TerminalError(f"{what} {path} does not exist; {fix}")
