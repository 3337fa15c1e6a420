"""Balance of the distributed merge plan for Llama-3.1-8B shapes (simulated ranks, no GPU needed).

For N = 4 branches and 2, 4, 8, 16 ranks, prints and stores
(``benchmarks/results/plan_balance.json``): the most loaded rank's cost over the mean, and per
rank the bytes communicated and the peak transient memory of one item, for three engines —
ZeRO-3 with the sharded (no-gather) route, ZeRO-3 with every item sent to an owner, and DDP
replicas. Costs are DRM's FLOP model (:meth:`DRM.cost`); bytes and memory are the plan's
estimates for bf16 weights, fp32 maths.

    python benchmarks/plan_balance.py [--branches 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from drm_lightning.distributed import ParamSet, build_plan, sharded_rule
from drm_lightning.methods import get_method
from drm_lightning.sources import TensorMeta

RESULTS = Path(__file__).parent / "results"


def llama_8b_entries(dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], str, torch.dtype]]:
    """Llama-3.1-8B: hidden 4096, MLP 14336, 32 layers, vocab 128256, GQA 8 kv heads
    (k/v 1024×4096)."""
    entries = [("model.embed_tokens.weight", (128256, 4096), "fallback", dtype)]
    for i in range(32):
        p = f"model.layers.{i}."
        entries += [
            (p + "self_attn.q_proj.weight", (4096, 4096), "matrix", dtype),
            (p + "self_attn.k_proj.weight", (1024, 4096), "matrix", dtype),
            (p + "self_attn.v_proj.weight", (1024, 4096), "matrix", dtype),
            (p + "self_attn.o_proj.weight", (4096, 4096), "matrix", dtype),
            (p + "mlp.gate_proj.weight", (14336, 4096), "matrix", dtype),
            (p + "mlp.up_proj.weight", (14336, 4096), "matrix", dtype),
            (p + "mlp.down_proj.weight", (4096, 14336), "matrix", dtype),
            (p + "input_layernorm.weight", (4096,), "fallback", dtype),
            (p + "post_attention_layernorm.weight", (4096,), "fallback", dtype),
        ]
    entries += [
        ("model.norm.weight", (4096,), "fallback", dtype),
        ("lm_head.weight", (128256, 4096), "fallback", dtype),
    ]
    return entries


class _AllPartitioned(ParamSet):
    """A simulated ZeRO-3 target: every tensor partitioned (for the sharded rule)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__({}, "simulated ZeRO-3 model")
        self.weights_dtype = dtype

    def is_partitioned(self, name: str) -> bool:  # noqa: D102
        return True

    def meta(self, name: str) -> TensorMeta:  # noqa: D102
        return TensorMeta((), self.weights_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    method = get_method("drm", drop_rate=0.8, direction="vertical")
    entries = llama_8b_entries(dtype)
    total_params = sum(torch.Size(e[1]).numel() for e in entries)
    rows = []
    start = time.perf_counter()
    configs = [
        ("zero3+sharded", "zero3", sharded_rule(method, args.branches, _AllPartitioned(dtype))),
        ("zero3 owner-only", "zero3", None),
        ("replica (DDP)", "replica", None),
    ]
    for world in (2, 4, 8, 16):
        for label, engine, rule in configs:
            plan = build_plan(
                entries,
                method,
                n_branches=args.branches,
                world_size=world,
                engine=engine,
                shardable=rule,
            )
            loads = plan.loads
            rows.append(
                {
                    "world_size": world,
                    "engine": label,
                    "max_over_mean_cost": round(plan.max_over_mean(), 4),
                    "sharded_items": len(plan.sharded()),
                    "owner_items": sum(it.mode == "owner" for it in plan.items),
                    "max_rank_tflop": round(max(ld.cost for ld in loads) / 1e12, 3),
                    "mean_rank_tflop": round(sum(ld.cost for ld in loads) / world / 1e12, 3),
                    "max_comm_gib_per_rank": round(max(ld.comm_bytes for ld in loads) / 2**30, 3),
                    "mean_comm_gib_per_rank": round(
                        sum(ld.comm_bytes for ld in loads) / world / 2**30, 3
                    ),
                    "max_peak_gib_per_rank": round(max(ld.peak_bytes for ld in loads) / 2**30, 3),
                    "imbalance_note": plan.imbalance(),
                }
            )
    elapsed = time.perf_counter() - start
    header = (
        f"{'ranks':>5}  {'engine':<17} {'max/mean':>8}  {'sharded':>7}  {'owner':>5}  "
        f"{'max TFLOP':>9}  "
        f"{'comm GiB max':>12}  {'comm GiB mean':>13}  {'peak GiB':>8}"
    )
    print(
        f"Llama-3.1-8B shapes ({total_params / 1e9:.2f} B params, {len(entries)} tensors), "
        f"N={args.branches} branches, DRM-V drop 0.8, weights {args.dtype}; "
        f"planning all {len(rows)} configurations took {elapsed:.2f} s"
    )
    print(header)
    for r in rows:
        print(
            f"{r['world_size']:>5}  {r['engine']:<17} {r['max_over_mean_cost']:>8.3f}  "
            f"{r['sharded_items']:>7}  {r['owner_items']:>5}  {r['max_rank_tflop']:>9.2f}  "
            f"{r['max_comm_gib_per_rank']:>12.2f}  "
            f"{r['mean_comm_gib_per_rank']:>13.2f}  {r['max_peak_gib_per_rank']:>8.2f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "plan_balance.json"
    out.write_text(
        json.dumps(
            {
                "model": "Llama-3.1-8B shapes",
                "params": total_params,
                "tensors": len(entries),
                "branches": args.branches,
                "weights_dtype": args.dtype,
                "method": repr(method),
                "planning_seconds": elapsed,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
