"""ops.s5_native: the fused S5 op against its reference twin (float64), the S5 layer on it against
the layer's PyTorch composition and the float64 layer, and its fallbacks."""
import logging

import pytest
import torch

from diagssm.layers import S5
from diagssm.ops import chunked_native, s5_native
from diagssm.ops.s5_native import s5_fused, s5_fused_ref
from helpers import assert_close, randn

F32, C64, C128 = torch.float32, torch.complex64, torch.complex128
needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


def problem(B, L, H, P, with_h0, seed=0):
    """float64 inputs (u, W_in, a, W_out, D, h0) with |a| < 1."""
    g = torch.Generator().manual_seed(seed)
    a = torch.polar(0.45 + 0.5 * torch.rand(P, generator=g, dtype=torch.float64),
                    3 * torch.rand(P, generator=g, dtype=torch.float64))
    return (randn(B, L, H, seed=seed + 1), randn(H, 2 * P, seed=seed + 2) / H ** 0.5, a,
            randn(H, 2 * P, seed=seed + 3) / P ** 0.5, randn(H, seed=seed + 4),
            randn(B, P, dtype=C128, seed=seed + 5) if with_h0 else None)


def run(fn, inputs, gy, g_last):
    """Outputs and the gradients of every input of sum(y gy) + Re<last, g_last>."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    y, last = fn(*leaves)
    loss = (y * gy).sum() + (0 if g_last is None else (last * g_last.conj()).real.sum())
    return [y, last] + list(torch.autograd.grad(loss, [t for t in leaves if t is not None]))


def lower(t):
    return None if t is None else t.to(C64 if t.is_complex() else F32)


def ran_fused(y, depth=3):
    """Whether the autograd graph of y reaches S5FusedBackward within `depth` nodes (the padded op
    slices its outputs)."""
    fns = [y.grad_fn]
    for _ in range(depth):
        if any(type(f).__name__ == "S5FusedBackward" for f in fns):
            return True
        fns = [g for f in fns if f is not None for g, _ in f.next_functions]
    return False


@needs_native
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_g_last", [False, True])
@pytest.mark.parametrize("B,L,H,P", [(1, 1, 16, 8), (2, 7, 16, 8), (3, 130, 32, 32), (2, 200, 48, 24)])
def test_matches_the_reference(with_h0, with_g_last, B, L, H, P):
    """Several time blocks (TB = 64) and a partial last one, L < TB, P2 = 48 (a 16-column tile
    after the 64-column ones), with and without h0 and a gradient of the final state."""
    inputs = problem(B, L, H, P, with_h0, seed=L)
    gy = randn(B, L, H, seed=11)
    g_last = randn(B, P, dtype=C128, seed=12) if with_g_last else None
    got = run(s5_fused, [lower(t) for t in inputs], lower(gy), lower(g_last))
    want = run(s5_fused_ref, inputs, gy, g_last)
    assert type(got[0].grad_fn).__name__ == "S5FusedBackward"
    assert len(got) == len(want)
    for x, y in zip(got, want):  # y, the final state; gradients sum over up to B L steps
        assert_close(x, y, scale=100)


@needs_native
@pytest.mark.parametrize("B,L,H,P", [(2, 130, 100, 28), (2, 70, 40, 8), (1, 70, 16, 28)],
                         ids=["H 100 on 112, P2 56 on 64", "H 40 on 48", "P2 56 on 64"])
def test_pads_other_sizes_to_the_lanes(B, L, H, P):
    """H and P2 = 2P not multiples of 16: zero channels and modes appended (`apply_on_lanes`), cut off again."""
    inputs = problem(B, L, H, P, True, seed=L + H)
    gy, g_last = randn(B, L, H, seed=15), randn(B, P, dtype=C128, seed=16)
    got = run(s5_fused, [lower(t) for t in inputs], lower(gy), lower(g_last))
    want = run(s5_fused_ref, inputs, gy, g_last)
    assert ran_fused(got[0]) and got[0].shape == (B, L, H) and got[1].shape == (B, P)
    for x, y in zip(got, want):
        assert x.shape == y.shape
        assert_close(x, y, scale=100)


@needs_native
def test_a_block_that_ends_on_the_last_step():
    """L a multiple of TB: the last block is a full one."""
    inputs = problem(2, 2 * s5_native.TB, 16, 8, True, seed=3)
    gy, g_last = randn(2, 2 * s5_native.TB, 16, seed=13), randn(2, 8, dtype=C128, seed=14)
    got = run(s5_fused, [lower(t) for t in inputs], lower(gy), lower(g_last))
    for x, y in zip(got, run(s5_fused_ref, inputs, gy, g_last)):
        assert_close(x, y, scale=100)


SHAPES = r"expected u \(B, L, H\), W_in and W_out \(H, 2P\), a \(P,\), D \(H,\), h0 \(B, P\); got"


@pytest.mark.parametrize("case,why", [("float64", "float32 on the CPU only"),
                                      ("H = 24", "H = 24 would run on 32 lanes"),
                                      ("h0 (P,)", SHAPES + r".* h0 \(8,\)"),
                                      ("W_out short", SHAPES + r".* W_out \(8, 16\)"),
                                      ("W_out wide", SHAPES + r".* W_out \(16, 32\)"),
                                      ("D short", SHAPES + r".* D \(8,\)"),
                                      ("W_in float64", r"float32 on the CPU only .*got W_in torch.float64"),
                                      ("a complex128", r"float32 on the CPU only .*got a torch.complex128"),
                                      ("D float64", r"float32 on the CPU only .*got D torch.float64"),
                                      ("L = 0", r"u \(2, 0, 16\) must have B, L, H >= 1"),  # had segfaulted
                                      ("D None", r"D must be given \(only h0 may be None\)")])
def test_unsupported_problems_raise(case, why):
    """Every argument is checked: a short or wide weight, or one of another dtype, had been read by the
    kernels as raw memory (outputs of 1e20-1e34, no error)."""
    u, W_in, a, W_out, D, h0 = problem(2, 10, 24 if case == "H = 24" else 16, 8, True)
    args = [u, W_in, a, W_out, D, h0] if case == "float64" else list(map(lower, (u, W_in, a, W_out, D, h0)))
    change = {"h0 (P,)": (5, lambda t: t[0]), "W_out short": (3, lambda t: t[:8]),
              "W_out wide": (3, lambda t: torch.cat([t, t], 1)), "D short": (4, lambda t: t[:8]),
              "W_in float64": (1, torch.Tensor.double), "a complex128": (2, lambda t: t.to(C128)),
              "D float64": (4, torch.Tensor.double), "L = 0": (0, lambda t: t[:, :0]), "D None": (4, lambda t: None)}
    if case in change:
        i, fn = change[case]
        args[i] = fn(args[i])
    with pytest.raises(ValueError, match=why):
        s5_fused(*args)


@needs_native
def test_lazily_negated_inputs():
    """Tensors with the negative bit (lazy -x) hold x in memory: the kernels had read x."""
    u, W_in, a, W_out, D, h0 = (lower(t) for t in problem(2, 20, 16, 8, True, seed=3))
    neg = torch._neg_view
    y, last = s5_fused(neg(u), neg(W_in), a, neg(W_out), neg(D), neg(h0))
    want_y, want_last = s5_fused_ref(-u, -W_in, a, -W_out, -D, -h0)
    assert_close(y, want_y, scale=10)
    assert_close(last, want_last, scale=10)


def layer_run(layer, u, state, gy, g_last):
    """The layer's outputs and the gradients of u, the state and every parameter."""
    u, state = u.clone().requires_grad_(), state.clone().requires_grad_()
    y, last = layer(u, state=state, return_state=True)
    loss = (y * gy).sum() + (last * g_last.conj()).real.sum()
    return [y, last] + list(torch.autograd.grad(loss, [u, state] + list(layer.parameters())))


@needs_native
@pytest.mark.parametrize("conj_sym,H,N", [(True, 32, 16), (False, 32, 16), (True, 100, 56)])
def test_the_layer_on_the_fused_op_matches_its_pytorch_ops_and_float64(conj_sym, H, N, monkeypatch, caplog):
    """H = 100 and N = 56 (28 modes): on padded lanes."""
    torch.manual_seed(0)
    layer = S5(H, N, conj_sym=conj_sym, check_finite=False)
    B, L, M = 2, 150, layer.n_modes
    u, gy = randn(B, L, H, seed=1), randn(B, L, H, seed=2)
    state, g_last = randn(B, M, dtype=C128, seed=3), randn(B, M, dtype=C128, seed=4)
    with caplog.at_level(logging.INFO, logger="diagssm.layers.s5"):
        monkeypatch.setattr(chunked_native, "_paths", {})
        fused = layer_run(layer, lower(u), lower(state), lower(gy), lower(g_last))
    assert "S5 scan: fused native op" in caplog.text
    assert ran_fused(fused[0])
    monkeypatch.setattr(s5_native, "unsupported", lambda *a: "forced off")
    composed = layer_run(layer, lower(u), lower(state), lower(gy), lower(g_last))
    assert not ran_fused(composed[0])
    want = layer_run(layer.double(), u, state, gy, g_last)  # float64: the PyTorch ops, the reference
    for a, b, c in zip(fused, composed, want):
        assert_close(a, c, scale=100)
        assert_close(b, c, scale=100)


def test_the_layer_logs_why_it_composes_pytorch_ops(monkeypatch, caplog):
    layer = S5(32, 16, bidirectional=True, check_finite=False)
    monkeypatch.setattr(chunked_native, "_paths", {})
    with caplog.at_level(logging.INFO, logger="diagssm.layers.s5"):
        y = layer(randn(2, 20, 32, dtype=F32, seed=5))
    assert "S5 scan: PyTorch ops (bidirectional)" in caplog.text
    assert type(y.grad_fn).__name__ != "S5FusedBackward"
