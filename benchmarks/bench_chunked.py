"""Time and peak memory of `ops.diagonal_chunked` (forward + backward) in this process.

    python benchmarks/bench_chunked.py                          # B=16, H=128, N=64, L=16384, 2 threads
    python benchmarks/bench_chunked.py --chunk 32 --block 4     # other chunk / time-block sizes
    python benchmarks/bench_chunked.py --profile                # and where one pass spends its time
    git show <commit>:src/diagssm/ops/chunked.py > /tmp/old.py
    python benchmarks/bench_chunked.py --module /tmp/old.py     # an older version of the op, same harness

Loss = sum(y * w) with w fixed random; gradients of u and of every system tensor; the D skip term
is passed to the op when it takes one, else added as D u (what the layer did before). Peak memory:
the ru_maxrss increase over the first forward + backward (run it in a fresh process per case).
Set THP_MEM_ALLOC_ENABLE=1 in the environment, as `diagssm bench` does.
"""
import argparse
import importlib.util
import inspect

import torch

from diagssm.bench import maxrss_mb, median_ms, setup_process


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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--module", help="a chunked.py file to time instead of the installed one")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table of one more pass")
    args = ap.parse_args(argv)
    setup_process(args.threads)
    op = load_op(args.module)
    takes = inspect.signature(op).parameters
    Bsz, H, M = 16, 128, 32
    g = torch.Generator().manual_seed(0)
    w = torch.complex(-0.1 * torch.rand(H, M, generator=g), torch.randn(H, M, generator=g)).requires_grad_()
    B_bar = torch.randn(H, M, dtype=torch.complex64, generator=g).requires_grad_()
    C = torch.randn(1, H, M, dtype=torch.complex64, generator=g).requires_grad_()
    D = torch.randn(1, H, generator=g).requires_grad_()
    u = torch.randn(Bsz, args.L, H, generator=g).requires_grad_()
    weight = torch.randn(Bsz, args.L, H, generator=g)
    kw = {k: v for k, v in (("chunk", args.chunk), ("block", args.block)) if v is not None and k in takes}

    def fwd_bwd():
        if "D" in takes:
            y = op(u, w, B_bar, C, 2, D=D, **kw)[0]
        else:
            y = op(u, w, B_bar, C, 2, **kw)[0] + D * u[:, :, None]
        torch.autograd.grad((y.flatten(2) * weight).sum(), [u, w, B_bar, C, D])

    base = maxrss_mb()
    fwd_bwd()
    peak = maxrss_mb() - base
    ms = median_ms(fwd_bwd, args.repeats, warmup=0)  # the memory pass was the warm-up
    print(f"diagonal_chunked{'' if args.module is None else ' from ' + args.module} B={Bsz} H={H} N={2 * M} "
          f"L={args.L} threads={args.threads} {kw or ''}: fwd+bwd median {ms:.0f} ms, "
          f"peak {peak:.0f} MB over the inputs")
    if args.profile:
        with torch.profiler.profile(record_shapes=True) as prof:
            fwd_bwd()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    main()
