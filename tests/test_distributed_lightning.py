"""Lightning's DeepSpeedStrategy (ZeRO stage 3): the merge engine called from a training hook.

Lightning refuses DeepSpeed on CPU ("only supported on CUDA GPUs"), so these tests need a
GPU and skip cleanly elsewhere; the CPU tier of the same engine is
``test_distributed_zero3.py`` (raw ``deepspeed.initialize``).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="Lightning's DeepSpeedStrategy needs CUDA"
    ),
]


def test_lightning_deepspeed_stage3_merge_in_hook() -> None:
    """Merge the branches into the base at the end of fit under ZeRO-3;
    matches the single-process merge."""
    pytest.importorskip("deepspeed")
    import deepspeed
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from test_distributed_zero3 import (
        COEFFICIENTS,
        IGNORE,
        Branched,
        _rel,
        batch,
        build_model,
        reference,
    )

    from drm_lightning.distributed import DistributedMerger, ParamSet, ShardSnapshot
    from drm_lightning.merge.routing import Routing
    from drm_lightning.methods import get_method

    method = get_method("drm", drop_rate=0.8)
    errors: dict[str, float] = {}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net: Branched = build_model()

        def training_step(self, data, _):  # noqa: ANN001, D102
            return self.net(*[t.to(self.device) for t in batch(0)])

        def configure_optimizers(self):  # noqa: ANN201, D102
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.0)

        def on_train_end(self) -> None:
            params = list(self.net.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = {
                    k: v.detach().float().cpu().clone() for k, v in self.net.state_dict().items()
                }
            target = ParamSet.from_module(self.net.base)
            gloo = torch.distributed.new_group(backend="gloo")  # the engines exchange CPU tensors
            result = DistributedMerger(method, routing=Routing(ignore=IGNORE), group=gloo).merge(
                target,
                ShardSnapshot.capture(target),
                [ParamSet.from_module(b) for b in self.net.branches],
                coefficients=COEFFICIENTS,
            )
            assert result.engine == "zero3"
            expected = reference(method, full, torch.float32)
            for name, p in self.net.base.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    errors[name] = _rel(p.detach().float().cpu(), expected[name])
                assert p.numel() == 0

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=4
    )
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        strategy=DeepSpeedStrategy(stage=3),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Module(), data)
    assert errors and max(errors.values()) < 1e-5, errors
