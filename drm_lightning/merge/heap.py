"""Give the C heap's free memory back to the system after a large merge (glibc only).

A DRM matrix merge allocates and frees many float buffers of different sizes. glibc keeps
freed buffers below its mmap threshold (which rises to 32 MiB as large buffers are freed) in
the heap, so after a few hundred matrices the process's resident memory stays hundreds of
MiB above what is alive, and the next large merge adds its own peak on top of that.
``malloc_trim(0)`` returns that free memory; it takes milliseconds, against seconds for the
merge it follows. Elsewhere (macOS, musl) it does nothing.

Example:
    >>> release_free_heap() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """``malloc_trim(0)`` where glibc provides it; whether memory was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
