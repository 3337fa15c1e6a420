"""A disk-to-disk merge job: the config's inputs opened and planned, then streamed to a folder.

:func:`open_job` opens base and branches lazily and checks them from metadata only
(:func:`drm_lightning.merge.plan_merge`); :func:`run_job` streams
:func:`drm_lightning.merge.iter_merge` into an :class:`~drm_lightning.sources.writer.HFFolderWriter`
(temporary folder, renamed when complete). Under ``torchrun`` the same job runs rank-parallel
(:func:`drm_lightning.distributed.streaming.run_job_distributed`). ``drm-merge`` is a thin
layer over these.

Example:
    >>> from drm_lightning.config import MergeConfig
    >>> callable(open_job) and callable(run_job)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drm_lightning.cli.align_job import AlignStep
from drm_lightning.cli.guard import key_mismatch_hint, open_inputs
from drm_lightning.cli.report import model_card, output_bytes
from drm_lightning.config.mergekit import tokenizer_source
from drm_lightning.config.schema import MergeConfig
from drm_lightning.merge.loop import iter_merge
from drm_lightning.merge.pieces import PIECE_ELEMENTS
from drm_lightning.merge.plan import PlannedTensor, plan_merge
from drm_lightning.methods import MergeMethod
from drm_lightning.sources import HFFolderWriter
from drm_lightning.sources.on_device import OnDevice


@dataclass
class DiskMergeJob:
    """Everything a merge needs, opened and checked from metadata; no weight read yet."""

    config: MergeConfig
    method: MergeMethod
    base: Any
    branches: list[Any]
    coefficients: list[float]
    plan: list[PlannedTensor]
    align: Any = None  # the align: pre-step (drm_lightning.cli.align_job.AlignStep)


def open_job(config: MergeConfig) -> DiskMergeJob:
    """Open base and branches lazily (LoRA adapters detected) and plan from metadata only."""
    method = config.build_method()
    base, branches = open_inputs(config)
    coefficients = config.resolved_coefficients()
    try:
        plan = plan_merge(
            base, branches, routing=config.build_routing(), coefficients=coefficients, method=method
        )
    except ValueError as err:
        legend = "; ".join(
            [f"base = {config.base}"]
            + [f"branch {i} = {b.path}" for i, b in enumerate(config.branches)]
        )
        hint = key_mismatch_hint(config, base, branches)
        raise ValueError(f"{err}\n(inputs: {legend}){hint}") from err
    job = DiskMergeJob(config, method, base, branches, coefficients, plan)
    if getattr(config, "align", None) is not None:  # checked from metadata too (issue 11)
        job.align = AlignStep.open(config, branches)
    return job


def run_job(
    job: DiskMergeJob,
    out: Path,
    *,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    piece_elements: int | None = PIECE_ELEMENTS,
) -> None:
    """Stream the merge into ``out`` (temporary folder, renamed when complete).

    Tensors whose N-branch stack exceeds ``piece_elements`` entries are merged and written
    in row pieces where the method and the inputs allow it (:mod:`drm_lightning.merge.pieces`);
    ``None`` merges every tensor whole.
    """
    base, branches = job.base, job.branches
    if job.align is not None:
        branches = job.align.aligned(branches)  # reads the branches, permutes them to the anchor
    device = torch.device(device)
    if device.type != "cpu":
        base, branches = OnDevice(base, device), [OnDevice(b, device) for b in branches]
    writer = make_writer(job, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    try:
        with writer:
            for name, tensor in iter_merge(
                job.method,
                base,
                branches,
                coefficients=job.coefficients,
                compute_dtype=job.config.compute_torch_dtype,
                out_dtype=job.config.out_torch_dtype,
                seed=job.config.resolved_seed(),
                plan=job.plan,
                progress=progress,
                piece_elements=piece_elements,
            ):
                writer.add(name, tensor)
    except OSError as err:
        target = str(out.absolute())
        if err.filename is None or not str(Path(err.filename).absolute()).startswith(target):
            raise  # not a write error (an input could not be read): the message says which
        reason = err.strerror or str(err)
        raise OSError(
            err.errno,
            f"writing {out} failed: {reason} (at {err.filename}); the partial output "
            f"was removed and {out} was left as it was",
        ) from err


def make_writer(
    job: DiskMergeJob,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    extra: Mapping[str, Any] | None = None,
) -> HFFolderWriter:
    """The output writer of a job (refuses an existing ``out``; checks free space); ``extra``
    adds to the model card (the α of a scaled merge)."""
    return HFFolderWriter(
        out,
        overwrite=overwrite,
        copy_from=job.config.base if job.config.base.is_dir() else None,
        tokenizer_from=tokenizer_source(job.config),
        metadata={**model_card(job), **(extra or {})},
        max_shard_bytes=max_shard_bytes,
        expected_bytes=output_bytes(job),
    )
