"""CPU settings that change speed, not results, explicitly applied by the entry points.

Measured on this project's 2-core machine (README, "Performance notes"):
- decaying SSM states reach denormal floats, which x86 CPUs process up to ~6x slower: flushing
  them to zero changed one training run from 98 s to 17 s with the same result;
- fresh large tensors are mapped page by page; PyTorch's transparent-huge-page allocation
  (THP_MEM_ALLOC_ENABLE=1) made a 134 MB copy 3.5x faster.
Library code never calls this on import; `diagssm` commands, the quick start and the
benchmarks do, and users can.
"""
import os

import torch


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


def fast_cpu_settings():
    """Flush denormals and allocate large CPU tensors on transparent huge pages.

    Returns a one-line description of what was set, for logs.
    """
    flushed = torch.set_flush_denormal(True)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    thp = os.environ["THP_MEM_ALLOC_ENABLE"]
    return f"flush denormals: {'on' if flushed else 'unsupported on this CPU'}; THP_MEM_ALLOC_ENABLE={thp}"
