"""Where a forward + backward of the S5 layer (mode="scan") spends its time: its pieces alone.

    python benchmarks/bench_s5.py                  # B=16, H=128, P=64 (32 modes), L=16384, 2 threads
    python benchmarks/bench_s5.py --L 4096

Each piece is timed on its own at the layer's sizes (median of --repeats, after one warm-up), in
float32, forward + backward with gradients of every input:
    mix_in    B u: (B L, H) @ (H, 2M) and its two backward matmuls
    mix_out   Re(C x): (B L, 2M) @ (2M, H) and its two backward matmuls
    scan      the diagonal recurrence over (B, L, M) complex (`ops.scan`), and its backward scan
    skip      y + D u, in place as the layer does it, with the gradients of y, u and D
    loss      sum(y * w), the loss the layer benchmark (`diagssm bench`) uses to take gradients
The sum is close to, not equal to, a layer pass (the pieces share no caches here). Set
THP_MEM_ALLOC_ENABLE=1 in the environment, as `diagssm bench` does.
"""
import argparse

import torch

from diagssm.bench import median_ms, setup_process
from diagssm.layers.s5 import mix_in, mix_out
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

    def skip():
        y = y0 * 1  # a fresh non-leaf, as the layer's projection output is
        return torch.autograd.grad(y.addcmul_(u, D), [y0, u, D], w)

    return {
        "mix_in": lambda: torch.autograd.grad(mix_in(u, B_), [u, B_], g_x),
        "mix_out": lambda: torch.autograd.grad(mix_out(x, C_), [x, C_], w),
        "scan": lambda: torch.autograd.grad(scan(A_bar, Bu), [A_bar, Bu], g_x),
        "skip": skip,
        "loss": lambda: torch.autograd.grad((y0 * w).sum(), [y0]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    setup_process(args.threads)
    Bsz, H, M = 16, 128, 32
    ms = {name: median_ms(fn, args.repeats, warmup=1) for name, fn in pieces(Bsz, args.L, H, M).items()}
    print(f"S5 pieces, fwd+bwd, B={Bsz} H={H} P={2 * M} L={args.L} threads={args.threads}, ms (median of "
          f"{args.repeats}): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + f"; sum {sum(ms.values()):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
