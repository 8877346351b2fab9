"""The training loop's parts: lr schedule, optimiser groups, data order, and exact resume."""
import math

import pytest
import torch

from diagssm.train.checkpoint import load_checkpoint
from diagssm.train.config import from_dict
from diagssm.train.data import EpochBatchSampler
from diagssm.train.loop import Trainer
from diagssm.train.setup import lr_factor, make_model, make_optimizer, make_task
from test_train_cli import TINY, TINY_DELAY, keep_threads, rows  # noqa: F401  (keep_threads: an autouse fixture)


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, warmup_steps=4, max_steps=12, schedule="cosine", min_lr_ratio=0.1) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[8] == pytest.approx(0.1 + 0.9 * 0.5) and f[12] == pytest.approx(0.1)
    assert f[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(50, 4, 12, "constant", 0.0) == 1.0


def test_optimizer_groups():
    cfg = from_dict(TINY)
    model = make_model(cfg.model, make_task(cfg))
    opt = make_optimizer(model, cfg.optim, verbose=False)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"ssm", "no_decay", "decay"}
    assert groups["ssm"]["lr"] == cfg.optim.ssm_lr and groups["ssm"]["weight_decay"] == 0
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == cfg.optim.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_data_order_is_a_function_of_seed_and_epoch():
    def batches(seed, epoch, start=0, n=50, bs=8, rank=0, world=1):
        s = EpochBatchSampler(n, bs, seed, rank, world)
        s.set_position(epoch, start)
        return list(s)

    assert batches(0, 3) == batches(0, 3) and batches(0, 3) != batches(0, 4) != batches(1, 3)
    flat = sum(batches(0, 0), [])
    assert len(batches(0, 0)) == 6 and len(set(flat)) == 48 and set(flat) < set(range(50)) and flat != sorted(flat)
    assert batches(0, 2, start=4) == batches(0, 2)[4:]  # resume skips consumed batches without reading them
    two = [batches(0, 1, bs=4, rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*two)] == batches(0, 1, bs=8)  # ranks split each global batch
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(5, 8, 0)


def final_state(run_dir, step):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")


@pytest.mark.parametrize("stop_at", [10, 17])  # at a checkpoint step; mid-epoch between checkpoints
def test_resume_equals_uninterrupted(tmp_path, stop_at):
    cfg = from_dict(TINY)
    Trainer(cfg, tmp_path / "straight").run()
    out = Trainer(cfg, tmp_path / "split").run(stop_after=stop_at)
    assert (out.status, out.step, out.exit_code) == ("stopped", stop_at, 0)
    assert Trainer(cfg, tmp_path / "split", resume=True).run().status == "completed"
    a, b = final_state(tmp_path / "straight", 40), final_state(tmp_path / "split", 40)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    assert a["best"] == b["best"] and a["val"] == b["val"]
    strip = lambda p: [line.rsplit(",", 1)[0] for line in p.read_text().splitlines()]  # noqa: E731 (drop time)
    assert strip(tmp_path / "straight" / "metrics.csv") == strip(tmp_path / "split" / "metrics.csv")


def test_resume_without_checkpoint_starts_at_zero(tmp_path, capsys):
    cfg = from_dict({**TINY, "run": {**TINY["run"], "max_steps": 3}})
    (tmp_path / "run").mkdir()
    out = Trainer(cfg, tmp_path / "run", resume=True).run()
    assert out.step == 3 and "--resume: no checkpoint in" in capsys.readouterr().out


@pytest.mark.parametrize("keep_last", [3, 1])  # the kept best's step file is on disk | none is left
def test_resume_sets_aside_a_best_written_after_its_checkpoint(tmp_path, keep_last, capsys):
    """A run killed after a validation that wrote best.pt but before its next checkpoint: the resume
    discards those steps, so that best.pt is not this run's; it must not outlive them."""
    run = {**TINY_DELAY["run"], "max_steps": 12, "eval_every": 2, "checkpoint_every": 6, "keep_last": keep_last}
    cfg = from_dict({**TINY_DELAY, "run": run})
    folder = tmp_path / "run" / "checkpoints"
    Trainer(cfg, tmp_path / "run").run()
    (folder / "step_00000012.pt").unlink()  # killed before it was written
    discarded = load_checkpoint(folder / "best.pt")["step"]
    assert discarded > 6  # the premise: a validation after the last kept checkpoint improved
    # resume with a changed setting that cannot improve (lr 1e-30: float32 weights stay as they are)
    resumed = Trainer(from_dict({**TINY_DELAY, "run": run, "optim": {**TINY_DELAY["optim"], "lr": 1e-30,
                                                                      "ssm_lr": 1e-30}}), tmp_path / "run", resume=True)
    resumed.run()
    assert f"moved to best_discarded_step{discarded:08d}.pt" in capsys.readouterr().out
    assert (folder / f"best_discarded_step{discarded:08d}.pt").exists()
    best = load_checkpoint(folder / "best.pt")
    assert best["step"] == resumed.best["step"] < discarded  # best.pt holds the best the run reports
    val = {int(r["step"]): float(r["metric"]) for r in rows(tmp_path / "run") if r["split"] == "val"}
    assert val[best["step"]] == pytest.approx(resumed.best["metric"], rel=1e-5)  # a row still in metrics.csv
    assert resumed.best["metric"] == pytest.approx(min(val.values()), rel=1e-5)


def test_resume_sets_aside_an_unreadable_best(tmp_path, capsys):
    cfg = from_dict({**TINY, "run": {**TINY["run"], "max_steps": 10}})
    Trainer(cfg, tmp_path / "run").run()
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"half a checkpoint")
    resumed = Trainer(from_dict({**TINY, "run": {**TINY["run"], "max_steps": 20}}), tmp_path / "run", resume=True)
    resumed.run()
    assert "best.pt: moved to best_unreadable.pt; best.pt is now step_00000010.pt" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == resumed.best["step"]


def test_throughput_leaves_out_evaluation(tmp_path, monkeypatch):
    """tok/s in the progress bar counts training time only: an evaluation inside a logging window
    (here one that takes 1 s more) no longer lowers it."""
    import time

    from diagssm.train.loop import Trainer as T
    validate, means, train_step, rates, train_time = T.validate, T.window_means, T.train_step, [], []

    def slow_validate(self, epoch):
        validate(self, epoch)
        time.sleep(1.0)

    def timed_step(self, batch):  # the training time, measured, so that a loaded machine still passes
        start = time.perf_counter()
        out = train_step(self, batch)
        train_time.append(time.perf_counter() - start)
        return out

    def recorded(self):
        out = means(self)
        rates.append((self.step, out[2]))
        return out

    monkeypatch.setattr(T, "validate", slow_validate)
    monkeypatch.setattr(T, "window_means", recorded)
    monkeypatch.setattr(T, "train_step", timed_step)
    cfg = from_dict({**TINY, "run": {**TINY["run"], "max_steps": 12, "log_every": 20, "eval_every": 10}})
    T(cfg, tmp_path / "run").run()
    tokens = 11 * cfg.optim.batch_size * TINY["task"]["params"]["seq_len"]  # steps 1-11, one window
    # the 1 s of evaluation after step 10 left out: the window's time is the steps' plus < 0.5 s (data)
    assert dict(rates)[11] > tokens / (sum(train_time[:11]) + 0.5)
