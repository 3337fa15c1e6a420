"""The tasks of the demo suite: views of scikit-learn's bundled handwritten digits.

Every task is one *view* of the 8×8 digit images (a rotation, a mirror, an inverted
contrast, a fixed pixel permutation, ...) paired with one *label* (the digit, its parity,
the digit modulo 3, ...). The data ships with scikit-learn (``load_digits``, 1797 images),
so nothing is downloaded. The images are split once, with a fixed ``data_seed``, into three
disjoint parts:

* ``pretrain`` — the corpus the backbone is pretrained on (see :mod:`.backbone`);
* ``train`` — each task's fine-tuning data;
* ``val`` — each task's held-out evaluation data (never seen by any training).

Example:
    >>> suite = build_suite([TaskDef("rot90", "digit"), TaskDef("invert", "parity")])
    >>> suite.names
    ['rot90_digit', 'invert_parity']
    >>> suite.tasks["invert_parity"].num_classes
    2
    >>> suite.tasks["rot90_digit"].train_x.shape[1]
    64
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_SIDE = 8
INPUT_DIM = IMAGE_SIDE * IMAGE_SIDE
PERMUTATION_SEED = 1234
"""Seed of the fixed pixel permutation of the ``perm`` view (the same in every run)."""


def _as_images(x: Tensor) -> Tensor:
    return x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def _flat(images: Tensor) -> Tensor:
    return images.reshape(-1, INPUT_DIM).contiguous()


def fixed_permutation(seed: int = PERMUTATION_SEED) -> Tensor:
    """The pixel permutation of the ``perm`` view: ``randperm(64)`` from a fixed seed.

    Example:
        >>> torch.equal(fixed_permutation(), fixed_permutation())
        True
    """
    return torch.randperm(INPUT_DIM, generator=torch.Generator().manual_seed(seed))


VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "rot90": lambda x: _flat(torch.rot90(_as_images(x), 1, (1, 2))),
    "rot180": lambda x: _flat(torch.rot90(_as_images(x), 2, (1, 2))),
    "rot270": lambda x: _flat(torch.rot90(_as_images(x), 3, (1, 2))),
    "flip": lambda x: _flat(_as_images(x).flip(2)),
    "transpose": lambda x: _flat(_as_images(x).transpose(1, 2)),
    "invert": lambda x: 1.0 - x,
    "perm": lambda x: x[:, fixed_permutation()],
}
"""Input views: functions of an (N, 64) batch of images with pixels in [0, 1]."""

_LOOPS = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0, 1, 1])  # digits drawn with a closed loop

LABELS: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {
    "digit": (lambda y: y, 10),
    "parity": (lambda y: y % 2, 2),
    "mod3": (lambda y: y % 3, 3),
    "ge5": (lambda y: (y >= 5).long(), 2),
    "loops": (lambda y: _LOOPS[y], 2),
}
"""Label functions of the digit class, with their number of classes."""


@dataclass(frozen=True)
class TaskDef:
    """One task: an input view (a key of :data:`VIEWS`) and a label (a key of :data:`LABELS`).

    Example:
        >>> TaskDef("rot180", "parity").name
        'rot180_parity'
    """

    view: str
    label: str

    def __post_init__(self) -> None:
        problems = []
        if self.view not in VIEWS:
            problems.append(f"view {self.view!r} (valid: {', '.join(VIEWS)})")
        if self.label not in LABELS:
            problems.append(f"label {self.label!r} (valid: {', '.join(LABELS)})")
        if problems:
            raise ValueError("TaskDef: unknown " + " and ".join(problems))

    @property
    def name(self) -> str:
        """``<view>_<label>``: the task's key in module dicts, logs and result tables."""
        return f"{self.view}_{self.label}"


@dataclass(frozen=True)
class TaskData:
    """The tensors of one task: fine-tuning and validation inputs and targets."""

    definition: TaskDef
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor


@dataclass(frozen=True)
class Suite:
    """The K tasks of a run and the pretraining corpus of the backbone."""

    tasks: dict[str, TaskData]
    pretrain_x: Tensor
    pretrain_y: Tensor

    @property
    def names(self) -> list[str]:
        """Task names, in order."""
        return list(self.tasks)


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(x, y)``: (1797, 64) floats in [0, 1] and (1797,) labels.

    Example:
        >>> x, y = load_digits_tensors()
        >>> tuple(x.shape), int(y.max()), float(x.max())
        ((1797, 64), 9, 1.0)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into consecutive parts of these fractions.

    The last part takes the remainder, so the parts always cover ``range(n)`` exactly.

    Example:
        >>> [len(p) for p in split_indices(10, [0.4, 0.3, 0.3], seed=0)]
        [4, 3, 3]
    """
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts: list[Tensor] = []
    start = 0
    for i, fraction in enumerate(fractions):
        stop = n if i == len(fractions) - 1 else start + round(fraction * n)
        parts.append(order[start:stop])
        start = stop
    return parts


def build_suite(
    definitions: Sequence[TaskDef],
    *,
    data_seed: int = 0,
    fractions: tuple[float, float, float] = (0.4, 0.3, 0.3),
) -> Suite:
    """Load the digits, split them, and build every task and the pretraining corpus.

    The pretraining corpus is the ``pretrain`` images under every view used by a task plus
    the identity, labelled with the digit: broad supervised pretraining that covers all the
    task domains but none of the tasks' images and none of the non-digit labels.

    Args:
        definitions: The tasks; names must be unique.
        data_seed: Seed of the pretrain/train/val split.
        fractions: Shares of the images in pretrain, train and val.

    Raises:
        ValueError: duplicate task names or fewer than one task.
    """
    if not definitions:
        raise ValueError("build_suite needs at least one TaskDef")
    names = [d.name for d in definitions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"duplicate task names {duplicates}: each (view, label) pair may appear once"
        )
    x, y = load_digits_tensors()
    pre, train, val = split_indices(len(x), fractions, data_seed)
    tasks: dict[str, TaskData] = {}
    for definition in definitions:
        view = VIEWS[definition.view]
        label_fn, num_classes = LABELS[definition.label]
        tasks[definition.name] = TaskData(
            definition=definition,
            num_classes=num_classes,
            train_x=view(x[train]),
            train_y=label_fn(y[train]),
            val_x=view(x[val]),
            val_y=label_fn(y[val]),
        )
    views = ["identity"] + sorted({d.view for d in definitions} - {"identity"})
    pretrain_x = torch.cat([VIEWS[v](x[pre]) for v in views])
    pretrain_y = y[pre].repeat(len(views))
    return Suite(tasks=tasks, pretrain_x=pretrain_x, pretrain_y=pretrain_y)
