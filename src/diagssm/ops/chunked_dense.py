"""Chunked matrix-multiply evaluation of H dense real LTI systems: S4's system on the CPU.

    x_k = A x_(k-1) + B u_k,   y_k = C x_k + D u_k      (per channel h; x has n real coordinates)

S4's bilinear DPLR system (`layers.s4`) is such a system once its conjugate-doubled complex state
is written in real coordinates (n = N = 2M). Its usual evaluation is the FFT convolution with the
Cauchy kernel, which the CPU's slow FFT bounds. The algorithm of `chunked` (the state-passing
idea of chunked scans) needs only linearity and time invariance, so it applies with a dense carry:

    S_c      = sum_j A^(T-1-j) B u_(cT+j)                 chunk sums: one (T -> n) matmul
    x_c      = A^T x_(c-1) + S_c                           a loop over the L/T chunk boundaries,
                                                           each step one (B, n) x (n, n) product
    y_(cT+j) = sum_(i<=j) K[j-i] u_(cT+i) + C A^(j+1) x_(c-1)      K[l] = C A^l B (+ D at l = 0)

Per step and channel that is T (Toeplitz) + n (in) + C'n (out) + n^2/T (carry) multiply-adds,
~256 at n = T = 64: batched matmuls, exact (nothing approximated; the same kernel taps as the FFT
path, whose C_tilde correction only undoes its circular wrap-around). The powers come by doubling
(`row_powers`), 6 matmuls of the (n, n) matrices at T = 64, not one per tap.

Kernels: where they can (float32 on the CPU, n a multiple of 4; `chunked_native.unsupported`), the
op runs on the native kernels of the diagonal op (`chunked_native.ChunkedNative`: the same weights
in and out of the state, with a dense carry, `dense_carry` in native.c), on the (B, L, H) layout
itself. Elsewhere PyTorch's batched matmuls: u is copied once into chunk-major rows (H, nc, B, T) by
`chunked._load` (and back by `_store`), so every carry step reads and writes contiguous (H, B, n)
blocks, and `_Carry` runs the loop over chunks with a hand-written backward: autograd's would save a
view per chunk and make per-chunk copies (3.3 s against 1.2 s a forward + backward in a first
prototype at B = 16, H = 128, L = 16384).
"""
import logging

import torch

from . import chunked_native
from .chunked import _blocks, _load, _stage, _store, _toeplitz, block_size, check_u, chunk_size

log = logging.getLogger(__name__)


def row_powers(v, M, T):
    """Rows v M^j for j < T, by doubling: log2 T products with the squares M^(2^k); and the last
    square, M^t with t the power of two >= T (M^T itself when T is a power of two).

    Shapes: v (..., n); M (..., n, n) (broadcast against v's batch dims) -> (..., T, n), (..., n, n)
    """
    R, P = v[..., None, :], M  # (..., 1, n), M^(rows of R)
    while R.shape[-2] < T:
        R = torch.cat([R, R @ P], dim=-2)  # (..., 2j, n)
        P = P @ P
    return R[..., :T, :], P


def _to_chunks(x, T, rows):
    """rows (H, nc, B, K, T) <- x (B, L, K, H) by `chunked._load`, in time blocks small enough that
    its staging copy stays in cache (one pass over all of x: 420 ms against ~90 at L = 16384)."""
    H, nc, Bsz, K, _ = rows.shape
    nbmax = block_size(nc, H * Bsz * K * T)
    stage = x.new_empty(Bsz * nbmax * K * H * T)
    for _, c0, nb, _ in _blocks(nc, nbmax):
        _load(x, c0 * T, T, rows[:, c0:c0 + nb], _stage(stage, Bsz, nb, K, H, T))
    return rows


def _from_chunks(rows, T, x):
    """x (B, L, K, H) <- rows (H, nc, B, K, T), cropped to L: the inverse of `_to_chunks`."""
    H, nc, Bsz, K, _ = rows.shape
    nbmax = block_size(nc, H * Bsz * K * T)
    stage = x.new_empty(Bsz * nbmax * K * H * T)
    for _, c0, nb, _ in _blocks(nc, nbmax):
        _store(rows[:, c0:c0 + nb], c0 * T, T, x, _stage(stage, Bsz, nb, K, H, T))
    return x


class _ToChunks(torch.autograd.Function):
    """u (B, L, H) -> chunk rows (H, nc, B, T), zeros past L; the backward copies back."""

    @staticmethod
    def forward(ctx, u, T):
        Bsz, L, H = u.shape
        nc = -(-L // T)
        ctx.L = L
        return _to_chunks(u[:, :, None], T, u.new_empty(H, nc, Bsz, 1, T))[:, :, :, 0]

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, g):
        H, nc, Bsz, T = g.shape
        return _from_chunks(g[:, :, :, None], T, g.new_empty(Bsz, ctx.L, 1, H))[:, :, 0], None


class _FromChunks(torch.autograd.Function):
    """Chunk rows (H, nc, B, K, T) -> y (B, L, K, H), cropped to L; the backward loads back."""

    @staticmethod
    def forward(ctx, z, L):
        H, nc, Bsz, K, T = z.shape
        ctx.T = T
        return _from_chunks(z, T, z.new_empty(Bsz, L, K, H))

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, gy):
        Bsz, L, K, H = gy.shape
        T = ctx.T
        nc = -(-L // T)
        return _to_chunks(gy.contiguous(), T, gy.new_empty(H, nc, Bsz, K, T)), None


class _Carry(torch.autograd.Function):
    """The states entering each chunk: X[0] = x0, X[c] = A^T X[c-1] + S[c-1] (A^T passed as `AT`).

    Backward, with G[c] the total gradient of X[c]: G[c-1] = gX[c-1] + G[c] AT (rows), then
    gS[c-1] = G[c], g_AT = sum_c G[c]^T X[c-1], g_x0 = G[0].
    Shapes: S (H, nc - 1, B, n) (the last chunk's sum feeds no entering state); AT (H, n, n);
    x0 (H, B, n) -> X (H, nc, B, n)
    """

    @staticmethod
    def forward(ctx, S, AT, x0):
        H, nc1, Bsz, n = S.shape
        X = S.new_empty(H, nc1 + 1, Bsz, n)
        X[:, 0] = x = x0
        rows = AT.transpose(1, 2)  # x AT^T on (B, n) rows
        for c in range(1, nc1 + 1):
            x = torch.baddbmm(S[:, c - 1], x, rows)  # (H, B, n) contiguous
            X[:, c] = x
        ctx.save_for_backward(AT, X)
        return X

    @staticmethod
    @chunked_native.without_autocast
    def backward(ctx, gX):
        AT, X = ctx.saved_tensors
        H, nc, Bsz, n = X.shape
        G = torch.empty_like(X)
        G[:, -1] = g = gX[:, -1]
        for c in range(nc - 1, 0, -1):
            g = torch.baddbmm(gX[:, c - 1], g, AT)  # (H, B, n)
            G[:, c - 1] = g
        g_AT = torch.bmm(G[:, 1:].reshape(H, -1, n).transpose(1, 2), X[:, :-1].reshape(H, -1, n))  # (H, n, n)
        return G[:, 1:], g_AT, G[:, 0]


def _check(u, A, B, C, D, h0):
    check_u(u)
    H = u.shape[-1]
    if A.dim() != 3 or A.shape[0] != H or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must be (H, n, n) with H={H}; got {tuple(A.shape)}")
    n = A.shape[-1]
    if B.shape != (H, n):
        raise ValueError(f"B must be (H, n)={(H, n)}; got {tuple(B.shape)}")
    if C.dim() != 3 or C.shape[1:] != (H, n):
        raise ValueError(f"C must be (C', H, n) with (H, n)={(H, n)}; got {tuple(C.shape)}")
    if D is not None and D.shape != C.shape[:2]:
        raise ValueError(f"D must be (C', H)={tuple(C.shape[:2])}; got {tuple(D.shape)}")
    if h0 is not None and h0.shape != (u.shape[0], H, n):
        raise ValueError(f"h0 must be (B, H, n)={(u.shape[0], H, n)}; got {tuple(h0.shape)}")
    dtypes = {t.dtype for t in (u, A, B, C, D, h0) if t is not None}
    if len(dtypes) > 1 or u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"u, A, B, C, D and h0 must share one real dtype (float32 or float64); got {dtypes}")


def native_problem(u, Cp, T, n):
    """Why the native kernels cannot run this op ('' when they can): `chunked_native.unsupported`, whose
    modes M are n / 2 here, so n must be a multiple of 4."""
    return f"n = {n} state coordinates: a multiple of 4 only" if n % 4 else chunked_native.unsupported(u, Cp, T, n // 2)


@chunked_native.without_autocast_op
def dense_chunked(u, A, B, C, D=None, h0=None, chunk=None, native=None):
    """Outputs and final state of H dense real LTI systems by chunked matmuls (module docstring).

    Shapes:
        u (B, L, H); A (H, n, n); B (H, n); C (C', H, n); D (C', H) or None (no skip term);
        h0 (B, H, n) or None (zero); all real, one dtype
        returns y (B, L, C', H) and the final state x_(L-1) (B, H, n)
    `chunk` (T) defaults to `chunked.chunk_size(L)`. `native`: run on the native kernels (True:
    required, an error where they cannot; False: the PyTorch path; None: native where they can).
    """
    _check(u, A, B, C, D, h0)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk={chunk!r} must be None (the default) or an int >= 1")
    if native is not None and not isinstance(native, bool):
        raise ValueError(f"native={native!r} must be None (native where it runs), True or False")
    Bsz, L, H = (int(size) for size in u.shape)  # ints: under torch.jit.trace sizes are tensors
    Cp, n, T = C.shape[0], A.shape[-1], chunk or chunk_size(L)
    nc, r = -(-L // T), L - (-(-L // T) - 1) * T  # chunks; real steps of the last one (1..T)
    G, _ = row_powers(B, A.transpose(1, 2), T)  # (H, T, n) rows A^j B
    O, A_t = row_powers((C[..., None, :] @ A)[..., 0, :], A, T)  # (C', H, T, n) rows C A^(j+1); A^t, t >= T
    AT = A_t if T & (T - 1) == 0 else torch.linalg.matrix_power(A, T)  # (H, n, n) A^T (t = T: a power of two)
    K = (C[:, :, None, :] * G).sum(-1)  # (C', H, T) taps C A^j B
    if D is not None:
        K = K + D[..., None] * (torch.arange(T, device=u.device) == 0)  # y = K * u + D u: D joins tap 0
    W_toe = _toeplitz(K, T).transpose(-1, -2).permute(1, 2, 0, 3).reshape(H, T, Cp * T)  # (H, T, C'T) [i, c j]
    W_out = O.permute(1, 3, 0, 2).reshape(H, n, Cp * T)  # (H, n, C'T)
    x0 = u.new_zeros(H, Bsz, n) if h0 is None else h0.transpose(0, 1)  # (H, B, n)
    why = "native=False" if native is False else native_problem(u, Cp, T, n)
    if native and why:
        raise ValueError(f"dense_chunked(native=True): {why}")
    chunked_native.log_path(log, chunked_native.DENSE_OP, "native kernels", "PyTorch kernels", why)
    if not why:
        into_r = torch.cat([G[:, :r].flip(1), G.new_zeros(H, T - r, n)], 1)  # (H, T, n), zero past r
        y, x_last = chunked_native.apply_on_lanes(u, torch.cat([W_toe, W_out], 1), G.flip(1),
                                                  AT, into_r,
                                                  torch.linalg.matrix_power(A, r), x0, T)
        return y, x_last.transpose(0, 1)
    U = _ToChunks.apply(u, T)  # (H, nc, B, T)
    S = torch.bmm(U[:, :-1].reshape(H, -1, T), G.flip(1)).view(H, nc - 1, Bsz, n)  # sums of A^(T-1-j) B u_j
    X = _Carry.apply(S, AT, x0)  # (H, nc, B, n)
    Y = torch.baddbmm(torch.bmm(U.reshape(H, -1, T), W_toe), X.reshape(H, -1, n), W_out)  # (H, nc B, C'T)
    y = _FromChunks.apply(Y.view(H, nc, Bsz, Cp, T), L)  # (B, L, C', H)
    into_r = G[:, :r].flip(1)  # (H, r, n) rows A^(r-1-j) B of the last chunk's r real steps
    x_last = X[:, -1] @ torch.linalg.matrix_power(A, r).transpose(1, 2) + U[:, -1, :, :r] @ into_r  # (H, B, n)
    return y, x_last.transpose(0, 1)


def dense_chunked_ref(u, A, B, C, D=None, h0=None, chunk=None):
    """Reference twin of `dense_chunked`: the recurrence, one step at a time (`chunk` ignored)."""
    _check(u, A, B, C, D, h0)
    x = u.new_zeros(u.shape[0], *B.shape) if h0 is None else h0  # (B, H, n)
    ys = []
    for u_k in u.unbind(1):  # (B, H)
        x = (A @ x[..., None])[..., 0] + B * u_k[..., None]  # (B, H, n)
        y = (C * x[:, None]).sum(-1)  # (B, C', H)
        ys.append(y if D is None else y + D * u_k[:, None])
    return torch.stack(ys, 1), x  # (B, L, C', H), (B, H, n)
