"""``drm-merge CONFIG.yaml -o OUT``: merge checkpoints from a YAML config into an HF folder.

The command is thin: load the config (:mod:`drm_lightning.config`), open every source and
check it from metadata (:func:`drm_lightning.merge.plan_merge`), then either print the plan
(``--dry-run``, no weight read) or stream :func:`drm_lightning.merge.iter_merge` into an
:class:`~drm_lightning.sources.writer.HFFolderWriter`, which writes to a temporary folder and
renames it to ``OUT`` only when complete. Every error exits with status 2 and one message
naming the file, field, tensor and shapes involved; ``--verbose`` adds the traceback.

Usage::

    drm-merge configs/drm.yaml -o merged/ --dry-run     # validate, print the plan
    drm-merge configs/drm.yaml -o merged/               # merge
    drm-merge configs/drm.yaml -o merged/ --overwrite --device cuda --no-progress

Example:
    >>> build_parser().parse_args(["cfg.yaml", "-o", "out", "--dry-run"]).dry_run
    True
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drm_lightning import __version__
from drm_lightning.config import MergeConfig, load_config
from drm_lightning.distributed.plan import build_plan
from drm_lightning.merge import PlannedTensor, iter_merge, plan_merge
from drm_lightning.methods import MergeMethod, Route
from drm_lightning.sources import HFFolderWriter, LoraBranch, open_source

EXIT_ERROR = 2


class CLIError(ValueError):
    """A problem with the command line itself (output folder, device)."""


@dataclass
class MergeJob:
    """Everything a merge needs, opened and checked from metadata; no weight read yet."""

    config: MergeConfig
    method: MergeMethod
    base: Any
    branches: list[Any]
    coefficients: list[float]
    plan: list[PlannedTensor]


def build_parser() -> argparse.ArgumentParser:
    """The ``drm-merge`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="drm-merge",
        description="Merge fine-tuned checkpoints (DRM, TIES, DARE, task arithmetic) "
        "from a YAML config.",
    )
    parser.add_argument(
        "config", type=Path, help="YAML config (see configs/ for one example per method)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder (HF layout)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan; read no weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the merge math runs"
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=2 * 1024**3,
        metavar="SIZE",
        help="largest output shard, e.g. 5GB, 500MiB or a byte count (default 2GiB)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``drm-merge``; returns the exit status (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        check_output(args.output, config, overwrite=args.overwrite)
        device = resolve_device(args.device)
        job = open_job(config)
        if args.dry_run:
            print(describe_plan(job, args.output))
            return 0
        run_job(
            job,
            args.output,
            overwrite=args.overwrite,
            device=device,
            progress=not args.no_progress,
            max_shard_bytes=args.max_shard_size,
        )
    except KeyboardInterrupt:
        print("drm-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one message and status 2
        print(f"drm-merge: error: {_message(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        else:
            print("(run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    print(f"drm-merge: wrote {args.output}")
    return 0


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(text):
        text = f"{text} ({err.filename})"
    known = (ValueError, TypeError, OSError, KeyError, NotImplementedError)
    return str(text) if isinstance(err, known) else f"{type(err).__name__}: {text}"


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"500MB"``, ``"64k"`` or ``"1000"`` -> bytes.

    Example:
        >>> parse_size("2GiB"), parse_size("500MB"), parse_size("64")
        (2147483648, 500000000, 64)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; use e.g. 5GB, 500MiB or a byte count"
        )
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    size = int(float(number) * base ** "_kmgt".index(prefix or "_"))
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


# ------------------------------------------------------------------------------ the steps


def check_output(out: Path, config: MergeConfig, *, overwrite: bool) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, and any ``out`` that holds an input."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is a file, not a folder")
    if out.exists() and not overwrite:
        raise CLIError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    target = out.resolve()
    for label, path in [("base", config.base)] + [
        (f"branches[{i}]", b.path) for i, b in enumerate(config.branches)
    ]:
        source = path.resolve()
        if source == target or target in source.parents:
            raise CLIError(
                f"output folder {str(out)!r} contains the {label} input {str(path)!r}; "
                "choose another output folder"
            )
        if source in target.parents:
            raise CLIError(
                f"output folder {str(out)!r} is inside the {label} input {str(path)!r}; "
                "choose a folder outside the inputs"
            )


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            "--device cuda was requested but no CUDA device is available (torch "
            f"{torch.__version__}); use --device cpu"
        )
    return torch.device(name)


def open_job(config: MergeConfig) -> MergeJob:
    """Open base and branches lazily (LoRA adapters detected) and plan from metadata only."""
    method = config.build_method()
    base = open_source(config.base)
    branches = [
        LoraBranch(b.path, base) if b.is_lora else open_source(b.path) for b in config.branches
    ]
    coefficients = config.resolved_coefficients()
    try:
        plan = plan_merge(base, branches, routing=config.build_routing(), coefficients=coefficients)
    except ValueError as err:
        legend = "; ".join(
            [f"base = {config.base}"]
            + [f"branch {i} = {b.path}" for i, b in enumerate(config.branches)]
        )
        raise ValueError(f"{err}\n(inputs: {legend})") from err
    return MergeJob(config, method, base, branches, coefficients, plan)


def run_job(
    job: MergeJob,
    out: Path,
    *,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Stream the merge into ``out`` (temporary folder, renamed when complete)."""
    base, branches = job.base, job.branches
    device = torch.device(device)
    if device.type != "cpu":
        base, branches = _OnDevice(base, device), [_OnDevice(b, device) for b in branches]
    copy_from = job.config.base if job.config.base.is_dir() else None
    writer = HFFolderWriter(
        out,
        overwrite=overwrite,
        copy_from=copy_from,
        metadata=model_card(job),
        max_shard_bytes=max_shard_bytes,
        expected_bytes=output_bytes(job),
    )
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
            ):
                writer.add(name, tensor.cpu())
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


class _OnDevice:
    """A source whose tensors (and LoRA factors) are moved to ``device`` when read."""

    def __init__(self, source: Any, device: torch.device) -> None:
        self._source, self._device = source, device
        if callable(getattr(source, "lowrank", None)):
            self.lowrank = self._lowrank

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def get(self, name: str) -> Tensor:
        return self._source.get(name).to(self._device)

    def _lowrank(self, name: str) -> tuple[Tensor, Tensor] | None:
        pair = self._source.lowrank(name)
        return None if pair is None else (pair[0].to(self._device), pair[1].to(self._device))


# ---------------------------------------------------------------------- plan and model card


def model_card(job: MergeJob) -> dict[str, Any]:
    """Metadata for the writer's model card: method, all parameters, inputs with coefficients.

    The writer lists every file of the base and branch sources with its SHA-256.
    """
    cfg = job.config
    routing = cfg.build_routing()
    return {
        "method": cfg.method,
        "parameters": job.method.params.model_dump(mode="json"),
        "base": job.base,
        "branches": [
            {"source": source, "coefficient": coefficient}
            for source, coefficient in zip(job.branches, job.coefficients, strict=True)
        ],
        "paper": job.method.paper,
        "branch_paths": [
            {"path": str(b.path), "kind": "lora" if b.is_lora else "full", "coefficient": c}
            for b, c in zip(cfg.branches, job.coefficients, strict=True)
        ],
        "compute_dtype": cfg.compute_dtype,
        "out_dtype": cfg.out_dtype or "as the base",
        "seed": cfg.resolved_seed(),
        "routing": {
            "include": list(routing.include),
            "exclude": list(routing.exclude),
            "ignore": list(routing.ignore),
        },
        "tensors_per_route": _route_counts(job.plan),
    }


def _route_counts(plan: Sequence[PlannedTensor]) -> dict[str, int]:
    counts = {"matrix": 0, "fallback": 0, "ignore": 0}
    for item in plan:
        counts[item.route] += 1
    return counts


_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def _itemsize(dtype: torch.dtype) -> int:
    return _BYTES.get(dtype) or torch.empty((), dtype=dtype).element_size()


def estimate_peak_bytes(job: MergeJob) -> tuple[int, str]:
    """Rough peak memory of the merge loop and the tensor that sets it.

    One tensor at a time: the base and every full branch in their stored dtype, the base and
    N deltas in the compute dtype (twice while stacking), the decomposition's factors for the
    matrix route, and the output. The Python/torch runtime (~0.3 GB) is not included.
    """
    n = len(job.branches)
    n_full = sum(not callable(getattr(b, "lowrank", None)) for b in job.branches)
    c = _itemsize(job.config.compute_torch_dtype)
    best, best_name = 0, ""
    for item in job.plan:
        if item.route == "ignore":
            size = 2 * item.numel * _itemsize(item.dtype)
        else:
            size = item.numel * ((1 + n_full) * _itemsize(item.dtype) + (2 * n + 2) * c)
            if item.route == "matrix":
                rows, cols = item.shape
                if getattr(job.method.params, "direction", "vertical") == "horizontal":
                    rows, cols = cols, rows
                rank = min(n * rows, cols)
                size += (2 * n * rows * rank + cols * rank + rank * rank) * c
        if size > best:
            best, best_name = size, item.name
    return best, best_name


def output_bytes(job: MergeJob) -> int:
    """Size of the merged weights on disk, from the plan."""
    out_dtype = job.config.out_torch_dtype
    return sum(item.numel * _itemsize(out_dtype or item.dtype) for item in job.plan)


def describe_plan(job: MergeJob, out: Path) -> str:
    """The ``--dry-run`` report: inputs, tensors per route, estimated cost and peak memory."""
    cfg, n = job.config, len(job.branches)
    params = ", ".join(f"{k}={v}" for k, v in cfg.parameters.items()) or "defaults"
    lines = [
        f"drm-merge plan (dry run: no weight was read) -> {out}",
        f"method: {cfg.method} ({params}); {job.method.paper}",
        f"base: {_describe(job.base)}",
    ]
    for i, (branch, coefficient) in enumerate(zip(job.branches, job.coefficients, strict=True)):
        lines.append(f"branch {i}: coefficient {coefficient:g}, {_describe(branch)}")
    lines.append(
        f"compute dtype: {cfg.compute_dtype}; output dtype: {cfg.out_dtype or 'as the base'}"
    )
    lines.append("")
    lines.append(f"{'route':<10}{'tensors':>9}{'parameters':>14}{'est. GFLOP':>13}")
    total_cost = 0.0
    per_route: dict[Route, list[PlannedTensor]] = {"matrix": [], "fallback": [], "ignore": []}
    for item in job.plan:
        per_route[item.route].append(item)
    for route, items in per_route.items():
        cost = sum((job.method.cost(route, item.shape, n) for item in items), 0.0)
        total_cost += cost
        numel = sum(item.numel for item in items)
        lines.append(f"{route:<10}{len(items):>9}{numel:>14,}{cost / 1e9:>13.3f}")
    total_numel = sum(i.numel for i in job.plan)
    lines.append(f"{'total':<10}{len(job.plan):>9}{total_numel:>14,}{total_cost / 1e9:>13.3f}")
    costly = sorted(per_route["matrix"], key=lambda i: -job.method.cost("matrix", i.shape, n))[:5]
    if costly:
        lines.append("")
        lines.append("most expensive decompositions:")
        for item in costly:
            gflop = job.method.cost("matrix", item.shape, n) / 1e9
            lines.append(f"  {item.name} {list(item.shape)}: {gflop:.3f} GFLOP")
    schedule = build_plan(
        [(item.name, item.shape, item.route, item.dtype) for item in job.plan],
        job.method,
        n_branches=n,
        world_size=1,
        engine="single",
        compute_dtype=cfg.compute_torch_dtype,
    )
    lines.append("")
    lines.append(schedule.summary())
    peak, where = estimate_peak_bytes(job)
    out_bytes = output_bytes(job)
    lines.append("")
    lines.append(
        f"estimated peak memory of the merge loop: {_human(peak)} at {where} (inputs, compute "
        "copies and decomposition workspace; plus the Python/torch runtime)"
    )
    lines.append(f"output size: {_human(out_bytes)}")
    return "\n".join(lines)


def _describe(source: Any) -> str:
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else str(getattr(source, "origin", source))


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
