"""HiPPO-N, S4D's diagonal inits, the S4D-LegS input vector, and S5's block-diagonal init."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import assert_close, tol

from diagssm import hippo, init


def rel_err(actual, expected):
    """Frobenius error relative to the expected matrix (absolute when that is all zeros)."""
    return ((actual - expected).norm() / max(expected.norm().item(), 1.0)).item()


def legs_S(N):
    A, B = hippo.transition("legs", N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)  # (N)
    return A + torch.outer(P, P)  # (N N)


# ---- HiPPO-N ----

@pytest.mark.parametrize("N", [2, 8, 64, 256])
def test_hippo_n_rebuilds_S(N):
    Lambda, V = init.hippo_n(N)
    assert Lambda.shape == (N,) and V.shape == (N, N)
    assert Lambda.dtype == V.dtype == torch.complex128
    assert_close(V.conj().T @ V, torch.eye(N, dtype=torch.complex128), scale=N)  # unitary; N terms
    S = legs_S(N).to(torch.complex128)
    assert rel_err(V @ torch.diag(Lambda) @ V.conj().T, S) < tol(torch.float64)["rtol"]
    assert torch.equal(Lambda.real, torch.full((N,), -0.5, dtype=torch.float64))
    # conjugate pairs at mirrored positions, sorted by imaginary part, none real for even N
    assert torch.equal(Lambda, Lambda.flip(0).conj())
    assert (Lambda.imag.diff() > 0).all()
    assert_close(V, V.flip(1).conj())


def test_hippo_n_matches_numpy_eigvals():
    N = 16
    ref = np.linalg.eigvals(legs_S(N).numpy())
    ref = torch.from_numpy(ref[np.argsort(ref.imag)])
    Lambda, _ = init.hippo_n(N)
    assert_close(Lambda, ref, scale=100)  # general eig on a 16x16 normal matrix: ~1e-13 error


def test_hippo_n_errors():
    for N in (0, -2, 3.0, True):
        with pytest.raises(ValueError, match="N="):
            init.hippo_n(N)


# ---- S4D diagonal inits ----

def test_inv_lin_real_closed_forms_N8():
    pi = math.pi
    # S4D-Inv at N = 8: -1/2 + i (8/pi)(8/(2n+1) - 1), n = 0..3
    inv = [complex(-0.5, 8 / pi * (8 / m - 1)) for m in (1, 3, 5, 7)]
    assert_close(init.diagonal_init("inv", 8), torch.tensor(inv, dtype=torch.complex128))
    assert init.diagonal_init("inv", 8)[0].imag.item() == pytest.approx(56 / pi)
    lin = [complex(-0.5, 0.0), complex(-0.5, pi), complex(-0.5, 2 * pi), complex(-0.5, 3 * pi)]
    assert_close(init.diagonal_init("lin", 8), torch.tensor(lin, dtype=torch.complex128))
    real = [-1.0, -2.0, -3.0, -4.0]
    assert_close(init.diagonal_init("real", 8), torch.tensor(real, dtype=torch.complex128))


@pytest.mark.parametrize("N", [2, 8, 64])
def test_legs_is_half_of_spectrum_of_S(N):
    ev = np.linalg.eigvals(legs_S(N).numpy())
    half = ev[ev.imag > 0]
    half = half[np.argsort(half.imag)]
    A = init.diagonal_init("legs", N)
    assert_close(A, torch.from_numpy(half), scale=100)  # reference is a general eig
    assert torch.equal(A.real, torch.full((N // 2,), -0.5, dtype=torch.float64))
    assert (A.imag.diff() > 0).all()


def test_legs_N8_against_hand_built_spectrum():
    # independent: eigvalsh of the Hermitian (-i) * skew part, written out here
    N = 8
    R = [math.sqrt(2 * n + 1) for n in range(N)]
    K = torch.tensor([[0.5 * R[n] * R[k] * (1 if k > n else -1 if k < n else 0) for k in range(N)]
                      for n in range(N)], dtype=torch.float64)
    e = torch.linalg.eigvalsh(-1j * K.to(torch.complex128))
    expected = torch.complex(torch.full((4,), -0.5, dtype=torch.float64), e[4:])
    assert_close(init.diagonal_init("legs", N), expected, scale=10)


@pytest.mark.parametrize("name", init.NAMES)
@pytest.mark.parametrize("N", [2, 8, 64])
def test_contract(name, N):
    A = init.diagonal_init(name, N, generator=torch.Generator().manual_seed(0))
    assert A.shape == (N // 2,) and A.dtype == torch.complex128
    assert (A.real < 0).all()
    if name != "real":
        assert (A.imag >= 0).all()


def test_rand_reproducible_and_seeded():
    a = init.diagonal_init("rand", 64, generator=torch.Generator().manual_seed(1))
    b = init.diagonal_init("rand", 64, generator=torch.Generator().manual_seed(1))
    c = init.diagonal_init("rand", 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.real, torch.full((32,), -0.5, dtype=torch.float64))
    assert (a.imag >= 0).all() and (a.imag < math.pi * 64 / 2).all()
    assert a.imag.unique().numel() == 32
    torch.manual_seed(3)
    g1 = init.diagonal_init("rand", 16)
    torch.manual_seed(3)
    assert torch.equal(g1, init.diagonal_init("rand", 16))  # global RNG when no generator


@pytest.mark.parametrize("name, N", [("legs", 7), ("lin", 0), ("inv", 1), ("real", -4),
                                     ("lin", 8.0), ("s4d-lin", 8), ("LEGS", 8)])
def test_diagonal_init_errors(name, N):
    with pytest.raises(ValueError, match="N=|name="):
        init.diagonal_init(name, N)


# ---- S4D-LegS input vector: the kept half really is the conjugate of the dropped one ----

def zoh_kernel(Lambda, B, C, dt, L):
    """K[l] = sum_n C_n B_bar_n A_bar_n^l, A_bar = exp(dt Lambda), B_bar = (A_bar - 1)/Lambda B."""
    A_bar = torch.exp(dt * Lambda)  # (M)
    B_bar = (A_bar - 1) / Lambda * B  # (M)
    powers = A_bar.unsqueeze(0) ** torch.arange(L, dtype=torch.float64).unsqueeze(1)  # (L M)
    return powers @ (C * B_bar)  # (L)


@pytest.mark.parametrize("N", [2, 8, 32])
def test_legs_B_matches_order_and_doubles_to_full_system(N):
    dt, L = 0.05, 50
    A = init.diagonal_init("legs", N)
    B_half = init.hippo_legs_B(N)
    Lambda, V = init.hippo_n(N)
    assert B_half.shape == (N // 2,) and B_half.dtype == torch.complex128
    assert torch.equal(A, Lambda[N // 2:])
    B_legs = hippo.transition("legs", N)[1].to(torch.complex128)  # (N)
    C = torch.linspace(-1.0, 2.0, N, dtype=torch.float64).to(torch.complex128)  # real C, nonzero
    CV = C @ V  # (N)
    K_full = zoh_kernel(Lambda, V.conj().T @ B_legs, CV, dt, L)
    K_half = 2 * zoh_kernel(A, B_half, CV[N // 2:], dt, L).real
    assert K_full.imag.abs().max().item() < 1e-12
    assert_close(K_half, K_full.real, scale=N)
    # and both equal the dense real system (S, B_legs, C) discretised by the matrix exponential
    S = legs_S(N).numpy()
    A_bar = scipy.linalg.expm(dt * S)
    B_bar = np.linalg.solve(S, (A_bar - np.eye(N)) @ B_legs.real.numpy())
    K_dense, x = [], B_bar
    for _ in range(L):
        K_dense.append(C.real.numpy() @ x)
        x = A_bar @ x
    assert_close(K_half, torch.tensor(K_dense), scale=100 * N)  # expm vs eigen route


def test_hippo_legs_B_errors():
    with pytest.raises(ValueError, match="N=5"):
        init.hippo_legs_B(5)


# ---- S5 block-diagonal HiPPO-N ----

def block_S(P, J):
    return torch.block_diag(*([legs_S(P // J)] * J))  # (P P)


@pytest.mark.parametrize("P, J", [(16, 1), (16, 4), (12, 3), (64, 8)])
def test_blocks_full(P, J):
    Lambda, V, Vinv = init.hippo_n_blocks(P, J, conj_sym=False)
    assert Lambda.shape == (P,) and V.shape == (P, P) and Vinv.shape == (P, P)
    assert torch.equal(Vinv, V.conj().T)
    S = block_S(P, J).to(torch.complex128)
    assert rel_err(V @ torch.diag(Lambda) @ Vinv, S) < tol(torch.float64)["rtol"]
    size = P // J
    mask = torch.block_diag(*([torch.ones(size, size)] * J)).bool()
    if J > 1:
        assert V[~mask].abs().max().item() == 0.0  # block diagonal
    assert torch.equal(Lambda[:size].repeat(J), Lambda)
    assert torch.equal(Lambda[:size], init.hippo_n(size)[0])


@pytest.mark.parametrize("P, J", [(16, 1), (16, 4), (12, 3), (64, 8)])
def test_blocks_conj_sym(P, J):
    Lambda, V, Vinv = init.hippo_n_blocks(P, J)
    assert Lambda.shape == (P // 2,) and V.shape == (P, P // 2) and Vinv.shape == (P // 2, P)
    assert (Lambda.imag > 0).all()
    assert torch.equal(Lambda.real, torch.full((P // 2,), -0.5, dtype=torch.float64))
    S = block_S(P, J)
    half = V @ torch.diag(Lambda) @ Vinv  # (P P)
    assert rel_err(half + half.conj(), S.to(torch.complex128)) < tol(torch.float64)["rtol"]
    # acting on a real vector: 2 Re(V Lambda Vinv x) = blockdiag(S) x
    x = torch.linspace(0.5, -1.5, P, dtype=torch.float64)
    assert_close(2 * (V @ (Lambda * (Vinv @ x.to(torch.complex128)))).real, S @ x, scale=P)
    assert torch.equal(Lambda[: P // J // 2], init.diagonal_init("legs", P // J))


@pytest.mark.parametrize("P, J, conj_sym, match", [
    (10, 3, True, "P=10"), (12, 4, True, "P/blocks=3"), (0, 1, True, "P="), (8, 0, False, "blocks="),
    (8, 2, "no", "conj_sym='no' must be True or False"),  # 'no' had kept half the modes
    (8, 2, 0, "conj_sym=0 must be True or False")])
def test_blocks_errors(P, J, conj_sym, match):
    with pytest.raises(ValueError, match=match):
        init.hippo_n_blocks(P, J, conj_sym=conj_sym)


def test_blocks_odd_size_without_conj_sym():
    Lambda, V, Vinv = init.hippo_n_blocks(6, 2, conj_sym=False)
    assert rel_err(V @ torch.diag(Lambda) @ Vinv, block_S(6, 2).to(torch.complex128)) < 1e-12
