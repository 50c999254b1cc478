"""Files and directories only their owner may read: homes (0700), logs and secrets (0600).

Modes are set explicitly (creation modes and ``chmod``), so they hold whatever the umask.
A secret file (a key, ZooKeeper credentials) that others may read or write is refused, as
ssh refuses a private key that is too open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "SecretFileError",
    "private_dir",
    "private_file",
    "read_secret_file",
    "write_secret_file",
]

DIR_MODE = 0o700
FILE_MODE = 0o600


class SecretFileError(ValueError):
    """A secret file is missing, unreadable, not a regular file, or open to others."""


def private_dir(path: Path) -> bool:
    """Create ``path`` (and its parents) with the directory itself 0700, or tighten it to 0700.

    Returns True when an existing directory was open to others and has been tightened.
    """
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != DIR_MODE:
        os.chmod(path, DIR_MODE)
        return bool(mode & 0o077)
    return False


def private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 if missing, else tighten it to 0600.

    Returns True when an existing file was open to others and has been tightened.
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
            return bool(mode & 0o077)
        return False
    finally:
        os.close(fd)


def read_secret_file(path: Path | str, what: str) -> bytes:
    """The bytes of the secret file ``path``; :class:`SecretFileError` names ``what`` and why
    when it is missing, not a regular file, or readable or writable by group or others."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{what} {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecretFileError(
            f"{what} {path}: mode {mode:04o} lets others read or change it; run `chmod 600 {path}`"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror or exc}") from None


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``data``; fails if it exists (never overwrites)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
