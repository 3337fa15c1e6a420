#!/usr/bin/env python
"""Projected whole-model DRM time from measured kernel rates, per matrix class (issue 22).

DRM's matrix path per matrix is: form the s×s Gram of the branch stack (float64 by default),
decompose it (``eigh``), project every branch onto the basis and reconstruct (float32 GEMMs),
then the entry-wise renorm/prune/sign/merge passes. ``s`` is the smaller side of the stack
(the same rule as ``DRM.cost``). This script

1. **measures** on the chosen device the rates those steps run at: float64 and float32 GEMM
   (GFLOP/s), float64 ``torch.linalg.eigh`` at a few sizes (seconds, extrapolated as s³ to
   other sizes from the largest one measured) and memory bandwidth (a large copy);
2. **projects** every matrix class of a model from those rates: Gram and projection FLOPs
   over the GEMM rates, the eigendecompositions from the measured ``eigh`` times, the
   entry-wise passes (about ``ELEMENTWISE_PASSES`` reads/writes of the N fp32 coordinate
   stacks) over the bandwidth;
3. prints the table (and writes JSON): per class the count, Gram size, seconds per step.

The model is checked against measurement on the 107M benchmark model: ``--model 107m`` on the
CPU gives the projection to compare with ``benchmarks/RESULTS.md`` §9's measured profile.
With ``--device cuda`` the same code measures the GPU's own rates (torch only) — the command
to run when a GPU is lent. ``--spec h100`` adds a column from the H100 SXM data sheet
(67 TFLOP/s FP64 tensor, 67 FP32, 3.35 TB/s) with ``eigh`` costed at the GEMM-equivalents the
measured device needed (an optimistic bound: GPU eigensolvers reach a smaller share of peak
than GEMMs do).

    python benchmarks/drm_projection.py --model 107m            # CPU, validates the model
    python benchmarks/drm_projection.py --model 8b --spec h100  # CPU rates + H100 bound
    python benchmarks/drm_projection.py --model 8b --device cuda --eigh-sizes 4096,14336
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
N_BRANCHES = {"107m": 3, "8b": 4}
ELEMENTWISE_PASSES = 12
"""Full passes over the N coordinate stacks in renorm, prune (2 select passes + mask), sign
election and the disjoint mean (counted from ``methods/drm.py``; reads and writes)."""
MODELS = {
    # name: (layers, {class: (rows, cols)})
    "107m": (8, {"q/k/v/o": (1024, 1024), "gate/up": (2816, 1024), "down": (1024, 2816)}),
    "8b": (
        32,
        {
            "q/o": (4096, 4096),
            "k/v": (1024, 4096),
            "gate/up": (14336, 4096),
            "down": (4096, 14336),
        },
    ),
}
PER_LAYER = {"q/k/v/o": 4, "gate/up": 2, "down": 1, "q/o": 2, "k/v": 2}
SPECS = {"h100": {"fp64_gflops": 67e3, "fp32_gflops": 67e3, "bandwidth_gbs": 3350.0}}


def _timed(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm-up (allocations, library handles)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(device: str, gemm_n: int, eigh_sizes: list[int]) -> dict[str, Any]:
    """Rates of the kernels DRM's matrix path spends its time in, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    rates: dict[str, Any] = {"device": device}
    for dtype, key in ((torch.float64, "fp64_gflops"), (torch.float32, "fp32_gflops")):
        a = torch.randn(gemm_n, gemm_n, generator=gen, device=device, dtype=dtype)
        t = _timed(lambda a=a: a @ a, device)
        rates[key] = 2 * gemm_n**3 / t / 1e9
    big = torch.empty(64 << 20, device=device)  # 256 MiB
    t = _timed(lambda: big.clone(), device)
    rates["bandwidth_gbs"] = 2 * big.numel() * 4 / t / 1e9
    rates["eigh_seconds"] = {}
    for n in eigh_sizes:
        x = torch.randn(n, 2 * n, generator=gen, device=device, dtype=torch.float64)
        gram = x @ x.mT
        rates["eigh_seconds"][n] = _timed(lambda g=gram: torch.linalg.eigh(g), device, repeats=1)
    n0 = max(eigh_sizes)
    rates["eigh_gemm_equivalents"] = rates["eigh_seconds"][n0] / (
        2 * n0**3 / (rates["fp64_gflops"] * 1e9)
    )
    return rates


def project(model: str, direction: str, rates: dict[str, Any]) -> dict[str, Any]:
    """Seconds per class and step for DRM over the model's matrices, from ``rates``."""
    layers, classes = MODELS[model]
    n_br = N_BRANCHES[model]
    n0 = max(rates["eigh_seconds"])
    t0 = rates["eigh_seconds"][n0]
    rows_out = []
    for cls, (n, m) in classes.items():
        if direction == "horizontal":
            n, m = m, n
        stack_rows = n_br * n
        s, big = min(stack_rows, m), max(stack_rows, m)
        count = layers * PER_LAYER[cls]
        gram = big * s * s / (rates["fp64_gflops"] * 1e9)  # 2·big·s² flops, one triangle of it
        eigh = t0 * (s / n0) ** 3
        project_s = 2 * 2 * stack_rows * m * s / (rates["fp32_gflops"] * 1e9)
        passes = ELEMENTWISE_PASSES * stack_rows * s * 4 / (rates["bandwidth_gbs"] * 1e9)
        steps = {"gram": gram, "eigh": eigh, "project": project_s, "elementwise": passes}
        rows_out.append(
            {
                "class": cls,
                "count": count,
                "gram_size": s,
                **{k: v * count for k, v in steps.items()},
                "total": sum(steps.values()) * count,
            }
        )
    return {"classes": rows_out, "total": sum(r["total"] for r in rows_out)}


def _table(title: str, projection: dict[str, Any]) -> str:
    out = [
        f"**{title}**",
        "",
        "| class | matrices | Gram | Gram s | eigh s | project s | entry-wise s | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in projection["classes"]:
        out.append(
            f"| {r['class']} | {r['count']} | {r['gram_size']}² | {r['gram']:.2f} | "
            f"{r['eigh']:.2f} | {r['project']:.2f} | {r['elementwise']:.2f} | {r['total']:.1f} |"
        )
    out.append(f"| **all matrices** | | | | | | | **{projection['total']:.1f}** |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="8b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--eigh-sizes", default=None, help="comma-separated Gram sizes to time")
    parser.add_argument("--gemm-n", type=int, default=None)
    parser.add_argument("--spec", choices=sorted(SPECS), default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    default_sizes = "4096,14336" if args.device == "cuda" else "1024,2048"
    sizes = [int(x) for x in (args.eigh_sizes or default_sizes).split(",")]
    gemm_n = args.gemm_n or (8192 if args.device == "cuda" else 2048)
    rates = measure(args.device, gemm_n, sizes)
    print(
        f"{args.device}: fp64 GEMM {rates['fp64_gflops']:.0f} GFLOP/s, fp32 GEMM "
        f"{rates['fp32_gflops']:.0f} GFLOP/s, copy {rates['bandwidth_gbs']:.1f} GB/s, eigh "
        + ", ".join(f"{n}²: {t:.2f} s" for n, t in rates["eigh_seconds"].items())
        + f" (= {rates['eigh_gemm_equivalents']:.1f} fp64 GEMMs of its size)"
    )
    report: dict[str, Any] = {"model": args.model, "rates": rates, "projections": {}}
    for direction in ("horizontal", "vertical"):
        proj = project(args.model, direction, rates)
        report["projections"][f"{args.device}:{direction}"] = proj
        name = "DRM-H" if direction == "horizontal" else "DRM-V"
        print(_table(f"{name}, {args.model}, rates measured on {args.device}", proj), "\n")
        if args.spec:
            spec = dict(SPECS[args.spec])
            # eigh at the GEMM-equivalents measured here, at the data sheet's FP64 rate.
            n0 = max(sizes)
            spec["eigh_seconds"] = {
                n0: rates["eigh_gemm_equivalents"] * 2 * n0**3 / (spec["fp64_gflops"] * 1e9)
            }
            proj = project(args.model, direction, spec)
            report["projections"][f"{args.spec}:{direction}"] = proj
            print(_table(f"{name}, {args.model}, {args.spec} data sheet (bound)", proj), "\n")
    path = args.json or RESULTS / f"drm_projection_{args.model}_{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
