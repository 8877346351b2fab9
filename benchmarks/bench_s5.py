"""Where a forward + backward of the S5 layer (mode="scan") spends its time: its pieces alone.

    python benchmarks/bench_s5.py                  # B=16, H=128, P=64 (32 modes), L=16384, 2 threads
    python benchmarks/bench_s5.py --L 4096
    python benchmarks/bench_s5.py --tb 32 64 128 256   # the fused op's forward and backward per block size
    python benchmarks/bench_s5.py --layer --bidirectional   # the whole layer (DIAGSSM_NATIVE=0: PyTorch ops)
    python benchmarks/bench_s5.py --layer --H 100 --N 56    # other sizes (on padded lanes: ops.s5_native)

Each piece is timed on its own at the layer's sizes (median of --repeats, after one warm-up), in
float32, forward + backward with gradients of every input:
    mix_in    B u: (B L, H) @ (H, 2M) and its two backward matmuls
    mix_out   Re(C x): (B L, 2M) @ (2M, H) and its two backward matmuls
    scan      the diagonal recurrence over (B, L, M) complex (`ops.scan`), and its backward scan
    skip      y + D u, in place as the layer does it, with the gradients of y, u and D
    loss      sum(y * w), the loss the layer benchmark (`diagssm bench`) uses to take gradients
The sum of these is close to, not equal to, a pass of the layer composed from PyTorch ops (the
pieces share no caches here). `fused` is all but the loss in one native op (`ops.s5_fused`, which
the layer runs where it can), its gradients taken for sum(y * w) too; it is not in the sum.
With --tb, the fused op's forward and backward alone at each block size. With --layer, the whole
layer's forward + backward instead (gradients of u and every parameter; --bidirectional for a
bidirectional layer), on whichever path it takes (DIAGSSM_NATIVE=0 in the environment: the PyTorch ops). Set
THP_MEM_ALLOC_ENABLE=1 in the environment, as `diagssm bench` does.
"""
import argparse

import torch

from diagssm import bench
from diagssm.bench import median_ms, setup_process
from diagssm.layers.s5 import mix_in, mix_out
from diagssm.ops import chunked_native, s5_native
from diagssm.ops.scan import scan


def pieces(Bsz, L, H, M):
    """name -> a function doing that piece's forward + backward once."""
    g = torch.Generator().manual_seed(0)
    c64 = torch.complex64

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    u, w, y0, D = leaf(Bsz, L, H), torch.randn(Bsz, L, H, generator=g), leaf(Bsz, L, H), leaf(H)
    B_, C_ = leaf(M, H, dtype=c64), leaf(H, M, dtype=c64)
    x, Bu = leaf(Bsz, L, M, dtype=c64), leaf(Bsz, L, M, dtype=c64)
    A_bar = torch.complex(0.05 + 0.9 * torch.rand(M, generator=g), 0.1 * torch.randn(M, generator=g)).requires_grad_()
    g_x = torch.randn(Bsz, L, M, generator=g, dtype=c64)

    W_in, W_out = leaf(H, 2 * M), leaf(H, 2 * M)

    def skip():
        y = y0 * 1  # a fresh non-leaf, as the layer's projection output is
        return torch.autograd.grad(y.addcmul_(u, D), [y0, u, D], w)

    out = {
        "mix_in": lambda: torch.autograd.grad(mix_in(u, B_), [u, B_], g_x),
        "mix_out": lambda: torch.autograd.grad(mix_out(x, C_), [x, C_], w),
        "scan": lambda: torch.autograd.grad(scan(A_bar, Bu), [A_bar, Bu], g_x),
        "skip": skip,
        "loss": lambda: torch.autograd.grad((y0 * w).sum(), [y0]),
    }
    if s5_native.chunked_native.available():  # the fused op: all of the above but the loss
        out["fused"] = lambda: torch.autograd.grad(s5_native.s5_fused(u, W_in, A_bar, W_out, D)[0],
                                                   [u, W_in, A_bar, W_out, D], w)
    return out


def block_sizes(Bsz, L, H, M, sizes, repeats):
    """Lines: the fused op's forward and backward ms at each time block size TB."""
    g = torch.Generator().manual_seed(0)
    shapes = [(Bsz, L, H), (Bsz, L, H), (H, 2 * M), (H, 2 * M), (H,)]
    u, w, W_in, W_out, D = (torch.randn(*s, generator=g) for s in shapes)
    A_bar = torch.complex(0.05 + 0.9 * torch.rand(M, generator=g), 0.1 * torch.randn(M, generator=g))
    leaves = [t.requires_grad_() for t in (u, W_in, A_bar, W_out, D)]
    lines, default = [], s5_native.TB
    try:
        for tb in sizes:
            s5_native.TB = tb
            with torch.no_grad():
                fwd = median_ms(lambda: s5_native.s5_fused(*leaves), repeats, warmup=1)
            y = s5_native.s5_fused(*leaves)[0]
            bwd = median_ms(lambda: torch.autograd.grad(y, leaves, w, retain_graph=True), repeats, warmup=1)
            lines.append(f"fused TB={tb}: fwd {fwd:.1f} ms, bwd {bwd:.1f} ms")
    finally:
        s5_native.TB = default
    return lines


def layer_time(L, bidirectional, repeats, H=bench.H, N=bench.N):
    """One line: the S5 layer's forward + backward median ms, as `diagssm bench` times its cases (loss
    sum(y * w), at its B; H and d_state N default to its), and the path the layer took."""
    chunked_native.paths(forget=True)
    _, fwd_bwd = bench._case("s5", "scan", size=(H, N), bidirectional=bidirectional)
    u, w = bench._inputs(L, channels=H)
    ms = median_ms(lambda: fwd_bwd(u, w), repeats, warmup=1)
    why = chunked_native.paths().get(chunked_native.S5_SCAN, "?")
    return (f"S5 layer{' bidirectional' if bidirectional else ''}, fwd+bwd, B={bench.B} H={H} P={N} "
            f"L={L}: {ms:.1f} ms (median of {repeats}), {'fused native op' if not why else 'PyTorch ops: ' + why}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tb", type=int, nargs="+", help="time fused op's forward and backward at these block sizes")
    ap.add_argument("--layer", action="store_true", help="time the whole layer's forward + backward instead")
    ap.add_argument("--bidirectional", action="store_true", help="with --layer: a bidirectional layer")
    ap.add_argument("--H", type=int, default=bench.H, help="with --layer: the layer's d_model")
    ap.add_argument("--N", type=int, default=bench.N, help="with --layer: the layer's d_state")
    args = ap.parse_args(argv)
    if (args.H, args.N) != (bench.H, bench.N) and not args.layer:
        ap.error("--H and --N go with --layer")
    setup_process(args.threads)
    Bsz, H, M = 16, 128, 32
    if args.layer:
        print(layer_time(args.L, args.bidirectional, args.repeats, args.H, args.N))
        return 0
    if args.tb:
        print("\n".join(block_sizes(Bsz, args.L, H, M, args.tb, args.repeats)))
        return 0
    ms = {name: median_ms(fn, args.repeats, warmup=1) for name, fn in pieces(Bsz, args.L, H, M).items()}
    composed = sum(v for k, v in ms.items() if k != "fused")
    print(f"S5 pieces, fwd+bwd, B={Bsz} H={H} P={2 * M} L={args.L} threads={args.threads}, ms (median of "
          f"{args.repeats}): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != "fused")
          + f"; sum {composed:.1f}" + (f"; fused {ms['fused']:.1f}" if "fused" in ms else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
