"""Safety of the output folder: what ``--overwrite`` may replace, temp names, crash debris.

* :func:`check_replaceable`: ``overwrite`` replaces only what is recognisably an earlier
  output of this tool — an empty folder, or one whose model card (``README.md``) says
  drm_lightning wrote it and that holds nothing but the files it writes. ``/``, the home
  folder, the current directory and its parents, and any folder holding an input are refused.
* :func:`check_parent`: the nearest existing parent of the output must be a folder.
* :func:`sibling`: the temporary (``<out>.tmp-PID-HEX``) and replaced (``<out>.old-PID-HEX``)
  folders, short enough for a 255-byte file name even when ``out``'s name is.
* :func:`stale_leftovers` / :func:`remove_stale`: such folders left by a killed run whose
  process is gone (checked on this machine).
* :func:`cleanup_on_signals`: SIGTERM and SIGHUP raise :class:`Terminated` (a ``SystemExit``)
  so every ``with HFFolderWriter`` block removes its temporary folder, as on Ctrl-C.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "my_thesis.tex").write_text("...")
    >>> check_replaceable(root)
    Traceback (most recent call last):
    ...
    FileExistsError: refusing to replace .../: it holds 'my_thesis.tex', which drm_lightning did not write...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

__all__ = [
    "Terminated",
    "check_parent",
    "check_replaceable",
    "cleanup_on_signals",
    "remove_stale",
    "sibling",
    "stale_leftovers",
]

COPIED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
    "added_tokens.json",
)
"""Files the writer copies from the base model's folder (config and tokenizer)."""

_OUTPUT_FILES = frozenset(
    {
        "README.md",
        "model.safetensors",
        "model.safetensors.index.json",
        "heads.safetensors",  # MergeCallback(export_dir=...) with a BranchedModule
        *COPIED_FILES,
    }
)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_CARD_TAG = "- drm_lightning"
_NAME_MAX = 255
_SUFFIX_ROOM = 40  # ".tmp-" + pid (<= 10 digits) + "-" + 8 hex, with room to spare


def check_parent(out: str | os.PathLike[str]) -> None:
    """Raise ``NotADirectoryError`` if a parent of ``out`` exists but is a file."""
    path = Path(out).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"cannot create output folder {path}: {parent} is a file, not a folder"
                )
            return


def check_replaceable(
    out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Raise unless ``out`` (an existing folder) may be replaced by ``--overwrite``.

    Raises:
        ValueError: ``out`` is ``/``, the home folder, the current directory or one of its
            parents, or a folder that holds one of ``inputs``.
        FileExistsError: ``out`` holds a file or folder drm_lightning does not write (the
            first one is named), or has files but no drm_lightning model card.
    """
    given = Path(out)
    target = given.resolve()
    cwd = Path.cwd().resolve()
    special = {
        Path(target.anchor): "the file system root",
        Path.home().resolve(): "your home folder",
    }
    if target in special or target == cwd or target in cwd.parents:
        what = special.get(target) or (
            "the current directory" if target == cwd else "a parent of the current directory"
        )
        raise ValueError(
            f"refusing to replace {str(given)!r} with --overwrite: it is {what}; give a new or "
            "dedicated output folder"
        )
    for item in inputs:
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise ValueError(
                f"refusing to replace {str(given)!r} with --overwrite: it holds the input "
                f"{str(item)!r}; choose another output folder"
            )
    if not target.is_dir():
        return
    entries = sorted(target.iterdir())
    foreign = [p for p in entries if not (p.is_file() and _is_output_file(p.name))]
    if foreign:
        kind = "folder" if foreign[0].is_dir() else "file"
        raise FileExistsError(
            f"refusing to replace {target}/: it holds {foreign[0].name!r}, which drm_lightning did "
            f"not write ({kind}{f', and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
            "--overwrite only replaces an earlier drm_lightning output. Move it away or choose "
            "another output folder"
        )
    if entries and not _has_our_card(target / "README.md"):
        raise FileExistsError(
            f"refusing to replace {target}/: it looks like a model folder, but its README.md is "
            "not a drm_lightning model card, so another tool wrote it; delete it yourself or "
            "choose another output folder"
        )


def _is_output_file(name: str) -> bool:
    return name in _OUTPUT_FILES or _SHARD.fullmatch(name) is not None


def _has_our_card(card: Path) -> bool:
    try:
        with card.open(encoding="utf-8", errors="replace") as f:
            return _CARD_TAG in f.read(4096).splitlines()
    except OSError:
        return False


def _stem(out: Path) -> str:
    """``out``'s name, shortened (with a hash) when the temp suffix would pass 255 bytes."""
    name = out.name
    if len(os.fsencode(name)) + _SUFFIX_ROOM <= _NAME_MAX:
        return name
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    cut = name.encode("utf-8", "surrogateescape")[: _NAME_MAX - _SUFFIX_ROOM - 9]
    return cut.decode("utf-8", "ignore") + "~" + digest


def sibling(out: str | os.PathLike[str], kind: Literal["tmp", "old"]) -> Path:
    """A new ``<out>.<kind>-<pid>-<hex>`` path beside ``out`` (name shortened if needed).

    Example:
        >>> p = sibling("/x/" + "m" * 250, "tmp")
        >>> len(p.name) <= 255 and p.name.split(".")[-1].startswith("tmp-")
        True
    """
    path = Path(out)
    return path.with_name(f"{_stem(path)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def stale_leftovers(out: str | os.PathLike[str]) -> list[Path]:
    """Temporary/replaced folders of ``out`` whose writing process no longer runs here."""
    path = Path(out).absolute()
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(_stem(path)) + r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}")
    found = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            found.append(entry)
    return sorted(found)


def remove_stale(paths: Iterable[Path]) -> None:
    """Delete leftovers found by :func:`stale_leftovers`."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


class Terminated(SystemExit):
    """Raised by the :func:`cleanup_on_signals` handler; exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def cleanup_on_signals(tag: str = "drm-merge") -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` inside the block (main thread only).

    ``with`` blocks being unwound (an :class:`~drm_lightning.sources.writer.HFFolderWriter`)
    remove their temporary folders; a line on stderr says what stopped the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    wanted = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    previous = {name: signal.signal(getattr(signal, name), handler) for name in wanted}
    try:
        yield
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        print(f"{tag}: stopped by {name}; the partial output was removed", file=sys.stderr)
        raise
    finally:
        for name, old in previous.items():
            if signal.getsignal(getattr(signal, name)) is handler:
                signal.signal(getattr(signal, name), old)
