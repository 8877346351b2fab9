"""The order in which a run sees its training data: a deterministic function of (seed, epoch).

Epoch e's order is the permutation drawn by a generator seeded from (seed, e), cut into
`steps_per_epoch` full batches (the last partial batch is dropped). Global step s (0-based)
reads batch s % steps_per_epoch of epoch s // steps_per_epoch, so a resumed run skips the
consumed batches by starting the epoch at that position, without reading them.

Distributed runs (`world.py`): optim.batch_size is the global batch; rank r of W reads the r-th
of W equal slices of each global batch, so the union over ranks at every step is the batch a
single process reads (the order does not depend on W, and a run can resume with another W).
Validation and test sets are split by index (rank r takes items r, r + W, ...); the loss and
metric sums are then summed over ranks.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, Subset


def epoch_seed(seed, epoch):
    """The data-order seed of (seed, epoch): independent streams for distinct pairs."""
    state = np.random.SeedSequence([0xDA7A, seed, epoch]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


class EpochBatchSampler(Sampler):
    """Index batches of one epoch, from batch `start` on (see the module docstring).

    With world_size > 1, global batch b holds batch_size * world_size indices and rank r takes
    its r-th slice, so the data order does not depend on the number of processes.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {n} items, fewer than one batch of "
                             f"{batch_size * world_size} (the global batch, optim.batch_size)")
        self.epoch, self.start = 0, 0
        self.generator = torch.Generator()

    def set_position(self, epoch, start):
        """Iterate epoch `epoch` from batch `start` (0 <= start < steps_per_epoch)."""
        if not 0 <= start < self.steps_per_epoch:
            raise ValueError(f"start={start} must be in [0, {self.steps_per_epoch})")
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps_per_epoch - self.start

    def __iter__(self):
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=self.generator)  # (n,)
        G = self.batch_size * self.world_size
        for b in range(self.start, self.steps_per_epoch):
            first = b * G + self.rank * self.batch_size
            yield perm[first:first + self.batch_size].tolist()

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data seed {state['seed']} differs from run.seed={self.seed}")
        self.epoch, self.start = state["epoch"], state["start"]
        self.generator.set_state(state["generator"])


def train_loader(task, batch_size, seed, world):
    """A DataLoader over task.train in the order of EpochBatchSampler (no worker processes).

    `batch_size` is the global batch; each of world.world_size ranks reads batch_size / world_size
    of it (a ValueError when that does not divide).

    Each iter(DataLoader) draws a seed from its generator; with the global one, a resumed run
    (which starts an extra iteration mid-epoch) would shift the dropout masks."""
    if batch_size % world.world_size:
        raise ValueError(f"optim.batch_size={batch_size} is the global batch and must be divisible by the "
                         f"number of processes, {world.world_size}")
    sampler = EpochBatchSampler(len(task.train), batch_size // world.world_size, seed, world.rank,
                                world.world_size)
    return DataLoader(task.train, batch_sampler=sampler, collate_fn=task.collate, num_workers=0,
                      generator=torch.Generator())  # own generator: iter() must not draw from the global RNG


def eval_loader(dataset, task, batch_size, world=None):
    """A DataLoader over `dataset` in its stored order; with a distributed `world`, this rank's
    items r, r + W, ... in batches of about batch_size / W (the module docstring)."""
    if world is not None and world.world_size > 1:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.world_size))
        batch_size = max(1, batch_size // world.world_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=task.collate, num_workers=0,
                      generator=torch.Generator())
