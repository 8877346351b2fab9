"""Memory tasks generated here: copying, delayed copy, selective copying, associative recall,
induction heads and the adding problem (card: docs/data/memory.md). Also `delayed_signal`, the
data of synthetic.py's "delay" task.

    copy            Arjovsky, Shah & Bengio 2016 ("Unitary evolution RNNs", Sec. 4.1), after
                    Hochreiter & Schmidhuber 1997: n_copy symbols, delay - 1 blanks, a delimiter,
                    n_copy blanks; the output repeats the symbols on the last n_copy steps.
    delayed_copy    y[t] = x[t - delay] on uniform random tokens: the token form of the delay task
                    (the "lag" option of the copying data in the S4 repository, state-spaces/s4).
    selective_copy  Gu & Dao 2023 (Mamba, Secs. 3.1, 4.1.1, App. E.1): n_copy data tokens at random places
                    among noise tokens, then n_copy markers on which they are output in order.
    assoc_recall    Fu et al. 2023 (H3, Sec. 3.1), as in the H3 authors' generator (HazyResearch/
                    safari, synthetics.py): key-value pairs, a query marker, a key; answer: its value.
    induction_heads Olsson et al. 2022; Gu & Dao 2023 (Sec. 4.1.2): random tokens with a trigger
                    token somewhere; the trigger again at the end; answer: the token that followed it.
    adding          Hochreiter & Schmidhuber 1997, in Arjovsky et al. 2016's form: values uniform
                    in [0, 1] and a marker channel with one 1 in each half; y = sum of the 2 marked values.

Generation is vectorised over sequences and steps (L = 16384 with 4400 sequences builds and is
cached in about 2 s); tokens and per-step targets are stored as uint8 (int16 above 256 ids).
Per-step tasks are scored on t >= score_start (the answer steps) by `train.objective`.
"""
import math

import torch

from diagssm.tasks import cache
from diagssm.tasks.base import SPLITS, SequenceDataset, Source, Task, check_ints, pad_collate, split_generator
from diagssm.tasks.memory_show import show_adding, show_tokens

VERSION = 1
CHUNK = 1 << 22  # steps generated at once (rows of a split at a time): bounds the temporaries
SIZES = dict(n_train=8192, n_val=512, n_test=1024)


def delayed_signal(n, L, delay, smooth=8, generator=None, dtype=torch.float32):
    """n smooth random signals of length L and their copies delayed by `delay` steps.

    u is white noise averaged over `smooth` steps and rescaled to unit variance (band-limited,
    so a finite state can carry it); y[t] = u[t - delay], zero for t < delay. Score on t >= delay.

    Shapes: returns u, y of shape (n, L, 1)
    """
    for name, value, low in (("n", n, 1), ("L", L, 1), ("delay", delay, 0), ("smooth", smooth, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if delay >= L:
        raise ValueError(f"delay={delay} must be shorter than L={L}")
    x = torch.randn(n, L + smooth - 1, generator=generator, dtype=torch.float64)  # (n, L + s - 1)
    u = x.unfold(1, smooth, 1).mean(-1) * math.sqrt(smooth)  # (n, L)
    y = torch.nn.functional.pad(u, (delay, 0))[:, :L]  # (n, L)
    return u[..., None].to(dtype), y[..., None].to(dtype)


# ---- helpers ----------------------------------------------------------------------------

def _check_sizes(n_train, n_val, n_test, seed):
    check_ints(n_train=(n_train, 1), n_val=(n_val, 1), n_test=(n_test, 1), seed=(seed, 0))


def token_dtype(n_ids):
    """The smallest integer dtype that holds ids 0 .. n_ids-1."""
    return torch.uint8 if n_ids <= 256 else torch.int16 if n_ids <= 32768 else torch.int32


def token_collate(items):
    """pad_collate with per-step token targets, which are stored compactly and returned as int64
    (cross-entropy needs int64 class ids). Shapes: -> x (B, L), y (B, L) int64, lengths (B,)"""
    x, y, lengths = pad_collate(items, per_step_targets=True)
    return x, y.long(), lengths


def generate(make, n, seq_len, generator):
    """make(n, generator) (a dict of tensors with n rows), computed CHUNK // seq_len rows at a
    time from the same generator, so that L = 16384 with thousands of rows needs little memory."""
    rows = max(1, CHUNK // seq_len)
    parts = [make(min(rows, n - i), generator) for i in range(0, n, rows)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _cached_splits(name, params, make, seq_len):
    """{split: generate(make, n_split, seq_len, generator of (seed, split))}, through the task cache."""
    def build():
        return {s: generate(make, params[f"n_{s}"], seq_len, split_generator(params["seed"], s)) for s in SPLITS}

    return cache.cached(name, params, build, VERSION)


def _token_task(name, params, make, seq_len, **kwargs):
    """A Task whose splits are SequenceDatasets of make(n, generator) = {"x", "y"}."""
    data = _cached_splits(name, params, make, seq_len)
    splits = {s: SequenceDataset(data[s]["x"], data[s]["y"]) for s in SPLITS}
    return Task(name, **splits, encoder="embedding", metric="accuracy", params=params, **kwargs)


# ---- copying ------------------------------------------------------------------------------

def copy_data(n, delay, n_copy, n_symbols, generator):
    """Arjovsky et al. 2016's copy task (their T = delay). Ids: 0 blank, 1..n_symbols data,
    n_symbols+1 delimiter. x: the n_copy symbols, delay-1 blanks, the delimiter, n_copy blanks;
    y: delay + n_copy blanks, then the symbols. L = delay + 2 n_copy; y[t] = x[t - delay - n_copy].

    Shapes: returns {"x": (n, L), "y": (n, L)} uint8/int16
    """
    L, dtype = delay + 2 * n_copy, token_dtype(n_symbols + 2)
    symbols = torch.randint(1, n_symbols + 1, (n, n_copy), generator=generator).to(dtype)  # (n, n_copy)
    x = torch.zeros(n, L, dtype=dtype)  # (n, L)
    y = torch.zeros(n, L, dtype=dtype)  # (n, L)
    x[:, :n_copy] = symbols
    x[:, n_copy + delay - 1] = n_symbols + 1  # the delimiter, right before the answer steps
    y[:, L - n_copy:] = symbols
    return {"x": x, "y": y}


def copy_task(delay=500, n_copy=10, n_symbols=8, n_train=SIZES["n_train"], n_val=SIZES["n_val"],
              n_test=SIZES["n_test"], seed=0):
    """The copy task (`copy_data`): per-step classification scored on the last n_copy steps
    (chance 1/n_symbols). Defaults: Arjovsky et al.'s n_copy = 10, 8 symbols, T = 500.

    Shapes: x (L,) token ids < n_symbols + 2; y (L,) ids < n_symbols + 1 (0 = blank), L = delay + 2 n_copy
    """
    check_ints(delay=(delay, 1), n_copy=(n_copy, 1), n_symbols=(n_symbols, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    params = dict(delay=delay, n_copy=n_copy, n_symbols=n_symbols, n_train=n_train, n_val=n_val,
                  n_test=n_test, seed=seed)
    make = lambda n, g: copy_data(n, delay, n_copy, n_symbols, g)  # noqa: E731
    return _token_task("copy", params, make, delay + 2 * n_copy, d_input=n_symbols + 2,
                       d_output=n_symbols + 1, head="per_step", pooling="none", collate=token_collate,
                       score_start=delay + n_copy)


def delayed_copy_data(n, seq_len, delay, n_symbols, generator):
    """Uniform random tokens 0..n_symbols-1; y[t] = x[t - delay] for t >= delay, 0 before.

    Shapes: returns {"x": (n, L), "y": (n, L)} uint8/int16
    """
    dtype = token_dtype(n_symbols)
    x = torch.randint(n_symbols, (n, seq_len), generator=generator).to(dtype)  # (n, L)
    y = torch.zeros_like(x)  # (n, L)
    y[:, delay:] = x[:, :seq_len - delay]
    return {"x": x, "y": y}


def delayed_copy_task(seq_len=1024, delay=256, n_symbols=8, n_train=SIZES["n_train"], n_val=SIZES["n_val"],
                      n_test=SIZES["n_test"], seed=0):
    """Delayed copy (`delayed_copy_data`): output the token seen `delay` steps ago, at every
    step t >= delay (per-step classification, chance 1/n_symbols).

    Shapes: x (L,) token ids < n_symbols; y (L,) ids < n_symbols
    """
    check_ints(seq_len=(seq_len, 1), delay=(delay, 0), n_symbols=(n_symbols, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    if delay >= seq_len:
        raise ValueError(f"delay={delay} must be < seq_len={seq_len} (some step t >= delay must be scored)")
    params = dict(seq_len=seq_len, delay=delay, n_symbols=n_symbols, n_train=n_train, n_val=n_val,
                  n_test=n_test, seed=seed)
    make = lambda n, g: delayed_copy_data(n, seq_len, delay, n_symbols, g)  # noqa: E731
    return _token_task("delayed_copy", params, make, seq_len, d_input=n_symbols, d_output=n_symbols,
                       head="per_step", pooling="none", collate=token_collate, score_start=delay)


def selective_copy_data(n, seq_len, n_copy, n_symbols, generator):
    """Mamba's selective copying. Ids: 0 noise, 1..n_symbols data, n_symbols+1 marker. The first
    seq_len - n_copy steps hold n_copy data tokens at distinct uniformly random positions (noise
    elsewhere); the last n_copy steps are markers, where y holds the data tokens in order.

    Shapes: returns {"x": (n, L), "y": (n, L)} uint8/int16
    """
    dtype, P = token_dtype(n_symbols + 2), seq_len - n_copy
    data = torch.randint(1, n_symbols + 1, (n, n_copy), generator=generator).to(dtype)  # (n, n_copy)
    scores = torch.rand(n, P, generator=generator)  # (n, P)
    where = scores.topk(n_copy, dim=1).indices.sort(dim=1).values  # (n, n_copy): distinct, increasing
    x = torch.zeros(n, seq_len, dtype=dtype)  # (n, L)
    x.scatter_(1, where, data)
    x[:, P:] = n_symbols + 1
    y = torch.zeros_like(x)  # (n, L)
    y[:, P:] = data
    return {"x": x, "y": y}


def selective_copy_task(seq_len=4096, n_copy=16, n_symbols=14, n_train=SIZES["n_train"], n_val=SIZES["n_val"],
                        n_test=SIZES["n_test"], seed=0):
    """Selective copying (`selective_copy_data`): per-step classification scored on the last
    n_copy steps (chance 1/n_symbols). Defaults: Mamba's L = 4096, 16 data tokens and 16 ids
    (noise, 14 data symbols, marker).

    Shapes: x (L,) ids < n_symbols + 2; y (L,) ids < n_symbols + 1
    """
    check_ints(seq_len=(seq_len, 2), n_copy=(n_copy, 1), n_symbols=(n_symbols, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    if 2 * n_copy > seq_len:
        raise ValueError(f"n_copy={n_copy} is too large for seq_len={seq_len}: the n_copy data tokens and "
                         f"the n_copy markers need seq_len >= 2 * n_copy")
    params = dict(seq_len=seq_len, n_copy=n_copy, n_symbols=n_symbols, n_train=n_train, n_val=n_val,
                  n_test=n_test, seed=seed)
    make = lambda n, g: selective_copy_data(n, seq_len, n_copy, n_symbols, g)  # noqa: E731
    return _token_task("selective_copy", params, make, seq_len, d_input=n_symbols + 2, d_output=n_symbols + 1,
                       head="per_step", pooling="none", collate=token_collate, score_start=seq_len - n_copy)


# ---- recall -------------------------------------------------------------------------------

def assoc_recall_data(n, seq_len, n_keys, n_values, generator):
    """Associative recall as the H3 authors' generator makes it (single-token keys, the query
    always present). Ids: keys 0..n_keys-1, values n_keys..n_keys+n_values-1, query marker
    n_keys+n_values. Each sequence draws its own map key -> value (uniform); its (seq_len-2)/2
    pairs have keys drawn uniformly with replacement, so a repeated key repeats its value; then the
    marker and a query key drawn uniformly from the keys present. y = the query's value - n_keys.

    Shapes: returns {"x": (n, L) uint8/int16, "y": (n,) int64 in [0, n_values)}
    """
    P = (seq_len - 2) // 2
    table = torch.randint(n_values, (n, n_keys), generator=generator)  # (n, K): this sequence's map
    keys = torch.randint(n_keys, (n, P), generator=generator)  # (n, P)
    present = torch.zeros(n, n_keys, dtype=torch.bool).scatter_(1, keys, True)  # (n, K)
    draw = torch.rand(n, n_keys, generator=generator).masked_fill(~present, -1.0)  # (n, K)
    query = draw.argmax(1)  # (n,): uniform over the keys present
    x = torch.empty(n, seq_len, dtype=torch.long)  # (n, L)
    x[:, 0:2 * P:2] = keys
    x[:, 1:2 * P:2] = n_keys + table.gather(1, keys)
    x[:, -2], x[:, -1] = n_keys + n_values, query
    y = table.gather(1, query[:, None])[:, 0]  # (n,)
    return {"x": x.to(token_dtype(n_keys + n_values + 1)), "y": y}


def assoc_recall_task(seq_len=256, n_keys=16, n_values=16, n_train=SIZES["n_train"], n_val=SIZES["n_val"],
                      n_test=SIZES["n_test"], seed=0):
    """Associative recall (`assoc_recall_data`): classify the query key's value at the last step
    (pooling "last"; chance 1/n_values). seq_len must be even (pairs, marker, query key).

    Shapes: x (L,) ids < n_keys + n_values + 1; y () int64 < n_values
    """
    check_ints(seq_len=(seq_len, 4), n_keys=(n_keys, 1), n_values=(n_values, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    if seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even: (seq_len - 2) / 2 key-value pairs, the query marker "
                         f"and the query key")
    params = dict(seq_len=seq_len, n_keys=n_keys, n_values=n_values, n_train=n_train, n_val=n_val,
                  n_test=n_test, seed=seed)
    make = lambda n, g: assoc_recall_data(n, seq_len, n_keys, n_values, g)  # noqa: E731
    return _token_task("assoc_recall", params, make, seq_len, d_input=n_keys + n_values + 1, d_output=n_values,
                       head="classification", pooling="last")


def induction_data(n, seq_len, n_symbols, generator):
    """Induction heads (Mamba's form: one trigger, one token to recall). Ids: 0..n_symbols-1 random
    tokens, n_symbols the trigger. The trigger sits at one uniform position p in [0, L-3] and
    at L-1; y = x[p + 1], a uniform random token.

    Shapes: returns {"x": (n, L) uint8/int16, "y": (n,) int64 in [0, n_symbols)}
    """
    x = torch.randint(n_symbols, (n, seq_len), generator=generator)  # (n, L)
    p = torch.randint(seq_len - 2, (n,), generator=generator)  # (n,)
    rows = torch.arange(n)  # (n,)
    x[rows, p] = n_symbols
    x[:, -1] = n_symbols
    y = x[rows, p + 1]  # (n,)
    return {"x": x.to(token_dtype(n_symbols + 1)), "y": y}


def induction_heads_task(seq_len=256, n_symbols=16, n_train=SIZES["n_train"], n_val=SIZES["n_val"],
                         n_test=SIZES["n_test"], seed=0):
    """Induction heads (`induction_data`): classify, at the last step (the second trigger), the
    token that followed the first trigger (chance 1/n_symbols). Defaults: Mamba's training length
    256 and vocabulary 16 (+ the trigger).

    Shapes: x (L,) ids < n_symbols + 1; y () int64 < n_symbols
    """
    check_ints(seq_len=(seq_len, 3), n_symbols=(n_symbols, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    params = dict(seq_len=seq_len, n_symbols=n_symbols, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    make = lambda n, g: induction_data(n, seq_len, n_symbols, g)  # noqa: E731
    return _token_task("induction_heads", params, make, seq_len, d_input=n_symbols + 1, d_output=n_symbols,
                       head="classification", pooling="last")


# ---- adding -------------------------------------------------------------------------------

class AddingDataset(torch.utils.data.Dataset):
    """Adding-problem items built on access from the stored values and marker positions
    (the marker channel is not stored: half the memory at L = 16384).

    Shapes: values (n, L) float32; marks (n, 2) int64 -> items x (L, 2) float32 (value, marker),
    y (1,) float32 = values[marks[0]] + values[marks[1]]
    """

    def __init__(self, values, marks):
        self.values, self.marks = values, marks
        self.y = values.gather(1, marks).sum(1, keepdim=True)  # (n, 1)

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        marker = torch.zeros_like(self.values[i])  # (L,)
        marker[self.marks[i]] = 1.0
        return torch.stack([self.values[i], marker], dim=-1), self.y[i]  # (L, 2), (1,)


def adding_data(n, seq_len, generator):
    """Arjovsky et al.'s adding problem: values uniform in [0, 1); one marker uniform in the first
    half [0, L//2), one uniform in the second half [L//2, L).

    Shapes: returns {"values": (n, L) float32, "marks": (n, 2) int64}
    """
    half = seq_len // 2
    values = torch.rand(n, seq_len, generator=generator)  # (n, L)
    first = torch.randint(half, (n,), generator=generator)  # (n,)
    second = half + torch.randint(seq_len - half, (n,), generator=generator)  # (n,)
    return {"values": values, "marks": torch.stack([first, second], dim=1)}


def adding_task(seq_len=1000, n_train=SIZES["n_train"], n_val=SIZES["n_val"], n_test=SIZES["n_test"], seed=0):
    """The adding problem (`adding_data`): regression of the sum of the two marked values, read
    at the last step (pooling "last"), scored by mean squared error. Predicting the constant 1
    scores Var(U1 + U2) = 1/6 = 0.167. Default L = 1000 (Arjovsky et al. used 100 to 750).

    Shapes: x (L, 2) float32 (value, marker); y (1,) float32 in [0, 2)
    """
    check_ints(seq_len=(seq_len, 2))
    _check_sizes(n_train, n_val, n_test, seed)
    params = dict(seq_len=seq_len, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    data = _cached_splits("adding", params, lambda n, g: adding_data(n, seq_len, g), seq_len)
    splits = {s: AddingDataset(data[s]["values"], data[s]["marks"]) for s in SPLITS}
    return Task("adding", **splits, d_input=2, d_output=1, encoder="linear", head="regression", pooling="last",
                metric="mse", params=params)


def _source(origin, show):
    return Source("generated", origin, "docs/data/memory.md", show=show)


TASKS = {"copy": copy_task, "delayed_copy": delayed_copy_task, "selective_copy": selective_copy_task,
         "assoc_recall": assoc_recall_task, "induction_heads": induction_heads_task, "adding": adding_task}
SOURCES = {
    "copy": _source("diagssm.tasks.memory: copy task of Arjovsky et al. 2016", show_tokens),
    "delayed_copy": _source("diagssm.tasks.memory: tokens and their copy delay steps later", show_tokens),
    "selective_copy": _source("diagssm.tasks.memory: selective copying of Gu & Dao 2023 (Mamba)", show_tokens),
    "assoc_recall": _source("diagssm.tasks.memory: associative recall of Fu et al. 2023 (H3)", show_tokens),
    "induction_heads": _source("diagssm.tasks.memory: induction heads (Olsson et al. 2022; Mamba)", show_tokens),
    "adding": _source("diagssm.tasks.memory: adding problem (Hochreiter & Schmidhuber 1997; Arjovsky 2016)",
                      show_adding),
}
