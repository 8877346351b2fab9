"""Measure the memory tasks for their data card (docs/data/memory.md): split sizes, length,
answer balance and the chance / baseline scores, for the parameters of the given configs.

    python scripts/memory_stats.py configs/copy.yaml configs/adding.yaml ...

Per task: the answers' class shares on the train split (min and max over classes, and how many
classes occur), the test accuracy of always answering the train split's most frequent class
(per answer step for per-step tasks), and for the adding problem the test MSE of predicting 1
and of predicting the train mean.
"""
import sys
from collections import Counter

import torch
import yaml

from diagssm.tasks.registry import build_task


def answers(task, split):
    """The scored targets of a split: (n_answers,) class ids, or (n, 1) sums for adding."""
    ds = task.split(split)
    if task.name == "adding":
        return ds.y
    if task.head == "per_step":
        return ds.y[:, task.score_start:].reshape(-1).long()
    return ds.y


def describe(path):
    cfg = yaml.safe_load(open(path))["task"]
    task = build_task(cfg["name"], seed=cfg.get("seed", 0), **cfg.get("params", {}))
    L = len(task.train[0][0])
    lines = [f"{task.name} ({path}): params {task.params}",
             f"  splits {len(task.train)}/{len(task.val)}/{len(task.test)}, every sequence {L} steps"]
    train, test = answers(task, "train"), answers(task, "test")
    if task.name == "adding":
        lines.append(f"  y: train mean {train.mean():.4f}, std {train.std():.4f}; test MSE of predicting 1: "
                     f"{((test - 1) ** 2).mean():.4f}, of predicting the train mean: "
                     f"{((test - train.mean()) ** 2).mean():.4f} (1/6 = 0.1667)")
        return "\n".join(lines)
    counts = Counter(train.tolist())
    shares = torch.tensor(list(counts.values()), dtype=torch.float64) / len(train)
    top = counts.most_common(1)[0][0]
    lines.append(f"  answers: {len(train)} on train over {len(counts)} classes (of d_output={task.d_output}), "
                 f"share min {shares.min():.4f} max {shares.max():.4f} (uniform {1 / len(counts):.4f})")
    lines.append(f"  majority-class test accuracy {(test == top).double().mean():.4f} (chance {1 / len(counts):.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    for config in sys.argv[1:]:
        print(describe(config))
