"""S4D-LegS converges to S4-LegS as the state grows (Gu, Gupta, Goel, Re, "On the Parameterization
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


def plot_convergence(path, Ns=(16, 64, 256, 1024), dt=1e-3, L=1000, n_basis=4):
    """Figure: the first `n_basis` basis kernels of S4-LegS (solid) and S4D-LegS (dashed) against t,
    one panel per N, the relative error in each title, dt and L on the figure. Saved as PNG.

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
