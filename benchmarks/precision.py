"""Precision of float32 DRM against the same merge in float64, route by route.

For every shape and spectrum, N branch deltas ``Δ_i = U_i diag(σ) V_iᵀ`` (random orthogonal
factors, σ geometric from 1 down to ``floor``) are drawn in float64 and rounded to float32;
the float64 merge of those float32 values (SVD route, float64 throughout) is the reference.
Each float32 route merges the same float32 inputs:

- ``gram/float64 basis`` — the default: Gram formed and decomposed in float64, projections
  and merge in float32;
- ``refined/float64 basis`` — the same Gram, decomposed by a float32 ``eigh`` refined in
  float64 (``solver: refined``; it falls back to the float64 ``eigh`` on dense spectra);
- ``svd/float32`` — float32 SVD, as the DRM reference library computes it;
- ``gram/float32`` — the Gram route entirely in float32 (the default before issue 8).

The table gives ``||M32 − M64||_F / ||M64||_F`` of the merged delta and each route's time.

    python benchmarks/precision.py                 # 512×1408 … 1024×2816, V and H, 3 floors
    python benchmarks/precision.py --large         # adds Llama-8B-sized 14336×4096 / 4096×14336
    python benchmarks/precision.py --smoke         # tiny shapes, seconds

Writes ``benchmarks/results/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from drm_lightning.methods.drm import drm_merge

ROUTES = {
    "gram/float64 basis": dict(solver="gram", basis_precision="float64"),
    "refined/float64 basis": dict(solver="refined", basis_precision="float64"),
    "svd/float32": dict(solver="svd", basis_precision="compute"),
    "gram/float32": dict(solver="gram", basis_precision="compute"),
}


def decaying_deltas(n_branches: int, n: int, m: int, floor: float, seed: int) -> torch.Tensor:
    """(N, n, m) float64 deltas with singular values geometric from 1 to ``floor``."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    sigma = torch.logspace(0, torch.log10(torch.tensor(floor)).item(), k, dtype=torch.float64)
    out = torch.empty(n_branches, n, m, dtype=torch.float64)
    for i in range(n_branches):
        u = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
        out[i] = (u * sigma) @ v.mT
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def timed(fn):  # noqa: ANN001, ANN201 - tiny local helper
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(
    shape: tuple[int, int],
    floor: float,
    direction: str,
    *,
    n_branches: int,
    drop_rate: float,
    seed: int,
    reference_solver: str,
) -> dict:
    n, m = shape
    deltas32 = decaying_deltas(n_branches, n, m, floor, seed).float()
    coefficients = torch.ones(n_branches)
    reference, ref_s = timed(
        lambda: drm_merge(
            deltas32.double(),
            coefficients.double(),
            drop_rate=drop_rate,
            direction=direction,
            solver=reference_solver,
        )
    )
    row = {
        "shape": f"{n}x{m}",
        "floor": floor,
        "direction": direction,
        "n_branches": n_branches,
        "drop_rate": drop_rate,
        "float64_s": ref_s,
        "float64_solver": reference_solver,
        "routes": {},
    }
    for name, kw in ROUTES.items():
        merged, seconds = timed(
            lambda kw=kw: drm_merge(
                deltas32, coefficients, drop_rate=drop_rate, direction=direction, **kw
            )
        )
        row["routes"][name] = {"rel_error": relative_error(merged, reference), "seconds": seconds}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--large", action="store_true", help="add the 8B-sized 14336x4096 / 4096x14336 pair"
    )
    parser.add_argument("--large-only", action="store_true", help="only the 8B-sized pair")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a test runs this)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "precision.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        cases = [((48, 96), f) for f in (1e-2, 1e-4)]
    else:
        cases = [
            (s, f)
            for s in ((512, 1408), (1408, 512), (1024, 2816), (2816, 1024))
            for f in (1e-2, 1e-3, 1e-4)
        ]
    rows = []
    header = (
        f"{'shape':>11} {'σ floor':>8} {'dir':>3} | "
        + " | ".join(f"{r:>22}" for r in ROUTES)
        + " | float64"
    )
    print(header)
    print("-" * len(header))
    jobs = (
        []
        if args.large_only
        else [(s, f, d, "svd") for s, f in cases for d in ("vertical", "horizontal")]
    )
    if args.large or args.large_only:
        # Llama-8B gate_proj (14336×4096) in DRM-V and down_proj (4096×14336) in DRM-H: the
        # 4096×4096 Gram. (The other direction needs a 12288×12288 eigh per route: ~20 min on
        # 2 cores in float64 — measure it on a GPU.) Reference: float64 Gram route.
        jobs += [
            ((14336, 4096), 1e-3, "vertical", "gram"),
            ((4096, 14336), 1e-3, "horizontal", "gram"),
        ]
    for seed, (shape, floor, direction, ref_solver) in enumerate(jobs):
        row = measure(
            shape,
            floor,
            direction,
            n_branches=3,
            drop_rate=0.8,
            seed=seed,
            reference_solver=ref_solver,
        )
        rows.append(row)
        cells = " | ".join(
            f"{r['rel_error']:9.2e} {r['seconds']:8.2f} s" for r in row["routes"].values()
        )
        print(
            f"{row['shape']:>11} {floor:8.0e} {direction[0].upper():>3} | {cells} | "
            f"{row['float64_s']:6.2f} s",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
