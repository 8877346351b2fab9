"""fast_cpu_settings flushes denormals, keeps freed heap memory (glibc) and says what it set."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from diagssm.cpu import fast_cpu_settings, keep_freed_memory, trim_freed_memory


def test_fast_cpu_settings():
    try:
        text = fast_cpu_settings()
        assert "THP_MEM_ALLOC_ENABLE=" in text and os.environ["THP_MEM_ALLOC_ENABLE"]
        if "on" in text.split(";")[0]:
            assert torch.tensor(1e-40, dtype=torch.float32).item() == 0.0  # a denormal, flushed
        assert "malloc top pad: " in text
    finally:
        torch.set_flush_denormal(False)


# 4,000 blocks of 4 KB from the heap, then freed: the free space left at the top of the heap (glibc's
# mallinfo2 keepcost) is what the process kept rather than returned to the system
KEPT = """
import ctypes, sys
from diagssm.cpu import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(4096) for _ in range(4000)]
for b in reversed(blocks):
    libc.free(b)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                                       "fordblks keepcost").split()]
libc.mallinfo2.restype = Info
print(kept, libc.mallinfo2().keepcost)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_keeps_the_top_of_the_heap():
    """Without it glibc returns freed memory above 128 KB at the top of its heap to the system (and a
    4-layer model's step then faulted its 2 MB of new states in again: benchmarks/bench_step.py);
    with it the 16 MB freed here stay. Each case in a fresh process."""
    runs = {}
    for keep in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", KEPT, keep], capture_output=True, text=True, check=True)
        kept, top = out.stdout.split()
        runs[keep] = (kept, int(top))
    assert runs["1"][0] == "True" and runs["0"][0] == "False"
    assert runs["1"][1] >= 16_000_000 > 4_000_000 > runs["0"][1]


def test_keep_freed_memory_elsewhere_is_false(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is False


def test_trim_freed_memory_elsewhere_is_false(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert trim_freed_memory() is False
