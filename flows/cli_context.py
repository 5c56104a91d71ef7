"""What every `mmfeat` command module shares: the workspace from the group's `--workspace`, and clean errors."""

from __future__ import annotations

import functools
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
