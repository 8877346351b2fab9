"""Two theoretical results, checked numerically in float64.

1. S4D-LegS converges to S4-LegS as the state grows (Gu, Gupta, Goel, Re, "On the Parameterization
and Initialization of Diagonal State Space Models", NeurIPS 2022, Sec. 4 and Fig. 2).

HiPPO-LegS is normal plus low rank, A = S - P P^T with P = B/sqrt(2), so P P^T = B B^T / 2
(`hippo.nplr`). S4D-LegS drops the low-rank term and halves B: the system (S, B/2), whose state
matrix is diagonal in the unitary eigenbasis of S, S = V diag(Lambda) V^H (`init.hippo_n`). The
paper shows that its basis kernels approach those of (A, B) as N -> infinity. Here both are
sampled over t in [0, L dt] and compared on the first few basis functions; the first n kernels of
S4-LegS do not depend on N (A is lower triangular), so the comparison has a fixed target.

Basis kernels, ZOH-sampled (the exact integral of the continuous kernel over each step):
    K[n, l] = e_n^T A_bar^l B_bar = int_{l dt}^{(l+1) dt} e_n^T exp(s A) B ds ~= dt K_n(l dt)
    A_bar = exp(dt A),   B_bar = int_0^dt exp(s A) ds B
for (A, B) = (A_LegS, B_LegS) (S4) and (S, B_LegS / 2) (S4D).

2. DSS Proposition 1 (Gupta, Gu, Berant, "Diagonal State Spaces are as Effective as Structured
State Spaces", NeurIPS 2022): the ZOH kernel of any diagonalisable state space (A, B, C) is a DSS
kernel, with Lambda = eig(A) and W read off the eigenvectors (`dss_from_dense`).
"""
import math

import torch

from diagssm import hippo, init
from diagssm.ops import discretize

_F64 = torch.float64


def _check(N, dt, L):
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N={N!r} must be an int >= 1")
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L={L!r} must be an int >= 1")
    if not dt > 0:
        raise ValueError(f"dt={dt!r} must be > 0")


def zoh_dense(A, B, dt):
    """A_bar = expm(dt A), B_bar = int_0^dt expm(s A) B ds, from one matrix exponential
    (Van Loan): expm([[dt A, dt B], [0, 0]]) = [[A_bar, B_bar], [0, 1]]. No inverse of A needed.

    Shapes: A (N, N); B (N,) -> A_bar (N, N), B_bar (N,)
    """
    N = A.shape[-1]
    M = torch.zeros(N + 1, N + 1, dtype=A.dtype)  # (N+1, N+1)
    M[:N, :N], M[:N, N] = dt * A, dt * B
    E = torch.linalg.matrix_exp(M)  # (N+1, N+1)
    return E[:N, :N], E[:N, N]


def basis_kernels_s4(N, dt, L):
    """Basis kernels of S4-LegS: K[n, l] = (A_bar^l B_bar)[n] for the full (N, N) HiPPO-LegS (A, B),
    ZOH at step dt (`zoh_dense`); K[n, l] ~= dt e_n^T exp(l dt A) B. Powers by repeated
    matrix-vector products in float64.

    Shapes: returns (N, L) float64
    """
    _check(N, dt, L)
    A, B = hippo.transition("legs", N)  # (N, N), (N,)
    A_bar, x = zoh_dense(A, B, dt)  # (N, N), (N,)
    K = torch.empty(N, L, dtype=_F64)  # (N, L)
    for l in range(L):
        K[:, l] = x
        x = A_bar @ x
    return K


def basis_kernels_s4d(N, dt, L):
    """Basis kernels of S4D-LegS in the original basis: the system (S, B/2), S the normal part of
    HiPPO-LegS with all N eigenmodes, S = V diag(Lambda) V^H:
        K[:, l] = V diag(Lambda_bar^l B_scale) V^H (B/2),   Lambda_bar = exp(dt Lambda),
    B_scale = (exp(dt Lambda) - 1)/Lambda (ZOH, `ops.discretize`); real up to rounding (conjugate
    pairs), the real part is returned. K[n, l] ~= dt e_n^T exp(l dt S) B/2.

    Shapes: returns (N, L) float64
    """
    _check(N, dt, L)
    Lambda, V = init.hippo_n(N)  # (N,), (N, N)
    B = hippo.transition("legs", N)[1].to(V.dtype)  # (N,)
    _, B_scale = discretize(Lambda, torch.tensor(dt, dtype=_F64), "zoh")  # (N,)
    b = B_scale * (V.conj().T @ (B / 2))  # (N,) B_bar in the eigenbasis
    l = torch.arange(L, dtype=_F64)  # (L,)
    powers = torch.exp(dt * Lambda[:, None] * l)  # (N, L) Lambda_bar^l = exp(dt Lambda l)
    return (V @ (b[:, None] * powers)).real  # (N, L)


def _kernels(Ns, dt, L, n_basis):
    for N in Ns:
        if N < n_basis:
            raise ValueError(f"N={N} is smaller than n_basis={n_basis}")
        yield N, basis_kernels_s4(N, dt, L)[:n_basis], basis_kernels_s4d(N, dt, L)[:n_basis]


def relative_error(K_s4d, K_s4):
    """||K_s4d - K_s4|| / ||K_s4||, Frobenius norms over (n_basis, L)."""
    return (torch.linalg.norm(K_s4d - K_s4) / torch.linalg.norm(K_s4)).item()


def convergence(Ns=(16, 64, 256, 1024), dt=1e-3, L=1000, n_basis=4):
    """Relative L2 error of S4D-LegS's first `n_basis` basis kernels against S4-LegS's, per N.

    Returns {N: ||K_s4d[:n] - K_s4[:n]|| / ||K_s4[:n]||} (ZOH at dt, t in [0, L dt]).
    """
    return {N: relative_error(Kd, K) for N, K, Kd in _kernels(Ns, dt, L, n_basis)}


def plot_convergence(path, Ns=(16, 64, 256, 1024), dt=1e-3, L=1000, n_basis=4, report=None):
    """Figure: the first `n_basis` basis kernels of S4-LegS (solid) and S4D-LegS (dashed) against t,
    one panel per N, the relative error in each title, dt and L on the figure. Saved as PNG.
    `report(N, error)`, if given, is called as each N's error is known (progress for the CLI).

    Plotted values are K[n, l] / dt ~= K_n(t) at t = l dt. Needs matplotlib (Agg backend).
    Returns the errors, as `convergence`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(Ns), 2)
    rows = math.ceil(len(Ns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False, sharex=True)
    t = torch.arange(L, dtype=_F64) * dt  # (L,)
    errors = {}
    for ax, (N, K, Kd) in zip(axes.flat, _kernels(Ns, dt, L, n_basis)):
        errors[N] = relative_error(Kd, K)
        if report is not None:
            report(N, errors[N])
        for n in range(n_basis):
            line, = ax.plot(t, K[n] / dt, lw=1.4, label=f"S4-LegS  n={n}")
            ax.plot(t, Kd[n] / dt, "--", lw=0.9, color=line.get_color(), label=f"S4D-LegS n={n}")
        ax.set_title(f"N = {N}: relative error {errors[N]:.3g}", fontsize=10)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(Ns):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Basis kernels K_n(t) of S4-LegS (solid) vs S4D-LegS (dashed), ZOH, dt = {dt:g}, L = {L}")
    fig.tight_layout()
    fig.savefig(path, dpi=72, pil_kwargs={"optimize": True})  # noisy curves compress poorly: < 300 KB
    plt.close(fig)
    return errors


# --- DSS Proposition 1 -----------------------------------------------------------------------------

MAX_COND = 1e8  # cond_2(V) above this: A is defective or nearly so (W would keep < 8 of 16 digits)
SOFTMAX_MIN = 1e-8  # |exp(L dt lambda) - 1| below this: the softmax normaliser vanishes


def _as_system(A, B, C):
    """Check a real dense system and cast it to float64: A (N, N), B (N,) or (H, N), C (H, N).
    Returns A (N, N), B (H, N), C (H, N)."""
    if not torch.is_tensor(A) or A.dim() != 2 or A.shape[0] != A.shape[1] or A.is_complex():
        got = (tuple(A.shape), A.dtype) if torch.is_tensor(A) else type(A).__name__
        raise ValueError(f"A must be a real square tensor (N, N); got {got}")
    N = A.shape[0]
    if not torch.is_tensor(C) or C.dim() != 2 or C.shape[1] != N or C.is_complex():
        raise ValueError(f"C must be a real tensor (H, N) with N={N}; got {tuple(C.shape)}")
    if not torch.is_tensor(B) or B.dim() not in (1, 2) or B.shape[-1] != N or B.is_complex() \
            or (B.dim() == 2 and B.shape[0] != C.shape[0]):
        raise ValueError(f"B must be a real tensor (N,) or (H, N) with (H, N)={tuple(C.shape)}; got {tuple(B.shape)}")
    return A.to(_F64), B.to(_F64).expand(C.shape[0], N), C.to(_F64)


def _steps(dt, H):
    """dt as a float64 (H,) tensor of positive steps (a number is used for every channel)."""
    dt = torch.as_tensor(dt, dtype=_F64)
    dt = dt.expand(H) if dt.dim() == 0 else dt
    if dt.shape != (H,) or not (dt > 0).all():
        raise ValueError(f"dt must be a positive number or a (H,)=({H},) tensor of positive steps; got {dt.tolist()}")
    return dt


def zoh_kernel_dense(A, B, C, dt, L):
    """The ZOH kernel of a dense system by matrix powers in float64 (the reference for Prop. 1):

        K[h, l] = C[h] A_bar^l B_bar = C exp(A dt l) (exp(A dt) - I) A^{-1} B,   dt = dt[h]

    with (A_bar, B_bar) from `zoh_dense` (no inverse of A needed).

    Shapes: A (N, N); B (N,) or (H, N); C (H, N); dt number or (H,) -> K (H, L) float64
    """
    A, B, C = _as_system(A, B, C)
    dt = _steps(dt, C.shape[0])
    K = torch.empty(C.shape[0], L, dtype=_F64)  # (H, L)
    for h in range(C.shape[0]):
        A_bar, x = zoh_dense(A, B[h], dt[h].item())  # (N, N), (N,)
        for l in range(L):
            K[h, l] = C[h] @ x
            x = A_bar @ x
    return K


def eig_checked(A, max_cond=MAX_COND):
    """A = V diag(Lambda) V^{-1} by LAPACK's geev (`torch.linalg.eig`: unit-norm eigenvectors; for
    a real A, conjugate eigenvalues come with conjugate eigenvectors). A defective or nearly
    defective A has an ill-conditioned V, and everything computed through V^{-1} loses about
    log10 cond_2(V) digits: raise when cond_2(V) > max_cond (default 1e8).

    Shapes: A (N, N) real -> Lambda (N,), V (N, N) complex128
    """
    Lambda, V = torch.linalg.eig(A.to(_F64))
    cond = torch.linalg.cond(V).item()
    if not cond <= max_cond:  # also catches inf and nan
        raise ValueError(f"A is not safely diagonalisable: its eigenvector matrix V has condition number "
                         f"{cond:.3g} > max_cond={max_cond:g} (A is defective or nearly so; W computed "
                         f"through V^-1 would lose about {math.log10(cond) if cond < math.inf else 16:.0f} "
                         f"of 16 digits)")
    return Lambda, V


def dss_weights(V, B, C):
    """W_tilde = (C V) * (V^{-1} B)^T, elementwise: the dense ZOH kernel in A's eigenbasis
    (DSS paper, proof of Proposition 1). With A = V diag(Lambda) V^{-1},

        C A_bar^l B_bar = sum_n W_tilde[h, n] (exp(dt Lambda_n) - 1)/Lambda_n exp(dt Lambda_n l).

    Shapes: V (N, N) complex; B (H, N); C (H, N) -> W_tilde (H, N) complex128
    """
    CV = C.to(V.dtype) @ V  # (H, N)
    VinvB = torch.linalg.solve(V, B.to(V.dtype).T).T  # (H, N)
    return CV * VinvB


def conjugate_half(Lambda, W):
    """Keep one mode of each conjugate pair, the one with Im > 0, with W doubled (the kernel is
    Re sum_n, and a real system's pair contributes 2 Re of either member); real modes stay as
    they are. |Im| <= 1e-12 max|Lambda| counts as real (both members kept: still exact).

    Shapes: Lambda (N,); W (H, N) -> Lambda (M,), W (H, M), M = N - (number of modes with Im < 0)
    """
    tol = 1e-12 * Lambda.abs().max()
    upper = Lambda.imag > tol  # (N,)
    keep = upper | (Lambda.imag.abs() <= tol)  # (N,)
    return Lambda[keep], (W * (1.0 + upper))[:, keep]


def softmax_factor(Lambda, dt, L):
    """exp(L dt Lambda) - 1: W_softmax = W_exp * this (softmax_l(dt Lambda l) = exp(dt Lambda l)
    (exp(dt Lambda) - 1) / (exp(L dt Lambda) - 1)). Needs exp(L dt Lambda_n) != 1 (Prop. 1's
    hypothesis, true when Re(Lambda_n dt) != 0). Shapes: Lambda (N,); dt (H,) -> (H, N)"""
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L={L!r} must be an int >= 1 (the softmax's length)")
    z = torch.expm1(L * dt[:, None] * Lambda)  # (H, N)
    if (z.abs() < SOFTMAX_MIN).any():
        raise ValueError(f"exp(L dt Lambda_n) = 1 (to {SOFTMAX_MIN:g}) for some mode: the softmax normaliser "
                         f"vanishes; DSS-SOFTMAX needs exp(L dt Lambda_n) != 1, e.g. Re(Lambda_n) != 0")
    return z


def dss_from_dense(A, B, C, variant="exp", dt=None, L=None, max_cond=MAX_COND):
    """DSS parameters (Lambda, W) with the ZOH kernel of the dense real system (A, B, C): DSS
    paper, Proposition 1. In the library's convention (`ops.dss_kernel`, no factor 2),

        exp:     ops.dss_kernel(Lambda, W, dt, L, "exp") == zoh_kernel_dense(A, B, C, dt, L), any dt, L
        softmax: ops.dss_kernel(Lambda, W, dt, L, "softmax", eps=0) == the same, for the dt, L given

    Lambda = eig(A), W_tilde = (C V)(V^{-1} B) (`dss_weights`); EXP: W = W_tilde, which depends on
    neither dt nor L (the ZOH factor (exp(dt Lambda) - 1)/Lambda is in the kernel); SOFTMAX:
    W = W_tilde (exp(L dt Lambda) - 1) (`softmax_factor`), for that dt and L only. A real system's
    conjugate pairs are halved (`conjugate_half`): M = N/2 modes when A has no real eigenvalue.
    With the default eps = 1e-7 of the softmax kernel the match is to about 1e-7 relative.

    Raises ValueError for a defective or badly conditioned A (cond_2(V) > max_cond, default 1e8;
    HiPPO-LegS itself fails from N = 14, where cond_2(V) = 2.5e9), for dt or L given with
    variant="exp" (W does not depend on them), and for a softmax normaliser that vanishes.

    Shapes:
        A: (N, N) real; B: (N,) or (H, N) real; C: (H, N) real; dt: number or (H,) (softmax only)
        returns Lambda (M,) complex128, W (H, M) complex128
    """
    A, B, C = _as_system(A, B, C)
    if variant == "exp" and (dt is not None or L is not None):
        raise ValueError("variant='exp': W does not depend on dt or L; pass them only with variant='softmax'")
    if variant not in ("exp", "softmax"):
        raise ValueError(f"variant={variant!r}; allowed: ('exp', 'softmax')")
    Lambda, V = eig_checked(A, max_cond)  # (N,), (N, N)
    W = dss_weights(V, B, C)  # (H, N)
    if variant == "softmax":
        if dt is None or L is None:
            raise ValueError("variant='softmax' needs dt and L: its W depends on both")
        W = W * softmax_factor(Lambda, _steps(dt, C.shape[0]), L)  # (H, N)
    return conjugate_half(Lambda, W)
