"""discretize: against its Van Loan twin, and against the dense system it diagonalises."""
import pytest
import torch

from diagssm.ops import discretize, discretize_ref
from helpers import assert_close, randn

C128 = torch.complex128


def random_modes(n, seed=0, dtype=C128):
    g = torch.Generator().manual_seed(seed)
    re = -torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.05
    im = torch.randn(n, generator=g, dtype=torch.float64) * 10
    return torch.complex(re, im).to(dtype)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_matches_van_loan_twin(method):
    A = random_modes(12)
    dt = torch.logspace(-3, 0, 12, dtype=torch.float64)
    for got, want in zip(discretize(A, dt, method), discretize_ref(A, dt, method)):
        assert_close(got, want)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_matches_dense_system(method):
    """Diagonalise a dense A = V diag(a) V^-1: the diagonal discretisation, mapped back with V,
    is the matrix exponential (ZOH) or bilinear transform of the dense system."""
    n, dt = 6, 0.3
    a = random_modes(n, seed=1)
    V = randn(n, n, dtype=C128, seed=2)
    Vinv = torch.linalg.inv(V)
    A = V @ torch.diag(a) @ Vinv  # (n, n) dense
    B = randn(n, dtype=C128, seed=3)
    I = torch.eye(n, dtype=C128)
    if method == "zoh":
        A_bar = torch.linalg.matrix_exp(dt * A)
        B_bar = torch.linalg.solve(A, (A_bar - I) @ B)
    else:
        A_bar = torch.linalg.solve(I - dt / 2 * A, I + dt / 2 * A)
        B_bar = torch.linalg.solve(I - dt / 2 * A, dt * B)
    a_bar, b_scale = discretize(a, torch.tensor(dt, dtype=torch.float64), method)
    assert_close(V @ torch.diag(a_bar) @ Vinv, A_bar, scale=100)  # conditioning of V
    assert_close(V @ (b_scale * (Vinv @ B)), B_bar, scale=100)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64, torch.float64])
def test_zoh_stable_near_zero(dtype):
    """At A = 0 and |dt A| ~ 1e-8, B_scale -> dt without NaN or loss of precision, grads finite."""
    A = torch.tensor([0.0, 1e-8, -3e-9, 2e-4, -0.5], dtype=torch.float64).to(dtype)
    if dtype.is_complex:
        A = A + 1j * torch.tensor([0.0, -2e-8, 5e-9, 1e-4, 3.0], dtype=torch.float64)
    A = A.requires_grad_()
    dt = torch.tensor(0.7, dtype=A.real.dtype)
    A_bar, B_scale = discretize(A, dt, "zoh")
    want_bar, want_scale = discretize_ref(A.detach().to(torch.complex128), dt.double(), "zoh")
    assert_close(B_scale.to(want_scale.dtype), want_scale, dtype=dtype)
    assert_close(A_bar.to(want_bar.dtype), want_bar, dtype=dtype)
    (B_scale.real.sum() + A_bar.real.sum()).backward()
    assert torch.isfinite(A.grad).all()


def test_zoh_gradient_near_zero_is_series():
    """d/dA of (exp(dt A) - 1)/A at A = 0 is dt^2/2: the series branch keeps it exact."""
    A = torch.tensor([0.0, 1e-9], dtype=torch.float64, requires_grad=True)
    dt = torch.tensor(0.5, dtype=torch.float64)
    _, B_scale = discretize(A, dt, "zoh")
    (grad,) = torch.autograd.grad(B_scale.sum(), A)
    assert_close(grad, torch.full_like(grad, dt.item() ** 2 / 2), scale=1e3)  # O(A) term: 1e-9 dt^3/6


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_gradcheck(method):
    A = random_modes(4, seed=5).requires_grad_()
    dt = torch.tensor([0.1, 0.5, 1e-6, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, d: discretize(a, d, method), (A, dt))


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_gradients_match_twin(method):
    A0, dt0 = random_modes(5, seed=6), torch.rand(5, dtype=torch.float64) + 0.01
    w = randn(2, 5, dtype=C128, seed=7)
    grads = []
    for fn in (discretize, discretize_ref):
        A, dt = A0.clone().requires_grad_(), dt0.clone().requires_grad_()
        A_bar, B_scale = fn(A, dt, method)
        loss = (w[0] * A_bar + w[1] * B_scale).real.sum()
        grads.append(torch.autograd.grad(loss, (A, dt)))
    for got, want in zip(*grads):
        assert_close(got, want)


def test_keeps_precision_and_broadcasts():
    A = random_modes(8, dtype=torch.complex64).reshape(2, 4)
    dt = torch.rand(2, 1)
    A_bar, B_scale = discretize(A, dt, "zoh")
    assert A_bar.dtype == B_scale.dtype == torch.complex64 and A_bar.shape == (2, 4)


def test_unknown_method():
    with pytest.raises(ValueError, match="method='euler'.*allowed"):
        discretize(random_modes(2), torch.tensor(0.1), "euler")
