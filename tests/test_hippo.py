"""HiPPO matrices (closed forms vs independent loops), NPLR form, and its diagonalisation."""
import math

import numpy as np
import pytest
import torch
from helpers import assert_close, tol

from diagssm import hippo

SIZES = [1, 2, 5, 8]
RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1}


def rel_err(actual, expected):
    """Frobenius error relative to the expected matrix (absolute when that is all zeros)."""
    return ((actual - expected).norm() / max(expected.norm().item(), 1.0)).item()


# ---- transition: entry by entry against loops written from the papers' formulas ----

@pytest.mark.parametrize("N", SIZES)
def test_legs_entries(N):
    A, B = hippo.transition("legs", N)
    for n in range(N):
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1), rel=1e-15)
        for k in range(N):
            if n > k:
                expected = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                expected = -(n + 1)
            else:
                expected = 0.0
            assert A[n, k].item() == pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("N", SIZES)
def test_legt_entries(N):
    A, B = hippo.transition("legt", N)
    for n in range(N):
        assert B[n].item() == pytest.approx(0.5 * math.sqrt(2 * n + 1), rel=1e-15)
        for k in range(N):
            sign = 1.0 if n >= k else (-1.0) ** (n - k)
            expected = -0.5 * math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) * sign
            assert A[n, k].item() == pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("N", SIZES)
def test_lagt_entries(N):
    A, B = hippo.transition("lagt", N)
    for n in range(N):
        assert B[n].item() == 1.0
        for k in range(N):
            expected = (0.5 if n == k else 0.0) - (1.0 if n >= k else 0.0)
            assert A[n, k].item() == expected


def test_fout_hand_case_N5():
    # From the formula: B = [1, 0, r2, 0, r2]; A = Omega - B B^T, Omega[2,3] = -pi, Omega[3,2] = pi
    r2, pi = math.sqrt(2.0), math.pi
    A_hand = torch.tensor([
        [-1.0, 0.0, -r2, 0.0, -r2],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [-r2, 0.0, -2.0, -pi, -2.0],
        [0.0, 0.0, pi, 0.0, 0.0],
        [-r2, 0.0, -2.0, 0.0, -2.0],
    ], dtype=torch.float64)
    A, B = hippo.transition("fout", 5)
    assert_close(B, torch.tensor([1.0, 0.0, r2, 0.0, r2], dtype=torch.float64))
    assert_close(A, A_hand)


def test_fout_N6_adds_second_frequency_block():
    A5, _ = hippo.transition("fout", 5)
    A6, B6 = hippo.transition("fout", 6)
    assert_close(A6[:5, :5], A5)
    assert A6[4, 5].item() == pytest.approx(-2 * math.pi)
    assert A6[5, 4].item() == pytest.approx(2 * math.pi)
    assert B6[5].item() == 0.0 and A6[5, :4].abs().max().item() == 0.0
    # the skew part is block diagonal in (cos, sin) pairs with frequencies pi k
    S = A6 + torch.outer(B6, B6)
    assert_close(S, -S.T)


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("N", SIZES)
def test_transition_shapes_dtype(measure, N):
    A, B = hippo.transition(measure, N)
    assert A.shape == (N, N) and B.shape == (N,)
    assert A.dtype == torch.float64 and B.dtype == torch.float64


@pytest.mark.parametrize("measure, N", [
    ("legx", 4), ("LegS", 4), ("legs", 0), ("legs", -3), ("legs", 2.0)])
def test_transition_errors(measure, N):
    with pytest.raises(ValueError, match="measure=|N="):
        hippo.transition(measure, N)


# ---- NPLR ----

@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("N", SIZES + [64])
def test_nplr_rebuilds_A_and_S_is_normal(measure, N):
    A, B = hippo.transition(measure, N)
    S, P, B2 = hippo.nplr(measure, N, rank=RANK[measure])
    assert S.dtype == P.dtype == torch.float64 and P.shape == (RANK[measure], N)
    torch.testing.assert_close(S - P.T @ P, A, rtol=0, atol=1e-12 * max(1, N))
    assert_close(B2, B)
    diag = -0.5 if measure == "legs" else 0.0
    # closed form: S + S^T is exactly diag * 2 I
    assert torch.equal(S + S.T, 2 * diag * torch.eye(N, dtype=torch.float64))
    assert_close(S @ S.T, S.T @ S, scale=N)  # normal; N terms per entry


def test_nplr_legs_P():
    _, P, _ = hippo.nplr("legs", 8)
    assert_close(P[0], torch.tensor([math.sqrt(n + 0.5) for n in range(8)], dtype=torch.float64))


def test_nplr_rank_padding_and_errors():
    S1, P1, _ = hippo.nplr("legs", 6, rank=1)
    S3, P3, _ = hippo.nplr("legs", 6, rank=3)
    assert P3.shape == (3, 6) and torch.equal(P3[0], P1[0]) and P3[1:].abs().max().item() == 0.0
    assert torch.equal(S1, S3)
    with pytest.raises(ValueError, match="rank=1"):
        hippo.nplr("legt", 6, rank=1)
    with pytest.raises(ValueError, match="rank=0"):
        hippo.nplr("legs", 6, rank=0)
    with pytest.raises(ValueError, match="measure="):
        hippo.nplr("fourier", 6)


@pytest.mark.parametrize("conj", ["no", 0, None])
def test_nplr_diagonal_conj_must_be_a_bool(conj):
    """conj='no' had kept half the modes (taken as true), 0 and None all of them."""
    with pytest.raises(ValueError, match=f"conj={conj!r} must be True or False"):
        hippo.nplr_diagonal("legs", 8, conj=conj)


def test_nplr_diagonal_takes_numpy_bools():
    assert torch.equal(hippo.nplr_diagonal("legs", 8, conj=np.bool_(True))[0], hippo.nplr_diagonal("legs", 8)[0])


# ---- diagonalised NPLR ----

@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("N", [2, 8, 64])
def test_nplr_diagonal_full_rebuilds_A(measure, N):
    A, B = hippo.transition(measure, N)
    r = RANK[measure]
    Lambda, P_t, B_t, V = hippo.nplr_diagonal(measure, N, rank=r, conj=False)
    assert Lambda.shape == (N,) and P_t.shape == (r, N) and B_t.shape == (N,) and V.shape == (N, N)
    assert V.dtype == torch.complex128
    eye = torch.eye(N, dtype=torch.complex128)
    assert_close(V.conj().T @ V, eye, scale=N)  # unitary
    low_rank = P_t.T @ P_t.conj()  # (N N) = sum_r p~_r p~_r^H
    A_rebuilt = V @ (torch.diag(Lambda) - low_rank) @ V.conj().T
    assert rel_err(A_rebuilt, A.to(torch.complex128)) < tol(torch.float64)["rtol"]
    assert_close(V @ B_t, B.to(torch.complex128), scale=N)


@pytest.mark.parametrize("measure", hippo.MEASURES)
@pytest.mark.parametrize("N", [2, 8, 64])
def test_nplr_diagonal_half_doubles_to_real_system(measure, N):
    S, P, B = hippo.nplr(measure, N, rank=RANK[measure])
    Lambda, P_t, B_t, V = hippo.nplr_diagonal(measure, N, rank=RANK[measure])
    assert Lambda.shape == (N // 2,) and V.shape == (N, N // 2)
    assert (Lambda.imag >= 0).all() and (Lambda.imag.diff() >= 0).all()
    S_rebuilt = 2 * (V @ torch.diag(Lambda) @ V.conj().T).real
    assert rel_err(S_rebuilt, S) < tol(torch.float64)["rtol"]
    assert_close(2 * (V @ B_t).real, B, scale=N)
    assert_close(2 * (P_t @ V.T).real, P, scale=N)


def test_nplr_diagonal_fout_zero_mode_first():
    # the constant / dead-sine pair has frequency 0; it must still double to the real system
    Lambda, _, B_t, V = hippo.nplr_diagonal("fout", 8)
    assert Lambda[0].abs().item() < 1e-12
    assert_close(Lambda.imag, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) * math.pi)
    assert_close(2 * (V[:, 0] * V[:, 0].conj()).real[:2], torch.ones(2, dtype=torch.float64))


def test_nplr_diagonal_legs_real_part():
    Lambda, _, _, _ = hippo.nplr_diagonal("legs", 16)
    assert torch.equal(Lambda.real, torch.full((8,), -0.5, dtype=torch.float64))


def test_nplr_diagonal_odd_N_needs_conj_false():
    with pytest.raises(ValueError, match="N=5"):
        hippo.nplr_diagonal("legs", 5)
    Lambda, _, _, V = hippo.nplr_diagonal("legs", 5, conj=False)
    assert Lambda.shape == (5,) and Lambda[2].imag.item() == 0.0
    assert_close(Lambda, Lambda.flip(0).conj())


# ---- normal_eig on a random normal matrix ----

def test_normal_eig_random_skew():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 7, dtype=torch.float64, generator=g)
    S = (X - X.T) - 0.3 * torch.eye(7, dtype=torch.float64)  # (7 7), odd: one zero mode
    Lambda, V = hippo.normal_eig(S)
    assert torch.equal(Lambda.real, torch.full((7,), -0.3, dtype=torch.float64))
    assert torch.equal(Lambda, Lambda.flip(0).conj()) and torch.equal(V, V.flip(1).conj())
    assert rel_err(V @ torch.diag(Lambda) @ V.conj().T, S.to(torch.complex128)) < 1e-12


def test_normal_eig_rejects_non_normal():
    A, _ = hippo.transition("legs", 4)
    with pytest.raises(ValueError, match="symmetric part"):
        hippo.normal_eig(A)
