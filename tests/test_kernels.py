"""s4d_kernel and dss_kernel: against their twins, against the dense system, and their gradients."""
import pytest
import torch

from diagssm.ops import discretize, dss_kernel, dss_kernel_ref, s4d_kernel, s4d_kernel_ref
from helpers import assert_close, randn

C128, F64 = torch.complex128, torch.float64
LENGTHS = [1, 3, 17, 1000]


def s4d_system(H=3, N2=4, C_out=None, seed=0, dtype=C128):
    g = torch.Generator().manual_seed(seed)
    rdt = torch.float64
    A = torch.complex(-torch.rand(H, N2, generator=g, dtype=rdt) - 0.05, torch.randn(H, N2, generator=g, dtype=rdt) * 8)
    B = torch.randn(H, N2, generator=g, dtype=C128)
    C = torch.randn(*((C_out,) if C_out else ()), H, N2, generator=g, dtype=C128)
    dt = torch.exp(torch.empty(H, dtype=rdt).uniform_(-6.9, -2.3, generator=g))  # [1e-3, 1e-1]
    return A.to(dtype), B.to(dtype), C.to(dtype), dt.to(A.real.dtype if dtype == C128 else torch.float32)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("C_out", [None, 2])
def test_s4d_matches_twin(L, disc, C_out):
    A, B, C, dt = s4d_system(C_out=C_out)
    K = s4d_kernel(A, B, C, dt, L, disc)
    assert K.shape == ((C_out,) if C_out else ()) + (3, L) and K.dtype == F64
    assert_close(K, s4d_kernel_ref(A, B, C, dt, L, disc))


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s4d_matches_dense_powers(disc):
    """K[l] = C_full A_bar^l B_bar of the real 2N-state system that the conjugate pairs stand for."""
    A, B, C, dt = s4d_system(H=1, N2=3, seed=1)
    A_bar, B_scale = discretize(A[0], dt[0], disc)  # (N/2,)
    Af = torch.diag(torch.cat([A_bar, A_bar.conj()]))  # (N, N) both members of every pair
    Bf = torch.cat([B_scale * B[0], (B_scale * B[0]).conj()])
    Cf = torch.cat([C[0], C[0].conj()])
    want = torch.stack([(Cf @ torch.linalg.matrix_power(Af, l) @ Bf).real for l in range(200)])
    assert_close(s4d_kernel(A, B, C, dt, 200, disc)[0], want)


def test_s4d_gradients_match_twin():
    A0, B0, C0, dt0 = s4d_system(C_out=2, seed=2)
    w = randn(2, 3, 300, seed=3)
    grads = []
    for fn in (s4d_kernel, s4d_kernel_ref):
        leaves = [t.clone().requires_grad_() for t in (A0, B0, C0, dt0)]
        grads.append(torch.autograd.grad((fn(*leaves, 300) * w).sum(), leaves))
    for got, want in zip(*grads):
        assert_close(got, want, scale=10)  # sums of 300 terms


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s4d_gradcheck(disc):
    leaves = [t.requires_grad_() for t in s4d_system(H=2, N2=2, seed=4)]
    assert torch.autograd.gradcheck(lambda *a: s4d_kernel(*a, 37, disc), leaves)


def test_s4d_float32_close_to_float64():
    A, B, C, dt = s4d_system(seed=5)
    K32 = s4d_kernel(A.to(torch.complex64), B.to(torch.complex64), C.to(torch.complex64), dt.float(), 4096)
    assert K32.dtype == torch.float32
    assert_close(K32, s4d_kernel(A, B, C, dt, 4096), scale=10)  # phases l*dt*Im(A) reach ~1e2


def test_s4d_bad_input():
    A, B, C, dt = s4d_system()
    with pytest.raises(ValueError, match="L=0"):
        s4d_kernel(A, B, C, dt, 0)
    with pytest.raises(ValueError, match="dt must be"):
        s4d_kernel(A, B, C, dt[:2], 8)
    with pytest.raises(ValueError, match="C must be"):
        s4d_kernel(A, B, C[:, :2], dt, 8)
    with pytest.raises(ValueError, match="A, B and C must be complex"):  # had been "imag is not implemented"
        s4d_kernel(A.real, B, C, dt, 8)
    with pytest.raises(ValueError, match="dt must be a real floating tensor"):
        s4d_kernel(A, B, C, dt.to(torch.complex128), 8)


def dss_system(H=3, N=5, seed=0, shared=False, growing=False, sep_dt=False):
    g = torch.Generator().manual_seed(seed)
    re = -torch.rand(N if shared else H * N, generator=g, dtype=F64) - 0.1
    if growing:  # the softmax variant leaves Lambda free: some modes grow
        re[::2] = -re[::2]
    Lam = torch.complex(re, torch.randn(re.shape, generator=g, dtype=F64) * 5)
    Lam = Lam if shared else Lam.reshape(H, N)
    W = torch.randn(H, N, generator=g, dtype=C128)
    dt = torch.exp(torch.empty(2 if sep_dt else 1, H, dtype=F64).uniform_(-6.9, -2.3, generator=g))
    return Lam, W, dt if sep_dt else dt[0]


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("variant", ["exp", "softmax"])
@pytest.mark.parametrize("shared,sep_dt", [(False, False), (True, False), (True, True)])
def test_dss_matches_twin(L, variant, shared, sep_dt):
    Lam, W, dt = dss_system(shared=shared, growing=variant == "softmax", sep_dt=sep_dt)
    K = dss_kernel(Lam, W, dt, L, variant, eps=0)
    assert K.shape == (3, L) and K.dtype == F64
    assert_close(K, dss_kernel_ref(Lam, W, dt, L, variant, eps=0))


def test_dss_exp_is_zoh_kernel():
    """DSS-EXP with W is the ZOH kernel of (Lambda, B=1, C=W) without the conjugate doubling."""
    Lam, W, dt = dss_system(seed=1)
    A_bar, B_scale = discretize(Lam, dt[:, None], "zoh")
    want = torch.stack([(W * B_scale * A_bar**l).sum(-1).real for l in range(64)], -1)
    assert_close(dss_kernel(Lam, W, dt, 64, "exp"), want)


def test_dss_softmax_is_normalised_exp():
    """Each softmax basis kernel sums to one over l: with W = Lambda, K sums to Re(N) = N per channel."""
    Lam, _, dt = dss_system(seed=2, growing=True)
    K = dss_kernel(Lam, Lam.clone(), dt, 500, "softmax", eps=0)
    assert_close(K.sum(-1), torch.full((3,), 5.0, dtype=F64), scale=100)


def test_dss_softmax_eps_guards_vanishing_denominator():
    Lam, W, dt = dss_system(seed=3)
    Lam = Lam.clone()
    Lam[0, 1] = 0  # Lambda = 0: the denominator Lambda (1 - exp(dt Lambda L)) vanishes
    K = dss_kernel(Lam, W, dt, 100, "softmax")
    assert torch.isfinite(K).all()
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[0, 1] = False  # on the other modes eps changes the kernel by O(eps / |x|^2)
    rest = dss_kernel(Lam, W * keep, dt, 100, "softmax")
    exact = dss_kernel_ref(torch.where(keep, Lam, 1), W * keep, dt, 100, "softmax", eps=0)
    torch.testing.assert_close(rest, exact, rtol=1e-5, atol=1e-6)  # O(eps=1e-7 / |x|^2), |x| ~ 0.1


@pytest.mark.parametrize("variant", ["exp", "softmax"])
def test_dss_gradients_match_twin(variant):
    Lam0, W0, dt0 = dss_system(seed=4, growing=variant == "softmax")
    w = randn(3, 300, seed=5)
    grads = []
    for fn in (dss_kernel, dss_kernel_ref):
        leaves = [t.clone().requires_grad_() for t in (Lam0, W0, dt0)]
        grads.append(torch.autograd.grad((fn(*leaves, 300, variant, eps=0) * w).sum(), leaves))
    for got, want in zip(*grads):
        assert_close(got, want, scale=10)


@pytest.mark.parametrize("variant", ["exp", "softmax"])
def test_dss_gradcheck(variant):
    """Against finite differences, growing softmax modes included (where the DSS code's gradient
    lacks its detached shift's term: docs/decisions.md, "Numerics")."""
    leaves = [t.requires_grad_() for t in dss_system(H=2, N=3, seed=6, growing=variant == "softmax", sep_dt=True)]
    assert torch.autograd.gradcheck(lambda *a: dss_kernel(*a, 29, variant), leaves)


def test_dss_bad_input():
    Lam, W, dt = dss_system()
    with pytest.raises(ValueError, match="variant='relu'"):
        dss_kernel(Lam, W, dt, 8, "relu")
    with pytest.raises(ValueError, match="Lambda must be"):
        dss_kernel(Lam[:, :2], W, dt, 8)


@pytest.mark.parametrize("L", LENGTHS)
def test_vandermonde_contract_matches_twin(L):
    from diagssm.ops.kernels import vandermonde_contract, vandermonde_contract_ref

    w = torch.complex(-torch.rand(3, 4, dtype=F64) * 0.05, randn(3, 4, seed=8))  # (H, N)
    u = randn(2, 3, L, seed=9)  # (B, H, L)
    assert_close(vandermonde_contract(u, w), vandermonde_contract_ref(u, w), scale=10)
    leaves = [w.clone().requires_grad_(), u.clone().requires_grad_()]
    wt = randn(2, 3, 4, dtype=C128, seed=10)
    grads = [torch.autograd.grad((f(leaves[1], leaves[0]) * wt).real.sum(), leaves)
             for f in (vandermonde_contract, vandermonde_contract_ref)]
    for got, want in zip(*grads):
        assert_close(got, want, scale=10)
