"""The training loop: `Trainer(cfg, run_dir, resume).run()`.

Each step: forward, loss check, backward, gradient-norm check (and clipping), AdamW step,
scheduler step; then, on their schedules, a train row in metrics.csv, a validation pass (and
best.pt when it improves), a checkpoint. Decisions worth knowing:

- Reproducible resume: the data order is a function of (run.seed, epoch) (`data.py`) and a
  checkpoint holds the model, AdamW, the scheduler, every RNG state, the step and the position
  in the epoch, so a resumed run makes the same updates as an uninterrupted one (same device,
  same thread count): its final weights are bitwise equal.
- A NaN or infinite loss or gradient norm stops the run before the update, with
  `TrainingDiverged` naming the step; the bad state is not written, the last checkpoint stays.
- SIGINT/SIGTERM finish the current step, write a checkpoint and return exit code 130/143
  (128 + the signal number). A second signal acts at once (the previous handler is back).
- Only the main process (`World.is_main`) logs, draws the progress bar and writes files.
- Data-parallel runs (torchrun, `world.py`): every rank trains its slice of the global batch
  under DistributedDataParallel. Decisions that must agree across ranks are taken on summed
  numbers: each step all-reduces (divergence flag, signal flags, loss sum, metric sum, count,
  tokens), so a NaN or a signal on any rank stops every rank at the same step, and the logged
  numbers are those of the global batch. Rank 0 writes checkpoints while the others wait at a
  barrier; a checkpoint holds every rank's RNG states (dropout differs per rank: ranks draw
  from streams seeded by (run.seed, rank)); --resume loads it on every rank.
- run.precision=bf16: bf16 autocast around forward passes, SSM layers in float32
  (`world.keep_ssm_float32`). run.compile: torch.compile of the training model (of the DDP
  model when distributed); a compilation failure is a `CompileError`, never a silent fallback.
"""
import contextlib
import gc
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from diagssm.layers.base import NonFiniteInput
from diagssm.optim import param_groups
from diagssm.train.checkpoint import (CheckpointError, CheckpointFolder, load_checkpoint, load_into, rng_state,
                                     set_rng_state)
from diagssm.train.config import diff, from_dict, to_dict
from diagssm.train.config import save as save_config
from diagssm.train.data import eval_loader, train_loader
from diagssm.train.metrics import MetricsLog, NoLog, find_tensorboard
from diagssm.train.objective import evaluate, forward_stats
from diagssm.train.setup import make_model, make_optimizer, make_scheduler, make_task
from diagssm.train.world import CompileError, compile_model, make_world

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN or infinite; the message names the step."""


@dataclass
class Outcome:
    """How `Trainer.run` ended: status "completed", "interrupted" (a signal) or "stopped"
    (stop_after); exit_code 0, or 128 + the signal number; the last validation result."""

    status: str
    step: int
    exit_code: int
    checkpoint: Optional[Path]
    val: Optional[dict]


def seed_everything(seed):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed, rank, step=0):
    """The seed of rank `rank`'s random streams (dropout) in a distributed run."""
    return int(np.random.SeedSequence([0x5EED, seed, rank, step]).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def compile_errors(enabled):
    """Turn torch.compile's (dynamo's, inductor's) exceptions into a CompileError naming them."""
    try:
        yield
    except Exception as e:
        if enabled and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CompileError(f"run.compile=true: torch.compile failed ({type(e).__module__}.{type(e).__name__}: "
                               f"{first}); set run.compile=false to train without it") from e
        raise


class Trainer:
    """Builds a run from `cfg` in `run_dir` (resuming from its newest valid checkpoint if asked)."""

    def __init__(self, cfg, run_dir, resume=False):
        torch.set_flush_denormal(True)  # decaying states hit slow denormal arithmetic on CPUs (6x)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.world = make_world(cfg.run.device, cfg.run.precision, distributed=True)
        self.say = print if self.world.is_main else (lambda *a, **k: None)
        self.run_dir = Path(self.world.broadcast_object(str(self.run_dir)))  # the default name has the time
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        self.say(f"torch threads: {torch.get_num_threads()}" + ("" if cfg.run.threads else " (torch's default)")
                 + (" per process" if self.world.distributed else ""))
        self.say(self.world.describe())
        seed_everything(cfg.run.seed)
        self.task = make_task(cfg)
        self.model = make_model(cfg.model, self.task).to(self.world.device)  # the same on every rank
        if self.world.distributed:  # dropout: a stream per rank
            seed_everything(rank_seed(cfg.run.seed, self.world.rank))
        self.world.keep_precision(self.model)
        self.step_model = self.world.wrap_model(self.model)
        self.eval_model = self.model if self.world.distributed else self.step_model  # no DDP collectives in eval
        if cfg.run.compile:
            self.step_model = compile_model(self.step_model)
            self.eval_model = compile_model(self.eval_model) if self.world.distributed else self.step_model
            self.say("torch.compile: on (run.compile=true); the first steps and the first validation compile")
        else:
            self.say("torch.compile: off")
        self.optimizer = make_optimizer(self.model, cfg.optim, verbose=self.world.is_main)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, cfg.run.max_steps)
        self.loader = train_loader(self.task, cfg.optim.batch_size, cfg.run.seed, self.world)
        self.sampler = self.loader.batch_sampler
        self.val_loader = eval_loader(self.task.val, self.task, cfg.optim.batch_size, self.world)
        self.ckpts = CheckpointFolder(self.run_dir / "checkpoints", cfg.run.keep_last)
        self.step, self.elapsed, self.best, self.last_val = 0, 0.0, None, None
        self.last_checkpoint, self.last_checkpoint_step, self.lr = None, None, self.main_lr()
        self.session_start = time.perf_counter()
        self._reset_window()
        tensorboard = find_tensorboard(cfg.run.tensorboard) if self.world.is_main else None
        self.prepare_folder(resume)
        self.world.barrier()  # the folder exists and holds no temporary files before any rank reads it
        resume_step = self.restore() if resume else None
        if resume and self.world.is_main:  # after restore: a checkpoint that does not fit leaves it as it was
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.log = MetricsLog(self.run_dir, tensorboard, resume_step) if self.world.is_main else NoLog()
        self.say(self.log.backend)
        self.signal = self.agreed_signal = None

    def close(self):
        """Leave the process group (distributed runs); nothing to do in one process.

        The DDP wrapper holds the process group: it goes first, or gloo's threads outlive the
        destroyed group and abort the process at interpreter exit (SIGABRT, "terminate called
        without an active exception"; about 1 torchrun run in 10 on a loaded 2-core machine).
        """
        if self.world.distributed:
            self.step_model = self.model
            gc.collect()
        self.world.close()

    def prepare_folder(self, resume):
        """Create the run folder and write config.yaml; a fresh run refuses a used folder."""
        if not self.world.is_main:
            return
        used = [p.name for p in (self.run_dir / "config.yaml", self.run_dir / "metrics.csv", self.ckpts.folder)
                if p.exists()]
        if used and not resume:
            raise FileExistsError(f"run folder {self.run_dir} is in use (has {', '.join(used)}); "
                                  f"continue it with --resume or choose another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run writes it once its checkpoint has loaded (`restore`)
            save_config(self.cfg, self.run_dir / "config.yaml")
        if resume:
            for name in self.ckpts.remove_temporary():
                self.say(f"removed {name}: a temporary file left by an interrupted checkpoint write")

    # ---- checkpoints -------------------------------------------------------------------
    def state(self, rngs=None):
        """Everything a resumed run needs to continue exactly where this one is. `rngs`: every
        rank's rng_state() (`World.gather_objects`; default: this process's)."""
        rngs = rngs or [rng_state()]
        epoch, position = divmod(self.step, self.sampler.steps_per_epoch)
        self.sampler.set_position(epoch, position)  # where the next iteration starts (read at iter())
        extra = {"rng_ranks": rngs} if self.world.distributed else {}
        return {"format": 1, "step": self.step, "epoch": epoch, "position": position,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs[0], **extra,
                "sampler": self.sampler.state_dict(), "best": self.best, "elapsed": self.elapsed_now(),
                "val": self.last_val, "window": self.window.clone(), "config": to_dict(self.cfg)}

    def save(self):
        """Write step_<step>.pt (rank 0; every rank takes part in gathering the RNG states)."""
        if self.last_checkpoint_step != self.step:
            rngs = self.world.gather_objects(rng_state())
            self.write_on_main(f"the checkpoint of step {self.step}", lambda: self.ckpts.save(self.state(rngs)))
            self.last_checkpoint = self.ckpts.step_path(self.step)
        self.last_checkpoint_step = self.step
        self.world.barrier()

    def write_on_main(self, what, write):
        """`write()` on rank 0, then every rank learns whether it failed (a CheckpointError on all of
        them): an error on rank 0 alone had left the others waiting at their next collective until
        its timeout. A full disk is an error of one line, not a traceback."""
        error = None
        if self.world.is_main:
            try:
                write()
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        error = self.world.broadcast_object(error)
        if error is not None:
            raise CheckpointError(f"writing {what} failed: {error}")

    def restore(self):
        """Load the newest valid checkpoint; return its step (0 if there is none)."""
        # onto the CPU, where it was written from: load_state_dict copies the model's and the optimiser's
        # tensors to their parameters' device, and the RNG states, the sampler's generator and the
        # metrics window must stay CPU tensors (on a GPU run, map_location=device put them on the GPU)
        found = self.ckpts.latest_valid(map_location="cpu")
        if found is None:
            self.say(f"--resume: no checkpoint in {self.ckpts.folder}; starting at step 0")
            self.best = self.world.broadcast_object(self.set_aside_later_best(0) if self.world.is_main else None)
            return 0
        path, state = found
        if self.world.is_main:  # newer step files do not load: kept, they would outrank new ones in keep_last
            for bad in self.ckpts.step_files():
                if bad.name > path.name:
                    bad.replace(bad.with_name(bad.name + ".unreadable"))
                    self.say(f"{bad.name} does not load: renamed {bad.name}.unreadable")
        if self.cfg.run.max_steps < state["step"]:  # had ended at once, and config.yaml said the smaller number
            raise ValueError(f"run.max_steps={self.cfg.run.max_steps} is below the step of {path.name}, "
                             f"{state['step']}: nothing to train (diagssm eval --checkpoint evaluates an earlier step)")
        for key, (old, new) in diff(from_dict(state["config"]), self.cfg).items():
            self.say(f"resuming with a changed setting: {key}: {old!r} -> {new!r}")
        load_into(self.model, state["model"], path)
        load_into(self.optimizer, state["optimizer"], path, "the optimiser of this config")
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_optim_config()
        self.sampler.load_state_dict(state["sampler"])
        ranks = state.get("rng_ranks")
        if not self.world.distributed:
            set_rng_state(state["rng"])
        elif ranks is not None and len(ranks) == self.world.world_size:
            set_rng_state(ranks[self.world.rank])
        else:
            set_rng_state(state["rng"])
            seed_everything(rank_seed(self.cfg.run.seed, self.world.rank, state["step"]))
            self.say(f"the checkpoint was written by {len(ranks or [0])} process(es), this run has "
                     f"{self.world.world_size}: random streams (dropout) are re-seeded per rank")
        self.step, self.best, self.elapsed, self.last_val = state["step"], state["best"], state["elapsed"], state["val"]
        self.last_checkpoint, self.last_checkpoint_step, self.window = path, self.step, state["window"]
        self.say(f"resumed from {path}: step {self.step} (epoch {state['epoch']}, batch {state['position']})")
        self.best = self.world.broadcast_object(self.set_aside_later_best(self.step) if self.world.is_main else None)
        return self.step

    def set_aside_later_best(self, step):
        """Rank 0, on resume from `step`: a best.pt written after that step came from the part of the run
        the resume discards (its rows are cut from metrics.csv), and would outlive it. Rename it to
        best_discarded_step<N>.pt; best.pt becomes the kept best's step checkpoint if that is still on
        disk, else the best restarts from here. Returns the best to track."""
        path = self.ckpts.folder / "best.pt"
        if not path.exists():
            return self.best
        try:
            later = load_checkpoint(path)["step"]
        except CheckpointError as e:
            self.say(f"warning: {e}; set aside")
            later = None
        if later is not None and later <= step:
            return self.best
        aside = path.with_name("best_unreadable.pt" if later is None else f"best_discarded_step{later:08d}.pt")
        path.replace(aside)
        what = "best.pt" if later is None else f"best.pt (step {later}) came after the checkpoint resumed from"
        kept = self.best and self.ckpts.step_path(self.best["step"])
        if kept and kept.exists():
            self.ckpts.save_best(load_checkpoint(kept))
            self.say(f"{what}: moved to {aside.name}; best.pt is now {kept.name}, the best before it")
            return self.best
        self.say(f"{what}: moved to {aside.name}; the best is tracked again from step {step} "
                 f"(the weights of the best before it were not kept)")
        return None

    def apply_optim_config(self):
        """After a restore: the config's lr, ssm_lr, weight_decay and betas in every parameter group, at
        the schedule's current factor. The optimiser's and scheduler's saved states hold the values the
        run started with, so a changed setting (`--resume --set optim.lr=...`) had been announced and
        not used. Unchanged settings give the numbers the saved state holds (exact resume)."""
        o = self.cfg.optim
        fresh = {g["name"]: g for g in param_groups(self.model, lr=o.lr, ssm_lr=o.ssm_lr,
                                                    weight_decay=o.weight_decay, verbose=False)}
        at = self.scheduler.last_epoch
        for i, g in enumerate(self.optimizer.param_groups):
            f = fresh[g["name"]]
            g["weight_decay"], g["betas"], g["initial_lr"] = f["weight_decay"], tuple(o.betas), f["lr"]
            self.scheduler.base_lrs[i] = f["lr"]
            g["lr"] = f["lr"] * self.scheduler.lr_lambdas[i](at)

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, batch):
        """One optimiser step on `batch`; TrainingDiverged (before any update) on NaN/inf."""
        s, bad = self.step + 1, None
        try:
            loss, loss_sum, metric_sum, count = forward_stats(self.step_model, batch, self.task, self.world)
        except NonFiniteInput:  # the layers' input check: activations overflowed inside the model
            bad = "the forward pass failed (NaN or infinite values reached an SSM layer's input)"
        if bad is None and self.cfg.run.inject_nan_at == s:
            loss = loss * float("nan")
        if bad is None and not bool(torch.isfinite(loss)):
            bad = f"loss is {loss.item()}"
        # one all-reduce per step: every rank agrees on stopping, and logs the global batch's sums
        sums = [loss_sum.item(), metric_sum.item(), count.item()] if bad is None else [0.0, 0.0, 0.0]
        agreed = self.world.all_reduce_sum(torch.tensor(
            [float(bad is not None), float(self.signal == signal.SIGINT), float(self.signal == signal.SIGTERM),
             *sums, float(batch[2].sum())], dtype=torch.float64, device=self.world.device)).cpu()
        if agreed[0] > 0:
            self.diverged(bad or f"the loss is not finite on {int(agreed[0])} other process(es)", s)
        if agreed[1] > 0 or agreed[2] > 0:
            self.agreed_signal = self.signal or (signal.SIGINT if agreed[1] > 0 else signal.SIGTERM)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.check_finite("gradient norm", norm, s)
        self.lr = self.main_lr()
        self.optimizer.step()
        self.scheduler.step()
        self.step = s
        self.window += torch.cat([agreed[3:], torch.ones(1, dtype=torch.float64)])

    def check_finite(self, what, value, s):
        if not bool(torch.isfinite(value)):
            self.diverged(f"{what} is {value.item()}", s)

    def diverged(self, what, s):
        """Raise TrainingDiverged: what happened, at which step, and which checkpoint is good."""
        epoch, position = divmod(s - 1, self.sampler.steps_per_epoch)
        last = (f"the last good checkpoint is {self.last_checkpoint} (step {self.last_checkpoint_step})"
                if self.last_checkpoint else "no checkpoint was written before it")
        raise TrainingDiverged(f"{what} at step {s} (epoch {epoch}, batch {position}); "
                               f"stopped without updating or saving; {last}")

    def main_lr(self):
        groups = {g.get("name"): g for g in self.optimizer.param_groups}
        return (groups.get("decay") or self.optimizer.param_groups[0])["lr"]

    # ---- logging and evaluation ----------------------------------------------------------
    def _reset_window(self):
        self.window = torch.zeros(5, dtype=torch.float64)  # loss sum, metric sum, count, tokens, steps
        self.window_start = time.perf_counter()

    def window_means(self):
        loss_sum, metric_sum, count, tokens, _ = self.window.tolist()
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        return loss_sum / max(count, 1), metric_sum / max(count, 1), tokens / seconds

    def after_step(self, bar):
        r, s, last = self.cfg.run, self.step, self.step == self.cfg.run.max_steps
        epoch = (s - 1) // self.sampler.steps_per_epoch
        loss, metric, tok_s = self.window_means()
        bar.set_postfix({"loss": f"{loss:.4f}", self.task.metric: f"{metric:.4f}", "lr": f"{self.lr:.2e}",
                         "tok/s": f"{tok_s:,.0f}"}, refresh=False)
        bar.update(1)
        if s % r.log_every == 0 or last:
            self.log.log(s, epoch, "train", loss, metric, self.lr, self.elapsed_now())
            self._reset_window()
        paused = time.perf_counter()  # evaluation and checkpoints are not training: kept out of tok/s
        if s % r.eval_every == 0 or last:
            self.validate(epoch)
        if s % r.checkpoint_every == 0 or last:
            self.save()
        self.window_start += time.perf_counter() - paused

    def validate(self, epoch):
        self.world.broadcast_buffers(self.model)  # every rank evaluates the statistics checkpoints save
        with compile_errors(self.cfg.run.compile):
            self.last_val = evaluate(self.eval_model, self.val_loader, self.task, self.world)
        m = self.last_val["metric"]
        self.log.log(self.step, epoch, "val", self.last_val["loss"], m, self.lr, self.elapsed_now())
        if not self.cfg.run.progress:  # no bar: a line per validation, so a log shows how the run goes
            self.say(f"step {self.step}/{self.cfg.run.max_steps}: val loss {self.last_val['loss']:.4f}, "
                     f"{self.task.metric} {m:.4f} ({self.elapsed_now():.0f} s)")
        best = None if self.best is None else self.best["metric"]
        better = best is None or (m > best if self.task.higher_is_better else m < best)
        if better:
            self.best = {"metric": m, "step": self.step}
            rngs = self.world.gather_objects(rng_state())
            self.write_on_main("best.pt", lambda: self.ckpts.save_best(self.state(rngs)))

    def elapsed_now(self):
        return self.elapsed + time.perf_counter() - self.session_start

    # ---- the loop ------------------------------------------------------------------------
    def stop_signal(self):
        """The signal that stops the run: this process's at once; in a distributed run the one
        the ranks agreed on in the last step's all-reduce (so that all stop at the same step)."""
        return self.agreed_signal if self.world.distributed else self.signal

    def run(self, stop_after=None):
        """Train to run.max_steps (or to step `stop_after`, writing a checkpoint there, for
        tests and for running in slices); return an `Outcome`. Raises TrainingDiverged."""
        r = self.cfg.run
        self.say(f"run folder {self.run_dir}: task {self.task.name}, {self.sampler.steps_per_epoch} steps per epoch, "
                 f"{sum(p.numel() for p in self.model.parameters()):,} parameters, device {self.world.device}")
        self.session_start, self._previous = time.perf_counter(), self._install_handlers()
        bar = tqdm(total=r.max_steps, initial=self.step, disable=not (r.progress and self.world.is_main),
                   dynamic_ncols=True, desc="train")
        try:
            while self.step < r.max_steps and self.stop_signal() is None and self.step != stop_after:
                self.sampler.set_position(*divmod(self.step, self.sampler.steps_per_epoch))
                for batch in self.loader:
                    with compile_errors(r.compile):
                        self.train_step(batch)
                    self.after_step(bar)
                    if self.step >= r.max_steps or self.stop_signal() is not None or self.step == stop_after:
                        break
        finally:
            bar.close()
            self._restore_handlers()
            self.log.close()
        return self.finish()

    def finish(self):
        """Write the last checkpoint (if this step has none) and the curves; say how it ended."""
        self.save()
        sig = self.stop_signal()
        if sig is not None and self.step < self.cfg.run.max_steps:
            name = signal.Signals(sig).name
            self.say(f"{name} at step {self.step}: saved {self.last_checkpoint}; continue with "
                     f"diagssm train --run-dir {self.run_dir} --resume")
            return Outcome("interrupted", self.step, 128 + sig, self.last_checkpoint, self.last_val)
        if self.step < self.cfg.run.max_steps:
            self.say(f"stopped at step {self.step}: saved {self.last_checkpoint}")
            return Outcome("stopped", self.step, 0, self.last_checkpoint, self.last_val)
        if self.world.is_main:
            from diagssm.train.curves import plot_curves

            plot_curves(self.run_dir, metric_name=self.task.metric)
        best = (f"; best val {self.task.metric} {self.best['metric']:.4f} at step {self.best['step']}"
                if self.best else "")
        self.say(f"done: step {self.step}, val {self.task.metric} {self.last_val['metric']:.4f}{best}, "
                 f"{self.elapsed_now():.1f} s; run folder {self.run_dir}")
        return Outcome("completed", self.step, 0, self.last_checkpoint, self.last_val)

    def _install_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            self.say("signal handlers not installed (not the main thread): SIGINT/SIGTERM will not save a checkpoint")
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _restore_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        """Finish the step, then save and stop (`run`); a second signal gets the old handler."""
        self.signal = signum
        signal.signal(signum, self._previous[signum])
