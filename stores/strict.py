"""Strict records: the one way a recipe config (SplitConfig, KnnConfig, ...) or a request (ForgetRequest) is
declared. A frozen pydantic dataclass that validates its fields' types and refuses unknown keys, naming the valid
ones; every problem is a one-line ValueError. It lives in stores/, the lowest layer that needs it. Positional and
keyword construction work as for a plain dataclass, and `dataclasses.asdict` / `fields` keep working (step
fingerprints hash `asdict(cfg)`).

    >>> @strict_config
    ... class KnnConfig:
    ...     k: int = 10
    >>> KnnConfig(**{"kk": 3})
    ValueError: unknown KnnConfig key(s) ['kk']; valid keys are ['k']
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import TypeVar

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

T = TypeVar("T", bound=type)


def strict_config(cls: T) -> T:
    """Make `cls` a frozen pydantic dataclass; unknown keyword arguments and bad values are one-line ValueErrors."""
    cls = dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise ValueError(
                f"unknown {cls.__name__} key(s) {unknown}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys are {names}"
            )
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:  # one line per problem, not pydantic's multi-line report
            raise ValueError("; ".join(_line(cls.__name__, names, e) for e in exc.errors())) from None

    cls.__init__ = __init__
    return cls


def _line(name: str, fields: list[str], error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message  # a check of the whole config names its own fields
    first, *rest = error["loc"]
    first = fields[first] if isinstance(first, int) and first < len(fields) else first  # positional argument
    key = ".".join(str(part) for part in (first, *rest))
    if error["type"] == "missing":
        return f"{name}.{key}: required; pass it"
    return f"{name}.{key}={error['input']!r}: {message}"
