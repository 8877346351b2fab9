"""Loss and metric of a batch, for each kind of task output.

    classification (pooled):   cross-entropy;  metric: accuracy
    per-step classification:   cross-entropy over scored steps;  metric: accuracy
    regression, pooled or per step:  mean squared error (over scored steps and channels);  metric: mse

Per-step outputs are scored at steps score_start <= t < lengths[b] (the task's score_start).
`batch_stats` returns sums, so that means over many batches (and processes) are exact.
"""
import torch
from torch.nn import functional as F


def scored_steps(lengths, L, score_start):
    """Shapes: lengths (B,) -> mask (B, L) bool, True where a step is scored."""
    t = torch.arange(L, device=lengths.device)  # (L,)
    return (t >= score_start) & (t < lengths[:, None])  # (B, L)


def batch_stats(out, y, lengths, task):
    """(loss, loss_sum, metric_sum, count) of one batch; loss is the mean to differentiate.

    Shapes: out (B, d_output) or (B, L, d_output); y (B,) / (B, d) / (B, L) / (B, L, d); lengths (B,)
    """
    per_step = out.dim() == 3
    if per_step:
        mask = scored_steps(lengths, out.shape[1], task.score_start)  # (B, L)
        out, y = out[mask], y[mask]  # (n, d_output), (n,) or (n, d)
    if task.metric == "accuracy":
        losses = F.cross_entropy(out, y, reduction="none")  # (n,)
        correct = (out.argmax(-1) == y).sum()
        count = torch.tensor(losses.numel(), device=out.device)
        return losses.mean(), losses.sum().detach(), correct.to(out.dtype), count
    y = y.reshape(out.shape)
    squares = (out - y) ** 2  # (n, d)
    sq_sum = squares.sum()
    return squares.mean(), sq_sum.detach(), sq_sum.detach(), torch.tensor(squares.numel(), device=out.device)


def forward_stats(model, batch, task, world, rate=1.0):
    """Move `batch` = (x, y, lengths) to the device, run the model and return batch_stats.
    `rate` scales every SSM step size (a test at another sampling rate, `SequenceModel.forward`)."""
    x, y, lengths = (t.to(world.device) for t in batch)
    with world.autocast():
        out = model(x, lengths, rate=rate)
    return batch_stats(out.float(), y, lengths, task)


@torch.no_grad()
def evaluate(model, loader, task, world, max_batches=None, rate=1.0):
    """{"loss", "metric", "count"} over `loader` in eval mode (the mode is restored after),
    with every SSM step size scaled by `rate`."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=world.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        _, loss_sum, metric_sum, count = forward_stats(model, batch, task, world, rate)
        totals += torch.stack([loss_sum.double(), metric_sum.double(), count.double()])
    model.train(was_training)
    loss_sum, metric_sum, count = world.all_reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError(f"nothing to evaluate: the loader gave no scored steps (task {task.name!r})")
    return {"loss": loss_sum / count, "metric": metric_sum / count, "count": int(count)}
