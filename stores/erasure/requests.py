"""Forget requests: what a request names, what it covers in the workspace, which interaction rows it matches.

A `ForgetRequest` names what to forget: users, items, user-item pairs, one modality of some items, interactions
before a time, or items by attribute. `resolve` turns it into a `ForgetScope` (attribute requests become item
lists) and `interaction_mask` says which interaction rows the scope covers.

    >>> scope = resolve(ForgetRequest("r1", "user", users=("1",)), items)
    >>> mask = interaction_mask(split, scope)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator

from stores.ids import seconds
from stores.strict import strict_config

Kind = Literal["user", "item", "interactions", "modality", "before", "attribute"]
KINDS: tuple[str, ...] = ("user", "item", "interactions", "modality", "before", "attribute")
MODALITIES: tuple[str, ...] = ("image",)
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def new_request_id() -> str:
    """A fresh request id: `fr-<UTC time>-<random>`."""
    return f"fr-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


@strict_config
class ForgetRequest:
    """One forget request. Fields by kind: user -> users; item -> items; interactions -> pairs (user, item);
    modality -> modality ("image") and items; before -> before (aware datetime); attribute -> attribute
    ("rights": `;`-separated rights tags, or a key of `items.attributes`) and value.

    The one request class: the CLI, scenarios and the pipeline config's `forget:` entries all build it, and
    pydantic checks the types (an unknown key is an error naming the valid ones)."""

    request_id: str
    kind: Kind
    users: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    modality: str | None = None
    before: datetime | None = None
    attribute: str | None = None
    value: str | None = None
    reason: str = ""
    requester: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @field_validator("request_id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.fullmatch(value or ""):
            raise ValueError(
                f"request_id {value!r} is not allowed: use 1-128 letters, digits or . _ : @ - (pattern {_ID.pattern})"
            )
        return value

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "users", tuple(str(u) for u in self.users))
        object.__setattr__(self, "items", tuple(str(i) for i in self.items))
        object.__setattr__(self, "pairs", tuple((str(u), str(i)) for u, i in self.pairs))
        needs = {
            "user": ("users",),
            "item": ("items",),
            "interactions": ("pairs",),
            "modality": ("modality", "items"),
            "before": ("before",),
            "attribute": ("attribute", "value"),
        }[self.kind]
        given = {
            f
            for f in ("users", "items", "pairs", "modality", "before", "attribute", "value")
            if getattr(self, f)
        }
        missing = [f for f in needs if f not in given]
        extra = sorted(given - set(needs))
        if missing or extra:
            raise ValueError(
                f"a {self.kind!r} forget request needs {list(needs)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; {extra} do not apply to it" if extra else "")
            )
        if any(not x for x in (*self.users, *self.items)) or any(not u or not i for u, i in self.pairs):
            raise ValueError("an empty id was given; every user or item id must be a non-empty string")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(
                f"modality={self.modality!r}; supported: {MODALITIES} (text-derived features stay)"
            )
        if self.before is not None and self.before.tzinfo is None:
            raise ValueError(f"before={self.before!r}; give a timezone-aware datetime (UTC)")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (UTC)")


@dataclass(frozen=True)
class ForgetScope:
    """What a request covers, resolved against the workspace: whole users, whole items, one modality of items,
    user-item pairs, interactions before a time."""

    users: frozenset[str] = frozenset()
    items: frozenset[str] = frozenset()
    image_items: frozenset[str] = frozenset()
    pairs: frozenset[tuple[str, str]] = frozenset()
    before: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (self.users or self.items or self.image_items or self.pairs or self.before)

    def counts(self) -> dict[str, Any]:
        return {
            "users": len(self.users),
            "items": len(self.items),
            "image_items": len(self.image_items),
            "pairs": len(self.pairs),
            "before": self.before.isoformat() if self.before else None,
        }


def attribute_items(items: pa.Table, attribute: str, value: str) -> list[str]:
    """Item ids whose `rights` tags (`;`-separated) include `value` (attribute "rights"), or whose
    `attributes` JSON has `attribute` equal to `value` or, for a list, containing it."""
    out = []
    if attribute == "rights":
        for item_id, rights in zip(items["item_id"].to_pylist(), items["rights"].to_pylist(), strict=True):
            if rights and value in {t.strip() for t in rights.split(";")}:
                out.append(item_id)
        return sorted(out)
    for item_id, attrs in zip(items["item_id"].to_pylist(), items["attributes"].to_pylist(), strict=True):
        got = json.loads(attrs).get(attribute) if attrs else None
        if (
            got == value
            or (isinstance(got, list) and value in got)
            or (got is not None and str(got) == value)
        ):
            out.append(item_id)
    return sorted(out)


def resolve(request: ForgetRequest, items: pa.Table | None = None) -> ForgetScope:
    """The scope of `request`; attribute requests match against `items` (item_id, rights, attributes)."""
    if request.kind == "user":
        return ForgetScope(users=frozenset(request.users))
    if request.kind == "item":
        return ForgetScope(items=frozenset(request.items))
    if request.kind == "interactions":
        return ForgetScope(pairs=frozenset(request.pairs))
    if request.kind == "modality":
        return ForgetScope(image_items=frozenset(request.items))
    if request.kind == "before":
        return ForgetScope(before=request.before)
    if items is None:
        raise ValueError("an attribute request needs the items table to match against")
    return ForgetScope(items=frozenset(attribute_items(items, request.attribute, request.value)))


def interaction_mask(table: pa.Table, scope: ForgetScope) -> np.ndarray:
    """Boolean mask of the rows of an interaction-like table (user_id, item_id[, timestamp]) the scope covers."""
    n = table.num_rows
    mask = np.zeros(n, dtype=bool)
    if scope.users:
        mask |= id_mask(table, "user_id", sorted(scope.users))
    if scope.items:
        mask |= id_mask(table, "item_id", sorted(scope.items))
    if scope.pairs:
        keys = pc.binary_join_element_wise(table["user_id"], table["item_id"], "\x1f")
        wanted = pa.array(sorted(f"{u}\x1f{i}" for u, i in scope.pairs), pa.string())
        mask |= pc.is_in(keys, wanted).to_numpy(zero_copy_only=False)
    if scope.before is not None and n:
        mask |= seconds(table["timestamp"]) < int(scope.before.timestamp())
    return mask


def id_mask(table: pa.Table, column: str, values: list[str]) -> np.ndarray:
    """Boolean mask of the rows of `table` whose `column` is one of `values`."""
    return pc.is_in(table[column], pa.array(values, pa.string())).to_numpy(zero_copy_only=False)
