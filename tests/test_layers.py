"""S4D and DSS layers: convolution = recurrence, state passing, bidirectional, rate, contracts."""
import math
import re

import numpy as np
import pytest
import torch

from diagssm.layers import DSS, S4, S4D, S5
from helpers import assert_close, randn

F64 = torch.float64

LAYERS = {
    "s4d-legs": lambda **kw: S4D(4, 8, **kw),
    "s4d-inv-bilinear": lambda **kw: S4D(4, 8, init="inv", discretization="bilinear", **kw),
    "s4d-lin-relu": lambda **kw: S4D(4, 8, init="lin", real_transform="relu", **kw),
    "s4d-real-none": lambda **kw: S4D(4, 8, init="real", real_transform="none", **kw),
    "s4d-rand-channels": lambda **kw: S4D(4, 8, init="rand", channels=2, **kw),
    "dss-exp": lambda **kw: DSS(4, 8, **kw),
    "dss-exp-one-dt": lambda **kw: DSS(4, 8, sep_dt=False, **kw),
    "dss-softmax": lambda **kw: DSS(4, 8, variant="softmax", **kw),
}


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LAYERS[name](**kw).double()
    if name == "dss-softmax":  # the softmax variant leaves Lambda free: make some modes grow
        with torch.no_grad():
            layer.Lambda_re[::2] = 0.3
    return layer


def rollout(layer, u, state, L=None):
    ys = []
    for u_t in u.unbind(1):
        y_t, state = layer.step(u_t, state, L=L)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def random_state(layer, batch, seed=1):
    return randn(*layer.default_state(batch).shape, dtype=torch.complex128, seed=seed)


BACKENDS = ["fft", "chunked"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("L", [1, 3, 17, 200])
def test_conv_equals_step_rollout(name, L, backend):
    layer = make(name, backend=backend)
    u, h0 = randn(2, L, 4, seed=2), random_state(layer, 2)
    y, h = layer(u, state=h0, return_state=True)
    y_ref, h_ref = rollout(layer, u, h0, L=L)
    assert_close(y, y_ref, scale=10)
    assert_close(h, h_ref, scale=10)
    assert_close(layer(u), rollout(layer, u, layer.default_state(2), L=L)[0], scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_split_sequence_with_state(name, backend):
    layer = make(name, backend=backend)
    u = randn(2, 50, 4, seed=3)
    y, h = layer(u, return_state=True)
    for t in (1, 21, 49):
        y1, h1 = layer(u[:, :t], return_state=True, L=50)
        y2, h2 = layer(u[:, t:], state=h1, return_state=True, L=50)
        assert_close(torch.cat([y1, y2], 1), y, scale=10)
        assert_close(h2, h, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_gradients_conv_equal_recurrence(name, backend):
    """Each fast path's gradients of the input, the initial state and every parameter, through the
    outputs and the final state, equal those of the step-by-step twin (a state's gradients had been
    compared nowhere: training on split sequences with a carried state depends on them)."""
    layer = make(name, backend=backend)
    u, h0, w = randn(2, 30, 4, seed=4), random_state(layer, 2), randn(2, 30, 4 * layer.channels, seed=5)
    v = random_state(layer, 2, seed=6)  # the final state's weights
    leaves = [u.requires_grad_(), h0.requires_grad_(), *layer.parameters()]

    def loss(y, h):
        return (y * w).sum() + (h * v.conj()).real.sum()

    g_conv = torch.autograd.grad(loss(*layer(u, state=h0, return_state=True)), leaves)
    g_step = torch.autograd.grad(loss(*rollout(layer, u, h0, L=30)), leaves)
    for got, want in zip(g_conv, g_step):
        assert_close(got, want, scale=100)  # sums over 30 steps and 4 channels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(S4D, {}), (DSS, {}), (DSS, {"variant": "softmax"})])
def test_bidirectional_is_forward_plus_reversed(cls, kw, backend):
    kw = dict(kw, backend=backend)
    torch.manual_seed(0)
    bi = cls(4, 8, bidirectional=True, **kw).double()
    fwd = cls(4, 8, **kw).double()
    cname = "C" if cls is S4D else "W"
    fwd.load_state_dict({k: v[:1] if k == cname else v for k, v in bi.state_dict().items()})
    bwd = cls(4, 8, **kw).double()
    bwd.load_state_dict({k: v[1:] if k == cname else (0 * v if k == "D" else v) for k, v in bi.state_dict().items()})
    u = randn(2, 33, 4, seed=6)
    assert_close(bi(u), fwd(u) + bwd(u.flip(1)).flip(1), scale=10)
    with pytest.raises(ValueError, match="bidirectional"):
        bi.step(u[:, 0], bi.default_state(2))


@pytest.mark.parametrize("name", LAYERS)
def test_backends_agree_on_long_sequences(name):
    """fft and chunked, outputs and every gradient, at a length with a partial last chunk."""
    results = []
    for backend in BACKENDS:
        layer = make(name, backend=backend)
        u = randn(2, 1000, 4, seed=11).requires_grad_()
        y = layer(u)
        results.append([y, *torch.autograd.grad((y * randn(*y.shape, seed=12)).sum(), [u, *layer.parameters()])])
        assert layer.last_backend == backend
    for got, want in zip(*results):
        assert_close(got, want, scale=100)


def test_auto_backend_is_chunked_on_cpu():
    layer = S4D(4, 8)
    layer(torch.randn(1, 10, 4))
    assert layer.backend == "auto" and layer.last_backend == "chunked"
    with pytest.raises(ValueError, match="backend='triton'"):
        S4D(4, 8, backend="triton")


@pytest.mark.parametrize("name", LAYERS)
def test_rate_equals_rescaled_dt(name):
    layer, other = make(name), make(name)
    with torch.no_grad():
        other.log_dt += math.log(2.0)
    u = randn(2, 40, 4, seed=7)
    assert_close(layer(u, rate=2.0), other(u), scale=10)


def s4d_count(H, N, channels=1, bidirectional=False):
    return H * (1 + N * (2 + channels * (1 + bidirectional)) + channels)


def dss_count(H, N, channels=1, bidirectional=False, sep_dt=True):
    return (1 + sep_dt) * H + N + channels * (1 + bidirectional) * H * N + channels * H


@pytest.mark.parametrize("H,N,channels,bidirectional", [(4, 8, 1, False), (16, 64, 1, False), (8, 16, 2, True)])
def test_parameter_counts(H, N, channels, bidirectional):
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(S4D(H, N, channels=channels, bidirectional=bidirectional)) == s4d_count(H, N, channels, bidirectional)
    assert n(DSS(H, N, channels=channels, bidirectional=bidirectional)) == dss_count(H, N, channels, bidirectional)
    assert n(DSS(H, N, sep_dt=False)) == dss_count(H, N, sep_dt=False)
    assert n(S4D(64, 64)) == 12416 and n(DSS(64, 64)) == 4352  # the README table: H = N = 64


def test_s4d_fixed_B():
    """train_B=False keeps B at its initial value as a buffer: H N fewer parameters, the same output."""
    torch.manual_seed(0)
    trained = S4D(4, 8).double()
    torch.manual_seed(0)
    fixed = S4D(4, 8, train_B=False).double()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(trained) - n(fixed) == 4 * 8 and "B" in dict(fixed.named_buffers())
    u = randn(2, 30, 4, seed=3)
    assert_close(fixed(u), trained(u), dtype=torch.float64)
    fixed(u).square().sum().backward()
    assert fixed.C.grad is not None and fixed.B.grad is None
    state = fixed.state_dict()
    again = S4D(4, 8, train_B=False).double()
    again.load_state_dict(state)
    assert torch.equal(again(u), fixed(u))


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trip(name):
    layer, fresh = make(name, seed=0), make(name, seed=1)
    u = randn(2, 20, 4, seed=8)
    assert not torch.allclose(layer(u), fresh(u))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer(u), fresh(u))


@pytest.mark.parametrize("name", LAYERS)
def test_float32_close_to_float64(name):
    layer = make(name)
    u = randn(2, 100, 4, seed=9)
    y64 = layer(u)
    y32 = layer.float()(u.float())
    assert y32.dtype == torch.float32
    assert_close(y32, y64, scale=10)


def test_seeded_construction_is_deterministic():
    torch.manual_seed(3)
    a = S4D(4, 8, init="rand").state_dict()
    torch.manual_seed(3)
    b = S4D(4, 8, init="rand").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_errors():
    layer = S4D(4, 8)
    with pytest.raises(ValueError, match=r"u must be \(B, L, H\) with H = d_model = 4"):
        layer(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match=r"u must be \(B, L, H\)"):
        layer(torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((1, 5, 4), float("nan")))
    assert torch.isnan(S4D(4, 8, check_finite=False)(torch.full((1, 5, 4), float("nan")))).all()
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(1, 5, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"state must have shape \(2, 4, 4\)"):
        layer(torch.randn(2, 5, 4), state=torch.zeros(2, 4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex64"):
        layer.step(torch.randn(2, 4), torch.zeros(2, 4, 4, dtype=torch.complex128))
    with pytest.raises(ValueError, match="d_state=7"):
        S4D(4, 7)
    with pytest.raises(ValueError, match="dt_min"):
        DSS(4, 8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="init|name"):
        S4D(4, 8, init="legt")
    with pytest.raises(ValueError, match="L="):
        DSS(4, 8, variant="softmax").step(torch.randn(2, 4), torch.zeros(2, 4, 4, dtype=torch.complex64))


EVERY_LAYER = {"S4D": S4D, "DSS": DSS, "S4": S4, "S5": S5}


@pytest.mark.parametrize("who", list(EVERY_LAYER))
def test_every_layer_takes_L(who):
    """One interface: forward and step take `L=` (used by DSS-softmax only; S5 had refused it)."""
    layer = EVERY_LAYER[who](16, 8)
    u = torch.randn(2, 5, 16)
    assert_close(layer(u, L=5), layer(u))
    state = layer.default_state(2)
    assert_close(layer.step(u[:, 0], state, L=5)[0], layer.step(u[:, 0], state)[0])


@pytest.mark.parametrize("who", list(EVERY_LAYER))
def test_inputs_and_states_on_another_device_are_an_error(who):
    """A state on another device than the layer had reached the native kernels as a raw pointer (a meta
    tensor's is 0: S5 read it as no state, silently; a CUDA one would be read on the host)."""
    layer = EVERY_LAYER[who](16, 8)
    u, state = torch.randn(2, 5, 16), layer.default_state(2)
    with pytest.raises(ValueError, match="state is on meta but the layer's parameters are on cpu"):
        layer(u, state=state.to("meta"))
    with pytest.raises(ValueError, match="state is on meta but the layer's parameters are on cpu"):
        layer.step(u[:, 0], state.to("meta"))
    with pytest.raises(ValueError, match="u is on meta but the layer's parameters are on cpu"):
        layer(u.to("meta"))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")  # default_state in float16
@pytest.mark.parametrize("who", list(EVERY_LAYER))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_are_an_error_that_says_what_to_do(who, dtype):
    """model.half() or .bfloat16(): a clear error from forward and step (they had failed inside PyTorch's
    complex ops: "not implemented for 'ComplexHalf'", "Expected both inputs to be Half, Float or Double")."""
    layer = EVERY_LAYER[who](16, 8).to(dtype)
    want = f"{who} runs in float32 or float64 .* its parameters are {dtype}.*keep_ssm_float32"
    with pytest.raises(ValueError, match=want):
        layer(torch.randn(2, 10, 16, dtype=dtype))
    with pytest.raises(ValueError, match=want):
        layer.step(torch.randn(2, 16, dtype=dtype), layer.default_state(2))


@pytest.mark.parametrize("who", list(EVERY_LAYER))
@pytest.mark.parametrize("H", [16, 40])
def test_empty_sequences_are_an_error(who, H):
    """B = 0 or L = 0: a clear error from every layer (S4D, DSS and S5 had raised PyTorch's errors from
    inside their ops at B = 0), on the native and the padded paths alike."""
    layer = EVERY_LAYER[who](H, 8)
    with pytest.raises(ValueError, match="u has batch size B = 0; need B >= 1"):
        layer(torch.randn(0, 70, H))
    with pytest.raises(ValueError, match="u has length L = 0; need L >= 1"):
        layer(torch.randn(2, 0, H))


@pytest.mark.parametrize("who, name, value", [
    (who, name, value) for who in EVERY_LAYER for name, value in
    [("d_model", 0), ("d_model", -1), ("d_model", 2.5), ("d_model", True), ("channels", 0), ("channels", 1.0)]
    if not (who == "S5" and name == "channels")])  # S5 has one output per channel, no `channels`
def test_sizes_must_be_positive_ints(who, name, value):
    """Every layer names a size that is not an int >= 1 (S4D and DSS had accepted d_model = 0)."""
    kw = dict(d_model=4, d_state=8)
    kw[name] = value
    with pytest.raises(ValueError, match=re.escape(f"{who}: {name}={value!r} must be an int >= 1")):
        EVERY_LAYER[who](**kw)


FLAGS = {"S4D": ("bidirectional", "check_finite", "train_B"), "DSS": ("sep_dt", "bidirectional", "check_finite"),
         "S4": ("bidirectional", "check_finite"), "S5": ("conj_sym", "clip_eigs", "bidirectional", "check_finite")}


@pytest.mark.parametrize("who, name", [(who, name) for who, names in FLAGS.items() for name in names])
@pytest.mark.parametrize("value", [2, 0, "no", None, 1.0])
def test_flags_must_be_bools(who, name, value):
    """A flag that is not True or False is an error naming it: every layer had taken 'no' as true, and
    S4D and DSS with bidirectional=2 had returned twice the channels asked for."""
    with pytest.raises(ValueError, match=re.escape(f"{who}: {name}={value!r} must be True or False")):
        EVERY_LAYER[who](4, d_state=8, **{name: value})


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_return_state_must_be_a_bool(who):
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](4, d_state=8).double()
    u = randn(2, 5, 4, seed=3)
    for value in ("no", 1, None):
        with pytest.raises(ValueError, match=re.escape(f"{who}: return_state={value!r} must be True or False")):
            layer(u, return_state=value)


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_default_state_batch_size(who):
    """batch_size must be an int >= 0: -1 and 2.5 had failed inside torch.zeros with messages that named
    no argument. numpy's ints are taken."""
    layer = EVERY_LAYER[who](4, d_state=8)
    for value in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match=re.escape(f"{who}: batch_size={value!r} must be an int >= 0")):
            layer.default_state(value)
    assert torch.equal(layer.default_state(np.int64(3)), layer.default_state(3))
    assert layer.default_state(3).shape[0] == 3 and not layer.default_state(3).any()


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_flags_may_be_numpy_bools(who):
    """numpy's bools (from a config sweep, say) are taken as the Python bools they equal."""
    torch.manual_seed(0)
    a = EVERY_LAYER[who](4, d_state=8, bidirectional=np.bool_(True)).double()
    torch.manual_seed(0)
    b = EVERY_LAYER[who](4, d_state=8, bidirectional=True).double()
    assert a.bidirectional is True
    u = randn(2, 5, 4, seed=3)
    assert torch.equal(a(u), b(u))
    assert torch.equal(b(u, return_state=np.bool_(False)), b(u))


@pytest.mark.parametrize("who", EVERY_LAYER)
@pytest.mark.parametrize("rate", [0, -1.0, math.inf, math.nan, True, torch.tensor(2.0)])
def test_rate_must_be_a_positive_finite_number(who, rate):
    """A rate that is not a finite number > 0 is an error in the forward and the step of every layer
    (S4D, DSS and S5 had returned NaN for rate = nan or inf, and a growing or frozen state for -1 or 0)."""
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](4, d_state=8).double()
    u = randn(2, 5, 4, seed=3)
    with pytest.raises(ValueError, match=r"rate=.* is not allowed; expected a positive finite number"):
        layer(u, rate=rate)
    with pytest.raises(ValueError, match=r"rate=.* is not allowed; expected a positive finite number"):
        layer.step(u[:, 0], layer.default_state(2), rate=rate)


@pytest.mark.parametrize("who", ["S4D", "DSS", "S4"])
@pytest.mark.parametrize("L", [0, -1, 2.5, True])
def test_length_must_be_a_positive_int(who, L):
    """`L=` (the length the system is defined for) that is not an int >= 1 is an error in the forward
    and the step (DSS-softmax's step had run with L = 0, -1 or 2.5 and scaled its input by them)."""
    torch.manual_seed(0)
    kw = dict(variant="softmax") if who == "DSS" else {}
    layer = EVERY_LAYER[who](4, d_state=8, **kw).double()
    u = randn(2, 5, 4, seed=3)
    with pytest.raises(ValueError, match=re.escape(f"L={L!r} must be None or an int >= 1")):
        layer(u, L=L)
    with pytest.raises(ValueError, match=re.escape(f"L={L!r} must be None or an int >= 1")):
        layer.step(u[:, 0], layer.default_state(2), L=L)


@pytest.mark.parametrize("who", EVERY_LAYER)
@pytest.mark.parametrize("dt_min, dt_max", [(1e-3, math.inf), (math.nan, 0.1), (0.0, 0.1)])
def test_step_size_range_must_be_finite_and_positive(who, dt_min, dt_max):
    """dt_max = inf had made every layer's dt parameters infinite."""
    with pytest.raises(ValueError, match=r"must satisfy 0 < dt_min <= dt_max < inf"):
        EVERY_LAYER[who](4, d_state=8, dt_min=dt_min, dt_max=dt_max)


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_rate_may_be_a_numpy_number(who):
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](4, d_state=8).double()
    u = randn(2, 5, 4, seed=3)
    assert torch.equal(layer(u, rate=np.float32(2.0)), layer(u, rate=2.0))
    assert not torch.allclose(layer(u, rate=2.0), layer(u))


@pytest.mark.parametrize("who", ["S4D", "S5", "S4"])
@pytest.mark.parametrize("change", ["in place", "fused optimizer", "replaced", "data replaced", "data cleared"])
def test_step_system_cache_follows_parameter_updates(who, change):
    """Inference reuses the discretised system; an optimiser step (in-place update; a fused optimizer's
    bumps no version counter, and had left the old system in use), a parameter replaced by a new one
    or its `.data` by new storage (`vector_to_parameters`) refreshes it; an in-place change through
    `.data` (no version bump) after `clear_cache()`."""
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](4, 8).double()
    u_t, h = randn(2, 4, seed=13), random_state(layer, 2)
    with torch.no_grad():
        y1, _ = layer.step(u_t, h)
        assert torch.equal(layer.step(u_t, h)[0], y1)  # cached
        if change == "in place":
            layer.log_dt += 0.5  # as an optimiser does
        elif change == "fused optimizer":
            for p in layer.parameters():
                p.grad = torch.full_like(p, -0.5)
            torch.optim.SGD(layer.parameters(), lr=1.0, fused=True).step()
        elif change == "replaced":
            layer.log_dt = torch.nn.Parameter(layer.log_dt + 0.5)
        elif change == "data replaced":
            layer.log_dt.data = layer.log_dt.data + 0.5
        else:
            layer.log_dt.data.add_(0.5)
            layer.clear_cache()
        y2, _ = layer.step(u_t, h)
    with torch.enable_grad():
        y_ref, _ = layer.step(u_t, h)  # computed afresh
    assert not torch.allclose(y1, y2)
    assert_close(y2, y_ref)


def _softmax_pair(grow, seed=0):
    """A float32 DSS-softmax layer at dt in [0.05, 0.1] and its float64 twin (backend fft).
    `grow`: half the modes get Re Lambda = +0.3 (the variant leaves Lambda free)."""
    torch.manual_seed(seed)
    layer = DSS(4, 8, variant="softmax", dt_min=0.05, dt_max=0.1)
    if grow:
        with torch.no_grad():
            layer.Lambda_re[::2] = 0.3
    ref = DSS(4, 8, variant="softmax", backend="fft").double()
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def _grads(layer, u, w):
    u = u.clone().requires_grad_()
    y = layer(u)
    return [y, *torch.autograd.grad((y * w).sum(), [u, *layer.parameters()])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_float32_long_sequence_gradients(backend):
    """Decaying modes at L = 4096 in float32: exp(+|Re w| (L-1)) overflows (up to exp(205));
    it used to be computed for every mode and masked by torch.where, whose backward made every
    gradient NaN. Outputs and gradients against the float64 twin."""
    layer, ref = _softmax_pair(grow=False)
    layer.backend = backend
    u, w = randn(2, 4096, 4, seed=13), randn(2, 4096, 4, seed=14)
    got, want = _grads(layer, u.float(), w.float()), _grads(ref, u, w)
    assert layer.last_backend == backend
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        assert_close(g, r, scale=100)  # sums over 4096 steps


def test_softmax_growing_modes_leave_the_recurrent_form_past_float32s_range():
    """Re w (L-1) = 0.3 dt (L-1), up to 123 > 44 (half of float32's exponent range): B_bar =
    ... exp(-w (L-1)) underflows, so the chunked forward was silently wrong (off by up to 0.9 at
    the end) and its gradient overflows. "auto" takes the fft path, which is right; an explicit
    "chunked", `step` and states say why they cannot; float64 and short sequences still can."""
    layer, ref = _softmax_pair(grow=True)
    u, w = randn(2, 4096, 4, seed=15), randn(2, 4096, 4, seed=16)
    got, want = _grads(layer, u.float(), w.float()), _grads(ref, u, w)
    assert layer.last_backend == "fft"
    for g, r in zip(got, want):
        assert_close(g, r, scale=100)  # sums over 4096 steps
    with torch.no_grad():
        assert_close(layer(u.float()), want[0], scale=100)
    assert layer.last_backend == "fft"
    for call in (lambda: layer(u.float(), return_state=True),
                 lambda: layer.step(u[:, 0].float(), layer.default_state(2), L=4096)):
        with pytest.raises(ValueError, match="grows by exp\\(1[0-9][0-9]\\) over L=4096.*float64"):
            call()
    layer.backend = "chunked"
    with pytest.raises(ValueError, match="backend='fft'"):
        layer(u.float())
    short = layer(u[:, :100].float())  # growth 0.03 * 99 = 3: the chunked path is fine
    assert layer.last_backend == "chunked"
    assert_close(short, ref(u[:, :100]), scale=10)
    ref.backend = "chunked"  # float64 holds exp(123)
    assert_close(ref(u), want[0])


def test_initialisations_follow_the_reference_code():
    """Draws the papers' code makes: DSS's two step sizes start equal (`log_dt.tile(2)`), Re W and
    Im W are each standard normal (`randn(..., 2)`), S4D-Rand's frequencies are drawn per channel."""
    torch.manual_seed(0)
    dss = DSS(256, 128)
    assert dss.log_dt.shape == (2, 256) and torch.equal(dss.log_dt[0], dss.log_dt[1])
    assert float(dss.log_dt.detach().std()) > 0.5  # still log-uniform across channels
    W = dss.W.detach()  # (C', H, M, 2): 16,384 draws of each part
    for part in W.unbind(-1):
        assert abs(float(part.std()) - 1) < 0.03 and abs(float(part.mean())) < 0.03
    assert DSS(4, 8, sep_dt=False).log_dt.shape == (4,)
    apart = DSS(256, 8, sep_dt_init="independent").log_dt.detach()  # the earlier draw, kept for the ablation
    assert apart.shape == (2, 256) and not torch.any(apart[0] == apart[1])
    with pytest.raises(ValueError, match="sep_dt_init='independent'.* needs sep_dt=True"):
        DSS(4, 8, sep_dt=False, sep_dt_init="independent")
    with pytest.raises(ValueError, match="sep_dt_init='apart'; allowed"):
        DSS(4, 8, sep_dt_init="apart")
    N = 16
    A = S4D(64, N, init="rand").A().detach()  # (H, M)
    assert torch.all(A.real == -0.5)
    assert torch.all((A.imag >= 0) & (A.imag < math.pi * N / 2))
    assert len({tuple(row.tolist()) for row in A.imag}) == 64  # no two channels share their frequencies
    legs = S4D(4, N).A().detach()
    assert torch.equal(legs, legs[:1].expand_as(legs))  # the deterministic inits are the same in every channel


def test_relu_transform_keeps_re_a_below_zero():
    layer = S4D(4, 8, init="lin", real_transform="relu")
    assert_close(layer.A().real.detach(), torch.full((4, 4), -0.5 - 1e-4), dtype=torch.float32)
    with torch.no_grad():
        layer.neg_A_real.fill_(-3.0)  # pushed past zero by training
    assert torch.all(layer.A().real == -1e-4)


def test_step_system_cache_follows_buffers():
    """S4D with train_B=False keeps B as a buffer: changing it refreshes the cached system."""
    torch.manual_seed(0)
    layer = S4D(4, 8, train_B=False).double()
    u_t, h = randn(2, 4, seed=13), random_state(layer, 2)
    with torch.no_grad():
        y1, _ = layer.step(u_t, h)
        layer.B.mul_(2.0)
        y2, _ = layer.step(u_t, h)
    with torch.enable_grad():
        y_ref, _ = layer.step(u_t, h)  # computed afresh
    assert not torch.allclose(y1, y2)
    assert_close(y2, y_ref)


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_layers_save_and_copy_after_inference(who, tmp_path):
    """After steps under no_grad (which cache the system): torch.save of the whole layer works (the
    cache held complex views of real parameters and failed it), and a deepcopy steps with its own
    parameters."""
    import copy
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](4, 8).double()
    u_t, h = randn(2, 4, seed=13), random_state(layer, 2)
    with torch.no_grad():
        y1, _ = layer.step(u_t, h)
        twin = copy.deepcopy(layer)
        twin.log_dt.data = twin.log_dt.data + 0.5  # new storage, as vector_to_parameters
        y_twin, _ = twin.step(u_t, h)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.step(u_t, h)[0], y1)
    with torch.enable_grad():
        assert_close(y_twin, twin.step(u_t, h)[0])
    assert not torch.allclose(y_twin, y1)


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_layer_made_under_inference_mode_steps(who):
    """Parameters made under torch.inference_mode have no version counter; step then builds its
    system each call (it raised 'Inference tensors do not track version counter')."""
    def stepped(layer, u):
        h, steps = layer.default_state(2), []
        for u_t in u.unbind(1):
            y_t, h = layer.step(u_t, h)
            steps.append(y_t)
        return torch.stack(steps, 1)

    torch.manual_seed(0)
    with torch.inference_mode():
        layer = EVERY_LAYER[who](4, 8).double()
        u = randn(2, 6, 4, seed=14)
        assert_close(stepped(layer, u), layer(u))
        layer.log_dt.add_(0.5)  # no version bump under inference mode: must not be served stale
        assert_close(stepped(layer, u), layer(u))


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_a_lazily_conjugated_state(who):
    """state.conj() is a view with a conjugate bit: the float32 native path had failed on it
    ("view_as_real doesn't work on unresolved conjugated tensors")."""
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](32, 16)
    u = torch.randn(2, 70, 32)
    s = torch.randn_like(layer.default_state(2))
    y, h = layer(u, state=s.conj(), return_state=True)
    y_ref, h_ref = layer(u, state=s.conj().resolve_conj(), return_state=True)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    with torch.no_grad():
        assert torch.equal(layer.step(u[:, 0], s.conj())[0], layer.step(u[:, 0], s.conj().resolve_conj())[0])


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_a_backend_set_after_construction_is_checked(who):
    """layer.backend = "Chunked" (a typo) had silently run fft and reported "Chunked"; S5's mode alike."""
    layer = EVERY_LAYER[who](4, 8)
    u = torch.randn(2, 5, 4)
    attr, allowed = (("mode", r"\('scan', 'conv', 'auto'\)") if who == "S5"
                     else ("backend", r"\('auto', 'fft', 'chunked'\)"))
    setattr(layer, attr, "Chunked")
    with pytest.raises(ValueError, match=rf"{who}: {attr}='Chunked'.*allowed: {allowed}"):
        layer(u)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16, torch.complex64])
def test_an_input_of_a_dtype_no_layer_takes(dtype):
    """An int, half or complex input had been told to convert the layer to its dtype (layer.to(torch.int64)),
    which is no fix; half inputs under autocast are pointed to keep_ssm_float32."""
    layer = S4D(4, 8)
    u = torch.ones(1, 5, 4).to(dtype)
    want = rf"u has dtype {dtype}; the layer takes real float32 or float64 inputs .*u.to\(torch.float32\)"
    with pytest.raises(ValueError, match=want + (".*keep_ssm_float32" if dtype == torch.bfloat16 else "")) as e:
        layer(u)
    assert "layer.to" not in str(e.value)


@pytest.mark.parametrize("who", EVERY_LAYER)
def test_second_derivatives_where_the_readme_says(who):
    """README: the fft backend (S4D, DSS, S4) and S5's PyTorch scan differentiate twice (gradient
    penalties, Hessian-vector products), float64 here."""
    torch.manual_seed(0)
    layer = EVERY_LAYER[who](3, 4, **({} if who == "S5" else {"backend": "fft"})).double()
    u = randn(1, 6, 3, seed=21).requires_grad_()
    assert torch.autograd.gradgradcheck(layer, (u,))
