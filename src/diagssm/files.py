"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

`atomic_save` writes to a temporary file in the same folder, flushes and fsyncs it, renames it over the
target with os.replace (atomic on POSIX) and fsyncs the folder so that the rename survives a crash.
Temporary names start with "." and end in ".tmp". Checkpoints and task caches are written with it.
"""
import os
import secrets
import socket
from pathlib import Path

import torch


def cache_dir():
    """The cache folder: $DIAGSSM_CACHE, default ~/.cache/diagssm (task caches, the native kernels)."""
    return Path(os.environ.get("DIAGSSM_CACHE", "~/.cache/diagssm")).expanduser()


# what torch.save's archive writer (caffe2's PyTorchStreamWriter) says when a write fails
WRITER_ERRORS = ("inline_container", "PytorchStreamWriter")


def atomic_save(obj, path):
    """torch.save(obj) to `path` so that `path` is never seen half-written (module docstring). A
    write that fails inside torch.save's archive writer (a RuntimeError naming it, e.g. "unexpected
    pos" when the disk fills at some points) is an OSError, as the other failed writes are."""
    def save(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if not any(m in str(e) for m in WRITER_ERRORS):  # a pickling or device error is not a write's
                raise
            raise OSError(f"torch.save could not write {Path(path).name} (a full disk?): {e}") from e
    _atomic_write(path, save)


def atomic_write_text(text, path):
    """Write `text` (UTF-8) to `path` so that `path` is never seen half-written."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path, write):
    path = Path(path)
    # unique per writer: processes on two machines writing one shared (NFS) folder can share a PID
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
