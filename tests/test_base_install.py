"""`pip install drm_lightning` without extras: `drm-merge` imports and merges.

The extras (``[lightning]``, ``[accelerate]``, ``[hf]``, ``[distributed]``, ``[demo]``) are
optional; a bare install has the CLI, the methods and the sources. The suite's venv has every
extra, so a child process hides them (an import hook raising ``ModuleNotFoundError``, as a
bare install would) and runs a real merge through the CLI's entry point.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIONAL = (
    "lightning",
    "pytorch_lightning",
    "torchmetrics",
    "jsonargparse",
    "accelerate",
    "transformers",
    "peft",
    "deepspeed",
    "sklearn",
    "matplotlib",
)


def test_cli_merges_without_any_extra(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = {"w": torch.randn(8, 6), "b": torch.zeros(8)}
    for name, noise in [("base", 0.0), ("a", 0.1), ("b", 0.1)]:
        (tmp_path / name).mkdir()
        save_file(
            {k: v + noise * torch.randn_like(v) for k, v in base.items()},
            str(tmp_path / name / "model.safetensors"),
        )
    (tmp_path / "merge.yaml").write_text(
        "method: drm\nbase: base\nbranches: [a, b]\nparameters: {drop_rate: 0.5}\n"
    )
    child = textwrap.dedent(
        f"""
        import sys

        class HideExtras:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, HideExtras())
        from drm_lightning.cli import main

        code = main(["merge.yaml", "-o", "merged"])
        hidden = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
        assert not hidden, hidden
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == {"w", "b"} and torch.isfinite(merged["w"]).all()
