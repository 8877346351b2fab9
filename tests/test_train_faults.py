"""Faults: a NaN stops the run and keeps the last good checkpoint; checkpoint writes are atomic;
truncated checkpoints and leftover temporary files are never loaded."""
import os
import socket
from pathlib import Path

import pytest
import torch

from diagssm.train import checkpoint as ckpt_mod
from diagssm.train.checkpoint import CheckpointError, CheckpointFolder, atomic_save, load_checkpoint
from diagssm.train.cli import main
from diagssm.train.config import from_dict
from diagssm.train.loop import Trainer
from test_train_cli import TINY, keep_threads, rows, write_config  # noqa: F401  (keep_threads: autouse)


def test_nan_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cfg_path = write_config(tmp_path / "t.yaml", run={"checkpoint_every": 5, "inject_nan_at": 13})
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 13 (epoch 0, batch 12); stopped without updating or saving" in err
    assert "the last good checkpoint is " + str(tmp_path / "run" / "checkpoints" / "step_00000010.pt") in err
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["best.pt", "step_00000005.pt", "step_00000010.pt"]  # keep_last 2; nothing after step 12
    assert max(int(r["step"]) for r in rows(tmp_path / "run")) == 10
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_from_a_huge_learning_rate(tmp_path, capsys):
    cfg_path = write_config(tmp_path / "t.yaml", optim={"lr": 1e30, "warmup_steps": 0}, model={"dropout": 0.0})
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert " at step 2 (epoch 0, batch 1); stopped without updating or saving" in err  # step 1 made the weights ~1e30


def test_nan_before_any_checkpoint_says_so(tmp_path):
    cfg = from_dict({**TINY, "run": {**TINY["run"], "inject_nan_at": 1}})
    with pytest.raises(RuntimeError, match="loss is nan at step 1 .*no checkpoint was written before it"):
        Trainer(cfg, tmp_path / "run").run()


def test_activations_that_overflow_stop_the_run_without_the_layers_library_hint(tmp_path):
    cfg = from_dict({**TINY, "run": {**TINY["run"], "max_steps": 3}})
    trainer = Trainer(cfg, tmp_path / "run")
    with torch.no_grad():
        trainer.model.encoder.weight.mul_(1e38)  # the embedding overflows before the first SSM layer
    with pytest.raises(RuntimeError, match=r"NaN or infinite values reached an SSM layer's input\) at step 1") as e:
        trainer.run()
    assert "check_finite" not in str(e.value)  # that is advice for the library's users, not the CLI's


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3)) and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_atomic_save_keeps_other_runtime_errors(tmp_path):
    """Only torch.save's failed writes are OSErrors (a full disk); a pickling error stays itself."""
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        atomic_save({"a": Unpicklable()}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_use_a_temporary_name_of_their_own(tmp_path, monkeypatch):
    """Named by the PID alone, two writers on two machines sharing a folder (NFS) could write one
    temporary file: the name has the host and a random part too."""
    names = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(Path(src).name), real_replace(src, dst)))
    for _ in range(2):
        atomic_save({"a": torch.ones(3)}, tmp_path / "c.pt")
    assert names[0] != names[1] and all(n.startswith(f".c.pt.{socket.gethostname()}.{os.getpid()}.") for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("error,said", [
    (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
    # torch.save's archive writer when the disk fills at some points (had escaped as a traceback, exit 1)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
     "OSError: torch.save could not write step_00000010.pt (a full disk?): [enforce fail"),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_one(tmp_path, capsys, monkeypatch, error,
                                                                           said):
    """A full disk: one line naming the step and the OS error, exit 2; the earlier checkpoint stays.
    (Under torchrun every rank learns of rank 0's failure and stops, instead of waiting for it.)"""
    cfg_path = write_config(tmp_path / "t.yaml", run={"checkpoint_every": 5, "eval_every": 100})
    calls = []

    def full_disk(obj, f):
        step = obj.get("step") if isinstance(obj, dict) else None  # checkpoints; the task cache is also saved
        calls.append(step)
        if step == 10:
            raise error
        return torch.serialization.save(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    assert main(["train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: writing the checkpoint of step 10 failed: {said}" in err
    assert "Traceback" not in err and [c for c in calls if c is not None] == [5, 10]
    folder = CheckpointFolder(tmp_path / "run" / "checkpoints", 2)
    assert [p.name for p in folder.step_files()] == ["step_00000005.pt"]
    assert load_checkpoint(folder.step_files()[0])["step"] == 5


def make_run(tmp_path, max_steps=30):
    cfg = from_dict({**TINY, "run": {**TINY["run"], "max_steps": max_steps, "keep_last": 3}})
    Trainer(cfg, tmp_path / "run").run()
    return cfg, CheckpointFolder(tmp_path / "run" / "checkpoints", 3)


def test_truncated_checkpoint_and_temp_file_are_skipped_on_resume(tmp_path, capsys):
    cfg, folder = make_run(tmp_path)
    newest = folder.folder / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, as by a crash without atomic writes
    (folder.folder / ".step_00000040.pt.999.tmp").write_bytes(b"partial")
    capsys.readouterr()
    trainer = Trainer(cfg, tmp_path / "run", resume=True)
    captured = capsys.readouterr()
    assert trainer.step == 20 and "resumed from " + str(folder.folder / "step_00000020.pt") in captured.out
    assert f"warning: skipping {newest}: not a readable checkpoint" in captured.err
    assert "removed .step_00000040.pt.999.tmp" in captured.out
    assert not (folder.folder / ".step_00000040.pt.999.tmp").exists()
    # set aside: kept under its name it would count as the newest, and keep_last would delete new ones
    assert "step_00000030.pt does not load: renamed step_00000030.pt.unreadable" in captured.out
    assert [p.name for p in folder.step_files()] == ["step_00000010.pt", "step_00000020.pt"]


def test_an_unreadable_newest_checkpoint_does_not_push_out_new_ones(tmp_path):
    cfg, folder = make_run(tmp_path)  # step_10, step_20, step_30 (keep_last 3)
    newest = folder.folder / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    resumed = from_dict({**TINY, "run": {**TINY["run"], "max_steps": 30, "keep_last": 1}})
    Trainer(resumed, tmp_path / "run", resume=True).run(stop_after=25)  # stops and saves step 25
    assert [p.name for p in folder.step_files()] == ["step_00000025.pt"]
    assert Trainer(resumed, tmp_path / "run", resume=True).step == 25


def test_no_valid_checkpoint_is_an_error_naming_the_files(tmp_path, capsys):
    cfg, folder = make_run(tmp_path)
    for p in folder.step_files():
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        folder.latest_valid()
    assert all(str(p) in str(e.value) for p in folder.step_files())
    bad = folder.folder / "step_00000030.pt"
    assert main(["eval", "--run-dir", str(tmp_path / "run"), "--checkpoint", str(bad)]) == 2
    assert f"{bad}: not a readable checkpoint" in capsys.readouterr().err


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: not a diagssm checkpoint \\(missing format, step"):
        load_checkpoint(tmp_path / "x.pt")
