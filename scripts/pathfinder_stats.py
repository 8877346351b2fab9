"""Measure the Pathfinder generator: drawing time, pixel statistics, class balance, connectivity.

    python scripts/pathfinder_stats.py --resolution 32 --contour-length 14 -n 200
    python scripts/pathfinder_stats.py --resolution 128 --contour-length 14 -n 20 --task-sizes 0

Draws n images in this process (seed --seed; labels alternate 1, 0, ...), then prints one line
per measure. Connectivity (8-connected flood fills, scipy.ndimage):
  own chain   each target ALONE (ink > 20% of its peak) with its dashes bridged by a dilation of
              radius margin + 1 is one region holding both its ends
  image join  image > 20% grey plus every contour's centre line (dashes joined): does a flood fill
              from marker 1 reach marker 2? (positives should; negatives that do are joined by
              touching contours)
  own join    the same fill over marker 1's contour alone (its ink > 20% of its peak plus its
              centre line) reaches marker 2 (all positives; a negative only where the other
              target ends on marker 1's contour)
  touch       the two targets' centre lines come within 1 pixel of each other
With --task-sizes N (default 200), also builds the `pathfinder` task with N train images (in a
temporary cache) and prints the class shares of its splits.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

from diagssm.tasks import pathfinder_snakes as snakes
from diagssm.tasks.pathfinder_draw import disk, lra_settings

# the same independent checks as the tests: polylines drawn pixel by pixel, 8-connected fills
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_tasks_pathfinder import rasterise as centre_line  # noqa: E402
from test_tasks_pathfinder import same_region as joined  # noqa: E402

EIGHT = np.ones((3, 3), dtype=bool)


def measure(e, s):
    """The connectivity measures of one example (module docstring)."""
    shape = e["image"].shape
    lines = [centre_line(snakes.contour_path(sn, s), shape) for sn in e["snakes"]]
    own = []
    for sn in e["snakes"][:2]:
        ink = snakes.contour_ink(sn, s, shape)
        region = ndimage.binary_dilation(ink > 0.2 * ink.max(), disk(e["margin"] + 1).astype(bool))
        own.append(ndimage.label(region, EIGHT)[1] == 1 and joined(region, sn.tail, sn.head))
    image_join = joined((e["image"] > 0.2 * 255) | np.any(lines, axis=0), *e["ends"])
    a = e["contours"][0] - 1
    ink = snakes.contour_ink(e["snakes"][a], s, shape)
    own_join = joined((ink > 0.2 * ink.max()) | lines[a], *e["ends"])
    touch = bool((ndimage.binary_dilation(lines[0], EIGHT) & lines[1]).any())
    return dict(own=all(own), image_join=image_join, own_join=own_join, touch=touch)


def draw(s, n, seed):
    calls = [0]
    inner = snakes.target_pair

    def counted(*args):
        calls[0] += 1
        return inner(*args)

    snakes.target_pair = counted
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    exs = [snakes.draw_example(s, (i + 1) % 2, rng) for i in range(n)]
    seconds = time.perf_counter() - start
    snakes.target_pair = inner
    return exs, seconds, calls[0]


def task_balance(resolution, contour_length, n):
    os.environ["DIAGSSM_CACHE"] = tempfile.mkdtemp(prefix="pathfinder-stats-")
    from diagssm.tasks.registry import build_task

    task = build_task("pathfinder", resolution=resolution, contour_length=contour_length, n_train=n,
                      n_val=max(2, n // 8), n_test=max(2, n // 8), workers=1)
    for split in ("train", "val", "test"):
        labels = task.split(split).labels
        print(f"  {split}: {len(labels)} images, positive share {labels.float().mean():.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--contour-length", type=int, default=14)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-sizes", type=int, default=200)
    args = p.parse_args(argv)
    s = lra_settings(args.resolution, args.contour_length)
    exs, seconds, calls = draw(s, args.n, args.seed)
    print(f"pathfinder {args.resolution}x{args.resolution}, contour length {args.contour_length}: {s}")
    print(f"  drawing: {1000 * seconds / args.n:.1f} ms per image ({seconds / args.n * 1000 / 60:.1f} min per 1000 "
          f"in one process); {calls / args.n:.1f} target-pair attempts per image (acceptance {args.n / calls:.4f})")
    images = np.stack([e["image"] for e in exs]).astype(float)  # (n, H, W)
    print(f"  pixels: mean grey {images.mean():.1f}, share > 0 {(images > 0).mean():.3f}, share > 20% grey "
          f"{(images > 51).mean():.3f}; marker centre grey min "
          f"{min(e['image'][tuple(x)] for e in exs for x in e['ends'])}")
    print(f"  distractors drawn: mean {np.mean([len(e['snakes']) - 2 for e in exs]):.2f} of {s.n_distractors}")
    m = [measure(e, s) for e in exs]
    for label in (1, 0):
        rows = [r for r, e in zip(m, exs) if e["label"] == label]
        shares = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
        print(f"  label {label} ({len(rows)}): " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    if args.task_sizes:
        task_balance(args.resolution, args.contour_length, args.task_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
