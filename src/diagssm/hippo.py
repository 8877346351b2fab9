"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) form, and its diagonalisation.

References
----------
- HiPPO: Gu, Dao, Ermon, Rudra, Ré, "HiPPO: Recurrent Memory with Optimal Polynomial
  Projections", NeurIPS 2020 (LegS, LegT, LagT matrices; Sec. 2-3, App. D).
- S4: Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces",
  ICLR 2022 (NPLR form A = V (Lambda - P Q^*) V^*, Theorem 1, Sec. 3.3).
- "How to Train Your HiPPO": Gu, Johnson, Timalsina, Rudra, Ré, ICLR 2023 (arXiv 2022)
  (FouT, and the 1/2 time-scale factor of LegT used by the S4 code).
- S4D: Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State
  Space Models", NeurIPS 2022 (S4D-LegS = diagonal of the normal part, Sec. 4).
- DSS: Gupta, Gu, Berant, "Diagonal State Spaces are as Effective as Structured State
  Spaces", NeurIPS 2022 (Skew-HiPPO initialisation).
- S5: Smith, Warrington, Linderman, "Simplified State Space Layers for Sequence
  Modeling", ICLR 2023 (HiPPO-N = normal part of HiPPO-LegS).

Everything here is float64 (complex128 after diagonalisation): these are initialisers, built
once; cast at the call site.

Conventions
-----------
- ``transition`` returns (A, B) with A (N, N), B (N,).
- ``nplr`` returns (S, P, B) with P of shape (rank, N) (the S4 code's layout) and
  A = S - P^T P = S - sum_r p_r p_r^T, S normal.
- Eigen-modes of S are ordered by increasing imaginary part; conjugate pairs sit at mirrored
  positions j <-> N-1-j. The conjugate-symmetric ("kept") half is the last N//2 modes: those
  with Im >= 0, in increasing Im. Zero-frequency pairs (Fourier only) come first in the kept
  half with complex eigenvectors (e_a + i e_b)/sqrt(2), so that 2 Re(...) still rebuilds them.
"""
import math

import numpy as np
import torch

MEASURES = ("legs", "legt", "lagt", "fout")
_F64 = torch.float64


def _check_measure(measure):
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is not supported; allowed: {', '.join(MEASURES)}")


# The argument checks of the core, the layers and the tasks: each error names the argument (after
# `who`, the class or function, when given).
def _named(who, name, value):
    return f"{who}{': ' if who else ''}{name}={value!r}"


def _check_int(name, value, minimum, who=""):
    """value if it is an int (not a bool) >= minimum, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_named(who, name, value)} must be an int >= {minimum}")
    return value


def _check_even(name, value, who=""):
    """value if it is an even int >= 2 (N/2 conjugate pairs), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"{_named(who, name, value)} must be an even int >= 2 (conjugate pairs: N/2 complex modes)")
    return value


def _check_bool(name, value, who=""):
    """value as a Python bool if it is True or False (Python's or numpy's), else a ValueError naming it:
    'no' or 2 would otherwise pass as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{_named(who, name, value)} must be True or False")
    return bool(value)


def _R(N):
    """R_n = sqrt(2n + 1), the Legendre normalisation. Shapes: (N,)."""
    return torch.sqrt(2 * torch.arange(N, dtype=_F64) + 1)  # (N)


def _index_grid(N):
    n = torch.arange(N).unsqueeze(1)  # (N 1) row index
    k = torch.arange(N).unsqueeze(0)  # (1 N) column index
    return n, k


def _legs(N):
    # A[n,k] = -R_n R_k (n > k), -(n+1) (n = k), 0 (n < k);  B[n] = R_n
    n, k = _index_grid(N)
    R = _R(N)  # (N)
    A = -torch.where(n > k, R[:, None] * R[None, :], torch.zeros((), dtype=_F64))  # (N N)
    A = A - torch.diag(torch.arange(1, N + 1, dtype=_F64))  # (N N)
    return A, R.clone()


def _legt(N):
    # A[n,k] = -1/2 R_n R_k (1 if n >= k else (-1)^(n-k));  B[n] = 1/2 R_n
    n, k = _index_grid(N)
    R = _R(N)  # (N)
    sign = torch.where((n >= k) | ((n - k) % 2 == 0), 1.0, -1.0).to(_F64)  # (N N)
    return -0.5 * sign * R[:, None] * R[None, :], 0.5 * R  # (N N), (N)


def _lagt(N):
    # A = I/2 - tril(ones);  B = 1
    A = 0.5 * torch.eye(N, dtype=_F64) - torch.tril(torch.ones(N, N, dtype=_F64))  # (N N)
    return A, torch.ones(N, dtype=_F64)


def _fout_B(N):
    B = torch.zeros(N, dtype=_F64)  # (N)
    B[0::2] = math.sqrt(2.0)
    B[0] = 1.0
    return B


def _fout_Omega(N):
    """Skew frequency blocks: Omega[2k, 2k+1] = -pi k, Omega[2k+1, 2k] = +pi k."""
    Omega = torch.zeros(N, N, dtype=_F64)  # (N N)
    for k in range(N // 2):
        Omega[2 * k, 2 * k + 1] = -math.pi * k
        Omega[2 * k + 1, 2 * k] = math.pi * k
    return Omega


def _fout(N):
    B = _fout_B(N)  # (N)
    return _fout_Omega(N) - torch.outer(B, B), B  # (N N), (N)


def transition(measure, N):
    """HiPPO transition matrices (A, B) of x'(t) = A x(t) + B u(t), in float64.

    - ``"legs"`` (HiPPO 2020, eq. for LegS):
      A[n,k] = -sqrt(2n+1) sqrt(2k+1) if n > k, -(n+1) if n = k, 0 if n < k;  B[n] = sqrt(2n+1).
    - ``"legt"`` (HiPPO 2020 LegT, with the extra 1/2 time-scale factor of the S4 code,
      "How to Train Your HiPPO"):
      A[n,k] = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k));  B[n] = 1/2 sqrt(2n+1).
    - ``"lagt"`` (the S4 code's ``transition('lagt', N)``, which it calls an earlier, differently
      normalised version of the tilted Laguerre (LagT) of HiPPO 2020): A = I/2 - tril(ones)
      (diagonal included);  B[n] = 1.
    - ``"fout"`` (FouT, "How to Train Your HiPPO"; exactly the S4 code's
      ``transition('fout', N)`` in state-spaces/s4 ``src/models/hippo/hippo.py``):
      B[0] = 1, B[n] = sqrt(2) for even n >= 2, B[n] = 0 for odd n;
      A = Omega - B B^T with Omega[2k, 2k+1] = -pi k, Omega[2k+1, 2k] = +pi k (k >= 0), else 0.
      State 2k is the cosine and 2k+1 the sine of frequency k (pi k in this time scale); state
      0 is the constant and state 1 the sine of frequency 0, which is identically zero: its row,
      column and B entry are 0 (a decoupled mode with eigenvalue 0, kept for parity with S4).
      For odd N the last cosine has no sine partner.

    Shapes:
        A: (N, N) float64
        B: (N,) float64
    """
    _check_measure(measure)
    _check_int("N", N, 1)
    return {"legs": _legs, "legt": _legt, "lagt": _lagt, "fout": _fout}[measure](N)


def _skew_sign(N):
    # +1 above the diagonal, -1 below, 0 on it
    n, k = _index_grid(N)
    return torch.sign(k - n).to(_F64)  # (N N)


def _normal_part(measure, N):
    """Closed-form normal part S and rank correction P (r0, N) with A = S - P^T P."""
    R = _R(N)  # (N)
    if measure == "legs":
        # S = -I/2 + 1/2 R_n R_k sign(k - n);  P[n] = sqrt(n + 1/2)
        S = 0.5 * _skew_sign(N) * R[:, None] * R[None, :] - 0.5 * torch.eye(N, dtype=_F64)
        return S, torch.sqrt(torch.arange(N, dtype=_F64) + 0.5).unsqueeze(0)  # (N N), (1 N)
    if measure == "legt":
        # S[n,k] = 1/2 R_n R_k sign(k - n) if n - k odd, else 0;  P_0 = R/sqrt2 on odd n, P_1 even
        n, k = _index_grid(N)
        odd = ((n - k) % 2 == 1).to(_F64)  # (N N)
        S = 0.5 * odd * _skew_sign(N) * R[:, None] * R[None, :]  # (N N)
        parity = torch.arange(N) % 2  # (N)
        P = torch.stack([R * (parity == 1), R * (parity == 0)]) / math.sqrt(2.0)  # (2 N)
        return S, P
    if measure == "lagt":
        # S = 1/2 sign(k - n);  P = 1/sqrt(2)
        return 0.5 * _skew_sign(N), torch.full((1, N), math.sqrt(0.5), dtype=_F64)
    return _fout_Omega(N), _fout_B(N).unsqueeze(0)  # fout: S = Omega, P = B


def nplr(measure, N, rank=1):
    """Normal plus low-rank form of the HiPPO matrix (S4, Sec. 3.3):  A = S - P^T P.

    S is normal (a multiple of the identity plus a skew-symmetric matrix):
    - legs: P[0, n] = sqrt(n + 1/2);  S = -I/2 + S_skew,
      S_skew[n,k] = 1/2 sqrt(2n+1) sqrt(2k+1) sign(k-n).
    - legt: rank 2 (the S4 code's): P[0, n] = sqrt(2n+1)/sqrt(2) for odd n (0 for even),
      P[1, n] = sqrt(2n+1)/sqrt(2) for even n (0 for odd);  S skew, nonzero only where n - k is odd.
      No rank-1 correction makes LegT normal, so rank must be >= 2.
    - lagt: P[0, n] = 1/sqrt(2);  S = 1/2 sign(k - n) (skew).
    - fout: P[0] = B (the S4 code's);  S = Omega (skew, see ``transition``).
    Rows beyond the measure's own rank are zero padding. S is built in closed form, so
    S + S^T is exactly -I (legs) or 0 (others); A = S - P^T P holds to rounding.

    Shapes:
        S: (N, N) float64
        P: (rank, N) float64
        B: (N,) float64, the same B as ``transition``
    """
    _check_measure(measure)
    _check_int("N", N, 1)
    _check_int("rank", rank, 1)
    S, P = _normal_part(measure, N)  # (N N), (r0 N)
    if rank < P.shape[0]:
        raise ValueError(
            f"rank={rank} is too small for measure={measure!r}; allowed: rank >= {P.shape[0]}")
    P = torch.cat([P, torch.zeros(rank - P.shape[0], N, dtype=_F64)])  # (rank N)
    return S, P, transition(measure, N)[1]


def _fix_phase(V):
    """Rotate each column so its largest-magnitude entry is real positive (determinism)."""
    idx = V.abs().argmax(dim=0)  # (M)
    pivot = V.gather(0, idx.unsqueeze(0))  # (1 M)
    return V * (pivot.abs() / pivot).conj()  # (N M)


def _zero_modes(V0):
    """Real orthonormal basis (N, z) of the span of V0 (N, z), a null space of a real matrix."""
    z = V0.shape[1]
    U, _, _ = torch.linalg.svd(torch.cat([V0.real, V0.imag], dim=1), full_matrices=False)  # (N 2z)
    return U[:, :z]  # (N z)


def normal_eig(S):
    """Unitary eigendecomposition of a real normal S = c I + S_skew:  S = V diag(Lambda) V^H.

    Computed with a Hermitian eigensolver: (-i S_skew) is Hermitian, eigh gives real e and
    unitary V, and Lambda = c + i e with c = mean(diag S). A general eigensolver (torch.linalg.eig
    on S, or on -i S) does not return a unitary V for the repeated eigenvalues and gives real
    parts off by rounding; several public ports diagonalise -i S itself with eig and report
    wrong real parts. Here Re Lambda = c exactly.
    Order: increasing Im Lambda; V[:, N-1-j] = conj(V[:, j]) and Lambda[N-1-j] = conj(Lambda[j])
    exactly. Zero-frequency modes are paired as (r_a -/+ i r_b)/sqrt(2) with real r (for odd
    multiplicity one real eigenvector sits in the middle). Each column's largest entry is real.

    Shapes:
        S: (N, N) real, normal with constant diagonal
        Lambda: (N,) complex128
        V: (N, N) complex128, unitary
    """
    S = S.to(_F64)
    N = S.shape[-1]
    c = torch.diagonal(S).mean()  # ()
    K = 0.5 * (S - S.T)  # (N N) skew part
    sym_err = (0.5 * (S + S.T) - c * torch.eye(N, dtype=_F64)).abs().max().item()  # ()
    if sym_err > 1e-12 * max(1.0, S.abs().max().item()):
        raise ValueError(f"S has symmetric part off c*I by {sym_err:.3g}; allowed: S = c I + skew")
    e, W = torch.linalg.eigh(-1j * K.to(torch.complex128))  # (N), (N N)
    tol = 1e3 * N * torch.finfo(_F64).eps * max(1.0, e.abs().max().item())
    pos = e > tol  # (N)
    e_pos, W_pos = e[pos], _fix_phase(W[:, pos])  # (m), (N m)
    Z = _zero_modes(W[:, e.abs() <= tol]).to(torch.complex128)  # (N z) real basis
    z2 = Z.shape[1] // 2
    W_zero = (Z[:, 0:2 * z2:2] + 1j * Z[:, 1:2 * z2:2]) / math.sqrt(2.0)  # (N z2)
    W_mid = Z[:, 2 * z2:]  # (N 0 or 1)
    W_up = torch.cat([W_zero, W_pos], dim=1)  # (N z2+m) modes with Im >= 0
    e_up = torch.cat([torch.zeros(z2, dtype=_F64), e_pos])  # (z2+m)
    V = torch.cat([W_up.flip(1).conj(), W_mid, W_up], dim=1)  # (N N)
    if V.shape[1] != N:  # eigenvalues not split cleanly into +e, -e, 0: should not happen
        raise RuntimeError(f"normal_eig found {V.shape[1]} modes for N={N}; tol={tol:.3g}")
    e_all = torch.cat([-e_up.flip(0), torch.zeros(W_mid.shape[1], dtype=_F64), e_up])  # (N)
    return torch.complex(torch.full_like(e_all, c.item()), e_all), V


def nplr_diagonal(measure, N, rank=1, conj=True):
    """Diagonalised NPLR form used by the S4 layer (S4, Theorem 1; S4D, Sec. 3).

        A = V (diag(Lambda) - P_tilde^T conj(P_tilde)) V^H,  P_tilde = P conj(V) (row r: V^H p_r),
        B_tilde = V^H B,  where S = V diag(Lambda) V^H (``normal_eig``).

    With ``conj=True`` (default) only the last N//2 modes of ``normal_eig``'s order are kept:
    one member of each conjugate pair, Im Lambda >= 0, increasing Im. The dropped half is the
    exact conjugate, so the real system is rebuilt by conjugate-symmetric doubling:
        S = 2 Re(V diag(Lambda) V^H),  P = 2 Re(P_tilde V^T),  B = 2 Re(V B_tilde).
    With ``conj=False`` all N modes are returned and V is square and unitary.

    Shapes (M = N//2 if conj else N):
        Lambda: (M,) complex128
        P_tilde: (rank, M) complex128
        B_tilde: (M,) complex128
        V: (N, M) complex128
    """
    conj = _check_bool("conj", conj)
    S, P, B = nplr(measure, N, rank)  # (N N), (rank N), (N)
    if conj and N % 2 == 1:
        raise ValueError(f"N={N} is odd; conj=True needs an even N (conjugate pairs)")
    Lambda, V = normal_eig(S)  # (N), (N N)
    if conj:
        Lambda, V = Lambda[N // 2:], V[:, N // 2:]  # (N/2), (N N/2)
    Vh = V.conj().T  # (M N)
    P_tilde = (Vh @ P.to(V.dtype).T).T  # (rank M)
    B_tilde = Vh @ B.to(V.dtype)  # (M)
    return Lambda, P_tilde, B_tilde, V
