"""Time and peak memory of `ops.diagonal_chunked` (forward + backward) in this process.

    python benchmarks/bench_chunked.py                          # B=16, H=128, N=64, L=16384, 2 threads
    python benchmarks/bench_chunked.py --kernels torch          # the PyTorch path (default: native where it runs)
    python benchmarks/bench_chunked.py --chunk 32 --block 4     # other chunk / time-block sizes
    python benchmarks/bench_chunked.py --channels 2             # C' = 2 output channels
    python benchmarks/bench_chunked.py --H 100                  # H channels (not a multiple of 16: padded lanes)
    python benchmarks/bench_chunked.py --H 20 --pad-limit 2     # padded further than the library would
    python benchmarks/bench_chunked.py --profile                # and where one pass spends its time
    python benchmarks/bench_chunked.py --parts                  # and its pieces alone: matmul rate, one layout pass,
                                                                # the system side's helpers, the native kernels
    python benchmarks/bench_chunked.py --sections               # and per pass: forward, backward, time in the
                                                                # helpers of the path that runs
    git show <commit>:src/diagssm/ops/chunked.py > /tmp/old.py
    python benchmarks/bench_chunked.py --module /tmp/old.py     # an older version of the op, same harness
    python benchmarks/bench_chunked.py --device cuda --block 64 # on a GPU (the PyTorch path), other blocks

Loss = sum(y * w) with w fixed random; gradients of u and of every system tensor; the D skip term
is passed to the op when it takes one, else added as D u (what the layer did before). Peak memory:
the ru_maxrss increase over the first forward + backward (run it in a fresh process per case); on a
GPU the CUDA allocator's peak over what was allocated before it (`diagssm.bench.PeakMemory`).
Set THP_MEM_ALLOC_ENABLE=1 in the environment, as `diagssm bench` does.
"""
import argparse
import importlib.util
import inspect
import statistics

import torch

from diagssm.bench import PeakMemory, device_arg, median_ms, setup_process
from diagssm.ops import chunked_native


def load_op(path):
    if path is None:
        from diagssm.ops.chunked import diagonal_chunked
        return diagonal_chunked
    spec = importlib.util.spec_from_file_location("chunked_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.diagonal_chunked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--channels", type=int, default=1, help="output channels C' (y is (B, L, C', H))")
    ap.add_argument("--H", type=int, default=128, help="channels H of u (B, L, H)")
    ap.add_argument("--pad-limit", type=float, help="chunked_native.PAD_LIMIT: the most lanes per channel for "
                    "which the native path pads H (default: the library's)")
    ap.add_argument("--module", help="a chunked.py file to time instead of the installed one")
    ap.add_argument("--kernels", choices=("auto", "native", "torch"),
                    help="the op's native kernels (ops/chunked_native.py), its PyTorch path, or native where "
                         "they run (default auto)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one more pass")
    ap.add_argument("--parts", action="store_true", help="time the op's pieces alone: its batched matmul "
                    "shapes, a large square matmul, one layout pass of u into chunk layout")
    ap.add_argument("--sections", action="store_true", help="time forward, backward and the op's helpers "
                    "(layout loads and stores, chunk states) within --repeats more passes (installed op only)")
    args = ap.parse_args(argv)
    args.device = str(device_arg(ap, args.device))
    if args.sections and args.module:
        ap.error("--sections times the installed op's helpers; leave out --module")
    if args.device != "cpu" and (args.parts or args.sections):
        ap.error("--parts and --sections time CPU pieces; leave them out with --device")
    if args.H < 1:
        ap.error(f"--H must be >= 1 (got {args.H})")
    limit = chunked_native.PAD_LIMIT
    if args.pad_limit is not None:
        if args.pad_limit < 1:
            ap.error(f"--pad-limit must be >= 1 (got {args.pad_limit})")
        chunked_native.PAD_LIMIT = args.pad_limit
    try:
        return run(args)
    finally:
        chunked_native.PAD_LIMIT = limit


def run(args):
    """Time the op as `main`'s arguments say (module docstring); 0."""
    kernels = args.kernels or "auto"
    setup_process(args.threads)
    op = load_op(args.module)
    takes = inspect.signature(op).parameters
    Bsz, H, M = 16, args.H, 32
    g, dev = torch.Generator().manual_seed(0), args.device
    w = torch.complex(-0.1 * torch.rand(H, M, generator=g), torch.randn(H, M, generator=g)).to(dev).requires_grad_()
    B_bar = torch.randn(H, M, dtype=torch.complex64, generator=g).to(dev).requires_grad_()
    C = torch.randn(args.channels, H, M, dtype=torch.complex64, generator=g).to(dev).requires_grad_()
    D = torch.randn(args.channels, H, generator=g).to(dev).requires_grad_()
    u = torch.randn(Bsz, args.L, H, generator=g).to(dev).requires_grad_()
    weight = torch.randn(Bsz, args.L, args.channels * H, generator=g).to(dev)
    kw = {k: v for k, v in (("chunk", args.chunk), ("block", args.block)) if v is not None and k in takes}
    if "native" in takes and kernels != "auto":
        kw["native"] = kernels == "native"

    def forward():
        if "D" in takes:
            return op(u, w, B_bar, C, 2, D=D, **kw)[0]
        return op(u, w, B_bar, C, 2, **kw)[0] + D * u[:, :, None]  # (B, L, C', H)

    def fwd_bwd():
        y = forward()  # held through the backward, as in the peaks quoted in benchmarks/README.md
        torch.autograd.grad((y.flatten(2) * weight).sum(), [u, w, B_bar, C, D])

    memory = PeakMemory(dev)
    memory.start()
    fwd_bwd()
    peak = memory.mb()
    ms = median_ms(fwd_bwd, args.repeats, warmup=0, device=dev)  # the memory pass was the warm-up
    where = f"threads={args.threads}" if dev == "cpu" else f"device {dev}"
    print(f"diagonal_chunked{'' if args.module is None else ' from ' + args.module} B={Bsz} H={H} N={2 * M} "
          f"L={args.L} C'={args.channels} {where} {kw or ''}: fwd+bwd median {ms:.{0 if ms >= 10 else 2}f} ms, "
          f"peak {peak:.0f} MB over the inputs")
    if args.parts:
        parts(u.detach(), args)
    if args.sections:
        forward()
        native = chunked_native.paths().get(chunked_native.CHUNKED_OP) == ""  # the path the op logged
        sections(forward, weight, [u, w, B_bar, C, D], args.repeats, native)
    if args.profile:
        with torch.profiler.profile(record_shapes=True) as prof:
            fwd_bwd()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


def sections(forward, weight, inputs, repeats, native=False):
    """Per pass (median of `repeats`): forward ms, backward ms (of loss = sum(y * w)), and the ms
    spent inside the op's helpers over the pass, timed by wrapping them in their module (so what
    is left outside is the difference).
    PyTorch path: `_load` (chunk layout in: u forward, u and the output gradient backward),
    `_store` (chunk layout out: y, the input gradient), `_states` (forward: chunk sums, one
    matmul, and the carry), `_put_states` (state rows).
    Native kernels (`native`): `_chunks_fwd` (the forward's full chunks in one pass, where B >= threads),
    `_mm` (rows contractions: otherwise the forward chunk sums and outputs; the last chunk; backward
    states' gradients and input gradient), `_red` (the three weight gradients), `_carry` and
    `_carry_back` (the scans over chunk boundaries)."""
    import collections
    import time

    import diagssm.ops.chunked as chunked
    import diagssm.ops.chunked_native as chunked_native

    module = chunked_native if native else chunked
    names = (("_chunks_fwd", "_mm", "_red", "_carry", "_carry_back") if native
             else ("_load", "_store", "_states", "_put_states"))
    spent = collections.defaultdict(list)
    originals = {name: getattr(module, name) for name in names}

    def timed(name):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = originals[name](*a, **k)
            spent[name][-1] += time.perf_counter() - t0
            return out
        return run

    try:
        for name in names:
            setattr(module, name, timed(name))
        for _ in range(repeats):
            for name in names:
                spent[name].append(0.0)
            t0 = time.perf_counter()
            y = forward()
            t1 = time.perf_counter()
            loss = (y.flatten(2) * weight).sum()
            t2 = time.perf_counter()
            torch.autograd.grad(loss, inputs)
            spent["forward"].append(t1 - t0)
            spent["backward"].append(time.perf_counter() - t2)
    finally:
        for name in names:
            setattr(module, name, originals[name])
    row = ", ".join(f"{name} {1e3 * statistics.median(spent[name]):.1f}" for name in ("forward", "backward") + names)
    print(f"  per pass, ms (median of {repeats}): {row}")


def parts(u, args):
    """GFLOP/s of the op's batched matmul shapes (one time block: H batches of (nb B) rows; inner
    sizes T + 2M = 128, T = 64, 2M = 64) and of a (4096, 4096) square matmul, ms of one
    `_load` pass of u (B, L, H) into chunk layout (what each layout pass over (B, L, H) costs),
    the system side's helpers against their twins (`system_parts`) and the native kernels' GFLOP/s
    (`native_parts`)."""
    from diagssm.ops.chunked import _blocks, _load, _stage, block_size, chunk_size

    Bsz, L, H = u.shape
    T, M = chunk_size(L), 32
    nc = -(-L // T)
    nb = args.block or block_size(nc, H * Bsz * T)
    rows = nb * Bsz
    for k, n in ((T + 2 * M, T), (T, 2 * M), (T, T + 2 * M)):
        a, b = torch.randn(H, rows, k), torch.randn(H, k, n)
        out = torch.empty(H, rows, n)
        ms = median_ms(lambda: torch.bmm(a, b, out=out), 7, warmup=2)
        print(f"  bmm ({H}, {rows}, {k}) @ ({H}, {k}, {n}): {ms:.2f} ms, {2 * H * rows * k * n / ms / 1e6:.0f} GFLOP/s")
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    ms = median_ms(lambda: a @ b, 3, warmup=1)
    print(f"  mm (4096, 4096) @ (4096, 4096): {ms:.0f} ms, {2 * 4096 ** 3 / ms / 1e6:.0f} GFLOP/s")
    dst, stage = u.new_empty(H, nb, Bsz, 1, T), u.new_empty(Bsz * H * nb * T)

    def load_all():
        for _, c0, k, _ in _blocks(nc, nb):
            _load(u[:, :, None], c0 * T, T, dst[:, :k], _stage(stage, Bsz, k, 1, H, T))

    print(f"  one layout pass of u ({Bsz}, {L}, {H}) into chunk layout: {median_ms(load_all, 5, warmup=1):.1f} ms")
    system_parts(H, T, M)
    native_parts(u, T, M)


def system_parts(H, T, M):
    """ms of the per-pass work on the system side, independent of B and L: each helper of
    `diagonal_chunked` against its reference twin, forward + backward (gradient of a weighted sum),
    and the native path's weight tiling (as many (K, I, H) weights as a pass tiles) against PyTorch's."""
    from diagssm.ops import chunked_native as cn
    from diagssm.ops.chunked import _powers, _toeplitz
    from diagssm.ops.conv import _toeplitz as toeplitz_gather

    g = torch.Generator().manual_seed(3)
    w = torch.complex(-0.1 * torch.rand(H, M, generator=g), torch.randn(H, M, generator=g)).requires_grad_()
    K = torch.randn(1, H, T, generator=g).requires_grad_()
    j = torch.arange(T, dtype=torch.float32)

    def fwd_bwd(fn, x):
        out = fn()
        weight = torch.ones_like(out)
        return lambda: torch.autograd.grad((fn() * weight).real.sum(), x)

    pairs = (("powers exp(w j), (H, M, T)", w, lambda: _powers(w, j), lambda: torch.exp(w[..., None] * j),
              "real exp, cos, sin", "complex exp"),
             ("Toeplitz block, (H, T, T)", K, lambda: _toeplitz(K, T),
              lambda: toeplitz_gather(K[0]), "windows", "gather"))
    for name, x, fast, ref, fast_how, ref_how in pairs:
        ms = [median_ms(fwd_bwd(fn, x), 7, warmup=2) for fn in (fast, ref)]
        print(f"  system side, {name}, fwd+bwd: {fast_how} {ms[0]:.2f} ms, {ref_how} {ms[1]:.2f} ms")
    if cn.unsupported(torch.empty(1, 1, H), 1, T, M):
        return
    W, into = torch.randn(H, T + 2 * M, T, generator=g), torch.randn(H, T, 2 * M, generator=g)
    maps = (W[:, :T], W[:, T:], into, into)  # Toeplitz, out of state, into state, the last chunk's
    views = [m.permute(1, 2, 0) for m in maps] + [m.permute(2, 1, 0) for m in maps]  # forward, backward

    def tile_all(tiles):
        return lambda: [tiles(v) for v in views]

    ms = [median_ms(tile_all(fn), 7, warmup=2) for fn in (cn._tiles, cn._tiles_ref)]
    print(f"  system side, tiling a pass's {len(views)} weights (K, I, H), K and I in ({T}, {2 * M}): "
          f"library {ms[0]:.2f} ms, PyTorch {ms[1]:.2f} ms")


def native_parts(u, T, M):
    """GFLOP/s of the native kernels alone on warm buffers at the op's sizes (when they are
    available and the sizes fit them): `rows_mm` as the chunk sums use it (all rows (b, c), T -> 2M
    per channel) and `rows_red` as the weight gradient of the out-of-state map (2M x T per
    channel, summed over all rows)."""
    from diagssm.ops import chunked_native as cn

    Bsz, L, H = u.shape
    if cn.unsupported(u, 1, T, M):
        print(f"  native kernels: not timed ({cn.unsupported(u, 1, T, M)})")
        return
    lib, nc, P = cn.library(), L // T, 2 * M
    U, X = u.view(Bsz, nc, T, H), torch.randn(Bsz, nc, P, H)
    W, G = cn._tiles(torch.randn(T, P, H)), cn._tiled_zeros(torch.empty(0), P, T, H)
    flops = 2 * Bsz * L * P * H
    for name, fn in (("rows_mm (rows x T) -> 2M", lambda: cn._mm(lib, X, U, W)),
                     ("rows_red 2M x T, summed over rows", lambda: cn._red(lib, G, X, U))):
        ms = median_ms(fn, 7, warmup=2)
        print(f"  native {name}, {Bsz * nc} rows of {H} channels: {ms:.2f} ms, {flops / ms / 1e6:.0f} GFLOP/s")
    forward_parts(cn, lib, U, T, M)


def forward_parts(cn, lib, U, T, M):
    """ms of the op's forward over U's full chunks (warm buffers, C' = 1): in one pass (`chunks_fwd`)
    and as the three calls it replaces (chunk sums, carry, outputs)."""
    Bsz, nc, _, H = U.shape
    P = 2 * M
    g = torch.Generator().manual_seed(1)
    X, Y = torch.zeros(Bsz, nc + 1, P, H), torch.empty(Bsz, nc, T, H)
    Win, Wtoe, Wout = (cn._tiles(0.1 * torch.randn(K, I, H, generator=g)) for K, I in ((T, P), (T, T), (P, T)))
    ar, ai = 0.5 * torch.rand(M, H, generator=g), 0.5 * torch.rand(M, H, generator=g)

    def three_calls():
        cn._mm(lib, X[:, 1:], U, Win)
        cn._carry(lib, X, ar, ai)
        cn._mm(lib, Y, U, Wtoe, A2=X[:, :nc], W2=Wout, tri=1)

    for name, fn in (("chunks_fwd (one pass)", lambda: cn._chunks_fwd(lib, Y, X, U, Win, Wtoe, Wout, ar, ai)),
                     ("sums, carry, outputs (three calls)", three_calls)):
        print(f"  native forward, {name}, {Bsz * nc} chunks: {median_ms(fn, 7, warmup=2):.2f} ms")


if __name__ == "__main__":
    main()
