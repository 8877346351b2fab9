"""The task cache: a built dataset is written to disk once and read back on later builds.

A cache file holds what a builder's `build()` returned (a dict of tensors, numbers and strings)
with the record of what it was built from: the task name, the builder's format `version` and
its `params` (everything the data depends on: sizes, lengths, seed, and for readers the input
file's path, size and modification time). The file name is `<name>-v<version>-<hash of params>.pt`,
so changing a parameter or bumping the version builds anew. Files are written by
`diagssm.files.atomic_save` (temporary name, then rename): a build that dies half-way leaves no
cache behind. A cache file that does not load, or whose record differs from the request, raises
`DataError` naming the file; nothing half-built is ever used.

The folder is $DIAGSSM_CACHE, default ~/.cache/diagssm. Progress bars (`progress`) are drawn
only when `show_progress(True)` was called (`diagssm data build` does); `force_rebuild(True)`
(`diagssm data build --force`) builds and overwrites even where a cache file exists.
"""
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import torch

from diagssm.files import atomic_save, cache_dir

FORMAT = 1
_SHOW_PROGRESS = False
_FORCE = False


class DataError(ValueError):
    """A file (input or cache) that is missing, truncated or corrupt, or data failing a check.
    The message names the file and what was expected."""


def cache_path(name, params, version):
    """The cache file of (name, params, version); see the module docstring."""
    text = json.dumps(params, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-v{version}-{digest}.pt"


def file_stamp(path):
    """What a reader's cache depends on for an input file or folder: its resolved path, size and
    modification time (so an edited file is read again). Raises DataError if it is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


EVENTS = []  # ("read" | "built", path) for each `cached` call, for `diagssm data build` to report


def cached(name, params, build, version):
    """build()'s result, read from the cache if it holds (name, params, version), else built and
    written there. `params` must be JSON-serialisable; `version` is the builder's output format
    (bump it when the same params would now build different data)."""
    path = cache_path(name, params, version)
    record = {"format": FORMAT, "name": name, "version": version,
              "params": json.loads(json.dumps(params, sort_keys=True, default=str))}
    if path.exists() and not _FORCE:
        EVENTS.append(("read", path))
        return _load(path, record)
    EVENTS.append(("built", path))
    data = build()
    if not isinstance(data, dict):
        raise TypeError(f"build() for task {name!r} must return a dict, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({**record, "data": data}, path)
    return data


def _load(path, record):
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or overwritten file
        raise DataError(f"{path}: cache file does not load ({type(err).__name__}: {err}); delete it to "
                        f"rebuild, or run `diagssm data build {record['name']} --force`") from err
    if not isinstance(stored, dict) or "data" not in stored:
        raise DataError(f"{path}: not a diagssm task cache (expected a dict with 'data'); delete it to rebuild")
    got = {k: stored.get(k) for k in record}
    if got != record:
        raise DataError(f"{path}: cache record {got} does not match the request {record}; delete it to rebuild")
    return stored["data"]


def force_rebuild(on=True):
    """Build anew (and overwrite the cache file) from now on, even where a cache exists (on=True)."""
    global _FORCE
    _FORCE = bool(on)


def show_progress(on=True):
    """Draw progress bars in `progress` from now on (on=True) or not."""
    global _SHOW_PROGRESS
    _SHOW_PROGRESS = bool(on)


def progress(iterable, total=None, desc=None):
    """`iterable`, with a tqdm progress bar when `show_progress(True)` was called."""
    if not _SHOW_PROGRESS:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="item", dynamic_ncols=True)


def parallel_map(fn, items, workers=None, desc=None):
    """[fn(item) for item in items], computed by `workers` processes (default: the CPU count,
    at most 8; workers=1 computes in this process), in order, with a progress bar.
    `fn` must be a module-level function; its result must be picklable."""
    items = list(items)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1")
    if workers == 1 or len(items) <= 1:
        return [fn(item) for item in progress(items, total=len(items), desc=desc)]
    ctx = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return list(progress(pool.map(fn, items), total=len(items), desc=desc))
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(
            f"a worker process of {desc or 'a data build'} died. Workers are started with 'spawn', which "
            f"re-imports the main script: a script that builds data must do so under "
            f"`if __name__ == '__main__':`; or build in one process (workers=1)") from e
