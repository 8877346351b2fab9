"""Where a run executes: its device, and its place among processes (rank, world size).

Today a run is one process on one device (`make_world`). Data-parallel training (torchrun/DDP),
mixed precision and torch.compile slot in here: `wrap_model` (DDP), `autocast` (bf16),
`all_reduce_sum` (metric sums), `barrier`; the loop logs and writes checkpoints only where
`is_main` (rank 0) holds.
"""
import contextlib
from dataclasses import dataclass

import torch


@dataclass
class World:
    """One process's view of the run. Single process: rank 0 of 1."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    def wrap_model(self, model):
        """The model as the training step calls it (DDP would wrap it here)."""
        return model

    def autocast(self):
        """The precision context of forward passes (full precision here)."""
        return contextlib.nullcontext()

    def all_reduce_sum(self, t):
        """Sum of `t` over processes (one process: `t`)."""
        return t

    def barrier(self):
        """Wait for every process (one process: nothing to wait for)."""


def make_world(device):
    """A single-process World on `device` ("cpu", "cuda", "cuda:N"); an unavailable one is an error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"run.device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"run.device={device!r}: supported device types are cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={device!r} but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"run.device={device!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return World(device=dev)
