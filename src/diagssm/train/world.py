"""Where a run executes: its device, its place among processes, its precision and compilation.

One process (`diagssm train ...`): rank 0 of 1 on run.device.

Data-parallel (DistributedDataParallel) with torchrun, on one machine or several:

    torchrun --nproc_per_node=2 -m diagssm train --config configs/quickstart.yaml
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=HOST --master_port=29500 \\
        -m diagssm train --config ...          (and --node_rank=1 on the second machine)

`make_world(..., distributed=True)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); when WORLD_SIZE > 1 it initialises the process group (env://) with
the backend chosen from the device: gloo for "cpu", nccl for "cuda" (rank r then uses
cuda:LOCAL_RANK; "cuda:N" is an error, as every process would share one GPU). Nothing else is
needed to span machines: torchrun's --nnodes / --node_rank / rendezvous set the same variables.
The run folder must be on a file system that every machine sees if runs are to be resumed on
all of them (rank 0 writes the checkpoints, every rank reads them on --resume).

In a distributed run `optim.batch_size` is the global batch: each rank takes its slice of
every global batch (batch_size / world_size items; an error when it does not divide), so the
data order is the same function of (run.seed, epoch) as in one process (`data.py`), and DDP's
gradient average over equal slices of mean-reduced losses equals the full-batch gradient. Only
rank 0 logs, draws the progress bar and writes files; metric sums are summed over ranks
(`all_reduce_sum`), so logged losses and accuracies are those of the global batch.

Precision (`run.precision`): "fp32", or "bf16": `autocast` runs the forward pass under
torch.autocast(device type, bfloat16) while every SSM layer runs in float32 with autocast
off (`keep_ssm_float32`): the kernels' exponentials and the scan lose too much in bfloat16.

Compilation (`run.compile`): `compile_model` applies torch.compile; it compiles lazily, so a
failure surfaces at the first forward pass, where the loop turns it into a `CompileError`
naming the cause (no silent fallback to eager mode).
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CompileError(RuntimeError):
    """torch.compile failed (run.compile=true); the message names the failure."""


@dataclass
class World:
    """One process's view of the run. Single process: rank 0 of 1."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # "gloo" | "nccl" when distributed
    precision: str = "fp32"
    owns_group: bool = False  # this World initialised the process group (and closes it)

    @property
    def is_main(self):
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def describe(self):
        """One line for the log: processes, backend, device, precision."""
        where = (f"distributed: {self.world_size} processes, backend {self.backend} (device {self.device.type}); "
                 if self.distributed else "single process; ")
        prec = ("precision: bf16 autocast, SSM layers in float32" if self.precision == "bf16"
                else "precision: fp32")
        return where + prec

    def wrap_model(self, model):
        """The model as the training step calls it: DistributedDataParallel when distributed."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def autocast(self):
        """The precision context of forward passes: bf16 autocast, or nothing (fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, t):
        """Sum of `t` over processes (one process: `t`); `t` is not changed."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (one process: `obj`)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def keep_precision(self, model):
        """`model` as this world's precision runs it: under bf16 its SSM layers kept in float32
        (`keep_ssm_float32`), as training and `diagssm eval` both need. Returns `model`."""
        if self.precision == "bf16":
            keep_ssm_float32(model)
        return model

    def broadcast_buffers(self, model):
        """Rank 0's buffers on every rank (one process: nothing to do). DDP gives every rank rank 0's
        before each training forward, which then updates BatchNorm's running statistics with the
        rank's own slice of the batch: after a step they differ, and rank 0's are the ones saved."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (one process: [obj])."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self):
        """Wait for every process (one process: nothing to wait for)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        """Wait for every rank, then destroy the process group if this World created it (every
        rank must call it: a rank that leaves early can abort in gloo's threads at exit)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            self.owns_group = False


def check_device(device, name="run.device"):
    """torch.device of `device` ("cpu", "cuda", "cuda:N"); an unavailable one is an error naming
    `name`, the setting it came from."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}={device!r}: supported device types are cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}={device!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def make_world(device, precision="fp32", distributed=False, env=None):
    """The World of this process on `device` (module docstring).

    distributed=False: one process. distributed=True: under torchrun (WORLD_SIZE > 1 in `env`,
    default os.environ) initialise the process group (gloo on CPU, nccl on CUDA) or join one
    that is already initialised; with WORLD_SIZE unset or 1, one process.
    """
    dev = check_device(device)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"run.precision={precision!r}; allowed: fp32, bf16")
    if not distributed:
        return World(device=dev, precision=precision)
    import torch.distributed as dist

    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():  # e.g. started by torch.multiprocessing with init_method
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(env.get("LOCAL_RANK", rank))
        owns, backend = False, dist.get_backend()
    else:
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
        except ValueError as e:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not an integer") from e
        if world_size <= 1:
            return World(device=dev, precision=precision)
        missing = [k for k in TORCHRUN_VARS if not env.get(k)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; start distributed "
                             f"runs with torchrun (torchrun --nproc_per_node=N -m diagssm train ...)")
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local_rank, owns = int(env["RANK"]), int(env["LOCAL_RANK"]), True
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"run.device={device!r} in a distributed run: use 'cuda' (rank r takes cuda:LOCAL_RANK)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices exist")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if owns:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return World(device=dev, rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                 precision=precision, owns_group=owns)


# ---- precision and compilation ------------------------------------------------------------
def keep_ssm_float32(model):
    """Make every SSM layer (`diagssm.layers.base.SSMLayer`) of `model` run in float32 under
    autocast: its input is cast to float32 and autocast is off inside its `forward` and `step`. Done
    by setting each layer's `forward` and `step` on the instance to the layer's `_forward_float32`
    and `_step_float32` (bound methods of its class, so deepcopies and pickles keep them), so
    parameter names and state_dict are unchanged. Returns the number of layers changed."""
    from diagssm.layers.base import SSMLayer

    n = 0
    for m in model.modules():
        if isinstance(m, SSMLayer) and getattr(m.__dict__.get("forward"), "__func__", None) is not \
                SSMLayer._forward_float32:
            m.forward, m.step = m._forward_float32, m._step_float32
            n += 1
    return n


def compile_model(model):
    """torch.compile(model), or CompileError naming why torch.compile is not usable here."""
    try:
        return torch.compile(model)
    except Exception as e:  # e.g. an unsupported Python version
        raise CompileError(f"run.compile=true: torch.compile failed ({type(e).__name__}: {e}); "
                           f"set run.compile=false") from e
