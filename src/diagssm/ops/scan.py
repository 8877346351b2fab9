"""Linear recurrence (the SSM in recurrent form): h_k = A_bar_k * h_(k-1) + Bu_k, elementwise.

This is the discretised diagonal SSM run step by step (the recurrent view of S4D, Gu et al. 2022,
and the parallel-scan recurrence of S5, Smith et al. 2023): every state channel p is an
independent scalar recurrence, so the scan is elementwise in (B, P) and sequential only along L.

`scan_ref` is the obvious Python loop over L. `scan` is a `torch.autograd.Function` whose forward
is a chunked "two-level loop" and whose backward is itself a scan in the opposite direction.

Chunking. Write L = n * T + r with T a power of two near sqrt(L) (at most 256), view the first
n * T steps as (B, n, T, P) (no copy) and run three cheap passes:
  1. a loop of T steps, vectorised over the n chunks, runs every chunk from a zero state and keeps
     only its final state x_c; pi_c = prod of the T A_bar's of chunk c;
  2. a loop of n steps on (B, P) carries the state across chunks: s_c = x_c + pi_c * s_(c-1);
  3. a second loop of T steps reruns every chunk from its true entering state s_(c-1), keeping h.
The r < T leftover steps are a plain loop from the last state. That is ~3 sqrt(L) Python steps
(384 at L = 16384), O(B L P) work, no division (A_bar = 0 is exact) and no padding. reverse=True
walks the same structure from the other end (the leftover steps then come first in L).

Timings, B=16, P=64, complex64, L=16384, best of 3 on 2 CPU cores shared with other jobs (noisy;
under heavy contention 2-thread elementwise ops can stall for seconds): this scan, forward 0.06 s
for A_bar (P,) and 0.07 s for A_bar (B, L, P), forward + backward 0.20 s and 0.28 s; scan_ref
0.35-0.5 s and 0.8-1.2 s. The alternative for a constant A_bar (inside a chunk, a batched matmul
with the (P, T, T) lower-triangular Toeplitz matrix of powers A^(t-s), O(B L P T) work) took
0.42 s forward at T=64 (T=32: 0.43 s, T=128: 0.46 s), so the loop is used for every A_bar.

Native kernel. A constant A_bar (S5's time-invariant case) in complex64 on the CPU runs on the
native kernels of `chunked_native` (`scan_fwd`, `scan_bwd` in native.c: one sequential loop per
batch row over its P modes, batch rows on torch's OpenMP threads) when they are built; `scan`
logs (INFO, on change) which of the two it runs and why. At B = 16,
L = 16384, P = 32 modes a forward + backward took 17-20 ms there, against ~43 ms for `_Scan`
(`benchmarks/bench_s5.py`, the "scan" piece, before and after). Time-varying A_bar, other
dtypes, or no compiler: `_Scan` below.

Complex gradients follow PyTorch's convention: the gradient of a real loss with respect to a
complex z = x + iy is dLoss/dx + i dLoss/dy = 2 dLoss/d(conj z) (conjugate Wirtinger), so for
y = a * h the chain rule gives grad_h = conj(a) * grad_y and grad_a = conj(h) * grad_y. For real
tensors conj is a no-op; a real input fed into a complex scan gets the real part.
"""
import logging
import math

import torch

from . import chunked_native
from .chunked_native import ptr

log = logging.getLogger(__name__)

_MAX_CHUNK = 256


# ---------------------------------------------------------------- argument checks and promotion
def _check_float(name, x):
    if not torch.is_tensor(x):
        raise TypeError(f"scan: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"scan: {name} must be a floating or complex tensor, got dtype {x.dtype}")


def _broadcasts_to(shape, target):
    try:
        return torch.broadcast_shapes(shape, target) == tuple(target)
    except RuntimeError:
        return False


def _prepare(A_bar, Bu, h0, reverse):
    """Validate, promote to one dtype, and lift A_bar to rank 3 (broadcastable to (B, L, P))."""
    if not isinstance(reverse, bool):
        raise ValueError(f"scan: reverse must be True or False, got {reverse!r}")
    _check_float("Bu", Bu)
    _check_float("A_bar", A_bar)
    if Bu.dim() != 3:
        raise ValueError(f"scan: Bu must have shape (B, L, P), got shape {tuple(Bu.shape)}")
    if min(Bu.shape) < 1:
        raise ValueError(f"scan: Bu must have B, L, P >= 1, got shape {tuple(Bu.shape)}")
    if A_bar.dim() > 3 or not _broadcasts_to(A_bar.shape, Bu.shape):
        raise ValueError(f"scan: A_bar must be broadcastable to Bu's shape {tuple(Bu.shape)} "
                         f"(e.g. (P,), (L, P), (B, L, P)), got shape {tuple(A_bar.shape)}")
    dtype = torch.promote_types(A_bar.dtype, Bu.dtype)
    if h0 is not None:
        _check_float("h0", h0)
        B, _, P = Bu.shape
        if h0.dim() > 2 or not _broadcasts_to(h0.shape, (B, P)):
            raise ValueError(f"scan: h0 must have shape (B, P) = {(B, P)} (or broadcast to it), "
                             f"got shape {tuple(h0.shape)}")
        dtype = torch.promote_types(dtype, h0.dtype)
        h0 = h0.to(dtype)
    a = A_bar.to(dtype).reshape((1,) * (3 - A_bar.dim()) + tuple(A_bar.shape))  # (B', L', P')
    return a, Bu.to(dtype), h0


def _ordered(xs, reverse):
    return list(reversed(xs)) if reverse else list(xs)


# ---------------------------------------------------------------- the reference
def _loop(a, b, h, reverse):
    """h_k = a_k * h_(k-1) + b_k, one step at a time. a (B', l|1, P'), b (B, l, P), h (B, P)."""
    a = a.expand(-1, b.shape[1], -1)  # (B', l, P')
    hs = []
    for a_k, b_k in zip(_ordered(a.unbind(1), reverse), _ordered(b.unbind(1), reverse)):
        h = a_k * h + b_k  # (B, P)
        hs.append(h)
    return torch.stack(_ordered(hs, reverse), dim=1)  # (B, l, P)


def scan_ref(A_bar, Bu, h0=None, reverse=False):
    """Reference scan: a Python loop over L (slow, obviously correct; autograd of elementary ops).

    h_k = A_bar_k * h_(k-1) + Bu_k, h_(-1) = h0  (reverse: h_k = A_bar_k * h_(k+1) + Bu_k, h_L = h0)

    Shapes:
        A_bar: (P,) or anything broadcastable to (B, L, P), e.g. (L, P) or (B, L, P)
        Bu:    (B, L, P)
        h0:    (B, P) or None (zeros)
        h:     (B, L, P), dtype promoted from A_bar, Bu (and h0)
    """
    a, b, h0 = _prepare(A_bar, Bu, h0, reverse)  # (B', L', P'), (B, L, P), (B, P)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.expand_as(b[:, 0])  # (B, P)
    return _loop(a, b, h, reverse)  # (B, L, P)


# ---------------------------------------------------------------- the chunked forward
def _chunk_len(L):
    return min(_MAX_CHUNK, 2 ** round(math.log2(math.sqrt(L))))


def _two_level(ac, bc, h0, reverse, out):
    """Scan n chunks of T steps (module docstring, passes 1-3) into `out`; return the final state.

    Shapes: ac (B', n|1, T|1, P'); bc, out (B, n, T, P); h0 (B, P) or None -> (B, P)
    """
    B, n, T, P = bc.shape
    a_steps = _ordered(ac.unbind(2) if ac.shape[2] > 1 else [ac[:, :, 0]] * T, reverse)
    b_steps = _ordered(bc.unbind(2), reverse)  # T x (B, n, P)
    x = None
    for a_t, b_t in zip(a_steps, b_steps):  # 1. every chunk from a zero state
        x = b_t if x is None else torch.addcmul(b_t, a_t, x)  # (B, n, P)
    pi = ac.expand(-1, -1, T, -1).prod(dim=2).expand(-1, n, -1)  # (B', n, P')
    s = bc.new_zeros(B, P) if h0 is None else h0.expand(B, P)  # (B, P)
    s_in = []
    for x_c, pi_c in zip(_ordered(x.unbind(1), reverse), _ordered(pi.unbind(1), reverse)):
        s_in.append(s)  # 2. carry the state across chunks
        s = x_c + pi_c * s  # (B, P)
    x = torch.stack(_ordered(s_in, reverse), dim=1)  # (B, n, P) state entering each chunk
    for a_t, b_t, h_t in zip(a_steps, b_steps, _ordered(out.unbind(2), reverse)):
        x = torch.addcmul(b_t, a_t, x, out=h_t)  # (B, n, P)  3. every chunk from its entering state
    return s


def _loop_into(a, b, h, reverse, out):
    """The loop of `_loop`, written into out (B, l, P). a (B', l|1, P'), b (B, l, P), h (B, P)."""
    a = a.expand(-1, b.shape[1], -1)  # (B', l, P')
    for a_k, b_k, h_k in zip(*(_ordered(x.unbind(1), reverse) for x in (a, b, out))):
        h = torch.addcmul(b_k, a_k, h, out=h_k)  # (B, P)


def _chunked_scan(a, b, h0, reverse):
    """Forward scan: two-level loop on n * T steps, plain loop on the r leftover ones.

    Shapes: a (B', L|1, P'); b (B, L, P); h0 (B, P) or None -> h (B, L, P)
    """
    B, L, P = b.shape
    T = _chunk_len(L)
    n, r = divmod(L, T)
    main, rest = (slice(r, L), slice(0, r)) if reverse else (slice(0, n * T), slice(n * T, L))
    tv = a.shape[1] > 1  # time-varying A_bar
    ac = a[:, main].reshape(a.shape[0], n, T, -1) if tv else a.unsqueeze(2)  # (B', n|1, T|1, P')
    h = torch.empty_like(b)  # (B, L, P)
    s = _two_level(ac, b[:, main].reshape(B, n, T, P), h0, reverse, h[:, main].view(B, n, T, P))
    if r > 0:
        _loop_into(a[:, rest] if tv else a, b[:, rest], s, reverse, h[:, rest])  # (B, r, P)
    return h


# ---------------------------------------------------------------- the fast scan with its backward
class _Scan(torch.autograd.Function):
    """Scan of promoted inputs a (B', L|1, P'), b (B, L, P), h0 (broadcast to (B, P)) or None.

    Backward, written for reverse=False (reverse=True swaps k-1 and k+1 and the ends):
        lambda_k  = grad_h_k + conj(A_bar_(k+1)) * lambda_(k+1),  lambda_(L-1) = grad_h_(L-1)
        grad_Bu_k = lambda_k                 (lambda_k = total gradient of h_k)
        grad_A_k  = lambda_k * conj(h_(k-1)),  h_(-1) = h0, summed down to A_bar's shape
        grad_h0   = conj(A_bar_0) * lambda_0
    The first line is a scan in the opposite direction with conj(A_bar) shifted by one step.
    """

    @staticmethod
    def forward(ctx, a, b, h0, reverse):
        h = _chunked_scan(a, b, h0, reverse)  # (B, L, P)
        ctx.save_for_backward(a, h, h0)
        ctx.reverse = reverse
        return h

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        return (*_scan_grads(a, h, h0, grad_h, ctx.reverse, ctx.needs_input_grad), None)


def _scan_grads(a, h, h0, grad_h, rev, needs):
    """The gradients of a, b and h0 (`_Scan`'s docstring) from the states h; differentiable (under
    create_graph, a second derivative goes through them). Shapes: a (B', L|1, P'), h (B, L, P)."""
    a_c = a.conj()  # (B', L|1, P'); the shift's cat (or resolve_conj) materialises it once
    a_next = _shift(a_c, a_c[:, :1], rev, +1) if a.shape[1] > 1 else a_c.resolve_conj()
    lam = _Scan.apply(a_next, grad_h, None, not rev)  # (B, L, P)
    grad_a = grad_h0 = None
    if needs[0]:
        h_start = torch.zeros_like(h[:, 0]) if h0 is None else h0.expand_as(h[:, 0])  # (B, P)
        grad_a = _times_conj_prev(lam, h, h_start, rev).sum_to_size(a.shape)  # (B', L|1, P')
    if h0 is not None and needs[2]:
        k0 = -1 if rev else 0  # the first step taken
        grad_h0 = (a[:, k0].conj() * lam[:, k0]).sum_to_size(h0.shape)  # (B, P)
    return grad_a, lam, grad_h0


def _shift(x, fill, reverse, step):
    """x_(k+step) along the scan direction, `fill` (length 1 on dim 1) where that runs off the end.

    Shapes: x (B', L, P'), fill (B', 1, P') -> (B', L, P')
    """
    if (step > 0) != reverse:  # take from later in L
        return torch.cat([x[:, 1:], fill], dim=1)
    return torch.cat([fill, x[:, :-1]], dim=1)


def _times_conj_prev(lam, h, h_start, reverse):
    """lam_k * conj(h_prev(k)), h_prev the state before step k (h_start before the first), no cat.

    Shapes: lam, h (B, L, P); h_start (B, P) -> (B, L, P)
    """
    if torch.is_grad_enabled():  # double backward: out= is not differentiable, use cat instead
        return lam * _shift(h, h_start.unsqueeze(1), reverse, -1).conj()  # (B, L, P)
    out = torch.empty_like(lam)  # (B, L, P)
    first, body, prev = 0, slice(1, None), slice(0, -1)
    if reverse:
        first, body, prev = -1, prev, body
    torch.mul(lam[:, body], h[:, prev].conj(), out=out[:, body])  # (B, L-1, P)
    torch.mul(lam[:, first], h_start.conj(), out=out[:, first])  # (B, P)
    return out


# ---------------------------------------------------------------- the native scan
def _native_problem(a, b, h0):
    """Why the native kernel cannot run this scan ('' when it can): a constant A_bar, complex64 on
    the CPU, h0 of shape (B, P) or none, and the kernels built (ops/chunked_native.py)."""
    if a.shape[:2] != (1, 1):
        return "A_bar varies over time or batch"
    if b.dtype != torch.complex64 or b.device.type != "cpu":
        return f"complex64 on the CPU only (got {b.dtype} on {b.device})"
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        return "h0 must be (B, P)"
    return "" if chunked_native.available() else chunked_native.why_unavailable()


class _NativeScan(torch.autograd.Function):
    """The scan of a constant a (P,) complex64 over b (B, L, P) from h0 (B, P) or zero, on the
    native kernels `scan_fwd` / `scan_bwd` (the same recurrences as `_Scan`, one sequential loop per
    batch row)."""

    @staticmethod
    def forward(ctx, a_in, b, h0_in, reverse):
        lib = chunked_native.library()
        a, b = chunked_native.dense(a_in, b)
        h0 = None if h0_in is None else chunked_native.dense(h0_in)[0]
        B, L, P = b.shape
        h = torch.empty_like(b)
        lib.scan_fwd(ptr(h), ptr(b), ptr(a), ptr(h0), B, L, P, int(reverse))
        ctx.save_for_backward(a_in, h, h0_in)  # as given (dense() may copy): their graphs, for create_graph
        ctx.reverse = reverse
        return h

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: `_Scan`'s gradients, which are differentiable
            grad_a, lam, grad_h0 = _scan_grads(a[None, None], h, h0, g, ctx.reverse, ctx.needs_input_grad)
            return None if grad_a is None else grad_a.reshape(a.shape), lam, grad_h0, None
        lib = chunked_native.library()
        a, g = chunked_native.dense(a, g)
        h0 = None if h0 is None else chunked_native.dense(h0)[0]
        B, L, P = h.shape
        lam, ga = torch.empty_like(h), h.new_empty(B, P)
        gh0 = h.new_empty(B, P) if h0 is not None and ctx.needs_input_grad[2] else None
        lib.scan_bwd(ptr(lam), ptr(g), ptr(h), ptr(a), ptr(h0), ptr(ga), ptr(gh0),
                     B, L, P, int(ctx.reverse))
        return ga.sum(0), lam, gh0, None


@chunked_native.eager
def _native_scan(a, b, h0, reverse):
    return _NativeScan.apply(a, b, h0, reverse)


def scan(A_bar, Bu, h0=None, reverse=False):
    """Fast scan (chunked two-level loop; backward is a scan too). Same contract as `scan_ref`.

    h_k = A_bar_k * h_(k-1) + Bu_k, h_(-1) = h0  (reverse: h_k = A_bar_k * h_(k+1) + Bu_k, h_L = h0)

    Differentiable in A_bar, Bu and h0 (complex too: PyTorch's conjugate convention, module
    docstring). The precision given is kept (float32 stays float32); a real A_bar with a complex
    Bu gets a real gradient (the real part).

    Shapes:
        A_bar: (P,) or anything broadcastable to (B, L, P), e.g. (L, P) or (B, L, P)
        Bu:    (B, L, P)
        h0:    (B, P) or None (zeros)
        h:     (B, L, P), dtype promoted from A_bar, Bu (and h0)
    """
    devices = [t.device for t in (A_bar, Bu, h0) if torch.is_tensor(t)]
    if any(d != devices[0] for d in devices):
        names = ", ".join(f"{n} on {t.device}" for n, t in zip(("A_bar", "Bu", "h0"), (A_bar, Bu, h0))
                          if torch.is_tensor(t))
        raise ValueError(f"scan: A_bar, Bu and h0 must be on one device; got {names}")
    a, b, h0 = _prepare(A_bar, Bu, h0, reverse)  # (B', L', P'), (B, L, P), (B, P)
    why = _native_problem(a, b, h0)
    chunked_native.log_path(log, chunked_native.SCAN, "native kernel", "PyTorch loop", why)
    if not why:  # a constant A_bar in complex64 on the CPU: the native kernel
        # (P,); an A_bar of one mode for all (shape (1,) or ()) is expanded: the kernel reads P numbers
        return _native_scan(a.reshape(-1).expand(b.shape[2]), b, h0, reverse)  # (B, L, P)
    return _Scan.apply(a, b, h0, reverse)  # (B, L, P)
