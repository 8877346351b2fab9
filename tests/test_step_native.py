"""The step ops on their native kernels against their reference twins in float64: ops.diagonal_step
(S4D, DSS), ops.dplr_step (S4) and ops.s5_step (S5); where a kernel cannot run, the twin itself; and
the layers' steps, which run on them in float32 inference."""
import copy

import pytest
import torch

from diagssm.layers import DSS, S4, S4D, S5
from diagssm.ops import chunked_native, diagonal_step, diagonal_step_ref, s5_native
from diagssm.ops import step as step_mod
from helpers import assert_close, randn

C64, C128 = torch.complex64, torch.complex128
needs_native = pytest.mark.skipif(not chunked_native.available(),
                                  reason=f"native kernels unavailable: {chunked_native.why_unavailable()}")


def problem(Bsz, H, M, Cp, seed=0):
    """float64/complex128 (u_t, state, A_bar, B_bar, C, D), none of them zero; |A_bar| < 1."""
    g = torch.Generator().manual_seed(seed)
    A_bar = torch.polar(0.5 + 0.49 * torch.rand(H, M, generator=g, dtype=torch.float64),
                        torch.randn(H, M, generator=g, dtype=torch.float64))
    return (randn(Bsz, H, seed=seed + 1), randn(Bsz, H, M, dtype=C128, seed=seed + 2), A_bar,
            randn(H, M, dtype=C128, seed=seed + 3), randn(Cp, H, M, dtype=C128, seed=seed + 4),
            randn(Cp, H, seed=seed + 5))


def single(ts):
    return tuple(t.to(C64 if t.is_complex() else torch.float32) for t in ts)


def no_reference(*args):
    raise AssertionError("diagonal_step ran its reference twin, not the native kernel")


@needs_native
@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("Bsz,H,M,Cp", [(1, 3, 1, 1), (2, 5, 7, 2), (3, 16, 32, 1), (16, 64, 32, 3), (4, 9, 13, 1)])
def test_matches_the_reference(Bsz, H, M, Cp, factor, monkeypatch):
    """Tails of M not a multiple of 4 (1, 7, 13), C' = 1-3 output channels, and a problem large enough
    for the kernel's threads (16 x 64 x 32 modes)."""
    ts = problem(Bsz, H, M, Cp, seed=M)
    monkeypatch.setattr(step_mod, "diagonal_step_ref", no_reference)
    with torch.no_grad():
        y, x = diagonal_step(*single(ts), factor)
    monkeypatch.undo()
    want_y, want_x = diagonal_step_ref(*ts, factor)
    assert y.shape == (Bsz, Cp, H) and x.shape == (Bsz, H, M)
    assert y.dtype == torch.float32 and x.dtype == C64
    assert_close(x, want_x)
    assert_close(y, want_y, scale=10)  # sums over M modes


@needs_native
def test_strided_and_conjugate_views(monkeypatch):
    """Inputs that are transposed views or carry the conjugate bit are read as their values."""
    u, h, A, Bb, C, D = single(problem(3, 8, 6, 2, seed=7))
    u_t, A_t = u.t().contiguous().t(), A.t().contiguous().t()  # same values, column-major
    A_conj = A.conj().resolve_conj().conj()  # the conjugate bit set, same values
    monkeypatch.setattr(step_mod, "diagonal_step_ref", no_reference)
    with torch.no_grad():
        got = [diagonal_step(u_t, h, A_t, Bb, C, D, 2), diagonal_step(u, h, A_conj, Bb, C.conj().conj(), D, 2)]
    monkeypatch.undo()
    want = diagonal_step_ref(u, h, A, Bb, C, D, 2)
    assert A_conj.is_conj() and not u_t.is_contiguous()
    for y, x in got:
        assert_close(x, want[1])
        assert_close(y, want[0])


@needs_native
def test_lazily_negated_views(monkeypatch):
    """A tensor with the negative bit (a lazy -x, e.g. z.conj().imag) holds x in memory: the kernel had
    read x (public repro: u_t = tensor([[1+2j]]).conj().imag)."""
    u, h, A, Bb, C, D = single(problem(3, 8, 6, 2, seed=8))
    monkeypatch.setattr(step_mod, "diagonal_step_ref", no_reference)
    with torch.no_grad():
        y, x = diagonal_step(torch._neg_view(u), torch._neg_view(h), A, torch._neg_view(Bb), C, D, 2)
    monkeypatch.undo()
    want = diagonal_step_ref(-u, -h, A, -Bb, C, D, 2)
    assert_close(x, want[1])
    assert_close(y, want[0])


def test_why_the_kernel_cannot_run():
    ts = single(problem(2, 4, 5, 1))
    assert "CPU" in step_mod.unsupported(*ts[:1], ts[1].to("meta"), *ts[2:])
    assert "complex64" in step_mod.unsupported(*problem(2, 4, 5, 1))
    with torch.enable_grad():
        assert "autograd" in step_mod.unsupported(ts[0].requires_grad_(), *ts[1:])
    with torch.no_grad():
        assert step_mod.unsupported(*ts) in ("", chunked_native.why_unavailable())


@pytest.mark.parametrize("which", range(6))
def test_shape_mismatch_is_an_error(which):
    ts = list(single(problem(2, 4, 5, 2)))
    ts[which] = ts[which][..., :-1] if ts[which].dim() > 1 else ts[which][None]
    with pytest.raises(ValueError, match="diagonal_step: "):
        diagonal_step(*ts, 2)


def test_non_tensor_is_an_error():
    ts = list(single(problem(2, 4, 5, 1)))
    ts[3] = ts[3].tolist()
    with pytest.raises(TypeError, match="must be tensors"):
        diagonal_step(*ts, 2)


@needs_native
@pytest.mark.parametrize("make, twin", [(lambda: S4D(32, d_state=16, channels=2), (step_mod, "diagonal_step_ref")),
                                        (lambda: DSS(32, d_state=16), (step_mod, "diagonal_step_ref")),
                                        (lambda: S5(32, 16), (s5_native, "s5_step_ref")),
                                        (lambda: S4(32, d_state=16, channels=2), (step_mod, "dplr_step_ref"))])
def test_layer_steps_run_on_the_kernel(make, twin, monkeypatch):
    """A float32 layer's steps under no_grad run on its step kernel (S4D and DSS: diagonal_step,
    S5: s5_step, S4: dplr_step) and follow its float64 twin's steps over 20 steps from a random state."""
    torch.manual_seed(0)
    layer = make()
    ref = copy.deepcopy(layer).double()
    u = randn(3, 20, 32, seed=4)
    h = randn(*layer.default_state(3).shape, dtype=C128, seed=5)
    h32, ys, want = h.to(C64), [], []
    monkeypatch.setattr(*twin, no_reference)
    with torch.no_grad():
        for k in range(u.shape[1]):
            y, h32 = layer.step(u[:, k].float(), h32)
            ys.append(y)
    monkeypatch.undo()
    with torch.no_grad():
        for k in range(u.shape[1]):
            y, h = ref.step(u[:, k], h)
            want.append(y)
    assert_close(h32, h, scale=10)
    assert_close(torch.stack(ys), torch.stack(want), scale=10)


# ---------------------------------------------------------------- dplr_step: S4's bilinear step
def dplr_problem(Bsz, H, M, R, Cp, seed=0):
    """float64/complex128 (u_t, state, E, Pc2, Ph, dB, d, Pd2, inv, dPh, C, D), none of them zero."""
    c = [randn(*shape, dtype=C128, seed=seed + k) for k, shape in enumerate(
        [(Bsz, H, M), (H, M), (R, H, M), (R, H, M), (H, M), (H, M), (R, H, M), (R, H, M), (Cp, H, M)])]
    state, E, Pc2, Ph, dB, d, Pd2, dPh, C = c
    return (randn(Bsz, H, seed=seed + 20), state, E, Pc2, Ph, dB, d, Pd2, randn(H, R, R, seed=seed + 21), dPh, C,
            randn(Cp, H, seed=seed + 22))


@needs_native
@pytest.mark.parametrize("Bsz,H,M,R,Cp", [(1, 3, 1, 1, 1), (2, 5, 7, 2, 2), (3, 16, 32, 1, 1), (16, 64, 32, 2, 1),
                                         (4, 9, 13, 3, 2), (2, 4, 8, 8, 1), (2, 3, 600, 2, 2)])
def test_dplr_matches_the_reference(Bsz, H, M, R, Cp, monkeypatch):
    """Tails of M (1, 7, 13), ranks 1-3 and 8 (the kernel's largest), C' = 1-2, and a problem large
    enough for the kernel's threads."""
    ts = dplr_problem(Bsz, H, M, R, Cp, seed=M + R)
    monkeypatch.setattr(step_mod, "dplr_step_ref", no_reference)
    with torch.no_grad():
        y, x = step_mod.dplr_step(*single(ts))
    monkeypatch.undo()
    want_y, want_x = step_mod.dplr_step_ref(*ts)
    assert y.shape == (Bsz, Cp, H) and x.shape == (Bsz, H, M) and y.dtype == torch.float32 and x.dtype == C64
    assert_close(x, want_x, scale=100)  # sums over M modes and r ranks, twice
    assert_close(y, want_y, scale=100)


@needs_native
def test_dplr_step_with_a_million_modes():
    """The kernel had a (2 M)-float array on the stack: M = 1.1e6 overflowed 8 MB and crashed."""
    ts = dplr_problem(1, 1, 1_100_000, 1, 1)
    with torch.no_grad():
        _, x = step_mod.dplr_step(*single(ts))
    assert_close(x, step_mod.dplr_step_ref(*ts)[1], scale=100)


@pytest.mark.parametrize("which", range(12))
def test_dplr_shape_mismatch_is_an_error(which):
    ts = list(single(dplr_problem(2, 4, 5, 2, 2)))
    ts[which] = ts[which][..., :-1]
    with pytest.raises(ValueError, match="dplr_step: "):
        step_mod.dplr_step(*ts)


# ---------------------------------------------------------------- s5_step: S5's step
def s5_problem(Bsz, H, P, seed=0):
    """float64/complex128 (u_t, state, a, W_in, W_out, D), none of them zero, |a| < 1."""
    g = torch.Generator().manual_seed(seed)
    a = torch.polar(0.45 + 0.5 * torch.rand(P, generator=g, dtype=torch.float64),
                    3 * torch.rand(P, generator=g, dtype=torch.float64))
    return (randn(Bsz, H, seed=seed + 1), randn(Bsz, P, dtype=C128, seed=seed + 2), a,
            randn(H, 2 * P, seed=seed + 3) / H ** 0.5, randn(H, 2 * P, seed=seed + 4) / P ** 0.5,
            randn(H, seed=seed + 5))


@needs_native
@pytest.mark.parametrize("Bsz,H,P", [(1, 3, 1), (2, 5, 3), (3, 16, 32), (16, 128, 32), (4, 24, 7)])
def test_s5_matches_the_reference(Bsz, H, P, monkeypatch):
    """2P not a multiple of 8 (P = 1, 3, 7), and a problem large enough for the kernel's threads."""
    ts = s5_problem(Bsz, H, P, seed=P)
    monkeypatch.setattr(s5_native, "s5_step_ref", no_reference)
    with torch.no_grad():
        y, h = s5_native.s5_step(*single(ts))
    monkeypatch.undo()
    want_y, want_h = s5_native.s5_step_ref(*ts)
    assert y.shape == (Bsz, H) and h.shape == (Bsz, P) and y.dtype == torch.float32 and h.dtype == C64
    assert_close(h, want_h, scale=10)  # sums over H channels
    assert_close(y, want_y, scale=10)  # and over 2P coordinates


@needs_native
def test_s5_reads_strided_and_conjugate_views(monkeypatch):
    u, h, a, W_in, W_out, D = single(s5_problem(3, 8, 4, seed=7))
    views = (u.t().contiguous().t(), h, a.conj().resolve_conj().conj(), W_in.t().contiguous().t(), W_out, D)
    assert not views[0].is_contiguous() and views[2].is_conj() and not views[3].is_contiguous()
    monkeypatch.setattr(s5_native, "s5_step_ref", no_reference)
    with torch.no_grad():
        y, x = s5_native.s5_step(*views)
    monkeypatch.undo()
    want_y, want_x = s5_native.s5_step_ref(u, h, a, W_in, W_out, D)
    assert_close(x, want_x)
    assert_close(y, want_y)


@pytest.mark.parametrize("which", range(6))
def test_s5_shape_mismatch_is_an_error(which):
    ts = list(single(s5_problem(2, 4, 3)))
    ts[which] = ts[which][..., :-1] if ts[which].dim() > 1 else ts[which][:-1]
    with pytest.raises(ValueError, match="s5_step: "):
        s5_native.s5_step(*ts)


# ---------------------------------------------------------------- every step op: its twin where the kernel cannot run
# name: (op, twin, why-not, float64 inputs, extra arguments, the tolerance's scale: sums over modes and ranks)
OPS = {
    "diagonal": (diagonal_step, diagonal_step_ref, step_mod.unsupported, lambda R: problem(2, 4, 5, 1, seed=3),
                 (2,), 10),
    "dplr": (step_mod.dplr_step, step_mod.dplr_step_ref, step_mod.dplr_unsupported,
             lambda R: dplr_problem(2, 4, 5, R, 1, seed=3), (), 100),
    "s5": (s5_native.s5_step, s5_native.s5_step_ref, s5_native.step_unsupported, lambda R: s5_problem(2, 6, 3, seed=3),
           (), 10),
}


@pytest.mark.parametrize("op, case", [(op, case) for op in OPS for case in ("requires grad", "float64")] +
                         [("dplr", "rank 9")])
def test_the_twin_where_the_kernel_cannot_run(op, case):
    """With a tensor that requires grad (autograd on) the step is differentiable: the twin runs, and
    its gradients are the float64 twin's; float64 runs the twin, and so do S4's ranks above the
    kernel's 8."""
    fast, twin, why_not, make, extra, scale = OPS[op]
    ts = make(9 if case == "rank 9" else 2)
    leaves = [t.clone().requires_grad_(case == "requires grad") for t in (ts if case == "float64" else single(ts))]
    y, x = fast(*leaves, *extra)
    assert why_not(*leaves) != ""
    ref = [t.clone().requires_grad_() for t in ts]
    want_y, want_x = twin(*ref, *extra)
    assert_close(y, want_y, scale=scale)
    assert_close(x, want_x, scale=scale)
    if case == "requires grad":
        w = randn(*y.shape, seed=9)
        got = torch.autograd.grad((y * w.float()).sum() + x.abs().sum(), leaves)
        want = torch.autograd.grad((want_y * w).sum() + want_x.abs().sum(), ref)
        for g, r in zip(got, want):
            assert_close(g, r, scale=scale)
