"""Write merged weights as a Hugging Face model folder, atomically.

:class:`HFFolderWriter` streams tensors into safetensors shards of at most
``max_shard_bytes``: each tensor is written to its shard file as it arrives and not kept
(:class:`~drm_lightning.sources._shard_file.ShardFile`), so memory does not grow with the
shard or the model. Then — only when the ``with`` block ends without error — names the
shards like ``save_pretrained`` (``model-00001-of-00003.safetensors`` + index, or a single
``model.safetensors``), copies the config and tokenizer files (chosen and checked when the
writer is made, :func:`side_files`), writes a model card (after checking that no input file
changed while it was merged), and moves the finished folder into place. Until then
everything lives in a hidden sibling folder ``<out>.tmp-<pid>-<random>``; on any error (a
full disk included) that folder is removed and ``out_dir`` is left as it was.
``overwrite`` replaces only an earlier drm_lightning output (see
:mod:`drm_lightning.sources.output_guard`); a symlinked ``out_dir`` is followed, so the link
keeps pointing at the new folder.

Example:
    >>> import tempfile, pathlib, torch
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "merged"
    >>> with HFFolderWriter(out, metadata={"method": "ties"}) as w:
    ...     w.add("w", torch.ones(2, 2))
    >>> sorted(p.name for p in out.iterdir())
    ['README.md', 'model.safetensors']
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from torch import Tensor

from drm_lightning.sources._shard_file import RowPieces, ShardFile
from drm_lightning.sources.base import hash_in_background, sha256_of
from drm_lightning.sources.input_files import (
    FileIdentity,
    check_regular,
    check_unchanged,
    open_regular,
    read_regular,
)
from drm_lightning.sources.output_guard import (
    COPIED_FILES,
    check_parent,
    check_replaceable,
    exchange,
    interrupted,
    outcome,
    record_outcome,
    remove_stale,
    rename_noreplace,
    sibling,
    stale_leftovers,
)

__all__ = ["COPIED_FILES", "TOKENIZER_FILES", "HFFolderWriter", "check_free_space", "side_files"]

_GIB = 1024**3
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = tuple(f for f in COPIED_FILES if f not in CONFIG_FILES)
"""The tokenizer files among :data:`COPIED_FILES` (what ``tokenizer_from`` replaces)."""
MERGEKIT_CONFIG = "mergekit_config.yml"
"""The mergekit-format config of the merge, beside the card (``metadata["mergekit_config"]``)."""


class SideFile(NamedTuple):
    """A config or tokenizer file chosen for the output: where it was found, the real file
    it is (links resolved) and that file's identity when it was checked."""

    source: Path
    real: Path
    identity: FileIdentity


def side_files(
    copy_from: str | os.PathLike[str] | None,
    tokenizer_from: str | os.PathLike[str] | None = None,
) -> dict[str, SideFile]:
    """The config and tokenizer files an output copies, by name, each checked now.

    The files of :data:`COPIED_FILES` present in ``copy_from`` (the tokenizer files from
    ``tokenizer_from`` instead, when given: mergekit's ``tokenizer_source``). A model folder
    is data from anyone: each file must be a regular file whose real path is inside its
    folder (a link that stays inside is followed; in a Hugging Face cache snapshot, a link
    into the model's ``blobs`` folder too), and a ``.json`` file must parse. Checked before
    any weight is read, so a folder whose ``config.json`` links to ``/etc/shadow`` fails
    with nothing written.

    Raises:
        ValueError: a file links out of its folder, is not a regular file (a FIFO, a device)
            or is a ``.json`` file that does not parse; the message names it.
        FileNotFoundError: a file is a link to nothing.

    Example:
        >>> import os, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text('{"model_type": "llama"}')
        >>> list(side_files(folder))
        ['config.json']
        >>> os.symlink("/etc/hostname", folder / "tokenizer.json")
        >>> side_files(folder)
        Traceback (most recent call last):
        ...
        ValueError: .../tokenizer.json is a link to /etc/hostname, outside the model folder ...
    """
    chosen: dict[str, SideFile] = {}
    tokenizers = tokenizer_from
    if tokenizers is not None and copy_from is not None and _same(tokenizers, copy_from):
        tokenizers = None  # the base's own tokenizer
    for folder, names in (
        (copy_from, CONFIG_FILES if tokenizers is not None else COPIED_FILES),
        (tokenizers, TOKENIZER_FILES),
    ):
        if folder is None:
            continue
        roots = _roots(Path(folder))
        for name in names:
            file = Path(folder) / name
            if os.path.lexists(file):
                chosen[name] = _side_file(file, roots)
    return chosen


def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really be: inside it, and for a Hugging Face cache
    snapshot (``models--org--name/snapshots/REV``) in that model's ``blobs`` folder."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def _side_file(file: Path, roots: list[Path]) -> SideFile:
    real = Path(os.path.realpath(file))
    if not any(real.is_relative_to(root) for root in roots):
        raise ValueError(
            f"{file} is a link to {real}, outside the model folder {file.parent}: only files "
            "inside it are copied to the output (copy the file itself there if you mean it)"
        )
    check_regular(file)
    if file.suffix == ".json":
        data, identity = read_regular(real)
        try:
            json.loads(data)
        except ValueError as err:
            raise ValueError(
                f"{file} is not valid JSON ({err}); it would be copied to the output as the "
                f"merged model's {file.name}"
            ) from None
    else:
        identity = FileIdentity.of(check_regular(real))
    return SideFile(file, real, identity)


def check_free_space(out_dir: str | os.PathLike[str], needed_bytes: int) -> None:
    """Raise before any work if the file system of ``out_dir`` lacks ``needed_bytes``.

    ``out_dir`` need not exist; its nearest existing parent is measured.

    Args:
        out_dir: where the output will be written.
        needed_bytes: bytes the output will take.

    Raises:
        OSError: (``errno.ENOSPC``) naming the folder, the space needed and the space free;
            (``errno.EINVAL``) the folder is on a pseudo file system (no size: ``/proc``).

    Example:
        >>> import tempfile
        >>> check_free_space(tempfile.gettempdir(), 1)
        >>> check_free_space(tempfile.gettempdir(), 10**18)
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] not enough free space to write ...
    """
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    if usage.total == 0:  # /proc, /sys: "0.00 GiB free" would hide the real problem
        raise OSError(
            errno.EINVAL,
            f"cannot write {out_dir}: {probe} is not on a file system that can hold a model "
            "(it reports no size: a pseudo file system such as /proc or /sys); choose another "
            "output folder",
        )
    free = usage.free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space to write {out_dir}: needs {needed_bytes / _GIB:.2f} GiB, "
            f"{free / _GIB:.2f} GiB free on the file system of {probe}; free some space or choose "
            "another output folder",
        )


class HFFolderWriter:
    """Context manager writing a sharded safetensors HF folder atomically.

    Use it in a ``with`` block; ``add`` each tensor once. The folder appears at ``out_dir``
    only when the block exits normally.

    Args:
        out_dir: the folder to create.
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete, by
            swapping the two in one step where the file system can), if it is an earlier
            drm_lightning output
            (:func:`~drm_lightning.sources.output_guard.check_replaceable`); leftovers of
            killed earlier runs writing the same ``out_dir`` are removed. Without it an
            existing ``out_dir`` raises ``FileExistsError`` at construction.
        max_shard_bytes: shard size limit; a tensor larger than this gets a shard of its own.
        copy_from: a folder (usually the base model's) to copy ``config.json``,
            ``generation_config.json`` and tokenizer files from, when present (chosen and
            checked at construction, see :func:`side_files`).
        tokenizer_from: a folder to copy the tokenizer files from instead (mergekit's
            ``tokenizer_source``).
        metadata: what the model card says. Recognised keys: ``method`` (str),
            ``parameters`` (mapping), ``base`` (a source, a path, or a string),
            ``branches`` (list of mappings with ``source``/``path`` and ``coefficient``, or
            of sources/paths), ``files`` (extra paths to hash), ``base_model`` (model names
            for the card's front matter), ``mergekit_config`` (a mergekit-format config's
            text: written as ``mergekit_config.yml`` and shown in the card, as
            ``mergekit-yaml`` does). Other keys are listed as-is. Every file of the base and
            branches is listed with its SHA-256.
        expected_bytes: if given, :func:`check_free_space` runs at construction.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it holds files
            drm_lightning did not write.
        NotADirectoryError: ``copy_from`` is not a folder, ``out_dir`` is an existing file,
            or a parent of ``out_dir`` is a file.
        ValueError: ``max_shard_bytes`` is not positive; a file to copy links out of its
            folder, is not a regular file or (``.json``) does not parse; when the block ends:
            an input file changed while it was merged.
        OSError: not enough free space (with ``expected_bytes``), or any write error.

    Example:
        >>> import tempfile, pathlib, torch
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "m"
        >>> with HFFolderWriter(out, max_shard_bytes=64) as w:
        ...     for i in range(3):
        ...         w.add(f"layer{i}.weight", torch.zeros(4, 4))
        >>> sorted(p.name for p in out.glob("*.safetensors"))
        ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors',
         'model-00003-of-00003.safetensors']
        >>> HFFolderWriter(out)
        Traceback (most recent call last):
        ...
        FileExistsError: output folder .../m already exists;
        pass overwrite=True (--overwrite) to replace it
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        max_shard_bytes: int = 2 * _GIB,
        copy_from: str | os.PathLike[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        expected_bytes: int | None = None,
        tokenizer_from: str | os.PathLike[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.is_symlink():
            self.out_dir = self.out_dir.resolve()  # replace the folder it points to, keep the link
        self.overwrite = overwrite
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.max_shard_bytes = int(max_shard_bytes)
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.metadata: dict[str, Any] = dict(metadata or {})
        if self.out_dir.exists():
            if not self.out_dir.is_dir():
                raise NotADirectoryError(
                    f"output path {self.out_dir} exists and is a file, not a folder"
                )
            if not overwrite:
                raise FileExistsError(
                    f"output folder {self.out_dir} already exists; "
                    "pass overwrite=True (--overwrite) to replace it"
                )
            check_replaceable(self.out_dir)
        check_parent(self.out_dir)
        if overwrite:
            remove_stale(stale_leftovers(self.out_dir))
        for arg, folder in (("copy_from", self.copy_from), ("tokenizer_from", tokenizer_from)):
            if folder is not None and not Path(folder).is_dir():
                what = "is a file" if Path(folder).exists() else "does not exist"
                raise NotADirectoryError(f"{arg}={folder} {what}; expected a model folder")
        self._side_files = side_files(self.copy_from, tokenizer_from)
        if expected_bytes is not None:
            check_free_space(self.out_dir, expected_bytes)
        self.tmp_dir: Path | None = None
        self._open: ShardFile | None = None  # the shard being written
        self._open_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._names: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._closed = False

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> HFFolderWriter:
        if self.tmp_dir is not None or self._closed:
            raise RuntimeError("an HFFolderWriter can be entered only once")
        if interrupted():  # Ctrl-C whose KeyboardInterrupt library code swallowed: stop now
            raise KeyboardInterrupt
        tmp_dir = sibling(self.out_dir, "tmp")
        with _located(tmp_dir):
            check_parent(self.out_dir)
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir.mkdir()
        self.tmp_dir = tmp_dir
        hash_in_background(self._card_files())  # the model card's digests, while the merge runs
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort_after(exc)
            return
        try:
            self._finish()
        except BaseException as err:
            self._abort_after(err)
            raise

    def _abort_after(self, exc: BaseException | None) -> None:
        """:meth:`abort`, and say on ``exc`` what is left (unless the swap said it already)."""
        removed = self.tmp_dir is not None and self.tmp_dir.exists()
        self.abort()
        if removed and exc is not None and not outcome(exc, ""):
            record_outcome(exc, "nothing was written (the partial output was removed)")

    # ------------------------------------------------------------------ writing

    @property
    def names(self) -> list[str]:
        """Names added so far, in order."""
        return list(self._sizes)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data added so far."""
        return sum(self._sizes.values())

    def add(self, name: str, tensor: Tensor | RowPieces) -> None:
        """Write one tensor into the current shard, starting a new shard when it is full.

        ``tensor`` may be a :class:`~drm_lightning.sources._shard_file.RowPieces`: its pieces
        are written as they are produced (in the background if they are ``fresh``), so a
        tensor larger than memory can be written.

        The tensor's bytes go to disk now (a few odd-sized ones, under 8 bytes a row, wait for
        the shard's end); nothing the size of a shard is kept in memory. The caller may reuse
        or modify the tensor right away, and tied weights can be added under each name.

        Raises:
            RuntimeError: the writer is not inside its ``with`` block.
            TypeError: ``tensor`` is not a tensor, ``name`` not a non-empty string, or the
                dtype has no safetensors code.
            ValueError: ``name`` was added before.
            OSError: writing a shard failed (the ``with`` block then removes everything).
        """
        if self.tmp_dir is None or self._closed:
            raise RuntimeError(
                "HFFolderWriter.add() must be called inside the writer's `with` block"
            )
        if interrupted():  # Ctrl-C whose KeyboardInterrupt library code swallowed (a JIT callback)
            raise KeyboardInterrupt
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(tensor, (Tensor, RowPieces)):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added to {self.out_dir}")
        owned = tensor if isinstance(tensor, RowPieces) else tensor.detach().to("cpu").contiguous()
        size = (
            owned.nbytes if isinstance(owned, RowPieces) else owned.numel() * owned.element_size()
        )
        if self._open is not None and self._open_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._open is None:
            filename = f"shard-{len(self._shards) + 1:05d}.safetensors.part"
            with _located(self.tmp_dir / filename):
                self._open = ShardFile(
                    self.tmp_dir / filename, header_reserve=_header_reserve(self.max_shard_bytes)
                )
            self._open_bytes = 0
        with _located(self._open.path):
            if isinstance(owned, RowPieces):
                self._open.add_pieces(name, owned)
            else:
                self._open.add(name, owned)
        self._names.add(name)
        self._sizes[name] = size
        self._open_bytes += size

    def add_all(self, tensors: Mapping[str, Tensor] | Sequence[tuple[str, Tensor]]) -> None:
        """``add`` every ``(name, tensor)`` of a mapping or an iterable of pairs, in order."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        """Finish the shard being written (its header goes in last)."""
        shard, self._open = self._open, None
        if shard is None:
            return
        with _located(shard.path):
            try:
                shard.close()
            except BaseException:
                shard.discard()
                raise
        self._shards.append((shard.path.name, shard.names))

    def abort(self) -> None:
        """Drop everything written so far; ``out_dir`` is left untouched. Idempotent."""
        self._closed = True
        if self._open is not None:
            self._open.discard()
            self._open = None
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _finish(self) -> None:
        if self._closed:
            raise RuntimeError("HFFolderWriter already closed")
        if not self._names:
            raise ValueError(
                f"no tensors were added; refusing to write an empty model to {self.out_dir}"
            )
        assert self.tmp_dir is not None
        self._flush()
        with _located(self.tmp_dir):
            self._name_shards()
            self._copy_side_files()
            (self.tmp_dir / "README.md").write_text(self.model_card(), encoding="utf-8")
            mergekit_text = self.metadata.get("mergekit_config")
            if mergekit_text is not None:  # the user's config as given, as mergekit-yaml writes
                with open(self.tmp_dir / MERGEKIT_CONFIG, "x", encoding="utf-8") as file:
                    file.write(str(mergekit_text))
        with _located(self.out_dir):
            self._move_into_place()
        self._closed = True

    def _name_shards(self) -> None:
        assert self.tmp_dir is not None
        n = len(self._shards)
        if n == 1:
            os.replace(self.tmp_dir / self._shards[0][0], self.tmp_dir / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp_dir / tmp_name, self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.tmp_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )

    def _copy_side_files(self) -> None:
        """Copy the files chosen at construction: the same files, unchanged since."""
        assert self.tmp_dir is not None
        for name, side in self._side_files.items():
            fd, _ = open_regular(side.real, expect=side.identity)
            with os.fdopen(fd, "rb") as src, open(self.tmp_dir / name, "xb") as dst:
                shutil.copyfileobj(src, dst)
                check_unchanged(side.source, side.identity, fd, path_too=False)

    def _move_into_place(self) -> None:
        """Put the finished folder at ``out_dir``: renamed there if nothing is there (never
        over a folder that appeared meanwhile), else (``overwrite``) swapped with the earlier
        output in one step (:func:`~drm_lightning.sources.output_guard.exchange`), which is
        then deleted. Where the file system cannot swap, two renames (``out_dir`` is briefly
        absent). Interrupted at any point, the exception says what is on disk."""
        new, out = self.tmp_dir, self.out_dir
        assert new is not None
        appeared = FileExistsError(
            f"output folder {out} appeared while writing; "
            + (
                "it was left as it was (not checked as an earlier output): run again"
                if self.overwrite
                else "pass overwrite=True (--overwrite) to replace it"
            )
        )
        if os.path.lexists(out) and not self.overwrite:
            raise appeared
        ours = _folder_id(new)
        old = sibling(out, "old")
        try:
            if not os.path.lexists(out):
                try:
                    rename_noreplace(new, out)
                except FileExistsError:
                    raise appeared from None
            elif exchange(new, out):
                old = new  # the earlier output is now under the temporary name
            else:
                os.rename(out, old)
                os.rename(new, out)
            self.tmp_dir = None
            if os.path.lexists(old):
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:
            self._settle(exc, ours, (new, old))
            raise

    def _settle(self, exc: BaseException, ours: tuple[int, int], olds: tuple[Path, ...]) -> None:
        """After ``exc`` stopped :meth:`_move_into_place`: make ``out_dir`` hold a complete
        output again if it is missing, and record on ``exc`` what it holds."""
        out = self.out_dir
        if _folder_id(out) is None:  # between the two renames: put the earlier output back
            earlier = next((p for p in olds if p != self.tmp_dir and os.path.lexists(p)), None)
            if earlier is not None:
                try:
                    os.rename(earlier, out)
                except BaseException:
                    self.tmp_dir = None  # keep the new output where it is
                    record_outcome(
                        exc,
                        f"{out} is missing: the new output is at {olds[0]} and the earlier one "
                        f"at {earlier}; rename one of them to {out}",
                    )
                    raise
            return  # out_dir as it was; abort() removes the new output
        if _folder_id(out) != ours:
            return  # not swapped: out_dir as it was
        self.tmp_dir = None  # the new output is in place: abort() must not touch anything
        left = next((p for p in olds if os.path.lexists(p)), None)
        record_outcome(
            exc,
            f"{out} was written"
            + (
                f"; the earlier output it replaced was left at {left}: delete it (an "
                "--overwrite run writing the same folder removes it once this process has ended)"
                if left is not None
                else ""
            ),
        )

    # ------------------------------------------------------------------ model card

    def _card_inputs(self) -> list[Any]:
        """The inputs the model card lists: base, branches, extra files."""
        meta = self.metadata
        objects = [meta.get("base"), *(_branch_fields(b)[0] for b in meta.get("branches") or [])]
        return [*objects, *(meta.get("files") or [])]

    def _check_inputs_unchanged(self) -> None:
        """Every input source's files are still the ones it read (see
        :meth:`~drm_lightning.sources.WeightSource.check_unchanged`)."""
        for obj in self._card_inputs():
            check = getattr(obj, "check_unchanged", None)
            if callable(check):
                check()

    def _card_files(self) -> list[Path]:
        """The source files the model card lists (base, branches, extra files), each once."""
        files: list[Path] = []
        seen: set[Path] = set()
        for obj in self._card_inputs():
            for file in _files_of(obj):
                if file.resolve() not in seen:
                    seen.add(file.resolve())
                    files.append(file)
        return files

    def model_card(self) -> str:
        """The ``README.md`` text: method, parameters, branches, source files with SHA-256."""
        version = package_version()

        meta = dict(self.metadata)
        method = str(meta.pop("method", "unknown"))
        params = meta.pop("parameters", None) or {}
        base = meta.pop("base", None)
        branches = meta.pop("branches", None) or []
        meta.pop("files", None)  # listed with the source files
        base_model = meta.pop("base_model", None)
        mergekit_text = meta.pop("mergekit_config", None)
        lines = ["---"]
        if base_model is not None:  # JSON strings are YAML scalars: each name one quoted value
            names = [base_model] if isinstance(base_model, str) else list(base_model)
            lines += [f"base_model: {json.dumps([str(n) for n in names])}"]
        lines += ["library_name: transformers", "tags:", "- merge", "- drm_lightning"]
        lines += [f"- {method}", *(["- mergekit"] if mergekit_text is not None else []), "---"]
        lines += [
            "",
            f"# Merged model ({method})",
            "",
            f"Produced by drm_lightning {version} with the `{method}` method.",
            "",
            "## Parameters",
            "",
        ]
        if params:
            lines += ["| parameter | value |", "|---|---|"]
            lines += [f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in params.items()]
        else:
            lines.append("Method defaults.")
        lines += ["", "## Inputs", ""]
        if base is not None:
            lines.append(f"- base: `{_label(base)}`")
        lines += ["", "| # | branch | coefficient |", "|---|---|---|"]
        for i, branch in enumerate(branches):
            source, coefficient = _branch_fields(branch)
            lines.append(f"| {i} | `{_label(source)}` | {coefficient} |")
        self._check_inputs_unchanged()  # the digests must be of the files merged
        hashed = [(str(file), sha256_of(file)) for file in self._card_files()]
        self._check_inputs_unchanged()
        lines += ["", "## Source files", ""]
        if hashed:
            lines += ["| file | sha256 |", "|---|---|"]
            lines += [f"| `{f}` | `{h}` |" for f, h in hashed]
        else:
            lines.append("No source files (in-memory weights).")
        if mergekit_text is not None:
            fence = "`" * max([3, *(len(run) + 1 for run in re.findall("`+", mergekit_text))])
            lines += ["", "## Configuration", "", f"The mergekit config (`{MERGEKIT_CONFIG}`):"]
            lines += ["", f"{fence}yaml", str(mergekit_text).rstrip("\n"), fence]
        if meta:
            lines += [
                "",
                "## Other settings",
                "",
                "```json",
                json.dumps(meta, indent=2, default=str),
                "```",
            ]
        lines += [
            "",
            "## Output",
            "",
            (
                f"{len(self._sizes)} tensors, {self.total_bytes} bytes, "
                f"{max(len(self._shards), 1)} shard(s)."
            ),
            "",
        ]
        return "\n".join(lines)


@contextlib.contextmanager
def _located(path: Path) -> Iterator[None]:
    """Name ``path`` in write errors that do not name a file (ENOSPC from safetensors...)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise  # already located, or one of our own messages
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        match = re.search(r"(?:os error |code: )(\d+)", str(err))
        code = int(match.group(1)) if match else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({err})", str(path)) from err


def _folder_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a link is not followed), or None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _header_reserve(max_shard_bytes: int) -> int:
    """Header bytes reserved per shard: 64 KiB (≈ 500 tensors) for big shards, less for tiny
    ones."""
    return min(64 * 1024, max(1024, max_shard_bytes // 1024))


def _branch_fields(branch: Any) -> tuple[Any, Any]:
    if isinstance(branch, Mapping):
        return branch.get("source", branch.get("path")), branch.get("coefficient", 1.0)
    return branch, 1.0


def _label(obj: Any) -> str:
    describe = getattr(obj, "describe", None)
    if callable(describe):
        return str(describe())
    return str(obj)


def _files_of(obj: Any) -> list[Path]:
    if obj is None:
        return []
    files = getattr(obj, "files", None)
    if callable(files):
        return [Path(f) for f in files()]
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if p.is_file():
            return [p]
        if p.is_dir():
            suffixes = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
            return sorted(
                f
                for f in p.iterdir()
                if f.is_file()
                and (
                    f.suffix in suffixes
                    or f.name.endswith("index.json")
                    or f.name == "adapter_config.json"
                )
            )
    return []


def package_version() -> str:
    """This package's version, from its installed metadata (``drm_lightning.__version__``).

    Example:
        >>> package_version() != ""
        True
    """
    try:
        return metadata.version("drm_lightning")
    except metadata.PackageNotFoundError:
        return "0+unknown"
