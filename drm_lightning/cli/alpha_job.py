r"""``alpha_search:`` in ``drm-merge``: merge once, score each α with the user's command, keep one.

The merge runs once, as without a search (:func:`~drm_lightning.cli.job.run_job`), into a
temporary ``<out>.tmp-PID-HEX`` folder beside ``OUT``. For each α of the grid,
:math:`\text{base} + \alpha(\text{merged} - \text{base})` is written tensor by tensor (one
tensor in memory) into an HF folder in it, the validation command runs on that folder
(without a shell, :meth:`~drm_lightning.config.alpha_search.AlphaSearchSection.argv`), and the
JSON file it writes — ``{task: score}``, read as data — gives the α's scores; the folder is
then removed. The α with the best average is kept by the in-loop rule
(:func:`~drm_lightning.inloop.alpha.best_alpha`: ties go to the smaller α) and written to
``OUT`` by the output writer (temporary folder, renamed into place when complete), with the
same arithmetic as the scored folder, so ``OUT`` holds bit for bit the model that was scored.
The model card records ``alpha`` and every α's scores.

Disk: the merge and one candidate beside ``OUT`` (checked before the merge); the temporary
folder is removed at the end, on any error and on Ctrl-C / SIGTERM (a killed run's folder is
reported by the next run and removed with ``--overwrite``).

Example:
    >>> _average({"a": 0.5, "b": 1.0})
    0.75
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drm_lightning.cli.job import DiskMergeJob, make_writer, run_job
from drm_lightning.cli.report import output_bytes
from drm_lightning.config.alpha_search import AlphaSearchSection, best_alpha, rescaled
from drm_lightning.merge.pieces import PIECE_ELEMENTS
from drm_lightning.sources import WeightSource, open_source
from drm_lightning.sources.input_files import read_regular
from drm_lightning.sources.output_guard import sibling
from drm_lightning.sources.writer import check_free_space

__all__ = ["AlphaSearchError", "AlphaSearchResult", "run_alpha_search", "scaled_tensors"]

#: Lines of the command's output shown when it fails.
OUTPUT_TAIL_LINES = 20


class AlphaSearchError(ValueError):
    """The validation command failed, or its scores file is not ``{task: finite number}``."""


@dataclass
class AlphaSearchResult:
    """Every α's scores (``{α: {task: score}}``); the α kept is the in-loop rule's."""

    scores: dict[float, dict[str, float]]
    higher_is_better: bool = True

    @property
    def averages(self) -> dict[float, float]:
        """``{α: mean of its scores}``."""
        return {a: _average(s) for a, s in self.scores.items()}

    @property
    def alpha(self) -> float:
        """The best average's α (the highest, or lowest for losses); ties: the smaller α."""
        return best_alpha(self.averages, higher=self.higher_is_better)

    def card(self) -> dict[str, Any]:
        """Every α's scores and average as the model card records them (α as text keys)."""
        averages = self.averages
        return {repr(a): {**s, "average": averages[a]} for a, s in sorted(self.scores.items())}


def _average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_alpha_search(
    job: DiskMergeJob,
    out: Path,
    *,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    piece_elements: int | None = PIECE_ELEMENTS,
    log: Callable[[str], None] = _stderr,
) -> AlphaSearchResult:
    """Merge ``job`` once, score every α of its ``alpha_search:``, write the best to ``out``.

    Raises:
        AlphaSearchError: the command cannot be run, exits with an error, or writes no valid
            scores file; ``out`` is left as it was and the temporary folder is removed.
        OSError: not enough free space for the merge and one candidate beside ``out``.
    """
    section = job.config.alpha_search
    assert section is not None
    final = make_writer(job, out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    check_free_space(out, 2 * output_bytes(job))  # the merge and one candidate, beside OUT
    work = sibling(Path(out).absolute(), "tmp")
    try:
        work.mkdir(parents=True)
        merged_dir = work / "merged"
        run_job(
            job,
            merged_dir,
            device=device,
            progress=progress,
            max_shard_bytes=max_shard_bytes,
            piece_elements=piece_elements,
        )
        merged = open_source(merged_dir)
        scores: dict[float, dict[str, float]] = {}
        for i, alpha in enumerate(section.grid):
            scores[alpha] = _score(job, section, merged, alpha, work, max_shard_bytes)
            first = next(iter(scores))
            if set(scores[alpha]) != set(scores[first]):
                raise AlphaSearchError(
                    f"alpha_search.command scored tasks {sorted(scores[alpha])} at α={alpha!r} "
                    f"but {sorted(scores[first])} at α={first!r}; it must score the same tasks "
                    "at every α (their average is compared)"
                )
            log(
                f"drm-merge: α search {i + 1}/{len(section.grid)}: α={alpha!r}, average "
                f"{_average(scores[alpha]):.6g}"
            )
        result = AlphaSearchResult(scores, section.higher_is_better)
        final.metadata.update(
            alpha=result.alpha, alpha_search={**section.card(), "scores": result.card()}
        )
        with final:
            for name, tensor in scaled_tensors(job, merged, result.alpha):
                final.add(name, tensor)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scaled_tensors(
    job: DiskMergeJob, merged: WeightSource, alpha: float
) -> Iterator[tuple[str, Tensor]]:
    """``base + α·(merged − base)`` per tensor of the plan, in the config's compute dtype,
    written back in the merged tensor's dtype; ignored tensors are the merged (= base) ones.

    The in-loop search's arithmetic (:func:`~drm_lightning.inloop.alpha.rescaled`); the scored
    folders and ``OUT`` are both written by this function.
    """
    dtype = job.config.compute_torch_dtype
    for item in job.plan:
        value = merged.get(item.name)
        if item.route == "ignore":
            yield item.name, value
            continue
        base = job.base.get(item.name).to(dtype)
        yield item.name, rescaled(value.to(dtype) - base, alpha, base, value.dtype)


def _score(
    job: DiskMergeJob,
    section: AlphaSearchSection,
    merged: WeightSource,
    alpha: float,
    work: Path,
    max_shard_bytes: int,
) -> dict[str, float]:
    """Write the model at ``alpha``, run the command on it, return its scores."""
    folder, scores = work / f"alpha-{alpha!r}", work / f"scores-{alpha!r}.json"
    writer = make_writer(job, folder, max_shard_bytes=max_shard_bytes, extra={"alpha": alpha})
    with writer:
        for name, tensor in scaled_tensors(job, merged, alpha):
            writer.add(name, tensor)
    argv = section.argv(folder, scores)
    output = work / f"output-{alpha!r}.log"  # on disk, not in memory: an eval can print a lot
    try:
        with open(output, "wb") as log:
            done = subprocess.run(  # noqa: S603 - the user's command, opted in with --trust-code
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=False
            )
    except OSError as err:
        raise AlphaSearchError(
            f"alpha_search.command: cannot run {argv[0]!r} at α={alpha!r}: {err.strerror or err}"
        ) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        status = (
            f"killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"exit status {done.returncode}"
        )
        raise AlphaSearchError(
            f"alpha_search.command failed at α={alpha!r} ({status}): {' '.join(argv)}\n"
            f"its output (last {OUTPUT_TAIL_LINES} lines):\n  {_tail(output)}"
        )
    return read_scores(scores, alpha)


def _tail(path: Path) -> str:
    """The last :data:`OUTPUT_TAIL_LINES` lines of the command's output, indented."""
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 64 * 1024))
        lines = file.read().decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL_LINES:]
    return "\n  ".join(lines) if lines else "(no output)"


def read_scores(path: Path, alpha: float) -> dict[str, float]:
    """The scores file the command wrote: a JSON object ``{task: finite number}``, as data.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> _ = f.write_text('{"a": 1, "b": NaN}')
        >>> read_scores(f, 0.5)
        Traceback (most recent call last):
        ...
        drm_lightning.cli.alpha_job.AlphaSearchError: the scores file of α=0.5 (.../s.json),
        written by alpha_search.command: task 'b': the score must be a finite number, got nan
    """
    what = f"the scores file of α={alpha!r} ({path}), written by alpha_search.command"
    if not path.exists():
        raise AlphaSearchError(
            f"alpha_search.command exited with status 0 at α={alpha!r} but wrote no scores "
            f"file: it must write a JSON object {{task: score}} to the path it is given as "
            f"{{scores}} ({path})"
        )
    try:
        data = json.loads(read_regular(path)[0])
    except (ValueError, OSError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise AlphaSearchError(f"{what}: is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        got = "an empty object" if data == {} else f"a JSON {type(data).__name__}"
        raise AlphaSearchError(
            f"{what}: must be a JSON object {{task: score}} with at least one task, got {got}"
        )
    for task, value in data.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise AlphaSearchError(
                f"{what}: task {task!r}: the score must be a finite number, got {value!r}"
            )
    return {str(task): float(value) for task, value in data.items()}
