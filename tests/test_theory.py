"""theory: basis kernels of S4-LegS and S4D-LegS, each computed two ways, and S4D -> S4 as N grows."""
import pathlib

import pytest
import torch

from diagssm import hippo, theory

DT, L = 1e-3, 1000
STEPS = [0, 1, 10, 500, 999]
FIGURE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "figures" / "convergence.png"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_s4_basis_powers_match_matrix_exponential():
    """A_bar^l B_bar = expm(l dt A) B_bar exactly, and K[:, l] / dt = expm((l + 1/2) dt A) B + O(dt^2)."""
    N = 16
    K = theory.basis_kernels_s4(N, DT, L)
    A, B = hippo.transition("legs", N)
    _, B_bar = theory.zoh_dense(A, B, DT)
    assert K.shape == (N, L) and K.dtype == torch.float64
    for l in STEPS:
        assert rel(K[:, l], torch.linalg.matrix_exp(l * DT * A) @ B_bar) < 1e-12
        assert rel(K[:, l], DT * torch.linalg.matrix_exp((l + 0.5) * DT * A) @ B) < 1e-3  # midpoint rule


def test_zoh_input_is_the_integral():
    """B_bar = A^{-1} (expm(dt A) - I) B (A_LegS is invertible), against Van Loan's block exponential."""
    A, B = hippo.transition("legs", 8)
    A_bar, B_bar = theory.zoh_dense(A, B, 0.05)
    torch.testing.assert_close(A_bar, torch.linalg.matrix_exp(0.05 * A), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(B_bar, torch.linalg.solve(A, (A_bar - torch.eye(8, dtype=A.dtype)) @ B),
                               rtol=1e-10, atol=1e-13)


def test_s4_first_basis_kernels_do_not_depend_on_N():
    """A_LegS is lower triangular, so e_n^T exp(tA) B involves states 0..n only: a fixed target."""
    K4 = theory.basis_kernels_s4(4, DT, 300)  # values ~ DT; the two expm's round differently
    torch.testing.assert_close(theory.basis_kernels_s4(64, DT, 300)[:4], K4, rtol=1e-9, atol=1e-12 * DT)


def test_s4d_basis_matches_dense_normal_part():
    """The eigenbasis form V exp(t Lambda) V^H B/2 equals expm(l dt S) B_bar of the dense (S, B/2)."""
    N = 16
    K = theory.basis_kernels_s4d(N, DT, L)
    S = hippo.nplr("legs", N)[0]
    _, B_bar = theory.zoh_dense(S, hippo.transition("legs", N)[1] / 2, DT)
    assert K.shape == (N, L) and K.dtype == torch.float64
    for l in STEPS:
        assert rel(K[:, l], torch.linalg.matrix_exp(l * DT * S) @ B_bar) < 1e-12


def test_error_decreases_with_N():
    err = theory.convergence(Ns=(16, 64, 256))
    assert err[16] > err[64] > err[256]
    assert err[256] < 0.5 * err[64]


@pytest.mark.slow
def test_converges_tenfold_from_64_to_1024():
    """S4D paper, Sec. 4: the first four basis kernels of S4D-LegS approach S4-LegS's (ZOH,
    dt = 1e-3, L = 1000, t in [0, 1]); measured 1.11 at N = 64 and 0.062 at N = 1024."""
    err = theory.convergence()
    assert list(err) == [16, 64, 256, 1024]
    assert err[16] > err[64] > err[256] > err[1024]
    assert err[64] / err[1024] >= 10


def test_plot_convergence(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional plotting dependency")
    path = tmp_path / "c.png"
    err = theory.plot_convergence(path, Ns=(8, 16), L=100)
    assert err == theory.convergence(Ns=(8, 16), L=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_figure_is_small():
    assert FIGURE.exists() and FIGURE.stat().st_size < 300_000


def test_errors():
    with pytest.raises(ValueError, match="N="):
        theory.basis_kernels_s4(0, DT, L)
    with pytest.raises(ValueError, match="dt="):
        theory.basis_kernels_s4d(8, -1.0, L)
    with pytest.raises(ValueError, match="n_basis"):
        theory.convergence(Ns=(2,), n_basis=4)
