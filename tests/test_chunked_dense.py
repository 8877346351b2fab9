"""The chunked op with a dense carry (`ops.chunked_dense`, S4's CPU path) against its recurrence twin:
outputs, final states and every gradient, at lengths that cut chunks in every way; then the S4 layer
on it against its FFT path and against float64, and the backend choice."""
import logging

import pytest
import torch

from diagssm.layers import S4
from diagssm.layers.base import as_complex
from diagssm.ops import chunked_dense, chunked_native
from diagssm.ops.chunked_dense import dense_chunked, dense_chunked_ref, row_powers
from helpers import assert_close, randn

F64 = torch.float64


def system(H=3, n=6, Cp=2, Bsz=2, L=37, seed=0, dtype=F64, D=True, h0=True):
    """A stable random system (A's spectral norm 0.95: powers decay like a trained SSM's) and inputs.
    Returns u, A, B, C, D, h0 (D, h0 None when asked), all requiring gradients."""
    A = randn(H, n, n, seed=seed)
    A = 0.95 * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]  # (H, n, n)
    ts = [randn(Bsz, L, H, seed=seed + 1), A, randn(H, n, seed=seed + 2), randn(Cp, H, n, seed=seed + 3),
          randn(Cp, H, seed=seed + 4) if D else None, randn(Bsz, H, n, seed=seed + 5) if h0 else None]
    return [None if t is None else t.to(dtype).requires_grad_() for t in ts]


def outputs_and_grads(fn, args, seed=9, **kw):
    """y, x_last and the gradients of every argument of sum(y w) + sum(x_last v), fixed random w, v."""
    y, x = fn(*args, **kw)
    w, v = randn(*y.shape, seed=seed).to(y.dtype), randn(*x.shape, seed=seed + 1).to(x.dtype)
    inputs = [a for a in args if a is not None]
    return (y, x) + torch.autograd.grad((y * w).sum() + (x * v).sum(), inputs)


def test_row_powers_are_repeated_products():
    v, M = randn(4, 5, seed=1), randn(4, 5, 5, seed=2) / 3
    R, P = row_powers(v, M, 11)  # (4, 11, 5), M^16
    want, row = [], v
    for _ in range(11):
        want.append(row)
        row = (row[:, None, :] @ M)[:, 0]
    assert R.shape == (4, 11, 5)
    assert_close(R, torch.stack(want, 1))
    assert_close(P, torch.linalg.matrix_power(M, 16))


@pytest.mark.parametrize("L, chunk", [(1, None), (37, None), (37, 4), (64, 8), (65, 8), (100, 16), (5, 1),
                                      (37, 37), (37, 64), (100, 12)])
@pytest.mark.parametrize("D, h0", [(True, True), (False, False)])
def test_matches_recurrence_float64(L, chunk, D, h0):
    """Chunks of every kind: one partial chunk, exact multiples, one step left over, T = 1, T > L, a T that
    is no power of two (A^T then not from `row_powers`' squares)."""
    args = system(L=L, D=D, h0=h0)
    got = outputs_and_grads(dense_chunked, args, chunk=chunk)
    want = outputs_and_grads(dense_chunked_ref, args)
    assert got[0].shape == (2, L, 2, 3) and got[1].shape == (2, 3, 6)
    for a, b in zip(got, want):
        assert_close(a, b, scale=10)


def test_gradcheck():
    """`torch.autograd.gradcheck` of the whole op (its three autograd Functions: the layout copies and
    the carry) in float64, in time blocks of 2 chunks, with a final state and h0."""
    u, A, B, C, D, h0 = [a.detach().requires_grad_() for a in system(H=2, n=3, L=11)]
    op = lambda *args: dense_chunked(*args, chunk=4)  # noqa: E731
    assert torch.autograd.gradcheck(op, (u, A, B, C, D, h0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked_dense, "block_size", lambda nc, numbers: 2)
        assert torch.autograd.gradcheck(op, (u, A, B, C, D, h0))


@pytest.mark.parametrize("L", [64, 75])
def test_copies_in_time_blocks(monkeypatch, L):
    """The layout copies run in time blocks (`_to_chunks`): blocks of 2 chunks, so 4 or 5 blocks here."""
    monkeypatch.setattr(chunked_dense, "block_size", lambda nc, numbers: 2)
    args = system(L=L)
    for a, b in zip(outputs_and_grads(dense_chunked, args, chunk=8), outputs_and_grads(dense_chunked_ref, args)):
        assert_close(a, b, scale=10)


needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


@needs_native
# L = 170 (chunk 16) and 190 (chunk 8): 10 and 23 full chunks, so blocks of 3 leave a shorter one (at 150 and
# 200, 9 and 24 full chunks, every block had been of 3: the shorter block's branch never ran)
@pytest.mark.parametrize("H, Bsz, L, chunk, Cp", [(16, 3, 170, 16, 2), (16, 5, 64, 16, 1), (40, 4, 37, None, 2),
                                                   (16, 8, 190, 8, 1)])
@pytest.mark.parametrize("D, h0", [(True, True), (False, False)])
@pytest.mark.parametrize("per_block", [None, 3], ids=["one-block", "blocks-of-3"])
def test_native_kernels_match_the_recurrence(H, Bsz, L, chunk, Cp, D, h0, per_block, monkeypatch):
    """float32 on the native kernels (`ChunkedNative` with `dense_carry`) against the float64 recurrence:
    batch rows in register tiles of 4 and left over, a partial last chunk, H = 40 on 48 padded lanes;
    the backward in one time block, or in blocks of 3 chunks (a shorter first one in time), as at
    training sizes (at the default BLOCK_NUMBERS these sizes fit one block)."""
    if per_block:
        monkeypatch.setattr(chunked_native, "BLOCK_NUMBERS", Bsz * 8 * chunked_native.lanes(H) * per_block)
    args64 = system(H=H, n=8, Cp=Cp, Bsz=Bsz, L=L, seed=4, D=D, h0=h0)
    args32 = [None if a is None else a.detach().float().requires_grad_() for a in args64]
    chunked_native.paths(forget=True)
    got = outputs_and_grads(dense_chunked, args32, chunk=chunk, native=True)
    assert chunked_native.paths()[chunked_native.DENSE_OP] == ""  # logged: the native kernels ran
    want = outputs_and_grads(dense_chunked_ref, args64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, scale=50)


def test_native_true_says_why_it_cannot_run():
    def args(H, n, dtype=torch.float32):
        return [a.detach().to(dtype) for a in system(H=H, n=n)[:4]]  # u, A, B, C
    for (H, n, dtype), msg in (((16, 8, F64), "float32 on the CPU only"),
                               ((16, 6, torch.float32), "n = 6 state coordinates: a multiple of 4 only"),
                               ((4, 8, torch.float32), "H = 4 would run on 16 lanes")):
        with pytest.raises(ValueError, match=msg):
            dense_chunked(*args(H, n, dtype), native=True)
        y, _ = dense_chunked(*args(H, n, dtype))  # native=None: the PyTorch path, said in the log
        assert chunked_native.paths()[chunked_native.DENSE_OP].startswith(msg.split(":")[0])
    with pytest.raises(ValueError, match="native=1 must be"):
        dense_chunked(*args(16, 8), native=1)


def test_float32_close_to_float64():
    args64 = system(H=4, n=8, L=300, seed=3)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    got = outputs_and_grads(dense_chunked, args32)
    want = outputs_and_grads(dense_chunked_ref, args64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, scale=20)  # 300 steps of products accumulate rounding


def test_errors_name_the_argument():
    u, A, B, C, D, h0 = [a.detach() for a in system()]
    cases = [((u[0], A, B, C), "u must be"), ((u, A[:, :5], B, C), "A must be"), ((u, A, B[:, :5], C), "B must be"),
             ((u, A, B, C[0]), "C must be"), ((u, A, B, C, D[:1]), "D must be"),
             ((u, A, B, C, D, h0[:, :2]), "h0 must be"), ((u.float(), A, B, C), "one real dtype")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            dense_chunked(*args)
    for chunk in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk="):
            dense_chunked(u, A, B, C, chunk=chunk)


# --- the S4 layer on it ----------------------------------------------------------------------------

def s4(backend, seed=0, H=4, **kw):
    """A float64 S4 moved off its initialisation (every parameter matters to the outputs)."""
    torch.manual_seed(seed)
    m = S4(H, 16, dt_min=0.01, dt_max=0.3, backend=backend, **kw).double()
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.add_(0.1 * randn(*p.shape, seed=seed + 20 + i) * p.abs().mean())
    return m


def layer_grads(m, u, state=None):
    """Outputs (and final state) and the gradients of u, the state and every parameter."""
    u = u.clone().requires_grad_()
    if state is not None:
        state.requires_grad_()
    y, x = m(u, state=state, return_state=True) if state is not None else (m(u), None)
    loss = (y * randn(*y.shape, seed=5)).sum()
    inputs = [u] + list(m.parameters())
    if x is not None:
        loss = loss + (torch.view_as_real(x) * randn(*x.shape, 2, seed=6)).sum()
        inputs.append(state)
    return [y] + ([] if x is None else [x]) + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("kw", [dict(), dict(channels=2), dict(bidirectional=True, channels=2),
                                dict(measure="legt", rank=2), dict(n_ssm=2)])
def test_s4_chunked_equals_fft_with_every_gradient(kw):
    u = randn(2, 150, 4, seed=1)  # 3 chunks, the last one partial
    fft, chunked = s4("fft", **kw), s4("chunked", **kw)
    for a, b in zip(layer_grads(chunked, u), layer_grads(fft, u)):
        assert_close(a, b, scale=100)
    assert chunked.last_backend == "chunked" and fft.last_backend == "fft"


def test_s4_chunked_states_equal_fft():
    u, x0 = randn(2, 70, 4, seed=1), randn(2, 4, 8, dtype=torch.complex128, seed=2)
    got = layer_grads(s4("chunked"), u, x0.clone())
    want = layer_grads(s4("fft"), u, x0.clone())
    for a, b in zip(got, want):
        assert_close(a, b, scale=100)


@pytest.mark.parametrize("H", [4, 16])  # the PyTorch path (4 channels on 16 lanes), the native kernels
def test_s4_chunked_float32_close_to_float64(H):
    """The real coordinates in float32 (A_bar's powers are non-normal: HiPPO's) at L = 2000."""
    m64 = s4("chunked", H=H)
    m32 = S4(H, 16, backend="chunked")
    m32.load_state_dict(m64.state_dict())
    u = randn(2, 2000, H, seed=3)
    got = layer_grads(m32, u.float())
    want = layer_grads(m64, u)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, scale=50)


@needs_native
@pytest.mark.parametrize("kw", [dict(channels=2, bidirectional=True), dict(channels=2, measure="legt", rank=2)])
def test_s4_on_the_native_kernels_with_options(kw):
    """S4 in float32 on the native kernels (H = 16, d_state 16) with two output channels, both
    directions or a final state from a given one, against the float64 layer; every gradient."""
    m64 = s4("chunked", H=16, **kw)
    m32 = S4(16, 16, backend="chunked", **kw)
    m32.load_state_dict(m64.state_dict())
    u = randn(3, 150, 16, seed=7)
    state = None if kw.get("bidirectional") else randn(3, 16, 8, dtype=torch.complex128, seed=8)
    chunked_native.paths(forget=True)
    got = layer_grads(m32, u.float(), None if state is None else state.to(torch.complex64))
    assert chunked_native.paths()[chunked_native.DENSE_OP] == ""
    want = layer_grads(m64, u, state)
    for a, b in zip(got, want):
        assert a.dtype in (torch.float32, torch.complex64)
        assert_close(a, b, scale=50)


def test_s4_real_system_is_the_doubled_complex_one():
    """y = C x on [Re x; Im x] and one step of A equal 2 Re(C x) and the doubled A_bar's stored half."""
    m = s4("chunked")
    A, B, C = m.real_system()
    A_bar, B_bar = m.dense()
    x = randn(3, 4, 8, dtype=torch.complex128, seed=4)  # (B, H, M)
    step = (A_bar @ torch.cat([x, x.conj()], -1)[..., None])[..., 0][..., :8]  # (B, H, M)
    xr = torch.cat([x.real, x.imag], -1)  # (B, H, 16)
    assert_close((A @ xr[..., None])[..., 0], torch.cat([step.real, step.imag], -1))
    assert_close(B, torch.cat([B_bar[:, :8].real, B_bar[:, :8].imag], -1))
    assert_close((C * xr[:, None]).sum(-1), 2 * (as_complex(m.C) * x[:, None]).sum(-1).real)


def test_s4_backend_choice_is_logged_and_checked(caplog):
    m = S4(4, 8)
    assert m.backend == "auto" and "backend='auto'" in repr(m)
    with caplog.at_level(logging.INFO, logger="diagssm"):
        m(randn(1, 10, 4).float())
    assert m.last_backend == "chunked" and "S4: chunked backend on cpu" in caplog.text
    with pytest.raises(ValueError, match="backend='dense'"):
        S4(4, 8, backend="dense")
