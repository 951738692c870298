"""Files that hold secrets: created 0600 from the start, refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class PrivateFileError(ValueError):
    """A secret's file is missing, unsafe or unreadable: the message says which and what to do."""


def write_private(path: str | Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, even briefly); refuses to overwrite."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_private(path: str | Path, what: str) -> bytes:
    """The bytes of a secret's file, which neither group nor others may read."""
    path = Path(path)
    if not path.is_file():
        raise PrivateFileError(f"{what} {path} does not exist")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PrivateFileError(f"{what} {path} has mode {mode:04o}; run `chmod 600 {path}` first")
    return path.read_bytes()
