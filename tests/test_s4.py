"""S4 layer: its kernel against the dense system it stands for (and HiPPO itself at initialisation),
convolution against the recurrence, states, bidirectional, rate, length independence, contracts."""
import copy
import math

import pytest
import torch

from diagssm import hippo
from diagssm.layers import S4D
from diagssm.layers.base import as_complex
from diagssm.layers.s4 import (S4, bilinear_dense, bilinear_dplr, dplr_dense, dplr_kernel_ref, doubled)
from helpers import assert_close, randn

C128, F64 = torch.complex128, torch.float64
CONFIGS = [("legs", 1), ("legt", 2)]
BACKENDS = ["fft", "chunked"]  # S4.forward's two algorithms; every forward test runs on both


def layer(H=3, N=8, measure="legs", rank=1, seed=0, perturb=True, **kw):
    """A float64 S4 whose parameters are moved off their initial values (a trained-looking system)."""
    torch.manual_seed(seed)
    m = S4(H, N, measure=measure, rank=rank, dt_min=0.01, dt_max=0.3, **kw).double()
    if perturb:
        with torch.no_grad():
            for i, name in enumerate(("log_Lambda_re", "Lambda_im", "P", "B")):
                p = getattr(m, name)
                p.add_(0.1 * randn(*p.shape, seed=seed + 10 + i) * p.abs().mean())
    return m


def params(m, rate=1.0):
    return m.Lambda(), m.low_rank(), as_complex(m.B), as_complex(m.C), m.dt(rate)


def rollout(m, u, state):
    ys = []
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


# --- the kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("measure, rank", CONFIGS + [("fout", 1), ("lagt", 1), ("legs", 3)])
def test_kernel_matches_dense_powers(measure, rank):
    """K[l] = Re(C_full A_bar^l B_bar) of the dense (N, N) doubled DPLR system, A_bar by solve."""
    m = layer(measure=measure, rank=rank, channels=2)
    K = m.kernel(1000)
    assert K.shape == (2, 3, 1000) and K.dtype == F64
    assert_close(K, dplr_kernel_ref(*params(m), 1000))


@pytest.mark.parametrize("L", [1, 2, 3, 17, 64])
def test_kernel_awkward_lengths(L):
    m = layer()
    assert_close(m.kernel(L), dplr_kernel_ref(*params(m), L), scale=100)


def test_initial_kernel_is_hippo_legs():
    """At initialisation (exact complex128 values) the layer is the real HiPPO-LegS system:
    A = V (Lambda - p p^H) V^H, B = 2 Re(V B_tilde), C_real = 2 Re(C V^H)."""
    N, L = 16, 1000
    m = S4(2, N).double()
    Lambda, P, B, V = hippo.nplr_diagonal("legs", N, 1)  # (M,), (1, M), (M,), (N, M)
    with torch.no_grad():
        m.log_Lambda_re.copy_(torch.log(-Lambda.real))
        m.Lambda_im.copy_(Lambda.imag)
        m.P.copy_(torch.view_as_real(P))
        m.B.copy_(torch.view_as_real(B.expand(2, -1)))
    A_real, B_real = hippo.transition("legs", N)  # (N, N), (N,)
    C_real = 2 * (as_complex(m.C)[0] @ V.conj().T).real  # (H, N)
    dt = m.dt()
    eye = torch.eye(N, dtype=F64)
    want = []
    for h in range(2):
        lhs = eye - dt[h] / 2 * A_real
        A_bar = torch.linalg.solve(lhs, eye + dt[h] / 2 * A_real)
        x, K = dt[h] * torch.linalg.solve(lhs, B_real), []
        for _ in range(L):
            K.append(C_real[h] @ x)
            x = A_bar @ x
        want.append(torch.stack(K))
    assert_close(m.kernel(L)[0], torch.stack(want))


@pytest.mark.parametrize("measure, rank", CONFIGS + [("legt", 3)])
def test_woodbury_discretisation_matches_solve(measure, rank):
    Lambda, P, B, _, dt = params(layer(measure=measure, rank=rank))
    got = bilinear_dplr(Lambda, P, doubled(B), dt)
    want = bilinear_dense(dplr_dense(Lambda, P), doubled(B), dt)
    for a, b in zip(got, want):
        assert_close(a, b, scale=10)


def test_kernel_gradients_match_twin():
    """Gradients through Cauchy + Woodbury + C_tilde equal those of the dense-power twin."""
    m = layer(channels=2)
    g = randn(2, 3, 200, seed=5)
    names = ["log_dt", "log_Lambda_re", "Lambda_im", "P", "B", "C"]
    fast = torch.autograd.grad((m.kernel(200) * g).sum(), [getattr(m, n) for n in names])
    ref = torch.autograd.grad((dplr_kernel_ref(*params(m), 200) * g).sum(), [getattr(m, n) for n in names])
    for name, a, b in zip(names, fast, ref):
        assert_close(a, b)


def test_kernel_does_not_depend_on_previous_length():
    m = layer(channels=2)
    fresh = copy.deepcopy(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.kernel(100)
    m(randn(2, 100, 3, seed=1))
    K50 = m.kernel(50)
    assert torch.equal(K50, fresh.kernel(50))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# --- convolution vs recurrence -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure, rank", CONFIGS)
@pytest.mark.parametrize("L", [1, 3, 17, 100])
def test_conv_equals_step_rollout(measure, rank, L, backend):
    m = layer(measure=measure, rank=rank, channels=2, backend=backend)
    u = randn(2, L, 3, seed=2)
    x0 = randn(2, 3, 4, dtype=C128, seed=3)
    y, x = m(u, state=x0, return_state=True)
    y_step, x_step = rollout(m, u, x0)
    assert y.shape == (2, L, 6) and x.shape == (2, 3, 4) and x.dtype == C128
    assert_close(y, y_step, scale=100)
    assert_close(x, x_step, scale=100)
    y0, x0_final = m(u, return_state=True)  # zero state
    assert_close(y0, rollout(m, u, m.default_state(2))[0], scale=100)
    assert_close(m(u), y0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L, t", [(37, 10), (1000, 617), (5, 1)])
def test_split_at_t(L, t, backend):
    m = layer(measure="legt", rank=2, backend=backend)
    u = randn(2, L, 3, seed=4)
    x0 = randn(2, 3, 4, dtype=C128, seed=5)
    y, x = m(u, state=x0, return_state=True)
    y1, x1 = m(u[:, :t], state=x0, return_state=True)
    y2, x2 = m(u[:, t:], state=x1, return_state=True)
    assert_close(torch.cat([y1, y2], 1), y, scale=1000)  # L = 1000 accumulates
    assert_close(x2, x, scale=1000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_is_forward_plus_reversed(backend):
    bi = layer(channels=2, bidirectional=True, seed=3, backend=backend)
    assert bi.C.shape[0] == 4 and bi.kernel(20).shape == (4, 3, 20)
    fwd, bwd = copy.deepcopy(bi), copy.deepcopy(bi)
    for one, part in ((fwd, slice(0, 2)), (bwd, slice(2, 4))):
        one.bidirectional = False
        one.C = torch.nn.Parameter(bi.C[part].detach().clone())
    with torch.no_grad():
        bwd.D.zero_()
    u = randn(2, 20, 3, seed=6)
    flip = lambda y: y.flip(1)  # noqa: E731
    assert_close(bi(u), fwd(u) + flip(bwd(flip(u))), scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_scales_dt(backend):
    m = layer(channels=2, backend=backend)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2.log_dt.add_(math.log(2.0))
    u, x0 = randn(2, 30, 3, seed=7), randn(2, 3, 4, dtype=C128, seed=8)
    assert_close(m.kernel(30, rate=2.0), m2.kernel(30))
    y, x = m(u, state=x0, return_state=True, rate=2.0)
    y2, x2 = m2(u, state=x0, return_state=True)
    assert_close(y, y2)
    assert_close(x, x2)
    for a, b in zip(m.step(u[:, 0], x0, rate=2.0), m2.step(u[:, 0], x0)):
        assert_close(a, b)


# --- n_ssm: copies of (Lambda, P) -------------------------------------------------------------------

def copy_system(m, s):
    """Copy s of (Lambda, P) read straight from the parameters: (M,), (r, M) complex."""
    Lambda = torch.complex(-torch.exp(m.log_Lambda_re[s]), m.Lambda_im[s])
    return Lambda, as_complex(m.P)[:, s]


@pytest.mark.parametrize("n_ssm", [2, 6])
def test_n_ssm_kernel_matches_dense_per_group(n_ssm):
    """Each channel h is the dense DPLR system of copy h mod n_ssm (the S4 code's repeat), with its own
    B, C, dt: its kernel equals that system's dense powers."""
    m = layer(H=6, measure="legt", rank=2, channels=2, n_ssm=n_ssm)  # perturbed: every copy differs
    assert m.log_Lambda_re.shape == (n_ssm, 4) and m.P.shape == (2, n_ssm, 4, 2)
    K = m.kernel(300)  # (C', H, L)
    B, C, dt = as_complex(m.B), as_complex(m.C), m.dt()
    for h in range(6):
        Lambda, P = copy_system(m, h % n_ssm)
        want = dplr_kernel_ref(Lambda, P, B[h:h + 1], C[:, h:h + 1], dt[h:h + 1], 300)  # (C', 1, L)
        assert_close(K[:, h], want[:, 0])


def test_n_ssm_equal_H_gives_independent_channels():
    """n_ssm = H: channel h's kernel depends on row h of Lambda and P only; n_ssm = 2: on copy h mod 2."""
    for n_ssm, owner in ((4, lambda h: h), (2, lambda h: h % 2)):
        m = layer(H=4, n_ssm=n_ssm)
        K = m.kernel(50)  # (1, H, L)
        for h in range(4):
            grads = torch.autograd.grad(K[0, h].square().sum(), [m.log_Lambda_re, m.Lambda_im, m.P],
                                        retain_graph=True)
            for g in grads:
                touched = g.abs().flatten(-2) if g.dim() == 4 else g.abs()  # (.., S, ...) per copy
                rows = (touched.sum(-1) > 0).reshape(-1, n_ssm).any(0)  # (S,)
                assert rows.tolist() == [s == owner(h) for s in range(n_ssm)], (n_ssm, h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_ssm", [1, 3])
def test_n_ssm_conv_equals_step_rollout(n_ssm, backend):
    m = layer(H=3, n_ssm=n_ssm, channels=2, backend=backend)
    u, x0 = randn(2, 17, 3, seed=2), randn(2, 3, 4, dtype=C128, seed=3)
    y, x = m(u, state=x0, return_state=True)
    y_step, x_step = rollout(m, u, x0)
    assert_close(y, y_step, scale=100)
    assert_close(x, x_step, scale=100)


def test_readme_counts_and_parity_with_s4d():
    """The README table's S4 row (H = N = 64: 8,448) and the docstring's parity: n_ssm = H/2, rank 1
    has S4D's H (3N + 2) parameters."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(S4(64, 64)) == 8448 == s4_count(64, 64)
    assert n(S4(64, 64, n_ssm=32)) == 64 * (3 * 64 + 2) == n(S4D(64, 64))


def test_n_ssm_default_is_tied():
    m = S4(4, 8)
    assert m.n_ssm == 1 and torch.equal(m.Lambda()[0], m.Lambda()[3]) and m.low_rank().shape == (1, 4, 4)


# --- contracts -----------------------------------------------------------------------------------

def s4_count(H, N, rank=1, channels=1, bidirectional=False, n_ssm=1):
    """The class docstring's formula: H (1 + N (1 + C') + channels) + S N (1 + r)."""
    return H * (1 + N * (1 + channels * (1 + bidirectional)) + channels) + n_ssm * N * (1 + rank)


@pytest.mark.parametrize("H, N, rank, channels, bidirectional, n_ssm",
                         [(4, 8, 1, 1, False, 1), (3, 16, 2, 2, False, 1), (5, 6, 1, 3, True, 1),
                          (2, 64, 1, 1, False, 1), (4, 8, 1, 1, False, 4), (6, 16, 2, 2, True, 3)])
def test_parameter_count(H, N, rank, channels, bidirectional, n_ssm):
    m = S4(H, N, measure="legt" if rank == 2 else "legs", rank=rank, channels=channels,
           bidirectional=bidirectional, n_ssm=n_ssm)
    assert sum(p.numel() for p in m.parameters()) == s4_count(H, N, rank, channels, bidirectional, n_ssm)
    assert m.default_state(7).shape == (7, H, N // 2) and m.default_state(7).dtype == torch.complex64
    assert set(S4.ssm_params) <= {n for n, _ in m.named_parameters()}


def test_state_dict_round_trip():
    m = layer(channels=2, seed=1)
    other = S4(3, 8, channels=2).double()
    other.load_state_dict(m.state_dict())
    u = randn(2, 25, 3, seed=9)
    assert torch.equal(other(u), m(u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_close_to_float64(backend):
    torch.manual_seed(0)
    m32 = S4(4, 16, channels=2, backend=backend)
    m64 = copy.deepcopy(m32).double()
    u = randn(2, 1000, 4, seed=10)
    x0 = randn(2, 4, 8, dtype=C128, seed=11)
    y32, x32 = m32(u.float(), state=x0.to(torch.complex64), return_state=True)
    y64, x64 = m64(u, state=x0, return_state=True)
    assert y32.dtype == torch.float32 and x32.dtype == torch.complex64
    assert_close(y32, y64, scale=10)
    assert_close(x32, x64, scale=10)
    assert_close(m32.kernel(1000), m64.kernel(1000))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure,dt", [("fout", 1e-3), ("fout", 1e-4), ("legs", 1e-4)])
def test_float32_response_to_a_state_with_small_steps(backend, measure, dt):
    """The FFT path took the response to a given state as the kernel of B' = A_bar x0 / dt through
    C_tilde = C (I - A_bar^L), whose float32 cancellation 1/dt magnified: FouT at dt = 1e-3 was off by
    a quarter of the response (0.5 at 1e-4); `state_response` computes it in two levels of powers."""
    torch.manual_seed(0)
    m32 = S4(8, 16, measure=measure, dt_min=dt, dt_max=dt, backend=backend)
    m64 = copy.deepcopy(m32).double()
    x0 = randn(2, 8, 8, dtype=C128, seed=11)
    u = 0.01 * randn(2, 70, 8, seed=10)  # small next to the state's response
    y32 = m32(u.float(), state=x0.to(torch.complex64))
    y64 = m64(u, state=x0)
    scale = y64.abs().max()
    assert_close(y32 / scale, y64 / scale, scale=10)


def test_state_response_gradients_match_the_chunked_path():
    """The FFT path's response to a state (`state_response`) against the chunked path's, in float64:
    the gradients of the state and of every parameter."""
    torch.manual_seed(0)
    fft = S4(4, 16, measure="fout", backend="fft").double()
    chunked = copy.deepcopy(fft)
    chunked.backend = "chunked"
    u, w = randn(2, 37, 4, seed=10), randn(2, 37, 4, seed=12)
    grads = []
    for m in (fft, chunked):
        x0 = randn(2, 4, 8, dtype=C128, seed=11).requires_grad_()
        grads.append(torch.autograd.grad((m(u, state=x0) * w).sum(), [x0] + list(m.parameters())))
    for g, want in zip(*grads):
        assert_close(g, want)


def test_seeded_init_is_deterministic():
    torch.manual_seed(3)
    a = S4(3, 8)
    torch.manual_seed(3)
    b = S4(3, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_errors():
    m = layer()
    u = randn(2, 5, 3, seed=0)
    with pytest.raises(ValueError, match="d_model"):
        m(randn(2, 5, 4))
    with pytest.raises(ValueError, match="dtype"):
        m(u.float())
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full_like(u, float("nan")))
    with pytest.raises(ValueError, match="state must have shape"):
        m(u, state=torch.zeros(2, 3, 5, dtype=C128))
    with pytest.raises(ValueError, match="rate"):
        m(u, rate=0.0)
    with pytest.raises(ValueError, match="L="):
        m.kernel(0)
    with pytest.raises(ValueError, match="bidirectional"):
        layer(bidirectional=True)(u, return_state=True)
    with pytest.raises(ValueError, match="rank=1 is too small for measure='legt'"):
        S4(3, 8, measure="legt")
    with pytest.raises(ValueError, match="measure="):
        S4(3, 8, measure="legx")
    with pytest.raises(ValueError, match="d_state"):
        S4(3, 7)
    with pytest.raises(ValueError, match="channels"):
        S4(3, 8, channels=0)
    with pytest.raises(ValueError, match="n_ssm=2 must divide d_model=3"):
        S4(3, 8, n_ssm=2)
    with pytest.raises(ValueError, match="n_ssm=0 must be an int >= 1"):
        S4(3, 8, n_ssm=0)
