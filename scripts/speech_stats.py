"""Measure what docs/data/speech.md reports about SC-synthetic: build time, split sizes, voices,
class balance, spoken-word durations and the drawn augmentation parameters.

    python scripts/speech_stats.py                        # the default task (words=10)
    python scripts/speech_stats.py words=35 workers=2     # task parameters as KEY=VALUE (YAML values)

The build time is that of a fresh build only when the cache does not hold the task yet
(`diagssm data build sc_synthetic --force` rebuilds it).
"""
import sys
import time

import numpy as np
import torch
import yaml

from diagssm.tasks import audio
from diagssm.tasks.registry import build_task


def describe(name, values, unit=""):
    v = np.asarray(values, dtype=np.float64)
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return (f"{name}: min {q[0]:.2f}, 5% {q[1]:.2f}, median {q[2]:.2f}, mean {v.mean():.2f}, "
            f"95% {q[3]:.2f}, max {q[4]:.2f}{unit}")


def main(argv):
    params = {}
    for item in argv:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    print(audio.espeak_version())
    start = time.perf_counter()
    task = build_task("sc_synthetic", **params)
    print(f"build (or cache read): {time.perf_counter() - start:.1f} s; params {task.params}")
    for split in ("train", "val", "test"):
        ds = task.split(split)
        meta, L = ds.meta, ds.q.shape[1]
        counts = torch.bincount(ds.y, minlength=len(ds.classes)).tolist()
        print(f"\n{split}: {len(ds)} clips of {L} samples at {ds.rate} Hz, {len(meta['voices'])} voices, "
              f"int16 {ds.q.numel() * 2 / 1e6:.1f} MB")
        print(f"  per class: min {min(counts)}, max {max(counts)} ({dict(zip(ds.classes, counts))})")
        voice_counts = torch.bincount(meta["voice"].long(), minlength=len(meta["voices"]))
        print(f"  clips per voice: min {int(voice_counts.min())}, max {int(voice_counts.max())}")
        print("  " + describe("spoken word (s)", meta["n_word"].numpy() / ds.rate))
        print(f"  words cut at 1 s: {int((meta['n_word'] >= L).sum())}")
        print("  " + describe("word onset (s)", meta["offset"].numpy() / ds.rate))
        for key in ("speed", "pitch", "snr_db", "gain_db"):
            print("  " + describe(key, meta[key].numpy()))
        print("  " + describe("clip RMS", ds.waveforms().pow(2).mean(1).sqrt().numpy()))


if __name__ == "__main__":
    main(sys.argv[1:])
