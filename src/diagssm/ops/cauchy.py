"""The Cauchy kernel of S4 (Gu, Goel, Re, ICLR 2022, Sec. 3.3 and Algorithm 1, step 2):

    k[..., l] = sum_n v[..., n] / (z[l] - w[..., n])

S4 evaluates its truncated generating function at the L roots of unity with this product; with
H = 256 channels, N = 32 modes and L = 8192 the full (..., N, L) Cauchy matrix is 0.5 GB in
complex64, and autograd through the naive formula keeps several of them. `cauchy` never builds
it: a custom autograd function works on chunks of z, in the forward and again in the backward,
so memory is O(output + chunk).
"""
import math

import torch

from . import chunked_native
from .chunked_native import grads_by_twin

CHUNK_ELEMENTS = 1 << 22  # complex entries of 1/(z - w) held at once (32 MB in complex64)


def _check(v, z, w):
    if not (v.is_complex() and z.is_complex() and w.is_complex()):
        raise ValueError(f"v, z, w must be complex; got {v.dtype}, {z.dtype}, {w.dtype}")
    if z.dim() != 1:
        raise ValueError(f"z must be (L,); got shape {tuple(z.shape)}")
    if v.dim() < 1 or w.dim() < 1 or v.shape[-1] != w.shape[-1]:
        raise ValueError(f"v and w must be (..., N) with the same N; got {tuple(v.shape)} and {tuple(w.shape)}")
    if not (v.dtype == z.dtype == w.dtype):
        raise ValueError(f"v, z, w must share one dtype; got {v.dtype}, {z.dtype}, {w.dtype}")


def cauchy_ref(v, z, w):
    """Reference twin of `cauchy`: the full broadcast (..., N, L) Cauchy matrix, summed over N."""
    _check(v, z, w)
    return (v[..., None] / (z - w[..., None])).sum(-2)  # (..., L)


def _split(v, w):
    """Batch dims as (P, W): w varies only over the trailing W dims, v over all of them.

    Returns v (W, P, N), w (W, N) and the broadcast batch shape; the leading batch dims where w
    is 1 become P, so that 1/(z - w) is computed once for all of them (a matmul with v).
    """
    shape = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
    w_batch = (1,) * (len(shape) - (w.dim() - 1)) + tuple(w.shape[:-1])
    k = 0
    while k < len(shape) and w_batch[k] == 1:
        k += 1
    N, P, W = v.shape[-1], math.prod(shape[:k]), math.prod(shape[k:])
    v = v.expand(*shape, N).reshape(P, W, N).transpose(0, 1)  # (W, P, N)
    w = w.reshape(w_batch[k:] + (N,)).expand(*shape[k:], N).reshape(W, N)  # (W, N)
    return v, w, shape


def _chunks(L, W, N):
    c = max(1, CHUNK_ELEMENTS // max(1, W * N))
    return [slice(s, min(s + c, L)) for s in range(0, L, c)]


def _cauchy_chunks(v, z, w):
    """`_Cauchy`'s forward as plain PyTorch ops, one chunk of z at a time (autograd keeps each chunk's
    1/(z - w), (W, N, L) in all). Shapes: v (W, P, N), z (L,), w (W, N) -> ((W, P, L),)"""
    return (torch.cat([v @ (z[s] - w[..., None]).reciprocal() for s in _chunks(z.shape[0], *w.shape)], -1),)


class _Cauchy(torch.autograd.Function):
    """k = v @ R, R[w, n, l] = 1 / (z[l] - w[w, n]), one chunk of l at a time.

    Complex gradients follow PyTorch's convention (grad_in = conj(d out / d in) * grad_out for a
    holomorphic map): dk/dv = R, dk/dw = v R^2, dk/dz = -v R^2.
    """

    @staticmethod
    def forward(ctx, v, z, w):  # v (W, P, N), z (L,), w (W, N)
        ctx.save_for_backward(v, z, w)
        out = v.new_empty(v.shape[0], v.shape[1], z.shape[0])  # (W, P, L)
        for s in _chunks(z.shape[0], *w.shape):
            R = (z[s] - w[..., None]).reciprocal_()  # (W, N, c)
            out[..., s] = v @ R  # (W, P, c)
        return out

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, g):  # g (W, P, L)
        v, z, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: gradients with a graph, from the same chunks as plain ops
            return grads_by_twin(_cauchy_chunks, (v, z, w), ctx.needs_input_grad, (g,))
        need_v, need_z, need_w = ctx.needs_input_grad
        gv = torch.zeros_like(v) if need_v else None
        gw = torch.zeros_like(w) if need_w else None
        gz = torch.zeros_like(z) if need_z else None
        vc, zc, wc = v.conj().resolve_conj(), z.conj().resolve_conj(), w.conj().resolve_conj()
        for s in _chunks(z.shape[0], *w.shape):
            Rc = (zc[s] - wc[..., None]).reciprocal_()  # (W, N, c) conj(R), no conj views
            gs = g[..., s]  # (W, P, c)
            if need_v:
                gv += gs @ Rc.transpose(-1, -2)  # (W, P, N)
            if need_w or need_z:
                Rc2 = Rc.square_()  # (W, N, c) conj(R)^2, in place: Rc is not used again
            if need_w:
                gw += (vc * (gs @ Rc2.transpose(-1, -2))).sum(1)  # (W, N)
            if need_z:
                gz[s] -= ((vc.transpose(-1, -2) @ gs) * Rc2).sum((0, 1))  # (c,)
        return gv, gz, gw


def cauchy(v, z, w):
    """k[..., l] = sum_n v[..., n] / (z[l] - w[..., n]), memory-bounded in L.

    v and w broadcast against each other over their batch dims. When w has fewer (or size-1
    leading) batch dims than v, as in S4 where w = dt * Lambda is shared by all the vectors
    B, P, C, the reciprocals 1/(z - w) are computed once and contracted with v by a matmul.
    Differentiable in v, z and w (first order; a custom autograd function, checked by gradcheck).

    Shapes:
        v: (..., N) complex
        z: (L,) complex
        w: (..., N) complex, broadcastable with v
        returns (..., L) complex, the broadcast batch shape of v and w
    """
    _check(v, z, w)
    v2, w2, shape = _split(v, w)
    out = _Cauchy.apply(v2, z, w2)  # (W, P, L)
    return out.transpose(0, 1).reshape(*shape, z.shape[0])  # (..., L)
