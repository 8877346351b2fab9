"""S5 layer: scan = FFT convolution = step-by-step recurrence, against systems built by hand from
the parameters; variable steps, resets, bidirectional, rate, contracts and errors."""
import math

import pytest
import torch

from diagssm import init as inits
from diagssm.layers.base import as_complex
from diagssm.layers.s5 import S5, lecun_normal
from diagssm.ops import modal_conv
from diagssm.ops import discretize_ref, scan_ref
from helpers import assert_close, randn

C128 = torch.complex128


def make(seed=0, H=3, P=8, **kw):
    torch.manual_seed(seed)
    layer = S5(H, P, **kw).double()
    with torch.no_grad():  # move off the init so that every parameter matters
        layer.Lambda_re.add_(-torch.rand_like(layer.Lambda_re))
        layer.log_dt.add_(0.5 * torch.randn_like(layer.log_dt))
    return layer


def rand_state(layer, batch, seed=5):
    return randn(batch, layer.n_modes, dtype=C128, seed=seed)


def rollout(layer, u, state):
    """The recurrence one step at a time with `layer.step`."""
    ys = []
    for k in range(u.shape[1]):
        y, state = layer.step(u[:, k], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def by_hand(layer, u, Delta, h, C, reverse=False):
    """factor Re(C h_k) for h_k = Lambda_bar_k h_(k-1) + B_bar_k u_k, from the parameters, per step.

    Delta (B, L, M): the step of each position; reverse runs k = L-1 .. 0 with the factor of step k+1.
    """
    Lambda, B = layer.Lambda(), as_complex(layer.B)  # (M,), (M, H)
    L = u.shape[1]
    ys = [None] * L
    order = range(L - 1, -1, -1) if reverse else range(L)
    for i, k in enumerate(order):
        j = k + 1 if reverse else k  # the step whose factor links h_k to the previous state
        A_bar = discretize_ref(Lambda, Delta[:, j], layer.discretization)[0] if j < L else 0
        B_scale = discretize_ref(Lambda, Delta[:, k], layer.discretization)[1]  # (B, M)
        h = A_bar * h + B_scale * (u[:, k].to(C128) @ B.T)  # (B, M)
        ys[k] = layer.factor * (h @ C.T).real  # (B, H)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("L", [1, 3, 17, 64])
@pytest.mark.parametrize("kw", [{}, dict(conj_sym=False, discretization="bilinear"),
                                dict(blocks=2, C_init="complex_normal", clip_eigs=True)])
def test_scan_conv_step_agree(L, kw):
    layer = make(**kw)
    u, h0 = randn(2, L, 3, seed=1), rand_state(layer, 2)
    layer.mode = "scan"
    y_s, h_s = layer(u, state=h0, return_state=True)
    layer.mode = "conv"
    y_c, h_c = layer(u, state=h0, return_state=True)
    y_r, h_r = rollout(layer, u, h0)
    Delta = torch.exp(layer.log_dt).expand(2, L, -1)
    y_h, h_h = by_hand(layer, u, Delta, h0, as_complex(layer.C)[0])
    assert y_s.shape == (2, L, 3) and h_s.shape == (2, layer.n_modes) and h_s.dtype == C128
    for y, h in [(y_c, h_c), (y_r, h_r)]:
        assert_close(y, y_s, scale=10)
        assert_close(h, h_s, scale=10)
    assert_close(y_h + layer.D * u, y_s, scale=10)
    assert_close(h_h, h_s, scale=10)


@pytest.mark.parametrize("mode", ["scan", "conv"])
def test_split_at_t(mode):
    layer = make(mode=mode)
    u, h0 = randn(2, 40, 3, seed=2), rand_state(layer, 2)
    y, h = layer(u, state=h0, return_state=True)
    y1, h1 = layer(u[:, :13], state=h0, return_state=True)
    y2, h2 = layer(u[:, 13:], state=h1, return_state=True)
    assert_close(torch.cat([y1, y2], 1), y, scale=10)
    assert_close(h2, h, scale=10)
    assert_close(layer(u), layer(u, state=layer.default_state(2)))  # None is the zero state


def test_auto_is_the_scan():
    layer = make()
    u = randn(2, 40, 3, seed=2)
    y_auto = layer(u)
    assert layer.last_mode == "scan"  # on the CPU; a GPU takes the convolution (tests/test_gpu.py)
    layer.mode = "scan"
    assert torch.equal(y_auto, layer(u))


@pytest.mark.parametrize("mode", ["scan", "conv"])
def test_bidirectional_is_forward_plus_reversed(mode):
    layer = make(bidirectional=True, mode=mode)
    u = randn(2, 19, 3, seed=3)
    C = as_complex(layer.C)  # (2, H, M)
    Delta = torch.exp(layer.log_dt).expand(2, 19, -1)
    zero = layer.default_state(2)
    y_f = by_hand(layer, u, Delta, zero, C[0])[0]
    y_b = by_hand(layer, u, Delta, zero, C[1], reverse=True)[0]
    assert_close(layer(u), y_f + y_b + layer.D * u, scale=10)


def test_bidirectional_has_no_state():
    layer = make(bidirectional=True)
    u = randn(1, 4, 3)
    with pytest.raises(ValueError, match="bidirectional"):
        layer(u, return_state=True)
    with pytest.raises(ValueError, match="bidirectional"):
        layer.step(u[:, 0], layer.default_state(1))


def test_rate_scales_dt():
    layer, shifted = make(), make()
    with torch.no_grad():
        shifted.log_dt.add_(math.log(2))
    u, h0 = randn(2, 30, 3, seed=4), rand_state(layer, 2)
    assert_close(layer(u, rate=2.0), shifted(u))
    assert_close(layer.step(u[:, 0], h0, rate=2.0)[0], shifted.step(u[:, 0], h0)[0])


@pytest.mark.parametrize("kw", [{}, dict(discretization="bilinear", bidirectional=True)])
def test_variable_dt(kw):
    layer = make(**kw)
    u = randn(2, 25, 3, seed=6)
    assert_close(layer(u, dt=torch.ones(2, 25, dtype=torch.float64)), layer(u), scale=10)
    dt = torch.rand(2, 25, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    Delta = dt[..., None] * torch.exp(layer.log_dt)  # (B, L, M): dt multiplies the learned step
    C, zero = as_complex(layer.C), layer.default_state(2)
    want = by_hand(layer, u, Delta, zero, C[0])[0] + layer.D * u
    if layer.bidirectional:
        want = want + by_hand(layer, u, Delta, zero, C[1], reverse=True)[0]
    assert_close(layer(u, dt=dt), want, scale=10)
    if not layer.bidirectional:
        h0 = rand_state(layer, 2)
        y, h = layer(u, state=h0, return_state=True, dt=dt)
        y_h, h_h = by_hand(layer, u, Delta, h0, C[0])
        assert_close(y, y_h + layer.D * u, scale=10)
        assert_close(h, h_h, scale=10)


def test_resets_restart_the_state():
    layer = make()
    u, h0 = randn(2, 30, 3, seed=8), rand_state(layer, 2)
    resets = torch.zeros(2, 30, dtype=torch.bool)
    resets[0, 11], resets[1, 0] = True, True
    y = layer(u, state=h0, resets=resets)
    y0, y1 = layer(u[:1], state=h0[:1]), layer(u[1:], state=h0[1:])
    assert_close(y[0, :11], y0[0, :11])  # before the reset: unchanged
    assert_close(y[0, 11:], layer(u[:1, 11:])[0], scale=10)  # after: a fresh run on the rest
    assert_close(y[1], layer(u[1:])[0], scale=10)  # a reset at k = 0 drops the given state
    assert not torch.allclose(y[1], y1[0])


def test_bidirectional_resets_split_segments():
    layer = make(bidirectional=True)
    u = randn(1, 30, 3, seed=9)
    resets = torch.zeros(1, 30, dtype=torch.bool)
    resets[0, 12] = True
    want = torch.cat([layer(u[:, :12]), layer(u[:, 12:])], 1)  # two independent sequences
    assert_close(layer(u, resets=resets), want, scale=10)


@pytest.mark.parametrize("kw, M, C_", [({}, 4, 1), (dict(conj_sym=False), 8, 1),
                                       (dict(bidirectional=True), 4, 2),
                                       (dict(conj_sym=False, blocks=4, bidirectional=True), 8, 2)])
def test_parameter_count(kw, M, C_):
    H = 5
    layer = S5(H, 8, **kw)
    assert layer.n_modes == M
    assert sum(p.numel() for p in layer.parameters()) == 3 * M + 2 * M * H * (1 + C_) + H
    assert layer.C.shape == (C_, H, M, 2) and layer.B.shape == (M, H, 2)
    assert set(S5.ssm_params) <= {n for n, _ in layer.named_parameters()}


def test_init():
    torch.manual_seed(0)
    P, H = 16, 400
    layer = S5(H, P, blocks=2, dt_min=1e-3, dt_max=1e-1).double()
    Lambda, V, Vinv = inits.hippo_n_blocks(P, 2)
    assert_close(layer.Lambda(), Lambda, dtype=torch.float32)  # stored in float32
    assert (layer.log_dt >= math.log(1e-3)).all() and (layer.log_dt <= math.log(1e-1)).all()
    B = 2 * (V @ as_complex(layer.B)).real  # (P, H): B_tilde = Vinv B with B real, recovered
    assert_close(as_complex(layer.B), Vinv @ B.to(C128), dtype=torch.float32)
    assert abs(B.std().item() * math.sqrt(P) - 1) < 0.05  # lecun normal, JAX fan-in of (P, H) = P
    C = lecun_normal((20000,), 16)
    assert abs(C.std().item() * 4 - 1) < 0.03 and C.abs().max() <= 2 / 0.8796 / 4 + 1e-12
    assert layer.default_state(3).dtype == C128 and S5(2, 4).default_state(3).dtype == torch.complex64
    assert S5(2, 4).Lambda().dtype == torch.complex64


@pytest.mark.parametrize("conj_sym", [True, False])
def test_random_init(conj_sym):
    """init="rand": per block, eigenvalues -1/2 + i omega with omega in [0, pi (P/J)/2), sorted by Im
    (with their conjugates without conj_sym); the same B and C distribution as HiPPO-N."""
    torch.manual_seed(1)
    P, J = 16, 2
    layer = S5(8, P, blocks=J, conj_sym=conj_sym, init="rand").double()
    Lambda = layer.Lambda().detach()
    assert Lambda.shape == (P // 2 if conj_sym else P,)
    assert_close(Lambda.real, torch.full_like(Lambda.real, -0.5), dtype=torch.float32)
    hippo = inits.hippo_n_blocks(P, J, conj_sym)[0]
    assert not torch.allclose(Lambda, hippo.to(Lambda.dtype), atol=1e-2)
    for block in Lambda.imag.reshape(J, -1):
        assert (block.diff() >= 0).all() and block.abs().max() < math.pi * (P // J) / 2
        if not conj_sym:
            assert_close(block, -block.flip(0), dtype=torch.float32)  # conjugate pairs
    torch.manual_seed(1)
    again = S5(8, P, blocks=J, conj_sym=conj_sym, init="rand").double()
    assert torch.equal(again.Lambda(), layer.Lambda())
    with pytest.raises(ValueError, match="init='legs'"):
        S5(8, P, init="legs")


def test_state_dict_round_trip():
    layer = make(bidirectional=True, C_init="lecun_normal")
    fresh = S5(3, 8, bidirectional=True, C_init="lecun_normal").double()
    fresh.load_state_dict(layer.state_dict())
    u = randn(2, 9, 3, seed=10)
    assert torch.equal(fresh(u), layer(u))
    torch.manual_seed(3)
    a = S5(3, 8).state_dict()
    torch.manual_seed(3)
    assert all(torch.equal(v, a[k]) for k, v in S5(3, 8).state_dict().items())  # seeded init


@pytest.mark.parametrize("mode", ["scan", "conv"])
def test_float32_matches_float64(mode):
    layer = make(mode=mode)
    u, h0 = randn(2, 200, 3, seed=11), rand_state(layer, 2)
    y64, h64 = layer(u, state=h0, return_state=True)
    y32, h32 = layer.float()(u.float(), state=h0.to(torch.complex64), return_state=True)
    assert y32.dtype == torch.float32 and h32.dtype == torch.complex64
    assert_close(y32, y64, dtype=torch.float32, scale=5)
    assert_close(h32, h64, dtype=torch.float32, scale=5)


def test_conv_and_scan_gradients_agree():
    layer = make(bidirectional=True)
    u = randn(2, 33, 3, seed=12).requires_grad_()
    grads = []
    for mode in ["scan", "conv"]:
        layer.mode = mode
        layer.zero_grad()
        u.grad = None
        (layer(u) * randn(2, 33, 3, seed=13)).sum().backward()
        grads.append([u.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for g_s, g_c in zip(*grads):
        assert_close(g_c, g_s, scale=100)


@pytest.mark.parametrize("mode", ["scan", "conv"])
@pytest.mark.parametrize("kw", [{}, dict(conj_sym=False, discretization="bilinear")])
def test_gradients_through_the_states_equal_the_recurrence(mode, kw):
    """Gradients of the input, the initial state and every parameter, through the outputs and the
    final state, against the step-by-step twin: the conv mode's (a GPU's default) and the scan's
    state gradients had been compared nowhere."""
    layer = make(mode=mode, **kw)
    u, h0 = randn(2, 30, 3, seed=21), rand_state(layer, 2, seed=22)
    w, v = randn(2, 30, 3, seed=23), rand_state(layer, 2, seed=24)
    leaves = [u.requires_grad_(), h0.requires_grad_(), *layer.parameters()]

    def loss(y, h):
        return (y * w).sum() + (h * v.conj()).real.sum()

    got = torch.autograd.grad(loss(*layer(u, state=h0, return_state=True)), leaves)
    want = torch.autograd.grad(loss(*rollout(layer, u, h0)), leaves)
    for g, r in zip(got, want):
        assert_close(g, r, scale=100)  # sums over 30 steps


def test_modal_conv_matches_scan_ref():
    A = torch.exp(torch.complex(-torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)))
    Bu, h0 = randn(2, 50, 4, dtype=C128, seed=14), randn(2, 4, dtype=C128, seed=15)
    for reverse in (False, True):
        assert_close(modal_conv(A, Bu, h0, reverse), scan_ref(A, Bu, h0, reverse), scale=10)
    for bad in ("no", 1, None):  # 'no' had run the reverse scan
        with pytest.raises(ValueError, match=f"modal_conv: reverse must be True or False, got {bad!r}"):
            modal_conv(A, Bu, h0, bad)


def test_modal_conv_takes_a_real_negative_a_bar_and_refuses_a_time_varying_one():
    """A real A_bar < 0 gave NaN (the log of a negative real); an (L, P) A_bar ran A_bar[l]^l, silently."""
    A = torch.tensor([-0.5, 0.3, 0.9], dtype=torch.float64)
    Bu, h0 = randn(2, 6, 3, dtype=C128, seed=4), randn(2, 3, dtype=C128, seed=5)
    for reverse in (False, True):
        assert_close(modal_conv(A, Bu, h0, reverse), scan_ref(A, Bu, h0, reverse))
    A.requires_grad_()
    (g,) = torch.autograd.grad(modal_conv(A, Bu, h0).abs().sum(), A)
    A_ref = A.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(scan_ref(A_ref, Bu, h0).abs().sum(), A_ref)
    assert g.dtype == torch.float64 and not g.is_complex()
    assert_close(g, g_ref)
    for bad_A, bad_Bu in [(randn(6, 3, dtype=C128), Bu), (A.detach()[:2], Bu), (A.detach(), Bu[0])]:
        with pytest.raises(ValueError, match=r"modal_conv: A_bar must be \(P,\) .* and Bu \(B, L, P\)"):
            modal_conv(bad_A, bad_Bu)
    with pytest.raises(ValueError, match=r"modal_conv: h0 must be \(B, P\)"):
        modal_conv(A.detach(), Bu, h0[0])


def test_errors():
    layer = make()
    u = randn(2, 5, 3)
    state = layer.default_state(2)
    bad_inputs = [randn(2, 5, 4), randn(5, 3), u.float()]
    for bad in bad_inputs:
        with pytest.raises(ValueError, match="u "):
            layer(bad)
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.where(u > 1, float("nan"), u))
    for bad in [state[:, :-1], state.to(torch.complex64), state[0]]:
        with pytest.raises(ValueError, match="state"):
            layer(u, state=bad)
    with pytest.raises(ValueError, match="u_t"):
        layer.step(u[:, 0, :2], state)
    for kw, name in [(dict(dt=torch.ones(2, 4, dtype=torch.float64)), "dt"),
                     (dict(dt=-torch.ones(2, 5, dtype=torch.float64)), "dt"),
                     (dict(resets=torch.ones(2, 5)), "resets"),
                     (dict(resets=torch.ones(1, 5, dtype=torch.bool)), "resets")]:
        with pytest.raises(ValueError, match=name):
            layer(u, **kw)
    layer.mode = "conv"
    with pytest.raises(ValueError, match="mode='conv'"):
        layer(u, resets=torch.zeros(2, 5, dtype=torch.bool))
    for kw, name in [(dict(C_init="normal"), "C_init"), (dict(mode="fft"), "mode"),
                     (dict(discretization="euler"), "method"), (dict(blocks=3), "blocks"),
                     (dict(d_state=12, blocks=4), "odd"), (dict(dt_min=0.2), "dt_min")]:
        with pytest.raises(ValueError, match=name):
            S5(3, **{"d_state": 8, **kw})


def test_modal_conv_with_a_mode_that_underflowed():
    """A_bar = 0 (exp(dt Lambda) below float32's range) made every output NaN on the conv path: at
    l = 0 the power was exp(0 * log 0)."""
    A, Bu, h0 = randn(3, dtype=torch.complex128, seed=1) * 0.5, randn(2, 9, 3, dtype=torch.complex128, seed=2), \
        randn(2, 3, dtype=torch.complex128, seed=3)
    A[1] = 0
    for reverse in (False, True):
        assert_close(modal_conv(A, Bu, h0, reverse), scan_ref(A, Bu, h0, reverse))
    torch.manual_seed(0)
    layer = S5(16, 8, dt_min=300.0, dt_max=300.0)  # Re(dt Lambda) = -150: A_bar underflows in float32
    u = torch.randn(2, 30, 16, requires_grad=True)
    layer.mode = "conv"
    y_conv = layer(u)
    (g_conv,) = torch.autograd.grad(y_conv.square().sum(), [u])
    layer.mode = "scan"
    y_scan = layer(u)
    (g_scan,) = torch.autograd.grad(y_scan.square().sum(), [u])
    assert torch.isfinite(y_conv).all() and torch.isfinite(g_conv).all()
    assert_close(y_conv, y_scan)
    assert_close(g_conv, g_scan)
