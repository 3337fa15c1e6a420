#!/usr/bin/env python
"""Llama-3.1-8B-shaped merge on one GPU (or two): DRM-H, DRM-V and TIES, in memory.

What it measures: every tensor of a Llama-3.1-8B-shaped model (hidden 4096, MLP 14336,
32 layers, GQA k/v 1024×4096, vocab 128256, untied embeddings; 8.03 B parameters) is
synthesised on the device — a bf16 base ``W`` and N = 4 bf16 branches ``W + Δ_i``, each Δ_i a
rank-16 update of 1e-2·‖W‖ plus Gaussian noise of 1e-3·‖W‖, as in ``merge_core.py``;
nothing is downloaded — and merged by the package's per-tensor entry point
(``drm_lightning.merge.merge_tensor``: finiteness checks, float32 maths, bf16 result),
one tensor at a time, as the streaming engines do. Only the merge is timed (synchronised),
not the synthesis. Reported per matrix class (q, k, v, o, gate, up, down, embed, lm_head,
norms) and in total: seconds, matrices timed, the package's FLOP estimate
(``method.cost``) and the rate it implies, and the peak device memory (inputs of the
largest tensor included). A class whose timed matrices pass ``--class-budget-s`` stops
early and the rest of it is extrapolated from its mean (every layer has the same shapes);
the JSON says which classes were.

Under ``torchrun --nproc_per_node=2`` each rank merges its share of the tensors
(``distributed.plan.assign_longest_first`` on ``method.cost``) and the wall time is the
slowest rank's. Without torchrun, on a machine with 2+ GPUs, the script runs the 2-rank
case itself after the 1-rank one (``--ranks 1,2``, the default), so one command gives both::

    python benchmarks/gpu_8b.py                 # the GPU numbers: 1 rank, then 2 if 2 GPUs
    python benchmarks/gpu_8b.py --smoke         # same code, tiny shapes, CPU, a few seconds

Results: ``benchmarks/results/gpu_8b.json`` (``--json``) and a markdown table beside it
(``.md``) and on stdout. Goals (issue 13, one H100/H200): DRM over the whole model ≤ 30 s,
TIES ≤ 5 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json), and a tiny model of the same structure.
SHAPES: dict[str, dict[str, int]] = {
    "8b": {"hidden": 4096, "mlp": 14336, "layers": 32, "kv": 1024, "vocab": 128256},
    "smoke": {"hidden": 64, "mlp": 224, "layers": 2, "kv": 16, "vocab": 512},
}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "drm_h": ("drm", {"direction": "horizontal", "drop_rate": 0.8}),
    "drm_v": ("drm", {"direction": "vertical", "drop_rate": 0.8}),
    "ties": ("ties", {"density": 0.2}),
}
GOALS_S = {"drm_h": 30.0, "drm_v": 30.0, "ties": 5.0}
N_BRANCHES = 4


@dataclass(frozen=True)
class Tensor8B:
    name: str
    shape: tuple[int, ...]
    cls: str  # matrix class, for the per-class table


def model_tensors(s: dict[str, int]) -> list[Tensor8B]:
    """Every tensor of a Llama model with the given sizes, in state-dict order."""
    h, mlp, kv = s["hidden"], s["mlp"], s["kv"]
    out = [Tensor8B("model.embed_tokens.weight", (s["vocab"], h), "embed")]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            Tensor8B(p + "self_attn.q_proj.weight", (h, h), "q_proj"),
            Tensor8B(p + "self_attn.k_proj.weight", (kv, h), "k_proj"),
            Tensor8B(p + "self_attn.v_proj.weight", (kv, h), "v_proj"),
            Tensor8B(p + "self_attn.o_proj.weight", (h, h), "o_proj"),
            Tensor8B(p + "mlp.gate_proj.weight", (mlp, h), "gate_proj"),
            Tensor8B(p + "mlp.up_proj.weight", (mlp, h), "up_proj"),
            Tensor8B(p + "mlp.down_proj.weight", (h, mlp), "down_proj"),
            Tensor8B(p + "input_layernorm.weight", (h,), "norm"),
            Tensor8B(p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    out += [
        Tensor8B("model.norm.weight", (h,), "norm"),
        Tensor8B("lm_head.weight", (s["vocab"], h), "lm_head"),
    ]
    return out


def synthesise(t: Tensor8B, index: int, device: Any) -> tuple[Any, list[Any]]:
    """bf16 base and N bf16 branches of one tensor, made on ``device`` from fixed seeds."""
    import torch

    gen = torch.Generator(device=device).manual_seed(common._seed("gpu_8b", t.name))
    if len(t.shape) == 1:
        base = 1.0 + 0.05 * torch.randn(t.shape, generator=gen, device=device)
    else:
        base = 0.02 * torch.randn(t.shape, generator=gen, device=device)
    w_norm = float(base.norm())
    branches = []
    for b in range(N_BRANCHES):
        gen.manual_seed(common._seed("gpu_8b", t.name, b, index))
        if len(t.shape) == 2:
            n, m = t.shape
            low = torch.randn(n, common.DELTA_RANK, generator=gen, device=device) @ torch.randn(
                common.DELTA_RANK, m, generator=gen, device=device
            )
            delta = low.mul_(common.DELTA_SCALE * w_norm / float(low.norm()))
            noise = torch.randn(t.shape, generator=gen, device=device)
            delta.add_(noise, alpha=common.NOISE_SCALE * w_norm / float(noise.norm()))
            del low, noise
        else:
            delta = torch.randn(t.shape, generator=gen, device=device)
            delta.mul_(common.DELTA_SCALE * w_norm / float(delta.norm()))
        branches.append((base + delta).to(torch.bfloat16))
        del delta
    return base.to(torch.bfloat16), branches


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_device_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return common.peak_rss_bytes()


def run_method(
    key: str, tensors: list[Tensor8B], device: Any, class_budget_s: float
) -> dict[str, Any]:
    """Merge this rank's ``tensors`` with one method; per-class seconds, FLOPs, peak memory."""
    import torch

    from drm_lightning.merge.routing import Routing
    from drm_lightning.merge.tensor import merge_tensor
    from drm_lightning.methods import get_method

    method_name, params = METHODS[key]
    method = get_method(method_name, **params)
    routing = Routing()
    coefficients = [1.0 / N_BRANCHES] * N_BRANCHES if method_name == "drm" else [1.0] * N_BRANCHES
    # Warm-up on a small matrix: kernels, cuBLAS/cuSOLVER handles, the allocator.
    warm = Tensor8B("warmup.weight", (64, 48), "warmup")
    base, branches = synthesise(warm, 0, device)
    merge_tensor(method, "matrix", base, branches, coefficients, out_dtype=torch.bfloat16)
    _sync(device)
    del base, branches
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    classes: dict[str, dict[str, Any]] = {}
    ratio_num = ratio_den = 0.0
    for index, t in enumerate(tensors):
        row = classes.setdefault(
            t.cls,
            {
                "count": 0,
                "timed": 0,
                "seconds": 0.0,
                "gflop": 0.0,
                "shape": list(t.shape),
                "route": routing.route(t.name, t.shape),
            },
        )
        row["count"] += 1
        row["gflop"] += method.cost(row["route"], t.shape, N_BRANCHES) / 1e9
        if row["timed"] and row["seconds"] >= class_budget_s:
            continue  # extrapolated from the matrices already timed
        base, branches = synthesise(t, index, device)
        _sync(device)
        t0 = time.perf_counter()
        merged = merge_tensor(
            method,
            row["route"],
            base,
            branches,
            coefficients,
            out_dtype=torch.bfloat16,
            name=t.name,
        )
        _sync(device)
        row["seconds"] += time.perf_counter() - t0
        row["timed"] += 1
        # How big the merged delta is next to the plain mean of the deltas (a sanity figure).
        mean = torch.stack([b.float() - base.float() for b in branches]).mean(0)
        ratio_num += float((merged.float() - base.float()).norm()) ** 2
        ratio_den += float(mean.norm()) ** 2
        del base, branches, merged, mean
    total = {"seconds": 0.0, "gflop": 0.0, "count": 0, "timed": 0}
    for row in classes.values():
        row["extrapolated"] = row["timed"] < row["count"]
        row["seconds_per_matrix"] = row["seconds"] / max(row["timed"], 1)
        row["seconds"] = row["seconds_per_matrix"] * row["count"]
        row["tflop_per_s"] = row["gflop"] / 1e3 / row["seconds"] if row["seconds"] else None
        for k in total:
            total[k] += row[k]
    return {
        "method": method_name,
        "params": params,
        "classes": classes,
        "total": total,
        "peak_device_bytes": _peak_device_bytes(device),
        "delta_norm_over_mean_delta_norm": math.sqrt(ratio_num / ratio_den) if ratio_den else None,
    }


# --------------------------------------------------------------------------- one rank / launch


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run the methods on this process's share (all of it, or one torchrun rank's)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tensors = model_tensors(SHAPES[args.shapes])
    out: dict[str, Any] = {"world_size": world, "methods": {}}
    for key in args.methods:
        mine = tensors
        if world > 1:
            from drm_lightning.distributed.plan import assign_longest_first
            from drm_lightning.merge.routing import Routing
            from drm_lightning.methods import get_method

            method = get_method(METHODS[key][0], **METHODS[key][1])
            costs = [
                method.cost(Routing().route(t.name, t.shape), t.shape, N_BRANCHES) for t in tensors
            ]
            owners = assign_longest_first(costs, world)
            mine = [t for t, r in zip(tensors, owners) if r == rank]
            dist.barrier()
        t0 = time.perf_counter()
        result = run_method(key, mine, device, args.class_budget_s)
        result["rank_wall_s"] = time.perf_counter() - t0  # synthesis included
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, result)
            result = {
                "ranks": gathered,
                "total": {"seconds": max(r["total"]["seconds"] for r in gathered)},
                "peak_device_bytes_per_rank": [r["peak_device_bytes"] for r in gathered],
            }
        out["methods"][key] = result
    if world > 1:
        dist.destroy_process_group()
    return out


def _launch(ranks: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """This script in a fresh process (1 rank) or under torchrun (2 ranks); its JSON."""
    part = tmp / f"ranks{ranks}.json"
    child_args = [
        "--child",
        str(part),
        "--shapes",
        args.shapes,
        "--device",
        args.device,
        "--methods",
        ",".join(args.methods),
        "--class-budget-s",
        str(args.class_budget_s),
        "--threads",
        str(args.threads),
    ]
    cmd = common.python_command([str(Path(__file__).resolve()), *child_args], ranks)
    env = common.limit_threads_env(args.threads)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=args.timeout_s)
    return json.loads(part.read_text())


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per matrix class and method (1 rank), totals per rank count."""
    lines = []
    one = results["runs"].get("1")
    if one:
        keys = list(one["methods"])
        classes = list(next(iter(one["methods"].values()))["classes"])
        lines += [
            "| class | shape | count | " + " | ".join(f"{k} s" for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for c in classes:
            cells = []
            for k in keys:
                row = one["methods"][k]["classes"][c]
                cells.append(f"{row['seconds']:.3f}{'*' if row['extrapolated'] else ''}")
            first = one["methods"][keys[0]]["classes"][c]
            lines.append(
                f"| {c} | {'×'.join(map(str, first['shape']))} | {first['count']} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append(
            "| **total** | | | "
            + " | ".join(f"**{one['methods'][k]['total']['seconds']:.2f}**" for k in keys)
            + " |"
        )
        lines.append(
            "| peak device memory GiB | | | "
            + " | ".join(f"{one['methods'][k]['peak_device_bytes'] / 2**30:.2f}" for k in keys)
            + " |"
        )
        lines.append(
            "| TFLOP (package estimate) | | | "
            + " | ".join(f"{one['methods'][k]['total']['gflop'] / 1e3:.1f}" for k in keys)
            + " |"
        )
        lines.append("")
        lines.append("`*` extrapolated from the matrices timed in that class (`--class-budget-s`).")
    for ranks, run in sorted(results["runs"].items()):
        if ranks == "1":
            continue
        lines.append("")
        lines.append(
            f"{ranks} ranks: "
            + ", ".join(
                f"{k} {m['total']['seconds']:.2f} s (peak/rank "
                f"{max(m['peak_device_bytes_per_rank']) / 2**30:.2f} GiB)"
                for k, m in run["methods"].items()
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU (tests the script; numbers mean nothing)",
    )
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}"
    )
    parser.add_argument(
        "--ranks", default=None, help="comma list of rank counts; default 1,2 with 2+ GPUs, else 1"
    )
    parser.add_argument(
        "--class-budget-s",
        type=float,
        default=None,
        help="stop timing a matrix class after this many seconds and extrapolate "
        "(default 20; smoke: no limit)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="per launch")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--shapes", choices=list(SHAPES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = (
        [m.strip() for m in args.methods.split(",") if m.strip()]
        if isinstance(args.methods, str)
        else args.methods
    )
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.child is not None:
        result = child(args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.child.write_text(json.dumps(result, indent=1))
        return 0

    import torch

    args.shapes = args.shapes or ("smoke" if args.smoke else "8b")
    gpus = torch.cuda.device_count()
    args.device = args.device or ("cpu" if args.smoke or not gpus else "cuda")
    if args.device == "cuda" and not gpus:
        parser.error("--device cuda: no CUDA device here; use --smoke (CPU) to test the script")
    if args.class_budget_s is None:
        args.class_budget_s = math.inf if args.smoke else 20.0
    if args.ranks is None:
        ranks = [1, 2] if args.device == "cuda" and gpus >= 2 else [1]
    else:
        ranks = [int(r) for r in args.ranks.split(",")]
    json_path = args.json or ROOT / "benchmarks" / "results" / (
        "gpu_8b_smoke.json" if args.smoke else "gpu_8b.json"
    )
    results: dict[str, Any] = {
        "shapes": args.shapes,
        "sizes": SHAPES[args.shapes],
        "n_branches": N_BRANCHES,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else common.cpu_name(),
        "gpus": gpus,
        "system": common.system_info(args.threads),
        "load_before": [round(x, 2) for x in common.load_average()],
        "goals_s": GOALS_S,
        "runs": {},
    }
    tmp = json_path.parent / f".gpu_8b-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for r in ranks:
            t0 = time.perf_counter()
            results["runs"][str(r)] = _launch(r, args, tmp)
            results["runs"][str(r)]["launch_wall_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_after"] = [round(x, 2) for x in common.load_average()]
    text = table(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    json_path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(
        f"\nload average before {results['load_before']}, after {results['load_after']}; "
        f"JSON: {json_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
