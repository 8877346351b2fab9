"""Convolution of a sequence with the SSM kernel, the SSM in convolutional form (S4D, Gu et al.
2022; DSS, Gupta et al. 2022): y = K * u + D u along L, one kernel per channel h.

`fft_conv` multiplies in the frequency domain with an FFT of length n >= 2L (the smallest
2,3,5-smooth size), so the circular convolution never wraps around; `fft_conv_ref` multiplies by
the explicit (H, L, L) Toeplitz matrix. Both are plain autograd (FFTs are differentiable).

Bidirectional convention. K[0] is the causal half and K[1] the anti-causal half, and K[1]
INCLUDES lag 0 (so lag 0 is counted in both halves; some code bases instead start the
anti-causal half at lag -1, which is a different kernel for the same K):
    y[b,t,h] = sum_(s<=t) K[0,h,t-s] u[b,s,h] + sum_(s>=t) K[1,h,s-t] u[b,s,h] + D[h] u[b,t,h]
i.e. exactly  y = conv(u, K[0]) + flip(conv(flip(u), K[1])) + D u  with the D term once, where
conv is the causal convolution and flip reverses L. A layer that makes K[1] from a second SSM gets
this directly: the reverse-time SSM's kernel also starts at lag 0.
"""
import math

import numpy as np
import torch


def _check_conv_args(u, K, D, bidirectional):
    named = [("u", u), ("K", K)] + ([] if D is None else [("D", D)])
    for name, x in named:
        if not torch.is_tensor(x):
            raise TypeError(f"fft_conv: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):  # torch.fft has no half precision on the CPU
            raise ValueError(f"fft_conv: {name} must be a float32 or float64 tensor, got dtype {x.dtype}")
    if not isinstance(bidirectional, (bool, np.bool_)):  # numpy's bools, as the layers take
        raise ValueError(f"fft_conv: bidirectional must be True or False, got {bidirectional!r}")
    if u.dim() != 3 or min(u.shape) < 1:
        raise ValueError(f"fft_conv: u must have shape (B, L, H) with B, L, H >= 1, "
                         f"got shape {tuple(u.shape)}")
    _, L, H = u.shape
    want = (2, H, L) if bidirectional else (H, L)
    if tuple(K.shape) != want:
        what = "(2, H, L) since bidirectional=True" if bidirectional else "(H, L)"
        raise ValueError(f"fft_conv: K must have shape {what} = {want} to match u of shape "
                         f"{tuple(u.shape)}, got shape {tuple(K.shape)}")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"fft_conv: D must have shape (H,) = {(H,)} or be None, "
                         f"got shape {tuple(D.shape)}")


def _fast_len(m):
    """The smallest 2,3,5-smooth integer >= m (a fast FFT size)."""
    m = int(m)  # a Python int: under torch.jit.trace a size is a tensor, which `//=` and `+=` would change in place
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _circular_kernel(K, n, bidirectional):
    """Lay the kernel out on a circle of length n >= 2L: lag m at index m mod n.

    Shapes: K (H, L) or (2, H, L) -> k (H, n)
    """
    if not bidirectional:
        return torch.nn.functional.pad(K, (0, n - K.shape[-1]))  # (H, n)
    K0, K1 = K.unbind(0)  # (H, L) each
    H, L = K0.shape
    lag0 = K0[:, :1] + K1[:, :1]  # (H, 1) lag 0 is in both halves
    gap = K.new_zeros(H, n - 2 * L + 1)  # (H, n - 2L + 1)
    # lags 0 .. L-1, then zeros, then lags -(L-1) .. -1
    return torch.cat([lag0, K0[:, 1:], gap, K1[:, 1:].flip(-1)], dim=-1)  # (H, n)


def fft_conv(u, K, D=None, bidirectional=False):
    """Causal (or two-sided) convolution along L by FFT, plus the skip term D u.

    causal:        y[b,t,h] = sum_(s<=t) K[h,t-s] u[b,s,h] + D[h] u[b,t,h]
    bidirectional: y[b,t,h] = sum_(s<=t) K[0,h,t-s] u[b,s,h] + sum_(s>=t) K[1,h,s-t] u[b,s,h]
                              + D[h] u[b,t,h]      (K[1] includes lag 0; see the module docstring)

    Real inputs only; float32 stays float32 (dtypes are promoted as usual if they differ).

    Shapes:
        u: (B, L, H)
        K: (H, L), or (2, H, L) with bidirectional=True
        D: (H,) or None
        y: (B, L, H)
    """
    _check_conv_args(u, K, D, bidirectional)
    L = u.shape[1]
    n = _fast_len(2 * L)  # no wrap-around: the linear convolution has 2L - 1 taps
    k_f = torch.fft.rfft(_circular_kernel(K, n, bidirectional), n=n)  # (H, n//2 + 1)
    x = u.transpose(1, 2).to(torch.promote_types(u.dtype, K.dtype))  # (B, H, L) the one transpose; promoted
    # before the FFT (a float32 u with a float64 K had been transformed in float32 precision)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * k_f, n=n)[..., :L]  # (B, H, L)
    y = y.transpose(1, 2)  # (B, L, H) a view back
    return y if D is None else y + u * D  # (B, L, H)


def _toeplitz(k):
    """Lower-triangular Toeplitz matrices M[h, t, s] = k[h, t - s] for t >= s, else 0.

    Shapes: k (H, L) -> M (H, L, L)
    """
    L = k.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # (L, L) t - s
    return torch.where(lag >= 0, k[:, lag.clamp(min=0)], k.new_zeros(()))  # (H, L, L)


def fft_conv_ref(u, K, D=None, bidirectional=False):
    """Reference for `fft_conv`: multiply by the explicit (H, L, L) convolution matrix.

    Same equations and shapes as `fft_conv`; the anti-causal matrix is the transposed Toeplitz
    matrix of K[1], M1[h, t, s] = K[1, h, s - t] for s >= t (lag 0 on the diagonal).
    """
    _check_conv_args(u, K, D, bidirectional)
    M = _toeplitz(K[0] if bidirectional else K)  # (H, L, L)
    if bidirectional:
        M = M + _toeplitz(K[1]).transpose(1, 2)  # (H, L, L)
    dtype = torch.promote_types(M.dtype, u.dtype)  # as fft_conv: float32 u with a float64 K gives float64
    y = torch.einsum("hts,bsh->bth", M.to(dtype), u.to(dtype))  # (B, L, H)
    return y if D is None else y + u * D  # (B, L, H)


def modal_conv(A_bar, Bu, h0=None, reverse=False):
    """The scan for a constant A_bar, as a causal convolution by complex FFT (S5 is LTI).

        h_k = sum_(j<=k) A_bar^(k-j) Bu_j + A_bar^(k+1) h0     (reverse: j >= k and A_bar^(j-k))

    Same contract as `ops.scan` with A_bar of shape (P,) (its log is taken; an A_bar of 0, from an
    underflowed exp(dt Lambda), counts as the smallest normal number);
    its reference twin is `ops.scan_ref` (tests/test_s5.py).

    Shapes: A_bar (P,) complex; Bu (B, L, P) complex; h0 (B, P) or None -> h (B, L, P)
    """
    if not isinstance(reverse, bool):
        raise ValueError(f"modal_conv: reverse must be True or False, got {reverse!r}")
    if not (torch.is_tensor(A_bar) and torch.is_tensor(Bu) and Bu.dim() == 3 and A_bar.shape == Bu.shape[2:]):
        got = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in (A_bar, Bu)]
        raise ValueError(f"modal_conv: A_bar must be (P,) (constant: a time-varying A_bar needs ops.scan) "
                         f"and Bu (B, L, P); got {got[0]} and {got[1]}")
    if h0 is not None and h0.shape != (Bu.shape[0], Bu.shape[2]):
        raise ValueError(f"modal_conv: h0 must be (B, P) = {(Bu.shape[0], Bu.shape[2])}; got {tuple(h0.shape)}")
    if not A_bar.is_complex():  # the log of a negative real number is NaN; as a complex number it is not
        A_bar = A_bar.to(Bu.dtype if Bu.is_complex() else torch.promote_types(A_bar.dtype, torch.complex64))
    if reverse:
        return modal_conv(A_bar, Bu.flip(1), h0).flip(1)
    L = Bu.shape[1]
    n = 2 ** math.ceil(math.log2(2 * L))  # >= 2L: no circular wrap-around
    l = torch.arange(L, dtype=A_bar.real.dtype, device=Bu.device)  # (L,)
    # A_bar = 0 (exp(dt Lambda) underflowed) has log -inf and 0 * -inf is NaN at l = 0: take the
    # smallest normal number there (A_bar^l off by at most that); its gradient, exp's, is 0 anyway
    A_bar = torch.where(A_bar == 0, torch.finfo(l.dtype).tiny, A_bar)
    K = torch.exp(l[:, None] * torch.log(A_bar))  # (L, P) = A_bar^l
    h = torch.fft.ifft(torch.fft.fft(Bu, n=n, dim=1) * torch.fft.fft(K, n=n, dim=0), dim=1)[:, :L]  # (B, L, P)
    if h0 is not None:
        h = h + (K * A_bar) * h0[:, None]  # (B, L, P): the zero-input response A_bar^(k+1) h0
    return h

