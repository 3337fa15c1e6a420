"""Write an in-loop merge as a Hugging Face folder, loadable with ``from_pretrained``.

When the merged module is, or contains, a transformers ``PreTrainedModel`` (found by class,
without importing transformers), the folder holds that model's ``config.json`` and its
weights under its own names (the Lightning prefixes, e.g. ``model.``, are stripped), so
``AutoModel.from_pretrained(folder)`` (or the matching ``AutoModelFor…``) loads it. Everything
else — per-task heads of a branched model, modules of a LightningModule outside the
transformers model — goes to ``heads.safetensors`` beside it, under its full name.
"""

from __future__ import annotations

import copy
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from drm_lightning.inloop.providers import BranchProvider
from drm_lightning.sources.writer import HFFolderWriter


def find_pretrained(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The shallowest transformers ``PreTrainedModel`` inside ``module`` and its name prefix.

    Example:
        >>> find_pretrained(nn.Sequential(nn.Linear(2, 2))) is None
        True
    """
    for name, sub in module.named_modules():
        if any(cls.__name__ == "PreTrainedModel" for cls in type(sub).__mro__) and hasattr(
            sub, "config"
        ):
            return (f"{name}." if name else ""), sub
    return None


def split_for_export(
    merged: Mapping[str, Tensor], target: nn.Module
) -> tuple[dict[str, Tensor], dict[str, Tensor], nn.Module | None]:
    """``(model weights, other tensors, transformers model or None)`` of a merge of ``target``."""
    found = find_pretrained(target)
    if found is None:
        return dict(merged), {}, None
    prefix, pretrained = found
    inside = {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}
    outside = {k: v for k, v in merged.items() if not k.startswith(prefix)}
    return inside, outside, pretrained


def write_export(
    folder: str | Path,
    model: nn.Module,
    provider: BranchProvider,
    merged: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
) -> Path:
    """Write ``merged`` (full tensors of ``provider.target(model)``) and the heads to ``folder``.

    ``model.safetensors`` (or shards and an index) and a model card through
    :class:`~drm_lightning.sources.writer.HFFolderWriter` (replaced atomically), the
    transformers ``config.json`` when there is one, and ``heads.safetensors`` for the rest.
    """
    folder = Path(folder)
    weights, outside, pretrained = split_for_export(merged, provider.target(model))
    heads = {**provider.heads(model), **outside}
    with tempfile.TemporaryDirectory() as side:
        copy_from = None
        if pretrained is not None:
            config = copy.deepcopy(pretrained.config)
            config.architectures = [type(pretrained).__name__]  # type: ignore[union-attr]
            config.save_pretrained(side)  # type: ignore[union-attr,operator]
            copy_from = side
        with HFFolderWriter(
            folder, overwrite=True, metadata=metadata, copy_from=copy_from
        ) as writer:
            for name, tensor in weights.items():
                writer.add(name, tensor.detach().to("cpu").contiguous())
    if heads:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in heads.items()}
        heads_file = folder / "heads.safetensors"
        save_file(tensors, str(heads_file))
        # safetensors writes through a private temporary file (0600): take the mode the
        # writer gave the weights (0644 less the umask)
        weights_file = next(folder.glob("model*.safetensors"))
        os.chmod(heads_file, stat.S_IMODE(weights_file.stat().st_mode))
    return folder
