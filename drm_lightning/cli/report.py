"""What ``drm-merge`` reports before and after a merge: the dry-run plan and the model card.

:func:`describe_plan` prints the routes, the per-rank schedule under ``torchrun``, the
estimated peak memory (:func:`estimate_peak_bytes`, asking the method for its workspace)
and the output size; :func:`model_card` is the metadata the writer puts in the card;
:func:`describe_result` is the summary after a merge (:func:`describe_alpha_search`: the
table of an α search). No weight is read.

Example:
    >>> _human(3 * 1024**3)
    '3.0 GiB'
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drm_lightning.config.mergekit import MergekitConfig, PerTensorParameters
from drm_lightning.distributed import streaming
from drm_lightning.merge.plan import PlannedTensor
from drm_lightning.methods import Route, get_method, method_parameters

if TYPE_CHECKING:
    from drm_lightning.cli.alpha_job import AlphaSearchResult
    from drm_lightning.cli.job import DiskMergeJob


def model_card(job: DiskMergeJob) -> dict[str, Any]:
    """Metadata for the writer's model card: method, all parameters, inputs with coefficients.

    The writer lists every file of the base and branch sources with its SHA-256. A
    mergekit-format config adds ``base_model`` and its text, written as ``mergekit_config.yml``
    (:meth:`~drm_lightning.config.mergekit.MergekitConfig.card`).
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
        **({"align": job.align.card()} if job.align is not None else {}),
        **(cfg.card() if isinstance(cfg, MergekitConfig) else {}),
    }


def _route_counts(plan: Sequence[PlannedTensor]) -> dict[str, int]:
    counts = {"matrix": 0, "fallback": 0, "ignore": 0}
    for item in plan:
        counts[item.route] += 1
    return counts


def estimate_peak_bytes(job: DiskMergeJob) -> tuple[int, str]:
    """Rough peak memory of the merge loop and the tensor that sets it.

    One tensor at a time: the base and every full branch in their stored dtype, the base and
    N deltas in the compute dtype (twice while stacking), the method's own workspace
    (:meth:`~drm_lightning.methods.base.MergeMethod.workspace_elements`), and the output.
    The Python/torch runtime (~0.3 GB) is not included.
    """
    n = len(job.branches)
    n_full = sum(not callable(getattr(b, "lowrank", None)) for b in job.branches)
    c = (job.config.compute_torch_dtype).itemsize
    best, best_name = 0, ""
    for item in job.plan:
        if item.route == "ignore":
            size = 2 * item.numel * (item.dtype).itemsize
        else:
            size = item.numel * ((1 + n_full) * (item.dtype).itemsize + (2 * n + 2) * c)
            size += job.method.workspace_elements(item.route, item.shape, n) * c
        if size > best:
            best, best_name = size, item.name
    return best, best_name


def output_bytes(job: DiskMergeJob) -> int:
    """Size of the merged weights on disk, from the plan."""
    out_dtype = job.config.out_torch_dtype
    return sum(item.numel * (out_dtype or item.dtype).itemsize for item in job.plan)


def describe_plan(
    job: DiskMergeJob, out: Path, *, world_size: int = 1, max_pending: int | None = None
) -> str:
    """The ``--dry-run`` report: inputs, tensors per route, estimated cost and peak memory.

    With ``world_size`` > 1, the rank-parallel plan of a ``torchrun`` launch: per rank the
    tensors it merges, their cost, the bytes it reads and sends to (or rank 0 receives),
    and the schedule's rounds and rank 0's write buffer.
    """
    cfg = job.config
    lines = [
        f"drm-merge plan (dry run: no weight was read) -> {out}",
        f"method: {cfg.method}; {job.method.paper}",
        *parameters_in_force(job),
        f"base: {_describe(job.base)}",
    ]
    for i, (branch, coefficient) in enumerate(zip(job.branches, job.coefficients, strict=True)):
        lines.append(f"branch {i}: coefficient {coefficient:g}, {_describe(branch)}")
    lines.append(
        f"compute dtype: {cfg.compute_dtype}; output dtype: {cfg.out_dtype or 'as the base'}"
    )
    if isinstance(cfg, MergekitConfig) and (note := cfg.dtype_note({i.dtype for i in job.plan})):
        lines.append(note)
    if job.align is not None:
        lines += job.align.prepared.describe("align ")
    lines.append("")
    lines.append(f"{'route':<10}{'tensors':>9}{'parameters':>14}{'est. GFLOP':>13}")
    total_cost = 0.0
    per_route: dict[Route, list[PlannedTensor]] = {"matrix": [], "fallback": [], "ignore": []}
    for item in job.plan:
        per_route[item.route].append(item)
    for route, items in per_route.items():
        cost = sum((_cost(job, item) for item in items), 0.0)
        total_cost += cost
        numel = sum(item.numel for item in items)
        lines.append(f"{route:<10}{len(items):>9}{numel:>14,}{cost / 1e9:>13.3f}")
    total_numel = sum(i.numel for i in job.plan)
    lines.append(f"{'total':<10}{len(job.plan):>9}{total_numel:>14,}{total_cost / 1e9:>13.3f}")
    fused = [item for item in per_route["matrix"] if item.row_blocks > 1]
    if fused:
        names = ", ".join(item.name for item in fused[:3]) + (", ..." if len(fused) > 3 else "")
        lines.append(
            f"fused QKV (routing.fused_qkv): {len(fused)} matrix tensor(s) merged as "
            f"{fused[0].row_blocks} row blocks each (Q, K, V on their own): {names}"
        )
    costly = sorted(per_route["matrix"], key=lambda i: -_cost(job, i))[:5]
    if costly:
        lines.append("")
        lines.append("most expensive decompositions:")
        for item in costly:
            blocks = f" as {item.row_blocks} row blocks" if item.row_blocks > 1 else ""
            lines.append(
                f"  {item.name} {list(item.shape)}{blocks}: {_cost(job, item) / 1e9:.3f} GFLOP"
            )
    lines.append("")
    if world_size == 1:
        lines.append(streaming.distributed_plan(job, 1).summary())
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
    lines += _describe_alpha_plan(job, out_bytes)
    return "\n".join(lines)


def _describe_alpha_plan(job: DiskMergeJob, out_bytes: int) -> list[str]:
    """The ``alpha_search:`` lines of the plan (none without one)."""
    section = getattr(job.config, "alpha_search", None)
    if section is None:
        return []
    better = "highest" if section.higher_is_better else "lowest"
    return [
        "",
        *textwrap.wrap(
            f"α search (alpha_search): {len(section.grid)} values of α: "
            + ", ".join(f"{a:g}" for a in section.grid)
            + f"; merged once, then for each α base + α·(merged − base) is written to a "
            "temporary folder beside OUT and scored by the validation command; the "
            f"{better} average score is kept (ties: the smaller α) and written to OUT",
            100,
            subsequent_indent="  ",
        ),
        f"  command (not run: a dry run runs nothing): {section.card()['command']}",
        f"  disk beside OUT while searching: {_human(2 * out_bytes)} (the merge and one candidate)",
    ]


def _describe_ranks(job: DiskMergeJob, world: int, max_pending: int | None) -> list[str]:
    """Per-rank table of the torchrun plan (cost, reads, traffic to rank 0, chunks)."""
    stream = streaming.stream_schedule(job, world, max_pending)
    n_full = sum(not callable(getattr(b, "lowrank", None)) for b in job.branches)
    out_dtype = job.config.out_torch_dtype
    items = [0] * world
    read = [0] * world
    sent = [0] * world
    for item, owner in zip(job.plan, stream.owners):
        size = item.numel * (item.dtype).itemsize
        if owner == -1:
            read[0] += size
            continue
        items[owner] += 1
        read[owner] += size * (1 + n_full)
        if owner != 0:
            sent[owner] += item.numel * (out_dtype or item.dtype).itemsize
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


def parameters_in_force(job: DiskMergeJob) -> list[str]:
    """The method's parameters with the values the merge uses, defaults resolved, wrapped
    at 100 characters: ``parameters: density=0.2 (default), scaling=1.0, ...``.

    A value is marked ``(default)`` when the config left it unset and it is the method's
    default (a mergekit-format file sets mergekit's own defaults, e.g. ``density=1.0``).
    """
    cfg, method = job.config, job.method
    given = dict(cfg.parameters)
    values = method.params.model_dump(mode="json")
    resolved = get_method(cfg.method).params.model_dump(mode="json")  # None defaults resolved
    defaults = {key: resolved[key] for key in method_parameters(cfg.method)}
    densities = getattr(method, "densities", None)  # PerBranchDensity: one per branch
    parts = []
    for key, default in defaults.items():
        if key == "density" and densities is not None:
            parts.append(f"density=per branch {densities}")
            continue
        if isinstance(method, PerTensorParameters) and key in method.varying:
            parts.append(f"{key}={method.describe(key)}")  # a mergekit gradient or filters
            continue
        value = values.get(key, default)
        mark = " (default)" if key not in given and value == default else ""
        parts.append(f"{key}={value}{mark}")
    text = "parameters: " + (", ".join(parts) or "none")
    return textwrap.wrap(text, 100, subsequent_indent="  ", break_on_hyphens=False)


def _cost(job: DiskMergeJob, item: PlannedTensor) -> float:
    """The method's cost of ``item``; a fused-QKV matrix costs its row blocks merged apart."""
    n, blocks = len(job.branches), item.row_blocks
    if blocks > 1:
        shape = (item.shape[0] // blocks, *item.shape[1:])
        return blocks * job.method.cost(item.route, shape, n)
    return job.method.cost(item.route, item.shape, n)


def describe_result(job: DiskMergeJob | None, out: Path, seconds: float) -> list[str]:
    """The summary printed after ``drm-merge: wrote OUT``: method, branches, tensors per
    route (from the ``job``'s plan; ``None`` for the alignment methods), time, where the
    model card is."""
    lines = []
    if job is not None:
        counts = _route_counts(job.plan)
        fused = sum(item.row_blocks > 1 for item in job.plan)
        matrix = f"{counts['matrix']} matrix" + (f" ({fused} fused QKV)" if fused else "")
        lines += [
            f"  method: {job.config.method}, {len(job.branches)} branches",
            f"  tensors: {matrix}, {counts['fallback']} fallback, "
            f"{counts['ignore']} ignored (kept from the base)",
        ]
    return lines + [f"  time: {seconds:.1f} s", f"  model card: {out / 'README.md'}"]


def describe_alpha_search(result: AlphaSearchResult, max_tasks: int = 6) -> list[str]:
    """The table printed after an α search: every α's average and task scores (at most
    ``max_tasks`` tasks shown), the kept α marked ``*``."""
    tasks = list(next(iter(result.scores.values())))
    shown = tasks[:max_tasks]
    width = max([11, *(len(t) for t in shown)])
    better = "highest" if result.higher_is_better else "lowest"
    more = f"; {len(tasks) - len(shown)} more task(s) in the model card" if tasks != shown else ""
    lines = [
        f"  α search: α = {result.alpha:g} kept ({better} average of {len(result.scores)}; "
        f"ties: the smaller α){more}",
        f"    {'α':>6}  {'average':>{width}}" + "".join(f"  {t:>{width}}" for t in shown),
    ]
    averages = result.averages
    for alpha, scores in sorted(result.scores.items()):
        mark = "*" if alpha == result.alpha else " "
        lines.append(
            f"  {mark} {alpha:>6g}  {averages[alpha]:>{width}.5g}"
            + "".join(f"  {scores[t]:>{width}.5g}" for t in shown)
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
