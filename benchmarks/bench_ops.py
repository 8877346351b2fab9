"""Speed and memory of the diagssm ops against their reference twins, on CPU, float32.

For each op in {s4d_kernel, dss_kernel, scan, fft_conv}, each implementation in {fast, ref}
(`diagssm.ops.<op>` and `<op>_ref`) and each length L, it measures
  - fwd ms:      one forward under torch.no_grad(), median of --repeats after one warm-up;
  - fwd+bwd ms:  forward + gradients w.r.t. every float input, loss = sum(out * w) (real part
                 for complex outputs, w fixed random weights), median of --repeats;
  - peak extra MB: the increase of ru_maxrss over one forward+backward pass.
Every (op, impl, L) case runs in a fresh subprocess (`bench_ops.py --one OP IMPL L`), so that
ru_maxrss is that case's own high-water mark: it builds its inputs, warms up at L=64, reads
ru_maxrss, runs one forward+backward (the memory figure), then the timed repeats, and prints one
JSON line. The case processes are set up as those of the layer benchmark (`diagssm.bench`):
THP_MEM_ALLOC_ENABLE=1 in their environment unless it is set, torch.set_flush_denormal(True), and
--threads; the report's header says what took effect. Reference cases expected to need more than
--max-ref-gb or to take longer than --max-ref-seconds (extrapolated from the same ref at a smaller
L, probed at L=512 if none was asked for) are skipped; fast cases always run.

Sizes: H=256 channels, N=64 (32 complex modes per channel), B=16; scan state P=256.

    python benchmarks/bench_ops.py                        # L = 1024, 4096, 16384
    python benchmarks/bench_ops.py --lengths 1024 --repeats 1 --json out.json
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

from diagssm.bench import case_env, cpu_model, maxrss_mb, median_ms, process_settings, setup_process  # shared

import torch

from diagssm import ops

H, N, B, P = 256, 64, 16, 256
M = N // 2  # complex modes per channel (conjugate pairs)
OPS = ("s4d_kernel", "dss_kernel", "scan", "fft_conv")
IMPLS = ("fast", "ref")
PROBE_L = 512
GB, MB = 2**30, 2**20
# ref twins: (exponent of L in time and memory, rough peak bytes of one fwd+bwd at L)
REF_COST = {
    "s4d_kernel": (1, lambda L: 2 * L * H * M * 8),  # a Python loop over L, autograd keeps every step
    "dss_kernel": (1, lambda L: 4 * H * M * L * 8),  # several (H, N/2, L) complex64 tensors
    "scan": (1, lambda L: 5 * B * L * P * 8),  # a Python loop over L, (B, P) complex64 per step
    "fft_conv": (2, lambda L: 2.5 * H * L * L * 4),  # (H, L, L) Toeplitz matrices and their gradient
}
SIZES = (f"H={H} channels, N={N} ({M} complex modes per channel: A, B, C, W (H, {M}) complex64, "
         f"dt (H,), DSS Lambda ({M},) shared), B={B}; scan: Bu (B, L, {P}) complex64, A_bar ({P},) "
         f"complex64; fft_conv: u (B, L, H), K (H, L), D (H,) float32")


def make_inputs(op, L, seed=0):
    """The op's inputs in call order, float/complex leaves with requires_grad."""
    g = torch.Generator().manual_seed(seed)
    cplx = lambda *shape: torch.randn(*shape, dtype=torch.complex64, generator=g)  # noqa: E731
    lin = torch.complex(torch.full((M,), -0.5), math.pi * torch.arange(M, dtype=torch.float32))
    dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    if op == "s4d_kernel":
        xs = [lin.expand(H, M).clone(), torch.ones(H, M, dtype=torch.complex64), cplx(H, M), dt]
    elif op == "dss_kernel":
        xs = [lin, cplx(H, M), dt]
    elif op == "scan":
        a = torch.complex(torch.full((P,), -0.5), math.pi * torch.arange(P, dtype=torch.float32))
        xs = [torch.exp(0.01 * a), cplx(B, L, P)]
    else:
        xs = [torch.randn(B, L, H, generator=g), torch.randn(H, L, generator=g) / L**0.5,
              torch.randn(H, generator=g)]
    return [x.requires_grad_() for x in xs]


def out_shape(op, L):
    return (H, L) if op.endswith("kernel") else (B, L, H if op == "fft_conv" else P)


def forward(op, impl, xs, L):
    fn = getattr(ops, op if impl == "fast" else op + "_ref")
    return fn(*xs, L) if op.endswith("kernel") else fn(*xs)


def fwd_bwd(op, impl, xs, w, L):
    loss = (forward(op, impl, xs, L) * w).sum()
    torch.autograd.grad(loss.real if loss.is_complex() else loss, xs)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def measure_one(op, impl, L, repeats):
    """One case, in this (fresh) process: memory of one fwd+bwd, then the timed repeats."""
    xs = make_inputs(op, L)
    w = torch.randn(out_shape(op, L), generator=torch.Generator().manual_seed(1))
    fwd_bwd(op, impl, make_inputs(op, 64), torch.ones(out_shape(op, 64)), 64)  # load libraries
    base, gap = maxrss_mb(), maxrss_mb() - rss_mb()
    t0 = time.perf_counter()
    fwd_bwd(op, impl, xs, w, L)  # also the warm-up of the fwd+bwd timing
    first = time.perf_counter() - t0
    peak = maxrss_mb() - base
    with torch.no_grad():
        fwd = median_ms(lambda: forward(op, impl, xs, L), repeats, warmup=1)
    fb = median_ms(lambda: fwd_bwd(op, impl, xs, w, L), repeats, warmup=0)
    return dict(op=op, impl=impl, L=L, fwd_ms=fwd, fwdbwd_ms=fb, first_fwdbwd_ms=1e3 * first,
                peak_extra_mb=peak, baseline_gap_mb=gap)  # threads: recorded by setup_process


def run_case(op, impl, L, args, repeats=None):
    """Run one case in a fresh subprocess and parse its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", op, impl, str(L),
           "--repeats", str(repeats or args.repeats), "--threads", str(args.threads)]
    print(f"  {op} {impl} L={L} ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=case_env())
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["?"])[-1][:80]
        return dict(op=op, impl=impl, L=L, skipped=f"failed (rc {p.returncode}: {why})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ref_skip(op, L, prev, args):
    """Why the ref case at L should be skipped ('' to run it); prev: measured ref at a smaller L."""
    p, mem = REF_COST[op]
    need = mem(L)
    if prev is not None:
        s = (L / prev["L"]) ** p
        need = max(need, prev["peak_extra_mb"] * MB * s)
        fb = min(prev["fwdbwd_ms"], prev["first_fwdbwd_ms"])  # the less disturbed by other load
        secs = s * (prev["fwd_ms"] + fb) * (1 + args.repeats) / 1e3
        if secs > args.max_ref_seconds:
            return f"skipped (~{secs:.0f} s)"
    return f"skipped (needs ~{need / GB:.1f} GB)" if need > args.max_ref_gb * GB else ""


def run_op(op, args):
    """All the cases of one op, ref before fast at each L; returns (results, probes)."""
    results, probes, prev = [], [], None
    for L in sorted(args.lengths):
        why = ref_skip(op, L, prev, args)
        if not why and prev is None and L > PROBE_L and not ref_skip(op, PROBE_L, None, args):
            probe = run_case(op, "ref", PROBE_L, args, repeats=1)  # something to extrapolate from
            if "skipped" not in probe:
                probes.append(probe)
                prev = probe
                why = ref_skip(op, L, prev, args)
        ref = dict(op=op, impl="ref", L=L, skipped=why) if why else run_case(op, "ref", L, args)
        if "skipped" not in ref:
            prev = ref
        results += [run_case(op, "fast", L, args), ref]
    return results, probes


def header(args, results):
    return "\n".join([
        "# diagssm ops: fast vs reference (CPU, float32 / complex64)", "",
        f"torch {torch.__version__}, threads = {args.threads}, CPU: {cpu_model()}. {process_settings(results)}",
        f"Sizes: {SIZES}.",
        f"fwd: forward under no_grad; fwd+bwd: forward + gradients of all float inputs; median of "
        f"{args.repeats} after one warm-up. Peak extra MB: ru_maxrss increase over one fwd+bwd, "
        f"fresh subprocess per case. Speed-up: ref time / fast time (fwd, fwd+bwd).", ""])


def table(results):
    rows = ["| op | L | impl | fwd ms | fwd+bwd ms | peak extra MB | speed-up vs ref |",
            "|---|---|---|---|---|---|---|"]
    by_key = {(r["op"], r["L"], r["impl"]): r for r in results}
    for r in results:
        if "skipped" in r:
            rows.append(f"| {r['op']} | {r['L']} | {r['impl']} | {r['skipped']} | | | |")
            continue
        ref = by_key.get((r["op"], r["L"], "ref"), {})
        speed = ""
        if r["impl"] == "fast" and "fwd_ms" in ref:
            speed = " / ".join(f"{x:.{1 if x >= 1 else 2}f}x" for x in
                               (ref["fwd_ms"] / r["fwd_ms"], ref["fwdbwd_ms"] / r["fwdbwd_ms"]))
        rows.append(f"| {r['op']} | {r['L']} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} "
                    f"| {r['peak_extra_mb']:.0f} | {speed} |")
    return "\n".join(rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each case")
    ap.add_argument("--max-ref-gb", type=float, default=6.0, help="skip ref cases needing more")
    ap.add_argument("--max-ref-seconds", type=float, default=60.0,
                    help="skip ref cases whose passes (warm-ups + repeats) are expected to take longer")
    ap.add_argument("--json", metavar="PATH", help="save the raw results here")
    ap.add_argument("--one", nargs=3, metavar=("OP", "IMPL", "L"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        op, impl, L = args.one
        settings = setup_process(args.threads)  # as the layer benchmark's cases: threads, flush-to-zero
        print(json.dumps(dict(measure_one(op, impl, int(L), args.repeats), **settings)))
        return
    torch.set_num_threads(args.threads)
    results, probes = [], []
    for op in args.ops:
        r, p = run_op(op, args)
        results, probes = results + r, probes + p
    print(header(args, results))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=args.threads, cpu=cpu_model(), sizes=SIZES,
                           repeats=args.repeats, results=results, probes=probes), f, indent=1)


if __name__ == "__main__":
    main()
