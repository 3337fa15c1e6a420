"""The demo suite as an Accelerate loop: K task branches trained side by side, merged in the loop.

Pretrains the demo's residual MLP on scikit-learn's digits (once), builds a
:class:`~drm_lightning.inloop.BranchedModel` with one branch and head per demo task, trains
every branch each step with AdamW, and lets :class:`~drm_lightning.accelerate.MergeHook` merge
the branches with DRM every ``--every`` steps and score the merge on every task
(``merged/<task>/accuracy``, ``normalized/average`` ... through ``accelerator.log``). One line
per merge is printed; the last merge is written to ``--out`` as a Hugging Face folder.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_multitask.py --cpu
    python examples/accelerate_multitask.py --steps 60 --every 20      # one process
"""

from __future__ import annotations

import argparse
import logging

import torch
from accelerate import Accelerator
from torch.nn import functional as F

from drm_lightning.accelerate import MergeHook
from drm_lightning.demo import DemoConfig
from drm_lightning.demo.backbone import ResidualMLP
from drm_lightning.demo.runner import pretrain, task_specs, train_loaders
from drm_lightning.demo.tasks import build_suite
from drm_lightning.inloop import BranchedModel


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, merge in the loop, print one line per merge; returns the last record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--every", type=int, default=50, help="merge every n optimizer steps")
    parser.add_argument("--method", default="drm")
    parser.add_argument("--adopt", action="store_true", help="periodic consolidation")
    parser.add_argument(
        "--cpu", action="store_true", help="Accelerator(cpu=True): gloo ranks on CPU"
    )
    parser.add_argument(
        "--out", default=None, help="write the last merge here (Hugging Face folder)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    accelerator = Accelerator(cpu=args.cpu)
    config = DemoConfig()
    suite = build_suite(config.tasks, data_seed=config.data_seed)
    backbone = ResidualMLP(config.hidden, config.depth)
    backbone.load_state_dict(pretrain(suite, config))
    torch.manual_seed(0)
    heads = {
        name: torch.nn.Linear(config.hidden, task.num_classes) for name, task in suite.tasks.items()
    }
    model = BranchedModel(backbone, heads)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.finetune_lr
    )
    loaders = train_loaders(suite, config, seed=0)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))

    with MergeHook(
        accelerator,
        model,
        args.method,
        tasks=task_specs(suite),
        every_n_steps=args.every,
        adopt=args.adopt,
        export_dir=args.out,
    ) as hook:
        iterators = {name: iter(loader) for name, loader in loaders.items()}
        for _ in range(args.steps):
            loss = torch.zeros(())
            for name in suite.names:
                try:
                    x, y = next(iterators[name])
                except StopIteration:
                    iterators[name] = iter(loaders[name])
                    x, y = next(iterators[name])
                loss = loss + F.cross_entropy(model(x, name), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            hook.step()
    last = hook.history[-1] if hook.history else {}
    accelerator.print(
        f"world size {accelerator.num_processes} ({accelerator.distributed_type}); "
        f"{len(hook.history)} merges; "
        f"last merged/average {last.get('merged/average', float('nan')):.4f}, "
        f"normalized/average {last.get('normalized/average', float('nan')):.4f}"
    )
    accelerator.end_training()
    return {k: v for k, v in last.items() if isinstance(v, float)}


if __name__ == "__main__":
    main()
