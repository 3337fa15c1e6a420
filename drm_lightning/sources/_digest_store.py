"""SHA-256 digests of input files kept across runs, so a re-merge does not hash them again.

The model card lists the SHA-256 of every input file
(:func:`~drm_lightning.sources.base.sha256_of`). Hashing runs at about 1.2 GB/s on one core:
16 GB of an 8B model's inputs cost 13 CPU-seconds on every merge. Digests are stored in
``sha256.json`` under ``$DRM_LIGHTNING_CACHE`` (default
``$XDG_CACHE_HOME/drm_lightning``, else ``~/.cache/drm_lightning``; ``off`` keeps nothing),
keyed by the file's real path, size, inode, modification and change times: writing the file
changes its change time, which no user call can set back, so a stale digest is not taken
(on file systems whose times are coarse, a rewrite of the same size within one tick of the
clock would not be seen: ``DRM_LIGHTNING_CACHE=off`` there). Updates from several processes
are serialised with ``flock``. The store is an optimisation: unreadable or unwritable, it is
ignored.

What it holds goes into model cards, so it is trusted no more than ``~/.ssh`` is: the folder
and the files must belong to this user and not be writable by group or others (else ignored,
with one warning), the store and its lock are opened without following a link (a planted
``sha256.lock`` link makes nothing be created where it points), and only well-formed entries
(a 64-digit lowercase hex digest of a key of integers) are taken; anything else is hashed
again.

Example:
    >>> import os, tempfile, pathlib
    >>> os.environ["DRM_LIGHTNING_CACHE"] = tempfile.mkdtemp()
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> stored_digest(p) is None
    True
    >>> store_digest(p, "ba7816bf" * 8)
    >>> stored_digest(p)[:16]
    'ba7816bfba7816bf'
    >>> del os.environ["DRM_LIGHTNING_CACHE"]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

STORE_ENV = "DRM_LIGHTNING_CACHE"
MAX_ENTRIES = 4096
"""Digests kept; the oldest go first."""

MAX_STORE_BYTES = 64 * 1024 * 1024
"""A larger store file is not read (4096 entries take well under 2 MB)."""

_LOCK = threading.Lock()
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(r".+\|\d+\|\d+\|-?\d+\|-?\d+")  # real path|size|inode|mtime_ns|ctime_ns
_WARNED: set[str] = set()
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _distrust(path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` (stat ``st``) may not be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"it belongs to user id {st.st_uid}, not to you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def _ignored(path: Path, why: str) -> None:
    """One warning per path and process."""
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(
            f"ignoring the input digest store {path}: {why} (like ~/.ssh, it must be yours "
            "and not writable by others: fix with chmod go-w, or delete it); input files are "
            "hashed again",
            UserWarning,
            stacklevel=4,
        )


def _trusted_dir(store: Path, *, create: bool) -> bool:
    """The store's folder exists (``create``: made, private) and may be trusted."""
    folder = store.parent
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(folder)
    except OSError:
        return False
    why = _distrust(folder, st) if stat.S_ISDIR(st.st_mode) else "it is not a folder"
    if why is not None:
        _ignored(folder, why)
        return False
    return True


@contextlib.contextmanager
def _store_locked(store: Path) -> Iterator[bool]:
    """Other processes' updates wait (``flock`` on a lock file beside the store); yields
    False if the store must not be updated. If the lock cannot be had for another reason,
    the update goes ahead unlocked (the worst outcome: a digest hashed again)."""
    lock = store.parent / "sha256.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    except OSError:
        if os.path.islink(lock):  # never create or lock a file through a planted link
            _ignored(lock, "it is a link")
            yield False
        else:
            yield True
        return
    try:
        why = _distrust(lock, os.fstat(fd))
        if why is not None:
            _ignored(lock, why)
            yield False
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def store_file() -> Path | None:
    """Where digests are kept, or None when the store is off."""
    root = os.environ.get(STORE_ENV)
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (
            str(Path(xdg) / "drm_lightning")
            if xdg
            else str(Path.home() / ".cache" / "drm_lightning")
        )
    if root.strip().lower() in ("off", ""):
        return None
    return Path(root).expanduser() / "sha256.json"


def file_key(path: str | os.PathLike[str]) -> str:
    """What identifies the file's content here: real path, size, inode and both times."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _load(store: Path) -> dict[str, str]:
    """The well-formed entries of a trusted store ({} if there is none)."""
    try:
        fd = os.open(store, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        if os.path.islink(store):
            _ignored(store, "it is a link")
        return {}
    try:
        st = os.fstat(fd)
        why = _distrust(store, st) if stat.S_ISREG(st.st_mode) else "it is not a regular file"
        if why is not None:
            _ignored(store, why)
            return {}
        if st.st_size > MAX_STORE_BYTES:
            return {}
        with os.fdopen(os.dup(fd), "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return {}
    return {
        k: v
        for k, v in data.items()
        if isinstance(k, str) and isinstance(v, str) and _KEY.fullmatch(k) and _DIGEST.fullmatch(v)
    }


def stored_digest(path: str | os.PathLike[str], key: str | None = None) -> str | None:
    """The digest stored for ``path`` as it is now (or as ``key``, its :func:`file_key`), or
    None."""
    store = store_file()
    if store is None:
        return None
    with _LOCK:
        if not _trusted_dir(store, create=False):
            return None
        return _load(store).get(key or file_key(path))


def store_digest(path: str | os.PathLike[str], digest: str, key: str | None = None) -> None:
    """Keep ``digest`` for ``path`` (atomically replacing the store). ``key``: the
    :func:`file_key` taken before hashing; nothing is kept if the file changed since."""
    store = store_file()
    if store is None or not _DIGEST.fullmatch(digest):
        return
    with _LOCK:
        if not _trusted_dir(store, create=True):
            return
        with _store_locked(store) as allowed:
            if allowed:
                _update(store, path, digest, key)


def _update(store: Path, path: str | os.PathLike[str], digest: str, key: str | None) -> None:
    """Add ``digest`` to the store, replacing the file in one step."""
    try:
        now = file_key(path)
        if key is not None and key != now:
            return
        entries = _load(store)
        entries.pop(now, None)  # re-added last: the newest entries are the ones kept
        entries[now] = digest
        kept = dict(list(entries.items())[-MAX_ENTRIES:])
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=".sha256-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, store)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only home: hash again next time
