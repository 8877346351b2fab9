"""ListOps (Long Range Arena): nested list operations, classified by their value 0-9.

Tay et al. 2021, "Long Range Arena: A Benchmark for Efficient Transformers" (ICLR), after Nangia &
Bowman 2018, "ListOps: A Diagnostic Dataset for Latent Tree Learning". An input is a prefix
expression such as "[MAX 2 9 [MIN 4 7 ] 0 ]" over the operators MIN, MAX, MED (int median) and SM
(sum mod 10); the label is its value. Two tasks:

listops: generated here by `diagssm.tasks.listops_gen` (the LRA generator reimplemented; its
    docstring says what is followed and what differs). Defaults are LRA's: 500 < length < 2000
    tokens, depth <= 10, 2-10 arguments, 96,000 / 2,000 / 2,000 distinct expressions.
listops_lra: the LRA release files basic_train.tsv, basic_val.tsv, basic_test.tsv (header
    "Source<TAB>Target", rows "( ( ( [MAX 2 ) 9 ) ] )<TAB>9"), read from the folder `path`.
    The parentheses are dropped, as in the LRA and S4 pipelines.

Tokens: `listops_gen.VOCAB` (16 ids: 0 padding, 1-10 digits, 11-14 operators, 15 "]"), stored as
uint8 and padded with 0; items are (x, label, length). The model mean-pools over the sequence
(the S4 repository's ListOps setting) and classifies into 10 classes.
"""
from pathlib import Path

import numpy as np
import torch

from diagssm.tasks import cache, listops_gen
from diagssm.tasks.base import SequenceDataset, Source, Task, check_int, pad_collate
from diagssm.tasks.listops_gen import TOKEN_ID, VOCAB

VERSION = 1
LRA_VERSION = 1
LRA_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
TOO_LONG = ("cut", "drop", "error")


def _check_generator(n_train, n_val, n_test, min_length, max_length, max_depth, max_args, seed, workers):
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("n_test", n_test, 1),
                             ("min_length", min_length, 1), ("max_length", max_length, 1),
                             ("max_depth", max_depth, 2), ("max_args", max_args, 2), ("seed", seed, 0)):
        check_int(name, value, low)
    if workers is not None:
        check_int("workers", workers, 1)
    if max_length <= min_length + 1:
        raise ValueError(f"min_length={min_length}, max_length={max_length}: no length lies strictly "
                         f"between them; need max_length >= min_length + 2")
    longest = listops_gen.max_tree_length(max_depth, max_args)
    if min_length + 1 > longest:
        raise ValueError(f"min_length={min_length}: trees of max_depth={max_depth}, max_args={max_args} "
                         f"have at most {longest} tokens")


def padded(tokens, lengths):
    """Trees stored one after another -> a padded matrix.

    Shapes: tokens (sum of lengths,) uint8, lengths (n,) int64 -> x (n, max length) uint8, 0 = padding
    """
    rows = torch.split(tokens, lengths.tolist())  # views, no copy
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)  # (n, L)


def _task(name, data, counts, params):
    """A Task from {"tokens", "lengths", "labels"} of all splits, in train/val/test order."""
    splits, start_item, start_token = {}, 0, 0
    for split, n in zip(("train", "val", "test"), counts):
        lengths = data["lengths"][start_item:start_item + n]  # (n,)
        end_token = start_token + int(lengths.sum())
        x = padded(data["tokens"][start_token:end_token], lengths)  # (n, L) uint8
        splits[split] = SequenceDataset(x, data["labels"][start_item:start_item + n].long(), lengths)
        start_item, start_token = start_item + n, end_token
    return Task(name, **splits, d_input=len(VOCAB), d_output=10, encoder="embedding",
                head="classification", pooling="mean", metric="accuracy", collate=pad_collate, params=params)


def listops_task(n_train=96000, n_val=2000, n_test=2000, min_length=500, max_length=2000, max_depth=10,
                 max_args=10, workers=None, seed=0):
    """Generated ListOps (module docstring): distinct random expressions with
    min_length < tokens < max_length, labelled by their value.

    max_depth: nodes at this depth (the root has depth 1) are digits; max_args: operators take
    2..max_args arguments. workers: processes for the build (default: the cores, at most 8; the
    data does not depend on it). Same seed, same bytes.

    Shapes: items x (L,) uint8 token ids (padded to the split's longest), y () int64 in 0..9,
    length () int64
    """
    _check_generator(n_train, n_val, n_test, min_length, max_length, max_depth, max_args, seed, workers)
    params = dict(n_train=n_train, n_val=n_val, n_test=n_test, min_length=min_length, max_length=max_length,
                  max_depth=max_depth, max_args=max_args, seed=seed)

    def build():
        tokens, lengths, values = listops_gen.generate(n_train + n_val + n_test, min_length, max_length,
                                                       max_depth, max_args, seed, workers)
        return {"tokens": torch.from_numpy(tokens.copy()), "lengths": torch.from_numpy(lengths),
                "labels": torch.from_numpy(values).to(torch.uint8)}

    data = cache.cached("listops", params, build, VERSION)
    return _task("listops", data, (n_train, n_val, n_test), {**params, "workers": workers})


def tokenize(text, where):
    """LRA text -> token ids (list of int), "(" and ")" dropped; DataError naming `where` for an
    unknown token."""
    ids = []
    for word in text.split():
        if word in ("(", ")"):
            continue
        if word not in TOKEN_ID or word == VOCAB[0]:
            raise cache.DataError(f"{where}: unknown token {word[:20]!r}; expected (, ), a digit 0-9, "
                                  f"{', '.join(listops_gen.OPERATORS)} or ]")
        ids.append(TOKEN_ID[word])
    if not ids:
        raise cache.DataError(f"{where}: empty expression")
    return ids


def read_tsv(path, max_length=None, too_long="cut", check_labels=True):
    """One LRA release file -> (list of rows, each the bytes of its token ids; list of labels).

    Rows longer than max_length tokens are cut to their first max_length tokens (too_long="cut",
    what LRA's input pipeline does), skipped ("drop") or refused ("error"). check_labels: evaluate
    each (uncut) expression and refuse a row whose label differs. Raises DataError naming the file
    (and line) for a missing file, a bad header, a row without a tab, an unknown token, a label
    not in 0-9, a malformed expression.
    """
    path = Path(path)
    if not path.is_file():
        raise cache.DataError(f"{path}: no such file (expected an LRA ListOps release file)")
    rows, labels = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:  # skips a byte-order mark
        header = f.readline().rstrip("\r\n")
        if header.split("\t") != ["Source", "Target"]:
            raise cache.DataError(f"{path}: line 1 is {header[:40]!r}; expected the header 'Source<TAB>Target'")
        for n, line in enumerate(f, start=2):
            if not line.strip():  # a blank line (a hand-edited file's last): skipped, as the other readers do
                continue
            ids, label = _read_row(line.rstrip("\r\n"), f"{path}:{n}", check_labels)
            if max_length is not None and len(ids) > max_length:
                if too_long == "error":
                    raise cache.DataError(f"{path}:{n}: {len(ids)} tokens, more than max_length={max_length}")
                if too_long == "drop":
                    continue
                ids = ids[:max_length]
            rows.append(bytes(ids))  # token ids < 16: one byte each
            labels.append(label)
    if not rows:
        raise cache.DataError(f"{path}: no rows after the header" + (" (all longer than max_length)"
                                                                      if max_length is not None else ""))
    return rows, labels


def _read_row(line, where, check_labels):
    source, tab, target = line.partition("\t")
    if not tab:
        raise cache.DataError(f"{where}: no tab; expected 'expression<TAB>label'")
    if target.strip() not in [str(d) for d in range(10)]:
        raise cache.DataError(f"{where}: label {target[:20]!r}; expected a digit 0-9")
    ids, label = tokenize(source, where), int(target)
    if check_labels:
        try:
            value = listops_gen.evaluate(ids)
        except ValueError as err:
            raise cache.DataError(f"{where}: malformed expression: {err}") from None
        if value != label:
            raise cache.DataError(f"{where}: label {label}, but the expression's value is {value}")
    return ids, label


def listops_lra_task(path=None, max_length=None, too_long="cut", check_labels=True, seed=0):
    """The LRA release files basic_{train,val,test}.tsv in folder `path` (module docstring).

    max_length: the longest sequence kept (None: no limit; LRA used 2000); too_long: what happens to
    a longer row: "cut" to max_length tokens (as LRA's pipeline), "drop" it, or "error".
    check_labels: refuse rows whose label is not the expression's value. seed: unused (the files
    fix the data); kept so the task takes the same `seed` as every other.

    Shapes: items x (L,) uint8, y () int64, length () int64
    """
    if path is None:
        raise ValueError("path=None: give the folder holding basic_train.tsv, basic_val.tsv and basic_test.tsv "
                         "(LRA release, lra_release/listops-1000)")
    if max_length is not None:
        check_int("max_length", max_length, 1)
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}; allowed: {', '.join(TOO_LONG)}")
    if not isinstance(check_labels, bool):
        raise ValueError(f"check_labels={check_labels!r} must be true or false")
    check_int("seed", seed, 0)
    files = {split: Path(path).expanduser() / name for split, name in LRA_FILES.items()}
    stamps = {split: cache.file_stamp(f) for split, f in files.items()}  # DataError if missing
    params = dict(files=stamps, max_length=max_length, too_long=too_long, check_labels=check_labels)

    def build():
        rows, labels, counts = [], [], []
        for split in ("train", "val", "test"):
            split_rows, split_labels = read_tsv(files[split], max_length, too_long, check_labels)
            rows += split_rows
            labels += split_labels
            counts.append(len(split_rows))
        tokens = np.frombuffer(b"".join(rows), dtype=np.uint8).copy()  # (sum of lengths,)
        return {"tokens": torch.from_numpy(tokens), "lengths": torch.tensor([len(r) for r in rows]),
                "labels": torch.tensor(labels, dtype=torch.uint8), "counts": torch.tensor(counts)}

    data = cache.cached("listops_lra", params, build, LRA_VERSION)
    counts = [int(c) for c in data["counts"]]
    return _task("listops_lra", data, counts, dict(path=str(path), max_length=max_length, too_long=too_long,
                                                   check_labels=check_labels, seed=seed))


def show(task, png_path):
    """Three training expressions (decoded, cut for the terminal) with their labels; saves the
    length and label histograms of the splits and the nesting depth along one expression."""
    train = task.train
    lines = []
    for i in range(min(3, len(train))):
        x, y, n = train[i]
        text = listops_gen.decode(x[:int(n)].tolist())
        lines.append(f"label {int(y)}, {int(n)} tokens: {text[:96] + ' ...' if len(text) > 96 else text}")
    _draw(task, png_path)
    return "\n".join(lines)


def _draw(task, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    bins = np.linspace(int(task.train.lengths.min()), int(task.train.lengths.max()) + 1, 31)
    for split in ("train", "val", "test"):
        data = task.split(split)
        axes[0].hist(data.lengths.numpy(), bins=bins, histtype="step", density=True, label=split)
        counts = np.bincount(data.y.numpy(), minlength=10) / len(data)
        axes[1].plot(range(10), counts, "o-", label=split)
    axes[0].set(xlabel="tokens", ylabel="density", title="length")
    axes[1].set(xlabel="label (value)", ylabel="fraction", title="label balance", xticks=range(10))
    x, y, n = task.train[0]
    ids = x[:int(n)].numpy()
    depth = np.cumsum((ids >= listops_gen.FIRST_OP) & (ids < listops_gen.END)) - np.cumsum(ids == listops_gen.END)
    axes[2].plot(depth, lw=0.8)
    axes[2].set(xlabel="token", ylabel="open operators", title=f"nesting along train[0] (label {int(y)})")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(f"{task.name}: {len(task.train)} / {len(task.val)} / {len(task.test)}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


TASKS = {"listops": listops_task, "listops_lra": listops_lra_task}
SOURCES = {
    "listops": Source("generated", "diagssm.tasks.listops_gen: the LRA ListOps generator reimplemented "
                      "(Tay et al. 2021)", "docs/data/listops.md", show=show),
    "listops_lra": Source("files", "LRA release ListOps files basic_{train,val,test}.tsv in the folder "
                          "given by path=", "docs/data/listops.md", show=show),
}
