"""What every task shares: the `Task` record, stored-tensor datasets, padding, split seeds.

A task builder (see `registry.py`) returns a `Task`: three datasets of (x, y) or (x, y, length) items, the sizes and
defaults the model needs (input and output width, encoder, head, pooling), the metric, and the
`collate` function that pads a batch to its longest sequence and returns the lengths.
Every builder takes `seed` and is deterministic in it: the same (name, params, seed) gives the
same tensors, and the train, val and test splits come from distinct random streams.
"""
import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from diagssm.hippo import _check_int as check_int  # the core's integer check, for the tasks too

ENCODERS = ("embedding", "linear")
METRICS = ("accuracy", "mse")
SPLITS = ("train", "val", "test")


class SequenceDataset(Dataset):
    """Items (x[i], y[i]) or, with `lengths`, (x[i], y[i], lengths[i]) from stored tensors.

    Shapes: x (n, L) int64 tokens or (n, L, d_input) float; y (n,) class ids, (n, d) or
    (n, L, d) per step; lengths (n,) int64, each in [1, L] (x[i, lengths[i]:] is padding).
    """

    def __init__(self, x, y, lengths=None):
        if len(x) != len(y) or (lengths is not None and len(lengths) != len(x)):
            raise ValueError(f"x, y and lengths must have the same length; got {len(x)}, {len(y)}, "
                             f"{None if lengths is None else len(lengths)}")
        self.x, self.y, self.lengths = x, y, lengths

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.lengths is None:
            return self.x[i], self.y[i]
        return self.x[i], self.y[i], self.lengths[i]


def item_length(item):
    """The unpadded length of a dataset item (x, y) or (x, y, length)."""
    return int(item[2]) if len(item) == 3 else len(item[0])


def model_input(x):
    """x as the model takes it: tokens stored compactly (uint8, int16) as int64, which embeddings
    take; real inputs unchanged."""
    return x if x.is_floating_point() else x.long()


def pad_collate(items, per_step_targets=False):
    """Stack a list of dataset items into (x, y, lengths), padding with zeros to the batch's
    longest sequence. Items are (x, y) (length = len(x)) or (x, y, length).
    `per_step_targets`: y has one entry per step and is padded (and cut) like x.

    Shapes: returns x (B, L_max) or (B, L_max, d), y (B, ...) or (B, L_max, d), lengths (B,) int64
    """
    lengths = torch.tensor([item_length(it) for it in items], dtype=torch.long)
    L = int(lengths.max())
    xs = [it[0][:n] for it, n in zip(items, lengths.tolist())]
    x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # (B, L, ...)
    x = model_input(x)
    if per_step_targets:
        ys = [it[1][:n] for it, n in zip(items, lengths.tolist())]
        y = torch.nn.utils.rnn.pad_sequence(ys, batch_first=True)  # (B, L, ...)
    else:
        y = torch.stack([torch.as_tensor(it[1]) for it in items])  # (B, ...)
    assert x.shape[1] == L
    return x, y, lengths


@dataclass
class Task:
    """A task's data and the defaults a model for it needs.

    encoder: "embedding" (x holds token ids < d_input) or "linear" (x holds d_input features).
    head, pooling: the SequenceModel defaults (a config may override them).
    metric: "accuracy" (higher is better) or "mse" (lower is better).
    score_start: per-step tasks score (and train on) positions t >= score_start only.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    d_input: int
    d_output: int
    encoder: str
    head: str
    pooling: str
    metric: str
    collate: Callable = pad_collate
    score_start: int = 0
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, value, allowed in (("encoder", self.encoder, ENCODERS), ("metric", self.metric, METRICS)):
            if value not in allowed:
                raise ValueError(f"Task {self.name!r}: {name}={value!r}; allowed: {', '.join(allowed)}")

    def split(self, name):
        """The dataset of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def higher_is_better(self):
        return self.metric == "accuracy"

    @property
    def max_length(self):
        """For a task of variable lengths (a split stores `lengths`), its longest sequence over the
        splits: the `L` a training run gives `SequenceModel`, so that a length-dependent layer's system
        (DSS-softmax) does not change with each batch's padding. None for fixed lengths, where every
        batch has the task's length."""
        lengths = [getattr(self.split(s), "lengths", None) for s in SPLITS]
        if all(n is None for n in lengths):
            return None
        return max((int(n.max()) for n in lengths if n is not None and len(n)), default=None)


def _always_available():
    return None


SOURCE_KINDS = ("generated", "package", "files")


@dataclass(frozen=True)
class Source:
    """Where a task's data comes from, for `diagssm data list` and `diagssm data show`.

    kind: "generated" (made by the library), "package" (shipped inside a Debian or PyPI package)
        or "files" (read from standard files the user already has).
    origin: one line naming the generator, package or file format.
    card: the data card's path in the repository, e.g. "docs/data/listops.md".
    available: () -> None when the task can be built on this machine, else a one-line reason
        (e.g. "espeak-ng is not installed (apt install espeak-ng)").
    show: (task, png_path) -> text: a few examples as text; saves a picture to png_path
        (None: the generic display of `diagssm.tasks.show`).
    """

    kind: str
    origin: str
    card: str
    available: Callable = _always_available
    show: Callable = None

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"Source kind={self.kind!r}; allowed: {', '.join(SOURCE_KINDS)}")


def check_ints(**values):
    """check_int for each name=(value, lowest allowed); the first bad one is named."""
    for name, (value, low) in values.items():
        check_int(name, value, low)


def split_generator(seed, split):
    """A torch.Generator for (seed, split): distinct splits and seeds give independent streams
    (0 <= seed < 2**32: numpy's SeedSequence splits larger ints into words, and (2**32, "train")
    would draw as (0, "val"))."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    if seed >= 2 ** 32:
        raise ValueError(f"seed={seed!r} must be < 2**32")
    state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def per_step_collate():
    return functools.partial(pad_collate, per_step_targets=True)
