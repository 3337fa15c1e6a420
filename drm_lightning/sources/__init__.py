"""Lazy weight sources (one tensor at a time) and the atomic Hugging Face folder writer.

Readers share the :class:`WeightSource` contract: ``keys()``, ``meta(name)`` (no data read),
``get(name)`` (one tensor), ``files()``, ``describe()``, ``origin``. :func:`open_source`
picks the reader for a path or an in-memory object.

Example:
    >>> import torch
    >>> from drm_lightning.sources import open_source
    >>> src = open_source(torch.nn.Linear(2, 2))
    >>> src.keys()
    ['bias', 'weight']
"""

from drm_lightning.sources._shard_file import RowPieces
from drm_lightning.sources.base import (
    TensorMeta,
    WeightSource,
    dtype_from_safetensors,
    hash_in_background,
    sha256_of,
)
from drm_lightning.sources.factory import SourceLike, open_source
from drm_lightning.sources.hf_folder import HFFolderSource
from drm_lightning.sources.lightning_ckpt import LightningCheckpointSource
from drm_lightning.sources.lora import LoraBranch, LoraModule
from drm_lightning.sources.memory import StateDictSource
from drm_lightning.sources.renamed import RenamedSource
from drm_lightning.sources.safetensors_file import SafetensorsFileSource
from drm_lightning.sources.torch_file import TorchFileSource, load_pickled
from drm_lightning.sources.trust import TRUST_OPT_IN, UntrustedPickleError
from drm_lightning.sources.writer import COPIED_FILES, HFFolderWriter, check_free_space

__all__ = [
    "RowPieces",
    "COPIED_FILES",
    "HFFolderSource",
    "HFFolderWriter",
    "LightningCheckpointSource",
    "LoraBranch",
    "LoraModule",
    "RenamedSource",
    "SafetensorsFileSource",
    "SourceLike",
    "StateDictSource",
    "TRUST_OPT_IN",
    "TensorMeta",
    "TorchFileSource",
    "UntrustedPickleError",
    "WeightSource",
    "check_free_space",
    "dtype_from_safetensors",
    "load_pickled",
    "open_source",
    "hash_in_background",
    "sha256_of",
]
