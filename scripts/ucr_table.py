"""Print the data-card table of docs/data/ucr_uea.md: for each UCR/UEA set (default: every
classification set aeon ships), dimensions, classes, published split sizes (train = our train +
validation at the given task seed), length ranges and class counts, measured on the built task.

    python scripts/ucr_table.py [--seed 0] [--path FOLDER] [DATASET ...]
"""
import argparse

import torch

from diagssm.tasks.cache import DataError
from diagssm.tasks.registry import build_task
from diagssm.tasks.timeseries import shipped_sets


def lengths(data):
    """Shapes: -> (n,) int64 lengths of a split's cases."""
    return data.lengths if data.lengths is not None else torch.full((len(data),), data.x.shape[1])


def row(task, dataset):
    train_y = torch.cat([task.train.y, task.val.y])  # the published training set
    l_train, l_test = torch.cat([lengths(task.train), lengths(task.val)]), lengths(task.test)
    return (f"| {dataset} | {task.d_input} | {task.d_output} "
            f"| {len(train_y)} ({len(task.train)} + {len(task.val)}) "
            f"| {len(task.test)} | {int(l_train.min())}..{int(l_train.max())} "
            f"/ {int(l_test.min())}..{int(l_test.max())} "
            f"| {torch.bincount(train_y, minlength=task.d_output).tolist()} "
            f"| {torch.bincount(task.test.y, minlength=task.d_output).tolist()} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", help="set names (default: aeon's shipped sets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", help="a folder of <name>_TRAIN.ts / <name>_TEST.ts (default: aeon's)")
    args = parser.parse_args()
    print("| set | dims | classes | train (ours + val) | test | length train / test | train per class "
          "| test per class |\n|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets or shipped_sets():
        try:
            print(row(build_task("ucr", dataset=dataset, path=args.path, seed=args.seed), dataset))
        except DataError as err:  # e.g. aeon's regression sets (@targetLabel)
            print(f"| {dataset} | not read: {str(err).split(': ', 1)[-1][:70]} |")


if __name__ == "__main__":
    main()
