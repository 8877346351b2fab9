"""`python -m diagssm train` in a subprocess: kill -9 mid-epoch, SIGTERM, SIGINT; then --resume
ends with the same weights as an uninterrupted run (bitwise, same seed, CPU, one thread)."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from diagssm.train.checkpoint import CheckpointFolder, load_checkpoint
from test_train_cli import write_config

MAX_STEPS = 200  # 16 steps per epoch: checkpoints every 10 steps fall mid-epoch (except at 80, 160)
RUN = {"max_steps": MAX_STEPS, "checkpoint_every": 10, "eval_every": 50, "log_every": 10, "keep_last": 3}


def train_cmd(*args):
    return [sys.executable, "-m", "diagssm", "train", *map(str, args)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config file and the final weights of an uninterrupted run of it."""
    tmp = tmp_path_factory.mktemp("signals")
    cfg_path = write_config(tmp / "t.yaml", run=RUN)
    done = subprocess.run(train_cmd("--config", cfg_path, "--run-dir", tmp / "ref"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return cfg_path, load_checkpoint(tmp / "ref" / "checkpoints" / f"step_{MAX_STEPS:08d}.pt")["model"]


def start_and_wait_for_checkpoint(cfg_path, run_dir):
    """Start a training subprocess; return it once it has written a checkpoint (still running)."""
    proc = subprocess.Popen(train_cmd("--config", cfg_path, "--run-dir", run_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, f"training exited before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be interrupted; make the run longer"
    return proc


def resume_and_compare(cfg_path, run_dir, reference, from_step):
    done = subprocess.run(train_cmd("--run-dir", run_dir, "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{from_step:08d}.pt'}: step {from_step}" in done.stdout
    final = load_checkpoint(run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}.pt")["model"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)


def test_sigkill_mid_epoch_then_resume(setup, tmp_path):
    cfg_path, reference = setup
    proc = start_and_wait_for_checkpoint(cfg_path, tmp_path / "run")
    proc.kill()  # SIGKILL: no handler runs, no checkpoint is written at the kill
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    path, state = CheckpointFolder(tmp_path / "run" / "checkpoints", 3).latest_valid()
    assert 0 < state["step"] < MAX_STEPS and state["position"] > 0  # resumes in the middle of an epoch
    resume_and_compare(cfg_path, tmp_path / "run", reference, state["step"])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits(setup, tmp_path, sig, code):
    cfg_path, reference = setup
    proc = start_and_wait_for_checkpoint(cfg_path, tmp_path / "run")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{sig.name} at step "))
    step = int(line.split()[3].rstrip(":"))
    saved = tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt"
    assert f"saved {saved}; continue with diagssm train --run-dir {tmp_path / 'run'} --resume" in line
    assert load_checkpoint(saved)["step"] == step
    resume_and_compare(cfg_path, tmp_path / "run", reference, step)
