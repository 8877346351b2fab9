"""Pathfinder and Path-X (Long Range Arena, Tay et al. 2021): is there a path between two dots?

An image holds two target contours of dashed paddles, distractor contours and two circular
markers; the label is 1 when both markers sit on the same contour, 0 when they sit on different
ones (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal gated
recurrent units"; Kim, Linsley et al. 2020). The image is read as a sequence of res * res
pixels in row-major order (L = 1024, 4096, 16384 at 32, 64, 128; Path-X is 128x128).

Tasks:
  pathfinder      generated here by `pathfinder_draw` (a reimplementation of the snakes2 generator
                  with LRA's settings per resolution); params resolution (32, 64, 128) and
                  contour_length (6, 9, 14: LRA's easy / intermediate / hard; LRA reports 14).
  pathx           pathfinder at resolution 128 (its own, smaller, default sizes).
  pathfinder_lra  read from the LRA release (lra_release/pathfinder{32,64,128,256}).

Inputs follow S4 (state-spaces/s4, src/dataloaders/lra.py): x is (L, 1) float32,
pixel / 127.5 - 1 in [-1, 1] (ToTensor then Normalize(0.5, 0.5)), encoder "linear". With
tokenize=True, x is the (L,) grey levels 0..255 as tokens (encoder "embedding", d_input 256), as
the LRA transformers read them. Head "classification", pooling "mean", metric "accuracy".

Generated splits: images are drawn in chunks of CHUNK, chunk c of split s from the numpy stream
SeedSequence([seed, s, c]), so the data does not depend on the number of worker processes and a
smaller split is a prefix of a larger one. Labels alternate by index (1, 0, 1, ...): a split of
even size is exactly balanced (LRA drew each label at random).
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diagssm.tasks import cache
from diagssm.tasks.base import SPLITS, Source, Task, check_int
from diagssm.tasks.pathfinder_draw import CONTOUR_LENGTHS, RESOLUTIONS, lra_settings
from diagssm.tasks.pathfinder_snakes import draw_example

VERSION = 1  # bump when the same params would draw different images
CHUNK = 100
DEFAULT_SIZES = {32: (8000, 1000, 1000), 64: (1000, 100, 100), 128: (1000, 100, 100)}
LRA_FOLDERS = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}
LRA_SPLITS = ("random", "ordered")


class PixelDataset(Dataset):
    """Grey images stored as uint8 rows; items (x, y).

    Shapes: images (n, L) uint8, labels (n,) int64; x (L, 1) float32 = pixel / 127.5 - 1, or with
    tokenize (L,) uint8 grey levels (pad_collate turns them into int64 tokens); y () int64
    """

    def __init__(self, images, labels, tokenize=False):
        if images.dtype != torch.uint8 or images.dim() != 2 or len(images) != len(labels):
            raise ValueError(f"images must be (n, L) uint8 with n = len(labels); got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images, self.labels, self.tokenize = images, labels, tokenize

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.tokenize:
            return self.images[i], self.labels[i]
        return (self.images[i].float() / 127.5 - 1).unsqueeze(-1), self.labels[i]  # (L, 1)


def _check_choice(name, value, allowed):
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_common(seed, workers, tokenize):
    check_int("seed", seed, 0)
    if workers is not None:
        check_int("workers", workers, 1)
    if not isinstance(tokenize, bool):
        raise ValueError(f"tokenize={tokenize!r} must be true or false")


def _make_task(name, images, labels, tokenize, params):
    """The Task of three splits: {split: (images (n, L) uint8, labels (n,) int64)}."""
    splits = {k: PixelDataset(images[k], labels[k], tokenize) for k in SPLITS}
    return Task(name, **splits, d_input=256 if tokenize else 1, d_output=2,
                encoder="embedding" if tokenize else "linear", head="classification", pooling="mean",
                metric="accuracy", params=params)


# ---------------------------------------------------------------- generated

def draw_chunk(job):
    """The first `count` images of chunk `chunk` of a split (module docstring).
    Shapes: returns images (count, res*res) uint8, labels (count,) int64"""
    resolution, contour_length, seed, split, chunk, count = job
    settings = lra_settings(resolution, contour_length)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), chunk]))
    labels = np.array([(chunk * CHUNK + i + 1) % 2 for i in range(count)], dtype=np.int64)  # (count,)
    images = [draw_example(settings, int(y), rng)["image"].reshape(-1) for y in labels]
    return np.stack(images), labels


def generated_split(resolution, contour_length, split, n, seed, workers=None):
    """(images (n, res*res) uint8, labels (n,) int64) of one generated split, cached."""
    params = dict(resolution=resolution, contour_length=contour_length, split=split, n=n, seed=seed)

    def build():
        jobs = [(resolution, contour_length, seed, split, c, min(CHUNK, n - c * CHUNK))
                for c in range(-(-n // CHUNK))]
        parts = cache.parallel_map(draw_chunk, jobs, workers, desc=f"pathfinder{resolution} {split}")
        return {"images": torch.from_numpy(np.concatenate([p[0] for p in parts])),
                "labels": torch.from_numpy(np.concatenate([p[1] for p in parts]))}

    data = cache.cached("pathfinder", params, build, VERSION)
    return data["images"], data["labels"]


def pathfinder_task(resolution=32, contour_length=14, n_train=None, n_val=None, n_test=None, seed=0,
                    workers=None, tokenize=False):
    """Pathfinder images drawn by the snakes2 reimplementation with LRA's settings (module docstring).

    resolution: 32, 64 or 128 (L = resolution**2); contour_length: 6, 9 or 14 paddles per target.
    n_train, n_val, n_test: split sizes; None takes DEFAULT_SIZES[resolution] (LRA drew 200,000
    images per difficulty and split them 80/10/10). workers: processes that draw (None: the CPU
    count, at most 8); the images do not depend on it. tokenize: grey levels as tokens.
    """
    _check_choice("resolution", resolution, RESOLUTIONS)
    return _generated_task("pathfinder", resolution, contour_length, (n_train, n_val, n_test), seed, workers,
                           tokenize)


def pathx_task(contour_length=14, n_train=None, n_val=None, n_test=None, seed=0, workers=None, tokenize=False):
    """Path-X: `pathfinder` at resolution 128 (L = 16,384); sizes default to DEFAULT_SIZES[128]."""
    return _generated_task("pathx", 128, contour_length, (n_train, n_val, n_test), seed, workers, tokenize)


def _generated_task(name, resolution, contour_length, sizes, seed, workers, tokenize):
    """Check the parameters, then build (or read from the cache) the three splits."""
    _check_choice("contour_length", contour_length, CONTOUR_LENGTHS)
    n = dict(zip(SPLITS, DEFAULT_SIZES[resolution]))
    for split, size in zip(SPLITS, sizes):
        if size is not None:
            check_int(f"n_{split}", size, 1)
            n[split] = size
    _check_common(seed, workers, tokenize)
    _available_or_raise()
    images, labels = {}, {}
    for split in SPLITS:
        images[split], labels[split] = generated_split(resolution, contour_length, split, n[split], seed, workers)
    params = dict(resolution=resolution, contour_length=contour_length, n_train=n["train"], n_val=n["val"],
                  n_test=n["test"], seed=seed, tokenize=tokenize)
    return _make_task(name, images, labels, tokenize, params)


# ---------------------------------------------------------------- LRA release reader

def read_metadata(path):
    """Rows of one LRA metadata file: [folder, file name, index, label, ...] per image.

    The release's metadata/<n>.npy files are text despite the suffix: one image per line, fields
    separated by spaces (LRA's input pipeline splits lines on ' '; S4 reads them the same way).
    A file written by np.save (magic b'\\x93NUMPY', as snakes2 itself saves) is read with np.load.
    Returns [(folder, file name, label)]; DataError for a row that is not of that form.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        try:
            rows = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise cache.DataError(f"{path}: not a readable .npy array ({err})") from err
        rows = [[str(v) for v in row] for row in np.atleast_2d(rows)]
    else:
        try:
            rows = [line.split() for line in raw.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise cache.DataError(f"{path}: neither text nor a .npy array ({err})") from err
    out = []
    for i, row in enumerate(rows):
        if len(row) < 4 or row[3] not in ("0", "1"):
            raise cache.DataError(f"{path}: row {i + 1} is {' '.join(row)!r}; expected "
                                  f"'<folder> <file> <index> <label 0|1> ...'")
        out.append((row[0], row[1], int(row[3])))
    return out


def read_image(path, resolution):
    """One grey image as a flat uint8 row, or None for an empty file (LRA filters those out).
    Shapes: returns (resolution**2,) uint8"""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise cache.DataError(f"{path}: image listed in the metadata is missing")
    if path.stat().st_size == 0:
        return None
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("L"))  # (H, W), as S4 opens them
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise cache.DataError(f"{path}: not a readable image ({err})") from err
    if pixels.shape != (resolution, resolution):
        raise cache.DataError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                              f"{resolution}x{resolution} (resolution={resolution})")
    return pixels.reshape(-1)


def read_metadata_images(job):
    """The images and labels one metadata file lists (module-level for parallel_map).
    Shapes: returns images (m, res*res) uint8, labels (m,) int64, skipped (list of empty files)"""
    folder, meta, resolution = job
    images, labels, skipped = [], [], []
    for sub, name, label in read_metadata(meta):
        pixels = read_image(Path(folder) / sub / name, resolution)
        if pixels is None:
            skipped.append(str(Path(folder) / sub / name))
            continue
        images.append(pixels)
        labels.append(label)
    images = np.stack(images) if images else np.zeros((0, resolution * resolution), np.uint8)
    return images, np.array(labels, dtype=np.int64), skipped


def metadata_files(folder):
    """metadata/*.npy of an LRA difficulty folder, sorted by their integer stem (as S4 sorts)."""
    files = list((folder / "metadata").glob("*.npy"))
    if not files:
        raise cache.DataError(f"{folder / 'metadata'}: no metadata/*.npy files (expected the LRA layout "
                              f"<path>/{folder.name}/metadata/<n>.npy and imgs/<n>/sample_<k>.png)")
    for f in files:
        if not f.stem.isdigit():
            raise cache.DataError(f"{f}: metadata file names must be <integer>.npy")
    return sorted(files, key=lambda f: int(f.stem))


def split_indices(n, split, seed):
    """(train, val, test) index tensors over n images, 80/10/10: "random" is S4's
    torch.utils.data.random_split with torch.Generator().manual_seed(seed) (S4 uses seed 42);
    "ordered" cuts the metadata order as LRA's TFDS slices [:80%], [80%:90%], [90%:]."""
    if split == "random":
        n_val, n_test = int(0.1 * n), int(0.1 * n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
        cuts = (n - n_val - n_test, n - n_test)
    else:
        order, cuts = torch.arange(n), (int(0.8 * n), int(0.9 * n))
    return order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]


def lra_images(folder, resolution, workers=None):
    """All images of one LRA difficulty folder in metadata order, cached; warns about empty files.
    Shapes: returns images (N, res*res) uint8, labels (N,) int64"""
    files = metadata_files(folder)
    params = dict(folder=cache.file_stamp(folder), resolution=resolution,
                  metadata=[cache.file_stamp(f) for f in files])

    def build():
        parts = cache.parallel_map(read_metadata_images, [(str(folder), str(f), resolution) for f in files],
                                   workers, desc=f"reading {folder.name}")
        if not sum(len(p[1]) for p in parts):
            raise cache.DataError(f"{folder}: the metadata lists no readable image")
        return {"images": torch.from_numpy(np.concatenate([p[0] for p in parts])),
                "labels": torch.from_numpy(np.concatenate([p[1] for p in parts])),
                "skipped": [s for p in parts for s in p[2]]}

    data = cache.cached("pathfinder_lra", params, build, VERSION)
    if data["skipped"]:  # on every build, also from the cache
        import warnings

        warnings.warn(f"skipped {len(data['skipped'])} empty image file(s), as LRA does: "
                      f"{', '.join(data['skipped'][:5])}")
    return data["images"], data["labels"]


def pathfinder_lra_task(path, resolution=32, contour_length=14, split="random", seed=42, workers=None,
                        tokenize=False):
    """Pathfinder images of the LRA release: <path>/<difficulty>/metadata/<n>.npy listing
    imgs/<n>/sample_<k>.png (path is e.g. lra_release/pathfinder32; the difficulty folder is
    curv_baseline, curv_contour_length_9 or curv_contour_length_14 for contour_length 6, 9, 14).

    resolution: the images' side (any, checked on every image). split: "random" (S4's split; set
    seed 42 for S4's exact split) or "ordered" (LRA's, in metadata order); 80/10/10 either way.
    Empty image files are skipped with a warning (LRA's pipeline drops them; S4 lists one).
    """
    if not isinstance(path, (str, Path)):
        raise ValueError(f"path={path!r} must be the folder of the LRA release, e.g. lra_release/pathfinder32")
    check_int("resolution", resolution, 1)
    _check_choice("contour_length", contour_length, CONTOUR_LENGTHS)
    _check_choice("split", split, LRA_SPLITS)
    _check_common(seed, workers, tokenize)
    _available_or_raise()
    folder = Path(path).expanduser() / LRA_FOLDERS[contour_length]
    if not folder.is_dir():
        raise cache.DataError(f"{folder}: no such folder (path={str(path)!r} must hold {LRA_FOLDERS[contour_length]}/)")
    all_images, all_labels = lra_images(folder, resolution, workers)
    parts = split_indices(len(all_labels), split, seed)
    images = {k: all_images[idx] for k, idx in zip(SPLITS, parts)}
    labels = {k: all_labels[idx] for k, idx in zip(SPLITS, parts)}
    params = dict(path=str(path), resolution=resolution, contour_length=contour_length, split=split, seed=seed,
                  tokenize=tokenize)
    return _make_task("pathfinder_lra", images, labels, tokenize, params)


# ---------------------------------------------------------------- sources

def available():
    """None when Pillow (which draws and reads the images) is installed, else the reason."""
    if importlib.util.find_spec("PIL") is None:
        return "Pillow is not installed (pip install pillow, or diagssm[train])"
    return None


def _available_or_raise():
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)


def show(task, png, n=8):
    """Labels and pixel statistics of 3 training images; a grid of n (half positive) to `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = task.train
    side = int(round(data.images.shape[1] ** 0.5))
    labels = data.labels
    picks = [int(i) for y in (1, 0) for i in torch.nonzero(labels == y).flatten()[:n // 2]]
    lines = []
    for i in picks[:1] + picks[n // 2:n // 2 + 1] + picks[1:2]:
        img = data.images[i].float()  # (L,)
        lines.append(f"  image {i}: label {int(labels[i])} ({'connected' if labels[i] else 'not connected'}), "
                     f"{side}x{side}, mean grey {img.mean():.1f}, ink (> 0) {(img > 0).float().mean():.1%}, "
                     f"max {int(img.max())}")
    cols = (len(picks) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 5.0), squeeze=False)
    for ax, i in zip(axes.flat, picks):
        ax.imshow(data.images[i].reshape(side, side).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{i}: {'positive' if labels[i] else 'negative'}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{task.name} ({side}x{side}): 1 = the two dots are on one contour")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.08, hspace=0.25)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return "\n".join(lines)


TASKS = {"pathfinder": pathfinder_task, "pathx": pathx_task, "pathfinder_lra": pathfinder_lra_task}
_CARD = "docs/data/pathfinder.md"
SOURCES = {
    "pathfinder": Source("generated", "diagssm.tasks.pathfinder_snakes: the snakes2 generator (Linsley et al. "
                         "2018) with LRA's settings", _CARD, available, show),
    "pathx": Source("generated", "pathfinder at 128x128 (Path-X, L = 16384)", _CARD, available, show),
    "pathfinder_lra": Source("files", "the LRA release's pathfinder folders (PNG images + metadata)", _CARD,
                             available, show),
}
