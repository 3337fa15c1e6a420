"""Multitask merging demo: fine-tune K task branches in one ``Trainer.fit`` and merge them.

Pretrains a small residual MLP on scikit-learn's digits, fine-tunes one branch per task
(rotated, mirrored, inverted, permuted digits; parity; digit mod 3) plus a joint multitask
model in one ``Trainer.fit``, and lets one ``MergeCallback`` per method (linear average,
task arithmetic, TIES, DARE, DRM-V, DRM-H, DRM without renormalisation, TSV-M, Iso-C, Iso-CTS,
breadcrumbs, DELLA, model stock) merge the live branches periodically and score the merge on
every task. Prints the table and writes
``results.json``, ``results.csv``, ``per_seed.csv`` and ``results.png`` to ``--out``.

    python examples/multitask_demo.py [--large] [--seeds 3] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import dataclasses

from drm_lightning.demo import DemoConfig, format_table, format_targets, run_demo, run_to_dict


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run the suite, print the table and the quality targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--large", action="store_true", help="8 tasks, wider/deeper backbone, longer fit, 5 seeds"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default 3, or 5 with --large)"
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and BLAS threads (default 1)"
    )
    parser.add_argument(
        "--consolidate",
        nargs="*",
        default=None,
        metavar="METHOD",
        help="methods (e.g. drm_h ties) that also get a periodic-consolidation fit (adopt=True)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    config = DemoConfig.large() if args.large else DemoConfig()
    if args.seeds is not None:
        config = config.with_seeds(args.seeds)
    if args.threads is not None:
        config = dataclasses.replace(config, threads=args.threads)
    if args.consolidate is not None:
        config = dataclasses.replace(config, consolidate=tuple(args.consolidate))
    run = run_demo(config, progress=not args.no_progress, out_dir=args.out)
    data = run_to_dict(run)
    print(format_table(data))
    print(format_targets(data))
    print(f"wall time {run.wall_seconds:.0f} s ({len(run.seeds)} seeds, {len(run.tasks)} tasks)")


if __name__ == "__main__":
    main()
