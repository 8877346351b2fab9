"""Memory tasks generated here. `delayed_signal`: reproduce the input delayed by `delay` steps.

A linear time-invariant system can solve it only by holding `delay` steps of history in its
state, which is what HiPPO-initialised SSMs are built for (HiPPO paper, Sec. 5).
"""
import math

import torch


def delayed_signal(n, L, delay, smooth=8, generator=None, dtype=torch.float32):
    """n smooth random signals of length L and their copies delayed by `delay` steps.

    u is white noise averaged over `smooth` steps and rescaled to unit variance (band-limited,
    so a finite state can carry it); y[t] = u[t - delay], zero for t < delay. Score on t >= delay.

    Shapes: returns u, y of shape (n, L, 1)
    """
    for name, value, low in (("n", n, 1), ("L", L, 1), ("delay", delay, 0), ("smooth", smooth, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if delay >= L:
        raise ValueError(f"delay={delay} must be shorter than L={L}")
    x = torch.randn(n, L + smooth - 1, generator=generator, dtype=torch.float64)  # (n, L + s - 1)
    u = x.unfold(1, smooth, 1).mean(-1) * math.sqrt(smooth)  # (n, L)
    y = torch.nn.functional.pad(u, (delay, 0))[:, :L]  # (n, L)
    return u[..., None].to(dtype), y[..., None].to(dtype)


TASKS = {}
SOURCES = {}
