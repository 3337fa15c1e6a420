"""Tiny networks for the alignment tests: MLP, BN ResNet, GN ResNet, BERT-style encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MLP(nn.Module):
    """20 -> 32 -> 32 -> 32 -> 10 (spec §14 fixture); GELU so that no unit is dead."""

    def __init__(self, width: int = 32, d_in: int = 20, d_out: int = 10, act=F.gelu) -> None:
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.fc4 = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        x = self.act(self.fc3(x))
        return self.fc4(x)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.gelu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.gelu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, a same-width block, a projection block, pooling, classifier."""

    def __init__(self, width: int = 8, classes: int = 5, groupnorm: int = 0) -> None:
        super().__init__()
        norm = (lambda c: nn.GroupNorm(groupnorm, c)) if groupnorm else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        self.layer1 = Block(width, width, 1, norm)
        self.layer2 = Block(width, 2 * width, 2, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def bert_config(hidden: int = 16, heads: int = 4, layers: int = 2):
    from transformers import BertConfig

    return BertConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )


class TinyBert(nn.Module):
    """Input projection, BERT encoder layers built from a config (no download), CLS head."""

    def __init__(
        self, d_in: int = 6, hidden: int = 16, heads: int = 4, layers: int = 2, classes: int = 3
    ) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        cfg = bert_config(hidden, heads, layers)
        self.inp = nn.Linear(d_in, hidden)
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(layers)])
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
            if isinstance(h, tuple):
                h = h[0]
        return self.head(h[:, 0])


def seeded(cls, seed: int, *args, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    net = cls(*args, **kwargs).double().eval()
    for m in net.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def inputs(kind: str, n: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shapes = {"mlp": (n, 20), "resnet": (n, 3, 8, 8), "bert": (n, 5, 6)}
    return torch.randn(*shapes[kind], generator=g, dtype=torch.float64)
