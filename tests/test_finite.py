"""NaN / Inf in a branch or in the merged result: a located error on every entry point (issue 8).

The distributed entry points are covered where they run: the ZeRO-3 engine (sharded and owner
routes) in ``test_distributed_zero3.py``, the replica engine in ``test_distributed_replica.py``,
``drm-merge`` under torchrun in ``test_cli_distributed.py``, the single-process CLI in
``test_cli.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drm_lightning.distributed import merge_module_branches
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.merge.tensor import merge_tensor
from drm_lightning.methods import get_method
from drm_lightning.methods.drm import drm_merge

transformers = pytest.importorskip("transformers")
from test_cli import zoo  # noqa: E402, F401 - the CLI tests' tiny Llama zoo, as a fixture here


def _states(n_branches: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(8, 6, generator=g), "fc.bias": torch.randn(8, generator=g)}
    branches = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(n_branches)
    ]
    return base, branches


@pytest.mark.parametrize("method", ["drm", "ties", "task_arithmetic", "dare_ties"])
@pytest.mark.parametrize("name", ["fc.weight", "fc.bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_state_dict_merge_names_branch_and_tensor(method: str, name: str, bad: float) -> None:
    base, branches = _states()
    branches[1][name].view(-1)[2] = bad
    with pytest.raises(
        ValueError,
        match=rf"'{name}' in branch 1 .*contains {'1 NaN' if bad != bad else '0 NaN and 1 Inf'}",
    ):
        merge_state_dicts(get_method(method), base, branches)


def test_nan_in_the_base_is_refused() -> None:
    base, branches = _states()
    base["fc.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'fc.weight' in base"):
        merge_state_dicts(get_method("drm"), base, branches)


def test_module_merge_single_engine_names_branch_and_tensor() -> None:
    """merge_module_branches (the callback's and Accelerate's entry) used to return the base."""
    base, branches = _states()
    branches[2]["fc.weight"][1, 1] = float("nan")
    target = nn.Module()
    target.fc = nn.Linear(6, 8)
    with pytest.raises(Exception, match=r"'fc.weight' in branch 2 .*contains 1 NaN"):
        merge_module_branches(get_method("drm"), target, base, branches)


def test_overflowing_result_is_refused() -> None:
    """A coefficient of 1e300 used to write an all-Inf model and exit 0."""
    base, branches = _states()
    with pytest.raises(ValueError, match=r"in the merged result contains .*overflowed"):
        merge_state_dicts(
            get_method("task_arithmetic"), base, branches, coefficients=[1e300, 1.0, 1.0]
        )


def test_result_beyond_the_output_dtype_is_refused() -> None:
    """Finite in float32 but Inf once cast to the base's float16."""
    base = torch.zeros(4, 3, dtype=torch.float16)
    branch = torch.full((4, 3), 60000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"'w' in the merged result contains"):
        merge_tensor(get_method("task_arithmetic"), "fallback", base, [branch], [2.0], name="w")


def test_direct_drm_call_refuses_non_finite_deltas() -> None:
    """The method itself no longer reads a NaN σ₁ as rank 0 (which returned a zero delta)."""
    deltas = torch.randn(2, 40, 40, dtype=torch.float64)
    deltas[0, 3, 3] = float("nan")
    with pytest.raises((ValueError, RuntimeError)):
        drm_merge(deltas, torch.ones(2, dtype=torch.float64), solver="svd")
    with pytest.raises((ValueError, RuntimeError)):
        drm_merge(deltas, torch.ones(2, dtype=torch.float64), solver="gram")


def test_callback_merge_names_the_tensor() -> None:
    """A NaN in one live branch stops the run at the merge with the tensor named."""
    import lightning.pytorch as pl
    from test_lightning_common import acc_specs, branched, train_loaders, trainer

    from drm_lightning.lightning import MergeCallback

    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # noqa: ANN001, ANN002
            with torch.no_grad():
                pl_module.branches["b"][0].weight[0, 0] = float("nan")

    model = branched()
    cb = MergeCallback("drm", method_params={"drop_rate": 0.5}, tasks=acc_specs(), every_n_steps=2)
    # The poisoned step spreads NaN through branch b's backbone by the merge at step 2.
    with pytest.raises(
        Exception, match=r"'\d\.(weight|bias)' in branch 1 \(branch 'b'\) contains \d+ NaN"
    ):
        trainer(max_steps=3, callbacks=[Poison(), cb]).fit(model, train_loaders())


def test_cli_overflowing_result_fails_and_writes_nothing(zoo, tmp_path, capsys) -> None:  # noqa: ANN001, F811
    """``drm-merge`` with a coefficient of 1e300: a located error, exit 2, nothing at ``-o``."""
    import test_cli

    paths = [str(zoo["root"] / f"branch{i}") for i in range(test_cli.N_BRANCHES)]
    cfg = test_cli._write_config(
        tmp_path,
        zoo,
        method="task_arithmetic",
        parameters={},
        branches=[{"path": paths[0], "coefficient": 1e300}, paths[1], paths[2]],
    )
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "merged"
    err = test_cli._fails([str(cfg), "-o", str(out), "--no-progress"], capsys, out)
    assert "in the merged result contains" in err and "coefficients" in err
