"""Initialisations of diagonal state matrices: HiPPO-N, S4D's family, S5's block-diagonal HiPPO-N.

References
----------
- HiPPO: Gu, Dao, Ermon, Rudra, Ré, "HiPPO: Recurrent Memory with Optimal Polynomial
  Projections", NeurIPS 2020 (the LegS matrix these spectra come from).
- S4: Gu, Goel, Ré, "Efficiently Modeling Long Sequences with Structured State Spaces",
  ICLR 2022 (normal part S of HiPPO-LegS, A = S - P P^T).
- "How to Train Your HiPPO": Gu, Johnson, Timalsina, Rudra, Ré, 2022.
- S4D: Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State
  Space Models", NeurIPS 2022 (S4D-LegS, S4D-Inv, S4D-Lin, S4D-Real; Sec. 4, eqs. for Inv/Lin).
- DSS: Gupta, Gu, Berant, "Diagonal State Spaces are as Effective as Structured State Spaces",
  NeurIPS 2022 (Skew-HiPPO: the spectrum of S, = S4D-LegS).
- S5: Smith, Warrington, Linderman, "Simplified State Space Layers for Sequence Modeling",
  ICLR 2023 (HiPPO-N, block-diagonal initialisation, Sec. 4.3 and App. B).

Convention: ``N`` (``d_state``) is the size of the real HiPPO matrix; a conjugate-symmetric init
returns N//2 complex modes, one of each conjugate pair, the one with Im >= 0, and the model
outputs 2 Re(...). All outputs are complex128; cast at the call site.
"""
import math

import torch

from diagssm import hippo

NAMES = ("legs", "inv", "lin", "real", "rand")


def hippo_n(N):
    """HiPPO-N (S5): eigendecomposition of the normal part S of HiPPO-LegS.

        A_LegS = S - P P^T,  S = -I/2 + S_skew,  S = V diag(Lambda) V^H,  Lambda = -1/2 + i e,

    where (-i S_skew) is Hermitian and ``torch.linalg.eigh`` gives its real eigenvalues e and
    unitary eigenvectors V (``hippo.normal_eig``). Do not use a general eigensolver here: eig on
    S (or on -i S, as several public ports do) returns real parts that are only approximately
    -1/2 and a V that is not unitary; eigh on the Hermitian part gives Re Lambda = -1/2 exactly.
    Order: increasing Im Lambda, so conjugate pairs sit at mirrored positions,
    Lambda[N-1-j] = conj(Lambda[j]) and V[:, N-1-j] = conj(V[:, j]); for odd N the middle
    mode is -1/2 with a real eigenvector.

    Shapes:
        Lambda: (N,) complex128
        V: (N, N) complex128, unitary
    """
    hippo._check_int("N", N, 1)
    S = hippo.nplr("legs", N)[0]  # (N N)
    return hippo.normal_eig(S)


def _legs(N, generator):
    # S4D-LegS: the half of spec(S) with Im > 0, increasing Im
    return hippo_n(N)[0][N // 2:]  # (N/2)


def _inv(N, generator):
    # S4D-Inv: A_n = -1/2 + i (N/pi) (N/(2n+1) - 1)
    n = torch.arange(N // 2, dtype=torch.float64)  # (N/2)
    return torch.complex(torch.full_like(n, -0.5), N / math.pi * (N / (2 * n + 1) - 1))


def _lin(N, generator):
    # S4D-Lin: A_n = -1/2 + i pi n
    n = torch.arange(N // 2, dtype=torch.float64)  # (N/2)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n)


def _real(N, generator):
    # S4D-Real: A_n = -(n + 1)
    n = torch.arange(N // 2, dtype=torch.float64)  # (N/2)
    return torch.complex(-(n + 1), torch.zeros_like(n))


def _rand(N, generator):
    # A_n = -1/2 + i omega_n, omega_n ~ Uniform[0, pi N / 2), i.i.d., unsorted
    u = torch.rand(N // 2, dtype=torch.float64, generator=generator)  # (N/2) in [0, 1)
    omega = u * (math.pi * N / 2)  # (N/2)
    return torch.complex(torch.full_like(omega, -0.5), omega)


def diagonal_init(name, N, generator=None):
    """Diagonal state matrix A, one member of each conjugate pair, n = 0 .. N/2 - 1 (S4D, Sec. 4).

    - ``"legs"`` (S4D-LegS = DSS Skew-HiPPO): eigenvalues of S (normal part of HiPPO-LegS) with
      Im > 0, by increasing Im; the same modes and order as ``hippo_n(N)[0][N//2:]``.
    - ``"inv"`` (S4D-Inv): A_n = -1/2 + i (N/pi) (N/(2n+1) - 1).
    - ``"lin"`` (S4D-Lin): A_n = -1/2 + i pi n.
    - ``"real"`` (S4D-Real): A_n = -(n+1).
    - ``"rand"``: A_n = -1/2 + i omega_n with omega_n i.i.d. Uniform[0, pi N/2) (S4D-Lin's
      frequency range), drawn with ``torch.rand`` from ``generator`` (global RNG if None).

    Shapes:
        A: (N//2,) complex128, Re A < 0
    """
    if name not in NAMES:
        raise ValueError(f"name={name!r} is not supported; allowed: {', '.join(NAMES)}")
    hippo._check_even("N", N)
    fn = {"legs": _legs, "inv": _inv, "lin": _lin, "real": _real, "rand": _rand}[name]
    return fn(N, generator)


def hippo_legs_B(N):
    """Input vector of S4D-LegS: B_tilde = V^H B_LegS on the kept half (S4D, Sec. 4).

    B_LegS[n] = sqrt(2n+1) (``hippo.transition("legs", N)``) and V from ``hippo_n(N)``,
    restricted to columns N//2.. so the modes match ``diagonal_init("legs", N)`` one for one.
    The system (diag(A), B_tilde, C V) with 2 Re(...) output equals the real (S, B_LegS, C).

    Shapes:
        B: (N//2,) complex128
    """
    hippo._check_even("N", N)
    _, V = hippo_n(N)  # (N N)
    B = hippo.transition("legs", N)[1].to(torch.complex128)  # (N)
    return V[:, N // 2:].conj().T @ B  # (N/2)


def hippo_n_blocks(P, blocks, conj_sym=True):
    """S5's block-diagonal HiPPO-N init (S5, Sec. 4.3): J = ``blocks`` copies of HiPPO-N of size P/J.

        A = blockdiag(S_(P/J), ..., S_(P/J)) = V diag(Lambda) Vinv,   Vinv = V^H.

    Each block uses ``hippo_n(P // blocks)`` (increasing Im). With ``conj_sym`` each block keeps
    its modes with Im > 0 (the last half of its order) and the matching V columns, like S5's
    ``Lambda[:P/J/2]``, ``V[:, :P/J/2]`` but taking the Im > 0 member of each pair (S5 keeps the
    conjugate; the 2 Re(...) system is the same). Then blockdiag(S) = 2 Re(V diag(Lambda) Vinv).
    Block j occupies rows j*P/J:(j+1)*P/J of V and its modes are contiguous in Lambda.

    Shapes (M = P//2 if conj_sym else P):
        Lambda: (M,) complex128
        V: (P, M) complex128, block diagonal with J blocks of (P/J, M/J)
        Vinv: (M, P) complex128 = V^H
    """
    hippo._check_int("P", P, 1)
    hippo._check_int("blocks", blocks, 1)
    conj_sym = hippo._check_bool("conj_sym", conj_sym)
    if P % blocks != 0:
        raise ValueError(
            f"P={P} is not divisible by blocks={blocks}; allowed: P a multiple of blocks")
    size = P // blocks
    if conj_sym and size % 2 == 1:
        raise ValueError(f"P/blocks={size} is odd; conj_sym=True needs an even block size")
    Lambda, V = hippo_n(size)  # (size), (size size)
    if conj_sym:
        Lambda, V = Lambda[size // 2:], V[:, size // 2:]  # (size/2), (size size/2)
    Lambda = Lambda.repeat(blocks)  # (M)
    V = torch.block_diag(*([V] * blocks))  # (P M)
    return Lambda, V, V.conj().T  # (M), (P M), (M P)
