"""Chunked matrix-multiply evaluation of H independent diagonal SSMs (S4D, DSS).

    x_k = exp(w) x_{k-1} + B_bar u_k,   y_k = factor Re sum_n C_n x_{k,n} + D u_k    (per channel h)

A diagonal SSM is linear and time-invariant, so the sequence can be cut into chunks of T steps
(the state-passing idea of chunked scans). Inside a chunk the output is a (T, T) lower-triangular
Toeplitz matrix of the kernel's first T taps (D added to tap 0) times the chunk's inputs; between
chunks only the M = N/2 complex modes are carried:

    S_c      = sum_j A^(T-1-j) B_bar u_(cT+j)             chunk sums, (T -> 2M) matmul
    x_c      = A^T x_(c-1) + S_c                           a scan over the L/T chunk boundaries
    y_(cT+j) = sum_(i<=j) K[j-i] u_(cT+i) + factor Re sum_n C_n A_n^(j+1) x_(c-1,n)

With Z_c = [u_c | x_(c-1)] (a row of T + 2M reals) the output is one matmul, y_c = Z_c W with
W = [Toeplitz^T ; out-of-state] ((T + 2M) x C'T). Every heavy step is a batched real matrix
multiply, which CPUs (and GPUs' tensor cores) run far faster than FFTs or elementwise scans; the
work is O(B L H (T + M)) and nothing is approximated.

Kernels: where it can (float32 on the CPU; `chunked_native.unsupported`), the op
runs these contractions on the native kernels of `chunked_native`, which work on the (B, L, H)
layout directly with the channel as the vector lane and skip the zero half of each Toeplitz block.
Elsewhere it runs `_Chunked` below, PyTorch's batched matmuls on chunk-layout copies of u and y.
At B = 16, H = 128, N = 64, L = 16384 on 2 cores a forward + backward of the op took ~300 ms on
the native kernels against ~420 ms on the PyTorch path (`benchmarks/bench_chunked.py --kernels`).

Memory: `_Chunked` keeps u and the states entering each chunk for the backward: (L/T) B H M
complex numbers, as many floats as u when T = 2M (fwd+bwd 8-12% faster than recomputing them in
the backward, for ~92 MB more at B = 16, H = 128, L = 16384: benchmarks/README.md). It runs in
time blocks of a few chunks (`block`), so its other scratch memory is that of one block, not of
the whole (B, L, H) problem.
"""
import logging
import math

import torch

from . import chunked_native

log = logging.getLogger(__name__)

# numbers (floats) of one time block's inputs: 2 MB in float32, 4 chunks at B = 16, H = 128, T = 64.
# Fwd+bwd at B = 16, H = 128, N = 64, 2 threads (benchmarks/bench_chunked.py --block): 4 chunks per
# block against 16 (2^21 numbers) 58 vs 75 ms at L = 1024, 152 vs 233 at 4096, 510/587/603 vs
# 577/608/629 at 16384 (three paired runs), 2067 vs 2609 at 65536; 2 or 32 chunks were slower.
BLOCK_NUMBERS = 1 << 19
# On a GPU fewer, larger blocks: every block costs a few dozen kernel launches. Fwd+bwd of the op
# on an H100 at B = 16, H = 128, N = 64, L = 16384 (benchmarks/bench_chunked.py --device cuda
# --block K, docs/benchmarks/chunked-gpu-h100.md): 67, 34, 26, 20 ms for 4, 16, 64, 256 chunks per
# block, peak 625, 678, 895, 1887 MB.
# 2^23 numbers is 64 chunks there.
BLOCK_NUMBERS_GPU = 1 << 23


def chunk_size(L):
    """The chunk length T for a sequence of length L: 64, or the next power of two >= L for
    shorter sequences. (At L = 16384 on the 2-core AVX2 machine the native op took 375-389 ms a
    forward + backward at T = 64, 394-397 at 32 and 472-487 at 128, two alternated rounds:
    docs/benchmarks/chunked-chunk-size-session19.md.)"""
    return min(64, 1 << max(0, math.ceil(math.log2(L))))


def block_size(nc, numbers_per_chunk, device="cpu"):
    """Chunks per time block: as many as keep one block's inputs under BLOCK_NUMBERS numbers
    (BLOCK_NUMBERS_GPU on a GPU; at least one, at most all nc)."""
    budget = BLOCK_NUMBERS_GPU if torch.device(device).type == "cuda" else BLOCK_NUMBERS
    return max(1, min(nc, budget // max(1, numbers_per_chunk)))


def _pairs(z):
    """A complex (..., M, T) matrix as a real (..., 2M, T) one with rows (Re z_m, Im z_m) interleaved,
    matching the memory layout of `torch.view_as_real` of an (..., M) complex vector."""
    return torch.view_as_real(z.transpose(-1, -2)).flatten(-2).transpose(-1, -2)


def _powers(w, j):
    """exp(w j) for complex w (..., M) and real steps j (T,): (..., M, T), from the real exp, cos and
    sin of the real and imaginary parts (the same products w j, so the same values as the complex exp
    to rounding; several times faster on the CPU, forward and backward)."""
    re, im = w.real[..., None] * j, w.imag[..., None] * j
    mag = torch.exp(re)
    return torch.complex(mag * torch.cos(im), mag * torch.sin(im))


def _toeplitz(K, T):
    """Lower-triangular Toeplitz matrices of the first T taps: Toep[..., j, i] = K[..., j-i] (j >= i).

    Shapes: K (..., T) -> (..., T, T)
    """
    padded = torch.cat([K.new_zeros(*K.shape[:-1], T - 1), K], -1)  # (..., 2T - 1): T - 1 zeros, then K
    # windows w[s][m] = padded[s + m] = K[s + m - (T - 1)] (a view), so Toep[j, i] = w[T - 1 - i][j]; as views
    # and one flip, not a gather, its backward is a sum over windows rather than an indexed scatter
    return padded.unfold(-1, T, 1).flip(-2).transpose(-1, -2)


def check_u(u):
    """u must be (B, L, H) with B, L >= 1 (L = 0 had failed in `chunk_size` with "math domain error")."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, L, H); got {tuple(u.shape)}")
    if min(u.shape[:2]) < 1:
        raise ValueError(f"u {tuple(u.shape)} must have B, L >= 1")


def _check(u, w, B_bar, C, h0, D):
    check_u(u)
    H = u.shape[-1]
    if w.dim() != 2 or w.shape[0] != H or B_bar.shape != w.shape:
        raise ValueError(f"w and B_bar must be (H, M) with H={H}; got {tuple(w.shape)}, {tuple(B_bar.shape)}")
    if C.dim() != 3 or C.shape[1:] != w.shape:
        raise ValueError(f"C must be (C', H, M) with (H, M)={tuple(w.shape)}; got {tuple(C.shape)}")
    if h0 is not None and h0.shape != (u.shape[0],) + tuple(w.shape):
        raise ValueError(f"h0 must be (B, H, M)={(u.shape[0],) + tuple(w.shape)}; got {tuple(h0.shape)}")
    if D is not None and D.shape != C.shape[:2]:
        raise ValueError(f"D must be (C', H)={tuple(C.shape[:2])}; got {tuple(D.shape)}")
    real = {t.dtype for t in (u, D) if t is not None}
    cplx = {t.dtype for t in (w, B_bar, C, h0) if t is not None}
    if len(real) > 1 or len(cplx) > 1 or u.dtype not in (torch.float32, torch.float64) or \
            cplx != {u.dtype.to_complex()}:
        raise ValueError(f"u and D must be one real dtype and w, B_bar, C and h0 its complex one "
                         f"(float32 with complex64, float64 with complex128); got {real} and {cplx}")


def _load(x, l0, T, dst, stage):
    """dst (H, nb, B, K, T) <- steps l0 .. l0 + nb T of x (B, L, K, H) in chunk layout, zeros past L.

    Two copies through `stage` (B, nb, K, H, T): a (T, H) -> (H, T) transpose per (batch row,
    chunk, K), small enough to stay in cache, then one permutation with contiguous runs of T
    numbers. All of a (16, 16384, 128) float32 u took 11.8-12.5 ms this way on this CPU
    (`benchmarks/bench_chunked.py --parts`), against 36.5 ms with a 2-D transpose of each whole
    (L, H) batch row in place of the per-chunk tiles."""
    H, nb, Bsz, K, _ = dst.shape
    n = min(nb * T, x.shape[1] - l0)
    full, r = divmod(int(n), int(T))  # int: under torch.jit.trace sizes are tensors
    src = x[:, l0:l0 + full * T].view(Bsz, full, T, K, H)
    stage[:, :full].copy_(src.permute(0, 1, 3, 4, 2))
    if r:  # the sequence's last chunk, r < T real steps (blocks from `_blocks` end there)
        stage[:, full, :, :, :r].copy_(x[:, l0 + full * T:l0 + n].permute(0, 2, 3, 1))
        stage[:, full, :, :, r:] = 0
    dst.copy_(stage.permute(3, 1, 0, 2, 4))
    return dst


def _store(z, l0, T, x, stage):
    """The inverse of `_load`: steps l0 .. of x (B, L, K, H) <- z (H, nb, B, K, T), cropped to L."""
    H, nb, Bsz, K, _ = z.shape
    n = min(nb * T, x.shape[1] - l0)
    full, r = divmod(int(n), int(T))  # int: under torch.jit.trace sizes are tensors
    stage.copy_(z.permute(2, 1, 3, 0, 4))  # (B, nb, K, H, T)
    x[:, l0:l0 + full * T].view(Bsz, full, T, K, H).copy_(stage[:, :full].permute(0, 1, 4, 2, 3))
    if r:
        x[:, l0 + full * T:l0 + n].copy_(stage[:, full, :, :, :r].permute(0, 3, 1, 2))


def _put_states(Z, T, X):
    """Z[..., T':] <- the states X (nb, H, B, M) complex as (Re, Im) pairs (and column T zero for an
    odd T). Shapes: Z (H, nb, B, T' + 2M)."""
    if T % 2:
        Z[..., T] = 0
    Z[..., T + T % 2:].copy_(torch.view_as_real(X).transpose(0, 1).flatten(-2))


def _states(Z, T, into, aT, a_exit, into_exit, x_in, X):
    """The states entering each chunk of a block, and the state leaving it.

    x_(c) = A^T x_(c-1) + S_(c-1) inside the block (S from one (T -> 2M) matmul over all its
    chunks, the last one's S being the exit's input sum unless it is the sequence's last chunk), then
    exit = a_exit x_last + u_last into_exit (A^T and `into` except for the sequence's last chunk,
    which has r <= T real steps). A loop over the block's chunks, chunk-major (the scratch X) so
    that every step is one fused multiply-add on contiguous memory.
    Shapes: Z (H, nb, B, T' + 2M) = [u_c | x_(c-1)] rows, T' = T rounded up to even (complex views
    need even offsets; an odd T leaves column T zero); x_in (H, B, M) complex; X (nb, H, B, M)
    complex, filled with the states (X[0] = x_in), and Z[..., T':] with them as (Re, Im) pairs.
    Returns exit (H, B, M).
    """
    H, nb, Bsz, _ = Z.shape
    U = Z[..., :T]  # (H, nb, B, T)
    X[0] = x_in
    S = torch.view_as_complex((U.reshape(H, -1, T) @ into).view(H, nb, Bsz, -1, 2))  # (H, nb, B, M) chunk sums
    for c in range(1, nb):
        torch.addcmul(S[:, c - 1], aT[:, None], X[c - 1], out=X[c])
    _put_states(Z, T, X)
    last = S[:, -1] if into_exit is into else torch.view_as_complex((U[:, -1] @ into_exit).view(H, Bsz, -1, 2))
    return torch.addcmul(last, a_exit[:, None], X[-1])  # (H, B, M)


def _blocks(nc, nbmax):
    """(index, first chunk, chunks, last block?) of the time blocks of nbmax chunks over nc chunks."""
    return [(i, c0, min(nbmax, nc - c0), c0 + nbmax >= nc) for i, c0 in enumerate(range(0, nc, nbmax))]


def _stage(buffer, *shape):
    """A (B, nb, K, H, T) staging view at the start of a flat buffer."""
    return buffer[: math.prod(shape)].view(shape)


class _Chunked(torch.autograd.Function):
    """y = chunked SSM of u (module docstring) and the final state, one time block after another.

    Inputs (built with autograd from the parameters by `diagonal_chunked`): W (H, T' + 2M, C'T)
    = [Toeplitz^T ; 0 (odd T) ; out-of-state pairs] per channel, into (H, T, 2M) = pairs of
    B A^(T-1-j), aT (H, M) = A^T, into_r / a_r the same for the last chunk's r real steps,
    x0 (H, B, M); `nbmax` chunks per time block.
    Saved: u and the states entering every chunk (and, when there is one block, its [u | x] rows);
    the backward runs the blocks in reverse, rebuilding each block's [u | x] rows from them, and
    carries the state's gradient backwards with conj(A^T) (PyTorch's convention for complex
    gradients): lam_(c-1) = g_(c-1) + conj(A^T) lam_c.
    """

    @staticmethod
    def forward(ctx, u, W, into, aT, into_r, a_r, x0, T, nbmax):
        Bsz, L, H = u.shape
        nc, M, width, CT = -(-L // T), aT.shape[1], W.shape[1], W.shape[2]
        y = u.new_empty(Bsz, L, CT // T, H)
        Z, Y = u.new_empty(H, nbmax, Bsz, width), u.new_empty(H, nbmax * Bsz, CT)
        X, stage = x0.new_empty(nc, H, Bsz, M), u.new_empty(Bsz * (CT // T) * H * nbmax * T)
        x = x0
        for _, c0, nb, final in _blocks(nc, nbmax):
            a_exit, into_exit = (a_r, into_r) if final else (aT, into)
            Zb = Z[:, :nb]
            _load(u[:, :, None], c0 * T, T, Zb[..., None, :T], _stage(stage, Bsz, nb, 1, H, T))
            x = _states(Zb, T, into, aT, a_exit, into_exit, x, X[c0:c0 + nb])
            Yb = torch.bmm(Zb.view(H, nb * Bsz, width), W, out=Y[:, : nb * Bsz])  # (H, nb B, C'T)
            _store(Yb.view(H, nb, Bsz, CT // T, T), c0 * T, T, y, _stage(stage, Bsz, nb, CT // T, H, T))
        one = nbmax >= nc  # one block: keep its Z too (as small as a block) instead of reloading u
        ctx.save_for_backward(u, W, into, aT, into_r, a_r, X, Z if one else None, x0)
        ctx.T, ctx.nbmax = T, nbmax
        return y, x

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, gy, g_last):
        u, W, into, aT, into_r, a_r, X, Z_kept, x0 = ctx.saved_tensors
        T, nbmax = ctx.T, ctx.nbmax
        if torch.is_grad_enabled():  # create_graph (out= buffers are not differentiable): from the twin
            return chunked_native.grads_by_twin(chunked_native.chunks_ref, (u, W, into, aT, into_r, a_r, x0, T),
                                                ctx.needs_input_grad, (gy, g_last))
        Bsz, L, H = u.shape
        nc, M, width, CT = -(-L // T), aT.shape[1], W.shape[1], W.shape[2]
        Tp = T + T % 2
        gu, gW = torch.empty_like(u), torch.zeros_like(W)
        g_into, g_aT = torch.zeros_like(into), torch.zeros_like(aT)
        Z = u.new_empty(H, nbmax, Bsz, width) if Z_kept is None else Z_kept
        G = u.new_empty(H, nbmax, Bsz, CT // T, T)
        GU, GX = u.new_empty(H, nbmax * Bsz, T), u.new_empty(H, nbmax * Bsz, 2 * M)
        gS = u.new_empty(H, nbmax, Bsz, 2 * M)
        W_toe_t, W_out_t = W[:, :T].transpose(1, 2), W[:, Tp:].transpose(1, 2)  # (H, C'T, T), (H, C'T, 2M)
        stage = u.new_empty(Bsz * (CT // T) * H * nbmax * T)
        # gradient of the exit state (a lazy conjugate, from a loss on x.conj(), is resolved for view_as_real)
        lam = torch.zeros_like(X[0]) if g_last is None else g_last.resolve_conj()
        g_ar = g_into_r = None
        for _, c0, nb, final in reversed(_blocks(nc, nbmax)):
            a_exit, into_exit = (a_r, into_r) if final else (aT, into)
            Zb, Xb = Z[:, :nb], X[c0:c0 + nb]
            if Z_kept is None:  # [u | x] rows of the block again, from u and the kept states
                _load(u[:, :, None], c0 * T, T, Zb[..., None, :T], _stage(stage, Bsz, nb, 1, H, T))
                _put_states(Zb, T, Xb)
            Zv, Ub = Zb.view(H, nb * Bsz, width), Zb[..., :T].reshape(H, nb * Bsz, T)
            Gb = _load(gy, c0 * T, T, G[:, :nb], _stage(stage, Bsz, nb, CT // T, H, T)).view(H, nb * Bsz, CT)
            gW.baddbmm_(Zv.transpose(1, 2), Gb)
            gX = torch.view_as_complex(torch.bmm(Gb, W_out_t, out=GX[:, : nb * Bsz]).view(H, nb, Bsz, M, 2))
            lam_pairs = torch.view_as_real(lam).flatten(-2)  # (H, B, 2M)
            g_a_exit = (lam * Xb[-1].conj()).sum(1)  # exit = a_exit x_last + u_last into_exit
            gX[:, -1].addcmul_(a_exit[:, None].conj(), lam)
            for c in range(nb - 1, 0, -1):  # total gradients of the states, backwards
                gX[:, c - 1].addcmul_(aT[:, None].conj(), gX[:, c])
            # gradients of the chunk sums S_c = u_c into: x_(c+1)'s inside the block, the exit's for the
            # last chunk (which, in the sequence's last block, goes through into_r instead: kept apart)
            gSb = gS[:, :nb]
            gSb[:, :-1].copy_(torch.view_as_real(gX[:, 1:]).flatten(-2))
            if final:
                gSb[:, -1] = 0
                g_ar, g_into_r = g_a_exit, Zb[:, -1, :, :T].transpose(1, 2) @ lam_pairs
            else:
                gSb[:, -1].copy_(lam_pairs)
                g_aT += g_a_exit
            gSv = gSb.view(H, nb * Bsz, 2 * M)
            g_into.baddbmm_(Ub.transpose(1, 2), gSv)
            GUb = torch.bmm(Gb, W_toe_t, out=GU[:, : nb * Bsz]).baddbmm_(gSv, into.transpose(1, 2))  # (H, nb B, T)
            if final:
                GUb.view(H, nb, Bsz, T)[:, -1] += lam_pairs @ into_r.transpose(1, 2)
            if nb > 1:
                g_aT += (gX[:, 1:] * Xb[:-1].transpose(0, 1).conj()).sum((1, 2))  # x_c = A^T x_(c-1) + ...
            lam = gX[:, 0].clone()
            _store(GUb.view(H, nb, Bsz, 1, T), c0 * T, T, gu[:, :, None], _stage(stage, Bsz, nb, 1, H, T))
        return gu, gW, g_into, g_aT, g_into_r, g_ar, lam, None, None


@chunked_native.without_autocast_op
def diagonal_chunked(u, w, B_bar, C, factor=2, h0=None, chunk=None, D=None, block=None, native=None):
    """Outputs and final state of H diagonal SSMs, by chunked matrix multiplies (module docstring).

    Shapes:
        u: (B, L, H) real; w: (H, M) complex (log A_bar); B_bar: (H, M) complex; C: (C', H, M) complex
        h0: (B, H, M) complex or None (zero); D: (C', H) real or None (no skip term)
        returns y (B, L, C', H) real and the final state x_(L-1) (B, H, M) complex
    `chunk` (T) defaults to `chunk_size(L)`, `block` (chunks per time block) to `block_size`.
    `native`: run the contractions on the native kernels of `chunked_native` (True: required, an
    error if they cannot run this problem; False: the PyTorch path; None: native where they can).
    """
    _check(u, w, B_bar, C, h0, D)
    for name, value in (("chunk", chunk), ("block", block)):  # 0 would silently mean the default
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be None (the default) or an int >= 1")
    if native is not None and not isinstance(native, bool):  # 0 would have meant None, not False
        raise ValueError(f"native={native!r} must be None (native where it runs), True or False")
    Bsz, L, H = u.shape
    Cp, M, T = C.shape[0], w.shape[1], chunk or chunk_size(L)
    nc, r = -(-L // T), L - (-(-L // T) - 1) * T  # chunks; real steps of the last one (1..T)
    j = torch.arange(T, device=u.device, dtype=u.dtype)
    powers = _powers(w, j)  # (H, M, T) A^j
    K = factor * ((C * B_bar)[..., None] * powers).sum(-2).real  # (C', H, T) first T taps
    if D is not None:
        K = K + D[..., None] * (j == 0)  # y = K * u + D u: D joins tap 0
    out_of_state = _pairs(factor * C[..., None] * powers * torch.exp(w)[..., None])  # (C', H, 2M, T)
    out_of_state = out_of_state * torch.tensor([1.0, -1.0], dtype=u.dtype, device=u.device).repeat(M)[:, None]
    spare = K.new_zeros(Cp, H, T % 2, T)  # an odd T: a zero row for Z's spare column (see `_states`)
    W = torch.cat([_toeplitz(K, T).transpose(-1, -2), spare, out_of_state], -2)  # (C', H, T' + 2M, T)
    W = W.permute(1, 2, 0, 3).reshape(H, -1, Cp * T)  # (H, T' + 2M, C'T)
    into = _pairs(B_bar[..., None] * powers.flip(-1)).transpose(-1, -2)  # (H, T, 2M) B A^(T-1-j)
    # the last chunk: B A^(r-1-j) for its r real steps j < r, zero past them (powers reversed, no new exp)
    last = torch.cat([powers[..., :r].flip(-1), powers.new_zeros(H, M, T - r)], -1)
    into_r = _pairs(B_bar[..., None] * last).transpose(-1, -2)  # (H, T, 2M)
    x0 = u.new_zeros(H, Bsz, M, dtype=w.dtype) if h0 is None else h0.transpose(0, 1)  # (H, B, M)
    why = "native=False" if native is False else chunked_native.unsupported(u, Cp, T, M)
    if native and why:
        raise ValueError(f"diagonal_chunked(native=True): {why}")
    chunked_native.log_path(log, chunked_native.CHUNKED_OP, "native kernels", "PyTorch kernels", why)
    args = (u, W, into, torch.exp(w * T), into_r, torch.exp(w * r), x0, T)
    if why:
        y, x_last = _Chunked.apply(*args, block or block_size(nc, H * Bsz * T, u.device))
    else:
        y, x_last = chunked_native.apply_on_lanes(*args)
    return y, x_last.transpose(0, 1)


def diagonal_chunked_ref(u, w, B_bar, C, factor=2, h0=None, chunk=None, D=None, block=None):
    """Reference twin of `diagonal_chunked`: the recurrence, one step at a time (`chunk`, `block` ignored)."""
    _check(u, w, B_bar, C, h0, D)
    x = torch.zeros(u.shape[0], *w.shape, dtype=w.dtype) if h0 is None else h0  # (B, H, M)
    ys = []
    for u_k in u.unbind(1):  # (B, H)
        x = torch.exp(w) * x + B_bar * u_k[..., None]  # (B, H, M)
        y = factor * (C * x[:, None]).sum(-1).real  # (B, C', H)
        ys.append(y if D is None else y + D * u_k[:, None])
    return torch.stack(ys, 1), x  # (B, L, C', H), (B, H, M)
