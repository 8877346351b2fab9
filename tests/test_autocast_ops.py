"""The hand-written backwards run in float32 when the backward pass is called inside torch.autocast.

PyTorch runs a backward pass under its caller's autocast state (on the CPU, `loss.backward()` inside
an autocast block casts the backward's matmuls to bfloat16). The library's ops ran their forwards in
float32 (the layers turn autocast off around themselves), and their backwards
(`chunked_native.without_autocast`) stay in float32 too: the same gradients as outside autocast."""
import pytest
import torch

from diagssm.ops.cauchy import cauchy
from diagssm.ops.chunked import diagonal_chunked
from diagssm.ops.chunked_dense import dense_chunked
from diagssm.ops.s5_native import s5_fused
from diagssm.ops.scan import scan
from helpers import assert_close, randn
from test_double_backward import diagonal_args, diagonal_op, lower, needs_native, _dot
from test_chunked_dense import system as dense_system
from test_s5_native import problem as s5_problem


def _scan_args():
    g = torch.Generator().manual_seed(3)
    a = torch.polar(0.5 + 0.45 * torch.rand(6, generator=g, dtype=torch.float64),
                    3 * torch.rand(6, generator=g, dtype=torch.float64))
    return [a, randn(3, 40, 6, dtype=torch.complex128, seed=4), randn(3, 6, dtype=torch.complex128, seed=5)]


CASES = {  # name: (the op, its float64 arguments); dense_chunked is left out: its graph also holds built-in
    # ops (the powers of A, the Toeplitz blocks), whose backwards PyTorch runs under the caller's autocast
    "diagonal_chunked-native": (diagonal_op(diagonal_chunked, 8, native=True), diagonal_args),
    "diagonal_chunked-pytorch": (diagonal_op(diagonal_chunked, 8, native=False), diagonal_args),
    "scan": (lambda *x: (scan(*x),), _scan_args),
    "s5_fused": (s5_fused, lambda: s5_problem(2, 40, 16, 8, True)),
    "cauchy": (lambda *x: (cauchy(*x),),
               lambda: [randn(3, 2, 4, dtype=torch.complex128, seed=1), randn(9, dtype=torch.complex128, seed=2),
                        randn(2, 4, dtype=torch.complex128, seed=3)]),
}
NATIVE = {"diagonal_chunked-native", "s5_fused"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_native) if n in NATIVE else n for n in CASES])
def test_backward_inside_autocast_is_float32(name):
    """Before, the PyTorch chunked path's backward ran its matmuls in bfloat16 there."""
    fn, make_args = CASES[name]
    xs = [None if t is None else lower(t.detach()).requires_grad_() for t in make_args()]
    leaves = [x for x in xs if x is not None]
    loss = _dot(fn(*xs), 7)  # the forward outside autocast, as the layers run it
    want = torch.autograd.grad(loss, leaves, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(loss, leaves)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w)


FORWARDS = {
    "dense_chunked-native": (lambda *a: dense_chunked(*a, chunk=8, native=True), lambda: dense_system(H=16, n=8, L=37)),
    "dense_chunked-pytorch": (lambda *a: dense_chunked(*a, chunk=8, native=False),
                              lambda: dense_system(H=16, n=8, L=37)),
    "diagonal_chunked-pytorch": (diagonal_op(diagonal_chunked, 8, native=False), diagonal_args),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_native) if "native" in n.split("-")[1:] else n
                                  for n in FORWARDS])
def test_the_chunked_ops_compute_in_their_inputs_precision_under_autocast(name):
    """Called directly under autocast, dense_chunked's matrix powers had come out bfloat16: refused by
    the pointer check on the native path (as a diagssm bug), bfloat16 outputs (0.09 off) on the other."""
    fn, make_args = FORWARDS[name]
    xs = [None if t is None else lower(t.detach()) for t in make_args()]
    want = fn(*xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*xs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w)
