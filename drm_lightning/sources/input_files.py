"""Input files are data: regular files only, and the very file whose header was read.

Every reader opens its files through :func:`open_regular` (or :func:`file_identity` /
:func:`read_regular`), the one place that

* refuses what is not a regular file — a FIFO, a device, a socket, a link to one — from
  ``stat`` alone, before anything is opened (opening a FIFO blocks; reading ``/dev/zero``
  never ends), naming the path and what it is;
* records the file's :class:`FileIdentity` (device, inode, size, modification and change
  times) when its header is read. :func:`check_unchanged` compares a file, or a descriptor
  held on it, with that record: a file replaced (written anew and renamed over) or rewritten
  in place while a merge reads it fails naming the file, instead of giving weights mixed from
  two versions and a model card listing the new version's SHA-256.

Example:
    >>> import os, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> os.mkfifo(folder / "pipe.safetensors")
    >>> file_identity(folder / "pipe.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: .../pipe.safetensors is not a regular file (a FIFO); only regular files are read ...
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FileIdentity",
    "changed_error",
    "check_regular",
    "check_unchanged",
    "file_identity",
    "open_regular",
    "read_regular",
]

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another: device, inode, size and both times.

    Writing a file changes its modification and change times; renaming another file over it
    gives the path another inode (and the old inode, still held open, a new change time).
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        """The identity of a ``stat``/``fstat`` result."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a file")


def check_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``stat`` of ``path`` (links followed), which must be a regular file; nothing is opened.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a link to nothing).
        ValueError: ``path`` is a FIFO, a device, a socket or a folder (or a link to one).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            raise FileNotFoundError(
                f"{p} is a link to {os.readlink(p)!r}, which does not exist"
            ) from None
        raise FileNotFoundError(f"{p} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        link = f"a link to {os.path.realpath(p)}, " if p.is_symlink() else ""
        raise ValueError(
            f"{p} is not a regular file ({link}{_kind(st.st_mode)}); only regular files are "
            "read as inputs, and it was not opened"
        )
    return st


def open_regular(
    path: str | os.PathLike[str], *, expect: FileIdentity | None = None
) -> tuple[int, FileIdentity]:
    """Open ``path`` for reading after :func:`check_regular`; returns the descriptor and the
    identity of the file it reads (``expect``: the identity it must have, else
    :func:`changed_error`).

    The open does not block (``O_NONBLOCK``) even if a FIFO took the file's place between the
    ``stat`` and the open; the descriptor's ``fstat`` then refuses it.
    """
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file ({_kind(st.st_mode)})")
        identity = FileIdentity.of(st)
        if expect is not None and identity != expect:
            raise changed_error(path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, identity


def file_identity(path: str | os.PathLike[str]) -> FileIdentity:
    """The identity of ``path`` now (a regular file, see :func:`check_regular`)."""
    return FileIdentity.of(check_regular(path))


def read_regular(
    path: str | os.PathLike[str], *, expect: FileIdentity | None = None
) -> tuple[bytes, FileIdentity]:
    """All bytes of a small regular file (a config, an index) and the identity they are of.

    Raises:
        ValueError: not a regular file, or the file changed while it was read.
    """
    fd, identity = open_regular(path, expect=expect)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
        check_unchanged(path, identity, fd, path_too=False)
    finally:
        os.close(fd)
    return data, identity


def changed_error(path: str | os.PathLike[str]) -> ValueError:
    """The error for an input that changed since its header was read."""
    return ValueError(
        f"{path} changed while it was being merged (replaced or rewritten); the merge was "
        "stopped so that the output does not mix two versions of it. Merge again once nothing "
        "writes to it"
    )


def check_unchanged(
    path: str | os.PathLike[str],
    identity: FileIdentity,
    fd: int | None = None,
    *,
    path_too: bool = True,
) -> None:
    """Raise :func:`changed_error` unless ``fd`` (when given) and ``path`` (unless
    ``path_too`` is false) are still the file ``identity`` was taken of."""
    try:
        if fd is not None and FileIdentity.of(os.fstat(fd)) != identity:
            raise changed_error(path)
        if path_too and FileIdentity.of(os.stat(path)) != identity:
            raise changed_error(path)
    except OSError as err:  # removed, or replaced by something unreadable
        raise changed_error(path) from err
