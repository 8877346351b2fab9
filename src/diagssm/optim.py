"""Parameter groups for the optimiser, built explicitly and printed.

The SSM parameters (A, B, dt; Lambda, W for DSS; Lambda, P, B, dt for S4) train at their own
learning rate with no weight decay (S4 paper, App. D; S4D paper, Sec. 5; S5 paper, App. G),
because decaying them pulls A towards 0 and dt away from its scale. Norm weights and biases are
not decayed either. Each layer lists its SSM parameters in the class attribute `ssm_params`.
"""
from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _group_of(module, name):
    if name in getattr(type(module), "ssm_params", ()):
        return "ssm"
    if isinstance(module, NORMS) or name == "bias":
        return "no_decay"
    return "decay"


def param_groups(model, lr, ssm_lr=1e-3, weight_decay=0.0, verbose=True):
    """Split `model`'s trainable parameters into three groups for torch.optim (e.g. AdamW):

        ssm:      every layer's `ssm_params`, at ssm_lr, weight_decay 0
        no_decay: norm weights and biases, at lr, weight_decay 0
        decay:    everything else, at lr, weight_decay

    Returns a list of dicts (empty groups are left out), each with a "name" and the names of
    its parameters under "param_names". A parameter shared by several modules (tied weights) is
    listed once, under its first name. Prints a summary unless verbose=False.
    """
    settings = {"ssm": (ssm_lr, 0.0), "no_decay": (lr, 0.0), "decay": (lr, weight_decay)}
    groups = {k: {"name": k, "params": [], "param_names": [], "lr": v[0], "weight_decay": v[1]}
              for k, v in settings.items()}
    seen = set()  # a parameter shared by two modules (tied weights) goes once, in its first module's group
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                g = groups[_group_of(module, name)]
                g["params"].append(p)
                g["param_names"].append(f"{mod_name}.{name}" if mod_name else name)
    result = [g for g in groups.values() if g["params"]]
    if verbose:
        print(describe(result))
    return result


def describe(groups):
    """One line per group: name, lr, weight decay, number of tensors and of scalars, some names."""
    lines = ["parameter groups:"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        names = sorted({pn.rsplit(".", 1)[-1] for pn in g["param_names"]})
        lines.append(f"  {g['name']:<8} lr={g['lr']:.2e} weight_decay={g['weight_decay']:<6g} "
                     f"{len(g['params'])} tensors, {n:,} numbers: {', '.join(names)}")
    return "\n".join(lines)
