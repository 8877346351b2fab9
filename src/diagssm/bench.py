"""Speed and memory of the SSM layers against the naive vectorised formulations of public
reference code, and step-by-step inference throughput (`diagssm bench`, benchmarks/bench_layers.py).

Layers at B = 16, H = 128, d_state = 64, float32, CPU, L in {1024, 4096, 16384, 65536}:

    S4D, DSS  backend="chunked" and "fft"      vs  `s4d_naive`, `dss_naive` (Vandermonde + FFT conv)
    S5        mode="scan" and "conv"           vs  `s5_naive` (odd-even associative scan)
    S4        backend="chunked" and "fft"          (no naive baseline here; "dplr" in results before
                                                    session 25 is today's "fft")

Per case: fwd ms (forward under no_grad) and fwd+bwd ms (gradients of u and of every parameter,
loss = sum(y * w), w fixed random), each the median of --repeats after one warm-up, and peak MB:
the resident-memory high-water mark over one forward+backward pass, less the memory resident before
it (`PeakMemory`: the mark is reset first; where it cannot be, the ru_maxrss increase, which the
warm-up's peak can hide). Every (layer, impl, L) case runs in a fresh subprocess (`python -m
diagssm.bench --one LAYER IMPL L`), so that its memory is its own; the subprocess has
THP_MEM_ALLOC_ENABLE=1 in its environment (libc10 reads it once, at the first allocation, so it
must be there before torch is imported: huge pages on fresh large allocations) and calls
torch.set_flush_denormal(True) (decaying states make denormals). Naive cases estimated, by
extrapolation from the same case at a smaller L (time ~ L log L, memory ~ L), to need more than
--max-gb or --max-seconds are skipped; fast paths always run.

Distance from the machine's limits, per fast path at the largest L that ran: floor = max(FLOPs /
--peak-gflops, bytes / --peak-gbs) against the measured fwd+bwd time. The estimates (`cost`) count
the forward's dominant terms and take forward+backward = 3x forward (the usual rule for matmuls;
an FFT's backward is two transforms per forward transform). M = d_state/2 modes, T = 64 the chunk,
n = 2L the FFT length (S5 "conv": the next power of two >= 2L), N = d_state:

    chunked  FLOPs 2 B L H (T/2 + 4M)            (in-chunk Toeplitz, its causal half, which the native
                                                   kernels skip to; into- and out-of-state 2M each)
                   2 B L H (T + 4M)              (PyTorch kernels: batched matmuls of the whole block)
             bytes 4 B L H * 8 + 8 B H M (L/T) * 4  (PyTorch kernels: (B, L, H) float32 touched ~8 times,
                                                   with the layout copies; chunk states 4 times)
                   4 B L H * 3 + 8 B H M (L/T) * 4  (native kernels, on (B, L, H) itself: u read twice,
                                                   y written once)
             (the backward reuses the chunk states the forward kept: nothing recomputed)
    fft      FLOPs (2 B H + H) 2.5 n log2 n + 6 B H n/2 + 4 H M L   (rfft u, rfft K, irfft; product; kernel)
             bytes 4 B L H * 14                     (u, its spectrum, product, irfft output, crop, D u)
    scan     FLOPs 8 B L H M + 24 B L M             (B u and Re(C h) as real matmuls; 3 passes of h = a h + b)
             bytes 4 B L H * 2 + 8 B L M * 6        (PyTorch ops: B u, h and its passes in memory)
                   4 B L H * 2 + 8 B L M            (fused native op: u read, y written, h written once)
    conv     FLOPs 8 B L H M + (2 B M + M) 5 n log2 n + 6 B M n
             bytes 4 B L H * 2 + 8 B M (3 n + 3 L)
    S4's chunked (a dense carry on n_x = N real coordinates): FLOPs 2 B L H (T/2 + 2 N + N^2/T)
             (Toeplitz half, T on PyTorch's matmuls; N in, N out, the carry's (N, N) product per
             chunk), bytes as chunked's
             (PyTorch or native kernels) with N numbers per chunk state
    S4's fft ("dplr" before session 25): the fft path's terms + Cauchy H N (L/2) (10 + 8*4)
             (1/(z - w), four Cauchy products)
             + c_tilde k 8 H N^3 (A_bar^L by k = floor(log2 L) + popcount(L) - 1 complex (N, N) matmuls)
             bytes: the fft path's + 8 H N L

On a GPU (--device cuda): every call is timed to the end of its queued work (torch.cuda.synchronize),
peak MB is the CUDA caching allocator's peak over what was allocated before the pass (measurable in
one process, so --inline keeps it), and the roofline floors use a float32 matmul's rate and a
device-to-device copy's rate measured at the start, unless --peak-gflops / --peak-gbs are given.

Throughput: a 4-layer `SequenceModel` (d_model 128, d_state 64, token embedding, per-step head)
of each layer kind, eval mode, no_grad: tokens/s of `step` (B = 16, one token at a time) and of
the full-sequence forward at the smallest L.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from diagssm.cpu import cpu_fields, cpu_flags, kept_freed_memory, trim_freed_memory
from diagssm.layers import DSS, S4, S4D, S5
from diagssm.ops import chunked_native
from diagssm.ops.chunked import chunk_size
from diagssm.train.world import check_device

B, H, N = 16, 128, 64
M = N // 2
LAYERS = ("s4d", "dss", "s5", "s4")
FAST = {"s4d": ("chunked", "fft"), "dss": ("chunked", "fft"), "s5": ("scan", "conv"), "s4": ("chunked", "fft")}
HAS_NAIVE = ("s4d", "dss", "s5")
LENGTHS, QUICK_LENGTHS = (1024, 4096, 16384, 65536), (1024,)
PROBE_L, WARM_L, STEPS = 1024, 256, 200
GB, MB = 2**30, 2**20
CPU_PEAKS = (300.0, 22.0)  # GFLOP/s and GB/s of the 2-core CPU: the default roofline limits there


# ---------------------------------------------------------------- naive baselines
def fft_conv_naive(u, K, D):
    """y = irfft(rfft(u, 2L) rfft(K, 2L))[:L] + D u, in the (B, H, L) layout of the reference code.

    Shapes: u (B, L, H); K (H, L); D (H,) -> y (B, L, H) (a transposed view)
    """
    L = u.shape[1]
    x = u.transpose(1, 2)  # (B, H, L)
    y = torch.fft.irfft(torch.fft.rfft(x, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]  # (B, H, L)
    return (y + x * D[:, None]).transpose(1, 2)  # (B, L, H)


def _require(layer, **want):
    for name, value in want.items():
        if getattr(layer, name) != value:
            raise ValueError(f"naive baseline: needs {name}={value!r}; the layer has {getattr(layer, name)!r}")


def s4d_naive(layer, u):
    """The minimal S4D's formulation (S4D paper, eq. (5), ZOH), the (H, N/2, L) Vandermonde tensor built:

        dtA = dt A,  K = 2 Re einsum('hn,hnl->hl', C B (exp(dtA) - 1)/A, exp(dtA[..., None] l))

    then `fft_conv_naive`. Uses the parameters of an S4D layer (real_transform="exp", ZOH, one
    causal channel). Shapes: u (B, L, H) -> y (B, L, H)
    """
    _require(layer, real_transform="exp", discretization="zoh", channels=1, bidirectional=False)
    L = u.shape[1]
    dt = torch.exp(layer.log_dt)  # (H,)
    A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag)  # (H, M)
    CB = torch.view_as_complex(layer.C)[0] * torch.view_as_complex(layer.B)  # (H, M)
    dtA = A * dt[:, None]  # (H, M)
    V = torch.exp(dtA[..., None] * torch.arange(L, dtype=dt.dtype, device=dt.device))  # (H, M, L)
    K = 2 * torch.einsum("hn,hnl->hl", CB * (torch.exp(dtA) - 1) / A, V).real  # (H, L)
    return fft_conv_naive(u, K, layer.D[0])


def dss_naive(layer, u):
    """DSS-EXP (DSS paper, Proposition 1) with P = dt Lambda l built as an (H, N/2, L) tensor:

        K = Re einsum('hn,hnl->hl', W (exp(dt Lambda) - 1)/Lambda, exp(P))

    (sep_dt: dt Lambda = dt_re Re Lambda + i dt_im Im Lambda), then `fft_conv_naive`.
    Shapes: u (B, L, H) -> y (B, L, H)
    """
    _require(layer, variant="exp", channels=1, bidirectional=False)
    L = u.shape[1]
    Lambda = torch.complex(-torch.exp(layer.log_Lambda_re), layer.Lambda_im)  # (M,)
    dt = torch.exp(layer.log_dt)  # (H,) or (2, H)
    if layer.sep_dt:
        dtL = torch.complex(Lambda.real * dt[0, :, None], Lambda.imag * dt[1, :, None])  # (H, M)
    else:
        dtL = Lambda * dt[:, None]  # (H, M)
    P = dtL[..., None] * torch.arange(L, dtype=dt.dtype, device=dt.device)  # (H, M, L)
    W = torch.view_as_complex(layer.W)[0] * (torch.exp(dtL) - 1) / Lambda  # (H, M)
    K = torch.einsum("hn,hnl->hl", W, torch.exp(P)).real  # (H, L)
    return fft_conv_naive(u, K, layer.D[0])


def combine(e1, e2):
    """S5's binary operator, e1 before e2: (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)."""
    a1, b1 = e1
    a2, b2 = e2
    return a1 * a2, a2 * b1 + b2


def associative_scan(a, b):
    """Inclusive prefix of `combine` along dim 1 by odd-even reduction (jax.lax.associative_scan):
    combine neighbours, scan the half-length sequence recursively (odd positions), then fill in
    the even positions. Returns (prod of a, h) with h_k = a_k h_(k-1) + b_k, h_(-1) = 0.

    Shapes: a, b (B, L, P) -> (B, L, P), (B, L, P)
    """
    L = a.shape[1]
    if L < 2:
        return a, b
    odd = associative_scan(*combine((a[:, 0:-1:2], b[:, 0:-1:2]), (a[:, 1::2], b[:, 1::2])))  # (B, L//2, P)
    prev = odd if L % 2 else (odd[0][:, :-1], odd[1][:, :-1])  # prefixes ending just before 2, 4, ...
    even = combine(prev, (a[:, 2::2], b[:, 2::2]))  # (B, (L-1)//2, P)
    out = []
    for x, x_odd, x_even in zip((a, b), odd, even):
        y = x.new_empty(x.shape)  # (B, L, P)
        y[:, :1], y[:, 2::2], y[:, 1::2] = x[:, :1], x_even, x_odd
        out.append(y)
    return tuple(out)


def s5_naive(layer, u):
    """The official JAX S5's formulation (ZOH, conj_sym) in torch, over (B, L, P) complex tensors:

        Lambda_bar = exp(Lambda Delta),  B_bar = ((Lambda_bar - 1)/Lambda) B_tilde
        (a, b)_k = (Lambda_bar, B_bar u_k)  (a materialised, as `Lambda_bar * ones((L, P))`, once for the
        batch: the reference vmaps over it with Lambda_bar unbatched)
        h = associative_scan(a, b),  y = 2 Re(C_tilde h) + D u

    Shapes: u (B, L, H) -> y (B, L, H)
    """
    _require(layer, discretization="zoh", clip_eigs=False, bidirectional=False)
    Lambda = torch.complex(layer.Lambda_re, layer.Lambda_im)  # (M,)
    Lambda_bar = torch.exp(Lambda * torch.exp(layer.log_dt))  # (M,)
    B_bar = ((Lambda_bar - 1) / Lambda)[:, None] * torch.view_as_complex(layer.B)  # (M, H)
    Bu = u.to(B_bar.dtype) @ B_bar.T  # (B, L, M)
    _, h = associative_scan(Lambda_bar * torch.ones_like(Bu[:1]), Bu)  # a (1, L, M), shared by the batch
    return layer.factor * (h @ torch.view_as_complex(layer.C)[0].T).real + layer.D * u  # (B, L, H)


NAIVE = {"s4d": s4d_naive, "dss": dss_naive, "s5": s5_naive}


# ---------------------------------------------------------------- one case, in this process
def make_layer(name, impl, seed=0, device="cpu", size=None, **options):
    """The benchmarked layer (float32, check_finite=False, and `options` for its constructor, e.g.
    bidirectional=True), on `device`, of `size` (H, d_state) (default: the module's H, N); the naive
    case reads its parameters."""
    torch.manual_seed(seed)
    d_model, d_state = size or (H, N)
    kw = dict(check_finite=False, **options)
    if name in ("s4d", "dss"):
        layer = (S4D if name == "s4d" else DSS)(d_model, d_state, backend=impl if impl != "naive" else "auto", **kw)
    elif name == "s5":
        layer = S5(d_model, d_state, mode=impl if impl != "naive" else "auto", **kw)
    else:
        layer = S4(d_model, d_state, backend=impl, **kw)
    return layer.to(device)


def setup_process(threads):
    """Threads, flush-to-zero of denormals; returns what took effect (recorded with each case)."""
    torch.set_num_threads(threads)
    return dict(threads=torch.get_num_threads(), flush_denormal=torch.set_flush_denormal(True),
                thp=os.environ.get("THP_MEM_ALLOC_ENABLE", ""), allocator=allocator(), top_pad=kept_freed_memory())


def case_env():
    """The environment of a case's fresh subprocess: this one's, with THP_MEM_ALLOC_ENABLE=1 unless it
    is set (libc10 reads it once, at its first allocation, so it must be there before torch loads)."""
    env = dict(os.environ)
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return env


def process_settings(results, inline=False):
    """One sentence on what `setup_process` and `case_env` put into effect in the measured cases
    (`results`: their records; `inline`: they ran in this process, where THP is the caller's)."""
    done = [r for r in results if "skipped" not in r]
    fz = bool(done) and all(r.get("flush_denormal") for r in done)
    thp = bool(done) and all(r.get("thp") == "1" for r in done)
    allocators = sorted({r.get("allocator", "") for r in done})
    alloc = "; ".join(a or "the C library's malloc" for a in allocators) or "the C library's malloc"
    pads = sorted({r.get("top_pad", 0) for r in done})
    pad = "; ".join(f"{p >> 20} MB" if p else "not set" for p in pads) or "not set"
    return (f"torch.set_flush_denormal(True): {'set' if fz else 'NOT in effect'}; THP_MEM_ALLOC_ENABLE=1: "
            f"{'set' if thp else 'NOT in effect' + (' (--inline)' if inline else '')}. Allocator: {alloc}. "
            f"Malloc top pad (diagssm.cpu.keep_freed_memory): {pad}.")


def allocator():
    """The memory allocator in effect: a preloaded one (LD_PRELOAD, MALLOC_CONF) or '' (the C library's)."""
    pre, conf = os.environ.get("LD_PRELOAD", ""), os.environ.get("MALLOC_CONF", "")
    return f"LD_PRELOAD={pre}" + (f" MALLOC_CONF={conf}" if conf else "") if pre else ""


def synchronize(device):
    """Wait for the work queued on `device` (a CUDA device runs asynchronously; the CPU: nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats, warmup, device="cpu"):
    """Median wall time of fn() in ms over `repeats` calls, after `warmup` calls; on a GPU each call
    is timed to the end of its queued work."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def _reset_high_water_mark():
    """Reset the process's resident-memory high-water mark (VmHWM) to its current RSS (Linux's
    /proc/self/clear_refs, "5"); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_mb("VmHWM")
        return True
    except OSError:
        return False


class PeakMemory:
    """The peak memory of what runs between start() and mb(), in MB. On the CPU: the resident-memory
    high-water mark, reset at start(), over the memory resident then (Linux), after start() has
    returned the heap's free memory to the system (`cpu.trim_freed_memory`): glibc keeps freed
    memory resident (at the top of its heap up to its trim threshold, which large frees raise to
    64 MB on 64-bit systems: mallopt(3); or the pad of `keep_freed_memory`), which the pass would reuse without raising the mark, so that
    peaks read low (README, "Against the issue's targets"); elsewhere the increase
    of ru_maxrss, a high-water mark that cannot be reset, so that memory freed before start() hides
    as much of the measured peak (valid once per fresh process, and only where the earlier peak was
    low). On a GPU: the CUDA caching allocator's peak over what was allocated at start()."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def start(self):
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / MB
            return
        trim_freed_memory()  # freed heap memory kept resident would be reused unseen by the mark
        self.resettable = _reset_high_water_mark()
        self.base = _status_mb("VmRSS") if self.resettable else maxrss_mb()

    def mb(self):
        if self.cuda:
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MB - self.base
        return (_status_mb("VmHWM") if self.resettable else maxrss_mb()) - self.base


def _case(name, impl, device="cpu", size=None, **options):
    """(run, fwd_bwd) of one case on `device` (`size`, `options`: for `make_layer`): run(u) -> y;
    fwd_bwd(u, w) takes the gradients of sum(y * w) with respect to u and every parameter. Loads the
    libraries with a small pass first."""
    layer = make_layer(name, impl, device=device, size=size, **options)
    params = list(layer.parameters())
    run = (lambda x: NAIVE[name](layer, x)) if impl == "naive" else layer

    def fwd_bwd(x, w):
        torch.autograd.grad((run(x) * w).sum(), [x] + params, allow_unused=True)

    fwd_bwd(*_inputs(WARM_L, device, seed=2, channels=layer.d_model))  # load libraries
    return run, fwd_bwd


def _inputs(L, device="cpu", seed=1, channels=H):
    """u (B, L, channels) requiring gradients and the loss weights w, drawn on the CPU (the same
    numbers on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    u, w = torch.randn(B, L, channels, generator=g), torch.randn(B, L, channels, generator=g)
    return u.to(device).requires_grad_(), w.to(device)


def measure_case(name, impl, L, repeats, memory=True, device="cpu"):
    """fwd, fwd+bwd (and with `memory`, the peak memory of one fwd+bwd: `PeakMemory`) of one case on
    `device`, and the paths its ops took ("paths": `chunked_native.log_path`'s record, '' for a
    native one)."""
    chunked_native.paths(forget=True)
    run, fwd_bwd = _case(name, impl, device)
    u, w = _inputs(L, device)
    peak_memory = PeakMemory(device)
    peak_memory.start()
    t0 = time.perf_counter()
    fwd_bwd(u, w)  # the memory figure, and the warm-up of the fwd+bwd timing
    synchronize(device)
    first = time.perf_counter() - t0
    peak = peak_memory.mb() if memory else None
    with torch.no_grad():
        fwd = median_ms(lambda: run(u), repeats, warmup=1, device=device)
    fb = median_ms(lambda: fwd_bwd(u, w), repeats, warmup=0, device=device)
    return dict(layer=name, impl=impl, L=L, fwd_ms=fwd, fwdbwd_ms=fb, first_fwdbwd_ms=1e3 * first, peak_mb=peak,
                paths=chunked_native.paths(), device=str(device))


def profile_case(name, impl, L, rows=20, device="cpu"):
    """torch.profiler's table of one case's fwd+bwd (after a warm-up one), ops by self CPU time."""
    _, fwd_bwd = _case(name, impl, device)
    u, w = _inputs(L, device)
    fwd_bwd(u, w)
    with torch.profiler.profile(record_shapes=True) as prof:
        fwd_bwd(u, w)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)


def step_ms(model, x, repeats, max_seconds=3.0, device="cpu"):
    """ms per `model.step` call (B tokens), median over repeats of STEPS steps (fewer past max_seconds)."""
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        state, t0, k = model.default_state(x.shape[0]), time.perf_counter(), 0
        while k < STEPS and time.perf_counter() - t0 < max_seconds:
            _, state = model.step(x[:, k % x.shape[1]], state)
            k += 1
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0) / k)
    return statistics.median(times[1:])


def measure_throughput(name, L, repeats, device="cpu"):
    """Tokens/s of a 4-layer model on `device`: `step` (B tokens per call; on the CPU also on 1
    thread) and the full forward over (B, L)."""
    from diagssm.models import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(256, 256, d_model=H, n_layers=4, layer=name, layer_kwargs=dict(d_state=N, check_finite=False),
                          encoder="embedding", pooling="none", head="per_step").eval().to(device)
    x = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(1)).to(device)
    step1 = None
    with torch.no_grad():
        full = median_ms(lambda: model(x), repeats, warmup=1, device=device)
        step = step_ms(model, x, repeats, device=device)
        if torch.device(device).type == "cpu":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            step1 = step_ms(model, x, repeats)
            torch.set_num_threads(threads)
    return dict(layer=name, impl="throughput", L=L, step_ms=step, step_tokens_s=1e3 * B / step,
                step_1thread_ms=step1, step_1thread_tokens_s=step1 and 1e3 * B / step1, full_ms=full,
                full_tokens_s=1e3 * B * L / full)


# ---------------------------------------------------------------- the driver
def run_case(name, impl, L, args, repeats=None):
    """One case: in a fresh subprocess (its JSON line parsed), or in this process with --inline."""
    repeats, t0 = repeats or args.repeats, time.perf_counter()
    print(f"  {name} {impl} L={L} ...", end="", file=sys.stderr, flush=True)
    r = _run_case(name, impl, L, args, repeats)
    print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return r


def _run_case(name, impl, L, args, repeats):
    if args.inline:
        if impl == "throughput":
            return dict(measure_throughput(name, L, repeats, args.device), **setup_process(args.threads))
        memory = torch.device(args.device).type == "cuda"  # a GPU's peak is measurable in one process, ru_maxrss not
        return dict(measure_case(name, impl, L, repeats, memory, args.device), **setup_process(args.threads))
    cmd = [sys.executable, "-m", "diagssm.bench", "--one", name, impl, str(L),
           "--repeats", str(repeats), "--threads", str(args.threads), "--device", args.device]
    p = subprocess.run(cmd, capture_output=True, text=True, env=case_env())
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["?"])[-1][:80]
        return dict(layer=name, impl=impl, L=L, skipped=f"failed (rc {p.returncode}: {why})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def naive_bytes(name, L):
    """A priori peak of one naive fwd+bwd, for when no smaller L was measured: ~2 live (H, M, L)
    complex64 Vandermonde tensors and ~4 (B, H, L) complex64-sized FFT tensors (S4D, DSS); ~12
    (B, L, M) complex64 and 4 (B, L, H) float32 tensors (S5). Within 10% of the measured peaks at
    L = 1024 and 4096; at L = 65536 the S4D/DSS figure is 8 GiB (2 GiB per Vandermonde copy)."""
    if name == "s5":
        return 12 * 8 * B * L * M + 4 * 4 * B * L * H
    return 2 * 8 * H * M * L + 4 * 8 * B * H * L


def naive_skip(name, L, prev, args):
    """Why the naive case at L is skipped ('' to run it); prev: the naive case at a smaller L, from
    which memory (~ L) and the time of all its passes (~ L log L) are extrapolated."""
    need, secs = naive_bytes(name, L), None
    if prev is not None:
        s = L / prev["L"]
        need = (prev["peak_mb"] or need / MB / s) * MB * s  # --inline measures no memory
        fb = min(prev["fwdbwd_ms"], prev["first_fwdbwd_ms"])  # the less disturbed by other load
        secs = s * math.log2(L) / math.log2(prev["L"]) * (prev["fwd_ms"] + fb) * (1 + args.repeats) / 1e3
    if need <= args.max_gb * GB and (secs is None or secs <= args.max_seconds):
        return ""
    return f"skipped (~{need / GB:.1f} GB" + ("" if secs is None else f", ~{secs:.0f} s") + ")"


def run_layer(name, args):
    """All cases of one layer: at each L the fast paths, then the naive baseline unless skipped."""
    results, prev = [], None
    for L in sorted(args.lengths):
        results += [run_case(name, impl, L, args) for impl in FAST[name]]
        if name not in HAS_NAIVE:
            continue
        if prev is None and L > PROBE_L and not naive_skip(name, PROBE_L, None, args):
            probe = run_case(name, "naive", PROBE_L, args, repeats=1)  # something to extrapolate from
            prev = None if "skipped" in probe else probe
        why = naive_skip(name, L, prev, args)
        naive = dict(layer=name, impl="naive", L=L, skipped=why) if why else run_case(name, "naive", L, args)
        prev = prev if "skipped" in naive else naive
        results.append(naive)
    return results


# ---------------------------------------------------------------- FLOP and byte estimates
def cost(name, impl, L, native=False):
    """(FLOPs, bytes) of one forward at B, H, N (module docstring); fwd+bwd is 3x both. native: the
    case ran the native kernels (chunked) or the fused native op (scan), which move fewer bytes."""
    lg = math.log2
    n = 2 * L
    T = chunk_size(L)
    toeplitz = T / 2 if native else T  # the native kernels skip the block's zero half, matmuls do not
    if name == "s4" and impl == "chunked":  # per step: Toeplitz, N in, N out, the dense carry N^2 / T
        flops = 2 * B * L * H * (toeplitz + 2 * N + N * N / T)
        return flops, 4 * B * L * H * (3 if native else 8) + 4 * B * H * N * (L / T) * 4
    if impl == "chunked":  # per step: a (T, T) Toeplitz block (its causal half, native), 2M sums in, 2M out
        return 2 * B * L * H * (toeplitz + 4 * M), 4 * B * L * H * (3 if native else 8) + 8 * B * H * M * (L / T) * 4
    fft = ((2 * B * H + H) * 2.5 * n * lg(n) + 6 * B * H * n / 2, 4 * B * L * H * 14)
    if impl == "dplr" or (name == "s4" and impl == "fft"):
        k = L.bit_length() - 1 + bin(L).count("1") - 1  # matmuls of torch.linalg.matrix_power(A_bar, L)
        return fft[0] + H * N * (L / 2) * (10 + 8 * 4) + k * 8 * H * N**3, fft[1] + 8 * H * N * L
    if impl == "fft":
        return fft[0] + 4 * H * M * L, fft[1]
    if impl == "scan":
        return 8 * B * L * H * M + 24 * B * L * M, 4 * B * L * H * 2 + 8 * B * L * M * (1 if native else 6)
    if impl == "conv":
        n = 2 ** math.ceil(lg(2 * L))
        return (8 * B * L * H * M + (2 * B * M + M) * 5 * n * lg(n) + 6 * B * M * n,
                4 * B * L * H * 2 + 8 * B * M * (3 * n + 3 * L))
    raise ValueError(f"no cost estimate for impl={impl!r}")


NATIVE_PATHS = {("s4d", "chunked"): chunked_native.CHUNKED_OP, ("dss", "chunked"): chunked_native.CHUNKED_OP,
                ("s5", "scan"): chunked_native.S5_SCAN, ("s4", "chunked"): chunked_native.DENSE_OP}  # its logged path


def ran_native(r):
    """Whether case r ran the native kernels / fused op (recorded in its "paths"; older results: no)."""
    what = NATIVE_PATHS.get((r["layer"], r["impl"]))
    return what is not None and r.get("paths", {}).get(what) == ""


def limits(results, args):
    """Per layer and fast path, at the largest L that ran: the roofline floor against the measurement."""
    rows = []
    for name in dict.fromkeys(r["layer"] for r in results):
        # every fast path, also those of older saved runs (S4's "dplr", today's "fft"): not the naive one
        ran = [r for r in results if r["layer"] == name and r["impl"] not in ("naive", "throughput")
               and "skipped" not in r]
        if not ran:
            continue
        L = max(r["L"] for r in ran)
        for r in (r for r in ran if r["L"] == L):
            flops, nbytes = (3 * c for c in cost(name, r["impl"], L, native=ran_native(r)))
            t_flop, t_mem = 1e3 * flops / (args.peak_gflops * 1e9), 1e3 * nbytes / (args.peak_gbs * 1e9)
            rows.append(dict(layer=name, impl=r["impl"], L=L, native=ran_native(r), gflop=flops / 1e9,
                             gb=nbytes / 1e9, flop_ms=t_flop, mem_ms=t_mem, measured_ms=r["fwdbwd_ms"],
                             over_floor=r["fwdbwd_ms"] / max(t_flop, t_mem)))
    return rows


# ---------------------------------------------------------------- output
def device_model(device):
    """The machine a run measured: `cpu_model()`, or the GPU's name, CUDA version and memory."""
    if torch.device(device).type != "cuda":
        return cpu_model()
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} (CUDA {torch.version.cuda}, {props.total_memory / GB:.0f} GiB, " \
           f"{props.multi_processor_count} multiprocessors)"


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU: its name, logical CPUs, family and model, and its widest vector extension (machines of
    one name differ: the native kernels' tiles follow the vector width)."""
    fields = cpu_fields(cpuinfo)
    names, family, model = (fields.get(k) for k in ("model name", "cpu family", "model"))
    if not names:
        return "unknown"
    flags = cpu_flags(cpuinfo)
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    ident = f"family {family[0]} model {model[0]}, " if family and model else ""
    return f"{names[0]} ({len(names)} logical CPUs; {ident}{vectors})"


def header(args, results, saved=None):
    """The report's heading; `saved`: the JSON of an earlier run (its torch, CPU), for --from-json."""
    version, cpu = (saved["torch"], saved["cpu"]) if saved else (torch.__version__, device_model(args.device))
    if torch.device(args.device).type == "cpu":
        where = "in this process (--inline: no memory figures)" if args.inline else "each in a fresh subprocess"
        machine = f"torch {version}, threads = {args.threads}, CPU: {cpu}. {process_settings(results, args.inline)}"
        title = "CPU"
    else:
        where = ("in this process" if args.inline else "each in a fresh subprocess") + \
            " (peak MB: the CUDA allocator's peak over what was allocated before the pass)"
        machine = f"torch {version}, device {args.device}: {cpu}."
        title = "GPU"
    return "\n".join([
        f"# diagssm layers: fast paths vs naive formulations ({title}, float32)", "",
        machine,
        f"Sizes: B={B}, H={H}, d_state={N} ({M} complex modes; S5: P={N}, one MIMO state), check_finite=False. "
        f"Cases {where}; median of {args.repeats} after one warm-up.",
        "fwd: forward under no_grad; fwd+bwd: gradients of u and all parameters. Speed-up: naive fwd+bwd "
        "time / this one's. Memory vs naive: peak MB / naive's peak MB (below 1: less memory).", ""])


def _ratio(x):
    return f"{x:.{1 if x >= 1 else 2}f}x"


def layer_table(results):
    rows = ["| layer | L | impl | fwd ms | fwd+bwd ms | peak MB | speed-up vs naive (fwd+bwd) | memory vs naive |",
            "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["layer"], r["L"], r["impl"]): r for r in results}
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['layer']} | {r['L']} | {r['impl']} | {r['skipped']} | | | | |")
            continue
        naive = by_key.get((r["layer"], r["L"], "naive"), {})
        speed = mem = "" if r["impl"] == "naive" else ("no naive baseline" if r["layer"] not in HAS_NAIVE
                                                      else naive.get("skipped", ""))
        if r["impl"] != "naive" and "fwdbwd_ms" in naive:
            speed = _ratio(naive["fwdbwd_ms"] / r["fwdbwd_ms"])
            mem = _ratio(r["peak_mb"] / naive["peak_mb"]) if r["peak_mb"] and naive["peak_mb"] else "-"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        rows.append(f"| {r['layer']} | {r['L']} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} "
                    f"| {peak} | {speed} | {mem} |")
    return "\n".join(rows)


def limits_table(rows, args):
    out = [f"Distance from the machine's limits (fwd+bwd, largest L that ran; floors at {args.peak_gflops:g} "
           f"GFLOP/s and {args.peak_gbs:g} GB/s, estimates in `diagssm.bench.cost`):", "",
           "| layer | impl | L | GFLOP | GB moved (1e9 B) | compute floor ms | memory floor ms | measured ms "
           "| measured / floor |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['layer']} | {r['impl']}{' (native)' if r.get('native') else ''} | {r['L']} | {r['gflop']:.1f} "
            f"| {r['gb']:.2f} | {r['flop_ms']:.1f} | {r['mem_ms']:.1f} | {r['measured_ms']:.1f} "
            f"| {r['over_floor']:.1f}x |" for r in rows]
    return "\n".join(out)


def throughput_table(rows):
    out = [f"Inference throughput, 4-layer SequenceModel (d_model {H}, d_state {N}), eval, no_grad, B = {B}:", "",
           "| layer | step ms | step tokens/s | step tokens/s, 1 thread | full forward L | full forward tokens/s "
           "| full / step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['layer']} | {r['skipped']} | | | | | |")
            continue
        one = r.get("step_1thread_tokens_s")
        out.append(f"| {r['layer']} | {r['step_ms']:.2f} | {r['step_tokens_s']:,.0f} "
                   f"| {'-' if one is None else f'{one:,.0f}'} | {r['L']} | {r['full_tokens_s']:,.0f} "
                   f"| {r['full_tokens_s'] / r['step_tokens_s']:.0f}x |")
    return "\n".join(out)


def plot(results, path, where="CPU"):
    """fwd+bwd time against L, log-log, one line per (layer, impl). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for key in dict.fromkeys((r["layer"], r["impl"]) for r in results):
        pts = [(r["L"], r["fwdbwd_ms"]) for r in results if (r["layer"], r["impl"]) == key and "skipped" not in r]
        if pts:
            ax.loglog(*zip(*pts), "o--" if key[1] == "naive" else "o-", label=" ".join(key))
    ax.set(xlabel="L", ylabel="forward + backward ms", title=f"diagssm layers, B={B}, H={H}, d_state={N}, {where}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="diagssm bench", description="Speed and memory of the S4D, DSS, S5 and S4 "
                                 "layers against naive formulations, and step-by-step inference throughput.")
    ap.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    ap.add_argument("--lengths", type=int, nargs="+", help="default 1024 4096 16384 65536 (1024 with --quick)")
    ap.add_argument("--repeats", type=int, help="timed repeats per case, median (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each case")
    ap.add_argument("--device", default="cpu", help="where the layers run: cpu, cuda or cuda:N (a GPU: with "
                    "--inline its peak memory is still measured)")
    ap.add_argument("--max-gb", type=float, default=16.0, help="skip naive cases estimated to need more memory")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="skip naive cases estimated to take longer")
    ap.add_argument("--peak-gflops", type=float, help="the machine's compute limit, GFLOP/s (default: 300 on "
                    "the CPU; on a GPU, a float32 matmul's rate measured at the start)")
    ap.add_argument("--peak-gbs", type=float, help="the machine's memory bandwidth, GB/s (default: 22 on the "
                    "CPU; on a GPU, a device-to-device copy's rate measured at the start)")
    ap.add_argument("--quick", action="store_true", help="L = 1024 and 1 repeat: a smoke test")
    ap.add_argument("--inline", action="store_true",
                    help="run the cases in this process (no memory figures on the CPU)")
    ap.add_argument("--json", metavar="PATH", help="save the raw results here")
    ap.add_argument("--plot", metavar="PATH", help="save fwd+bwd time vs L (log-log, matplotlib) here")
    ap.add_argument("--one", nargs=3, metavar=("LAYER", "IMPL", "L"),
                    help="one case in this process, as the sweep runs each (its JSON line on stdout)")
    ap.add_argument("--profile", action="store_true", help="with --one: then torch.profiler's op table of "
                    "one more fwd+bwd, on stderr")
    ap.add_argument("--from-json", metavar="PATH", help="measure nothing: print the report (and --plot) of the "
                    "results saved by an earlier --json, with this version's cost estimates")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    args.repeats = (1 if args.quick else 3) if args.repeats is None else args.repeats  # 0 is an error, not 3
    for name, value in (("--lengths", min(args.lengths)), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value < 1:
            ap.error(f"{name} must be >= 1; got {value}")
    for name, value in (("--peak-gflops", args.peak_gflops), ("--peak-gbs", args.peak_gbs)):
        if value is not None and not 0 < value < math.inf:
            ap.error(f"{name} must be a finite number > 0; got {value}")
    if args.profile and not args.one:
        ap.error("--profile goes with --one LAYER IMPL L")
    if not args.from_json and device_arg(ap, args.device).type == "cpu":  # a saved run's report: its device
        default_peaks(args)  # the figures at once; a GPU's are measured in `main`
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib (pip install matplotlib); leave --plot out to skip the figure")
    return args


def device_arg(ap, value):
    """`check_device` of a --device option: its torch.device, or the parser's error naming the option."""
    try:
        return check_device(value, "--device")
    except ValueError as e:
        ap.error(str(e))


def measure_peaks(device, n=8192, copy_bytes=2 * GB):
    """(GFLOP/s of an (n, n) x (n, n) float32 matmul, GB/s of a device-to-device copy counting bytes
    read and written) on a GPU: the limits its roofline floors use. Medians of 5 after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    ms = median_ms(lambda: a @ b, 5, warmup=1, device=device)
    x = torch.randn(copy_bytes // 4 // 1024, 1024, generator=g).to(device)
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), 5, warmup=1, device=device)
    return 2 * n**3 / ms / 1e6, 2 * x.numel() * 4 / copy_ms / 1e6


def default_peaks(args):
    """Fill in --peak-gflops / --peak-gbs left out: the issue's CPU figures, or measured on a GPU
    (also for a --from-json report of a GPU run saved without them)."""
    if args.peak_gflops and args.peak_gbs:
        return
    gflops, gbs = CPU_PEAKS if torch.device(args.device).type == "cpu" else measure_peaks(args.device)
    args.peak_gflops, args.peak_gbs = args.peak_gflops or gflops, args.peak_gbs or gbs


def main(argv=None):
    args = parse_args(argv)
    if args.one:  # a subprocess case: one JSON line on stdout
        name, impl, L = args.one
        flags = setup_process(args.threads)
        if impl == "throughput":
            result = measure_throughput(name, int(L), args.repeats, args.device)
        else:
            result = measure_case(name, impl, int(L), args.repeats, device=args.device)
        print(json.dumps(dict(result, **flags)))
        if args.profile and impl != "throughput":
            print(profile_case(name, impl, int(L), device=args.device), file=sys.stderr)
        return 0
    saved = None
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, steps = saved["results"], saved["throughput"]
        args.threads, args.repeats = saved["threads"], saved["repeats"]
        args.device = saved.get("device", "cpu")
        args.inline = saved.get("inline", all(r.get("peak_mb") is None for r in results if "skipped" not in r))
        peaks = saved.get("peaks", {})
        args.peak_gflops, args.peak_gbs = args.peak_gflops or peaks.get("gflops"), args.peak_gbs or peaks.get("gbs")
    else:
        setup_process(args.threads)
    default_peaks(args)
    if not args.from_json:
        results = [r for name in args.layers for r in run_layer(name, args)]
        steps = [run_case(name, "throughput", min(args.lengths), args) for name in args.layers]
    rows = limits(results, args)
    print("\n\n".join([header(args, results, saved), layer_table(results), limits_table(rows, args),
                       throughput_table(steps)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=saved["torch"] if saved else torch.__version__, threads=args.threads,
                           cpu=saved["cpu"] if saved else device_model(args.device), device=args.device,
                           inline=args.inline, peaks=dict(gflops=args.peak_gflops, gbs=args.peak_gbs),
                           sizes=dict(B=B, H=H, N=N), repeats=args.repeats, results=results, limits=rows,
                           throughput=steps), f, indent=1)
    if args.plot:
        plot(results, args.plot, "GPU" if torch.device(args.device).type == "cuda" else "CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
