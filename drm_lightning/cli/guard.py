"""What ``drm-merge`` trusts and guards, kept out of the thin CLI: inputs and the output folder.

* :func:`open_inputs`: base and branches opened with the config's pickle policy
  (``trust_pickles``, :mod:`drm_lightning.sources.trust`) and each branch's ``key``
  (:class:`~drm_lightning.sources.torch_file.TorchFileSource`) and ``prefix`` /
  ``add_prefix`` (:class:`~drm_lightning.sources.renamed.RenamedSource`), by
  :func:`open_branch`; a checkpoint whose state dict is not where it was looked for gets the
  ``key:`` (and ``prefix:``) that would fix it.
* :func:`key_mismatch_hint`: when a branch's names differ from the base's only by a common
  prefix, the line of config that fixes it.
* :func:`input_paths`: every path a merge reads (the config file, base, branches, and what the
  config names: ``model:``/``batches:`` files and folders, ``tokenizer_source``), so that
  ``-o`` can be refused when it holds one.
* :func:`guard_output`: the checks on ``-o`` made before any weight is read (``--dry-run``
  too): a parent that is a file, on a pseudo or read-only file system or not writable, what
  ``--overwrite`` may replace, and leftovers of killed earlier runs (reported; removed with
  ``--overwrite``).

Example:
    >>> import pathlib, tempfile
    >>> guard_output(pathlib.Path(tempfile.mkdtemp()) / "new", overwrite=False)
    []
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drm_lightning.config.schema import BranchConfig, MergeConfig
from drm_lightning.sources import LoraBranch, WeightSource, open_source
from drm_lightning.sources.output_guard import (
    check_parent,
    check_replaceable,
    remove_stale,
    stale_leftovers,
)
from drm_lightning.sources.renamed import RenamedSource, prefix_hint
from drm_lightning.sources.torch_file import CheckpointLayoutError

__all__ = ["guard_output", "input_paths", "key_mismatch_hint", "open_branch", "open_inputs"]


def open_inputs(config: MergeConfig) -> tuple[WeightSource, list[Any]]:
    """The base and the branches of ``config``, opened lazily (LoRA adapters detected)."""
    trust = config.trust_pickles
    try:
        base = open_source(config.base, trust_pickles=trust)
    except CheckpointLayoutError as err:
        raise CheckpointLayoutError(
            f"base: {err}. key: is a branch setting; for the base, save that entry as a file "
            "of its own (torch.save(checkpoint['state_dict'], 'base.pt')) and give that file",
            err.candidates,
        ) from None
    branches = [
        open_branch(branch, i, base=base, trust_pickles=trust)
        for i, branch in enumerate(config.branches)
    ]
    return base, branches


def open_branch(
    branch: BranchConfig,
    index: int,
    *,
    base: WeightSource | None = None,
    trust_pickles: bool = False,
) -> Any:
    """Branch ``index`` of a config, opened lazily: a LoRA adapter on ``base`` (without
    ``base``, ``open_source`` refuses it), else its ``key`` entry renamed by ``prefix`` /
    ``add_prefix``.

    Raises:
        CheckpointLayoutError: the state dict is not where ``key`` (or its absence) says; the
            message, prefixed with the field, names the entries holding tensors and, when
            their names are the base's up to a prefix, the ``prefix:`` to set too.
    """
    if branch.is_lora and base is not None:
        return LoraBranch(branch.path, base, trust_pickles=trust_pickles)
    try:
        source = open_source(branch.path, key=branch.key, trust_pickles=trust_pickles)
    except CheckpointLayoutError as err:
        field = f"branches[{index}]" + (".key" if branch.key else "")
        hints = [
            f"with key: {entry}, {hint}"
            for entry, names in err.candidates.items()
            if base is not None and (hint := prefix_hint(base.keys(), names))
        ]
        raise CheckpointLayoutError(
            f"{field}: {err}" + "".join(f"; {h}" for h in hints[:3]), err.candidates
        ) from None
    if branch.prefix or branch.add_prefix:
        source = RenamedSource(source, strip=branch.prefix, add=branch.add_prefix)
    return source


def key_mismatch_hint(config: MergeConfig, base: Any, branches: Sequence[Any]) -> str:
    """Hints for branches whose names are the base's up to a prefix ("" if none)."""
    hints = []
    for i, (branch, source) in enumerate(zip(config.branches, branches, strict=True)):
        if branch.is_lora or not callable(getattr(source, "keys", None)):
            continue
        hint = prefix_hint(base.keys(), source.keys())
        if hint:
            hints.append(f"branch {i} ({branch.path}): {hint}")
    return "\n" + "\n".join(hints) if hints else ""


def input_paths(
    config: MergeConfig, config_file: str | os.PathLike[str] | None = None
) -> list[tuple[str, Path]]:
    """Every path the merge of ``config`` reads, each with how messages name it.

    Example:
        >>> from drm_lightning.config import MergeConfig
        >>> cfg = MergeConfig(method="ties", base=".", branches=["."])
        >>> [label for label, _ in input_paths(cfg, "merge.yaml")]
        ['config file', 'base input', 'branches[0] input']
    """
    found = [] if config_file is None else [("config file", Path(config_file))]
    found.append(("base input", Path(config.base)))
    found += [(f"branches[{i}] input", Path(b.path)) for i, b in enumerate(config.branches)]
    for prefix, section in (("", config), ("align.", getattr(config, "align", None))):
        for field in ("model", "batches"):
            value = getattr(section, field, None)
            if isinstance(value, str):  # only alignment configs have these: already imported
                from drm_lightning.config.align import is_reference

                if not is_reference(value):
                    found.append((f"{prefix}{field}: input", Path(value)))
    tokenizer = getattr(config, "tokenizer_source", None)  # mergekit's format
    if tokenizer is not None:
        found.append(("tokenizer_source input", Path(tokenizer)))
    return found


def guard_output(
    out: Path,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
    dry_run: bool = False,
) -> list[str]:
    """Check ``out`` before any work; returns notes to print (leftovers found or removed).

    With ``overwrite`` (and not ``dry_run``, which changes nothing) leftovers are removed.

    Raises:
        NotADirectoryError: a parent of ``out`` is a file.
        OSError: ``out`` cannot be created there (a pseudo or read-only file system, no
            permission; see :func:`~drm_lightning.sources.output_guard.check_parent`).
        ValueError, FileExistsError: ``--overwrite`` would replace something it must not
            (see :func:`~drm_lightning.sources.output_guard.check_replaceable`).
    """
    check_parent(out)
    if overwrite and out.exists():
        check_replaceable(out, inputs=inputs)
    stale = stale_leftovers(out)
    if not stale:
        return []
    names = ", ".join(p.name for p in stale)
    if overwrite and not dry_run:
        remove_stale(stale)
        return [
            f"removed {len(stale)} folder(s) left by killed earlier runs writing {out}: {names}"
        ]
    return [
        f"found {len(stale)} folder(s) left by killed earlier runs writing {out} (their process "
        f"is gone): {names}; "
        + (
            "--overwrite will remove them"
            if overwrite
            else "pass --overwrite to remove them, or delete them"
        )
    ]
