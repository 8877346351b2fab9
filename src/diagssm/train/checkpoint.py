"""Checkpoints: atomic writes, the last `keep_last` step checkpoints, the best one, RNG states.

A checkpoint is a dict (see `REQUIRED`) written by `atomic_save`: to a temporary file in the
same folder, flushed and fsync'ed, renamed over the target with os.replace (atomic on POSIX),
and the folder fsync'ed so that the rename itself survives a crash. A reader therefore sees
either the old file or the complete new one. Temporary files (".*.tmp") never match the
checkpoint names; `latest_valid` skips, and names, files that do not load.
"""
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from diagssm.files import atomic_save  # noqa: F401 (re-exported: checkpoints are written with it)

FORMAT = 1
REQUIRED = ("format", "step", "epoch", "position", "model", "optimizer", "scheduler", "rng", "sampler")
STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def rng_state():
    """The states of every random number generator a run draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, or none where one is needed."""


def load_into(module, state, path, what="the model of this config"):
    """`module.load_state_dict(state)`, or a CheckpointError naming `path` and the first mismatch (PyTorch's
    message lists every one: dozens of lines for a changed width)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        first = lines[min(1, len(lines) - 1)]  # PyTorch's first line only says "Error(s) in loading ..."
        more = len(lines) - 2
        raise CheckpointError(f"{path}: does not fit {what}: {first}"
                              + (f" (and {more} more lines)" if more > 0 else "")) from e


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path`, or CheckpointError naming the file and what is wrong."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a diagssm checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a diagssm checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']}, this version reads {FORMAT}")
    return state


class CheckpointFolder:
    """`folder`/step_XXXXXXXX.pt (the newest `keep_last` kept) and `folder`/best.pt."""

    def __init__(self, folder, keep_last):
        self.folder, self.keep_last = Path(folder), keep_last

    def step_files(self):
        """Step checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if STEP_FILE.match(p.name))

    def step_path(self, step):
        """The file of step `step`'s checkpoint: step_<step>.pt."""
        return self.folder / f"step_{step:08d}.pt"

    def save(self, state):
        """Write `state` as step_<step>.pt, then delete all but the newest keep_last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.step_path(state["step"])
        atomic_save(state, path)
        for old in self.step_files()[:-self.keep_last]:
            old.unlink()
        return path

    def save_best(self, state):
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.folder / "best.pt")
        return self.folder / "best.pt"

    def remove_temporary(self):
        """Delete temporary files left by a writer that died mid-write; return their names."""
        if not self.folder.is_dir():
            return []
        leftovers = [p for p in self.folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        for p in leftovers:
            p.unlink()
        return [p.name for p in leftovers]

    def latest_valid(self, map_location="cpu"):
        """(path, state) of the newest step checkpoint that loads, or None if there is none.

        Files that do not load are reported on stderr and skipped; if every file is broken,
        CheckpointError names them all.
        """
        files, errors = self.step_files(), []
        for path in reversed(files):
            try:
                return path, load_checkpoint(path, map_location)
            except CheckpointError as e:
                print(f"warning: skipping {e}", file=sys.stderr)
                errors.append(str(e))
        if files:
            raise CheckpointError("no valid checkpoint in " + str(self.folder) + ":\n  " + "\n  ".join(errors))
        return None

    def resolve(self, which):
        """The file for "latest" (newest valid step checkpoint), "best", a path, or the name of a file
        in the folder (step_00000080.pt). A bare name is the folder's file where it has one (a file of
        that name in the current folder had been taken instead, and reported as this run's)."""
        if which == "latest":
            found = self.latest_valid()
            if found is None:
                raise CheckpointError(f"no checkpoint in {self.folder}")
            return found
        path = self.folder / "best.pt" if which == "best" else Path(which)
        if (self.folder / which).exists() and (not path.exists() or Path(which).name == which):
            path = self.folder / which
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint (choose latest, best, a path or a file name in "
                                  f"{self.folder})")
        return path, load_checkpoint(path)
