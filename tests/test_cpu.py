"""fast_cpu_settings flushes denormals and says what it set."""
import os

import torch

from diagssm.cpu import fast_cpu_settings


def test_fast_cpu_settings():
    try:
        text = fast_cpu_settings()
        assert "THP_MEM_ALLOC_ENABLE=" in text and os.environ["THP_MEM_ALLOC_ENABLE"]
        if "on" in text.split(";")[0]:
            assert torch.tensor(1e-40, dtype=torch.float32).item() == 0.0  # a denormal, flushed
    finally:
        torch.set_flush_denormal(False)
