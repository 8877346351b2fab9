"""ops.cauchy: against its full-matrix twin, its gradients, and the memory it keeps for backward."""
import importlib

import pytest
import torch

from diagssm.ops.cauchy import cauchy, cauchy_ref
from helpers import assert_close, randn

cauchy_mod = importlib.import_module("diagssm.ops.cauchy")  # the module, not the function ops.cauchy

C64, C128 = torch.complex64, torch.complex128
SHAPES = [  # (v batch + N, w batch + N): w shared over leading dims, broadcast both ways, none
    ((5,), (5,)),
    ((3, 5), (5,)),
    ((2, 3, 4, 5), (4, 5)),
    ((4, 5), (2, 4, 5)),
    ((2, 1, 5), (1, 3, 5)),
    ((3, 1, 5), (3, 5)),
]


def inputs(v_shape, w_shape, L=7, dtype=C128, seed=0):
    return randn(*v_shape, dtype=dtype, seed=seed), randn(L, dtype=dtype, seed=seed + 1), \
        randn(*w_shape, dtype=dtype, seed=seed + 2)


@pytest.mark.parametrize("v_shape, w_shape", SHAPES)
@pytest.mark.parametrize("dtype", [C64, C128])
def test_matches_twin(v_shape, w_shape, dtype):
    v, z, w = inputs(v_shape, w_shape, dtype=dtype)
    k = cauchy(v, z, w)
    want = cauchy_ref(v.to(C128), z.to(C128), w.to(C128))
    assert k.shape == want.shape == torch.broadcast_shapes(v.shape[:-1], w.shape[:-1]) + (7,)
    assert k.dtype == dtype
    assert_close(k, want, scale=10)  # sums of 5 reciprocals


def test_definition():
    """k[l] = sum_n v_n / (z_l - w_n), written out for one small case."""
    v = torch.tensor([1.0, 2j], dtype=C128)
    w = torch.tensor([-1.0, -1j], dtype=C128)
    z = torch.tensor([0.0, 1j], dtype=C128)
    want = torch.tensor([1 / 1 + 2j / 1j, 1 / (1j + 1) + 2j / 2j], dtype=C128)
    assert_close(cauchy(v, z, w), want)


def test_many_chunks(monkeypatch):
    """With a tiny chunk budget the L axis is cut into many pieces (last one ragged)."""
    monkeypatch.setattr(cauchy_mod, "CHUNK_ELEMENTS", 20)  # 1 column of (W=4) x (N=5) per chunk
    v, z, w = inputs((3, 4, 5), (4, 5), L=13)
    leaves = [t.requires_grad_() for t in (v, z, w)]
    g = randn(3, 4, 13, dtype=C128, seed=9)
    got = torch.autograd.grad((cauchy(*leaves) * g).real.sum(), leaves)
    want = torch.autograd.grad((cauchy_ref(*leaves) * g).real.sum(), leaves)
    assert_close(cauchy(v, z, w), cauchy_ref(v, z, w))
    for a, b in zip(got, want):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("v_shape, w_shape", SHAPES)
def test_gradients_match_twin(v_shape, w_shape):
    v, z, w = inputs(v_shape, w_shape, seed=3)
    leaves = [t.requires_grad_() for t in (v, z, w)]
    g = randn(*torch.broadcast_shapes(v.shape[:-1], w.shape[:-1]), 7, dtype=C128, seed=4)
    got = torch.autograd.grad((cauchy(*leaves) * g).real.sum(), leaves)
    want = torch.autograd.grad((cauchy_ref(*leaves) * g).real.sum(), leaves)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("v_shape, w_shape", [((2, 3, 4), (3, 4)), ((2, 1, 4), (1, 3, 4))])
def test_gradcheck(v_shape, w_shape):
    leaves = [t.requires_grad_() for t in inputs(v_shape, w_shape, L=5, seed=5)]
    assert torch.autograd.gradcheck(cauchy, leaves)


def test_only_requested_gradients(monkeypatch):
    """The backward computes the gradients autograd needs only: with z and w requiring none, it
    returns None for them (the old assertion on z.grad, w.grad held whatever the backward did)."""
    from diagssm.ops.cauchy import _Cauchy

    returned = []
    backward = _Cauchy.backward

    def spy(ctx, g):
        returned.append(backward(ctx, g))
        return returned[-1]

    monkeypatch.setattr(_Cauchy, "backward", staticmethod(spy))
    v, z, w = inputs((2, 3, 4), (3, 4))
    v.requires_grad_()
    (gv,) = torch.autograd.grad(cauchy(v, z, w).abs().sum(), [v])
    assert gv.shape == v.shape
    assert len(returned) == 1 and returned[0][0] is not None and returned[0][1:] == (None, None)


def test_backward_keeps_only_the_inputs():
    """S4's sizes (H = 256, N = 32, L = 8192): the graph saves v, z, w -- kilobytes -- not the
    0.5 GB (H, N, L) Cauchy matrix that autograd through the naive formula would keep."""
    H, N, L = 256, 32, 8192
    v = randn(4, H, N, dtype=C64, seed=6).requires_grad_()
    w = randn(H, N, dtype=C64, seed=7).requires_grad_()
    z = randn(L, dtype=C64, seed=8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        k = cauchy(v, z, w)
    full = H * N * L * 8  # bytes of one (H, N, L) complex64 tensor
    assert sum(saved) < full / 100
    assert cauchy_mod.CHUNK_ELEMENTS * 8 <= full / 10  # and the forward/backward work in chunks this big
    k.real.sum().backward()
    assert torch.isfinite(torch.view_as_real(v.grad)).all() and torch.isfinite(torch.view_as_real(w.grad)).all()


def test_errors():
    v, z, w = inputs((3, 5), (5,))
    with pytest.raises(ValueError, match="must be complex"):
        cauchy(v.real, z, w)
    with pytest.raises(ValueError, match="z must be"):
        cauchy(v, z[None], w)
    with pytest.raises(ValueError, match="same N"):
        cauchy(v, z, w[:4])
    with pytest.raises(ValueError, match="one dtype"):
        cauchy(v.to(C64), z, w)
