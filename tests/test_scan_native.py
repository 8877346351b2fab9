"""ops.scan on its native kernel (a constant A_bar, complex64, CPU) against scan_ref, its reference
twin, in complex128; and the PyTorch scan where the kernel cannot run."""
import logging

import pytest
import torch

from diagssm.ops import chunked_native
from diagssm.ops.scan import scan, scan_ref
from helpers import assert_close, randn

C64, C128 = torch.complex64, torch.complex128
needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


def decaying(P, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.polar(0.5 + 0.49 * torch.rand(P, generator=g, dtype=torch.float64),
                       torch.randn(P, generator=g, dtype=torch.float64))  # |a| < 1, complex128


def grads(A_bar, Bu, h0, g, reverse, fn):
    leaves = [t.clone().requires_grad_() for t in (A_bar, Bu) + ((h0,) if h0 is not None else ())]
    h = fn(leaves[0], leaves[1], leaves[2] if h0 is not None else None, reverse=reverse)
    return h, torch.autograd.grad(h, leaves, g)


@needs_native
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("B,L,P", [(2, 1, 4), (3, 57, 8), (2, 700, 32)])
def test_matches_the_reference(reverse, with_h0, B, L, P):
    a, Bu = decaying(P, seed=L), randn(B, L, P, dtype=C128, seed=1)
    h0 = randn(B, P, dtype=C128, seed=2) if with_h0 else None
    g = randn(B, L, P, dtype=C128, seed=3)
    h, got = grads(a.to(C64), Bu.to(C64), None if h0 is None else h0.to(C64), g.to(C64), reverse, scan)
    assert type(h.grad_fn).__name__ == "_NativeScanBackward"
    want_h, want = grads(a, Bu, h0, g, reverse, scan_ref)
    assert_close(h, want_h, scale=10)
    for x, y in zip(got, want):  # sums over up to B L steps
        assert_close(x, y, scale=100)


@needs_native
@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
def test_one_a_bar_for_every_mode(shape):
    """An A_bar of one number broadcast over the P modes: the kernel read P numbers from a buffer of one
    (garbage or -inf in modes 1 .. P-1, a NaN gradient)."""
    a = decaying(1, seed=5).reshape(shape)
    Bu, g = randn(2, 9, 8, dtype=C128, seed=6), randn(2, 9, 8, dtype=C128, seed=7)
    h, got = grads(a.to(C64), Bu.to(C64), None, g.to(C64), False, scan)
    assert type(h.grad_fn).__name__ != "_ScanBackward"  # the native kernel (through an expand)
    want_h, want = grads(a, Bu, None, g, False, scan_ref)
    assert got[0].shape == shape
    assert_close(h, want_h, scale=10)
    for x, y in zip(got, want):
        assert_close(x, y, scale=100)


@needs_native
def test_lazily_negated_inputs():
    """A tensor with PyTorch's negative bit (a lazy -x, e.g. z.conj().imag) holds x in memory; the kernels
    read memory, so it must be resolved first (it had given +x)."""
    a, Bu, h0 = decaying(8, seed=8).to(C64), randn(2, 9, 8, dtype=C64, seed=9), randn(2, 8, dtype=C64, seed=10)
    neg = torch._neg_view(Bu)
    assert neg.is_neg() and neg.is_contiguous()
    assert_close(scan(a, neg, torch._neg_view(h0)), scan_ref(a, -Bu, -h0))


@pytest.mark.parametrize("case", ["time-varying", "complex128", "broadcast h0"])
def test_the_pytorch_scan_where_the_kernel_cannot_run(case):
    B, L, P = 2, 40, 4
    a = decaying(P, seed=4)
    a = a.expand(L, P) * torch.linspace(0.9, 1.0, L, dtype=torch.float64)[:, None] if case == "time-varying" else a
    dt = C128 if case == "complex128" else C64
    Bu = randn(B, L, P, dtype=dt, seed=5).requires_grad_()
    h0 = randn(P, dtype=dt, seed=6) if case == "broadcast h0" else None
    h = scan(a.to(dt), Bu, h0)
    assert type(h.grad_fn).__name__ == "_ScanBackward"
    assert_close(h, scan_ref(a.to(C128), Bu.detach().to(C128), None if h0 is None else h0.to(C128)), scale=10)


@needs_native
def test_logs_which_scan_runs(monkeypatch, caplog):
    monkeypatch.setattr(chunked_native, "_paths", {})
    Bu = randn(2, 20, 4, dtype=C64, seed=9)
    with caplog.at_level(logging.INFO, logger="diagssm.ops.scan"):
        scan(decaying(4, seed=10).to(C64), Bu)
        scan(decaying(4, seed=10).to(C64), Bu)  # the same path: logged once
        scan(decaying(4, seed=10).to(C128), Bu.to(C128))
    assert [r.getMessage() for r in caplog.records] == [
        "scan: native kernel", "scan: PyTorch loop (complex64 on the CPU only (got torch.complex128 on cpu))"]
    assert chunked_native.paths() == {chunked_native.SCAN: "complex64 on the CPU only (got torch.complex128 on cpu)"}
