"""S4: the structured state space layer of Gu, Goel and Re, "Efficiently Modeling Long Sequences
with Structured State Spaces" (ICLR 2022), Sec. 3 and Algorithm 1 -- the DPLR baseline that the
diagonal layers simplify.

The system. `hippo.nplr_diagonal` writes the real HiPPO matrix in the unitary eigenbasis V of its
normal part: A_real = V_full (diag(Lambda_full) - p p^H) V_full^H. The layer stores one member of
each conjugate pair (M = N/2 modes): Lambda (S, M), P (rank, S, M), B (H, M), C (C', H, M), with
S = n_ssm copies of (Lambda, P); channel h uses copy h mod S (`tie`). Per channel they stand
for the N-dimensional system on the conjugate-doubled state [x; conj x] with

    Lambda_full = [Lambda, conj Lambda],  p = [P, conj P],  B_full = [B, conj B],  C_full = [C, conj C]
    A = diag(Lambda_full) - p p^H      (N, N): exactly HiPPO at initialisation (in the basis V)

As in S4's code (its Cauchy kernel sums v/(z-w) + conj(v)/(z-conj w)), the low-rank term couples
the two halves: on the stored state, A x = Lambda x - P 2 Re(P^H x), a real-linear map. (The
complex M-dimensional system Lambda - P P^H would be a different matrix, not HiPPO.) The state
is x (B, H, M) complex; the output is y = C_full x_full + D u = 2 Re(C x) + D u.

Discretisation is bilinear (S4 eq. (3)), dt per channel:
    A_bar = (I - dt/2 A)^{-1} (I + dt/2 A),   B_bar = dt (I - dt/2 A)^{-1} B
Kernel (S4 Algorithm 1): K[l] = C A_bar^l B_bar, l < L, from its truncated generating function
at the roots of unity omega_k = exp(-2 pi i k / L), where omega^L = 1:
    K_hat(omega) = C_tilde (I - A_bar omega)^{-1} B_bar,   C_tilde = C (I - A_bar^L)
                 = 2/(1+omega) C_tilde (g(omega) - A)^{-1} B,   g(omega) = 2/dt (1-omega)/(1+omega)
and (g - A)^{-1} = (g - Lambda + p p^H)^{-1} by the Woodbury identity, every term a Cauchy product
(`ops.cauchy`); K = irfft(K_hat). C is the plain C of the continuous system; C_tilde is computed
for the requested L each call, so no parameter depends on the last length used.

On the CPU the layer instead runs the same system by chunked matmuls (`backend`; `ops.chunked_dense`):
the stored state x is N = 2M real numbers [Re x; Im x], on which A_bar is a real (N, N) matrix
(`real_system`), and K[l] = 2 Re(C A_bar^l B_bar) are the taps of that real system. No C_tilde is
needed there: it only undoes the FFT's circular wrap-around.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from diagssm import hippo
from diagssm.layers.base import (SSMLayer, as_complex, autocast_off, check_backend, check_bools, check_even_state,
                                 check_length, check_positive_ints, check_rate, complex_parameter, log_uniform)
from diagssm.ops import chunked_native, fft_conv
from diagssm.ops.chunked_dense import dense_chunked, row_powers
from diagssm.ops.step import dplr_step
from diagssm.ops.cauchy import cauchy

MIN_NEG_REAL = 1e-4  # Re Lambda <= -1e-4 at init (S4's clamp), since Re Lambda = -exp(log_Lambda_re)


def real_coords(z):
    """[Re z, Im z] along the last dim: a complex (..., M) vector's real coordinates, (..., 2M)."""
    return torch.cat([z.real, z.imag], dim=-1)


def doubled(x):
    """[x, conj x] along the last dim: the conjugate-doubled (full) vector. (..., M) -> (..., 2M)."""
    return torch.cat([x, x.conj()], dim=-1)


def small_solve(A, B):
    """X = A^{-1} B for a batch of tiny r x r systems (r = rank: 1 or 2 in practice). Closed forms
    for r <= 2: torch.linalg.solve on many tiny systems is all per-system overhead on the CPU
    (0.4 s for the 128 1x1 systems of one H = 128 discretisation, measured under load), and the
    kernel solves one per channel and frequency. Shapes: A (..., r, r), B (..., r, k)."""
    r = A.shape[-1]
    if r == 1:
        return B / A
    if r == 2:
        a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
        adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)  # (..., 2, 2)
        return adj @ B / (a * d - b * c)[..., None, None]
    return torch.linalg.solve(A, B)


def tie(x, H):
    """The per-channel tensor of n_ssm copies: channel h uses copy h mod S, as the S4 code's
    repeat 't n -> (v t) n'. Shapes: x (..., S, M) with S dividing H -> (..., H, M)"""
    return x.repeat(*([1] * (x.dim() - 2)), H // x.shape[-2], 1)


def per_channel(Lambda, P, H):
    """Shared or per-channel (Lambda, P) as per-channel tensors.
    Shapes: Lambda (M,) or (H, M) -> (H, M); P (r, M) or (r, H, M) -> (r, H, M)"""
    return Lambda.expand(H, Lambda.shape[-1]), (P if P.dim() == 3 else P[:, None]).expand(P.shape[0], H, -1)


def dplr_dense(Lambda, P):
    """A = diag(Lambda_full) - p p^H on the doubled state, shared or per channel.
    Shapes: Lambda (M,), P (r, M) -> (2M, 2M); Lambda (H, M), P (r, H, M) -> (H, 2M, 2M)"""
    p = doubled(P)  # (r, ..., N)
    return torch.diag_embed(doubled(Lambda)) - torch.einsum("r...n,r...m->...nm", p, p.conj())  # (..., N, N)


def bilinear_dense(A, B, dt):
    """A_bar = (I - dt/2 A)^{-1}(I + dt/2 A), B_bar = dt (I - dt/2 A)^{-1} B, per channel.

    Shapes: A (N, N); B (H, N); dt (H,) -> A_bar (H, N, N), B_bar (H, N)
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)  # (N, N)
    half = (dt / 2).to(A.dtype)[:, None, None]  # (H, 1, 1)
    lhs = eye - half * A  # (H, N, N)
    A_bar = torch.linalg.solve(lhs, eye + half * A)  # (H, N, N)
    B_bar = torch.linalg.solve(lhs, B[..., None])[..., 0] * dt[:, None]  # (H, N)
    return A_bar, B_bar


def bilinear_dplr(Lambda, P, B, dt):
    """`bilinear_dense(dplr_dense(Lambda, P), B, dt)` without a dense solve. With
    I - dt/2 A = diag(1 - dt/2 Lambda_full) + dt/2 U U^H, U = p^T (N, r), and d its diagonal's
    inverse, Woodbury gives (I - dt/2 A)^{-1} = diag(d) - d U (2/dt I + U^H d U)^{-1} U^H d;
    then A_bar = 2 (I - dt/2 A)^{-1} - I (since I + dt/2 A = 2I - (I - dt/2 A)), B_bar = dt (.)^{-1} B.

    Shapes: Lambda (M,) or (H, M); P (r, M) or (r, H, M); B (H, N) doubled; dt (H,)
        -> A_bar (H, N, N), B_bar (H, N)
    """
    Lambda, P = per_channel(Lambda, P, dt.shape[0])  # (H, M), (r, H, M)
    U = doubled(P).permute(1, 2, 0)  # (H, N, r)
    d = 1 / (1 - (dt / 2)[:, None] * doubled(Lambda))  # (H, N)
    dU = d[..., None] * U  # (H, N, r)
    Uh_d = U.conj().transpose(-1, -2) * d[:, None, :]  # (H, r, N) U^H d
    eye_r = torch.eye(U.shape[-1], dtype=d.dtype, device=d.device)
    core = (2 / dt)[:, None, None] * eye_r + Uh_d @ U  # (H, r, r)
    inv = torch.diag_embed(d) - dU @ small_solve(core, Uh_d)  # (H, N, N) (I - dt/2 A)^{-1}
    eye = torch.eye(U.shape[1], dtype=d.dtype, device=d.device)
    return 2 * inv - eye, dt[:, None] * (inv @ B[..., None])[..., 0]  # (H, N, N), (H, N)


def c_tilde(C, A_bar, L):
    """C_tilde = C (I - A_bar^L) on the stored half; A_bar^L by repeated squaring (log2 L matmuls
    of the dense (H, N, N) matrix: cheap next to the Cauchy products, exact, and differentiable;
    the DPLR structure is not kept by powers, so nothing is gained by avoiding the dense form).

    Shapes: C (C', H, M); A_bar (H, N, N) -> (C', H, M)
    """
    M = C.shape[-1]
    CA = (doubled(C)[..., None, :] @ torch.linalg.matrix_power(A_bar, L))[..., 0, :]  # (C', H, N)
    return C - CA[..., :M]


def _frequencies(L, dtype, device):
    """z = 2 (1-omega)/(1+omega) = 2i tan(pi k / L) and s = 2/(1+omega), k = 0 .. L//2, and the
    mask of omega = -1 (even L), where both are infinite: that entry is set from its limit."""
    k = torch.arange(L // 2 + 1, dtype=torch.float64, device=device)  # (L',)
    nyquist = 2 * k == L  # (L',)
    half = torch.where(nyquist, torch.zeros_like(k), math.pi * k / L)  # (L',) theta/2
    z = torch.complex(torch.zeros_like(k), 2 * torch.tan(half))  # (L',)
    s = torch.exp(torch.complex(torch.zeros_like(k), half)) / torch.cos(half)  # (L',) e^{i theta/2}/cos
    s = torch.where(nyquist, torch.zeros_like(s), s)
    return z.to(dtype), s.to(dtype), nyquist


def dplr_kernel(Lambda, P, B, C, dt, L):
    """S4 kernel K[..., c, h, l] = C_full A_bar^l B_bar_full (real) of the doubled DPLR system.

    C is used as given (pass C_tilde for the truncated kernel; see `c_tilde`). With r(a, b) =
    sum_n a_n b_n dt / (z - dt Lambda_n) over all N modes (a Cauchy product, v = a b dt):
        K_hat = s(omega) [r(C, B) - r(C, P) (I + r(P*, P))^{-1} r(P*, B)]      (Woodbury)
    and at omega = -1 exactly K_hat = dt/2 C_full B_full (the resolvent there is dt/2 I).

    Shapes:
        Lambda (M,) or (H, M) complex; P (r, M) or (r, H, M) complex; B (..., H, M) complex
        (batch dims allowed); C (C', H, M) complex; dt (H,) real
        returns K (..., C', H, L) real
    """
    H, M = C.shape[-2:]
    rank, batch = P.shape[0], B.shape[:-2]
    Lambda, P = per_channel(Lambda, P, H)  # (H, M), (r, H, M)
    z, s, nyquist = _frequencies(L, C.dtype, C.device)  # (L',)
    left = torch.cat([C, P.conj()])  # (C'+r, H, M)
    right = torch.cat([B.reshape(-1, H, M), P])  # (nb+r, H, M)
    v = left[:, None] * right[None] * dt[:, None]  # (C'+r, nb+r, H, M)
    w = dt[:, None] * Lambda  # (H, M)
    r = cauchy(doubled(v), z, doubled(w))  # (C'+r, nb+r, H, L') sums over all N modes
    nc, nb = C.shape[0], right.shape[0] - rank
    r00, r01, r10, r11 = r[:nc, :nb], r[:nc, nb:], r[nc:, :nb], r[nc:, nb:]
    if rank == 1:
        k = r00 - r01 * r10 / (1 + r11)  # (C', nb, H, L')
    else:
        eye = torch.eye(rank, dtype=r.dtype, device=r.device)
        X = small_solve(eye + r11.permute(2, 3, 0, 1), r10.permute(2, 3, 0, 1))  # (H, L', r, nb)
        k = r00 - torch.einsum("cshl,hlsb->cbhl", r01, X)  # (C', nb, H, L')
    at_nyquist = v[:nc, :nb].sum(-1).real.to(k.dtype)[..., None]  # (C', nb, H, 1) = dt Re sum C B
    K_hat = torch.where(nyquist, at_nyquist, s * k)  # (C', nb, H, L')
    K = torch.fft.irfft(K_hat, n=L)  # (C', nb, H, L)
    return K.transpose(0, 1).reshape(*batch, nc, H, L)


def dplr_kernel_ref(Lambda, P, B, C, dt, L):
    """Reference twin of `dplr_kernel` (with C_tilde applied): K[l] = Re(C_full A_bar^l B_bar_full),
    powers of the dense bilinear A_bar by repeated multiplication, one step per l.

    Shapes: as `dplr_kernel` with B (H, M) -> K (C', H, L)
    """
    A_bar, B_bar = bilinear_dense(dplr_dense(Lambda, P), doubled(B), dt)  # (H, N, N), (H, N)
    Cf, x, K = doubled(C), B_bar, []  # (C', H, N), (H, N)
    for _ in range(L):
        K.append((Cf * x).sum(-1).real)  # (C', H)
        x = (A_bar @ x[..., None])[..., 0]  # (H, N)
    return torch.stack(K, dim=-1)  # (C', H, L)


def final_state(A_bar, B_bar, u, x0_full):
    """x_L = A_bar^L x0 + sum_l A_bar^{L-1-l} B_bar u_l on the doubled state, in two levels like
    `vandermonde_contract`: l = c m + j with c ~ sqrt(L); in-chunk powers A_bar^j B_bar (j < c)
    by doubling, then a Horner recurrence over the L/c chunks with A_bar^c.

    Shapes: A_bar (H, N, N); B_bar (H, N); u (B, L, H) real; x0_full (B, H, N) -> (B, H, N)
    """
    L = u.shape[1]
    c = 1 << math.ceil(math.log2(L) / 2)  # in-chunk length, a power of two >= sqrt(L)
    n_chunks = -(-L // c)
    G, Ap_t = row_powers(B_bar, A_bar.transpose(-1, -2), c)  # (H, c, N) rows A^j B_bar; (A^c)^T
    U = F.pad(u.transpose(1, 2), (n_chunks * c - L, 0))  # (B, H, n c) zeros first
    U = U.unflatten(-1, (n_chunks, c)).flip(-1).to(G.dtype)  # (B, H, n, c) index c-1-j
    T = U @ G  # (B, H, n, N): sum_j A^{c-1-j} B_bar u_{cm+j}
    x = x0_full[..., None, :] @ torch.linalg.matrix_power(A_bar, L).transpose(-1, -2)  # (B, H, 1, N)
    h = torch.zeros_like(x)
    for m in range(n_chunks):
        h = h @ Ap_t + T[:, :, m : m + 1]  # (B, H, 1, N)
    return (x + h)[..., 0, :]  # (B, H, N)


def real_matrix(A_bar):
    """The doubled A_bar's action on the stored half, x -> A11 x + A12 conj x (real-linear), as a
    real matrix on x = [Re x; Im x]. Shapes: (H, N, N) complex -> (H, N, N) real"""
    M = A_bar.shape[-1] // 2
    A11, A12 = A_bar[:, :M, :M], A_bar[:, :M, M:]  # (H, M, M)
    return torch.cat([torch.cat([A11.real + A12.real, A12.imag - A11.imag], -1),
                      torch.cat([A11.imag + A12.imag, A11.real - A12.real], -1)], -2)  # (H, N, N)


def real_output(C):
    """C (C', H, M) complex -> the real (C', H, N) with C' x = 2 Re(C x_stored) on x = [Re x; Im x]."""
    return 2 * real_coords(C.conj())


def state_response(A, C, x0, L):
    """y_l = C A^(l+1) x0 for l < L (the response to the state x0 with no input; real coordinates:
    `real_matrix`, `real_output`), in two levels like `final_state`: l = c m + j, rows C A^j
    (j < c) by doubling, states A^(c m + 1) x0 by a recurrence over the L/c chunks with A^c. Its
    errors stay at the precision's (the generating-function route, the kernel of B' = A_bar x0 / dt
    through C_tilde, lost a quarter of the response in float32 at dt = 1e-3: C_tilde's cancellation
    times 1/dt).

    Shapes: A (H, N, N); C (C', H, N); x0 (B, H, N) -> (B, C', H, L)
    """
    c = 1 << math.ceil(math.log2(L) / 2)  # in-chunk length, a power of two >= sqrt(L)
    n_chunks = -(-L // c)
    Cp = C.shape[0]
    R, Ac = row_powers(C, A, c)  # (C', H, c, N) rows C A^j; (H, N, N) A^c
    s = x0.transpose(0, 1) @ A.transpose(-1, -2)  # (H, B, N): A x0, per channel one (B, N) x (N, N) product
    Act, states = Ac.transpose(-1, -2), []
    for _ in range(n_chunks):
        states.append(s)
        s = s @ Act
    S = torch.stack(states, dim=2).flatten(1, 2)  # (H, B n, N): A^(c m + 1) x0
    y = R.transpose(0, 1).flatten(1, 2) @ S.transpose(-1, -2)  # (H, C' c, B n): C A^j A^(c m + 1) x0
    y = y.unflatten(1, (Cp, c)).unflatten(-1, (x0.shape[0], n_chunks))  # (H, C', c, B, n)
    return y.permute(3, 1, 0, 4, 2).flatten(-2)[..., :L]  # (B, C', H, L), l = c m + j


class S4(SSMLayer):
    """S4 layer (DPLR): (B, L, H) -> (B, L, C'' H). The SSM and its D skip term only.

    Args:
        d_model: H, the number of channels (SISO systems; they share Lambda and P by n_ssm).
        d_state: N, the size of the real HiPPO matrix; N/2 complex modes are stored.
        measure: HiPPO measure, "legs" | "legt" | "lagt" | "fout" (`hippo.nplr_diagonal`).
        rank: rank of the low-rank term; legt needs 2 (a ValueError says so), the others 1.
        dt_min, dt_max: dt is initialised log-uniform in [dt_min, dt_max].
        channels: output channels C'' (C is (C', H, N/2)); the output is (B, L, C'' H).
        bidirectional: add an anti-causal kernel with its own C (no recurrent state then).
        check_finite: reject NaN/inf inputs.
        backend: "auto" | "fft" | "chunked". "fft": the kernel by Cauchy products, then an FFT
            convolution (S4's algorithm). "chunked": the same system in real coordinates by chunked
            matmuls with a dense carry (`ops.chunked_dense`; `real_system`). "auto": chunked on the
            CPU, fft elsewhere (`pick_backend`; the one used is in `last_backend`).
        n_ssm: S, the number of trained copies of (Lambda, P), dividing H: channel h uses copy
            h mod S, as in the S4 code (`SSMKernelDPLR`, `n_ssm`). 1 (default): tied across all
            channels; H: one per channel. Unlike the S4 code, B stays per channel for every S
            (the S4 code's copies include B).

    Parameters (H = d_model, N = d_state, r = rank, S = n_ssm, C' = channels (x2 bidirectional)):
    log_dt (H,); log_Lambda_re (S, N/2) with Re Lambda = -exp(.) < 0; Lambda_im (S, N/2);
    P (r, S, N/2, 2); B (H, N/2, 2); C (C', H, N/2, 2); D (channels, H).
    Count: H (1 + N (1 + C') + channels) + S N (1 + r). With S = H/2 and r = 1 that is S4D's
    H (3N + 2).

    Shapes: u (B, L, H) -> y (B, L, channels H); state (B, H, N/2) complex.
    """

    # given their own learning rate and no weight decay by diagssm.optim.param_groups
    ssm_params = ("log_dt", "log_Lambda_re", "Lambda_im", "P", "B")

    def __init__(self, d_model, d_state=64, measure="legs", rank=1, dt_min=1e-3, dt_max=1e-1,
                 channels=1, bidirectional=False, check_finite=True, n_ssm=1, backend="auto"):
        super().__init__()
        check_even_state(d_state, "S4")
        self.backend = check_backend(backend, "S4")
        check_positive_ints("S4", d_model=d_model, channels=channels, n_ssm=n_ssm)
        if d_model % n_ssm:
            raise ValueError(f"S4: n_ssm={n_ssm} must divide d_model={d_model} (channel h uses copy h mod n_ssm)")
        Lambda, P, B, _ = hippo.nplr_diagonal(measure, d_state, rank)  # (M,), (r, M), (M,)
        self.d_model, self.d_state, self.n_modes = d_model, d_state, d_state // 2
        self.measure, self.rank, self.channels, self.n_ssm = measure, rank, channels, n_ssm
        self.bidirectional, self.check_finite = check_bools("S4", bidirectional=bidirectional,
                                                            check_finite=check_finite)
        H, M, S = d_model, self.n_modes, n_ssm
        self.log_dt = nn.Parameter(torch.log(log_uniform(H, dt_min, dt_max)).float())  # (H,)
        log_re = torch.log((-Lambda.real).clamp(min=MIN_NEG_REAL))  # (M,)
        self.log_Lambda_re = nn.Parameter(log_re.expand(S, M).float().contiguous())  # (S, M)
        self.Lambda_im = nn.Parameter(Lambda.imag.expand(S, M).float().contiguous())  # (S, M)
        self.P = complex_parameter(P[:, None].expand(rank, S, M))  # (r, S, M, 2)
        self.B = complex_parameter(B.expand(H, M))  # (H, M, 2)
        self.C = complex_parameter(torch.randn(channels * (1 + bidirectional), H, M, dtype=torch.complex64))
        self.D = nn.Parameter(torch.randn(channels, H))  # (channels, H)

    def extra_repr(self):
        return f"{super().extra_repr()}, n_ssm={self.n_ssm}, backend={self.backend!r}"

    def Lambda(self):
        """The diagonal part per channel, (H, N/2) complex, Re < 0 (copy h mod n_ssm: `tie`)."""
        return tie(torch.complex(-torch.exp(self.log_Lambda_re), self.Lambda_im), self.d_model)

    def low_rank(self):
        """The low-rank factor P per channel, (r, H, N/2) complex (copy h mod n_ssm: `tie`)."""
        return tie(as_complex(self.P), self.d_model)

    def dt(self, rate=1.0):
        return torch.exp(self.log_dt) * check_rate(rate)  # (H,)

    def dense(self, rate=1.0):
        """The discretised doubled system (A_bar (H, N, N), B_bar (H, N)), for the state and tests."""
        return bilinear_dplr(self.Lambda(), self.low_rank(), doubled(as_complex(self.B)), self.dt(rate))

    def kernel(self, L, rate=1.0):
        """K (C', H, L) = 2 Re(C A_bar^l B_bar) on the stored half, l < L (S4 Algorithm 1)."""
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"L={L!r} must be a positive int (the kernel length)")
        A_bar, _ = self.dense(rate)
        Ct = c_tilde(as_complex(self.C), A_bar, L)  # (C', H, M)
        return dplr_kernel(self.Lambda(), self.low_rank(), as_complex(self.B), Ct, self.dt(rate), L)

    def default_state(self, batch_size):
        """The zero state, (B, H, N/2) complex."""
        return self.zero_state(batch_size, self.d_model, self.n_modes)

    def real_system(self, rate=1.0):
        """The discretised system in real coordinates x = [Re x_stored; Im x_stored] (n = N):
        A (H, N, N), B (H, N) and C (C', H, N) real with y = C x = 2 Re(C x_stored). The stored half
        of A_bar [x; conj x] is A11 x + A12 conj x, real-linear in x (module docstring)."""
        A_bar, B_bar = self.dense(rate)  # (H, N, N), (H, N) doubled
        return real_matrix(A_bar), real_coords(B_bar[:, :self.n_modes]), real_output(as_complex(self.C))

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def forward(self, u, state=None, return_state=False, rate=1.0, L=None):
        """y = K * u + D u (+ the response to `state`), by FFT convolution or chunked matmuls.

        `self.backend` picks the algorithm ("auto": chunked on the CPU, fft elsewhere). `L` is
        accepted for interface parity and unused (S4 does not depend on it).

        Shapes:
            u: (B, L, H); state: (B, H, N/2) complex or None (zero)
            returns y (B, L, channels H), and the final state (B, H, N/2) when return_state
        """
        check_length(L)
        self.check_input(u)
        Bsz, L_u, H = u.shape
        check_bools(type(self).__name__, return_state=return_state)
        if state is not None or return_state:
            self.check_recurrent()
            state = self.default_state(Bsz) if state is None else state
            self.check_state(state, Bsz)
        forward = self._forward_chunked if self.pick_backend(u, L_u, rate) == "chunked" else self._forward_fft
        y, x = forward(u, state, return_state, rate)
        return (y, x) if return_state else y

    def _forward_chunked(self, u, state, return_state, rate):
        """`dense_chunked` of the real system; the anti-causal half runs it on the reversed input."""
        A, B, C = self.real_system(rate)  # (H, N, N), (H, N), (C', H, N)
        h0 = None if state is None else real_coords(state)  # (B, H, N)
        y, x = dense_chunked(u, A, B, C[: self.channels], self.D, h0)  # (B, L, channels, H), (B, H, N)
        if self.bidirectional:
            y = y + dense_chunked(u.flip(1), A, B, C[self.channels:])[0].flip(1)
        M = self.n_modes
        return y.flatten(2), torch.complex(x[..., :M], x[..., M:])  # (B, L, channels H), (B, H, M)

    def _forward_fft(self, u, state, return_state, rate):
        """The Cauchy kernel and an FFT convolution. The zero-input response 2 Re(C A_bar^(l+1) x0)
        and the final state use the dense doubled A_bar in two levels (`state_response`,
        `final_state`)."""
        L_u = u.shape[1]
        Lambda, P, dt = self.Lambda(), self.low_rank(), self.dt(rate)  # (H, M), (r, H, M), (H,)
        A_bar, B_bar = bilinear_dplr(Lambda, P, doubled(as_complex(self.B)), dt)  # (H, N, N), (H, N)
        C = as_complex(self.C)  # (C', H, M)
        K = dplr_kernel(Lambda, P, as_complex(self.B), c_tilde(C, A_bar, L_u), dt, L_u)  # (C', H, L)
        y = self._conv(u, K)  # (B, L, channels H)
        if state is None:
            return y, None
        response = state_response(real_matrix(A_bar), real_output(C), real_coords(state), L_u)  # (B, C', H, L)
        y = y + response.permute(0, 3, 1, 2).flatten(2)  # (B, L, C' H)
        if not return_state:
            return y, None
        x = final_state(A_bar, B_bar, u, doubled(state))  # (B, H, N)
        return y, x[..., : self.n_modes]

    def _conv(self, u, K):
        """K (C', H, L) -> fft_conv per output channel, (B, L, channels H)."""
        if self.bidirectional:
            K = K.unflatten(0, (2, -1)).transpose(0, 1)  # (channels, 2, H, L)
        return torch.cat([fft_conv(u, K[c], self.D[c], bidirectional=self.bidirectional)
                          for c in range(self.channels)], dim=-1)

    @chunked_native.eager  # runs as it is inside a compiled model (README, torch.compile)
    @autocast_off
    def step(self, u_t, state, rate=1.0, L=None):
        """One bilinear step in O(N r) per channel, using the DPLR structure (the recurrent view of S4):
            x' = (I - dt/2 A)^{-1} ((I + dt/2 A) x + dt B u_t),   y_t = 2 Re(C x') + D u_t
        The inverse is diag(1 - dt/2 Lambda) plus the real-linear rank-r term, solved by Woodbury:
        with d = 1/(1 - dt/2 Lambda) and q = 2 Re(P^H x') (r real numbers per channel),
            x' = d (rhs - dt/2 P q),   (I + dt Re(P^H d P)) q = 2 Re(P^H d rhs).

        Shapes: u_t (B, H); state (B, H, N/2) complex -> y_t (B, channels H), state (B, H, N/2)
        """
        check_length(L)
        self.check_recurrent()
        self.check_input(u_t, "u_t")
        self.check_state(state, u_t.shape[0])
        y, x = dplr_step(u_t, state, *self.step_system(rate), self.D)  # (B, C', H), (B, H, M)
        return y.flatten(1), x

    def step_system(self, rate):
        """What `step` reuses (`inference_cached`), per channel: E = 1 + dt/2 Lambda, 2 conj(P),
        dt/2 P, dt B, d = 1/(1 - dt/2 Lambda), 2 conj(P) d, the inverse of I + dt Re(P^H d P)
        (r x r), d dt/2 P and C. Shapes (H, M), (r, H, M), (H, r, r), C (C', H, M)."""
        def build():
            Lambda, P, dt = self.Lambda(), self.low_rank(), self.dt(rate)[:, None]  # (H, M), (r, H, M), (H, 1)
            d = 1 / (1 - dt / 2 * Lambda)  # (H, M)
            G = torch.einsum("shm,hm,thm->hst", P.conj(), d, P).real  # (H, r, r)
            eye = torch.eye(self.rank, dtype=G.dtype, device=G.device)
            inv = small_solve(eye + dt[..., None] * G, eye.expand_as(G))  # (H, r, r)
            terms = (1 + dt / 2 * Lambda, 2 * P.conj(), dt / 2 * P, dt * as_complex(self.B), d, 2 * P.conj() * d,
                     inv, d * dt / 2 * P, as_complex(self.C))
            return chunked_native.dense(*terms)
        return self.inference_cached(rate, build)
