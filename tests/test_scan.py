"""ops.scan (chunked, custom backward) against ops.scan_ref (a loop over L), plus its contract."""
import math
import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from diagssm.ops import scan, scan_ref
from helpers import assert_close

F64, C128, F32, C64 = torch.float64, torch.complex128, torch.float32, torch.complex64

# A_bar layouts: (shape of A_bar given B, L, P; A_bar complex?; Bu complex?)
KINDS = {
    "P_complex": (lambda B, L, P: (P,), True, True),
    "P_real": (lambda B, L, P: (P,), False, False),
    "P_real_Bu_complex": (lambda B, L, P: (P,), False, True),  # promotion; real grad for A_bar
    "LP_real": (lambda B, L, P: (L, P), False, False),
    "BLP_complex": (lambda B, L, P: (B, L, P), True, True),
}


def make_inputs(kind, B, L, P, double=True, seed=0):
    """Seeded A_bar with 0.5 <= |A_bar| <= 0.95 (random phase or sign), Bu and h0 ~ N(0, 1)."""
    shape_fn, a_complex, b_complex = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    real, cplx = (F64, C128) if double else (F32, C64)
    mag = 0.5 + 0.45 * torch.rand(shape_fn(B, L, P), generator=g, dtype=F64)
    phase = 2 * math.pi * torch.rand(mag.shape, generator=g, dtype=F64)
    A = torch.polar(mag, phase).to(cplx) if a_complex else (mag * torch.cos(phase).sign()).to(real)
    dt = cplx if b_complex else real
    Bu = torch.randn(B, L, P, generator=g, dtype=F64 if dt == real else C128).to(dt)
    h0 = torch.randn(B, P, generator=g, dtype=Bu.dtype)
    return A, Bu, h0


def run_with_grads(fn, A, Bu, h0, reverse, seed=1):
    """h = fn(A, Bu, h0) and the grads of <g, h> (PyTorch's convention) for a fixed random g."""
    inputs = [x.detach().clone().requires_grad_() for x in (A, Bu) + (() if h0 is None else (h0,))]
    h = fn(*inputs[:2], inputs[2] if h0 is not None else None, reverse=reverse)
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=C128)  # (B, L, P)
    g = g.to(h.dtype) if h.is_complex() else g.real.to(h.dtype)  # the same draw at every dtype
    return h, torch.autograd.grad(h, inputs, g)


@pytest.mark.parametrize("L", [1, 3, 17, 64, 1000])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_ref(L, kind, with_h0, reverse):
    B, P = (2, 3) if L == 1000 else (3, 4)
    A, Bu, h0 = make_inputs(kind, B, L, P)
    h0 = h0 if with_h0 else None
    h, grads = run_with_grads(scan, A, Bu, h0, reverse)
    h_ref, grads_ref = run_with_grads(scan_ref, A, Bu, h0, reverse)
    assert h.shape == (B, L, P) and h.dtype == h_ref.dtype
    assert_close(h, h_ref)
    for x, gr, gr_ref in zip((A, Bu, h0), grads, grads_ref):
        assert gr.dtype == x.dtype and gr.shape == x.shape
        assert_close(gr, gr_ref, dtype=F64)


def test_scan_small_case_by_hand():
    # h = [1, 0.5 * 1 + 2, 0.5 * 2.5 + 3] from h0 = 0; reverse: [1 + 0.5 * 3.5, 2 + 0.5 * 3, 3]
    A = torch.tensor([0.5], dtype=F64)
    Bu = torch.tensor([1.0, 2.0, 3.0], dtype=F64).reshape(1, 3, 1)
    assert_close(scan(A, Bu).flatten(), torch.tensor([1.0, 2.5, 4.25], dtype=F64))
    assert_close(scan(A, Bu, reverse=True).flatten(), torch.tensor([2.75, 3.5, 3.0], dtype=F64))
    h0 = torch.tensor([[4.0]], dtype=F64)  # enters the first step: 0.5 * 4 + 1 = 3
    assert_close(scan(A, Bu, h0).flatten(), torch.tensor([3.0, 3.5, 4.75], dtype=F64))


def test_scan_zero_and_growing_A_bar():
    # A_bar = 0 must give h = Bu exactly (no log/division); |A_bar| > 1 must still match the loop
    B, L, P = 2, 37, 3
    A = torch.tensor([0.0, 1.05, -1.02], dtype=F64)
    _, Bu, h0 = make_inputs("P_real", B, L, P)
    h = scan(A, Bu, h0)
    assert torch.equal(h[..., 0], Bu[..., 0])
    assert_close(h, scan_ref(A, Bu, h0))
    A_tv = torch.zeros(B, L, P, dtype=C128) + 0.9j  # time-varying with zero steps
    A_tv[:, ::5] = 0
    assert_close(scan(A_tv, Bu.to(C128), h0), scan_ref(A_tv, Bu.to(C128), h0))


@pytest.mark.parametrize("kind", ["P_complex", "BLP_complex", "LP_real"])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_float32_matches_float64_ref(kind, reverse):
    B, L, P = 2, 1000, 4
    A, Bu, h0 = make_inputs(kind, B, L, P, double=False)
    h, grads = run_with_grads(scan, A, Bu, h0, reverse)
    assert h.dtype == Bu.dtype and all(g.dtype == x.dtype for g, x in zip(grads, (A, Bu, h0)))
    h_ref, grads_ref = run_with_grads(scan_ref, *(x.to(torch.promote_types(x.dtype, F64))
                                                  for x in (A, Bu, h0)), reverse)
    # no widening needed: the chunked sums stay within float32's own tolerance (measured: the
    # worst element uses 2% of it), even for A_bar's grad that sums B * L = 2000 terms
    assert_close(h, h_ref, dtype=F32)
    for gr, gr_ref in zip(grads, grads_ref):
        assert_close(gr, gr_ref, dtype=F32)


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck(dtype, time_varying, reverse):
    B, L, P = 2, 10, 3  # L = 10: chunks of T = 4 (n = 2) plus a 2-step remainder
    g = torch.Generator().manual_seed(3)
    A = 0.8 * torch.randn((B, L, P) if time_varying else (P,), generator=g, dtype=dtype)
    Bu = torch.randn(B, L, P, generator=g, dtype=dtype)
    h0 = torch.randn(B, P, generator=g, dtype=dtype)
    inputs = tuple(x.requires_grad_() for x in (A, Bu, h0))

    def f(A, Bu, h0):
        return scan(A, Bu, h0, reverse=reverse)

    assert gradcheck(f, inputs)
    if time_varying and not reverse:  # the backward is built from differentiable scans
        assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("kind", ["P_complex", "BLP_complex"])
@pytest.mark.parametrize("t", [1, 5, 16])
def test_scan_split_continues_from_state(kind, t):
    B, L, P = 2, 33, 3
    A, Bu, h0 = make_inputs(kind, B, L, P)
    A1, A2 = (A[:, :t], A[:, t:]) if A.dim() == 3 else (A, A)
    h = scan(A, Bu, h0)
    h1 = scan(A1, Bu[:, :t], h0)
    h2 = scan(A2, Bu[:, t:], h1[:, -1])
    assert_close(torch.cat([h1, h2], dim=1), h)
    # reverse: run the tail first, then the head starting from the tail's first state
    h = scan(A, Bu, h0, reverse=True)
    h2 = scan(A2, Bu[:, t:], h0, reverse=True)
    h1 = scan(A1, Bu[:, :t], h2[:, 0], reverse=True)
    assert_close(torch.cat([h1, h2], dim=1), h)


def test_scan_dtype_promotion():
    B, L, P = 2, 5, 3
    Bu = torch.randn(B, L, P, dtype=F32)
    assert scan(torch.full((P,), 0.5), Bu).dtype == F32
    assert scan(torch.full((P,), 0.5, dtype=C64), Bu).dtype == C64
    assert scan(torch.full((P,), 0.5, dtype=F64), Bu).dtype == F64
    A = torch.full((P,), 0.5, requires_grad=True)
    scan(A, Bu.to(C64)).abs().sum().backward()
    assert A.grad.dtype == F32


@pytest.mark.parametrize("args, match", [
    ((torch.ones(3), torch.ones(4, 3)), "Bu must have shape"),
    ((torch.ones(3), torch.ones(2, 0, 3)), "Bu must have B, L, P >= 1"),
    ((torch.ones(4), torch.ones(2, 5, 3)), "A_bar must be broadcastable"),
    ((torch.ones(6, 3), torch.ones(2, 5, 3)), r"got shape \(6, 3\)"),
    ((torch.ones(1, 2, 5, 3), torch.ones(2, 5, 3)), "A_bar must be broadcastable"),
    ((torch.ones(3), torch.ones(2, 5, 3), torch.ones(3, 3)), "h0 must have shape"),
    ((torch.ones(3, dtype=torch.int64), torch.ones(2, 5, 3)), "A_bar must be a floating"),
])
def test_scan_errors(args, match):
    for fn in (scan, scan_ref):
        with pytest.raises(ValueError, match=match):
            fn(*args)


@pytest.mark.parametrize("args", [
    (torch.full((3,), 0.5, dtype=C64, device="meta"), torch.ones(2, 5, 3, dtype=C64)),
    (torch.full((3,), 0.5, dtype=C64), torch.ones(2, 5, 3, dtype=C64), torch.ones(2, 3, dtype=C64, device="meta")),
])
def test_scan_on_two_devices_is_an_error(args):
    """The native kernel had read a meta A_bar's pointer (0): a segfault; a meta h0 was read as none."""
    with pytest.raises(ValueError, match="scan: A_bar, Bu and h0 must be on one device"):
        scan(*args)


@pytest.mark.parametrize("reverse", [1, "no", None])
def test_scan_reverse_must_be_a_bool(reverse):
    """reverse='no' had failed inside int() with a message that named nothing; 1 had passed as True."""
    for fn in (scan, scan_ref):
        with pytest.raises(ValueError, match=re.escape(f"scan: reverse must be True or False, got {reverse!r}")):
            fn(torch.full((3,), 0.5), torch.ones(2, 5, 3), reverse=reverse)
