"""Second derivatives (create_graph=True: gradient penalties, Hessian-vector products) through every op
whose backward is hand-written, against the same through its reference twin in float64.

Their fast backwards are not differentiable (native kernels, out= buffers); under create_graph they
run the forward again as plain PyTorch ops (`chunked_native.grads_by_twin`) or use differentiable
formulas (the native scan). `once_differentiable` had returned gradients with no graph back to the
inputs: a second derivative through them silently lacked every term through the op."""
import sys

import pytest
import torch

from diagssm.layers import DSS, S4, S4D, S5
from diagssm.ops import chunked_native
from diagssm.ops.cauchy import cauchy, cauchy_ref
from diagssm.ops.chunked import diagonal_chunked, diagonal_chunked_ref
from diagssm.ops.chunked_dense import dense_chunked, dense_chunked_ref
from diagssm.ops.s5_native import s5_fused, s5_fused_ref
from diagssm.ops.scan import scan, scan_ref
from helpers import assert_close, randn
from test_chunked_dense import system as dense_system
from test_chunked_native import system as diagonal_system
from test_s5_native import problem as s5_problem

needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


def lower(t):
    """float64 / complex128 -> float32 / complex64 (None stays None)."""
    return None if t is None else t.to(torch.complex64 if t.is_complex() else torch.float32)


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _dot(ts, seed):
    """sum_i <t_i, w_i> with fixed random float64 weights w_i (a real number for complex t_i too)."""
    return sum((_real(t) * randn(*_real(t).shape, seed=seed + i).to(_real(t).dtype)).sum()
               for i, t in enumerate(ts) if t is not None)


def second_derivatives(fn, inputs, seed=20):
    """g = d<fn(x), w>/dx with create_graph, then d<g, v>/dx: every input's second derivative (a
    Hessian-vector product), for fixed random w and v. None inputs are passed as None."""
    xs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    leaves = [x for x in xs if x is not None]
    g = torch.autograd.grad(_dot(fn(*xs), seed), leaves, create_graph=True)
    return torch.autograd.grad(_dot(g, seed + 100), leaves)


def compare(fast, ref, inputs, to=lower, scale=1.0):
    """The second derivatives of `fast` on the inputs converted by `to` against `ref`'s in float64."""
    want = second_derivatives(ref, inputs)
    got = second_derivatives(fast, [None if t is None else to(t) for t in inputs])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert w.abs().max() > 0  # every input has a second derivative to compare
        assert_close(g, w, scale=scale)


def diagonal_args(B=2, L=50, H=16, M=4, Cp=2):
    p = diagonal_system(H, M, Cp=Cp)
    return [randn(B, L, H, seed=5), p["w"], p["B_bar"], p["C"], randn(B, H, M, dtype=torch.complex128, seed=6),
            p["D"]]


def diagonal_op(op, chunk, **kw):
    return lambda u, w, B_bar, C, h0, D: op(u, w, B_bar, C, 2, h0, chunk=chunk, D=D, **kw)


@pytest.mark.parametrize("native", [
    pytest.param(True, marks=needs_native, id="native"),
    pytest.param(False, id="pytorch")])
def test_diagonal_chunked(native):
    """Chunks of 8 over L = 50 (a last chunk of 2 steps), an initial state, two output channels, D."""
    compare(diagonal_op(diagonal_chunked, 8, native=native), diagonal_op(diagonal_chunked_ref, 8),
            diagonal_args(), scale=10)


def test_diagonal_chunked_float64():
    """The PyTorch path in float64 (the out= buffers of `_Chunked`'s backward had raised)."""
    compare(diagonal_op(diagonal_chunked, 8), diagonal_op(diagonal_chunked_ref, 8), diagonal_args(),
            to=lambda t: t)


@pytest.mark.parametrize("native", [
    pytest.param(True, marks=needs_native, id="native"),
    pytest.param(False, id="pytorch")])
def test_dense_chunked(native):
    args = [None if t is None else t.detach() for t in dense_system(H=16, n=8, L=37)]
    compare(lambda *a: dense_chunked(*a, chunk=8, native=native), dense_chunked_ref, args, scale=10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("h0", [True, False])
def test_scan(reverse, h0):
    """A constant A_bar in complex64: the native kernel where it is built, else `_Scan`."""
    g = torch.Generator().manual_seed(3)
    a = torch.polar(0.5 + 0.45 * torch.rand(6, generator=g, dtype=torch.float64),
                    3 * torch.rand(6, generator=g, dtype=torch.float64))
    inputs = [a, randn(3, 40, 6, dtype=torch.complex128, seed=4),
              randn(3, 6, dtype=torch.complex128, seed=5) if h0 else None]
    chunked_native.paths(forget=True)
    compare(lambda *x: (scan(*x, reverse=reverse),), lambda *x: (scan_ref(*x, reverse=reverse),), inputs, scale=10)
    assert chunked_native.paths()[chunked_native.SCAN] == chunked_native.why_unavailable()  # '' where built


@needs_native
@pytest.mark.parametrize("h0", [True, False])
def test_s5_fused(h0):
    compare(s5_fused, s5_fused_ref, s5_problem(2, 40, 16, 8, h0), scale=10)


@needs_native
def test_s5_fused_with_one_tensor_for_two_arguments():
    """W_in and W_out tied (one tensor passed twice): under create_graph even the first-order gradient
    had come out twice as large (each place got the sum, and autograd added them)."""
    u, W, a, _, D, _ = s5_problem(2, 20, 16, 8, False)
    compare(lambda u, W, a, D: s5_fused(u, W, a, W, D), lambda u, W, a, D: s5_fused_ref(u, W, a, W, D),
            [u, W, a, D], scale=10)
    xs = [lower(t).requires_grad_() for t in (u, W, a, D)]
    loss = _dot(s5_fused(xs[0], xs[1], xs[2], xs[1], xs[3]), 30)
    plain, graphed = torch.autograd.grad(loss, xs, retain_graph=True), torch.autograd.grad(loss, xs, create_graph=True)
    for p, g in zip(plain, graphed):
        assert_close(g, p)


def test_cauchy(monkeypatch):
    """In chunks of z (CHUNK_ELEMENTS made small), v batched beyond w."""
    monkeypatch.setattr(sys.modules["diagssm.ops.cauchy"], "CHUNK_ELEMENTS", 12)
    inputs = [randn(3, 2, 4, dtype=torch.complex128, seed=1), randn(9, dtype=torch.complex128, seed=2),
              randn(2, 4, dtype=torch.complex128, seed=3)]
    compare(lambda *x: (cauchy(*x),), lambda *x: (cauchy_ref(*x),), inputs, to=lambda t: t)


LAYERS = {"s4d": lambda: S4D(16, 16), "dss": lambda: DSS(16, 16), "s4": lambda: S4(16, 16),
          "s5": lambda: S5(16, 16, mode="scan")}


@pytest.mark.parametrize("name", LAYERS)
def test_gradient_penalty_through_a_layer(name):
    """A gradient penalty |d loss / d u|^2 behind a residual and a linear map, its gradient in the
    parameters: each layer on its default float32 CPU path (the native kernels where built) against
    the same layer in float64 on its plain-PyTorch path (`fft`; S5's convolution). On the native
    kernels the penalty's gradient had silently lacked every term through the SSM (no error: the
    residual path still reached the parameters of the linear map)."""
    torch.manual_seed(0)
    layer, lin = LAYERS[name](), torch.nn.Linear(16, 16)
    u = randn(4, 70, 16, seed=1)

    def penalty_grads(layer, lin, u):
        u = u.clone().requires_grad_()
        out = lin(layer(u)[0] + u)
        (gu,) = torch.autograd.grad((out * torch.sin(out)).sum(), u, create_graph=True)
        return torch.autograd.grad(gu.square().sum(), list(layer.parameters()) + list(lin.parameters()))

    got = penalty_grads(layer, lin, lower(u))
    ref_layer, ref_lin = LAYERS[name]().double(), torch.nn.Linear(16, 16).double()
    ref_layer.load_state_dict(layer.state_dict())
    ref_lin.load_state_dict(lin.state_dict())
    if name == "s5":
        ref_layer.mode = "conv"
    else:
        ref_layer.backend = "fft"
    want = penalty_grads(ref_layer, ref_lin, u)
    for g, w in zip(got, want):
        assert_close(g, w, scale=50)  # the worst measured: 7.3 (sums over B L steps through two maps)
