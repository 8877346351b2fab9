"""The S4D, DSS and S4 layers' two backends, "chunked" and "fft", against each other by device, dtype
and length: the measurements behind `SSMLayer.pick_backend`'s "auto" choice.

    python benchmarks/bench_backends.py                                  # float32 and float64, L 1024-16384
    python benchmarks/bench_backends.py --layers s4                      # S4 (its chunked path has a dense carry)
    python benchmarks/bench_backends.py --dtypes float64 --lengths 1024 4096
    python benchmarks/bench_backends.py --device cuda --lengths 1024 4096 16384 65536

Per case: forward + backward ms (gradients of u and every parameter, loss = sum(y * w)), the
median of --repeats after one warm-up, in this process, at B = 16, H = 128, d_state = 64 (the
sizes of `diagssm bench`), and which backend "auto" picks there. Set THP_MEM_ALLOC_ENABLE=1 in the
environment, as `diagssm bench` does. On a GPU each pass is timed to the end of its queued work.
"""
import argparse

import torch

from diagssm.bench import B, H, N, device_arg, median_ms, setup_process
from diagssm.layers import DSS, S4, S4D

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LAYERS = {"s4d": S4D, "dss": DSS, "s4": S4}


def make(name, dtype, width, backend="auto", device="cpu"):
    torch.manual_seed(0)
    return LAYERS[name](width, N, backend=backend, check_finite=False).to(device, dtype)


def fwd_bwd_ms(name, backend, dtype, L, repeats, batch=B, width=H, device="cpu"):
    layer = make(name, dtype, width, backend, device)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(batch, L, width, generator=g, dtype=dtype).to(device).requires_grad_()
    w = torch.randn(batch, L, width, generator=g, dtype=dtype).to(device)
    params = [u] + list(layer.parameters())
    ms = median_ms(lambda: torch.autograd.grad((layer(u) * w).sum(), params), repeats, warmup=1, device=device)
    assert layer.last_backend == backend
    return ms


def auto_pick(name, dtype, L, width=H, device="cpu"):
    return make(name, dtype, width, device=device).pick_backend(torch.ones(1, 1, width, dtype=dtype, device=device), L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="+", choices=tuple(LAYERS), default=["s4d", "dss"])
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--batch", type=int, default=B, help=argparse.SUPPRESS)  # small sizes for the tests
    ap.add_argument("--width", type=int, default=H, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = str(device_arg(ap, args.device))
    setup_process(args.threads)
    where = f"threads={args.threads}" if args.device == "cpu" else f"device {args.device}"
    print(f"fwd+bwd ms, B={args.batch}, H={args.width}, d_state={N}, {where}, median of {args.repeats}\n")
    print("| layer | dtype | L | chunked ms | fft ms | fft / chunked | auto picks |")
    print("|---|---|---|---|---|---|---|")
    for name in args.layers:
        for dname in args.dtypes:
            for L in args.lengths:
                ms = {b: fwd_bwd_ms(name, b, DTYPES[dname], L, args.repeats, args.batch, args.width, args.device)
                      for b in ("chunked", "fft")}
                pick = auto_pick(name, DTYPES[dname], L, args.width, args.device)
                print(f"| {name} | {dname} | {L} | {ms['chunked']:.1f} | {ms['fft']:.1f} "
                      f"| {ms['fft'] / ms['chunked']:.2f} | {pick} |", flush=True)
    return 0


if __name__ == "__main__":
    main()
