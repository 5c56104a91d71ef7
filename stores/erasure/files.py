"""The files of a workspace, local or on object storage, through one filesystem: list, read, delete, write.

Erasure needs the files themselves where Lance only offers tables: the raw-byte scan reads every object, purging
deletes the ones no version references, and the workspace secret is one small object. A local workspace is a
directory; an `s3://bucket/prefix` workspace is read through pyarrow's S3 filesystem with the workspace's storage
options (the same AWS_* settings Lance gets).

    >>> fs, root = filesystem(ws)
    >>> [f for f in list_files(ws) if f.endswith(".lance")]
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.fs as pafs

from stores.workspace import Workspace

BLOCK = 64 << 20


def filesystem(ws: Workspace) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `ws` and the workspace's root path on it."""
    if ws.is_local:
        return pafs.LocalFileSystem(), ws.uri
    scheme, _, rest = ws.uri.partition("://")
    if scheme != "s3":
        raise ValueError(f"workspace {ws.uri}: erasure supports local paths and s3:// workspaces only")
    opts = ws.storage_options
    endpoint = opts.get("aws_endpoint", "")
    fs = pafs.S3FileSystem(
        access_key=opts.get("aws_access_key_id"),
        secret_key=opts.get("aws_secret_access_key"),
        session_token=opts.get("aws_session_token"),
        region=opts.get("aws_region"),
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme="http" if endpoint.startswith("http://") else None,
    )
    return fs, rest.rstrip("/")


def list_files(ws: Workspace, under: str = "") -> list[str]:
    """Every file below the workspace root (or below `under`), as paths relative to the root, sorted."""
    fs, root = filesystem(ws)
    base = f"{root}/{under}".rstrip("/")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(
        info.path[len(root) + 1 :] for info in fs.get_file_info(selector) if info.type == pafs.FileType.File
    )


def read_blocks(ws: Workspace, rel: str, block: int = BLOCK) -> Iterator[bytes]:
    """The bytes of one workspace file, in blocks; raises OSError when it cannot be read."""
    fs, root = filesystem(ws)
    with fs.open_input_stream(f"{root}/{rel}") as fh:
        while chunk := fh.read(block):
            yield chunk


def delete_file(ws: Workspace, rel: str) -> None:
    fs, root = filesystem(ws)
    fs.delete_file(f"{root}/{rel}")


def read_file(ws: Workspace, rel: str) -> bytes | None:
    """A small file's bytes, None when it does not exist."""
    fs, root = filesystem(ws)
    if fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{rel}") as fh:
        return fh.read()


def write_file(ws: Workspace, rel: str, data: bytes) -> None:
    """Write a small file (an object on s3)."""
    fs, root = filesystem(ws)
    parent = f"{root}/{rel}".rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(f"{root}/{rel}") as fh:
        fh.write(data)
