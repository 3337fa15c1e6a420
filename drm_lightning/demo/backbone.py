"""The demo's backbone: a small pre-LayerNorm residual MLP, pretrained by the demo itself.

The block is a transformer block without attention, ``x + fc2(gelu(fc1(norm(x))))``, so the
merged tensors are those of a transformer's MLP: 2-D ``weight`` matrices (the DRM matrix
path) and 1-D biases and LayerNorm scales (the fallback path).

Example:
    >>> net = ResidualMLP(hidden=16, depth=2)
    >>> net(torch.zeros(3, 64)).shape
    torch.Size([3, 16])
    >>> sorted(k for k, v in net.state_dict().items() if v.dim() == 2)
    ... # doctest: +NORMALIZE_WHITESPACE
    ['blocks.0.fc1.weight', 'blocks.0.fc2.weight', 'blocks.1.fc1.weight', 'blocks.1.fc2.weight',
     'embed.weight']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from drm_lightning.demo.tasks import INPUT_DIM


class ResidualBlock(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))`` with an MLP ratio of ``ratio``."""

    def __init__(self, hidden: int, ratio: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ratio * hidden)
        self.fc2 = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x`` (…, hidden)."""
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Linear embedding of the 64 pixels, ``depth`` residual blocks, a final LayerNorm.

    Args:
        hidden: Width of the residual stream (the features given to every task head).
        depth: Number of residual blocks.
        in_features: Input size (64 pixels).
    """

    def __init__(self, hidden: int = 128, depth: int = 2, in_features: int = INPUT_DIM) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(in_features, hidden)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Features (N, hidden) of a batch of flattened images (N, 64)."""
        return self.norm(self.blocks(self.embed(x)))


def pretrain_backbone(
    backbone: ResidualMLP,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Tensor]:
    """Supervised pretraining of ``backbone`` (in place) with a throwaway linear head.

    Args:
        backbone: The network to pretrain.
        x: (N, 64) pretraining images.
        y: (N,) digit labels.
        steps: AdamW steps on random mini-batches.
        lr: Learning rate.
        batch_size: Mini-batch size.
        seed: Seed of the head's initialisation and of the batch sampling.
        on_step: Called after every step with the number of steps done (progress bars).

    Returns:
        A detached copy of the pretrained backbone's state dict.

    Example:
        >>> net = ResidualMLP(hidden=8, depth=1)
        >>> state = pretrain_backbone(net, torch.rand(32, 64), torch.arange(32) % 10, steps=2)
        >>> sorted(state)[:2]
        ['blocks.0.fc1.bias', 'blocks.0.fc1.weight']
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = nn.Linear(backbone.hidden, int(y.max()) + 1)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    backbone.train()
    for step in range(steps):
        index = torch.randint(0, len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(head(backbone(x[index])), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1)
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
