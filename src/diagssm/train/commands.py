"""What `diagssm train`, `diagssm eval` and `diagssm plot <run-dir>` do (parsers: cli.py).

`diagssm train` also runs data-parallel under torchrun (`torchrun --nproc_per_node=N -m diagssm
train ...`, see `world.py`); eval, generate and plot are single-process commands.
"""
import time
from pathlib import Path

import torch

from diagssm.layers.base import check_rate
from diagssm.train import config as config_mod
from diagssm.train.checkpoint import CheckpointFolder, load_into
from diagssm.train.data import eval_loader
from diagssm.train.loop import Trainer, TrainingDiverged
from diagssm.train.objective import evaluate
from diagssm.train.setup import make_model, make_task
from diagssm.train.world import make_world


def resolve_config(config, overrides, run_dir, resume):
    """The run's config: --config (or, resuming, the run folder's config.yaml) with --set applied."""
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --run-dir: the folder of the run to continue")
        saved = Path(run_dir) / "config.yaml"
        if config is None and not saved.exists():
            raise FileNotFoundError(f"{saved}: no config.yaml; is {run_dir} a run folder?")
        return config_mod.load(config or saved, overrides)
    if config is None:
        raise ValueError("--config is required to start a run (e.g. --config configs/quickstart.yaml)")
    return config_mod.load(config, overrides)


def default_run_dir(config):
    """runs/<config file stem>-<date>-<time>."""
    return Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args):
    cfg = resolve_config(args.config, args.set, args.run_dir, args.resume)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    trainer = Trainer(cfg, run_dir, resume=args.resume)  # under torchrun: one of WORLD_SIZE processes
    try:
        code = trainer.run().exit_code
    except TrainingDiverged:  # every rank stops at the same step (loop.py): leave the group together
        trainer.close()
        raise
    # Other errors skip close(): destroying the group while other ranks are in a collective hangs;
    # torchrun ends the other processes when one fails.
    trainer.close()
    return code


def load_run(run_dir, checkpoint="latest", device="cpu", overrides=()):
    """(cfg, task, model in eval mode, checkpoint path, checkpoint dict) of a run folder;
    `overrides` (--set strings) change its config, e.g. the task's test data."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: no config.yaml; is {run_dir} a run folder?")
    cfg = config_mod.load(run_dir / "config.yaml", overrides)
    task = make_task(cfg)
    model = make_model(cfg.model, task)
    path, state = CheckpointFolder(run_dir / "checkpoints", cfg.run.keep_last).resolve(checkpoint)
    load_into(model, state["model"], path)
    return cfg, task, model.to(device).eval(), path, state


def cmd_eval(args):
    check_rate(args.rate, "--rate")  # the layers' own check, before the run is loaded
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")  # 0 had meant the run's batch size
    torch.set_flush_denormal(True)
    cfg, task, model, path, state = load_run(args.run_dir, args.checkpoint, overrides=args.set)
    world = make_world(args.device or cfg.run.device, cfg.run.precision)  # as the run validated
    world.keep_precision(model.to(world.device))
    if world.precision == "bf16":
        print("precision: bf16 autocast, SSM layers in float32 (the run's; --set run.precision=fp32 for fp32)")
    loader = eval_loader(task.split(args.split), task, args.batch_size or cfg.optim.batch_size)
    result = evaluate(model, loader, task, world, rate=args.rate)
    at_rate = "" if args.rate == 1.0 else f" at rate {args.rate:g}"
    print(f"{args.split}{at_rate}: loss {result['loss']:.6g}, {task.metric} {result['metric']:.6g} "
          f"over {result['count']:,} scored outputs "
          f"({path}, step {state['step']})")
    return 0


def cmd_plot_run(run_dir, out):
    from diagssm.train.curves import plot_curves

    print(f"saved {plot_curves(run_dir, out)}")
    return 0
