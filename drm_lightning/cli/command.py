"""``drm-merge CONFIG.yaml -o OUT``: merge checkpoints from a YAML config into an HF folder.

The command is thin: parse, validate, run, report. It loads the config
(:mod:`drm_lightning.config`, or a mergekit-format file), opens every source and checks it
from metadata (:func:`drm_lightning.cli.job.open_job`), then either prints the plan
(``--dry-run``, no weight read; :mod:`drm_lightning.cli.report`) or runs the job
(:func:`drm_lightning.cli.job.run_job`), which streams the merge loop into an
:class:`~drm_lightning.sources.writer.HFFolderWriter` (temporary folder, renamed into
``OUT`` only when complete). Every error exits with status 2 and one message naming the
file, field, tensor and shapes involved; ``--verbose`` adds the traceback.

Usage::

    drm-merge --example drm > drm.yaml          # a commented example config (--example: names)
    drm-merge drm.yaml -o merged/ --dry-run     # validate, print the plan
    drm-merge drm.yaml -o merged/               # merge
    drm-merge drm.yaml -o merged/ --overwrite --device cuda --no-progress
    torchrun --nproc_per_node 4 -m drm_lightning.cli drm.yaml -o merged/
    drm-merge drm.yaml -o merged/ --dry-run --ranks 4   # the 4-rank plan, no launch

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the merge is rank-parallel
through the streaming engine (:mod:`drm_lightning.distributed.streaming`): every rank
validates the config and the plan (an error on any rank stops every rank with the same
message before any weight is read), reads and merges only the tensors the schedule gives
it, and sends each result to rank 0, which alone writes ``OUT``. Each tensor is merged by
the same code as in a single-process run, so with the same thread count per process the
output is bit for bit the single-process output (docs/precision.md).
A rank that stops answering is named on the others, which stop: when it shows no progress for
``--timeout`` seconds, or at once when its process ended.

With ``alpha_search:`` in the config (:mod:`drm_lightning.config.alpha_search`) the merge runs
once and the global scale α of its delta is searched: each α is written beside ``OUT`` and
scored by the user's validation command (run only with ``--trust-code``), the best is written
to ``OUT`` (:mod:`drm_lightning.cli.alpha_job`). One process only: refused under ``torchrun``.

Example:
    >>> build_parser().parse_args(["cfg.yaml", "-o", "out", "--dry-run"]).dry_run
    True
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from drm_lightning.alignment import available_alignments
from drm_lightning.cli.align_job import run_alignment_merge
from drm_lightning.cli.alpha_job import AlphaSearchResult, run_alpha_search
from drm_lightning.cli.guard import guard_output, input_paths
from drm_lightning.cli.job import DiskMergeJob, make_writer, open_job, run_job
from drm_lightning.cli.report import describe_alpha_search, describe_plan, describe_result
from drm_lightning.config.loading import load_config
from drm_lightning.config.mergekit import MergekitConfig, tokenizer_source
from drm_lightning.config.schema import MergeConfig
from drm_lightning.distributed.comm import (
    DEFAULT_TIMEOUT_S,
    Comm,
    DistributedMergeError,
    RankUnresponsiveError,
)
from drm_lightning.distributed.streaming import run_job_distributed, stream_schedule
from drm_lightning.merge.pieces import PIECE_ELEMENTS
from drm_lightning.methods import available_methods
from drm_lightning.methods.base import closest_names
from drm_lightning.sources import HFFolderWriter
from drm_lightning.sources.output_guard import (
    Terminated,
    check_unexpanded_home,
    cleanup_on_signals,
    interrupted,
    outcome,
)
from drm_lightning.sources.writer import package_version, side_files

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "build_parser",
    "load_config",
    "main",
    "open_job",
    "parse_size",
    "run_job",
    "stream_schedule",
]

EXIT_ERROR = 2


class CLIError(ValueError):
    """A problem with the command line itself (output folder, device)."""


def example_configs() -> dict[str, Traversable]:
    """The commented example configs shipped with the package, by name (``drm``, ``ties``,
    ``mudsc_zip``, ...): what ``drm-merge --example NAME`` prints.

    Example:
        >>> {"drm", "ties", "mudsc_zip"} <= set(example_configs())
        True
    """
    folder = resources.files("drm_lightning.cli") / "example_configs"
    found: dict[str, Traversable] = {}
    for sub in (folder, folder / "alignment"):
        for entry in sub.iterdir():
            if entry.is_file() and entry.name.endswith(".yaml"):
                found[entry.name.removesuffix(".yaml")] = entry
    return dict(sorted(found.items()))


class _PrintExample(argparse.Action):
    """``--example NAME`` prints that config to stdout; ``--example`` alone lists the names."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        examples = example_configs()
        if values is None:
            print("example configs (print one with: drm-merge --example NAME > NAME.yaml):")
            for name, entry in examples.items():
                first = entry.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
                print(f"  {name:<16}{first.split(': ', 1)[0]}")  # the line's title
            parser.exit()
        if values not in examples:
            parser.error(
                f"--example: no example config {values!r} ({closest_names(values, examples)})"
            )
        sys.stdout.write(examples[values].read_text(encoding="utf-8"))
        parser.exit()


def _epilog() -> str:
    """The methods ``--help`` lists: the merge methods and the alignment methods."""
    wrap = functools.partial(textwrap.fill, width=96, subsequent_indent="    ")
    return "\n".join(
        [
            wrap(
                "merge methods (method: in the config; a base and fine-tunes of it): "
                + ", ".join(available_methods())
            ),
            wrap(
                "alignment methods (models from different inits, no base): "
                + ", ".join(available_alignments())
            ),
            "",
            "drm-merge --example lists the commented example configs; "
            "drm-merge --example NAME prints one.",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``drm-merge`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="drm-merge",
        description="Merge fine-tuned checkpoints (DRM, TIES, DARE, task arithmetic) "
        "from a YAML config.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config",
        type=Path,
        help="YAML config (drm-merge --example NAME prints one example per method)",
    )
    parser.add_argument(
        "--example",
        nargs="?",
        metavar="NAME",
        action=_PrintExample,
        help="print the commented example config NAME (e.g. drm, ties) and exit; "
        "without NAME, list them",
    )
    parser.add_argument(
        "-o", "--output", type=_output_path, required=True, help="output folder (HF layout)"
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
        "--trust-code",
        action="store_true",
        help="import the module:function references of the config (model:, batches:, spec:) "
        "and run its alpha_search command, which runs their code; the current directory is "
        "searched too. Default: refused; --dry-run imports and runs nothing even with it",
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
    parser.add_argument(
        "--piece-size",
        type=int,
        default=PIECE_ELEMENTS,
        metavar="E",
        help="merge a large entry-wise tensor (TIES, task arithmetic, DRM's fallback) in row "
        f"pieces of about E entries across branches (default {PIECE_ELEMENTS}); 0: whole tensors",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: stop the job, naming the rank, when a rank shows no progress (no "
        f"tensor merged) for SECONDS (default {DEFAULT_TIMEOUT_S:g}: over 5x the slowest "
        "single-tensor merge measured at 8B shapes on CPU, a 14336x4096 DRM matrix at about "
        "110 s on a rank's one thread; benchmarks/RESULTS.md)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``drm-merge``; returns the exit status (0 ok, 2 error, 130 Ctrl-C,
    128 + N signal N).

    Ctrl-C at any point ends with one line saying what is on disk: an error raised by a step
    that Ctrl-C cut short (a half-imported module, ...) is that interruption, not an error.
    """
    try:
        with cleanup_on_signals():
            return _main(argv)
    except KeyboardInterrupt as err:
        print(f"drm-merge: interrupted; {outcome(err, 'nothing was written')}", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.piece_size < 0:
        parser.error(f"--piece-size must be >= 0 (0: merge whole tensors), got {args.piece_size}")
    if args.ranks is not None and not args.dry_run:
        parser.error(
            "--ranks only applies with --dry-run; launch with torchrun "
            "--nproc_per_node N to merge on N ranks"
        )
    if launched_world_size() > 1 or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ):
        return _main_distributed(args)
    try:
        config = _load_config(args)
        check_output(
            args.output,
            config,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            config_file=args.config,
        )
        device = resolve_device(args.device)
        if getattr(config, "alignment_merge", False):  # method: mudsc_zip, ... (issue 11)
            start = time.perf_counter()
            print(
                run_alignment_merge(
                    config,
                    args.output,
                    dry_run=args.dry_run,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                    max_shard_bytes=args.max_shard_size,
                )
            )
            if not args.dry_run:  # its line names the method and the models
                print("\n".join(describe_result(None, args.output, time.perf_counter() - start)))
            return 0
        if (args.ranks or 1) > 1:
            refuse_alpha_search_distributed(config)
        job = open_job(config)
        if args.dry_run:
            print(
                describe_plan(
                    job, args.output, world_size=args.ranks or 1, max_pending=args.max_pending
                )
            )
            return 0
        start = time.perf_counter()
        settings: dict[str, Any] = dict(
            overwrite=args.overwrite,
            device=device,
            progress=not args.no_progress,
            max_shard_bytes=args.max_shard_size,
            piece_elements=args.piece_size or None,
        )
        searched: AlphaSearchResult | None = None
        if config.alpha_search is not None:  # merge once, score each α, write the best
            searched = run_alpha_search(job, args.output, **settings)
        else:
            run_job(job, args.output, **settings)
    except Exception as err:  # every failure becomes one message and status 2
        if interrupted():
            raise KeyboardInterrupt from err  # reported by main
        print(f"drm-merge: error: {_message(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        else:
            print("(run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    print(f"drm-merge: wrote {args.output}")
    print("\n".join(describe_result(job, args.output, time.perf_counter() - start)))
    if searched is not None:
        print("\n".join(describe_alpha_search(searched)))
    return 0


def _output_path(text: str) -> Path:
    """``-o``: refused if it starts with a ``~`` the shell did not expand."""
    try:
        check_unexpanded_home(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return Path(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
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
    """The config file, with ``--trust-pickles`` and ``--trust-code`` applied (a dry run
    imports no module:function reference, even with ``--trust-code``)."""
    trust_code = getattr(args, "trust_code", False)
    code = "check" if trust_code and args.dry_run else "import" if trust_code else "refuse"
    config = load_config(args.config, code=code)
    if getattr(args, "trust_pickles", False):
        config = config.model_copy(update={"trust_pickles": True})
    if isinstance(config, MergekitConfig) and os.environ.get("RANK", "0") == "0":
        print(f"drm-merge: note: {config.format_note()}", file=sys.stderr)
        for warning in config.ignored:  # parameters mergekit ignores: ignored here too
            print(f"drm-merge: warning: {warning}", file=sys.stderr)
    return config


def check_output(
    out: Path,
    config: MergeConfig,
    *,
    overwrite: bool,
    dry_run: bool = False,
    config_file: Path | None = None,
) -> None:
    """Refuse an existing ``out`` without ``--overwrite``, any ``out`` that holds an input
    (``config_file`` and what the config names included,
    :func:`~drm_lightning.cli.guard.input_paths`), and what ``--overwrite`` must not replace
    (:func:`~drm_lightning.cli.guard.guard_output`); report leftovers of killed earlier runs."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {str(out)!r} exists and is a file, not a folder")
    if out.exists() and not overwrite:
        raise CLIError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    target = out.resolve()
    inputs = input_paths(config, config_file)
    for label, path in inputs:
        source = path.resolve()
        if source == target or target in source.parents:
            raise CLIError(
                f"output folder {str(out)!r} contains the {label} {str(path)!r}; "
                "choose another output folder"
            )
        if source in target.parents:
            raise CLIError(
                f"output folder {str(out)!r} is inside the {label} {str(path)!r}; "
                "choose a folder outside the inputs"
            )
    # the config and tokenizer files the output will copy: links out of their folder,
    # FIFOs and broken JSON are refused now, before any weight is read (--dry-run too)
    side_files(config.base if config.base.is_dir() else None, tokenizer_source(config))
    notes = guard_output(
        out, overwrite=overwrite, inputs=[path for _, path in inputs], dry_run=dry_run
    )
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"drm-merge: note: {note}", file=sys.stderr)


def refuse_alpha_search_distributed(config: MergeConfig) -> None:
    """``alpha_search:`` runs in one process: refused under ``torchrun`` (and ``--ranks N``).

    Not simple to support: after the rank-parallel merge, rank 0 alone would write and score
    every α (the validation command can take hours) while the other ranks wait in a collective
    that ``--timeout`` watches; nothing of the search itself is rank-parallel.
    """
    if getattr(config, "alpha_search", None) is not None:
        raise CLIError(
            "alpha_search: not supported under torchrun: every α is written and scored by the "
            "validation command in one process, which the other ranks would only wait for; "
            "run drm-merge without torchrun (one process), or drop alpha_search to merge "
            "rank-parallel"
        )


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


def init_process_group(device: str, timeout: float | None = None) -> bool:
    """Join the launcher's process group unless one exists; returns True if it was created here.

    The rendezvous comes from the launcher's environment (``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``). Backend: ``gloo``; with ``--device cuda`` on a machine with
    GPUs, ``cpu:gloo,cuda:nccl``. Every tensor the CLI exchanges (merged results on their
    way to the writer, error reports) is a CPU tensor or object, so gloo carries all of it;
    the NCCL half is there for GPU collectives only and is created lazily (two ranks sharing
    one GPU therefore work too). ``timeout`` (seconds): the group's collective timeout.
    """
    if not dist.is_available():
        raise CLIError("this torch build has no torch.distributed; run drm-merge without torchrun")
    if dist.is_initialized():
        return False
    backend = "gloo"
    if device == "cuda" and torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
    if timeout is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def _main_distributed(args: argparse.Namespace) -> int:
    """``main`` under a launcher: validate everywhere, agree, then merge rank-parallel."""
    created = False
    tag = "drm-merge"
    comm: Comm | None = None
    try:
        try:
            created = init_process_group(args.device, args.timeout)
        except Exception as err:  # noqa: BLE001 - without a group there is nothing to agree on
            print(f"{tag}: error: cannot join the process group: {_message(err)}", file=sys.stderr)
            return EXIT_ERROR
        comm = Comm(None)
        if created:  # a group the user created keeps its own timeout
            comm.watch(args.timeout, hint="pass --timeout to wait longer")
        rank, world = comm.rank, comm.world_size
        tag = f"drm-merge [rank {rank}/{world}]"
        # 1. Every rank validates the config, the inputs and the plan from metadata; rank 0
        #    also prepares the writer (output folder, free space). Nothing is read yet.
        job: DiskMergeJob | None = None
        writer: HFFolderWriter | None = None
        device = torch.device("cpu")
        local: BaseException | None = None
        try:
            config = _load_config(args)
            refuse_alpha_search_distributed(config)
            check_output(
                args.output,
                config,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                config_file=args.config,
            )
            device = resolve_device(args.device, _local_rank())
            job = open_job(config)
            if rank == 0 and not args.dry_run:
                writer = make_writer(
                    job, args.output, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size
                )
        except KeyboardInterrupt:
            raise
        except Exception as err:  # shared with every rank below
            if interrupted():
                raise KeyboardInterrupt from err  # Ctrl-C cut a step short: not its error
            local = err
        reports = comm.all_gather_object(None if local is None else _message(local))
        failures = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failures:
            first, message = failures[0]
            if len(failures) < world:
                message = f"{message} (on rank {first})"
            _exit_on_sigterm()
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
                print(
                    describe_plan(job, args.output, world_size=world, max_pending=args.max_pending)
                )
            return 0
        start = time.perf_counter()
        stats = run_job_distributed(
            job,
            comm,
            writer,
            device=device,
            progress=not args.no_progress,
            max_pending=args.max_pending,
            piece_elements=args.piece_size or None,
        )
        if rank == 0:
            print(
                f"drm-merge: wrote {args.output} ({world} ranks, {stats['chunks']} chunks, "
                f"{stats['received_bytes'] / 2**20:.1f} MiB received by rank 0)"
            )
            print("\n".join(describe_result(job, args.output, time.perf_counter() - start)))
        return 0
    except KeyboardInterrupt as err:
        print(f"{tag}: interrupted; {outcome(err, 'nothing was written')}", file=sys.stderr)
        return 130
    except DistributedMergeError as err:  # raised on every rank together: leave together
        _exit_on_sigterm()
        print(f"{tag}: error: {err}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        if not isinstance(err, RankUnresponsiveError):  # nobody left to wait for
            _leave_together(comm)
        return EXIT_ERROR
    except Terminated:  # the launcher stops every rank when one died: name it if it can be told
        lost = comm.ended_peers("the merge") if comm is not None else None
        if lost is not None:
            print(f"{tag}: error: {lost}", file=sys.stderr)
        raise
    except Exception as err:  # noqa: BLE001 - on this rank only: the launcher stops the others
        _exit_on_sigterm()
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


def _exit_on_sigterm() -> None:
    """After a failure every rank reports: let the launcher's SIGTERM not change the status.

    ``torchrun`` sends SIGTERM to the other ranks as soon as one rank exits with an error;
    a rank that has already printed the shared error and is only tearing down would be
    reported as killed (-15) instead of failed with the same status. SIGTERM is ignored
    from here on (the process is exiting anyway; the launcher still SIGKILLs it after its
    grace period should it hang).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
