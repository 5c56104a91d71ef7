"""What every `mmfeat` command module shares: the workspace from the group's `--workspace`, and clean errors."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # the workspace module pulls in LanceDB; commands import it only when they run
    from stores.workspace import Workspace


def workspace_of(ctx: click.Context, create: bool = True) -> Workspace:
    """The workspace named by `mmfeat --workspace` (or $MMFEAT_HOME, or the default).

    Commands that only read pass `create=False`: a workspace that does not exist is then a one-line error naming
    the path, not a new empty workspace."""
    from stores.workspace import Workspace, WorkspaceNotFound

    try:
        return Workspace(ctx.obj["workspace"], create=create)
    except WorkspaceNotFound as exc:
        raise click.ClickException(str(exc)) from None


def cli_errors(fn):
    """Unknown names and bad arguments (KeyError, ValueError) become one-line CLI errors, not tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KeyError, ValueError) as exc:
            raise click.ClickException(str(exc).strip('"')) from None

    return wrapper


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], indent: int = 0) -> None:
    """Print `rows` under `header` as an aligned plain-text table (rich, no borders): the one table printer of
    every command. Cells are shown literally (no rich markup) and never wrapped, so the output stays greppable."""
    import io

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(*header, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*(Text(_cell(value)) for value in row))
    out = io.StringIO()
    Console(file=out, width=1 << 14, highlight=False, emoji=False, color_system=None).print(table)
    for line in out.getvalue().splitlines():
        click.echo(" " * indent + line.rstrip())


def _cell(value: object) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = "" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
