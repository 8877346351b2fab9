"""ops.chunked: the chunked matrix-multiply evaluation of diagonal SSMs against the recurrence."""
import re

import pytest
import torch

from diagssm.ops.chunked import block_size, chunk_size, diagonal_chunked, diagonal_chunked_ref
from helpers import assert_close, randn

C128 = torch.complex128


def system(H=3, M=4, C_out=1, seed=0, growing=False):
    g = torch.Generator().manual_seed(seed)
    re = -torch.rand(H, M, generator=g, dtype=torch.float64) * 0.3
    if growing:  # DSS-softmax's growing modes: |A_bar| > 1
        re[:, ::2] = 0.01
    w = torch.complex(re, torch.randn(H, M, generator=g, dtype=torch.float64))
    return w, randn(H, M, dtype=C128, seed=seed + 1), randn(C_out, H, M, dtype=C128, seed=seed + 2)


@pytest.mark.parametrize("L", [1, 3, 17, 64, 65, 1000])
@pytest.mark.parametrize("C_out", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_recurrence(L, C_out, with_state):
    w, B_bar, C = system(C_out=C_out)
    u = randn(2, L, 3, seed=5)
    h0 = randn(2, 3, 4, dtype=C128, seed=6) if with_state else None
    y, h = diagonal_chunked(u, w, B_bar, C, 2, h0)
    y_ref, h_ref = diagonal_chunked_ref(u, w, B_bar, C, 2, h0)
    assert y.shape == (2, L, C_out, 3) and h.shape == (2, 3, 4)
    assert_close(y, y_ref, scale=100)  # sums over up to 1000 steps
    assert_close(h, h_ref, scale=100)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_any_chunk_size_and_growing_modes(chunk):
    w, B_bar, C = system(growing=True, seed=1)
    u = randn(2, 100, 3, seed=7)
    y, h = diagonal_chunked(u, w, B_bar, C, 1, chunk=chunk)
    y_ref, h_ref = diagonal_chunked_ref(u, w, B_bar, C, 1)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


def test_gradients_match_recurrence():
    w0, B0, C0 = system(C_out=2, seed=2)
    u0, h00 = randn(2, 150, 3, seed=8), randn(2, 3, 4, dtype=C128, seed=9)
    wy, wh = randn(2, 150, 2, 3, seed=10), randn(2, 3, 4, dtype=C128, seed=11)
    grads = []
    for fn in (diagonal_chunked, diagonal_chunked_ref):
        leaves = [t.clone().requires_grad_() for t in (u0, w0, B0, C0, h00)]
        y, h = fn(leaves[0], leaves[1], leaves[2], leaves[3], 2, leaves[4], chunk=32)
        grads.append(torch.autograd.grad((y * wy).sum() + (h * wh).real.sum(), leaves))
    for got, want in zip(*grads):
        assert_close(got, want, scale=1000)  # 150 steps of accumulated products


@pytest.mark.parametrize("chunk,block", [(4, 1), (3, 2), (4, 3), (5, None)])
def test_gradcheck(chunk, block):
    """Every input's gradient: time blocks of 1-3 chunks (and one block), an odd chunk, D and h0."""
    w, B_bar, C = system(H=3, M=2, C_out=2)
    leaves = [randn(1, 11, 3, seed=12).requires_grad_(), w.requires_grad_(), B_bar.requires_grad_(),
              C.requires_grad_(), randn(1, 3, 2, dtype=C128, seed=13).requires_grad_(),
              randn(2, 3, seed=14).requires_grad_()]
    fn = lambda *a: diagonal_chunked(*a[:4], 2, a[4], chunk=chunk, D=a[5], block=block)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("L", [1, 5, 64, 130])
@pytest.mark.parametrize("block", [1, 2, None])
def test_blocks_and_skip_term_match_recurrence(L, block):
    w, B_bar, C = system(C_out=2, seed=4)
    u, D = randn(2, L, 3, seed=18), randn(2, 3, seed=19)
    h0 = randn(2, 3, 4, dtype=C128, seed=20)
    y, h = diagonal_chunked(u, w, B_bar, C, 2, h0, chunk=16, D=D, block=block)
    y_ref, h_ref = diagonal_chunked_ref(u, w, B_bar, C, 2, h0, D=D)
    assert_close(y, y_ref, scale=100)
    assert_close(h, h_ref, scale=100)


def test_block_size_bounds_memory():
    assert block_size(256, 128 * 16 * 64) == 4  # 2^19 numbers / (H B T numbers per chunk)
    assert block_size(13, 16 * 8 * 64) == 13  # a small problem: one block
    assert block_size(4, 10**9) == 1  # never less than one chunk
    assert block_size(256, 128 * 16 * 64, "cuda") == 64  # a GPU: 2^23 numbers, fewer kernel launches
    assert block_size(256, 128 * 16 * 64, torch.device("cpu")) == 4


def test_backward_keeps_u_and_the_chunk_states_only():
    """The saved tensors are u, the small system tensors and the chunk states ((L/T) B H M complex:
    as many floats as u when T = 2M), nothing else of size L (module docstring)."""
    w, B_bar, C = system(seed=5)  # H = 3, M = 4
    u = randn(2, 640, 3, seed=6).requires_grad_()  # with chunk T = 8 = 2M: 80 chunks, blocks of 4
    saved = []

    def pack(t):
        saved.append(t.numel() * (2 if t.is_complex() else 1))  # in floats
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = diagonal_chunked(u, w, B_bar, C, chunk=8, block=4)
    big = sorted(saved)[-2:]  # u and the chunk states
    assert big == [u.numel(), u.numel()]
    assert sum(saved) - sum(big) < u.numel() / 4
    y.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_float32_close_to_float64():
    w, B_bar, C = system(seed=3)
    u = randn(2, 3000, 3, seed=17)
    y64, _ = diagonal_chunked(u, w, B_bar, C)
    y32, _ = diagonal_chunked(u.float(), w.to(torch.complex64), B_bar.to(torch.complex64), C.to(torch.complex64))
    assert y32.dtype == torch.float32
    assert_close(y32, y64, scale=10)


def test_chunk_size_and_errors():
    assert [chunk_size(L) for L in (1, 3, 64, 65, 16384)] == [1, 4, 64, 64, 64]
    w, B_bar, C = system()
    with pytest.raises(ValueError, match="C must be"):
        diagonal_chunked(randn(2, 5, 3), w, B_bar, C[0])
    with pytest.raises(ValueError, match="h0 must be"):
        diagonal_chunked(randn(2, 5, 3), w, B_bar, C, h0=torch.zeros(2, 3, 5, dtype=C128))
    with pytest.raises(ValueError, match="D must be"):
        diagonal_chunked(randn(2, 5, 3), w, B_bar, C, D=randn(3))
    for fn in (diagonal_chunked, diagonal_chunked_ref):  # L = 0 had failed in chunk_size: "math domain error"
        for shape in ((2, 0, 3), (0, 5, 3)):
            with pytest.raises(ValueError, match=re.escape(f"u {shape} must have B, L >= 1")):
                fn(torch.zeros(shape, dtype=torch.float64), w, B_bar, C)
    for name, bad in (("chunk", 0), ("chunk", -1), ("chunk", 2.5), ("block", 0), ("block", -2)):
        with pytest.raises(ValueError, match=rf"{name}={bad} must be None \(the default\) or an int >= 1"):
            diagonal_chunked(randn(2, 5, 3), w, B_bar, C, **{name: bad})
    for bad in (0, 1, "no"):  # 0 had meant None (native where it runs), not False
        with pytest.raises(ValueError, match=re.escape(f"native={bad!r} must be None (native where it runs), True or")):
            diagonal_chunked(randn(2, 5, 3), w, B_bar, C, native=bad)


@pytest.mark.parametrize("dtype", [torch.complex64, C128])
def test_powers_match_the_complex_exp(dtype):
    """`_powers` (real exp, cos, sin) against its twin torch.exp(w j): values and gradients, against a
    complex128 reference."""
    from diagssm.ops.chunked import _powers

    w, _, _ = system(H=5, M=6, growing=True)
    w = (w * torch.tensor([1.0, 30.0])[torch.arange(6) % 2]).to(dtype).requires_grad_()  # fast and slow phases
    j = torch.arange(64, dtype=w.real.dtype)
    gz = randn(5, 6, 64, dtype=C128, seed=9)
    w64 = w.detach().to(C128).requires_grad_()
    want = torch.exp(w64[..., None] * j.double())
    (g_want,) = torch.autograd.grad((want * gz).real.sum(), w64)
    for fn in (_powers, lambda w, j: torch.exp(w[..., None] * j)):
        got = fn(w, j)
        (g_got,) = torch.autograd.grad((got * gz.to(dtype)).real.sum(), w)
        assert_close(got, want, scale=30)  # |w j| up to ~2000: the float32 rounding of the phase w j
        assert_close(g_got, g_want, scale=30)


def test_toeplitz_matches_the_gather_reference():
    """The chunk's Toeplitz block (windows of the padded taps) against `conv._toeplitz`, which gathers
    k[t - s] by index: values and gradients, in float64."""
    from diagssm.ops.chunked import _toeplitz
    from diagssm.ops.conv import _toeplitz as toeplitz_ref

    K = randn(2, 3, 7, seed=4).requires_grad_()
    g = randn(2, 3, 7, 7, seed=5)
    got, want = _toeplitz(K, 7), toeplitz_ref(K.reshape(6, 7)).reshape(2, 3, 7, 7)
    assert torch.equal(got, want)
    (g_got,), (g_want,) = (torch.autograd.grad((t * g).sum(), K) for t in (got, want))
    assert_close(g_got, g_want)


@pytest.mark.parametrize("native", [None, False])
def test_mixed_precision_is_an_error_naming_the_dtypes(native):
    """float32 u with complex128 weights had failed inside the native tiling or a matmul
    ("expected scalar type Double but found Float")."""
    w, B_bar, C = system()
    want = r"u and D must be one real dtype and w, B_bar, C and h0 its complex one"
    for args in [(randn(2, 5, 3).float(), w, B_bar, C), (randn(2, 5, 3), w, B_bar, C.to(torch.complex64)),
                 (randn(2, 5, 3), w.to(torch.complex64), B_bar.to(torch.complex64), C.to(torch.complex64))]:
        with pytest.raises(ValueError, match=want):
            diagonal_chunked(*args, native=native)
    with pytest.raises(ValueError, match=want):
        diagonal_chunked(randn(2, 5, 3), w, B_bar, C, D=randn(1, 3).float(), native=native)
