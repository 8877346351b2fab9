"""Convolution kernels of diagonal SSMs: S4D (S4D paper, eq. (5)) and DSS (DSS paper, Prop. 1).

Both kernels are sums of N complex exponentials, K[l] = Re sum_n z_n exp(w_n l). The fast
forms never build the (H, N, L) Vandermonde tensor: with l = c*m + j (chunk size c ~ sqrt(L)),
exp(w l) = exp(w c m) * exp(w j), so the kernel is one batched real matrix multiply of a
(H, L/c, N) matrix of chunk-start powers with a (H, N, c) matrix of in-chunk powers. Memory is
O(H N sqrt(L)) instead of O(H N L), and autograd through it stays that small.
"""
import math

import torch

from diagssm.ops.discretize import discretize, discretize_ref, phi1

DSS_VARIANTS = ("exp", "softmax")
EPS_RECIPROCAL = 1e-7  # the DSS paper's regularised reciprocal


def _check_length(L):
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise ValueError(f"L={L!r} must be a positive int (the kernel length)")


def vandermonde_sum(z, w, L):
    """K[..., h, l] = Re sum_n z[..., h, n] exp(w[h, n] l) for l = 0 .. L-1, in O(H N sqrt(L)) memory.

    Shapes:
        z: (..., H, N) complex, leading dims (e.g. output channels) allowed
        w: (H, N) complex (the log of A_bar)
        returns (..., H, L) real
    """
    c = 1 << math.ceil(math.log2(L) / 2)  # in-chunk length, >= sqrt(L)
    M = -(-L // c)  # number of chunks
    j = torch.arange(c, device=w.device, dtype=w.real.dtype)  # (c,)
    m = torch.arange(M, device=w.device, dtype=w.real.dtype) * c  # (M,)
    E = torch.exp(w[..., None] * j)  # (H, N, c)
    Z = z[..., None, :] * torch.exp(w[..., None, :] * m[:, None])  # (..., H, M, N)
    # Re(Z E) = Zr Er - Zi Ei, as one real matrix multiply
    Zri = torch.cat([Z.real, -Z.imag], dim=-1)  # (..., H, M, 2N)
    Eri = torch.cat([E.real, E.imag], dim=-2)  # (H, 2N, c)
    K = Zri @ Eri  # (..., H, M, c)
    return K.flatten(-2)[..., :L]  # (..., H, L)


def vandermonde_contract(u, w):
    """The state a diagonal system reaches from zero: x[..., h, n] = sum_l u[..., h, l] exp(w[h, n] (L-1-l)).

    The adjoint of `vandermonde_sum`, by the same two levels (the (H, N, L) tensor is never built).

    Shapes:
        u: (..., H, L) real or complex; w: (H, N) complex
        returns (..., H, N) complex
    """
    L = u.shape[-1]
    c = 1 << math.ceil(math.log2(L) / 2)
    M = -(-L // c)
    u_rev = torch.nn.functional.pad(u.flip(-1), (0, M * c - L)).unflatten(-1, (M, c))  # (..., H, M, c) r = L-1-l
    j = torch.arange(c, device=w.device, dtype=w.real.dtype)
    m = torch.arange(M, device=w.device, dtype=w.real.dtype) * c
    E = torch.exp(w[..., None, :] * j[:, None])  # (H, c, N)
    T = u_rev.to(E.dtype) @ E  # (..., H, M, N)
    return (T * torch.exp(w[..., None, :] * m[:, None])).sum(-2)  # (..., H, N)


def vandermonde_contract_ref(u, w):
    """Reference twin of `vandermonde_contract`: the recurrence x <- exp(w) x + u_l, step by step."""
    x = torch.zeros(*u.shape[:-1], w.shape[-1], dtype=(u[..., :1] * w[..., :1]).dtype)
    for u_l in u.unbind(-1):
        x = torch.exp(w) * x + u_l[..., None]
    return x


def _check_s4d(A, B, C, dt):
    if not all(torch.is_tensor(t) for t in (A, B, C, dt)):
        raise TypeError("s4d_kernel: A, B, C and dt must be tensors")
    if not (A.is_complex() and B.is_complex() and C.is_complex()):
        raise ValueError(f"A, B and C must be complex (one member of each conjugate pair); got "
                         f"{A.dtype}, {B.dtype}, {C.dtype}")
    if not dt.is_floating_point():
        raise ValueError(f"dt must be a real floating tensor; got {dt.dtype}")
    if A.dim() != 2 or B.shape != A.shape:
        raise ValueError(f"A and B must both be (H, N/2); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if C.shape[-2:] != A.shape or C.dim() not in (2, 3):
        raise ValueError(f"C must be (H, N/2) or (C_out, H, N/2) with (H, N/2)={tuple(A.shape)}; got {tuple(C.shape)}")
    if dt.shape != A.shape[:1]:
        raise ValueError(f"dt must be (H,)={tuple(A.shape[:1])}; got {tuple(dt.shape)}")


def s4d_kernel(A, B, C, dt, L, discretization="zoh"):
    """S4D convolution kernel K[..., h, l] = 2 Re sum_n C[h,n] B_bar[h,n] A_bar[h,n]^l.

    A conjugate-symmetric system: the N/2 stored modes stand for N, hence the factor 2.

    Shapes:
        A, B: (H, N/2) complex; C: (H, N/2) or (C_out, H, N/2) complex; dt: (H,) real > 0
        returns K: (H, L) or (C_out, H, L) real
    """
    _check_length(L)
    _check_s4d(A, B, C, dt)
    A_bar, B_scale = discretize(A, dt[:, None], discretization)  # (H, N/2)
    w = A * dt[:, None] if discretization == "zoh" else torch.log(A_bar)  # (H, N/2) log A_bar
    return 2 * vandermonde_sum(C * (B * B_scale), w, L)


def s4d_kernel_ref(A, B, C, dt, L, discretization="zoh"):
    """Reference twin of `s4d_kernel`: powers of A_bar by repeated multiplication, one step per l."""
    _check_length(L)
    _check_s4d(A, B, C, dt)
    A_bar, B_scale = discretize_ref(A, dt[:, None], discretization)  # (H, N/2)
    CB = C * (B * B_scale)  # (..., H, N/2)
    power, K = torch.ones_like(A_bar), []
    for _ in range(L):
        K.append(2 * (CB * power).sum(-1).real)  # (..., H)
        power = power * A_bar
    return torch.stack(K, dim=-1)  # (..., H, L)


def reciprocal(x, eps=EPS_RECIPROCAL):
    """conj(x) / (|x|^2 + eps): 1/x regularised where x can vanish (DSS paper, Sec. 3.3)."""
    return x.conj() / (x.real**2 + x.imag**2 + eps)


def _check_dss(Lambda, W, dt, variant):
    if variant not in DSS_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a DSS kernel; allowed: {DSS_VARIANTS}")
    if W.dim() != 2:
        raise ValueError(f"W must be (H, N); got {tuple(W.shape)}")
    if Lambda.shape not in (W.shape[-1:], W.shape):
        raise ValueError(f"Lambda must be (N,) or (H, N) with (H, N)={tuple(W.shape)}; got {tuple(Lambda.shape)}")
    if dt.shape not in (W.shape[:1], (2,) + W.shape[:1]):
        raise ValueError(f"dt must be (H,) or (2, H) with H={W.shape[0]}; got {tuple(dt.shape)}")


def dss_exponent(Lambda, dt):
    """dt Lambda, or dt[0] Re Lambda + i dt[1] Im Lambda with separate steps (the DSS code's default).

    Shapes: Lambda (N,) or (H, N); dt (H,) or (2, H) -> (H, N) complex
    """
    if dt.dim() == 1:
        return Lambda * dt[:, None]
    return torch.complex(Lambda.real * dt[0, :, None], Lambda.imag * dt[1, :, None])


def dss_kernel(Lambda, W, dt, L, variant="exp", eps=EPS_RECIPROCAL):
    """DSS convolution kernel (DSS paper, Proposition 1), with P[h, n, l] = Lambda[n] dt[h] l:

        exp:     K[h, l] = Re sum_n W[h,n] (exp(dt Lambda) - 1)/Lambda exp(P[h,n,l])
        softmax: K[h, l] = Re sum_n W[h,n] / Lambda[n] softmax_l(P[h,n,:])[l]

    No conjugate-pair factor: the N modes are all there are. The softmax uses the closed form
    of the geometric sum, shifted so that the exponent's real part never grows (a mode with
    Re Lambda > 0 is summed from the end of the sequence), and the regularised reciprocal
    conj(x)/(|x|^2 + eps), eps = 1e-7, for the denominator Lambda * (1 - exp(dt Lambda L)), as the
    DSS code does (eps=0 gives the exact formula). Gradients are the formula's own for every mode;
    the DSS code's differ for growing modes (it shifts their exponents under no_grad:
    docs/decisions.md, "Numerics").

    Shapes:
        Lambda: (N,) or (H, N) complex; W: (H, N) complex
        dt: (H,) real > 0, or (2, H): separate steps for Re and Im of Lambda (`dss_exponent`)
        returns K: (H, L) real
    """
    _check_length(L)
    _check_dss(Lambda, W, dt, variant)
    w = dss_exponent(Lambda, dt)  # (H, N)
    if variant == "exp":
        ratio = dt[:, None] if dt.dim() == 1 else w / Lambda  # (exp(w)-1)/Lambda = phi1(w) w/Lambda
        return vandermonde_sum(W * ratio * phi1(w), w, L)
    grows = w.real > 0  # (H, N) summed from the end: exp(w l) = exp(-w (L-1-l)) * exp(w (L-1))
    w_dec = torch.where(grows, -w, w)  # (H, N), Re <= 0
    # softmax_l = exp(w_dec l') (1 - exp(w_dec)) / (1 - exp(w_dec L)), l' = l or L-1-l
    z = W * (-torch.expm1(w_dec)) * reciprocal(Lambda * -torch.expm1(w_dec * L), eps)  # (H, N)
    zero = torch.zeros_like(z)
    K = vandermonde_sum(torch.stack([torch.where(grows, zero, z), torch.where(grows, z, zero)]), w_dec, L)
    return K[0] + K[1].flip(-1)  # (H, L)


def dss_kernel_ref(Lambda, W, dt, L, variant="exp", eps=EPS_RECIPROCAL):
    """Reference twin of `dss_kernel`: the (H, N, L) tensor P built in full, the softmax over l
    shifted by the largest real part and summed explicitly; W/Lambda and the softmax's
    normaliser share one regularised reciprocal. It equals `dss_kernel` exactly at eps=0."""
    _check_length(L)
    _check_dss(Lambda, W, dt, variant)
    l = torch.arange(L, dtype=dt.dtype)  # (L,)
    w = dss_exponent(Lambda, dt)  # (H, N)
    P = w[..., None] * l  # (H, N, L)
    if variant == "exp":
        return (W[..., None] * (torch.exp(w) - 1)[..., None] / Lambda[..., None] * P.exp()).sum(1).real
    shift = P.real.max(-1, keepdim=True).values  # (H, N, 1)
    S = torch.exp(P - shift)  # (H, N, L)
    scale = reciprocal(Lambda * S.sum(-1), eps)  # (H, N) = 1 / (Lambda sum_l S)
    return (W[..., None] * scale[..., None] * S).sum(1).real  # (H, L)
