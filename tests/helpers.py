"""Shared test helpers: the one tolerance table per dtype, and seeded random inputs."""
import torch

# One tolerance per precision. complex dtypes share their real counterpart's entry.
_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),  # 8-bit mantissa (2^-8 = 0.004), a few roundings deep
}


def real_dtype(dtype):
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def tol(dtype):
    """rtol/atol for comparing a result of `dtype` with a float64 reference."""
    return _TOL[real_dtype(dtype)]


def assert_close(actual, expected, dtype=None, scale=1.0):
    """Compare `actual` with `expected` at the tolerance of `dtype` (default: actual's dtype).

    `scale` widens both tolerances for results that accumulate many terms (state it at the call).
    """
    t = tol(dtype or actual.dtype)
    expected = expected.to(actual.dtype) if torch.is_tensor(expected) else expected
    torch.testing.assert_close(actual, expected, rtol=t["rtol"] * scale, atol=t["atol"] * scale)


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        return torch.randn(*shape, dtype=dtype, generator=g)
    return torch.randn(*shape, dtype=dtype, generator=g)
