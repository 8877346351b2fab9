"""Generated tasks for training runs: "recall" (classification) and "delay" (per-step regression).

recall: a sequence of `seq_len` tokens. Step 0 shows one of `n_symbols` symbols (ids
0 .. n_symbols-1, uniform); steps 1 .. length-1 are noise tokens drawn uniformly and independently
from `n_noise` further ids (n_symbols .. n_symbols+n_noise-1), so no symbol appears again. The
label is the symbol at step 0; chance accuracy is 1/n_symbols (10% by default). With
`min_len` < seq_len each sequence's length is uniform in [min_len, seq_len] (the rest is padding).
The model reads its answer at the last step (pooling "last"): the symbol must be carried through
the state across length-1 steps of noise, which only a long memory does. (Mean pooling would
see step 0's output directly and not need the memory: keep pooling "last" for this task.)

delay: `diagssm.tasks.memory.delayed_signal`: y[t] = u[t - delay] for smooth unit-variance noise
u; a per-step regression scored by mean squared error on t >= delay (predicting zero scores 1).
"""
import torch

from diagssm.tasks.base import (SequenceDataset, Source, Task, check_ints, pad_collate, per_step_collate,
                                 split_generator)
from diagssm.tasks.cache import cached
from diagssm.tasks.memory import delayed_signal


def recall_data(n, seq_len, n_symbols, n_noise, min_len, generator):
    """n recall sequences (see the module docstring).

    Shapes: returns x (n, seq_len) int64, y (n,) int64 in [0, n_symbols), lengths (n,) int64
    """
    y = torch.randint(n_symbols, (n,), generator=generator)  # (n,)
    x = torch.randint(n_symbols, n_symbols + n_noise, (n, seq_len), generator=generator)  # (n, L)
    x[:, 0] = y
    lengths = torch.randint(min_len, seq_len + 1, (n,), generator=generator)  # (n,)
    x[torch.arange(seq_len) >= lengths[:, None]] = 0  # padding
    return x, y, lengths


def recall_task(seq_len=256, n_symbols=10, n_noise=10, min_len=None, n_train=8192, n_val=512,
                n_test=1024, seed=0):
    """The recall task (module docstring): label = the symbol at step 0 of a noisy sequence.

    min_len: shortest sequence (default seq_len: all sequences are seq_len long).
    """
    min_len = seq_len if min_len is None else min_len
    check_ints(seq_len=(seq_len, 1), n_symbols=(n_symbols, 2), n_noise=(n_noise, 1), min_len=(min_len, 1),
                n_train=(n_train, 1), n_val=(n_val, 1), n_test=(n_test, 1))
    if min_len > seq_len:
        raise ValueError(f"min_len={min_len} must be <= seq_len={seq_len}")
    params = dict(seq_len=seq_len, n_symbols=n_symbols, n_noise=n_noise, min_len=min_len,
                  n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)

    def build():
        return {split: recall_data(n, seq_len, n_symbols, n_noise, min_len, split_generator(seed, split))
                for split, n in (("train", n_train), ("val", n_val), ("test", n_test))}

    data = cached("recall", params, build, version=1)
    splits = {split: SequenceDataset(x, y, lengths if min_len < seq_len else None)
              for split, (x, y, lengths) in data.items()}
    return Task("recall", **splits, d_input=n_symbols + n_noise, d_output=n_symbols, encoder="embedding",
                head="classification", pooling="last", metric="accuracy", collate=pad_collate, params=params)


def delay_task(seq_len=512, delay=200, smooth=8, n_train=2048, n_val=256, n_test=256, seed=0):
    """The delay task (module docstring): reproduce the input `delay` steps later.

    x, y are (seq_len, 1) float32; the first `delay` steps of y are zero and are not scored.
    """
    check_ints(seq_len=(seq_len, 1), delay=(delay, 0), smooth=(smooth, 1), n_train=(n_train, 1),
                n_val=(n_val, 1), n_test=(n_test, 1))
    params = dict(seq_len=seq_len, delay=delay, smooth=smooth, n_train=n_train, n_val=n_val,
                  n_test=n_test, seed=seed)

    def build():
        return {split: delayed_signal(n, seq_len, delay, smooth=smooth, generator=split_generator(seed, split))
                for split, n in (("train", n_train), ("val", n_val), ("test", n_test))}

    splits = {split: SequenceDataset(u, y) for split, (u, y) in cached("delay", params, build, version=1).items()}
    return Task("delay", **splits, d_input=1, d_output=1, encoder="linear", head="per_step", pooling="none",
                metric="mse", collate=per_step_collate(), score_start=delay, params=params)


TASKS = {"recall": recall_task, "delay": delay_task}
SOURCES = {
    "recall": Source("generated", "diagssm.tasks.synthetic: a symbol at step 0, then noise tokens",
                     "docs/data/memory.md"),
    "delay": Source("generated", "diagssm.tasks.memory.delayed_signal: smooth noise and its delayed copy",
                    "docs/data/memory.md"),
}
