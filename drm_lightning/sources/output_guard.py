"""Safety of the output folder: what ``--overwrite`` may replace, temp names, crash debris.

* :func:`check_replaceable`: ``overwrite`` replaces only what is recognisably an earlier
  output of this tool — an empty folder, or one whose model card (``README.md``) says
  drm_lightning wrote it and that holds nothing but the files it writes. ``/``, the home
  folder, the current directory and its parents, and any folder holding an input are refused.
* :func:`check_parent`: the nearest existing parent of the output must be a folder on a file
  system that stores files (not ``/proc``), writable by this user.
* :func:`check_unexpanded_home`: a ``-o`` starting with a ``~`` the shell did not expand.
* :func:`exchange` / :func:`rename_noreplace`: ``renameat2`` (Linux) swaps two folders in one
  step, so ``--overwrite`` never leaves ``out`` missing, or renames without replacing.
* :func:`record_outcome` / :func:`outcome`: what an interrupted write left on disk, carried by
  the exception to the line that reports it.
* :func:`sibling`: the temporary (``<out>.tmp-PID-HEX``) and replaced (``<out>.old-PID-HEX``)
  folders, short enough for a 255-byte file name even when ``out``'s name is.
* :func:`stale_leftovers` / :func:`remove_stale`: such folders left by a killed run whose
  process is gone (checked on this machine).
* :func:`cleanup_on_signals`: SIGTERM and SIGHUP raise :class:`Terminated` (a ``SystemExit``)
  so every ``with HFFolderWriter`` block removes its temporary folder, as on Ctrl-C; a Ctrl-C
  is remembered even where library code swallows its ``KeyboardInterrupt``.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "my_thesis.tex").write_text("...")
    >>> check_replaceable(root)
    Traceback (most recent call last):
    ...
    FileExistsError: refusing to replace .../: it holds 'my_thesis.tex',
    which drm_lightning did not write...
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

__all__ = [
    "SignalWatch",
    "Terminated",
    "check_parent",
    "check_replaceable",
    "check_unexpanded_home",
    "cleanup_on_signals",
    "exchange",
    "interrupted",
    "outcome",
    "record_outcome",
    "remove_stale",
    "rename_noreplace",
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
        "mergekit_config.yml",  # the config of a mergekit-format merge (writer.MERGEKIT_CONFIG)
        *COPIED_FILES,
    }
)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_CARD_TAG = "- drm_lightning"
_NAME_MAX = 255
_SUFFIX_ROOM = 40  # ".tmp-" + pid (<= 10 digits) + "-" + 8 hex, with room to spare


def check_parent(out: str | os.PathLike[str]) -> None:
    """Raise unless ``out`` can be created where it is: its nearest existing parent must be a
    folder, on a file system that stores files, that this user may write to.

    Raises:
        NotADirectoryError: that parent is a file.
        OSError: it is on a pseudo file system (``/proc``, ``/sys``: no size), a read-only
            file system, or this user may not create files in it.
    """
    path = Path(out).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"cannot create output folder {path}: {parent} is a file, not a folder"
                )
            _check_writable(path, parent)
            return


def _check_writable(path: Path, parent: Path) -> None:
    try:
        fs = os.statvfs(parent)
    except OSError:
        return  # cannot tell: creating the folder will say
    if fs.f_blocks == 0:
        raise OSError(
            f"cannot create output folder {path}: {parent} is not on a file system that can "
            "hold a model (it reports no size: a pseudo file system such as /proc or /sys); "
            "choose another output folder"
        )
    if fs.f_flag & os.ST_RDONLY:
        raise OSError(
            f"cannot create output folder {path}: {parent} is on a read-only file system; "
            "choose another output folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot create output folder {path}: you may not create files in {parent}; "
            "choose another output folder"
        )


def check_unexpanded_home(text: str) -> None:
    """Refuse an output path whose first component starts with ``~`` (the shell expands
    ``~`` only unquoted, at the start of a word: ``-o '~/m'`` or ``-o=~/m`` would create a
    folder named ``~``).

    Raises:
        ValueError: naming the path, what it was probably meant to be, and ``./~``.

    Example:
        >>> check_unexpanded_home("./~/m")
        >>> check_unexpanded_home("~/m")
        Traceback (most recent call last):
        ...
        ValueError: output folder '~/m' starts with '~', which the shell did not expand...
    """
    first = text.split(os.sep, 1)[0]
    if not first.startswith("~"):
        return
    meant = os.path.expanduser(text)
    hint = f" ({meant!r}?)" if meant != text else ""
    raise ValueError(
        f"output folder {text!r} starts with {first!r}, which the shell did not expand (it "
        f"was quoted, or not at the start of a word), so a folder named {first!r} would be "
        f"created here: write the path out{hint}, or './{text}' if you really mean a folder "
        f"named {first!r}"
    )


# ------------------------------------------------------------------ renameat2

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


@functools.cache
def _renameat2_call() -> Callable[..., int] | None:
    """libc's ``renameat2``, else the raw system call on x86_64/aarch64, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    args = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func = getattr(libc, "renameat2", None)
    if func is not None:
        func.argtypes, func.restype = args, ctypes.c_int
        return func
    number = _SYSCALL_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.argtypes, syscall.restype = [ctypes.c_long, *args], ctypes.c_long
    return functools.partial(syscall, number)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the file system lacks it."""
    call = _renameat2_call()
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (``renameat2`` with ``RENAME_EXCHANGE``):
    at every moment each name holds one complete folder. Returns False, changing nothing,
    where the system or the file system cannot (not Linux, an old kernel, some network file
    systems).

    Raises:
        OSError: the exchange failed for another reason (``b`` missing, ...).
    """
    return _renameat2(Path(a), Path(b), _RENAME_EXCHANGE)


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (in one step where ``renameat2`` with
    ``RENAME_NOREPLACE`` is supported; elsewhere checked just before).

    Raises:
        FileExistsError: ``dst`` exists (an empty folder included, which ``rename`` replaces).
    """
    if not _renameat2(Path(src), Path(dst), _RENAME_NOREPLACE):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)


# ------------------------------------------------------------------ what was left on disk

_OUTCOME = "drm_lightning_outcome"


def record_outcome(exc: BaseException, text: str) -> None:
    """Attach to ``exc`` what it left on disk (``"X was written; ..."``), for :func:`outcome`."""
    setattr(exc, _OUTCOME, text)


def outcome(exc: BaseException, default: str) -> str:
    """What ``exc`` (or an exception it was raised from) left on disk, else ``default``.

    Example:
        >>> err = KeyboardInterrupt()
        >>> outcome(err, "nothing was written")
        'nothing was written'
        >>> record_outcome(err, "out was written")
        >>> outcome(err, "nothing was written")
        'out was written'
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the chain of causes, not its cycles
        if seen is None:
            break
        text = getattr(seen, _OUTCOME, None)
        if text:
            return str(text)
        seen = seen.__cause__ or seen.__context__
    return default


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


class SignalWatch:
    """What :func:`cleanup_on_signals` saw: ``interrupted`` is set by Ctrl-C (SIGINT) even when
    library code swallowed the ``KeyboardInterrupt`` it raised (C code clearing errors, a
    finalizer), so that the run still stops, and an error caused by the half-done step is
    reported as the interruption it is."""

    def __init__(self) -> None:
        self.interrupted = False


_WATCH: SignalWatch | None = None


def interrupted() -> bool:
    """True once Ctrl-C was pressed inside :func:`cleanup_on_signals` (see :class:`SignalWatch`)."""
    return _WATCH is not None and _WATCH.interrupted


@contextlib.contextmanager
def cleanup_on_signals(tag: str = "drm-merge") -> Iterator[SignalWatch]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` inside the block (main thread only),
    and remember Ctrl-C (:class:`SignalWatch`). Nested blocks share the outer one's watch.

    ``with`` blocks being unwound (an :class:`~drm_lightning.sources.writer.HFFolderWriter`)
    remove their temporary folders; a line on stderr says what stopped the run and what was
    left on disk (:func:`outcome`).
    """
    global _WATCH
    if _WATCH is not None or threading.current_thread() is not threading.main_thread():
        yield _WATCH or SignalWatch()
        return
    watch = _WATCH = SignalWatch()

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    def on_interrupt(signum: int, frame: object) -> None:
        watch.interrupted = True
        raise KeyboardInterrupt

    handlers: dict[str, Callable[[int, object], None]] = {
        name: handler for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
    }
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not an ignored one
        handlers["SIGINT"] = on_interrupt
    previous: dict[str, object] = {}
    try:
        for name, new in handlers.items():
            previous[name] = signal.signal(getattr(signal, name), new)
        yield watch
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        print(f"{tag}: stopped by {name}; {outcome(stop, 'nothing was written')}", file=sys.stderr)
        raise
    finally:
        _WATCH = None
        for name, old in previous.items():
            if signal.getsignal(getattr(signal, name)) is handlers[name]:
                signal.signal(getattr(signal, name), old)  # type: ignore[arg-type]
