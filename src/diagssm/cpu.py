"""CPU settings that change speed, not results, explicitly applied by the entry points.

Measured on this project's 2-core machine (README, "Performance notes"):
- decaying SSM states reach denormal floats, which x86 CPUs process up to ~6x slower: flushing
  them to zero changed one training run from 98 s to 17 s with the same result;
- fresh large tensors are mapped page by page; PyTorch's transparent-huge-page allocation
  (THP_MEM_ALLOC_ENABLE=1) made a 134 MB copy 3.5x faster;
- glibc's malloc hands freed memory at the top of its heap back to the system, and getting it
  again faults page by page: a 4-layer model's recurrent step, whose new states are 2 MB, took
  twice as long when that happened at every step (`benchmarks/bench_step.py`); keeping 64 MB of
  it (`keep_freed_memory`) removed those faults.
Library code never calls this on import; `diagssm` commands, the quick start and the
benchmarks do, and users can.
"""
import ctypes
import os
import platform

import torch

M_TOP_PAD = -2  # glibc's mallopt parameter: bytes of free memory kept at the top of the heap
TOP_PAD_BYTES = 64 << 20
_kept = {}  # "pad": the pad `keep_freed_memory` set in this process


def cpu_fields(cpuinfo="/proc/cpuinfo"):
    """The fields of /proc/cpuinfo: {name: [its value for each logical CPU]} ({} where unreadable)."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if ":" in line:
                    name, value = line.split(":", 1)
                    fields.setdefault(name.strip(), []).append(value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The first logical CPU's flags (avx2, avx512f, ...) as a set; empty where unreadable."""
    return set(cpu_fields(cpuinfo).get("flags", [""])[0].split())


def keep_freed_memory(pad=TOP_PAD_BYTES):
    """Ask glibc's malloc to keep `pad` bytes of freed memory at the top of its heap, rather than
    return it to the system and fault it in again (mallopt(M_TOP_PAD, pad), as MALLOC_TOP_PAD_ would
    at start-up). True where set; False where the C library is not glibc or refuses."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        done = bool(ctypes.CDLL(None).mallopt(M_TOP_PAD, int(pad)))
    except (OSError, AttributeError):
        return False
    if done:
        _kept["pad"] = int(pad)
    return done


def trim_freed_memory():
    """Return the heap's free memory to the system now (glibc's malloc_trim(0), whatever pad
    `keep_freed_memory` set), so that resident memory counts only what is in use. True where glibc
    released some; False where it released none or the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def kept_freed_memory():
    """The pad `keep_freed_memory` set in this process, in bytes (0: not called, or not set)."""
    return _kept.get("pad", 0)


def fast_cpu_settings():
    """Flush denormals, allocate large CPU tensors on transparent huge pages, and keep freed heap
    memory in the process (`keep_freed_memory`).

    Returns a one-line description of what was set, for logs.
    """
    flushed = torch.set_flush_denormal(True)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    thp = os.environ["THP_MEM_ALLOC_ENABLE"]
    kept = f"{TOP_PAD_BYTES >> 20} MB" if keep_freed_memory() else "not glibc, unchanged"
    return (f"flush denormals: {'on' if flushed else 'unsupported on this CPU'}; THP_MEM_ALLOC_ENABLE={thp}; "
            f"malloc top pad: {kept}")
