"""The chunked diagonal SSM (ops/chunked.py) on native CPU kernels that read the (B, L, H) layout.

The PyTorch path of `diagonal_chunked` turns each chunk into rows of a batched matmul, one matrix
per channel, so every pass over u, y and their gradients first copies them into an (H, rows, T)
layout and back: five passes of (B, L, H) per forward + backward, at copy bandwidth. The kernels
in `native.c` instead run the same contractions with the channel h as the vector lane, straight on
(B, L, H): a chunk of one batch row is a contiguous (T, H) block, the weights are (K, I, H). No
layout pass is left, and the chunk states are carried by a native loop as well. Where the batch has
at least as many rows as torch has threads (`fused_forward`), the forward's full chunks run in one
native pass (`chunks_fwd`: per batch row, 8 chunks at a time, their sums, the carry and their outputs
while their packed inputs and new states are in cache); otherwise as three calls split over all rows.

The library is compiled on first use with the machine's C compiler (`cc`, or $CC) for the CPU it
runs on (-march=native; $DIAGSSM_NATIVE_MARCH names another target, e.g. x86-64 or haswell), into
$DIAGSSM_CACHE (default ~/.cache/diagssm) under a name keyed by the source, the flags and the CPU;
it is written to a temporary file and renamed into place. Its register tiles follow the target's
vector width (`vector_floats()`: 16 floats with AVX-512, 8 with AVX2, else 4). Without a
compiler, or with DIAGSSM_NATIVE=0, `available()` is False and callers use the PyTorch path.
Float32 on the CPU only, a chunk length that is a multiple of 4 and an even number of modes; the
kernels run H channels in multiples of LANES = 16, and `apply_on_lanes` pads other H with zero
channels where that costs at most PAD_LIMIT times the channels: `unsupported` says which condition
fails. C' > 1 output channels make each chunk of y a (T C', H) row (y is (B, L, C', H)): the output
weights' columns are taken in (step, channel) order to match. `ChunkedNative` also runs
`ops.chunked_dense`'s systems (S4), whose weights in and out of the state have the same shapes, with
a dense carry (`_DenseCarry`, `dense_carry`) in place of the diagonal one. The same
library holds the time-invariant scan of `ops.scan` (`scan_fwd`, `scan_bwd`; complex64) and the
fused S5 op of `ops.s5_native` (`s5_fwd`, `s5_bwd`).
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from diagssm.cpu import cpu_flags
from diagssm.files import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-std=gnu11", "-fopenmp", "-shared", "-fPIC")
LANES = 16
_state = {}  # "lib": the loaded library or None, "why": why not


def _cpu_id():
    """What -march=native depends on: the machine and its CPU flags."""
    return f"{platform.machine()} {platform.processor()} {' '.join(sorted(cpu_flags()))}"


def flags():
    """The compiler's flags: FLAGS, for the CPU that $DIAGSSM_NATIVE_MARCH names (default native)."""
    return (f"-march={os.environ.get('DIAGSSM_NATIVE_MARCH') or 'native'}",) + FLAGS


def _compile(cc, so):
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags(), "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    if os.environ.get("DIAGSSM_NATIVE", "1") == "0":
        return None, "DIAGSSM_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc, gcc or $CC) on PATH"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc,) + flags()).encode() + _cpu_id().encode())
    so = cache_dir() / f"native-{key.hexdigest()[:16]}.so"
    try:
        if not so.exists():
            _compile(cc, so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"could not build {SOURCE.name} with {cc}: {detail.strip()[:500]}"
    P, N = ctypes.c_void_p, ctypes.c_long
    lib.rows_mm.argtypes = [P, N, N, P, N, N, P, N, N, N, P, N, N, P, N, N, N, N, N]
    lib.rows_red.argtypes = [P, P, N, P, N, N, P, N, N, N, N, N, N, N, N, N]
    lib.rows_red_block.restype = lib.vector_floats.restype = lib.strip_width.restype = N
    lib.strip_width.argtypes = [N]
    lib.tile_weights.argtypes = [P, P] + [N] * 7
    lib.tile_weights.restype = None
    lib.carry_fwd.argtypes = [P, N, N, P, P, N, N, N, N]
    lib.chunks_fwd.argtypes = [P, N, N, P, N, N, P, N, N] + [P] * 5 + [N] * 6
    lib.chunks_fwd.restype = ctypes.c_int
    lib.carry_bwd.argtypes = [P, N, N, P, N, N, P, P, P, N, N, N, N, N]
    lib.dense_carry.argtypes = [P, N, N, P, N, N, N, N, N]
    lib.scan_fwd.argtypes = [P, P, P, P, N, N, N, N]
    lib.scan_bwd.argtypes = [P, P, P, P, P, P, P, N, N, N, N]
    lib.s5_fwd.argtypes = [P] * 9 + [N] * 5
    lib.s5_bwd.argtypes = [P] * 16 + [N] * 5
    lib.diag_step.argtypes = [P] * 8 + [ctypes.c_float] + [N] * 4
    lib.s5_step.argtypes = [P] * 8 + [N] * 3
    lib.dplr_step.argtypes = [P] * 14 + [N] * 5
    for f in (lib.carry_fwd, lib.carry_bwd, lib.scan_fwd, lib.scan_bwd, lib.s5_fwd, lib.s5_bwd, lib.diag_step,
              lib.s5_step, lib.dplr_step):
        f.restype = None
    lib.rows_mm.restype = lib.rows_red.restype = lib.dense_carry.restype = ctypes.c_int  # -1: scratch not allocated
    return lib, ""


def library():
    """The loaded kernels (built on first use), or None; `why_unavailable()` says why not."""
    if "lib" not in _state:
        _state["lib"], _state["why"] = _load()
        if _state["lib"] is None:
            log.info("native kernels (ops/native.c) unavailable: %s", _state["why"])
    return _state["lib"]


def available():
    return library() is not None


def vector_floats():
    """Floats per vector register in the loaded kernels' tiles (16: AVX-512, 8: AVX/AVX2, 4: other),
    or None where they are unavailable."""
    lib = library()
    return lib.vector_floats() if lib is not None else None


def why_unavailable():
    library()
    return _state["why"]


_paths = {}  # what -> the reason last logged by `log_path` ('' for the native path)
# the names under which the ops log their paths (`log_path`'s `what`)
CHUNKED_OP, S5_SCAN, SCAN = "chunked SSM op", "S5 scan", "scan"
DENSE_OP = "chunked dense SSM op"  # ops.chunked_dense (S4)


def paths(forget=False):
    """What `log_path` has recorded since the last `paths(forget=True)`: {what: '' for the native
    path, else why not}. forget: start a new record (and return the old one)."""
    taken = dict(_paths)
    if forget:
        _paths.clear()
    return taken


def dense(*ts):
    """The tensors as the kernels read them: contiguous, without a pending conjugate or negative bit
    (lazy views whose memory holds the unconjugated, unnegated values; unchanged, no op dispatched,
    when they are already)."""
    return tuple(t if t.is_contiguous() and not t.is_conj() and not t.is_neg()
                 else t.resolve_conj().resolve_neg().contiguous() for t in ts)


NATIVE_DTYPES = (torch.float32, torch.complex64)  # complex64: (Re, Im) float32 pairs
FLOAT32 = (torch.float32,)  # the weight tiling's: it reads (K, I, H) floats


def ptr(t, dtypes=NATIVE_DTYPES):
    """The address of t's memory for the library, which reads and writes it as raw float32 on the CPU:
    another dtype or device would be read as garbage or written past its end, so it is an error (a
    TypeError, which the ops' own checks should have made unreachable). None (an optional argument
    left out) gives None, a NULL pointer. `dtypes`: those allowed (the weight tiling: float32 only)."""
    if t is None:
        return None
    if not (t.is_cpu and t.dtype in dtypes):  # (not t.device.type: 6x slower, and a step passes ~9)
        raise TypeError(f"diagssm's native kernels take {' or '.join(str(d)[6:] for d in dtypes)} CPU tensors; got "
                        f"{t.dtype} on {t.device} (a diagssm bug where a layer passed it: please report it)")
    return t.data_ptr()


def no_autocast(t):
    """A context with torch.autocast off for the device of tensor `t` (the CPU's where `t` is not a
    tensor or autocast does not know its device, e.g. meta)."""
    try:
        return torch.autocast(device_type=t.device.type if torch.is_tensor(t) else "cpu", enabled=False)
    except RuntimeError:
        return torch.autocast(device_type="cpu", enabled=False)


def without_autocast(backward):
    """A custom autograd Function's `backward`, run with autocast off for its gradients' device.
    PyTorch runs a backward pass under its caller's autocast state (on the CPU `loss.backward()`
    inside an autocast block casts the backward's matmuls to bfloat16), while these forwards ran in
    the layers' float32 (`layers.base.autocast_off`) and the native kernels read float32 only: their
    backwards stay in float32. Built-in ops' backwards follow PyTorch's rule (wrap only the forward
    in autocast)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with no_autocast(next((g for g in grads if torch.is_tensor(g)), None)):
            return backward(ctx, *grads)
    return run


def without_autocast_op(op):
    """A public op computed in its inputs' precision, with torch.autocast off for the device of its
    first argument: under autocast, the matrix powers that `ops.dense_chunked` builds had come out
    bfloat16 (then refused by `ptr` on the native path, or bfloat16 outputs on the PyTorch one)."""
    @functools.wraps(op)
    def run(u, *args, **kwargs):
        with no_autocast(u):
            return op(u, *args, **kwargs)
    return run


def check_step_args(who, names, ts, dims, want, expected):
    """The step ops' argument check: tensors of the ranks `dims` whose shapes are `want(*ts)` (the
    sizes read from the tensors), else an error naming `who` and every argument's shape; `expected`
    says the shapes in words."""
    if not all(torch.is_tensor(t) for t in ts):
        raise TypeError(f"{who}: {', '.join(names)} must be tensors")
    if tuple(t.dim() for t in ts) != dims or tuple(t.shape for t in ts) != want(*ts):
        got = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(names, ts))
        raise ValueError(f"{who}: expected {expected}; got {got}")


def step_unsupported(reals, complexes):
    """Why a step op (ops/step.py, s5_native.s5_step) cannot run on its kernel ('' when it can): its
    real tensors must be float32 and its complex ones complex64, all on the CPU, with nothing to
    differentiate (the kernels build no autograd graph), and the kernels built."""
    ts = reals + complexes
    if not all(t.is_cpu for t in ts):
        return "CPU tensors only"
    if any(t.dtype != torch.float32 for t in reals) or any(t.dtype != torch.complex64 for t in complexes):
        return f"float32 inputs with complex64 states only (got {reals[0].dtype}, {complexes[0].dtype})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "autograd: a tensor requires grad"
    return "" if available() else why_unavailable()


def log_path(logger, what, native, fallback, why):
    """Say at INFO, whenever it changes, which path `what` runs: `native` ('' why) or `fallback` (why)."""
    if what not in _paths or _paths[what] != why:
        _paths[what] = why
        logger.info("%s: %s", what, native if not why else f"{fallback} ({why})")


def step_path(logger, what, why, ref, native, *args):
    """A step op's dispatch: `native(*args)` where `why` is '' (the kernel can run), else the twin
    `ref(*args)`; `log_path` says which."""
    log_path(logger, what, "native kernel", "PyTorch ops", why)
    return ref(*args) if why else native(*args)


def lanes(H):
    """The channels the kernels run for H: H rounded up to a multiple of LANES (`apply_on_lanes`)."""
    return -(-H // LANES) * LANES


# the most lanes per channel (`lanes(H) / H`) for which the op pads H rather than run its PyTorch path
PAD_LIMIT = 1.2


def too_few_for_lanes(name, n, unit=""):
    """Why a size n (named `name`) is too far below a multiple of LANES to pad ('' when it is not)."""
    if lanes(n) > PAD_LIMIT * n:
        return f"{name} = {n} would run on {lanes(n)} lanes (a multiple of {LANES}): over {PAD_LIMIT}x{unit}"
    return ""


def unsupported(u, Cp, T, M):
    """Why the native kernels cannot run this problem of M modes, C' output channels and chunk
    length T ('' when they can)."""
    Bsz, L, H = u.shape
    if u.device.type != "cpu" or u.dtype != torch.float32:
        return f"float32 on the CPU only (got {u.dtype} on {u.device})"
    if T % 4:
        return f"the chunk length must be a multiple of 4 (got T = {T})"
    if narrow := too_few_for_lanes("H", H, " the channels"):
        return narrow
    if M % 2:
        return f"an even number of modes only (got M = {M})"
    return "" if available() else why_unavailable()


# the forward's full chunks in one pass (`chunks_fwd`, split over threads by batch row): None when
# B >= threads (else fewer threads than torch's would work), True or False to force it (tests, benchmarks)
FUSED_FORWARD = None


def fused_forward(Bsz):
    """Whether the forward of a batch of Bsz rows runs its full chunks in one pass (`FUSED_FORWARD`)."""
    return Bsz >= torch.get_num_threads() if FUSED_FORWARD is None else FUSED_FORWARD


# chunks per time block of the backward: its scratch (the states' gradients) ~2^21 numbers
BLOCK_NUMBERS = 1 << 21


def _rows(t):
    """(pointer, batch stride, chunk stride) of the rows (b, c) of a (B, n, K, H) view."""
    return ptr(t), t.stride(0), t.stride(1)


def _widths(I):
    """(S, V) of the tiled layout of weights with I outputs: the strip width and the vector width."""
    lib = library()
    return lib.strip_width(I), lib.vector_floats()


def _tiles(w):
    """(K, I, H) weights (a float32 view with any strides) -> (H/V, I/S, K, S, V), the layout of the
    kernels' weights: per tile of V channels (V = `vector_floats()`), strips of S outputs (the kernels'
    `strip_width(I)`), each strip (K, S, V) contiguous. Copied by the library (`tile_weights`), with the
    same result as `_tiles_ref`."""
    w = w.resolve_neg()  # any strides, but the values in memory (a lazy negation is not)
    K, I, H = w.shape
    S, V = _widths(I)
    t = w.new_empty(H // V, I // S, K, S, V)
    library().tile_weights(ptr(t, FLOAT32), ptr(w, FLOAT32), *w.stride(), K, I, H, 0)
    return t


def _untile(g, out=None):
    """The inverse of `_tiles`: (H/V, I/S, K, S, V) -> (K, I, H), into `out` (a (K, I, H) float32 view
    with any strides, e.g. a permuted slice of the tensor to return) or a new tensor; as `_untile_ref`."""
    n, m, K, S, V = g.shape
    out = g.new_empty(K, m * S, n * V) if out is None else out
    if out.shape != (K, m * S, n * V):
        raise ValueError(f"_untile: out must be {(K, m * S, n * V)}; got {tuple(out.shape)}")
    library().tile_weights(ptr(g, FLOAT32), ptr(out, FLOAT32), *out.stride(), *out.shape, 1)
    return out


def _tiles_ref(w):
    """The reference twin of `_tiles`, in PyTorch ops."""
    K, I, H = w.shape
    S, V = _widths(I)
    return w.reshape(K, I // S, S, H // V, V).permute(3, 1, 0, 2, 4).contiguous()


def _untile_ref(g):
    """The reference twin of `_untile`, in PyTorch ops."""
    n, m, K, S, V = g.shape
    return g.permute(2, 1, 3, 0, 4).reshape(K, m * S, n * V)


def _tiled_zeros(like, K, I, H):
    """Zero (K, I, H) weights (gradients) in the layout of `_tiles`, allocated in it."""
    S, V = _widths(I)
    return like.new_zeros(H // V, I // S, K, S, V)


def _KI(w):
    """(K, I) of weights in the layout of `_tiles`."""
    return w.shape[2], w.shape[1] * w.shape[3]


def _check(status):
    """Raise if a kernel could not allocate its scratch (it then wrote nothing)."""
    if status != 0:
        raise MemoryError("native kernel (ops/native.c): a thread could not allocate its scratch")


def _mm(lib, C, A1, W1, A2=None, W2=None, tri=0, cp=1):
    """Rows of C = rows of A1 @ W1 (+ rows of A2 @ W2); C, A1, A2 (B, n, K, H) views with the same
    (B, n), W tiled (`_tiles`); tri: W1 is a causal Toeplitz block of cp outputs per step, zero (1)
    where k > i // cp, or its transpose, zero (2) where k // cp < i; the kernel skips those zeros."""
    Bsz, n, I, H = C.shape
    r2 = _rows(A2) if A2 is not None else (None, 0, 0)
    w2, K2 = (ptr(W2), _KI(W2)[0]) if W2 is not None else (None, 0)
    _check(lib.rows_mm(*_rows(C), *_rows(A1), ptr(W1), _KI(W1)[0], tri, cp, *r2, w2, K2, I, H, n, Bsz * n))


def _red(lib, G, A, Bm, tri=0, parts=None, cp=1):
    """G (K, I, H), tiled (`_tiles`), += sum over the rows (b, c) of A (B, n, K, H) x Bm (B, n, I, H);
    tri = 1: only G[k][i] with k <= i // cp is wanted (the rest is left partly summed). The threads
    beyond the first add into `parts` (`_partials`), which a caller that makes several calls for
    the same G passes to each and adds with `_add_parts` at the end; without them the call uses
    its own and adds them before it returns."""
    Bsz, n, K, H = A.shape
    own = parts is None
    if own:
        parts = _partials(lib, G, Bsz * n)
    _check(lib.rows_red(ptr(G), ptr(parts), parts.shape[0], *_rows(A), *_rows(Bm), K, _KI(G)[1], H, n,
                        Bsz * n, tri, cp))
    if own:
        _add_parts(G, parts)


def _partials(lib, G, rows):
    """Zeroed partial sums of G for `rows_red`'s threads beyond the first: one per thread that can get
    a block of a call's rows, for calls of at most `rows` rows."""
    threads = min(torch.get_num_threads(), -(-rows // lib.rows_red_block()))
    return G.new_zeros(max(threads - 1, 0), *G.shape)


def _add_parts(G, parts):
    """G += the partial sums of `_partials`, in thread order (the same sums in the same order on every run)."""
    for p in parts:
        G += p


def _chunks_fwd(lib, Y, X, U, Win, Wtoe, Wout, ar, ai):
    """The forward over n full chunks in one pass (`chunks_fwd`): U (B, n, T, H) rows, X (B, n + 1, 2M, H)
    with X[:, 0] the entering states, on return the states entering each chunk and the next; Y (B, n,
    C'T, H) the outputs; weights tiled (`_tiles`)."""
    Bsz, n, T, H = U.shape
    _check(lib.chunks_fwd(*_rows(Y), *_rows(X), *_rows(U), ptr(Win), ptr(Wtoe), ptr(Wout),
                          ptr(ar), ptr(ai), T, X.shape[2] // 2, Y.shape[2], H, n, Bsz))


def _carry(lib, X, ar, ai):
    """X (B, n + 1, 2M, H): chunk input sums -> the states entering each chunk (`carry_fwd`)."""
    Bsz, n1, P, H = X.shape
    lib.carry_fwd(ptr(X), X.stride(0), X.stride(1), ptr(ar), ptr(ai), P // 2, H, n1 - 1, Bsz)


def _carry_back(lib, Lm, X, ar, ai, gA):
    """Lm (B, n + 1, 2M, H): the states' gradients through their chunks' outputs (and the next
    block's) -> their total gradients; gA (B, 2M, H) += the gradient of A^T (`carry_bwd`)."""
    Bsz, n1, P, H = Lm.shape
    lib.carry_bwd(ptr(Lm), Lm.stride(0), Lm.stride(1), ptr(X), X.stride(0), X.stride(1),
                  ptr(ar), ptr(ai), ptr(gA), gA.stride(0), P // 2, H, n1 - 1, Bsz)


class _DiagonalCarry:
    """The diagonal systems' carry on lanes: a (H, M) complex (`carry_fwd`, `carry_bwd`); the gradient
    of a summed per batch row (in `g`, zeros when `grads`), returned in PyTorch's convention for
    complex gradients."""

    def __init__(self, lib, a, Bsz, grads):
        self.lib, (self.ar, self.ai) = lib, _lanes(a)
        self.g = a.real.new_zeros(Bsz, 2 * a.shape[1], a.shape[0]) if grads else None

    def fwd(self, X):
        _carry(self.lib, X, self.ar, self.ai)

    def bwd(self, Lm, X):
        _carry_back(self.lib, Lm, X, self.ar, self.ai, self.g)

    def grad(self):
        return _complex_grad(self.g, self.g.shape[1], self.g.shape[2])


class _DenseCarry:
    """A dense carry on lanes (`ops.chunked_dense`): a (H, n, n) real, X[c] += a X[c - 1] (`dense_carry`);
    its gradient sum_c Lm[c + 1] X[c]^T by `rows_red`, over every row at once."""

    def __init__(self, lib, a, Bsz, grads):
        H, n, _ = a.shape
        self.lib, self.A = lib, a.permute(1, 2, 0).contiguous()  # (n, n, H)
        self.g = _tiled_zeros(a, n, n, H) if grads else None

    def _run(self, X, adjoint):
        Bsz, n1, n, H = X.shape
        _check(self.lib.dense_carry(ptr(X), X.stride(0), X.stride(1), ptr(self.A), n, H, n1 - 1, Bsz,
                                    adjoint))

    def fwd(self, X):
        self._run(X, 0)

    def bwd(self, Lm, X):
        self._run(Lm, 1)
        _red(self.lib, self.g, Lm[:, 1:], X[:, :Lm.shape[1] - 1])

    def grad(self):
        n, H = self.A.shape[1:]
        out = self.A.new_empty(H, n, n)
        _untile(self.g, out.permute(1, 2, 0))
        return out


def _carry_of(lib, a, Bsz, grads=False):
    """The carry for a: (H, M) complex decays (the diagonal op) or (H, n, n) real matrices (the dense one);
    grads: it will sum a's gradient (`bwd`, `grad`)."""
    return (_DenseCarry if a.dim() == 3 else _DiagonalCarry)(lib, a, Bsz, grads)


def _state_lanes(x):
    """A state (H, B, M) complex or (H, B, n) real -> its (B, P, H) rows (P = 2M or n)."""
    return _pairs_lanes(x) if x.is_complex() else x.permute(1, 2, 0)


def _state_of_lanes(x, a):
    """The inverse of `_state_lanes`, for the state of the carry a (complex for complex a)."""
    return _complex_of_lanes(x) if a.is_complex() else x.permute(2, 0, 1).contiguous()


def _pairs_lanes(z):
    """(H, B, M) complex -> (B, 2M, H) real rows (Re z_m, Im z_m) interleaved, channel innermost."""
    H, Bsz, M = z.shape
    return torch.view_as_real(z.resolve_conj()).permute(1, 2, 3, 0).reshape(Bsz, 2 * M, H)  # (a lazy conj: .conj())


def _complex_of_lanes(x):
    """The inverse of `_pairs_lanes`: (B, 2M, H) -> (H, B, M) complex."""
    Bsz, P, H = x.shape
    return torch.view_as_complex(x.view(Bsz, P // 2, 2, H).permute(3, 0, 1, 2).contiguous())


def _lanes(a):
    """(H, M) complex -> its real and imaginary parts as (M, H) lanes."""
    return a.real.t().contiguous(), a.imag.t().contiguous()


def _split(x, T, r):
    """x (B, L, C, H), L = (n - 1) T + r -> its n - 1 full chunks as rows (B, n - 1, T C, H) (a view)
    and its last chunk (B, 1, T C, H), a copy zero past its r real steps."""
    Bsz, L, Cp, H = x.shape
    full = L - r
    last = x.new_zeros(Bsz, 1, T, Cp, H)
    last[:, 0, :r] = x[:, full:]
    return x[:, :full].view(Bsz, full // T, T * Cp, H), last.view(Bsz, 1, T * Cp, H)


def _swap_columns(W, inner):
    """(H, K, n inner) weights, columns in (outer, inner) order -> (inner, outer) order. With inner = T
    it turns W's (channel, step) columns into the (step, channel) order of a chunk's (T, C') outputs in
    y (B, L, C', H); with inner = C' it turns them back."""
    H, K, n = W.shape
    return W.view(H, K, n // inner, inner).transpose(2, 3).reshape(H, K, n)


def _complex_grad(g, P, H):
    """(B, 2M, H) per-batch-row gradient pairs -> the (H, M) complex gradient, summed over B."""
    return torch.view_as_complex(g.sum(0).view(P // 2, 2, H).permute(2, 0, 1).contiguous())


def grads_by_twin(twin, args, needs, grads):
    """What a custom op's backward returns when it runs under create_graph=True (grad mode on in the
    backward: a gradient penalty, a Hessian-vector product). The kernels' backward is not
    differentiable, so the forward runs again as `twin(*args)`, plain PyTorch ops with the same
    outputs, and autograd differentiates that with create_graph: the gradients carry their graph and
    a second derivative is right, at the twin's cost. (`once_differentiable` had detached them, so a
    second derivative silently lacked every term through the op.)
    args: the forward's inputs (the tensors saved unchanged, so that they keep their graph); needs:
    ctx.needs_input_grad, one per forward argument (trailing non-tensor ones may be absent from
    args); grads: the outputs' gradients (None where an output is unused)."""
    wanted = [i for i, t in enumerate(args) if needs[i] and isinstance(t, torch.Tensor)]
    result = [None] * len(needs)
    with torch.enable_grad():
        # one alias per argument: a tensor passed twice (s5_fused's tied W_in, W_out) would get the sum of
        # both gradients at each place, and then autograd adds the two (twice the gradient)
        args = tuple(t.view_as(t) if isinstance(t, torch.Tensor) else t for t in args)
        outs = twin(*args)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    if wanted and pairs:
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            result[i] = g
    return tuple(result)


def chunks_ref(u, W, into, aT, into_r, a_r, x0, T):
    """Twin of `ChunkedNative` and `chunked._Chunked` (the same inputs and outputs) as plain PyTorch
    ops, differentiable to any order: the chunk sums, the carry one chunk at a time, Z W in one
    product. Their backward runs it under create_graph (`grads_by_twin`). A complex aT (H, M) carries
    M modes, whose states are (Re, Im) pairs in Z; a real aT (H, n, n) carries n coordinates."""
    Bsz, L, H = u.shape
    nc, P, Cp = -(-L // T), into.shape[2], W.shape[2] // T
    U = zero_padded(u, 1, nc * T - L).view(Bsz, nc, T, H).permute(3, 1, 0, 2)  # (H, nc, B, T)
    diagonal = aT.is_complex()

    def carried(a, x, S):  # a x + S, S (H, B, P) real
        if diagonal:
            return a[:, None] * x + torch.view_as_complex(S.unflatten(-1, (-1, 2)))
        return x @ a.transpose(1, 2) + S

    S = U @ into[:, None]  # (H, nc, B, P) chunk sums
    xs = [x0]  # the states entering each chunk, (H, B, M) complex or (H, B, n)
    for c in range(nc - 1):
        xs.append(carried(aT, xs[-1], S[:, c]))
    x_last = carried(a_r, xs[-1], U[:, -1] @ into_r)
    X = torch.stack(xs, 1)  # (H, nc, B, .)
    X = torch.view_as_real(X).flatten(-2) if diagonal else X  # (H, nc, B, P)
    Y = U @ W[:, None, :T] + X @ W[:, None, -P:]  # (H, nc, B, C'T), columns (channel, step)
    y = Y.view(H, nc, Bsz, Cp, T).permute(2, 1, 4, 3, 0).reshape(Bsz, nc * T, Cp, H)[:, :L]
    return y, x_last


class ChunkedNative(torch.autograd.Function):
    """Same inputs and outputs as `chunked._Chunked`: u (B, L, H), W (H, T + 2M, C'T), into (H, T,
    2M), aT (H, M) complex, into_r, a_r the same for the last chunk's r real steps, x0 (H, B, M)
    complex -> y (B, L, C', H), x_last (H, B, M). Or, for `chunked_dense`'s systems, P = n real state
    coordinates in place of the 2M (Re, Im) pairs: aT and a_r (H, n, n) real, x0 and x_last (H, B, n)
    real (`_DenseCarry`; no one-pass forward). Inside, W's columns are in (step, channel) order
    (`_swap_columns`), so that the rows of y are its chunks, (T C', H) blocks; the Toeplitz block is
    then zero where k > i // C', which the kernels' triangular skips are told (`cp`). The last chunk of
    each batch row goes through a small zero-padded copy. Saves u and the states entering each chunk (B, n + 1, 2M, H);
    the backward runs in time blocks, last first, so that its scratch (the states' gradients) is
    one block's."""

    @staticmethod
    def forward(ctx, u, W, into, aT, into_r, a_r, x0, T):
        lib = library()
        u_in, (u,) = u, dense(u)
        Bsz, L, H = u.shape
        nc, P, Cp = -(-L // T), into.shape[2], W.shape[2] // T
        r = L - (nc - 1) * T  # real steps of the last chunk, 1..T
        Ws = _swap_columns(W, T)
        Wtoe, Wout = _tiles(Ws[:, :T].permute(1, 2, 0)), _tiles(Ws[:, T:].permute(1, 2, 0))  # (T s, C'T), (P, C'T)
        X = u.new_empty(Bsz, nc + 1, P, H)  # states entering chunk c; X[:, nc] the final one
        X[:, 0] = _state_lanes(x0)
        U, U_last = _split(u[:, :, None], T, r)
        y = u.new_empty(Bsz, L, Cp, H)
        Y = y[:, :L - r].view(Bsz, nc - 1, T * Cp, H)
        Win = _tiles(into.permute(1, 2, 0))
        if fused_forward(Bsz) and nc > 1 and aT.is_complex():  # the full chunks in one pass (diagonal carry)
            _chunks_fwd(lib, Y, X, U, Win, Wtoe, Wout, *_lanes(aT))
        else:
            _mm(lib, X[:, 1:nc], U, Win)  # X[:, c + 1] <- chunk c's input sum
            _carry_of(lib, aT, Bsz).fwd(X[:, :nc])
            _mm(lib, Y, U, Wtoe, A2=X[:, :nc - 1], W2=Wout, tri=1, cp=Cp)
        _mm(lib, X[:, nc:], U_last, _tiles(into_r.permute(1, 2, 0)))  # the last chunk's, to the final state
        _carry_of(lib, a_r, Bsz).fwd(X[:, nc - 1:])
        Y_last = u.new_empty(Bsz, 1, T * Cp, H)
        _mm(lib, Y_last, U_last, Wtoe, A2=X[:, nc - 1:nc], W2=Wout, tri=1, cp=Cp)
        y[:, L - r:] = Y_last.view(Bsz, T, Cp, H)[:, :r]
        # u as given (its graph, for create_graph; dense() again in the backward where it copied)
        ctx.save_for_backward(u_in, X, W, into, aT, into_r, a_r, x0)
        ctx.T = T
        return y, _state_of_lanes(X[:, nc], aT)

    @staticmethod
    @without_autocast
    def backward(ctx, gy, g_last):
        u, X, W, into, aT, into_r, a_r, x0 = ctx.saved_tensors
        T = ctx.T
        if torch.is_grad_enabled():  # create_graph: gradients with a graph, from the twin
            return grads_by_twin(chunks_ref, (u, W, into, aT, into_r, a_r, x0, T), ctx.needs_input_grad,
                                 (gy, g_last))
        lib = library()
        (u,) = dense(u)
        Bsz, L, H = u.shape
        nc, P, Cp = -(-L // T), X.shape[2], W.shape[2] // T
        r = L - (nc - 1) * T
        (U, U_last), (G, G_last) = _split(u[:, :, None], T, r), _split(dense(gy)[0], T, r)
        gu = torch.empty_like(u)
        GU = gu[:, :L - r].view(U.shape)
        Ws = _swap_columns(W, T)
        outT = _tiles(Ws[:, T:].permute(2, 1, 0))  # (C'T, 2M, H): G rows -> the states' gradients
        toeT = _tiles(Ws[:, :T].permute(2, 1, 0))  # (C'T, T s)
        g_toe, g_out, g_into, g_into_r = (_tiled_zeros(u, K, I, H) for K, I in
                                          ((T, Cp * T), (P, Cp * T), (T, P), (T, P)))
        carry, carry_r = (_carry_of(lib, a, Bsz, grads=True) for a in (aT, a_r))  # they sum the gradients of A^T, a_r
        nbk = max(1, min(nc, BLOCK_NUMBERS // (Bsz * P * H)))  # chunks per time block
        # rows_red's threads' sums, for as many threads as the largest call (Bsz nbk rows) has blocks of rows
        p_toe, p_out, p_into = (_partials(lib, g, Bsz * nbk) for g in (g_toe, g_out, g_into))
        # the last chunk: its outputs and the final state, through into_r and a_r
        L_last = u.new_empty(Bsz, 2, P, H)  # gradients of the states entering the last chunk and leaving it
        L_last[:, 1] = 0 if g_last is None else _state_lanes(g_last.resolve_conj())
        _mm(lib, L_last[:, :1], G_last, outT)
        carry_r.bwd(L_last, X[:, nc - 1:])
        GU_last = u.new_empty(Bsz, 1, T, H)
        _mm(lib, GU_last, G_last, toeT, A2=L_last[:, 1:], W2=_tiles(into_r.permute(2, 1, 0)), tri=2, cp=Cp)
        gu[:, L - r:] = GU_last[:, 0, :r]
        _red(lib, g_toe, U_last, G_last, tri=1, parts=p_toe, cp=Cp)
        _red(lib, g_out, X[:, nc - 1:nc], G_last, parts=p_out)
        _red(lib, g_into_r, U_last, L_last[:, 1:])
        # the full chunks, in time blocks, last first
        intoT = _tiles(into.permute(2, 1, 0))  # (P, T s)
        Lb = u.new_empty(Bsz, nbk + 1, P, H)  # the states' gradients of one block, and of the next chunk
        Lb[:, nbk] = L_last[:, 0]
        c1 = nc - 1
        while c1 > 0:
            c0 = max(0, c1 - nbk)
            n = c1 - c0
            if n < nbk:  # a shorter block: its "next chunk" slot is n
                Lb[:, n] = Lb[:, nbk]
            L_ = Lb[:, :n + 1]
            _mm(lib, L_[:, :n], G[:, c0:c1], outT)  # through the block's outputs
            carry.bwd(L_, X[:, c0:])
            _mm(lib, GU[:, c0:c1], G[:, c0:c1], toeT, A2=L_[:, 1:], W2=intoT, tri=2, cp=Cp)
            _red(lib, g_toe, U[:, c0:c1], G[:, c0:c1], tri=1, parts=p_toe, cp=Cp)
            _red(lib, g_out, X[:, c0:c1], G[:, c0:c1], parts=p_out)
            _red(lib, g_into, U[:, c0:c1], L_[:, 1:], parts=p_into)
            Lb[:, nbk] = L_[:, 0]  # the total gradient of the state entering chunk c0, for the next block
            c1 = c0
        for g, p in ((g_toe, p_toe), (g_out, p_out), (g_into, p_into)):
            _add_parts(g, p)
        gW = u.new_empty(H, T + P, Cp * T)  # columns in (step, channel) order, as Ws
        g_into_, g_into_r_ = u.new_empty(H, T, P), u.new_empty(H, T, P)
        for g, out in ((g_toe, gW[:, :T]), (g_out, gW[:, T:]), (g_into, g_into_), (g_into_r, g_into_r_)):
            _untile(g, out.permute(1, 2, 0))  # the (H, K, I) gradients returned, written as (K, I, H) views
        return (gu, _swap_columns(gW, Cp), g_into_, carry.grad(), g_into_r_, carry_r.grad(),
                _state_of_lanes(Lb[:, nbk], aT), None)


def zero_padded(t, dim, n):
    """t with n zeros appended along `dim` (t itself when n = 0), through autograd."""
    if not n:
        return t
    dim %= t.dim()
    return torch.cat([t, t.new_zeros(t.shape[:dim] + (n,) + t.shape[dim + 1:])], dim)


_disabled = {}  # fn -> torch.compiler.disable(fn), made on the first compiled call (`eager`)


def eager(fn):
    """`fn`, never traced by torch.compile: a compiled caller breaks its graph there and runs `fn` as it
    is. Every entry into the native kernels is one: they are ctypes calls on raw pointers, which dynamo
    cannot follow (traced, the kernels would not run and their outputs would be left unwritten). Made
    lazily: `torch.compiler.disable` imports dynamo (a second at import time), and outside compiled
    code `fn` is called directly."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            if fn not in _disabled:
                _disabled[fn] = torch.compiler.disable(fn)
            return _disabled[fn](*args, **kwargs)
        return fn(*args, **kwargs)
    return run


@eager
def apply_on_lanes(u, W, into, aT, into_r, a_r, x0, T):
    """`ChunkedNative.apply` for any number of channels H: where H is not a multiple of LANES, zero
    channels are appended to the inputs and to every per-channel tensor up to `lanes(H)` (zero weights
    and decays, so their outputs and states are zero), and cut off the outputs again (views). Autograd
    takes the gradients through the padding: those of the real channels are unchanged."""
    H = u.shape[-1]
    pad = lanes(H) - H
    if not pad:
        return ChunkedNative.apply(u, W, into, aT, into_r, a_r, x0, T)
    y, x_last = ChunkedNative.apply(zero_padded(u, 2, pad), *(zero_padded(t, 0, pad) for t in
                                                              (W, into, aT, into_r, a_r, x0)), T)
    return y[..., :H], x_last[:H]
