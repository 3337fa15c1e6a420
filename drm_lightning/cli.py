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
    torchrun --nproc_per_node 4 -m drm_lightning.cli configs/drm.yaml -o merged/
    drm-merge configs/drm.yaml -o merged/ --dry-run --ranks 4   # the 4-rank plan, no launch

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the merge is rank-parallel, see
:func:`run_job_distributed`: every rank validates the config and the plan (an error on any
rank stops every rank with the same message before any weight is read), reads and merges
only the tensors the schedule gives it (:func:`stream_schedule`: chunks of the base's
order, owners balanced by cost with :func:`~drm_lightning.distributed.plan.build_plan`),
and sends each result to rank 0, which alone writes ``OUT`` (temporary folder, renamed when
complete). The output is identical to the single-process run, file for file.

Example:
    >>> build_parser().parse_args(["cfg.yaml", "-o", "out", "--dry-run"]).dry_run
    True
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from drm_lightning import __version__
from drm_lightning.config import MergeConfig, load_config
from drm_lightning.mergekit_format import MergekitConfig
from drm_lightning.distributed.comm import Comm, DistributedMergeError
from drm_lightning.distributed.plan import MergePlan, build_plan
from drm_lightning.merge import PlannedTensor, iter_merge, plan_merge
from drm_lightning.methods import MergeMethod, Route
from drm_lightning.cli_guard import guard_output, key_mismatch_hint, open_inputs
from drm_lightning.sources import HFFolderWriter
from drm_lightning.sources.output_guard import cleanup_on_signals

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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier drm-merge output (never a folder with other "
        "files); also removes folders left by killed earlier runs",
    )
    parser.add_argument(
        "--trust-pickles",
        action="store_true",
        help="allow full unpickling of .ckpt/.bin/.pt inputs that hold more than tensors "
        "(runs code from the files; trusted files only). Default: refused",
    )
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
    parser.add_argument(
        "--ranks",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --dry-run: print the plan for N ranks without launching them "
        "(default: the ranks of the torchrun launch, else 1)",
    )
    parser.add_argument(
        "--max-pending",
        type=_positive_int,
        default=None,
        metavar="K",
        help="under torchrun: tensors per chunk of the schedule; rank 0 holds at most K "
        "merged tensors before writing them (default 8 x ranks)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``drm-merge``; returns the exit status (0 ok, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ranks is not None and not args.dry_run:
        parser.error("--ranks only applies with --dry-run; launch with torchrun "
                     "--nproc_per_node N to merge on N ranks")
    if launched_world_size() > 1 or (dist.is_available() and dist.is_initialized()
                                     and dist.get_world_size() > 1):
        with cleanup_on_signals():
            return _main_distributed(args)
    try:
        config = _load_config(args)
        check_output(args.output, config, overwrite=args.overwrite, dry_run=args.dry_run)
        device = resolve_device(args.device)
        job = open_job(config)
        if args.dry_run:
            print(describe_plan(job, args.output, world_size=args.ranks or 1,
                                max_pending=args.max_pending))
            return 0
        with cleanup_on_signals():
            run_job(
                job,
                args.output,
                overwrite=args.overwrite,
                device=device,
                progress=not args.no_progress,
                max_shard_bytes=args.max_shard_size,
            )
            if isinstance(config, MergekitConfig):
                config.finish_output(args.output)  # tokenizer_source
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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


def _load_config(args: argparse.Namespace) -> MergeConfig:
    """The config file, with ``--trust-pickles`` applied."""
    config = load_config(args.config)
    if getattr(args, "trust_pickles", False):
        config = config.model_copy(update={"trust_pickles": True})
    if isinstance(config, MergekitConfig) and os.environ.get("RANK", "0") == "0":
        print(f"drm-merge: note: {config.format_note()}", file=sys.stderr)
    return config


def check_output(
    out: Path, config: MergeConfig, *, overwrite: bool, dry_run: bool = False
) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, any ``out`` that holds an input,
    and what ``--overwrite`` must not replace (:func:`~drm_lightning.cli_guard.guard_output`);
    report leftovers of killed earlier runs."""
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
    inputs = [config.base, *(b.path for b in config.branches)]
    notes = guard_output(out, overwrite=overwrite, inputs=inputs, dry_run=dry_run)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"drm-merge: note: {note}", file=sys.stderr)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``cpu`` or ``cuda``; ``cuda`` without a GPU is an error, not a silent fallback.

    Under a launcher (``local_rank`` given) ``cuda`` means this rank's GPU,
    ``cuda:<local_rank mod GPU count>``: one GPU per rank, or ranks sharing GPUs round-robin.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            "--device cuda was requested but no CUDA device is available (torch "
            f"{torch.__version__}); use --device cpu"
        )
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def open_job(config: MergeConfig) -> MergeJob:
    """Open base and branches lazily (LoRA adapters detected) and plan from metadata only."""
    method = config.build_method()
    base, branches = open_inputs(config)
    coefficients = config.resolved_coefficients()
    try:
        plan = plan_merge(base, branches, routing=config.build_routing(), coefficients=coefficients)
    except ValueError as err:
        legend = "; ".join(
            [f"base = {config.base}"]
            + [f"branch {i} = {b.path}" for i, b in enumerate(config.branches)]
        )
        hint = key_mismatch_hint(config, base, branches)
        raise ValueError(f"{err}\n(inputs: {legend}){hint}") from err
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


# ------------------------------------------------------------------ torchrun: rank-parallel merge


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun``/``deepspeed``/``accelerate`` (1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    except ValueError:
        return 0


def init_process_group(device: str) -> bool:
    """Join the launcher's process group unless one exists; returns True if it was created here.

    The rendezvous comes from the launcher's environment (``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``). Backend: ``gloo``; with ``--device cuda`` on a machine with
    GPUs, ``cpu:gloo,cuda:nccl``. Every tensor the CLI exchanges (merged results on their
    way to the writer, error reports) is a CPU tensor or object, so gloo carries all of it;
    the NCCL half is there for GPU collectives only and is created lazily (two ranks sharing
    one GPU therefore work too).
    """
    if not dist.is_available():
        raise CLIError("this torch build has no torch.distributed; run drm-merge without torchrun")
    if dist.is_initialized():
        return False
    backend = "gloo"
    if device == "cuda" and torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    return True


def _main_distributed(args: argparse.Namespace) -> int:
    """``main`` under a launcher: validate everywhere, agree, then merge rank-parallel."""
    created = False
    tag = "drm-merge"
    comm: Comm | None = None
    try:
        try:
            created = init_process_group(args.device)
        except Exception as err:  # noqa: BLE001 - without a group there is nothing to agree on
            print(f"{tag}: error: cannot join the process group: {_message(err)}", file=sys.stderr)
            return EXIT_ERROR
        comm = Comm(None)
        rank, world = comm.rank, comm.world_size
        tag = f"drm-merge [rank {rank}/{world}]"
        # 1. Every rank validates the config, the inputs and the plan from metadata; rank 0
        #    also prepares the writer (output folder, free space). Nothing is read yet.
        job: MergeJob | None = None
        writer: HFFolderWriter | None = None
        device = torch.device("cpu")
        local: BaseException | None = None
        try:
            config = _load_config(args)
            check_output(args.output, config, overwrite=args.overwrite, dry_run=args.dry_run)
            device = resolve_device(args.device, _local_rank())
            job = open_job(config)
            if rank == 0 and not args.dry_run:
                writer = make_writer(job, args.output, overwrite=args.overwrite,
                                     max_shard_bytes=args.max_shard_size)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - shared with every rank below
            local = err
        reports = comm.all_gather_object(None if local is None else _message(local))
        failures = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failures:
            first, message = failures[0]
            if len(failures) < world:
                message = f"{message} (on rank {first})"
            _exit_on_sigterm(EXIT_ERROR)
            print(f"{tag}: error: {message}", file=sys.stderr)
            if args.verbose and local is not None:
                traceback.print_exception(local)
            elif rank == 0:
                print("(run with --verbose for the traceback)", file=sys.stderr)
            _leave_together(comm)
            return EXIT_ERROR
        assert job is not None
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # 2. The plan is a pure function of metadata: check that every rank built the same.
        schedule = stream_schedule(job, world, args.max_pending)
        prints = comm.all_gather_object(schedule.fingerprint())
        if len(set(prints)) > 1:
            raise DistributedMergeError(
                f"ranks built different merge plans (fingerprints {prints}): the inputs differ "
                "between ranks (different files or configs on different machines?)"
            )
        if args.dry_run:
            if rank == 0:
                print(describe_plan(job, args.output, world_size=world,
                                    max_pending=args.max_pending))
            return 0
        stats = run_job_distributed(
            job, comm, writer, device=device, progress=not args.no_progress,
            max_pending=args.max_pending,
        )
        if rank == 0:
            if isinstance(config, MergekitConfig):
                config.finish_output(args.output)  # tokenizer_source
            print(
                f"drm-merge: wrote {args.output} ({world} ranks, {stats['chunks']} chunks, "
                f"{stats['received_bytes'] / 2**20:.1f} MiB received by rank 0)"
            )
        return 0
    except KeyboardInterrupt:
        print(f"{tag}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except DistributedMergeError as err:  # raised on every rank together: leave together
        _exit_on_sigterm(EXIT_ERROR)
        print(f"{tag}: error: {err}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        _leave_together(comm)
        return EXIT_ERROR
    except Exception as err:  # noqa: BLE001 - on this rank only: the launcher stops the others
        _exit_on_sigterm(EXIT_ERROR)
        print(f"{tag}: error: {_message(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return EXIT_ERROR
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _leave_together(comm: Comm | None) -> None:
    """After an error every rank agreed on (and cleaned up after): wait for the others.

    Every rank has installed :func:`_exit_on_sigterm` before it gets here, so when the first
    rank exits and the launcher terminates the rest, each of them still exits with the same
    status instead of being reported as killed.
    """
    if comm is None or comm.world_size == 1:
        return
    try:
        comm.all_gather_object(None)
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
        pass


def _exit_on_sigterm(status: int) -> None:
    """After a failure every rank reports: let the launcher's SIGTERM not change ``status``.

    ``torchrun`` sends SIGTERM to the other ranks as soon as one rank exits with an error;
    a rank that has already printed the shared error and is only tearing down would be
    reported as killed (-15) instead of failed with the same status. SIGTERM is ignored
    from here on (the process is exiting anyway; the launcher still SIGKILLs it after its
    grace period should it hang). ``status`` documents the intent; the return value of
    :func:`main` is the exit status.
    """
    import signal
    import threading

    del status
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_writer(
    job: MergeJob, out: Path, *, overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3
) -> HFFolderWriter:
    """The output writer of a job (refuses an existing ``out``; checks free space)."""
    return HFFolderWriter(
        out,
        overwrite=overwrite,
        copy_from=job.config.base if job.config.base.is_dir() else None,
        metadata=model_card(job),
        max_shard_bytes=max_shard_bytes,
        expected_bytes=output_bytes(job),
    )


def distributed_plan(
    job: MergeJob, world_size: int, positions: Sequence[int] | None = None
) -> MergePlan:
    """Owners of the tensors (all, or those at ``positions``), balanced by cost with
    :func:`build_plan`; the same on every rank."""
    chosen = job.plan if positions is None else [job.plan[p] for p in positions]
    return build_plan(
        [(item.name, item.shape, item.route, item.dtype) for item in chosen],
        job.method,
        n_branches=len(job.branches),
        world_size=world_size,
        engine="single" if world_size == 1 else "replica",
        compute_dtype=job.config.compute_torch_dtype,
    )


@dataclass
class StreamSchedule:
    """Who merges what under torchrun, chunk by chunk, so that rank 0 writes in base order.

    Attributes:
        world_size: ranks.
        owners: rank merging each tensor, by position in the base's order; ``-1`` for
            ignored tensors, which rank 0 copies from the base when their turn comes.
        chunks: positions of each chunk (consecutive merged tensors of the base's order, at
            most ``max_pending``), ascending. Within a chunk the owners come from
            :func:`build_plan` (longest job first, by cost).
        costs: estimated FLOPs of each tensor (0 for ignored ones).
        max_pending: tensors per chunk: rank 0 never holds more merged tensors than this.
        peak_pending_bytes: the most bytes of merged tensors rank 0 holds at once.
    """

    world_size: int
    owners: list[int]
    chunks: list[list[int]]
    costs: list[float]
    max_pending: int
    peak_pending_bytes: int

    def rank_costs(self) -> list[float]:
        """Total estimated FLOPs per rank."""
        out = [0.0] * self.world_size
        for owner, cost in zip(self.owners, self.costs):
            if owner >= 0:
                out[owner] += cost
        return out

    def critical_cost(self) -> float:
        """Sum over chunks of the most loaded rank's FLOPs (chunks run one after another)."""
        total = 0.0
        for chunk in self.chunks:
            per_rank = [0.0] * self.world_size
            for p in chunk:
                per_rank[self.owners[p]] += self.costs[p]
            total += max(per_rank)
        return total

    def fingerprint(self) -> str:
        """Short hash; ranks compare it before the first tensor is read."""
        import hashlib

        text = f"{self.world_size}|{self.owners}|{self.chunks}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def stream_schedule(
    job: MergeJob, world_size: int, max_pending: int | None = None
) -> StreamSchedule:
    """Chunks of the rank-parallel merge and the owner of every tensor.

    The merged tensors, in the base's order, are cut into chunks of ``max_pending``
    (default 8 x ranks); each chunk's tensors are given to ranks by :func:`build_plan`
    (cost-balanced, deterministic). Chunks run one after another, so rank 0 can write every
    tensor in the base's order while holding at most one chunk.

    Example:
        >>> from types import SimpleNamespace
        >>> from drm_lightning.methods import get_method
        >>> job = SimpleNamespace(method=get_method("ties"), branches=[0, 0],
        ...     config=SimpleNamespace(out_torch_dtype=None, compute_torch_dtype=torch.float32),
        ...     plan=[PlannedTensor(n, (8, 8), torch.float32, "matrix") for n in "abcde"])
        >>> s = stream_schedule(job, 2, 4)
        >>> s.chunks, s.owners
        ([[0, 1, 2, 3], [4]], [0, 1, 0, 1, 0])
    """
    window = max_pending or 8 * world_size
    planned = list(job.plan)
    out_dtype = job.config.out_torch_dtype
    merged = [p for p, t in enumerate(planned) if t.route != "ignore"]
    chunks = [merged[i : i + window] for i in range(0, len(merged), window)]
    owners = [-1] * len(planned)
    costs = [0.0] * len(planned)
    peak = 0
    for chunk in chunks:
        plan = distributed_plan(job, world_size, chunk)
        by_name = {it.name: it for it in plan.items}
        for p in chunk:
            item = by_name[planned[p].name]
            owners[p], costs[p] = item.owner, item.cost
        held = sum(planned[p].numel * _itemsize(out_dtype or planned[p].dtype) for p in chunk)
        peak = max(peak, held)
    return StreamSchedule(world_size, owners, chunks, costs, window, peak)


def run_job_distributed(
    job: MergeJob,
    comm: Comm,
    writer: HFFolderWriter | None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_pending: int | None = None,
) -> dict[str, int]:
    """The rank-parallel merge; call it on every rank (``writer`` on rank 0 only).

    Chunk by chunk (:func:`stream_schedule`): every rank reads and merges the tensors of
    the chunk it owns (exactly what the single-process loop computes for each, on
    ``device``); a check makes every rank raise the same
    :class:`~drm_lightning.distributed.comm.DistributedMergeError` if any failed; then the
    owners send their results to rank 0 one tensor at a time (point to point, in the base's
    order) and rank 0 writes them, so the output equals the single-process output file for
    file. Memory: a rank holds its share of one chunk; rank 0 at most one chunk
    (``max_pending`` tensors). Rank 0 writes into a temporary folder and renames it into
    place after the last tensor; a failure on any rank removes it and raises everywhere.

    Returns:
        ``{"chunks": ..., "sent_bytes": ..., "received_bytes": ...}`` for this rank.
    """
    rank = comm.rank
    if (writer is None) != (rank != 0):
        raise ValueError("run_job_distributed needs the writer on rank 0 and only there")
    schedule = stream_schedule(job, comm.world_size, max_pending)
    device = torch.device(device)
    base, branches = job.base, job.branches
    if device.type != "cpu":
        base, branches = _OnDevice(base, device), [_OnDevice(b, device) for b in branches]
    out_dtype = job.config.out_torch_dtype
    stats = {"chunks": len(schedule.chunks), "sent_bytes": 0, "received_bytes": 0}

    def merge_one(position: int) -> Tensor:
        item = job.plan[position]
        (_, value), = iter_merge(
            job.method, base, branches, coefficients=job.coefficients,
            compute_dtype=job.config.compute_torch_dtype, out_dtype=out_dtype,
            seed=job.config.resolved_seed(), plan=[item],
        )
        value = value.detach().to("cpu").contiguous()
        expected = out_dtype or item.dtype
        if tuple(value.shape) != item.shape or value.dtype != expected:
            raise ValueError(f"merged {item.name!r} is {value.dtype} {list(value.shape)}, "
                             f"expected {expected} {list(item.shape)}")
        return value

    pending: dict[int, Tensor] = {}
    cursor = 0
    bar = None
    if rank == 0 and progress:
        from tqdm.auto import tqdm

        name = getattr(job.method, "registered_name", job.method.name)
        bar = tqdm(total=len(job.plan), desc=f"merging ({name}, {comm.world_size} ranks)",
                   unit="tensor")

    def drain() -> None:
        """Rank 0: write every tensor whose turn has come (ignored ones copied from the base)."""
        nonlocal cursor
        assert writer is not None
        while cursor < len(job.plan):
            if schedule.owners[cursor] == -1:
                value = merge_one(cursor)
            elif cursor in pending:
                value = pending.pop(cursor)
            else:
                return
            writer.add(job.plan[cursor].name, value)
            del value
            cursor += 1
            if bar is not None:
                bar.update(1)

    try:
        if writer is not None:
            _guard(comm, "creating the temporary output folder", writer.__enter__, lambda: None)
        comm.check("creating the temporary output folder")
        for chunk in schedule.chunks:
            mine: dict[int, Tensor | None] = {}
            for p in chunk:
                if schedule.owners[p] == rank:
                    mine[p] = _guard(comm, f"merging {job.plan[p].name!r}",
                                     lambda p=p: merge_one(p), lambda: None)
            first, last = job.plan[chunk[0]].name, job.plan[chunk[-1]].name
            comm.check(f"merging tensors {first!r} to {last!r}")
            for p in chunk:
                owner, item = schedule.owners[p], job.plan[p]
                if rank == 0 and owner == 0:
                    pending[p] = mine.pop(p)  # type: ignore[assignment]
                elif rank == 0:
                    buffer = torch.empty(item.shape, dtype=out_dtype or item.dtype)
                    dist.recv(buffer, src=owner)
                    stats["received_bytes"] += buffer.numel() * buffer.element_size()
                    pending[p] = buffer
                elif rank == owner:
                    value = mine.pop(p)
                    assert value is not None
                    dist.send(value, dst=0)
                    stats["sent_bytes"] += value.numel() * value.element_size()
                    del value
                if writer is not None:
                    _guard(comm, "writing the output", drain, lambda: None)
        if writer is not None:
            _guard(comm, "writing the output", drain, lambda: None)
            if not comm.failed:
                _guard(comm, f"finishing {writer.out_dir}",
                       lambda: writer.__exit__(None, None, None), lambda: None)
        comm.check("writing the output folder")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return stats


def _guard(comm: Comm, where: str, fn: Callable[[], Any], placeholder: Callable[[], Any]) -> Any:
    """Run local work; on failure record it (raised on every rank at the next check)."""
    if comm.failed:
        return placeholder()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - re-raised on every rank by comm.check
        comm.record_error(f"{where} (rank {comm.rank})", err)
        return placeholder()


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
    N deltas in the compute dtype (twice while stacking), the method's own workspace
    (:meth:`~drm_lightning.methods.base.MergeMethod.workspace_elements`), and the output.
    The Python/torch runtime (~0.3 GB) is not included.
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
            size += job.method.workspace_elements(item.route, item.shape, n) * c
        if size > best:
            best, best_name = size, item.name
    return best, best_name


def output_bytes(job: MergeJob) -> int:
    """Size of the merged weights on disk, from the plan."""
    out_dtype = job.config.out_torch_dtype
    return sum(item.numel * _itemsize(out_dtype or item.dtype) for item in job.plan)


def describe_plan(
    job: MergeJob, out: Path, *, world_size: int = 1, max_pending: int | None = None
) -> str:
    """The ``--dry-run`` report: inputs, tensors per route, estimated cost and peak memory.

    With ``world_size`` > 1, the rank-parallel plan of a ``torchrun`` launch: per rank the
    tensors it merges, their cost, the bytes it reads and sends to (or rank 0 receives),
    and the schedule's rounds and rank 0's write buffer.
    """
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
    lines.append("")
    if world_size == 1:
        lines.append(distributed_plan(job, 1).summary())
    else:
        lines.extend(_describe_ranks(job, world_size, max_pending))
    peak, where = estimate_peak_bytes(job)
    out_bytes = output_bytes(job)
    lines.append("")
    lines.append(
        f"estimated peak memory of the merge loop: {_human(peak)} at {where} (inputs, compute "
        "copies and decomposition workspace; plus the Python/torch runtime)"
    )
    lines.append(f"output size: {_human(out_bytes)}")
    return "\n".join(lines)


def _describe_ranks(job: MergeJob, world: int, max_pending: int | None) -> list[str]:
    """Per-rank table of the torchrun plan (cost, reads, traffic to rank 0, chunks)."""
    stream = stream_schedule(job, world, max_pending)
    n_full = sum(not callable(getattr(b, "lowrank", None)) for b in job.branches)
    out_dtype = job.config.out_torch_dtype
    items = [0] * world
    read = [0] * world
    sent = [0] * world
    for item, owner in zip(job.plan, stream.owners):
        size = item.numel * _itemsize(item.dtype)
        if owner == -1:
            read[0] += size
            continue
        items[owner] += 1
        read[owner] += size * (1 + n_full)
        if owner != 0:
            sent[owner] += item.numel * _itemsize(out_dtype or item.dtype)
    cost = stream.rank_costs()
    mean = sum(cost) / world
    n_skip = sum(o == -1 for o in stream.owners)
    lines = [
        f"merge plan: {len(job.plan)} tensors ({len(job.plan) - n_skip} merged, {n_skip} "
        f"ignored), {len(job.branches)} branches, {world} ranks (torchrun); max/mean cost "
        f"{max(cost) / mean if mean > 0 else 1.0:.3f}",
        f"{'rank':>4}  {'items':>5}  {'GFLOP':>10}  {'read MiB':>10}  {'to rank 0 MiB':>13}",
    ]
    for r in range(world):
        to_zero = -sum(sent) if r == 0 else sent[r]
        lines.append(
            f"{r:>4}  {items[r]:>5}  {cost[r] / 1e9:>10.2f}  {read[r] / 2**20:>10.1f}  "
            f"{to_zero / 2**20:>13.1f}"
        )
    critical = stream.critical_cost()
    total = sum(cost)
    lines.append(
        "(every rank reads only the tensors it merges; rank 0 writes the output, and a negative "
        "'to rank 0' is what it receives)"
    )
    lines.append(
        f"schedule: {len(stream.chunks)} chunk(s) of at most {stream.max_pending} tensors, owners "
        f"balanced by cost within each chunk; rank 0 holds at most "
        f"{_human(stream.peak_pending_bytes)} of merged tensors; critical path "
        f"{critical / 1e9:.2f} GFLOP of {total / 1e9:.2f} (estimated speed-up "
        f"{total / critical if critical > 0 else 1.0:.2f}x on {world} ranks)"
    )
    return lines


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
