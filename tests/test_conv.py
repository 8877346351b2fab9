"""ops.fft_conv (FFT, length >= 2L) against ops.fft_conv_ref (explicit Toeplitz matrix)."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from diagssm.ops import fft_conv, fft_conv_ref
from helpers import assert_close, randn

F64, F32 = torch.float64, torch.float32


def make_inputs(B, L, H, bidirectional, dtype=F64, seed=0):
    """Seeded u ~ N(0, 1), a decaying kernel K[.., h, l] ~ N(0, 1) * 0.99^l, and D ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, H, generator=g, dtype=F64)
    K = torch.randn(*((2,) if bidirectional else ()), H, L, generator=g, dtype=F64)
    K = K * 0.99 ** torch.arange(L, dtype=F64)
    D = torch.randn(H, generator=g, dtype=F64)
    return u.to(dtype), K.to(dtype), D.to(dtype)


def run_with_grads(fn, u, K, D, bidirectional, seed=1):
    """y = fn(u, K, D) and the grads of <g, y> for a fixed random g (D may be None)."""
    inputs = [x.detach().clone().requires_grad_() for x in (u, K, D) if x is not None]
    y = fn(inputs[0], inputs[1], inputs[2] if D is not None else None, bidirectional)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)  # (B, L, H)
    return y, torch.autograd.grad(y, inputs, g.to(y.dtype))


@pytest.mark.parametrize("L", [1, 3, 17, 1000])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_D", [False, True])
def test_fft_conv_matches_ref(L, bidirectional, with_D):
    B, H = (2, 3) if L == 1000 else (3, 4)
    u, K, D = make_inputs(B, L, H, bidirectional)
    D = D if with_D else None
    y, grads = run_with_grads(fft_conv, u, K, D, bidirectional)
    y_ref, grads_ref = run_with_grads(fft_conv_ref, u, K, D, bidirectional)
    assert y.shape == (B, L, H) and y.dtype == F64
    assert_close(y, y_ref)
    for x, gr, gr_ref in zip((u, K, D), grads, grads_ref):
        assert gr.shape == x.shape
        assert_close(gr, gr_ref)


def test_fft_conv_by_hand():
    # K = [1, 2, 3], u = [1, 0, 0] + ... : y_t = sum_s K[t-s] u[s]
    u = torch.tensor([1.0, 10.0, 100.0], dtype=F64).reshape(1, 3, 1)
    K = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    D = torch.tensor([0.5], dtype=F64)
    expected = torch.tensor([1.0, 2 + 10, 3 + 20 + 100], dtype=F64) + 0.5 * u.flatten()
    assert_close(fft_conv(u, K, D).flatten(), expected)
    # bidirectional, K[1] = [4, 5, 6] includes lag 0: y_t += sum_(s>=t) K[1, s-t] u[s]
    K2 = torch.stack([K, torch.tensor([[4.0, 5.0, 6.0]], dtype=F64)])
    anti = torch.tensor([4 + 50 + 600, 40 + 500, 400], dtype=F64)
    assert_close(fft_conv(u, K2, D, bidirectional=True).flatten(), expected + anti)


@pytest.mark.parametrize("L", [16, 17, 1000])
def test_fft_conv_does_not_wrap(L):
    # a kernel that is 1 only at lag L-1 (and at lag L-1 of the anti-causal half): any circular
    # wrap-around would leak u into outputs other than the two end points
    u = torch.randn(1, L, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    K = torch.zeros(2, 2, L, dtype=F64)
    K[:, :, -1] = 1.0
    y = fft_conv(u, K[0])
    assert_close(y[:, -1], u[:, 0])
    assert y[:, :-1].abs().max() < 1e-12
    y = fft_conv(u, K, bidirectional=True)
    assert_close(y[:, 0], u[:, -1])
    assert_close(y[:, -1], u[:, 0])
    assert y[:, 1:-1].abs().max() < 1e-12


@pytest.mark.parametrize("L", [1, 3, 17, 1000])
def test_bidirectional_is_forward_plus_flipped(L):
    B, H = 2, 3
    u, K, D = make_inputs(B, L, H, bidirectional=True)
    y = fft_conv(u, K, D, bidirectional=True)
    expected = fft_conv_ref(u, K[0]) + fft_conv_ref(u.flip(1), K[1]).flip(1) + D * u  # D once
    assert_close(y, expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_gradcheck(bidirectional):
    u, K, D = make_inputs(2, 5, 2, bidirectional)  # small: each FFT call has a fixed overhead
    inputs = tuple(x.requires_grad_() for x in (u, K, D))
    assert gradcheck(lambda u, K, D: fft_conv(u, K, D, bidirectional), inputs)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_float32_matches_float64_ref(bidirectional):
    u, K, D = make_inputs(2, 1000, 3, bidirectional)
    y, grads = run_with_grads(fft_conv, u.float(), K.float(), D.float(), bidirectional)
    y_ref, grads_ref = run_with_grads(fft_conv_ref, u, K, D, bidirectional)
    assert y.dtype == F32 and all(g.dtype == F32 for g in grads)
    assert_close(y, y_ref, dtype=F32)
    # grad K[h, l] sums B * (L - l) ~ 2000 products whose float32 rounding is relative to
    # sum |g| |u| (~10x the result): measured at 87% of the plain tolerance, so widen 4x
    for gr, gr_ref, scale in zip(grads, grads_ref, (1.0, 4.0, 1.0)):
        assert_close(gr, gr_ref, dtype=F32, scale=scale)


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.ones(4, 3), torch.ones(3, 4)), {}, r"u must have shape \(B, L, H\)"),
    ((torch.ones(2, 0, 3), torch.ones(3, 0)), {}, "B, L, H >= 1"),
    ((torch.ones(2, 5, 3), torch.ones(3, 4)), {}, r"K must have shape \(H, L\) = \(3, 5\)"),
    ((torch.ones(2, 5, 3), torch.ones(3, 5)), {"bidirectional": True}, r"\(2, H, L\)"),
    ((torch.ones(2, 5, 3), torch.ones(2, 3, 5)), {}, r"got shape \(2, 3, 5\)"),
    ((torch.ones(2, 5, 3), torch.ones(3, 5), torch.ones(4)), {}, r"D must have shape \(H,\)"),
    ((torch.ones(2, 5, 3, dtype=torch.complex64), torch.ones(3, 5)), {}, "u must be a float32 or float64"),
    ((torch.ones(2, 5, 3, dtype=torch.float16), torch.ones(3, 5, dtype=torch.float16)), {},
     "u must be a float32 or float64 tensor, got dtype torch.float16"),  # had been a bare "Unsupported dtype Half"
    ((torch.ones(2, 5, 3), torch.ones(3, 5)), {"bidirectional": 1}, "bidirectional must be"),
])
def test_fft_conv_errors(args, kwargs, match):
    for fn in (fft_conv, fft_conv_ref):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)


def test_fft_conv_takes_numpy_bools():
    """The layers take numpy's bools for their flags; fft_conv had refused np.bool_."""
    u, K = randn(2, 6, 3, seed=1), randn(2, 3, 6, seed=2)
    for flag in (True, False):
        k = K if flag else K[0]
        assert torch.equal(fft_conv(u, k, bidirectional=np.bool_(flag)), fft_conv(u, k, bidirectional=flag))


def test_mixed_precision_promotes_in_both_twins():
    """float32 u with a float64 K: both twins promote to float64 (the reference had raised, and fft_conv had
    transformed u in float32 precision)."""
    u, K, D = randn(2, 20, 3).float(), randn(3, 20), randn(3)
    y, want = fft_conv(u, K, D), fft_conv_ref(u, K, D)
    assert y.dtype == want.dtype == torch.float64
    assert_close(y, want)
