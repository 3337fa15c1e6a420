r"""Measured CPU scaling of the distributed merge: 2 ranks × 1 thread against 1 rank × 1 thread.

The same DRM merge (a Llama-shaped stack of matrices and norms, N = 4 branches, float32)
runs once in one process with the single-process engine and once on 2 ranks (gloo,
``torch.multiprocessing.spawn``, one thread each) with the chosen engine:

* ``replica`` — DDP-style replicas: each rank merges its share, owners broadcast;
* ``zero3``  — raw ``deepspeed.initialize`` ZeRO-3 on the CPU accelerator, sharded route on.

Reports the wall time of the merge call (slowest rank), the speed-up, and the share of the
2-rank time spent inside collectives (which includes waiting for the other rank). Writes
``benchmarks/results/scaling_<engine>.json``.

It also measures the machine's own ceiling for this work: the whole single-process merge run
in 2 independent processes at the same time (no process group, nothing shared). If the two
CPUs were independent, each copy would take as long as one alone and the ceiling would be
2.0×; ``ceiling = 2 · t(alone) / t(two copies at once)``. ``speed-up / ceiling`` is then the
engine's own efficiency, with the machine's limits (SMT siblings, shared memory bandwidth,
other jobs) factored out.

    python benchmarks/distributed_scaling.py --engine replica \
        [--layers 4 --hidden 512 --mlp 1408 --repeats 2]
"""

from __future__ import annotations

import os

# One thread everywhere, set before torch/scipy load their BLAS: scipy's LAPACK (DRM's partial
# eigensolver) would otherwise use every core in the one-rank run and collapse under contention.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
N_BRANCHES = 4


class Layer(nn.Module):
    """A Llama-like block's weights (no forward needed for the merge)."""

    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden // 4, bias=False)
        self.v_proj = nn.Linear(hidden, hidden // 4, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, mlp, bias=False)
        self.up_proj = nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)
        self.input_layernorm = nn.LayerNorm(hidden, bias=False)


class Stack(nn.Module):
    """``layers`` blocks; the branch copies hold base + low-rank + noise deltas."""

    def __init__(self, layers: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(hidden, mlp) for _ in range(layers))


def make_weights(
    layers: int, hidden: int, mlp: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Deterministic base and branch state dicts (identical in every process)."""
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Stack(layers, hidden, mlp).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    branches = []
    for _ in range(N_BRANCHES):
        sd = {}
        for name, w in base.items():
            delta = 1e-3 * torch.randn(w.shape, generator=gen)
            if w.dim() == 2:
                n, m = w.shape
                delta += (
                    0.02
                    * torch.randn(n, 16, generator=gen)
                    @ torch.randn(16, m, generator=gen)
                    / 16
                )
            sd[name] = w + delta
        branches.append(sd)
    return base, branches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from drm_lightning.distributed import DistributedMerger, ParamSet, ShardSnapshot
    from drm_lightning.methods import get_method

    method = get_method("drm", drop_rate=0.8, direction=args.direction)
    base, branches = make_weights(args.layers, args.hidden, args.mlp)
    records: list[dict[str, Any]] = []
    if args.engine == "zero3":
        import importlib

        import deepspeed

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        holder = nn.Module()
        holder.base = Stack(args.layers, args.hidden, args.mlp)
        holder.branches = nn.ModuleList(
            Stack(args.layers, args.hidden, args.mlp) for _ in range(N_BRANCHES)
        )
        holder.base.load_state_dict(base)
        for b, sd in zip(holder.branches, branches):
            b.load_state_dict(sd)
        holder.requires_grad_(False)
        holder.head = nn.Linear(2, 2)  # the only trainable parameter: the optimizer needs one
        cfg = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(
            model=holder, optimizer=torch.optim.AdamW(holder.head.parameters()), config=cfg
        )
        target = ParamSet.from_module(engine.module.base)
        theta0 = ShardSnapshot.capture(target)
        branch_sets = [ParamSet.from_module(b) for b in engine.module.branches]
        for _ in range(args.repeats):
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            result = DistributedMerger(method).merge(target, theta0, branch_sets)
            records.append(
                {
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": time.process_time() - cpu,
                    **vars(result.stats),
                    "sharded": len(result.plan.sharded()),
                }
            )
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        target_module = Stack(args.layers, args.hidden, args.mlp)
        for _ in range(args.repeats):
            target_module.load_state_dict(base)
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            result = DistributedMerger(method, engine="replica").merge(
                target_module, base, branches
            )
            records.append(
                {
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": time.process_time() - cpu,
                    **vars(result.stats),
                    "sharded": 0,
                }
            )
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def single(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """The same merge with the single-process engine, 1 thread."""
    from drm_lightning.distributed import DistributedMerger
    from drm_lightning.methods import get_method

    torch.set_num_threads(1)
    base, branches = make_weights(args.layers, args.hidden, args.mlp)
    target = Stack(args.layers, args.hidden, args.mlp)
    times, cpus = [], []
    for _ in range(args.repeats):
        target.load_state_dict(base)
        start, cpu = time.perf_counter(), time.process_time()
        method = get_method("drm", drop_rate=0.8, direction=args.direction)
        DistributedMerger(method, engine="single").merge(target, base, branches)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return times, cpus


def _single_copy(index: int, args: argparse.Namespace, out: str) -> None:
    """One independent copy of the single-process merge (for the machine ceiling)."""
    times, cpus = single(args)
    Path(out, f"copy{index}.json").write_text(json.dumps({"seconds": times, "cpu_seconds": cpus}))


def machine_ceiling(args: argparse.Namespace, alone: float) -> dict[str, Any]:
    """2 · t(alone) / t(2 copies at once): the best 2-process speed-up this machine allows here."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_single_copy, args=(args, out), nprocs=2, join=True)
        copies = [json.loads(Path(out, f"copy{i}.json").read_text()) for i in range(2)]
    together = max(min(c["seconds"]) for c in copies)
    return {
        "alone_seconds": alone,
        "two_copies_seconds": together,
        "ceiling": 2 * alone / together,
        "two_copies_cpu_seconds": [min(c["cpu_seconds"]) for c in copies],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=["replica", "zero3"], default="replica")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1408)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--direction",
        choices=["horizontal", "vertical"],
        default="horizontal",
        help="DRM direction (vertical: ZeRO-3 merges matrices on the sharded route)",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the machine-ceiling run")
    args = parser.parse_args()
    import tempfile

    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    t1, c1 = single(args)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    # Per repeat: the slowest rank's wall time; best repeat reported.
    per_repeat = [max(r[i]["seconds"] for r in ranks) for i in range(args.repeats)]
    best = min(range(args.repeats), key=lambda i: per_repeat[i])
    t2 = per_repeat[best]
    comm = max(r[best]["comm_seconds"] for r in ranks)
    # CPU time: what each process computed, independent of how many cores other jobs left us.
    cpu2 = [min(r[i]["cpu_seconds"] for i in range(args.repeats)) for r in ranks]
    row = {
        "engine": args.engine,
        "direction": args.direction,
        "layers": args.layers,
        "hidden": args.hidden,
        "mlp": args.mlp,
        "branches": N_BRANCHES,
        "one_rank_seconds": min(t1),
        "two_rank_seconds": t2,
        "speedup": min(t1) / t2,
        "comm_seconds_max_rank": comm,
        "comm_share": comm / t2,
        "one_rank_cpu_seconds": min(c1),
        "two_rank_cpu_seconds_per_rank": cpu2,
        "cpu_speedup": min(c1) / max(cpu2),
        "owner_items_per_rank": [r[best]["owner_items"] for r in ranks],
        "sharded_items": ranks[0][best]["sharded"],
        "bytes_sent_per_rank": [r[best]["bytes_sent"] for r in ranks],
        "bytes_received_per_rank": [r[best]["bytes_received"] for r in ranks],
        "all_one_rank_seconds": t1,
        "all_two_rank_seconds": per_repeat,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "threads_per_rank": 1,
    }
    if not args.no_ceiling:
        row["machine"] = machine_ceiling(args, min(t1))
        row["efficiency"] = row["speedup"] / row["machine"]["ceiling"]
    print(
        f"{'engine':<8} {'1 rank s':>9} {'2 ranks s':>10} {'speed-up':>8} "
        f"{'CPU speed-up':>12} {'comm share':>10} "
        f"{'owner items':>12} {'sharded':>7} {'MiB sent/rank':>14}"
    )
    print(
        f"{args.engine:<8} {row['one_rank_seconds']:>9.2f} {t2:>10.2f} {row['speedup']:>8.2f} "
        f"{row['cpu_speedup']:>12.2f} "
        f"{row['comm_share']:>10.1%} "
        f"{str(row['owner_items_per_rank']):>12} {row['sharded_items']:>7} "
        f"{max(row['bytes_sent_per_rank']) / 2**20:>14.1f}"
    )
    if "machine" in row:
        m = row["machine"]
        print(
            f"machine ceiling: one copy alone {m['alone_seconds']:.2f} s, two copies at once "
            f"{m['two_copies_seconds']:.2f} s -> ceiling {m['ceiling']:.2f}x; engine efficiency "
            f"{row['efficiency']:.0%} (speed-up / ceiling)"
        )
    print(f"load average {row['load_average']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.direction == "horizontal" else f"_{args.direction}"
    path = RESULTS / f"scaling_{args.engine}{suffix}.json"
    path.write_text(json.dumps(row, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
