"""UCR/UEA time-series classification ("ucr"): the archives' published train/test splits, read
from `.ts` files (`diagssm.tasks.timeseries_files`).

Univariate sets come from the UCR archive (Dau et al. 2019, "The UCR time series archive",
IEEE/CAA J. Autom. Sinica 6(6)), multivariate ones from the UEA archive (Bagnall et al. 2018,
"The UEA multivariate time series classification archive, 2018", arXiv:1811.00075). The aeon
wheel ships a few of them (aeon/datasets/data/<Name>/<Name>_{TRAIN,TEST}.ts: GunPoint,
ItalyPowerDemand, ArrowHead, OSULeaf, ACSF1, BasicMotions, JapaneseVowels, ...); `dataset` names
the set; `path` reads the user's own <dataset>_TRAIN.ts and <dataset>_TEST.ts instead. (The
parameter is `dataset`, not `name`: `build_task(name, **params)` takes the task's name.)

What the task does with a file pair:
- labels: mapped to 0..C-1 in the order of the TRAIN file's @classLabel line (the TEST file
  must list the same labels);
- validation: carved from the published training set by the task seed, per class: of a class
  with n_c training cases, max(1, round(val_fraction * n_c)) go to validation (rounding half
  up), but never the class's last training case (a class with one case keeps it in train);
  the test set is the published one, untouched;
- z-normalisation per dimension: mean and standard deviation of all observed values of the
  training split (after the validation carve; 1 where the deviation is 0), applied to every split;
- missing values ('?'): missing="error" (default) rejects the file naming the line; missing="mean"
  fills them with the training mean, i.e. 0 after normalisation;
- variable length (@equalLength false): each case keeps its length; x is padded with zeros and
  the dataset gives lengths (mean pooling averages the real steps only).
Items: x (L, n_dims) float32, y () int64. Encoder "linear", head "classification", pooling "mean".
"""
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from diagssm.tasks import cache
from diagssm.tasks.base import SequenceDataset, Source, Task, pad_collate, split_generator
from diagssm.tasks.timeseries_files import read_ts

VERSION = 1
MISSING = ("error", "mean")
DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SeriesDataset(SequenceDataset):
    """A SequenceDataset that also knows its class names (for `show`)."""

    def __init__(self, x, y, lengths, classes):
        super().__init__(x, y, lengths)
        self.classes = classes


def aeon_data_dir():
    """aeon's folder of shipped data sets, found without importing aeon (None if absent)."""
    spec = importlib.util.find_spec("aeon")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data"
        if path.is_dir():
            return path
    return None


def shipped_sets():
    """Names of the sets aeon ships as <Name>/<Name>_TRAIN.ts and <Name>_TEST.ts (sorted)."""
    root = aeon_data_dir()
    if root is None:
        return []
    return sorted(p.parent.name for p in root.glob("*/*_TRAIN.ts")
                  if p.name == f"{p.parent.name}_TRAIN.ts" and (p.parent / f"{p.parent.name}_TEST.ts").is_file())


def ts_pair(dataset, path):
    """(train file, test file) of set `dataset` in folder `path`, or in aeon's folder if path is None."""
    if path is None:
        if dataset not in shipped_sets():
            raise ValueError(f"dataset={dataset!r} is not a set shipped in the aeon wheel "
                             f"({', '.join(shipped_sets()) or 'aeon is not installed'}); "
                             f"for your own files give path=<folder with {dataset}_TRAIN.ts, {dataset}_TEST.ts>")
        folder = aeon_data_dir() / dataset
    else:
        folder = Path(path).expanduser()
    pair = folder / f"{dataset}_TRAIN.ts", folder / f"{dataset}_TEST.ts"
    for p in pair:
        if not p.is_file():
            found = sorted(q.name for q in folder.glob("*_TRAIN.ts")) if folder.is_dir() else []
            raise cache.DataError(f"{p}: no such file (dataset={dataset!r} reads <dataset>_TRAIN.ts and "
                                  f"<dataset>_TEST.ts in {folder}; TRAIN files there: {', '.join(found) or 'none'})")
    return pair


def _check_params(dataset, path, val_fraction, missing, seed):
    if not isinstance(dataset, str) or not DATASET.match(dataset):
        raise ValueError(f"dataset={dataset!r} must be a data set name such as 'GunPoint' (letters, digits, _ . -)")
    if path is not None and not isinstance(path, (str, Path)):
        raise ValueError(f"path={path!r} must be None (aeon's files) or a folder (string)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction!r} must be a number in (0, 0.5]")
    if missing not in MISSING:
        raise ValueError(f"missing={missing!r}; allowed: {', '.join(MISSING)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")


def padded(ts):
    """Shapes: ts.series -> x (n, L_max, n_dims) float32 (NaN where missing, 0 after the end), lengths (n,)"""
    lengths = torch.tensor([len(s) for s in ts.series], dtype=torch.long)  # (n,)
    x = torch.zeros(len(ts.series), int(lengths.max()), ts.n_dims)  # (n, L_max, n_dims)
    for i, s in enumerate(ts.series):
        x[i, :len(s)] = torch.from_numpy(s)  # (length_i, n_dims)
    return x, lengths


def read_pair(train_path, test_path, missing):
    """{train_x, train_len, train_y, test_x, test_len, test_y, classes, problem} from a file pair."""
    train, test = (read_ts(p, allow_missing=missing != "error") for p in (train_path, test_path))
    if set(test.classes) != set(train.classes):
        raise cache.DataError(f"{test_path}: @classLabel {' '.join(test.classes)} differs from {train_path}'s "
                              f"{' '.join(train.classes)}")
    if test.n_dims != train.n_dims:
        raise cache.DataError(f"{test_path}: {test.n_dims} dimension(s), {train_path} has {train.n_dims}")
    remap = np.array([train.classes.index(c) for c in test.classes])  # test class index -> train order
    out = {"classes": list(train.classes), "problem": train.problem}
    for split, ts, labels in (("train", train, train.labels), ("test", test, remap[test.labels])):
        x, lengths = padded(ts)
        out.update({f"{split}_x": x, f"{split}_len": lengths, f"{split}_y": torch.from_numpy(labels)})
    return out


def carve_per_class(y, val_fraction, seed):
    """(train, val) indices of the published training set (rule in the module docstring)."""
    gen = split_generator(seed, "val")
    train, val = [], []
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()  # (n_c,)
        k = min(len(rows) - 1, max(1, int(np.floor(val_fraction * len(rows) + 0.5))))
        rows = rows[torch.randperm(len(rows), generator=gen)]  # (n_c,)
        val.append(rows[:k])
        train.append(rows[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def normalise(x, lengths, train_x, train_len):
    """z-normalise x per dimension with the statistics of the observed training values; NaN
    (missing) -> 0 (the training mean); steps beyond a case's length -> 0.

    Shapes: x (n, L, D), lengths (n,), train_x (m, L', D), train_len (m,) -> (n, L, D) float32
    """
    real = torch.arange(train_x.shape[1]) < train_len[:, None]  # (m, L')
    values = train_x[real]  # (count, D)
    mean = values.nanmean(0)  # (D,)
    std = (values - mean).pow(2).nanmean(0).sqrt()  # (D,)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = ((x - mean) / std).nan_to_num(nan=0.0)  # (n, L, D)
    z[torch.arange(x.shape[1]) >= lengths[:, None]] = 0.0
    return z


def ucr_task(dataset="GunPoint", path=None, val_fraction=0.1, missing="error", seed=0):
    """A UCR/UEA classification set (module docstring): <dataset>_TRAIN.ts / <dataset>_TEST.ts from
    aeon's shipped data (path=None) or from folder `path`.

    Shapes: items x (L, n_dims) float32 (z-normalised), y () int64 in [0, C), and the length
    when the set has cases of different lengths
    """
    _check_params(dataset, path, val_fraction, missing, seed)
    train_path, test_path = ts_pair(dataset, path)
    stamps = {"train": cache.file_stamp(train_path), "test": cache.file_stamp(test_path), "missing": missing}
    data = cache.cached("ucr", stamps, lambda: read_pair(train_path, test_path, missing), VERSION)
    train_idx, val_idx = carve_per_class(data["train_y"], val_fraction, seed)
    tx, tl = data["train_x"][train_idx], data["train_len"][train_idx]
    parts = {"train": (tx, tl, data["train_y"][train_idx]),
             "val": (data["train_x"][val_idx], data["train_len"][val_idx], data["train_y"][val_idx]),
             "test": (data["test_x"], data["test_len"], data["test_y"])}
    variable = len(torch.unique(torch.cat([data["train_len"], data["test_len"]]))) > 1  # give lengths
    splits = {split: SeriesDataset(normalise(x, ln, tx, tl), y, ln if variable else None, data["classes"])
              for split, (x, ln, y) in parts.items()}
    params = dict(dataset=dataset, path=None if path is None else str(path), val_fraction=val_fraction,
                  missing=missing, seed=seed)
    return Task("ucr", **splits, d_input=data["train_x"].shape[-1], d_output=len(data["classes"]),
                encoder="linear", head="classification", pooling="mean", metric="accuracy",
                collate=pad_collate, params=params)


def _aeon_missing():
    if "GunPoint" in shipped_sets():
        return None
    return ("aeon's .ts files are not installed: pip install --no-deps aeon==1.6.0 "
            "(or give path=<folder with <Name>_TRAIN.ts and <Name>_TEST.ts>)")


def show_series(task, png, n=3, per_class=3, max_classes=6):
    """The first n training cases as text; a picture of `per_class` training series of each of
    the first `max_classes` classes (every dimension of the first case for multivariate sets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = task.train
    lines = []
    for i in range(min(n, len(data))):
        x, y, L = data[i] if data.lengths is not None else (*data[i], len(data[i][0]))
        x = x[:L]  # (L, D)
        lines.append(f"  example {i}: class {int(y)} ({data.classes[int(y)]}), length {int(L)}, {x.shape[1]} dim(s), "
                     f"mean {x.mean():.3f} std {x.std():.3f} min {x.min():.2f} max {x.max():.2f}")
    classes = list(range(min(task.d_output, max_classes)))
    fig, axes = plt.subplots(len(classes), 1, figsize=(8, 1.6 * len(classes)), squeeze=False, sharex=True)
    for row, c in enumerate(classes):
        rows = torch.nonzero(data.y == c).flatten()[:per_class if task.d_input == 1 else 1].tolist()
        for i in rows:
            L = int(data.lengths[i]) if data.lengths is not None else data.x.shape[1]
            axes[row, 0].plot(data.x[i, :L].numpy(), linewidth=0.8)  # (L, D): one line per dimension
        axes[row, 0].set_title(f"class {c} ({data.classes[c]}): {len(rows)} of its {int((data.y == c).sum())} "
                               f"training cases" + (", one line per dimension" if task.d_input > 1 else ""),
                               fontsize=8)
    fig.suptitle(f"ucr {task.params['dataset']}: z-normalised training series", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


TASKS = {"ucr": ucr_task}
SOURCES = {
    "ucr": Source("package", "UCR/UEA .ts files in the aeon wheel (aeon/datasets/data); or the user's "
                  "<Name>_TRAIN.ts/<Name>_TEST.ts with path=<folder>", "docs/data/ucr_uea.md",
                  _aeon_missing, show_series),
}
