"""Measure a ListOps build for the data card (docs/data/listops.md): build time, split sizes,
length distribution, label balance, nesting depth.

    python scripts/listops_stats.py                                  # LRA defaults (100,000 trees)
    python scripts/listops_stats.py --param min_length=100 --param max_length=512 --param n_train=20000
    python scripts/listops_stats.py --task listops_lra --param path=lra_release/listops-1000

The first run builds (and caches) the task; the time printed is the build's, or the cache read's.
"""
import argparse
import time

import numpy as np
import yaml

from diagssm.tasks import cache, listops_gen, registry


def depths(data):
    """The deepest node of each expression (the root has depth 1). Shapes: returns (n,) int64."""
    x = data.x.numpy()  # (n, L) uint8
    opens = (x >= listops_gen.FIRST_OP) & (x < listops_gen.END)  # (n, L)
    nesting = np.cumsum(opens, axis=1) - np.cumsum(x == listops_gen.END, axis=1)  # (n, L) open operators
    digit = (x >= 1) & (x <= 10)  # (n, L): a digit sits one level below the open operators
    return np.where(digit, nesting + 1, 0).max(axis=1)


def describe(name, data):
    lengths, labels = data.lengths.numpy(), data.y.numpy()
    q = np.percentile(lengths, [0, 10, 50, 90, 100]).astype(int)
    balance = np.bincount(labels, minlength=10) / len(labels)
    d = np.bincount(depths(data), minlength=11)[1:]
    print(f"{name:<5} n={len(data):>6}  length min/p10/median/p90/max = {'/'.join(map(str, q))}, "
          f"mean {lengths.mean():.0f}")
    print(f"      labels 0-9 (%): {' '.join(f'{100 * b:.1f}' for b in balance)}")
    print(f"      deepest node 1-10 (count): {' '.join(map(str, d))}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="listops", choices=("listops", "listops_lra"))
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    params = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.param)}
    cache.show_progress(True)
    start = time.perf_counter()
    task = registry.build_task(args.task, **params)
    print(f"{args.task} {params}: built or read in {time.perf_counter() - start:.1f} s")
    for split in ("train", "val", "test"):
        describe(split, task.split(split))


if __name__ == "__main__":
    main()
