"""theory: basis kernels of S4-LegS and S4D-LegS, each computed two ways, and S4D -> S4 as N grows."""
import pathlib

import pytest
import torch

from diagssm import hippo, ops, theory
from helpers import assert_close, randn

F64 = torch.float64
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
    seen = []
    err = theory.plot_convergence(path, Ns=(8, 16), L=100, report=lambda N, e: seen.append((N, e)))
    assert err == theory.convergence(Ns=(8, 16), L=100)
    assert seen == list(err.items())  # reported one N at a time, in order (the CLI's progress)
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


# --- DSS Proposition 1 ----------------------------------------------------------------------------

def random_system(N=12, H=3, n_real=2, seed=0):
    """A real dense (A, B, C) with known eigenvalues: (N - n_real)/2 pairs a +- ib (a < 0) and
    n_real negative reals, hidden by a well-conditioned similarity A = T D T^{-1}."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    pairs = (N - n_real) // 2
    a, b = -(0.1 + u(pairs)), 0.5 + 10 * u(pairs)  # Re in [-1.1, -0.1], Im in [0.5, 10.5]
    blocks = [torch.tensor([[a[i], b[i]], [-b[i], a[i]]], dtype=F64) for i in range(pairs)]
    reals = -(0.2 + 2 * u(n_real))
    D = torch.block_diag(*blocks, torch.diag(reals))  # (N, N)
    T = torch.eye(N, dtype=F64) + 0.3 * torch.randn(N, N, generator=g, dtype=F64) / N ** 0.5
    A = T @ D @ torch.linalg.inv(T)
    B, C = torch.randn(H, N, generator=g, dtype=F64), torch.randn(H, N, generator=g, dtype=F64)
    return A, B, C, torch.complex(a, b), reals


def sort_modes(z):
    return z[torch.argsort(z.imag * 1e3 + z.real)]


@pytest.mark.parametrize("N, n_real, seed", [(8, 0, 0), (12, 2, 1), (16, 4, 2), (9, 1, 3)])
def test_dss_proposition_1_exp(N, n_real, seed):
    """Prop. 1 (EXP): the dense ZOH kernel (matrix powers) equals ops.dss_kernel(Lambda, W, ...)
    for per-channel steps, with one mode per conjugate pair (W doubled) plus the real modes."""
    A, B, C, pairs, reals = random_system(N, 3, n_real, seed)
    Lambda, W = theory.dss_from_dense(A, B, C)
    assert Lambda.shape == ((N - n_real) // 2 + n_real,) and W.shape == (3, Lambda.shape[0])
    assert Lambda.dtype == W.dtype == torch.complex128
    assert_close(sort_modes(Lambda), sort_modes(torch.cat([pairs, reals.to(pairs.dtype)])), scale=100)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=F64)
    for L in (1, 17, 300):
        K = ops.dss_kernel(Lambda, W, dt, L, "exp")
        assert_close(K, theory.zoh_kernel_dense(A, B, C, dt, L), scale=10)


def test_dss_proposition_1_softmax():
    """Prop. 1 (SOFTMAX): W = W_exp (exp(L dt Lambda) - 1) for the dt and L given; exact at eps = 0,
    about 1e-7 relative with the kernel's default regulariser."""
    A, B, C, _, _ = random_system(12, 3, 2, seed=4)
    dt, L = torch.tensor([0.02, 0.1, 0.3], dtype=F64), 200
    Lambda, W = theory.dss_from_dense(A, B, C, "softmax", dt=dt, L=L)
    K_dense = theory.zoh_kernel_dense(A, B, C, dt, L)
    assert_close(ops.dss_kernel(Lambda, W, dt, L, "softmax", eps=0.0), K_dense, scale=10)
    assert rel(ops.dss_kernel(Lambda, W, dt, L, "softmax"), K_dense) < 1e-6


def test_dss_from_dense_shared_B_and_hippo_legs_small():
    """B (N,) shared by the channels; HiPPO-LegS at N = 8 (cond_2(V) = 7.7e4) still diagonalises:
    measured 6.5e-13 relative (digits lost to V; the random systems above reach 1e-14)."""
    A, B = hippo.transition("legs", 8)
    C = randn(2, 8, seed=1)
    Lambda, W = theory.dss_from_dense(A, B, C)
    assert_close(sort_modes(Lambda), -torch.arange(8, 0, -1, dtype=F64).to(Lambda.dtype))  # real: -1 .. -8
    dt = torch.tensor([0.05, 0.2], dtype=F64)
    assert rel(ops.dss_kernel(Lambda, W, dt, 100), theory.zoh_kernel_dense(A, B, C, dt, 100)) < 1e-10


def test_dss_from_dense_errors():
    jordan = torch.tensor([[-1.0, 1.0], [0.0, -1.0]], dtype=F64)  # defective: one eigenvector
    B, C = torch.ones(2, dtype=F64), torch.ones(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="condition number"):
        theory.dss_from_dense(jordan, B, C)
    A14, B14 = hippo.transition("legs", 14)  # cond_2(V) = 2.5e9
    with pytest.raises(ValueError, match=r"condition number 2\.5\de\+09 > max_cond=1e\+08"):
        theory.dss_from_dense(A14, B14, torch.ones(1, 14, dtype=F64))
    A, B, C, _, _ = random_system()
    with pytest.raises(ValueError, match="does not depend on dt or L"):
        theory.dss_from_dense(A, B, C, dt=0.1)
    with pytest.raises(ValueError, match="needs dt and L"):
        theory.dss_from_dense(A, B, C, "softmax", dt=0.1)
    with pytest.raises(ValueError, match="variant="):
        theory.dss_from_dense(A, B, C, "cos")
    with pytest.raises(ValueError, match="A must be a real square"):
        theory.dss_from_dense(A[:, :3], B, C)
    with pytest.raises(ValueError, match="C must be"):
        theory.dss_from_dense(A, B, C[:, :3])
    with pytest.raises(ValueError, match="B must be"):
        theory.dss_from_dense(A, B[:2], C)
    zero = torch.diag(torch.tensor([0.0, -1.0], dtype=F64))  # Lambda = 0: softmax normaliser vanishes
    with pytest.raises(ValueError, match="softmax normaliser"):
        theory.dss_from_dense(zero, torch.ones(2, dtype=F64), torch.ones(1, 2, dtype=F64), "softmax", dt=0.1, L=10)
