"""The time-invariant S5 layer as one fused native op: projections, scan and skip term together.

    Bu = u W_in,   x_k = a x_(k-1) + Bu_k,   y = x W_out^T + D u           (per batch row)

with u, y (B, L, H) real, the P = P2/2 complex modes of x stored as (Re, Im) pairs (B, L, P2), and
the projections as real matrices: W_in (H, P2) (`layers.s5.mix_in`'s), W_out (H, P2)
(`layers.s5.mix_out`'s, conj_sym's factor included). Composed from PyTorch ops (`s5_fused_ref`),
each of the four steps is a pass over a (B, L, .) tensor in memory, and its backward adds seven
more. `s5_fused` runs them per batch row in time blocks of TB steps (`s5_fwd` / `s5_bwd` in
native.c): a block's u, x and y stay in cache between the two GEMMs, the scan and the skip term, so
u is read and y written once, and only the states x go to memory (saved for the backward).

The GEMMs are native too (a register tile of 4 rows x 64 columns with AVX-512, 4 x 16 below it,
A's entries broadcast; weights of 32 KB stay in L1). Float32 on the CPU and the native library
built; the kernels run H and P2 in multiples of 16, and `apply_on_lanes` pads other sizes with zeros
where that costs at most `chunked_native.PAD_LIMIT` times them: `unsupported` says which condition
fails, and `layers.S5` then composes the PyTorch ops as before.

`s5_step` is S5's recurrent step (`S5.step`) in one native call (`s5_step` in native.c: the input
projection, the complex multiply-add and the output projection per batch row), for float32
inference on the CPU; `s5_step_ref` is its twin as PyTorch ops, which runs otherwise.
"""
import functools
import logging

import torch

from . import chunked_native
from .chunked_native import ptr
from .scan import scan, scan_ref

log = logging.getLogger(__name__)
S5_STEP = "S5 step"  # the name under which `chunked_native.log_path` logs the step's path

# time steps per block: u, x and y of one block are 64 + 32 + 64 KB at H = 128, P2 = 64, in L2.
# Fwd / bwd ms at B = 16, L = 16384 on 2 cores, two runs in opposite orders
# (`benchmarks/bench_s5.py --tb 32 64 128 256`): TB = 32 41-46 / 78-119, 64 34-39 / 66-67,
# 128 32-34 / 60-62, 256 34-36 / 59-61.
TB = 128


def unsupported(u, W_in):
    """Why `s5_fused` cannot run this problem ('' when it can)."""
    H, P2 = W_in.shape
    if u.device.type != "cpu" or u.dtype != torch.float32:
        return f"float32 on the CPU only (got {u.dtype} on {u.device})"
    if narrow := chunked_native.too_few_for_lanes("H", H) or chunked_native.too_few_for_lanes("2 x modes", P2):
        return narrow
    return "" if chunked_native.available() else chunked_native.why_unavailable()


def _real(z):
    return torch.view_as_real(chunked_native.dense(z)[0]).reshape(*z.shape[:-1], -1)


class S5Fused(torch.autograd.Function):
    """(u, W_in, a, W_out, D, h0) -> (y, x_(L-1)) on the native kernels (module docstring)."""

    @staticmethod
    def forward(ctx, u, W_in, a, W_out, D, h0):
        lib = chunked_native.library()
        args = (u, W_in, a, W_out, D, h0)  # as given (dense() may copy): their graphs, for create_graph
        u, W_in, D, W_out = chunked_native.dense(u, W_in, D, W_out)
        (W_outT,), a_r = chunked_native.dense(W_out.t()), _real(a)
        h0_r = None if h0 is None else _real(h0)
        B, L, H = u.shape
        P2 = W_in.shape[1]
        y, xs = u.new_empty(B, L, H), u.new_empty(B, L, P2)
        # the final state, written as (Re, Im) pairs into a complex tensor: returned as itself, not as a
        # complex view of a real one (which torch.compile could not trace)
        last = u.new_empty(B, P2 // 2, dtype=torch.complex64)
        lib.s5_fwd(ptr(y), ptr(xs), ptr(last), ptr(u), ptr(W_in),
                   ptr(W_outT), ptr(D), ptr(a_r), ptr(h0_r), B, L, H, P2, TB)
        ctx.save_for_backward(xs, *args)
        return y, last

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, gy, g_last):
        xs, *args = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: gradients with a graph, from the PyTorch ops
            twin = functools.partial(_composed, scan)  # s5_fused_ref's ops with the fast scan
            return chunked_native.grads_by_twin(twin, args, ctx.needs_input_grad, (gy, g_last))
        lib = chunked_native.library()
        u, W_in, a, W_out, D, h0 = args
        u, W_in, W_out, D = chunked_native.dense(u, W_in, W_out, D)
        a_r, h0_r = _real(a), None if h0 is None else _real(h0)
        B, L, H = u.shape
        P2 = W_in.shape[1]
        (gy,) = chunked_native.dense(gy)
        g_last = None if g_last is None else _real(g_last)
        gu, lam = torch.empty_like(u), u.new_empty(B, TB + 1, P2)  # a block per batch row and the carry
        g_in, g_out, gD, ga = u.new_empty(B, H, P2), u.new_empty(B, H, P2), u.new_empty(B, H), u.new_empty(B, P2)
        gh0 = u.new_empty(B, P2) if h0_r is not None and ctx.needs_input_grad[5] else None
        (W_inT,) = chunked_native.dense(W_in.t())  # bound to a name: it must live through the call
        lib.s5_bwd(ptr(gu), ptr(g_in), ptr(g_out), ptr(gD), ptr(ga), ptr(gh0),
                   ptr(lam), ptr(gy), ptr(g_last), ptr(u), ptr(xs), ptr(W_out),
                   ptr(W_inT), ptr(D), ptr(a_r), ptr(h0_r), B, L, H, P2, TB)

        def cplx(g):
            return torch.view_as_complex(g.view(*g.shape[:-1], -1, 2))

        return (gu, g_in.sum(0), cplx(ga.sum(0)), g_out.sum(0), gD.sum(0),
                None if gh0 is None else cplx(gh0))


def s5_fused(u, W_in, a, W_out, D, h0=None):
    """y = mix_out(scan(a, mix_in(u)), W_out) + D u and the final state, on the native kernels.

    Shapes: u (B, L, H) float32; W_in, W_out (H, P2) real, P2 = 2 x modes; a (P2/2,) complex64;
    D (H,); h0 (B, P2/2) complex64 or None (zero) -> y (B, L, H), x_(L-1) (B, P2/2) complex64.
    Raises ValueError where `unsupported` gives a reason.
    """
    _check(u, W_in, a, W_out, D, h0)
    why = unsupported(u, W_in)
    if why:
        raise ValueError(f"s5_fused: {why}")
    return apply_on_lanes(u, W_in, a, W_out, D, h0)


def _check(u, W_in, a, W_out, D, h0):
    """Shapes and dtypes, else a ValueError: the kernels read raw memory, so a short or wide W_out,
    or a float64 weight, had been read out of bounds or as the wrong type, silently."""
    ts = {"u": u, "W_in": W_in, "a": a, "W_out": W_out, "D": D, "h0": h0}
    required = [k for k in ("u", "W_in", "a", "W_out", "D") if ts[k] is None]
    if required:
        raise ValueError(f"s5_fused: {', '.join(required)} must be given (only h0 may be None)")
    ts = {k: t for k, t in ts.items() if t is not None}
    chunked_native.check_step_args("s5_fused", tuple(ts), tuple(ts.values()), (3, 2, 1, 2, 1, 2)[:len(ts)],
                                   _want_fused, "u (B, L, H), W_in and W_out (H, 2P), a (P,), D (H,), h0 (B, P)")
    wrong = [k for k, t in ts.items() if t.dtype != (torch.complex64 if k in ("a", "h0") else torch.float32)]
    if wrong:
        got = ", ".join(f"{k} {ts[k].dtype}" for k in wrong)
        raise ValueError(f"s5_fused: float32 on the CPU only (float32 u, W_in, W_out, D and complex64 a, h0); "
                         f"got {got}")
    if len({t.device for t in ts.values()}) > 1:
        raise ValueError("s5_fused: all tensors must be on one device")
    if min(u.shape) < 1:  # L = 0 had read the final state through a null pointer
        raise ValueError(f"s5_fused: u {tuple(u.shape)} must have B, L, H >= 1")


def _want_fused(u, W_in, a, W_out, D, h0=None):
    (Bsz, L, H), P = u.shape, a.shape[-1]
    return ((Bsz, L, H), (H, 2 * P), (P,), (H, 2 * P), (H,), (Bsz, P))[:5 + (h0 is not None)]


@chunked_native.eager
def apply_on_lanes(u, W_in, a, W_out, D, h0=None):
    """`S5Fused.apply` for any H and P2: where either is not a multiple of `chunked_native.LANES`, zero
    channels (rows of W_in and W_out, D, channels of u) and zero modes (columns of W_in and W_out, a,
    h0) are appended up to `chunked_native.lanes`, and cut off the outputs again (views). A zero mode decays at once and
    is read by no channel, a zero channel reads and writes no mode, so the real outputs and, through
    autograd, their gradients are unchanged."""
    H, P2 = W_in.shape
    ph, pp = chunked_native.lanes(H) - H, chunked_native.lanes(P2) - P2
    if not (ph or pp):
        return S5Fused.apply(u, W_in, a, W_out, D, h0)
    pad = chunked_native.zero_padded
    W_in, W_out = (pad(pad(w, 0, ph), 1, pp) for w in (W_in, W_out))
    h0 = None if h0 is None else pad(h0, 1, pp // 2)
    y, last = S5Fused.apply(pad(u, 2, ph), W_in, pad(a, 0, pp // 2), W_out, pad(D, 0, ph), h0)
    return y[..., :H], last[:, :P2 // 2]


def s5_fused_ref(u, W_in, a, W_out, D, h0=None):
    """Reference twin of `s5_fused`: the real matmuls, `scan_ref` and the skip term, as PyTorch ops."""
    return _composed(scan_ref, u, W_in, a, W_out, D, h0)


def _composed(scan_fn, u, W_in, a, W_out, D, h0):
    Bu = torch.view_as_complex((u @ W_in).unflatten(-1, (-1, 2)))  # (B, L, P)
    x = scan_fn(a, Bu, h0)  # (B, L, P)
    y = torch.view_as_real(x).flatten(-2) @ W_out.T + D * u  # (B, L, H)
    return y, x[:, -1]


def step_unsupported(u_t, state, a, W_in, W_out, D):
    """Why `s5_step` cannot run these tensors on the native kernel ('' when it can)."""
    return chunked_native.step_unsupported((u_t, W_in, W_out, D), (state, a))


def _want_step(u_t, state, a, W_in, W_out, D):
    (Bsz, H), P = u_t.shape, a.shape[0]
    return (Bsz, H), (Bsz, P), (P,), (H, 2 * P), (H, 2 * P), (H,)


def _check_step(*ts):
    chunked_native.check_step_args("s5_step", ("u_t", "state", "a", "W_in", "W_out", "D"), ts, (2, 2, 1, 2, 2, 1),
                                   _want_step, "u_t (B, H), state (B, P), a (P,), W_in and W_out (H, 2P), D (H,)")


def s5_step(u_t, state, a, W_in, W_out, D):
    """One step of S5: h = a state + u_t W_in (as P complex modes), y_t = [Re h, Im h] W_out^T + D u_t,
    as one native call (float32 inference on the CPU: `step_unsupported`), else `s5_step_ref`.
    W_in and W_out are `layers.s5`'s `in_weight(B_bar)` and `out_weight(factor C)`.

    Shapes: u_t (B, H) real; state (B, P) complex; a (P,) complex; W_in, W_out (H, 2P) real; D (H,)
    -> y_t (B, H), h (B, P)
    """
    _check_step(u_t, state, a, W_in, W_out, D)
    why = step_unsupported(u_t, state, a, W_in, W_out, D)
    return chunked_native.step_path(log, S5_STEP, why, s5_step_ref, _s5_step_native, u_t, state, a, W_in, W_out, D)


@chunked_native.eager
def _s5_step_native(u_t, state, a, W_in, W_out, D):
    u_t, state, a, W_in, W_out, D = chunked_native.dense(u_t, state, a, W_in, W_out, D)
    (Bsz, H), P = u_t.shape, a.shape[0]
    y, h = torch.empty_like(u_t), torch.empty_like(state)
    chunked_native.library().s5_step(ptr(y), ptr(h), ptr(u_t), ptr(state), ptr(a),
                                     ptr(W_in), ptr(W_out), ptr(D), Bsz, H, P)
    return y, h


def s5_step_ref(u_t, state, a, W_in, W_out, D):
    """Reference twin of `s5_step`, as PyTorch ops (differentiable)."""
    h = a * state + torch.view_as_complex((u_t @ W_in).unflatten(-1, (-1, 2)))  # (B, P)
    return torch.addmm(D * u_t, torch.view_as_real(h).flatten(-2), W_out.T), h  # (B, H), (B, P)
