"""``drm-merge`` with alignment: ``method: mudsc_zip`` runs and the ``align:`` pre-step.

Both are checked before any weight is read (the architecture is built from ``model:`` with
random weights, every branch's names and shapes are compared with it from metadata, the
calibration batches are loaded, the permutation spec is derived or built and checked), so
``--dry-run`` reports every problem; only then are the branches read, each into a copy of
the architecture. A ``module:function`` reference runs code, so a dry run (a config checked
with ``code="check"``, see :mod:`drm_lightning.config.align`) does not build what it names:
the plan says which checks were skipped; the other checks run.

* :func:`run_alignment_merge` — ``method:`` an alignment method: the merged model
  (:func:`~drm_lightning.alignment.api.merge_models`) written by the
  :class:`~drm_lightning.sources.writer.HFFolderWriter` with the anchor's names and dtypes.
* :class:`AlignStep` — ``align:`` before a merge method: opened by
  :func:`drm_lightning.cli.job.open_job`; :meth:`AlignStep.aligned` gives the branches
  permuted into the anchor's unit order (:func:`~drm_lightning.alignment.api.align_models`)
  as in-memory sources with the files' dtypes, for the usual merge loop.

Alignment runs in one process on the CPU (not under ``torchrun``).

Example:
    >>> callable(run_alignment_merge) and callable(AlignStep.open)
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from drm_lightning.alignment.api import align_models, merge_models
from drm_lightning.alignment.core import AlignmentMethod, get_alignment
from drm_lightning.alignment.spec import PermSpec
from drm_lightning.alignment.trace import derive_spec
from drm_lightning.cli.align_inputs import (
    build_model,
    build_spec,
    check_fits,
    load_batches,
    load_into,
)
from drm_lightning.cli.guard import open_branch
from drm_lightning.config.align import is_reference
from drm_lightning.config.schema import TORCH_DTYPES
from drm_lightning.sources import HFFolderWriter, StateDictSource

__all__ = ["AlignStep", "PreparedAlignment", "prepare_alignment", "run_alignment_merge"]


def _refuse_torchrun(what: str) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if launched or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError(f"{what} runs in one process: launch drm-merge without torchrun")


SKIPPED = "not built: it runs code from a module:function reference, which a dry run never does"


@dataclass
class PreparedAlignment:
    """An alignment checked from metadata: architecture, calibration batches, spec, method.

    ``model``, ``batches`` and ``spec`` are ``None`` where a dry run skipped them (they come
    from ``module:function`` references, which run code).
    """

    method: AlignmentMethod
    model: nn.Module | None
    model_ref: str
    batches: Any
    batches_ref: str | None
    spec: PermSpec | None
    sources: list[Any]
    labels: list[str]
    spec_ref: str | None = None

    def models(self) -> list[nn.Module]:
        """Every branch's weights in a copy of the architecture (reads the weights)."""
        if self.model is None or self.spec is None or (self.batches_ref and self.batches is None):
            raise ValueError(
                "the alignment was checked without importing its module:function references "
                "(a dry run); validate the config with code='import' (drm-merge --trust-code) "
                "to run it"
            )
        return [load_into(self.model, s) for s in self.sources]

    def describe(self, field: str = "") -> list[str]:
        """Lines of the ``--dry-run`` report."""
        p = self.method.params
        lines = [
            (
                f"{field}alignment: {self.method.name} "
                f"(similarity {p.similarity}, solver {p.solver}, "
                f"fix_rate {p.fix_rate}, seed {p.seed}); {self.method.paper}"
            ),
        ]
        if self.model is None:
            lines.append(
                f"{field}architecture: {self.model_ref} ({SKIPPED}); the check of the "
                "architecture against the branches was skipped (the run does it)"
            )
        else:
            lines.append(
                f"{field}architecture: {self.model_ref} ({type(self.model).__name__}, "
                f"{sum(v.numel() for v in self.model.state_dict().values()):,} values)"
            )
        if self.spec is None:
            why = (
                f"{self.spec_ref}: {SKIPPED}"
                if self.spec_ref
                else "needs the architecture and a batch"
            )
            lines.append(f"{field}permutation spec: not checked ({why})")
        else:
            sizes = self.spec.check([self.model.state_dict()]) if self.model is not None else {}
            shown = ", ".join(f"{g} {c}" for g, c in list(sizes.items())[:6]) + (
                " ..." if len(sizes) > 6 else ""
            )
            lines.append(f"{field}permutation spec: {len(sizes)} group(s): {shown}")
        if self.batches_ref is None:
            lines.append(f"{field}calibration: none (weights only)")
        elif self.batches is None:
            lines.append(f"{field}calibration: {self.batches_ref} ({SKIPPED})")
        else:
            n_batches = len(self.batches) if hasattr(self.batches, "__len__") else "?"
            lines.append(f"{field}calibration: {n_batches} batch(es) from {self.batches_ref}")
        return lines


def prepare_alignment(
    inputs: Any,
    method: str,
    sources: list[Any],
    labels: list[str],
    anchor_path: Path,
    field: str = "",
) -> PreparedAlignment:
    """Build and check everything an alignment needs, reading no branch weight.

    ``inputs`` holds ``model``, ``batches``, ``batch_size``, ``spec`` and ``parameters`` (an
    ``align:`` section or an alignment-merge config); ``field`` prefixes the field names in
    messages (``"align."``). When ``inputs.code_skipped`` (a dry run), what a
    ``module:function`` reference names is not built, nor what depends on it.

    Raises:
        ValueError: every branch that does not fit the architecture (names, shapes), or no
            way to get a spec.
    """
    algo = get_alignment(method, **inputs.parameters)
    skip = getattr(inputs, "code_skipped", False)
    model_ref = inputs.model or str(anchor_path)
    model = None if skip and is_reference(model_ref) else build_model(model_ref)
    problems = []
    for source, label in zip(sources, labels, strict=True) if model is not None else ():
        try:
            check_fits(model, source, label, model_ref)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError(f"{field}model: " + "\n".join(problems))
    batches = None
    if inputs.batches is not None and not (skip and is_reference(inputs.batches)):
        batches = load_batches(inputs.batches, batch_size=inputs.batch_size, model=model)
    spec = None
    if inputs.spec is not None:
        if not skip and model is not None:
            spec = build_spec(inputs.spec, model)
    elif inputs.batches is not None:
        if batches is not None and model is not None:
            first = next(iter(batches))
            spec = derive_spec(model, first[0] if isinstance(first, (tuple, list)) else first)
    else:
        raise ValueError(
            f"{field}spec: required without {field}batches (the spec is derived by tracing the "
            "model on a calibration batch): name batches, or module:function returning a PermSpec"
        )
    if spec is not None and model is not None and not spec.check([model.state_dict()]):
        raise ValueError(f"{field}spec: the permutation spec has no groups: nothing to align")
    return PreparedAlignment(
        algo, model, model_ref, batches, inputs.batches, spec, sources, labels, spec_ref=inputs.spec
    )


class AlignStep:
    """The ``align:`` pre-step of a merge job (see the module docstring)."""

    def __init__(self, prepared: PreparedAlignment, anchor: int) -> None:
        self.prepared = prepared
        self.anchor = anchor

    @classmethod
    def open(cls, config: Any, branches: list[Any]) -> AlignStep:
        """Check ``config.align`` against the opened ``branches`` (metadata only)."""
        _refuse_torchrun("the align: pre-step")
        section = config.align
        labels = [f"branches[{i}] ({b.path})" for i, b in enumerate(config.branches)]
        anchor_path = config.branches[section.anchor].path
        prepared = prepare_alignment(
            section, section.method, list(branches), labels, anchor_path, "align."
        )
        return cls(prepared, section.anchor)

    def aligned(self, branches: list[Any]) -> list[Any]:
        """``branches`` permuted into the anchor's unit order (reads every branch's weights)."""
        p = self.prepared
        states = align_models(
            p.models(), p.batches, method=p.method, anchor=self.anchor, spec=p.spec
        )
        out = []
        for branch, state, label in zip(branches, states, p.labels, strict=True):
            names = list(branch.keys())  # a WeightSource, not a dict
            tensors = {
                k: state[k].to(branch.meta(k).dtype) if k in state else branch.get(k) for k in names
            }
            out.append(StateDictSource(tensors, origin=f"{label}, aligned to branch {self.anchor}"))
        return out

    def card(self) -> dict[str, Any]:
        """What the model card says about the pre-step."""
        m = self.prepared.method
        return {
            "method": m.name,
            "anchor": self.anchor,
            "parameters": m.params.model_dump(mode="json"),
            "model": self.prepared.model_ref,
            "batches": self.prepared.batches_ref,
        }


def run_alignment_merge(
    config: Any,
    out: Path,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
) -> str:
    """Run an :class:`~drm_lightning.config.align.AlignmentMergeConfig`; returns the line to print.

    With ``dry_run`` nothing is read or written: the plan is returned.
    """
    _refuse_torchrun(f"method {config.method!r}")
    trust = config.trust_pickles
    sources = [open_branch(b, i, trust_pickles=trust) for i, b in enumerate(config.branches)]
    labels = [f"branches[{i}] ({b.path})" for i, b in enumerate(config.branches)]
    prepared = prepare_alignment(config, config.method, sources, labels, config.base)
    anchor = sources[0]
    out_dtype = TORCH_DTYPES[config.out_dtype] if config.out_dtype else None
    size = sum(
        math.prod(m.shape) * (out_dtype or m.dtype).itemsize
        for m in map(anchor.meta, list(anchor.keys()))
    )
    if dry_run:
        lines = [
            f"drm-merge plan (dry run: no weight was read) -> {out}",
            f"method: {config.method} of {len(sources)} branches (branch 0 is the anchor)",
        ]
        lines += [f"branch {i}: {label}" for i, label in enumerate(labels)]
        lines += prepared.describe()
        lines.append(
            f"output dtype: {config.out_dtype or 'as the anchor'}; "
            f"output size: {size / 2**20:.1f} MiB"
        )
        return "\n".join(lines)
    models = prepared.models()
    if progress:
        print(f"drm-merge: aligning {len(models)} models ({config.method})", flush=True)
    merged = merge_models(
        models, prepared.batches, method=prepared.method, spec=prepared.spec
    ).state_dict()
    metadata = {
        "method": config.method,
        "parameters": prepared.method.params.model_dump(mode="json"),
        "branches": [{"source": s, "coefficient": 1.0 / len(sources)} for s in sources],
        "model": prepared.model_ref,
        "calibration batches": prepared.batches_ref,
        "paper": prepared.method.paper,
    }
    copy_from = config.base if config.base.is_dir() else None
    with HFFolderWriter(
        out,
        overwrite=overwrite,
        copy_from=copy_from,
        metadata=metadata,
        max_shard_bytes=max_shard_bytes,
        expected_bytes=size,
    ) as writer:
        for name in list(anchor.keys()):
            dtype = anchor.meta(name).dtype
            value = merged[name] if name in merged else anchor.get(name)
            if dtype.is_floating_point:
                value = value.to(out_dtype or dtype)
            writer.add(name, value.detach().cpu().contiguous())
    return f"drm-merge: wrote {out} ({config.method} of {len(sources)} models)"
