"""Looking at a task: a text summary of its splits and examples, and a picture of a few of them.

`summary(task)` gives the split sizes, the input kind, the length range and the class balance;
`show(task, name, source, png)` calls the task's own `Source.show` when it has one, else
`generic_show` (the first examples as text and a line plot of their inputs).
"""
from pathlib import Path

import torch

from diagssm.tasks.base import item_length


def summary(task):
    """Lines describing the task: sizes, input, lengths, targets (measured on the splits)."""
    lines = [f"task {task.name}: encoder {task.encoder}, d_input {task.d_input}, d_output {task.d_output}, "
             f"head {task.head}, pooling {task.pooling}, metric {task.metric}"]
    for split in ("train", "val", "test"):
        data = task.split(split)
        lengths = torch.tensor([item_length(data[i]) for i in range(len(data))])  # (n,)
        line = (f"  {split:<5} {len(data):>7,} sequences, length {int(lengths.min())}..{int(lengths.max())} "
                f"(mean {lengths.double().mean():.0f})")
        if task.metric == "accuracy" and task.head != "per_step":
            y = torch.stack([torch.as_tensor(data[i][1]) for i in range(len(data))])  # (n,)
            counts = torch.bincount(y.long().flatten(), minlength=task.d_output)
            line += f", class shares {_shares(counts)}"
        lines.append(line)
    return lines


def _shares(counts):
    shares = counts.double() / counts.sum()
    if len(shares) > 12:
        return f"min {shares.min():.3f} max {shares.max():.3f} over {len(shares)} classes"
    return " ".join(f"{s:.3f}" for s in shares.tolist())


def generic_show(task, png, n=3):
    """Print the first n training examples compactly and plot their inputs to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = task.train
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.8 * n), squeeze=False)
    lines = []
    for i in range(min(n, len(data))):
        item = data[i]
        x, y, L = item[0], item[1], item_length(item)
        head = x[:12] if x.dim() == 1 else x[:4]  # the first steps
        head = [round(v, 3) for v in head.flatten().tolist()] if head.is_floating_point() else head.tolist()
        target = y.tolist() if torch.as_tensor(y).numel() <= 4 else f"{tuple(torch.as_tensor(y).shape)} per step"
        lines.append(f"  example {i}: length {L}, target {target}, x starts {head}")
        axes[i, 0].plot(x[:L].float().reshape(L, -1).numpy(), linewidth=0.6)
        axes[i, 0].set_title(f"{task.name} example {i} (target {target})", fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def show(task, source, png):
    """The task's examples as text (its Source.show, else generic_show); the picture goes to png."""
    return (source.show or generic_show)(task, png)
