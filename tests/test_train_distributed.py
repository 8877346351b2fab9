"""Data-parallel training: two CPU processes under torch.distributed.run (gloo, one thread each)
end with the weights of one process trained on the same global batch; --resume loads a
checkpoint on every rank; the global batch must divide; torchrun's variables are checked."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from diagssm.train.checkpoint import load_checkpoint
from diagssm.train.config import from_dict
from diagssm.train.data import train_loader
from diagssm.train.setup import make_task
from diagssm.train.world import World, make_world
from test_train_cli import TINY, keep_threads, rows, write_config  # noqa: F401  (keep_threads: autouse)

STEPS = 8  # global batch 16 (8 per rank), 16 steps per epoch
RUN = {"max_steps": STEPS, "log_every": 2, "eval_every": 4, "checkpoint_every": 4, "keep_last": 2,
       "threads": 1, "progress": False}
# float32 tolerance for weights after 8 AdamW steps: the two halves' gradients are summed in
# another order than the full batch's (measured max |difference| is reported in the README).
RTOL, ATOL = 1e-5, 1e-6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def one_process(*args):
    return subprocess.run([sys.executable, "-m", "diagssm", "train", *map(str, args)],
                          capture_output=True, text=True, env=clean_env(), timeout=300)


def two_processes(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "diagssm", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)


def weights(run_dir, step=STEPS):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = write_config(tmp / "t.yaml", run=RUN, model={"dropout": 0.0})
    one = one_process("--config", cfg, "--run-dir", tmp / "one")
    assert one.returncode == 0, one.stderr
    two = two_processes("--config", cfg, "--run-dir", tmp / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    return tmp, one, two


def test_two_processes_match_one_process(runs):
    tmp, one, two = runs
    a, b = weights(tmp / "one"), weights(tmp / "two")
    assert_same_weights(b, a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |two processes - one process| over the weights after {STEPS} steps: {diff:.3g}")
    # rank 0 alone logs and writes; the numbers are the global batch's (summed over ranks)
    assert two.stdout.count("distributed: 2 processes, backend gloo (device cpu)") == 1
    assert "single process; precision: fp32" in one.stdout
    r1, r2 = rows(tmp / "one"), rows(tmp / "two")
    assert [(r["step"], r["split"]) for r in r1] == [(r["step"], r["split"]) for r in r2]
    for x, y in zip(r1, r2):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=1e-4)
        assert float(y["metric"]) == pytest.approx(float(x["metric"]), abs=1e-6)
    ckpt = load_checkpoint(tmp / "two" / "checkpoints" / f"step_{STEPS:08d}.pt")
    assert len(ckpt["rng_ranks"]) == 2 and "rng_ranks" not in load_checkpoint(
        tmp / "one" / "checkpoints" / f"step_{STEPS:08d}.pt")


def test_two_processes_resume_a_one_process_checkpoint(runs):
    """--resume loads the checkpoint on every rank; the data order does not depend on the
    number of processes, so the continued run ends where the one-process run did."""
    tmp, _, _ = runs
    run = tmp / "resumed"
    shutil.copytree(tmp / "one", run)
    (run / "checkpoints" / f"step_{STEPS:08d}.pt").unlink()
    done = two_processes("--run-dir", run, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_00000004.pt'}: step 4" in done.stdout
    assert_same_weights(weights(run), weights(tmp / "one"))


def test_batch_norm_validation_is_of_the_saved_statistics(tmp_path):
    """With norm: batch every rank's last forward updates its BatchNorm running statistics with its
    own half of the batch; validation must use the ones the checkpoint saves (rank 0's)."""
    cfg = write_config(tmp_path / "t.yaml", run=RUN, model={"dropout": 0.0, "norm": "batch"})
    two = two_processes("--config", cfg, "--run-dir", tmp_path / "two")
    assert two.returncode == 0, two.stdout + two.stderr
    logged = [r for r in rows(tmp_path / "two") if r["split"] == "val" and int(r["step"]) == STEPS]
    out = subprocess.run([sys.executable, "-m", "diagssm", "eval", "--run-dir", str(tmp_path / "two"), "--split", "val",
                          "--checkpoint", f"step_{STEPS:08d}.pt"], capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr
    loss = float(out.stdout.split("val: loss ")[1].split(",")[0])
    assert float(logged[0]["loss"]) == pytest.approx(loss, rel=1e-5)  # both printed to 6 digits


def test_global_batch_must_divide():
    cfg = from_dict(TINY)
    world = World(device=torch.device("cpu"), rank=0, world_size=3)
    with pytest.raises(ValueError, match="optim.batch_size=16 is the global batch and must be divisible .* 3"):
        train_loader(make_task(cfg), 16, 0, world)
    halves = [train_loader(make_task(cfg), 16, 0, World(torch.device("cpu"), r, 2)).batch_sampler for r in (0, 1)]
    assert [len(b) for b in next(zip(*halves))] == [8, 8]


def test_make_world_reads_torchrun_variables():
    assert make_world("cpu", distributed=True, env={}).world_size == 1
    assert make_world("cpu", distributed=True, env={"WORLD_SIZE": "1"}).world_size == 1
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set; .*torchrun"):
        make_world("cpu", distributed=True, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        make_world("cpu", distributed=True, env={"WORLD_SIZE": "two"})


def test_close_releases_the_ddp_wrapper_before_the_group(tmp_path, monkeypatch):
    """The DDP wrapper holds the process group; if it outlives destroy_process_group, gloo's
    threads can abort the process at interpreter exit (SIGABRT, "terminate called without an
    active exception": 4 of 34 torchrun runs of the fixture above on a loaded 2-core machine,
    0 of 40 once close() drops the wrapper first). Rank 0 of 2 with the collectives stubbed:
    when the World is closed, no wrapper is alive."""
    import weakref

    from diagssm.train import loop

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.module = model
            self.refs = [self]  # a reference cycle: only gc.collect frees it, so that is tested too

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    class OneOfTwo(World):
        wrapper, alive_at_close = None, []

        def wrap_model(self, model):
            w = Wrapper(model)
            OneOfTwo.wrapper = weakref.ref(w)
            return w

        def barrier(self):
            pass

        def broadcast_object(self, obj):
            return obj

        def close(self):
            OneOfTwo.alive_at_close.append(OneOfTwo.wrapper() is not None)

    monkeypatch.setattr(loop, "make_world", lambda *a, **k: OneOfTwo(torch.device("cpu"), 0, 2, backend="gloo"))
    trainer = loop.Trainer(from_dict(TINY), tmp_path / "run")
    assert OneOfTwo.wrapper() is trainer.step_model
    trainer.close()
    assert OneOfTwo.alive_at_close == [False]


@pytest.mark.slow  # about 10 s: 100 steps twice plus a one-process reference
def test_sigterm_to_torchrun_saves_on_rank_0_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to its workers; the ranks agree on the step to stop at (the
    per-step all-reduce), rank 0 writes the checkpoint, and --resume on two processes ends at
    the one-process run's weights. torchrun itself exits 1 on SIGTERM (its own handler)."""
    import signal
    import time

    run = {**RUN, "max_steps": 100, "checkpoint_every": 10, "eval_every": 50, "log_every": 10}
    cfg = write_config(tmp_path / "t.yaml", run=run, model={"dropout": 0.0})
    ref = one_process("--config", cfg, "--run-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "diagssm", "train", "--config", str(cfg),
           "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "step_00000010.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    line = next(ln for ln in out.splitlines() if ln.startswith("SIGTERM at step "))
    step = int(line.split()[3].rstrip(":"))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt")["step"] == step
    done = two_processes("--run-dir", tmp_path / "run", "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}.pt'}: step {step}" in done.stdout
    assert_same_weights(weights(tmp_path / "run", 100), weights(tmp_path / "ref", 100))
