"""Files only their owner may read: the run folder and everything the server keeps.

A run folder holds the whole private model (checkpoints, the final model), the
messages clients received and the server secret. Its folders are made 0700 and
its files 0600 whatever the process umask, since a umask of 022 (the usual one)
would leave them readable by every local user.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

DIR_MODE = 0o700
FILE_MODE = 0o600
_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def private_dir(path: Path, *, restrict_existing: bool = True) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; return it.

    ``restrict_existing``: also make ``path`` 0700 when it exists already (a
    run folder is ours; a user's own ``output-dir`` is left as it is, and the
    run folders inside it protect what they hold).
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process
            continue
        os.chmod(folder, DIR_MODE)  # mkdir's mode is cut by the umask
    if restrict_existing and path not in missing:
        os.chmod(path, DIR_MODE)
    return path


def private_open(path: Path, mode: str = "w", newline: str | None = None) -> IO[Any]:
    """Open ``path`` for writing (``"w"``, ``"wb"`` or ``"a"``) as a 0600 file."""
    fd = os.open(path, _FLAGS[mode], FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a file that existed keeps its old mode otherwise
        if "b" in mode:
            return os.fdopen(fd, mode)
        return os.fdopen(fd, mode, newline=newline, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically, as a 0600 file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        with private_open(tmp, "wb") as handle:
            handle.write(data)
    else:
        with private_open(tmp, "w") as handle:
            handle.write(data)
    os.replace(tmp, path)


def save_private(obj: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, as a 0600 file."""
    tmp = path.with_name(path.name + ".tmp")
    with private_open(tmp, "wb") as handle:
        torch.save(dict(obj), handle)
    os.replace(tmp, path)
