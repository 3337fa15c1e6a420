"""SHA-256 digests of input files kept across runs, so a re-merge does not hash them again.

The model card lists the SHA-256 of every input file (:func:`~drm_lightning.sources.base.sha256_of`).
Hashing runs at about 1.2 GB/s on one core: 16 GB of an 8B model's inputs cost 13 CPU-seconds
on every merge. Digests are stored in ``sha256.json`` under ``$DRM_LIGHTNING_CACHE`` (default
``$XDG_CACHE_HOME/drm_lightning``, else ``~/.cache/drm_lightning``; ``off`` keeps nothing),
keyed by the file's real path, size, inode, modification and change times: writing the file
changes its change time, which no user call can set back, so a stale digest is not taken
(on file systems whose times are coarse, a rewrite of the same size within one tick of the
clock would not be seen: ``DRM_LIGHTNING_CACHE=off`` there). Updates from several processes
are serialised with ``flock``. The store is an optimisation: unreadable or unwritable, it is
ignored.

Example:
    >>> import os, tempfile, pathlib
    >>> os.environ["DRM_LIGHTNING_CACHE"] = tempfile.mkdtemp()
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> stored_digest(p) is None
    True
    >>> store_digest(p, "ba7816bf")
    >>> stored_digest(p)
    'ba7816bf'
    >>> del os.environ["DRM_LIGHTNING_CACHE"]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

STORE_ENV = "DRM_LIGHTNING_CACHE"
MAX_ENTRIES = 4096
"""Digests kept; the oldest go first."""

_LOCK = threading.Lock()


@contextlib.contextmanager
def _store_locked(store: Path) -> Iterator[None]:
    """Other processes' updates wait (``flock`` on a lock file beside the store); if the lock
    cannot be had, the update goes ahead unlocked (the worst outcome: a digest hashed again)."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(store.parent / "sha256.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def store_file() -> Path | None:
    """Where digests are kept, or None when the store is off."""
    root = os.environ.get(STORE_ENV)
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "drm_lightning") if xdg else str(Path.home() / ".cache" / "drm_lightning")
    if root.strip().lower() in ("off", ""):
        return None
    return Path(root).expanduser() / "sha256.json"


def file_key(path: str | os.PathLike[str]) -> str:
    """What identifies the file's content here: real path, size, inode and both times."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _load(store: Path) -> dict[str, str]:
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def stored_digest(path: str | os.PathLike[str], key: str | None = None) -> str | None:
    """The digest stored for ``path`` as it is now (or as ``key``, its :func:`file_key`), or None."""
    store = store_file()
    if store is None:
        return None
    with _LOCK:
        return _load(store).get(key or file_key(path))


def store_digest(path: str | os.PathLike[str], digest: str, key: str | None = None) -> None:
    """Keep ``digest`` for ``path`` (atomically replacing the store). ``key``: the
    :func:`file_key` taken before hashing; nothing is kept if the file changed since."""
    store = store_file()
    if store is None:
        return
    with _LOCK, _store_locked(store):
        try:
            now = file_key(path)
            if key is not None and key != now:
                return
            entries = _load(store)
            entries.pop(now, None)  # re-added last: the newest entries are the ones kept
            entries[now] = digest
            kept = dict(list(entries.items())[-MAX_ENTRIES:])
            store.parent.mkdir(parents=True, exist_ok=True)
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
