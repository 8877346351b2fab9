"""Build what a run trains from its config: the task, the model, AdamW and the lr schedule."""
import functools
import math

import torch

from diagssm.optim import param_groups
from diagssm.tasks.registry import build_task


def make_task(cfg):
    """The task of `cfg.task` (deterministic in task.seed)."""
    return build_task(cfg.task.name, seed=cfg.task.seed, **cfg.task.params)


def model_kwargs(model_cfg, task):
    """SequenceModel arguments: the config's, with encoder/pooling/head defaulting to the task's."""
    m = model_cfg
    return dict(d_input=task.d_input, d_output=task.d_output, d_model=m.d_model, n_layers=m.n_layers,
                layer=m.layer, layer_kwargs=dict(m.layer_kwargs), encoder=m.encoder or task.encoder,
                norm=m.norm, prenorm=m.prenorm, activation=m.activation, dropout=m.dropout,
                pooling=m.pooling or task.pooling, head=m.head or task.head, L=task.max_length)


def make_model(model_cfg, task):
    """The SequenceModel for `task` (initialised from torch's global RNG: seed it first)."""
    from diagssm.models import SequenceModel

    kwargs = model_kwargs(model_cfg, task)
    if kwargs["head"] == "retrieval":
        raise ValueError(f"model.head='retrieval' scores pairs of sequences; task {task.name!r} has single "
                         f"sequences (its head is {task.head!r})")
    try:
        return SequenceModel(**kwargs)
    except ValueError as e:  # the model's own checks name the argument; say which section it is in
        raise ValueError(f"config section 'model': {e}") from e


def make_optimizer(model, optim_cfg, verbose=True):
    """AdamW over diagssm.optim.param_groups: SSM parameters at ssm_lr without weight decay,
    norms and biases without weight decay, the rest at lr with weight_decay."""
    groups = param_groups(model, lr=optim_cfg.lr, ssm_lr=optim_cfg.ssm_lr,
                          weight_decay=optim_cfg.weight_decay, verbose=verbose)
    for g in groups:
        del g["param_names"]  # names are for printing; the optimiser's state_dict holds numbers only
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=optim_cfg.betas)


def lr_factor(step, warmup_steps, max_steps, schedule, min_lr_ratio):
    """The multiplier of every group's lr at 0-based step `step`:

        step < warmup:  (step + 1) / warmup                              (linear warm-up)
        then "cosine":  r + (1 - r) (1 + cos(pi p)) / 2,  p = (step - warmup) / (max_steps - warmup)
             "constant": 1
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    p = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def make_scheduler(optimizer, optim_cfg, max_steps):
    """LambdaLR with `lr_factor` (its state_dict holds the step count; the factor is rebuilt)."""
    factor = functools.partial(lr_factor, warmup_steps=optim_cfg.warmup_steps, max_steps=max_steps,
                               schedule=optim_cfg.schedule, min_lr_ratio=optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
